"""The set-up files agree: requirements.lock is fresh for pyproject.toml and constraints.txt, pins every
dependency with hashes, and is what `make setup` and environment.yml install; torch is pinned."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^ \\]+)", line)
        if m:
            pins[_name(m.group(1))] = m.group(2)
    return pins


def test_lock_is_fresh():
    """The lock's header names the inputs it was computed from; `make lock` after editing them."""
    from lrkit._lock import lock_header_digest, lock_inputs_digest

    assert lock_header_digest() == lock_inputs_digest(), (
        "requirements.lock is stale: pyproject.toml's dependencies or constraints.txt changed since it was "
        "written; run `make lock` and commit it")


def test_lock_pins_every_dependency_exactly_with_hashes():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _locked()
    for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
        assert _name(req) in pins, f"{req} is not in requirements.lock"
        if "==" in req:
            assert pins[_name(req)] == req.split("==")[1], req
    text = (ROOT / "requirements.lock").read_text()
    blocks = [b for b in re.split(r"\n(?=[A-Za-z0-9])", text) if "==" in b.split("\n")[0]]
    assert blocks and all("--hash=sha256:" in b for b in blocks), "every pin carries its hashes"
    assert pins["torch"].startswith("2.13.0"), pins["torch"]


def test_environment_yml_installs_the_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert pip == ["-r requirements.lock"]
    assert "python=3.11" in env["dependencies"]
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r $(LOCK)" in makefile and "LOCK := requirements.lock" in makefile


def test_torch_is_pinned_by_the_constraints_file():
    pins = [l for l in (ROOT / "constraints.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert "torch==2.13.0" in pins
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()  # `make lock` resolves under it
