"""Step 2 of publishing: the checks a protected folder must pass before anything is published (see docs/releases.md).

* **function**: the original and the protected checkpoint loaded with *stock* transformers / diffusers give the
  same outputs on probe inputs, within the tolerance (:func:`verify_folder`; a pipeline also end to end,
  :func:`verify_pipeline`); the figures measured are written into the records (:func:`record_deviations`);
* **quantized** (:func:`quantization_checks`): the formats ``cfg.quantization_safe`` promises must hold; the
  formats measured for the card only (by default :data:`DEFAULT_QUANTIZE`) are reported, broken or not;
* **claims**: every matrix the protection claims to have deformed is visibly deformed to
  :func:`hf_specdef.inspect_model` (:func:`check_claims`): a publisher who forgot to protect must not ship an
  "unprotected protected" model.

The figures of each component are a :class:`ComponentCheck`; :func:`_refuse_if_bad` and
:func:`_refuse_if_bad_quantized` raise :class:`PublishError` when one fails.
"""

from __future__ import annotations

import inspect as pyinspect
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_specdef.config import SpecDefConfig
from hf_specdef.publishing.components import _components, _load, _record_of
from hf_specdef.publishing.errors import PublishError
from hf_specdef.publishing.source import SourceInfo

logger = logging.getLogger("hf_specdef")

# quantization formats publish measures on a transformers release by default (the GGUF formats people convert to)
DEFAULT_QUANTIZE: tuple[str, ...] = ("q8_0", "q4_0")


@dataclass
class ComponentCheck:
    """Verification and inspection figures of one protected model (or pipeline component)."""

    component: str  # "" for a single model
    class_name: str
    dtype: str
    max_relative_deviation: float
    tolerance: float
    ok: bool
    claimed: list[str] = field(default_factory=list)  # modules the protection claims to have made hot
    not_deformed: list[str] = field(default_factory=list)  # claimed but not flagged by the inspector
    deformed: int = 0
    matrices: int = 0
    coverage: float = 0.0
    hot_coverage: float = 0.0
    threshold: float | None = None  # the inspector's outlier threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def _report_hot_modules(report: Any, component: str) -> list[str] | None:
    """Hot modules a protection report claims for ``component`` (used when the record level is ``none``)."""
    if report is None:
        return None
    if isinstance(report, dict):  # per-component reports of a pipeline
        sub = report.get(component) if component else None
        return _report_hot_modules(sub, "") if sub is not None else None
    if (getattr(report, "component", None) or "") != component and component:
        return None  # a streaming report of a pipeline names the one component it protected
    if hasattr(report, "hot_modules"):
        return list(report.hot_modules)
    if hasattr(report, "to_dict"):
        return list(report.to_dict().get("hot_modules", [])) or None
    return None


def _matches(finding: str, claim: str) -> bool:
    """``model.layers.0.mlp.up_proj.weight`` matches claim ``model.layers.0.mlp.up_proj`` (checkpoint prefixes ok);
    a fused-expert parameter ``...mlp.experts.gate_up_proj`` matches its module ``...mlp.experts``."""
    f = finding[: -len(".weight")] if finding.endswith(".weight") else finding.rsplit(".", 1)[0]
    return f == claim or f.endswith("." + claim) or claim.endswith("." + f)


def inspection_threshold(alpha: float) -> float:
    """Outlier ratio above which the inspector calls a block deformed: its default (20), lowered for small alpha
    (a block deformed by alpha shows a ratio of about alpha; unprotected blocks stay near 1)."""
    from hf_specdef.analysis.inspection import DEFAULT_THRESHOLD

    return min(DEFAULT_THRESHOLD, max(float(alpha) / 2, 2.0))


def check_claims(model: torch.nn.Module, claimed: list[str] | None, threshold: float | None = None) -> tuple[list[str], Any]:
    """Inspect ``model`` and return the claimed hot modules that the inspector does not flag as deformed."""
    from hf_specdef.analysis.inspection import DEFAULT_THRESHOLD, inspect_model
    from hf_specdef.sites.moe import loaded_module_name

    report = inspect_model(model, threshold=threshold or DEFAULT_THRESHOLD)
    flagged = report.deformed
    if not claimed:  # nothing claimed by name: at least something must be deformed
        return ([] if flagged else ["<any matrix>"]), report
    params = dict(model.named_parameters())
    claimed = list(dict.fromkeys(loaded_module_name(c) for c in claimed))  # per-expert checkpoint names -> fused
    claimed = [c for c in claimed if getattr(params.get(f"{c}.weight"), "ndim", 2) >= 2]  # norm weights: no matrix
    matrices = {f.name for f in report.findings}
    missing = [c for c in claimed if any(_matches(n, c) for n in matrices) and not any(_matches(n, c) for n in flagged)]
    unknown = [c for c in claimed if not any(_matches(n, c) for n in matrices)]
    return missing + [f"{c} (no such weight)" for c in unknown], report


def _probe(model: Any) -> dict[str, Any]:
    from hf_specdef.analysis import probe

    try:
        return probe.probe_inputs(model)
    except ValueError as e:
        raise PublishError(f"cannot verify {type(model).__name__}: {e}") from None


def verify_folder(src: Path, dst: Path, info: SourceInfo, cfg: SpecDefConfig, report: Any = None,
                  composed: ComponentCheck | None = None) -> list[ComponentCheck]:
    """Load each protected component of ``dst`` and its original in ``src`` with stock libraries; compare and inspect.

    In a pipeline, components without a protection record (and not named by ``report``) are left to the
    end-to-end run of :func:`verify_pipeline`. So is the function of components touched by the pipeline-level
    pair (their record has a ``"pipeline"`` entry: the text encoder's final norm folded into the denoiser keeps
    only the composed function): they take the deviation of ``composed``, the end-to-end check. Raises
    nothing: the caller decides (``ok`` and ``not_deformed``).
    """
    from hf_specdef.analysis.verification import verify

    checks = []
    for name, kind, class_name in _components(info, dst):
        record = _record_of(dst / name if name else dst)
        claimed = record.get("hot_modules") if record else _report_hot_modules(report, name)
        if info.is_pipeline and record is None and claimed is None:
            continue  # an untouched component (VAE, a text encoder not asked for): covered by the pipeline run
        fold = (record or {}).get("pipeline") if info.is_pipeline else None
        folded = set(fold.get("hot_modules", [])) | set(fold.get("cold_modules", [])) if fold else set()
        prot = _load(dst / name if name else dst, kind, class_name)
        if fold and composed is not None:  # no standalone comparison: the original is not loaded
            dtype, dev, ok = composed.dtype, composed.max_relative_deviation, composed.ok
        else:
            ref = _load(src / name if name else src, kind, class_name)
            res = verify(ref, prot, _probe(ref), tolerance=cfg.tolerance)
            dtype, dev, ok = res.dtype, res.max_relative_deviation, bool(res.ok)
            del ref
        missing, ins = check_claims(prot, claimed, inspection_threshold(cfg.alpha))
        if fold:  # a folded norm is a vector, which the spectral inspector does not look at: matrices are held to claims
            own = [c for c in claimed or [] if c not in folded]
            missing = [m for m in missing if (m != "<any matrix>" or own)
                       and not (m.endswith(" (no such weight)") and m[: -len(" (no such weight)")] in folded)]
        checks.append(ComponentCheck(
            name, class_name, dtype, dev, cfg.tolerance, ok, list(claimed or []),
            missing, len(ins.deformed), len(ins.findings), ins.coverage, ins.hot_coverage, ins.threshold,
        ))
        logger.info("hf-specdef publish: verified %s: deviation %s (%s), %d/%d matrices deformed",
                    name or class_name, _fmt(dev), dtype, len(ins.deformed), len(ins.findings))
        del prot
    if not checks:
        raise PublishError(f"no protected component found in {dst}: the protection wrote no record and named no "
                           "modules, so there is nothing to verify (use record='minimal' or 'full')")
    return checks


def _pipeline_output(pipe: Any) -> torch.Tensor:
    """One seeded, short end-to-end run of a pipeline (latents when the pipeline can return them)."""
    params = pyinspect.signature(pipe.__call__).parameters
    gen = torch.Generator(device=pipe.device) if hasattr(pipe, "device") else torch.Generator()
    kwargs: dict[str, Any] = {"generator": gen.manual_seed(0)}
    if "num_inference_steps" in params:  # one denoising step: a function check, not an image
        kwargs["num_inference_steps"] = 1
    if "prompt" in params:
        kwargs["prompt"] = "a photo of a cat"
    if "output_type" in params:
        kwargs["output_type"] = "latent"
    with torch.no_grad():
        out = pipe(**kwargs)
    images = getattr(out, "images", None)
    if images is None:
        images = out[0]
    return torch.as_tensor(images if not isinstance(images, list) else images[0]).to(torch.float64)


def verify_pipeline(src: Path, dst: Path, info: SourceInfo, cfg: SpecDefConfig) -> ComponentCheck:
    """End-to-end check of a pipeline: both loaded with stock diffusers, same seed, outputs compared.

    This is what catches pipeline-level sites that span components (the text encoder's final norm folded into
    the denoiser's cross-attention), which per-component checks cannot.
    """
    from hf_specdef.analysis.probe import max_relative_deviation

    ref = _pipeline_output(_load(src, info.kind, info.class_name))
    pipe = _load(dst, info.kind, info.class_name)
    dtype = str(next((getattr(c, "dtype", None) for c in pipe.components.values() if isinstance(c, torch.nn.Module)), None))
    dev = max_relative_deviation(ref, _pipeline_output(pipe))
    return ComponentCheck("pipeline", info.class_name, dtype.replace("torch.", ""), dev, cfg.tolerance, dev <= cfg.tolerance)


def quantization_checks(src: Path, dst: Path, info: SourceInfo, cfg: SpecDefConfig,
                        formats: tuple[str, ...]) -> list[dict[str, Any]]:
    """Measure quantized copies of a transformers release against the equally quantized original.

    The original and the protected copy are loaded with stock transformers (float32), every linear weight of both is
    quantized in each of ``formats`` and the two are compared on the probe batch
    (:func:`hf_specdef.analysis.quantized.compare_quantized`).

    Args:
        src: the original folder.
        dst: the protected folder.
        info: the source (only transformers models are measured).
        cfg: the protection; the formats of ``cfg.quantization_safe`` are promises (``required``).
        formats: the formats to measure.

    Returns:
        A row per format: :class:`~hf_specdef.analysis.quantized.QuantizedComparison` ``.to_dict()`` plus
        ``required`` and the formatted figures. A format that is not required and cannot be measured here (the
        ``gguf`` package missing, no weight fits its blocks) gives a row with ``error`` instead of failing the
        publication; a required one raises.

    Raises:
        ValueError: an unknown format name.
        ImportError: a required GGUF format without the ``gguf`` package.

    Example:

    ```python
    >>> rows = quantization_checks(src, dst, info, cfg, ("q8_0", "q4_0"))
    >>> [(r["format"], r["ok"]) for r in rows]
    [('q8_0', False), ('q4_0', False)]
    ```
    """
    if not formats:
        return []
    if info.kind != "transformers":
        logger.warning("hf-specdef publish: quantized checks cover transformers models; skipped for %s", info.kind)
        return []
    from hf_specdef.analysis.quantized import compare_quantized
    from hf_specdef.analysis.stock_loading import load_stock
    from hf_specdef.quantization import get_format

    for f in formats:
        get_format(f)  # unknown names fail before any model is loaded
    ref, prot = load_stock(src), load_stock(dst)
    rows = []
    for f in formats:
        required = f in cfg.quantization_safe
        try:
            q = compare_quantized(ref, prot, f, tolerance=cfg.tolerance)
        except (ImportError, ValueError, RuntimeError) as e:
            if required:
                raise
            logger.warning("hf-specdef publish: cannot measure the release quantized in %s (%s)", f, e)
            rows.append({"format": f, "required": False, "ok": None, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append(q.to_dict() | {"required": required, "deviation_str": _fmt(q.deviation),
                                   "quantization_error_str": _fmt(q.quantization_error),
                                   "protected_error_str": _fmt(q.protected_error)})
        if not q.ok and not required:
            logger.warning("hf-specdef publish: the release breaks when quantized in %s (deviation %s from the "
                           "quantized original); the card says so", f, _fmt(q.deviation))
    return rows


def record_deviations(folder: Path, checks: list[ComponentCheck]) -> list[Path]:
    """Write each component's verified max relative deviation into its protection record (``config.json``).

    The protection itself may leave ``"max_relative_deviation": null`` (streaming skips its forward check above a
    size limit); after :func:`verify_folder` measured it, the record carries the figure the card quotes.

    Args:
        folder: the protected folder (staged, before it is published).
        checks: the figures of :func:`verify_folder` (a check's ``component`` names its sub-folder).

    Returns:
        The config files written (components without a record, record level ``none``, are left alone).

    Example:

    ```python
    >>> record_deviations(staged, verify_folder(src, staged, info, cfg))
    [PosixPath('.../config.json')]
    ```
    """
    import json

    from hf_specdef.deformation.record import get_record, record_key

    written = []
    for c in checks:
        conf_path = (folder / c.component if c.component else folder) / "config.json"
        if not conf_path.is_file():
            continue
        conf = json.loads(conf_path.read_text())
        rec = get_record(conf)
        if not rec:
            continue
        dev = c.max_relative_deviation
        rec["max_relative_deviation"] = dev if math.isfinite(dev) else "non-finite"
        conf[record_key(conf)] = rec
        conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        written.append(conf_path)
    return written


def _refuse_if_bad_quantized(rows: list[dict[str, Any]]) -> None:
    bad = [r for r in rows if r["required"] and not r["ok"]]
    if bad:
        raise PublishError(f"the release claims to survive {[r['format'] for r in bad]} but the quantized protected "
                           f"model deviates from the quantized original by {[r['deviation_str'] for r in bad]}; "
                           "nothing was published.")


def _refuse_if_bad(checks: list[ComponentCheck]) -> None:
    for c in checks:
        where = c.component or c.class_name
        if not (c.ok and math.isfinite(c.max_relative_deviation)):
            raise PublishError(
                f"verification failed for {where}: the protected outputs deviate by {_fmt(c.max_relative_deviation)} "
                f"(max relative, {c.dtype}) > tolerance {c.tolerance:g}; nothing was published. Lower alpha, use "
                "mode='axis' with a power-of-two alpha, or precision='float32'."
            )
        if c.not_deformed:
            raise PublishError(
                f"{where}: the protection claims {len(c.claimed) or 'some'} deformed matrices but the spectral inspector "
                f"finds no deformation (outlier ratio >= {c.threshold or 20:g}) in {c.not_deformed[:3]}"
                f"{'...' if len(c.not_deformed) > 3 else ''}; refusing to publish a model that would be labelled "
                "protected without being protected (see docs/releases.md). If the protection was applied, alpha may be "
                "too small to be told apart from the weights' own spectrum."
            )
