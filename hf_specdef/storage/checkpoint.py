"""Lazy, validated reading of safetensors checkpoint folders (single file, sharded, diffusers pipelines).

:func:`open_checkpoint` parses every shard's safetensors header (never the data) and validates it as
safetensors' own reader does (:mod:`hf_specdef.storage.safetensors_header`: known dtypes, integer shapes and
offsets, tensors tiling the data exactly, no repeated keys), and the index both ways (every tensor it
lists is in the shard it names, every tensor of every shard is listed there, no shard of the set is left
out; shard names stay inside the folder). A shard that is missing, truncated or corrupted, or an index
inconsistent with its shards, raises one :class:`CheckpointError` line naming the file. Shards are
memory-mapped read-only; tensors are read one at a time (:meth:`Checkpoint.get_tensor` copies,
:meth:`Checkpoint.view` does not) or taken as raw bytes (:meth:`Checkpoint.raw`).

Used by :func:`hf_specdef.inspect_model` (on a path) and :func:`hf_specdef.protect_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_specdef.storage.release_files import STANDARD_WEIGHT_NAMES
from hf_specdef.storage.safetensors_header import CheckpointError, read_safetensors_header
from hf_specdef.storage.shard_index import check_index_covers, load_index

logger = logging.getLogger("hf_specdef")

# safetensors dtype names -> torch dtypes (those torch has)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"),
                     ("U64", "uint64")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

CONFIG_NAME = "config.json"
PIPELINE_INDEX = "model_index.json"
DENOISER_COMPONENTS = ("transformer", "unet")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: ``file``, safetensors ``dtype`` name, ``shape``, absolute byte range ``[begin, end)``."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in ST_DTYPES:
            raise CheckpointError(f"{self.file}: tensor {self.name!r} has dtype {self.dtype}, which this torch cannot read.")
        return ST_DTYPES[self.dtype]


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    """Parse and validate the header of one safetensors file (never its data).

    Args:
        path: the ``.safetensors`` file.

    Returns:
        ``(name -> TensorInfo, __metadata__)``, tensors in header order, byte ranges absolute in the file.

    Raises:
        CheckpointError: missing, truncated or corrupted file (the rules of
            :mod:`hf_specdef.storage.safetensors_header`), one line naming the file and the fix.
    """
    path = Path(path)
    header = read_safetensors_header(path)
    start = header.data_start
    infos = {e.name: TensorInfo(e.name, path, e.dtype, e.shape, start + e.begin, start + e.end) for e in header.entries}
    return infos, header.metadata


def load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}).") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object.")
    return data


def find_denoiser(root: Path) -> Path:
    """The denoiser component folder (``transformer`` or ``unet``) of a diffusers pipeline folder."""
    index = load_json(root / PIPELINE_INDEX)
    for name in DENOISER_COMPONENTS:
        if name in index and (root / name).is_dir():
            return root / name
    raise CheckpointError(
        f"{root} is a diffusers pipeline folder ({PIPELINE_INDEX}) without a denoiser component "
        f"({' or '.join(DENOISER_COMPONENTS)}); pass the component folder itself."
    )


class Checkpoint:
    """A safetensors checkpoint folder: headers parsed and checked up front, tensors read lazily.

    Attributes:
        root: the folder holding the shards.
        files: the shard files, in index (or name) order.
        index_path: the ``*.safetensors.index.json`` file, if sharded with an index.
        index: its parsed content.
        config: ``config.json`` as a dict (``{}`` when absent).
        class_name: the model class (``architectures[0]`` or diffusers ``_class_name``), if known.
        infos: tensor name -> :class:`TensorInfo`.
        file_metadata: shard -> its safetensors ``__metadata__``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint file or folder.")
        self.component: str | None = None
        if path.is_file():
            if not path.name.endswith(".safetensors"):
                raise CheckpointError(f"{path}: not a .safetensors file.")
            self.root, files, self.index_path = path.parent, [path], None
        else:
            if (path / PIPELINE_INDEX).is_file() and not (path / CONFIG_NAME).is_file():
                path = find_denoiser(path)
                self.component = path.name
                logger.info("hf-specdef: %s is a diffusers pipeline; using its %s component", path.parent, path.name)
            self.root = path
            files, self.index_path = self._discover(path)
        self.index: dict[str, Any] | None = None
        self._weight_map: dict[str, str] = {}
        if self.index_path is not None:
            self.index, self._weight_map = load_index(self.index_path)
        self.config: dict[str, Any] = load_json(self.root / CONFIG_NAME) if (self.root / CONFIG_NAME).is_file() else {}
        archs = self.config.get("architectures") or []
        self.class_name: str | None = self.config.get("_class_name") or (archs[0] if archs else None)
        self.infos: dict[str, TensorInfo] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self.file_metadata: dict[Path, dict[str, str] | None] = {}
        if self.index is not None:
            files = self._files_from_index(files)
        self.files: list[Path] = files
        for f in files:
            infos, meta = read_header(f)
            self.file_metadata[f] = meta
            for name, info in infos.items():
                if name in self.infos:
                    raise CheckpointError(f"tensor {name!r} is stored twice: in {self.infos[name].file} and {f}; "
                                          "re-download or re-save the checkpoint with safetensors.")
                self.infos[name] = info
        if self.index_path is not None:
            check_index_covers(self.index_path, self._weight_map, {n: i.file.name for n, i in self.infos.items()})

    @staticmethod
    def _discover(root: Path) -> tuple[list[Path], Path | None]:
        indexes = sorted(root.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{root}: several safetensors indexes {[p.name for p in indexes]}; keep one.")
        if indexes:
            return [], indexes[0]
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{root}: no .safetensors weights found (only safetensors checkpoints are supported; "
                "convert .bin/.pt weights with save_pretrained(..., safe_serialization=True))."
            )
        # a stock loader reads only its standard file from a folder without an index: other .safetensors beside it
        # (Mistral's consolidated.safetensors, a diffusers .fp16 variant) are not this checkpoint
        standard = [f for f in files if f.name in STANDARD_WEIGHT_NAMES]
        return standard or files, None

    def _files_from_index(self, files: list[Path]) -> list[Path]:
        names = sorted(set(self._weight_map.values()))  # plain file names (checked by load_index)
        missing = [n for n in names if not (self.root / n).is_file()]
        if missing:
            raise CheckpointError(f"shard {missing[0]} named by {self.index_path} is missing from {self.root}; "
                                  "re-download it.")
        # a shard of the same set (same stem, same "-of-N") that the index forgot: its tensors would be left out
        stem = re.escape(self.index_path.name.removesuffix(".safetensors.index.json")) if self.index_path else ""
        pattern = re.compile(rf"{stem}-\d+-of-(\d+)\.safetensors")
        totals = {m.group(1) for m in map(pattern.fullmatch, names) if m}
        unlisted = sorted(p.name for p in self.root.glob("*-of-*.safetensors")
                          if (m := pattern.fullmatch(p.name)) and m.group(1) in totals and p.name not in names)
        if unlisted:
            raise CheckpointError(f"{self.index_path} does not name shard {unlisted[0]} of the same checkpoint (its "
                                  "tensors would be left out: stale index); re-download or re-save the checkpoint.")
        return [self.root / n for n in names]

    # -- queries --------------------------------------------------------------------------
    @property
    def is_sharded(self) -> bool:
        return self.index is not None

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, from the headers."""
        return {n: i.shape for n, i in self.infos.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {n: i.torch_dtype for n, i in self.infos.items()}

    def shard_of(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        return self._info(name).file

    def keys_of(self, file: Path) -> list[str]:
        """Names of the tensors in ``file``, in the order of their bytes."""
        return sorted((n for n, i in self.infos.items() if i.file == file), key=lambda n: self.infos[n].begin)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise KeyError(f"checkpoint {self.root} has no tensor {name!r}") from None

    def _map(self, file: Path) -> mmap.mmap:
        m = self._maps.get(file)
        if m is None:
            try:
                with open(file, "rb") as f:
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if f.seek(0, 2) else None
            except OSError as e:
                raise CheckpointError(f"{file}: cannot read ({e}).") from None
            if m is None:
                raise CheckpointError(f"{file}: file is empty.")
            self._maps[file] = m
        return m

    def raw(self, name: str) -> memoryview:
        """The bytes of one tensor, zero-copy (a read-only view of the memory-mapped shard)."""
        info = self._info(name)
        return memoryview(self._map(info.file))[info.begin:info.end]

    def view(self, name: str) -> torch.Tensor:
        """A zero-copy, **read-only** CPU tensor over the memory-mapped shard (do not modify it)."""
        info = self._info(name)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        with warnings.catch_warnings():  # the mapping is read-only on purpose
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            t = torch.frombuffer(self._map(info.file), dtype=info.torch_dtype, count=info.nbytes // info.torch_dtype.itemsize,
                                 offset=info.begin)
        return t.reshape(info.shape)

    def get_tensor(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """Read one tensor from its shard: a fresh tensor (on ``device`` if given, else the CPU).

        The shard pages it was copied from are let go (:meth:`drop_pages`), so reading a whole
        checkpoint tensor by tensor keeps only the current tensor resident.
        """
        v = self.view(name)
        t = v.clone() if device is None or torch.device(device) == v.device else v.to(device, copy=True)
        del v
        self.drop_pages(name)
        return t

    def drop_pages(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Let go of the mapped pages of tensor ``name`` (bytes ``[start, stop)`` of it; all by default).

        The pages stay in the OS page cache; views stay valid and fault them back in if used. Keeps the
        resident memory of a streaming pass bounded.
        """
        info = self._info(name)
        end = info.end if stop is None else min(info.end, info.begin + stop)
        drop_mapped_range(self._maps.get(info.file), info.begin + start, end)

    def release(self, file: Path) -> None:
        """Unmap ``file`` (its pages leave this process's memory); views of it must be dropped first."""
        m = self._maps.pop(file, None)
        if m is not None:
            try:
                m.close()
            except BufferError:  # a view is still alive: the mapping goes when it does
                pass

    def close(self) -> None:
        """Unmap every shard."""
        for f in list(self._maps):
            self.release(f)

    def __repr__(self) -> str:
        return (f"Checkpoint({str(self.root)!r}, {len(self.files)} file(s), {len(self.infos)} tensors, "
                f"class={self.class_name!r})")


def drop_mapped_range(m: mmap.mmap | None, begin: int, end: int) -> None:
    """``madvise(MADV_DONTNEED)`` on the pages of ``[begin, end)`` of a read-only file mapping (no-op where unsupported)."""
    if m is None or end <= begin or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = begin - begin % mmap.PAGESIZE
    try:
        m.madvise(mmap.MADV_DONTNEED, start, min(end, len(m)) - start)
    except (OSError, ValueError):
        pass


@contextmanager
def open_checkpoint(path: str | os.PathLike[str]) -> Iterator[Checkpoint]:
    """Open a checkpoint folder (single-file, sharded with an index, or a diffusers pipeline folder,
    whose denoiser component is used) or a single ``.safetensors`` file, for lazy reading.

    Example::

        with open_checkpoint("out/llama") as ckpt:
            print(ckpt.class_name, len(ckpt.shapes()))
            w = ckpt.get_tensor("model.layers.0.self_attn.v_proj.weight")
    """
    ckpt = Checkpoint(path)
    try:
        yield ckpt
    finally:
        ckpt.close()
