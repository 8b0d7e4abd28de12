"""Memory accounting: bytes measured from the tensors a run holds, and the analytic formulas that
predict them for the papers' model sizes.

Measured: parameter bytes, optimizer-state bytes (every tensor in ``optimizer.state``), the peak bytes
of gradients alive at once during a backward (:class:`GradientPeak`), process peak (CPU max RSS, CUDA
peak allocated); :func:`measure_step_memory` takes all of them for a few steps of one method (the
GaLore paper's memory comparison, Sec. 4.2 and Fig. 1). Analytic: state elements per weight shape for
Adam and GaLore (:func:`lrkit.optim.galore.galore_state_numel`), applied to the official LLaMA configs.
"""
from __future__ import annotations

import math
import resource

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
    also hold quantisation maps and block scales); on CUDA ``peak_cuda_bytes``, the peak allocated
    during the steps (weights, gradients, states and activations together).
    """
    from lrkit.methods import block_linears, prepare
    from lrkit.models import build_llama
    from lrkit.optim.galore import GaLoreAdamW8bit
    from lrkit.train import lm_loss
    from lrkit.utils import resolve_device

    if method not in STEP_METHODS:
        raise ValueError(f"Invalid method: {method!r} (expected one of {STEP_METHODS})")
    if method != "full" and not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"Invalid rank: {rank!r} for method {method!r} (expected an int >= 1)")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"Invalid steps: {steps!r} (expected an int >= 1)")
    dev = resolve_device(device)
    if method == "galore_8bit" and dev.type != "cuda":
        raise RuntimeError(f"method 'galore_8bit' needs a CUDA device (bitsandbytes' 8-bit Adam kernels), got {dev}")

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
    batch = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    batch = batch.to(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    with GradientPeak(model) as grads:
        for _ in range(steps):
            loss = lm_loss(model, batch)
            if getattr(optimizer, "updates_in_backward", False):
                optimizer.backward(loss)
            else:
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
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
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out
