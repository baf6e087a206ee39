"""Set a fresh copy of a model up for one attack: what trains, and which adapter is attached."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from hf_specdef.research.redteam.attacks import Attack

logger = logging.getLogger("hf_specdef")


OUTLIER_FACTOR = 100.0  # "outlier-frozen": a tensor whose gradient peaks this far above the median peak is frozen


def prepare_model(model: torch.nn.Module, attack: Attack, seed: int, *, frozen: Iterable[str] = (),
                  first_batch: torch.Tensor | None = None, measured: Any = None) -> torch.nn.Module:
    """A deep copy of ``model`` ready for ``attack`` (``model`` itself is left untouched).

    ``frozen`` names the parameters a ``"bypass"`` attack must not train (the deformed ones). A ``"merge-undo"``
    attack expects ``model`` to be the already undone copy (see :func:`undone_copy`). ``first_batch`` (token ids)
    is what the attacks of :data:`MEASURES` (``"outlier-frozen"``, ``"outlier-masked"``, ``"outlier-projected"``)
    measure their gradients on, unless ``measured`` gives what that measurement found on the same model and batch
    before (it depends on neither seed nor rate).
    """
    work = copy.deepcopy(model)
    work.train()
    torch.manual_seed(seed)  # adapter initialisation
    if attack.train in MEASURES and measured is None and first_batch is None:
        raise ValueError(f"attack {attack.name!r} needs first_batch= (the token ids it measures gradients on).")
    if attack.train == "linears":
        linear = {f"{n}.weight" for n, mod in work.named_modules() if isinstance(mod, torch.nn.Linear)}
        frozen = {n for n, _ in work.named_parameters()} - linear  # a head tied to the embeddings stays frozen
        if len(frozen) == len(dict(work.named_parameters())):
            raise ValueError("attack 'linears': the model has no torch.nn.Linear weight to train.")
    if attack.train in ("full", "linears", *MEASURES, "merge-undo", "bypass"):
        frozen = set(frozen) if attack.train in ("bypass", "linears") else set()
        named = dict(work.named_parameters())
        missing = sorted(frozen - set(named))
        if missing:
            raise ValueError(f"bypass: {missing[:3]} are not parameters of the model.")
        for n, p in named.items():
            p.requires_grad_(n not in frozen)
        if attack.train in MEASURES:
            measure, apply = MEASURES[attack.train]
            apply(work, measured if measured is not None else measure(work, first_batch))
        return work
    for p in work.parameters():
        p.requires_grad_(False)
    if attack.train == "lora":
        from peft import LoraConfig, get_peft_model

        targets = attack.targets if isinstance(attack.targets, str) else list(attack.targets)
        return get_peft_model(work, LoraConfig(r=attack.r, lora_alpha=attack.r, target_modules=targets,
                                               lora_dropout=0.0))
    from peft import get_peft_model

    from hf_specdef.tuners.specundo import SpecUndoConfig

    targets = None if attack.targets == "all-linear" else list(attack.targets)
    return get_peft_model(work, SpecUndoConfig(r=attack.r, lora_alpha=attack.r, target_modules=targets,
                                               knowledge=attack.knowledge))


def gradient_outliers(model: torch.nn.Module, batch: torch.Tensor, factor: float = OUTLIER_FACTOR) -> set[str]:
    """The parameters whose gradient on ``batch`` peaks (max absolute value) above ``factor`` x the median peak.

    What an attacker who sees training diverge at every learning rate looks at first (per-tensor gradient norms), with
    no knowledge of SpecDef; on a protected model it finds the weights where two pairs' compensated sides meet.
    """
    peaks = {n: float(g.abs().max()) for n, g in first_batch_gradients(model, batch).items()}
    median = sorted(peaks.values())[(len(peaks) - 1) // 2]
    out = {n for n, v in peaks.items() if v > factor * median}
    logger.info("red team: %d of %d tensors have gradient peaks > %g x the median (%.3g): frozen", len(out),
                len(peaks), factor, median)
    return out


def gradient_outlier_lines(model: torch.nn.Module, batch: torch.Tensor,
                           factor: float = OUTLIER_FACTOR) -> dict[str, torch.Tensor]:
    """Per linear weight, the entries whose row or column stands out: a row (column) whose gradient norm on ``batch``
    is above ``factor`` x the median row (column) norm of that weight. Only weights with such a line are listed; the
    output head is left out (its rows are tokens, and those of the batch's tokens always stand out).

    The finer-grained version of :func:`gradient_outliers`: what an attacker who looks at where inside a weight the
    gradient is large would freeze, with no knowledge of SpecDef. Axis-mode protection scales whole rows/columns, so
    this finds them (and where two pairs meet) while the rest of every weight stays trainable.
    """
    masks, lines, total = {}, 0, 0
    for n, g in _linear_gradients(model, batch).items():
        rows, cols = g.norm(dim=1), g.norm(dim=0)
        hot_rows = rows > factor * rows.median()
        hot_cols = cols > factor * cols.median()
        total += g.shape[0] + g.shape[1]
        if hot_rows.any() or hot_cols.any():
            masks[n] = hot_rows[:, None] | hot_cols[None, :]
            lines += int(hot_rows.sum() + hot_cols.sum())
    logger.info("red team: %d of %d rows/columns (in %d weights) have gradient norms > %g x their weight's median: "
                "masked", lines, total, len(masks), factor)
    return masks


def mask_lines(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the gradient of the masked entries of each named parameter (a gradient hook: with no weight decay, AdamW
    and SGD leave them unchanged)."""
    named = dict(model.named_parameters())
    for n, m in masks.items():
        p = named[n]
        keep = (~m).to(device=p.device, dtype=p.dtype)
        p.register_hook(lambda g, keep=keep: g * keep)


def first_batch_gradients(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradients (float32) of the language-modelling loss on ``batch`` (token ids); ``model``'s grads are left
    cleared."""
    model.zero_grad(set_to_none=True)
    batch = batch.to(next(model.parameters()).device)
    model(input_ids=batch, labels=batch).loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _linear_gradients(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`first_batch_gradients` of the linear weights, the output head left out (its rows are tokens)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    linear = {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and mod is not head}
    return {n: g for n, g in first_batch_gradients(model, batch).items() if n in linear and g.dim() == 2}


def gradient_outlier_directions(model: torch.nn.Module, batch: torch.Tensor,
                                factor: float = OUTLIER_FACTOR) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per linear weight, the singular directions of its first-batch gradient that stand out: those whose singular
    value is above ``factor`` x the median of the nonzero ones; returned as ``(U, V)`` (output, input directions).

    The rotation-invariant version of :func:`gradient_outlier_lines`: it also finds a deformation along dense
    directions (spectral mode), with no knowledge of SpecDef.
    """
    out, found = {}, 0
    for n, g in _linear_gradients(model, batch).items():
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        nonzero = s[s > s[0] * 1e-6]
        hot = s > factor * nonzero.median()
        if hot.any():
            out[n] = (u[:, hot].contiguous(), vh[hot].T.contiguous())
            found += int(hot.sum())
    logger.info("red team: %d singular directions (in %d weights) have gradient singular values > %g x their weight's "
                "median: projected out", found, len(out), factor)
    return out


def project_out(model: torch.nn.Module, directions: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Keep each named weight from moving along the given output and input directions: its gradient becomes
    ``(I - UU^T) G (I - VV^T)`` (a gradient hook), and before every forward pass the weight's change since now is
    projected the same way (a forward pre-hook: Adam's per-coordinate steps do not stay in the gradient's subspace)."""
    named = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for n, (u, v) in directions.items():
        p = named[n]
        u, v = u.to(p.device, torch.float32), v.to(p.device, torch.float32)

        def project(x: torch.Tensor, u: torch.Tensor = u, v: torch.Tensor = v) -> torch.Tensor:
            x32 = x.float()
            x32 = x32 - u @ (u.T @ x32)
            return (x32 - (x32 @ v) @ v.T).to(x.dtype)

        def keep_off(module: torch.nn.Module, args: Any, p: torch.nn.Parameter = p, start: torch.Tensor = p.detach().clone(),
                     project: Callable[[torch.Tensor], torch.Tensor] = project) -> None:
            with torch.no_grad():
                p.copy_(start + project(p - start))

        p.register_hook(project)
        modules[n.rsplit(".", 1)[0]].register_forward_pre_hook(keep_off)


def freeze(model: torch.nn.Module, names: set[str]) -> None:
    """Stop training the named parameters."""
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(False)


MEASURES: dict[str, tuple[Callable[..., Any], Callable[..., None]]] = {
    "outlier-frozen": (gradient_outliers, freeze),
    "outlier-masked": (gradient_outlier_lines, mask_lines),
    "outlier-projected": (gradient_outlier_directions, project_out),
}  # train kind -> (what it measures on the first batch, how it then limits training)


def undone_copy(model: torch.nn.Module, knowledge: str = "blind") -> torch.nn.Module:
    """A copy of a protected model whose weights the in-place undo rewrote back (``hf_specdef.undo.merge``)."""
    from hf_specdef.undo.merge import undo_in_place

    work = copy.deepcopy(model)
    result = undo_in_place(work, knowledge, progress=False)
    logger.info("red team: merge-undo rewrote %d sites (%s)", len(result.sites), knowledge)
    return work

