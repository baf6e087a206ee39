"""`SpecDefConfig`: the validated, JSON-serializable description of a protection."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SITE_TYPES: tuple[str, ...] = ("attn.vo", "attn.qk", "mlp", "norm")
MODES: tuple[str, ...] = ("spectral", "axis")
PRECISION_POLICIES: tuple[str, ...] = ("auto", "refuse", "axis", "float32")
RECORD_LEVELS: tuple[str, ...] = ("minimal", "full", "none")
DEFAULT_SITES: tuple[str, ...] = ("attn.vo", "attn.qk", "mlp", "norm")
# quantization formats a release can be made safe for (hf_specdef.quantization.formats.FORMATS has the quantizers)
QUANTIZATION_FORMATS: tuple[str, ...] = ("q8_0", "q4_0", "q4_1", "q5_0", "int8-g128", "int4-g128")
_RANDOM_LAYERS = re.compile(r"^random:(\d+)$")
CONFIG_KEY = "specdef"  # name of the protection record in a saved transformers config.json
# ... and in a diffusers config.json: diffusers warns about every unexpected public key (printing its value, the whole
# record) but passes "_" keys over silently, and keeps them in model.config and on save
DIFFUSERS_CONFIG_KEY = "_specdef"
INSPECT_THRESHOLD = 20.0  # outlier ratio above which inspect_model flags a matrix as deformed


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"SpecDefConfig.{name}={value!r} is invalid: {allowed}.")


@dataclass
class SpecDefConfig:
    """What to deform, by how much, and how to stay safe doing it.

    Args:
        alpha: factor (> 1, finite) by which the chosen singular values (spectral mode) or
            channels (axis mode) of each producer are inflated; its consumer is compensated by 1/alpha.
        sites: site types to deform (SPEC §2): any of ``"attn.vo"``, ``"attn.qk"``, ``"mlp"``, ``"norm"``.
            Types an architecture does not have are skipped and reported; if none matches, protection fails.
        top_k: number of directions (spectral) or channels / rotary pairs (axis) deformed per site block.
        layers: ``"all"``, a list of layer indices, ``"random:N"`` (N layers drawn with ``seed``), or
            ``"cross-attention"`` (diffusion denoisers: cross-attention blocks only).
        mode: ``"spectral"`` (the paper's SpecDef: top-k singular directions) or ``"axis"`` (diagonal
            scaling of channels; bit-exact in float32/bfloat16 when alpha is a power of two;
            not in float16, whose narrow range makes ``C / alpha`` subnormal). Sites that
            only admit a diagonal map (``mlp``, ``norm``, ``attn.qk`` with rotary embeddings) always use
            axis scaling.
        tolerance: largest max relative output deviation accepted by verification. Default 1e-3:
            spectral mode at alpha=1000 in float32 costs about alpha x unit roundoff, measured 6e-5 to 1.03e-4
            on Llama models of 2 to 24 layers (125M parameters: 1.03e-4), so 1e-4 sits at float32's edge;
            pass ``tolerance=1e-4`` to enforce that stricter bar. The precision budget is checked against it.
        precision: how to fit the deformation into the storage dtype (SPEC §2 precision budget):
            ``"auto"`` (default): the strongest protection exact in the dtype each weight is stored in --
            float32/float64: as requested (spectral; axis with a power-of-two alpha if spectral would exceed
            ``tolerance``); bfloat16: axis mode with alpha rounded to a power of two (bit-exact); float16: axis
            mode with a power-of-two factor per pair chosen so that every scaled weight stays exactly
            representable (:mod:`hf_specdef.tensor_math.exact_scaling`), refused when that factor would fall below
            alpha/16. ``"refuse"``: raise when the requested protection exceeds ``tolerance`` in the storage
            dtype. ``"axis"``: switch such pairs to axis mode with a power-of-two alpha. ``"float32"``: upcast
            the model to float32 (keeping only the deformed weights in float32 is not enough, the inflated
            activations are rounded too). What was requested and what was used is in the report and the record.
        record: detail of the protection record written into the model config: ``"minimal"`` (sites,
            alpha, layers), ``"full"`` (also every direction / channel, enough for an exact undo) or ``"none"``.
        seed: seed for ``layers="random:N"``.
        site_map: optional explicit list of pairs for architectures the registry does not know; see
            :func:`hf_specdef.sites.pairs_from_site_map`.
        quantization_safe: quantization formats the release must survive (any of ``QUANTIZATION_FORMATS``:
            GGUF ``"q8_0"``, ``"q4_0"``, ``"q4_1"``, ``"q5_0"``, group-wise ``"int8-g128"``, ``"int4-g128"``; or
            ``"all"``). Non-empty: every pair is deformed in axis mode, whole aligned quantization groups at a time,
            by a power of two (``alpha`` must be one; it is lowered per pair where a float16 quantization scale would
            leave its range), the ``norm`` site inverted (norm weight divided, readers multiplied), and protection
            checks that the quantized protected model equals the quantized original (see
            :mod:`hf_specdef.deformation.quantization_safe`). Pairs that cannot be made safe are skipped with the reason.
            In-memory protection of transformers models only.
    """

    alpha: float = 1000.0
    sites: Sequence[str] = DEFAULT_SITES
    top_k: int = 1
    layers: str | Sequence[int] = "all"
    mode: str = "spectral"
    tolerance: float = 1e-3
    precision: str = "auto"
    record: str = "minimal"
    seed: int = 0
    site_map: list[dict[str, Any]] | None = field(default=None)
    quantization_safe: Sequence[str] = ()

    def __post_init__(self) -> None:
        if isinstance(self.quantization_safe, str):
            self.quantization_safe = (self.quantization_safe,)
        if tuple(self.quantization_safe) == ("all",):
            self.quantization_safe = QUANTIZATION_FORMATS
        self.quantization_safe = tuple(self.quantization_safe)
        if isinstance(self.sites, str):
            self.sites = (self.sites,)
        self.sites = tuple(self.sites)
        if isinstance(self.layers, (list, tuple)):
            self.layers = tuple(self.layers)
        self.validate()

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the first bad field."""
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 1:
            _fail("alpha", a, "it must be a finite number > 1 (e.g. 1000.0; 1024.0 for bit-exact axis mode)")
        if not self.sites or any(s not in SITE_TYPES for s in self.sites):
            _fail("sites", self.sites, f"use a non-empty subset of {SITE_TYPES}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            _fail("top_k", self.top_k, "it must be an int >= 1")
        self._validate_layers()
        if self.mode not in MODES:
            _fail("mode", self.mode, f"allowed values are {MODES}")
        t = self.tolerance
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            _fail("tolerance", t, "it must be a finite number > 0 (e.g. 1e-4)")
        if self.precision not in PRECISION_POLICIES:
            _fail("precision", self.precision, f"allowed values are {PRECISION_POLICIES}")
        if self.record not in RECORD_LEVELS:
            _fail("record", self.record, f"allowed values are {RECORD_LEVELS}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail("seed", self.seed, "it must be an int")
        if self.site_map is not None and not (
            isinstance(self.site_map, list) and all(isinstance(p, dict) for p in self.site_map) and self.site_map
        ):
            _fail("site_map", self.site_map, "it must be a non-empty list of pair dicts (see the README)")
        self._validate_quantization()

    def _validate_quantization(self) -> None:
        q = self.quantization_safe
        if any(not isinstance(f, str) or f not in QUANTIZATION_FORMATS for f in q) or len(set(q)) != len(q):
            _fail("quantization_safe", list(q), f"use distinct formats among {QUANTIZATION_FORMATS} (or 'all')")
        if q and not self.alpha_is_power_of_two:
            _fail("alpha", self.alpha, "quantization_safe needs a power-of-two alpha (e.g. 1024.0): the quantized "
                  "integers stay the same only when whole groups are scaled by a power of two")

    def _validate_layers(self) -> None:
        layers = self.layers
        if isinstance(layers, str):
            if layers in ("all", "cross-attention") or _RANDOM_LAYERS.match(layers):
                if layers.startswith("random:") and int(layers.split(":")[1]) < 1:
                    _fail("layers", layers, "random:N needs N >= 1")
                return
            _fail("layers", layers, "use 'all', 'cross-attention', 'random:N' or a list of layer indices")
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            _fail("layers", layers, "a layer list must be a non-empty list of ints >= 0")

    def select_layers(self, available: Sequence[int]) -> set[int]:
        """Layer indices this config deforms, out of ``available`` (``random:N`` is seeded)."""
        available = sorted(set(available))
        if self.layers in ("all", "cross-attention"):
            return set(available)
        if isinstance(self.layers, str):
            n = int(self.layers.split(":")[1])
            if n > len(available):
                _fail("layers", self.layers, f"the model has only {len(available)} layers")
            return set(random.Random(self.seed).sample(available, n))
        missing = sorted(set(self.layers) - set(available))
        if missing:
            _fail("layers", list(self.layers), f"layers {missing} do not exist (model has {available[:1]}..{available[-1:]})")
        return set(self.layers)

    @property
    def alpha_is_power_of_two(self) -> bool:
        return math.frexp(float(self.alpha))[0] == 0.5

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sites"] = list(self.sites)
        d["layers"] = self.layers if isinstance(self.layers, str) else list(self.layers)
        d["quantization_safe"] = list(self.quantization_safe)
        if not self.quantization_safe:  # records and configs of other protections stay as they were
            del d["quantization_safe"]
        return d

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpecDefConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SpecDefConfig got unknown fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_json_string(cls, text: str) -> SpecDefConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> SpecDefConfig:
        return type(self).from_dict({**self.to_dict(), **changes})
