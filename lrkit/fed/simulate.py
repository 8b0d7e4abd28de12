"""In-process, deterministic federated simulator for FeDLRT (arXiv 2406.17887, Algorithm 1) and its
baselines FedAvg and FedLin (FedAvg with the FeDLRT/SCAFFOLD-style gradient correction on full weights),
as compared in the paper's Sec. 4.

One round loop serves all three: `drive_round` runs `fedlrt.server_round` against the clients, here in
this process one after the other (`lrkit.fed.flower` drives the same function over Flower messages).
Every tensor that crosses the network goes through a `Channel`, which counts its floats (numel) and bytes
(numel * element size) per client and direction, so the accounting is of what was exchanged, not of a
formula. Client FLOPs are analytic (see `forward_flops`); client wall
time is measured around each client computation (after `warm_up`: torch's one-off imports are not charged
to the first client). A FedAvg/FedLin round is a FeDLRT round with
dynamic_rank=False on a dense model: the client "coefficients" are then the full weights.

A run whose coefficients or global loss become non-finite stops there: its last record has NaN metrics
and `to_run_result` marks it diverged (as it does a run that ends with a higher training loss than its
untrained start), so sweeps over learning rates record a blow-up as a result instead of failing.

Record format (one dict per round; round 0 is the initial model, nothing exchanged):
  round, loss, accuracy (None for regression), test_loss / test_accuracy (if eval_data), ranks {layer: r},
  clients [ids], and per participating client {id: value}: floats_down, floats_up, bytes_down, bytes_up,
  flops, wall_time. A round with faults (`drive_round`) also has dropped_clients [{"client", "stage",
  "reason"}] and skipped (no client left: the global model is unchanged).
"""
from __future__ import annotations

import functools
import math
import time
import warnings
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lrkit.fed import fedlrt
from lrkit.fed.fedlrt import key
from lrkit.fed.layers import LowRankConv2d, LowRankLinear, low_rank_layers, to_low_rank

__all__ = ["Channel", "COSTS", "forward_flops", "layer_dims", "client_flops", "received_ranks", "drive_round",
           "build_model", "evaluate", "combine", "sample_participants", "run_fedlrt", "run_fedavg", "run_fedlin",
           "to_run_result", "FAULT_KINDS", "ClientDied", "check_faults", "run_client_step", "reply_fault",
           "fault_fields", "warm_up", "check_client_data"]


COSTS = ("floats_down", "floats_up", "bytes_down", "bytes_up", "flops", "wall_time")  # per client and round


class Channel:
    """The network of one round: records numel and nbytes of every tensor sent down (server -> client)
    or up (client -> server), per client, and hands the receiver its own copy."""

    def __init__(self):
        self.floats = defaultdict(lambda: {"down": 0, "up": 0})
        self.bytes = defaultdict(lambda: {"down": 0, "up": 0})

    def _send(self, client, message, direction):
        for v in message.values():
            self.floats[client][direction] += v.numel()
            self.bytes[client][direction] += v.numel() * v.element_size()
        return {k: v.detach().clone() for k, v in message.items()}

    def down(self, client, message: dict) -> dict:
        return self._send(client, message, "down")

    def up(self, client, message: dict) -> dict:
        return self._send(client, message, "up")


# ----------------------------------------------------------------------------------------------------
# analytic client FLOPs

def layer_dims(model: nn.Module, x: torch.Tensor) -> dict:
    """{layer: (n_in, n_out, positions, low_rank)} from one forward on one sample. positions = how often
    the layer's matrix is applied per sample: 1 for an MLP Linear, H_out * W_out for a Conv2d."""
    dims, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (LowRankLinear, LowRankConv2d)):
            n_in, n_out, lr = m.n_in, m.n_out, True
        elif isinstance(m, nn.Linear):
            n_in, n_out, lr = m.in_features, m.out_features, False
        elif isinstance(m, nn.Conv2d):
            n_in, n_out, lr = m.weight[0].numel(), m.out_channels, False  # (C_in / groups) k k
        else:
            continue
        hooks.append(m.register_forward_hook(
            lambda mod, inp, out, name=name, d=(n_in, n_out, lr): dims.__setitem__(
                name, (d[0], d[1], out.numel() // (out.shape[0] * d[1]), d[2]))))
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return dims


def forward_flops(dims: dict, ranks: dict) -> int:
    """Forward FLOPs per sample (2 per multiply-add; matrix layers only, activations/norms/loss ignored):
      dense layer      2 P n_in n_out
      low-rank layer   2 P (n_in r_in + r_in r_out + r_out n_out)   (x V, then S^T, then U^T)
    with ranks[layer] = (r_out, r_in) = columns of (U, V) as used, i.e. (r + k_U, r + k_V) when augmented.
    A gradient evaluation on b samples is charged 3 b forward_flops (backward ~ 2 x forward, the usual
    rule); a local step that only trains S_tilde is charged the same, an upper bound."""
    total = 0
    for name, (n_in, n_out, P, lr) in dims.items():
        if lr:
            r_out, r_in = ranks[name]
            total += 2 * P * (n_in * r_in + r_in * r_out + r_out * n_out)
        else:
            total += 2 * P * n_in * n_out
    return total


def received_ranks(received: dict, layers) -> dict:
    """{layer: (r_out, r_in)} of the factors a client holds: r plus the augmentation once U_bar arrived."""
    def cols(n, s):
        extra = received.get(key(n, s + "_bar"))
        return received[key(n, s)].shape[1] + (0 if extra is None else extra.shape[1])
    return {n: (cols(n, "U"), cols(n, "V")) for n in layers}


def client_flops(stage: str, dims: dict, received: dict, num_samples: int, knobs: dict) -> int:
    """Analytic FLOPs of one client stage (see `forward_flops`): a gradient on all local samples for
    "basis" and "correction", local_steps gradients on a minibatch (or all samples) for "coefficients"."""
    fwd = forward_flops(dims, received_ranks(received, [n for n, d in dims.items() if d[3]]))
    if stage == "coefficients":
        return knobs["local_steps"] * 3 * fwd * min(knobs["batch_size"] or num_samples, num_samples)
    return 3 * fwd * num_samples


# ----------------------------------------------------------------------------------------------------
# one round (FeDLRT; FedAvg/FedLin are the dense, fixed-rank case)

FAULT_KINDS = ("raise", "nan", "inf", "slow", "die")


class ClientDied(Exception):
    """The simulator's "die" drill: the client's process is gone, it answers nothing for the rest of the run."""


def check_faults(faults) -> list:
    """Validate a fault drill: a list of {"client": c, "round": t, "kind": one of FAULT_KINDS, "stage":
    one of fedlrt.STAGES (optional: every stage of that round), "seconds": s (kind "slow")}. "die": the
    client's process dies at that stage and never answers again (on Flower: its SuperNode is killed)."""
    faults = list(faults or ())
    for f in faults:
        if not isinstance(f, dict) or not {"client", "round", "kind"} <= set(f) or f["kind"] not in FAULT_KINDS:
            raise ValueError(f"Invalid fault: {f!r} (expected a dict with client, round and kind in {FAULT_KINDS})")
        if f.get("stage") is not None and f["stage"] not in fedlrt.STAGES:
            raise ValueError(f"Invalid fault stage: {f['stage']!r} (expected one of {fedlrt.STAGES} or None)")
        if f["kind"] == "slow" and not (isinstance(f.get("seconds"), (int, float)) and f["seconds"] > 0):
            raise ValueError(f"Invalid fault seconds: {f.get('seconds')!r} (a 'slow' fault needs seconds > 0)")
    return faults


def run_client_step(faults, c, t, stage, *args, die=None):
    """`fedlrt.client_step(stage, *args)` of client c in round t, with the injected faults of a drill
    (`check_faults`): "raise" raises, "nan"/"inf" poison the reply, "slow" sleeps first, "die" calls `die`
    (default: raise `ClientDied`). Both engines call it."""
    fault = next((f for f in faults or () if f["client"] == c and f["round"] == t
                  and f.get("stage") in (None, stage)), None)
    if fault and fault["kind"] == "slow":
        time.sleep(fault["seconds"])
    if fault and fault["kind"] == "die":
        if die is not None:
            die()
        raise ClientDied(f"client {c} died in round {t}, stage {stage}")
    if fault and fault["kind"] == "raise":
        raise RuntimeError(f"injected fault: client {c}, round {t}, stage {stage}")
    reply = fedlrt.client_step(stage, *args)
    if fault and fault["kind"] in ("nan", "inf"):
        k = next(iter(reply))
        reply = reply | {k: torch.full_like(reply[k], float(fault["kind"]))}
    return reply


@functools.cache
def warm_up(optimizer: str) -> None:
    """Pay, once per process and before any client's clock starts, the one-off cost of the first optimizer
    a client builds: torch imports torch._dynamo on the first `torch.optim` construction (about 1.5 s on 2
    CPU cores), which charged to client 0 of round 1 passed a deadline of about that size (a healthy client
    dropped in a fresh process). Both engines call it before timing a client stage."""
    p = torch.zeros(1, requires_grad=True)
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)([p], lr=0.0)
    p.grad = torch.zeros_like(p)
    opt.step()


def reply_fault(result, spent: float, client_timeout_s: float | None) -> str | None:
    """Why a client's stage result is left out of the aggregation, or None if it is valid: it raised (the
    engine hands a reason string), it holds a non-finite tensor, or the client's computation in this
    attempt of the round (`spent` before this stage, plus this stage) passed the deadline `client_timeout_s`."""
    if isinstance(result, str):
        return result
    reply, _, wall = result
    for k, v in reply.items():
        if not torch.isfinite(v).all():
            return f"non-finite reply: {k} has {'NaN' if torch.isnan(v).any() else 'Inf'}"
    if client_timeout_s is not None and spent + wall > client_timeout_s:
        return f"timed out: {spent + wall:.3f} s > client_timeout_s={client_timeout_s}"
    return None


def drive_round(state: dict, bounds: dict, knobs: dict, weights, participants: list, exchange,
                client_timeout_s: float | None = None) -> tuple:
    """One round of `fedlrt.server_round`, for any engine. Every stage's broadcast goes down and every
    valid reply comes up through a `Channel` (the accounting); `exchange(stage, delivered, attempt)` runs
    the stage on the clients, delivered = {client: its copy of the broadcast}, and returns {client:
    (reply, flops, wall_time)} or {client: "reason"} for a client that failed (raised, did not answer).

    Faults: a reply that failed, is non-finite or came after the deadline (`reply_fault`) leaves its
    client out for the rest of the round, and the aggregation weights renormalise over the clients left.
    The round then equals a round run with only those clients: a client dropped in the first stage is
    simply left out (that stage's broadcast is the global state, whoever takes part); one dropped later
    restarts the round (attempt + 1, clients reset what they hold) with the clients left, because the
    variance correction V_c = G - G_c is only unbiased when G averages the same clients as the S_tilde
    average: over that set mean_c V_c = 0, so the corrected local steps start along the gradient of
    exactly the clients averaged. Over another set the correction would drag the average towards the
    gradient of clients whose update is not in it (the same holds for the basis augmentation, which
    should span the averaged clients' gradients). The discarded attempt's traffic stays counted.
    A stage at which every client left replies non-finite is the training diverging (a too large lr blows
    up on every client), not a fault: it raises `fedlrt.Diverged`, which the simulator records as before.

    Returns (new global state, or None when no client gave a valid reply (the round is skipped),
    the round's per-client costs with keys `COSTS`, the dropped clients [{"client", "stage", "reason"}])."""
    ch = Channel()
    flops, wall = {c: 0 for c in participants}, {c: 0.0 for c in participants}
    weight = None if weights is None else dict(zip(participants, weights))
    active, dropped, attempt, new = list(participants), [], 0, None

    def protocol_for(clients):
        return fedlrt.server_round(state, bounds, knobs, None if weight is None else [weight[c] for c in clients])

    while active and new is None:
        protocol, first, spent = protocol_for(active), True, {c: 0.0 for c in active}
        stage, down = next(protocol)
        while True:
            results = exchange(stage, {c: ch.down(c, down) for c in active}, attempt)
            failed = {}
            for c in active:
                result = results.get(c, "no reply")
                if not isinstance(result, str):
                    flops[c] += result[1]
                    wall[c] += result[2]
                reason = reply_fault(result, spent[c], client_timeout_s)
                if reason is None:
                    spent[c] += result[2]
                else:
                    failed[c] = reason
            if active and len(failed) == len(active) and all(r.startswith("non-finite") for r in failed.values()):
                raise fedlrt.Diverged(f"Invalid {stage} replies: non-finite from every client {active} (training "
                                      "diverged; lower lr or local_steps)")
            for c, r in failed.items():  # recorded, and shown: a dropped client is a real error somewhere
                dropped.append({"client": c, "stage": stage, "reason": r})
                warnings.warn(f"FeDLRT client {c} left out of the round at stage {stage!r}: {r}", RuntimeWarning,
                              stacklevel=2)
            active = [c for c in active if c not in failed]
            if failed and (not first or not active):  # restart with the clients left (or skip the round)
                attempt += 1
                break
            if failed:  # first stage: the same broadcast, so the valid replies stand in a new protocol
                protocol = protocol_for(active)
                next(protocol)
            first = False
            try:
                stage, down = protocol.send([ch.up(c, results[c][0]) for c in active])
            except StopIteration as done:
                new = done.value
                break
    comm = {f"{q}_{d}": {c: getattr(ch, q)[c][d] for c in participants} for q in ("floats", "bytes")
            for d in ("down", "up")}
    return new, comm | {"flops": flops, "wall_time": wall}, dropped


def _round(sim, state, participants, t):
    """`drive_round` with the clients in this process, one after the other; each keeps what it received
    this round and its own last gradient reply (Flower: context.state), and forgets them when the round
    restarts. A client that raises is reported to `drive_round` as failed (`sim["faults"]`: a drill)."""
    model, data, knobs = sim["model"], sim["clients_data"], sim["knobs"]
    w = [len(data[c][0]) for c in participants] if sim["weighted"] else None
    held = {"attempt": 0, "received": {c: {} for c in participants}, "own": {c: None for c in participants}}

    def exchange(stage, delivered, attempt):
        if attempt != held["attempt"]:
            held.update(attempt=attempt, received={c: {} for c in participants}, own={c: None for c in participants})
        received, own = held["received"], held["own"]
        results = {}
        for c in delivered:
            if c in sim["dead"]:
                results[c] = "no reply: the client's process died"
                continue
            received[c] |= delivered[c]
            warm_up(knobs["optimizer"])  # once per process: the client's time is its work, not torch's imports
            t0 = time.perf_counter()
            try:
                reply = run_client_step(sim["faults"], c, t, stage, model, received[c], own[c], data[c],
                                        sim["loss_fn"], knobs, fedlrt.client_generator(sim["seed"], t, c))
            except ClientDied:
                sim["dead"].add(c)
                results[c] = "no reply: the client's process died"
                continue
            except Exception as e:  # a failing client is left out of the round, not the end of the run
                results[c] = f"raised {type(e).__name__}: {e}"
                continue
            if sim["device"].type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            if stage != "coefficients":
                own[c] = reply
            results[c] = (reply, client_flops(stage, sim["dims"], received[c], len(data[c][0]), knobs), wall)
        return results

    return drive_round(state, sim["bounds"], knobs, w, participants, exchange, sim["client_timeout_s"])


# ----------------------------------------------------------------------------------------------------
# the shared loop

def default_loss(y):
    """Cross-entropy for integer labels, mean squared error for real targets."""
    return F.cross_entropy if not torch.is_floating_point(y) else F.mse_loss


@torch.no_grad()
def evaluate(model, state: dict, data, loss_fn, chunk_size: int | None = None) -> tuple[float, float | None]:
    """(loss, accuracy) of the model holding `state` on one data set; accuracy None for real targets.
    chunk_size: forward at most that many samples at a time (memory only)."""
    X, y = data
    if chunk_size is None or chunk_size >= len(X):
        out = functional_call(model, state, (X,))
    else:
        out = torch.cat([functional_call(model, state, (X[i:i + chunk_size],))
                         for i in range(0, len(X), chunk_size)])
    acc = None if torch.is_floating_point(y) else float((out.argmax(-1) == y).float().mean())
    return float(loss_fn(out, y)), acc


def combine(results: list, weights) -> tuple[float, float | None]:
    """The global (loss, accuracy): the weights-normalised sum of per-client `evaluate` results."""
    w = np.asarray(weights, dtype=float) / np.sum(weights)
    loss, acc = 0.0, 0.0
    for wc, (l_c, a_c) in zip(w, results):
        loss += wc * l_c
        acc += wc * a_c if a_c is not None else 0.0
    return float(loss), (float(acc) if results[0][1] is not None else None)


def sample_participants(n_clients: int, client_fraction: float, generator: torch.Generator) -> list[int]:
    """The round's participants: all clients, or a seeded draw of round(fraction * n) (at least one)."""
    m = max(1, round(client_fraction * n_clients))
    if m == n_clients:
        return list(range(n_clients))
    return sorted(torch.randperm(n_clients, generator=generator)[:m].tolist())


def _check_run_args(clients_data, rounds, client_fraction) -> None:
    if not clients_data:
        raise ValueError("Invalid clients_data: empty (expected a list of (X, y) per client)")
    for c, d in enumerate(clients_data):
        check_client_data(c, d)
    if not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"Invalid rounds: {rounds!r} (expected an int >= 0)")
    if not 0 < client_fraction <= 1:
        raise ValueError(f"Invalid client_fraction: {client_fraction!r} (expected 0 < client_fraction <= 1)")


def check_client_data(c: int, data, what: str = "client") -> None:
    """Raise ValueError naming client `c` when its data cannot train: not an (X, y) pair of tensors, no
    sample, X and y of different lengths, or a NaN or infinite entry. Such data would otherwise reach the
    training as a NaN loss and be recorded as a diverged run (an lr problem) instead of a bad input."""
    name = f"{what} {c}" if what == "client" else what
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        raise ValueError(f"Invalid data of {name}: {type(data).__name__} (expected an (X, y) pair of tensors)")
    X, y = data
    if len(X) == 0:
        raise ValueError(f"Invalid data of {name}: no sample (X has shape {tuple(X.shape)}; expected at least "
                         "one (x, y) pair: leave a client without data out of clients_data)")
    if len(X) != len(y):
        raise ValueError(f"Invalid data of {name}: {len(X)} inputs but {len(y)} targets (expected as many)")
    for t_name, t in (("X", X), ("y", y)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            kind = "NaN" if torch.isnan(t).any() else "Inf"
            raise ValueError(f"Invalid data of {name}: {t_name} has {bad} non-finite entries ({kind}) of "
                             f"{t.numel()} (expected finite values: clean or drop them before training)")


def _simulate(model, clients_data, rounds, knobs, *, loss_fn, seed, client_fraction, weighted, eval_data, device,
              client_timeout_s=None, faults=None):
    _check_run_args(clients_data, rounds, client_fraction)
    if client_timeout_s is not None and not (isinstance(client_timeout_s, (int, float)) and client_timeout_s > 0):
        raise ValueError(f"Invalid client_timeout_s: {client_timeout_s!r} (expected seconds > 0, or None: no deadline)")
    faults = check_faults(faults)
    device = torch.device(device or "cpu")
    model = model.to(device)
    clients_data = [(X.to(device), y.to(device)) for X, y in clients_data]
    if eval_data is not None:
        check_client_data(0, eval_data, what="eval_data")
    eval_data = None if eval_data is None else tuple(t.to(device) for t in eval_data)
    loss_fn = loss_fn or default_loss(clients_data[0][1])
    sim = {"model": model, "clients_data": clients_data, "loss_fn": loss_fn, "knobs": knobs, "seed": seed,
           "weighted": weighted, "dims": layer_dims(model, clients_data[0][0]), "device": device,
           "client_timeout_s": client_timeout_s, "faults": faults, "dead": set(),
           "bounds": {n: (m.r_min, m.r_max) for n, m in low_rank_layers(model).items()}}
    n_clients = len(clients_data)
    pick = torch.Generator().manual_seed(seed)
    all_weights = [len(d[0]) for d in clients_data] if weighted else [1.0] * n_clients
    state = fedlrt.global_state(model)

    def record(t, participants, costs, dropped=()):
        chunk = knobs.get("chunk_size")
        loss, acc = combine([evaluate(model, state, d, loss_fn, chunk) for d in clients_data], all_weights)
        rec = {"round": t, "loss": loss, "accuracy": acc,
               "ranks": {n: state[key(n, "S")].shape[0] for n in sim["bounds"]}, "clients": participants}
        if eval_data is not None:
            rec["test_loss"], rec["test_accuracy"] = evaluate(model, state, eval_data, loss_fn, chunk)
        return rec | (costs or {k: {} for k in COSTS}) | fault_fields(dropped, len(participants))

    history, diverged_at = [record(0, [], None)], None
    for t in range(1, rounds + 1):
        participants = sample_participants(n_clients, client_fraction, pick)
        try:
            new, costs, dropped = _round(sim, state, participants, t)
        except (fedlrt.Diverged, torch.linalg.LinAlgError):  # non-finite coefficients, or an SVD that failed on them
            history.append(_diverged_record(t, participants, history[-1]["ranks"], eval_data is not None))
            diverged_at = t
            break
        state = state if new is None else new  # no valid reply: the round is skipped, the model unchanged
        history.append(record(t, participants, costs, dropped))
        if not math.isfinite(history[-1]["loss"]):
            diverged_at = t
            break
    return {"history": history, "state": state, "model": fedlrt.load_state(model, state), "device": str(device),
            "diverged_at": diverged_at}


def fault_fields(dropped, n_participants: int) -> dict:
    """The record fields of a round with faults (none in a round without: records of fault-free runs keep
    their format): dropped_clients [{"client", "stage", "reason"}], and skipped when no client was left."""
    if not dropped:
        return {}
    return {"dropped_clients": list(dropped), "skipped": len({d["client"] for d in dropped}) == n_participants}


def _diverged_record(t, participants, ranks, with_test) -> dict:
    """The record of the round in which training blew up: NaN metrics, nothing counted."""
    nan = float("nan")
    rec = {"round": t, "loss": nan, "accuracy": nan, "ranks": dict(ranks), "clients": participants}
    if with_test:
        rec["test_loss"], rec["test_accuracy"] = nan, nan
    return rec | {k: {} for k in COSTS}


def build_model(model_fn, seed: int, initial_rank=None, r_min=None, r_max=None, exclude=(), dense: bool = False):
    """model_fn() after torch.manual_seed(seed); unless `dense`, factorised with
    `to_low_rank(model, initial_rank, exclude, r_min or 1, r_max)` (a model that already has low-rank
    layers is used as is, and then initial_rank, r_min, r_max and exclude must be left unset)."""
    torch.manual_seed(seed)
    model = model_fn()
    if dense:
        if low_rank_layers(model):
            raise ValueError("Invalid model_fn: it returns low-rank layers (FedAvg/FedLin train dense weights)")
        return model
    if low_rank_layers(model):
        given = {k: v for k, v in dict(initial_rank=initial_rank, r_min=r_min, r_max=r_max, exclude=exclude or None)
                 .items() if v is not None}
        if given:  # silently ignoring them would train with bounds the caller did not ask for
            raise ValueError(f"Invalid {given}: model_fn already returns low-rank layers; set rank, r_min and "
                             "r_max on the layers (expected None here)")
        return model
    if initial_rank is None:
        raise ValueError("Invalid initial_rank: None (expected a positive int to factorise the dense model)")
    return to_low_rank(model, initial_rank, exclude, r_min or 1, r_max)


def run_fedlrt(model_fn, clients_data, rounds, *, lr=0.1, local_steps=1, variance_correction="full",
               dynamic_rank=True, initial_rank=None, tau=0.1, r_min=None, r_max=None, exclude=(),
               optimizer="sgd", batch_size=None, loss_fn=None, seed=0, client_fraction=1.0, weighted=False,
               eval_data=None, device=None, chunk_size=None, client_timeout_s=None, faults=None) -> dict:
    """FeDLRT (docs/methods.md, section 3). The model is `build_model(model_fn, seed, initial_rank, r_min,
    r_max, exclude)`: a dense model_fn() is factorised at initial_rank, the layers in `exclude` kept dense.
    clients_data is a list of (X, y) tensors, each with at least one sample and finite (else a ValueError
    naming the client, `check_client_data`). batch_size=None: every local step uses the client's whole
    local data (deterministic gradient descent, as in the paper's analysis). weighted=True weights the
    aggregation and the global loss by client sample counts, else the plain mean.
    variance_correction: "full" (docs/methods.md, section 3, step 5), "simplified" (the kit's reading: correction on the
    r x r block only, from dL_c/dS sent with the basis gradients), or "none". device: where the model and
    the data live ("cpu" when None; "cuda" for the gpu profile); the accounting does not depend on it.
    chunk_size: samples per forward pass when a gradient or an evaluation covers all local data (memory
    only; None: all at once).
    Faults (`drive_round`): a client that raises, replies a non-finite tensor or computes for longer than
    client_timeout_s seconds in a round (None: no deadline) is left out of that round, which records it
    in "dropped_clients"; a round left with no client is "skipped" (global model unchanged). `faults` is
    a fault drill, injected failures (`check_faults`), for tests.
    Returns {"history": [per-round records], "state": final global state, "model": model holding it,
    "device"}.
    """
    fedlrt.validate_knobs(variance_correction, dynamic_rank, initial_rank, tau, local_steps, lr, optimizer,
                          batch_size, chunk_size)
    model = build_model(model_fn, seed, initial_rank, r_min, r_max, exclude)
    knobs = dict(variance_correction=variance_correction, dynamic_rank=dynamic_rank, tau=tau,
                 local_steps=local_steps, lr=lr, optimizer=optimizer, batch_size=batch_size, chunk_size=chunk_size)
    return _simulate(model, clients_data, rounds, knobs, loss_fn=loss_fn, seed=seed,
                     client_fraction=client_fraction, weighted=weighted, eval_data=eval_data, device=device,
                     client_timeout_s=client_timeout_s, faults=faults)


def _run_dense(model_fn, clients_data, rounds, correction, lr, local_steps, optimizer, batch_size, loss_fn,
               seed, client_fraction, weighted, eval_data, device, chunk_size, client_timeout_s, faults):
    fedlrt.validate_knobs(local_steps=local_steps, lr=lr, optimizer=optimizer, batch_size=batch_size,
                          chunk_size=chunk_size)
    model = build_model(model_fn, seed, dense=True)
    knobs = dense_knobs(correction, lr, local_steps, optimizer, batch_size) | {"chunk_size": chunk_size}
    return _simulate(model, clients_data, rounds, knobs, loss_fn=loss_fn, seed=seed,
                     client_fraction=client_fraction, weighted=weighted, eval_data=eval_data, device=device,
                     client_timeout_s=client_timeout_s, faults=faults)


def dense_knobs(correction, lr, local_steps, optimizer, batch_size) -> dict:
    """FedAvg ("none") / FedLin ("full") as FeDLRT knobs on a dense model: fixed rank, no truncation."""
    return dict(variance_correction=correction, dynamic_rank=False, tau=0.0, local_steps=local_steps, lr=lr,
                optimizer=optimizer, batch_size=batch_size)


def run_fedavg(model_fn, clients_data, rounds, *, lr=0.1, local_steps=1, optimizer="sgd", batch_size=None,
               loss_fn=None, seed=0, client_fraction=1.0, weighted=False, eval_data=None, device=None,
               chunk_size=None, client_timeout_s=None, faults=None) -> dict:
    """FedAvg (McMahan et al. 2017): broadcast W, local_steps steps on full weights, average. Same
    record format and faults as run_fedlrt; per client and round n_params floats down and n_params up."""
    return _run_dense(model_fn, clients_data, rounds, "none", lr, local_steps, optimizer, batch_size, loss_fn,
                      seed, client_fraction, weighted, eval_data, device, chunk_size, client_timeout_s, faults)


def run_fedlin(model_fn, clients_data, rounds, *, lr=0.1, local_steps=1, optimizer="sgd", batch_size=None,
               loss_fn=None, seed=0, client_fraction=1.0, weighted=False, eval_data=None, device=None,
               chunk_size=None, client_timeout_s=None, faults=None) -> dict:
    """FedLin (Mitra et al. 2021): FedAvg plus the correction V_c = grad L - grad L_c at the round's start,
    on full weights; one extra exchange of gradients (n_params up, n_params down)."""
    return _run_dense(model_fn, clients_data, rounds, "full", lr, local_steps, optimizer, batch_size, loss_fn,
                      seed, client_fraction, weighted, eval_data, device, chunk_size, client_timeout_s, faults)


def to_run_result(name: str, result: dict, config: dict, wall_time_s: float = 0.0):
    """A simulator result as a `lrkit.records.RunResult` for `records.save_run`.

    history: per round the scalar metrics, ranks, and the per-client costs summed over the participating
    clients (floats_*, bytes_*, flops, wall_time) plus bytes_per_client (down + up, mean over them).
    final: the last round's metrics, the mean bytes_per_client and flops_per_client over rounds >= 1 (the
    rounds that completed), and ``diverged``: the training loss became non-finite (the run stopped) or
    ended above the untrained model's (round 0). A run with faults keeps each round's dropped_clients and
    skipped in its history and counts them in final (dropped_clients: events, skipped_rounds)."""
    from lrkit.records import RunResult
    from lrkit.utils import device_info

    history = []
    for rec in result["history"]:
        row = {k: v for k, v in rec.items() if not isinstance(v, dict) and k != "clients"}
        row["ranks"] = dict(rec["ranks"])
        row["clients"] = len(rec["clients"])
        for k in COSTS:
            row[k] = sum(rec[k].values())
        n = max(1, len(rec["clients"]))
        row["bytes_per_client"] = (row["bytes_down"] + row["bytes_up"]) / n
        row["flops_per_client"] = row["flops"] / n
        history.append(row)
    rounds = [h for h in history[1:] if math.isfinite(h["loss"])] or history[:1]
    final = {k: v for k, v in history[-1].items() if k not in ("round", "clients")}
    loss, start = history[-1]["loss"], history[0]["loss"]
    dropped = [d for h in history for d in h.get("dropped_clients", ())]
    if dropped:  # fault counts only where there were faults (fault-free records keep their format)
        final.pop("dropped_clients", None)
        final.pop("skipped", None)
        final |= {"dropped_clients": len(dropped), "skipped_rounds": sum(bool(h.get("skipped")) for h in history)}
    final["diverged"] = bool(result.get("diverged_at") is not None or not math.isfinite(loss) or loss > start)
    final |= {"rounds": history[-1]["round"],
              "bytes_per_client_round": float(np.mean([h["bytes_per_client"] for h in rounds])),
              "flops_per_client_round": float(np.mean([h["flops_per_client"] for h in rounds]))}
    info = device_info(result.get("device", "cpu"))
    return RunResult(name=name, config=dict(config), seed=int(config.get("seed", 0)), device=info["device"],
                     device_name=info["device_name"], history=history, final=final, wall_time_s=float(wall_time_s),
                     memory={})
