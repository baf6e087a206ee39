"""Hub publication (issue 7): dry runs write a stock-loadable folder with a model card; the push goes through HfApi."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from hf_specdef import SpecDefConfig
from hf_specdef.publish import PublishError, publish, template_path

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
    assert "No red team was run on this\nrelease" in text and "(0.62×)" in text  # the real-model scale, unmeasured here
    assert f"{res.checks[0].coverage:.1%}" in text  # coverage from inspect_model
    assert "arXiv:2602.18868" in text and "Limits of Convergence-Rate Control for Open-Weight Safety" in text
    assert "LlamaForCausalLM.from_pretrained(\"me/tiny-llama-specdef\")" in text
    # record level full: the per-pair table; the config.json record is the one the card describes
    record = json.loads((out / "config.json").read_text())["specdef"]
    assert "| 0 | attn.vo | 0 | spectral | 1000 |" in text and len(record["pairs"]) == record["num_pairs"] == 14
    assert "alpha (inflation factor) | 1000" in text
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
    assert "chose not to disclose" in text and "alpha (inflation factor)" not in text
    assert res.checks[0].claimed and res.checks[0].deformed == 14  # claims from the protection report


def test_refuses_when_verification_fails(llama_src, tmp_path, monkeypatch):
    """A protected folder whose stock-loaded outputs deviate is never published (nor left behind)."""
    from safetensors.torch import load_file, save_file

    import hf_specdef.publish as pub

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
    """SPEC §7: a folder whose record claims a protection its weights do not show is never published."""
    import shutil

    import hf_specdef.publish as pub

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
    assert "alpha=1000" in up["commit_message"] and f"{res.max_relative_deviation:.2e}" in up["commit_message"]
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

    from hf_specdef.publish import MeasureConfig

    out = tmp_path / "measured"
    res = publish(llama_src[0], "me/m", SpecDefConfig(), dry_run=True, output_dir=out, progress=False,
                  measure=MeasureConfig(steps=40, lrs=(1e-3, 1e-2), bypass=True))
    s = res.measure["summary"]
    assert s["protected_sites_steps"] > 2 * s["original_sites_steps"]  # the deformed parameters learn slower
    assert s["slowdown_bypass"] < 2  # the others do not (and the card says so)
    text = ModelCard.load(out / "README.md").text
    assert "## Measured resistance" in text and "training the other (undeformed) parameters" in text


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
    from hf_specdef.commands.publish import config_from_args

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

    from hf_specdef.resistance import ResistanceError

    cfg = SpecDefConfig()
    with pytest.raises(ResistanceError, match="another protection.*alpha=100"):
        publish(llama_src[0], "me/r", cfg, dry_run=True, output_dir=tmp_path / "no",
                redteam=_redteam_results(cfg.replace(alpha=100.0)))
    assert not (tmp_path / "no").exists()
    out = tmp_path / "rt"
    publish(llama_src[0], "me/r", cfg, dry_run=True, output_dir=out, progress=False, redteam=_redteam_results(cfg))
    text = ModelCard.load(out / "README.md").text
    assert "Worst case over 1 uninformed attacks" in text and "3.75x" in text and "full-adamw" in text
    assert "No red team was run" not in text
