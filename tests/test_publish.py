"""Hub publication: dry runs write a stock-loadable folder with a model card; the push goes through HfApi."""

from __future__ import annotations

import ast
import datetime
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import hf_specdef
from hf_specdef import SpecDefConfig
from hf_specdef.publishing.publish import PublishError, publish, template_path

FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdefXYZ"
REPO = Path(__file__).resolve().parents[1]
SOURCE_README = "---\nlicense: apache-2.0\nlanguage: en\n---\n# tiny llama\n"


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama checkpoint with a source card (license) and the reference logits of its probe batch."""
    root = tmp_path_factory.mktemp("publish_src")
    model = tiny_llama()
    src = root / "tiny-llama"
    model.save_pretrained(src)
    (src / "README.md").write_text(SOURCE_README)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ref = root / "reference.pt"
    torch.save({"input_ids": ids, "logits": logits}, ref)
    return src, ref


def _all_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if "specdef" in p.name and p.name.startswith(".")]


STOCK_SCRIPT = """
import sys
sys.modules["hf_specdef"] = None  # hf-specdef is not installed as far as this process knows
try:
    import hf_specdef  # noqa: F401
    raise SystemExit("hf_specdef importable")
except ImportError:
    pass
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM
ref = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    out = model(input_ids=ref["input_ids"]).logits
dev = float((out - ref["logits"]).abs().max() / ref["logits"].abs().max())
card = ModelCard.load(sys.argv[1] + "/README.md")
print("DEVIATION", dev, type(model).__name__, card.data.library_name)
"""


def _run(args: list[str], env_extra: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """A fresh interpreter (offline)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_cli_dry_run_offline_stock_loadable_and_no_token_leak(llama_src, tmp_path, monkeypatch, capfd, caplog):
    from huggingface_hub import constants

    from hf_specdef.cli import main

    src, ref = llama_src
    out = tmp_path / "out"
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: no network needed for a dry run
    caplog.set_level("DEBUG", logger="hf_specdef")
    rc = main(["publish", "--model", str(src), "--repo-id", "me/tiny-llama-specdef", "--base-model", "me/tiny-llama",
               "--dry-run", "--output-dir", str(out), "--json"])
    proc = capfd.readouterr()
    assert rc == 0, proc.err[-3000:]
    result = json.loads(proc.out)
    assert result["dry_run"] and not result["pushed"] and result["folder"] == str(out)
    dev = result["max_relative_deviation"]
    assert 0 <= dev <= 1e-4
    assert result["checks"][0]["deformed"] == 14 and not result["checks"][0]["not_deformed"]
    # the token never appears anywhere
    assert FAKE_TOKEN not in proc.out + proc.err + caplog.text
    assert FAKE_TOKEN not in _all_text(out)
    # a fresh process without hf_specdef loads it with stock transformers, same function
    stock = _run(["-c", STOCK_SCRIPT, str(out), str(ref)], {}, tmp_path)
    assert stock.returncode == 0, stock.stderr[-3000:]
    line = next(x for x in stock.stdout.splitlines() if x.startswith("DEVIATION"))
    _, stock_dev, cls, lib = line.split()
    assert float(stock_dev) <= 1e-4 and cls == "LlamaForCausalLM" and lib == "transformers"
    # and it is really deformed: a top singular value inflated by ~alpha in a value projection
    from safetensors.torch import load_file

    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    key = "model.layers.0.self_attn.v_proj.weight"
    s0, s1 = (torch.linalg.svdvals(x[key][:16].double())[0] for x in (a, b))
    assert 900 < float(s1 / s0) < 1100
    _no_leftovers(tmp_path)


def test_card_metadata_and_content(llama_src, tmp_path, caplog):
    from huggingface_hub import ModelCard

    src, _ = llama_src
    out = tmp_path / "card"
    caplog.set_level("DEBUG", logger="hf_specdef")
    res = publish(src, "me/tiny-llama-specdef", SpecDefConfig(record="full"), dry_run=True, output_dir=out,
                  base_model="me/tiny-llama", progress=False)
    card = ModelCard.load(out / "README.md")
    d = card.data
    assert d.base_model == "me/tiny-llama"
    assert d.license == "apache-2.0"  # carried from the source card
    assert d.language == "en"
    assert d.library_name == "transformers" and d.pipeline_tag == "text-generation"
    assert "specdef" in d.tags
    text = card.text
    dev = res.max_relative_deviation
    assert f"{dev:.2e}" in text and "float32" in text  # the measured deviation and its dtype
    assert "undo the deformation by reparameterization" in text and "linear in model size" in text
    assert "Only the deformed parameters are slowed" in text and "not slowed at all" in text
    # no red team on this release: the card says so plainly; the SmolLM2 figures (once quoted as "for scale", which
    # read as this release's) appear only in the paragraph labelled as reference measurements on another model
    assert "**No fine-tuning resistance was measured on this release**" in text and "much slower" not in text
    reference = text.split("*Reference measurements, not this release:*", 1)[1].split("\n\n", 1)[0]
    assert "0.62×" in reference and "0.62×" not in text.replace(reference, "")
    assert f"{res.checks[0].coverage:.1%}" in text  # coverage from inspect_model
    assert "arXiv:2602.18868" in text and "Limits of Convergence-Rate Control for Open-Weight Safety" in text
    # the snippet now loads the release in its exact dtype (float32-only here)
    assert "LlamaForCausalLM.from_pretrained(\"me/tiny-llama-specdef\", dtype=torch.float32)" in text
    # record level full: the per-pair table; the config.json record is the one the card describes
    record = json.loads((out / "config.json").read_text())["specdef"]
    assert "| 0 | attn.vo | 0 | spectral | 1000 |" in text and len(record["pairs"]) == record["num_pairs"] == 14
    assert "| alpha requested → factors used | 1000 → 1000 |" in text  # spectral in float32: alpha used as asked
    assert record["max_relative_deviation"] is not None
    # a float32-only (spectral) release: the first paragraph says which dtypes break it, measured at publish time
    first = text.split("## What was done")[0]
    measured = record["precision"]["measured"]
    assert record["precision"]["float32_only"] and set(measured) == {"bfloat16", "float16"}
    assert all(not isinstance(v, float) or v > 1e-2 for v in measured.values())  # broken in both
    assert "Load it in float32" in first and "bfloat16: max relative output deviation" in first
    assert "bit-exact in bfloat16" in first and res.downcast == {k: float(v) if v != "non-finite" else float("inf")
                                                                 for k, v in measured.items()}
    assert "precision (requested → used) | auto → spectral" in text
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_bf16_release_card_says_exact_and_layers_sorted_numerically(tmp_path):
    from huggingface_hub import ModelCard

    from hf_specdef.publishing.card import _merge_records

    src = tmp_path / "bf16"
    tiny_llama(layers=12).to(torch.bfloat16).save_pretrained(src)
    res = publish(src, "me/bf16-specdef", SpecDefConfig(), dry_run=True, output_dir=tmp_path / "out",
                  base_model="me/bf16", progress=False)
    text = ModelCard.load(tmp_path / "out" / "README.md").text
    first = text.split("## What was done")[0]
    assert "This protection is exact in float32, bfloat16" in first and "bfloat16: 0 (bit-exact)." in first
    assert res.downcast["bfloat16"] == 0.0 and "Load it in float32" not in text
    assert "**Do not load it in float16** (float16: **" in first  # not exact there: stated with its measured figure
    assert "| layers (deformed) | 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 |" in text
    assert "auto → axis" in text
    merged = _merge_records({"unet": {"layers": [10, 2, 1]}, "text_encoder": {"layers": [11, 3]}})
    assert merged["layers"] == ["text_encoder:3", "text_encoder:11", "unet:1", "unet:2", "unet:10"]


def test_record_none_discloses_nothing_but_still_checks(llama_src, tmp_path):
    from huggingface_hub import ModelCard

    src, _ = llama_src
    out = tmp_path / "none"
    res = publish(src, "me/x", SpecDefConfig(record="none"), dry_run=True, output_dir=out, progress=False)
    assert "specdef" not in json.loads((out / "config.json").read_text())
    text = ModelCard.load(out / "README.md").text
    # the table row "alpha (inflation factor)" became "alpha requested → factors used" (what was applied, too)
    assert "chose not to disclose" in text and "alpha requested" not in text
    assert res.checks[0].claimed and res.checks[0].deformed == 14  # claims from the protection report


def test_refuses_when_verification_fails(llama_src, tmp_path, monkeypatch):
    """A protected folder whose stock-loaded outputs deviate is never published (nor left behind)."""
    from safetensors.torch import load_file, save_file

    import hf_specdef.publishing.publish as pub

    src, _ = llama_src
    real = pub.protect_folder

    def broken(src, dst, cfg, **kw):  # deformed as claimed, but the function is damaged
        report = real(src, dst, cfg, **kw)
        tensors = load_file(str(dst / "model.safetensors"))
        tensors["model.layers.1.mlp.down_proj.weight"] *= 1.01
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return report

    monkeypatch.setattr(pub, "protect_folder", broken)
    out = tmp_path / "refused"
    with pytest.raises(PublishError, match="verification failed.*deviate"):
        publish(src, "me/x", SpecDefConfig(), dry_run=True, output_dir=out, progress=False)
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_refuses_claimed_but_not_deformed(llama_src, tmp_path, monkeypatch):
    """docs/releases.md: a folder whose record claims a protection its weights do not show is never published."""
    import shutil

    import hf_specdef.publishing.publish as pub

    src, _ = llama_src

    def forgot_to_protect(src, dst, cfg, **kw):  # e.g. a stock loader silently ignored specdef_config=
        shutil.copytree(src, dst)
        conf = json.loads((dst / "config.json").read_text())
        conf["specdef"] = {"format": "hf-specdef/1", "config": cfg.to_dict(), "sites": ["attn.vo"], "layers": [0],
                           "num_pairs": 2, "modes": ["spectral"], "hot_modules": ["model.layers.0.self_attn.o_proj"]}
        (dst / "config.json").write_text(json.dumps(conf))

    monkeypatch.setattr(pub, "protect_folder", forgot_to_protect)
    out = tmp_path / "claimed"
    with pytest.raises(PublishError, match="no deformation"):
        publish(src, "me/x", SpecDefConfig(), dry_run=True, output_dir=out, progress=False)
    assert not out.exists()
    _no_leftovers(tmp_path)


class FakeApi:
    calls: list[tuple[str, dict]] = []
    fail_with: str | None = None

    def __init__(self, token=None, **kw):
        FakeApi.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        if FakeApi.fail_with:
            raise RuntimeError(FakeApi.fail_with)

    def upload_folder(self, *, folder_path, repo_id, commit_message=None, **kw):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        text = _all_text(Path(folder_path))
        FakeApi.calls.append(("upload_folder", {"folder_path": folder_path, "repo_id": repo_id,
                                                "commit_message": commit_message, "files": files,
                                                "token_in_files": FAKE_TOKEN in text, **kw}))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    FakeApi.calls, FakeApi.fail_with = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    return FakeApi


def test_push_path_with_fake_hfapi(llama_src, tmp_path, fake_hub, capsys, caplog):
    src, _ = llama_src
    caplog.set_level("DEBUG", logger="hf_specdef")
    out = tmp_path / "kept"
    res = publish(src, "me/tiny-llama-specdef", SpecDefConfig(alpha=1024.0, mode="axis"), private=True, output_dir=out,
                  commit_message="Protect tiny llama", progress=False)
    names = [c[0] for c in fake_hub.calls]
    assert names == ["init", "create_repo", "upload_folder"]
    assert fake_hub.calls[0][1]["token"] == FAKE_TOKEN  # handed to the client, and nowhere else
    assert fake_hub.calls[1][1] == {"repo_id": "me/tiny-llama-specdef", "private": True, "exist_ok": True}
    up = fake_hub.calls[2][1]
    assert up["repo_id"] == "me/tiny-llama-specdef" and up["commit_message"] == "Protect tiny llama"
    assert Path(up["folder_path"]) == out and {"README.md", "config.json", "model.safetensors"} <= set(up["files"])
    assert not up["token_in_files"]
    assert res.pushed and res.url.endswith("/commit/0") and res.max_relative_deviation == 0.0  # axis, 2^10: bit-exact
    captured = capsys.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err + caplog.text + json.dumps(res.to_dict())


def test_push_without_output_dir_uses_a_temporary_folder_and_default_message(llama_src, tmp_path, fake_hub,
                                                                             monkeypatch):
    src, _ = llama_src
    monkeypatch.chdir(tmp_path)
    res = publish(src, "me/y", SpecDefConfig(), progress=False)
    up = fake_hub.calls[-1][1]
    assert up["repo_id"] == "me/y" and "README.md" in up["files"]
    # the message names the factors applied (from the record), not only the requested alpha
    assert "factors 1000 for alpha 1000 requested" in up["commit_message"]
    assert f"{res.max_relative_deviation:.2e}" in up["commit_message"]
    assert not Path(up["folder_path"]).exists() and res.folder is None  # cleaned up
    assert list(tmp_path.iterdir()) == []


def test_push_errors_are_scrubbed_and_token_required(llama_src, tmp_path, fake_hub, monkeypatch):
    src, _ = llama_src
    fake_hub.fail_with = f"401 Unauthorized for token {FAKE_TOKEN}"
    with pytest.raises(PublishError) as e:
        publish(src, "me/z", SpecDefConfig(), progress=False)
    assert FAKE_TOKEN not in str(e.value) and "***" in str(e.value)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PublishError, match="no Hugging Face token"):
        publish(src, "me/z", SpecDefConfig(), progress=False)


def test_offline_push_refused_before_any_work(llama_src, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE"):
        publish(llama_src[0], "me/z", SpecDefConfig(), output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_existing_output_dir_refused(llama_src, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(PublishError, match="already exists"):
        publish(llama_src[0], "me/z", SpecDefConfig(), dry_run=True, output_dir=out)


def test_measure_puts_resistance_in_the_card(llama_src, tmp_path):
    from huggingface_hub import ModelCard

    from hf_specdef.publishing.publish import MeasureConfig

    out = tmp_path / "measured"
    res = publish(llama_src[0], "me/m", SpecDefConfig(), dry_run=True, output_dir=out, progress=False,
                  measure=MeasureConfig(steps=40, lrs=(1e-3, 1e-2), bypass=True))
    s = res.measure["summary"]
    assert s["protected_sites_steps"] > 2 * s["original_sites_steps"]  # the deformed parameters learn slower
    assert s["slowdown_bypass"] < 2  # the others do not (and the card says so)
    text = ModelCard.load(out / "README.md").text
    assert "## Measured resistance" in text and "training the other (undeformed) parameters" in text
    # the headline names it for what it is and states its worst case; a toy measurement earns no resistance tag
    first = " ".join(text.split("## What was done")[0].split())
    worst = min(v for k, v in s.items() if k.startswith("slowdown_"))
    assert "**Fine-tuning resistance: only a quick toy measurement was run on this release**" in first
    assert f"its worst case is {worst:.1f}×" in first
    assert "fine-tuning-resistance" not in ModelCard.load(out / "README.md").data.tags


def test_small_alpha_still_checked_and_bad_arguments(llama_src, tmp_path):
    res = publish(llama_src[0], "me/a8", SpecDefConfig(alpha=8.0), dry_run=True, output_dir=tmp_path / "a8", progress=False)
    assert res.checks[0].deformed == 14 and res.checks[0].threshold == 4.0
    with pytest.raises(ValueError, match="repo_id"):
        publish(llama_src[0], "not a/valid//id", SpecDefConfig(), dry_run=True, output_dir=tmp_path / "bad")
    with pytest.raises(ValueError, match="overlaps the source"):
        publish(llama_src[0], "me/x", SpecDefConfig(), dry_run=True, output_dir=llama_src[0].parent, overwrite=True)
    assert (llama_src[0] / "model.safetensors").is_file()
    assert not (tmp_path / "bad").exists()


def test_hub_id_source_is_downloaded_and_named_in_the_card(llama_src, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import ModelCard

    asked = []

    def fake_snapshot_download(repo_id, **kw):
        asked.append((repo_id, kw.get("token")))
        return str(llama_src[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    out = tmp_path / "from-hub"
    res = publish("someone/tiny-llama", "me/tiny-llama-specdef", SpecDefConfig(), dry_run=True, output_dir=out,
                  progress=False)
    assert asked == [("someone/tiny-llama", None)]  # a dry run hands no token around
    assert res.base_model == "someone/tiny-llama" and res.notes
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "someone/tiny-llama" and "https://huggingface.co/someone/tiny-llama" in card.text


def test_template_copies_identical():
    assert template_path().read_text() == (REPO / "model_cards" / "specdef_model_card.md").read_text()


def test_cli_config_parsing():
    from hf_specdef.cli import build_parser
    from hf_specdef.cli.publish import config_from_args

    args = build_parser().parse_args(["publish", "--model", "x", "--alpha", "64", "--sites", "attn.vo,norm",
                                      "--layers", "0,1", "--mode", "axis", "--record", "full", "--top-k", "2"])
    cfg = config_from_args(args)
    assert (cfg.alpha, cfg.sites, cfg.layers, cfg.mode, cfg.record, cfg.top_k) == (64.0, ("attn.vo", "norm"), (0, 1),
                                                                                    "axis", "full", 2)
    assert config_from_args(build_parser().parse_args(["publish", "--model", "x"])) == SpecDefConfig()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["publish", "--model", "x", "--sites", "attn.xx"])
    with pytest.raises(SystemExit):  # no --token flag: tokens on command lines leak into shell history
        build_parser().parse_args(["publish", "--model", "x", "--token", FAKE_TOKEN])


# --------------------------------------------------------------------------------------------
# diffusers pipeline
# --------------------------------------------------------------------------------------------


def tiny_sd_pipeline(tmp: Path):
    """The tiny SD-1.x-style pipeline of the diffusers tests (tokenizer files written under ``tmp``)."""
    from test_diffusers import tiny_pipeline

    return tiny_pipeline(tmp)


PIPE_GEN = dict(prompt="a cat", num_inference_steps=2, output_type="np")

STOCK_PIPE_SCRIPT = """
import sys
sys.modules["hf_specdef"] = None
try:
    import hf_specdef  # noqa: F401
    raise SystemExit("hf_specdef importable")
except ImportError:
    pass
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
img = pipe(prompt="a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
ref = np.load(sys.argv[2])
print("MAXABS", float(np.abs(img - ref).max()), type(pipe).__name__)
"""


def test_diffusers_pipeline_dry_run(tmp_path):
    pytest.importorskip("diffusers")
    import numpy as np
    from huggingface_hub import ModelCard

    pipe = tiny_sd_pipeline(tmp_path)
    src = tmp_path / "tiny-sd"
    pipe.save_pretrained(src)
    with torch.no_grad():
        ref = pipe(**PIPE_GEN, generator=torch.Generator().manual_seed(0)).images
    np.save(tmp_path / "ref.npy", ref)
    out = tmp_path / "published"
    res = publish(src, "me/tiny-sd-specdef", SpecDefConfig(), dry_run=True, output_dir=out, base_model="me/tiny-sd",
                  progress=False)
    unet = next(c for c in res.checks if c.component == "unet")
    assert unet.ok and unet.max_relative_deviation <= 1e-4 and unet.deformed > 0 and not unet.not_deformed
    assert res.pipeline_check is not None and res.pipeline_check.ok
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.base_model == "me/tiny-sd" and "specdef" in card.data.tags
    assert f"{res.max_relative_deviation:.2e}" in card.text and "undo the deformation by reparameterization" in card.text
    # streaming folds the text encoder's final norm into the unet's cross-attention (the pipeline-level site)
    assert "| protected components | text_encoder, unet |" in card.text and "DiffusionPipeline.from_pretrained" in card.text
    assert "| pipeline-level site | pipeline-level norm site: the text encoder's final norm is folded" in card.text
    te = next(c for c in res.checks if c.component == "text_encoder")  # its function is the pipeline's (end to end)
    assert te.ok and te.max_relative_deviation == res.pipeline_check.max_relative_deviation
    stock = _run(["-c", STOCK_PIPE_SCRIPT, str(out), str(tmp_path / "ref.npy")], {}, tmp_path)
    assert stock.returncode == 0, stock.stderr[-3000:]
    _, maxabs, cls = next(x for x in stock.stdout.splitlines() if x.startswith("MAXABS")).split()
    assert float(maxabs) <= 1e-4 and cls == "StableDiffusionPipeline"


def _redteam_results(cfg: SpecDefConfig) -> dict:
    """A minimal red-team results.json of the shape `hf-specdef redteam` writes."""
    attack = {"name": "full-adamw", "informed": False, "description": "full fine-tuning, AdamW, constant LR"}
    entry = {"attack": attack, "steps": {"0": 30}, "unprotected_steps": {"0": 8}, "best_lr": 2e-6,
             "median": {"ratio": 3.75, "lower_bound": False, "min": 3.75, "max": 3.75, "seeds": 1}}
    summary = {"variant": "default", "worst_case_slowdown": 3.75, "worst_case_attack": "full-adamw",
               "worst_case_lower_bound": False, "uninformed_attacks": 1, "seeds": 1}
    settings = {"preset": "quick", "per_decade": 3, "reference_steps": 8, "budget": 80}
    return {"model": "SmolLM2", "data": {"source": "shipped corpus"}, "settings": settings, "summary": summary,
            "variants": {"default": {"config": cfg.to_dict(), "attacks": {"full-adamw": entry}}}}


def test_redteam_worst_case_goes_on_the_card_and_other_protections_are_refused(llama_src, tmp_path):
    from huggingface_hub import ModelCard

    from hf_specdef.publishing.resistance import ResistanceError

    cfg = SpecDefConfig()
    with pytest.raises(ResistanceError, match="another protection.*alpha=100"):
        publish(llama_src[0], "me/r", cfg, dry_run=True, output_dir=tmp_path / "no",
                redteam=_redteam_results(cfg.replace(alpha=100.0)))
    assert not (tmp_path / "no").exists()
    out = tmp_path / "rt"
    publish(llama_src[0], "me/r", cfg, dry_run=True, output_dir=out, progress=False, redteam=_redteam_results(cfg))
    text = ModelCard.load(out / "README.md").text
    assert "Worst case over 1 uninformed attacks" in text and "3.75x" in text and "full-adamw" in text
    assert "No fine-tuning resistance was measured" not in text and "*Reference measurements" not in text


# --------------------------------------------------------------------------------------------
# the card claims what was done and measured on this release, and nothing a user string injects
# --------------------------------------------------------------------------------------------

PAPER_CONSTANTS = ("2026", "2602.18868")  # the paper's year and arXiv id (citation, "Rosati et al., 2026")
REFERENCE_LABEL = "*Reference measurements, not this release:*"
NUMBER = re.compile(r"(?<![\w.\\/])\d+(?:\.\d+)*(?:e[-+]?\d+)?(?:/\d+)?(?![\w/])")


def _tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(127)} | {"[UNK]": 127}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


@pytest.fixture(scope="module")
def llama_bf16_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bfloat16 tiny Llama with a tokenizer and a source card (what most Hub releases look like)."""
    src = tmp_path_factory.mktemp("publish_bf16") / "tiny-llama-bf16"
    tiny_llama().to(torch.bfloat16).save_pretrained(src)
    _tiny_tokenizer(src)
    (src / "README.md").write_text(SOURCE_README)
    return src


def _flat(text: str) -> str:
    return " ".join(text.split())


def _reference_paragraph(text: str) -> str:
    if REFERENCE_LABEL not in text:
        return ""
    return REFERENCE_LABEL + text.split(REFERENCE_LABEL, 1)[1].split("\n\n", 1)[0]


def _token_matches(token: str, value: float) -> bool:
    if "/" in token:  # an inverted factor, 1/1024
        num, den = token.split("/")
        return num == "1" and math.isclose(value, 1 / int(den), rel_tol=1e-12)
    m = re.fullmatch(r"(\d+)(?:\.(\d+))?(?:e([-+]?\d+))?", token)
    if m.group(2) is None and m.group(3) is None:
        return float(token) == value  # integers are exact
    tol = 0.5 * 10.0 ** (int(m.group(3) or 0) - len(m.group(2) or ""))
    return abs(float(token) - value) <= tol * (1 + 1e-9)


def _accounted(res, record: dict | None, out: Path) -> list[float]:
    """Every figure the card may print for this release: the record, the checks, the measurements."""
    today = datetime.date.today()
    values = [today.year, today.month, today.day, *map(float, PAPER_CONSTANTS)]
    if record:
        conf = record["config"]
        values += [conf["alpha"], conf["top_k"], conf["tolerance"], record["num_pairs"], len(record["hot_modules"]),
                   *record["factors"], *record["layers"]]
        for p in record.get("pairs", []):
            values += [p["layer"], p["group"], p["k"], p["factor"]]
    for c in res.checks:
        values += [c.max_relative_deviation, c.tolerance, c.deformed, c.matrices, 100 * c.coverage,
                   100 * c.hot_coverage]
    values += list(res.downcast.values())
    for q in res.quantization:
        values += [q["deviation"], q["quantization_error"], q["protected_error"], len(q["kept_float"])]
    return [float(v) for v in values]


def _unaccounted(text: str, values: list[float]) -> list[str]:
    body = text.replace(_reference_paragraph(text), "").replace(hf_specdef.__version__, "")
    return [t for t in NUMBER.findall(body) if not any(_token_matches(t, v) for v in values)]


def _snippet(text: str) -> str:
    return text.split("```python\n", 1)[1].split("\n```", 1)[0]


def _snippet_calls(snippet: str) -> list[tuple[str, list, dict]]:
    """The snippet's statements, checked to be imports and ``x = Cls.from_pretrained(<literals>)`` only."""
    tree = ast.parse(snippet)
    calls = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            assert {a.name for a in node.names} <= {"torch", "LlamaForCausalLM", "AutoModel", "AutoTokenizer"}
            assert isinstance(node, ast.Import) or node.module == "transformers"
            continue
        assert isinstance(node, ast.Assign) and isinstance(node.value, ast.Call), ast.dump(node)
        func = node.value.func
        assert isinstance(func, ast.Attribute) and func.attr == "from_pretrained" and isinstance(func.value, ast.Name)
        args = [ast.literal_eval(a) for a in node.value.args]
        kwargs = {k.arg: ast.unparse(k.value) for k in node.value.keywords}
        calls.append((func.value.id, args, kwargs))
    return calls


@pytest.mark.parametrize("case", ["bf16-axis", "float32-spectral"])
def test_every_number_on_the_card_is_this_releases(case, llama_src, llama_bf16_src, tmp_path):
    """Each figure of the card body comes from the record or from what publish measured on this release."""
    from huggingface_hub import ModelCard

    bf16 = case == "bf16-axis"
    src = llama_bf16_src if bf16 else llama_src[0]
    base = "me/tiny-llama" if bf16 else "HuggingFaceTB/SmolLM2-135M-Instruct"  # a card *for* the reference model
    out = tmp_path / "out"
    res = publish(src, "me/tiny-specdef", SpecDefConfig(record="full"), dry_run=True, output_dir=out,
                  base_model=base, progress=False)
    card = ModelCard.load(out / "README.md")
    text, flat = card.text, _flat(card.text)
    record = json.loads((out / "config.json").read_text())["specdef"]
    values = _accounted(res, record, out)
    assert not _unaccounted(text, values)
    assert _unaccounted(text + "\nby 0.77 (Q8_0), 9.4× (AdamW)", values) == ["0.77", "9.4"]  # the check bites
    # what was done: the factors used beside the requested alpha; the mode sentence of the mode used
    assert record["config"]["alpha"] == 1000.0
    if bf16:
        assert record["modes"] == ["axis"] and record["factors"] == [1024.0]
        assert "| alpha requested → factors used | 1000 → 1024 |" in text
        assert text.count("1000") == 1  # only as the alpha requested: every pair says 1024
        assert "multiplied by 1024" in flat and "(*axis mode*: a rescaling by powers of two)" in flat
        assert "singular values" not in flat.split("## What was done")[0]
        assert "spectral-deformation" not in card.data.tags
        assert "The bound: this release only rescales its weights" in flat and "exactly as fast as the original" in flat
        assert "another model, SmolLM2-135M-Instruct" in flat
    else:
        assert record["modes"] == ["axis", "spectral"] and record["factors"] == [1000.0]
        assert "| alpha requested → factors used | 1000 → 1000 |" in text
        assert "top singular values inflated (*spectral mode*)" in flat and "spectral-deformation" in card.data.tags
        # the reference figures on a card for SmolLM2 itself say they come from another protection run
        assert "same base model, SmolLM2-135M-Instruct, but in a separate protection run" in flat
    # the headline: nothing measured, said plainly; no resistance tag, no "much slower"
    first = flat.split("## What was done")[0]
    assert "**No fine-tuning resistance was measured on this release**" in first and "The bound:" in first
    assert "fine-tuning-resistance" not in card.data.tags and "much slower" not in flat
    assert "not this release" in _reference_paragraph(text)
    # quantization measured on this release by default (the default release breaks in both: said, not refused)
    assert [q["format"] for q in res.quantization] == ["q8_0", "q4_0"]
    for q in res.quantization:
        assert not q["ok"] and f"| {q['format']} | {q['deviation_str']} |" in text
    assert "**breaks it**" in text and "This release breaks when quantized in q8_0, q4_0" in flat
    assert "0.77" not in text and "Not measured" not in text
    # the usage snippet: the full repo id, the release's exact dtype, the tokenizer when there is one
    calls = _snippet_calls(_snippet(text))
    dtype = "torch.bfloat16" if bf16 else "torch.float32"
    assert calls[0] == ("LlamaForCausalLM", ["me/tiny-specdef"], {"dtype": dtype})
    assert calls[1:] == ([("AutoTokenizer", ["me/tiny-specdef"], {})] if bf16 else [])
    # the record carries what publish measured; the result reports what was done
    assert record["max_relative_deviation"] == res.checks[0].max_relative_deviation
    assert res.modes == record["modes"] and res.factors == record["factors"]
    summary = str(res)
    assert f"{', '.join(record['modes'])} mode, factors {'1024' if bf16 else '1000'} (alpha 1000 requested)" in summary
    assert res.to_dict()["factors"] == record["factors"] and "q8_0" in summary


def test_dry_run_snippet_names_owner_and_runs_with_stock_transformers(llama_bf16_src, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    monkeypatch.chdir(tmp_path)
    res = publish(llama_bf16_src, None, SpecDefConfig(), dry_run=True, progress=False, quantize=())
    assert res.repo_id == "tiny-llama-bf16-specdef" and Path(res.folder) == tmp_path / "tiny-llama-bf16-specdef"
    text = ModelCard.load(Path(res.folder) / "README.md").text
    snippet = _snippet(text)
    calls = _snippet_calls(snippet)
    assert [c[1] for c in calls] == [["<owner>/tiny-llama-bf16-specdef"]] * 2 and "# replace <owner>" in snippet
    # pointed at the folder, the snippet loads the release with stock classes in bfloat16, tokenizer included
    scope: dict = {}
    exec(snippet.replace('"<owner>/tiny-llama-bf16-specdef"', repr(res.folder)), scope)  # noqa: S102 (our snippet)
    assert scope["model"].dtype == torch.bfloat16 and scope["tokenizer"]("t1 t2")["input_ids"] == [1, 2]
    # quantize=() measures nothing and borrows no figure
    quant = _flat(text.split("## Quantization", 1)[1].split("\n## ", 1)[0])
    assert quant.startswith("Not measured for this release (the publisher turned the measurement off)")
    assert not NUMBER.findall(quant) and "SmolLM2" not in quant and res.quantization == []


def test_no_quantize_cli_and_formats_flag(llama_src, tmp_path, monkeypatch, capfd):
    from huggingface_hub import ModelCard, constants

    from hf_specdef.cli import build_parser, main

    parser = build_parser()
    assert parser.parse_args(["publish", "--model", "x"]).quantize is None  # default: q8_0, q4_0
    assert parser.parse_args(["publish", "--model", "x", "--no-quantize"]).quantize == ()
    assert parser.parse_args(["publish", "--model", "x", "--quantize", "q8_0,q5_0"]).quantize == ("q8_0", "q5_0")
    with pytest.raises(SystemExit):
        parser.parse_args(["publish", "--model", "x", "--quantize", "q8_0", "--no-quantize"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "nq"
    rc = main(["publish", "--model", str(llama_src[0]), "--repo-id", "me/nq", "--dry-run", "--output-dir", str(out),
               "--no-quantize", "--json"])
    result = json.loads(capfd.readouterr().out)
    assert rc == 0 and result["quantization"] == [] and result["factors"] == [1000.0]
    text = ModelCard.load(out / "README.md").text
    assert "Not measured for this release (the publisher turned the measurement off)" in _flat(text)
    assert "0.77" not in text and "1.3 (int4)" not in text
    with pytest.raises(ValueError, match="unknown quantization format 'q9_9'"):
        publish(llama_src[0], "me/nq", SpecDefConfig(), dry_run=True, output_dir=tmp_path / "q9", quantize=("q9_9",))
    assert not (tmp_path / "q9").exists()


def test_a_broken_promise_refuses_but_a_broken_measurement_does_not(llama_src, tmp_path, monkeypatch):
    """Measured formats that break the release go on the card; only cfg.quantization_safe formats must hold."""
    import hf_specdef.publishing.publish as pub

    res = publish(llama_src[0], "me/q", SpecDefConfig(), dry_run=True, output_dir=tmp_path / "q", progress=False,
                  quantize=("q5_0",))
    assert [(q["format"], q["ok"], q["required"]) for q in res.quantization] == [("q5_0", False, False)]
    rows = [{"format": "q8_0", "required": True, "ok": False, "deviation_str": "1.00e+00"}]
    monkeypatch.setattr(pub, "quantization_checks", lambda *a, **k: rows)
    with pytest.raises(PublishError, match=r"claims to survive \['q8_0'\]"):
        publish(llama_src[0], "me/q", SpecDefConfig(), dry_run=True, output_dir=tmp_path / "q2", progress=False)
    assert not (tmp_path / "q2").exists()


def test_record_gets_the_deviation_publish_measured(llama_src, tmp_path, monkeypatch):
    """Streaming leaves "max_relative_deviation": null above its forward-check size; publish writes what it verified."""
    import hf_specdef.publishing.publish as pub

    real = pub.protect_folder

    def no_forward_check(src, dst, cfg, **kw):
        report = real(src, dst, cfg, **kw)
        conf = json.loads((dst / "config.json").read_text())
        conf["specdef"]["max_relative_deviation"] = None  # as a > 64 MiB checkpoint gets it
        (dst / "config.json").write_text(json.dumps(conf))
        return report

    monkeypatch.setattr(pub, "protect_folder", no_forward_check)
    out = tmp_path / "dev"
    res = publish(llama_src[0], "me/d", SpecDefConfig(), dry_run=True, output_dir=out, progress=False, quantize=())
    record = json.loads((out / "config.json").read_text())["specdef"]
    assert record["max_relative_deviation"] is not None
    assert record["max_relative_deviation"] == res.checks[0].max_relative_deviation > 0  # spectral, float32


@pytest.mark.parametrize("bad", ['org/x"); import os; os.system("id"); print("', "org/x\n**VERIFIED SAFE**\n<b>x</b>",
                                 "a/b/c", "<owner>/x"])
def test_hostile_base_model_and_repo_id_are_refused_before_any_work(bad, llama_src, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=r"base_model=.* is not a valid Hub repository id.*Pass the source's Hub id"):
        publish(llama_src[0], "me/x", SpecDefConfig(), dry_run=True, output_dir=out, base_model=bad)
    with pytest.raises(ValueError, match=r"repo_id=.* is not a valid Hub repository id.*owner/name"):
        publish(llama_src[0], bad, SpecDefConfig(), dry_run=True, output_dir=out)
    assert not out.exists()


HOSTILE = 'evil\n**VERIFIED SAFE**\n<script>alert(1)</script> | `rm -rf` "quoted" [link](https://x.y) $x$ &amp; _e_'


def _no_injection(text: str) -> None:
    assert not re.search(r"(?<!\\)<(script|b)", text), "raw HTML in the card"
    assert not any(line.lstrip().startswith(("**VERIFIED", "\\*\\*VERIFIED")) for line in text.splitlines())
    assert "**VERIFIED SAFE**" not in text and "[link](" not in text and not re.search(r"(?<!\\)&amp;", text)


def test_hostile_source_metadata_and_folder_name_render_escaped(llama_src, tmp_path):
    """Strings from the source (README front matter, a local folder's name: no Hub id) are data, never markup."""
    import shutil

    from huggingface_hub import ModelCard

    src = tmp_path / 'x\n**VERIFIED SAFE**\n<script>alert(1)<\\script> | `x` "q"'
    shutil.copytree(llama_src[0], src)
    front = {"license": "other", "license_name": HOSTILE, "license_link": HOSTILE, "language": ["en", HOSTILE],
             "pipeline_tag": "text-generation"}
    (src / "README.md").write_text("---\n" + json.dumps(front) + "\n---\n# hostile\n")  # JSON is valid YAML
    out = tmp_path / "published"
    res = publish(src, "me/hostile", SpecDefConfig(record="full"), dry_run=True, output_dir=out, progress=False,
                  quantize=())
    card = ModelCard.load(out / "README.md")
    assert card.data.license_name == HOSTILE and card.data.language == ["en", HOSTILE]  # YAML keeps them as data
    assert card.data.base_model is None and res.base_model == src.name  # a local folder is no Hub id
    _no_injection(card.text)
    assert "\\*\\*VERIFIED SAFE\\*\\* \\<script\\>" in card.text  # the folder name, shown escaped on one line
    calls = _snippet_calls(_snippet(card.text))
    assert calls == [("LlamaForCausalLM", ["me/hostile"], {"dtype": "torch.float32"})]


def test_card_escapes_every_string_it_is_given(llama_src, tmp_path):
    """Unit level: hostile class names, component names and red-team strings cannot reach the card as markup or
    code (a hostile repo id that got past validation still renders as one Python string literal)."""
    from huggingface_hub import ModelCard

    from hf_specdef.publishing.card import render_card
    from hf_specdef.publishing.checks import ComponentCheck
    from hf_specdef.publishing.escaping import escape_markdown
    from hf_specdef.publishing.snippet import load_snippet as _load_snippet
    from hf_specdef.publishing.source import describe_source

    info = describe_source(llama_src[0], base_model="me/tiny-llama")
    info.class_name = 'LlamaForCausalLM; import os; os.system("id")'
    hostile_id = 'x"); import os; os.system("id"); ("```'
    snippet = _load_snippet(info, hostile_id, llama_src[0], "float32")
    assert "```" not in snippet
    assert _snippet_calls(snippet) == [("AutoModel", [hostile_id], {"dtype": "torch.float32"})]
    check = ComponentCheck(HOSTILE, HOSTILE, "float32", 0.0, 1e-3, True, deformed=1, matrices=2, coverage=0.5,
                           hot_coverage=0.5)
    measure = {"description": HOSTILE, "rows": [{"variant": HOSTILE, "steps": HOSTILE, "slowdown": HOSTILE}],
               "summary": {"variant": "default", "worst_case_slowdown": 2.0, "worst_case_attack": HOSTILE,
                           "uninformed_attacks": 1, "seeds": 1}}
    card = render_card(info, "me/x", SpecDefConfig(), [check], llama_src[0], measure=measure,
                       quantization=[{"format": "q8_0", "required": False, "ok": None, "error": HOSTILE}])
    text = ModelCard(str(card)).text
    _no_injection(text)
    escaped = escape_markdown(HOSTILE)
    assert "\n" not in escaped and not re.search(r"(?<!\\)[|<>`*\[\]$&]", escaped)
    columns = None  # every table row keeps its table's columns: a hostile "|" is escaped
    for line in text.splitlines():
        cells = len(re.findall(r"(?<!\\)\|", line))
        if line.startswith("|---"):
            columns = cells
        elif line.startswith("|") and columns is not None:
            assert cells == columns, line
        elif not line.startswith("|"):
            columns = None


def test_redteam_headline_states_the_measured_worst_case_and_earns_the_tag(llama_src, llama_bf16_src, tmp_path):
    from huggingface_hub import ModelCard

    cfg = SpecDefConfig()
    out = tmp_path / "spectral"
    publish(llama_src[0], "me/r", cfg, dry_run=True, output_dir=out, progress=False, quantize=(),
            redteam=_redteam_results(cfg))
    card = ModelCard.load(out / "README.md")
    first = _flat(card.text).split("## What was done")[0]
    assert "**Fine-tuning resistance, measured on this release by a red team:** worst case over 1 uninformed " \
           "attacks 3.75× the steps the original needs (full-adamw" in first
    assert "fine-tuning-resistance" in card.data.tags  # a red-team worst case > 1.5x, not a pure rescaling
    # a release that only rescales: a red team without the scale-invariant attack earns no tag, and says why
    out = tmp_path / "axis"
    publish(llama_bf16_src, "me/r", cfg, dry_run=True, output_dir=out, progress=False, quantize=(),
            redteam=_redteam_results(cfg))
    card = ModelCard.load(out / "README.md")
    assert "fine-tuning-resistance" not in card.data.tags
    assert "did not run the scale-invariant attack (`full-madam`)" in _flat(card.text)
