"""Set a fresh copy of a model up for one attack: what trains, and which adapter is attached."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch

from .attacks import Attack

logger = logging.getLogger("hf_specdef")


def prepare_model(model: torch.nn.Module, attack: Attack, seed: int, *, frozen: Iterable[str] = ()) -> torch.nn.Module:
    """A deep copy of ``model`` ready for ``attack`` (``model`` itself is left untouched).

    ``frozen`` names the parameters a ``"bypass"`` attack must not train (the deformed ones). A ``"merge-undo"``
    attack expects ``model`` to be the already undone copy (see :func:`undone_copy`).
    """
    work = copy.deepcopy(model)
    work.train()
    torch.manual_seed(seed)  # adapter initialisation
    if attack.train == "linears":
        linear = {f"{n}.weight" for n, mod in work.named_modules() if isinstance(mod, torch.nn.Linear)}
        frozen = {n for n, _ in work.named_parameters()} - linear  # a head tied to the embeddings stays frozen
        if len(frozen) == len(dict(work.named_parameters())):
            raise ValueError("attack 'linears': the model has no torch.nn.Linear weight to train.")
    if attack.train in ("full", "linears", "merge-undo", "bypass"):
        frozen = set(frozen) if attack.train in ("bypass", "linears") else set()
        named = dict(work.named_parameters())
        missing = sorted(frozen - set(named))
        if missing:
            raise ValueError(f"bypass: {missing[:3]} are not parameters of the model.")
        for n, p in named.items():
            p.requires_grad_(n not in frozen)
        return work
    for p in work.parameters():
        p.requires_grad_(False)
    if attack.train == "lora":
        from peft import LoraConfig, get_peft_model

        targets = attack.targets if isinstance(attack.targets, str) else list(attack.targets)
        return get_peft_model(work, LoraConfig(r=attack.r, lora_alpha=attack.r, target_modules=targets,
                                               lora_dropout=0.0))
    from peft import get_peft_model

    from ..tuners.specundo import SpecUndoConfig

    targets = None if attack.targets == "all-linear" else list(attack.targets)
    return get_peft_model(work, SpecUndoConfig(r=attack.r, lora_alpha=attack.r, target_modules=targets,
                                               knowledge=attack.knowledge))


def undone_copy(model: torch.nn.Module, knowledge: str = "blind") -> torch.nn.Module:
    """A copy of a protected model whose weights the in-place undo rewrote back (``hf_specdef.undo``)."""
    from ..undo import undo_in_place

    work = copy.deepcopy(model)
    result = undo_in_place(work, knowledge, progress=False)
    logger.info("red team: merge-undo rewrote %d sites (%s)", len(result.sites), knowledge)
    return work

