"""Blind detection of SpecDef deformations from the weights alone (attacker side; see docs/design.md).

Pure torch plus the site registry: the attacker knows the architecture (hence the candidate
pairs, per kv-head / rotary pair / channel block, from :func:`hf_specdef.sites.pairs_for`) but not
the protection record. A deformed pair ``P' = M P``, ``C' = C M^-1`` with
``M = I + U diag(alpha - 1) U^T`` leaves a two-sided signature along ``U``: the producer is
inflated (outlier singular values, or outlier rows in axis mode) *and* the consumer is shrunk by
the same factor. Each candidate direction gets the *balance score*

    score = sqrt( (|P'^T u| / typical_P) / (|C'^T u| / typical_C) )

(``typical`` = root-mean-square over the other directions), which is ~1 for an undeformed model
and ~alpha for a deformed direction; the score is also the factor estimate (it balances the
producer's inflation against the consumer's shrinkage). Directions with a score above
``threshold`` are reported.

Pairs can share tensors (a ``q_proj`` is a qk producer and a norm consumer), so detection peels
the deformations off a working copy in the reverse of the order protection applies them
(:data:`hf_specdef.sites.registry.SITE_ORDER` per layer): each estimate is made on weights from
which the later-applied deformations were already removed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation import engine
from hf_specdef.deformation.quantization_safe import INVERTED_SITES
from hf_specdef.errors import SpecDefError
from hf_specdef.sites import Pair, pairs_for
from hf_specdef.tensor_math import linalg
from hf_specdef.tensor_math.linalg import Deformation

logger = logging.getLogger("hf_specdef")

DEFAULT_THRESHOLD = 10.0
"""Balance score above which a direction counts as deformed (unprotected weights score ~1-3)."""


class DetectionError(SpecDefError, ValueError):
    """A bad argument to :func:`detect_deformations` (e.g. a threshold that is not a finite number > 1)."""

    docs_page = "docs/integrations.md"


@dataclass
class SiteEstimate:
    """One detected (or recipe-given) deformation of a pair."""

    pair: Pair
    deformation: Deformation
    mode: str  # "spectral" | "axis"
    scores: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.pair.key, "site": self.pair.site, "layer": self.pair.layer, "mode": self.mode,
            "k": self.deformation.k, "factor": self.deformation.factor, "scores": [round(s, 3) for s in self.scores],
            "hot": list(self.pair.hot_modules), "cold": list(self.pair.cold_modules),
        }


@dataclass
class DetectionReport:
    """What blind detection found: the deformed sites with their estimated factors."""

    sites: list[SiteEstimate]
    pairs_examined: int
    threshold: float

    @property
    def keys(self) -> list[str]:
        return [s.pair.key for s in self.sites]

    def to_dict(self) -> dict[str, Any]:
        return {"pairs_examined": self.pairs_examined, "threshold": self.threshold,
                "sites": [s.to_dict() for s in self.sites]}

    def __str__(self) -> str:
        lines = [f"SpecUndo blind detection: {len(self.sites)} deformed site(s) among {self.pairs_examined} candidate "
                 f"pairs (threshold {self.threshold:g})"]
        for s in self.sites:
            lines.append(f"  {s.pair.key:<48} {s.mode:<8} k={s.deformation.k:<2} factor~{s.deformation.factor:10.4g}"
                         f"  hot={','.join(m.rsplit('.', 1)[-1] for m in s.pair.hot_modules)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Per-pair estimation
# --------------------------------------------------------------------------------------------

def _rows(pair_blocks: Sequence[Any], tensors: Mapping[str, torch.Tensor], weights_only: bool) -> torch.Tensor:
    blocks = [b for b in pair_blocks if tensors[b.name].dim() >= 2] if weights_only else list(pair_blocks)
    blocks = blocks or list(pair_blocks)
    dt = linalg.compute_dtype(tensors[blocks[0].name].device)
    parts = [linalg.as_rows(tensors[b.name].narrow(b.axis, b.start, b.stop - b.start), b.axis).to(dt) + b.offset
             for b in blocks]
    return torch.cat([p.to(parts[0].device) for p in parts], dim=1)


def consumer_block(pair: Pair, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The ``d x n`` matrix of the pair's consumers, rows along the pair axis (weights, not biases)."""
    return _rows(pair.consumers, tensors, weights_only=True)


def _rms_rest(total_sq: float, taken_sq: float, count: int) -> float:
    return math.sqrt(max(total_sq - taken_sq, 0.0) / max(count, 1))


def _count_leading(scores: Sequence[float], threshold: float) -> int:
    k = 0
    while k < len(scores) and scores[k] > threshold:
        k += 1
    return k


def _geo_mean(xs: Sequence[float]) -> float:
    return float(math.exp(sum(math.log(x) for x in xs) / len(xs)))


def snap_power_of_two(factor: float, tolerance: float = 0.3) -> float:
    """Axis mode is bit-exact only with a power-of-two alpha, so publishers use one: snap an estimate
    within ``tolerance`` (in log2 units, about ±23%) of a power of two to it; otherwise keep it."""
    p = round(math.log2(factor))
    return float(2.0**p) if abs(math.log2(factor) - p) < tolerance else factor


def estimate_axis(pair: Pair, tensors: Mapping[str, torch.Tensor], threshold: float, max_k: int) -> SiteEstimate | None:
    """Outlier channels (rows of the producer / matching rows of the consumer; rotary pairs together).

    Each channel's balance ``l = log sqrt(|P'_i| / |C'_i|)`` moves by ``log factor`` when it is deformed. The channels
    are split at the widest gap of their sorted ``l`` when that gap exceeds ``log threshold``; the smaller side is
    the deformed one (on a tie: the inflated side, or the deflated one for the sites the quantization-safe
    deformation inverts), and the factor is the distance of the two sides' medians, snapped to a power of two.
    Deflated channels (factor < 1: the quantization-safe ``norm`` site) and whole blocks of channels (32 or 128 at a
    time) are found as well; ``max_k`` does not cap an axis estimate.
    """
    p = engine.producer_block(pair, tensors).to(linalg.compute_dtype(tensors[pair.producers[0].name].device))
    c = consumer_block(pair, tensors).to(p.device)
    rp, rc = p.pow(2).sum(1), c.pow(2).sum(1)
    d = rp.numel()
    if pair.rotary:
        if d % 2:
            return None
        rp, rc = linalg.pair_scores(rp, pair.rotary), linalg.pair_scores(rc, pair.rotary)
    live = torch.nonzero((rp > 0) & (rc > 0)).flatten()
    if live.numel() < 2:
        return None
    bal = 0.25 * (rp[live].log() - rc[live].log())  # log sqrt(|p| / |c|)
    order = torch.argsort(bal)
    gaps = bal[order][1:] - bal[order][:-1]
    cut = int(torch.argmax(gaps))
    if float(gaps[cut]) <= math.log(threshold):
        return None
    low, high = order[: cut + 1], order[cut + 1:]
    deflated = low.numel() < high.numel() or (low.numel() == high.numel() and pair.site in INVERTED_SITES)
    bad, base = (low, high) if deflated else (high, low)
    shift = float(bal[bad].median() - bal[base].median())
    scores = sorted((math.exp(abs(float(bal[i] - bal[base].median()))) for i in bad), reverse=True)
    idx = torch.sort(live[bad]).values
    if pair.rotary:
        idx = linalg.pair_indices(idx, d, pair.rotary)
    m = Deformation(size=d, factor=snap_power_of_two(math.exp(shift)), indices=idx.to(torch.long))
    return SiteEstimate(pair, m, "axis", scores)


def estimate_spectral(pair: Pair, tensors: Mapping[str, torch.Tensor], threshold: float, max_k: int,
                      snap: float = 0.999) -> SiteEstimate | None:
    """Outlier singular values of the producer with a matching shrink of the consumer along ``U_k``."""
    p = engine.producer_block(pair, tensors).to(linalg.compute_dtype(tensors[pair.producers[0].name].device))
    c = consumer_block(pair, tensors).to(p.device)
    d = p.shape[0]
    kk = min(max_k, min(p.shape) - 1)
    if kk < 1:
        return None
    u, s = linalg.top_left_singular(p, kk)
    cu = (u.T @ c).norm(dim=1)  # |C'^T u_j|
    p_tot, c_tot = float(p.pow(2).sum()), float(c.pow(2).sum())
    scores = []
    for j in range(kk):
        typ_p = _rms_rest(p_tot, float(s[: j + 1].pow(2).sum()), d - j - 1)
        typ_c = _rms_rest(c_tot, float(cu[: j + 1].pow(2).sum()), d - j - 1)
        ratio = (float(s[j]) / max(typ_p, 1e-300)) / max(float(cu[j]) / max(typ_c, 1e-300), 1e-300)
        scores.append(math.sqrt(max(ratio, 0.0)))
    k = _count_leading(scores, threshold)
    if k == 0:
        return None
    basis = u[:, :k]
    axis = estimate_axis(pair, tensors, threshold, max_k)
    if axis is not None:  # an axis-mode deformation of a spectral-capable pair: the top directions lie on its channels
        inside = basis.index_select(0, axis.deformation.indices.to(basis.device)).pow(2).sum(dim=0)
        if bool((inside > snap**2).all()):
            return axis
    m = Deformation(size=d, factor=_geo_mean(scores[:k]), basis=basis)
    return SiteEstimate(pair, m, "spectral", scores[:k])


def estimate_pair(pair: Pair, tensors: Mapping[str, torch.Tensor], threshold: float = DEFAULT_THRESHOLD,
                  max_k: int = 4) -> SiteEstimate | None:
    """Estimate the deformation of one pair from its current weights (``None`` if it looks undeformed)."""
    if pair.axis_only:
        return estimate_axis(pair, tensors, threshold, max_k)
    return estimate_spectral(pair, tensors, threshold, max_k)


# --------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------

class _Peel(MutableMapping[str, torch.Tensor]):
    """Copy-on-first-use view of a tensor mapping; copies are dropped once no remaining pair needs them."""

    def __init__(self, source: Mapping[str, torch.Tensor]) -> None:
        self.source, self.work = source, {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.work:
            self.work[name] = self.source[name].detach().clone()
        return self.work[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.work[name] = value

    def __delitem__(self, name: str) -> None:
        self.work.pop(name, None)

    def __iter__(self):
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``name -> parameter data`` of a module's base weights, named as in the bare model.

    Adapter parameters are left out and PEFT's ``.base_layer`` segment is dropped, so a model that
    already carries PEFT adapters is seen as its base model.
    """
    out = {}
    for n, p in model.named_parameters():
        if ".base_layer." in n:
            n = n.replace(".base_layer.", ".")
        elif any(f".{tag}" in n for tag in ("lora_", "specundo_")):
            continue
        out[n] = p.data
    return out


def candidate_pairs(model: torch.nn.Module, site_map: Sequence[Mapping[str, Any]] | None = None) -> list[Pair]:
    """Every pair the site registry (or an explicit ``site_map``) knows for ``model``, in protection order."""
    tensors = model_tensors(model)
    cfg = SpecDefConfig(site_map=site_map) if site_map is not None else SpecDefConfig()
    return pairs_for(getattr(model, "config", {}), {n: tuple(t.shape) for n, t in tensors.items()}, cfg,
                     type(model).__name__)


def detect_deformations(
    model: torch.nn.Module | None = None,
    *,
    tensors: Mapping[str, torch.Tensor] | None = None,
    pairs: Sequence[Pair] | None = None,
    site_map: Sequence[Mapping[str, Any]] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    max_k: int = 4,
    progress: bool = True,
) -> DetectionReport:
    """Blindly find the deformed sites of a model (or of a ``name -> tensor`` mapping with ``pairs``).

    The attacker's side, with only the weights: outlier singular values (or row/column norms) of each pair's
    blocks give the deformed directions and an estimate of each factor. The model is not modified: estimates are
    made on copies.

    Args:
        model: the (protected) model; or None with ``tensors`` and ``pairs``.
        tensors: ``name -> weight`` instead of a model.
        pairs: the pairs to examine (default: the site registry's pairs of ``model``).
        site_map: explicit pairs for an architecture the registry does not know.
        threshold: outlier ratio above which a block counts as deformed (finite, > 1).
        max_k: the most directions per block considered.
        progress: show a progress bar.

    Returns:
        A :class:`~hf_specdef.undo.detection.DetectionReport` whose ``sites`` are in *protection order* (apply
        their inverses last-first to undo).

    Raises:
        ValueError: a threshold that is not a finite number > 1.

    Example:
        ```python
        from hf_specdef import detect_deformations

        report = detect_deformations(protected_model)
        print(len(report.sites), "deformed sites found from the weights alone")
        ```
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 1):
        raise DetectionError(f"threshold={threshold!r} must be a finite number > 1 (a balance score of 1 means "
                             "undeformed; inf would detect nothing); try 10.")
    if tensors is None:
        if model is None:
            raise ValueError("pass a model, or tensors=... together with pairs=...")
        tensors = model_tensors(model)
    if pairs is None:
        if model is None:
            raise ValueError("pairs=... is required when detecting on a plain tensor mapping")
        pairs = candidate_pairs(model, site_map)
    last_use: dict[str, int] = {}
    for i, p in enumerate(pairs):
        for n in p.names():
            last_use.setdefault(n, i)  # lowest index = the last pair to need it when peeling backwards
    peel = _Peel(tensors)
    found: list[SiteEstimate] = []
    for i in tqdm(range(len(pairs) - 1, -1, -1), desc="hf-specdef detect", disable=not progress, leave=False):
        pair = pairs[i]
        est = estimate_pair(pair, peel, threshold, max_k)
        if est is not None:
            engine.apply_pair(pair, peel, est.deformation, inverse=True)
            found.append(est)
        for n in pair.names():
            if last_use.get(n) == i:
                del peel[n]
    found.reverse()
    report = DetectionReport(found, len(pairs), threshold)
    logger.info("hf-specdef blind detection: %d deformed sites among %d pairs", len(found), len(pairs))
    return report
