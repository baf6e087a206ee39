"""`ProtectionReport`: what `protect` did, printable as a table and as JSON."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .config import SpecDefConfig
from .engine import PairResult
from .precision import describe as describe_precision
from .precision import summary as precision_summary


@dataclass
class ProtectionReport:
    """Per pair: site, layer, mode, factor, k, hot/cold modules, sigma_1 before and after."""

    config: SpecDefConfig
    results: list[PairResult]
    deviation: float | None = None
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def hot_modules(self) -> list[str]:
        return sorted({m for r in self.results for m in r.pair.hot_modules})

    @property
    def cold_modules(self) -> list[str]:
        return sorted({m for r in self.results for m in r.pair.cold_modules} - set(self.hot_modules))

    @property
    def precision(self) -> dict[str, Any]:
        """Requested and used precision policy, and the dtypes the result is exact in (:func:`.precision.summary`)."""
        return precision_summary(self.config, self.results)

    @property
    def sites(self) -> dict[str, int]:
        return dict(Counter(r.pair.site for r in self.results))

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "sites": self.sites,
            "num_pairs": len(self.results),
            "max_relative_deviation": self.deviation,
            "precision": self.precision,
            "hot_modules": self.hot_modules,
            "cold_modules": self.cold_modules,
            "skipped": self.skipped,
            "notes": self.notes,
            "seconds": self.seconds,
            "pairs": [r.to_dict(full=full) for r in self.results],
        }

    def to_json(self, full: bool = False) -> str:
        return json.dumps(self.to_dict(full=full), indent=2)

    def __str__(self) -> str:
        lines = [
            f"SpecDef protection: {len(self.results)} pairs {self.sites}, alpha={self.config.alpha:g}, "
            f"max relative output deviation={self.deviation if self.deviation is None else f'{self.deviation:.2e}'}",
            f"{'layer':>5}  {'site':<8} {'grp':>3} {'mode':<8} {'k':>2} {'sigma1 before':>13} {'after':>11}  hot",
        ]
        for r in self.results:
            p = r.pair
            lines.append(
                f"{p.layer:>5}  {p.site:<8} {p.group:>3} {r.mode:<8} {r.deformation.k:>2} "
                f"{r.sigma_before:>13.4g} {r.sigma_after:>11.4g}  {','.join(m.rsplit('.', 1)[-1] for m in p.hot_modules)}"
            )
        lines.append(f"hot modules: {len(self.hot_modules)}; cold only: {len(self.cold_modules)}")
        lines.append(describe_precision(self.precision))
        lines += [f"skipped: {s}" for s in self.skipped] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
