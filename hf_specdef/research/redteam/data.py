"""Attack data of the red team: a fixed corpus shipped with the package, or the user's own text.

The default corpus (``data/license_corpus.txt``, 109 KB) is a fixed snapshot of nine open-source license texts
(Apache-2.0, the PSF license, LGPL-3, matplotlib's, scikit-learn's, psutil's, pytest's, tqdm's and PyTorch's): legal
prose, a style an instruction-tuned model does not write by default and visibly learns. It ships inside the package,
so the attack data are the same on every machine (earlier versions read the license files of whatever was installed,
and the benchmark's figures moved with the environment).

Text is tokenized once with the model's tokenizer and cut into non-overlapping windows of ``seq_len`` tokens; every
``holdout_every``-th window is held out (an interleaved split, so both halves have the same mix of texts); held-out
windows that also occur among the training windows (license boilerplate repeats) are dropped, and a fixed set of
the rest, spread over the corpus, is the evaluation batch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from hf_specdef.errors import SpecDefError

DEFAULT_CORPUS = "license_corpus.txt"


class AttackDataError(SpecDefError, ValueError):
    """The attack data cannot be built (missing file, too little text, ...)."""

    docs_page = "docs/redteam.md"


def default_corpus() -> str:
    """The corpus shipped with the package."""
    return resources.files("hf_specdef.research.redteam").joinpath("data", DEFAULT_CORPUS).read_text(encoding="utf-8")


def read_texts(source: Any = None, text_field: str = "text") -> tuple[list[str], str]:
    """Documents of ``source`` and a description of it.

    ``source`` is ``None`` (the shipped corpus), a ``.txt`` file (one document), a ``.jsonl`` file (one JSON object
    per line with a ``text_field`` string), or a ``datasets.Dataset`` (its ``text_field`` column).
    """
    if source is None:
        return [default_corpus()], f"shipped corpus hf_specdef/research/redteam/data/{DEFAULT_CORPUS}"
    if hasattr(source, "column_names"):  # a datasets.Dataset
        if text_field not in source.column_names:
            raise AttackDataError(f"the dataset has no column {text_field!r} (columns: {source.column_names}); pass "
                                  "text_field=<the text column>.")
        return [str(t) for t in source[text_field]], f"dataset ({len(source)} rows, column {text_field!r})"
    path = Path(os.fspath(source))
    if not path.is_file():
        raise AttackDataError(f"attack data {str(path)!r} is not a file; pass a .txt or .jsonl file (or nothing for "
                              "the shipped corpus).")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field), f"{path} (jsonl, field {text_field!r})"
    return [path.read_text(encoding="utf-8", errors="replace")], str(path)


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AttackDataError(f"{path}:{n} is not valid JSON ({e.msg}).") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise AttackDataError(f"{path}:{n} has no string field {text_field!r}; pass text_field=<name>.")
            texts.append(row[text_field])
    return texts


@dataclass
class AttackData:
    """Tokenized attack data: training windows and the fixed held-out evaluation batch."""

    train: torch.Tensor  # (n_train, seq_len) token ids
    eval: torch.Tensor  # (n_eval, seq_len) token ids
    source: str
    n_tokens: int

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "tokens": self.n_tokens, "train_windows": len(self.train),
                "eval_windows": len(self.eval), "seq_len": int(self.train.shape[1])}


def tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All documents as one token stream, separated by the end-of-sequence token when there is one."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


def build_attack_data(tokenizer: Any, source: Any = None, *, seq_len: int = 64, eval_windows: int = 8,
                      min_train_windows: int = 16, holdout_every: int = 5, text_field: str = "text") -> AttackData:
    """Cut ``source`` (see :func:`read_texts`) into training windows and a held-out evaluation batch."""
    texts, desc = read_texts(source, text_field)
    ids = tokenize(tokenizer, texts)
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    held = torch.arange(len(windows)) % holdout_every == holdout_every - 1
    train, pool = windows[~held], windows[held]
    seen = {tuple(w.tolist()) for w in train}  # boilerplate repeats across licenses: hold out only unseen windows
    pool = pool[[tuple(w.tolist()) not in seen for w in pool]]
    need = eval_windows * holdout_every + min_train_windows
    if len(train) < min_train_windows or len(pool) < eval_windows:
        raise AttackDataError(
            f"attack data {desc} give {len(ids)} tokens = {len(windows)} windows of {seq_len}: too few for "
            f"{min_train_windows} training and {eval_windows} held-out windows (about {need * seq_len} tokens are "
            "needed); pass more text, or lower seq_len / eval_windows.")
    pick = torch.linspace(0, len(pool) - 1, eval_windows).round().long()
    return AttackData(train=train.clone(), eval=pool[pick].clone(), source=desc, n_tokens=len(ids))


class WindowDataset(torch.utils.data.Dataset):
    """Causal-LM examples (``input_ids`` = ``labels``) from fixed token windows, for ``transformers.Trainer``."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = self.windows[i]
        return {"input_ids": w, "labels": w}
