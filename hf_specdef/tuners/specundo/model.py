"""``SpecUndoModel``: the PEFT tuner that undoes a SpecDef deformation while fine-tuning."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_specdef.tuners.specundo.config import SpecUndoConfig
from hf_specdef.tuners.specundo.layer import Linear, SpecUndoLayer
from hf_specdef.undo.detection import DetectionReport, SiteEstimate
from hf_specdef.undo.merge import resolve_sites, undo_in_place

logger = logging.getLogger("hf_specdef")


def _side(module: nn.Module, axis: int) -> str:
    """Which side of a layer a weight axis is: ``nn.Linear`` weight (out, in), ``Conv1D`` weight (in, out)."""
    if isinstance(module, Conv1D):
        return "in" if axis == 0 else "out"
    return "out" if axis == 0 else "in"


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def build_undo_plan(model: nn.Module, sites: Sequence[SiteEstimate]
                    ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, torch.Tensor]]]:
    """Per linear module, the ops of ``M̂`` (JSON structure) and their values (factor / basis / index).

    Ops are listed in the order protection applied them. Producer blocks get ``f``, consumer blocks
    ``1/f``; biases and 1-D (norm) weights are not adapter targets and are skipped.
    """
    modules = dict(model.named_modules())
    plan: dict[str, list[dict[str, Any]]] = defaultdict(list)
    raw: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: {"factor": [], "basis": [], "index": []})
    for s in sites:
        m = s.deformation
        for role, blocks in (("producer", s.pair.producers), ("consumer", s.pair.consumers)):
            for b in blocks:
                mod_name, _, pname = b.name.rpartition(".")
                mod = modules.get(mod_name)
                if pname != "weight" or mod is None or not isinstance(_base(mod), (nn.Linear, Conv1D)):
                    continue
                f = m.factor if role == "producer" else 1.0 / m.factor
                kind = "axis" if m.is_axis else "spectral"
                plan[mod_name].append({"side": _side(_base(mod), b.axis), "start": b.start, "stop": b.stop,
                                       "kind": kind, "k": int(m.indices.numel()) if m.is_axis else m.k})
                r = raw[mod_name]
                r["factor"].append(torch.tensor([f], dtype=torch.float64))
                if m.is_axis:
                    r["index"].append(m.indices.detach().to("cpu", torch.long))
                else:
                    r["basis"].append(m.basis.detach().to("cpu", torch.float64).reshape(-1))
    values = {
        name: {
            "factor": torch.cat(r["factor"]),
            "basis": torch.cat(r["basis"]) if r["basis"] else torch.zeros(0, dtype=torch.float64),
            "index": torch.cat(r["index"]) if r["index"] else torch.zeros(0, dtype=torch.long),
        }
        for name, r in raw.items()
    }
    return dict(plan), values


class SpecUndoModel(BaseTuner):
    """Wraps a (protected) model with SpecUndo layers. Created by ``get_peft_model(model, SpecUndoConfig(...))``.

    At injection the deformation is resolved once (``knowledge="recipe"``: from the protection record;
    ``"blind"``: by :func:`hf_specdef.undo.detection.detect_deformations`) and turned into per-module ops
    stored in ``config.undo_plan`` (structure) and the layers' buffers (values), so a saved adapter
    reloads without detection. With ``undo="merge"`` the base weights are rewritten back first and
    the adapter carries no ``M̂``. ``detection_report`` holds what blind detection found.

    Args:
        model (`torch.nn.Module`): the (protected) model to adapt.
        config (`SpecUndoConfig`, or a dict of them by adapter name): the adapter's configuration.
        adapter_name (`str`, defaults to `"default"`): the adapter's name.
        low_cpu_mem_usage (`bool`, defaults to `False`): create the adapter weights on the meta device, as in PEFT.
        state_dict (`dict[str, torch.Tensor]`, *optional*): a saved adapter state dict, used by PEFT when loading.

    Attributes:
        detection_report (`dict[str, DetectionReport | None]`): per adapter, what blind detection (or the recipe)
            found; ``None`` for an adapter loaded from its saved ``undo_plan``.
        prefix (`str`): ``"specundo_"``, the prefix of the adapter's parameter names.

    Raises:
        ValueError: no deformed linear module was found and ``target_modules`` is not given, a target is not a
            ``torch.nn.Linear`` / ``Conv1D``, or ``target_parameters`` is set.

    Example:

    ```python
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_specdef import SpecUndoConfig, SpecUndoModel

    model = AutoModelForCausalLM.from_pretrained("me/Llama-3.2-1B-specdef")
    peft_model = get_peft_model(model, SpecUndoConfig(knowledge="recipe"))
    assert isinstance(peft_model.base_model, SpecUndoModel)
    print(peft_model.base_model.undo_overhead())  # the cost of the undo maps
    ```
    """

    prefix: str = "specundo_"
    tuner_layer_cls = SpecUndoLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model: nn.Module, config: Any, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
        self._undo_values: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self.detection_report: dict[str, DetectionReport | None] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # -- injection ----------------------------------------------------------------------------

    def _resolve_undo(self, model: nn.Module, cfg: SpecUndoConfig, adapter_name: str) -> None:
        kw = {"threshold": cfg.threshold, "max_k": cfg.max_k, "site_map": cfg.site_map, "progress": False}
        if cfg.undo == "merge":
            res = undo_in_place(model, cfg.knowledge, cfg.recipe, **kw)
            self.detection_report[adapter_name] = res.report
            sites = res.sites
            cfg.undo_plan = {}
            plan_modules = build_undo_plan(model, sites)[0]
        elif cfg.undo_plan is None:
            sites, report = resolve_sites(model, cfg.knowledge, cfg.recipe, **kw)
            self.detection_report[adapter_name] = report
            cfg.undo_plan, self._undo_values[adapter_name] = build_undo_plan(model, sites)
            plan_modules = cfg.undo_plan
        else:  # loading a saved adapter: structure from the config, values from the state dict
            self.detection_report[adapter_name] = None
            plan_modules = cfg.undo_plan
        if cfg.target_modules is None:
            if not plan_modules:
                raise ValueError(
                    f"SpecUndo ({cfg.knowledge}) found no deformed linear module in this model, so there is nothing to "
                    "target by default; pass target_modules=[...] (it then trains as plain LoRA) or check the recipe "
                    "/ lower the blind threshold."
                )
            cfg.target_modules = set(plan_modules)  # exact module names (leaf names like "0" would be ambiguous)
        logger.info("hf-specdef SpecUndo: %d modules carry an undo map (%s, undo=%s)", len(cfg.undo_plan or {}),
                    cfg.knowledge, cfg.undo)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        self._resolve_undo(model, self.peft_config[adapter_name], adapter_name)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._undo_values.pop(adapter_name, None)

    def _prepare_adapter_config(self, peft_config: SpecUndoConfig, model_config: dict) -> SpecUndoConfig:
        return peft_config  # target_modules were resolved from the undo plan in inject_adapter

    def _create_and_replace(self, peft_config: SpecUndoConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name: str | None = None) -> None:
        if parameter_name is not None:
            raise ValueError("SpecUndo does not support target_parameters; target modules instead.")
        plan = (peft_config.undo_plan or {}).get(current_key, [])
        values = self._undo_values.get(adapter_name, {}).get(current_key)
        if isinstance(target, SpecUndoLayer):
            target.update_layer(adapter_name, peft_config, plan, values)
            return
        base = _base(target)
        if isinstance(base, Conv1D):
            peft_config.fan_in_fan_out = True
            new = Linear(target, adapter_name, peft_config, plan, values, is_target_conv_1d_layer=True)
        elif isinstance(base, nn.Linear):
            if peft_config.fan_in_fan_out:
                peft_config.fan_in_fan_out = False
            new = Linear(target, adapter_name, peft_config, plan, values)
        else:
            raise ValueError(f"SpecUndo target {current_key!r} is a {type(base).__name__}; only torch.nn.Linear and "
                             "transformers Conv1D are supported. Narrow target_modules.")
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    # -- reporting ----------------------------------------------------------------------------

    def undo_overhead(self, adapter_name: str = "default") -> dict[str, Any]:
        """Frozen ``M̂`` values stored per module, against the linear bound ``k·(m+n)`` per deformed matrix."""
        rows = {}
        for name, mod in self.model.named_modules():
            if isinstance(mod, SpecUndoLayer) and adapter_name in mod.specundo_A and mod.undo_ops.get(adapter_name):
                ops = mod.undo_ops[adapter_name]
                k = max(o.k if o.kind == "spectral" else max(1, o.k // 2) for o in ops)
                rows[name] = {"values": mod.overhead(adapter_name), "k": k,
                              "bound": k * (mod.in_features + mod.out_features), "ops": len(ops)}
        return {"modules": rows, "total": sum(r["values"] for r in rows.values()),
                "within_bound": all(r["values"] <= r["bound"] for r in rows.values())}


def export_lora(peft_model: nn.Module, out_dir: str | os.PathLike, adapter_name: str = "default") -> str:
    """Write a trained SpecUndo adapter as a standard LoRA adapter (``A' = A R̂``, ``B' = L̂ B``).

    Stock PEFT loads the result with no hf-specdef installed (``PeftModel.from_pretrained`` on the
    same protected base model) and computes exactly the same update.

    Args:
        peft_model: a ``PeftModel`` with a SpecUndo adapter.
        out_dir: the folder to write the LoRA adapter to.
        adapter_name: which adapter to export.

    Returns:
        ``out_dir``, as a string.

    Example:
        ```python
        from hf_specdef import export_lora

        export_lora(peft_model, "lora-adapter")  # then PeftModel.from_pretrained(base, "lora-adapter") in stock PEFT
        ```
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = peft_model.peft_config[adapter_name]
    if not isinstance(cfg, SpecUndoConfig):
        raise ValueError(f"adapter {adapter_name!r} is a {type(cfg).__name__}, not a SpecUndo adapter.")
    if cfg.lora_dropout:
        logger.info("export_lora: the LoRA keeps lora_dropout=%g (dropout before A' = A R̂ differs slightly in training)",
                    cfg.lora_dropout)
    state: dict[str, torch.Tensor] = {}
    targets = []
    root = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    for name, mod in root.named_modules():
        if isinstance(mod, SpecUndoLayer) and adapter_name in mod.specundo_A:
            with torch.no_grad():
                a, b = mod.effective_factors(adapter_name, torch.float32)
            state[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().to(mod.specundo_A[adapter_name].weight.dtype)
            state[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().to(mod.specundo_B[adapter_name].weight.dtype)
            targets.append(name)
    if not targets:
        raise ValueError(f"no SpecUndo layer holds adapter {adapter_name!r}; nothing to export.")
    if cfg.undo == "merge":
        logger.warning("export_lora: this adapter was trained with undo='merge' on in-place undone weights; the "
                       "exported LoRA applies to those undone weights, not to the protected checkpoint.")
    lora_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                          fan_in_fan_out=cfg.fan_in_fan_out, bias="none", task_type=cfg.task_type,
                          base_model_name_or_path=cfg.base_model_name_or_path, modules_to_save=cfg.modules_to_save)
    os.makedirs(out_dir, exist_ok=True)
    lora_cfg.save_pretrained(out_dir)
    save_file(state, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), encoding="utf-8") as f:
        json.load(f)  # written by PEFT itself; fail loudly if not
    return os.fspath(out_dir)
