"""Protecting a model the site registry does not know: best-effort Llama-style sites, each site type kept only
after a numerical check (see docs/architectures.md).

For each site type the guessed pairs are deformed on their own, the probe batch is run, and every change is
restored exactly; a site type whose outputs move beyond the tolerance (or that cannot be planned) is dropped with
the measured deviation as the reason. What survives is then protected and verified as usual. If nothing survives,
the registry's "no sites" error stands.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from hf_specdef.analysis import probe
from hf_specdef.config import SpecDefConfig
from hf_specdef.deformation import engine
from hf_specdef.deformation.precision import NothingExactError
from hf_specdef.sites import NoSitesError, Pair, cfg_get, select_pairs
from hf_specdef.sites.best_effort import best_effort_pairs

logger = logging.getLogger("hf_specdef")


def verified_pairs(model: torch.nn.Module, cfg: SpecDefConfig, tensors: Any, no_sites: NoSitesError
                   ) -> tuple[list[Pair], list[str]]:
    """All kept best-effort pairs of ``model`` and the lines for the report; raises ``no_sites`` if none is kept."""
    from hf_specdef.protection.in_memory import VerificationError, deform_verified  # protection imports this module

    pairs = best_effort_pairs(getattr(model, "config", {}), tensors.shapes())
    if not pairs:
        raise no_sites
    try:
        inputs = probe.probe_inputs(model)
    except ValueError as e:
        raise NoSitesError(f"{no_sites} (best-effort Llama-style sites need a probe batch to be checked: {e})") from None
    label = f"best-effort (model_type {cfg_get(getattr(model, 'config', {}), 'model_type')!r} is not registered)"
    loose = cfg.replace(record="none", tolerance=1e300)  # the deviation is judged here, against cfg.tolerance
    kept, lines = [], []
    for site in dict.fromkeys(p.site for p in pairs):
        group = [p for p in pairs if p.site == site]
        try:
            plans = engine.plan_pairs(select_pairs(group, loose.replace(sites=(site,))), tensors, loose)
            _, backup, deviation = deform_verified(plans, tensors, loose, run=lambda: probe.run_probe(model, inputs),
                                                   progress=False)
            backup.restore(tensors)
            why = "" if deviation <= cfg.tolerance else f"it moved the outputs by {deviation:.2g} > tolerance={cfg.tolerance:g}"
        except NothingExactError as e:  # the precision policy leaves this site type out in this dtype
            why = f"the storage dtype cannot hold it exactly ({e})"
        except engine.PrecisionBudgetError:
            raise  # about the dtype, not the guess: the same error as for a registered architecture
        except VerificationError:  # a non-finite output
            why = "it made the outputs non-finite"
        except (ValueError, RuntimeError) as e:
            why = f"it cannot be applied ({e})"
        if why:
            lines.append(f"{label}: site type {site!r} dropped, {why}")
            continue
        kept += group
        lines.append(f"{label}: site type {site!r} kept ({len(group)} pairs; alone it moved the outputs by {deviation:.2g})")
    for line in lines:
        logger.warning("hf-specdef %s", line)
    if not kept:
        raise NoSitesError(f"{no_sites} Best-effort Llama-style sites were tried and none kept the function: {lines}")
    return sorted(kept, key=pairs.index), lines
