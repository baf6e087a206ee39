"""Protected-then-quantized against unprotected-then-quantized: output deviation and greedy text."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hf_specdef.analysis import probe
from hf_specdef.errors import SpecDefError
from hf_specdef.quantization.formats import get_format
from hf_specdef.quantization.weights import quantized_weights

DEFAULT_PROMPT = "What is the capital of France?"


@dataclass
class QuantizedComparison:
    """One format's round trip of both models.

    ``deviation``: max relative deviation of the quantized protected model from the quantized original (the figure
    that matters: 0 when quantization cannot see the deformation). ``quantization_error``: the quantized original
    against the float original (what quantization costs anyway); ``protected_error``: the quantized protected model
    against the float original (compare it with ``quantization_error``).
    """

    format: str
    deviation: float
    quantization_error: float
    protected_error: float
    tolerance: float
    text_original: str | None = None
    text_protected: str | None = None
    kept_float: list[str] = field(default_factory=list)

    @property
    def same_text(self) -> bool | None:
        return None if self.text_original is None else self.text_original == self.text_protected

    @property
    def ok(self) -> bool:
        return self.deviation <= self.tolerance and self.same_text is not False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"same_text": self.same_text, "ok": self.ok}

    def __str__(self) -> str:
        ratio = self.protected_error / self.quantization_error if self.quantization_error > 0 else float("nan")
        line = (f"{self.format:<10} {'OK' if self.ok else 'FAILED':<6} deviation from quantized original "
                f"{self.deviation:.3e} (tolerance {self.tolerance:g}); vs float original: unprotected "
                f"{self.quantization_error:.3e}, protected {self.protected_error:.3e} ({ratio:.3g}x)")
        if self.text_original is not None:
            line += f"\n           greedy text {'same' if self.same_text else 'DIFFERENT'}: {self.text_protected!r}"
            if not self.same_text:
                line += f" (quantized original: {self.text_original!r})"
        return line


def chat_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """Token ids of ``prompt`` as one user turn of the tokenizer's chat template (the bare prompt without one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def greedy_text(model: Any, tokenizer: Any, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24) -> str:
    """The model's greedy continuation of ``prompt`` (chat template applied), decoded."""
    ids = chat_ids(tokenizer, prompt).to(probe.model_device(model))
    with probe.eval_mode(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def compare_quantized(
    original: torch.nn.Module,
    protected: torch.nn.Module,
    fmt: str,
    *,
    tolerance: float,
    inputs: dict[str, Any] | None = None,
    tokenizer: Any = None,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 24,
) -> QuantizedComparison:
    """Quantize every linear weight of both models in ``fmt`` (temporarily; both are restored) and compare them on
    the probe batch ``inputs`` (default: the probe batch of ``original``), plus greedy text when a ``tokenizer`` is
    given and the models can generate."""
    get_format(fmt)
    inputs = inputs if inputs is not None else probe.probe_inputs(original)
    reference = probe.run_probe(original, inputs)
    texts: list[str | None] = [None, None]
    generate = tokenizer is not None and hasattr(original, "generate")
    outs = []
    for i, model in enumerate((original, protected)):
        moved = {k: v.to(probe.model_device(model)) if torch.is_tensor(v) else v for k, v in inputs.items()}
        with quantized_weights(model, fmt) as swap:
            outs.append(probe.run_probe(model, moved))
            if generate:
                texts[i] = greedy_text(model, tokenizer, prompt, max_new_tokens)
    dev = probe.max_relative_deviation
    return QuantizedComparison(fmt, dev(outs[0], outs[1]), dev(reference, outs[0]), dev(reference, outs[1]), tolerance,
                               texts[0], texts[1], sorted(swap.kept_float))


class QuantizedVerificationError(SpecDefError, ValueError):
    """The quantized protected model deviates from the quantized original beyond the tolerance."""

    docs_page = "docs/quantization.md"


class QuantizedCheck:
    """Protection's second check: the probe outputs of the model with every linear weight quantized, per format,
    recorded before deformation (:meth:`reference`) and compared after (call it as ``check(results, tensors)`` of
    :func:`hf_specdef.protection.in_memory.deform_verified`)."""

    def __init__(self, model: torch.nn.Module, inputs: dict[str, Any], formats: tuple[str, ...], tolerance: float):
        self.model, self.inputs, self.formats, self.tolerance = model, inputs, formats, tolerance
        self.references: dict[str, torch.Tensor] = {}
        self.deviations: dict[str, float] = {}

    def _outputs(self) -> dict[str, torch.Tensor]:
        out = {}
        for f in self.formats:
            with quantized_weights(self.model, f):
                out[f] = probe.run_probe(self.model, self.inputs)
        return out

    def reference(self) -> None:
        self.references = self._outputs()

    def __call__(self, results: Any = None, tensors: Any = None) -> None:
        now = self._outputs()
        self.deviations = {f: probe.max_relative_deviation(self.references[f], now[f]) for f in self.formats}
        bad = {f: d for f, d in self.deviations.items() if not d <= self.tolerance}
        if bad:
            raise QuantizedVerificationError(
                f"quantized protected outputs deviate from the quantized original by {bad} (max relative) > "
                f"tolerance={self.tolerance:g}; every change was restored and nothing was written."
            )
