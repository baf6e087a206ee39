"""SpecUndo: the attacker's undo of a SpecDef deformation as a PEFT tuner (SPEC §3).

Importing this module (``hf_specdef`` does once ``peft`` is imported) registers the method with PEFT: ``SPECUNDO`` is
added to ``peft.utils.PeftType`` (PEFT's ``register_peft_method`` only accepts names already in the
enum) and then registered normally, so ``get_peft_model(model, SpecUndoConfig(...))``,
``save_pretrained``, ``PeftModel.from_pretrained`` and ``merge_and_unload`` work as for LoRA.
"""

from __future__ import annotations

from peft.utils import register_peft_method

from hf_specdef.tuners.specundo.config import SPECUNDO, SpecUndoConfig, extend_peft_type
from hf_specdef.tuners.specundo.layer import Linear, SpecUndoLayer, UndoOp
from hf_specdef.tuners.specundo.model import SpecUndoModel, build_undo_plan, export_lora

__all__ = ["SPECUNDO", "Linear", "SpecUndoConfig", "SpecUndoLayer", "SpecUndoModel", "UndoOp", "build_undo_plan",
           "export_lora", "extend_peft_type", "register"]


def register() -> None:
    """Register SpecUndo with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    member = extend_peft_type()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(member) is SpecUndoModel:
        return
    register_peft_method(name="specundo", config_cls=SpecUndoConfig, model_cls=SpecUndoModel, prefix="specundo_")


register()
