"""lrkit: a reproducibility kit for memory-efficient training (GaLore, AdaLomo, FeDLRT).

Library code lives here; notebooks in ``notebooks/`` only configure, run and plot.
"""
from lrkit.utils import REPO_ROOT, DATA_DIR, REPORTS_DIR, seed_everything, device_info, progress

__version__ = "0.1.0"
__all__ = ["REPO_ROOT", "DATA_DIR", "REPORTS_DIR", "seed_everything", "device_info", "progress"]
