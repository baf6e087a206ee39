"""What a protected release may contain besides the tensors hf-specdef writes: the release rule.

A release is exactly the model it claims to protect. The protected checkpoint's shards, index and
``config.json`` are written by hf-specdef; every other file of the source folder is *copied* only if
the rule below lets it through, and each file it keeps out is named (a warning, and a note in the
report):

1. **No other weights.** A file that holds weights -- by its suffix (``.safetensors``, ``.bin``,
   ``.pt``, ``.pth``, ``.ckpt``, ``.gguf``, ``.npz``, ``.onnx``, ...; and weight indexes such as
   ``*.safetensors.index.json``) or by its first bytes (a safetensors header, a zip/pickle archive as
   ``torch.save`` writes, GGUF, HDF5, NumPy) -- is dropped, **at any depth** (Meta's ``original/``,
   a trainer's ``checkpoint-*/`` folders, a stray ``consolidated.safetensors`` beside the shards).
   The one exception: in a diffusers pipeline folder, the weights of the *other* components named by
   ``model_index.json`` (``vae/``, ``text_encoder/`` when it is not folded, ...), directly in their
   folder; the release states that those components are copied unchanged.
2. **Nothing from outside the source.** Folders are never entered through a symbolic link. A file
   that is a link is followed only when its target lies inside the source folder, or in the
   ``blobs/`` folder of the Hugging Face cache repository the source is a snapshot of (that is how
   ``snapshot_download`` lays out every file); any other link is dropped.
3. **No version-control or tool state.** Hidden folders (``.git/`` -- whose LFS objects are the
   original weights --, ``.cache/``, ``.huggingface/``, hf-specdef's own temporary folders) are not
   entered.

Example::

    from hf_specdef.storage.release_files import plan_copies

    plan = plan_copies(Path("Llama-3.2-1B"), written=set())
    for rel, why in plan.dropped:
        print(f"not copied: {rel} ({why})")
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

# suffixes of files that hold weights (lower case); ".index.json" files of weights are matched separately
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".hdf5", ".msgpack", ".gguf", ".ggml", ".onnx", ".npz",
    ".npy", ".pkl", ".pickle", ".tflite", ".ot", ".keras", ".mlmodel", ".joblib", ".nemo", ".distcp", ".tar",
)
# the file a stock loader reads from a folder without an index (transformers, diffusers)
STANDARD_WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json", ".pth.index.json", ".pt.index.json")
# the first bytes of formats that hold tensors whatever the file is called
_MAGIC = (
    (b"PK\x03\x04", "a zip archive (torch.save, .keras, .npz)"),
    (b"GGUF", "a GGUF file"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"\x93NUMPY", "a NumPy array"),
)
_PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass
class CopyPlan:
    """The files of a source folder that go into the release, and those kept out.

    Attributes:
        copies: ``(source file, path relative to the source)`` of every file to copy.
        dropped: ``(path relative to the source, why)`` of every file or folder kept out.
    """

    copies: list[tuple[Path, Path]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)

    def notes(self) -> list[str]:
        """One line per file kept out, for a report."""
        return [f"not copied: {rel} ({why})" for rel, why in self.dropped]


def weight_kind(path: Path) -> str | None:
    """Why ``path`` counts as a weight file (its suffix, or its first bytes), or ``None``.

    Args:
        path: a regular file (a link is read through).

    Returns:
        A short reason such as ``"a .pth file"`` or ``"a safetensors file"``; ``None`` for other files.
    """
    name = path.name.lower()
    if name.endswith(WEIGHT_INDEX_SUFFIXES):
        return "an index of weight files"
    for suffix in WEIGHT_SUFFIXES:
        if name.endswith(suffix):
            return f"a {suffix} file"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head[:2] in _PICKLE_PROTOCOLS:
        return "a pickle (torch.save's legacy format)"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (100 << 20):
        return "a safetensors file"
    return None


def hub_blobs_of(src: Path) -> Path | None:
    """The ``blobs/`` folder of the Hugging Face cache repository that ``src`` is (inside) a snapshot of, if any.

    A cache snapshot is ``<cache>/models--org--name/snapshots/<revision>/...``; its files are links into
    ``<cache>/models--org--name/blobs/``.
    """
    src = src.resolve()
    for parent in (src, *src.parents):
        if parent.parent.name == "snapshots":
            blobs = parent.parent.parent / "blobs"
            return blobs if blobs.is_dir() else None
    return None


def _link_target_allowed(link: Path, src: Path, blobs: Path | None) -> str | None:
    """``None`` if the link ``link`` may be followed, else why not."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):
        return "a broken or looping symbolic link"
    if target == src or src in target.parents:
        return None
    if blobs is not None and target.parent == blobs:
        return None
    return f"a symbolic link to {target}, outside the source folder"


def plan_copies(src: Path, written: Collection[Path], weight_folders: Iterable[Path] = ()) -> CopyPlan:
    """Apply the release rule (module docstring) to the source folder ``src``.

    Args:
        src: the source checkpoint or pipeline folder.
        written: files of ``src`` (resolved) that hf-specdef writes itself (the protected shards, their index and
            ``config.json``): neither copied nor reported.
        weight_folders: folders of ``src`` whose weight files are copied unchanged on purpose (the unprotected
            components of a diffusers pipeline).

    Returns:
        A :class:`CopyPlan`.
    """
    src = src.absolute()
    real_src = src.resolve()
    blobs = hub_blobs_of(src)
    allowed = {Path(f).resolve() for f in weight_folders}
    written = {Path(f).resolve() for f in written}
    plan = CopyPlan()
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        d = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            sub = d / name
            rel = sub.relative_to(src)
            if sub.is_symlink():
                plan.dropped.append((f"{rel}/", "a symbolic link to a folder: folders are never entered through links"))
            elif name.startswith("."):
                plan.dropped.append((f"{rel}/", "a hidden folder (version control, caches or temporary files)"))
            else:
                keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = d / name
            rel = p.relative_to(src)
            if p.is_symlink():
                why = _link_target_allowed(p, real_src, blobs)
                if why is not None:
                    plan.dropped.append((str(rel), why))
                    continue
            if not p.is_file():
                plan.dropped.append((str(rel), "not a regular file"))
                continue
            if p.resolve() in written or p.absolute() in written:
                continue
            kind = weight_kind(p)
            if kind is not None and p.parent.resolve() not in allowed:
                plan.dropped.append((str(rel), f"{kind}: weights that were not protected would ship in the release"))
                continue
            plan.copies.append((p, rel))
    return plan


def unexpected_weights(folder: Path, expected: Collection[Path], weight_folders: Iterable[Path] = ()) -> list[str]:
    """Weight files in ``folder`` (at any depth, links included) other than ``expected`` and those directly in
    ``weight_folders``: what a release must not carry. Used before a release is pushed.

    Args:
        folder: a written release folder.
        expected: the weight files hf-specdef wrote there (protected shards and index).
        weight_folders: folders whose weight files are unprotected components copied on purpose.

    Returns:
        The offending paths relative to ``folder`` (empty when the folder follows the rule), each with why.
    """
    folder = folder.absolute()
    expected = {Path(p).absolute() for p in expected}
    allowed = {Path(f).absolute() for f in weight_folders}
    bad = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        d = Path(dirpath)
        for name in dirnames:
            if (d / name).is_symlink():
                bad.append(f"{(d / name).relative_to(folder)}/ (a symbolic link to a folder)")
        for name in filenames:
            p = d / name
            if p.is_symlink():
                bad.append(f"{p.relative_to(folder)} (a symbolic link)")
                continue
            if p.absolute() in expected or p.parent.absolute() in allowed:
                continue
            kind = weight_kind(p)
            if kind is not None:
                bad.append(f"{p.relative_to(folder)} ({kind})")
    return sorted(bad)


def _shards_of(root: Path) -> set[Path]:
    """The safetensors files (and index) of the checkpoint in ``root``: those its index names, else the file a stock
    loader reads (``model.safetensors``, ``diffusion_pytorch_model.safetensors``), else every top-level
    ``*.safetensors``."""
    indexes = sorted(root.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        try:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            weight_map = {}
        names = {v for v in weight_map.values() if isinstance(v, str) and "/" not in v and "\\" not in v}
        return {indexes[0].absolute()} | {(root / n).absolute() for n in names}
    standard = [root / n for n in STANDARD_WEIGHT_NAMES if (root / n).is_file()]
    return {p.absolute() for p in (standard or root.glob("*.safetensors"))}


def _has_record(root: Path) -> bool:
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("specdef" in config or "_specdef" in config)


def release_layout(folder: Path) -> tuple[set[Path], list[Path]]:
    """The weight files a written release folder may hold: ``(expected files, folders of unprotected components)``.

    A model folder holds its safetensors checkpoint only. A diffusers pipeline folder (``model_index.json``) holds,
    in each component folder, that component's safetensors checkpoint; a component that carries no protection
    record was copied unchanged and may hold its weights in any format.
    """
    folder = folder.absolute()
    if not (folder / "model_index.json").is_file():
        return _shards_of(folder), []
    expected: set[Path] = set()
    unprotected: list[Path] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()):
        expected |= _shards_of(sub)
        if not _has_record(sub):
            unprotected.append(sub)
    return expected, unprotected


def check_release_folder(folder: Path) -> list[str]:
    """What a written release folder holds that the release rule forbids (:func:`unexpected_weights` on
    :func:`release_layout`); empty when it may be published."""
    expected, unprotected = release_layout(folder)
    return unexpected_weights(folder, expected, unprotected)
