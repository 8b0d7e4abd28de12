"""Sharded data parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``), issue 21 -- first slice.

``wrap(method, model, optimizer)`` shards every decoder layer and then the root module of a LLaMA (or any model:
the root alone) with ``fully_shard``: each parameter becomes a DTensor split by rows (dim 0) over the ranks,
gradients arrive reduce-scattered (averaged) in this rank's rows, and the optimizer is rebuilt on the sharded
parameters as :class:`ShardedGaLoreAdamW`, whose state lives only for this rank's rows wherever the update
allows. On CUDA the mixed-precision policy computes in bf16 and reduces in fp32.

What each step reduces (besides FSDP's all-gather of parameters and reduce-scatter of gradients):

* AdamW ("full"), LoRA, low-rank (``GaLoreAdamW`` without projection): element-wise on the local rows; no
  collective. State: exp_avg, exp_avg_sq of the local rows.
* GaLore (``proj_type`` "std", "reverse_std", "left", "right", "full"; ``moments_on_switch`` "keep" or "reset";
  any ``proj_method`` but "online_pca"), for an m x n weight whose rows are sharded, G = [G_0; G_1; ...]:
    - at a projector refresh (step 0 and every T steps): one all-gather of G (m x n floats), then the projector
      exactly as one process computes it (same input, same factorisation); P (m x r) and Q (r x n) are held
      whole on every rank (r (m + n) floats, replicated);
    - right projection (Q, the "std" side when m >= n): R_i = G_i Q^T is local, and so are the moments
      (rows_i x r) and the update (N_i Q): no collective;
    - left projection (P, "std" when m < n): R = P^T G = sum_i P_i^T G_i, one all-reduce of r x n floats per
      step (P_i: this rank's rows of P); the moments are r x n, the same on every rank; the update P_i N is local;
    - "full": R = sum_i P_i^T G_i Q^T, one all-reduce of r x r.

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`) go through ``torch.distributed.checkpoint``: each
rank writes its shards, and the optimizer state is described in one process's layout (whole P, Q and moments as
GaLoreAdamW holds them, each a DTensor over its sharded dimension), so a checkpoint saved on any number of ranks
loads on any other, a single unsharded process included.

Not in this slice (``wrap`` refuses them by name): the in-backward optimizers (per-layer GaLore, AdaLomo, LOMO),
Adafactor (its column statistics need an all-reduce), ReLoRA (merges into sharded weights), GaLore 8-bit, the
"online_pca" projector and the "rotate" / "ldadam" moment transports.
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from lrkit.optim.galore import GaLoreAdamW, project_back, projector_side

SUPPORTED_METHODS = ("full", "galore", "lora", "low_rank")
NOT_YET = {"galore_per_layer": "updates inside backward", "adalomo": "updates inside backward",
           "lomo": "updates inside backward", "adafactor": "its column statistics need an all-reduce",
           "relora": "it merges adapters into sharded weights", "galore_8bit": "8-bit states are CUDA-only"}


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
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(g, dtype=p.dtype)
            state["exp_avg_sq"] = torch.zeros_like(g, dtype=p.dtype)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        m, v = exp_avg.float(), exp_avg_sq.float()
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["moment_step"] += 1
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        if m is not exp_avg:
            exp_avg.copy_(m)
            exp_avg_sq.copy_(v)
        step_size = group["lr"]
        if group["correct_bias"]:
            t = state["moment_step"]
            step_size = step_size * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
        norm_grad = m / v.sqrt().add_(group["eps"])
        if cols is not None:  # every rank's columns of N: one all-gather (as rows of N^T)
            norm_grad = gather_rows(norm_grad.t().contiguous(), R.shape[1], pg).t()
        if side is not None:
            norm_grad = project_back(norm_grad, P, Q, group["scale"])
        w.add_(norm_grad.to(w.dtype), alpha=-step_size)
        if group["weight_decay"] > 0.0:
            w.add_(w, alpha=-group["lr"] * group["weight_decay"])

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (tensors only)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values()
                   if torch.is_tensor(v))


def _shard_modules(model: torch.nn.Module, mp_policy) -> None:
    from torch.distributed.fsdp import fully_shard

    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    layers = getattr(getattr(model, "model", None), "layers", None)  # a Hugging Face decoder's blocks
    for layer in layers or ():
        fully_shard(layer, **kw)
    fully_shard(model, **kw)


def wrap(method: str, model: torch.nn.Module, optimizer: GaLoreAdamW):
    """Shard ``model`` with FSDP2 and rebuild ``optimizer`` (a ``GaLoreAdamW`` from ``lrkit.methods.prepare``,
    before any step) on its sharded parameters; returns (model, optimizer). Needs an initialised process
    group (``lrkit.distributed.init()`` under torchrun). Call after ``model.to(device)``."""
    if method in NOT_YET:
        raise NotImplementedError(f"method {method!r} under FSDP2: not supported yet ({NOT_YET[method]}; issue 21); "
                                  f"supported: {SUPPORTED_METHODS}")
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"Invalid method: {method!r} (expected one of {SUPPORTED_METHODS})")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP2 needs an initialised process group: call lrkit.distributed.init() under torchrun")
    if type(optimizer) is not GaLoreAdamW:
        raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} (expected lrkit's GaLoreAdamW, as "
                        f"lrkit.methods.prepare builds for {SUPPORTED_METHODS})")
    if optimizer.state:
        raise ValueError("the optimizer has state already: wrap before the first step")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(dict(g), [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]
    mp = None
    if next(model.parameters()).device.type == "cuda":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    _shard_modules(model, mp)
    sharded = dict(model.named_parameters())
    new_groups = [g | {"params": [sharded[n] for n in ns]} for g, ns in groups]
    return model, ShardedGaLoreAdamW(new_groups, **optimizer.defaults, seed=optimizer.seed)


# ---- checkpoints: the optimizer state in one process's layout -----------------------------------------------
def state_layout(optimizer: GaLoreAdamW, p, group) -> dict:
    """{state key: (global shape, the dimension sharded over the ranks)} of a parameter's tensor state, as one
    unsharded GaLoreAdamW holds it (global shapes); under ShardedGaLoreAdamW each rank holds the torch.chunk
    part of that dimension (module docstring)."""
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
        state.setdefault("step", 0)
        state.setdefault("moment_step", 0)
        entry = {"step": state["step"], "moment_step": state["moment_step"]}
        for key, (shape, dim) in state_layout(optimizer, p, group).items():
            if key not in state:
                state[key] = _local_zeros(shape, dim, p)
            t = state[key]
            if isinstance(p, DTensor):
                stride = torch.empty(shape, device="meta").stride()
                t = DTensor.from_local(t, p.device_mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                                       stride=stride)
            entry[key] = t
        out[name] = entry
    return out


def save_checkpoint(path, model: torch.nn.Module, optimizer: GaLoreAdamW, extra: dict | None = None) -> None:
    """Write model parameters, optimizer state (:func:`optimizer_state_dict`) and ``extra`` (small JSON values,
    e.g. the step) to the directory ``path`` with torch.distributed.checkpoint: every rank its shards."""
    import json

    import torch.distributed.checkpoint as dcp

    dcp.save({"model": model.state_dict(), "optim": optimizer_state_dict(model, optimizer),
              "extra": json.dumps(extra or {})}, checkpoint_id=str(path))


def load_checkpoint(path, model: torch.nn.Module, optimizer: GaLoreAdamW) -> dict:
    """Read a :func:`save_checkpoint` directory into ``model`` and ``optimizer`` (either sharded, on any number
    of ranks, or one unsharded process), in place; returns its ``extra``."""
    import json

    import torch.distributed.checkpoint as dcp

    sd = {"model": model.state_dict(), "optim": optimizer_state_dict(model, optimizer), "extra": ""}
    dcp.load(sd, checkpoint_id=str(path))
    model.load_state_dict(sd["model"])
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


__all__ = ["wrap", "ShardedGaLoreAdamW", "full_parameters", "local", "row_range", "gather_rows",
           "chunk_range", "state_layout",
           "optimizer_state_dict", "save_checkpoint", "load_checkpoint", "SUPPORTED_METHODS"]
