"""Text scenario: a tiny byte-level Llama pretrained on Python's own docstrings, attacked on license texts.

No downloads: the pretraining corpus is the docstrings of the standard library's modules, classes and
functions (technical English prose, read with :mod:`ast` from the installed sources); the attack corpus is
license texts shipped with the installation (Python's ``LICENSE.txt`` and the ``LICENSE*`` files of the
installed distributions: legal prose, often upper case) -- a held-out slice in a different style, which
the attacker fine-tunes the model to imitate. Tokenization is byte level (ASCII, vocabulary 128).
"""

from __future__ import annotations

import ast
import functools
import logging
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_specdef.research.evaluation.runner import cycle

logger = logging.getLogger("hf_specdef")

VOCAB = 128


def encode(text: str) -> torch.Tensor:
    """ASCII bytes as a long tensor (other characters become ``?``)."""
    return torch.tensor(list(text.encode("ascii", errors="replace")), dtype=torch.long).clamp_(max=VOCAB - 1)


@functools.lru_cache(maxsize=2)
def docstring_corpus(max_chars: int = 300_000) -> str:
    """Docstrings of the standard library (sorted files, so the corpus is the same on every run)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc.strip() + "\n\n")
                    total += len(parts[-1])
        if total >= max_chars:
            break
    if total < 10_000:
        raise RuntimeError(f"found only {total} characters of docstrings under {root}; the text scenario needs more.")
    return "".join(parts)[:max_chars]


@functools.lru_cache(maxsize=2)
def license_corpus(max_chars: int = 120_000) -> str:
    """License texts of the Python installation and of installed distributions (sorted, deduplicated)."""
    files: list[Path] = []
    py_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if py_license.is_file():
        files.append(py_license)
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        for f in sorted(dist.files or [], key=str):
            name = Path(str(f)).name.upper()
            if name.startswith(("LICENSE", "COPYING", "LICENCE")):
                p = Path(str(dist.locate_file(f)))
                if p.is_file():
                    files.append(p)
    seen: set[str] = set()
    parts: list[str] = []
    total = 0
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace").strip()
        if len(text) < 200 or text in seen:
            continue
        seen.add(text)
        parts.append(text + "\n\n")
        total += len(parts[-1])
        if total >= max_chars:
            break
    if total < 5_000:
        raise RuntimeError(f"found only {total} characters of license texts; the text scenario needs more.")
    return "".join(parts)[:max_chars]


def windows(ids: torch.Tensor, seq_len: int, batch_size: int, n_batches: int, seed: int) -> list[torch.Tensor]:
    """``n_batches`` batches of random windows of ``seq_len`` tokens (seeded)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len - 1, (n_batches, batch_size), generator=g)
    return [torch.stack([ids[s:s + seq_len] for s in row.tolist()]) for row in starts]


def tiny_llama_config(**kw: Any) -> Any:
    from transformers import LlamaConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy (nats per byte)."""
    dev = next(model.parameters()).device
    batch = batch.to(dev)
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


@dataclass
class TextScenario:
    """Pretrain a tiny Llama on docstrings, attack it on license texts.

    Args:
        seq_len: tokens per training window.
        batch_size: windows per attack batch.
        pretrain_batch_size: windows per pretraining batch.
        pretrain_steps: Adam steps of pretraining on docstrings.
        attack_batches: distinct attack batches (cycled, reshuffled per epoch with the run's seed).
        eval_windows: windows of the held-out evaluation batch.
        seed: model init and data seed.
        model_kwargs: overrides of :func:`tiny_llama_config`.
    """

    seq_len: int = 64
    batch_size: int = 8
    pretrain_batch_size: int = 16
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    attack_batches: int = 64
    seed: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = "text"
    description: str = "tiny byte-level Llama, pretrained on stdlib docstrings, attacked on license texts"
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    eval_windows: int = 8

    def __post_init__(self) -> None:
        self._attack: list[torch.Tensor] | None = None
        self._eval: torch.Tensor | None = None

    def build_model(self, progress: bool = True) -> torch.nn.Module:
        """A tiny Llama pretrained on the docstring corpus (seeded, deterministic)."""
        from transformers import LlamaForCausalLM

        torch.manual_seed(self.seed)
        model = LlamaForCausalLM(tiny_llama_config(max_position_embeddings=max(128, self.seq_len), **self.model_kwargs))
        ids = encode(docstring_corpus())
        batches = windows(ids, self.seq_len + 1, self.pretrain_batch_size, self.pretrain_steps, self.seed + 1)
        opt = torch.optim.Adam(model.parameters(), lr=self.pretrain_lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / self.pretrain_steps))
        model.train()
        bar = tqdm(batches, desc="pretrain text model", unit="step", disable=not progress, leave=False)
        for b in bar:
            opt.zero_grad(set_to_none=True)
            loss = lm_loss(model, b)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        logger.info("text scenario: pretrained %d steps, last loss %.3f", self.pretrain_steps, loss.item())
        return model.eval()

    def attack_data(self) -> list[torch.Tensor]:
        """Training batches of the attack: windows of the first 80% of the license corpus."""
        if self._attack is None:
            ids = encode(license_corpus())
            cut = int(0.8 * len(ids))
            self._attack = windows(ids[:cut], self.seq_len + 1, self.batch_size, self.attack_batches, self.seed + 2)
            self._eval = windows(ids[cut:], self.seq_len + 1, self.eval_windows, 1, self.seed + 3)[0]
        return self._attack

    @torch.no_grad()
    def eval_loss(self, model: torch.nn.Module) -> float:
        """Loss on a fixed held-out batch (the last 20% of the license corpus)."""
        self.attack_data()
        was = model.training
        model.eval()
        try:
            return float(lm_loss(model, self._eval))
        finally:
            model.train(was)

    def batches(self, seed: int) -> Iterator[torch.Tensor]:
        """Attack batches (license-text windows), cycled in a seeded order."""
        return cycle(self.attack_data(), seed)

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return lm_loss(model, batch)

    def probe_inputs(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {"input_ids": self.attack_data()[0][:2, :32].to(next(model.parameters()).device)}
