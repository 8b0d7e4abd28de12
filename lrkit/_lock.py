"""The locked environment: ``requirements.lock`` (exact versions and sha256 hashes, written by `make lock`).

No torch or lrkit imports, so `make lock` runs it as a script with the system Python:
``python lrkit/_lock.py`` prints :func:`lock_inputs_digest`.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = REPO_ROOT / "requirements.lock"


def lock_inputs_digest(root: Path = REPO_ROOT) -> str:
    """sha256 of what the lock is computed from: pyproject.toml's dependency lists and requires-python, and
    constraints.txt's pins. `make lock` writes it into the lock's header; a test fails when they differ."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    pins = [l.strip() for l in (root / "constraints.txt").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
    inputs = {"requires-python": project.get("requires-python"), "dependencies": sorted(project["dependencies"]),
              "optional": {k: sorted(v) for k, v in sorted(project.get("optional-dependencies", {}).items())},
              "constraints": sorted(pins)}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def lock_header_digest(path: Path = LOCK_FILE) -> str | None:
    """The ``# inputs-sha256:`` the lock was written from (None when absent)."""
    for line in path.read_text().splitlines()[:10]:
        if line.startswith("# inputs-sha256:"):
            return line.split(":", 1)[1].strip() or None
    return None


def lock_digest(path: Path = LOCK_FILE) -> str:
    """sha256 of requirements.lock (recorded in every run record: which environment produced it)."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "unknown"


if __name__ == "__main__":
    print(lock_inputs_digest())
