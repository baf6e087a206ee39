"""The release rule: a protected folder holds the protected checkpoint and the files the rule lets through, never
unprotected weights (at any depth, in any format) nor anything reached outside the source folder."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import save_file

from hf_specdef import SpecDefConfig, protect_checkpoint
from hf_specdef.publishing.errors import PublishError
from hf_specdef.storage.checkpoint import CheckpointError
from hf_specdef.storage.release_files import check_release_folder, plan_copies, weight_kind

CFG = SpecDefConfig(alpha=1000.0)


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def plain_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("plain") / "src"
    tiny_llama(seed=0, layers=2).save_pretrained(str(src))
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return src


def _hostile(plain_src: Path, root: Path) -> tuple[Path, Path]:
    """A copy of the tiny checkpoint with what real repositories and snapshots carry beside it, and an outside
    folder it links to."""
    src, outside = root / "src", root / "outside"
    shutil.copytree(plain_src, src)
    weights = {"w": torch.randn(4, 4)}
    (src / "original").mkdir()
    shutil.copy2(src / "model.safetensors", src / "original" / "model.safetensors")  # the unprotected model
    torch.save(weights, src / "original" / "consolidated.00.pth")
    (src / "original" / "params.json").write_text('{"dim": 64}')
    ckpt = src / "checkpoint-10"
    ckpt.mkdir()
    shutil.copy2(src / "model.safetensors", ckpt / "model.safetensors")
    torch.save(weights, ckpt / "optimizer.pt")
    torch.save(weights, ckpt / "rng_state")  # no suffix: recognised by its bytes
    (ckpt / "trainer_state.json").write_text('{"global_step": 10}')
    save_file(weights, str(src / "consolidated.safetensors"))  # a stray second safetensors beside the checkpoint
    (src / "pytorch_model.bin").write_bytes((src / "original" / "consolidated.00.pth").read_bytes())
    (src / ".git" / "lfs" / "objects").mkdir(parents=True)
    shutil.copy2(src / "model.safetensors", src / ".git" / "lfs" / "objects" / "ab12")
    outside.mkdir()
    (outside / "secret.txt").write_text("token=hf_secret")
    shutil.copy2(src / "model.safetensors", outside / "model.safetensors")
    os.symlink(outside, src / "linked_folder")
    os.symlink(outside / "secret.txt", src / "secret.txt")
    os.symlink(src / "tokenizer_config.json", src / "tokenizer_alias.json")  # a link inside the source: fine
    return src, outside


def test_protected_release_holds_no_unprotected_weights_and_nothing_from_outside(plain_src, tmp_path, caplog):
    src, outside = _hostile(plain_src, tmp_path)
    source_weights = {_digest(p) for p in _files(src).values() if p.is_file() and weight_kind(p)}
    source_weights |= {_digest(p) for p in _files(outside).values()}
    dst = tmp_path / "dst"
    with caplog.at_level("WARNING", logger="hf_specdef"):
        report = protect_checkpoint(src, dst, CFG, progress=False)
    out = _files(dst)
    # no byte-identical copy of any source weight file, nothing from outside, no links
    assert not [r for r, p in out.items() if _digest(p) in source_weights]
    assert not [r for r, p in out.items() if p.is_symlink()]
    assert "token=hf_secret" not in "".join(p.read_text(errors="ignore") for p in out.values())
    weights_in_release = sorted(r for r, p in out.items() if weight_kind(p))
    assert weights_in_release == ["model.safetensors"]
    # what is not weights is kept
    assert {"config.json", "tokenizer_config.json", "tokenizer_alias.json", "original/params.json",
            "checkpoint-10/trainer_state.json"} <= set(out)
    # and every file kept out is named, in the report and in a warning
    dropped = {"original/model.safetensors", "original/consolidated.00.pth", "checkpoint-10/model.safetensors",
               "checkpoint-10/optimizer.pt", "checkpoint-10/rng_state", "consolidated.safetensors", "pytorch_model.bin",
               "secret.txt", "linked_folder/", ".git/"}
    for rel in dropped:
        assert any(n.startswith(f"not copied: {rel} (") for n in report.notes), rel
        assert f"not copied: {rel} (" in caplog.text, rel


def test_hub_cache_snapshot_links_are_followed(plain_src, tmp_path):
    """snapshot_download lays every file out as a link into the cache repository's blobs/ folder."""
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in plain_src.iterdir():
        blob = blobs / _digest(f)
        shutil.copy2(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    dst = tmp_path / "dst"
    protect_checkpoint(snap, dst, CFG, progress=False)
    assert (dst / "tokenizer_config.json").read_bytes() == (plain_src / "tokenizer_config.json").read_bytes()
    assert not (dst / "tokenizer_config.json").is_symlink()
    assert _digest(dst / "model.safetensors") != _digest(plain_src / "model.safetensors")  # protected


def test_plan_copies_names_every_kind_of_drop(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "weights.npz").write_bytes(b"PK\x03\x04rest")
    (src / "sub" / "renamed").write_bytes(b"GGUF\x03\x00")
    (src / "notes.md").write_text("# hello")
    (src / "model.safetensors.index.json").write_text("{}")
    os.symlink(tmp_path / "missing", src / "dangling")
    plan = plan_copies(src, written=set())
    assert [str(rel) for _, rel in plan.copies] == ["notes.md"]
    why = dict(plan.dropped)
    assert set(why) == {"sub/weights.npz", "sub/renamed", "model.safetensors.index.json", "dangling"}
    assert "GGUF" in why["sub/renamed"] and "broken" in why["dangling"]


def test_push_refuses_a_folder_with_unprotected_weights(plain_src, tmp_path, monkeypatch):
    from hf_specdef.publishing import hub

    dst = tmp_path / "dst"
    protect_checkpoint(plain_src, dst, CFG, progress=False)
    assert check_release_folder(dst) == []
    shutil.copy2(plain_src / "model.safetensors", dst / "backup.safetensors")
    (dst / "deep").mkdir()
    torch.save({"w": torch.ones(2)}, dst / "deep" / "state")
    bad = check_release_folder(dst)
    assert bad == ["backup.safetensors (a .safetensors file)", "deep/state (a zip archive (torch.save, .keras, .npz))"]

    class NoHub:  # the check comes before any network call
        def __init__(self, *a, **kw):
            raise AssertionError("HfApi must not be reached")

    monkeypatch.setattr("huggingface_hub.HfApi", NoHub)
    with pytest.raises(PublishError, match="backup.safetensors"):
        hub.push_folder(dst, "org/tiny-specdef", private=True, token="hf_x", commit_message="m")


def test_destination_that_is_a_link_and_source_that_is_a_file_are_refused(plain_src, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    os.symlink(real, link)
    with pytest.raises(FileExistsError, match="symbolic link"):
        protect_checkpoint(plain_src, link, CFG, overwrite=True, progress=False)
    assert link.is_symlink() and real.is_dir() and not list(real.iterdir())
    assert not [p for p in tmp_path.iterdir() if ".specdef-" in p.name]
    with pytest.raises(CheckpointError, match="is a file; pass the checkpoint folder"):
        protect_checkpoint(plain_src / "model.safetensors", tmp_path / "out", CFG, progress=False)


def test_pipeline_release_copies_unprotected_components_but_no_stray_weights(tmp_path):
    """The other components of a pipeline are copied unchanged on purpose (the release says so); weights anywhere
    else -- beside the protected denoiser, or deeper -- are not."""
    from test_streaming import _tiny_pipeline_folder

    _, src = _tiny_pipeline_folder(tmp_path)
    denoiser = "unet" if (src / "unet").is_dir() else "transformer"
    (src / denoiser / "original").mkdir()
    shutil.copy2(next((src / denoiser).glob("*.safetensors")), src / denoiser / "original" / "weights.safetensors")
    torch.save({"w": torch.ones(2)}, src / denoiser / "diffusion_pytorch_model.bin")
    (src / "vae" / "old").mkdir()
    torch.save({"w": torch.ones(2)}, src / "vae" / "old" / "vae.pt")
    report = protect_checkpoint(src, tmp_path / "dst", CFG, progress=False)
    dst = tmp_path / "dst"
    vae_weights = sorted(p.name for p in (src / "vae").glob("*.safetensors"))
    assert vae_weights and sorted(p.name for p in (dst / "vae").glob("*.safetensors")) == vae_weights
    for rel in (f"{denoiser}/original/weights.safetensors", f"{denoiser}/diffusion_pytorch_model.bin", "vae/old/vae.pt"):
        assert not (dst / rel).exists(), rel
        assert any(n.startswith(f"not copied: {rel} (") for n in report.notes), rel
    assert check_release_folder(dst) == []
