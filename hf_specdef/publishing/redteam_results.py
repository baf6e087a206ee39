"""The results of ``hf-specdef redteam`` as a model card reads them: the headline, the ratio format and the caveat
for protections that only rescale weights (the schema of ``results.json``; written by :mod:`hf_specdef.research.redteam`)."""

from __future__ import annotations

from typing import Any


def fmt_ratio(m: dict[str, Any] | None) -> str:
    if not m:
        return "n/a"
    return f"{'>= ' if m.get('lower_bound') else ''}{m['ratio']:.2f}x"


def headline(results: dict[str, Any]) -> str:
    """One sentence a publisher reads first."""
    s = results["summary"]
    if "worst_case_slowdown" not in s:
        return "No uninformed attack could be measured."
    ge = ">= " if s.get("worst_case_lower_bound") else ""
    text = (f"Worst case over {s['uninformed_attacks']} uninformed attacks ({s['variant']} protection): "
            f"{ge}{s['worst_case_slowdown']:.2f}x slower ({s['worst_case_attack']}), median over {s['seeds']} seed(s).")
    if "undo_slowdown" in s:
        text += f" Informed attacker: {s['undo_slowdown']:.2f}x ({s['undo_attack']}, the largest over informed attacks)."
    return text + rescaling_caveat(results["variants"].get(s["variant"], {}))


SCALE_INVARIANT_ATTACK = "full-madam"


def rescaling_caveat(variant: dict[str, Any]) -> str:
    """What a run without the scale-invariant attack must say about a protection that only rescales weights.

    Bit-identical outputs in float32 *and* bfloat16 are what axis mode with a power-of-two alpha gives (each weight
    multiplied by a power of two); multiplicative Adam takes the same step on a rescaled weight, so it is not slowed.
    """
    exact = variant.get("deviation_float32") == 0 and variant.get("deviation_bfloat16") == 0
    if not exact or SCALE_INVARIANT_ATTACK in (variant.get("attacks") or {}):
        return ""
    return (f" Caveat: this protection's outputs are bit-identical to the original's in float32 and bfloat16, as with "
            f"every protection that only rescales weights; {SCALE_INVARIANT_ATTACK} (multiplicative Adam, not in this "
            "run) fine-tunes such a protection exactly as fast as the original (1.00x).")
