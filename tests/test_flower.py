"""The Flower engine (lrkit/fed/flower.py) against the in-process simulator: the same config gives the same
global model, the same per-round global loss and the same exchanged floats, bytes and client FLOPs.
Also the Flower App in configs/flower/ (its run config is DEFAULTS) and config validation."""
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from lrkit.fed import flower
from lrkit.fed.simulate import COSTS

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "configs" / "flower"


def _assert_same_run(a, b, rtol=0.0):
    """Same global state, per-round loss/accuracy/ranks/participants and costs (all but wall time)."""
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k], b["state"][k], rtol=rtol, atol=rtol)
    assert len(a["history"]) == len(b["history"])
    for ha, hb in zip(a["history"], b["history"]):
        for k in ("round", "ranks", "clients") + tuple(c for c in COSTS if c != "wall_time"):
            assert ha[k] == hb[k], (ha["round"], k)
        assert ha["loss"] == pytest.approx(hb["loss"], rel=max(rtol, 1e-12))
        assert ha["wall_time"].keys() == hb["wall_time"].keys()


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    # full variance correction, dynamic rank: all three stages every round
    dict(rounds=3, num_clients=3, variance_correction="full", tau=0.05),
    # an MLP on Fashion-MNIST (biases and a dense head: "<param>.grad" messages): simplified correction
    # (dL_c/dS and the dense gradients ride on the basis stage), partial participation, minibatches, Adam,
    # weighted aggregation
    dict(rounds=3, num_clients=4, problem="fashion_mnist", train_size=240, test_size=60, hidden=16, initial_rank=4,
         variance_correction="simplified", client_fraction=0.5, batch_size=8, weighted=True, optimizer="adam",
         lr=0.01),
    # FedLin: the dense, fixed-rank case of the same protocol (correction + coefficient stages)
    dict(rounds=2, num_clients=2, method="fedlin", problem="fashion_mnist", train_size=120, test_size=60, hidden=8,
         batch_size=8, lr=0.1),
], ids=["fedlrt-full-least-squares", "fedlrt-simplified-partial-mlp", "fedlin-mlp"])
def test_flower_engine_equals_simulator(config):
    sim = flower.simulate(config)
    fl = flower.run_flower(config)
    _assert_same_run(sim, fl)
    assert len(sim["history"]) == config["rounds"] + 1
    assert sim["history"][-1]["loss"] < sim["history"][0]["loss"]  # it trained
    if config.get("client_fraction", 1.0) < 1:
        assert {len(h["clients"]) for h in sim["history"][1:]} == {2}
    if config.get("problem") == "fashion_mnist":  # the server-side test set, evaluated identically
        assert [h["test_accuracy"] for h in sim["history"]] == [h["test_accuracy"] for h in fl["history"]]


def test_simulate_config_runs_fashion_mnist_mlp():
    res = flower.simulate(dict(problem="fashion_mnist", train_size=200, test_size=100, num_clients=2, rounds=1,
                               hidden=16, initial_rank=4, batch_size=32, lr=0.1))
    h = res["history"][-1]
    assert h["ranks"].keys() == {"0"}  # the head "2" stays dense
    assert 0.0 <= h["test_accuracy"] <= 1.0 and sum(h["bytes_up"].values()) > 0


def test_resolve_config_names_bad_values():
    with pytest.raises(ValueError, match="Invalid config keys: \\['round'\\]"):
        flower.resolve_config({"round": 3})
    with pytest.raises(ValueError, match="Invalid method: 'fedprox'"):
        flower.resolve_config({"method": "fedprox"})
    with pytest.raises(ValueError, match="Invalid problem: 'mnist'"):
        flower.resolve_config({"problem": "mnist"})
    with pytest.raises(ValueError, match="Invalid variance_correction: 'partial'"):
        flower.resolve_config({"variance_correction": "partial"})
    with pytest.raises(ValueError, match="Invalid num_clients: 0"):
        flower.resolve_config({"num_clients": 0})


def test_flower_app_config_is_defaults_and_apps_load():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    app = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "lrkit.fed.flower:server_app",
                                 "clientapp": "lrkit.fed.flower:client_app"}
    cfg = app["config"]
    assert cfg.keys() == flower.DEFAULTS.keys()
    assert cfg == flower.DEFAULTS  # same values and types
    flower.resolve_config(cfg)
    assert isinstance(flower.server_app, ServerApp) and isinstance(flower.client_app, ClientApp)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_flower_app_on_real_superlink_and_supernodes(tmp_path):
    """The README's deployment commands: a SuperLink and two SuperNodes as separate processes on
    loopback, `flwr run configs/flower`; the run record equals the simulator's."""
    bindir = Path(sys.executable).parent
    env = os.environ | {"FLWR_HOME": str(tmp_path / "flwr"), "OMP_NUM_THREADS": "1",
                        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    port = _free_port()
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    procs = []

    def start(*args, log):
        procs.append(subprocess.Popen([str(bindir / args[0]), *args[1:]], env=env, cwd=tmp_path,
                                      stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        start("flower-superlink", "--insecure", "--port", str(port), log="superlink.log")
        time.sleep(5)
        for c in range(2):
            start("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(_free_port()),
                  "--node-config", f"partition-id={c} num-partitions=2", log=f"supernode{c}.log")
        out = tmp_path / "report"
        run = subprocess.run([str(bindir / "flwr"), "run", str(APP), "lab", "--stream", "--run-config",
                              f"rounds=1 report_dir='{out}'"], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=400)
        logs = "\n".join((tmp_path / f).read_text()[-2000:] for f in ("superlink.log", "supernode0.log"))
        assert (out / "metrics.json").exists(), run.stdout[-3000:] + run.stderr[-3000:] + logs
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    from lrkit import records

    recorded = next(iter(records.load(out)["runs"].values()))["history"]
    sim = flower.simulate(dict(rounds=1, num_clients=2))["history"]
    assert [h["loss"] for h in recorded] == [h["loss"] for h in sim]
    assert [h["floats_up"] for h in recorded] == [sum(h["floats_up"].values()) for h in sim]
    assert [h["flops"] for h in recorded] == [sum(h["flops"].values()) for h in sim]
