"""One hook base for every optimizer that updates inside backward: LOMO and AdaLomo (`lomo.py`,
`adalomo.py`, through `FusedOptimizer`) and per-layer GaLore (`galore.py:PerLayerGaLore`).

Each trainable parameter gets a `Tensor.register_post_accumulate_grad_hook` (as torchtune's
`OptimizerInBackward`). It fires once per backward after *all* contributions to `p.grad` have been
accumulated (tied weights: one update with the summed gradient). When the gradient is final for the
step, the hook updates the parameter at once and frees `p.grad`, so a full gradient buffer never exists.
A subclass implements one method, `_update_param(p, grad)`: apply one update to `p` from its final
gradient `grad` (reduced, accumulated, clipped; in `p.grad`'s dtype unless clipped, then fp32).

Three options, the same rules for every subclass:

* ``accumulation_steps`` (k, default 1): a parameter updates on its k-th hook of the step; in between
  its `.grad` accumulates (scale the loss by 1/k as usual). The official per-layer GaLore hook steps on
  every micro-batch instead (GaLore issue #78). A further backward reaching a parameter already updated
  in this step raises (call `step()` first). `zero_grad()` discards a partial accumulation.
* ``max_grad_norm`` with ``clipping``: a global-norm clip needs every final gradient before the first
  update. Two ways:
    - ``"two_pass"`` (LOMO's, the default of LOMO and AdaLomo at k = 1): pass 1 under
      `grad_norm_pass()` only measures per-tensor squared norms and frees each gradient; pass 2 updates
      with the clip coefficient min(1, max_grad_norm / (||G|| + 1e-6)). Two backward passes per step
      (`backward(loss)` runs both), one gradient alive at a time. Needs k = 1 (pass 1 would have to
      measure an accumulated gradient it must not consume);
    - ``"deferred"`` (per-layer GaLore's default, and the default whenever k > 1): the final
      gradients are only marked ready; the last one to arrive computes the global norm (of the fp32
      gradients, as `clip_grad_norm_`), clips all and updates every parameter. One backward, but all
      gradients stay alive until the end of that backward -- which they are anyway between
      micro-batches when k > 1. A parameter that got no gradient keeps the ready ones waiting for
      `step()`, which clips them by their global norm and updates them.
* ``reduction``: data parallelism. The hook fires *before* DDP's bucket all-reduce (and DDP's reducer
  would find `p.grad` already consumed), so an optimizer updating inside backward must reduce each
  gradient itself: with ``"auto"`` (default) every final gradient is all-reduced and divided by the
  world size (the rank average, as DDP) before clipping and update whenever torch.distributed is
  initialised with world size > 1; ``"mean"`` requires an initialised process group; ``"none"`` never
  reduces. Such a model is **not** wrapped in DDP (`lrkit.distributed.wrap` broadcasts rank 0's
  parameters instead, as DDP does at construction): one reduction, no duplicate gradient buckets
  (GaLore #55), and no reducer reading a freed `.grad`. Clipping then uses the norm of the *reduced*
  gradient, the same on every rank: "deferred" clips reduced gradients (no extra collective), "two_pass"
  reduces in pass 1 too (two all-reduces per gradient per step). Collectives are issued in autograd's
  hook order, which is the same on every rank for the same model; every rank must give every parameter
  a gradient (no unused parameters on some ranks only, as DDP without find_unused_parameters).

``fused=False`` keeps the hooks off: backward only accumulates `.grad` and `step()` updates every
parameter holding one (with a plain global-norm clip, and the reduction when on), as torch.optim. Hooks
fire on *every* backward, whatever `model.training` says; passes that must not update (gradient
analysis) go under `with opt.paused():`, which leaves ordinary `.grad`s that `step()` would apply.
"""
from __future__ import annotations

import math
import warnings
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist

from lrkit.utils import all_finite

CLIPPINGS = ("two_pass", "deferred")
REDUCTIONS = ("auto", "mean", "none")

# Which in-backward optimizer currently owns each parameter's hook (weak: never keeps a parameter alive).
_OWNER = torch.utils.weak.WeakTensorKeyDictionary()


class NonFiniteGradient(FloatingPointError):
    """A gradient with NaN or Inf reached an update; ``param`` is the parameter (its name is the caller's)."""

    def __init__(self, param: torch.Tensor, message: str):
        super().__init__(message)
        self.param = param


def _check(ok: bool, what: str, value, accepted: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {what}: {value!r} (expected {accepted})")


def _remove_handles(handles: dict) -> None:
    for h in handles.values():
        h.remove()
    handles.clear()


def reduction_world_size(reduction: str, group=None) -> int:
    """How many ranks a gradient is averaged over under ``reduction`` (1 = no reduction)."""
    if reduction == "none":
        return 1
    ready = dist.is_available() and dist.is_initialized()
    if reduction == "mean" and not ready:
        raise RuntimeError("reduction='mean' needs an initialised torch.distributed process group "
                           "(lrkit.distributed.init()); use reduction='auto' to reduce only when one exists")
    return dist.get_world_size(group) if ready else 1


class InBackwardOptimizer:
    """Mixin placed before a `torch.optim.Optimizer` class in the bases, e.g.
    ``class PerLayerGaLore(InBackwardOptimizer, GaLoreAdamW)``. The subclass calls
    `_init_in_backward(...)` *before* `Optimizer.__init__` (which registers the hooks through
    `add_param_group`) and implements `_update_param(p, grad)`; it may implement `_flush()`, called at
    the end of `step()` to finish updates it buffered. The rules are in the module docstring."""

    _default_clipping = "two_pass"

    def _init_in_backward(self, *, fused: bool = True, max_grad_norm: float | None = None,
                          clipping: str | None = None, accumulation_steps: int = 1,
                          reduction: str = "auto") -> None:
        _check(isinstance(fused, bool), "fused", fused, "True or False")
        _check(max_grad_norm is None or (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm)
                                         and max_grad_norm > 0),
               "max_grad_norm", max_grad_norm, "None or a finite number > 0")
        _check(isinstance(accumulation_steps, int) and not isinstance(accumulation_steps, bool)
               and accumulation_steps >= 1, "accumulation_steps", accumulation_steps, "an int >= 1")
        _check(clipping is None or clipping in CLIPPINGS, "clipping", clipping, f"None or one of {CLIPPINGS}")
        _check(reduction in REDUCTIONS, "reduction", reduction, f"one of {REDUCTIONS}")
        if clipping is None:
            clipping = self._default_clipping if accumulation_steps == 1 else "deferred"
        _check(clipping != "two_pass" or accumulation_steps == 1, "clipping", clipping,
               f"'deferred' with accumulation_steps={accumulation_steps} (the two-pass norm pass cannot "
               "measure an accumulated gradient without consuming it)")
        self.fused, self.max_grad_norm, self.clipping = fused, max_grad_norm, clipping
        self.accumulation_steps, self.reduction = accumulation_steps, reduction
        self.process_group = None  # None = the default group; lrkit.distributed.wrap may set another
        self._handles: dict[int, object] = {}  # id(p) -> hook handle
        weakref.finalize(self, _remove_handles, self._handles)  # the finaliser must not reference self
        self._paused = False
        self._sq_norms: list[torch.Tensor] | None = None  # not None only inside grad_norm_pass()
        self._clip_coef: torch.Tensor | None = None  # set by grad_norm_pass(), consumed by step()
        self._stepped: set[int] = set()  # ids of parameters already updated in the current step
        self._held: set[int] = set()  # ids whose current .grad a hook has seen (accumulating or ready)
        self._ready: dict[int, torch.Tensor] = {}  # deferred clipping: final gradients awaiting the norm
        self._micro: dict[int, int] = {}  # id(p) -> backward passes accumulated since its last update
        self._where: dict[int, tuple[dict, int]] = {}
        self._order: dict[int, int] = {}

    # ---- bookkeeping ----------------------------------------------------------------------------
    def _index_params(self) -> None:
        # id(p) -> (group, position in state_dict order); groups are replaced by load_state_dict
        self._where, self._order = {}, {}
        for group in self.param_groups:
            for p in group["params"]:
                self._order[id(p)] = len(self._order)
                self._where[id(p)] = (group, self._order[id(p)])

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._index_params()
        if not self.fused:
            return
        ref = weakref.ref(self)  # the hook must not keep the optimizer alive

        def hook(p: torch.Tensor) -> None:
            opt = ref()
            if opt is not None:
                opt._on_grad(p)

        for p in self.param_groups[-1]["params"]:
            if not p.requires_grad:
                continue
            old = _OWNER.get(p)
            old = old() if old is not None else None
            if old is not None and old is not self and id(p) in old._handles:  # (not after its remove_hooks())
                warnings.warn("a parameter already had an in-backward optimizer; its hook is removed and "
                              "this optimizer takes over")
                old._handles.pop(id(p)).remove()
            _OWNER[p] = ref
            self._handles[id(p)] = p.register_post_accumulate_grad_hook(hook)
            self._micro[id(p)] = 0

    def remove_hooks(self) -> None:
        """Detach from backward: it then only accumulates `.grad`, and `step()` updates (and clips)."""
        _remove_handles(self._handles)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._index_params()

    # ---- what a subclass provides -----------------------------------------------------------------
    def _update_param(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        pass

    # ---- the path from a final gradient to an update ----------------------------------------------
    # ---- what a sharded subclass changes (lrkit.fsdp.ShardedInBackward): this rank's gradient, sums over ranks
    def _grad(self, p: torch.Tensor) -> torch.Tensor:
        """The gradient an update reads: ``p.grad`` (a sharded subclass: this rank's part of it)."""
        return p.grad

    def _sum_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """A partial sum over this rank's shards made whole; here the gradients are whole already."""
        return t

    def _global_norm(self, norms: torch.Tensor) -> torch.Tensor:
        """The global norm from the per-tensor norms, as clip_grad_norm_ computes it."""
        return torch.linalg.vector_norm(norms)

    def _reduce(self, grad: torch.Tensor) -> None:
        world = reduction_world_size(self.reduction, self.process_group)
        if world > 1:  # sum then divide: gloo has no AVG op
            dist.all_reduce(grad, group=self.process_group)
            grad.div_(world)

    def _consume(self, p: torch.Tensor, coef: torch.Tensor | None) -> None:
        grad = self._grad(p)
        if not all_finite(grad):  # stop before a NaN reaches the weights (or an SVD)
            raise NonFiniteGradient(p, f"non-finite gradient (NaN or Inf) in a {tuple(p.shape)} parameter, "
                                       f"index {self._order[id(p)]} of the optimizer's parameters")
        if self.fused:
            p.grad = None  # the point of updating in backward: this gradient dies now
        if coef is not None:
            grad = grad.to(torch.float32) * coef  # never in place: grad may still be p.grad (unfused)
        with torch.no_grad():
            self._update_param(p, grad)
        self._stepped.add(id(p))
        self._held.discard(id(p))

    def _global_clip_coef(self, params: list) -> torch.Tensor:
        norms = torch.stack([torch.linalg.vector_norm(self._grad(q).detach().to(torch.float32)) for q in params])
        return (self.max_grad_norm / (self._global_norm(norms) + 1e-6)).clamp(max=1.0)

    def _clip_and_update(self, params: list) -> None:
        params = sorted(params, key=lambda q: self._order[id(q)])  # parameter order, as clip_grad_norm_
        coef = self._global_clip_coef(params) if params and self.max_grad_norm is not None else None
        for q in params:
            self._consume(q, coef)

    def _take_ready(self) -> list:
        ready = [p for p in self._ready.values() if p.grad is not None]
        self._ready = {}
        return ready

    def _on_grad(self, p: torch.Tensor) -> None:
        if self._paused or p.grad is None or id(p) not in self._handles:
            return
        if self._sq_norms is not None:  # pass 1 of two-pass clipping: only measure, then drop
            self._reduce(p.grad)
            self._sq_norms.append(self._grad(p).detach().to(torch.float32).square().sum())
            p.grad = None
            return
        if id(p) in self._stepped:
            raise RuntimeError(
                "a second backward reached a parameter already updated in this step: an in-backward "
                f"optimizer consumes each gradient inside backward (accumulation_steps="
                f"{self.accumulation_steps}). Call step() after every accumulation_steps backward passes, "
                "raise accumulation_steps, or build the optimizer with fused=False to accumulate in .grad")
        self._held.add(id(p))
        self._micro[id(p)] += 1
        if self._micro[id(p)] < self.accumulation_steps:
            return  # keep accumulating into p.grad
        self._micro[id(p)] = 0
        self._reduce(p.grad)
        if self.max_grad_norm is None:
            self._consume(p, None)
        elif self.clipping == "deferred":
            self._ready[id(p)] = p
            if len(self._ready) == len(self._handles):
                self._clip_and_update(self._take_ready())
        elif self._clip_coef is None:
            raise RuntimeError(
                "max_grad_norm is set but no grad_norm_pass() ran for this step: run the norm pass "
                "first (`with opt.grad_norm_pass(): loss.backward(retain_graph=True)`, then "
                "`loss.backward()`), or use opt.backward(loss) which does both")
        else:
            self._consume(p, self._clip_coef)

    # ---- public API -------------------------------------------------------------------------------
    @property
    def updates_in_backward(self) -> bool:
        """True when fused: the update runs inside `backward(loss)` (a loop then skips its own clipping
        and must not wrap the model in DDP: the hooks reduce)."""
        return self.fused

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
        """Pass 1 of two-pass global-norm clipping: the backward run inside this block only records
        per-tensor gradient norms (of the reduced gradients under data parallelism; parameters
        untouched, gradients freed); on exit the clip coefficient min(1, max_grad_norm / (||G|| + 1e-6))
        is set for this step's update backward. Keep the graph with `retain_graph=True`."""
        if not self.fused or self.max_grad_norm is None or self.clipping != "two_pass":
            raise RuntimeError("grad_norm_pass() is only for fused=True with max_grad_norm set and "
                               f"clipping='two_pass' (got fused={self.fused}, max_grad_norm="
                               f"{self.max_grad_norm}, clipping={self.clipping!r}); otherwise clipping "
                               "happens without a norm pass")
        if self._stepped:
            raise RuntimeError("grad_norm_pass() must run before this step's update backward")
        self._sq_norms, self._clip_coef = [], None
        try:
            yield self
            norms = self._sq_norms
        finally:
            self._sq_norms = None
        total = self._sum_ranks(torch.stack(norms).sum() if norms else torch.zeros(())).sqrt()
        self._clip_coef = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, preceded by the norm pass under two-pass clipping (2 backward passes)."""
        if self.fused and self.max_grad_norm is not None and self.clipping == "two_pass" and self._handles:
            with self.grad_norm_pass():
                loss.backward(retain_graph=True)
        loss.backward()

    @torch.no_grad()
    def step(self, closure=None):
        """Complete the step. Fused: the hooks already updated; gradients still waiting for the global
        clipping norm, and any `.grad` no hook has seen (hooks paused or removed, set by hand), are
        updated here and freed. Unfused: update every parameter holding a `.grad` (kept, as torch.optim).
        Gradients of an unfinished accumulation are left alone."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._sq_norms is not None:
            raise RuntimeError("step() called inside grad_norm_pass()")
        unseen = [p for g in self.param_groups for p in g["params"]
                  if p.grad is not None and id(p) not in self._held]
        for p in unseen:  # in parameter order: the same collective order on every rank
            self._reduce(p.grad)
        todo = sorted(self._take_ready() + unseen, key=lambda q: self._order[id(q)])
        try:
            if todo:
                coef = None
                if self.max_grad_norm is not None:
                    if self._clip_coef is not None:
                        coef = self._clip_coef
                    elif self.clipping == "two_pass" and self._stepped:
                        raise RuntimeError("max_grad_norm is set but no grad_norm_pass() ran for this step")
                    else:  # every gradient of this step is here: a plain global-norm clip
                        coef = self._global_clip_coef(todo)
                for p in todo:
                    self._consume(p, coef)
            self._flush()
        finally:
            self._stepped.clear()
            self._clip_coef = None  # never reused by a later step
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim; also discards partial accumulations (their counts restart at 0)."""
        super().zero_grad(set_to_none)
        self._held.clear()
        self._ready = {}
        self._micro = dict.fromkeys(self._micro, 0)


__all__ = ["InBackwardOptimizer", "CLIPPINGS", "REDUCTIONS", "reduction_world_size"]
