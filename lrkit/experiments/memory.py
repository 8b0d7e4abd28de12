"""Memory measured by running training steps: the runners behind the memory notebooks (GaLore's memory
ablation, AdaLomo's factorization). The tools they use (``GradientPeak``, ``memory_figures``) and the
analytic formulas stay in ``lrkit.memory``; these runners sit above the training loop (``lrkit.train``).
"""
from __future__ import annotations

import gc
import time

import torch

from lrkit.memory import GradientPeak, optimizer_state_bytes, optimizer_state_numel
from lrkit.models import LLAMA_SIZES
from lrkit.train import backward_and_clip, lm_loss


def _measured_steps(model, optimizer, vocab_size, batch_size, seq_len, steps, seed, device):
    """``steps`` optimizer steps on one seeded random batch under a GradientPeak; returns the tracker and
    the last loss."""
    batch = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    batch = batch.to(device)
    with GradientPeak(model) as grads:
        for _ in range(steps):
            loss = lm_loss(model, batch)
            backward_and_clip(loss, model, optimizer, None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return grads, loss


# ------------------------------------------------------------------------ measured per training step
STEP_METHODS = ("full", "galore", "galore_per_layer", "galore_8bit")


def measure_step_memory(model_size: str, method: str, *, rank: int | None = None, vocab_size: int = 1024,
                        batch_size: int = 2, seq_len: int = 64, steps: int = 2, lr: float = 1e-3,
                        update_proj_gap: int = 200, scale: float = 0.25, device: str = "auto",
                        seed: int = 0) -> dict:
    """Train a fresh LLaMA of ``model_size`` (lrkit.models.LLAMA_SIZES) for ``steps`` steps with
    ``method`` and return the bytes measured from its tensors.

    ``method``: "full" (AdamW), "galore" (GaLoreAdamW; ``rank`` required), "galore_per_layer" (updates
    inside backward, each gradient freed as soon as it is used), "galore_8bit" (galore-torch's
    GaLoreAdamW8bit: bitsandbytes' 8-bit states, CUDA only, RuntimeError elsewhere). Every GaLore
    variant projects the same weights as :func:`lrkit.methods.prepare`. The batches are random tokens:
    none of the figures depends on the data.

    Returns ``param_bytes``; ``grad_peak_bytes`` (:class:`GradientPeak` over all steps);
    ``optimizer_state_bytes`` after the last step; ``analytic_state_bytes`` =
    :func:`optimizer_state_numel` times the parameters' element size (None for 8-bit states, which
    also hold quantisation maps and block scales; bitsandbytes' two shared 256-entry maps are counted
    once per parameter); on CUDA ``peak_cuda_bytes``, the peak allocated by this call above what was
    allocated before it (weights, gradients, states and activations together).
    """
    from lrkit.methods import block_linears, prepare
    from lrkit.models import build_llama
    from lrkit.optim.galore import GaLoreAdamW8bit
    from lrkit.utils import resolve_device

    if method not in STEP_METHODS:
        raise ValueError(f"Invalid method: {method!r} (expected one of {STEP_METHODS})")
    if method != "full" and not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"Invalid rank: {rank!r} for method {method!r} (expected an int >= 1)")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"Invalid steps: {steps!r} (expected an int >= 1)")
    if model_size not in LLAMA_SIZES:
        raise ValueError(f"Invalid model size: {model_size!r} (expected one of {list(LLAMA_SIZES)})")
    dev = resolve_device(device)
    if method == "galore_8bit" and dev.type != "cuda":
        raise RuntimeError(f"method 'galore_8bit' needs a CUDA device (bitsandbytes' 8-bit Adam kernels), got {dev}")

    if dev.type == "cuda":  # count only this call's tensors: drop earlier runs' garbage, start the peak here
        gc.collect()
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        baseline = torch.cuda.memory_allocated(dev)
    model = build_llama(model_size, vocab_size, seq_len, seed=seed).to(dev).train()
    if method == "galore_8bit":  # the official optimizer, on the same groups as prepare() builds
        projected = [m.weight for m in block_linears(model).values()]
        ids = {id(p) for p in projected}
        groups = [{"params": [p for p in model.parameters() if id(p) not in ids]},
                  {"params": projected, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
                   "proj_type": "std"}]
        optimizer = GaLoreAdamW8bit(groups, lr=lr, weight_decay=0.0)
    else:
        kind = "full" if method == "full" else "galore"
        optimizer = prepare(kind, model, lr=lr, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                            per_layer=method == "galore_per_layer", seed=seed).optimizer
    grads, loss = _measured_steps(model, optimizer, vocab_size, batch_size, seq_len, steps, seed, dev)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    element = next(model.parameters()).element_size()
    out = {"model_size": model_size, "method": method, "rank": rank, "device": str(dev),
           "parameters": sum(p.numel() for p in model.parameters()), "param_bytes": param_bytes,
           "grad_peak_bytes": grads.peak, "optimizer_state_bytes": optimizer_state_bytes(optimizer),
           "analytic_state_bytes": None if method == "galore_8bit" else
           element * optimizer_state_numel(model_size, "full" if method == "full" else "galore", rank, vocab_size),
           "loss": loss.item()}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(dev) - baseline
    return out


def step_memory_run(name: str, *, model_size: str, method: str, seed: int = 0, **kwargs):
    """:func:`measure_step_memory` as a run record (for ``lrkit.experiments.run_all``): its arguments
    in ``config``, the byte figures and last loss in ``final`` (what ``make check-reports`` compares)."""
    from lrkit.records import RunResult
    from lrkit.utils import device_info

    t0 = time.perf_counter()
    m = measure_step_memory(model_size, method, seed=seed, **kwargs)
    wall = time.perf_counter() - t0
    info = device_info(m["device"])
    figures = {k: v for k, v in m.items() if k.endswith("_bytes")}
    config = {"model_size": model_size, "method": method, "rank": m["rank"], "parameters": m["parameters"],
              **{k: v for k, v in kwargs.items() if k != "rank"}}
    return RunResult(name=name, config=config, seed=seed, device=info["device"], device_name=info["device_name"],
                     final={"loss": m["loss"], **figures}, wall_time_s=wall, memory=figures)



def measure_method_memory(model_size: str, method: str, *, vocab_size: int = 1024, batch_size: int = 2,
                          seq_len: int = 64, steps: int = 2, lr: float = 1e-3, device: str = "auto",
                          seed: int = 0, **method_kw) -> dict:
    """Like :func:`measure_step_memory` for any method of :func:`lrkit.methods.prepare` (AdaLomo paper:
    "adalomo", "lomo", "adafactor", "full", "lora"; ``method_kw`` such as ``rank``, ``max_grad_norm``
    or AdaLomo's ``normalization`` go to prepare): a fresh LLaMA of ``model_size`` trained ``steps``
    steps on random tokens, bytes measured from its tensors.

    Returns ``param_bytes``, ``grad_peak_bytes`` (:class:`GradientPeak`: the most gradient bytes alive
    at once), ``optimizer_state_bytes`` (every tensor in the optimizer state after the last step) and
    ``held_bytes``, their sum besides the weights; for AdaLomo also its ``persistent_state_bytes`` and
    modelled ``transient_peak_bytes``; on CUDA ``peak_cuda_bytes``, the peak allocated by this call above
    what was allocated before it (weights, gradients, states and activations together).
    """
    from lrkit.methods import prepare
    from lrkit.models import build_llama
    from lrkit.utils import resolve_device

    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"Invalid steps: {steps!r} (expected an int >= 1)")
    dev = resolve_device(device)
    if dev.type == "cuda":  # count only this call's tensors, as measure_step_memory
        gc.collect()
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        baseline = torch.cuda.memory_allocated(dev)
    model = build_llama(model_size, vocab_size, seq_len, seed=seed).to(dev).train()
    setup = prepare(method, model, lr=lr, seed=seed, **method_kw)
    model, optimizer = setup.model.to(dev), setup.optimizer
    grads, loss = _measured_steps(model, optimizer, vocab_size, batch_size, seq_len, steps, seed, dev)
    state = optimizer_state_bytes(optimizer)
    out = {"model_size": model_size, "method": method, "device": str(dev),
           "parameters": sum(p.numel() for p in model.parameters()),
           "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
           "grad_peak_bytes": grads.peak, "optimizer_state_bytes": state, "held_bytes": state + grads.peak,
           "loss": loss.item()}
    for k in ("persistent_state_bytes", "transient_peak_bytes"):
        if hasattr(optimizer, k):
            out[k] = getattr(optimizer, k)()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(dev) - baseline
    if hasattr(optimizer, "remove_hooks"):
        optimizer.remove_hooks()
    return out
