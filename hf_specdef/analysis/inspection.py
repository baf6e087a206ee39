"""``inspect_model``: per-weight spectral report, deformation flags and coverage.

Two kinds of evidence:

* per weight matrix (any architecture): the top of its spectrum (top-k solver, no full SVD) and the
  largest gap between consecutive top singular values; row/column norm outliers;
* per site pair (architectures the registry knows): the spectrum of each head/channel block.
  A deformed producer block has ``k`` singular values ~alpha above the rest (a *top gap*); a
  deformed consumer block has ``k`` values ~alpha below (a *bottom gap*); diagonal (axis) sites
  show as row or column norm outliers.

The verdict (:data:`RULE`): a matrix is flagged *deformed* when its *deciding evidence* reaches
``threshold`` (default 20, a finite ratio > 1; a protection at alpha >= 100 gives ratios around alpha). For an
architecture the site registry knows, the deciding evidence is the largest **per-block** statistic of the site
blocks the matrix belongs to (``block_row_high`` / ``block_row_low``: max/median and median/min norm of the
rows or columns a site scales, per head or channel block; ``block_top_gap`` / ``block_bottom_gap``: the largest
ratio of consecutive singular values in the top / bottom half of a head block's spectrum); the matrix-level
numbers are noisy there and only shown. A matrix in no site is not judged. For an unknown architecture it is
the largest **matrix-level** statistic (``top_gap``: largest ratio of consecutive top singular values;
``row_high`` / ``row_low`` / ``col_high`` / ``col_low``: max/median and median/min row / column norms). The
report prints, per matrix, the deciding value and which statistic it is. Coverage is the share of trainable
parameters in flagged matrices, and the share in *hot* matrices (consumers of an inflated activation), the
ones that actually slow fine-tuning.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_specdef.config import INSPECT_THRESHOLD, SpecDefConfig
from hf_specdef.errors import SpecDefError
from hf_specdef.sites import ModelConfigError, NoSitesError, Pair, TensorShapeError, drop_inexact, pairs_for
from hf_specdef.tensor_math import linalg

DEFAULT_THRESHOLD = INSPECT_THRESHOLD
_TOP = 32  # singular values kept per matrix
# row-norm statistics need rows of a few entries: a 1-output gate's columns (Qwen2-MoE shared_expert_gate) are single
# numbers whose median/min ratio over 64+ columns exceeds the threshold in an untouched model
_MIN_ROW = 4
RTOL = 1e-4  # relative accuracy of the reported singular values (linalg.top_singular_values)

BLOCK_CRITERIA = ("block_row_high", "block_row_low", "block_top_gap", "block_bottom_gap")
MATRIX_CRITERIA = ("top_gap", "row_high", "row_low", "col_high", "col_low")
RULE = {
    True: ("deformed = YES when the evidence column (the largest per-block statistic of the site blocks the matrix "
           "belongs to) >= threshold; criterion names it: block_row_high / block_row_low = max/median and "
           "median/min norm of the rows or columns a site scales (per head or channel block), block_top_gap / "
           "block_bottom_gap = largest ratio of consecutive singular values in the top / bottom half of a head "
           "block's spectrum. Matrices in no site are not judged (evidence and criterion '-'). The matrix-level top "
           "gap is shown for reference only."),
    False: ("deformed = YES when the evidence column (the largest matrix-level statistic) >= threshold; criterion "
            "names it: top_gap = largest ratio of consecutive top singular values, row_high / row_low / col_high / "
            "col_low = max/median and median/min row / column norms."),
}


class InspectionError(SpecDefError, ValueError):
    """A bad argument to :func:`inspect_model` (e.g. a threshold that is not a finite ratio > 1)."""

    docs_page = "docs/releases.md"


def check_threshold(threshold: Any, name: str = "threshold") -> float:
    """``threshold`` as a float, or :class:`InspectionError`: it must be a finite ratio > 1 (the evidence of an
    undeformed matrix is a ratio >= 1; ``inf`` would flag nothing)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 1):
        raise InspectionError(f"{name}={threshold!r} is not a valid threshold: use a finite ratio > 1 (the valid range "
                              f"is 1 < threshold < inf; default {INSPECT_THRESHOLD:g}, and a protection at alpha >= "
                              "100 gives ratios around alpha).")
    return value


@dataclass
class TensorFinding:
    name: str
    shape: tuple[int, ...]
    numel: int
    top_singular_values: list[float] = field(default_factory=list)
    outlier_ratio: float = 1.0
    evidence: dict[str, float] = field(default_factory=dict)
    role: str = ""  # "hot", "cold" or "" (from the site registry)
    deformed: bool = False
    score: float | None = None  # the deciding evidence (see RULE); None: not judged (a matrix in no site)
    criterion: str = ""  # which statistic of ``evidence`` ``score`` is

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__ | {"shape": list(self.shape)}

    def judge(self, threshold: float, blocks_only: bool) -> None:
        """Set ``score`` / ``criterion`` (the largest statistic the rule uses) and the verdict ``score >= threshold``."""
        keys = BLOCK_CRITERIA if blocks_only else MATRIX_CRITERIA
        used = {k: v for k, v in self.evidence.items() if k in keys}
        if not used:
            self.score, self.criterion, self.deformed = None, "", False
            return
        self.criterion = max(used, key=lambda k: used[k])
        self.score = used[self.criterion]
        self.deformed = self.score >= threshold


@dataclass
class InspectionReport:
    findings: list[TensorFinding]
    threshold: float
    total_params: int
    architecture_known: bool

    @property
    def deformed(self) -> list[str]:
        return [f.name for f in self.findings if f.deformed]

    @property
    def coverage(self) -> float:
        return sum(f.numel for f in self.findings if f.deformed) / max(self.total_params, 1)

    @property
    def hot_coverage(self) -> float:
        return sum(f.numel for f in self.findings if f.deformed and f.role == "hot") / max(self.total_params, 1)

    @property
    def rule(self) -> str:
        """The rule the verdicts follow (per-block evidence for a known architecture, matrix-level otherwise)."""
        return RULE[self.architecture_known]

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold, "total_params": self.total_params,
            "architecture_known": self.architecture_known, "rule": self.rule, "deformed": self.deformed,
            "coverage": self.coverage, "hot_coverage": self.hot_coverage,
            "tensors": [f.to_dict() for f in self.findings],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        lines = [f"{'tensor':<60} {'shape':>14} {'sigma1':>10} {'top gap':>9} {'evidence':>10} {'criterion':<16} "
                 f"{'role':>5}  deformed (evidence >= {self.threshold:g})"]
        for f in self.findings:
            s1 = f.top_singular_values[0] if f.top_singular_values else float("nan")
            score = "-" if f.score is None else f"{f.score:.4g}"
            lines.append(f"{f.name[-60:]:<60} {'x'.join(map(str, f.shape)):>14} {s1:>10.4g} {f.outlier_ratio:>9.3g} "
                         f"{score:>10} {f.criterion or '-':<16} {f.role:>5}  {'YES' if f.deformed else ''}")
        lines.append(f"deformed matrices: {len(self.deformed)}/{len(self.findings)}; coverage {self.coverage:.1%} of "
                     f"{self.total_params:,} parameters; hot (slowed) {self.hot_coverage:.1%}")
        lines.append(f"rule (threshold {self.threshold:g}): {self.rule}")
        if not self.architecture_known:
            lines.append("architecture not in the site registry: per-head evidence unavailable (matrix-level only)")
        return "\n".join(lines)


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a / b.clamp_min(torch.finfo(b.dtype).tiny))


def _norm_evidence(norms: torch.Tensor, label: str) -> dict[str, float]:
    med = norms.median()
    return {f"{label}_high": _ratio(norms.max(), med), f"{label}_low": _ratio(med, norms.min())}


def matrix_evidence(w: torch.Tensor) -> tuple[list[float], dict[str, float]]:
    """Top singular values (to a relative ``RTOL``) and outlier evidence of one weight (2-D, or 3-D fused experts
    stacked along the rows)."""
    a = w.detach().reshape(-1, w.shape[-1]).to(torch.promote_types(w.dtype, torch.float32))  # one copy
    s = linalg.top_singular_values(a, min(_TOP, min(a.shape)), rtol=RTOL)
    ev = {}
    if s.numel() > 1:
        ev["top_gap"] = max(_ratio(s[i], s[i + 1]) for i in range(s.numel() - 1))
    # row and column norms from one pass over the squares, by products with a ones vector: a reduction over
    # the long strided axis is ten times slower
    sq = a.square()
    rows = (sq @ sq.new_ones(sq.shape[1])).sqrt().double()
    cols = (sq.new_ones(sq.shape[0]) @ sq).sqrt().double()
    return s.tolist(), ev | _norm_evidence(rows, "row") | _norm_evidence(cols, "col")


def block_evidence(t: torch.Tensor, b: Any, pair: Pair) -> dict[str, float]:
    """Per-pair evidence of one block: spectral gaps (small blocks) or row-norm outliers."""
    rows = linalg.as_rows(t.detach().narrow(b.axis, b.start, b.stop - b.start), b.axis)
    rows = rows.to(linalg.compute_dtype(rows.device))
    ev = {}
    if rows.shape[1] >= _MIN_ROW:
        norms = rows.norm(dim=1)
        med = norms.median()
        ev["block_row_high"], ev["block_row_low"] = _ratio(norms.max(), med), _ratio(med, norms.min())
    d = rows.shape[0]
    if not pair.axis_only and 1 < d <= 1024 and rows.shape[1] >= d:
        s = linalg.eigvalsh(rows @ rows.T).clamp_min(0).sqrt().flip(0)
        gaps = s[:-1] / s[1:].clamp_min(torch.finfo(s.dtype).tiny)
        half = max(1, d // 2)
        ev["block_top_gap"], ev["block_bottom_gap"] = float(gaps[:half].max()), float(gaps[half:].max() if d > 2 else 1.0)
    return ev


def tensor_evidence(t: torch.Tensor, blocks: Sequence[tuple[Any, Pair]]) -> tuple[list[float], dict[str, float]]:
    """Matrix evidence of one weight and the largest per-block evidence of its ``(block, pair)`` uses."""
    top, ev = matrix_evidence(t)
    for b, p in blocks:
        for k, v in block_evidence(t, b, p).items():
            ev[k] = max(ev.get(k, 1.0), v)
    return top, ev


def _workers(workers: int | None) -> int:
    return max(1, workers if workers is not None else min(torch.get_num_threads(), os.cpu_count() or 1))


def inspect_tensors(
    shapes: Mapping[str, Sequence[int]],
    get: Callable[[str], torch.Tensor],
    config: Any = None,
    class_name: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    trainable: set[str] | None = None,
    groups: Sequence[Sequence[str]] | None = None,
    done: Callable[[str], None] | None = None,
    group_done: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> InspectionReport:
    """Inspect tensors given by name (``get(name)``): the shared core of model and file inspection.

    Each weight is read once and all its evidence computed from it, several weights at a time
    (``workers`` threads; default: torch's thread count). ``groups`` orders the work (e.g. one group
    per shard, in file order): a group is finished before the next starts, then ``group_done(i)`` is
    called; ``done(name)`` is called once a tensor's evidence is computed (e.g. to let its pages go).
    """
    threshold = check_threshold(threshold)
    try:
        pairs = pairs_for(config or {}, shapes, SpecDefConfig(), class_name)
    except NoSitesError:
        pairs = []
    pairs, _ = drop_inexact(pairs, lambda n: get(n).dtype)  # roles only from pairs that can be exact in these dtypes
    experts = {b.name for p in pairs for b in p.producers + p.consumers if len(shapes[b.name]) == 3}  # fused MoE
    weights = [n for n, s in shapes.items() if (len(s) == 2 and n.endswith("weight")) or n in experts]
    findings = {n: TensorFinding(n, tuple(shapes[n]), int(torch.Size(shapes[n]).numel())) for n in weights}
    uses: dict[str, list[tuple[Any, Pair]]] = {n: [] for n in findings}
    for p in pairs:
        for b in p.producers + p.consumers:
            f = findings.get(b.name)
            if f is None:  # 1-D norm producers: the evidence sits with the consumers
                continue
            f.role = "hot" if b in p.consumers or f.role == "hot" else "cold"
            uses[b.name].append((b, p))

    def job(name: str) -> tuple[str, list[float], dict[str, float]]:
        top, ev = tensor_evidence(get(name), uses[name])
        if done is not None:
            done(name)
        return name, top, ev

    order = [[n for n in g if n in findings] for g in groups] if groups is not None else [sorted(findings)]
    missing = set(findings) - {n for g in order for n in g}
    if missing:
        order.append(sorted(missing))
    with ThreadPoolExecutor(max_workers=_workers(workers), thread_name_prefix="hf-specdef-inspect") as pool:
        for i, group in enumerate(order):
            for name, top, ev in pool.map(job, group):
                f = findings[name]
                f.top_singular_values, f.evidence = top, ev
                f.outlier_ratio = ev.get("top_gap", 1.0)
            if group_done is not None:
                group_done(i)
    for f in findings.values():  # known architecture: per-block evidence only (matrix-level norms are noisy)
        f.judge(threshold, blocks_only=bool(pairs))
    names = trainable if trainable is not None else set(shapes)
    total = sum(int(torch.Size(shapes[n]).numel()) for n in names)
    return InspectionReport(sorted(findings.values(), key=lambda f: f.name), threshold, total, bool(pairs))


def inspect_model(model_or_path: Any, threshold: float = DEFAULT_THRESHOLD) -> InspectionReport:
    """Spectral report and coverage of a model (``torch.nn.Module``) or a checkpoint folder (path).

    Per weight matrix: the top of its spectrum, the evidence statistics and a verdict (deformed or not); overall,
    the share of trainable parameters in flagged matrices and in *hot* ones (consumers of an inflated activation,
    the ones that slow fine-tuning). For an architecture the site registry knows the verdict uses per-block
    statistics of the site blocks a matrix belongs to, otherwise matrix-level statistics (``report.rule`` says
    which). Files are memory-mapped and read shard by shard, several tensors at a time, each once, never the whole
    model at once. The model is only read.

    Args:
        model_or_path (`torch.nn.Module`, `str` or `os.PathLike`):
            A model in memory, or a checkpoint folder (or ``.safetensors`` file) on disk.
        threshold (`float`, *optional*, defaults to `20.0`):
            The ratio the deciding evidence of a matrix must reach for it to count as deformed; a finite number
            > 1 (a protection at alpha >= 100 gives ratios around alpha).

    Returns:
        `InspectionReport`: ``findings`` (one per weight matrix: name, shape, top singular values, evidence, score,
        criterion, role, deformed), ``deformed`` (names), ``coverage``, ``hot_coverage``, ``rule``; printable as a
        table, and ``to_json()``.

    Raises:
        InspectionError: ``threshold`` is not a finite number > 1 (also a ``ValueError``).
        CheckpointError: the path does not exist or its files cannot be read.

    Example:

    ```python
    from hf_specdef import inspect_model

    report = inspect_model("me/Llama-3.2-1B-specdef")  # a local protected folder
    print(f"{len(report.deformed)} deformed matrices, hot coverage {report.hot_coverage:.1%}")
    ```
    """
    threshold = check_threshold(threshold)
    if isinstance(model_or_path, torch.nn.Module):
        model = model_or_path
        params = dict(model.named_parameters())
        for device in {p.device for p in params.values()}:
            linalg.load_solvers(device)  # before the worker threads (lazy CUDA solvers are not thread-safe)
        return inspect_tensors(
            {n: tuple(p.shape) for n, p in params.items()}, lambda n: params[n].data,
            getattr(model, "config", None), type(model).__name__, threshold,
            trainable={n for n, p in params.items() if p.requires_grad},
        )
    from hf_specdef.storage.checkpoint import open_checkpoint

    with open_checkpoint(model_or_path) as ckpt:
        lock = threading.Lock()

        def view(name: str) -> torch.Tensor:  # zero-copy, read-only; the lock guards mapping a shard on first use
            with lock:
                return ckpt.view(name)

        try:
            return inspect_tensors(ckpt.shapes(), view, ckpt.config, ckpt.class_name, threshold,
                                   groups=[ckpt.keys_of(f) for f in ckpt.files], done=ckpt.drop_pages,
                                   group_done=lambda i: ckpt.release(ckpt.files[i]))
        except ModelConfigError as e:  # name the checkpoint's files
            raise e.at(str(ckpt.root / "config.json")) from None
        except TensorShapeError as e:
            info = ckpt.infos.get(e.tensor)
            raise (e.at(str(info.file)) if info is not None and not e.source else e) from None
