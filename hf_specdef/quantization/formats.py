"""Weight quantizers for round-trip measurements (pure tensor math; no Hugging Face imports).

A :class:`QuantFormat` quantizes a 2-D weight in groups of ``block`` consecutive entries along its *input*
dimension and dequantizes it back (a "fake quantization"): what a GGUF file or a GPTQ/AWQ-style checkpoint holds,
seen as floats. GGUF formats go through the ``gguf`` package's own ``gguf.quants.quantize`` / ``dequantize``
(bit-exact with ggml's reference quantizers; ``pip install gguf``, the ``quant`` extra). ``int8-g128`` /
``int4-g128`` are group-wise symmetric absmax quantizers (scale = max|x| / qmax per group, stored in float16 as
GPTQ/AWQ checkpoints store their scales), with a shorter trailing group when 128 does not divide the row.

Every format stores a few float16 numbers per group (GGUF block scales ``d``, Q4_1's minimum ``m``, the int scales).
Scaling a whole group by a power of two scales those numbers by the same power of two and leaves the integers
unchanged, *as long as they stay normal float16 numbers* (:func:`stored_values`, :func:`max_exact_factor`): that is
what the quantization-safe deformation (:mod:`hf_specdef.deformation.quantization_safe`) relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hf_specdef.errors import SpecDefError

F16_TINY = 2.0**-14  # smallest normal float16
F16_MAX = 65504.0


class UnsupportedShapeError(SpecDefError, ValueError):
    """A tensor's row width does not fit a format's blocks (GGUF needs a multiple of the block size)."""

    docs_page = "docs/quantization.md"


@dataclass(frozen=True)
class QuantFormat:
    """One quantization format: groups of ``block`` entries along the input dimension.

    ``gguf_type``: the ``gguf.GGMLQuantizationType`` name (GGUF formats), else ``None`` (absmax int formats with
    ``bits``). ``partial``: a shorter trailing group is allowed (GPTQ-style ``g_idx``); GGUF rows must be whole
    blocks.
    """

    name: str
    block: int
    bits: int
    gguf_type: str | None = None
    partial: bool = False

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def boundaries(self, width: int) -> list[int]:
        """Group boundaries ``[0, block, 2 block, ..., width]`` of a row of ``width`` entries."""
        if width % self.block and not self.partial:
            raise UnsupportedShapeError(
                f"a row of {width} entries is not a multiple of the {self.name} block ({self.block}); {self.name} cannot "
                f"quantize this tensor (llama.cpp would store it in a fallback type)."
            )
        return sorted(set(range(0, width, self.block)) | {width})

    def supports(self, width: int) -> bool:
        return self.partial or width % self.block == 0


FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    QuantFormat("q8_0", 32, 8, gguf_type="Q8_0"),
    QuantFormat("q4_0", 32, 4, gguf_type="Q4_0"),
    QuantFormat("q4_1", 32, 4, gguf_type="Q4_1"),
    QuantFormat("q5_0", 32, 5, gguf_type="Q5_0"),
    QuantFormat("int8-g128", 128, 8, partial=True),
    QuantFormat("int4-g128", 128, 4, partial=True),
)}


def get_format(name: str | QuantFormat) -> QuantFormat:
    """The format named ``name`` (one of :data:`FORMATS`)."""
    if isinstance(name, QuantFormat):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown quantization format {name!r}; known formats are {sorted(FORMATS)}.") from None


def _gguf_quants():
    try:
        from gguf import GGMLQuantizationType, quants
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ImportError("GGUF round-trips need the `gguf` package: pip install 'hf-specdef[quantization]' (or gguf).") from e
    return GGMLQuantizationType, quants


def _rows(t: torch.Tensor, in_axis: int) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"quantization works on 2-D weights, got a tensor of shape {tuple(t.shape)}.")
    return (t.T if in_axis % 2 == 0 else t).to(torch.float32)


def fake_quantize(t: torch.Tensor, fmt: str | QuantFormat, in_axis: int = 1) -> torch.Tensor:
    """``t`` quantized in ``fmt`` and dequantized back: float32, same shape and device as ``t``.

    ``in_axis`` is the input dimension (1 for a torch ``Linear`` weight, 0 for GPT-2's ``Conv1D``); groups run
    along it. Raises :class:`UnsupportedShapeError` when the row width does not fit the format.
    """
    fmt = get_format(fmt)
    x = _rows(t, in_axis)
    fmt.boundaries(x.shape[1])  # validates the width
    out = _gguf_round_trip(x, fmt) if fmt.gguf_type else _absmax_round_trip(x, fmt)
    return out.T if in_axis % 2 == 0 else out


def _gguf_round_trip(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    qtype_enum, quants = _gguf_quants()
    qtype = qtype_enum[fmt.gguf_type]
    arr = x.detach().cpu().contiguous().numpy()
    back = quants.dequantize(quants.quantize(arr, qtype), qtype)
    return torch.from_numpy(back.reshape(arr.shape)).to(x.device)


def _groups(x: torch.Tensor, fmt: QuantFormat) -> list[torch.Tensor]:
    """Views of ``x`` (rows x width) as (rows, groups, block) chunks: the whole groups, then the trailing one."""
    width = x.shape[1]
    full = width - width % fmt.block
    parts = [x[:, :full].reshape(x.shape[0], -1, fmt.block)] if full else []
    if full < width:
        parts.append(x[:, full:].unsqueeze(1))
    return parts


def _absmax_round_trip(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    out = []
    for g in _groups(x, fmt):
        scale = (g.abs().amax(dim=2, keepdim=True) / fmt.qmax).to(torch.float16).to(torch.float32)
        q = torch.where(scale > 0, g / scale.clamp_min(F16_TINY / 1024), 0).round().clamp(-fmt.qmax - 1, fmt.qmax)
        out.append((q * scale).reshape(x.shape[0], -1))
    return torch.cat(out, dim=1)


def stored_values(t: torch.Tensor, fmt: str | QuantFormat, in_axis: int = 1) -> torch.Tensor:
    """The float16 numbers ``fmt`` stores per group, before their float16 rounding, as absolute values: shape
    ``(rows, groups, n)`` (``n`` = 2 for Q4_1's scale and minimum, else 1), float32.

    Formulas as in ``gguf.quants`` / ggml: Q8_0 ``max|x| / 127``, Q4_0 ``max / -8``, Q5_0 ``max / -16`` (``max``:
    the entry of largest magnitude), Q4_1 ``(max - min) / 15`` and ``min``; int formats ``max|x| / qmax``.
    """
    fmt = get_format(fmt)
    x = _rows(t, in_axis)
    fmt.boundaries(x.shape[1])
    vals = []
    for g in _groups(x, fmt):
        amax = g.abs().amax(dim=2)
        if fmt.gguf_type == "Q4_1":
            lo, hi = g.amin(dim=2), g.amax(dim=2)
            vals.append(torch.stack([(hi - lo) / 15, lo.abs()], dim=2))
            continue
        div = {"Q8_0": 127, "Q4_0": 8, "Q5_0": 16}.get(fmt.gguf_type or "", fmt.qmax)
        vals.append((amax / div).unsqueeze(2))
    return torch.cat(vals, dim=1)


def exact_exponents(values: torch.Tensor, grow: bool) -> torch.Tensor:
    """Per stored float16 value, ``log2`` of the largest power of two it can be multiplied (``grow``) or divided by
    and stay a normal float16 number (so the quantized integers and the rounded value scale exactly): ``inf`` for a
    zero (nothing to scale), ``0`` for a value already out of the normal range (no scaling is exact)."""
    v = values.abs().to(torch.float32)
    zero = v == 0
    bad = ~zero & ((v < F16_TINY) | (v > F16_MAX))
    room = F16_MAX / v.clamp_min(F16_TINY) if grow else v / F16_TINY
    e = torch.floor(torch.log2(room.clamp_min(1.0)))
    return torch.where(zero, math.inf, torch.where(bad, 0.0, e))


def max_exact_factor(values: torch.Tensor, grow: bool) -> float:
    """Largest power of two ``f`` such that multiplying (``grow``) or dividing the stored float16 ``values`` by ``f``
    keeps every non-zero one a normal float16 number, so that the quantized integers and the rounded values scale
    exactly. ``1.0`` when some value is already out of the normal range (no scaling is exact); ``inf`` when all are
    zero."""
    if values.numel() == 0:
        return math.inf
    return float(2.0 ** float(exact_exponents(values, grow).min()))
