#!/usr/bin/env python
"""Convergence benchmark (see docs/redteam.md): steps-to-target of unprotected / protected / SpecUndo / bypass attacks.

    python scripts/convergence_bench.py --quick --out bench_out
    python scripts/convergence_bench.py --scenario digits --out bench_digits

Writes results.json (curves, best learning rates, steps-to-target, summary), results.md (table) and PNG plots.
"""

from __future__ import annotations

import sys

from hf_specdef.research.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
