"""Probe inputs and output comparison used by verification.

Also the probe of a pipeline's composed function, text encoder then denoiser (:func:`composed_output`), which is
what a pipeline-level norm fold keeps: used by in-memory protection and by the comparison of saved folders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from hf_specdef.analysis import integration_registry as handlers

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


def first_float_param(model: torch.nn.Module) -> torch.Tensor:
    """The first floating-point parameter of ``model`` (its device and dtype for float inputs)."""
    return next(p for p in model.parameters() if p.is_floating_point())


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
    lib = handlers.library_of(model)
    missing = f" ({handlers.missing_message(lib, 'its probe')})" if lib and not handlers.installed(lib) else ""
    raise ValueError(
        f"cannot build probe inputs for {type(model).__name__}; pass inputs=... (a dict of model kwargs) "
        f"or verify=False.{missing}"
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


def text_ids(te: torch.nn.Module, seed: int, batch: int) -> torch.Tensor:
    """Probe token ids for the text encoder ``te`` (``batch`` rows of up to 16, from ``seed``), on its device."""
    c = te.config
    seq = min(16, getattr(c, "max_position_embeddings", 16) or 16)
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, c.vocab_size, (batch, seq), generator=g).to(first_float_param(te).device)


@torch.no_grad()
def composed_output(
    comps: dict[str, torch.nn.Module], dname: str, inputs: dict[str, Any], ids: torch.Tensor | None
) -> torch.Tensor:
    """Denoiser ``comps[dname]``'s output on ``inputs``; with ``ids``, ``encoder_hidden_states`` comes from the text
    encoder ``comps["text_encoder"]`` run on those token ids."""
    denoiser = comps[dname]
    if ids is not None:
        from hf_specdef.sites.diffusers import TEXT_ENCODER  # here: importing it registers the diffusers sites

        te = comps[TEXT_ENCODER]
        with eval_mode(te):
            ehs = te(input_ids=ids)[0]
        inputs = {**inputs, "encoder_hidden_states": ehs.to(first_float_param(denoiser).dtype)}
    return run_probe(denoiser, inputs)
