"""Pairs: the (producer, consumer) tensor blocks one deformation ``M`` acts on (see docs/design.md).

Pairs are described by tensor *names* and axes, not modules, so the same pair list drives
in-memory protection (names of ``named_parameters``) and streaming over checkpoint files
(safetensors keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hf_specdef.errors import SpecDefError

# Site types whose map must be diagonal (the table in docs/architectures.md).
AXIS_ONLY_SITES = frozenset({"mlp", "norm"})
# How rotary embeddings pair the dims of a head: "half" rotates (i, i + d/2) together (Llama's ``rotate_half``),
# "adjacent" rotates (2i, 2i + 1) together (Flux, GPT-J's interleaved layout). "" means no rotary constraint.
ROTARY_LAYOUTS = ("", "half", "adjacent")


class ModelConfigError(SpecDefError, ValueError):
    """The model's config (``config.json``) has a field the site registry cannot use: missing, not a positive
    integer, or inconsistent with another field. The message names the file, the field, the value and the fix."""

    docs_page = "docs/architectures.md"

    def __init__(self, detail: str, source: str = "config.json") -> None:
        self.detail, self.source = detail, source
        super().__init__(f"{source}: {detail}")

    def at(self, source: str) -> ModelConfigError:
        """The same error naming ``source`` (e.g. the config file's path) instead of ``config.json``."""
        return ModelConfigError(self.detail, source)


class TensorShapeError(SpecDefError, ValueError):
    """A tensor a pair touches has another shape than its site (and the config) implies, e.g. a weight stored
    transposed. The message names the tensor, its shape, the expected shape and the fix."""

    docs_page = "docs/architectures.md"

    def __init__(self, tensor: str, detail: str, source: str = "") -> None:
        self.tensor, self.detail, self.source = tensor, detail, source
        super().__init__(f"{source}: {detail}" if source else detail)

    def at(self, source: str) -> TensorShapeError:
        """The same error prefixed with ``source`` (the file holding the tensor)."""
        return TensorShapeError(self.tensor, self.detail, source)


@dataclass(frozen=True)
class TensorBlock:
    """Block ``[start, stop)`` of tensor ``name`` along ``axis``.

    ``offset``: the block's values act as ``offset + x`` (the weight of Gemma's RMSNorm, ``x_hat * (1 + w)``);
    ``M`` is applied to ``offset + x`` and the offset taken off again.
    """

    name: str
    axis: int
    start: int
    stop: int
    offset: float = 0.0

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "axis": self.axis, "start": self.start, "stop": self.stop}
        return d | {"offset": self.offset} if self.offset else d


@dataclass(frozen=True)
class Pair:
    """One site instance: ``producers`` get ``M`` (``X <- M X``), ``consumers`` get ``M^-1``
    (``X <- X M^-1``) along their block axes. Consumers are the *hot* side (they read the
    inflated activation); producers are *cold*.

    ``rotary`` restricts ``M`` to one factor per rotary pair (RoPE ``attn.qk``): ``"half"`` pairs
    ``(i, i + d/2)``, ``"adjacent"`` pairs ``(2i, 2i + 1)`` (see :data:`ROTARY_LAYOUTS`; ``True`` / ``False``
    are read as ``"half"`` / ``""``). ``diagonal`` restricts ``M`` to a diagonal (a pair of norm weights,
    which are diagonal maps themselves); ``mlp`` / ``norm`` sites are diagonal only.
    """

    site: str
    layer: int
    block: str
    group: int
    producers: tuple[TensorBlock, ...]
    consumers: tuple[TensorBlock, ...]
    rotary: str = ""
    tags: frozenset[str] = field(default_factory=frozenset)
    diagonal: bool = False

    def __post_init__(self) -> None:
        layout = ("half" if self.rotary else "") if isinstance(self.rotary, bool) else self.rotary
        if layout not in ROTARY_LAYOUTS:
            raise ValueError(f"Pair.rotary={self.rotary!r} is not a rotary layout; use one of {ROTARY_LAYOUTS}.")
        object.__setattr__(self, "rotary", layout)

    @property
    def size(self) -> int:
        b = self.producers[0]
        return b.stop - b.start

    @property
    def axis_only(self) -> bool:
        return bool(self.rotary) or self.diagonal or self.site in AXIS_ONLY_SITES

    @property
    def key(self) -> str:
        return f"{self.block}:{self.site}:{self.group}"

    @property
    def hot_modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.module for b in self.consumers))

    @property
    def cold_modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.module for b in self.producers))

    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.name for b in self.producers + self.consumers))

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "layer": self.layer,
            "block": self.block,
            "group": self.group,
            "producers": [b.to_dict() for b in self.producers],
            "consumers": [b.to_dict() for b in self.consumers],
            "rotary": self.rotary,
            "tags": sorted(self.tags),
        } | ({"diagonal": True} if self.diagonal else {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pair:
        try:
            return cls(
                site=d["site"],
                layer=int(d.get("layer", 0)),
                block=d.get("block", d["producers"][0]["name"].rsplit(".", 2)[0]),
                group=int(d.get("group", 0)),
                producers=tuple(TensorBlock(**b) for b in d["producers"]),
                consumers=tuple(TensorBlock(**b) for b in d["consumers"]),
                rotary=d.get("rotary", ""),
                tags=frozenset(d.get("tags", ())),
                diagonal=bool(d.get("diagonal", False)),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"site_map entry {d!r} is malformed ({e}). Each entry needs 'site', 'producers' and "
                "'consumers'; each block needs 'name', 'axis', 'start', 'stop'."
            ) from None
