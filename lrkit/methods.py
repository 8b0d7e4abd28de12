"""The training methods the papers compare, built on one model. GaLore paper: full-rank AdamW, GaLore,
LoRA, naive low-rank (W = B A) and ReLoRA. AdaLomo paper: AdaLomo, LOMO (fused SGD), Adafactor, and
the same AdamW and LoRA. Every method gets the same model builder, training loop and record format;
:func:`prepare` turns a model into (model, optimizer, callbacks) for a method.

Which weights are "low-rank" follows the official GaLore pre-training script: every ``nn.Linear``
inside a transformer block (LLaMA: attention q, k, v, o and MLP gate, up, down; BERT: query, key,
value, attention output, intermediate, output). Embeddings, norms and output heads are trained with
plain AdamW in every method (for LoRA, low-rank and ReLoRA too, as in the paper's baselines).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lrkit.optim.galore import GaLoreAdamW, PerLayerGaLore

METHODS = ("full", "galore", "lora", "low_rank", "relora", "adalomo", "lomo", "adafactor")
_BLOCK = re.compile(r"(^|\.)(layers|layer)\.\d+\.")


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """{name: module} of the nn.Linear layers inside transformer blocks: GaLore's projected weights."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and _BLOCK.search(n)}


@dataclass
class Prepared:
    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    callbacks: list[Callable] = field(default_factory=list)  # called as cb(step) after each optimizer step
    info: dict = field(default_factory=dict)


def prepare(method: str, model: nn.Module, *, lr: float, rank: int | None = None, weight_decay: float = 0.0,
            update_proj_gap: int = 200, scale: float = 0.25, proj_method: str = "svd",
            switch_subspace: bool = True, moments_on_switch: str = "keep", per_layer: bool = False,
            max_grad_norm: float | None = None, lora_alpha: float | None = None,
            relora_every: int | None = None, lora_trainable: tuple[str, ...] | None = None, seed: int = 0,
            accumulation_steps: int = 1, **optim_kw) -> Prepared:
    """Set ``model`` up for ``method`` and build its optimizer (AdamW: galore-torch's HF-style one).

    ``rank`` is required for the low-rank methods (galore, lora, low_rank, relora). ``per_layer``
    (GaLore only) updates inside backward; then ``max_grad_norm`` is applied by the optimizer (global
    norm), not by the loop, as for the fused optimizers (adalomo, lomo). ``accumulation_steps``: backward
    passes per optimizer step for the optimizers that update inside backward (per-layer galore; adalomo,
    lomo when fused); step()-based ones accumulate in ``.grad`` (the loop's job). ``optim_kw`` go to the
    optimizer of adalomo (e.g. normalization, second_moment, factor_rank, fused), lomo and adafactor; an
    option the method does not take is a ValueError listing those it does (:func:`method_options`).
    ``lora_trainable``: for lora/relora, name substrings of the non-adapter parameters that stay
    trainable; None keeps every one outside the adapted layers (pre-training from scratch, as the
    paper's baseline), ``("classifier",)`` is standard LoRA fine-tuning (adapters + new head only).
    """
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r} (expected one of {METHODS})")
    unknown = sorted(set(optim_kw) - set(_optimizer_options(method)))
    if unknown:  # a misspelt option is an error listing what this method reads, not a bare TypeError
        accepted = sorted(method_options(method))
        raise ValueError(f"Invalid options {unknown} for method {method!r} ("
                         + (f"expected some of {accepted}, besides" if accepted else "it takes none but")
                         + " lr, weight_decay and seed)")
    if lora_alpha is not None and not (isinstance(lora_alpha, (int, float)) and not isinstance(lora_alpha, bool)
                                       and math.isfinite(lora_alpha) and lora_alpha > 0):
        raise ValueError(f"Invalid lora_alpha: {lora_alpha!r} (expected None, i.e. the rank, or a finite number > 0)")
    if method in ("adalomo", "lomo") and accumulation_steps != 1:
        optim_kw = {**optim_kw, "accumulation_steps": accumulation_steps}
    if method in ("adalomo", "lomo", "adafactor"):
        return _full_parameter_optimizer(method, model, lr, weight_decay, max_grad_norm, optim_kw)
    if method != "full" and not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"Invalid rank: {rank!r} for method {method!r} (expected an int >= 1)")
    if per_layer and method != "galore":
        raise ValueError(f"Invalid per_layer=True for method {method!r} (only 'galore' supports it)")
    targets = block_linears(model)
    if not targets:
        raise ValueError("model has no nn.Linear inside transformer blocks (names like 'layers.0.')")
    info = {"method": method, "rank": rank, "lr": lr}

    if method in ("full", "galore"):
        projected = [m.weight for m in targets.values()] if method == "galore" else []
        ids = {id(p) for p in projected}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest}]
        if projected:
            groups.append({"params": projected, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
                           "proj_method": proj_method, "switch_subspace": switch_subspace,
                           "moments_on_switch": moments_on_switch})
        kw = dict(lr=lr, weight_decay=weight_decay, seed=seed)
        if per_layer:
            opt = PerLayerGaLore(groups, max_grad_norm=max_grad_norm, accumulation_steps=accumulation_steps, **kw)
        else:
            opt = GaLoreAdamW(groups, **kw)
        info.update(update_proj_gap=update_proj_gap, scale=scale, proj_method=proj_method,
                    switch_subspace=switch_subspace, moments_on_switch=moments_on_switch, per_layer=per_layer)
        return Prepared(method, model, opt, [], info)

    if method == "low_rank":
        for name, lin in targets.items():
            _set_module(model, name, _factorised(lin, rank, seed))
    else:  # lora, relora: frozen (random, from-scratch) base plus trainable adapters
        from peft import LoraConfig, get_peft_model

        alpha = lora_alpha if lora_alpha is not None else rank
        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(model, cfg)
        for n, p in model.named_parameters():  # embeddings, norms, heads stay trainable, as in the paper
            if "lora_" not in n and not any(f"{t}.base_layer." in n for t in targets):
                p.requires_grad_(lora_trainable is None or any(k in n for k in lora_trainable))
        info["lora_alpha"] = alpha
    opt = GaLoreAdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    callbacks = []
    if method == "relora":
        if not (isinstance(relora_every, int) and relora_every >= 1):
            raise ValueError(f"Invalid relora_every: {relora_every!r} (expected an int >= 1 for method 'relora')")
        callbacks.append(ReLoRAMerge(model, opt, relora_every, seed))
        info["relora_every"] = relora_every
    return Prepared(method, model, opt, callbacks, info)


# prepare()'s own keyword arguments that each method reads (all read lr, weight_decay and seed)
_PREPARE_OPTIONS = {
    "full": (),
    "galore": ("rank", "update_proj_gap", "scale", "proj_method", "switch_subspace", "moments_on_switch",
               "per_layer", "max_grad_norm", "accumulation_steps"),
    "lora": ("rank", "lora_alpha", "lora_trainable"),
    "low_rank": ("rank",),
    "relora": ("rank", "lora_alpha", "lora_trainable", "relora_every"),
    "adalomo": ("max_grad_norm", "accumulation_steps"),
    "lomo": ("max_grad_norm", "accumulation_steps"),
    "adafactor": (),
}
_ADAFACTOR_FIXED = ("scale_parameter", "relative_step", "warmup_init", "clip_threshold")  # set by prepare()


def _optimizer_options(method: str) -> tuple[str, ...]:
    """The extra keywords (``optim_kw``) prepare() passes on to ``method``'s optimizer: AdaLomo's, Lomo's and
    transformers' Adafactor's constructor arguments that prepare() does not set itself; none for the rest."""
    import inspect

    if method in ("adalomo", "lomo"):
        from lrkit.optim import AdaLomo, Lomo

        cls, own = (AdaLomo if method == "adalomo" else Lomo), ("lr", "weight_decay", "seed", *_PREPARE_OPTIONS[method])
    elif method == "adafactor":
        from transformers.optimization import Adafactor

        cls, own = Adafactor, ("lr", "weight_decay", *_ADAFACTOR_FIXED)
    else:
        return ()
    return tuple(n for n in list(inspect.signature(cls.__init__).parameters)[2:] if n not in own)


def method_options(method: str) -> tuple[str, ...]:
    """Every option (a recipe's ``method_options`` key) prepare() accepts for ``method`` besides lr,
    weight_decay and seed: its own keyword arguments that the method reads, then its optimizer's."""
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r} (expected one of {METHODS})")
    return _PREPARE_OPTIONS[method] + _optimizer_options(method)


def _full_parameter_optimizer(method, model, lr, weight_decay, max_grad_norm, optim_kw) -> Prepared:
    """The AdaLomo paper's full-parameter optimizers: AdaLomo and LOMO update inside backward (fused,
    no gradient buffer); Adafactor (transformers) is the unfused, momentum-free ancestor of AdaLomo,
    run with AdaLomo's relative step size (scale_parameter) and an external lr schedule."""
    from lrkit.optim import AdaLomo, Lomo

    params = [p for p in model.parameters() if p.requires_grad]
    if method == "adalomo":
        opt = AdaLomo(params, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, **optim_kw)
    elif method == "lomo":
        opt = Lomo(params, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, **optim_kw)
    else:
        from transformers.optimization import Adafactor

        for what, v in (("learning rate", lr), ("weight_decay", weight_decay)):  # transformers checks neither
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"Invalid {what}: {v!r} for method 'adafactor' (expected a finite number >= 0)")
        kw = dict(scale_parameter=True, relative_step=False, warmup_init=False, clip_threshold=1.0, **optim_kw)
        opt = Adafactor(params, lr=lr, weight_decay=weight_decay, **kw)
    return Prepared(method, model, opt, [], {"method": method, "lr": lr, "weight_decay": weight_decay,
                                             "max_grad_norm": max_grad_norm, **optim_kw})


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _factorised(lin: nn.Linear, rank: int, seed: int) -> nn.Sequential:
    """W = B A trained directly (the paper's "Low-Rank" baseline): A (r x n) then B (m x r)."""
    A = nn.Linear(lin.in_features, rank, bias=False)
    B = nn.Linear(rank, lin.out_features, bias=lin.bias is not None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Keep the product's scale near the dense layer's: each factor gets std 1/sqrt(fan_in).
        nn.init.normal_(A.weight, std=1 / math.sqrt(lin.in_features))
        nn.init.normal_(B.weight, std=1 / math.sqrt(rank))
    return nn.Sequential(A, B).to(lin.weight.device, lin.weight.dtype)


class ReLoRAMerge:
    """ReLoRA (Lialin et al. 2023) restarts: every ``every`` steps merge each adapter into its frozen
    base weight (W += s B A), re-initialise A (Kaiming) and B (zeros), and drop the adapters' optimizer
    state. The paper's jagged learning-rate re-warm-up is not reproduced (the shared cosine schedule
    runs on); the merged weights' rank grows by up to r per restart."""

    def __init__(self, model, optimizer, every: int, seed: int = 0):
        from peft.tuners.lora import LoraLayer

        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self.optimizer, self.every, self.generator = optimizer, every, torch.Generator().manual_seed(seed)
        self.merges = 0

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        if step % self.every:
            return
        for layer in self.layers:
            for name in layer.active_adapters:
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
                W = layer.get_base_layer().weight
                bound = 1 / math.sqrt(A.shape[1])
                fresh = torch.empty(A.shape, dtype=A.dtype).uniform_(-bound, bound, generator=self.generator)
                if type(A).__name__ == "DTensor":  # FSDP2 (lrkit.fsdp): W_i += s B_i A on this rank's rows
                    from lrkit.fsdp import local, row_range

                    local(W).add_(layer.scaling[name] * (local(B) @ A.full_tensor()))
                    start, rows = row_range(A)
                    A, B, fresh = local(A), local(B), fresh[start:start + rows]
                else:
                    W += layer.scaling[name] * (B @ A)
                A.copy_(fresh)
                B.zero_()
                for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    self.optimizer.state.pop(p, None)
        self.merges += 1

    def state_dict(self) -> dict:  # checkpointed by lrkit.train (the re-initialisation stream and count)
        return {"generator": self.generator.get_state(), "merges": self.merges}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.merges = state["merges"]
