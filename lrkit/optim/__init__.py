"""Optimizers of the three papers, each following the torch.optim contract.

* :class:`GaLoreAdamW` (GaLore, Zhao et al. 2024): Adam in a low-rank gradient subspace.
* :class:`AdaLomo` (Lv et al. 2024): factored second moment, grouped update normalisation, fused into backward.
* :class:`Lomo` (Lv et al. 2023): fused SGD, the AdaLomo paper's baseline.
"""
from lrkit.optim.adalomo import AdaLomo
from lrkit.optim.galore import GaLoreAdamW, GaLoreAdamW8bit, PerLayerGaLore, optimizer_state_bytes
from lrkit.optim.lomo import Lomo

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "PerLayerGaLore", "AdaLomo", "Lomo", "optimizer_state_bytes"]
