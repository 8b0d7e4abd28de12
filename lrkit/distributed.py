"""Data-parallel training under ``torchrun``: one process per device, each seeing a shard of every global batch.

The training loop needs four calls (single-process runs go through the same calls, which then do nothing)::

    setup = distributed.init()                       # from torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    model.to(setup.device)
    model, opt = distributed.wrap(method, model, opt)
    for global_batch in ...:                         # the same global batch on every rank (same seed)
        batch = distributed.shard(global_batch)      # this rank's rows
        ... backward, step ...
        log(distributed.mean(loss))                  # the loss averaged over ranks (logging only)
    if setup.is_main: save(...)                      # or distributed.is_main()

How each method's gradient is reduced (``wrap``):

* step()-based optimizers (AdamW "full", GaLore, LoRA, low-rank, ReLoRA, Adafactor, GaLore 8-bit, and
  AdaLomo/LOMO built with ``fused=False``): the model is wrapped in
  ``torch.nn.parallel.DistributedDataParallel``, whose bucketed all-reduce averages ``.grad`` during
  backward; ``step()`` then sees the same gradient on every rank. GaLore's projector is therefore computed
  from the reduced gradient, identically on every rank: SVD is deterministic for the same input on the
  same build, and randomized SVD / random projections draw from a generator seeded by (seed, parameter
  index, step), not by the rank. A loop's ``clip_grad_norm_`` after backward clips the reduced gradient.
* optimizers that update inside backward (per-layer GaLore, AdaLomo, LOMO: ``updates_in_backward``): the
  post-accumulate-grad hook fires *before* DDP's all-reduce, so these are **not** wrapped; their hook base
  (`lrkit/optim/in_backward.py`) all-reduces each final gradient itself before clipping and update, and
  ``wrap`` broadcasts rank 0's parameters and buffers so every rank starts from the same weights (what
  DDP does at construction). Clipping uses the norm of the reduced gradient.

Gradient accumulation is correct under both (averaging is linear); under DDP ``no_sync(model, last)``
skips the all-reduce of the micro-batches before the last one, as an optimisation. In-backward optimizers
reduce only the accumulated gradient, on the last micro-batch, by themselves.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lrkit.optim.in_backward import InBackwardOptimizer

# the names lrkit.methods.prepare takes, plus the variants the notebooks compare under their own name
WRAPPABLE_METHODS = ("full", "galore", "galore_per_layer", "galore_8bit", "lora", "low_rank", "relora",
                     "adalomo", "lomo", "adafactor")


@dataclass(frozen=True)
class Setup:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(f"torchrun sets {name}; it is missing from the environment "
                               "(launch with torchrun, or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int)") from None


def init(backend: str | None = None, timeout_s: float = 1800.0) -> Setup:
    """Join the process group torchrun describes in the environment and pick this rank's device.

    Without ``WORLD_SIZE`` (plain ``python``) or with ``WORLD_SIZE=1`` nothing is initialised and the
    setup is a single process on CUDA when available, else CPU. Backend: NCCL when CUDA is available
    (device ``cuda:LOCAL_RANK``), gloo on CPU; ``backend`` overrides it. Calling ``init`` again returns
    the same setup."""
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"Invalid WORLD_SIZE: {world} (expected an int >= 1)")
    cuda = torch.cuda.is_available()
    if world == 1 and not (dist.is_available() and dist.is_initialized()):
        return Setup(0, 1, 0, torch.device("cuda" if cuda else "cpu"), None)
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise ValueError(f"Invalid RANK: {rank} (expected an int in [0, {world - 1}] for WORLD_SIZE={world})")
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"Invalid backend: {backend!r} (expected 'nccl' or 'gloo')")
    if backend == "nccl":
        if not cuda or local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"backend 'nccl' needs CUDA device {local_rank} (LOCAL_RANK); "
                               f"{torch.cuda.device_count()} visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": device} if backend == "nccl" else {}))
    return Setup(rank, world, local_rank, device, dist.get_backend())


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs, evaluates for the record and saves."""
    return rank() == 0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (for state_dict, saving, callbacks), or the model itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def wrap(method: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Make ``(model, optimizer)`` data-parallel for ``method`` (see the module docstring); returns them
    unchanged in a single process. Call after ``model.to(setup.device)`` and after building the
    optimizer (``lrkit.methods.prepare``); use the returned model for forward passes."""
    if method not in WRAPPABLE_METHODS:
        raise ValueError(f"Invalid method: {method!r} (expected one of {WRAPPABLE_METHODS})")
    if isinstance(model, DistributedDataParallel):
        raise ValueError("the model is already wrapped in DistributedDataParallel: pass the bare model")
    if world_size() == 1:
        return model, optimizer
    if getattr(optimizer, "updates_in_backward", False):
        if not isinstance(optimizer, InBackwardOptimizer):
            raise TypeError(f"{type(optimizer).__name__} updates inside backward but is not an "
                            "lrkit InBackwardOptimizer: nothing would all-reduce its gradients")
        if optimizer.reduction == "none":
            raise ValueError(f"method {method!r}: the optimizer updates inside backward with reduction='none', "
                             "so every rank would step on its own gradient (expected 'auto' or 'mean')")
        with torch.no_grad():  # every rank starts from rank 0's weights, as DDP does at construction
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)
        return model, optimizer
    if isinstance(optimizer, InBackwardOptimizer):
        optimizer.reduction = "none"  # fused=False under DDP: DDP already averaged .grad
    device = next(model.parameters()).device
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, optimizer


def no_sync(model: torch.nn.Module, last: bool):
    """Context for one micro-batch's backward: DDP's ``no_sync()`` unless it is the step's ``last``
    micro-batch (skips redundant all-reduces during accumulation); a no-op for an unwrapped model."""
    if isinstance(model, DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def shard(global_batch, setup: Setup | None = None):
    """This rank's contiguous slice of the rows of ``global_batch`` (a tensor, or a tuple / list / dict
    of tensors with the same number of rows). The global batch must divide evenly by the world size, so
    that the rank average of per-rank mean losses is the global mean loss."""
    r, w = (setup.rank, setup.world_size) if setup is not None else (rank(), world_size())
    if isinstance(global_batch, dict):
        return {k: shard(v, setup) for k, v in global_batch.items()}
    if isinstance(global_batch, (tuple, list)):
        return type(global_batch)(shard(v, setup) for v in global_batch)
    n = global_batch.shape[0]
    if n % w:
        raise ValueError(f"Invalid global batch size: {n} (expected a multiple of the world size {w})")
    return global_batch[r * n // w:(r + 1) * n // w]


def mean(value) -> float:
    """The average of a scalar (e.g. this rank's loss) over all ranks; the value itself in a single process."""
    value = float(value.detach() if torch.is_tensor(value) else value)
    if world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def destroy() -> None:
    """Leave the process group (end of a torchrun script); a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["Setup", "init", "wrap", "shard", "mean", "no_sync", "unwrap", "is_main", "rank", "world_size",
           "destroy", "WRAPPABLE_METHODS"]
