"""Sharded data parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``), issue 21: the library API.

``wrap(method, model, optimizer)`` shards every decoder layer and then the root module of a LLaMA (or any model:
the root alone) with ``fully_shard``: each parameter becomes a DTensor split by rows (dim 0) over the ranks,
gradients arrive reduce-scattered (averaged) in this rank's rows, and the optimizer is rebuilt on the sharded
parameters as :class:`ShardedGaLoreAdamW`, whose state lives only for this rank's rows wherever the update
allows. On CUDA the mixed-precision policy computes in bf16 and reduces in fp32.

What each step reduces (besides FSDP's all-gather of parameters and reduce-scatter of gradients):

* AdamW ("full"), LoRA, low-rank, ReLoRA (``GaLoreAdamW`` without projection): element-wise on the local rows;
  no collective. State: exp_avg, exp_avg_sq of the local rows. ReLoRA's merge (every ``relora_every`` steps)
  adds s B_i A to this rank's rows W_i of each frozen weight: one all-gather of A (r x n) per adapter and merge;
  A is re-drawn whole from the merge's generator (the same on every rank) and each rank keeps its rows.
* Adafactor (transformers' class, as ``lrkit.methods`` runs it: external lr, scale_parameter, clip_threshold):
  per matrix and step an all-reduce of the column sums of G^2 (n floats) and an all-gather of the column
  factor (n floats; each rank keeps its part), a scalar all-reduce for the mean of the row factor; per
  parameter two scalar all-reduces (RMS of the update, RMS of the weight). Row factor, a vector's second
  moment and beta1's first moment: local rows.
* GaLore (``proj_type`` "std", "reverse_std", "left", "right", "full"; ``moments_on_switch`` "keep" or "reset";
  any ``proj_method`` but "online_pca"), for an m x n weight whose rows are sharded, G = [G_0; G_1; ...]:
    - at a projector refresh (step 0 and every T steps): one all-gather of G (m x n floats), then the projector
      exactly as one process computes it (same input, same factorisation); each rank then keeps its rows of P
      (m x r) and its torch.chunk part of Q's r rows;
    - right projection (Q, the "std" side when m >= n): one all-gather of Q (r x n) per step; R_i = G_i Q^T, the
      moments (rows_i x r) and the update N_i Q are local;
    - left projection (P, "std" when m < n): R = P^T G = sum_i P_i^T G_i, one all-reduce of r x n per step; each
      rank keeps the moments of its part of R's n columns, and one all-gather of N's columns (r x n) gives
      every rank the whole N for its update P_i N;
    - "full": the same with R = sum_i P_i^T G_i Q^T (r x r), plus Q's all-gather.

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`) go through ``torch.distributed.checkpoint``: each
rank writes its shards, and the optimizer state is described in one process's layout (:func:`state_layout`:
whole P, Q and moments as GaLoreAdamW holds them, AdaLomo's factors, each a DTensor over its sharded
dimension), with the param groups' hyper-parameters (the scheduled lr), so a checkpoint saved on any number of ranks
loads on any other, a single unsharded process included.

Optimizers that update inside backward (per-layer GaLore, AdaLomo, LOMO; fused or not): FSDP2 calls each sharded
parameter's post-accumulate-grad hook with its reduce-scattered, averaged gradient, so the hooks reduce no gradient
(:class:`ShardedInBackward`); global-norm clipping adds one scalar all-reduce (two-pass: in the norm pass;
deferred and unfused: once the step's gradients are in). AdaLomo per parameter and step: an all-reduce of the
column sums of G^2 (m floats) and an all-gather of the column factor (m floats; each rank keeps its part), and
three scalar all-reduces (mean of the row factor, RMS of the update, RMS of the weight). LOMO: element-wise.

Not in this slice (``wrap`` refuses each by name): GaLore 8-bit (bitsandbytes, CUDA only), the "online_pca"
projector, the "rotate" / "ldadam" moment transports, AdaLomo's rank-k / "svd" / "qr" second moments and
"global" / "layer" normalisations, Adafactor's relative_step. ``lrkit.train`` runs it with the
recipe key ``parallel: fsdp``.
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from transformers.optimization import Adafactor

from lrkit.optim.adalomo import AdaLomo
from lrkit.optim.galore import GaLoreAdamW, PerLayerGaLore, project_back, projector_side
from lrkit.optim.in_backward import InBackwardOptimizer
from lrkit.optim.lomo import Lomo

SUPPORTED_METHODS = ("full", "galore", "galore_per_layer", "lora", "low_rank", "relora", "adalomo", "lomo",
                     "adafactor")
NOT_YET = {"galore_8bit": "bitsandbytes' 8-bit states are CUDA-only and not DTensor-aware"}


def local(t):
    """This rank's rows of a DTensor (the tensor itself otherwise); shares storage with it."""
    return t.to_local() if isinstance(t, DTensor) else t


def chunk_range(total: int, world: int, rank: int) -> tuple[int, int]:
    """(first index, count) of ``rank``'s part of ``total`` items split as torch.chunk (and FSDP2's dim-0
    sharding) splits them: ceil(total / world) a rank, the last ranks possibly fewer or none."""
    chunk = -(-total // world)
    start = min(rank * chunk, total)
    return start, min(chunk, total - start)


def row_range(p: DTensor) -> tuple[int, int]:
    """(first row, number of rows) of this rank's shard of a dim-0-sharded DTensor (FSDP2's placement)."""
    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"Invalid placements: {p.placements} (expected (Shard(0),), FSDP2's)")
    return chunk_range(p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank())


def gather_rows(t: torch.Tensor, total: int, group) -> torch.Tensor:
    """The whole ``total``-row tensor from every rank's rows ``t`` (split by :func:`chunk_range`): one
    all-gather of ceil(total / world) rows per rank (padded to equal size, then trimmed)."""
    w = dist.get_world_size(group)
    chunk = -(-total // w)
    pad = torch.zeros((chunk,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    pad[:t.shape[0]] = t
    out = [torch.empty_like(pad) for _ in range(w)]
    dist.all_gather(out, pad, group=group)
    return torch.cat(out)[:total]


class ShardedGaLoreAdamW(GaLoreAdamW):
    """``lrkit.optim.GaLoreAdamW`` on FSDP2's row-sharded parameters (module docstring: what each step reduces).
    The arithmetic is GaLoreAdamW's, op for op, on this rank's rows; a parameter that is not a DTensor runs
    GaLoreAdamW's own update."""

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "rank" in group:
            if group["proj_method"] == "online_pca":
                raise NotImplementedError("proj_method 'online_pca' under FSDP2 (issue 21): not supported yet")
            if group["moments_on_switch"] not in ("keep", "reset"):
                raise NotImplementedError(f"moments_on_switch {group['moments_on_switch']!r} under FSDP2 "
                                          "(issue 21): supported 'keep', 'reset'")

    def _update(self, p, group, index, grad=None):
        if not isinstance(p, DTensor):
            return super()._update(p, group, index, grad)
        state = self.state[p]
        if not state:
            state["step"], state["moment_step"] = 0, 0
        g = local(p.grad if grad is None else grad).float()
        w = local(p)
        pg, world, me = p.device_mesh.get_group(), p.device_mesh.size(), p.device_mesh.get_local_rank()
        side = projector_side(p.shape, group["proj_type"]) if self.is_projected(p, group) else None
        cols = None  # left / full: this rank's columns of R (its moments), the rest on the other ranks
        if side is not None:
            t0 = time.perf_counter()
            due = state["step"] % group["update_proj_gap"] == 0 and group["switch_subspace"]
            if ("P" not in state and "Q" not in state) or due:  # the one process's projector, from the whole G
                self._refresh_projector(p, group, state, gather_rows(g, p.shape[0], pg), index)
                start, rows = row_range(p)
                if "P" in state:  # keep this rank's rows of P only: P_i is all its update needs
                    state["P"] = state["P"][start:start + rows].contiguous()
                if "Q" in state:  # keep this rank's rows of Q (r x n): all-gathered each step
                    a, k = chunk_range(state["Q"].shape[0], world, me)
                    state["Q"] = state["Q"][a:a + k].contiguous()
            self.projector_time_s += time.perf_counter() - t0
            P = state["P"].float() if "P" in state else None
            Q = gather_rows(state["Q"], group["rank"], pg).float() if "Q" in state else None
            if side == "right":
                g = g @ Q.t()  # local rows of G Q^T
            else:  # P^T G (Q^T) = sum over ranks of P_i^T G_i (Q^T): one all-reduce, then this rank's columns
                R = P.t() @ g
                if Q is not None:
                    R = R @ Q.t()
                dist.all_reduce(R, group=pg)
                cols = chunk_range(R.shape[1], world, me)
                g = R[:, cols[0]:cols[0] + cols[1]]
        m, v, step_size = self._moments(state, group, g, p.dtype)
        norm_grad = m / v.sqrt().add_(group["eps"])
        if cols is not None:  # every rank's columns of N: one all-gather (as rows of N^T)
            norm_grad = gather_rows(norm_grad.t().contiguous(), R.shape[1], pg).t()
        if side is not None:
            norm_grad = project_back(norm_grad, P, Q, group["scale"])
        self._apply(w, norm_grad, step_size, group)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (tensors only)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values()
                   if torch.is_tensor(v))


# ---- optimizers that update inside backward: FSDP2 calls each sharded parameter's post-accumulate-grad hook
# with its reduce-scattered (already averaged) gradient; what needs the whole parameter is reduced here.
class ShardedInBackward(InBackwardOptimizer):
    """The hook base (lrkit/optim/in_backward.py) on FSDP2's sharded parameters: no gradient all-reduce
    (FSDP2's reduce-scatter averaged it), global-norm clipping from the local squared norms plus one all-reduce
    of a scalar (two-pass: in the norm pass; deferred / unfused: when the step's gradients are all there), and
    the update applied to this rank's rows (``_update_param`` receives the local gradient)."""

    def _reduce(self, grad):
        return None  # FSDP2 reduce-scattered and averaged it before the hook

    def _grad(self, p):
        return local(p.grad)

    def _sum_ranks(self, t):
        return _all_sum(t, self.param_groups[0]["params"][0])  # every rank's squared norms: the global norm

    def _global_norm(self, norms):
        return self._sum_ranks(norms.square().sum()).sqrt()


def _group(p):
    return p.device_mesh.get_group()


def _all_sum(t, p):
    dist.all_reduce(t, group=_group(p))
    return t


class ShardedLomo(ShardedInBackward, Lomo):
    """LOMO on this rank's rows (element-wise: no collective beyond the clipping norm)."""

    def _update(self, p, g, group):
        return Lomo._update(self, local(p), g, group)


class ShardedAdaLomo(ShardedInBackward, AdaLomo):
    """AdaLomo (rank-1 factored second moment, "grouped" normalisation) on this rank's rows of an n x m weight.
    Per parameter and step: the column statistic mean_rows(G^2 + eps1) needs one all-reduce of m floats (each
    rank keeps its torch.chunk part of c, then an all-gather of m floats), mean(r) one scalar, the grouped
    normalisation RMS(U) one scalar and the relative step RMS(theta) one scalar; the row statistic r, the
    vectors' v and the update are local."""

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        if g["normalization"] not in ("grouped", "none") or g["second_moment"] not in ("nmf", "full") \
                or (g["second_moment"] == "nmf" and g["factor_rank"] != 1):
            raise NotImplementedError("AdaLomo under FSDP2 (issue 21): supported normalization 'grouped' / 'none' "
                                      "and second_moment 'nmf' at factor_rank 1 or 'full'")

    def _update(self, p, g, group):
        if not isinstance(p, DTensor):
            return AdaLomo._update(self, p, g, group)
        state = self.state[p]
        shapes = self._state_shapes(p, group)
        w = local(p)
        if not state:
            state["step"] = 0
            for name, shape in shapes.items():  # v, r: this rank's rows; c: its torch.chunk part of the columns
                state[name] = _local_zeros(shape, 0, p).float()
        t = state["step"] + 1
        beta2 = 1.0 - t ** group["decay_rate"]
        S = g.square().add_(group["eps"][0])
        if "v" in state:
            U = state["v"].mul_(beta2).add_(S, alpha=1 - beta2).rsqrt().mul_(g)
        else:
            n, m = p.shape
            r = state["r"].mul_(beta2).add_(S.mean(-1), alpha=1 - beta2)
            col = _all_sum(S.sum(-2), p).div_(n)  # mean over all n rows
            a, k = chunk_range(m, p.device_mesh.size(), p.device_mesh.get_local_rank())
            state["c"].mul_(beta2).add_(col[a:a + k], alpha=1 - beta2)
            c = gather_rows(state["c"], m, _group(p))
            del S
            mean_r = _all_sum(r.sum(), p) / n
            U = (r / mean_r).rsqrt_().unsqueeze(-1).mul(c.unsqueeze(-2).rsqrt()).mul_(g)
        state["step"] += 1
        N = p.numel()
        if group["normalization"] != "none":
            rms = _all_sum(U.square().sum(), p).div_(N).sqrt_()
            U.div_((rms / group["clip_threshold"]).clamp(min=1.0))
        w32 = w.to(torch.float32)
        rms_w = _all_sum(w32.square().sum(), p).div_(N).sqrt_()
        eta = group["lr"] * rms_w.clamp(min=group["eps"][1])
        if group["weight_decay"]:
            w32.mul_(1 - eta * group["weight_decay"])
        w32.sub_(U.mul_(eta))
        if w32 is not w:
            w.copy_(w32)


class ShardedAdafactor(Adafactor):
    """transformers' Adafactor (the AdaLomo paper's baseline; ``lrkit.methods`` runs it with an external lr and
    scale_parameter) on this rank's rows, op for op as its ``step``. Per matrix and step: the column statistic
    mean_rows(G^2 + eps1) needs one all-reduce of n floats (each rank keeps its torch.chunk part of the column
    factor, then an all-gather of n floats), the mean of the row factor one scalar; per parameter the RMS of the
    update (clip_threshold) and the RMS of the weight (scale_parameter) one scalar each. The row factor, a vector's
    second moment, beta1's first moment and the update are local."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if group["relative_step"]:
                raise NotImplementedError("Adafactor's relative_step under FSDP2: not supported (lrkit.methods "
                                          "runs it with an external lr)")
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not isinstance(p, DTensor):
                    raise TypeError(f"Invalid parameter of shape {tuple(p.shape)}: a {type(p).__name__} (expected "
                                    "FSDP2's DTensor: lrkit.fsdp.wrap shards every parameter of the model)")
                self._sharded_update(p, group)
        return loss

    def _sharded_update(self, p, group):
        grad, w = local(p.grad), local(p)
        grad = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
        state = self.state[p]
        factored, first_moment = self._get_options(group, p.shape)
        if p.dim() > 2:
            raise NotImplementedError(f"Adafactor under FSDP2 on a {p.dim()}-D parameter: not supported (matrices "
                                      "and vectors only)")
        if not state:
            state["step"] = 0
            if first_moment:
                state["exp_avg"] = torch.zeros_like(grad)
            if factored:  # its rows of the row factor; its torch.chunk part of the column factor
                state["exp_avg_sq_row"] = _local_zeros(p.shape[:-1], 0, p).to(grad)
                state["exp_avg_sq_col"] = _local_zeros(p.shape[-1:], 0, p).to(grad)
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
        w32 = w.float() if w.dtype in (torch.float16, torch.bfloat16) else w
        state["step"] += 1
        state["RMS"] = _all_sum(w32.square().sum(), p).div_(p.numel()).sqrt_()
        lr = self._get_lr(group, state)
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        update = grad ** 2 + group["eps"][0]
        if factored:
            n_rows, n_cols = p.shape
            row = state["exp_avg_sq_row"].mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col_mean = _all_sum(update.sum(dim=-2), p).div_(n_rows)  # mean over all rows
            a, k = chunk_range(n_cols, p.device_mesh.size(), p.device_mesh.get_local_rank())
            state["exp_avg_sq_col"].mul_(beta2t).add_(col_mean[a:a + k], alpha=1.0 - beta2t)
            col = gather_rows(state["exp_avg_sq_col"], n_cols, _group(p))
            row_mean = _all_sum(row.sum(), p).div_(n_rows)
            update = (row / row_mean).rsqrt_().unsqueeze(-1).mul(col.unsqueeze(-2).rsqrt()).mul_(grad)
        else:
            update = state["exp_avg_sq"].mul_(beta2t).add_(update, alpha=1.0 - beta2t).rsqrt().mul_(grad)
        rms = _all_sum(update.square().sum(), p).div_(p.numel()).sqrt_()
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if first_moment:
            update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
        if group["weight_decay"] != 0:
            w32.add_(w32, alpha=-group["weight_decay"] * lr)
        w32.add_(-update)
        if w32 is not w:
            w.copy_(w32)


class ShardedPerLayerGaLore(ShardedInBackward, PerLayerGaLore, ShardedGaLoreAdamW):
    """Per-layer GaLore on FSDP2: the hook base above, ShardedGaLoreAdamW's update of one parameter."""


def _shard_modules(model: torch.nn.Module, mp_policy) -> None:
    from torch.distributed.fsdp import fully_shard

    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    layers = getattr(getattr(model, "model", None), "layers", None)  # a Hugging Face decoder's blocks
    for layer in layers or ():
        fully_shard(layer, **kw)
    fully_shard(model, **kw)


def wrap(method: str, model: torch.nn.Module, optimizer, callbacks=()):
    """Shard ``model`` with FSDP2 and rebuild ``optimizer`` (the GaLoreAdamW, PerLayerGaLore, AdaLomo, Lomo or
    Adafactor ``lrkit.methods.prepare`` built for ``method``, before any step; its hooks move to the sharded
    parameters) as its sharded class; ``callbacks`` that hold the optimizer (ReLoRA's merge) are pointed at the
    new one. Returns (model, optimizer). Needs an initialised process group (``lrkit.distributed.init()`` under
    torchrun). Call after ``model.to(device)``."""
    if method in NOT_YET:
        raise NotImplementedError(f"method {method!r} under FSDP2: not supported yet ({NOT_YET[method]}; issue 21); "
                                  f"supported: {SUPPORTED_METHODS}")
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"Invalid method: {method!r} (expected one of {SUPPORTED_METHODS})")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP2 needs an initialised process group: call lrkit.distributed.init() under torchrun")
    if type(optimizer) not in _SHARDED:
        raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} (expected one lrkit.methods.prepare builds "
                        f"for {SUPPORTED_METHODS}: {sorted(c.__name__ for c in _SHARDED)})")
    if optimizer.state:
        raise ValueError("the optimizer has state already: wrap before the first step")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(dict(g), [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]
    mp = None
    if next(model.parameters()).device.type == "cuda":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if isinstance(optimizer, InBackwardOptimizer):
        optimizer.remove_hooks()  # the old parameters leave the model
    _shard_modules(model, mp)
    sharded = dict(model.named_parameters())
    new_groups = [g | {"params": [sharded[n] for n in ns]} for g, ns in groups]
    kw = dict(optimizer.defaults)
    if isinstance(optimizer, GaLoreAdamW):
        kw["seed"] = optimizer.seed
    if isinstance(optimizer, InBackwardOptimizer):  # FSDP2 averaged the gradient: the hooks reduce nothing
        kw |= dict(max_grad_norm=optimizer.max_grad_norm, accumulation_steps=optimizer.accumulation_steps,
                   clipping=optimizer.clipping, reduction="none")
        if not isinstance(optimizer, PerLayerGaLore):
            kw["fused"] = optimizer.fused
    new = _SHARDED[type(optimizer)](new_groups, **kw)
    for cb in callbacks:
        if getattr(cb, "optimizer", None) is optimizer:
            cb.optimizer = new
    return model, new


_SHARDED = {GaLoreAdamW: ShardedGaLoreAdamW, PerLayerGaLore: ShardedPerLayerGaLore, AdaLomo: ShardedAdaLomo,
            Lomo: ShardedLomo, Adafactor: ShardedAdafactor}


# ---- checkpoints: the optimizer state in one process's layout -----------------------------------------------
def state_layout(optimizer, p, group) -> dict:
    """{state key: (global shape, the dimension sharded over the ranks)} of a parameter's tensor state, as one
    unsharded optimizer holds it (global shapes); under the sharded classes each rank holds the torch.chunk part
    of that dimension (module docstring). GaLoreAdamW (and per-layer GaLore): moments and projectors in the
    parameter's dtype; AdaLomo: its fp32 factors (r: rows, c: columns, v: rows); LOMO: none."""
    if isinstance(optimizer, Lomo):
        return {}
    if isinstance(optimizer, Adafactor):
        factored, first_moment = optimizer._get_options(group, p.shape)
        out = {"exp_avg": (tuple(p.shape), 0)} if first_moment else {}
        if factored:
            return out | {"exp_avg_sq_row": (tuple(p.shape[:-1]), 0), "exp_avg_sq_col": (tuple(p.shape[-1:]), 0)}
        return out | {"exp_avg_sq": (tuple(p.shape), 0)}
    if isinstance(optimizer, AdaLomo):
        return {k: (tuple(shape), 0) for k, shape in optimizer._state_shapes(p, group).items()}
    if not optimizer.is_projected(p, group):
        return {"exp_avg": (tuple(p.shape), 0), "exp_avg_sq": (tuple(p.shape), 0)}
    (m, n), r = p.shape, group["rank"]
    side = projector_side(p.shape, group["proj_type"])
    moments = {"right": ((m, r), 0), "left": ((r, n), 1), "full": ((r, r), 1)}[side]
    out = {"exp_avg": moments, "exp_avg_sq": moments}
    if side in ("left", "full"):
        out["P"] = ((m, r), 0)
    if side in ("right", "full"):
        out["Q"] = ((r, n), 0)
    return out


def _local_zeros(shape, dim, like):
    """Zeros of this rank's part of ``shape`` along ``dim`` (the whole when ``like`` is not a DTensor)."""
    shape = list(shape)
    if isinstance(like, DTensor):
        shape[dim] = chunk_range(shape[dim], like.device_mesh.size(), like.device_mesh.get_local_rank())[1]
    return torch.zeros(shape, dtype=like.dtype, device=local(like).device)


def optimizer_state_dict(model: torch.nn.Module, optimizer: GaLoreAdamW) -> dict:
    """{parameter name: {state key: tensor or int}} in one process's layout (:func:`state_layout`): under FSDP2
    each tensor is a DTensor of its global shape, sharded along its dimension; state missing before the first
    step is created (zeros, step 0), so a fresh optimizer can receive a checkpoint."""
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = {}
    for name, p in model.named_parameters():
        if id(p) not in where:
            continue
        group, state = where[id(p)], optimizer.state[p]
        counters = ("step", "moment_step") if isinstance(optimizer, GaLoreAdamW) else ("step",)
        if isinstance(optimizer, Lomo):
            counters = ()
        for k in counters:
            state.setdefault(k, 0)
        entry = {k: state[k] for k in counters}
        low = p.dtype in (torch.float16, torch.bfloat16)  # AdaLomo's factors, Adafactor's state of such: fp32
        dtype = torch.float32 if isinstance(optimizer, AdaLomo) or (isinstance(optimizer, Adafactor) and low) \
            else p.dtype
        for key, (shape, dim) in state_layout(optimizer, p, group).items():
            if key not in state:
                state[key] = _local_zeros(shape, dim, p).to(dtype)
            t = state[key]
            if isinstance(p, DTensor):
                stride = torch.empty(shape, device="meta").stride()
                t = DTensor.from_local(t, p.device_mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                                       stride=stride)
            entry[key] = t
        out[name] = entry
    return out


def _check_checkpointable(optimizer) -> None:
    if not isinstance(optimizer, (GaLoreAdamW, AdaLomo, Lomo, Adafactor)):
        raise NotImplementedError(f"sharded checkpoints of {type(optimizer).__name__}: not supported (expected the "
                                  "optimizers lrkit.fsdp.wrap builds: GaLoreAdamW, PerLayerGaLore, AdaLomo, Lomo, "
                                  "Adafactor)")


def save_checkpoint(path, model: torch.nn.Module, optimizer: GaLoreAdamW, extra: dict | None = None) -> None:
    """Write model parameters, optimizer state (:func:`optimizer_state_dict`) and ``extra`` (small JSON values,
    e.g. the step) to the directory ``path`` with torch.distributed.checkpoint: every rank its shards."""
    import json

    import torch.distributed.checkpoint as dcp

    _check_checkpointable(optimizer)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]  # lr as scheduled
    dcp.save({"model": model.state_dict(), "optim": optimizer_state_dict(model, optimizer),
              "groups": json.dumps(groups), "extra": json.dumps(extra or {})}, checkpoint_id=str(path))


def load_checkpoint(path, model: torch.nn.Module, optimizer: GaLoreAdamW) -> dict:
    """Read a :func:`save_checkpoint` directory into ``model`` and ``optimizer`` (either sharded, on any number
    of ranks, or one unsharded process), in place; returns its ``extra``."""
    import json

    import torch.distributed.checkpoint as dcp

    _check_checkpointable(optimizer)
    sd = {"model": model.state_dict(), "optim": optimizer_state_dict(model, optimizer), "groups": "", "extra": ""}
    dcp.load(sd, checkpoint_id=str(path))
    model.load_state_dict(sd["model"])
    saved = json.loads(sd["groups"])
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(f"Invalid checkpoint {path}: {len(saved)} param groups (expected {len(optimizer.param_groups)})")
    for group, values in zip(optimizer.param_groups, saved):  # the hyper-parameters as they were (lr: scheduled)
        for k, v in values.items():
            group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
    for name, p in model.named_parameters():
        if name not in sd["optim"]:
            continue
        state = optimizer.state[p]
        for key, v in sd["optim"][name].items():
            if torch.is_tensor(v):
                local(state[key]).copy_(local(v))
            else:
                state[key] = v
    return json.loads(sd["extra"])


def full_parameters(model: torch.nn.Module) -> dict:
    """{name: the whole parameter} on every rank (all-gathers each sharded parameter)."""
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


# ---- per-GPU memory of the paper profiles (analytic: weights, gradients, optimizer state; no activations) --------
def per_gpu_memory(size: str, method: str, world: int, rank: int | None = None, vocab_size: int = 32000) -> dict:
    """Bytes per GPU of a LLaMA of ``size`` trained with ``method`` under DDP (everything on every GPU) and under
    FSDP2 on ``world`` GPUs (weights, gradients and state divided by ``world``, plus the transient whole copy of
    the largest FSDP unit's weights and gradients: one decoder layer, or the root's embedding, head and norm).
    Methods: "adalomo" / "lomo" (the LOMO paper's accounting, ``lrkit.memory.recipe_memory_bytes``: fp16
    weights, fused so no gradient buffer, AdaLomo's fp32 factors), "galore" (bf16 weights, gradients and state,
    as GaLore's Table 6; ``rank``), "full" (AdamW, the same)."""
    from lrkit import memory
    from lrkit.models import LLAMA_SIZES
    from lrkit.optim.galore import galore_state_numel

    shapes = [s for _, s in memory.llama_weight_shapes(size, vocab_size)]
    h, i, _, _ = LLAMA_SIZES[size]
    unit = max(4 * h * h + 3 * h * i + 2 * h, 2 * vocab_size * h + h)  # a decoder layer, or the root's tensors
    if method in ("adalomo", "lomo"):
        rec = memory.recipe_memory_bytes(size, method, vocab_size)
        params, grads, state, width = rec["param_bytes"], rec["grad_bytes"], rec["state_bytes"], 2
        fsdp_grads = 0  # fused: each reduce-scattered shard is consumed by its hook at once
    elif method in ("galore", "full"):
        width = 2
        n = sum(math.prod(s) for s in shapes)
        params, grads = width * n, width * n
        state = width * sum(galore_state_numel(s, rank if method == "galore" else None) for s in shapes)
        fsdp_grads = grads / world
    else:
        raise ValueError(f"Invalid method: {method!r} (expected 'adalomo', 'lomo', 'galore' or 'full')")
    transient = 2 * width * unit  # one unit's gathered weights and its unsharded gradients
    ddp = params + grads + state
    fsdp = params / world + fsdp_grads + state / world + transient
    return {"size": size, "method": method, "rank": rank, "world": world, "ddp_bytes": ddp, "fsdp_bytes": fsdp,
            "params_bytes": params, "grads_bytes": grads, "state_bytes": state, "transient_bytes": transient}


def paper_memory_table(world: int = 8):
    """The paper profiles' per-GPU memory (:func:`per_gpu_memory`) beside the papers' own figures, where a paper
    reports the quantity (the LOMO paper's LLaMA-7B training memory, activations included; GaLore's Table 6
    optimizer state on one GPU)."""
    import pandas as pd

    from lrkit.experiments.adalomo import LOMO_PAPER_7B_GIB
    from lrkit.experiments.galore import PAPER

    gib = 2 ** 30
    rows = []
    for size, method, rank, paper, source in (
            ("7b", "adalomo", None, None, "AdaLomo paper: no total memory figure sourced offline"),
            ("7b", "lomo", None, LOMO_PAPER_7B_GIB["lomo"], "LOMO paper Table 1: one GPU, GB, activations included"),
            ("1b", "full", None, PAPER["state_gb"]["1b"]["full"], "GaLore Table 6: optimizer state, GB"),
            ("1b", "galore", 512, PAPER["state_gb"]["1b"]["galore"], "GaLore Table 6: optimizer state, GB"),
            ("7b", "galore", 1024, None, "GaLore: no 7B state figure in Table 6")):
        m = per_gpu_memory(size, method, world, rank)
        rows.append({"model": f"LLaMA {size.upper()}", "method": method + (f" r={rank}" if rank else ""),
                     "state_GB_one_GPU": m["state_bytes"] / 1e9, "DDP_GiB_per_GPU": m["ddp_bytes"] / gib,
                     f"FSDP2_x{world}_GiB_per_GPU": m["fsdp_bytes"] / gib, "paper_value": paper, "paper_source": source})
    return pd.DataFrame(rows)


__all__ = ["wrap", "ShardedGaLoreAdamW", "full_parameters", "local", "row_range", "gather_rows",
           "chunk_range", "state_layout",
           "optimizer_state_dict", "save_checkpoint", "load_checkpoint", "per_gpu_memory",
           "paper_memory_table", "SUPPORTED_METHODS"]


if __name__ == "__main__":  # python -m lrkit.fsdp: the paper profiles' per-GPU memory at 8 GPUs
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 2):
        print(paper_memory_table(8).to_string(index=False))
