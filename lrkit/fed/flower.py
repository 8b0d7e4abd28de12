"""The Flower engine: FeDLRT's round as Flower messages (flwr >= 1.20, Message API).

The round is the one the in-process simulator runs: `fedlrt.server_round` on the server, `fedlrt.client_step`
on the clients. Here every stage is one Message per participating client, of type "train.<stage>" (stages
"basis", "correction", "coefficients"): content {"arrays": the broadcast tensors, "config": round, stage
and the run's config}. The client keeps what it received this round and its own last gradient reply in
`context.state` (nothing is sent twice) and replies {"arrays": its tensors, "metrics": flops, wall time}.
Accounting is of the tensors actually in the messages, counted by the server as the simulator's `Channel`
counts them; the config records (a few hundred bytes of scalars) and evaluation messages are not counted.

Both engines read one flat config (`DEFAULTS`; in a Flower App, `[tool.flwr.app.config]`):
  `simulate(config)`       the in-process simulator (`lrkit.fed.simulate`)
  `run_flower(config)`     Flower's simulation engine (Ray), `num_clients` virtual SuperNodes
  `server_app`, `client_app`  module-level apps for `flwr run` on a real SuperLink and SuperNodes; every
                           SuperNode needs `--node-config "partition-id=<c> num-partitions=<N>"` (README).
Each client loads its own partition: client c of `problem` is partition c of the data, built from the seed.
"""
from __future__ import annotations

import contextlib
import functools
import json
import time
import warnings

import torch
from torch import nn

from lrkit.fed import fedlrt, problems
from lrkit.fed.fedlrt import key
from lrkit.fed.layers import low_rank_layers
from lrkit.fed.simulate import (COSTS, build_model, check_faults, client_flops, combine, default_loss, dense_knobs,
                                drive_round, evaluate, fault_fields, layer_dims, run_client_step, run_fedavg,
                                run_fedlin, run_fedlrt, sample_participants, warm_up)

__all__ = ["DEFAULTS", "METHODS", "PROBLEMS", "resolve_config", "load_problem", "simulate", "run_flower",
           "make_server_app", "make_client_app", "server_app", "client_app"]

METHODS = ("fedlrt", "fedavg", "fedlin")
PROBLEMS = ("least_squares", "fashion_mnist")

DEFAULTS = {
    # the run
    "method": "fedlrt", "rounds": 5, "seed": 0, "client_fraction": 1.0, "weighted": False,
    "lr": 0.05, "local_steps": 5, "optimizer": "sgd", "batch_size": 0,  # 0: all local data each step
    # FeDLRT
    "variance_correction": "full", "dynamic_rank": True, "initial_rank": 2, "tau": 0.01,
    "r_min": 1, "r_max": 0, "exclude": "",  # r_max 0: no cap; exclude: comma-separated layer names
    # the problem: client c loads partition c
    "problem": "least_squares", "num_clients": 2,
    "n": 8, "rank": 2, "samples_per_client": 10, "heterogeneity": 0.5, "noise": 1.0,  # least_squares
    "train_size": 3000, "test_size": 1000, "alpha": 0.5, "hidden": 64,  # fashion_mnist (MLP, head dense)
    # faults (lrkit.fed.simulate.drive_round): a client computing longer than client_timeout_s in a round is
    # dropped from it (both engines; 0: no deadline); Flower waits at most round_timeout_s for the replies of
    # a stage (0: for all of them); faults: a fault drill, JSON list of lrkit.fed.simulate.check_faults dicts
    "client_timeout_s": 0.0, "round_timeout_s": 0.0, "faults": "",
    # where the ServerApp writes its run record (lrkit.records), "" for none
    "report_dir": "",
}


def resolve_config(config: dict | None = None) -> dict:
    """DEFAULTS updated with `config`; unknown keys and bad values raise ValueError naming them."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"Invalid config keys: {unknown} (expected keys of lrkit.fed.flower.DEFAULTS: "
                         f"{sorted(DEFAULTS)})")
    cfg = DEFAULTS | config
    if cfg["method"] not in METHODS:
        raise ValueError(f"Invalid method: {cfg['method']!r} (expected one of {METHODS})")
    if cfg["problem"] not in PROBLEMS:
        raise ValueError(f"Invalid problem: {cfg['problem']!r} (expected one of {PROBLEMS})")
    if not isinstance(cfg["num_clients"], int) or cfg["num_clients"] < 1:
        raise ValueError(f"Invalid num_clients: {cfg['num_clients']!r} (expected an int >= 1)")
    fedlrt.validate_knobs(**_knobs(cfg) | {"initial_rank": cfg["initial_rank"]})
    for k in ("client_timeout_s", "round_timeout_s"):
        if not (isinstance(cfg[k], (int, float)) and cfg[k] >= 0):
            raise ValueError(f"Invalid {k}: {cfg[k]!r} (expected seconds >= 0; 0: no deadline)")
    _faults(cfg)
    return cfg


def _faults(cfg: dict) -> list:
    """The config's fault drill, a JSON list (`lrkit.fed.simulate.check_faults`); [] for ""."""
    try:
        faults = json.loads(cfg["faults"]) if cfg["faults"] else []
    except (TypeError, json.JSONDecodeError):
        raise ValueError(f"Invalid faults: {cfg['faults']!r} (expected a JSON list of fault dicts, or \"\")") from None
    return check_faults(faults)


def _knobs(cfg: dict) -> dict:
    batch_size = cfg["batch_size"] or None
    if cfg["method"] == "fedlrt":
        return dict(variance_correction=cfg["variance_correction"], dynamic_rank=bool(cfg["dynamic_rank"]),
                    tau=cfg["tau"], local_steps=cfg["local_steps"], lr=cfg["lr"], optimizer=cfg["optimizer"],
                    batch_size=batch_size)
    return dense_knobs("full" if cfg["method"] == "fedlin" else "none", cfg["lr"], cfg["local_steps"],
                       cfg["optimizer"], batch_size)


def _problem_key(cfg: dict) -> str:
    names = ("problem", "num_clients", "seed", "n", "rank", "samples_per_client", "heterogeneity", "noise",
             "train_size", "test_size", "alpha", "hidden")
    return json.dumps({k: cfg[k] for k in names}, sort_keys=True)


@functools.lru_cache(maxsize=4)
def _load_problem(problem_key: str) -> dict:
    p = json.loads(problem_key)
    if p["problem"] == "least_squares":
        ls = problems.least_squares(n=p["n"], rank=p["rank"], num_clients=p["num_clients"],
                                    samples_per_client=p["samples_per_client"], heterogeneity=p["heterogeneity"],
                                    noise=p["noise"], seed=p["seed"])
        n = p["n"]
        return {"clients": ls["clients"], "eval_data": None, "model_fn": lambda: nn.Linear(n, n, bias=False)}
    images = problems.image_classification("fashion_mnist", p["train_size"], p["test_size"], seed=p["seed"])
    clients = problems.dirichlet_clients(images["X"], images["y"], p["num_clients"], p["alpha"], seed=p["seed"])
    return {"clients": clients, "eval_data": (images["X_test"], images["y_test"]), "default_exclude": "2",
            "model_fn": problems.mlp(images["X"].shape[1], p["hidden"])}


def load_problem(cfg: dict) -> dict:
    """{"clients": [(X_c, y_c)], "eval_data": (X, y) or None, "model_fn"} of a resolved config (cached)."""
    return _load_problem(_problem_key(cfg))


def _model(cfg: dict) -> nn.Module:
    """The run's initial model, built identically by the server and every client (same seed)."""
    p = load_problem(cfg)
    if cfg["method"] != "fedlrt":
        return build_model(p["model_fn"], cfg["seed"], dense=True)
    exclude = [e for e in (cfg["exclude"] or p.get("default_exclude", "")).split(",") if e]
    return build_model(p["model_fn"], cfg["seed"], cfg["initial_rank"], cfg["r_min"], cfg["r_max"] or None, exclude)


@functools.lru_cache(maxsize=8)
def _client_model(cfg_json: str, partition: int) -> tuple:
    """(model, layer dims) of a client, built once per run and process: the message supplies every weight
    (functional_call), so only the structure and the analytic FLOPs' dimensions are needed."""
    cfg = json.loads(cfg_json)
    model = _model(cfg)
    return model, layer_dims(model, load_problem(cfg)["clients"][partition][0])


def simulate(config: dict | None = None) -> dict:
    """The in-process simulator on the same config: the reference for `run_flower`."""
    cfg = resolve_config(config)
    p = load_problem(cfg)
    k = _knobs(cfg)
    common = dict(lr=k["lr"], local_steps=k["local_steps"], optimizer=k["optimizer"], batch_size=k["batch_size"],
                  seed=cfg["seed"], client_fraction=cfg["client_fraction"], weighted=bool(cfg["weighted"]),
                  eval_data=p["eval_data"], client_timeout_s=cfg["client_timeout_s"] or None, faults=_faults(cfg))
    if cfg["method"] == "fedavg":
        return run_fedavg(p["model_fn"], p["clients"], cfg["rounds"], **common)
    if cfg["method"] == "fedlin":
        return run_fedlin(p["model_fn"], p["clients"], cfg["rounds"], **common)
    model = _model(cfg)
    return run_fedlrt(lambda: model, p["clients"], cfg["rounds"], variance_correction=k["variance_correction"],
                      dynamic_rank=k["dynamic_rank"], tau=k["tau"], **common)


# ----------------------------------------------------------------------------------------------------
# the apps

def _record(tensors: dict):
    from flwr.app import ArrayRecord

    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _tensors(record) -> dict:
    return dict(record.to_torch_state_dict())


def make_client_app():
    """The ClientApp: "query.info" (its partition id), "train.<stage>" (one protocol stage) and
    "evaluate" (loss and accuracy of a global state on its data)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def partition(context: Context) -> int:
        if "partition-id" not in context.node_config:
            raise ValueError("Invalid node config: no 'partition-id' (start the SuperNode with --node-config "
                             "\"partition-id=<c> num-partitions=<N>\")")
        return int(context.node_config["partition-id"])

    @app.query("info")
    def info(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"info": ConfigRecord({"partition-id": partition(context)})}), reply_to=msg)

    def stage(msg: Message, context: Context) -> Message:
        cfg_json = msg.content["config"]["config"]
        cfg = json.loads(cfg_json)
        t, name, c = int(msg.content["config"]["round"]), msg.content["config"]["stage"], partition(context)
        data = load_problem(cfg)["clients"][c]
        model, dims = _client_model(cfg_json, c)
        st, attempt = context.state, int(msg.content["config"]["attempt"])
        if "round" not in st or (st["round"]["round"], st["round"]["attempt"]) != (t, attempt):
            # a new round, or the round restarted after a fault: forget what was held
            st["round"], st["received"], st["own"] = (ConfigRecord({"round": t, "attempt": attempt}), ArrayRecord(),
                                                      ArrayRecord())
        received = _tensors(st["received"]) | _tensors(msg.content["arrays"])
        own = _tensors(st["own"]) or None
        knobs = _knobs(cfg)
        warm_up(knobs["optimizer"])  # once per SuperNode process: torch's first-optimizer imports are not its work
        t0 = time.perf_counter()
        reply = run_client_step(_faults(cfg), c, t, name, model, received, own, data, default_loss(data[1]), knobs,
                                fedlrt.client_generator(cfg["seed"], t, c), die=_die)
        wall = time.perf_counter() - t0
        flops = client_flops(name, dims, received, len(data[0]), knobs)
        st["received"] = _record(received)
        if name != "coefficients":
            st["own"] = _record(reply)
        return Message(RecordDict({"arrays": _record(reply),
                                   "metrics": MetricRecord({"flops": flops, "wall_time": wall})}), reply_to=msg)

    for s in fedlrt.STAGES:
        app.train(s)(stage)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        cfg_json, c = msg.content["config"]["config"], partition(context)
        data = load_problem(json.loads(cfg_json))["clients"][c]
        loss, acc = evaluate(_client_model(cfg_json, c)[0], _tensors(msg.content["arrays"]), data,
                             default_loss(data[1]))
        metrics = {"loss": loss} | ({"accuracy": acc} if acc is not None else {})
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def _die() -> None:
    """The "die" fault drill on a real SuperNode: SIGKILL the process group the ClientApp runs in, i.e. its
    SuperNode with the SuperNode's SuperExec and ClientApp processes (start a drilled SuperNode in a session
    of its own, as tests/test_flower.py does, so nothing else shares the group)."""
    import os
    import signal

    os.killpg(os.getpgid(0), signal.SIGKILL)


def make_server_app(config: dict | None = None, sink: dict | None = None):
    """The ServerApp. `config` None: read Flower's run config (`flwr run`, [tool.flwr.app.config]);
    `sink`: a dict that receives {"history", "state"} at the end (in-process use, `run_flower`).

    Faults: a client whose reply is a Flower error (its ClientApp raised, its node is unavailable), that
    does not reply within round_timeout_s, or whose reply is non-finite or late (client_timeout_s) is left
    out of the round by `drive_round`, exactly as in the simulator; the record lists it in dropped_clients.
    A client that does not answer the evaluation (or that let a training stage of the round pass
    round_timeout_s unanswered, so not asked) is left out of that round's global loss (eval_missing)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = resolve_config(config if config is not None else dict(context.run_config))
        p = load_problem(cfg)
        n_clients, model = cfg["num_clients"], _model(cfg)
        node = _partitions(grid, n_clients)  # partition id -> node id
        bounds = {n: (m.r_min, m.r_max) for n, m in low_rank_layers(model).items()}
        knobs, cfg_json = _knobs(cfg), json.dumps(cfg)
        weights = [len(d[0]) for d in p["clients"]] if cfg["weighted"] else [1.0] * n_clients
        loss_fn = default_loss(p["clients"][0][1])
        timeout = cfg["round_timeout_s"] or None

        def send(clients, content_of, message_type, t) -> dict:
            """{client: reply content, or the reason it failed}, waiting at most round_timeout_s."""
            msgs = {c: Message(content_of(c), dst_node_id=node[c], message_type=message_type, group_id=str(t))
                    for c in clients}
            replies = send_and_receive(grid, list(msgs.values()), timeout)
            by_id = {r.metadata.reply_to_message_id: r for r in replies}  # error replies come from the SuperLink
            out = {}
            for c, m in msgs.items():
                r = by_id.get(m.metadata.message_id)
                out[c] = (f"no reply within round_timeout_s={timeout}" if r is None else
                          f"Flower error {r.error.code}: {r.error.reason}" if r.has_error() else r.content)
            return out

        def config_record(t, stage="", attempt=0):
            return ConfigRecord({"round": t, "stage": stage, "attempt": attempt, "config": cfg_json})

        def record(t, state, participants, costs, dropped=()):
            arrays = _record(state)
            # a client that let a stage pass round_timeout_s unanswered is not waited for again this round
            gone = {d["client"] for d in dropped if d["reason"].startswith("no reply")}
            res = send([c for c in range(n_clients) if c not in gone],
                       lambda c: RecordDict({"arrays": arrays, "config": config_record(t)}), "evaluate", t)
            answered = [c for c in res if not isinstance(res[c], str)]
            per_client = [(res[c]["metrics"]["loss"], res[c]["metrics"].get("accuracy")) for c in answered]
            loss, acc = combine(per_client, [weights[c] for c in answered]) if answered else (float("nan"), None)
            rec = {"round": t, "loss": loss, "accuracy": acc,
                   "ranks": {n: state[key(n, "S")].shape[0] for n in bounds}, "clients": participants}
            if len(answered) < n_clients:
                rec["eval_missing"] = [c for c in range(n_clients) if c not in answered]
            if p["eval_data"] is not None:  # the server's own test set, as in the simulator
                rec["test_loss"], rec["test_accuracy"] = evaluate(model, state, p["eval_data"], loss_fn)
            return rec | (costs or {k: {} for k in COSTS}) | fault_fields(dropped, len(participants))

        state = fedlrt.global_state(model)
        pick = torch.Generator().manual_seed(cfg["seed"])
        history = [record(0, state, [], None)]
        for t in range(1, cfg["rounds"] + 1):
            participants = sample_participants(n_clients, cfg["client_fraction"], pick)
            w = [weights[c] for c in participants] if cfg["weighted"] else None

            def exchange(stage, delivered, attempt):  # the broadcast is the same for every client: serialise once
                arrays = _record(next(iter(delivered.values())))
                res = send(list(delivered), lambda c: RecordDict({"arrays": arrays,
                                                                  "config": config_record(t, stage, attempt)}),
                           f"train.{stage}", t)
                return {c: r if isinstance(r, str) else
                        (_tensors(r["arrays"]), int(r["metrics"]["flops"]), float(r["metrics"]["wall_time"]))
                        for c, r in res.items()}

            new, costs, dropped = drive_round(state, bounds, knobs, w, participants, exchange,
                                              cfg["client_timeout_s"] or None)
            state = state if new is None else new  # no valid reply: the round is skipped
            history.append(record(t, state, participants, costs, dropped))
        result = {"history": history, "state": state}
        if sink is not None:
            sink.update(result)
        if cfg["report_dir"]:
            from lrkit import records
            from lrkit.fed.simulate import to_run_result

            records.save_run(cfg["report_dir"], to_run_result(f"flower {cfg['method']}", result, cfg))

    return app


def send_and_receive(grid, messages: list, timeout: float | None, poll_s: float = 0.1) -> list:
    """``grid.send_and_receive`` with a short poll: push ``messages``, then pull their replies every ``poll_s``
    seconds until all are in or ``timeout`` seconds have passed (None: no limit). Flower's own pulls every 3 s,
    which adds 1.5 s on average to every stage of every round on a real SuperLink."""
    pending = set(grid.push_messages(messages))
    end, replies = time.monotonic() + (timeout or 0.0), []
    while pending and (timeout is None or time.monotonic() < end):
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {r.metadata.reply_to_message_id for r in got}
        if pending:
            time.sleep(poll_s)
    return replies


def _partitions(grid, n_clients: int, timeout_s: float = 120.0) -> dict:
    """Ask the connected nodes for their partition ids until partitions 0..n_clients-1 all have a node
    (extra nodes are left idle; a node that does not answer is asked again while time is left; each message
    may start a ClientApp process on the node, seconds under load)."""
    from flwr.app import Message, RecordDict

    t0, part, asked = time.monotonic(), {}, set()
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            replies = send_and_receive(grid, [Message(RecordDict(), dst_node_id=n, message_type="query.info")
                                              for n in new], max(1.0, timeout_s - (time.monotonic() - t0)))
            for r in replies:
                if not r.has_error():
                    part.setdefault(int(r.content["info"]["partition-id"]), r.metadata.src_node_id)
                    asked.add(r.metadata.src_node_id)
        missing = sorted(set(range(n_clients)) - set(part))
        if not missing:
            return {c: part[c] for c in range(n_clients)}
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"No SuperNode holds partitions {missing} of num_clients={n_clients} after "
                               f"{timeout_s:.0f} s (got partition ids {sorted(part)})")
        time.sleep(1.0)


@contextlib.contextmanager
def _patient_ray(attempts: int = 3):
    """Ray waits a fixed 30 s for its raylet to register; on a loaded machine (2 cores and other jobs) that start
    can time out. While the simulation engine starts Ray, its ``ray.init`` tries up to ``attempts`` times on that
    error (with a warning), then raises it."""
    import ray

    init = ray.init

    def patient_init(*args, **kwargs):
        for attempt in range(1, attempts + 1):
            try:
                return init(*args, **kwargs)
            except Exception as e:
                if "timed out during startup" not in str(e) or attempt == attempts:
                    raise
                ray.shutdown()
                warnings.warn(f"Ray's start timed out (attempt {attempt} of {attempts}); starting it again",
                              RuntimeWarning, stacklevel=2)

    ray.init = patient_init
    try:
        yield
    finally:
        ray.init = init


def run_flower(config: dict | None = None, backend_config: dict | None = None) -> dict:
    """Run `config` through Flower's simulation engine with num_clients virtual SuperNodes. Returns
    {"history", "state", "model"} in the simulator's format (`lrkit.fed.simulate.to_run_result` takes it)."""
    from flwr.simulation import run_simulation

    cfg = resolve_config(config)
    if any(f["kind"] == "die" for f in _faults(cfg)):
        raise ValueError("Invalid faults: kind 'die' kills the client's process group (real SuperNodes, `flwr run`), "
                         "not a simulation engine's worker (expected raise, nan, inf or slow here)")
    sink: dict = {}
    backend_config = backend_config or {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                        "init_args": {"num_cpus": 1, "include_dashboard": False}}
    with _patient_ray():
        run_simulation(server_app=make_server_app(cfg, sink), client_app=make_client_app(),
                       num_supernodes=cfg["num_clients"], backend_config=backend_config)
    if "state" not in sink:
        raise RuntimeError("The Flower run ended without a result (see the Flower log above)")
    return sink | {"model": fedlrt.load_state(_model(cfg), sink["state"]), "device": "cpu"}


def __getattr__(name):  # module-level apps for `flwr run`, built on first use (flwr is imported lazily)
    if name == "server_app":
        return make_server_app()
    if name == "client_app":
        return make_client_app()
    raise AttributeError(name)
