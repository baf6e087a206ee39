"""Evaluation: the attack runner, real-data scenarios and the convergence benchmark (see docs/redteam.md).

* :mod:`~hf_specdef.research.evaluation.runner`: fine-tune a copy of a model (deformed sites, everything, the bypass,
  LoRA or SpecUndo) with SGD/Adam over a learning-rate sweep and count steps to a target loss.
* :mod:`~hf_specdef.research.evaluation.scenarios`: a tiny Llama on Python docstrings attacked on license texts, and a
  class-conditional DDPM UNet on scikit-learn's 8x8 digits attacked to generate the held-out digit 9.
* :mod:`~hf_specdef.research.evaluation.benchmark`: the benchmark behind ``scripts/convergence_bench.py`` and
  ``hf-specdef bench``; :mod:`~hf_specdef.research.evaluation.plots` draws its PNGs.
"""

from hf_specdef.research.evaluation.runner import (
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
        from hf_specdef.research.evaluation import benchmark

        return getattr(benchmark, name)
    raise AttributeError(f"module 'hf_specdef.research.evaluation' has no attribute {name!r}")
