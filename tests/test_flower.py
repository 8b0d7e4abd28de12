"""The Flower engine (lrkit/fed/flower.py) against the in-process simulator: the same config gives the same
global model, the same per-round global loss and the same exchanged floats, bytes and client FLOPs.
Also the Flower App in configs/flower/ (its run config is DEFAULTS), config validation, and the launcher of real
SuperLink/SuperNode processes (a taken port is retried, readiness is read from the logs, nothing is left running after SIGTERM)."""
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
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


# One Ray at a time (xdist_group "ray"): two simulation engines starting side by side beside the other test
# workers on 2 cores have timed out Ray's fixed 30 s raylet start-up ("The current node timed out during startup").
@pytest.mark.xdist_group("ray")
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


@pytest.mark.xdist_group("ray")
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


def _free_port() -> int:
    """A port the OS has just handed out (bind port 0, read it back; flower-superlink refuses --port 0). Another
    process may take it before our server binds it: `Deployment.serve` then starts the server on another."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> tuple | None:
    """(ppid, pgid, state, start time) of a live process from /proc, None if gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ... starttime (22nd)
    return None if f[0] in "ZX" else (int(f[1]), int(f[2]), f[0], int(f[19]))


def descendants(pids) -> dict[int, int]:
    """{pid: start time} of `pids` and of every live process below them (children, their children, ...)."""
    stats = {int(d.name): st for d in Path("/proc").iterdir() if d.name.isdigit() and (st := _stat(int(d.name)))}
    out, todo = {}, [p for p in pids if p in stats]
    while todo:
        pid = todo.pop()
        out[pid] = stats[pid][3]
        todo += [c for c, st in stats.items() if st[0] == pid and c not in out]
    return out


def alive(tree: dict[int, int]) -> list[int]:
    """The pids of `tree` ({pid: start time}) still running (the same process: a reused pid has another start time)."""
    return [pid for pid, t0 in tree.items() if (st := _stat(pid)) is not None and st[3] == t0]


def stop_processes(procs, timeout_s: float = 20.0) -> None:
    """End `procs` (Popen objects, each started in a session of its own) and everything they started: SIGTERM to
    the process group of each and of every descendant (the SuperLink starts its SuperExec in a session of its own,
    and that one the ServerApp processes), SIGKILL to what is left after timeout_s. Our own process group is never
    signalled."""
    tree = descendants([p.pid for p in procs])

    def signal_all(sig, pids):
        groups = {st[1] for pid in pids if (st := _stat(pid))} - {os.getpgrp()}
        for g in groups:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in pids:  # a process in our own group, or one that left its group
            if (st := _stat(pid)) is not None and st[1] not in groups:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    def signal_own(sig):  # each of `procs` leads its own group (start_new_session); also where /proc is missing
        for p in procs:
            if p.poll() is None and p.pid != os.getpgrp():
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    signal_own(signal.SIGTERM)
    signal_all(signal.SIGTERM, alive(tree))
    deadline = time.monotonic() + timeout_s
    for p in procs:  # reap our children (a zombie is gone for alive())
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    while alive(tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(tree) or any(p.poll() is None for p in procs):
        signal_own(signal.SIGKILL)
        signal_all(signal.SIGKILL, alive(tree))
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


class Deployment:
    """A SuperLink and SuperNodes (partitions 0, 1, 2) as separate processes on loopback, each in a session of its
    own (the "die" fault drill kills a SuperNode's group from inside). `down` ends them and all they started; it
    runs at the end of the tests, at interpreter exit (atexit) and on SIGTERM (a CI time limit: the handler ends
    the deployment, then re-raises the signal), so no SuperLink, SuperNode or SuperExec outlives the launcher."""

    def __init__(self, tmp):
        self.tmp, self.bindir, self.procs, self.clients = Path(tmp), Path(sys.executable).parent, [], []
        self.env = os.environ | {"FLWR_HOME": str(self.tmp / "flwr"), "OMP_NUM_THREADS": "1",
                                 "PATH": f"{self.bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.port, self._done, self._handler = None, False, None  # _handler: the SIGTERM handler ours replaced
        (self.tmp / "flwr").mkdir(exist_ok=True)

    def _spawn(self, args, log):
        with open(self.tmp / log, "w") as out:
            return subprocess.Popen([str(self.bindir / args[0]), *args[1:]], env=self.env, cwd=self.tmp, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def serve(self, args_for_port, log, attempts=5, timeout_s=120.0):
        """Start a server (`args_for_port(port)`: its command line) on a free port and wait until its log says it
        listens there; if another process took the port first ("address already in use"), start it again on
        another. Returns the port."""
        for _ in range(attempts):
            port = _free_port()
            proc = self._spawn(args_for_port(port), log)
            self.procs.append(proc)
            ready, deadline = f"Uvicorn running on http://127.0.0.1:{port}", time.monotonic() + timeout_s
            while True:
                text = (self.tmp / log).read_text(errors="replace")
                if ready in text:
                    return port
                if "address already in use" in text or proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{args_for_port(port)[0]} not listening on port {port} after {timeout_s:.0f} s; "
                                       f"log {self.tmp / log}:\n{text[-3000:]}")
                time.sleep(0.1)
            status = proc.poll()  # None: alive, its bind failed
            self.procs.remove(proc)
            stop_processes([proc])
            if "address already in use" not in text:
                raise RuntimeError(f"{args_for_port(port)[0]} exited with status {status} before listening; "
                                   f"log {self.tmp / log}:\n{text[-3000:]}")
        raise RuntimeError(f"{args_for_port(port)[0]}: {attempts} free ports in a row were taken before it bound them")

    def up(self, supernodes=3):
        atexit.register(self.down)
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._handler = signal.SIG_DFL if previous is None else previous  # None: not set from Python
        self.port = self.serve(lambda p: ["flower-superlink", "--insecure", "--port", str(p)], "superlink.log")
        (self.tmp / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        for c in range(supernodes):
            self.serve(lambda p, c=c: ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                       "--port", str(p), "--node-config",
                                       f"partition-id={c} num-partitions={supernodes}"], f"supernode{c}.log")

    def _restore_sigterm(self):
        if self._handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handler)
            self._handler = None

    def _on_sigterm(self, signum, frame):
        """End the deployment, then re-raise: the previous handler acts (the default one terminates)."""
        self._restore_sigterm()
        self._done = True
        atexit.unregister(self.down)
        stop_processes(self.clients + self.procs)  # also when the signal came in the middle of `down`
        signal.raise_signal(signum)

    def run(self, run_config: str, name: str):
        """`flwr run configs/flower` with `run_config`; returns the recorded history."""
        from lrkit import records

        out = self.tmp / name
        proc = subprocess.Popen([str(self.bindir / "flwr"), "run", str(APP), "lab", "--stream", "--run-config",
                                 f"{run_config} report_dir='{out}'"], env=self.env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.clients.append(proc)
        try:
            stdout, stderr = proc.communicate(timeout=400)
        finally:
            stop_processes([proc])
            self.clients.remove(proc)
        logs = "\n".join((self.tmp / f).read_text()[-2000:] for f in ("superlink.log", "supernode0.log"))
        assert (out / "metrics.json").exists(), stdout[-3000:] + stderr[-3000:] + logs
        return next(iter(records.load(out)["runs"].values()))["history"]

    def down(self):
        if self._done:
            return
        self._done = True
        atexit.unregister(self.down)
        self._restore_sigterm()
        stop_processes(self.clients + self.procs)


def test_tests_run_with_one_torch_thread():
    """The exact comparisons here (engine against simulator, rtol 0) need one torch thread in this process, as in
    the Ray workers and SuperNodes (OMP_NUM_THREADS=1): tests/conftest.py sets it for every test module."""
    assert torch.get_num_threads() == 1


def test_a_server_whose_port_was_taken_starts_again_on_another(tmp_path, monkeypatch):
    """The race a free port leaves open: another process binds it before the SuperLink does. `serve` sees the bind
    fail in the log and starts the SuperLink on another port, and returns once the log says it listens there."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        first = [taken.getsockname()[1]]
        monkeypatch.setitem(globals(), "_free_port", lambda free=_free_port: first.pop() if first else free())
        d = Deployment(tmp_path)
        try:
            port = d.serve(lambda p: ["flower-superlink", "--insecure", "--port", str(p)], "superlink.log")
            assert port != taken.getsockname()[1] and not first
            assert len(d.procs) == 1 and d.procs[0].poll() is None  # the failed start was ended, not kept
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            tree = descendants([d.procs[0].pid])
            assert len(tree) == 2  # the SuperLink and its SuperExec
        finally:
            d.down()
    assert alive(tree) == []


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("flower"))
    try:
        d.up()
        yield d
    finally:
        d.down()


# One worker runs both (make test's pytest-xdist --dist loadgroup): they share the deployment's processes.
@pytest.mark.xdist_group("superlink")
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


@pytest.mark.xdist_group("superlink")
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


# The launcher of the next test, in a process of its own: a SuperLink and one SuperNode, then it waits to be ended.
LAUNCHER = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_flower import Deployment, descendants
d = Deployment(Path(sys.argv[1]))
d.up(supernodes=1)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:  # until the SuperLink and the SuperNode have each started their SuperExec
    tree = descendants([p.pid for p in d.procs])
    if sum("flower-superexec" in Path(f"/proc/{pid}/cmdline").read_text() for pid in tree) >= 2:
        break
    time.sleep(0.2)
(Path(sys.argv[1]) / "tree.json").write_text(json.dumps(tree))
time.sleep(600)
"""


@pytest.mark.slow
def test_sigterm_to_the_launcher_leaves_no_flower_process(tmp_path):
    """A test run ended by SIGTERM (a CI time limit) must not leave the SuperLink, SuperNodes and their SuperExecs
    running (each starts a session of its own, out of reach of the signal): the launcher's handler ends them all,
    then dies of the signal. Checked by pid (and start time, against a reused pid) of every process it had."""
    log = open(tmp_path / "launcher.log", "w")
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path), str(Path(__file__).parent)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    tree = {}
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "tree.json").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "launcher.log").read_text()
            time.sleep(0.2)
        time.sleep(0.2)  # written by one write_text call; let it finish
        tree = {int(k): v for k, v in json.loads((tmp_path / "tree.json").read_text()).items()}
        names = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in alive(tree)]
        commands = sorted(Path(n[1].decode()).name for n in names if len(n) > 1)
        assert commands == ["flower-superexec", "flower-superexec", "flower-superlink", "flower-supernode"], commands
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == -signal.SIGTERM  # it re-raised the signal after the cleanup
        assert alive(tree) == [], f"still running after the launcher's SIGTERM: {alive(tree)}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in alive(tree):
            os.kill(pid, signal.SIGKILL)


def test_ray_start_is_retried_on_its_startup_timeout_only(monkeypatch):
    """Ray's fixed 30 s wait for its raylet can run out on a loaded 2-core machine: run_flower's Ray start tries
    again (3 attempts, with a warning) on that error and on no other."""
    import ray

    calls = []

    def flaky(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) < 3:
            raise Exception("The current node timed out during startup. This could happen because ...")
        return "started"

    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "init", flaky)
    with pytest.warns(RuntimeWarning, match="attempt 2 of 3"), flower._patient_ray():
        assert ray.init(num_cpus=1) == "started"
    assert ray.init is flaky and calls == [{"num_cpus": 1}] * 3
    for error, tries in ((Exception("The current node timed out during startup."), 3),  # the third is raised
                         (ValueError("Invalid num_cpus"), 1)):  # not a start-up timeout: raised at once
        def failing(*args, error=error, **kwargs):
            calls.append(kwargs)
            raise error

        calls.clear()
        monkeypatch.setattr(ray, "init", failing)
        with flower._patient_ray(), pytest.raises(type(error), match=str(error)):
            ray.init()
        assert len(calls) == tries
