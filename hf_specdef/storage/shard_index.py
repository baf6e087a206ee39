"""Validation of a ``*.safetensors.index.json`` shard index, as strict as the headers
(:mod:`hf_specdef.storage.safetensors_header`): a JSON object without repeated keys, a non-empty ``weight_map``
of tensor name -> plain shard file name inside the folder, and, once the shards are read, an index that lists every
tensor of every shard in the shard that holds it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from hf_specdef.storage.safetensors_header import FIX, INDEX_FIX, CheckpointError, _kind, _short, strict_json_loads


def _plain_shard_name(name: str) -> bool:
    return (name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name
            and PurePosixPath(name).name == name and PureWindowsPath(name).name == name
            and not os.path.isabs(name) and name.endswith(".safetensors"))


def load_index(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Read and validate a ``*.safetensors.index.json`` file.

    Args:
        path: the index file.

    Returns:
        ``(index, weight_map)``: the parsed index and its tensor name -> shard file name map.

    Raises:
        CheckpointError: not UTF-8 JSON, a repeated key, not an object, ``weight_map`` missing, empty or not an
            object of string -> string, a shard name that is not a plain ``.safetensors`` file name inside the
            folder (``/``, ``\\``, ``..``, an absolute path), or ``metadata`` not an object.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: index file is missing; {INDEX_FIX}.") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: corrupted index: not UTF-8 (byte {e.start}); {INDEX_FIX}.") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e}).") from None
    try:
        index = strict_json_loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupted index: {e}; {INDEX_FIX}.") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{path}: corrupted index: it is {_kind(index)}, not a JSON object; {INDEX_FIX}.")
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        got = "no 'weight_map'" if "weight_map" not in index else f"'weight_map' {_short(wm)}, not a non-empty object"
        raise CheckpointError(f"{path}: corrupted index: it has {got}; {INDEX_FIX}.")
    for name, fname in wm.items():
        if not isinstance(fname, str) or not _plain_shard_name(fname):
            raise CheckpointError(
                f"{path}: corrupted index: weight_map puts tensor {name!r} in {_short(fname)}, not a plain "
                f".safetensors file name inside the checkpoint folder (no '/', '\\', '..' or absolute path); "
                f"{INDEX_FIX}.")
    if "metadata" in index and not isinstance(index["metadata"], dict):
        raise CheckpointError(f"{path}: corrupted index: 'metadata' is {_short(index['metadata'])}, not an object; "
                              f"{INDEX_FIX}.")
    return index, wm


def check_index_covers(index_path: str | os.PathLike[str], weight_map: Mapping[str, str],
                       shard_of: Mapping[str, str]) -> None:
    """Check an index against the shards' headers, both ways.

    Args:
        index_path: the index file, named in errors.
        weight_map: its tensor name -> shard file name map (from :func:`load_index`).
        shard_of: tensor name -> file name of the shard whose header holds it, over every shard the index names.

    Raises:
        CheckpointError: the index puts a tensor in a shard that does not hold it, or a shard holds a tensor
            the index does not list.
    """
    for name, fname in weight_map.items():
        if shard_of.get(name) != fname:
            raise CheckpointError(f"{index_path} puts tensor {name!r} in {fname}, which does not hold it "
                                  f"(corrupted shard or stale index); {FIX}.")
    for name, fname in shard_of.items():
        if name not in weight_map:
            raise CheckpointError(f"{index_path} does not list tensor {name!r}, which shard {fname} holds "
                                  f"(stale index or extra tensor); {FIX}.")
