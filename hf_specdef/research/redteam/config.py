"""Settings of a red-team run (:class:`RedTeamConfig`) and the protection variants it attacks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# protection variant name -> SpecDefConfig fields ("default": the library's defaults, i.e. what `hf-specdef protect`
# does to the checkpoint: on a bfloat16 checkpoint, precision="auto" makes it bit-exact axis mode, alpha 1024)
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "spectral-a1000": {"alpha": 1000.0, "mode": "spectral"},
    "axis-a1024": {"alpha": 1024.0, "mode": "axis"},
    "axis-a65536": {"alpha": 65536.0, "mode": "axis"},  # bit-exact in float32/bfloat16; no float16 release
    "quant-safe": {"alpha": 1024.0, "mode": "axis", "quantization_safe": "all"},
    "spectral-a100": {"alpha": 100.0, "mode": "spectral"},
    "spectral-a10": {"alpha": 10.0, "mode": "spectral"},
}

# variants protected as float32 releases (spectral mode needs float32); the others in the checkpoint's storage dtype
FLOAT32_RELEASES = frozenset({"spectral-a1000", "spectral-a100", "spectral-a10"})

# the strongest uninformed attack measured on SmolLM2 — multiplicative Adam, which no bit-exact protection slows (it
# is invariant to rescaling any weight; on the unprotected model it fine-tunes about as fast as AdamW) — and the undo;
# lora16-qkvo runs unprotected only, as the undo's baseline
QUICK_ATTACKS = ("full-madam", "specundo-blind")


@dataclass
class RedTeamConfig:
    """What a red team runs.

    Args:
        attacks: attack names (:data:`hf_specdef.research.redteam.attacks.SUITE`); ``None``: the whole suite.
        variants: protection variants (:data:`VARIANTS`) or ``"custom"`` with ``protection``; may be empty when
            already protected models are passed to :func:`~hf_specdef.research.redteam.suite.run_redteam`.
        protection: ``SpecDefConfig`` fields of the ``"custom"`` variant.
        seeds: seeds (data order, adapter initialisation); the learning rates are searched with the first, the
            others run at the best learning rate found. The headline is the median over seeds.
        seq_len: attack sequence length (tokens).
        batch_size: attack batch size (the global batch).
        eval_windows: held-out windows of ``seq_len`` tokens.
        reference_steps: the unprotected model sets each attack's target loss in this many steps (see docs/redteam.md).
        budget_factor: step budget = reference_steps x budget_factor (also the schedules' horizon); a protected
            run that never reaches the target proves a slowdown >= budget / unprotected steps.
        fraction: target = L0 - fraction x (L0 - best unprotected loss after reference_steps); with the default 1.0
            the target is the best held-out loss the unprotected model reaches in ``reference_steps`` steps, so it
            needs about that many steps (never its first few).
        divergence: a run whose held-out loss exceeds ``divergence`` x its initial loss has diverged.
        per_decade: learning-rate grid density around the optimum.
        eval_every: held-out evaluation interval in optimizer steps (steps to target are counted on it).
        max_runs: cap on runs of one learning-rate search.
        data: attack data (None: the shipped corpus; a .txt/.jsonl path; a ``datasets.Dataset``).
        text_field: the text field of a .jsonl file or a dataset.
    """

    attacks: tuple[str, ...] | None = None
    variants: tuple[str, ...] = ("default",)
    protection: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    seq_len: int = 64
    batch_size: int = 4
    eval_windows: int = 8
    reference_steps: int = 10
    budget_factor: int = 10
    fraction: float = 1.0
    divergence: float = 1.5
    per_decade: int = 3
    eval_every: int = 1
    max_runs: int = 14
    data: Any = None
    text_field: str = "text"
    preset: str = "custom"

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        self.seeds = tuple(self.seeds)
        if self.attacks is not None:
            self.attacks = tuple(self.attacks)
        self.validate()

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the first bad field."""
        def bad(name: str, why: str) -> None:
            raise ValueError(f"RedTeamConfig.{name}={getattr(self, name)!r} is invalid: {why}.")

        unknown = [v for v in self.variants if v not in VARIANTS and v != "custom"]
        if unknown:
            bad("variants", f"use names from {sorted(VARIANTS)} or 'custom'")
        if "custom" in self.variants and not self.protection:
            bad("protection", "the 'custom' variant needs SpecDefConfig fields, e.g. {'alpha': 100.0}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            bad("seeds", "use one or more distinct ints")
        for name in ("seq_len", "batch_size", "eval_windows", "reference_steps", "eval_every", "max_runs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "use an int >= 1")
        if self.budget_factor < 2:
            bad("budget_factor", "use >= 2 (a protected run that never reaches the target then proves a slowdown "
                                 ">= budget_factor); 10 shows the 10x goal")
        if not 0 < self.fraction <= 1:
            bad("fraction", "use 0 < fraction <= 1")
        if self.divergence <= 1:
            bad("divergence", "use a factor > 1 (e.g. 1.5)")
        if self.per_decade < 1:
            bad("per_decade", "use >= 1 (3 or more for a fair search)")

    @property
    def budget(self) -> int:
        return self.reference_steps * self.budget_factor

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> RedTeamConfig:
        """``"quick"`` (2 CPU cores, <= 30 min on SmolLM2-135M), ``"full"`` (a GPU; every attack, variant, 3 seeds)
        or ``"tiny"`` (a smoke test of tiny models)."""
        presets: dict[str, dict[str, Any]] = {
            "quick": dict(attacks=QUICK_ATTACKS, seeds=(0,), reference_steps=8, budget_factor=10),
            "full": dict(attacks=None, variants=("spectral-a1000", "axis-a1024", "axis-a65536", "quant-safe",
                                                 "spectral-a100", "spectral-a10"),
                         seeds=(0, 1, 2), reference_steps=20, budget_factor=10),
            "tiny": dict(attacks=("full-adamw", "lora16-qkvo", "specundo-blind"), seeds=(0,), seq_len=16,
                         batch_size=4, eval_windows=4, reference_steps=4, budget_factor=4, max_runs=10),
        }
        if name not in presets:
            raise ValueError(f"unknown red-team preset {name!r}; use one of {sorted(presets)}.")
        return cls(**{**presets[name], "preset": name, **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = None if self.data is None else str(self.data) if not hasattr(self.data, "column_names") else "dataset"
        return d
