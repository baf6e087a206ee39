"""What the card claims about fine-tuning resistance, and the tags that go with it.

The headline on resistance (:func:`resistance_summary`) is the worst case measured on *this* release: a red team's
over uninformed attacks, or a quick toy measurement's, named as such; without a measurement it says that none was
made. The tags (:func:`card_tags`) follow what was done and measured: ``spectral-deformation`` only when spectral
mode was used, and ``fine-tuning-resistance`` only for a red-team worst case above :data:`RESISTANCE_TAG_MIN`
(1.5×) that also covers the scale-invariant attack wherever the release only rescales weights. Figures measured on
another model (:data:`REFERENCE_MODEL`) are the card's labelled reference, never a claim about this release.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from hf_specdef.publishing.escaping import escape_markdown

TAGS = ("specdef", "hf-specdef")
SPECTRAL_TAG = "spectral-deformation"  # only when spectral mode was used
RESISTANCE_TAG = "fine-tuning-resistance"  # only for a measured red-team worst case above RESISTANCE_TAG_MIN
RESISTANCE_TAG_MIN = 1.5
REFERENCE_MODEL = "SmolLM2-135M-Instruct"  # the model of the labelled reference measurements


def as_number(x: Any) -> float | None:
    """``x`` as a float, or ``None`` when it is not a number (a missing or non-numeric figure)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _ratio(x: Any) -> str:
    return f"{float(x):.2f}×"


def resistance_summary(measure: Mapping[str, Any] | None, rescaling: bool = False) -> dict[str, Any]:
    """The card's headline on fine-tuning resistance, from the ``measure`` block of :func:`publish`.

    The ``fine-tuning-resistance`` tag (``tag``) needs a **red-team** worst case over uninformed attacks above
    :data:`RESISTANCE_TAG_MIN` (1.5×). A quick toy measurement never earns it (one optimizer on a synthetic task is
    not a worst case), and neither does a release that only rescales weights (``rescaling``) unless the red team ran
    the scale-invariant attack (``full-madam``): such a release is fine-tuned by a multiplicative optimizer as fast
    as the original, by construction, whatever the other attacks measured.

    Args:
        measure: :func:`hf_specdef.publishing.resistance.redteam_measure` (a red team: its summary has ``uninformed_attacks``),
            :func:`hf_specdef.publishing.resistance.measure_resistance` (the quick toy measurement: ``slowdown_*`` entries) or
            ``None``.
        rescaling: the release only rescales weights (axis mode only, or exact in bfloat16).

    Returns:
        ``{"kind": "none" | "redteam" | "quick", "worst": float | None, "worst_str", "attack", "lower_bound", "tag",
        "scale_invariant_measured", ...}``; ``worst`` is the measured worst case (the smallest slowdown), ``tag``
        whether it earns the ``fine-tuning-resistance`` tag.

    Example:

    ```python
    >>> resistance_summary(None)["kind"]
    'none'
    ```
    """
    out: dict[str, Any] = {"kind": "none", "worst": None, "worst_str": None, "attack": None, "lower_bound": False,
                           "tag": False, "attacks": None, "seeds": None, "undo_str": None, "undo_attack": None,
                           "scale_invariant_measured": False}
    if not measure:
        return out
    s = measure.get("summary") or {}
    if "uninformed_attacks" in s or "worst_case_slowdown" in s or "variant" in s:
        worst = as_number(s.get("worst_case_slowdown"))
        out |= {"kind": "redteam", "worst": worst, "worst_str": _ratio(worst) if worst is not None else None,
                "attack": escape_markdown(s.get("worst_case_attack")), "lower_bound": bool(s.get("worst_case_lower_bound")),
                "attacks": as_number(s.get("uninformed_attacks")), "seeds": as_number(s.get("seeds"))}
        if out["attacks"] is not None:
            out["attacks"] = int(out["attacks"])
        if out["seeds"] is not None:
            out["seeds"] = int(out["seeds"])
        if as_number(s.get("undo_slowdown")) is not None:
            out |= {"undo_str": _ratio(s["undo_slowdown"]), "undo_attack": escape_markdown(s.get("undo_attack"))}
        from hf_specdef.publishing.redteam_results import SCALE_INVARIANT_ATTACK

        rows = [str(r.get("variant", "")) for r in measure.get("rows") or []]
        out["scale_invariant_measured"] = any(r.split(":")[0].split(" ")[0] == SCALE_INVARIANT_ATTACK for r in rows)
        out["tag"] = (worst is not None and math.isfinite(worst) and worst > RESISTANCE_TAG_MIN
                      and (out["scale_invariant_measured"] or not rescaling))
        return out
    quick = {k[len("slowdown_"):]: v for k, v in s.items() if k.startswith("slowdown_") and as_number(v) is not None}
    if quick:
        which, worst = min(quick.items(), key=lambda kv: float(kv[1]))
        out |= {"kind": "quick", "worst": float(worst), "worst_str": f"{float(worst):.1f}×",
                "attack": "training the deformed parameters" if which == "sites" else "training the other, undeformed "
                          "parameters" if which == "bypass" else escape_markdown(which)}
    return out


def card_tags(modes: Sequence[str], resistance: Mapping[str, Any], library_name: str) -> list[str]:
    """The card's tags: ``specdef``, ``hf-specdef``, ``spectral-deformation`` only when spectral mode was used,
    ``fine-tuning-resistance`` only when :func:`resistance_summary` says so, and the library.

    Args:
        modes: the modes the records say were used.
        resistance: :func:`resistance_summary`.
        library_name: ``"transformers"`` or ``"diffusers"``.

    Returns:
        The tags.

    Example:

    ```python
    >>> card_tags(["axis"], resistance_summary(None, rescaling=True), "transformers")
    ['specdef', 'hf-specdef', 'transformers']
    ```
    """
    return (list(TAGS) + ([SPECTRAL_TAG] if "spectral" in modes else [])
            + ([RESISTANCE_TAG] if resistance.get("tag") else []) + [library_name])
