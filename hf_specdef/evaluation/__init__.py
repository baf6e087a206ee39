"""Evaluation: the attack runner, real-data scenarios and the convergence benchmark (SPEC §3, §6).

* :mod:`~hf_specdef.evaluation.runner`: fine-tune a copy of a model (deformed sites, everything, the bypass,
  LoRA or SpecUndo) with SGD/Adam over a learning-rate sweep and count steps to a target loss.
* :mod:`~hf_specdef.evaluation.scenarios`: a tiny Llama on Python docstrings attacked on license texts, and a
  class-conditional DDPM UNet on scikit-learn's 8x8 digits attacked to generate the held-out digit 9.
* :mod:`~hf_specdef.evaluation.benchmark`: the benchmark behind ``scripts/convergence_bench.py`` and
  ``hf-specdef bench``; :mod:`~hf_specdef.evaluation.plots` draws its PNGs.
"""

from .runner import (
    OPTIMIZERS,
    TRAIN_MODES,
    AttackConfig,
    RunResult,
    UndoUnavailableError,
    best_run,
    cycle,
    ema,
    run_attack,
    site_parameter_names,
    steps_to_target,
    sweep,
)

__all__ = [
    "OPTIMIZERS", "TRAIN_MODES", "AttackConfig", "BenchConfig", "RunResult", "UndoUnavailableError", "best_run",
    "cycle", "ema", "run_attack", "run_benchmark", "site_parameter_names", "steps_to_target", "sweep",
]


def __getattr__(name: str):  # the benchmark pulls in matplotlib lazily
    if name in ("BenchConfig", "run_benchmark"):
        from . import benchmark

        return getattr(benchmark, name)
    raise AttributeError(f"module 'hf_specdef.evaluation' has no attribute {name!r}")
