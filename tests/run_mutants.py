"""Tests that can fail: break the code on purpose, run the test that guards it, watch it fail.

    python tests/run_mutants.py                     # every mutant in tests/mutants/*.yaml
    python tests/run_mutants.py tests/mutants/fed.yaml -k sign

Each mutant names a file, one exact text in it (it must occur once: a mutant whose text has gone is an
error, not a pass), its replacement, and the test(s) that must catch it. The runner copies the checkout's
files (tracked and untracked, not ignored) to a temporary directory (the working tree is never touched), checks each test passes on the
unbroken copy, applies one mutant at a time, and reports "caught" when the test then fails and
"MISSED" when it still passes. Exit status 1 if any mutant was missed. Not part of `make test` (each
mutant reruns its test); run it after changing a test or the code it guards: `make mutants`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MUTANTS_DIR = ROOT / "tests" / "mutants"
FIELDS = {"name", "file", "find", "replace", "test"}


def load_mutants(paths: list[Path]) -> list[dict]:
    out = []
    for path in paths:
        entries = yaml.safe_load(path.read_text()) or []
        for i, m in enumerate(entries):
            if not isinstance(m, dict) or set(m) != FIELDS:
                raise ValueError(f"{path} entry {i}: expected the keys {sorted(FIELDS)}, got "
                                 f"{sorted(m) if isinstance(m, dict) else type(m).__name__}")
            tests = m["test"] if isinstance(m["test"], list) else [m["test"]]
            out.append({**m, "test": tests, "source": path.name})
    return out


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for shared in ("data", ".venv"):  # read-only inputs, shared with the working tree
        if (ROOT / shared).exists() and not (dest / shared).exists():
            (dest / shared).symlink_to(ROOT / shared)


def _pytest(copy: Path, tests: list[str], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    try:
        res = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    return res.returncode, res.stdout + res.stderr


def _why(output: str) -> str:
    """The first assertion or error line of a failing pytest run, for the report."""
    for line in output.splitlines():
        s = line.strip()
        if s.startswith("E ") and len(s) > 2:
            return s[2:].strip()[:160]
    return output.strip().splitlines()[-1][:160] if output.strip() else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="mutant files (default: tests/mutants/*.yaml)")
    ap.add_argument("-k", default="", help="only mutants whose name contains this text")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per test run")
    args = ap.parse_args(argv)
    mutants = [m for m in load_mutants(args.files or sorted(MUTANTS_DIR.glob("*.yaml"))) if args.k in m["name"]]
    if not mutants:
        raise SystemExit("no mutants selected")
    missed = 0
    with tempfile.TemporaryDirectory(prefix="lrkit-mutants-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy)
        probe = subprocess.run([sys.executable, "-c", "import lrkit; print(lrkit.__file__)"], cwd=copy,
                               env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(copy)):
            raise SystemExit(f"the copy's lrkit is not the one imported ({probe.stdout.strip() or probe.stderr}): "
                             "the mutants would test the working tree")
        baseline: dict[tuple, int] = {}
        for m in mutants:
            key = tuple(m["test"])
            if key not in baseline:
                baseline[key], out = _pytest(copy, m["test"], args.timeout)
                if baseline[key] != 0:
                    print(f"BROKEN BASELINE {' '.join(key)} fails on the unbroken code:\n{out[-2000:]}")
                    return 2
            path = copy / m["file"]
            text = path.read_text()
            if text.count(m["find"]) != 1:
                print(f"STALE MUTANT [{m['source']}] {m['name']}: its text occurs {text.count(m['find'])} times "
                      f"in {m['file']} (expected once)")
                return 2
            path.write_text(text.replace(m["find"], m["replace"]))
            t0 = time.perf_counter()
            try:
                rc, out = _pytest(copy, m["test"], args.timeout)
            finally:
                path.write_text(text)
            caught = rc != 0
            missed += not caught
            print(f"{'caught' if caught else 'MISSED'}  [{m['source']}] {m['name']}  ({time.perf_counter() - t0:.0f} s)"
                  f"\n        {' '.join(m['test'])}" + (f"\n        {_why(out)}" if caught else ""), flush=True)
    print(f"{len(mutants) - missed}/{len(mutants)} mutants caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
