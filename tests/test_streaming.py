"""Streaming protection of safetensors checkpoints (docs/releases.md)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_bert, tiny_clip_text, tiny_gpt2, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_specdef import SpecDefConfig, protect, protect_checkpoint
from hf_specdef.deformation.engine import PrecisionBudgetError
from hf_specdef.deformation.record import AlreadyProtectedError
from hf_specdef.protection.in_memory import VerificationError
from hf_specdef.protection.streaming import pick_device
from hf_specdef.sites import NoSitesError
from hf_specdef.storage.checkpoint import CheckpointError, open_checkpoint

CFG = SpecDefConfig(alpha=1000.0)  # default sites, spectral (attn.vo) + axis (qk/mlp/norm)


def _save(model: torch.nn.Module, path: Path, **kw) -> Path:
    model.save_pretrained(str(path), **kw)
    return path


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _all_tensors(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory) -> Path:
    """A tiny 3-layer Llama saved in several shards, plus a tokenizer-like extra file."""
    src = _save(tiny_llama(seed=0, layers=3), tmp_path_factory.mktemp("llama") / "src", max_shard_size="100KB")
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return src


def test_sharded_source_has_cross_shard_pairs(llama_src):
    with open_checkpoint(llama_src) as ckpt:
        assert ckpt.is_sharded and len(ckpt.files) >= 3
        # layer 0's input_layernorm (norm pair producer) and its q/k/v readers lie in different shards
        norm = ckpt.shard_of("model.layers.0.input_layernorm.weight")
        q = ckpt.shard_of("model.layers.0.self_attn.q_proj.weight")
        assert norm != q
        assert ckpt.config["model_type"] == "llama" and ckpt.class_name == "LlamaForCausalLM"
        w = ckpt.get_tensor("model.layers.0.self_attn.v_proj.weight")
        assert w.shape == (32, 64) and w.dtype == torch.float32


def test_streamed_equals_in_memory_and_loads_with_stock_transformers(llama_src, tmp_path):
    before = _hashes(llama_src)
    dst = tmp_path / "dst"
    report = protect_checkpoint(llama_src, dst, CFG, progress=False)
    assert _hashes(llama_src) == before  # source untouched
    assert report.tensor_error is not None and report.tensor_error < 1e-4
    assert report.deviation is not None and report.deviation <= CFG.tolerance  # forward check ran (small model)
    assert not list(tmp_path.glob(".dst.specdef-tmp*"))  # temp folder renamed away

    # same shard names, a correct index, other files copied, record in config.json
    src_files = sorted(p.name for p in llama_src.iterdir())
    assert sorted(p.name for p in dst.iterdir()) == src_files
    assert (dst / "tokenizer_config.json").read_bytes() == (llama_src / "tokenizer_config.json").read_bytes()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    src_index = json.loads((llama_src / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == src_index["weight_map"]
    for name, fname in index["weight_map"].items():
        with safe_open(str(dst / fname), framework="pt") as f:
            assert name in f.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _all_tensors(dst).values())
    record = json.loads((dst / "config.json").read_text())["specdef"]
    assert record["num_pairs"] == len(report.results) == 21 and record["config"]["alpha"] == 1000.0

    # deformed tensors equal those of in-memory protect with the same config (same order of pairs)
    model = tiny_llama(seed=0, layers=3)
    mem_report = protect(model, CFG, progress=False)
    assert [r.pair.key for r in mem_report.results] == [r.pair.key for r in report.results]
    streamed = _all_tensors(dst)
    state = model.state_dict()
    changed = 0
    for name, t in streamed.items():
        assert t.dtype == state[name].dtype
        torch.testing.assert_close(t, state[name], atol=1e-6, rtol=0)
        changed += not torch.equal(t, _all_tensors(llama_src)[name]) if name.endswith("v_proj.weight") else 0
    assert changed == 3  # every layer's value projection was deformed

    # inflated spectrum: the top singular value of a value-projection block is ~alpha times the original
    v0 = _all_tensors(llama_src)["model.layers.0.self_attn.v_proj.weight"][:16].double()
    v1 = streamed["model.layers.0.self_attn.v_proj.weight"][:16].double()
    assert torch.linalg.matrix_norm(v1, 2) > 100 * torch.linalg.matrix_norm(v0, 2)

    # a fresh interpreter with stock transformers only (no hf_specdef import) loads it with the same outputs
    code = textwrap.dedent(f"""
        import torch, transformers
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        a = transformers.AutoModelForCausalLM.from_pretrained({str(llama_src)!r}).eval()
        b = transformers.AutoModelForCausalLM.from_pretrained({str(dst)!r}).eval()
        with torch.no_grad():
            ra, rb = a(ids).logits.double(), b(ids).logits.double()
        import sys
        assert "hf_specdef" not in sys.modules
        print((rb - ra).abs().max().item() / ra.abs().max().item())
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-4


# --------------------------------------------------------------------------------------------
# Bad inputs: one clear error, no output, source untouched
# --------------------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shard(root: Path, i: int) -> Path:
    return sorted(root.glob("model-*.safetensors"))[i]


def _set_nan(root: Path, tensor: str) -> str:
    with open_checkpoint(root) as ckpt:
        file = ckpt.shard_of(tensor)
        meta = ckpt.file_metadata[file]
    tensors = load_file(str(file))
    tensors[tensor] = tensors[tensor].clone()
    tensors[tensor].view(-1)[3] = float("nan")
    save_file(tensors, str(file), metadata=meta)
    return file.name


def _truncate(root: Path) -> str:
    f = _shard(root, 1)
    f.write_bytes(f.read_bytes()[:-100])
    return f.name


def _corrupt_header(root: Path) -> str:
    f = _shard(root, 0)
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00garbage-not-json\xff" + b"\x01" * 14
    f.write_bytes(bytes(data))
    return f.name


def _remove_shard(root: Path) -> str:
    f = _shard(root, 2)
    f.unlink()
    return f.name


def _unknown_arch(root: Path) -> str:
    cfg = json.loads((root / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mystery", ["MysteryForCausalLM"]
    (root / "config.json").write_text(json.dumps(cfg))
    return "site_map"


BAD_INPUTS = {
    "truncated": (_truncate, CheckpointError, "truncated"),
    "corrupted_header": (_corrupt_header, CheckpointError, "corrupted"),
    "missing_shard": (_remove_shard, CheckpointError, "missing"),
    "nan_untouched": (lambda r: _set_nan(r, "model.embed_tokens.weight"), CheckpointError, "NaN"),
    "nan_deformed": (lambda r: _set_nan(r, "model.layers.1.self_attn.q_proj.weight"), CheckpointError, "NaN"),
    "unknown_architecture": (_unknown_arch, NoSitesError, "register_architecture"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_error_and_no_output(case, llama_src, tmp_path):
    damage, error, words = BAD_INPUTS[case]
    src = _copy(llama_src, tmp_path / "src")
    named = damage(src)
    before = _hashes(src)
    dst = tmp_path / "out" / "dst"
    with pytest.raises(error) as info:
        protect_checkpoint(src, dst, CFG, progress=False)
    msg = str(info.value)
    assert words in msg and named in msg, msg
    if "nan" in case:
        assert ("embed_tokens" in msg) or ("q_proj" in msg)
    assert not dst.exists() and not any(p.name.startswith(".dst") for p in dst.parent.glob(".*"))
    assert _hashes(src) == before


def test_sites_matching_nothing(tmp_path):
    src = _save(tiny_bert(), tmp_path / "bert")  # BERT: post-LN, plain GELU MLP -> no mlp / norm sites
    with pytest.raises(NoSitesError, match="matches no pair"):
        protect_checkpoint(src, tmp_path / "dst", SpecDefConfig(sites=("mlp", "norm")), progress=False)
    assert not (tmp_path / "dst").exists()


def test_precision_budget_violation_and_the_safe_options(tmp_path):
    src = _save(tiny_llama(layers=2).to(torch.bfloat16), tmp_path / "bf16", max_shard_size="60KB")
    before = _hashes(src)
    with pytest.raises(PrecisionBudgetError, match="bfloat16"):
        protect_checkpoint(src, tmp_path / "dst", SpecDefConfig(sites=("attn.vo",), precision="refuse"), progress=False)
    assert not (tmp_path / "dst").exists()

    # axis mode with a power-of-two alpha is bit-exact in bf16: stays bf16, outputs identical
    rep = protect_checkpoint(src, tmp_path / "axis", SpecDefConfig(mode="axis", alpha=1024.0), progress=False)
    assert rep.deviation == 0.0 and rep.tensor_error == 0.0
    assert {t.dtype for t in _all_tensors(tmp_path / "axis").values()} == {torch.bfloat16}

    # precision="float32": the model is stored in float32 and the config says so
    rep = protect_checkpoint(src, tmp_path / "f32", SpecDefConfig(sites=("attn.vo",), precision="float32"), progress=False)
    assert rep.deviation is not None and rep.deviation <= 1e-4
    assert {t.dtype for t in _all_tensors(tmp_path / "f32").values()} == {torch.float32}
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    assert _hashes(src) == before


def test_existing_destination_already_protected_and_overwrite(llama_src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        protect_checkpoint(llama_src, dst, CFG, progress=False)
    assert (dst / "keep.txt").read_text() == "mine"
    protect_checkpoint(llama_src, dst, SpecDefConfig(sites=("attn.vo",)), overwrite=True, progress=False)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()

    with pytest.raises(AlreadyProtectedError, match="force"):
        protect_checkpoint(dst, tmp_path / "twice", CFG, progress=False)
    assert not (tmp_path / "twice").exists()
    with pytest.raises(ValueError, match="inside the source"):
        protect_checkpoint(llama_src, llama_src / "sub", CFG, progress=False)


def _bump_one_entry(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    if t.dim() == 2:
        t[3, 5] += 0.05
    return t


@pytest.mark.parametrize("sketch", [False, True], ids=["full-check", "sketch-check"])
@pytest.mark.parametrize("corrupt", [lambda t: t * 1.01, _bump_one_entry], ids=["scaled", "one-entry"])
def test_verification_catches_a_wrong_write(llama_src, tmp_path, monkeypatch, corrupt, sketch):
    from hf_specdef.protection.streaming import shards, tensor_checks

    if sketch:  # every matrix goes through the two-pass random-sketch check instead of the full float64 undo
        monkeypatch.setattr(tensor_checks, "_SMALL", 0)
    real = shards._tensor_bytes
    monkeypatch.setattr(shards, "_tensor_bytes", lambda t: real(corrupt(t)))  # a silently corrupted write
    with pytest.raises(VerificationError, match="claimed deformation"):
        protect_checkpoint(llama_src, tmp_path / "dst", CFG, progress=False)
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".dst*"))


def test_a_deformation_that_does_not_inflate_sigma_is_refused(llama_src, tmp_path, monkeypatch):
    """A decision whose M leaves sigma_1 where it was (here: faked) stops the run before its tensors are written."""
    from hf_specdef.protection.streaming import shards

    real = shards.engine.build_deformation

    def flat(plan, block, cfg, **kw):
        m, s0, _ = real(plan, block, cfg, **kw)
        return m, s0, s0

    monkeypatch.setattr(shards.engine, "build_deformation", flat)
    with pytest.raises(VerificationError, match="claimed deformation is absent"):
        protect_checkpoint(llama_src, tmp_path / "dst", CFG, progress=False)
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".dst*"))


@pytest.mark.parametrize("cfg", [CFG, SpecDefConfig(mode="axis", alpha=1000.0)], ids=["spectral", "axis-non-pow2"])
def test_sketch_check_passes_a_correct_write(llama_src, tmp_path, monkeypatch, cfg):
    from hf_specdef.protection.streaming import tensor_checks

    monkeypatch.setattr(tensor_checks, "_SMALL", 0)
    report = protect_checkpoint(llama_src, tmp_path / "dst", cfg, progress=False)
    assert report.tensor_error is not None and report.tensor_error < 1e-5


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_destination(llama_src, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="cannot"):
            protect_checkpoint(llama_src, ro / "dst", CFG, progress=False)
    finally:
        ro.chmod(0o755)
    assert not (ro / "dst").exists()


def test_unwritable_destination_parent(llama_src, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot create a temporary folder"):
        protect_checkpoint(llama_src, blocker / "dst", CFG, progress=False)
    assert blocker.read_text() == "x"


def test_full_destination_leaves_no_output(llama_src, tmp_path, monkeypatch):
    """A write failing mid-way (disk full) gives one error naming the file; the temp folder is removed."""
    from hf_specdef.protection.streaming.writer import ShardWriter

    real_write = ShardWriter.write
    calls = {"n": 0}

    def full(self, name, data):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError(28, "No space left on device")
        real_write(self, name, data)

    monkeypatch.setattr(ShardWriter, "write", full)
    with pytest.raises(CheckpointError, match="No space left") as info:
        protect_checkpoint(llama_src, tmp_path / "dst", CFG, progress=False)
    assert ".safetensors" in str(info.value)
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".dst*"))


# --------------------------------------------------------------------------------------------
# Other architectures, with and without a model prefix in the checkpoint keys
# --------------------------------------------------------------------------------------------

def _bert_mlm():
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(tiny_bert().config).eval()


ARCHS = {
    "llama (model.)": (lambda: tiny_llama(layers=2), "model.layers.0."),
    "gpt2 (transformer.)": (tiny_gpt2, "transformer.h.0."),
    "bert (no prefix)": (tiny_bert, "encoder.layer.0."),
    "bert (bert.)": (_bert_mlm, "bert.encoder.layer.0."),
    "clip_text": (tiny_clip_text, "encoder.layers.0."),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architectures_and_prefixes_match_in_memory(arch, tmp_path, monkeypatch):
    from hf_specdef.protection.streaming import tensor_checks

    monkeypatch.setattr(tensor_checks, "_SMALL", 0)  # verify every matrix on the sketch (Conv1D, fused qkv, biases...)
    build, prefix = ARCHS[arch]
    src = _save(build(), tmp_path / "src")
    streamed_keys = set(_all_tensors(src))
    assert any(k.startswith(prefix) for k in streamed_keys), sorted(streamed_keys)[:5]
    cfg = SpecDefConfig(alpha=1000.0)
    report = protect_checkpoint(src, tmp_path / "dst", cfg, progress=False)
    assert report.results and report.deviation is not None and report.deviation <= cfg.tolerance
    assert report.tensor_error is not None and report.tensor_error < 1e-5
    model = build()
    mem = protect(model, cfg, progress=False)
    assert [(r.pair.site, r.pair.layer, r.pair.group) for r in mem.results] == \
        [(r.pair.site, r.pair.layer, r.pair.group) for r in report.results]
    streamed = _all_tensors(tmp_path / "dst")
    params = dict(model.named_parameters())
    compared = 0
    for name, p in params.items():  # checkpoint keys may drop or add a model prefix
        key = next((k for k in streamed if k == name or name.endswith("." + k) or k.endswith("." + name)), None)
        if key is not None:
            torch.testing.assert_close(streamed[key], p.data, atol=1e-6, rtol=0)
            compared += 1
    assert compared >= len(streamed) - 2  # all but tied duplicates / buffers
    assert not (tmp_path / "dst" / "model.safetensors.index.json").exists()  # single file in, single file out


def test_other_weight_formats_are_not_copied(tmp_path):
    src = _save(tiny_llama(layers=1), tmp_path / "src")
    (src / "pytorch_model.bin").write_bytes(b"unprotected weights")
    shutil.copy(src / "model.safetensors", src / "consolidated.safetensors")  # a stale duplicate next to an index
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model.safetensors" for k in _all_tensors(src)}}))
    (src / "README.md").write_text("# card")
    report = protect_checkpoint(src, tmp_path / "dst", SpecDefConfig(sites=("attn.vo",)), progress=False)
    assert not (tmp_path / "dst" / "pytorch_model.bin").exists()
    assert not (tmp_path / "dst" / "consolidated.safetensors").exists()
    assert (tmp_path / "dst" / "model.safetensors.index.json").exists()
    assert (tmp_path / "dst" / "README.md").read_text() == "# card"
    assert any("pytorch_model.bin" in n for n in report.notes)


def test_default_device_is_the_cpu_even_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(None) == torch.device("cpu") and pick_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_matches_cpu(llama_src, tmp_path):
    cpu = protect_checkpoint(llama_src, tmp_path / "cpu", CFG, device="cpu", progress=False)
    gpu = protect_checkpoint(llama_src, tmp_path / "gpu", CFG, device="cuda", progress=False)
    assert gpu.device.startswith("cuda") and cpu.device == "cpu"
    a, b = _all_tensors(tmp_path / "cpu"), _all_tensors(tmp_path / "gpu")
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Diffusers pipeline folder: the denoiser is protected, the rest copied
# --------------------------------------------------------------------------------------------

def _tiny_pipeline_folder(tmp_path: Path):
    """A tiny Stable-Diffusion pipeline (the one of test_diffusers), saved as a pipeline folder."""
    pytest.importorskip("diffusers")
    from test_diffusers import tiny_pipeline

    pipe = tiny_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "src")
    return pipe, tmp_path / "src"


def test_pipeline_folder_streams_like_in_memory_with_the_pipeline_site(tmp_path):
    from test_diffusers import generate, stock_generate

    pipe, src = _tiny_pipeline_folder(tmp_path)
    reference = generate(pipe)
    before = _hashes(src)
    cfg = SpecDefConfig(alpha=1000.0)
    dst = tmp_path / "dst"
    report = protect_checkpoint(src, dst, cfg, progress=False)
    assert _hashes(src) == before
    assert report.component == "unet" and report.deviation is not None and report.deviation <= 1e-4  # composed check
    assert "pipeline" in report.results[0].pair.tags
    assert sum("pipeline" in r.pair.tags for r in report.results) == 1

    # the same tensors and records as in-memory protect(pipe) + save_pretrained
    mem_report = protect(pipe, cfg, progress=False)
    assert mem_report.results[0].pair == report.results[0].pair and len(mem_report.results) == len(report.results)
    pipe.save_pretrained(tmp_path / "mem")
    for comp in ("unet", "text_encoder"):
        streamed, in_memory = _all_tensors(dst / comp), _all_tensors(tmp_path / "mem" / comp)
        assert streamed.keys() == in_memory.keys()
        for name, t in streamed.items():
            torch.testing.assert_close(t, in_memory[name], atol=1e-6, rtol=0)
        key = "_specdef" if comp == "unet" else "specdef"  # diffusers' private key / transformers' plain one
        rec = json.loads((dst / comp / "config.json").read_text())[key]
        mem_rec = json.loads((tmp_path / "mem" / comp / "config.json").read_text())[key]
        assert rec["pipeline"]["num_pairs"] == 1
        assert {k: rec[k] for k in ("sites", "num_pairs", "hot_modules", "pipeline")} == \
            {k: mem_rec[k] for k in ("sites", "num_pairs", "hot_modules", "pipeline")}
    te_src = _all_tensors(src / "text_encoder")
    te_changed = {n for n, t in _all_tensors(dst / "text_encoder").items() if not torch.equal(t, te_src[n])}
    assert te_changed and all("final_layer_norm" in n for n in te_changed)
    after = _hashes(dst)
    for k in before:
        if k.startswith(("scheduler/", "vae/", "tokenizer/", "model_index")):
            assert after[k] == before[k], k

    # stock diffusers, in a fresh interpreter without hf_specdef, generates the same images
    (stock,) = stock_generate(tmp_path, dst)
    assert np.abs(stock - reference).max() <= 1e-4

    # `hf-specdef verify` compares pipeline folders end to end (text encoder -> unet); the unet alone is not kept
    def cli_verify(a: Path, b: Path, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hf_specdef", "verify", str(a), str(b), *flags],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    composed = cli_verify(src, dst, "--json")
    assert composed.returncode == 0, composed.stderr[-2000:]
    result = json.loads(composed.stdout)
    assert result["ok"] and result["compared"] == "text_encoder -> unet" and result["max_relative_deviation"] <= 1e-4
    alone = cli_verify(src / "unet", dst / "unet")
    assert alone.returncode == 1 and "verify the two pipeline folders" in alone.stdout, alone.stdout


def test_pipeline_site_options_and_a_broken_fold(tmp_path, monkeypatch):
    import hf_specdef.protection.streaming as streaming

    _, src = _tiny_pipeline_folder(tmp_path)
    before = _hashes(src)
    cfg = SpecDefConfig(alpha=1000.0)

    # pipeline_norm=False: the text encoder is copied as it is and the denoiser alone keeps its function
    report = protect_checkpoint(src, tmp_path / "off", cfg, pipeline_norm=False, progress=False)
    assert not any("pipeline" in r.pair.tags for r in report.results)
    assert any("disabled (pipeline_norm=False)" in n for n in report.notes)
    after = _hashes(tmp_path / "off")
    assert all(after[k] == before[k] for k in before if k.startswith("text_encoder/"))
    assert report.deviation is not None and report.deviation <= 1e-4  # the denoiser-only forward check

    # the same from the command line
    from hf_specdef.cli import main

    assert main(["protect", str(src), str(tmp_path / "cli"), "--alpha", "1000", "--no-pipeline-norm", "--no-progress",
                 "--json"]) == 0
    assert _hashes(tmp_path / "cli") == after

    # a text encoder that already carries a protection record is not folded again (unless force=True)
    src2 = tmp_path / "src2"
    shutil.copytree(src, src2)
    te_config = json.loads((src2 / "text_encoder" / "config.json").read_text())
    (src2 / "text_encoder" / "config.json").write_text(json.dumps({**te_config, "specdef": {"num_pairs": 0}}))
    report = protect_checkpoint(src2, tmp_path / "again", cfg, progress=False)
    assert not any("pipeline" in r.pair.tags for r in report.results)
    assert any("already carries a protection record" in n for n in report.notes)

    # pipeline_norm=True where the site does not apply: one clear error, no output
    with pytest.raises(ValueError, match="pipeline_norm=True.*'norm' is not among cfg.sites") as err:
        protect_checkpoint(src, tmp_path / "req", SpecDefConfig(alpha=1000.0, sites=("attn.vo",)), pipeline_norm=True,
                           progress=False)
    assert str(err.value).count("pipeline-level norm site") == 1, err.value
    assert not (tmp_path / "req").exists()

    # a fold whose text-encoder half is lost: each tensor holds its recorded steps, but the composed check fails
    real = streaming.plan_fold

    def broken(*args, **kwargs):
        fold, why = real(*args, **kwargs)
        fold.te_ops = {}
        return fold, why

    monkeypatch.setattr(streaming, "plan_fold", broken)
    with pytest.raises(VerificationError, match="text encoder -> unet"):
        protect_checkpoint(src, tmp_path / "broken", cfg, progress=False)
    assert not (tmp_path / "broken").exists() and not list(tmp_path.glob(".broken*"))
    assert _hashes(src) == before


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"])
def test_nan_in_a_consumer_is_named_on_the_sketch_path(name, llama_src, tmp_path, monkeypatch):
    """Transformed chunks are not scanned for NaN when verifying: the sketch check sees it and names the tensor."""
    from hf_specdef.protection.streaming import tensor_checks

    monkeypatch.setattr(tensor_checks, "_SMALL", 0)
    src = _copy(llama_src, tmp_path / "src")
    shard = _set_nan(src, name)
    with pytest.raises(CheckpointError, match="NaN") as info:
        protect_checkpoint(src, tmp_path / "dst", CFG, progress=False)
    assert name in str(info.value) and shard in str(info.value)
    assert not (tmp_path / "dst").exists()


def test_intra_op_threads_lowered_while_streaming_and_restored(llama_src, tmp_path, monkeypatch):
    from hf_specdef.protection.streaming import resources, shards

    user = torch.get_num_threads()
    torch.set_num_threads(2)  # what a 2-core machine starts with
    try:
        with resources.intra_op_threads(5):  # never raised
            assert torch.get_num_threads() == 2
        seen = []
        real = shards.ShardStreamer._write_shard

        def spy(self, *args):
            seen.append(torch.get_num_threads())
            return real(self, *args)

        monkeypatch.setattr(shards, "cpu_count", lambda: 2)  # 2 cores for 2 shard threads: one intra-op thread each
        monkeypatch.setattr(shards.ShardStreamer, "_write_shard", spy)
        protect_checkpoint(llama_src, tmp_path / "dst", CFG, progress=False)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), resources.intra_op_threads(1):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(user)
