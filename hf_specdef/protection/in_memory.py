"""In-memory protection of a model: ``protect(model, cfg)``."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_specdef.analysis import probe
from hf_specdef.analysis.integration_registry import pipeline_protector
from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation import batched, engine
from hf_specdef.deformation.engine import PairResult, Plan
from hf_specdef.deformation.record import check_not_protected, make_record, set_record
from hf_specdef.deformation.report import ProtectionReport
from hf_specdef.errors import SpecDefError
from hf_specdef.protection import best_effort_check as best_effort
from hf_specdef.sites import NoSitesError, Pair, absent_sites, cfg_get, drop_inexact, lookup, pairs_for, select_pairs
from hf_specdef.storage import memory_mapped as mapped
from hf_specdef.tensor_math.linalg import Deformation

logger = logging.getLogger("hf_specdef")


class VerificationError(SpecDefError, ValueError):
    """The protected model's outputs deviate beyond the tolerance; nothing was changed.

    Raised by :func:`~hf_specdef.protect`, :func:`~hf_specdef.save_protected` and
    :func:`~hf_specdef.protect_checkpoint` when, with verification on, the max relative output deviation on a probe
    batch exceeds ``cfg.tolerance`` (every change is restored exactly first), or when a decided deformation does not
    inflate its block's top singular value. Also a ``ValueError``.

    Example:

    ```python
    from transformers import AutoModelForCausalLM

    from hf_specdef import SpecDefConfig, VerificationError, protect

    model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")
    try:
        protect(model, SpecDefConfig(tolerance=1e-5))
    except VerificationError as e:  # the model is exactly as it was
        print(e)  # lower alpha, use mode="axis" with a power-of-two alpha, or protect in float32
    ```
    """

    docs_page = "docs/releases.md"


def require_inflated(key: str, sigma_before: float, sigma_after: float) -> None:
    """Refuse a decided deformation that does not inflate sigma_1 of its block (also refuses NaN)."""
    if not sigma_after > sigma_before:
        raise VerificationError(f"pair {key}: the claimed deformation is absent (sigma_1 {sigma_before:.4g} -> "
                                f"{sigma_after:.4g}); nothing was written.")


class ParamTensors(MutableMapping[str, torch.Tensor]):
    """``name -> parameter.data`` of a module, looked up live (so dtype changes are seen)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = dict(model.named_parameters())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.params[name].data

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.params[name].data = value

    def __delitem__(self, name: str) -> None:
        raise TypeError("cannot delete a parameter")

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.params.items()}


class Backup:
    """Exact copies (on CPU) of the parts of tensors a pair is about to change."""

    def __init__(self) -> None:
        self.saved: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []

    def add(self, name: str, axis: int, rows: torch.Tensor, old: torch.Tensor) -> None:
        """Record the exact values ``old`` of ``rows`` of tensor ``name`` along ``axis`` (taken before a change)."""
        self.saved.append((name, axis, rows, old))

    def save(self, pair: Pair, tensors: MutableMapping[str, torch.Tensor], m: Deformation) -> None:
        """Record the values of every row/column of ``pair``'s blocks that ``m`` is about to change."""
        for b in pair.producers + pair.consumers:
            t = tensors[b.name]
            rows = (m.indices.to(t.device) + b.start) if m.is_axis else torch.arange(b.start, b.stop, device=t.device)
            self.add(b.name, b.axis, rows, t.index_select(b.axis, rows).to("cpu", copy=True))

    def restore(self, tensors: MutableMapping[str, torch.Tensor]) -> None:
        for name, axis, rows, old in reversed(self.saved):
            t = tensors[name]
            t.index_copy_(axis, rows, old.to(device=t.device, dtype=t.dtype))
        self.saved.clear()


def tied_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that share storage with another parameter (tied weights)."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        groups[id(p)].append(name)
    return {n for names in groups.values() if len(names) > 1 for n in names}


def lookup_spec(model: torch.nn.Module) -> Any:
    """The registry entry of a model, or ``None``."""
    return lookup(cfg_get(getattr(model, "config", {}), "model_type"), type(model).__name__)


def model_pairs(model: torch.nn.Module, cfg: SpecDefConfig, tensors: ParamTensors) -> tuple[list[Pair], list[str]]:
    """The selected pairs of a model, minus those that touch tied weights (reported as skipped)."""
    guessed: list[str] = []
    try:
        all_pairs = pairs_for(getattr(model, "config", {}), tensors.shapes(), cfg, type(model).__name__)
    except NoSitesError as e:
        if cfg.site_map is not None or lookup_spec(model) is not None:
            raise
        all_pairs, guessed = best_effort.verified_pairs(model, cfg, tensors, e)
    pairs, inexact = drop_inexact(select_pairs(all_pairs, cfg), lambda n: tensors[n].dtype)
    skipped = [s for s in absent_sites(cfg, all_pairs, getattr(model, "config", {}), type(model).__name__)
               if not any(s.split(":")[0] in g for g in guessed)]
    skipped += guessed + inexact
    tied = tied_parameter_names(model)
    keep = [p for p in pairs if not tied.intersection(p.names())]
    for p in pairs:
        if tied.intersection(p.names()):
            skipped.append(f"{p.key}: touches tied weights {sorted(tied.intersection(p.names()))}")
    for s in skipped:
        logger.info("hf-specdef skipped %s", s)
    if not keep:
        raise NoSitesError(f"every selected pair touches tied/shared weights or cannot be exact, and was skipped: {skipped}")
    return keep, skipped


def check_materialized(model: torch.nn.Module) -> None:
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(
            f"{len(meta)} parameters (e.g. {meta[0]!r}) are offloaded to the meta device (accelerate disk/CPU offload); "
            "in-memory protection needs them materialized. Protect the checkpoint files instead with "
            "hf_specdef.protect_checkpoint(src, dst, cfg) (streams shard by shard)."
        )


def upcast_for_float32(model: torch.nn.Module, plans: list[Plan]) -> str | None:
    """``precision="float32"``: run and store the whole model in float32 when a pair needs it.

    Keeping only the deformed *weights* in float32 is not enough: the inflated activation between
    producer and consumer is rounded in the model's dtype (measured on a tiny Llama in bfloat16,
    alpha=1000 spectral ``attn.vo``: 0.64 relative output error with float32 weights and bf16
    activations), so the model is upcast as a whole.
    """
    old = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if old == torch.float32 or not any(p.dtype == torch.float32 for p in plans):
        return None
    model.float()
    return f"precision='float32': model upcast from {old} to float32 (the inflated activations need it)"


def protect_model(
    model: torch.nn.Module,
    cfg: SpecDefConfig,
    *,
    verify: bool = True,
    inputs: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
    restore_on_failure: bool = True,
) -> ProtectionReport:
    """Protect a single ``torch.nn.Module`` (a transformers or diffusers model) in place.

    With ``restore_on_failure=False`` no backup of the changed rows/columns is kept, and a failure leaves the model
    half-deformed: only for a model nobody else holds, e.g. inside ``from_pretrained``, which then raises and
    returns no model (the load-time hook saves the copy, a tenth of the deformation's time on a CPU).
    """
    start = time.perf_counter()
    check_not_protected(model, force)
    check_materialized(model)
    tensors = ParamTensors(model)
    pairs, skipped = model_pairs(model, cfg, tensors)
    plans = plan_model(pairs, tensors, cfg, skipped)
    notes = sorted({n for p in plans for n in p.notes})
    upcast = upcast_for_float32(model, plans) if any(p.policy == "float32" for p in plans) else None
    mapped.own_file_backed(tensors, (b.name for p in plans for b in p.pair.producers + p.pair.consumers))
    if verify:  # after any upcast: the check measures the deformation alone
        inputs = inputs if inputs is not None else probe.probe_inputs(model)
    run = (lambda: probe.run_probe(model, inputs)) if verify else None
    qcheck = quantized_check(model, cfg, inputs) if verify else None
    results, _, deviation = deform_verified(plans, tensors, cfg, run=run, check=qcheck, progress=progress,
                                            keep_backup=restore_on_failure)
    skipped += guard_outcomes(plans, results, notes)
    record = make_record(cfg, results, deviation)
    if record is not None and cfg.quantization_safe:
        record["quantization"] = quantization_record(cfg, qcheck)
    set_record(model, record)
    if upcast:
        notes.append(upcast)
    report = ProtectionReport(cfg, results, deviation, skipped, notes, time.perf_counter() - start,
                              quantization=dict(qcheck.deviations) if qcheck else {})
    logger.info("hf-specdef protected %d pairs, deviation=%s", len(results), deviation)
    return report


def plan_model(pairs: Sequence[Pair], tensors: MutableMapping[str, torch.Tensor], cfg: SpecDefConfig,
               skipped: list[str] | None = None) -> list[Plan]:
    """The plans of in-memory protection: quantization-safe ones when ``cfg.quantization_safe`` is set."""
    if not cfg.quantization_safe:
        return engine.plan_pairs(pairs, tensors, cfg, skipped)
    from hf_specdef.deformation.quantization_safe import plan_safe

    plans = plan_safe(pairs, tensors, cfg.alpha, cfg.top_k, cfg.quantization_safe)
    if cfg.mode != "axis":
        plans[0].notes.append(f"quantization_safe: axis scaling in whole quantization groups (mode={cfg.mode!r} "
                              "requested)")
    return plans


def quantized_check(model: torch.nn.Module, cfg: SpecDefConfig, inputs: dict[str, Any]) -> Any:
    """For ``cfg.quantization_safe``: the quantized probe outputs of ``model`` per format, recorded now, to be compared
    after deformation (``check=`` of :func:`deform_verified`); ``None`` otherwise."""
    if not cfg.quantization_safe:
        return None
    from hf_specdef.analysis.quantized import QuantizedCheck

    check = QuantizedCheck(model, inputs, tuple(cfg.quantization_safe), cfg.tolerance)
    check.reference()
    return check


def guard_outcomes(plans: Sequence[Plan], results: Sequence[PairResult], notes: list[str]) -> list[str]:
    """Reasons of the pairs the plans' variants skipped (their notes are added to ``notes``); raises
    :class:`NoSitesError` when every pair was skipped by a quantization-safe variant."""
    variants = [p.variant for p in plans]
    skipped = [v.skipped for v in variants if v.skipped]
    notes.extend(v.note for v in variants if v.note)
    if any(not v.batchable for v in variants) and not results:
        raise NoSitesError(f"no selected pair can be made quantization-safe: {skipped[:3]}")
    if any(r.deformation.factor < 1 for r in results):
        notes.append("inverted pairs (factor < 1, the quantization-safe norm site): the readers' grown input columns "
                     "are the slow side and the norm weights the fast one; 'hot' still names each pair's consumers")
    for s in skipped:
        logger.info("hf-specdef skipped %s", s)
    return skipped


def quantization_record(cfg: SpecDefConfig, check: Any) -> dict[str, Any]:
    """The ``quantization`` entry of a record: formats and the measured quantized deviations (None: not verified)."""
    devs = check.deviations if check is not None else {}
    return {"safe_formats": list(cfg.quantization_safe),
            "max_relative_deviation": {f: devs.get(f) for f in cfg.quantization_safe}}


def deform_verified(
    plans: Sequence[Plan],
    tensors: MutableMapping[str, torch.Tensor],
    cfg: SpecDefConfig,
    *,
    run: Callable[[], torch.Tensor | Sequence[torch.Tensor]] | None = None,
    check: Callable[[list[PairResult], MutableMapping[str, torch.Tensor]], None] | None = None,
    progress: bool = True,
    keep_backup: bool = True,
) -> tuple[list[PairResult], Backup, float | None]:
    """Deform ``plans`` in place with an exact backup of every changed row/column; verify; return the backup.

    ``run()`` computes the output(s) to preserve (called before and after; the deviation is the max over
    outputs) and ``check(results, tensors)`` may veto the result (the claimed deformation). On any failure every
    change is restored exactly and the error propagates (:class:`VerificationError` for a deviation above
    ``cfg.tolerance``). Returns ``(results, backup, deviation)``; ``backup.restore(tensors)`` undoes it. With
    ``keep_backup=False`` nothing is copied and nothing restored (the returned backup is empty): for tensors that are
    thrown away on failure.
    """
    reference = _as_list(run()) if run is not None else None
    keep = keep_backup
    backup, results = Backup(), []
    saver = backup.add if keep else None
    undone = "every change was restored and nothing was written" if keep else \
        "the weights are half-deformed and must be discarded (no backup was kept)"
    try:
        with torch.no_grad(), tqdm(total=len(plans), desc="SpecDef protect", unit="pair", disable=not progress,
                                   leave=False) as bar:
            # one driver: wave by wave, or pair by pair where a variant is not batchable (quantization-safe)
            results = batched.deform(plans, tensors, cfg, save=saver, done=bar.update)
        deviation = None
        if reference is not None:
            deviation = max(probe.max_relative_deviation(r, o) for r, o in zip(reference, _as_list(run()), strict=True))
            if not deviation <= cfg.tolerance:
                raise VerificationError(
                    f"protected outputs deviate by {deviation:.3g} (max relative) > tolerance={cfg.tolerance:g}; "
                    f"{undone}. Lower alpha, use mode='axis' with a power-of-two alpha, "
                    "or protect in float32."
                )
        if check is not None:
            check(results, tensors)
    except BaseException:
        backup.restore(tensors)
        raise
    return results, backup, deviation


def _as_list(out: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [out] if torch.is_tensor(out) else list(out)


def is_pipeline(obj: Any) -> bool:
    return hasattr(obj, "components") and not isinstance(obj, torch.nn.Module)


def protect(
    model_or_pipeline: Any,
    cfg: SpecDefConfig | None = None,
    *,
    verify: bool = True,
    inputs: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
    **kwargs: Any,
) -> Any:
    """Deform a model (or a diffusers pipeline) in place and return a :class:`~hf_specdef.ProtectionReport`.

    The model's function is kept: with ``verify=True`` (default) outputs on a probe batch are compared before and
    after, and if they deviate beyond ``cfg.tolerance`` the model is restored exactly and
    :class:`VerificationError` is raised. The protection record is written to the model config (``cfg.record``), so
    ``save_pretrained`` carries it into config.json. A diffusers pipeline (an object with ``components``) is handed
    to the diffusers integration, which protects its denoiser (and, on request, its text encoder).

    Args:
        model_or_pipeline (`torch.nn.Module` or a diffusers pipeline):
            A transformers or diffusers model with materialized weights (not offloaded to the meta device), or a
            diffusers pipeline.
        cfg (`SpecDefConfig`, *optional*, defaults to `None`):
            The protection; ``None`` means ``SpecDefConfig()``.
        verify (`bool`, *optional*, defaults to `True`):
            Compare outputs on a probe batch before and after, and restore the model if they deviate beyond
            ``cfg.tolerance``. Without it the report's deviation is ``None`` (not measured).
        inputs (`dict[str, Any]`, *optional*, defaults to `None`):
            The probe batch (model keyword arguments); ``None`` builds one from the model config.
        force (`bool`, *optional*, defaults to `False`):
            Protect a model that already carries a protection record.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar.
        **kwargs:
            For a pipeline only, passed to the diffusers integration: ``text_encoder`` (`bool`, defaults to `False`:
            also protect the text encoder's own sites) and ``pipeline_norm`` (`bool` or `None`, defaults to `None`:
            fold the text encoder's final norm into every cross-attention ``to_k``/``to_v`` where it applies;
            ``True`` requires it, ``False`` skips it).

    Returns:
        `ProtectionReport`: per pair the site, layer, mode, factor and sigma_1 before/after, the measured deviation,
        what was skipped and why, and the precision actually used.

    Raises:
        AlreadyProtectedError: the model carries a protection record and ``force`` is False.
        NoSitesError: no pair of the model matches the config (unknown architecture, or every pair skipped).
        PrecisionBudgetError: the storage dtype cannot hold the deformation within ``cfg.tolerance``.
        VerificationError: the protected outputs deviate beyond ``cfg.tolerance`` (the model is restored exactly).
        IntegrationMissingError: a pipeline is passed and the diffusers integration is not installed.
        ValueError: some parameters are offloaded to the meta device (protect the files with
            :func:`~hf_specdef.protect_checkpoint` instead).
        TypeError: keyword arguments other than the ones above are passed for a model.

    Example:

    ```python
    from transformers import AutoModelForCausalLM

    from hf_specdef import SpecDefConfig, protect

    model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")
    report = protect(model, SpecDefConfig(alpha=1000.0))
    print(report)  # bfloat16 weights: axis mode, factor 1024, deviation measured on a probe batch
    model.save_pretrained("llama-specdef")  # config.json carries the protection record
    ```
    """
    cfg = cfg or SpecDefConfig()
    if is_pipeline(model_or_pipeline):  # the diffusers integration registers the pipeline protector (handlers)
        protect_pipeline = pipeline_protector(model_or_pipeline)
        return protect_pipeline(model_or_pipeline, cfg, verify=verify, inputs=inputs, force=force, progress=progress, **kwargs)
    if kwargs:
        raise TypeError(f"protect() got unexpected keyword arguments {sorted(kwargs)}")
    return protect_model(model_or_pipeline, cfg, verify=verify, inputs=inputs, force=force, progress=progress)
