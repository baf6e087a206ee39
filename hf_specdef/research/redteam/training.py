"""One attack run on ``transformers.Trainer``: fine-tune a copy of a model and record its held-out loss curve.

The same code runs on the CPU, on a GPU and under ``accelerate launch`` (DDP): the Trainer owns devices, mixed
precision and the distributed sampler; :class:`TargetCallback` evaluates the held-out batch every
``eval_every`` optimizer steps and stops the run once it reaches the target loss, diverges, or has used the
steps a better run already needed (the learning-rate search prunes with it). Every process computes the same
evaluation on the same weights, so all of them stop at the same step.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from hf_specdef.research.redteam.attacks import Attack
from hf_specdef.research.redteam.data import AttackData, WindowDataset
from hf_specdef.research.redteam.optimizers import CUSTOM_OPTIMIZERS

logger = logging.getLogger("hf_specdef")


@dataclass
class Run:
    """The held-out loss curve of one attack run and its steps to the target."""

    attack: str
    lr: float
    seed: int
    budget: int
    curve: list[tuple[int, float]]  # (optimizer step, held-out loss); step 0 = before training
    target: float | None = None
    steps_to_target: int | None = None  # None: not reached within the steps run
    diverged: bool = False
    stopped_at: int = 0
    trainable_params: int = 0
    seconds: float = 0.0

    @property
    def reached(self) -> bool:
        return self.steps_to_target is not None

    @property
    def best_loss(self) -> float:
        return min((v for _, v in self.curve if math.isfinite(v)), default=math.inf)

    def loss_at(self, step: int) -> float:
        """Held-out loss at ``step`` (the last evaluation at or before it)."""
        value = math.inf
        for s, v in self.curve:
            if s <= step:
                value = v
        return value

    def with_target(self, target: float) -> Run:
        """The same run judged against another target."""
        hit = next((s for s, v in self.curve if s > 0 and math.isfinite(v) and v <= target), None)
        return _copy(self, target=target, steps_to_target=hit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Run:
        """A run read back from JSON (non-finite losses were stored as null)."""
        curve = [(int(s), math.inf if v is None else float(v)) for s, v in d["curve"]]
        return cls(**{**d, "curve": curve})


def _copy(run: Run, **changes: Any) -> Run:
    new = copy.copy(run)
    for k, v in changes.items():
        setattr(new, k, v)
    return new


@torch.no_grad()
def eval_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss of ``model`` on the held-out windows (float32 logits, evaluation mode)."""
    was = model.training
    model.eval()
    dev = next(p.device for p in model.parameters())
    total, count = 0.0, 0
    try:
        for chunk in windows.split(batch_size):
            chunk = chunk.to(dev)
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                     reduction="sum")
            total += float(loss)
            count += chunk[:, 1:].numel()
    finally:
        model.train(was)
    return total / count


def world_size() -> int:
    """Processes of this launch (1 unless started by ``accelerate launch`` / ``torchrun``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on the process that writes files and shows progress (rank 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


class TargetCallback(TrainerCallback):
    """Evaluates every ``eval_every`` steps; stops at the target, on divergence, or after ``stop_after`` steps."""

    def __init__(self, evaluate: Callable[[torch.nn.Module], float], *, target: float | None, stop_after: int,
                 divergence: float, eval_every: int = 1) -> None:
        self.evaluate, self.target, self.stop_after = evaluate, target, stop_after
        self.divergence, self.eval_every = divergence, eval_every
        self.curve: list[tuple[int, float]] = []
        self.diverged = False
        self.hit: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.curve = [(0, self.evaluate(model))]

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> Any:
        step = state.global_step
        if step % self.eval_every and step < self.stop_after:
            return control
        loss = self.evaluate(model)
        self.curve.append((step, loss))
        if not math.isfinite(loss) or loss > self.divergence * self.curve[0][1]:
            self.diverged = True
        elif self.target is not None and loss <= self.target:
            self.hit = step
        if self.diverged or self.hit is not None or step >= self.stop_after:
            control.should_training_stop = True
        return control


def training_arguments(attack: Attack, lr: float, seed: int, budget: int, batch_size: int, out_dir: str) -> Any:
    """``TrainingArguments`` for one run: no saving, no logging, no weight decay; the attack's optimizer recipe."""
    world = world_size()
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {world} processes of this launch; use a "
                         "multiple of the process count.")
    custom = attack.optim in CUSTOM_OPTIMIZERS  # run_attack hands the Trainer its class; this name is a placeholder
    return TrainingArguments(
        output_dir=out_dir, max_steps=budget, per_device_train_batch_size=batch_size // world, learning_rate=lr,
        optim="adamw_torch" if custom else attack.optim, optim_args=None if custom else attack.optim_args,
        lr_scheduler_type=attack.schedule,
        warmup_steps=attack.warmup, max_grad_norm=attack.clip, bf16=attack.bf16, weight_decay=0.0, seed=seed,
        data_seed=seed, report_to="none", save_strategy="no", logging_strategy="no", eval_strategy="no",
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=not has_accelerator(),  # on a machine without one, DDP over processes needs accelerate's CPU mode
    )


def has_accelerator() -> bool:
    """Whether torch sees a GPU (or other accelerator) that the Trainer would use."""
    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


@dataclass
class RunSettings:
    """What every run of a red team shares."""

    batch_size: int = 4
    eval_every: int = 1
    divergence: float = 1.5
    extra: dict[str, Any] = field(default_factory=dict)


def run_attack(model: torch.nn.Module, attack: Attack, data: AttackData, *, lr: float, seed: int, budget: int,
               target: float | None, stop_after: int | None = None, settings: RunSettings | None = None) -> Run:
    """Fine-tune ``model`` (already prepared for ``attack``: a fresh copy, adapters attached) and return its curve.

    The run lasts at most ``budget`` optimizer steps (the horizon of its LR schedule) and stops earlier at the target,
    on divergence, or after ``stop_after`` steps.
    """
    settings = settings or RunSettings()
    start = time.perf_counter()
    stop_after = budget if stop_after is None else min(stop_after, budget)
    cb = TargetCallback(lambda m: eval_loss(m, data.eval), target=target, stop_after=stop_after,
                        divergence=settings.divergence, eval_every=settings.eval_every)
    with tempfile.TemporaryDirectory(prefix="hf-specdef-redteam-") as tmp:
        args = training_arguments(attack, lr, seed, budget, settings.batch_size, tmp)
        custom = CUSTOM_OPTIMIZERS.get(attack.optim)
        trainer = Trainer(model=model, args=args, train_dataset=WindowDataset(data.train), callbacks=[cb],
                          optimizer_cls_and_kwargs=(custom, {"lr": lr}) if custom else None)
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics dict
        trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Run(attack=attack.name, lr=lr, seed=seed, budget=budget, curve=cb.curve, target=target,
               steps_to_target=cb.hit, diverged=cb.diverged, stopped_at=cb.curve[-1][0], trainable_params=trainable,
               seconds=time.perf_counter() - start)

