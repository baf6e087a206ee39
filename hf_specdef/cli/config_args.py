"""The :class:`~hf_specdef.SpecDefConfig` flags shared by ``protect`` and ``publish``."""

from __future__ import annotations

import argparse
from typing import Any

from hf_specdef.config import MODES, PRECISION_POLICIES, RECORD_LEVELS, SITE_TYPES, SpecDefConfig


def parse_layers(text: str) -> str | tuple[int, ...]:
    """``all`` | ``cross-attention`` | ``random:N`` | ``0,3,5``."""
    text = text.strip()
    if text in ("all", "cross-attention") or text.startswith("random:"):
        return text
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        layers = ()
    if not layers:
        raise argparse.ArgumentTypeError(
            f"--layers {text!r}: use 'all', 'cross-attention', 'random:N' or a comma-separated list of layer indices")
    return layers


def parse_sites(text: str) -> tuple[str, ...]:
    """A comma-separated subset of the site types."""
    sites = tuple(s.strip() for s in text.split(",") if s.strip())
    if not sites or any(s not in SITE_TYPES for s in sites):
        raise argparse.ArgumentTypeError(f"--sites {text!r}: use a comma-separated subset of {','.join(SITE_TYPES)}")
    return sites


def parse_formats(text: str) -> tuple[str, ...]:
    """A comma-separated list of quantization formats (or ``all``)."""
    from hf_specdef.config import QUANTIZATION_FORMATS

    names = tuple(s.strip() for s in text.split(",") if s.strip())
    names = QUANTIZATION_FORMATS if names == ("all",) else names
    if not names or any(n not in QUANTIZATION_FORMATS for n in names):
        raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated subset of {','.join(QUANTIZATION_FORMATS)} "
                                         "or 'all'")
    return names


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The :class:`SpecDefConfig` flags (unset flags keep the config defaults)."""
    g = parser.add_argument_group("protection (SpecDefConfig)")
    g.add_argument("--alpha", type=float,
                   help="inflation factor > 1 (default 1000; a power of two is bit-exact in axis mode, and --precision "
                        "auto rounds it to one where it uses axis mode: 1024 on bfloat16; see docs/precision.md)")
    g.add_argument("--sites", type=parse_sites, help=f"comma-separated subset of {','.join(SITE_TYPES)} (default: all)")
    g.add_argument("--top-k", type=int, help="directions / channels per site block (default 1)")
    g.add_argument("--layers", type=parse_layers, help="all | cross-attention | random:N | 0,1,5 (default all)")
    g.add_argument("--mode", choices=MODES,
                   help="spectral or axis (default, with --precision auto: the strongest exact in the checkpoint's "
                        "dtype: spectral for "
                        "float32, axis with a power-of-two alpha for bfloat16/float16; see docs/precision.md)")
    g.add_argument("--precision", choices=PRECISION_POLICIES,
                   help="how to fit the storage dtype: auto (default: the strongest protection exact in it), refuse, "
                        "axis, float32")
    g.add_argument("--record", choices=RECORD_LEVELS, help="detail of the record written to config.json (default minimal)")
    g.add_argument("--tolerance", type=float, help="max relative deviation accepted by verification (default 1e-3)")
    g.add_argument("--seed", type=int, help="seed for --layers random:N (default 0)")
    g.add_argument("--quantization-safe", type=parse_formats, dest="quantization_safe", metavar="FORMATS",
                   help="make the release survive these quantizations: comma-separated among "
                        "q8_0,q4_0,q4_1,q5_0,int8-g128,int4-g128 or 'all' (needs a power-of-two --alpha)")


def config_from_args(args: argparse.Namespace) -> SpecDefConfig:
    """A :class:`SpecDefConfig` from the flags that were given (defaults for the rest)."""
    keys = ("alpha", "sites", "top_k", "layers", "mode", "precision", "record", "tolerance", "seed", "quantization_safe")
    given: dict[str, Any] = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    return SpecDefConfig(**given)
