"""`ProtectionReport`: what `protect` did, printable as a table and as JSON."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation.engine import PairResult
from hf_specdef.deformation.precision import describe as describe_precision
from hf_specdef.deformation.precision import summary as precision_summary


@dataclass
class ProtectionReport:
    """Per pair: site, layer, mode, factor, k, hot/cold modules, sigma_1 before and after.

    The header states what was *used*: the mode(s), the factor(s) actually applied (with the requested alpha
    when it was rounded, e.g. ``requested alpha 1000 -> factor 1024``), the precision policy and storage dtype, and
    the output deviation as measured or why it was not (:meth:`deviation_text`). Returned by
    :func:`~hf_specdef.protect` and :func:`~hf_specdef.save_protected`; :func:`~hf_specdef.protect_checkpoint`
    returns a subclass with what it read and wrote. Printable as a table, and as JSON (:meth:`to_json`).

    Attributes:
        config (`SpecDefConfig`): the protection requested.
        results (`list[PairResult]`): one per deformed pair: the pair (site, layer, producers, consumers), its mode,
            deformation (factor, k) and sigma_1 before and after.
        deviation (`float` or `None`): the max relative output deviation measured on a probe batch; ``None`` when
            it was not measured (:meth:`deviation_text` says why).
        skipped (`list[str]`): the sites and pairs left out, each with the reason.
        notes (`list[str]`): what else the run decided or noted (precision changes, upcasts, checks).
        seconds (`float`): wall time of the protection.
        quantization (`dict[str, float]`): for ``cfg.quantization_safe``, per format the deviation of the quantized
            protected model from the quantized original.
        hot_modules (`list[str]`): modules that read an inflated activation (the ones that slow fine-tuning).
        cold_modules (`list[str]`): the other deformed modules.
        sites (`dict[str, int]`): deformed pairs per site type.
        modes (`list[str]`): the modes actually used.
        factors (`list[float]`): the factors actually applied (alpha may have been rounded, e.g. 1000 -> 1024).
        precision (`dict`): requested and used precision policy, and the dtypes the result is exact in.

    Example:

    ```python
    from transformers import AutoModelForCausalLM

    from hf_specdef import protect

    model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")
    report = protect(model)
    print(report.sites, report.modes, report.factors, report.deviation_text())
    summary = report.to_dict()  # or report.to_json(full=True) for every pair in full
    ```
    """

    config: SpecDefConfig
    results: list[PairResult]
    deviation: float | None = None
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    quantization: dict[str, float] = field(default_factory=dict)  # format -> quantized protected vs quantized original

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

    @property
    def factors(self) -> list[float]:
        """The factors actually applied (from each pair's deformation; alpha as requested may have been rounded,
        e.g. 1000 -> 1024 for a bit-exact axis mode)."""
        return sorted({float(r.deformation.factor) for r in self.results})

    @property
    def modes(self) -> list[str]:
        """The modes actually used ("axis", "spectral")."""
        return sorted({r.mode for r in self.results})

    def deviation_text(self) -> str:
        """The max relative output deviation as measured, or why it was not measured (never a bare None)."""
        if self.deviation is not None:
            return f"{self.deviation:.2e} (measured: protected vs original outputs on probe inputs)"
        return self.unmeasured_reason()

    def unmeasured_reason(self) -> str:
        """Why ``deviation`` is None (in-memory protection measures it unless verification is off)."""
        return "not measured (protected with verify=False: no forward check was run)"

    def _by(self, key: Any) -> dict[Any, list[str]]:
        """``key(result) -> site types`` of the results, in first-seen order."""
        out: dict[Any, list[str]] = {}
        for r in self.results:
            sites = out.setdefault(key(r), [])
            if r.pair.site not in sites:
                sites.append(r.pair.site)
        return out

    def used_text(self) -> str:
        """``mode axis (14 pairs); factor 1024 (requested alpha 1000 -> factor 1024)``: what was applied."""
        if not self.results:
            return f"nothing deformed (requested alpha {self.config.alpha:g})"
        counts = Counter(r.mode for r in self.results)
        modes = self._by(lambda r: r.mode)
        if len(modes) == 1:
            mode = f"mode {next(iter(modes))} ({len(self.results)} pairs)"
        else:
            mode = "modes " + ", ".join(f"{m} ({counts[m]} pairs: {', '.join(s)})" for m, s in modes.items())
        factors = self._by(lambda r: float(r.deformation.factor))
        requested = float(self.config.alpha)
        if list(factors) == [requested]:
            return f"{mode}; factor {requested:g} (as requested)"
        if len(factors) == 1:
            used = next(iter(factors))
            return f"{mode}; factor {used:g} (requested alpha {requested:g} -> factor {used:g})"
        each = ", ".join(f"{f:g} ({', '.join(s)})" for f, s in sorted(factors.items()))
        return (f"{mode}; factors {each} (requested alpha {requested:g} -> factors "
                f"{', '.join(f'{f:g}' for f in sorted(factors))})")

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "sites": self.sites,
            "num_pairs": len(self.results),
            "modes": self.modes,
            "factors": self.factors,
            "max_relative_deviation": self.deviation,
            "deviation_status": self.deviation_text(),
            "precision": self.precision,
            "hot_modules": self.hot_modules,
            "cold_modules": self.cold_modules,
            "skipped": self.skipped,
            "notes": self.notes,
            "seconds": self.seconds,
            "pairs": [r.to_dict(full=full) for r in self.results],
        } | ({"quantization": self.quantization} if self.quantization else {})

    def to_json(self, full: bool = False) -> str:
        return json.dumps(self.to_dict(full=full), indent=2)

    def __str__(self) -> str:
        lines = [
            f"SpecDef protection: {len(self.results)} pairs {self.sites}; used: {self.used_text()}",
            describe_precision(self.precision),
            f"max relative output deviation: {self.deviation_text()}",
            f"{'layer':>5}  {'site':<8} {'grp':>3} {'mode':<8} {'k':>2} {'sigma1 before':>13} {'after':>11}  hot",
        ]
        for r in self.results:
            p = r.pair
            lines.append(
                f"{p.layer:>5}  {p.site:<8} {p.group:>3} {r.mode:<8} {r.deformation.k:>2} "
                f"{r.sigma_before:>13.4g} {r.sigma_after:>11.4g}  {','.join(m.rsplit('.', 1)[-1] for m in p.hot_modules)}"
            )
        lines.append(f"hot modules: {len(self.hot_modules)}; cold only: {len(self.cold_modules)}")
        lines += [f"quantized {f}: deviation from the quantized original {d:.2e}" for f, d in self.quantization.items()]
        lines += [f"skipped: {s}" for s in self.skipped] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
