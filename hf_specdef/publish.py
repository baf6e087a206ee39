"""Publish a SpecDef-protected model to the Hugging Face Hub with a generated model card (SPEC §1, §4, §7).

``publish(model, repo_id, cfg)`` runs the publisher's whole path:

1. **protect** the checkpoint folder shard by shard (:func:`hf_specdef.protect_checkpoint`), into a temporary
   directory next to the destination;
2. **verify**: load the original and the protected checkpoint with *stock* transformers / diffusers and compare
   them on probe inputs (max relative deviation, storage dtype), then check with :func:`hf_specdef.inspect_model`
   that every matrix the protection claims to have deformed is visibly deformed (SPEC §7: a publisher who forgot
   to protect must not ship an "unprotected protected" model). Nothing is published if either check fails;
3. **render the model card** (``README.md``) from the Jinja template ``model_cards/specdef_model_card.md``
   through :class:`huggingface_hub.ModelCard` / :class:`~huggingface_hub.ModelCardData`;
4. **push** with :class:`huggingface_hub.HfApi` (``create_repo`` + ``upload_folder``), or with ``dry_run=True``
   only write the folder.

The Hub token comes from ``token=``, ``HF_TOKEN`` or the ``huggingface_hub`` login; it is never printed,
logged or written, and is scrubbed from any error message.
"""

from __future__ import annotations

import datetime
import inspect as pyinspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from . import __version__, release_dtypes
from .config import SpecDefConfig
from .record import get_record
from .resistance import MeasureConfig, ResistanceError, measure_resistance, redteam_measure  # noqa: F401 (re-exported)

logger = logging.getLogger("hf_specdef")

TEMPLATE_NAME = "specdef_model_card.md"
TAGS = ("specdef", "spectral-deformation", "hf-specdef", "fine-tuning-resistance")
PAPER_URL = "https://arxiv.org/abs/2602.18868"
_CAUSAL_LM = ("ForCausalLM", "LMHeadModel")
MAX_CARD_PAIRS = 64  # rows of the per-pair table in a card at record level "full"

# transformers class-name suffix -> Hub pipeline tag (first match wins)
_PIPELINE_TAGS = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSeq2SeqLM", "text2text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForImageClassification", "image-classification"),
    ("Model", "feature-extraction"),
)


class PublishError(ValueError):
    """Publication refused (verification failed, the claimed sites are not deformed, no token...)."""


@dataclass
class SourceInfo:
    """What is being published: a transformers model, a diffusers pipeline or a single diffusers model."""

    path: Path
    hub_id: str | None
    kind: str  # "transformers" | "diffusers-pipeline" | "diffusers-model"
    class_name: str
    base_model: str
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    pipeline_tag: str | None = None
    language: Any = None

    @property
    def library_name(self) -> str:
        return "transformers" if self.kind == "transformers" else "diffusers"

    @property
    def is_pipeline(self) -> bool:
        return self.kind == "diffusers-pipeline"


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


@dataclass
class PublishResult:
    """What :func:`publish` did: where the folder is, the figures it verified, whether it pushed."""

    repo_id: str
    folder: str | None
    dry_run: bool
    pushed: bool
    base_model: str
    library_name: str
    config: dict[str, Any]
    checks: list[ComponentCheck]
    pipeline_check: ComponentCheck | None = None
    measure: dict[str, Any] | None = None
    downcast: dict[str, float] = field(default_factory=dict)  # dtype -> deviation of the release loaded in it
    commit_message: str | None = None
    url: str | None = None
    notes: list[str] = field(default_factory=list)  # what the protection skipped or noted

    @property
    def max_relative_deviation(self) -> float:
        checks = self.checks + ([self.pipeline_check] if self.pipeline_check else [])
        return max(c.max_relative_deviation for c in checks)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_relative_deviation"] = self.max_relative_deviation
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        where = f"pushed to https://huggingface.co/{self.repo_id}" if self.pushed else "dry run: nothing pushed"
        lines = [f"hf-specdef publish {self.base_model} -> {self.repo_id} ({where})"]
        if self.folder:
            lines.append(f"folder: {self.folder}")
        for c in self.checks + ([self.pipeline_check] if self.pipeline_check else []):
            lines.append(
                f"  {c.component or 'model'} ({c.class_name}, {c.dtype}): max relative deviation "
                f"{_fmt(c.max_relative_deviation)} (tolerance {c.tolerance:g})"
                + (f"; deformed {c.deformed}/{c.matrices} matrices, coverage {c.coverage:.1%}, hot {c.hot_coverage:.1%}"
                   if c.matrices else "")
            )
        if self.downcast:
            lines.append("  loaded in a 16-bit dtype (against the original in the same dtype): " + ", ".join(
                f"{d} {_fmt(x)}" for d, x in self.downcast.items()))
        lines += [f"  note: {n}" for n in self.notes]
        if self.measure:
            lines.append(f"measured resistance: {self.measure.get('summary', self.measure)}")
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2e}"


# --------------------------------------------------------------------------------------------------- token


def resolve_token(token: str | None = None) -> str | None:
    """The Hub token: ``token`` if given, else ``HF_TOKEN``, else the ``huggingface_hub`` login (never logged)."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# --------------------------------------------------------------------------------------------------- source


def resolve_source(model: str | os.PathLike, token: str | None = None, revision: str | None = None) -> tuple[Path, str | None]:
    """A local folder for ``model`` (a folder, or a Hub id fetched with ``snapshot_download``), and the Hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if path.exists():
        raise ValueError(f"model={str(model)!r} is a file; pass the checkpoint folder (with config.json) or a Hub id")
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", str(model)):
        raise ValueError(f"model={str(model)!r} is neither a local folder nor a Hub model id (owner/name)")
    from huggingface_hub import snapshot_download

    logger.info("hf-specdef publish: downloading %s from the Hub", model)
    try:
        local = snapshot_download(str(model), revision=revision, token=token)
    except Exception as e:  # offline, gated, missing: one clear line, token scrubbed
        raise PublishError(_scrub(f"could not download {model!r} from the Hub: {e}", token)) from None
    return Path(local), str(model)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _source_card(path: Path) -> Any:
    readme = path / "README.md"
    if not readme.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(readme).data
    except Exception as e:  # a malformed card must not block publication; the metadata is just not carried
        logger.warning("hf-specdef publish: cannot parse the source README.md metadata (%s)", e)
        return None


def _looks_like_hub_id(name: Any) -> bool:
    return isinstance(name, str) and bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", name)) and not Path(name).exists()


def describe_source(path: Path, hub_id: str | None = None, base_model: str | None = None) -> SourceInfo:
    """Read what kind of checkpoint ``path`` holds and the metadata to carry into the card."""
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        kind, class_name, config = "diffusers-pipeline", index.get("_class_name", "DiffusionPipeline"), index
    elif (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        if "_class_name" in config:
            kind, class_name = "diffusers-model", config["_class_name"]
        else:
            kind = "transformers"
            class_name = (config.get("architectures") or ["AutoModel"])[0]
    else:
        raise ValueError(f"{path} has neither config.json (transformers / diffusers model) nor model_index.json "
                         "(diffusers pipeline); pass a checkpoint folder saved with save_pretrained")
    card = _source_card(path)
    name = base_model or hub_id or (config.get("_name_or_path") if _looks_like_hub_id(config.get("_name_or_path")) else None)
    if not name:
        name = path.name
        logger.warning("hf-specdef publish: base_model unknown for a local folder; using %r (pass base_model= / "
                       "--base-model with the source's Hub id)", name)
    info = SourceInfo(path, hub_id, kind, class_name, name)
    info.license = getattr(card, "license", None) or config.get("license")
    info.license_name = getattr(card, "license_name", None)
    info.license_link = getattr(card, "license_link", None)
    info.language = getattr(card, "language", None)
    info.pipeline_tag = getattr(card, "pipeline_tag", None) or _infer_pipeline_tag(kind, class_name, config)
    return info


def _infer_pipeline_tag(kind: str, class_name: str, config: dict[str, Any]) -> str | None:
    if kind == "transformers":
        return next((tag for suffix, tag in _PIPELINE_TAGS if class_name.endswith(suffix)), None)
    if kind == "diffusers-pipeline":
        if "Img2Img" in class_name or "Inpaint" in class_name:
            return "image-to-image"
        if "Video" in class_name:
            return "text-to-video"
        return "text-to-image" if "text_encoder" in config else "unconditional-image-generation"
    return None


# --------------------------------------------------------------------------------------------------- protect


def protect_folder(src: Path, dst: Path, cfg: SpecDefConfig, *, force: bool = False, progress: bool = True,
                   device: str | torch.device | None = None) -> Any:
    """Write the protected checkpoint of ``src`` into ``dst`` (which must not exist), streaming shard by shard
    (:func:`hf_specdef.protect_checkpoint`: bounded memory, verified before it is renamed into place).

    A quantization-safe protection (``cfg.quantization_safe``) of a transformers model is done in memory instead
    (the stock class, in the stored dtype, :func:`hf_specdef.save_protected`; streaming does not support it), and
    the other files of ``src`` (tokenizer, chat template, ...) are copied."""
    if cfg.quantization_safe:
        return _protect_in_memory(src, dst, cfg, force=force, progress=progress)
    from .streaming import protect_checkpoint

    return protect_checkpoint(src, dst, cfg, device=device, force=force, progress=progress, verify=True)


_WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf)$|.*\.index\.json$|^config\.json$")


def _protect_in_memory(src: Path, dst: Path, cfg: SpecDefConfig, *, force: bool, progress: bool) -> Any:
    from .saving import save_protected

    config = _read_json(src / "config.json") if (src / "config.json").is_file() else {}
    archs = config.get("architectures") or []
    if "_class_name" in config or not archs:
        raise PublishError(f"quantization_safe={list(cfg.quantization_safe)} is supported for transformers models; "
                           f"{src} is not one (no 'architectures' in its config.json).")
    model = _load(src, "transformers", archs[0])
    report = save_protected(model, dst, cfg, force=force, progress=progress)
    for f in src.iterdir():
        if f.is_file() and not _WEIGHT_FILES.match(f.name) and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
    return report


# --------------------------------------------------------------------------------------------------- verify


def _load(path: Path, kind: str, class_name: str) -> Any:
    """Load with the stock library class named by the checkpoint (no hf-specdef keyword involved)."""
    if kind == "transformers":
        import transformers

        cls = getattr(transformers, class_name, None) or transformers.AutoModel
        return cls.from_pretrained(path, dtype="auto").eval()
    import diffusers

    with _quiet_diffusers():  # stock diffusers' warnings (deprecated scheduler settings, keys it ignores) are not ours
        if kind == "diffusers-pipeline":
            pipe = diffusers.DiffusionPipeline.from_pretrained(path)
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)
            return pipe
        cls = getattr(diffusers, class_name, None)
        if cls is None:
            raise PublishError(f"diffusers has no class {class_name!r} (named by {path / 'config.json'}); cannot verify")
        return cls.from_pretrained(path).eval()


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def _components(info: SourceInfo, folder: Path) -> list[tuple[str, str, str]]:
    """(sub-folder, kind, class name) of each torch model in a checkpoint folder ("" for a single model)."""
    if not info.is_pipeline:
        return [("", info.kind, info.class_name)]
    out = []
    for name in sorted(_read_json(folder / "model_index.json")):
        sub = folder / name
        if name.startswith("_") or not (sub / "config.json").is_file():
            continue  # schedulers / tokenizers have no config.json; feature extractors have no weights
        conf = _read_json(sub / "config.json")
        if "_class_name" in conf:
            out.append((name, "diffusers-model", conf["_class_name"]))
        elif conf.get("architectures"):
            out.append((name, "transformers", conf["architectures"][0]))
    return out


def _record_of(folder: Path) -> dict[str, Any] | None:
    conf = folder / "config.json"
    return get_record(_read_json(conf)) if conf.is_file() else None


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
    from .inspection import DEFAULT_THRESHOLD

    return min(DEFAULT_THRESHOLD, max(float(alpha) / 2, 2.0))


def check_claims(model: torch.nn.Module, claimed: list[str] | None, threshold: float | None = None) -> tuple[list[str], Any]:
    """Inspect ``model`` and return the claimed hot modules that the inspector does not flag as deformed."""
    from .inspection import DEFAULT_THRESHOLD, inspect_model
    from .sites.moe import loaded_module_name

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
    from . import probe

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
    from .verification import verify

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
    from .probe import max_relative_deviation

    ref = _pipeline_output(_load(src, info.kind, info.class_name))
    pipe = _load(dst, info.kind, info.class_name)
    dtype = str(next((getattr(c, "dtype", None) for c in pipe.components.values() if isinstance(c, torch.nn.Module)), None))
    dev = max_relative_deviation(ref, _pipeline_output(pipe))
    return ComponentCheck("pipeline", info.class_name, dtype.replace("torch.", ""), dev, cfg.tolerance, dev <= cfg.tolerance)


def quantization_checks(src: Path, dst: Path, info: SourceInfo, cfg: SpecDefConfig,
                        formats: tuple[str, ...]) -> list[dict[str, Any]]:
    """For a transformers model: the original and the protected copy loaded with stock transformers (float32), every
    linear weight of both quantized in each of ``formats``, compared (:func:`hf_specdef.quantization.compare.
    compare_quantized`). A row per format; ``required`` marks the formats ``cfg.quantization_safe`` promises."""
    if not formats:
        return []
    if info.kind != "transformers":
        logger.warning("hf-specdef publish: quantized checks cover transformers models; skipped for %s", info.kind)
        return []
    from .quantization.compare import compare_quantized
    from .stock import load_stock

    ref, prot = load_stock(src), load_stock(dst)
    rows = []
    for f in formats:
        q = compare_quantized(ref, prot, f, tolerance=cfg.tolerance)
        rows.append(q.to_dict() | {"required": f in cfg.quantization_safe, "deviation_str": _fmt(q.deviation),
                                   "quantization_error_str": _fmt(q.quantization_error),
                                   "protected_error_str": _fmt(q.protected_error)})
    return rows


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
                "protected without being protected (SPEC §7). If the protection was applied, alpha may be too small to "
                "be told apart from the weights' own spectrum."
            )


# --------------------------------------------------------------------------------------------------- card


def template_path() -> Path:
    """The packaged model-card template (a copy of ``model_cards/specdef_model_card.md``)."""
    return Path(str(resources.files("hf_specdef") / "templates" / TEMPLATE_NAME))


def _load_snippet(info: SourceInfo, repo_id: str) -> str:
    if info.kind == "transformers":
        return (f"from transformers import {info.class_name}\n\n"
                f"model = {info.class_name}.from_pretrained(\"{repo_id}\")")
    if info.is_pipeline:
        return ("from diffusers import DiffusionPipeline\n\n"
                f"pipe = DiffusionPipeline.from_pretrained(\"{repo_id}\")")
    return f"from diffusers import {info.class_name}\n\nmodel = {info.class_name}.from_pretrained(\"{repo_id}\")"


def _records(info: SourceInfo, folder: Path) -> dict[str, dict[str, Any]]:
    return {name: rec for name, _, _ in _components(info, folder)
            if (rec := _record_of(folder / name if name else folder)) is not None}


def _layer_key(layer: Any) -> tuple[str, int, str]:
    """Numeric order of layer labels: ``2`` before ``10``; ``"unet:2"`` before ``"unet:10"``."""
    text = str(layer)
    component, _, index = text.rpartition(":")
    return (component, int(index), "") if index.isdigit() else (component, -1, text)


def _merge_records(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One summary of the records of all protected components (for the card's "What was done")."""
    if not records:
        return {}
    first = next(iter(records.values()))
    conf = first.get("config", {})
    prefix = any(records)  # pipeline components (named sub-folders): prefix layers with the component
    pairs, layers, sites, modes, hot, num = [], set(), set(), set(), set(), 0
    for name, rec in records.items():
        sites.update(rec.get("sites", []))
        modes.update(rec.get("modes", []))
        layers.update(f"{name}:{x}" if prefix and name else x for x in rec.get("layers", []))
        hot.update(rec.get("hot_modules", []))
        num += int(rec.get("num_pairs", 0))
        for p in rec.get("pairs", []) or []:
            pairs.append({k: p.get(k) for k in ("layer", "site", "group", "mode", "factor", "k", "hot")}
                         | ({"layer": f"{name}:{p.get('layer')}"} if prefix and name else {}))
    return {
        "sites": sorted(sites), "modes": sorted(modes), "layers": sorted(layers, key=_layer_key), "num_pairs": num,
        "num_hot": len(hot), "alpha": conf.get("alpha"), "top_k": conf.get("top_k"), "mode": conf.get("mode"),
        "layers_selection": conf.get("layers"), "precision": conf.get("precision"), "pairs": pairs,
        "precision_used": ", ".join(sorted({str(p.get("used")) for r in records.values() if (p := r.get("precision"))}))
        or None,
        "components": sorted(name for name in records if name),
        "pipeline_fold": next((rec["pipeline"]["note"] for rec in records.values() if rec.get("pipeline")), None),
    }


def render_card(
    info: SourceInfo,
    repo_id: str,
    cfg: SpecDefConfig,
    checks: list[ComponentCheck],
    folder: Path,
    *,
    pipeline_check: ComponentCheck | None = None,
    measure: dict[str, Any] | None = None,
    template: str | os.PathLike | None = None,
    release_dtypes: str = "",
    quantization: list[dict[str, Any]] | None = None,
) -> Any:
    """Render the model card (a :class:`huggingface_hub.ModelCard`) of a protected, verified folder.

    ``release_dtypes`` is the statement of the dtypes the release is exact in and what the others do to it
    (:func:`hf_specdef.release_dtypes.card_paragraph`), ending the card's first paragraph."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=info.base_model, license=info.license, license_name=info.license_name,
        license_link=info.license_link, library_name=info.library_name, pipeline_tag=info.pipeline_tag,
        language=info.language, tags=list(TAGS) + [info.library_name],
    )
    summary = _merge_records(_records(info, folder))
    shown = summary.get("pairs", [])[:MAX_CARD_PAIRS]
    all_checks = checks + ([pipeline_check] if pipeline_check else [])
    max_dev = max(c.max_relative_deviation for c in all_checks)
    cov = ", ".join(f"{c.coverage:.1%}" + (f" ({c.component})" if c.component else "") for c in checks)
    hot = ", ".join(f"{c.hot_coverage:.1%}" + (f" ({c.component})" if c.component else "") for c in checks)
    base_url = f"https://huggingface.co/{info.base_model}" if _looks_like_hub_id(info.base_model) else None
    kwargs = dict(
        repo_id=repo_id, base_model=info.base_model, base_model_url=base_url, hf_specdef_version=__version__,
        date=datetime.date.today().isoformat(), record_level=cfg.record, is_pipeline=info.is_pipeline,
        library_name=info.library_name,
        sites=summary.get("sites", list(cfg.sites)), alpha=f"{summary.get('alpha', cfg.alpha):g}",
        top_k=summary.get("top_k", cfg.top_k), layers=summary.get("layers", []),
        layers_selection=summary.get("layers_selection", cfg.layers), mode=summary.get("mode", cfg.mode),
        modes=summary.get("modes", []), num_pairs=summary.get("num_pairs", 0), num_hot=summary.get("num_hot", 0),
        precision=summary.get("precision", cfg.precision), components=summary.get("components", []),
        precision_used=summary.get("precision_used") or "(no record)", release_dtypes=release_dtypes,
        pipeline_fold=summary.get("pipeline_fold"),
        pairs=[p | {"factor": f"{p['factor']:g}" if isinstance(p.get("factor"), (int, float)) else p.get("factor")}
               for p in shown] if cfg.record == "full" else [],
        pairs_truncated=len(summary.get("pairs", [])) > len(shown),
        checks=[c.to_dict() | {"deviation_str": _fmt(c.max_relative_deviation), "tolerance": f"{c.tolerance:g}"}
                for c in all_checks],
        inspections=[{"component": c.component, "deformed": c.deformed, "matrices": c.matrices,
                      "coverage": f"{c.coverage:.1%}", "hot_coverage": f"{c.hot_coverage:.1%}"} for c in checks],
        max_deviation_str=_fmt(max_dev), coverage_str=cov, hot_coverage_str=hot, measure=measure,
        load_snippet=_load_snippet(info, repo_id),
        quantization=quantization or [], quantization_safe=list(cfg.quantization_safe),
    )
    return ModelCard.from_template(data, template_path=str(template or template_path()), **kwargs)


# --------------------------------------------------------------------------------------------------- push


def push_folder(folder: Path, repo_id: str, *, private: bool, token: str | None, commit_message: str) -> str:
    """``create_repo(exist_ok=True)`` then ``upload_folder``; returns the commit URL. Errors carry no token."""
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    except Exception as e:
        raise PublishError(_scrub(f"push to {repo_id!r} failed: {type(e).__name__}: {e}", token)) from None
    return str(getattr(info, "commit_url", None) or info)


def _default_commit_message(info: SourceInfo, cfg: SpecDefConfig, deviation: float) -> str:
    what = "SpecDef protection" if cfg.record == "none" else f"SpecDef (alpha={cfg.alpha:g}, sites={','.join(cfg.sites)})"
    return (f"Upload {what}-protected {info.base_model} with hf-specdef {__version__} "
            f"(verified: max relative deviation {_fmt(deviation)})")


# --------------------------------------------------------------------------------------------------- publish


@contextmanager
def _workdir(near: Path | None) -> Iterator[Path]:
    parent = near.parent if near is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".specdef-publish-", dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _move_into_place(src: Path, dst: Path, work: Path, overwrite: bool) -> None:
    if dst.exists():
        if not overwrite:
            raise PublishError(f"output_dir {dst} already exists; choose another folder or pass overwrite=True (--overwrite)")
        os.replace(dst, work / "previous")
    os.replace(src, dst)


def publish(
    model: str | os.PathLike,
    repo_id: str | None,
    cfg: SpecDefConfig | None = None,
    *,
    private: bool = False,
    dry_run: bool = False,
    output_dir: str | os.PathLike | None = None,
    measure: bool | MeasureConfig = False,
    token: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    revision: str | None = None,
    template: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    quantize: tuple[str, ...] | list[str] = (),
    redteam: str | os.PathLike | dict[str, Any] | None = None,
) -> PublishResult:
    """Protect ``model``, verify it, write a model card and push it to ``repo_id`` (or only write it: ``dry_run``).

    Args:
        model: a local checkpoint folder (transformers model, diffusers pipeline or diffusers model) or a Hub id.
        repo_id: destination Hub repository (``owner/name``). Optional with ``dry_run`` (then ``<folder>-specdef``).
        cfg: the protection; default :class:`SpecDefConfig()`.
        private: create the repository as private.
        dry_run: write the folder (``output_dir``) and stop: no token, no network.
        output_dir: where the published folder is kept. Without it, a dry run writes ``./<repo name>`` and a push
            uses a temporary folder that is removed afterwards. Must not exist unless ``overwrite``.
        measure: also run a quick resistance measurement (evaluation harness) and put it in the card; a
            :class:`MeasureConfig` sets its budget.
        redteam: the ``results.json`` of ``hf-specdef redteam`` on this model and configuration (path or dict): its
            worst case and per-attack slowdowns go into the card instead of the quick measurement (checked first:
            results of another protection are refused).
        token: Hub token; default ``HF_TOKEN`` or the ``huggingface_hub`` login. Never printed, logged or written.
        commit_message: default names the source, alpha, sites and the verified deviation.
        base_model: the source's Hub id for the card metadata when ``model`` is a local folder.
        overwrite: replace an existing ``output_dir``.
        force: protect even if the source already carries a protection record.
        template: a custom Jinja card template (default: the packaged ``specdef_model_card.md``).
        quantize: quantization formats to measure for the card besides ``cfg.quantization_safe`` (which are always
            measured and must keep the model intact); transformers models only.

    Raises:
        PublishError: verification failed, the claimed sites are not deformed, no token, or the push failed.
            Nothing is pushed and no partial ``output_dir`` is left.
    """
    cfg = cfg or SpecDefConfig()
    if repo_id:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise ValueError(f"repo_id={repo_id!r} is not a valid Hub repository id (owner/name): {e}") from None
    if not dry_run:
        if not repo_id:
            raise ValueError("repo_id is required to push (owner/name); use dry_run=True to only write the folder")
        if _hub_offline():
            raise PublishError("HF_HUB_OFFLINE is set, so nothing can be pushed; use dry_run=True (--dry-run) to "
                               "write the folder only, or unset HF_HUB_OFFLINE")
        token = resolve_token(token)
        if not token:
            raise PublishError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (the token is "
                               "never printed or written)")
    src, hub_id = resolve_source(model, token=token if not dry_run else None, revision=revision)
    info = describe_source(src, hub_id, base_model)
    repo_id = repo_id or f"{info.base_model.rsplit('/', 1)[-1]}-specdef"
    out = Path(output_dir).expanduser().resolve() if output_dir else None
    if out is None and dry_run:
        out = Path.cwd() / repo_id.rsplit("/", 1)[-1]
    if out is not None and out.exists() and not overwrite:
        raise PublishError(f"output_dir {out} already exists; choose another folder or pass overwrite=True (--overwrite)")
    if out is not None and (out == src or src in out.parents or out in src.parents):
        raise ValueError(f"output_dir {out} overlaps the source {src}; the source is never modified, choose another folder")
    red_team = redteam_measure(redteam, cfg) if redteam is not None else None  # checked before any work
    if measure and not (info.kind == "transformers" and info.class_name.endswith(_CAUSAL_LM)):
        raise PublishError(f"measure=True supports causal language models (...ForCausalLM) in this build, not "
                           f"{info.class_name}; for diffusion models run scripts/convergence_bench.py instead")

    with _workdir(out) as work:
        staged = work / "model"
        report = protect_folder(src, staged, cfg, force=force, progress=progress, device=device)
        pipeline_check = verify_pipeline(src, staged, info, cfg) if info.is_pipeline else None
        checks = verify_folder(src, staged, info, cfg, report, composed=pipeline_check)
        _refuse_if_bad(checks + ([pipeline_check] if pipeline_check else []))
        downcast = release_dtypes.measure_downcast(src, staged, cfg.tolerance)  # what a downcasting user sees
        release_dtypes.annotate_records(staged, downcast)
        safety = release_dtypes.folder_safety(staged) or getattr(report, "precision", None)
        quantized = quantization_checks(src, staged, info, cfg, tuple(dict.fromkeys((*cfg.quantization_safe,
                                                                                       *quantize))))
        _refuse_if_bad_quantized(quantized)
        measured = red_team
        if measure and measured is None:
            mc = measure if isinstance(measure, MeasureConfig) else None
            measured = measure_resistance(src, staged, info, cfg, mc, progress=progress)
        card = render_card(info, repo_id, cfg, checks, staged, pipeline_check=pipeline_check, measure=measured,
                           template=template, release_dtypes=release_dtypes.card_paragraph(safety, downcast),
                           quantization=quantized)
        card.save(staged / "README.md")
        result = PublishResult(repo_id, str(out) if out else None, dry_run, False, info.base_model, info.library_name,
                               cfg.to_dict(), checks, pipeline_check, measured, downcast)
        result.notes = [f"skipped {x}" for x in getattr(report, "skipped", [])] + list(getattr(report, "notes", []))
        result.commit_message = commit_message or _default_commit_message(info, cfg, result.max_relative_deviation)
        folder = staged
        if out is not None:
            _move_into_place(staged, out, work, overwrite)
            folder = out
        if not dry_run:
            logger.info("hf-specdef publish: pushing %s to %s", folder, repo_id)
            result.url = push_folder(folder, repo_id, private=private, token=token, commit_message=result.commit_message)
            result.pushed = True
    return result
