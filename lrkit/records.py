"""Run records: every training run's ``metrics.json``, written atomically, read back by one function.

Layout: ``reports/<paper>/<notebook>/<profile>/metrics.json`` (the notebook path under ``notebooks/``
mirrored), beside the notebook's figures. One file per notebook holds all of its runs::

    {"notebook", "profile", "runs": {name: {config, seed, device, device_name, torch, git_commit, lock_sha256,
     history: [{step, ...}], final: {...}, wall_time_s, memory: {...}}}, "summary": {...},
     "code": {lrkit source file: sha256}, "execution": {profile, wall_time_s, device, inputs, ...}}

Notebooks call :func:`save_run`, :func:`save_summary` and :func:`savefig`; they never write JSON by hand.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lrkit._lock import lock_digest
from lrkit.utils import REPO_ROOT, REPORTS_DIR, atomic_write_bytes

SCHEMA = 1
PROFILES = ("smoke", "cpu", "gpu", "paper")


@dataclass
class RunResult:
    """What a training run measured; the training loops return one, :func:`save_run` records it."""
    name: str
    config: dict
    seed: int
    device: str
    device_name: str
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    memory: dict = field(default_factory=dict)


def report_dir(notebook: str, profile: str, root: Path | None = None) -> Path:
    """``reports/<notebook>/<profile>`` for a notebook path relative to ``notebooks/`` without suffix,
    e.g. ``report_dir("galore/ablation_rank", "cpu")``."""
    if profile not in PROFILES:
        raise ValueError(f"Invalid profile: {profile!r} (expected one of {PROFILES})")
    notebook = notebook.removesuffix(".ipynb")
    if not notebook or notebook.startswith(("/", ".")) or ".." in Path(notebook).parts:
        raise ValueError(f"Invalid notebook: {notebook!r} (expected a path under notebooks/, e.g. 'galore/galore')")
    return Path(root or REPORTS_DIR) / notebook / profile


def tuning_record(paper: str, profile: str, root: Path | None = None) -> Path | None:
    """The tuning record a paper's notebooks read their learning rates from at ``profile``:
    ``reports/<paper>/tuning/<profile>/metrics.json``, at smoke falling back to the committed cpu one (nbval runs
    the tuning notebook after the others); None when there is none."""
    for p in [profile] + (["cpu"] if profile == "smoke" else []):
        path = report_dir(f"{paper}/tuning", p, root) / "metrics.json"
        if path.exists():
            return path
    return None


def save_run(out_dir: str | Path, result: RunResult) -> Path:
    """Add (or replace) one run in ``out_dir/metrics.json``; atomic, so a crash leaves the old file."""
    out_dir = Path(out_dir)
    doc = _read(out_dir)
    run = asdict(result)
    run.update(torch=torch.__version__, python=platform.python_version(), git_commit=git_commit(),
               lock_sha256=lock_digest(), recorded_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    doc["runs"][result.name] = run
    return _write(out_dir, doc)


def save_summary(out_dir: str | Path, table, headline: str | None = None, conclusions=(), **extra) -> Path:
    """Record the notebook's summary: its table (DataFrame or list of dicts), headline figure file
    name, and the conclusions it computed (strings), shown on the report index."""
    out_dir = Path(out_dir)
    if hasattr(table, "to_dict"):
        table = table.to_dict(orient="records")
    doc = _read(out_dir)
    doc["summary"] = {"table": list(table), "headline": headline, "conclusions": list(conclusions), **extra}
    return _write(out_dir, doc)


def savefig(fig, out_dir: str | Path, name: str, dpi: int = 110) -> Path:
    """Save a matplotlib figure as ``out_dir/name.png`` atomically; returns the path."""
    out_dir = Path(out_dir)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    path = out_dir / f"{name}.png"
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_execution(out_dir: str | Path, **info) -> Path:
    """Record how the notebook was executed (profile, wall time, device, HTML export); the runner calls it."""
    out_dir = Path(out_dir)
    doc = _read(out_dir)
    doc["execution"] = info
    return _write(out_dir, doc, code=False)


def load(out_dir: str | Path) -> dict:
    """Read a notebook's ``metrics.json`` (the directory or the file itself)."""
    path = Path(out_dir)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"no run record at {path}: run the notebook first (make reproduce)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a run record (truncated or corrupt JSON: {e}); delete it and rerun the "
                         "notebook (make reproduce)") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {doc.get('schema') if isinstance(doc, dict) else None!r}, this kit "
                         f"reads schema {SCHEMA}")
    doc["profile"] = _profile_of(doc.get("profile", ""))
    return doc


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD's commit hash, with '+dirty' when the working tree has uncommitted changes to tracked code.

    Computed once per process: `git status` runs the nbstripout filter on every notebook (seconds), and
    the commit a run started from is the one to record."""
    try:
        res = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=30)
        head = res.stdout.strip() if res.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    try:  # slow in a fresh checkout under load (the nbstripout filter reads every notebook): a generous limit
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "lrkit",
                                "notebooks", "configs"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=300).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return (head or "unknown") + "+dirty-unchecked"
    return (head or "unknown") + ("+dirty" if dirty else "")


def _read(out_dir: Path) -> dict:
    path = out_dir / "metrics.json"
    if path.exists():
        return load(path)
    parts = out_dir.resolve().parts
    try:
        i = parts.index("reports")
        notebook, profile = "/".join(parts[i + 1:-1]), parts[-1]
    except ValueError:
        notebook, profile = out_dir.parent.name, out_dir.name
    return {"schema": SCHEMA, "notebook": notebook, "profile": _profile_of(profile), "runs": {}, "summary": {}}


def _profile_of(dirname: str) -> str:
    """The profile a report directory holds: "cpu" for "cpu" and for the runner's staging directory
    ".cpu.staging-<random>" (records written before this fix carry the staging name; `load` maps it)."""
    m = re.fullmatch(r"\.(\w+)\.staging-.*", dirname)
    return m.group(1) if m else dirname


_CODE_SEEN: dict[str, str] = {}
_LRKIT_FILE: dict[str, str | None] = {}  # a module's __file__ -> its path in the repository if under lrkit/, else None


def loaded_code() -> dict[str, str]:
    """sha256 of every lrkit source file this process has imported ({"lrkit/optim/galore.py": hex}): the package
    code a notebook's results came from; ``make reproduce`` reruns a notebook when one of them changes. Each
    file is hashed when first seen (an edit during a long run shows as a change afterwards); each module's path
    is resolved once (a notebook's kernel holds thousands of modules and saves a record after every run)."""
    pkg = REPO_ROOT / "lrkit"
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if not f or not f.endswith(".py"):
            continue
        if f not in _LRKIT_FILE:
            path = Path(f).resolve()
            _LRKIT_FILE[f] = path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(pkg) else None
        rel = _LRKIT_FILE[f]
        if rel is not None and rel not in _CODE_SEEN:
            _CODE_SEEN[rel] = hashlib.sha256((REPO_ROOT / rel).read_bytes()).hexdigest()
    return dict(sorted(_CODE_SEEN.items()))


def _write(out_dir: Path, doc: dict, code: bool = True) -> Path:
    path = out_dir / "metrics.json"
    if code:  # the notebook's kernel writes it; the runner's own record (save_execution) keeps it
        doc["code"] = {**doc.get("code", {}), **loaded_code()}
    atomic_write_bytes(path, json.dumps(_jsonable(doc), indent=1, allow_nan=False).encode())
    return path


def _jsonable(x):
    """Plain JSON: tensors and numpy scalars to numbers, non-finite floats to None (NaN is not JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    return str(x)
