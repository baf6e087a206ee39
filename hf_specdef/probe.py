"""Probe inputs and output comparison used by verification."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

ProbeBuilder = Callable[[Any, int], "dict[str, Any] | None"]
PROBE_BUILDERS: list[ProbeBuilder] = []  # integrations (diffusers) add builders here


def model_device(model: Any) -> torch.device:
    """Where a model's inputs go (its input embeddings when it has them, else its first parameter)."""
    emb = getattr(model, "get_input_embeddings", None)
    try:
        if emb is not None and emb() is not None:
            return emb().weight.device
    except (NotImplementedError, AttributeError):
        pass
    return next(model.parameters()).device


def text_probe(model: Any, seed: int = 0, batch: int = 2, seq: int = 16) -> dict[str, Any] | None:
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if not vocab:
        return None
    seq = min(seq, getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or seq)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids.to(model_device(model))}


def probe_inputs(model: Any, seed: int = 0) -> dict[str, Any]:
    """A deterministic probe batch built from the model's config."""
    for build in PROBE_BUILDERS + [text_probe]:
        inputs = build(model, seed)
        if inputs is not None:
            return inputs
    raise ValueError(
        f"cannot build probe inputs for {type(model).__name__}; pass inputs=... (a dict of model kwargs) "
        "or verify=False."
    )


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    was = getattr(model, "training", False)
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def main_output(out: Any) -> torch.Tensor:
    """The tensor that stands for a model's output (logits, last hidden state, sample...)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state", "sample", "prediction_scores"):
        v = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    seq = out.to_tuple() if hasattr(out, "to_tuple") else out
    for v in seq:
        if isinstance(v, torch.Tensor):
            return v
    raise ValueError(f"cannot find an output tensor in {type(out).__name__}")


@torch.no_grad()
def run_probe(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    with eval_mode(model):
        return main_output(model(**inputs)).detach().to(torch.float64)


def max_relative_deviation(reference: torch.Tensor, output: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` (robust to near-zero entries); inf if the output is not finite."""
    reference, output = reference.to(torch.float64), output.to(device=reference.device, dtype=torch.float64)
    if not torch.isfinite(output).all():
        return float("inf")
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((output - reference).abs().max() / scale)
