"""The core needs no optional dependency: without diffusers, PEFT, accelerate, jinja2, gguf, scikit-learn and
matplotlib, ``import hf_specdef`` works and a transformers model is protected at load time, in memory and as files;
each feature that needs an extra says which one, in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import requires

from conftest import tiny_llama

OPTIONAL = ("diffusers", "peft", "accelerate", "jinja2", "gguf", "sklearn", "matplotlib")
DISTRIBUTIONS = ("diffusers", "peft", "accelerate", "jinja2", "gguf", "scikit-learn", "matplotlib")


def test_the_core_requirements_name_no_optional_dependency():
    core = [r for r in requires("hf-specdef") or [] if "extra ==" not in r]
    names = {r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in core}
    assert names == {"torch", "transformers", "safetensors", "huggingface_hub", "tqdm", "numpy"}, names
    assert not names & set(DISTRIBUTIONS)


SCRIPT = textwrap.dedent("""
    import sys
    for name in {optional!r}:
        sys.modules[name] = None  # as if not installed
    import hf_specdef
    from transformers import AutoModelForCausalLM
    from hf_specdef import SpecDefConfig, protect, protect_checkpoint, verify
    from hf_specdef.cli import main

    loaded = AutoModelForCausalLM.from_pretrained("src", specdef_config=SpecDefConfig())
    assert loaded.specdef_report.results, "load-time protection"
    plain = AutoModelForCausalLM.from_pretrained("src")
    report = protect(plain, SpecDefConfig())
    assert report.results and report.deviation is not None and report.deviation <= 1e-4
    assert protect_checkpoint("src", "streamed", progress=False).results
    assert main(["protect", "src", "cli_out", "--no-progress"]) == 0
    assert main(["inspect", "cli_out"]) == 0
    assert main(["verify", "src", "cli_out"]) == 0
    try:
        hf_specdef.SpecUndoConfig  # noqa: B018
    except hf_specdef.MissingExtraError as e:
        print("MISSING SpecUndoConfig", e)
    try:
        hf_specdef.publish("src", None, dry_run=True, output_dir="pub")
    except hf_specdef.MissingExtraError as e:
        print("MISSING publish", e)
    for command in ("demo", "redteam", "bench"):
        argv = [command] + (["src", "--out", "rt"] if command == "redteam" else [])
        print("EXIT", command, main(argv))
    for mod in {optional!r}:
        assert sys.modules.get(mod) is None, mod
    print("OK")
""")


def test_core_works_without_the_extras_and_each_extra_is_named(tmp_path):
    tiny_llama(seed=0, layers=2).save_pretrained(str(tmp_path / "src"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(optional=OPTIONAL)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert "MISSING SpecUndoConfig hf_specdef.SpecUndoConfig needs peft, which is not installed: pip install " \
           "'hf-specdef[peft]'" in out.stdout
    assert "MISSING publish publish (the model card template) needs jinja2, which is not installed: pip install " \
           "'hf-specdef[publish]'" in out.stdout and not (tmp_path / "pub").exists()
    for command, extra in (("demo", "demo"), ("redteam", "redteam"), ("bench", "redteam")):
        assert f"EXIT {command} 1" in out.stdout, out.stdout
        assert f"hf-specdef {command}: error: hf-specdef {command} needs peft, which is not installed: pip install " \
               f"'hf-specdef[{extra}]'" in out.stderr, out.stderr[-3000:]
