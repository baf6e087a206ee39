"""Reading a model's config and checking its tensor shapes against it, for the site registry.

The registry reads head counts and widths from a transformers / diffusers config (a mapping or an object):
:func:`cfg_get` takes the first field that is set, :func:`config_int` a positive integer or a
:class:`~hf_specdef.sites.base.ModelConfigError` naming the field, its value and the fix, and :func:`llama_heads` /
:func:`mha_heads` turn them into ``(heads, key/value heads, head size)``. :func:`check_extent` and
:func:`check_attention_shapes` check, before any tensor is read, that the weights have the extents the config
implies, else raise a :class:`~hf_specdef.sites.base.TensorShapeError` naming the tensor, its shape and the shape
expected (calling out a weight stored transposed). Nothing here depends on :mod:`hf_specdef.sites.registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hf_specdef.sites.base import ModelConfigError, TensorShapeError

ShapeOf = Mapping[str, Sequence[int]]


def cfg_get(config: Any, *names: str, default: Any = None) -> Any:
    """First attribute/key of ``config`` among ``names`` that is set."""
    for n in names:
        v = config.get(n) if isinstance(config, Mapping) else getattr(config, n, None)
        if v is not None:
            return v
    return default


_REQUIRED = object()
# what the config fields the registry reads mean (for the error that names a bad one)
_MEANING = {
    "num_attention_heads": "the number of attention (query) heads",
    "num_key_value_heads": "the number of key/value heads (grouped-query attention; equal to num_attention_heads "
                           "without it)",
    "head_dim": "the size of one attention head",
    "hidden_size": "the model width",
    "n_head": "the number of attention heads",
    "n_embd": "the model width",
}


def config_int(config: Any, key: str, default: Any = _REQUIRED) -> int:
    """``config[key]`` as a positive integer (``default`` where it is missing and a default is given), or
    :class:`~hf_specdef.sites.base.ModelConfigError` naming the field, its value and the fix."""
    value = cfg_get(config, key)
    meaning = _MEANING.get(key, "its value")
    if value is None:
        if default is not _REQUIRED:
            return default
        raise ModelConfigError(f"{key} is missing; the site registry needs it ({meaning}). Add \"{key}\": <positive "
                               "integer> as the model was trained, or pass an explicit SpecDefConfig(site_map=...).")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelConfigError(f"{key}={value!r} is not a positive integer; set it to {meaning} (a whole number >= 1, "
                               "as the model was trained), or pass an explicit SpecDefConfig(site_map=...).")
    return value


def shape_text(shape: Sequence[int]) -> str:
    """A tensor shape as the errors print it: ``(4, 8)``."""
    return str(tuple(int(x) for x in shape))


def check_extent(shape_of: ShapeOf, name: str, axis: int, size: int, basis: str, fix: str) -> None:
    """Tensor ``name`` must have ``size`` entries along ``axis`` (what ``basis`` implies), else
    :class:`~hf_specdef.sites.base.TensorShapeError` naming the tensor, its shape, the implied shape and the fix
    (a 2-D weight whose other axis has ``size`` entries is called out as stored transposed)."""
    shape = tuple(int(x) for x in shape_of[name])
    if axis < len(shape) and shape[axis] == size:
        return
    implied = list(shape) + [1] * max(0, axis + 1 - len(shape))
    implied[axis] = size
    if len(shape) == 2 and shape[1 - axis] == size:  # the other way round: stored transposed
        implied = [shape[1], shape[0]]
        raise TensorShapeError(name, (
            f"tensor {name!r} has shape {shape_text(shape)}, but {basis} implies {shape_text(implied)}: it looks "
            f"stored transposed (a torch Linear weight is (out_features, in_features)); re-save it as "
            f"{shape_text(implied)}" + (", or fix config.json if it does not belong to these weights." if "config.json"
                                         in basis else ".")))
    raise TensorShapeError(name, (
        f"tensor {name!r} has shape {shape_text(shape)}, but {basis} implies {shape_text(implied)} "
        f"({size} along axis {axis}); {fix}"))


_HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size", "n_head", "n_embd",
                "attention_head_dim")


def check_attention_shapes(att: Any, block: str, config: Any, shape_of: ShapeOf, n: int, kv: int, d: int) -> None:
    """The q/k/v/o weights of ``att`` (an :class:`~hf_specdef.sites.registry.Attention` of block ``block``) have the
    extents the config's head counts ``n``, ``kv`` and head size ``d`` imply along the axes the pairs index, else
    :class:`~hf_specdef.sites.base.TensorShapeError` (:func:`check_extent`)."""
    fields = ", ".join(f"{k}={v!r}" for k in _HEAD_FIELDS if (v := cfg_get(config, k)) is not None)
    basis = f"config.json ({fields + ': ' if fields else ''}{n} heads, {kv} key/value heads of size {d})"
    fix = "config.json does not match these weights: set its head fields to the values the model was trained with."
    if att.interleaved or att.fused:  # one projection holds q, k and v
        rows = 3 * n * d if att.interleaved else (n + 2 * kv) * d
        wanted = [(att.q, rows)]
    else:
        wanted = [(att.q, n * d), (att.k, kv * d), (att.v, kv * d)]
    for lin, size in wanted:
        name = f"{block}.{lin.weight}"
        if name in shape_of:
            check_extent(shape_of, name, lin.out_axis, size, basis, fix)
    check_extent(shape_of, f"{block}.{att.o.weight}", att.o.in_axis, n * d, basis, fix)


def llama_heads(config: Any, block: str, shape_of: ShapeOf) -> tuple[int, int, int]:
    """``(heads, kv heads, head size)`` from ``num_attention_heads`` / ``num_key_value_heads`` / ``head_dim`` (or
    ``hidden_size / num_attention_heads``), each checked (:class:`~hf_specdef.sites.base.ModelConfigError`)."""
    n = config_int(config, "num_attention_heads")
    kv = config_int(config, "num_key_value_heads", default=n)
    if n % kv:
        raise ModelConfigError(f"num_key_value_heads={kv} does not divide num_attention_heads={n} (every key/value "
                               f"head serves the same number of query heads); set it to a divisor of {n}, as the "
                               "model was trained.")
    if cfg_get(config, "head_dim") is not None:
        return n, kv, config_int(config, "head_dim")
    return n, kv, _split(config, "hidden_size", n, "num_attention_heads", head_dim=True)


def _split(config: Any, hidden_key: str, n: int, n_key: str, head_dim: bool = False) -> int:
    hidden = config_int(config, hidden_key)
    if hidden % n:
        alt = "set head_dim (the size of one head) or fix the head count" if head_dim else "fix the head count"
        raise ModelConfigError(f"{hidden_key}={hidden} is not divisible by {n_key}={n}, so the heads have no whole "
                               f"size; {alt} to the values the model was trained with.")
    return hidden // n


def mha_heads(n_key: str, hidden_key: str) -> Callable[[Any, str, ShapeOf], tuple[int, int, int]]:
    """The head reader of multi-head attention (as many key/value heads as heads): ``(n, n, hidden / n)`` with ``n``
    the config's ``n_key`` and ``hidden`` its ``hidden_key``, each checked (:func:`config_int`)."""
    def heads(config: Any, block: str, shape_of: ShapeOf) -> tuple[int, int, int]:
        n = config_int(config, n_key)
        return n, n, _split(config, hidden_key, n, n_key)

    return heads
