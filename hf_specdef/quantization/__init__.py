"""Quantization round trips (GGUF Q8_0/Q4_0/Q4_1/Q5_0 via ``gguf``, group-wise int8/int4) and the
quantization-safe deformation (SpecDef releases that survive quantization)."""

from hf_specdef.quantization.formats import FORMATS, QuantFormat, UnsupportedShapeError, fake_quantize, get_format, stored_values

__all__ = ["FORMATS", "QuantFormat", "UnsupportedShapeError", "fake_quantize", "get_format", "stored_values"]
