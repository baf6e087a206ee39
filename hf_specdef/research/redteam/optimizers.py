"""Optimizers the red team needs beyond ``TrainingArguments.optim``: pure torch, one ``torch.optim.Optimizer`` each.

:class:`MultiplicativeAdam` is Adam on the log-magnitude of every weight: multiplicative updates as in Madam
(Bernstein, Vahdat, Yue & Liu, *Learning compositional functions via multiplicative weight updates*, NeurIPS 2020),
``w <- w * exp(-lr * m_hat / sqrt(v_hat))`` with Adam's moments of ``g * w`` (the gradient with respect to
``log|w|``). It is a generic optimizer — no knowledge of SpecDef — and it is *exactly* invariant to rescaling any
weight by a positive factor: ``w' = s w`` has gradient ``g / s``, so ``g' w' = g w``, the same step, and the update
``s * (w * exp(...))``. Every bit-exact SpecDef deformation (axis mode, power-of-two factors, and any refinement of it
that spreads factors over channels) is such a rescaling of each weight, so this optimizer fine-tunes the protected
model exactly as it fine-tunes the original. (Moments of ``g`` itself, as Madam keeps them, are invariant in exact
arithmetic too, but their squares underflow float32 where a deformation shrinks gradients by ``2^30``.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class MultiplicativeAdam(torch.optim.Optimizer):
    """Adam on every weight's log-magnitude (multiplicative updates; see the module docstring).

    Args:
        params: parameters or parameter groups.
        lr: relative step (``0.01``: a weight changes by about 1% per step).
        betas: Adam's moment decay rates.
        max_step: clamp of the normalised step ``|m_hat / sqrt(v_hat)|`` (keeps ``exp`` finite).

    There is no ``eps`` (``g * w`` has the same size however the weight is scaled; a coordinate with ``v_hat == 0``
    does not move). ``weight_decay`` is accepted for the Trainer's parameter groups and must be 0. A weight that is
    exactly 0 stays 0 (as in Madam).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
                 max_step: float = 10.0, weight_decay: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"MultiplicativeAdam(lr={lr!r}): the relative step must be > 0, e.g. 1e-2.")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"MultiplicativeAdam(betas={betas!r}): each must be in [0, 1).")
        if weight_decay:
            raise ValueError(f"MultiplicativeAdam(weight_decay={weight_decay!r}): only 0 is supported (decay is not "
                             "scale-invariant); pass weight_decay=0.")
        super().__init__(params, dict(lr=lr, betas=betas, max_step=max_step, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                m, v, g = state["m"], state["v"], p.grad * p  # d loss / d log|w|: the same for w and s * w
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = m / (1 - b1 ** state["step"])
                root = (v / (1 - b2 ** state["step"])).sqrt()
                normalised = torch.where(root > 0, m_hat / root.clamp_min(torch.finfo(root.dtype).tiny),
                                         torch.zeros_like(m_hat))
                normalised.clamp_(-group["max_step"], group["max_step"])
                p.mul_(torch.exp(-group["lr"] * normalised))
        return loss


CUSTOM_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"madam": MultiplicativeAdam}
"""Red-team optimizer names that ``TrainingArguments.optim`` does not know -> their class."""
