"""The downcast guard: a protection exact only in float32 is never loaded in bfloat16/float16 without a word
(see docs/precision.md).

No Hugging Face imports: the integrations (:mod:`.integrations.transformers`, :mod:`.integrations.diffusers`)
read the checkpoint's config and call :func:`resolve_dtype` before loading and :func:`check_loaded` after.

A spectral protection stored in float32 adds a relative output error of about alpha x unit roundoff when its
weights are rounded to a 16-bit format (docs/precision.md has the figures measured on a real model). So, with
hf-specdef imported:

* ``dtype=torch.bfloat16 | torch.float16`` (``torch_dtype=`` in diffusers) of such a checkpoint raises
  :class:`DowncastError`, naming the record, the measured (or expected) breakage and the fix;
* ``dtype="auto"`` (the transformers default) resolves to float32 for it;
* forcing: ``from_pretrained(..., specdef_allow_downcast=True)`` or the environment variable
  ``HF_SPECDEF_ALLOW_DOWNCAST=1`` loads anyway, with a warning that names the deviation.

The same holds for any 16-bit dtype a release is not exact in: a power-of-two axis release exact in bfloat16
is refused in float16 (its compensated weights turn subnormal and its inflated activations can overflow).
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from hf_specdef.deformation.precision import format_deviation, release_safety
from hf_specdef.deformation.record import factors_text
from hf_specdef.errors import SpecDefError

logger = logging.getLogger("hf_specdef")

ENV_ALLOW = "HF_SPECDEF_ALLOW_DOWNCAST"
FORCE_KWARG = "specdef_allow_downcast"
_HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"bf16": "bfloat16", "half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32"}
# set while a guarded load runs: nested from_pretrained calls (Auto class -> model class, pipeline -> components)
# are decided by the outermost one
_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("specdef_downcast_scope", default=None)


class DowncastError(SpecDefError, ValueError):
    """Loading a float32-only protected checkpoint in a 16-bit dtype would silently break it.

    Raised by ``from_pretrained`` (with hf_specdef imported) when a release whose record says it is exact only in
    float32 (spectral mode) is loaded in ``bfloat16``/``float16``; see docs/precision.md.

    Example:
        ```python
        from hf_specdef import DowncastError

        try:
            model = AutoModelForCausalLM.from_pretrained("org/spectral-release", dtype=torch.bfloat16)
        except DowncastError as e:
            print(e)  # names the measured deviation and the fix (load it in float32)
        ```
    """

    docs_page = "docs/precision.md"


def env_allows() -> bool:
    return os.environ.get(ENV_ALLOW, "").strip().lower() not in ("", "0", "false", "no")


@contextmanager
def scope(state: str) -> Iterator[None]:
    """Mark the current load as decided (``"checked"``) or allowed to downcast (``"allowed"``)."""
    token = _SCOPE.set(state)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def allow_downcast() -> AbstractContextManager[None]:
    """Context in which guarded loads may downcast (used by ``hf-specdef verify --dtype`` and the publisher's
    downcast measurement, which load broken models on purpose)."""
    return scope("allowed")


def active() -> str | None:
    """``None`` outside a guarded load; ``"checked"`` / ``"allowed"`` inside one."""
    return _SCOPE.get()


def dtype_name(dtype: Any) -> str | None:
    """``"bfloat16"`` / ``"float16"`` / ``"float32"`` / ``"auto"`` / other dtype names; ``None`` for ``None``."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        return _ALIASES.get(name, name)
    return str(dtype)


def _requested(dtype: Any) -> list[str]:
    """The dtype names a ``dtype=`` argument asks for (a dict of per-component dtypes gives several)."""
    if isinstance(dtype, Mapping):
        return [n for v in dtype.values() if (n := dtype_name(v))]
    return [n] if (n := dtype_name(dtype)) else []


def _record_text(record: Mapping[str, Any], info: Mapping[str, Any], where: str) -> str:
    return (f"{where} carries a SpecDef protection record (in config.json: modes {record.get('modes')}, "
            f"{factors_text(record)}, precision requested {info.get('requested')} -> used {info.get('used')}) "
            f"that is exact only in {', '.join(info.get('exact_dtypes') or ['float32'])}")


def breakage(info: Mapping[str, Any], dtype: str) -> str:
    """The measured deviation in ``dtype`` (publish time) when the record has one, else the expected one."""
    measured = (info.get("measured") or {}).get(dtype)
    if measured is not None:
        return f"measured at publish time: max relative output deviation {format_deviation(measured)} in {dtype}"
    expected = (info.get("expected") or {}).get(dtype)
    text = f"expected max relative output deviation up to about {format_deviation(expected)} (precision budget)"
    if dtype == "float16":
        text += " or overflow to inf/NaN"
    return text + " (what such releases do on a real model: docs/precision.md)"


def message(record: Mapping[str, Any], dtype: str, where: str) -> str:
    info = release_safety(record) or {}
    exact = [d for d in ("float32", "bfloat16", "float16") if d in (info.get("exact_dtypes") or ["float32"])]
    fix = " or ".join(f"dtype=torch.{d}" for d in exact)
    auto = ", or dtype='auto', which hf-specdef resolves to float32 for it" if info.get("float32_only") else ""
    exists = ("a bfloat16-exact protection exists (precision='auto' on a bfloat16 checkpoint: axis mode with a "
              "power-of-two alpha, bit-exact)" if dtype == "bfloat16" else
              "a float16-exact protection exists (precision='auto' on a float16 checkpoint: per-pair power-of-two "
              "factors that keep every scaled weight exact)")
    return (f"Refusing to load {where} in {dtype}: {_record_text(record, info, where)}. In {dtype} the protected "
            f"model does not keep its function ({breakage(info, dtype)}). Fix: load it in {' or '.join(exact)} ({fix}"
            f"{auto}). Publishers: {exists}. To load it anyway: from_pretrained(..., {FORCE_KWARG}=True) or "
            f"{ENV_ALLOW}=1.")


def resolve_dtype(record: Mapping[str, Any] | None, dtype: Any, where: str, forced: bool = False) -> Any:
    """The dtype to load ``where`` in: ``dtype`` itself, or ``torch.float32`` for ``"auto"`` / ``None`` when the
    protection is float32-only. Raises :class:`DowncastError` for a 16-bit ``dtype`` the protection is not exact in
    unless ``forced`` (or :data:`ENV_ALLOW`, or an :func:`allow_downcast` context), which only warn.

    ``None`` stands for the loader's default: pass ``"auto"`` where the default reads the config (transformers 5).
    """
    info = release_safety(record)
    if info is None:
        return dtype
    names = _requested(dtype)
    if isinstance(dtype, str) and dtype == "auto":
        if info.get("float32_only"):
            logger.info("hf-specdef: dtype='auto' resolved to float32 for %s (its protection is exact only in float32)",
                        where)
            return torch.float32
        return dtype
    exact = set(info.get("exact_dtypes") or [])
    for name in names:
        if name not in _HALF or name in exact:
            continue
        if forced or env_allows() or active() == "allowed":
            logger.warning("hf-specdef: loading %s in %s although its protection is exact only in %s (forced): %s",
                           where, name, ", ".join(sorted(exact)), breakage(info, name))
            continue
        raise DowncastError(message(record, name, where))
    return dtype


def check_loaded(record: Mapping[str, Any] | None, loaded: torch.dtype | None, where: str, forced: bool = False) -> None:
    """After loading: refuse a protection that ended up in a 16-bit dtype it is not exact in (a path the pre-load
    check could not see, e.g. a Hub pipeline). Same forcing as :func:`resolve_dtype`."""
    info = release_safety(record)
    name = dtype_name(loaded)
    if info and name in _HALF and name not in (info.get("exact_dtypes") or []):
        resolve_dtype(record, loaded, where, forced)
