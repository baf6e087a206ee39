"""The red-team suite: what an attacker trains, with which optimizer and schedule (see docs/redteam.md).

An :class:`Attack` is one fine-tuning recipe. *Uninformed* attacks are what a user of ``transformers.Trainer`` and
PEFT does without knowing about SpecDef; *informed* ones know the protection and work around it (see docs/threat-model.md):
the SpecUndo adapter (blind or with the recipe), the blind in-place undo followed by full fine-tuning, and the
bypass (train only what protection leaves alone). Each informed attack is compared with the unprotected model
under its ``baseline`` uninformed attack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
TRAIN_KINDS = ("full", "linears", "outlier-frozen", "outlier-masked", "outlier-projected", "lora", "specundo",
               "merge-undo", "bypass")


@dataclass(frozen=True)
class Attack:
    """One fine-tuning recipe of the red team.

    Args:
        name: short identifier (used on the command line and in the report).
        train: ``"full"`` (every parameter), ``"linears"`` (every linear layer's weight; norms and embeddings frozen,
            as memory-saving recipes do), ``"outlier-frozen"`` (every parameter except the tensors whose gradient
            on the first batch peaks far above the others': what an attacker tries when every rate diverges),
            ``"outlier-masked"`` (every parameter, minus the rows/columns of linear weights whose first-batch gradient
            norm stands far above the others' in the same weight), ``"outlier-projected"`` (every parameter, the
            singular directions of each linear weight's first-batch gradient that stand out projected out),
            ``"lora"`` (PEFT LoRA), ``"specundo"`` (the SpecUndo adapter),
            ``"merge-undo"`` (blind in-place undo, then every parameter) or ``"bypass"`` (every parameter except
            the deformed ones).
        optim: ``transformers`` optimizer name (``TrainingArguments.optim``) or one of
            :data:`~hf_specdef.research.redteam.optimizers.CUSTOM_OPTIMIZERS` (``"madam"``).
        optim_args: ``TrainingArguments.optim_args`` (e.g. ``"momentum=0.9"`` for SGD).
        schedule: ``TrainingArguments.lr_scheduler_type`` (``"constant"``, ``"cosine"``, ``"linear"``, ...).
        warmup: warmup as a fraction of the step budget (0: none).
        clip: gradient-norm clipping (``max_grad_norm``; 0: none).
        bf16: bf16 mixed precision (only run where the protection is exact in bfloat16).
        r: adapter rank; ``targets``: adapter target modules (``"all-linear"`` or names).
        knowledge: attacker knowledge of SpecUndo / the undo (``"blind"`` or ``"recipe"``).
        baseline: for informed attacks, the uninformed attack the unprotected model is measured with.
        lr_start: where the learning-rate search starts on the unprotected model.
    """

    name: str
    train: str = "full"
    optim: str = "adamw_torch"
    optim_args: str | None = None
    schedule: str = "constant"
    warmup: float = 0.0
    clip: float = 0.0
    bf16: bool = False
    r: int = 16
    targets: tuple[str, ...] | str = QKVO
    knowledge: str = "blind"
    baseline: str | None = None
    lr_start: float = 1e-4
    description: str = ""

    def __post_init__(self) -> None:
        if self.train not in TRAIN_KINDS:
            raise ValueError(f"Attack({self.name!r}).train={self.train!r} is invalid: use one of {TRAIN_KINDS}.")

    @property
    def informed(self) -> bool:
        return self.baseline is not None

    @property
    def adapter(self) -> bool:
        return self.train in ("lora", "specundo")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets) if isinstance(self.targets, tuple) else self.targets
        d["informed"] = self.informed
        return d


def _full(name: str, description: str, **kw: Any) -> Attack:
    return Attack(name, "full", description=description, **kw)


def _lora(name: str, description: str, **kw: Any) -> Attack:
    kw.setdefault("lr_start", 1e-3)
    return Attack(name, "lora", description=description, **kw)


SGD = "momentum=0.9"

UNINFORMED: tuple[Attack, ...] = (
    _full("full-adamw", "full fine-tuning, AdamW, constant LR"),
    _full("full-adamw-cosine", "full fine-tuning, AdamW, 10% warmup + cosine", schedule="cosine", warmup=0.1),
    _full("full-adamw-clip", "full fine-tuning, AdamW, gradient clipping at 1.0", clip=1.0),
    _full("full-hf-default", "full fine-tuning, Trainer defaults: AdamW, linear decay, clipping at 1.0",
          schedule="linear", clip=1.0),
    _full("full-sgd", "full fine-tuning, SGD with momentum 0.9", optim="sgd", optim_args=SGD, lr_start=1e-2),
    _full("full-sgd-clip", "full fine-tuning, SGD with momentum 0.9, clipping at 1.0", optim="sgd", optim_args=SGD,
          clip=1.0, lr_start=1e-2),
    _full("full-adafactor", "full fine-tuning, Adafactor (fixed LR)", optim="adafactor", lr_start=1e-4),
    _full("full-madam", "full fine-tuning, multiplicative Adam (Adam on log|w|, Madam-style updates): every weight "
          "moves by a fraction of its own size, so rescaling a weight changes nothing", optim="madam", lr_start=1e-3),
    _full("full-adamw-bf16", "full fine-tuning, AdamW, bf16 mixed precision", bf16=True),
    Attack("linears-adamw", "linears", description="every linear layer's weight (norms, embeddings frozen), AdamW"),
    Attack("full-adamw-freeze-outliers", "outlier-frozen",
           description="full fine-tuning, AdamW, the tensors whose first-batch gradient peaks > 100x the median "
                       "peak frozen (no knowledge of SpecDef: a generic fix for training that diverges)"),
    Attack("full-adamw-mask-outlier-lines", "outlier-masked",
           description="full fine-tuning, AdamW, the rows/columns of each linear weight whose first-batch gradient "
                       "norm is > 100x that weight's median frozen (the same generic fix, one level finer)"),
    Attack("full-adamw-mask-outlier-directions", "outlier-projected",
           description="full fine-tuning, AdamW, the singular directions of each linear weight's first-batch gradient "
                       "whose singular value is > 100x that weight's median projected out of every gradient"),
    _lora("lora16-qkvo", "LoRA r=16 on q/k/v/o, AdamW"),
    _lora("lora16-qkvo-cosine", "LoRA r=16 on q/k/v/o, AdamW, 10% warmup + cosine", schedule="cosine", warmup=0.1),
    _lora("lora16-qkvo-sgd", "LoRA r=16 on q/k/v/o, SGD with momentum 0.9", optim="sgd", optim_args=SGD, lr_start=1e-1),
    _lora("lora64-all", "LoRA r=64 on all linear layers, AdamW", r=64, targets="all-linear"),
    _lora("lora64-all-clip", "LoRA r=64 on all linear layers, AdamW, clipping at 1.0", r=64, targets="all-linear",
          clip=1.0),
    _lora("lora64-all-adafactor", "LoRA r=64 on all linear layers, Adafactor", r=64, targets="all-linear",
          optim="adafactor"),
)

INFORMED: tuple[Attack, ...] = (
    Attack("specundo-blind", "specundo", knowledge="blind", baseline="lora16-qkvo", lr_start=1e-3,
           description="SpecUndo r=16 on q/k/v/o, M estimated from the weights alone"),
    Attack("specundo-recipe", "specundo", knowledge="recipe", baseline="lora16-qkvo", lr_start=1e-3,
           description="SpecUndo r=16 on q/k/v/o, exact M from the protection record"),
    Attack("merge-undo", "merge-undo", knowledge="blind", baseline="full-adamw",
           description="blind in-place undo of the weights, then full fine-tuning with AdamW"),
    Attack("bypass", "bypass", baseline="full-adamw",
           description="AdamW on every parameter the protection leaves alone (deformed ones frozen)"),
)

SUITE: dict[str, Attack] = {a.name: a for a in UNINFORMED + INFORMED}


def get_attacks(names: list[str] | tuple[str, ...] | None) -> list[Attack]:
    """The named attacks (all of :data:`SUITE` for ``None``), with the baselines the informed ones need first."""
    if names is None:
        return list(SUITE.values())
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; known attacks: {sorted(SUITE)}.")
    chosen = [SUITE[n] for n in names]
    needed = [SUITE[a.baseline] for a in chosen if a.baseline and a.baseline not in names]
    out: list[Attack] = []
    for a in needed + chosen:
        if a not in out:
            out.append(a)
    return sorted(out, key=lambda a: a.informed)
