"""The Llama shape options shared by the synthetic-model benchmarks (``bench_load``, ``bench_streaming``,
``profile_deform``): one place for the flags and the config they build."""

from __future__ import annotations

import argparse
from typing import Any


def add_llama_shape_args(p: argparse.ArgumentParser, *, hidden: int = 768, layers: int = 12, intermediate: int = 2048,
                         heads: int = 12, kv_heads: int = 4, vocab: int = 32000) -> None:
    """``--hidden --layers --intermediate --heads --kv-heads --vocab`` with these defaults."""
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--intermediate", type=int, default=intermediate)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--kv-heads", type=int, default=kv_heads)
    p.add_argument("--vocab", type=int, default=vocab)


def llama_config(args: argparse.Namespace, max_positions: int = 2048) -> Any:
    """The untied ``LlamaConfig`` of those options."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, max_position_embeddings=max_positions,
                       tie_word_embeddings=False)
