"""The attacker's knowledge of a deformation, and the "merge" undo that rewrites weights in place (see docs/design.md).

``knowledge="recipe"``: the exact protection record (``record="full"``: pairs + directions), read
from the model config, a record dict, a JSON file (a record, or a ``config.json`` carrying one) or
a model directory. ``knowledge="blind"``: estimated from the weights by
:func:`hf_specdef.undo.detection.detect_deformations`.

:func:`undo_in_place` applies ``M^-1`` to every producer and ``M`` to every consumer (last pair
first), so the model keeps its function and gets its original spectra back; it then trains at
full speed with any method, at no parameter cost.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hf_specdef.deformation import engine
from hf_specdef.deformation.record import get_record
from hf_specdef.sites import Pair
from hf_specdef.tensor_math.linalg import Deformation
from hf_specdef.undo.detection import DEFAULT_THRESHOLD, DetectionReport, SiteEstimate, detect_deformations, model_tensors

logger = logging.getLogger("hf_specdef")

KNOWLEDGE = ("recipe", "blind")


def load_recipe(recipe: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A protection record from a dict, a JSON file (record or config.json) or a model directory."""
    if isinstance(recipe, Mapping):
        rec = dict(recipe)
    else:
        path = os.fspath(recipe)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"recipe {recipe!r} is neither a record dict nor an existing JSON file / model directory.")
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    inner = get_record(rec)  # a config.json: its record
    if isinstance(inner, Mapping):
        rec = dict(inner)
    return rec


def recipe_sites(record: Mapping[str, Any] | None) -> list[SiteEstimate]:
    """The exact deformations of a ``record="full"`` protection record, in protection order."""
    if not record:
        raise ValueError("knowledge='recipe' needs a protection record, but the model has none (no 'specdef' key in its "
                         "config; '_specdef' in diffusers); pass recipe=<record dict | JSON path> or use knowledge='blind'.")
    if "pairs" not in record:
        raise ValueError(f"the protection record has detail {record.get('config', {}).get('record', 'minimal')!r}: "
                         "it names the sites but not the directions, so it cannot rebuild M exactly. Use a record "
                         "written with SpecDefConfig(record='full'), or knowledge='blind'.")
    sites = []
    for entry in record["pairs"]:
        pair = Pair.from_dict(entry["pair"])
        m = Deformation.from_record(pair.size, entry["deformation"])
        sites.append(SiteEstimate(pair, m, entry.get("mode", "axis" if m.is_axis else "spectral"), [m.factor]))
    return sites


def resolve_sites(
    model: torch.nn.Module,
    knowledge: str = "blind",
    recipe: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    max_k: int = 4,
    site_map: Sequence[Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> tuple[list[SiteEstimate], DetectionReport | None]:
    """The deformations the attacker acts on, in protection order, and the detection report (blind only)."""
    if knowledge not in KNOWLEDGE:
        raise ValueError(f"knowledge={knowledge!r} is not one of {KNOWLEDGE}.")
    if knowledge == "recipe":
        record = load_recipe(recipe) if recipe is not None else get_record(model)
        return recipe_sites(record), None
    report = detect_deformations(model, site_map=site_map, threshold=threshold, max_k=max_k, progress=progress)
    return report.sites, report


@dataclass
class UndoResult:
    """What :func:`undo_in_place` rewrote."""

    sites: list[SiteEstimate]
    report: DetectionReport | None

    @property
    def num_sites(self) -> int:
        return len(self.sites)


def undo_in_place(
    model: torch.nn.Module,
    knowledge: str = "blind",
    recipe: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    max_k: int = 4,
    site_map: Sequence[Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> UndoResult:
    """Rewrite ``model``'s weights back to the undeformed geometry, in place (``undo="merge"``).

    The function is kept (up to rounding); the deformed spectra are restored (exactly with a recipe,
    up to the factor estimate when blind). No parameters are added.

    Args:
        model: the protected model (modified in place).
        knowledge: ``"blind"`` (estimate the deformation from the weights) or ``"recipe"`` (use the protection
            record: in the model's config, or ``recipe``).
        recipe: a protection record (dict, or the path of a ``config.json`` holding one) for ``"recipe"``.
        threshold: outlier ratio of blind detection.
        max_k: the most directions per block blind detection considers.
        site_map: explicit pairs for an architecture the registry does not know.
        progress: show a progress bar.

    Returns:
        An ``UndoResult`` naming the sites undone.

    Raises:
        ValueError: an unknown ``knowledge``, or ``"recipe"`` without a full record.

    Example:
        ```python
        from hf_specdef import undo_in_place

        result = undo_in_place(protected_model, knowledge="blind")
        ```
    """
    sites, report = resolve_sites(model, knowledge, recipe, threshold=threshold, max_k=max_k, site_map=site_map,
                                  progress=progress)
    tensors = model_tensors(model)
    missing = sorted({n for s in sites for n in s.pair.names() if n not in tensors})
    if missing:
        raise ValueError(f"the recipe names tensors the model does not have (e.g. {missing[0]!r}); is it the recipe "
                         "of another model, or is the model wrapped (undo the bare base model)?")
    with torch.no_grad():
        for s in reversed(sites):
            engine.apply_pair(s.pair, tensors, s.deformation, inverse=True)
    logger.info("hf-specdef undo: rewrote %d deformed sites in place (%s)", len(sites), knowledge)
    return UndoResult(sites, report)
