"""diffusers integration: protect pipelines and denoisers at load, in memory and at save (SPEC §2, §4, §5, §7).

This module is imported once ``hf_specdef`` and diffusers' ``ModelMixin`` or ``DiffusionPipeline`` both are
(post-import hook, see :mod:`hf_specdef.integrations`), and then, once (idempotent):

* registers the diffusers denoiser sites (:mod:`hf_specdef.sites.diffusers`) and a probe builder for
  denoisers in :data:`hf_specdef.probe.PROBE_BUILDERS`;
* wraps ``ModelMixin.from_pretrained`` / ``LegacyModelMixin.from_pretrained`` and
  ``DiffusionPipeline.from_pretrained`` so that ``specdef_config=cfg`` deforms the weights once loaded, and
  so that a float32-only protection is never loaded in a 16-bit ``torch_dtype`` (:mod:`.diffusers_guard`);
* wraps ``ModelMixin.save_pretrained`` and ``DiffusionPipeline.save_pretrained``: ``specdef_config=cfg`` writes
  protected files while the in-memory object stays unchanged (:func:`save_protected`), and any save of a
  model that carries a protection record first checks that the weights show the claimed deformation
  (SPEC §7) and refuses to write otherwise (:class:`DeformationCheckError`).

**Stock diffusers silently ignores unknown keywords**: without ``import hf_specdef``,
``UNet2DConditionModel.from_pretrained(path, specdef_config=cfg)`` returns an *unprotected* model and says
nothing. The keywords work only once ``hf_specdef`` is imported.

Pipeline-level ``norm`` site (SPEC §2): in a Stable-Diffusion-style pipeline the text encoder's
``final_layer_norm`` feeds (as ``encoder_hidden_states``) only the cross-attention ``to_k``/``to_v`` of every
denoiser block. Folding a channel scale there makes every cross-attention ``to_k``/``to_v`` a hot side — the
one way to heat ``to_v``. It is on by default (``pipeline_norm=None``: applied when ``"norm"`` is among the
sites, ``layers`` is ``"all"`` or ``"cross-attention"`` and the pipeline qualifies; skipped with the reason
otherwise). It changes the saved text encoder's standalone outputs (only the composed pipeline is unchanged),
so the text encoder's config gets a record too. It is refused for a text encoder with a projection head
(``CLIPTextModelWithProjection``), for pipelines with several text encoders (SDXL, SD3 feed other hidden
states) and for denoisers that transform ``encoder_hidden_states`` before attention (``encoder_hid_proj``,
``cross_attention_norm``, ``caption_projection``, text addition embeddings).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import DiffusionPipeline, ModelMixin

from .. import engine, probe
from ..config import CONFIG_KEY, SpecDefConfig
from ..engine import PairResult
from ..pipeline_fold import text_encoder_config
from ..protection import Backup, ParamTensors, _check_materialized, _upcast, deform_verified, model_pairs
from ..record import check_not_protected, component_record, get_record, set_record
from ..report import ProtectionReport
from ..sites import NoSitesError, Pair, TensorBlock
from ..sites import diffusers as diffusers_sites
from ..sites.mmdit import MMDIT_CLASSES
from ..sites.registry import cfg_get
from ..verification import DeformationCheckError, check_deformation  # one SPEC §7 check for both libraries
from .diffusers_guard import guarded_load

try:  # LegacyModelMixin (Transformer2DModel) overrides from_pretrained
    from diffusers.models.modeling_utils import LegacyModelMixin
except ImportError:  # pragma: no cover - older diffusers
    LegacyModelMixin = None

logger = logging.getLogger("hf_specdef")

__all__ = [
    "DENOISER_NAMES", "ComponentTensors", "DeformationCheckError", "check_claims", "diffusers_probe", "install",
    "protect_pipeline", "save_protected",
]

DENOISER_NAMES = ("unet", "transformer")
TEXT_ENCODER = diffusers_sites.TEXT_ENCODER
FINAL_NORMS = diffusers_sites.FINAL_NORMS
_WRAPPED_FLAG = "_specdef_wrapped"
_CLAIMS = "_specdef_claims"  # on a module: PairResults (module-local names) of the protection we did
_PIPELINE_CLAIMS = "_specdef_pipeline_claims"  # on the denoiser: the pipeline-level PairResults (prefixed names)
_state = threading.local()


# --------------------------------------------------------------------------------------------
# Tensors of several pipeline components under one name space
# --------------------------------------------------------------------------------------------


class ComponentTensors(MutableMapping[str, torch.Tensor]):
    """``"<component>.<parameter name>" -> tensor`` over several modules (e.g. ``text_encoder.`` and ``unet.``).

    Lets one pair span two pipeline components (the pipeline-level ``norm`` site) and one
    :class:`~hf_specdef.protection.Backup` cover every change made to a pipeline.
    """

    def __init__(self, components: dict[str, torch.nn.Module]) -> None:
        self.parts = {name: ParamTensors(module) for name, module in components.items()}

    def _split(self, key: str) -> tuple[ParamTensors, str]:
        comp, _, rest = key.partition(".")
        if comp not in self.parts:
            raise KeyError(key)
        return self.parts[comp], rest

    def __getitem__(self, key: str) -> torch.Tensor:
        part, rest = self._split(key)
        return part[rest]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        part, rest = self._split(key)
        part[rest] = value

    def __delitem__(self, key: str) -> None:
        raise TypeError("cannot delete a parameter")

    def __iter__(self) -> Iterator[str]:
        return (f"{c}.{n}" for c, part in self.parts.items() for n in part)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"{c}.{n}": s for c, part in self.parts.items() for n, s in part.shapes().items()}


def _prefix_pair(pair: Pair, prefix: str) -> Pair:
    def blocks(bs: tuple[TensorBlock, ...]) -> tuple[TensorBlock, ...]:
        return tuple(replace(b, name=prefix + b.name) for b in bs)

    return replace(pair, block=prefix + pair.block, producers=blocks(pair.producers), consumers=blocks(pair.consumers))


def _local_pair(pair: Pair, prefix: str) -> Pair:
    """The part of ``pair`` inside one component, with names relative to it."""

    def blocks(bs: tuple[TensorBlock, ...]) -> tuple[TensorBlock, ...]:
        return tuple(replace(b, name=b.name[len(prefix):]) for b in bs if b.name.startswith(prefix))

    block = pair.block[len(prefix):] if pair.block.startswith(prefix) else pair.block
    return replace(pair, block=block, producers=blocks(pair.producers), consumers=blocks(pair.consumers))


def _local_result(r: PairResult, prefix: str) -> PairResult:
    return replace(r, pair=_local_pair(r.pair, prefix))


# --------------------------------------------------------------------------------------------
# Probe inputs for denoisers
# --------------------------------------------------------------------------------------------


def _first_param(model: torch.nn.Module) -> torch.Tensor:
    return next(p for p in model.parameters() if p.is_floating_point())


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
    ref = _first_param(model)
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


# --------------------------------------------------------------------------------------------
# Pipeline components and the pipeline-level norm site
# --------------------------------------------------------------------------------------------


def _denoiser(pipe: Any) -> tuple[str, torch.nn.Module]:
    comps = pipe.components
    for name in DENOISER_NAMES:
        if isinstance(comps.get(name), torch.nn.Module):
            return name, comps[name]
    raise NoSitesError(
        f"{type(pipe).__name__} has no denoiser among {DENOISER_NAMES} (components: {sorted(comps)}); protect the model "
        "you mean directly with hf_specdef.protect(model, cfg)."
    )


def _pipeline_norm_pair(pipe: Any, dname: str, denoiser: torch.nn.Module) -> tuple[Pair | None, str]:
    """The pipeline-level norm pair (text encoder final norm -> every to_k/to_v reading it), or the reason there is none."""
    comps = pipe.components
    te = comps.get(TEXT_ENCODER)
    te = te if isinstance(te, torch.nn.Module) else None
    others = [n for n in diffusers_sites.OTHER_ENCODERS if comps.get(n) is not None]
    return diffusers_sites.pipeline_norm_pair(
        type(te).__name__ if te is not None else None, ParamTensors(te).shapes() if te is not None else {}, others,
        type(denoiser).__name__, denoiser.config, ParamTensors(denoiser).shapes(), f"{TEXT_ENCODER}.", f"{dname}.")


# --------------------------------------------------------------------------------------------
# Protection of a pipeline (or one denoiser) with an exact backup
# --------------------------------------------------------------------------------------------


@dataclass
class _Applied:
    """What an in-place protection changed, so that a save-time protection can put it all back."""

    tensors: ComponentTensors
    backup: Backup
    configs: dict[str, Any] = field(default_factory=dict)  # component name -> saved config state
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)

    def restore(self) -> None:
        self.backup.restore(self.tensors)
        for name, module in self.modules.items():
            _restore_config(module, self.configs[name])
            for attr in (_CLAIMS, _PIPELINE_CLAIMS):
                if attr in module.__dict__:
                    delattr(module, attr)


_MISSING = object()


def _save_config(module: torch.nn.Module) -> Any:
    if isinstance(module, ModelMixin):
        return module._internal_dict
    return getattr(module.config, CONFIG_KEY, _MISSING)


def _restore_config(module: torch.nn.Module, state: Any) -> None:
    if isinstance(module, ModelMixin):
        module._internal_dict = state
    elif state is _MISSING:
        if hasattr(module.config, CONFIG_KEY):
            delattr(module.config, CONFIG_KEY)
    else:
        setattr(module.config, CONFIG_KEY, state)


@torch.no_grad()
def composed_output(
    comps: dict[str, torch.nn.Module], dname: str, inputs: dict[str, Any], ids: torch.Tensor | None
) -> torch.Tensor:
    """Denoiser output on ``inputs``; with ``ids``, ``encoder_hidden_states`` comes from the text encoder."""
    denoiser = comps[dname]
    if ids is not None:
        te = comps[TEXT_ENCODER]
        with probe.eval_mode(te):
            ehs = te(input_ids=ids)[0]
        inputs = {**inputs, "encoder_hidden_states": ehs.to(_first_param(denoiser).dtype)}
    return probe.run_probe(denoiser, inputs)


def text_ids(te: torch.nn.Module, seed: int, batch: int) -> torch.Tensor:
    """Probe token ids for the text encoder ``te`` (``batch`` rows of up to 16, from ``seed``), on its device."""
    c = te.config
    seq = min(16, getattr(c, "max_position_embeddings", 16) or 16)
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, c.vocab_size, (batch, seq), generator=g).to(_first_param(te).device)


def _apply(
    comps: dict[str, torch.nn.Module],
    dname: str,
    cfg: SpecDefConfig,
    *,
    verify: bool,
    force: bool,
    progress: bool,
    text_encoder: bool,
    pipeline_norm: bool | None,
    inputs: dict[str, Any] | None,
    pipe: Any = None,
    allow_upcast: bool = True,
) -> tuple[ProtectionReport, _Applied]:
    """Deform ``comps`` in place (verified; restored exactly on failure) and write records. Returns the report and
    what was changed (with an exact backup of every changed row/column)."""
    start = time.perf_counter()
    denoiser = comps[dname]
    check_not_protected(denoiser, force)
    _check_materialized(denoiser)
    te = comps.get(TEXT_ENCODER) if text_encoder or pipe is not None else None
    if text_encoder:
        if not isinstance(te, torch.nn.Module):
            raise ValueError("protect_pipeline(text_encoder=True): this pipeline has no 'text_encoder' component.")
        check_not_protected(te, force)
        _check_materialized(te)

    skipped: list[str] = []
    pipe_pair = None
    if pipe is not None:
        wanted, why = diffusers_sites.wants_pipeline_norm(cfg, pipeline_norm)
        if wanted:
            pipe_pair, why = _pipeline_norm_pair(pipe, dname, denoiser)
            if pipe_pair is None:
                why = f"pipeline-level norm site: {why}"
        if why and pipeline_norm:
            raise diffusers_sites.pipeline_norm_refused(why)
        if why:
            skipped.append(why)
    if pipe_pair is not None and get_record(te) and not force:
        if pipeline_norm:
            check_not_protected(te, force)  # raises, naming the existing record
        skipped.append("pipeline-level norm site: the text encoder already carries a protection record (force=True folds anyway)")
        pipe_pair = None
    if pipe_pair is not None:
        _check_materialized(te)

    used = {dname: denoiser}
    if text_encoder or pipe_pair is not None:
        used[TEXT_ENCODER] = te
    tensors = ComponentTensors(used)
    d_pairs, d_skipped = model_pairs(denoiser, cfg, tensors.parts[dname])
    skipped += [f"{dname}: {s}" for s in d_skipped]
    pairs = ([pipe_pair] if pipe_pair is not None else []) + [_prefix_pair(p, f"{dname}.") for p in d_pairs]
    te_cfg = text_encoder_config(cfg)
    if text_encoder:
        t_pairs, t_skipped = model_pairs(te, te_cfg, tensors.parts[TEXT_ENCODER])
        skipped += [f"{TEXT_ENCODER}: {s}" for s in t_skipped]
        pairs += [_prefix_pair(p, f"{TEXT_ENCODER}.") for p in t_pairs]
    plans = engine.plan_pairs(pairs, tensors, cfg, skipped)
    notes = sorted({n for p in plans for n in p.notes})
    if any(p.policy == "float32" for p in plans) and any(
            _first_param(m).dtype != torch.float32 for m in used.values()):
        if not allow_upcast:
            raise ValueError(
                "save-time protection with precision='float32' would change the dtype of the in-memory model; load it in "
                "float32, use precision='axis', or protect(pipe, cfg) and then save_pretrained."
            )
        notes += [f"{name}: {note}" for name, module in used.items() if (note := _upcast(module, plans))]

    # with the pipeline pair, the text encoder's output changes and only the composed function is kept
    run = None
    if verify:
        inputs = inputs if inputs is not None else probe.probe_inputs(denoiser)
        composed_ids = te_ids = None
        if pipe_pair is not None:
            if "encoder_hidden_states" not in inputs:
                raise ValueError("verification of the pipeline-level norm site needs probe inputs with encoder_hidden_states.")
            composed_ids = text_ids(te, cfg.seed, inputs["encoder_hidden_states"].shape[0])
        elif text_encoder:  # the text encoder alone is function-preserving: check it on its own
            te_ids = text_ids(te, cfg.seed, 2)

        def run() -> list[torch.Tensor]:
            outs = [composed_output(used, dname, inputs, composed_ids)]
            return outs + ([probe.run_probe(te, {"input_ids": te_ids})] if te_ids is not None else [])

    configs = {n: _save_config(m) for n, m in used.items()}
    results, backup, deviation = deform_verified(plans, tensors, cfg, run=run, progress=progress)
    applied = _Applied(tensors, backup, configs, dict(used))
    try:
        _write_records(used, dname, cfg, te_cfg, results, deviation)
    except BaseException:
        applied.restore()
        raise
    report = ProtectionReport(cfg, results, deviation, skipped, notes, time.perf_counter() - start)
    logger.info("hf-specdef protected %d pairs of %s, deviation=%s", len(results), sorted(used), deviation)
    return report, applied


def _write_records(used: dict[str, torch.nn.Module], dname: str, cfg: SpecDefConfig, te_cfg: SpecDefConfig,
                   results: list[PairResult], deviation: float | None) -> None:
    """Module-local records (names relative to each component) plus a ``"pipeline"`` entry for the cross-component pair."""
    pipe_results = [r for r in results if "pipeline" in r.pair.tags]
    for name, module in used.items():
        prefix = f"{name}."
        local = [_local_result(r, prefix) for r in results
                 if "pipeline" not in r.pair.tags and r.pair.producers[0].name.startswith(prefix)]
        if cfg.record == "none":
            continue
        set_record(module, component_record(cfg if name == dname else te_cfg, local, pipe_results, prefix, deviation))
        module.__dict__[_CLAIMS] = (get_record(module), local)  # valid while this very record is on the model
    if pipe_results:
        used[dname].__dict__[_PIPELINE_CLAIMS] = pipe_results


def protect_pipeline(
    pipe: Any,
    cfg: SpecDefConfig | None = None,
    *,
    verify: bool = True,
    force: bool = False,
    progress: bool = True,
    text_encoder: bool = False,
    pipeline_norm: bool | None = None,
    inputs: dict[str, Any] | None = None,
) -> ProtectionReport:
    """Protect a diffusers pipeline in place and return a :class:`~hf_specdef.ProtectionReport`.

    The denoiser (``unet`` or ``transformer``) is always protected; the text encoder too with
    ``text_encoder=True`` (its own sites, through the transformers site registry; ``layers="cross-attention"``
    means all of its layers). ``pipeline_norm`` controls the pipeline-level ``norm`` site (text encoder
    ``final_layer_norm`` -> every cross-attention ``to_k``/``to_v``): ``None`` applies it when it can, ``True``
    requires it, ``False`` disables it. Pair names in the report are prefixed with the component name
    (``"unet."``, ``"text_encoder."``).

    Verification runs the composed function (text encoder -> denoiser when a text-encoder weight changed) on a
    probe batch; if it deviates beyond ``cfg.tolerance`` every change is undone exactly and
    :class:`~hf_specdef.VerificationError` is raised. Records are written to each changed component's config, so
    ``pipe.save_pretrained(out)`` writes a pipeline stock diffusers loads.
    """
    cfg = cfg or SpecDefConfig()
    dname, _ = _denoiser(pipe)
    report, _applied = _apply(dict(pipe.components), dname, cfg, verify=verify, force=force, progress=progress,
                              text_encoder=text_encoder, pipeline_norm=pipeline_norm, inputs=inputs, pipe=pipe)
    return report


# --------------------------------------------------------------------------------------------
# SPEC §7: check the claimed deformation before anything is written
# --------------------------------------------------------------------------------------------


def _check_results(results: list[Any], tensors: Any, where: str) -> None:
    """Recompute each pair's producer sigma_1 (shared check of the transformers integration): it must match the
    recorded value and be inflated, else :class:`DeformationCheckError` naming ``where``."""
    try:
        check_deformation(results, tensors)
    except DeformationCheckError as e:
        raise DeformationCheckError(f"{where}: {e} (SPEC §7: never write a 'protected' model that is not)") from None


def _results_from_record(rec: dict[str, Any], key: str = "pairs") -> list[Any]:
    out = []
    for d in rec.get(key, []):
        out.append(SimpleNamespace(
            pair=Pair.from_dict(d["pair"]), mode=d["mode"], deformation=SimpleNamespace(factor=float(d["factor"])),
            sigma_before=float(d["sigma_before"]), sigma_after=float(d["sigma_after"]),
        ))
    return out


def check_claims(model: torch.nn.Module) -> None:
    """Raise :class:`DeformationCheckError` unless ``model``'s weights show what its protection record claims.

    Uses, in order: the results of a protection done in this process; the record's pairs (``record="full"``);
    otherwise a spectral inspection (:func:`hf_specdef.inspect_model`) that must flag every claimed hot module
    (including the denoiser's side of the pipeline-level pair). A model without a record passes. Pipeline-level
    pairs, which span two components, are checked by the pipeline's ``save_pretrained``.
    """
    rec = get_record(model)
    if not rec:
        return
    where = type(model).__name__
    stash = model.__dict__.get(_CLAIMS)
    claims = stash[1] if stash is not None and stash[0] is rec else None  # ours, and not replaced since
    if claims is not None:
        _check_results(claims, ParamTensors(model), where)
    elif rec.get("pairs"):
        _check_results(_results_from_record(rec), ParamTensors(model), where)
    else:
        _check_by_inspection(model, rec, where)


def _check_by_inspection(model: torch.nn.Module, rec: dict[str, Any], where: str) -> None:
    from ..inspection import DEFAULT_THRESHOLD, inspect_model

    params = dict(model.named_parameters())  # 1-D norm weights (q/k-norm attn.qk pairs) carry no matrix evidence
    hot = [m for m in rec.get("hot_modules") or [] if getattr(params.get(f"{m}.weight"), "ndim", 2) >= 2]
    if not hot:
        return
    alpha = float(rec.get("config", {}).get("alpha", DEFAULT_THRESHOLD * 2))
    threshold = max(1.5, min(DEFAULT_THRESHOLD, alpha / 2))
    findings = {f.name: f for f in inspect_model(model, threshold=threshold).findings}

    def shows(module: str) -> bool:  # per-pair evidence, or a matrix-level outlier (a column scaled by a norm site)
        f = findings.get(f"{module}.weight")
        return f is not None and (f.deformed or max(f.evidence.values(), default=0.0) >= threshold)

    missing = [m for m in hot if not shows(m)]
    if missing:
        raise DeformationCheckError(
            f"{where}: the protection record claims {len(hot)} hot modules but {len(missing)} show no deformation "
            f"(e.g. {missing[:3]}); refusing to write a 'protected' model that is not (SPEC §7). Re-protect it with "
            "hf_specdef.protect(model, cfg, force=True) or remove the '_specdef' record from its config."
        )


def _check_pipeline_claims(pipe: Any) -> None:
    comps = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    for module in comps.values():
        check_claims(module)
        pipe_claims = module.__dict__.get(_PIPELINE_CLAIMS)
        stash = module.__dict__.get(_CLAIMS)
        if pipe_claims and stash is not None and stash[0] is get_record(module):
            names = {b.name.split(".", 1)[0] for r in pipe_claims for b in r.pair.producers + r.pair.consumers}
            missing = sorted(names - set(comps))
            if missing:
                raise DeformationCheckError(f"the pipeline-level protection needs components {missing}, which are gone.")
            _check_results(pipe_claims, ComponentTensors({n: comps[n] for n in names}), type(pipe).__name__)


@contextmanager
def _checked() -> Iterator[None]:
    """Inside a pipeline save whose claims were checked: component saves skip the re-check."""
    old = getattr(_state, "checked", False)
    _state.checked = True
    try:
        yield
    finally:
        _state.checked = old


# --------------------------------------------------------------------------------------------
# Save-time protection
# --------------------------------------------------------------------------------------------


def _as_config(cfg: Any) -> SpecDefConfig:
    if isinstance(cfg, SpecDefConfig):
        return cfg
    if isinstance(cfg, dict):
        return SpecDefConfig.from_dict(cfg)
    raise ValueError(f"specdef_config={cfg!r} must be a hf_specdef.SpecDefConfig (or its dict form).")


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename the written files into ``dest`` (entry by entry when it exists: other files there are kept)."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    for entry in tmp.iterdir():
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)
    tmp.rmdir()


def save_protected(
    pipe_or_model: Any,
    save_directory: str | os.PathLike,
    cfg: SpecDefConfig | None = None,
    *,
    verify: bool = True,
    force: bool = False,
    progress: bool = True,
    text_encoder: bool = False,
    pipeline_norm: bool | None = None,
    inputs: dict[str, Any] | None = None,
    overwrite: bool = True,
    **save_kwargs: Any,
) -> ProtectionReport:
    """Write protected files of a diffusers pipeline or denoiser; the in-memory object stays exactly as it was.

    The weights are deformed in place while :class:`~hf_specdef.protection.Backup` keeps exact copies of the
    changed rows/columns only (never a full copy of the denoiser); the function is verified, the claimed
    deformation re-checked (SPEC §7), ``save_pretrained`` writes into a temporary directory beside
    ``save_directory`` which is then renamed into place, and every tensor and config is restored bit for bit
    (also on error). ``pipe.save_pretrained(out, specdef_config=cfg)`` and ``model.save_pretrained(out,
    specdef_config=cfg)`` call this. Options as in :func:`protect_pipeline`; ``save_kwargs`` go to
    ``save_pretrained``. ``precision="float32"`` is refused when it would change the in-memory dtype.
    """
    cfg = _as_config(cfg or SpecDefConfig())
    is_pipe = isinstance(pipe_or_model, DiffusionPipeline)
    if is_pipe:
        dname, _ = _denoiser(pipe_or_model)
        comps = dict(pipe_or_model.components)
    elif isinstance(pipe_or_model, ModelMixin):
        if text_encoder or pipeline_norm:
            raise ValueError("text_encoder / pipeline_norm need a pipeline; got a single diffusers model.")
        dname, comps = "model", {"model": pipe_or_model}
    else:
        raise ValueError(f"save_protected expects a diffusers pipeline or model, got {type(pipe_or_model).__name__}.")
    dest = Path(save_directory)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True to replace it, or choose another directory.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.specdef-", dir=dest.parent))
    try:
        report, applied = _apply(comps, dname, cfg, verify=verify, force=force, progress=progress,
                                 text_encoder=text_encoder, pipeline_norm=pipeline_norm, inputs=inputs,
                                 pipe=pipe_or_model if is_pipe else None, allow_upcast=False)
        try:
            _stock_save(pipe_or_model, tmp, **save_kwargs)  # checks the claims first
        finally:
            applied.restore()
        _move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("hf-specdef wrote %d protected pairs to %s (deviation=%s)", len(report.results), dest, report.deviation)
    return report


def _stock_save(obj: Any, directory: Path, **kwargs: Any) -> None:
    """``save_pretrained`` of ``obj`` after the SPEC §7 claims check (the original, unwrapped method)."""
    if isinstance(obj, DiffusionPipeline):
        _check_pipeline_claims(obj)
        with _checked():
            _original(DiffusionPipeline.save_pretrained)(obj, directory, **kwargs)
    else:
        check_claims(obj)
        _original(ModelMixin.save_pretrained)(obj, directory, **kwargs)


# --------------------------------------------------------------------------------------------
# Hooks (installed once at import)
# --------------------------------------------------------------------------------------------

def _original(method: Any) -> Any:
    """The stock method under our wrapper."""
    return method.__wrapped__ if getattr(method, _WRAPPED_FLAG, False) else method


def _protect_loaded(obj: Any, cfg: Any, options: dict[str, Any] | None) -> Any:
    cfg = _as_config(cfg)
    options = dict(options or {})
    unknown = sorted(set(options) - {"verify", "force", "text_encoder", "pipeline_norm", "inputs"})
    if unknown:
        raise ValueError(f"specdef_options has unknown keys {unknown}; allowed: verify, force, text_encoder, pipeline_norm, "
                         "inputs (text_encoder / pipeline_norm only for pipelines).")
    if isinstance(obj, DiffusionPipeline):
        options.setdefault("progress", False)
        protect_pipeline(obj, cfg, **options)
    else:
        if options.get("text_encoder") or options.get("pipeline_norm"):
            raise ValueError("specdef_options text_encoder / pipeline_norm apply to pipelines, not to a single model.")
        model = obj[0] if isinstance(obj, tuple) else obj  # output_loading_info=True
        dname = "model"
        report, _ = _apply({dname: model}, dname, cfg, verify=options.get("verify", True), force=options.get("force", False),
                           progress=False, text_encoder=False, pipeline_norm=False, inputs=options.get("inputs"))
        logger.info("hf-specdef: %s protected at load (%d pairs)", type(model).__name__, len(report.results))
    return obj


def _wrap_from_pretrained(owner: type) -> None:
    if owner is None or "from_pretrained" not in owner.__dict__:
        return
    func = owner.__dict__["from_pretrained"].__func__
    if getattr(func, _WRAPPED_FLAG, False):
        return

    @functools.wraps(func)
    def from_pretrained(cls: type, *args: Any, specdef_config: Any = None, specdef_options: dict[str, Any] | None = None,
                        **kwargs: Any) -> Any:
        if specdef_options is not None and specdef_config is None:
            raise ValueError("specdef_options= needs specdef_config=SpecDefConfig(...).")
        if specdef_config is not None:
            cfg = _as_config(specdef_config)  # fail on a bad config before the (possibly long) load
        obj = guarded_load(func, cls, args, kwargs)  # the downcast guard (float32-only protections)
        return obj if specdef_config is None else _protect_loaded(obj, cfg, specdef_options)

    setattr(from_pretrained, _WRAPPED_FLAG, True)
    from_pretrained.__doc__ = (func.__doc__ or "") + (
        "\n\n        hf-specdef: ``specdef_config=SpecDefConfig(...)`` deforms the weights once loaded, with optional "
        "``specdef_options=dict(text_encoder=..., pipeline_norm=..., verify=..., force=...)`` (works only after "
        "``import hf_specdef``; stock diffusers silently ignores the keywords).\n"
    )
    owner.from_pretrained = classmethod(from_pretrained)


def _wrap_save(owner: type) -> None:
    func = owner.__dict__["save_pretrained"]
    if getattr(func, _WRAPPED_FLAG, False):
        return

    @functools.wraps(func)
    def save_pretrained(self: Any, save_directory: str | os.PathLike, *args: Any, specdef_config: Any = None,
                        **kwargs: Any) -> Any:
        if specdef_config is not None:
            if args:
                raise TypeError("save_pretrained(..., specdef_config=...) takes its other options as keywords.")
            return save_protected(self, save_directory, _as_config(specdef_config), **kwargs)
        if not getattr(_state, "checked", False):
            if isinstance(self, DiffusionPipeline):
                _check_pipeline_claims(self)
            else:
                check_claims(self)
        with _checked():
            return func(self, save_directory, *args, **kwargs)

    setattr(save_pretrained, _WRAPPED_FLAG, True)
    owner.save_pretrained = save_pretrained


def install() -> None:
    """Install the diffusers hooks (idempotent): ``from_pretrained(..., specdef_config=cfg)`` on ``ModelMixin``,
    ``LegacyModelMixin`` and ``DiffusionPipeline``; ``save_pretrained`` with the SPEC §7 check and
    ``specdef_config=`` save-time protection; the denoiser probe builder."""
    for owner in (ModelMixin, LegacyModelMixin, DiffusionPipeline):
        _wrap_from_pretrained(owner)
    _wrap_save(ModelMixin)
    _wrap_save(DiffusionPipeline)
    if not any(getattr(b, "__module__", None) == __name__ and b.__name__ == "diffusers_probe" for b in probe.PROBE_BUILDERS):
        probe.PROBE_BUILDERS.append(diffusers_probe)  # once, even if this module is reloaded


install()
