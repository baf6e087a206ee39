"""Site registry entries for diffusers denoisers (see docs/architectures.md).

Covered classes (keyed by ``class_names``, i.e. the diffusers ``_class_name``):

* ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x, SDXL UNets): every ``BasicTransformerBlock``
  (``...transformer_blocks.N``) inside the cross-attention down/mid/up blocks;
* ``Transformer2DModel`` (continuous / patched), ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``.

Per block:

* ``attn.qk`` / ``attn.vo`` for ``attn1`` (tag ``"self-attention"``) and ``attn2`` (tag
  ``"cross-attention"``): ``to_q``/``to_k`` with a dense per-head ``M`` (these blocks have no rotary
  embedding), ``to_v`` -> ``to_out.0``;
* ``mlp``: the GEGLU / SwiGLU feed-forward ``ff.net.0.proj`` -> ``ff.net.2``. diffusers computes
  ``hidden, gate = proj(x).chunk(2)`` and returns ``hidden * act(gate)``, so the *first* half of
  ``proj`` is the linear (value) half. Plain GELU feed-forwards (DiT, PixArt) have no ``mlp`` site; they
  are told apart by shape (a gated ``proj`` has twice the rows ``ff.net.2`` reads);
* ``norm`` (only for ``norm_type="layer_norm"`` blocks without positional embeddings, i.e. UNet blocks and
  continuous ``Transformer2DModel``): ``norm1`` -> ``attn1`` ``to_q``/``to_k``/``to_v`` (only ``to_q`` when
  the block's ``attn1`` is cross-attention, ``only_cross_attention``), ``norm2`` -> ``attn2.to_q`` (its
  ``to_k``/``to_v`` read ``encoder_hidden_states``), ``norm3`` -> ``ff.net.0.proj``. AdaLN blocks (DiT's
  ``ada_norm_zero``, PixArt's ``ada_norm_single``) modulate the norm output with a shift that a folded
  channel scale would not follow, so they get no ``norm`` site.

Heads per block: ``UNet2DConditionModel`` has per-down-block head counts. diffusers' naming quirk: when
``num_attention_heads`` is ``None`` (always, for this class) ``attention_head_dim`` *is* the number of
heads (an int or one entry per down block); up blocks use the list reversed, the mid block the last entry.
Transformers use ``num_attention_heads`` (and ``attention_head_dim`` as the head size).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from hf_specdef.sites.base import ModelConfigError, Pair, TensorBlock
from hf_specdef.sites.config_checks import ShapeOf, cfg_get
from hf_specdef.sites.registry import (
    ArchSpec,
    Attention,
    GatedMLP,
    Linear,
    PreNorm,
    _attention_pairs,
    _mlp_pair,
    _norm_pair,
    find_blocks,
    register_architecture,
)

__all__ = [
    "DIFFUSERS_DENOISERS", "UNET_CLASSES", "TRANSFORMER_CLASSES", "block_heads", "block_setting", "cross_attention_readers",
    "FINAL_NORMS", "OTHER_ENCODERS", "TEXT_ENCODER", "pipeline_norm_pair", "pipeline_norm_refused",
    "wants_pipeline_norm",
]

UNET_CLASSES = ("UNet2DConditionModel",)
TRANSFORMER_CLASSES = ("Transformer2DModel", "DiTTransformer2DModel", "PixArtTransformer2DModel")
BLOCK_RE = r"^(?P<block>(?:.*\.)?transformer_blocks\.\d+)\."
SELF, CROSS = frozenset({"self-attention"}), frozenset({"cross-attention"})
_UNET_PART = re.compile(r"^(?:(?P<kind>down_blocks|up_blocks)\.(?P<idx>\d+)|(?P<mid>mid_block))\.")


def block_setting(config: Any, block: str, key: str, mid_key: str | None = None) -> Any:
    """The value of a UNet per-down-block config entry (int/bool or one per down block) for ``block``.

    Down block ``i`` reads entry ``i``, up block ``i`` the reversed list's entry ``i``, the mid block the
    last entry (or ``mid_key`` when that is set). Non-UNet configs return the plain value.
    """
    value = cfg_get(config, key)
    m = _UNET_PART.match(block)
    if m is None or not isinstance(value, (list, tuple)):
        if m is not None and m.group("mid") and mid_key and cfg_get(config, mid_key) is not None:
            return cfg_get(config, mid_key)
        return value
    if m.group("mid"):
        mid = cfg_get(config, mid_key) if mid_key else None
        return mid if mid is not None else value[-1]
    i = int(m.group("idx"))
    return value[i] if m.group("kind") == "down_blocks" else list(reversed(value))[i]


def block_heads(attn: str) -> Any:
    """``heads(config, block, shape_of)`` for the ``Attention`` module ``attn`` (``attn1``/``attn2``) of a block."""

    def heads(config: Any, block: str, shape_of: ShapeOf) -> tuple[int, int, int]:
        if cfg_get(config, "down_block_types") is not None:  # UNet: attention_head_dim is the head count (quirk)
            key = "num_attention_heads" if cfg_get(config, "num_attention_heads") is not None else "attention_head_dim"
            n = block_setting(config, block, key)
        else:
            key = "num_attention_heads"
            n = cfg_get(config, key)
        inner = shape_of[f"{block}.{attn}.to_q.weight"][0]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or inner % n:
            why = "is not a positive integer" if isinstance(n, bool) or not isinstance(n, int) or n < 1 else (
                f"does not divide the {inner} query channels of {block}.{attn}.to_q")
            raise ModelConfigError(
                f"{key}={n!r} (the head count of {block}.{attn}) {why}; set it to the model's number of attention "
                "heads, as it was trained, or pass an explicit SpecDefConfig(site_map=...) for this model."
            )
        return n, n, inner // n

    return heads


def _plain_layer_norm(config: Any) -> bool:
    """Blocks whose norms are plain affine LayerNorms read only by the listed projections."""
    norm_type = cfg_get(config, "norm_type", default="layer_norm")
    return norm_type == "layer_norm" and cfg_get(config, "positional_embeddings") is None and not cfg_get(
        config, "double_self_attention", default=False
    )


def _extra_pairs(config: Any, shape_of: ShapeOf) -> list[Pair]:
    """Every pair of a denoiser: attention (``block`` = ``<transformer block>.attnN`` so pair keys stay unique),
    GEGLU ``mlp`` (gated feed-forwards only) and ``norm`` (plain LayerNorm blocks only)."""
    pairs: list[Pair] = []
    norms_ok = _plain_layer_norm(config)
    for layer, block in enumerate(find_blocks(DIFFUSERS_DENOISERS, list(shape_of))):
        only_cross = bool(block_setting(config, block, "only_cross_attention", "mid_block_only_cross_attention"))
        for att in ATTENTIONS:
            name = att.q.name.split(".")[0]
            tags = CROSS if only_cross else att.tags  # only_cross_attention: attn1 reads encoder_hidden_states too
            for site_pairs in _attention_pairs(att, block, layer, config, shape_of).values():
                pairs.extend(replace(p, block=f"{block}.{name}", tags=tags) for p in site_pairs)
        proj, down = shape_of.get(f"{block}.ff.net.0.proj.weight"), shape_of.get(f"{block}.ff.net.2.weight")
        if proj is not None and down is not None and proj[0] == 2 * down[1]:
            if (p := _mlp_pair(GatedMLP(Linear("ff.net.0.proj"), Linear("ff.net.2"), up_half=0), block, layer, shape_of)):
                pairs.append(p)
        if not norms_ok:
            continue
        attn1 = ("attn1.to_q",) if only_cross else ("attn1.to_q", "attn1.to_k", "attn1.to_v")
        specs = (
            (PreNorm("norm1", tuple(Linear(n) for n in attn1)), CROSS if only_cross else SELF),
            (PreNorm("norm2", (Linear("attn2.to_q"),)), CROSS),
            (PreNorm("norm3", (Linear("ff.net.0.proj"),)), frozenset()),
        )
        for i, (pn, tags) in enumerate(specs):
            if (p := _norm_pair(pn, block, layer, shape_of, i)) is not None:
                pairs.append(replace(p, tags=tags))
    return pairs


def cross_attention_readers(config: Any, shape_of: ShapeOf, prefix: str = "") -> list[str]:
    """Modules (``<block>.attnN.to_k`` / ``to_v``) that read ``encoder_hidden_states`` in a denoiser.

    ``attn2`` of every block, and ``attn1`` of blocks with ``only_cross_attention``.
    """
    names = [n[len(prefix):] for n in shape_of if n.startswith(prefix)]
    readers = []
    for block in find_blocks(DIFFUSERS_DENOISERS, names):
        attns = ["attn2"]
        if block_setting(config, block, "only_cross_attention", "mid_block_only_cross_attention"):
            attns.insert(0, "attn1")
        for a in attns:
            readers += [f"{block}.{a}.{p}" for p in ("to_k", "to_v") if f"{prefix}{block}.{a}.{p}.weight" in shape_of]
    return readers


FINAL_NORMS = ("text_model.final_layer_norm", "final_layer_norm")  # transformers 4.x / 5.x CLIPTextModel layouts
TEXT_ENCODER = "text_encoder"  # the pipeline component whose final norm the pipeline-level pair folds
OTHER_ENCODERS = ("text_encoder_2", "text_encoder_3")  # with any of these, the site does not apply


def pipeline_norm_refused(why: str) -> ValueError:
    """The error for ``pipeline_norm=True`` where the pipeline-level norm site does not apply (``why`` as in the
    skipped list, prefix and all)."""
    return ValueError(f"pipeline_norm=True but the pipeline-level norm site does not apply: "
                      f"{why.removeprefix('pipeline-level norm site: ')}.")


def wants_pipeline_norm(cfg: Any, pipeline_norm: bool | None) -> tuple[bool, str]:
    """Whether ``cfg`` (a ``SpecDefConfig``) asks for the pipeline-level norm site; the reason when it does not."""
    if pipeline_norm is False:
        return False, "pipeline-level norm site: disabled (pipeline_norm=False)"
    if "norm" not in cfg.sites:
        return False, "pipeline-level norm site: 'norm' is not among cfg.sites"
    if cfg.layers not in ("all", "cross-attention"):
        return False, (f"pipeline-level norm site: layers={cfg.layers!r} selects some blocks, but the text encoder's final "
                       "norm feeds every block's cross-attention (use layers='all' or 'cross-attention')")
    return True, ""


def pipeline_norm_pair(
    te_class: str | None, te_shapes: ShapeOf, other_encoders: Sequence[str], d_class: str | None, d_config: Any,
    d_shapes: ShapeOf, te_prefix: str = "text_encoder.", d_prefix: str = "",
) -> tuple[Pair | None, str]:
    """The pipeline-level ``norm`` pair of a Stable-Diffusion-style pipeline, or the reason there is none.

    The text encoder's final layer norm (producer, names with ``te_prefix``) scales the channels every
    cross-attention ``to_k``/``to_v`` of the denoiser reads (consumers, names with ``d_prefix``). From
    class names, configs and tensor shapes only, so in-memory and streaming protection decide alike.
    """
    if te_class is None:
        return None, "the pipeline has no text encoder"
    if other_encoders:
        return None, (f"the pipeline has several text encoders ({list(other_encoders)}); their hidden states are not "
                      "the final norm's")
    if te_class != "CLIPTextModel":
        return None, (f"text encoder {te_class} is not a plain CLIPTextModel (a projection head would also read "
                      "the final norm and is not compensated)")
    final = next((n for n in FINAL_NORMS if f"{n}.weight" in te_shapes), None)
    if final is None:
        return None, f"text encoder has no affine final layer norm (looked for {FINAL_NORMS})"
    if d_class not in UNET_CLASSES + ("Transformer2DModel",):
        return None, f"{d_class} is not known to read the text encoder output directly"
    transforming = [k for k in ("encoder_hid_dim", "cross_attention_norm") if cfg_get(d_config, k) is not None]
    if cfg_get(d_config, "addition_embed_type") in ("text", "text_image", "image", "image_hint"):
        transforming.append(f"addition_embed_type={cfg_get(d_config, 'addition_embed_type')!r}")
    if any(n.startswith(("caption_projection.", "encoder_hid_proj.", "add_embedding.")) for n in d_shapes) and not transforming:
        transforming.append("a projection of encoder_hidden_states")
    if transforming:
        return None, f"the denoiser transforms encoder_hidden_states before attention ({transforming})"
    readers = cross_attention_readers(d_config, d_shapes)
    dim = te_shapes[f"{final}.weight"][0]
    if not readers:
        return None, "the denoiser has no cross-attention"
    bad = [r for r in readers if d_shapes[f"{r}.weight"][1] != dim]
    if bad:
        return None, f"{bad[0]} reads {d_shapes[bad[0] + '.weight'][1]} channels, the text encoder gives {dim}"
    producers = (TensorBlock(f"{te_prefix}{final}.weight", 0, 0, dim),)
    if f"{final}.bias" in te_shapes:
        producers += (TensorBlock(f"{te_prefix}{final}.bias", 0, 0, dim),)
    pair = Pair(
        "norm", -1, f"{te_prefix}{final}", 0,
        producers=producers,
        consumers=tuple(TensorBlock(f"{d_prefix}{r}.weight", 1, 0, dim) for r in readers),
        tags=frozenset({"cross-attention", "pipeline"}),
    )
    return pair, ""


def _attention(name: str, tags: frozenset[str]) -> Attention:
    return Attention(Linear(f"{name}.to_q"), Linear(f"{name}.to_k"), Linear(f"{name}.to_v"), Linear(f"{name}.to_out.0"),
                     heads=block_heads(name), tags=tags)


ATTENTIONS = (_attention("attn1", SELF), _attention("attn2", CROSS))
DIFFUSERS_DENOISERS = ArchSpec(  # attention pairs come from _extra_pairs (per-attention block names)
    name="diffusers_denoisers",
    block=BLOCK_RE,
    class_names=UNET_CLASSES + TRANSFORMER_CLASSES,
    extra_pairs=_extra_pairs,
)

register_architecture(DIFFUSERS_DENOISERS)


def is_covered(class_name: str | None) -> bool:
    """Whether the registry knows the diffusers class ``class_name``."""
    return class_name in DIFFUSERS_DENOISERS.class_names


