"""LOMO: the fused update of "Full Parameter Fine-tuning for Large Language Models with Limited
Resources" (Lv et al., 2023, arXiv 2306.09782), section 3.2 "Fused update", and the hook machinery it
shares with AdaLomo (`lrkit/optim/adalomo.py`).

The fused update applies the optimizer to each parameter inside backward, as soon as its gradient is
final, and frees that gradient at once, so a full gradient buffer never exists. Here it is done with
`Tensor.register_post_accumulate_grad_hook` (as torchtune's `OptimizerInBackward`), which fires once
per backward after *all* contributions have been accumulated, so tied weights get one update with the
summed gradient; the hooks, accumulation, clipping and the gradient reduction under DDP live in
`lrkit/optim/in_backward.py`, shared with per-layer GaLore. (The official code hooks the leaf's incoming gradient, `Tensor.register_hook`, and
updates "whatever already has a .grad" at the next hook plus once more after backward; it gets the
same result, with a pass over all parameters per hook.)

Both classes keep the torch.optim contract: `loss.backward(); opt.step(); opt.zero_grad()` works in both
modes, the learning rate is read from `param_groups` when the update runs (schedulers work), and
`state_dict()` round-trips.

Global gradient-norm clipping in fused mode needs every gradient before the first update, so by default
it costs a second backward pass (as the official code): pass 1 under `opt.grad_norm_pass()` only
collects per-tensor norms, pass 2 updates with the clip coefficient. The coefficient is valid for one
step only. ``clipping="deferred"`` clips in one backward instead, holding the gradients until its end.
"""
from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from lrkit.optim.in_backward import InBackwardOptimizer, _check


class FusedOptimizer(InBackwardOptimizer, Optimizer):
    """Base class of LOMO and AdaLomo: updates each parameter inside backward (`fused=True`) or in
    `step()` (`fused=False`), on the hook base `lrkit.optim.in_backward.InBackwardOptimizer` (its
    docstring has the rules: accumulation, two-pass or deferred clipping, reduction under DDP).

    Subclasses implement `_update(p, g, group)`: apply one update to `p` from its fp32 gradient `g`
    (already reduced and clipped), reading hyper-parameters from `group` at call time; and may implement
    `_flush()`, called at the end of `step()` to finish updates they buffered.

    Defaults keep LOMO's rules: one update backward per `step()` (``accumulation_steps=1``; a second
    backward before `step()` raises), and with `max_grad_norm` a norm pass before each step's update
    backward (``clipping="two_pass"``; `opt.backward(loss)` does both). With ``accumulation_steps=k > 1``
    each parameter updates on its k-th backward and clipping is "deferred" (one backward per
    micro-batch, the gradients of the last one held until its end).
    """

    def __init__(self, params, defaults: dict, fused: bool = True, max_grad_norm: float | None = None, *,
                 accumulation_steps: int = 1, clipping: str | None = None, reduction: str = "auto"):
        self._init_in_backward(fused=fused, max_grad_norm=max_grad_norm, clipping=clipping,
                               accumulation_steps=accumulation_steps, reduction=reduction)
        super().__init__(params, defaults)  # calls add_param_group, which registers the hooks

    def _update(self, p: torch.Tensor, g: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    def _update_param(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        self._update(p, grad.to(torch.float32), self._where[id(p)][0])  # no copy when already fp32


class Lomo(FusedOptimizer):
    r"""LOMO (arXiv 2306.09782): plain SGD fused into backward, the baseline AdaLomo improves on.

    .. math::  \theta \leftarrow \theta (1 - \eta\,\mathrm{wd}) - \eta\, G

    computed in fp32 and written back into the parameter's dtype (no master weights). This equals
    `torch.optim.SGD(lr, weight_decay=wd)` without momentum. The official class also offers a dynamic
    fp16 loss scaler and value clipping; those are left out.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, fused: bool = True,
                 max_grad_norm: float | None = None, *, accumulation_steps: int = 1,
                 clipping: str | None = None, reduction: str = "auto"):
        _check(isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0, "learning rate", lr,
               "a finite number >= 0")
        _check(isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0,
               "weight_decay", weight_decay, "a finite number >= 0")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), fused, max_grad_norm,
                         accumulation_steps=accumulation_steps, clipping=clipping, reduction=reduction)

    def _update(self, p, g, group):
        lr, wd = group["lr"], group["weight_decay"]
        p32 = p.to(torch.float32)  # p itself when fp32: then the update is in place
        if wd:
            p32.mul_(1 - lr * wd)
        p32.add_(g, alpha=-lr)
        if p32 is not p:
            p.copy_(p32)

    def persistent_state_bytes(self) -> int:
        return 0  # stateless: that is LOMO's point


__all__ = ["FusedOptimizer", "Lomo"]
