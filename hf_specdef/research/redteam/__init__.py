"""The red team (see docs/redteam.md): fine-tune a real model, unprotected and protected, with a suite of attacks on
``transformers.Trainer`` / PEFT, each at its best learning rate, and report the worst case.

* :mod:`~hf_specdef.research.redteam.attacks`: the suite (uninformed and informed attacks);
* :mod:`~hf_specdef.research.redteam.data`: the attack data (a corpus shipped with the package, or your own);
* :mod:`~hf_specdef.research.redteam.training`: one run on ``Trainer`` with a steps-to-target callback;
* :mod:`~hf_specdef.research.redteam.search`: the learning-rate search;
* :mod:`~hf_specdef.research.redteam.suite`: :func:`run_redteam`; :mod:`~hf_specdef.research.redteam.report`: the output files;
* :mod:`~hf_specdef.research.redteam.variants`: the protected copies attacked, checked to compute the original's function;
* :mod:`~hf_specdef.research.redteam.journal`: finished runs kept as they finish, so an interrupted red team resumes.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Attack": "attacks", "SUITE": "attacks", "get_attacks": "attacks",
    "RedTeamConfig": "config", "VARIANTS": "config",
    "AttackData": "data", "AttackDataError": "data", "build_attack_data": "data",
    "RedTeamError": "errors", "run_redteam": "suite",
    "JournalError": "journal", "RunJournal": "journal", "MultiplicativeAdam": "optimizers",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_specdef.research.redteam' has no attribute {name!r}")
