#!/usr/bin/env python3
"""Research prototype for issue #16 (not a product path): a *tiered* deformation of a Llama-family checkpoint.

What it changes, all by powers of two (bit-exact in bfloat16 and float32, not in float16):

* **norm, inverted, per-channel tiers**: every pre-norm weight channel ``c`` is divided by ``s_c`` and the same input
  column of every reader (q/k/v, gate/up) multiplied by it. The ``s_c`` come in tiers ``2^(base + j)`` whose sizes grow
  geometrically (1, 2, 2, 3, 5, 8, ... channels): few channels are fast, most are slow, and no single learning rate
  suits them all. The norm gains become the fast set (0.03% of the parameters): full fine-tuning diverges unless its
  rate is cut so far that nothing else moves.
* **attn.vo and mlp, inverted, per-row tiers**: v rows (up rows) divided by ``t_r``, the matching o columns (down
  columns) multiplied; the norm tiers start above the largest ``t`` so that v and up stay slow too.
* **residual**: the whole residual stream is scaled by ``2^c``: embeddings (and the tied head) times ``2^c``, o/down
  rows times ``2^c``, every RMSNorm epsilon times ``4^c`` (``config.rms_norm_eps``: RMSNorm is then exactly
  invariant), the final norm weight divided by ``2^c`` (the tied head's logits). The embeddings, 21% of SmolLM2 and
  untouched by the sites, become slow.

It writes a protected checkpoint that stock transformers loads (the record is not written: this is a prototype), and
checks the logits in float32 and bfloat16 against the original's. Attack it with the red team:

    python scripts/tiered_prototype.py SRC DST
    hf-specdef redteam SRC --out OUT --quick --protected tiered=DST [--reuse-unprotected OLD/results.json]

Measured on SmolLM2 (``scripts/results/redteam-smollm2-quick/``): >= 10.1x against line masking, 3.6x against
freezing the outlier tensors, 2.75x against LoRA r=16 — and 1.00x against ``full-madam`` (multiplicative Adam), which
is invariant to rescaling weights, as every bit-exact deformation including this one does: no tiering can help there.

Not done (why it is a prototype): no SpecUndo blind detection of per-channel tiers (the recipe/merge undo would need
the record), no streaming path, no quantization-safe variant (the float16 GGUF scales cannot hold 2^30), Llama family
only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def tier_exponents(n: int, base: int, ratio: float = 1.5, seed: int = 0) -> torch.Tensor:
    """``n`` exponents ``base + j``, tier ``j`` holding about ``ratio**j`` channels, in a seeded random order."""
    counts: list[int] = []
    while sum(counts) < n:
        counts.append(max(1, round(ratio ** len(counts))))
    counts[-1] -= sum(counts) - n
    exps = torch.cat([torch.full((c,), float(base + j)) for j, c in enumerate(counts)])
    return exps[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


@torch.no_grad()
def tiered(model: torch.nn.Module, residual: int = 10, norm_base: int = 16, mlp_norm_base: int = 21, inner_base: int = 2,
           ratio: float = 1.5, seed: int = 0, hot: int = 0) -> torch.nn.Module:
    """Deform a Llama-family ``model`` in place (see the module docstring). ``hot`` > 0: in every norm / v / up block
    one channel (the slowest tier's first) is instead *inflated* by ``2^hot`` (gain x, readers / : the classic site)."""
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    c = 2.0 ** residual
    if residual:
        model.model.embed_tokens.weight.mul_(c)  # the tied lm_head too
        model.model.norm.weight.div_(c)
        cfg.rms_norm_eps = cfg.rms_norm_eps * c * c
        model.model.norm.variance_epsilon *= c * c
    for i, layer in enumerate(model.model.layers):
        a, m, s = layer.self_attn, layer.mlp, seed * 1000 + i * 10
        if residual:
            layer.input_layernorm.variance_epsilon *= c * c
            layer.post_attention_layernorm.variance_epsilon *= c * c
            a.o_proj.weight.mul_(c)
            m.down_proj.weight.mul_(c)
        for norm, readers, base, k in ((layer.input_layernorm, (a.q_proj, a.k_proj, a.v_proj), norm_base, 1),
                                       (layer.post_attention_layernorm, (m.gate_proj, m.up_proj), mlp_norm_base, 2)):
            f = 2.0 ** tier_exponents(norm.weight.numel(), base, ratio, s + k)
            if hot:
                f[int(f.argmax())] = 2.0 ** -hot
            norm.weight.div_(f.to(norm.weight.dtype))
            for r in readers:
                r.weight.mul_(f.to(r.weight.dtype))
        f = 2.0 ** tier_exponents(nkv * hd, inner_base, ratio, s + 3)  # per value row
        if hot:
            for h in range(nkv):
                f[h * hd + int(f[h * hd:(h + 1) * hd].argmax())] = 2.0 ** -hot
        a.v_proj.weight.div_(f.to(a.v_proj.weight.dtype)[:, None])
        fo = torch.cat([f[(h // (nq // nkv)) * hd:(h // (nq // nkv) + 1) * hd] for h in range(nq)])
        a.o_proj.weight.mul_(fo.to(a.o_proj.weight.dtype)[None, :])
        f = 2.0 ** tier_exponents(m.up_proj.weight.shape[0], inner_base, ratio, s + 4)
        if hot:
            f[int(f.argmax())] = 2.0 ** -hot
        m.up_proj.weight.div_(f.to(m.up_proj.weight.dtype)[:, None])
        m.down_proj.weight.mul_(f.to(m.down_proj.weight.dtype)[None, :])
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="an unprotected Llama-family checkpoint folder (bf16 or fp32)")
    p.add_argument("dst", type=Path, help="new folder for the deformed checkpoint")
    p.add_argument("--residual", type=int, default=10, help="log2 of the residual-stream scale (0: off)")
    p.add_argument("--norm-base", type=int, default=16)
    p.add_argument("--mlp-norm-base", type=int, default=21, help="above inner_base + the mlp tiers (16 for 1536 rows)")
    p.add_argument("--inner-base", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hot", type=int, default=0, help="log2 of the inflation of one classic (hot) channel per block")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.dst.exists():
        raise SystemExit(f"{args.dst} exists; pass a new folder")
    model = AutoModelForCausalLM.from_pretrained(args.src)
    tiered(model, args.residual, args.norm_base, args.mlp_norm_base, args.inner_base, seed=args.seed, hot=args.hot)
    model.save_pretrained(args.dst)
    AutoTokenizer.from_pretrained(args.src).save_pretrained(args.dst)
    ids = torch.arange(1, 65)[None] * 37 % model.config.vocab_size
    for dtype in (torch.float32, torch.bfloat16):
        ref = AutoModelForCausalLM.from_pretrained(args.src, dtype=dtype).eval()
        got = AutoModelForCausalLM.from_pretrained(args.dst, dtype=dtype).eval()
        with torch.no_grad():
            x, y = ref(input_ids=ids).logits.float(), got(input_ids=ids).logits.float()
        print(f"{str(dtype)[6:]}: max relative logit deviation {float((x - y).abs().max() / x.abs().max()):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
