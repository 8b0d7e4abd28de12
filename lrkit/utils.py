"""Paths, seeding, device description and progress bars shared by the whole kit."""
from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

# The kit is installed editable (`pip install -e .`), so the repository is the package's parent.
REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LRKIT_DATA", REPO_ROOT / "data"))
REPORTS_DIR = Path(os.environ.get("LRKIT_REPORTS", REPO_ROOT / "reports"))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels.

    On CPU this makes two runs with the same seed give bit-identical numbers (same thread count).
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed: {seed!r} (expected a non-negative int)")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite. Its min and max in one pass (NaN propagates through both, an
    infinity shows in one): the same answer as ``torch.isfinite(t).all()``, which writes a bool tensor of t's
    size first; about 20x faster on CPU (2.5 against 48 ms for a 32000 x 512 embedding gradient), and the
    in-backward optimizers check every gradient with it."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"Invalid device: {device!r} (expected 'auto', 'cpu', 'cuda' or 'cuda:N')")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"Invalid device: {device!r}: CUDA is not available on this machine")
    return torch.device(device)


def device_info(device: torch.device | str = "cpu") -> dict:
    """The device and its human name, for run records and report cards."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {"device": str(device), "device_name": name, "num_threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    import platform

    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def progress(iterable=None, **kwargs):
    """tqdm that is on in a terminal or a live notebook and off in headless runs (papermill, nbval, CI).

    Set LRKIT_PROGRESS=1 to force it on, 0 to force it off.
    """
    from tqdm.auto import tqdm

    forced = os.environ.get("LRKIT_PROGRESS")
    if forced is not None:
        disable = forced == "0"
    else:
        disable = not _interactive()
    return tqdm(iterable, disable=disable, **kwargs)


def _interactive() -> bool:
    if os.environ.get("CI") or os.environ.get("PAPERMILL_EXECUTION") or os.environ.get("LRKIT_HEADLESS"):
        return False
    if sys.stderr.isatty():
        return True
    # A live Jupyter kernel (JupyterLab) shows widgets; a headless kernel started by papermill/nbval
    # is told apart by LRKIT_HEADLESS, which the Makefile sets.
    return "ipykernel" in sys.modules


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports are served and shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

