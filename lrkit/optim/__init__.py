"""Optimizers of the three papers, each following the torch.optim contract.

* :class:`GaLoreAdamW` (GaLore, Zhao et al. 2024): Adam in a low-rank gradient subspace.
* :class:`AdaLomo` (Lv et al. 2024): factored second moment, grouped update normalisation, fused into backward.
* :class:`Lomo` (Lv et al. 2023): fused SGD, the AdaLomo paper's baseline.

:class:`InBackwardOptimizer` is the hook base of the optimizers that update inside backward (AdaLomo, Lomo,
PerLayerGaLore): accumulation, two-pass or deferred clipping, and the gradient reduction under DDP.
"""
from lrkit.optim.adalomo import AdaLomo
from lrkit.optim.galore import GaLoreAdamW, GaLoreAdamW8bit, PerLayerGaLore, optimizer_state_bytes
from lrkit.optim.in_backward import InBackwardOptimizer
from lrkit.optim.lomo import Lomo

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "PerLayerGaLore", "AdaLomo", "Lomo", "InBackwardOptimizer",
           "optimizer_state_bytes"]
