"""SpecUndo layers: LoRA in the undeformed geometry, with a frozen compact ``M̂`` on each side.

A deformed weight is ``W' = L W R`` where ``L`` (output side) and ``R`` (input side) are products of
block maps ``I + U diag(f - 1) U^T`` (``f = alpha`` on a producer block, ``1/alpha`` on a consumer
block; ``U`` a basis or coordinate axes). The layer computes ``y = W' x + s · L̂ B A R̂ x``: the
effective update in the original geometry is ``B A``, so it trains as fast as LoRA on the
undeformed model. ``L̂``/``R̂`` are stored as *ops* (side, block, kind, k) plus three buffers per
adapter: ``specundo_factor`` (one per op), ``specundo_basis`` (the concatenated ``U`` blocks, ``d·k``
floats per spectral op) and ``specundo_index`` (the axes of axis ops).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class UndoOp:
    """One block map ``I + U diag(f - 1) U^T`` on features ``[start, stop)`` of one side of a layer."""

    side: str  # "in" | "out"
    start: int
    stop: int
    kind: str  # "spectral" | "axis"
    k: int
    offset: int  # into specundo_basis (spectral, d*k floats) or specundo_index (axis, k indices)

    @property
    def size(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        return {"side": self.side, "start": self.start, "stop": self.stop, "kind": self.kind, "k": self.k}


def ops_from_plan(plan: Sequence[dict[str, Any]]) -> list[UndoOp]:
    """Ops (with buffer offsets) from the JSON plan stored in ``SpecUndoConfig.undo_plan``."""
    ops, b_off, i_off = [], 0, 0
    for d in plan:
        size = int(d["stop"]) - int(d["start"])
        if d["kind"] == "spectral":
            ops.append(UndoOp(d["side"], int(d["start"]), int(d["stop"]), "spectral", int(d["k"]), b_off))
            b_off += size * int(d["k"])
        else:
            ops.append(UndoOp(d["side"], int(d["start"]), int(d["stop"]), "axis", int(d["k"]), i_off))
            i_off += int(d["k"])
    return ops


def buffer_sizes(ops: Sequence[UndoOp]) -> tuple[int, int, int]:
    """(factors, basis floats, indices) an op list needs."""
    return (len(ops), sum(o.size * o.k for o in ops if o.kind == "spectral"), sum(o.k for o in ops if o.kind == "axis"))


def apply_op_lastdim(x: torch.Tensor, op: UndoOp, factor: torch.Tensor, basis: torch.Tensor,
                     index: torch.Tensor) -> torch.Tensor:
    """``x[..., block] <- x[..., block] (I + U diag(f - 1) U^T)`` (out of place, autograd-friendly)."""
    blk = x[..., op.start:op.stop]
    f = factor.to(x.dtype)
    if op.kind == "axis":
        idx = index[op.offset:op.offset + op.k].to(x.device)
        scale = torch.ones(op.size, dtype=x.dtype, device=x.device).index_copy(0, idx, f.expand(op.k))
        new = blk * scale
    else:
        u = basis[op.offset:op.offset + op.size * op.k].view(op.size, op.k).to(x.dtype)
        new = blk + ((blk @ u) * (f - 1)) @ u.T
    return torch.cat([x[..., :op.start], new, x[..., op.stop:]], dim=-1)


class SpecUndoLayer(BaseTunerLayer):
    """Adapter state of a SpecUndo layer (LoRA factors + frozen ``M̂`` ops)."""

    adapter_layer_names = ("specundo_A", "specundo_B")
    other_param_names = ("r", "lora_alpha", "scaling", "specundo_dropout", "specundo_factor", "specundo_basis",
                         "specundo_index")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.specundo_dropout = nn.ModuleDict({})
        self.specundo_A = nn.ModuleDict({})
        self.specundo_B = nn.ModuleDict({})
        self.specundo_factor = BufferDict({}, persistent=True)
        self.specundo_basis = BufferDict({}, persistent=True)
        self.specundo_index = BufferDict({}, persistent=True)
        self.undo_ops: dict[str, list[UndoOp]] = {}
        if "undo_ops" not in self.other_param_names:  # so PEFT's delete_adapter drops an adapter's ops too (as LoRA does)
            self.other_param_names = (*self.other_param_names, "undo_ops")
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            in_features, out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            in_features, out_features = base.weight.shape
        else:
            raise TypeError(f"SpecUndo supports torch.nn.Linear and transformers Conv1D targets, got {type(base).__name__}.")
        self.in_features, self.out_features = in_features, out_features

    def update_layer(self, adapter_name: str, config: Any, plan: Sequence[dict[str, Any]],
                     values: dict[str, torch.Tensor] | None = None) -> None:
        """Create adapter ``adapter_name``: LoRA factors, and ``M̂`` buffers from ``values`` (zeros if loading)."""
        r = config.r
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / r
        self.specundo_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.specundo_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.specundo_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        ops = ops_from_plan(plan)
        for o in ops:
            n = self.in_features if o.side == "in" else self.out_features
            if not 0 <= o.start < o.stop <= n:
                raise ValueError(f"SpecUndo op {o.to_dict()} does not fit a layer with {n} {o.side}put features.")
        self.undo_ops[adapter_name] = ops
        nf, nb, ni = buffer_sizes(ops)
        values = values or {}
        self.specundo_factor[adapter_name] = values.get("factor", torch.ones(nf, dtype=torch.float64)).float()
        self.specundo_basis[adapter_name] = values.get("basis", torch.zeros(nb)).float()
        self.specundo_index[adapter_name] = values.get("index", torch.zeros(ni, dtype=torch.long)).long()
        if config.init_weights:
            nn.init.kaiming_uniform_(self.specundo_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.specundo_B[adapter_name].weight)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        for bd in (self.specundo_factor, self.specundo_basis):  # keep M̂ in float32 whatever the base dtype
            bd[adapter_name] = bd[adapter_name].float()
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # -- the maps ---------------------------------------------------------------------------

    def _ops(self, adapter: str, side: str) -> list[tuple[UndoOp, torch.Tensor]]:
        f = self.specundo_factor[adapter]
        return [(o, f[i]) for i, o in enumerate(self.undo_ops.get(adapter, [])) if o.side == side]

    def undo_input(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """``R̂ x`` (the input-side maps, last-applied first)."""
        basis, index = self.specundo_basis[adapter], self.specundo_index[adapter]
        for op, f in reversed(self._ops(adapter, "in")):
            x = apply_op_lastdim(x, op, f, basis, index)
        return x

    def undo_output(self, adapter: str, y: torch.Tensor) -> torch.Tensor:
        """``L̂ y`` (the output-side maps, first-applied first)."""
        basis, index = self.specundo_basis[adapter], self.specundo_index[adapter]
        for op, f in self._ops(adapter, "out"):
            y = apply_op_lastdim(y, op, f, basis, index)
        return y

    def effective_factors(self, adapter: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain-LoRA factors ``(A' = A R̂, B' = L̂ B)`` with ``L̂ B A R̂ = B' A'`` (shapes r x in, out x r)."""
        a = self.specundo_A[adapter].weight.to(dtype)
        b = self.specundo_B[adapter].weight.to(dtype)
        basis, index = self.specundo_basis[adapter], self.specundo_index[adapter]
        for op, f in self._ops(adapter, "in"):  # A R_1 R_2 ... in application order
            a = apply_op_lastdim(a, op, f, basis, index)
        bt = b.T  # (r, out): L̂ B = (B^T L̂^T)^T, L̂ symmetric per op
        for op, f in self._ops(adapter, "out"):
            bt = apply_op_lastdim(bt, op, f, basis, index)
        return a, bt.T

    def overhead(self, adapter: str) -> int:
        """Number of frozen ``M̂`` values this layer stores for ``adapter`` (factors + basis + indices)."""
        return sum(int(bd[adapter].numel()) for bd in (self.specundo_factor, self.specundo_basis, self.specundo_index)
                   if adapter in bd)


class Linear(nn.Module, SpecUndoLayer):
    """SpecUndo on a ``torch.nn.Linear`` (or a transformers ``Conv1D`` with ``fan_in_fan_out``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, plan: Sequence[dict[str, Any]],
                 values: dict[str, torch.Tensor] | None = None, is_target_conv_1d_layer: bool = False,
                 **kwargs: Any) -> None:
        super().__init__()
        SpecUndoLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, plan, values)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``s · L̂ B A R̂`` in the base weight's layout."""
        weight = self.get_base_layer().weight
        a, b = self.effective_factors(adapter, torch.float32 if weight.dtype in (torch.float16, torch.bfloat16)
                                      else self.specundo_A[adapter].weight.dtype)
        return (transpose(b @ a, self.fan_in_fan_out) * self.scaling[adapter]).to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active adapters' updates into the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for active in adapter_names:
            if active not in self.specundo_A:
                continue
            base = self.get_base_layer()
            delta = self.get_delta_weight(active)
            if safe_merge:
                new = base.weight.data.clone() + delta
                if not torch.isfinite(new).all():
                    raise ValueError(f"NaNs detected in the merged weights; the adapter {active!r} seems to be broken.")
                base.weight.data = new
            else:
                base.weight.data += delta
            self.merged_adapters.append(active)

    def unmerge(self) -> None:
        """Subtract merged adapters from the base weight."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            active = self.merged_adapters.pop()
            if active in self.specundo_A:
                self.get_base_layer().weight.data -= self.get_delta_weight(active)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for active in self.active_adapters:
            if active not in self.specundo_A:
                continue
            a, b = self.specundo_A[active], self.specundo_B[active]
            h = self._cast_input_dtype(self.specundo_dropout[active](x), a.weight.dtype)
            h = b(a(self.undo_input(active, h)))
            result = result + self.undo_output(active, h) * self.scaling[active]
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "specundo." + super().__repr__()
