"""LOMO: the fused update of "Full Parameter Fine-tuning for Large Language Models with Limited
Resources" (Lv et al., 2023, arXiv 2306.09782), section 3.2 "Fused update", and the hook machinery it
shares with AdaLomo (`lrkit/optim/adalomo.py`).

The fused update applies the optimizer to each parameter inside backward, as soon as its gradient is
final, and frees that gradient at once, so a full gradient buffer never exists. Here it is done with
`Tensor.register_post_accumulate_grad_hook` (as torchtune's `OptimizerInBackward`), which fires once
per backward after *all* contributions have been accumulated, so tied weights get one update with the
summed gradient. (The official code hooks the leaf's incoming gradient, `Tensor.register_hook`, and
updates "whatever already has a .grad" at the next hook plus once more after backward; it gets the
same result, with a pass over all parameters per hook.)

Both classes keep the torch.optim contract: `loss.backward(); opt.step(); opt.zero_grad()` works in both
modes, the learning rate is read from `param_groups` when the update runs (schedulers work), and
`state_dict()` round-trips.

Global gradient-norm clipping in fused mode needs every gradient before the first update, so it costs
a second backward pass (as the official code): pass 1 under `opt.grad_norm_pass()` only collects
per-tensor norms, pass 2 updates with the clip coefficient. The coefficient is valid for one step only.
"""
from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager

import torch
from torch.optim import Optimizer

# Which fused optimizer currently owns each parameter's hook (weak: never keeps a parameter alive).
_OWNER = torch.utils.weak.WeakTensorKeyDictionary()


def _check(ok: bool, what: str, value, accepted: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {what}: {value!r} (expected {accepted})")


class FusedOptimizer(Optimizer):
    """Base class: updates each parameter inside backward (`fused=True`) or in `step()` (`fused=False`).

    Subclasses implement `_update(p, g, group)`: apply one update to `p` from its fp32 gradient `g`
    (already clipped), reading hyper-parameters from `group` at call time; and may implement `_flush()`,
    called at the end of `step()` to finish updates they buffered.

    Fused-mode rules (each broken rule raises instead of silently updating wrongly):
      * one update backward per `step()`: gradient accumulation over micro-batches is not possible when
        each gradient is consumed as it arrives; a second backward before `step()` raises (use
        `fused=False` to accumulate);
      * with `max_grad_norm`, each step's update backward must be preceded by its own
        `grad_norm_pass()` (2 backward passes per step); `opt.backward(loss)` does both;
      * hooks fire on *every* backward, whatever `model.training` says (the optimizer does not know the
        model). Backward passes that must not update (gradient analysis, eval-mode saliency) go under
        `with opt.paused():`, which leaves ordinary `.grad`s behind; `step()` applies any `.grad` it
        finds, so call `zero_grad()` after such a pass unless you mean to apply it.
    """

    def __init__(self, params, defaults: dict, fused: bool = True, max_grad_norm: float | None = None):
        _check(isinstance(fused, bool), "fused", fused, "True or False")
        _check(max_grad_norm is None or (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0),
               "max_grad_norm", max_grad_norm, "None or a positive number")
        self.fused, self.max_grad_norm = fused, max_grad_norm
        self._handles: dict[int, object] = {}
        super().__init__(params, defaults)  # calls add_param_group, which registers the hooks
        self._paused = False
        self._sq_norms: list[torch.Tensor] | None = None  # not None only inside grad_norm_pass()
        self._clip_coef: torch.Tensor | None = None  # set by grad_norm_pass(), consumed by step()
        self._stepped: set[int] = set()  # ids of parameters already updated in the current step
        self._index_params()

    # ---- bookkeeping ----------------------------------------------------------------------------
    def _index_params(self) -> None:
        # id(p) -> (group, position): groups are replaced by load_state_dict, so this is rebuilt there
        self._where = {id(p): (g, i) for g in self.param_groups for i, p in enumerate(g["params"])}
        self._order = {id(p): k for k, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_where"):
            self._index_params()
        if self.fused:
            ref = weakref.ref(self)  # the hook must not keep the optimizer alive

            def hook(p: torch.Tensor) -> None:
                opt = ref()
                if opt is not None:
                    opt._on_grad(p)

            for p in self.param_groups[-1]["params"]:
                if not p.requires_grad:
                    continue
                old = _OWNER.get(p)
                if old is not None and old() is not None and old() is not self:
                    warnings.warn("a parameter already had a fused optimizer; its hook is removed and "
                                  "this optimizer takes over")
                    old()._handles.pop(id(p)).remove()
                _OWNER[p] = ref
                self._handles[id(p)] = p.register_post_accumulate_grad_hook(hook)

    def remove_hooks(self) -> None:
        """Detach from backward (e.g. before building another fused optimizer on the same model)."""
        for h in self._handles.values():
            h.remove()
        self._handles.clear()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._index_params()

    # ---- the update path shared by hooks and step() ------------------------------------------------
    def _update(self, p: torch.Tensor, g: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        pass

    def _apply(self, p: torch.Tensor, free: bool) -> None:
        grad = p.grad
        if free:
            p.grad = None  # the fused update's point: this gradient dies now
        g = grad.to(torch.float32)  # no copy when already fp32; never modified in place below
        if self.max_grad_norm is not None:
            if self._clip_coef is None:
                raise RuntimeError(
                    "max_grad_norm is set but no grad_norm_pass() ran for this step: run the norm pass "
                    "first (`with opt.grad_norm_pass(): loss.backward(retain_graph=True)`, then "
                    "`loss.backward()`), or use opt.backward(loss) which does both")
            g = g * self._clip_coef
        with torch.no_grad():
            self._update(p, g, self._where[id(p)][0])
        self._stepped.add(id(p))

    def _on_grad(self, p: torch.Tensor) -> None:
        if self._paused or p.grad is None:
            return
        if self._sq_norms is not None:  # pass 1 of clipping: only measure, then drop the gradient
            self._sq_norms.append(p.grad.detach().to(torch.float32).square().sum())
            p.grad = None
            return
        if id(p) in self._stepped:
            raise RuntimeError(
                "a second backward reached a parameter already updated in this step: the fused "
                "optimizer consumes each gradient inside backward, so gradient accumulation over several "
                "backward passes is not possible. Call step() after every backward, or build the "
                "optimizer with fused=False to accumulate gradients")
        self._apply(p, free=True)

    # ---- public API -------------------------------------------------------------------------------
    @contextmanager
    def paused(self):
        """Backward passes in this block leave ordinary `.grad`s and update nothing."""
        prev, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = prev

    @contextmanager
    def grad_norm_pass(self):
        """Pass 1 of fused global-norm clipping: the backward run inside this block only records
        per-tensor gradient norms (parameters untouched, gradients freed); on exit the clip
        coefficient min(1, max_grad_norm / (||G|| + 1e-6)) is set for this step's update backward.
        Costs one extra backward pass per step; keep the graph with `retain_graph=True`."""
        if not self.fused or self.max_grad_norm is None:
            raise RuntimeError("grad_norm_pass() is only for fused=True with max_grad_norm set; with "
                               "fused=False clipping is a plain global-norm clip inside step()")
        if self._stepped:
            raise RuntimeError("grad_norm_pass() must run before this step's update backward")
        self._sq_norms, self._clip_coef = [], None
        try:
            yield self
            norms = self._sq_norms
        finally:
            self._sq_norms = None
        total = torch.stack(norms).sum().sqrt() if norms else torch.zeros(())
        self._clip_coef = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)

    @property
    def updates_in_backward(self) -> bool:
        """True when fused: the update runs inside `backward(loss)` (a loop then skips its own clipping)."""
        return self.fused

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, preceded by the norm pass when fused clipping is on (2 backward passes)."""
        if self.fused and self.max_grad_norm is not None:
            with self.grad_norm_pass():
                loss.backward(retain_graph=True)
        loss.backward()

    @torch.no_grad()
    def step(self, closure=None):
        """Unfused: update every parameter that has a `.grad` (grads are kept, as in torch.optim).
        Fused: complete the step (the hooks already updated); any parameter still holding a `.grad`
        (hooks paused, grad set by hand) is updated here and its gradient freed."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._sq_norms is not None:
            raise RuntimeError("step() called inside grad_norm_pass()")
        pending = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if pending and self.max_grad_norm is not None and self._clip_coef is None and not self._stepped:
            # every gradient of this step is here (unfused, or fused with hooks paused): plain clip
            norms = torch.stack([p.grad.detach().to(torch.float32).norm() for p in pending])
            self._clip_coef = (self.max_grad_norm / (norms.norm() + 1e-6)).clamp(max=1.0)
        try:
            for p in pending:
                self._apply(p, free=self.fused)
            self._flush()
        finally:
            self._stepped.clear()
            self._clip_coef = None  # never reused by a later step
        return loss


class Lomo(FusedOptimizer):
    r"""LOMO (arXiv 2306.09782): plain SGD fused into backward, the baseline AdaLomo improves on.

    .. math::  \theta \leftarrow \theta (1 - \eta\,\mathrm{wd}) - \eta\, G

    computed in fp32 and written back into the parameter's dtype (no master weights). This equals
    `torch.optim.SGD(lr, weight_decay=wd)` without momentum. The official class also offers a dynamic
    fp16 loss scaler and value clipping; those are left out.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, fused: bool = True,
                 max_grad_norm: float | None = None):
        _check(isinstance(lr, (int, float)) and lr >= 0, "learning rate", lr, "a number >= 0")
        _check(isinstance(weight_decay, (int, float)) and weight_decay >= 0, "weight_decay",
               weight_decay, "a number >= 0")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), fused, max_grad_norm)

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
