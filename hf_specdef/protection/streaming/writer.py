"""``ShardWriter``: one safetensors file written tensor by tensor, never held in memory whole."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class ShardWriter:
    """Writes one safetensors file tensor by tensor, in a fixed order, without holding the shard in memory."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, str, tuple[int, ...], int]],
                 metadata: Mapping[str, str] | None) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self.sizes: list[tuple[str, int]] = []
        for name, dtype, shape, nbytes in entries:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.sizes.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.path, self.total, self.pos, self.written = path, offset, 0, 0
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        # sized in full up front: what is written can be mapped and read back (verified) while the rest follows
        self.file.truncate(8 + len(raw) + offset)

    def write(self, name: str, data: Any) -> None:
        """Append (part of) the bytes of the current tensor ``name``."""
        expected, size = self.sizes[self.pos]
        if name != expected:
            raise RuntimeError(f"ShardWriter {self.path}: got tensor {name!r}, expected {expected!r}")
        n = memoryview(data).nbytes
        self.file.write(data)
        self.written += n
        if self.written == size:
            self.pos, self.written = self.pos + 1, 0
        elif self.written > size:
            raise RuntimeError(f"ShardWriter {self.path}: tensor {name!r} got {self.written} bytes, expected {size}")

    def close(self) -> None:
        self.file.close()
        if self.pos != len(self.sizes):
            raise RuntimeError(f"ShardWriter {self.path}: only {self.pos}/{len(self.sizes)} tensors written")
