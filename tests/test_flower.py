"""The Flower engine (lrkit/fed/flower.py) against the in-process simulator: the same config gives the same
global model, the same per-round global loss and the same exchanged floats, bytes and client FLOPs.
Also the Flower App in configs/flower/ (its run config is DEFAULTS) and config validation."""
import json
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
from lrkit.fed.simulate import COSTS, combine, evaluate

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


@pytest.mark.slow
def test_flower_engine_leaves_faulty_clients_out_as_the_simulator_does():
    """Faults through Flower's messages (simulation engine): a ClientApp that raises (a Flower error reply), NaN and
    Inf replies at later stages (the round restarts without them), a round where every client raises (skipped).
    Same global model, records and accounting as the simulator given the same drill."""
    faults = [{"client": 1, "round": 1, "kind": "raise"},
              {"client": 2, "round": 2, "kind": "nan", "stage": "coefficients"},
              {"client": 0, "round": 2, "kind": "inf", "stage": "correction"}] + \
             [{"client": c, "round": 3, "kind": "raise"} for c in range(3)]
    config = dict(rounds=4, num_clients=3, variance_correction="full", tau=0.05, faults=json.dumps(faults))
    sim, fl = flower.simulate(config), flower.run_flower(config)
    _assert_same_run(sim, fl)
    expected = [[], [(1, "basis")], [(0, "correction"), (2, "coefficients")],
                [(0, "basis"), (1, "basis"), (2, "basis")], []]
    for res in (sim, fl):
        h = res["history"]
        assert [[(d["client"], d["stage"]) for d in r.get("dropped_clients", ())] for r in h] == expected
        assert [r.get("skipped") for r in h] == [None, False, False, True, None]
        assert h[3]["loss"] == h[2]["loss"] and "eval_missing" not in h[3]
    assert fl["history"][1]["dropped_clients"][0]["reason"].startswith("Flower error")
    assert fl["history"][2]["dropped_clients"][1]["reason"] == "non-finite reply: S_tilde has NaN"
    with pytest.raises(ValueError, match="Invalid faults: kind 'die'"):
        flower.run_flower(dict(faults=json.dumps([{"client": 0, "round": 1, "kind": "die"}])))


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
    with pytest.raises(ValueError, match="Invalid round_timeout_s: -1"):
        flower.resolve_config({"round_timeout_s": -1})
    with pytest.raises(ValueError, match="Invalid faults: 'nan'"):
        flower.resolve_config({"faults": "nan"})
    with pytest.raises(ValueError, match="Invalid fault: .*'melt'"):
        flower.resolve_config({"faults": '[{"client": 0, "round": 1, "kind": "melt"}]'})


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


class Deployment:
    """A SuperLink and three SuperNodes (partitions 0, 1, 2) as separate processes on loopback, each in a
    session of its own (killed as a group at the end; the "die" fault drill kills one from inside)."""

    def __init__(self, tmp):
        self.tmp, self.bindir, self.procs = tmp, Path(sys.executable).parent, []
        self.env = os.environ | {"FLWR_HOME": str(tmp / "flwr"), "OMP_NUM_THREADS": "1",
                                 "PATH": f"{self.bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.port = _free_port()
        (tmp / "flwr").mkdir()
        (tmp / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')

    def start(self, *args, log):
        self.procs.append(subprocess.Popen([str(self.bindir / args[0]), *args[1:]], env=self.env, cwd=self.tmp,
                                           stdout=open(self.tmp / log, "w"), stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def up(self, supernodes=3):
        self.start("flower-superlink", "--insecure", "--port", str(self.port), log="superlink.log")
        time.sleep(5)
        for c in range(supernodes):
            self.start("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--port",
                       str(_free_port()), "--node-config", f"partition-id={c} num-partitions={supernodes}",
                       log=f"supernode{c}.log")

    def run(self, run_config: str, name: str):
        """`flwr run configs/flower` with `run_config`; returns the recorded history."""
        from lrkit import records

        out = self.tmp / name
        run = subprocess.run([str(self.bindir / "flwr"), "run", str(APP), "lab", "--stream", "--run-config",
                              f"{run_config} report_dir='{out}'"], env=self.env, cwd=ROOT, capture_output=True,
                             text=True, timeout=400)
        logs = "\n".join((self.tmp / f).read_text()[-2000:] for f in ("superlink.log", "supernode0.log"))
        assert (out / "metrics.json").exists(), run.stdout[-3000:] + run.stderr[-3000:] + logs
        return next(iter(records.load(out)["runs"].values()))["history"]

    def down(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:  # died already (the "die" drill)
                pass
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("flower"))
    try:
        d.up()
        yield d
    finally:
        d.down()


@pytest.mark.slow
def test_flower_app_on_real_superlink_and_supernodes(deployment):
    """The README's deployment commands: a SuperLink and SuperNodes as separate processes on loopback,
    `flwr run configs/flower` (two clients; the third SuperNode stays idle); the run record equals the simulator's."""
    recorded = deployment.run("rounds=1", "report")
    sim = flower.simulate(dict(rounds=1, num_clients=2))["history"]
    assert [h["loss"] for h in recorded] == [h["loss"] for h in sim]
    assert [h["floats_up"] for h in recorded] == [sum(h["floats_up"].values()) for h in sim]
    assert [h["flops"] for h in recorded] == [sum(h["flops"].values()) for h in sim]


def _dropped(history):
    return [[(d["client"], d["stage"]) for d in h.get("dropped_clients", ())] for h in history]


@pytest.mark.slow
def test_flower_supernode_dying_and_a_raising_client_are_left_out(deployment):
    """Faults on real processes, one round: client 1's ClientApp raises (a Flower error reply) and client 2's
    SuperNode is killed (SIGKILL of its process group) in the basis stage, so it does not reply within
    round_timeout_s. The round goes on with client 0; the record lists both; the global model is the simulator's
    with the same faults (the round's loss is over the clients still answering the evaluation, 0 and 1).
    round_timeout_s is generous: every message starts a ClientApp process on its node (seconds under load)."""
    faults = [{"client": 1, "round": 1, "kind": "raise"}, {"client": 2, "round": 1, "kind": "die", "stage": "basis"}]
    cfg = dict(rounds=1, num_clients=3, round_timeout_s=45.0, faults=json.dumps(faults))
    recorded = deployment.run(" ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in cfg.items()),
                              "faults")
    assert deployment.procs[3].poll() is not None  # SuperNode 2 is dead
    assert _dropped(recorded) == [[], [(1, "basis"), (2, "basis")]]
    reasons = [d["reason"] for d in recorded[1]["dropped_clients"]]
    assert reasons[0].startswith("Flower error") and "injected fault: client 1, round 1" in reasons[0]
    assert reasons[1] == "no reply within round_timeout_s=45.0"
    assert recorded[1]["eval_missing"] == [2] and recorded[1]["clients"] == 3
    sim = flower.simulate(cfg)
    assert _dropped(sim["history"]) == _dropped(recorded)
    assert recorded[0]["loss"] == sim["history"][0]["loss"]
    clients = flower.load_problem(flower.resolve_config(cfg))["clients"]
    alive = [evaluate(sim["model"], sim["state"], clients[c], torch.nn.functional.mse_loss) for c in (0, 1)]
    assert recorded[1]["loss"] == pytest.approx(combine(alive, [1.0, 1.0])[0], rel=1e-12)
    assert [h["floats_up"] for h in recorded] == [sum(h["floats_up"].values()) for h in sim["history"]]
