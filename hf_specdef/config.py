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

    A validated, JSON-serializable description of a SpecDef protection, passed to :func:`hf_specdef.protect`,
    :func:`hf_specdef.save_protected`, :func:`hf_specdef.protect_checkpoint` and :func:`hf_specdef.publish`. Every
    field is checked when the config is built (and by :meth:`validate`); the config round-trips through
    :meth:`to_dict` / :meth:`from_dict` and is written into the protection record of a protected model.

    Args:
        alpha (`float`, *optional*, defaults to `1000.0`):
            Factor (> 1, finite) by which the chosen singular values (spectral mode) or channels (axis mode) of each
            producer are inflated; its consumer is compensated by 1/alpha. A power of two (e.g. `1024.0`) makes axis
            mode bit-exact.
        sites (`Sequence[str]` or `str`, *optional*, defaults to `("attn.vo", "attn.qk", "mlp", "norm")`):
            Site types to deform: any of ``"attn.vo"``, ``"attn.qk"``, ``"mlp"``, ``"norm"`` (see the Architectures
            page of the docs, docs/architectures.md). Types an architecture does not have are skipped and reported;
            if none matches, protection fails. A single string is taken as a one-element tuple.
        top_k (`int`, *optional*, defaults to `1`):
            Number of directions (spectral) or channels / rotary pairs (axis) deformed per site block (>= 1).
        layers (`str` or `Sequence[int]`, *optional*, defaults to `"all"`):
            ``"all"``, a list of layer indices (ints >= 0), ``"random:N"`` (N >= 1 layers drawn with ``seed``), or
            ``"cross-attention"`` (diffusion denoisers: cross-attention blocks only).
        mode (`str`, *optional*, defaults to `"spectral"`):
            ``"spectral"`` (the paper's SpecDef: top-k singular directions) or ``"axis"`` (diagonal scaling of
            channels; bit-exact in float32/bfloat16 when alpha is a power of two; not in float16, whose narrow range
            makes ``C / alpha`` subnormal). Sites that only admit a diagonal map (``mlp``, ``norm``, ``attn.qk`` with
            rotary embeddings) always use axis scaling.
        tolerance (`float`, *optional*, defaults to `1e-3`):
            Largest max relative output deviation accepted by verification (finite, > 0). Spectral mode at
            alpha=1000 in float32 costs about alpha x unit roundoff (about 1e-4; docs/precision.md), so
            ``tolerance=1e-4`` sits at float32's edge. The precision budget is checked against it.
        precision (`str`, *optional*, defaults to `"auto"`):
            How to fit the deformation into the storage dtype (see the Precision page of the docs,
            docs/precision.md). ``"auto"``: the strongest protection exact in the dtype each weight is stored in --
            float32/float64: as requested (spectral; axis with a power-of-two alpha if spectral would exceed
            ``tolerance``); bfloat16: axis mode with alpha rounded to a power of two (bit-exact); float16: axis mode
            with a power-of-two factor per pair chosen so that every scaled weight stays exactly representable,
            refused when that factor would fall below alpha/16. ``"refuse"``: raise when the requested protection
            exceeds ``tolerance`` in the storage dtype. ``"axis"``: switch such pairs to axis mode with a
            power-of-two alpha. ``"float32"``: upcast the model to float32 (the inflated activations need it, not
            only the deformed weights). What was requested and what was used is in the report and the record.
        record (`str`, *optional*, defaults to `"minimal"`):
            Detail of the protection record written into the model config: ``"minimal"`` (sites, alpha, layers),
            ``"full"`` (also every direction / channel, enough for an exact undo) or ``"none"``.
        seed (`int`, *optional*, defaults to `0`):
            Seed for ``layers="random:N"``.
        site_map (`list[dict]`, *optional*, defaults to `None`):
            Explicit, non-empty list of pairs for architectures the registry does not know (see "Models outside the
            table" on the Architectures page of the docs, docs/architectures.md).
        quantization_safe (`Sequence[str]` or `str`, *optional*, defaults to `()`):
            Quantization formats the release must survive (distinct entries of ``QUANTIZATION_FORMATS``: GGUF
            ``"q8_0"``, ``"q4_0"``, ``"q4_1"``, ``"q5_0"``, group-wise ``"int8-g128"``, ``"int4-g128"``; or
            ``"all"``). Non-empty: every pair is deformed in axis mode, whole aligned quantization groups at a time,
            by a power of two (``alpha`` must be one), the ``norm`` site inverted, and protection checks that the
            quantized protected model equals the quantized original. Pairs that cannot be made safe are skipped with
            the reason. In-memory protection of transformers models only (see the Quantization page of the docs,
            docs/quantization.md).

    Attributes:
        alpha_is_power_of_two (`bool`):
            Whether ``alpha`` is an exact power of two (needed for bit-exact axis mode and ``quantization_safe``).

    Raises:
        ValueError: a field is invalid (the message names the first bad field, its value and the allowed values),
            e.g. ``alpha <= 1``, an unknown site type or mode, ``quantization_safe`` with an alpha that is not a
            power of two.

    Example:

    ```python
    from hf_specdef import SpecDefConfig

    cfg = SpecDefConfig(alpha=1024.0, sites=("attn.vo", "mlp"), mode="axis", layers="random:2", seed=3)
    assert cfg.alpha_is_power_of_two
    same = SpecDefConfig.from_json_string(cfg.to_json_string())
    assert same == cfg
    stricter = cfg.replace(tolerance=1e-4)  # a new, validated config
    ```
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
        """Check every field (run when the config is built).

        Raises:
            ValueError: a field is invalid; the message names the first bad field, its value and what is allowed.
        """
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
            _fail("site_map", self.site_map, "it must be a non-empty list of pair dicts (see docs/architectures.md)")
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
        """Layer indices this config deforms, out of ``available`` (``random:N`` is drawn with ``seed``).

        Args:
            available: the layer indices the model has.

        Returns:
            The selected indices: all of them for ``"all"`` and ``"cross-attention"``.

        Raises:
            ValueError: ``random:N`` asks for more layers than there are, or a listed layer does not exist.
        """
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
        """Whether ``alpha`` is an exact power of two."""
        return math.frexp(float(self.alpha))[0] == 0.5

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (lists for sequences; ``quantization_safe`` only when non-empty)."""
        d = asdict(self)
        d["sites"] = list(self.sites)
        d["layers"] = self.layers if isinstance(self.layers, str) else list(self.layers)
        d["quantization_safe"] = list(self.quantization_safe)
        if not self.quantization_safe:  # records and configs of other protections stay as they were
            del d["quantization_safe"]
        return d

    def to_json_string(self) -> str:
        """:meth:`to_dict` as a JSON string with sorted keys."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpecDefConfig:
        """Build a validated config from :meth:`to_dict`'s output; ``ValueError`` for an unknown or invalid field."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SpecDefConfig got unknown fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_json_string(cls, text: str) -> SpecDefConfig:
        """Build a validated config from :meth:`to_json_string`'s output."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> SpecDefConfig:
        """A new, validated config with ``changes`` applied to the fields (this one is unchanged)."""
        return type(self).from_dict({**self.to_dict(), **changes})
