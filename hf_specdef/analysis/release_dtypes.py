"""What a protected release keeps in each dtype a downstream user may load it in (see docs/precision.md), for ``publish``.

Without hf-specdef nothing can stop a downcast (vLLM's ``--dtype auto`` serves a float32 checkpoint in
float16), so the publisher measures at publish time -- the stock model loaded in bfloat16 and in float16, each
against the original loaded the same way -- writes the figures into the protection records (the downcast
guard quotes them) and into the first paragraph of the model card.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hf_specdef.deformation.precision import format_deviation, release_safety
from hf_specdef.deformation.record import get_record, record_key

logger = logging.getLogger("hf_specdef")

DOWNCAST_DTYPES: tuple[str, ...] = ("bfloat16", "float16")


def measure_downcast(original: Path, protected: Path, tolerance: float) -> dict[str, float]:
    """Max relative output deviation of the protected folder from the original, both loaded with stock classes in
    bfloat16 and in float16 (pipelines: text encoder -> denoiser). Non-finite outputs give ``inf``."""
    from hf_specdef.analysis.stock_loading import compare_folders

    out = {}
    for name in DOWNCAST_DTYPES:
        try:
            result, _ = compare_folders(original, protected, tolerance, getattr(torch, name))
            out[name] = result.max_relative_deviation
        except (RuntimeError, ValueError) as e:  # a kernel missing for this dtype on this device: say so, do not guess
            logger.warning("hf-specdef publish: cannot measure the release in %s (%s)", name, e)
            continue
        logger.info("hf-specdef publish: protected release loaded in %s deviates %s from the original in %s", name,
                    format_deviation(out[name]), name)
    return out


def _json_value(x: float) -> float | str:
    return x if math.isfinite(x) else "non-finite"


def annotate_records(folder: Path, measured: Mapping[str, float]) -> list[Path]:
    """Add ``precision.measured`` (dtype -> deviation) to every protection record under ``folder``; the written
    config files."""
    written = []
    for conf_path in sorted(folder.rglob("config.json")):
        conf = json.loads(conf_path.read_text())
        rec = get_record(conf)
        if not rec:
            continue
        rec.setdefault("precision", release_safety(rec) or {})["measured"] = {k: _json_value(v) for k, v in measured.items()}
        conf[record_key(conf)] = rec
        conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        written.append(conf_path)
    return written


def folder_safety(folder: Path) -> dict[str, Any] | None:
    """The precision entries of the records under ``folder`` merged: exact only in the dtypes all components are
    exact in; float32-only when any component is."""
    infos = [info for p in sorted(folder.rglob("config.json"))
             if (info := release_safety(get_record(json.loads(p.read_text())))) is not None]
    if not infos:
        return None
    exact = [d for d in infos[0].get("exact_dtypes", []) if all(d in i.get("exact_dtypes", []) for i in infos)]
    first = infos[0]
    return {"requested": first.get("requested"), "used": ", ".join(sorted({str(i.get("used")) for i in infos})),
            "exact_dtypes": exact, "float32_only": any(i.get("float32_only") for i in infos),
            "storage_dtype": first.get("storage_dtype"), "factors": first.get("factors")}


def card_paragraph(safety: Mapping[str, Any] | None, measured: Mapping[str, float]) -> str:
    """The model card's release-dtype statement (the end of its first paragraph)."""
    if not safety:
        return ""
    figures = {d: "0 (bit-exact)" if measured[d] == 0 else format_deviation(measured[d])
               for d in DOWNCAST_DTYPES if d in measured}
    if safety.get("float32_only"):
        broken = [f"{d}: max relative output deviation **{figures[d]}**" for d in DOWNCAST_DTYPES if d in figures]
        return (
            "**Load it in float32.** This protection is exact only in float32: loaded in a 16-bit dtype its outputs "
            f"break ({'; '.join(broken) or 'not measured'}; measured at publish time against the original loaded the "
            "same way). Inference stacks that downcast float32 checkpoints by default break it silently (vLLM's "
            "`--dtype auto` serves a float32 checkpoint in float16); with `hf-specdef` imported, transformers and "
            "diffusers refuse such loads. Protections that are bit-exact in bfloat16 exist (hf-specdef "
            "`precision=\"auto\"` on a bfloat16 checkpoint: axis mode with a power-of-two alpha)."
        )
    exact_list = list(safety.get("exact_dtypes") or [])
    exact = ", ".join(exact_list)
    kept = [f"{d}: {figures[d]}" for d in DOWNCAST_DTYPES if d in figures and d in exact_list]
    broken = [d for d in DOWNCAST_DTYPES if d not in exact_list]
    text = (f"This protection is exact in {exact} (precision requested `{safety.get('requested')}`, used "
            f"`{safety.get('used')}`)" + (f"; measured at publish time against the original loaded the same way, max "
                                          f"relative output deviation {'; '.join(kept)}" if kept else "") + ".")
    if broken:
        figs = "; ".join(f"{d}: **{figures[d]}**" if d in figures else f"{d}: not measured" for d in broken)
        text += (f" **Do not load it in {' or '.join(broken)}** ({figs}, measured the same way); with `hf-specdef` "
                 "imported, transformers and diffusers refuse such loads.")
    return text
