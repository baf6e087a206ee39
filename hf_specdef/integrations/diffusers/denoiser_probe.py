"""Probe inputs for diffusers denoisers (UNets, DiT / PixArt transformers, SD3 / Flux MMDiT), built from their config.

The diffusers integration adds :func:`diffusers_probe` to :data:`hf_specdef.analysis.probe.PROBE_BUILDERS` when it installs.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ModelMixin

from hf_specdef.analysis.probe import first_float_param
from hf_specdef.sites import diffusers as diffusers_sites
from hf_specdef.sites.config_checks import cfg_get
from hf_specdef.sites.mmdit import MMDIT_CLASSES

__all__ = ["diffusers_probe"]


def _int(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def diffusers_probe(model: Any, seed: int = 0, batch: int = 2, tokens: int = 8) -> dict[str, Any] | None:
    """A deterministic probe batch for a diffusers denoiser, built from its config (``None`` for other models).

    UNets get ``sample`` (a small latent whose side is a multiple of the down-sampling factor), ``timestep`` and
    ``encoder_hidden_states`` (``cross_attention_dim``, or ``encoder_hid_dim`` when the UNet projects them),
    plus ``added_cond_kwargs`` for SDXL-style ``text_time`` conditioning and ``class_labels`` when needed.
    Transformers get ``hidden_states`` at ``sample_size``, ``timestep``, ``class_labels`` (DiT / AdaLN-Zero),
    ``encoder_hidden_states`` (``caption_channels`` or ``cross_attention_dim``) and PixArt's ``added_cond_kwargs``.
    SD3 / Flux transformers get a 4 x 4-token latent, ``tokens`` text tokens, ``pooled_projections`` (and Flux its
    positions ``img_ids`` / ``txt_ids`` and ``guidance`` when guidance-distilled), see :func:`_mmdit_probe`.
    """
    if not isinstance(model, ModelMixin):
        return None
    c, name = model.config, type(model).__name__
    ref = first_float_param(model)
    g = torch.Generator().manual_seed(seed)
    timestep = torch.tensor([10, 500, 999, 250][:batch] + [1] * max(0, batch - 4), dtype=torch.long)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    inputs: dict[str, Any]
    if cfg_get(c, "down_block_types") is not None and cfg_get(c, "in_channels") is not None:  # UNet
        side = max(8, 2 ** len(c["down_block_types"]))
        inputs = {"sample": randn(batch, c["in_channels"], side, side), "timestep": timestep}
        dim = cfg_get(c, "encoder_hid_dim") or cfg_get(c, "cross_attention_dim")
        if dim is not None:
            inputs["encoder_hidden_states"] = randn(batch, tokens, _int(dim))
        if cfg_get(c, "addition_embed_type") == "text_time":
            n_text = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
            inputs["added_cond_kwargs"] = {"text_embeds": randn(batch, n_text), "time_ids": randn(batch, 6)}
        if cfg_get(c, "num_class_embeds") is not None:
            inputs["class_labels"] = torch.randint(0, c["num_class_embeds"], (batch,), generator=g)
    elif name in diffusers_sites.TRANSFORMER_CLASSES and cfg_get(c, "in_channels") is not None:
        side = _int(cfg_get(c, "sample_size", default=8))
        inputs = {"hidden_states": randn(batch, c["in_channels"], side, side), "timestep": timestep}
        if cfg_get(c, "norm_type") == "ada_norm_zero" and cfg_get(c, "num_embeds_ada_norm"):
            inputs["class_labels"] = torch.randint(0, c["num_embeds_ada_norm"], (batch,), generator=g)
        dim = cfg_get(c, "caption_channels") or cfg_get(c, "cross_attention_dim")
        if dim is not None:
            inputs["encoder_hidden_states"] = randn(batch, tokens, _int(dim))
        if name == "PixArtTransformer2DModel":
            inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    elif name in MMDIT_CLASSES and cfg_get(c, "in_channels") is not None:
        inputs = _mmdit_probe(c, name, batch, tokens, randn)
    else:
        return None
    return _to(inputs, ref)


def _mmdit_probe(c: Any, name: str, batch: int, tokens: int, randn: Any) -> dict[str, Any]:
    """Probe inputs of an SD3 / Flux transformer: a 4 x 4-token latent (at the model's patch size), ``tokens`` text
    tokens of ``joint_attention_dim``, ``pooled_projections``; Flux: float timesteps in (0, 1), positions
    ``img_ids`` (0, row, column) and ``txt_ids`` (zeros) as its pipeline builds them, ``guidance`` if distilled."""
    side, patch = 4, _int(cfg_get(c, "patch_size", default=1))
    inputs = {"encoder_hidden_states": randn(batch, tokens, c["joint_attention_dim"]),
              "pooled_projections": randn(batch, c["pooled_projection_dim"])}
    if name == "SD3Transformer2DModel":
        return inputs | {"hidden_states": randn(batch, c["in_channels"], side * patch, side * patch),
                         "timestep": torch.tensor([10, 500, 999, 250][:batch] + [1] * max(0, batch - 4))}
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    inputs |= {"hidden_states": randn(batch, side * side, c["in_channels"]),
               "timestep": torch.tensor([0.01, 0.5, 0.999, 0.25][:batch] + [1.0] * max(0, batch - 4)),
               "img_ids": torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
               "txt_ids": torch.zeros(tokens, 3)}
    if cfg_get(c, "guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def _to(obj: Any, ref: torch.Tensor) -> Any:
    if isinstance(obj, dict):
        return {k: _to(v, ref) for k, v in obj.items()}
    if torch.is_tensor(obj):
        return obj.to(device=ref.device, dtype=ref.dtype if obj.is_floating_point() else obj.dtype)
    return obj
