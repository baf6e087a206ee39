"""Checks of the written folder as a whole: its headers and index, and the forward checks of small models
(loaded with stock transformers/diffusers, or a pipeline's text encoder and denoiser together, on a probe batch)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hf_specdef.config import SpecDefConfig
from hf_specdef.protection.in_memory import VerificationError
from hf_specdef.storage.checkpoint import Checkpoint, open_checkpoint

# Checkpoints up to this size also get a forward-pass check with stock transformers/diffusers.
FORWARD_CHECK_MAX_BYTES = 64 << 20


def check_written_index(ckpt: Checkpoint, out_root: Path) -> None:
    """The written folder opens as a checkpoint (headers, index) with the source's tensor names and shapes."""
    with open_checkpoint(out_root) as out:
        if set(out.infos) != set(ckpt.infos):
            diff = sorted(set(out.infos) ^ set(ckpt.infos))
            raise VerificationError(f"written checkpoint {out_root} differs from the source in tensors {diff[:3]}")
        for n, info in out.infos.items():
            if info.shape != ckpt.infos[n].shape:
                raise VerificationError(f"{info.file}: tensor {n!r} has shape {info.shape}, source {ckpt.infos[n].shape}")


def forward_check(src_root: Path, out_root: Path, config: Mapping[str, Any], tolerance: float) -> tuple[float | None, str]:
    """Load both checkpoints with the stock class (float32) and compare outputs on a probe batch."""
    from hf_specdef.analysis.stock_loading import load_stock, stock_class
    from hf_specdef.analysis.verification import verify

    cls = stock_class(config)
    if cls is None:
        return None, "forward check skipped: model class not found in transformers/diffusers"
    ref, prot = load_stock(src_root), load_stock(out_root)
    try:
        res = verify(ref, prot, tolerance=tolerance)
    except ValueError as e:  # no probe for this model kind
        return None, f"forward check skipped: {e}"
    if not math.isfinite(res.max_relative_deviation):
        raise VerificationError(
            "the protected checkpoint's outputs differ from the source's by inf/NaN on the probe inputs: a weight is "
            "too large to deform in its dtype, or the source checkpoint is broken (look for values far above 1e4 in "
            "its weights); nothing was written.")
    if not res.ok:
        raise VerificationError(
            f"the protected checkpoint's outputs deviate by {res.max_relative_deviation:.3g} (max relative) from the "
            f"source's > tolerance={tolerance:g}; nothing was written.")
    dev = res.max_relative_deviation
    return dev, f"forward check ({cls.__name__}, float32): max relative deviation {dev:.2e}"


def forward_check_pipeline(src: Path, tmp: Path, component: str, cfg: SpecDefConfig) -> tuple[float, str]:
    """Text encoder then denoiser, from the source and from the written folders (float32), on one probe batch."""
    from hf_specdef.analysis import probe
    from hf_specdef.analysis.stock_loading import composed_pipeline_output

    ref, got = (composed_pipeline_output(root, component, cfg.seed)[0] for root in (src, tmp))
    dev = probe.max_relative_deviation(ref, got)
    if not dev <= cfg.tolerance:
        raise VerificationError(
            f"the protected pipeline's outputs (text encoder -> {component}) deviate by {dev:.3g} (max relative) from the "
            f"source's > tolerance={cfg.tolerance:g}; nothing was written.")
    return dev, f"forward check (text encoder -> {component}, float32): max relative deviation {dev:.2e}"
