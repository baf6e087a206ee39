"""``SpecUndoConfig``: the PEFT config of the SpecUndo adapter."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils import PeftType

PEFT_TYPE_NAME = "SPECUNDO"
KNOWLEDGE = ("recipe", "blind")
UNDO_MODES = ("adapter", "merge")


def extend_peft_type(name: str = PEFT_TYPE_NAME) -> PeftType:
    """Add ``name`` to PEFT's ``PeftType`` enum (idempotent) and return the member.

    ``peft.utils.register_peft_method`` accepts only names already in the enum, and the enum is a
    plain ``(str, enum.Enum)``: a member is added the way ``enum`` itself stores members
    (``_member_map_``, ``_value2member_map_``, ``_member_names_``), so ``PeftType("SPECUNDO")``,
    ``PeftType.SPECUNDO`` and ``list(PeftType)`` all see it, and configs saved with
    ``"peft_type": "SPECUNDO"`` load through ``PeftConfig.from_pretrained``.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)
    assert isinstance(PeftType(name), enum.Enum)
    return member


SPECUNDO = extend_peft_type()


@dataclass
class SpecUndoConfig(PeftConfig):
    """Configuration of a :class:`~hf_specdef.tuners.specundo.SpecUndoModel`.

    SpecUndo is LoRA trained *in the undeformed geometry*: for a deformed consumer ``C' = C M^-1``
    the update is ``ΔC' = B A M̂^-1`` (the frozen ``M̂^-1`` maps the inflated activation back),
    for a producer ``P' = M P`` it is ``ΔP' = M̂ B A``. ``M̂`` is stored compactly (directions and
    factors, O(k·d) buffers per deformed matrix, not trainable).

    Passed to ``peft.get_peft_model(model, SpecUndoConfig(...))``; importing it from ``hf_specdef`` needs PEFT
    (``pip install 'hf-specdef[peft]'``). See the Integrations page of the docs (docs/integrations.md).

    Args:
        r (`int`, defaults to `8`): LoRA rank (a positive integer).
        lora_alpha (`int`, defaults to `8`): LoRA scaling numerator (``scaling = lora_alpha / r``).
        lora_dropout (`float`, defaults to `0.0`): dropout on the adapter input.
        target_modules: modules to adapt (names, suffixes or a regex, as in LoRA). ``None``: every
            linear module that is a side of a deformed pair (exact module names).
        exclude_modules: modules not to adapt.
        fan_in_fan_out: the targets store weights as (in, out) (GPT-2 ``Conv1D``; set automatically).
        bias: ``"none"`` (only ``"none"`` is supported).
        modules_to_save: extra modules to train and save in full, as in LoRA.
        knowledge (`str`, defaults to `"blind"`): ``"recipe"`` (the protection record, exact) or ``"blind"``
            (estimated from the weights).
        recipe: the record to use with ``knowledge="recipe"`` instead of the model config's: a record
            dict, a JSON file (record or config.json) or a model directory.
        undo: ``"adapter"`` (frozen ``M̂`` inside the adapter layers) or ``"merge"`` (rewrite the base
            weights back in place first, then train a plain low-rank adapter on top).
        threshold (`float`, defaults to `10.0`): blind detection threshold on the balance score (``~1`` undeformed,
            ``~alpha`` deformed); must be > 1.
        max_k (`int`, defaults to `4`): most deformed directions looked for per pair.
        site_map: explicit pairs for architectures the registry does not know (as ``SpecDefConfig.site_map``).
        init_weights (`bool`, defaults to `True`): initialise ``B`` to zero (the adapter starts as the identity).
        layers_to_transform: layer indices to adapt, as in LoRA.
        layers_pattern: the name of the layer list, with ``layers_to_transform``, as in LoRA.
        undo_plan: filled in automatically when the adapter is created: per module, the structure of
            ``M̂`` (side, block, kind, k); saved with the adapter so loading needs no detection.

    Raises:
        ValueError: ``r`` or ``max_k`` is not a positive integer, ``knowledge`` / ``undo`` / ``bias`` is not an
            allowed value, ``threshold <= 1``, or ``recipe`` is given without ``knowledge="recipe"``.

    Example:

    ```python
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_specdef import SpecUndoConfig

    model = AutoModelForCausalLM.from_pretrained("me/Llama-3.2-1B-specdef")
    peft_model = get_peft_model(model, SpecUndoConfig(r=8, knowledge="recipe"))
    peft_model.print_trainable_parameters()  # then train as with LoRA
    ```
    """

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha (scaling = lora_alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to adapt"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules not to adapt"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "weights stored as (in, out), e.g. GPT-2 Conv1D"})
    bias: str = field(default="none", metadata={"help": "only 'none'"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "extra modules to train and save"})
    knowledge: str = field(default="blind", metadata={"help": "'recipe' or 'blind'"})
    recipe: str | dict | None = field(default=None, metadata={"help": "record dict / JSON path / model dir"})
    undo: str = field(default="adapter", metadata={"help": "'adapter' or 'merge'"})
    threshold: float = field(default=10.0, metadata={"help": "blind detection threshold (balance score)"})
    max_k: int = field(default=4, metadata={"help": "most deformed directions per pair"})
    site_map: list[dict] | None = field(default=None, metadata={"help": "explicit pairs (SpecDefConfig.site_map)"})
    init_weights: bool = field(default=True, metadata={"help": "B = 0 at init"})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "as in LoRA"})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "as in LoRA"})
    undo_plan: dict[str, list[dict[str, Any]]] | None = field(
        default=None, metadata={"help": "structure of M̂ per module (filled automatically)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SPECUNDO
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"SpecUndoConfig(r={self.r!r}): r must be a positive integer, e.g. 8.")
        if self.knowledge not in KNOWLEDGE:
            raise ValueError(f"SpecUndoConfig(knowledge={self.knowledge!r}): choose one of {KNOWLEDGE}.")
        if self.undo not in UNDO_MODES:
            raise ValueError(f"SpecUndoConfig(undo={self.undo!r}): choose one of {UNDO_MODES}.")
        if self.bias != "none":
            raise ValueError(f"SpecUndoConfig(bias={self.bias!r}): only bias='none' is supported.")
        if not self.threshold > 1:
            raise ValueError(f"SpecUndoConfig(threshold={self.threshold!r}) must be > 1; the default 10 suits alpha >= 100.")
        if not isinstance(self.max_k, int) or self.max_k < 1:
            raise ValueError(f"SpecUndoConfig(max_k={self.max_k!r}) must be a positive integer.")
        if isinstance(self.recipe, os.PathLike):
            self.recipe = os.fspath(self.recipe)  # JSON-serialisable in adapter_config.json
        if self.recipe is not None and self.knowledge != "recipe":
            raise ValueError("SpecUndoConfig(recipe=...) is only used with knowledge='recipe'; set knowledge='recipe'.")
