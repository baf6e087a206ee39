"""The attack runner: fine-tune a copy of a model and count the steps it needs to reach a target loss.

An *attack* trains one parameterization of a model (``train``):

* ``"sites"``: the parameters the protection deforms (producers and consumers of every selected pair);
* ``"all"``: every parameter;
* ``"bypass"``: every parameter *except* the deformed ones (the function is unchanged, so these
  train exactly as in the unprotected model);
* ``"lora"``: a PEFT LoRA adapter on ``target_modules``;
* ``"specundo"``: the SpecUndo adapter (:mod:`hf_specdef.tuners.specundo`), LoRA in the undeformed geometry.

with SGD or Adam at one learning rate, for a budget of steps, and records the loss curve. Every run is
seeded: the same batches in the same order and the same adapter initialisation, so two runs differ only in
what the caller changed. The model is deep-copied per run (the runner is meant for tiny models).

``steps_to_target`` is the first (1-based) step whose smoothed (or evaluation) loss is at or below the
target; a run that never reaches it counts as ``budget + 1``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_specdef.errors import SpecDefError

logger = logging.getLogger("hf_specdef")

TRAIN_MODES: tuple[str, ...] = ("sites", "all", "bypass", "lora", "specundo")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]
BatchFn = Callable[[int], Iterator[Any]]


class UndoUnavailableError(SpecDefError, RuntimeError):
    """The SpecUndo tuner is not installed in this build (the ``specundo`` attack is skipped)."""

    docs_page = "docs/integrations.md"


@dataclass
class AttackConfig:
    """One attack run.

    Args:
        train: which parameters are trained, one of :data:`TRAIN_MODES`.
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: learning rate.
        steps: step budget.
        seed: seeds the batch order (passed to the batch function) and the adapter initialisation.
        site_names: parameter names of the deformed tensors (needed by ``"sites"`` and ``"bypass"``).
        target_modules: module name suffixes for ``"lora"`` / ``"specundo"``.
        r: adapter rank for ``"lora"`` / ``"specundo"``.
        knowledge: SpecUndo attacker knowledge, ``"blind"`` or ``"recipe"``.
        target: target loss; with ``stop_at_target`` the run stops once it is reached.
        smoothing: EMA coefficient (bias corrected) applied to the training loss for ``steps_to_target``;
            0 uses the raw loss. Ignored when an evaluation function is given.
        stop_at_target: stop when the target is reached (the curve is then shorter than the budget).
        divergence: stop (counted as never reaching the target) once the smoothed (or evaluation) loss exceeds
            ``divergence`` times the loss before any update (the evaluation loss when an evaluation function
            is given, else the first batch's loss), or is not finite.
        momentum: SGD momentum.
        max_steps: stop after this many steps even if the budget is larger (used by :func:`sweep` with
            ``prune=True``); ``steps_to_target`` still counts a run that did not reach the target as ``steps + 1``.
    """

    train: str = "sites"
    optimizer: str = "adam"
    lr: float = 1e-3
    steps: int = 100
    seed: int = 0
    site_names: Sequence[str] = ()
    target_modules: Sequence[str] | None = None
    r: int = 8
    knowledge: str = "blind"
    target: float | None = None
    smoothing: float = 0.8
    stop_at_target: bool = False
    divergence: float = 3.0
    momentum: float = 0.0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.train not in TRAIN_MODES:
            raise ValueError(f"AttackConfig.train={self.train!r} is invalid: allowed values are {TRAIN_MODES}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"AttackConfig.optimizer={self.optimizer!r} is invalid: allowed values are {OPTIMIZERS}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"AttackConfig.lr={self.lr!r} is invalid: use a finite number > 0.")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"AttackConfig.steps={self.steps!r} is invalid: use an int >= 1.")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"AttackConfig.smoothing={self.smoothing!r} is invalid: use 0 <= smoothing < 1.")
        if self.train in ("sites", "bypass") and not self.site_names:
            raise ValueError(f"AttackConfig(train={self.train!r}) needs site_names (see site_parameter_names()).")
        if self.train == "lora" and not self.target_modules:
            raise ValueError("AttackConfig(train='lora') needs target_modules (e.g. ['q_proj', 'v_proj']).")


@dataclass
class RunResult:
    """Loss curve and steps-to-target of one attack run."""

    train: str
    optimizer: str
    lr: float
    budget: int
    losses: list[float]
    curve: list[float]
    steps_to_target: int | None = None
    reached: bool = False
    diverged: bool = False
    trainable_params: int = 0
    seconds: float = 0.0
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def initial_loss(self) -> float:
        return self.losses[0] if self.losses else float("nan")

    def with_target(self, target: float) -> RunResult:
        """Recompute ``steps_to_target`` / ``reached`` for another target (same curve)."""
        n = steps_to_target(self.curve, target, self.budget)
        return _replace(self, steps_to_target=n, reached=n <= self.budget)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _replace(r: RunResult, **kw: Any) -> RunResult:
    d = copy.copy(r)
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def ema(values: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (``beta=0`` returns the values unchanged)."""
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = beta * acc + (1 - beta) * v
        out.append(acc / (1 - beta**i) if beta else v)
    return out


def steps_to_target(curve: Sequence[float], target: float, budget: int | None = None) -> int:
    """First 1-based step ``s`` with ``curve[s-1] <= target``; ``budget + 1`` (default ``len(curve) + 1``) if none.

    Non-finite values never count as reaching the target.
    """
    budget = len(curve) if budget is None else budget
    for i, v in enumerate(curve[:budget]):
        if math.isfinite(v) and v <= target:
            return i + 1
    return budget + 1


def site_parameter_names(model: torch.nn.Module, cfg: Any | None = None) -> list[str]:
    """Names of the parameters a protection with ``cfg`` deforms (producers and consumers of its pairs).

    Works on a protected or an unprotected model (the pairs depend only on the architecture and
    ``cfg``). If ``cfg`` is None, the protection record on the model is used.
    """
    from hf_specdef.config import SpecDefConfig
    from hf_specdef.deformation.record import get_record
    from hf_specdef.protection.in_memory import ParamTensors, model_pairs

    if cfg is None:
        rec = get_record(model)
        if not rec:
            raise ValueError("site_parameter_names(model) needs cfg=SpecDefConfig(...) for an unprotected model.")
        cfg = SpecDefConfig.from_dict(rec["config"])
    pairs, _ = model_pairs(model, cfg, ParamTensors(model))
    names = dict.fromkeys(n for p in pairs for n in p.names())
    return list(names)


def _adapter_model(model: torch.nn.Module, cfg: AttackConfig) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)  # same adapter init across runs
    if cfg.train == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.r, target_modules=list(cfg.target_modules),
                                                lora_dropout=0.0))
    try:
        from peft import get_peft_model

        from hf_specdef.tuners.specundo import SpecUndoConfig
    except ImportError as e:
        raise UndoUnavailableError(
            f"the SpecUndo tuner (hf_specdef.tuners.specundo) is not available in this build ({e}); "
            "the 'specundo' attack is skipped."
        ) from e
    kw: dict[str, Any] = {"r": cfg.r, "lora_alpha": cfg.r, "knowledge": cfg.knowledge}
    if cfg.target_modules:
        kw["target_modules"] = list(cfg.target_modules)
    return get_peft_model(model, SpecUndoConfig(**kw))


def prepare(model: torch.nn.Module, cfg: AttackConfig) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """A deep copy of ``model`` set up for ``cfg.train``, and the list of parameters to train."""
    model = copy.deepcopy(model)
    if cfg.train in ("lora", "specundo"):
        model = _adapter_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        names = set(cfg.site_names)
        named = dict(model.named_parameters())
        missing = sorted(names - set(named))
        if missing:
            raise ValueError(f"site_names {missing[:3]} are not parameters of this model.")
        keep = {"all": set(named), "sites": names, "bypass": set(named) - names}[cfg.train]
        for n, p in named.items():
            p.requires_grad_(n in keep)
        params = [named[n] for n in named if n in keep]
    if not params:
        raise ValueError(f"AttackConfig(train={cfg.train!r}) leaves no trainable parameter in this model.")
    model.train()
    return model, params


def _optimizer(params: list[torch.nn.Parameter], cfg: AttackConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(params, lr=cfg.lr)


def run_attack(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: BatchFn,
    cfg: AttackConfig,
    *,
    eval_fn: Callable[[torch.nn.Module], float] | None = None,
    label: str = "",
    progress: bool = False,
) -> RunResult:
    """Fine-tune a copy of ``model`` as ``cfg`` says and return its loss curve.

    Args:
        model: the model to attack (left untouched: a deep copy is trained).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: ``batches(seed) -> iterator of batches``; called with ``cfg.seed`` so every run sees the same
            batches in the same order. It must yield at least ``cfg.steps`` batches (cycle if needed).
        eval_fn: optional ``eval_fn(model) -> float`` evaluated after every step; when given, the curve used
            for ``steps_to_target`` is the evaluation loss instead of the smoothed training loss.
    """
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    work, params = prepare(model, cfg)
    opt = _optimizer(params, cfg)
    losses: list[float] = []
    curve: list[float] = []
    acc, diverged, reached = 0.0, False, False
    start_eval = float(eval_fn(work)) if eval_fn is not None else None  # divergence reference
    it = batches(cfg.seed)
    n_steps = cfg.steps if cfg.max_steps is None else min(cfg.steps, max(cfg.max_steps, 0))
    bar = tqdm(range(n_steps), desc=label or f"{cfg.train}/{cfg.optimizer} lr={cfg.lr:g}", leave=False,
               disable=not progress, unit="step")
    for step in bar:
        try:
            batch = next(it)
        except StopIteration:
            raise ValueError(f"the batch iterator ran out after {step} batches; it must yield at least {cfg.steps}.") \
                from None
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(work, batch)
        value = float(loss.detach())
        losses.append(value)
        if math.isfinite(value):
            loss.backward()
            opt.step()
        if eval_fn is not None:
            point = float(eval_fn(work))
        else:
            acc = cfg.smoothing * acc + (1 - cfg.smoothing) * value
            point = acc / (1 - cfg.smoothing ** (step + 1)) if cfg.smoothing else value
        curve.append(point)
        ref = start_eval if start_eval is not None else losses[0]  # the loss before any update
        if not math.isfinite(point) or point > cfg.divergence * max(ref, 1e-8):
            diverged = True
            break
        if cfg.target is not None and point <= cfg.target:
            reached = True
            if cfg.stop_at_target:
                break
    n = steps_to_target(curve, cfg.target, cfg.steps) if cfg.target is not None else None
    extra: dict[str, Any] = {"pruned_at": n_steps} if n_steps < cfg.steps and not reached and not diverged else {}
    if start_eval is not None:
        extra["initial_eval"] = start_eval
    return RunResult(
        train=cfg.train, optimizer=cfg.optimizer, lr=cfg.lr, budget=cfg.steps, losses=losses, curve=curve,
        steps_to_target=n, reached=reached, diverged=diverged, trainable_params=sum(p.numel() for p in params),
        seconds=time.perf_counter() - start, label=label, extra=extra,
    )


def sweep(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: BatchFn,
    cfg: AttackConfig,
    lrs: Iterable[float],
    *,
    eval_fn: Callable[[torch.nn.Module], float] | None = None,
    label: str = "",
    progress: bool = True,
    prune: bool = False,
) -> list[RunResult]:
    """:func:`run_attack` at every learning rate of ``lrs`` (same seed, same batches).

    With ``prune=True`` (needs ``cfg.target``) each run stops once it has run as many steps as the best run so
    far needed: the *best* learning rate and its steps-to-target are exact, the others are only known to be
    no better (their ``extra["pruned_at"]`` says where they stopped).
    """
    lrs = list(lrs)
    if prune and cfg.target is None:
        raise ValueError("sweep(prune=True) needs cfg.target: pruning compares runs by steps-to-target.")
    results: list[RunResult] = []
    best = cfg.steps + 1
    bar = tqdm(lrs, desc=f"attack {label or cfg.train}/{cfg.optimizer}", unit="lr", disable=not progress, leave=False)
    for lr in bar:
        c = copy.copy(cfg)
        c.lr = float(lr)
        if prune:
            c.max_steps = best - 1
        r = run_attack(model, loss_fn, batches, c, eval_fn=eval_fn, label=label)
        if r.reached and r.steps_to_target is not None:
            best = min(best, r.steps_to_target)
        bar.set_postfix(lr=f"{lr:.0e}", steps=r.steps_to_target, last=f"{r.curve[-1]:.3g}" if r.curve else "-")
        results.append(r)
    return results


def best_run(results: Sequence[RunResult], target: float | None = None) -> RunResult:
    """The run that reaches ``target`` first (ties: lower final loss); without a target, the lowest final loss."""
    if not results:
        raise ValueError("best_run() needs at least one run.")
    if target is not None:
        results = [r.with_target(target) for r in results]

    def key(r: RunResult) -> tuple[float, float]:
        last = min((v for v in r.curve if math.isfinite(v)), default=float("inf"))
        return (r.steps_to_target if r.steps_to_target is not None else 0, last)

    return min(results, key=key)


def cycle(batches: Sequence[Any], seed: int, *, shuffle: bool = True) -> Iterator[Any]:
    """Endless iterator over ``batches``, reshuffled every epoch with a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(batches), generator=g).tolist() if shuffle else range(len(batches))
        for i in order:
            yield batches[i]
