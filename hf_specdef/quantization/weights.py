"""Fake-quantize every linear weight of a model (torch only: ``Linear`` and GPT-2-style ``Conv1D`` by class name)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from hf_specdef.quantization.formats import QuantFormat, fake_quantize, get_format

logger = logging.getLogger("hf_specdef")


def linear_weights(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, int]]:
    """``name -> (weight, input axis)`` of every ``Linear`` (input axis 1) and ``Conv1D`` (weight stored (in, out):
    input axis 0) module; a weight shared by several modules (tied embeddings) appears once."""
    out: dict[str, tuple[torch.nn.Parameter, int]] = {}
    seen: set[int] = set()
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.nn.Parameter) or w.dim() != 2 or id(w) in seen:
            continue
        if isinstance(mod, torch.nn.Linear):
            axis = 1
        elif type(mod).__name__ == "Conv1D":
            axis = 0
        else:
            continue
        seen.add(id(w))
        out[f"{name}.weight" if name else "weight"] = (w, axis)
    return out


@dataclass
class QuantizedSwap:
    """What :func:`quantized_weights` did: the weights it quantized and those it left in float (with why)."""

    format: QuantFormat
    quantized: list[str] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)


@contextmanager
def quantized_weights(model: torch.nn.Module, fmt: str | QuantFormat) -> Iterator[QuantizedSwap]:
    """Inside the block every linear weight of ``model`` holds its ``fmt`` round trip (cast to the weight's dtype);
    the original tensors are put back on exit, bit for bit. Weights whose rows do not fit ``fmt`` stay in float
    (GGUF converters store such tensors in a fallback type) and are listed in ``kept_float``."""
    fmt = get_format(fmt)
    swap = QuantizedSwap(fmt)
    originals: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, (w, axis) in linear_weights(model).items():
                if not fmt.supports(w.shape[axis]):
                    swap.kept_float[name] = f"row width {w.shape[axis]} is not a multiple of {fmt.block}"
                    continue
                originals.append((w, w.data))
                w.data = fake_quantize(w.data, fmt, axis).to(w.dtype)
                swap.quantized.append(name)
        if swap.kept_float:
            logger.info("hf-specdef %s: %d weights kept in float: %s", fmt.name, len(swap.kept_float),
                        sorted(swap.kept_float)[:3])
        yield swap
    finally:
        for w, data in originals:
            w.data = data
