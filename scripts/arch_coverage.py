"""Coverage of the default protection on the layer sizes of real releases (see docs/architectures.md), from shapes only.

Each model is built on the meta device from a config with the published sizes (no download, no weights), its
pairs are found by the site registry as ``protect`` would, and the share of parameters in deformed matrices and in
hot matrices (consumers of an inflated activation) is reported, for float32 (every site) and for bfloat16 (pairs
that cannot be exact there, e.g. Gemma's ``1 + w`` norm folds and the AdaLN folds of SD3 / Flux, are skipped). This is
the coverage ``inspect_model`` reports on the protected model; tied weights are counted once.

    python scripts/arch_coverage.py [--json]
"""

from __future__ import annotations

import argparse
import json

import diffusers
import torch
import transformers as tf

from hf_specdef import SpecDefConfig
from hf_specdef.protection.in_memory import tied_parameter_names
from hf_specdef.sites import drop_inexact, pairs_for, select_pairs

# published sizes (config.json of each release)
RELEASES = {
    "Qwen3-0.6B": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True)),
    "Gemma-2-2B": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        intermediate_size=9216, vocab_size=256000)),
    "Gemma-3-1B": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=1152, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        intermediate_size=6912, vocab_size=262144)),
    "Phi-3-mini": ("Phi3Config", "Phi3ForCausalLM", dict(
        hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=8192, vocab_size=32064, tie_word_embeddings=False)),
    "Pythia-160M (GPT-NeoX)": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=50304,
        rotary_pct=0.25, tie_word_embeddings=False)),
    "OPT-125m": ("OPTConfig", "OPTForCausalLM", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, vocab_size=50272,
        max_position_embeddings=2048)),
    "Mixtral-8x7B": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)),
    "Qwen1.5-MoE-A2.7B": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
        intermediate_size=5632, vocab_size=151936)),
    "Qwen3-30B-A3B": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, intermediate_size=6144,
        vocab_size=151936)),
}


# diffusers denoisers: the model class and its published config (transformer/config.json of each pipeline)
_SD3 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
            joint_attention_dim=4096, pooled_projection_dim=2048)
_FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
DIFFUSERS_RELEASES = {
    "SD3-medium": ("SD3Transformer2DModel", dict(
        _SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)),
    "SD3.5-medium": ("SD3Transformer2DModel", dict(
        _SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
        qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
    "SD3.5-large": ("SD3Transformer2DModel", dict(
        _SD3, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
        qk_norm="rms_norm")),
    "FLUX.1-dev": ("FluxTransformer2DModel", dict(_FLUX, guidance_embeds=True)),
    "FLUX.1-schnell": ("FluxTransformer2DModel", dict(_FLUX, guidance_embeds=False)),
}


def _build(name: str) -> tuple[torch.nn.Module, object, str]:
    """The model on the meta device, its config and class name."""
    if name in DIFFUSERS_RELEASES:
        model_cls, sizes = DIFFUSERS_RELEASES[name]
        with torch.device("meta"):
            model = getattr(diffusers, model_cls)(**sizes)
        return model, model.config, model_cls
    config_cls, model_cls, sizes = RELEASES[name]
    config = getattr(tf, config_cls)(**sizes)
    with torch.device("meta"):
        model = getattr(tf, model_cls)(config)
    return model, config, model_cls


def coverage(name: str) -> dict[str, object]:
    model, config, model_cls = _build(name)
    params = dict(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    total = sum(p.numel() for p in params.values())
    tied = tied_parameter_names(model)
    pairs = [p for p in select_pairs(pairs_for(config, shapes, SpecDefConfig(), model_cls), SpecDefConfig())
             if not tied.intersection(p.names())]
    row: dict[str, object] = {"model": name, "params": total}
    for label, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        kept, skipped = drop_inexact(pairs, lambda n, dtype=dtype: dtype)
        deformed = {b.name for p in kept for b in p.producers + p.consumers if len(shapes[b.name]) >= 2}
        hot = {b.name for p in kept for b in p.consumers if len(shapes[b.name]) >= 2}
        row[label] = {"pairs": len(kept), "skipped": len(skipped),
                      "coverage": sum(params[n].numel() for n in deformed) / total,
                      "hot": sum(params[n].numel() for n in hot) / total}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [coverage(name) for name in [*RELEASES, *DIFFUSERS_RELEASES]]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':<24} {'params':>8}  {'fp32 deformed / hot':>20}  {'bf16 deformed / hot':>20}")
    for r in rows:
        f, b = r["float32"], r["bfloat16"]
        print(f"{r['model']:<24} {r['params'] / 1e6:>7.0f}M  {f['coverage']:>9.1%} / {f['hot']:>6.1%}  "
              f"{b['coverage']:>9.1%} / {b['hot']:>6.1%}" + (f"  ({b['skipped']} pairs skipped in bf16)" if b["skipped"] else ""))


if __name__ == "__main__":
    main()
