"""Helpers shared by several test modules (pytest puts tests/ on sys.path: ``from helpers import ...``)."""
from __future__ import annotations

import builtins
import io
import math
import shutil
from pathlib import Path

import nbformat
import torch

from lrkit import records


def tiny_notebook(root: Path, layers: dict[str, str]) -> Path:
    """A one-cell notebook ``root/notebooks/demo/tiny.ipynb`` (parameters: steps = 1, lr = 0.1, seeds = [0], and
    the runner's profile and report_dir) with a YAML per profile layer in ``root/configs/<layer>/demo/tiny.yaml``
    ({layer: YAML text}); point lrkit.reports' NOTEBOOKS_DIR and CONFIGS_DIR at ``root`` to use it."""
    nb = root / "notebooks" / "demo" / "tiny.ipynb"
    doc = nbformat.v4.new_notebook()
    doc.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell('profile = "smoke"\nreport_dir = ""\nsteps = 1\nlr = 0.1\nseeds = [0]')
    cell.metadata["tags"] = ["parameters"]
    doc.cells = [cell]
    nb.parent.mkdir(parents=True)
    nbformat.write(doc, nb)
    for layer, body in layers.items():
        path = root / "configs" / layer / "demo" / "tiny.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    return nb


def scratch_reports(root: Path) -> Path:
    """A reports directory for a notebook run outside the real one (``LRKIT_REPORTS=root``), holding the committed
    FeDLRT tuning record that the fedlrt notebooks read their learning rates from."""
    src = records.report_dir("fedlrt/tuning", "cpu") / "metrics.json"
    dst = records.report_dir("fedlrt/tuning", "cpu", root) / "metrics.json"
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    return root


def hand_state_numel(shape, second_moment="nmf", factor_rank=1):
    """AdaLomo's second-moment state of one parameter, counted by hand from docs/methods.md section 2 (not
    lrkit's formula): a vector (or "full") keeps an EMA of its own size; an n x m matrix (leading dims a batch)
    keeps n + m at rank 1 and k (n + m) at rank k ("nmf" A, B; "svd" P, Q; "qr" Q, W), k = min(factor_rank, n, m)."""
    if len(shape) < 2 or second_moment == "full":
        return math.prod(shape)
    *b, n, m = shape
    return math.prod(b) * min(factor_rank, n, m) * (n + m)


def held_state_bytes(opt):
    """Bytes of the storage behind every tensor in opt.state (each storage once): what is really held,
    views and shared buffers included at their full size."""
    storages = {}
    for s in opt.state.values():
        for v in s.values():
            if torch.is_tensor(v):
                storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(storages.values())


# ---- interrupted writes (tests/test_utils.py, tests/test_records.py)
class _HalfWrite:
    """A file whose every write puts half the bytes on disk, then raises (ENOSPC)."""

    def __init__(self, f):
        self._f = f

    def write(self, b):
        self._f.write(bytes(b)[: len(b) // 2])
        self._f.flush()
        raise OSError(28, "No space left on device (injected midway)")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def interrupt_writes(monkeypatch):
    """Every file opened for binary writing, by open(), io.open (os.fdopen, Path.open, Path.write_bytes), fails midway."""
    real = io.open

    def opener(file, mode="r", *a, **k):
        f = real(file, mode, *a, **k)
        return _HalfWrite(f) if "b" in mode and any(m in mode for m in "wax+") else f

    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr(builtins, "open", opener)


def torchrun(script, *args, nproc: int = 2):
    """``python -m torch.distributed.run --standalone --nproc-per-node nproc script *args`` in a process group of
    its own (a hang is killed with torchrun and its workers), one torch thread, this checkout first on the path;
    output captured. Pair with :func:`wait_torchrun`."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(script), *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_torchrun(proc, timeout_s: float, what: str) -> str:
    """Wait for a :func:`torchrun` process (killing its group after ``timeout_s``, then failing the test with its
    output); fail on a non-zero exit. Returns the output."""
    import os
    import signal
    import subprocess

    import pytest

    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what} did not finish in time (hang?):\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out
