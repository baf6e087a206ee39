"""SpecUndo: the attacker's undo of a SpecDef deformation as a PEFT tuner (see docs/integrations.md).

Importing this module (``hf_specdef`` does once ``peft`` is imported) registers the method with PEFT
(:func:`install`): ``SPECUNDO`` is added to ``peft.utils.PeftType`` (PEFT's ``register_peft_method`` only accepts
names already in the enum) and then registered normally, so ``get_peft_model(model, SpecUndoConfig(...))``,
``save_pretrained``, ``PeftModel.from_pretrained`` and ``merge_and_unload`` work as for LoRA.

:func:`uninstall` (run by :func:`hf_specdef.integrations.uninstall`) takes it out again: the
``PEFT_TYPE_TO_*_MAPPING`` entries go, and so does the enum member (``enum`` has no API for that: it is removed
from the three tables ``enum`` keeps and from the class, the mirror of
:func:`~hf_specdef.tuners.specundo.config.extend_peft_type`), leaving ``list(PeftType)``, ``PeftType("SPECUNDO")``
and the mappings as in stock PEFT. :func:`install` puts back the same member object, so :data:`SPECUNDO` (the
``peft_type`` of every :class:`SpecUndoConfig`) stays ``PeftType.SPECUNDO``.
"""

from __future__ import annotations

import logging

from peft.utils import PeftType, register_peft_method

from hf_specdef.tuners.specundo.config import SPECUNDO, SpecUndoConfig, extend_peft_type
from hf_specdef.tuners.specundo.layer import Linear, SpecUndoLayer, UndoOp
from hf_specdef.tuners.specundo.model import SpecUndoModel, build_undo_plan, export_lora

logger = logging.getLogger("hf_specdef")

__all__ = ["SPECUNDO", "Linear", "SpecUndoConfig", "SpecUndoLayer", "SpecUndoModel", "UndoOp", "build_undo_plan",
           "export_lora", "extend_peft_type", "install", "register", "uninstall"]

NAME = "specundo"  # the PEFT method name (register_peft_method); the prefix of the adapter weights is NAME + "_"
# the tables of peft.mapping that register_peft_method fills
_MAPPINGS = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
             "PEFT_TYPE_TO_PREFIX_MAPPING")


def _add_member() -> None:
    """Put :data:`SPECUNDO` back into ``PeftType`` after :func:`_remove_member` (the same object)."""
    name = SPECUNDO._name_
    SPECUNDO._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = SPECUNDO
    PeftType._value2member_map_[SPECUNDO._value_] = SPECUNDO
    type.__setattr__(PeftType, name, SPECUNDO)


def _remove_member() -> bool:
    """Take :data:`SPECUNDO` out of ``PeftType`` (``True`` when it was there)."""
    name = SPECUNDO._name_
    if PeftType._member_map_.get(name) is not SPECUNDO:
        return False
    PeftType._member_names_.remove(name)
    del PeftType._member_map_[name]
    PeftType._value2member_map_.pop(SPECUNDO._value_, None)
    if name in vars(PeftType):
        type.__delattr__(PeftType, name)
    return True


def install() -> None:
    """Register SpecUndo with PEFT: the ``PeftType`` member, then ``register_peft_method`` (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    if SPECUNDO._name_ not in PeftType.__members__:  # taken out by uninstall()
        _add_member()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(SPECUNDO) is SpecUndoModel:
        return
    register_peft_method(name=NAME, config_cls=SpecUndoConfig, model_cls=SpecUndoModel, prefix=f"{NAME}_")


register = install  # the earlier name


def uninstall() -> list[str]:
    """Remove what :func:`install` added to PEFT: the ``PEFT_TYPE_TO_*_MAPPING`` entries, then the ``PeftType``
    member; what was removed, one line each (also logged). PEFT has no unregister function: its tables are dicts."""
    from peft import mapping

    removed = [f"peft.mapping.{table}[SPECUNDO]" for table in _MAPPINGS
               if getattr(mapping, table).pop(SPECUNDO, None) is not None]
    if _remove_member():
        removed.append("peft.utils.PeftType.SPECUNDO")
    for what in removed:
        logger.info("hf-specdef: removed %s", what)
    return removed


install()
