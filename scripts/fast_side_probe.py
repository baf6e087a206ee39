#!/usr/bin/env python
"""Which parameters make a protected model untrainable: one Adam-like step per parameter group.

Protects a copy of MODEL with a red-team variant, takes the gradient of one training batch of the red team's attack
data, then for each parameter group (the same parameter name in every layer) moves only that group by one first Adam
step (``lr * sign(grad)``, what AdamW's first update is when gradients exceed its epsilon) and reports the held-out
loss. A group whose single step at a tiny learning rate wrecks the loss is the protection's fast side: it bounds the
learning rate of every attacker who trains it.

    python scripts/fast_side_probe.py SMOLLM2_DIR --variant axis-a65536 --lr 2.15e-9

Measured on SmolLM2-135M-Instruct (axis alpha=65536, lr 2.15e-9): k_proj alone takes the held-out loss from 3.940 to
5.78 (its rows are the compensated side of the query/key pair AND its columns that of the norm pair: alpha^2 = 4.3e9
on the weights where the two meet, the smallest 1.1e-13); every other group stays within 0.01. On the default
(axis alpha=1024) at its best full fine-tuning rate 2.15e-6: k_proj 3.940 -> 4.20 (the group that caps the rate),
while down_proj alone already lowers it to 3.846 (its compensated columns train alpha x faster: the free adapter).
"""

from __future__ import annotations

import argparse
import re
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="folder of the unprotected causal LM (with its tokenizer)")
    p.add_argument("--variant", default="default", help="red-team protection variant (hf_specdef.research.redteam.config)")
    p.add_argument("--lr", type=float, default=2.15e-9, help="the step size of the one step (default 2.15e-9)")
    args = p.parse_args(argv)

    from hf_specdef.research.redteam.config import RedTeamConfig
    from hf_specdef.research.redteam.data import build_attack_data
    from hf_specdef.research.redteam.suite import load_model
    from hf_specdef.research.redteam.training import eval_loss
    from hf_specdef.research.redteam.variants import protect_variant, storage_dtype

    cfg = RedTeamConfig.preset_config("quick", variants=(args.variant,))
    model, tokenizer, _ = load_model(args.model)
    data = build_attack_data(tokenizer, None, seq_len=cfg.seq_len, eval_windows=cfg.eval_windows,
                             min_train_windows=cfg.batch_size * 4)
    protected, _ = protect_variant(model, args.variant, cfg, data.eval, storage_dtype(args.model))
    before = eval_loss(protected, data.eval)
    protected.train()
    batch = data.train[: cfg.batch_size]
    protected(input_ids=batch, labels=batch).loss.backward()
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, param in protected.named_parameters():
        groups.setdefault(re.sub(r"\.\d+\.", ".N.", name), []).append(param)
    print(f"held-out loss {before:.3f}; one step of {args.lr:g} x sign(grad) on one group at a time:")
    for group, params in groups.items():
        saved = [q.detach().clone() for q in params]
        with torch.no_grad():
            for q in params:
                q -= args.lr * torch.sign(q.grad)
        loss = eval_loss(protected, data.eval)
        with torch.no_grad():
            for q, s in zip(params, saved, strict=True):
                q.copy_(s)
        smallest = min(q.detach().abs()[q.detach() != 0].min().item() for q in params)
        largest_grad = max(q.grad.abs().max().item() for q in params)
        print(f"  {group:45s} loss {loss:7.3f}   max |grad| {largest_grad:9.3g}   min |weight| {smallest:9.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
