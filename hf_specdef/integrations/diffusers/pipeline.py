"""Protection of a diffusers pipeline (or one denoiser) in place, with an exact backup (see docs/integrations.md).

:func:`protect_pipeline` (what :func:`hf_specdef.protect` does with a pipeline, registered with
:mod:`hf_specdef.analysis.integration_registry` by the diffusers integration) and :func:`_apply`, shared by load-time
and save-time
protection: it deforms the components in place, verified on the composed function, writes each component's
record and returns what changed (:class:`_Applied`), so that a save-time protection can put it all back.

Pipeline-level ``norm`` site: see :mod:`hf_specdef.integrations.diffusers`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers import ModelMixin

from hf_specdef.analysis import probe
from hf_specdef.analysis.probe import composed_output, first_float_param, text_ids
from hf_specdef.config import CONFIG_KEY, SpecDefConfig
from hf_specdef.deformation import engine
from hf_specdef.deformation.engine import PairResult
from hf_specdef.deformation.record import check_not_protected, component_record, get_record, set_record
from hf_specdef.deformation.report import ProtectionReport
from hf_specdef.protection.in_memory import (
    Backup,
    ParamTensors,
    check_materialized,
    deform_verified,
    model_pairs,
    upcast_for_float32,
)
from hf_specdef.protection.pipeline_fold import text_encoder_config
from hf_specdef.sites import NoSitesError, Pair, TensorBlock
from hf_specdef.sites import diffusers as diffusers_sites

logger = logging.getLogger("hf_specdef")

__all__ = ["DENOISER_NAMES", "FINAL_NORMS", "TEXT_ENCODER", "ComponentTensors", "protect_pipeline"]

DENOISER_NAMES = ("unet", "transformer")
TEXT_ENCODER = diffusers_sites.TEXT_ENCODER
FINAL_NORMS = diffusers_sites.FINAL_NORMS
_CLAIMS = "_specdef_claims"  # on a module: PairResults (module-local names) of the protection we did
_PIPELINE_CLAIMS = "_specdef_pipeline_claims"  # on the denoiser: the pipeline-level PairResults (prefixed names)


# --------------------------------------------------------------------------------------------
# Tensors of several pipeline components under one name space
# --------------------------------------------------------------------------------------------


class ComponentTensors(MutableMapping[str, torch.Tensor]):
    """``"<component>.<parameter name>" -> tensor`` over several modules (e.g. ``text_encoder.`` and ``unet.``).

    Lets one pair span two pipeline components (the pipeline-level ``norm`` site) and one
    :class:`~hf_specdef.protection.in_memory.Backup` cover every change made to a pipeline.
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
    check_materialized(denoiser)
    te = comps.get(TEXT_ENCODER) if text_encoder or pipe is not None else None
    if text_encoder:
        if not isinstance(te, torch.nn.Module):
            raise ValueError("protect_pipeline(text_encoder=True): this pipeline has no 'text_encoder' component.")
        check_not_protected(te, force)
        check_materialized(te)

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
        check_materialized(te)

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
            first_float_param(m).dtype != torch.float32 for m in used.values()):
        if not allow_upcast:
            raise ValueError(
                "save-time protection with precision='float32' would change the dtype of the in-memory model; load it in "
                "float32, use precision='axis', or protect(pipe, cfg) and then save_pretrained."
            )
        notes += [f"{name}: {note}" for name, module in used.items() if (note := upcast_for_float32(module, plans))]

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
