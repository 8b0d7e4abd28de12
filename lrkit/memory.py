"""Memory accounting: bytes measured from the tensors a run holds, and the analytic formulas that
predict them for the papers' model sizes.

Measured: parameter bytes, optimizer-state bytes (every tensor in ``optimizer.state``), the peak bytes
of gradients alive at once during a backward (:class:`GradientPeak`), process peak (CPU max RSS, CUDA
peak allocated); :func:`measure_step_memory` takes all of them for a few steps of one method (the
GaLore paper's memory comparison, Sec. 4.2 and Fig. 1). Analytic: state elements per weight shape for
Adam and GaLore (:func:`lrkit.optim.galore.galore_state_numel`), applied to the official LLaMA configs.
"""
from __future__ import annotations

import gc
import math
import resource
import time

import torch

from lrkit.models import LLAMA_SIZES
from lrkit.optim.galore import adam_state_numel, galore_state_numel, optimizer_state_bytes

GIB, GB = 2**30, 1e9


def memory_figures(model, optimizer, device) -> dict:
    """Bytes of parameters and optimizer state measured from the tensors themselves, and the peak
    memory of the process (CPU: max RSS; CUDA: peak allocated)."""
    device = torch.device(device)
    out = {"param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
           "optimizer_state_bytes": optimizer_state_bytes(optimizer),
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


class GradientPeak:
    """The most gradient bytes alive at once during backward. Use as a context manager around steps.

    Measured in each parameter's tensor hook, which autograd runs with the incoming gradient just before
    accumulating it into ``.grad``, and so before every post-accumulate hook, where an optimizer that
    updates in backward (per-layer GaLore, AdaLomo) frees it. The count is therefore right whether the
    optimizer's hooks were registered before or after this one: the incoming gradient plus every
    ``.grad`` still alive at that moment."""

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.peak = 0
        self._handles = []

    def _hook(self, grad):
        alive = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        self.peak = max(self.peak, alive + grad.numel() * grad.element_size())
        # returns None: the gradient passes through unchanged

    def __enter__(self):
        self._handles = [p.register_hook(self._hook) for p in self.params]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


def _measured_steps(model, optimizer, vocab_size, batch_size, seq_len, steps, seed, device):
    """``steps`` optimizer steps on one seeded random batch under a GradientPeak; returns the tracker and
    the last loss."""
    from lrkit.train import backward_and_clip, lm_loss  # lrkit.train imports this module

    batch = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    batch = batch.to(device)
    with GradientPeak(model) as grads:
        for _ in range(steps):
            loss = lm_loss(model, batch)
            backward_and_clip(loss, model, optimizer, None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return grads, loss


def llama_weight_shapes(size: str, vocab_size: int = 32000, tied: bool = False) -> list[tuple[str, tuple]]:
    """(kind, shape) of every parameter of a LLaMA of ``size`` (lrkit.models.LLAMA_SIZES): kind is
    'block' for the nn.Linear weights GaLore projects, 'other' for embeddings, head and norms."""
    h, i, layers, _ = LLAMA_SIZES[size]
    block = [(h, h)] * 4 + [(i, h), (i, h), (h, i)]  # q k v o, gate up (out x in), down
    shapes = [("block", s) for _ in range(layers) for s in block]
    shapes += [("other", (h,))] * (2 * layers + 1)  # two RMSNorms per block, one final
    shapes += [("other", (vocab_size, h))] * (1 if tied else 2)  # embedding (+ lm_head)
    return shapes


def optimizer_state_numel(size: str, method: str, rank: int | None = None, vocab_size: int = 32000) -> int:
    """Analytic optimizer-state elements of AdamW ('full') or GaLore ('galore', ``rank``) for a LLaMA."""
    total = 0
    for kind, shape in llama_weight_shapes(size, vocab_size):
        if method == "galore" and kind == "block":
            total += galore_state_numel(shape, rank)
        elif method in ("full", "galore"):
            total += adam_state_numel(shape)
        else:
            raise ValueError(f"Invalid method: {method!r} (expected 'full' or 'galore')")
    return total


def parameter_count(size: str, vocab_size: int = 32000) -> int:
    return sum(math.prod(s) for _, s in llama_weight_shapes(size, vocab_size))


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


# ------------------------------------------------------------------------ AdaLomo paper (Sec. 4.4)
# Training memory per recipe as the LOMO paper counts it (arXiv 2306.09782, Table 1: mixed precision,
# fp16 weights, activations excluded here). AdamW: fp16 weights 2 + fp16 gradients 2 + fp32 master
# weights 4 + fp32 moments 8 = 16 bytes/param; SGD: 2 + 2 + 4 = 8; LOMO: fp16 weights 2 and, being fused,
# one fp16 gradient alive at a time (the largest tensor's); AdaLomo: LOMO's plus its factored fp32 second
# moment (lrkit.optim.adalomo.adalomo_state_numel), no master weights (the update is computed in fp32 on
# a copy and rounded into the fp16 weight).
RECIPES = ("adamw", "sgd", "lomo", "adalomo")


def recipe_memory_bytes(size: str, recipe: str, vocab_size: int = 32000) -> dict:
    """Analytic training-memory bytes of a LLaMA of ``size`` under ``recipe`` (see :data:`RECIPES`):
    ``param_bytes``, ``grad_bytes``, ``master_bytes``, ``state_bytes`` and their sum ``total_bytes``.
    Activations, temporaries and framework overhead are not included."""
    from lrkit.optim.adalomo import adalomo_state_numel

    if recipe not in RECIPES:
        raise ValueError(f"Invalid recipe: {recipe!r} (expected one of {RECIPES})")
    shapes = [s for _, s in llama_weight_shapes(size, vocab_size)]
    n = sum(math.prod(s) for s in shapes)
    largest = max(math.prod(s) for s in shapes)
    fused = recipe in ("lomo", "adalomo")
    parts = {"param_bytes": 2 * n, "grad_bytes": 2 * (largest if fused else n),
             "master_bytes": 0 if fused else 4 * n,
             "state_bytes": {"adamw": 8 * n, "sgd": 0, "lomo": 0,
                             "adalomo": 4 * sum(adalomo_state_numel(s) for s in shapes)}[recipe]}
    return {"model_size": size, "recipe": recipe, "parameters": n, **parts, "total_bytes": sum(parts.values())}


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
