"""diffusers: denoiser sites, pipeline protection, load/save hooks, stock-loadable output."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bytes_to_unicode

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    ModelMixin,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from hf_specdef import SpecDefConfig, protect, verify  # noqa: E402
from hf_specdef.analysis import integration_registry as handlers
from hf_specdef.deformation.record import get_record, set_record  # noqa: E402
from hf_specdef.integrations import diffusers as hd  # noqa: E402
from hf_specdef.integrations.diffusers.pipeline import protect_pipeline  # noqa: E402
from hf_specdef.integrations.diffusers.save import save_protected  # noqa: E402

ALPHA = 1000.0


# --------------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------------


def tiny_unet(seed: int = 0, cross_dim: int = 32) -> UNet2DConditionModel:
    """Two cross-attention levels with different head counts *and* head sizes: 32 ch / 2 heads, 64 ch / 8 heads."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=(2, 8), norm_num_groups=8, transformer_layers_per_block=(1, 2),
    ).eval()





def tiny_pipeline(tmp: Path, seed: int = 0) -> StableDiffusionPipeline:
    """A tiny SD-1.x-style pipeline assembled locally; the tokenizer's vocab.json/merges.txt are written here."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = tmp / "tokenizer_src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for t in ("ca", "<|startoftext|>", "<|endoftext|>"):
        vocab[t] = len(vocab)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\nc a\n")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=16)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"])).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet(seed),
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


GEN = dict(prompt="a cat", num_inference_steps=2, height=16, width=16, output_type="np")


def generate(pipe) -> np.ndarray:
    return pipe(**GEN, generator=torch.Generator().manual_seed(0)).images


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {n for n, t in module.state_dict().items() if not torch.equal(t, before[n])}


STOCK_LOADER = textwrap.dedent("""
    import sys
    sys.modules["hf_specdef"] = None  # hf_specdef cannot be imported here: stock diffusers only
    try:
        import hf_specdef  # noqa: F401
        raise SystemExit("hf_specdef is importable in the stock subprocess")
    except ImportError:
        pass
    import json, numpy as np, torch
    from diffusers import StableDiffusionPipeline
    gen = json.loads(sys.argv[1])
    for src, out in zip(sys.argv[2::2], sys.argv[3::2]):
        pipe = StableDiffusionPipeline.from_pretrained(src)
        pipe.set_progress_bar_config(disable=True)
        np.save(out, pipe(**gen, generator=torch.Generator().manual_seed(0)).images)
""")


def stock_generate(tmp: Path, *dirs: Path) -> list[np.ndarray]:
    """Load each saved pipeline in a fresh interpreter where hf_specdef cannot be imported; generate with seed 0."""
    outs = [tmp / f"stock_{i}.npy" for i in range(len(dirs))]
    args = [a for d, o in zip(dirs, outs, strict=True) for a in (str(d), str(o))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", STOCK_LOADER, json.dumps(GEN), *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "specdef" not in proc.stderr, proc.stderr[-3000:]  # no "config attributes {'specdef': ...} not expected"
    return [np.load(o) for o in outs]


# --------------------------------------------------------------------------------------------
# denoiser sites
# --------------------------------------------------------------------------------------------


def test_unet_function_kept_and_every_projection_hot():
    unet = tiny_unet()
    reference = copy.deepcopy(unet)
    report = protect(unet, SpecDefConfig(alpha=ALPHA), progress=False)
    assert report.deviation <= 1e-4
    assert verify(reference, unet).max_relative_deviation <= 1e-4
    for r in report.results:
        if r.mode == "spectral":
            assert r.sigma_after / r.sigma_before == pytest.approx(ALPHA, rel=0.01)
        assert r.sigma_after > 10 * r.sigma_before
    hot = {m.split(".transformer_blocks.")[1].split(".", 1)[1] for m in report.hot_modules}
    assert hot == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                   "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"}  # attn2.to_v is heated only by the pipeline site
    assert get_record(unet)["num_pairs"] == len(report.results)


def test_unet_heads_per_block():
    """attention_head_dim=(2, 8) is the head *count* per down block (diffusers quirk); up blocks reverse it."""
    unet = tiny_unet()
    report = protect(unet, SpecDefConfig(alpha=ALPHA, sites=("attn.vo",)), progress=False)
    groups: dict[str, set[tuple[int, int]]] = {}
    for r in report.results:
        part = r.pair.block.split(".attentions.")[0] if "attentions" in r.pair.block else r.pair.block
        groups.setdefault(part.split(".transformer_blocks")[0], set()).add((r.pair.group, r.pair.size))
    expect = {"down_blocks.0": (2, 16), "down_blocks.1": (8, 8), "mid_block": (8, 8), "up_blocks.0": (8, 8),
              "up_blocks.1": (2, 16)}
    for part, (n, d) in expect.items():
        assert groups[part] == {(g, d) for g in range(n)}, part


def test_unet_cross_attention_layers_touch_only_attn2():
    unet = tiny_unet()
    before = snapshot(unet)
    report = protect(unet, SpecDefConfig(alpha=ALPHA, sites=("attn.vo", "attn.qk"), layers="cross-attention"),
                     progress=False)
    touched = changed(before, unet)
    assert touched and all(".attn2." in n for n in touched)
    n_blocks = len({r.pair.layer for r in report.results})
    assert n_blocks == 11  # every transformer block has a cross-attention
    assert all({"to_q", "to_k", "to_v", "to_out"} <= {n.split(".attn2.")[1].split(".")[0] for n in touched
                                                       if n.startswith(r.pair.block)} for r in report.results)
    for r in report.results:
        assert "cross-attention" in r.pair.tags
        assert r.sigma_after / r.sigma_before == pytest.approx(ALPHA, rel=0.01)
    # with the norm site too, only attn2 and the norm2 that feeds attn2.to_q change
    unet2 = tiny_unet()
    before2 = snapshot(unet2)
    protect(unet2, SpecDefConfig(alpha=ALPHA, layers="cross-attention"), progress=False)
    assert all(".attn2." in n or ".norm2." in n for n in changed(before2, unet2))


def test_unet_only_cross_attention_blocks():
    """With only_cross_attention, attn1 reads encoder_hidden_states: norm1 feeds only attn1.to_q, attn1 is cross-attention."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), only_cross_attention=(True, False),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=(2, 8),
    ).eval()
    reference = copy.deepcopy(unet)
    report = protect(unet, SpecDefConfig(alpha=ALPHA), progress=False)
    assert verify(reference, unet).max_relative_deviation <= 1e-4
    first = "down_blocks.0.attentions.0.transformer_blocks.0"
    norm1 = next(r.pair for r in report.results if r.pair.block == first and r.pair.site == "norm" and r.pair.group == 0)
    assert [b.module for b in norm1.consumers] == [f"{first}.attn1.to_q"]
    assert all("cross-attention" in r.pair.tags for r in report.results if r.pair.block == f"{first}.attn1")


def test_layer_selection_random_and_indices():
    def layers(cfg):
        return {r.pair.layer for r in protect(tiny_unet(), cfg, verify=False, progress=False).results}

    a, b = layers(SpecDefConfig(layers="random:3", seed=1)), layers(SpecDefConfig(layers="random:3", seed=1))
    assert a == b and len(a) == 3
    assert layers(SpecDefConfig(layers="random:3", seed=2)) != a or layers(SpecDefConfig(layers="random:3", seed=3)) != a
    report = protect(tiny_unet(), SpecDefConfig(layers=[0, 3]), verify=False, progress=False)
    assert {r.pair.layer for r in report.results} == {0, 3}
    blocks = {r.pair.layer: r.pair.block for r in report.results if r.pair.site == "mlp"}
    assert blocks[0] == "down_blocks.0.attentions.0.transformer_blocks.0"  # natural order of transformer blocks
    assert blocks[3] == "mid_block.attentions.0.transformer_blocks.0"


def test_dit_and_pixart_transformers():
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4).eval()
    ref = copy.deepcopy(dit)
    report = protect(dit, SpecDefConfig(alpha=ALPHA), progress=False)
    assert report.deviation <= 1e-4 and verify(ref, dit).max_relative_deviation <= 1e-4
    assert report.sites == {"attn.qk": 4, "attn.vo": 4}  # AdaLN-Zero norms and GELU MLP: no norm / mlp site
    pix = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                   num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12,
                                   norm_num_groups=4).eval()
    ref, before = copy.deepcopy(pix), snapshot(pix)
    report = protect(pix, SpecDefConfig(alpha=ALPHA, layers="cross-attention"), progress=False)
    assert report.deviation <= 1e-4 and verify(ref, pix).max_relative_deviation <= 1e-4
    assert changed(before, pix) and all(".attn2." in n for n in changed(before, pix))
    for r in report.results:
        assert r.sigma_after / r.sigma_before == pytest.approx(ALPHA, rel=0.01)


# --------------------------------------------------------------------------------------------
# pipelines: protect, save, stock load; save-time protection; load-time hooks
# --------------------------------------------------------------------------------------------


def test_pipeline_protect_save_and_save_time_protection_load_with_stock_diffusers(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    reference_image = generate(pipe)
    unet_before, te_before = snapshot(pipe.unet), snapshot(pipe.text_encoder)

    # save-time protection: files protected, in-memory pipeline bit-identical afterwards
    save_time_dir = tmp_path / "save_time"
    report = pipe.save_pretrained(save_time_dir, specdef_config=SpecDefConfig(alpha=ALPHA))
    assert report.deviation <= 1e-4
    assert not changed(unet_before, pipe.unet) and not changed(te_before, pipe.text_encoder)
    assert get_record(pipe.unet) is None and get_record(pipe.text_encoder) is None
    assert np.array_equal(generate(pipe), reference_image)

    # in-memory protection, then a plain save
    report = protect(pipe, SpecDefConfig(alpha=ALPHA), progress=False)
    assert report.deviation <= 1e-4
    pipeline_pairs = [r for r in report.results if "pipeline" in r.pair.tags]
    assert len(pipeline_pairs) == 1  # text encoder final norm -> every cross-attention to_k / to_v
    consumers = {b.module for b in pipeline_pairs[0].pair.consumers}
    attn2_kv = {n.rsplit(".", 1)[0] for n in unet_before if ".attn2.to_k.weight" in n or ".attn2.to_v.weight" in n}
    assert consumers == {f"unet.{m}" for m in attn2_kv}
    assert any(m.endswith("attn2.to_v") for m in get_record(pipe.unet)["hot_modules"])  # to_v is now hot
    final = next(n for n in hd.FINAL_NORMS if f"{n}.weight" in te_before)
    te_changed = changed(te_before, pipe.text_encoder)  # only the final norm (its bias is zero at init)
    assert {f"{final}.weight"} <= te_changed <= {f"{final}.weight", f"{final}.bias"}
    assert np.abs(generate(pipe) - reference_image).max() <= 1e-4
    protected_dir = tmp_path / "protected"
    pipe.save_pretrained(protected_dir)

    for d in (protected_dir, save_time_dir):
        conf = json.loads((d / "unet" / "config.json").read_text())  # diffusers: the private key, passed over silently
        assert "specdef" not in conf and conf["_specdef"]["num_pairs"] > 0 and "pipeline" in conf["_specdef"]
        assert "specdef" in json.loads((d / "text_encoder" / "config.json").read_text())  # transformers: the plain key
    stock_protected, stock_save_time = stock_generate(tmp_path, protected_dir, save_time_dir)
    assert np.abs(stock_protected - reference_image).max() <= 1e-4
    assert np.abs(stock_save_time - reference_image).max() <= 1e-4

    # the files really are deformed (save-time output differs from the unchanged in-memory weights)
    from safetensors.torch import load_file

    saved = load_file(str(save_time_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(saved[n], unet_before[n]) for n in saved if n.endswith("attn2.to_v.weight"))


def test_load_time_hooks(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    plain = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet", specdef_config=SpecDefConfig(alpha=ALPHA))
    assert get_record(loaded)["num_pairs"] > 0 and get_record(plain) is None
    assert verify(plain, loaded).max_relative_deviation <= 1e-4
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), loaded.parameters(), strict=True))

    pipe = tiny_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded_pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe", specdef_config=SpecDefConfig(alpha=ALPHA))
    assert get_record(loaded_pipe.unet)["pipeline"]["num_pairs"] == 1
    assert get_record(loaded_pipe.text_encoder) is not None
    no_site = DiffusionPipeline.from_pretrained(tmp_path / "pipe", specdef_config=SpecDefConfig(alpha=ALPHA),
                                                specdef_options={"pipeline_norm": False})
    assert "pipeline" not in get_record(no_site.unet) and get_record(no_site.text_encoder) is None
    with pytest.raises(ValueError, match="specdef_options"):
        UNet2DConditionModel.from_pretrained(tmp_path / "unet", specdef_config=SpecDefConfig(), specdef_options={"x": 1})
    loaded_pipe.set_progress_bar_config(disable=True)
    assert np.abs(generate(loaded_pipe) - generate(pipe)).max() <= 1e-4


def test_hooks_installed_once():
    from diffusers.models.modeling_utils import LegacyModelMixin

    from hf_specdef import integrations
    from hf_specdef.integrations import PATCHES, patching

    owners = (ModelMixin, DiffusionPipeline)
    first = {(o, n): o.__dict__[n] for o in owners for n in ("from_pretrained", "save_pretrained")}
    legacy = LegacyModelMixin.__dict__["from_pretrained"]
    hd.install()
    hd.install()
    integrations.install_all()
    integrations._install(hd.__name__)  # what the post-import hook runs
    assert {(o, n): o.__dict__[n] for o, n in first} == first and LegacyModelMixin.__dict__["from_pretrained"] is legacy
    for obj in first.values():
        func = getattr(obj, "__func__", obj)
        assert func._specdef_wrapped and not getattr(func.__wrapped__, "_specdef_wrapped", False)
        assert getattr(func._specdef_original, "__func__", func._specdef_original) is func.__wrapped__
    assert not getattr(legacy.__func__, "_specdef_wrapped", False)  # it calls ModelMixin.from_pretrained: no patch
    mine = [p for p in PATCHES if p.integration == hd.__name__]
    assert len(mine) == 4 and all(patching.is_applied(p) for p in mine)
    assert hd.diffusers_probe in __import__("hf_specdef.analysis.probe", fromlist=["probe"]).PROBE_BUILDERS
    # the core's registries (hf_specdef.analysis.integration_registry): protect(pipe) and save_protected(pipe or model) come here
    assert handlers.pipeline_protector(object()) is protect_pipeline
    assert handlers.saver_for(tiny_unet()) is save_protected and handlers.installed("diffusers")


# --------------------------------------------------------------------------------------------
# docs/releases.md: no "protected" model whose claimed sites are not deformed
# --------------------------------------------------------------------------------------------


def test_save_refuses_claims_that_weights_do_not_show(tmp_path):
    forged = tiny_unet()
    set_record(forged, {"format": "hf-specdef/1", "config": {"alpha": ALPHA}, "num_pairs": 1,
                        "hot_modules": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"]})
    with pytest.raises(hd.DeformationCheckError):
        forged.save_pretrained(tmp_path / "forged")
    assert not (tmp_path / "forged").exists()

    # protected in this process, then weights swapped back: the recorded results no longer hold
    unet = tiny_unet()
    clean = snapshot(unet)
    unet.save_pretrained(tmp_path / "ok", specdef_config=SpecDefConfig(alpha=ALPHA), progress=False)  # save-time
    assert not changed(clean, unet)
    pipe = tiny_pipeline(tmp_path)
    protect(pipe, SpecDefConfig(alpha=ALPHA), progress=False)
    pipe.unet.load_state_dict(clean)
    with pytest.raises(hd.DeformationCheckError):
        pipe.save_pretrained(tmp_path / "tampered")
    assert not (tmp_path / "tampered" / "unet").exists()

    # a record loaded from disk (no in-process results) is checked on the spectra
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "ok")
    reloaded.save_pretrained(tmp_path / "again")  # deformed: passes
    assert (tmp_path / "again" / "config.json").exists()


def test_pipeline_norm_options(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    report = protect(pipe, SpecDefConfig(alpha=ALPHA, layers=[0, 1]), progress=False)
    assert not any("pipeline" in r.pair.tags for r in report.results)
    assert any("pipeline-level norm site" in s for s in report.skipped)
    pipe = tiny_pipeline(tmp_path)
    with pytest.raises(ValueError, match="pipeline_norm=True.*'norm' is not among cfg.sites") as err:
        protect(pipe, SpecDefConfig(alpha=ALPHA, sites=("attn.vo",)), pipeline_norm=True, progress=False)
    assert str(err.value).count("pipeline-level norm site") == 1, err.value  # the reason is not prefixed twice
    # the tiny CLIP text encoder alone sits at ~1e-4 at alpha=1000 (fp32 budget), so alpha=100 here
    report = protect(pipe, SpecDefConfig(alpha=100.0), pipeline_norm=False, text_encoder=True, progress=False)
    assert any(r.pair.block.startswith("text_encoder.") for r in report.results)
    assert not any("pipeline" in r.pair.tags for r in report.results)
    assert report.deviation <= 1e-4
