"""The protected copies a red team attacks: protected here as a release would be (:func:`protect_variant`) or given
(:func:`given_variant`), each checked to compute the original's function, and what the protection changed."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from hf_specdef.deformation.precision import describe as describe_precision
from hf_specdef.deformation.record import get_record
from hf_specdef.research.redteam.config import FLOAT32_RELEASES, VARIANTS, RedTeamConfig
from hf_specdef.research.redteam.errors import RedTeamError

logger = logging.getLogger("hf_specdef")


def storage_dtype(model: Any) -> torch.dtype:
    """The dtype the checkpoint is stored in (its config.json's ``dtype``); float32 when unknown."""
    if isinstance(model, torch.nn.Module):
        return next(p.dtype for p in model.parameters() if p.is_floating_point())
    try:
        conf = json.loads((Path(os.fspath(model)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    value = conf.get("dtype") or conf.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(value).replace("torch.", ""), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def protect_variant(model: torch.nn.Module, name: str, cfg: RedTeamConfig, eval_ids: torch.Tensor,
                    storage: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A protected copy of ``model`` (record "full", so the recipe attack can use it) and what was measured of it.

    The copy is protected in the checkpoint's ``storage`` dtype, as ``hf-specdef protect`` would protect the release
    (``precision="auto"``: a bfloat16 checkpoint gets bit-exact axis mode), except the float32-release variants
    (``spectral-*``), which are protected in float32."""
    from hf_specdef.config import SpecDefConfig
    from hf_specdef.protection.in_memory import protect

    fields = cfg.protection if name == "custom" else VARIANTS[name]
    spec = SpecDefConfig(**{**fields, "record": "full"})
    release = torch.float32 if name in FLOAT32_RELEASES else storage
    protected = copy.deepcopy(model)
    cast_parameters(protected, release)  # protected as a release in that dtype would be (precision="auto")
    start = time.perf_counter()
    report = protect(protected, spec, progress=False)
    seconds = time.perf_counter() - start
    cast_parameters(protected, torch.float32)  # exact: the attacker trains in float32
    info = {"config": spec.to_dict(), "release_dtype": str(release).replace("torch.", ""),
            "precision": getattr(report, "precision", None), "pairs": len(report.results), "sites": report.sites,
            "hot_modules": report.hot_modules, "notes": report.notes, "protect_seconds": seconds,
            **deviations(model, protected, eval_ids)}
    logger.info("red team: variant %s: %d pairs, %s; deviation fp32 %.3g, bf16 %.3g", name, info["pairs"],
                describe_precision(info["precision"]) if info["precision"] else spec.to_json_string(),
                info["deviation_float32"], info["deviation_bfloat16"])
    if not info["deviation_float32"] <= spec.tolerance:  # the attacker must start from the original's function
        raise RedTeamError(f"variant {name!r}: the protected copy deviates by {info['deviation_float32']:.3g} from the "
                           f"original in float32 (tolerance {spec.tolerance:g}); refusing to measure a different model.")
    return protected.eval(), info


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters only: ``model.to(dtype)`` would also round buffers such as the rotary
    ``inv_freq`` (measured: a bfloat16 round trip of SmolLM2's changes its float32 logits by 1.4e-3)."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)


def given_variant(model: torch.nn.Module, protected: Any, eval_ids: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    """A protected model passed in (a module or a folder), checked to compute the original's function."""
    if not isinstance(protected, torch.nn.Module):
        from transformers import AutoModelForCausalLM

        path = Path(os.fspath(protected))
        if not (path / "config.json").is_file():
            raise RedTeamError(f"protected model {str(path)!r} is not a model folder (no config.json).")
        protected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    protected = protected.float().eval()
    info = {"config": (get_record(protected) or {}).get("config", {}), "pairs": None, "given": True,
            **deviations(model, protected, eval_ids)}
    if not info["deviation_float32"] <= 1e-3:
        raise RedTeamError(f"the protected model does not compute the original's function (max relative logit "
                           f"deviation {info['deviation_float32']:.3g} in float32); is it a protection of this model?")
    return protected, info


def deviations(original: torch.nn.Module, protected: torch.nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """Max relative logit deviation of ``protected`` against ``original`` in float32 and in bfloat16."""
    fp32 = logit_deviation(original, protected, ids[:2], None)
    bf16 = logit_deviation(original, protected, ids[:2], torch.bfloat16)
    return {"deviation_float32": fp32, "deviation_bfloat16": bf16, "bf16_exact": bf16 <= 1e-2}


@torch.no_grad()
def logit_deviation(original: torch.nn.Module, protected: torch.nn.Module, ids: torch.Tensor,
                    dtype: torch.dtype | None) -> float:
    """Max relative logit deviation of the protected model against the original, both run in ``dtype``."""
    a = copy.deepcopy(original).to(dtype).eval() if dtype else original.eval()
    b = copy.deepcopy(protected).to(dtype).eval() if dtype else protected.eval()
    dev = next(a.parameters()).device
    ref, out = a(input_ids=ids.to(dev)).logits.float(), b(input_ids=ids.to(dev)).logits.float()
    err = (out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
    return float(err) if torch.isfinite(err) else math.inf


def changed_parameter_names(original: torch.nn.Module, protected: torch.nn.Module) -> tuple[str, ...]:
    """Parameters whose values the protection changed: what a bypass attacker freezes."""
    ref = dict(original.named_parameters())
    return tuple(n for n, p in protected.named_parameters()
                 if n not in ref or p.shape != ref[n].shape or not torch.equal(p.detach(), ref[n].detach().to(p.dtype)))
