"""Memory accounting: bytes measured from the tensors a run holds, and the analytic formulas that
predict them for the papers' model sizes.

Measured: parameter bytes, optimizer-state bytes (every tensor in ``optimizer.state``), the peak bytes
of gradients alive at once during a backward (:class:`GradientPeak`), process peak (CPU max RSS, CUDA
peak allocated); ``lrkit.experiments.memory.measure_step_memory`` takes all of them for a few steps of one method (the
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
