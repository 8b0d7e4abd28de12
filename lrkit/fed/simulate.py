"""In-process, deterministic federated simulator for FeDLRT (arXiv 2406.17887, Algorithm 1) and its
baselines FedAvg and FedLin (FedAvg with the FeDLRT/SCAFFOLD-style gradient correction on full weights),
as compared in the paper's Sec. 4.

One round loop serves all three. Every tensor that crosses the network goes through a `Channel`, which
counts its floats (numel) and bytes (numel * element size) per client and direction, so the accounting is
of what was exchanged, not of a formula. Client FLOPs are analytic (see `forward_flops`); client wall
time is measured around each client computation. A FedAvg/FedLin round is a FeDLRT round with
dynamic_rank=False on a dense model: the client "coefficients" are then the full weights.

Record format (one dict per round; round 0 is the initial model, nothing exchanged):
  round, loss, accuracy (None for regression), test_loss / test_accuracy (if eval_data), ranks {layer: r},
  clients [ids], and per participating client {id: value}: floats_down, floats_up, bytes_down, bytes_up,
  flops, wall_time.
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lrkit.fed import fedlrt
from lrkit.fed.fedlrt import key
from lrkit.fed.layers import LowRankConv2d, LowRankLinear, low_rank_layers, to_low_rank

__all__ = ["Channel", "forward_flops", "layer_dims", "run_fedlrt", "run_fedavg", "run_fedlin", "to_run_result"]


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


def _ranks(state, layers, bars=None):
    k = (lambda n, s: bars[key(n, s + "_bar")].shape[1]) if bars else (lambda n, s: 0)
    return {n: (state[key(n, "U")].shape[1] + k(n, "U"), state[key(n, "V")].shape[1] + k(n, "V")) for n in layers}


# ----------------------------------------------------------------------------------------------------
# one round (FeDLRT; FedAvg/FedLin are the dense, fixed-rank case)

def _round(sim, state, participants, t):
    model, data, loss_fn, knobs = sim["model"], sim["clients_data"], sim["loss_fn"], sim["knobs"]
    vc, dynamic = knobs["variance_correction"], knobs["dynamic_rank"]
    layers = sim["bounds"]
    ch, flops, wall = Channel(), defaultdict(int), defaultdict(float)
    w = [len(data[c][0]) for c in participants] if sim["weighted"] else None

    def on_client(c, fn, *args, **kw):  # run a client function, timing it
        t0 = time.perf_counter()
        out = fn(model, *args, **kw)
        wall[c] += time.perf_counter() - t0
        return out

    # step 1: broadcast U, S, V (+ dense); each client keeps what it received (Flower: context.state)
    received = {c: ch.down(c, state) for c in participants}
    own = {c: None for c in participants}
    bars = None
    fwd_r = forward_flops(sim["dims"], _ranks(state, layers))
    if dynamic and layers:
        # step 2: basis gradients (+ dL_c/dS and dense gradients for the simplified correction)
        replies = []
        for c in participants:
            own[c] = on_client(c, fedlrt.client_basis_gradients, received[c], data[c], loss_fn,
                               with_coefficients=(vc == "simplified"))
            flops[c] += 3 * fwd_r * len(data[c][0])
            replies.append(ch.up(c, own[c]))
        G = fedlrt.aggregate(replies, w)
        # step 3: augment on the server, broadcast U_bar, V_bar (+ averaged G_S for "simplified")
        bars = fedlrt.server_augment(state, G, layers)
        extra = {}
        if vc == "simplified":
            extra = {key(n, "G_S"): G[key(n, "G_S")] for n in layers}
            extra |= {key(p, "grad"): G[key(p, "grad")] for p in fedlrt.dense_names(model)}
        for c in participants:
            received[c] |= ch.down(c, bars | extra)
    fwd_aug = forward_flops(sim["dims"], _ranks(state, layers, bars))
    # step 5 "full" (and any correction when there is no basis-gradient stage to piggyback on):
    # one more exchange of dL_c/dS_tilde at the starting point
    if vc == "full" or (vc == "simplified" and bars is None):
        replies = []
        for c in participants:
            own[c] = on_client(c, fedlrt.client_coefficient_gradients, received[c], data[c], loss_fn)
            flops[c] += 3 * fwd_aug * len(data[c][0])
            replies.append(ch.up(c, own[c]))
        G = fedlrt.aggregate(replies, w)
        for c in participants:
            received[c] |= ch.down(c, G)
    # steps 4 and 6: s_star local steps on S_tilde with the bases fixed
    replies = []
    for c in participants:
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([sim["seed"], t, c]).generate_state(1)[0]))
        reply = on_client(c, fedlrt.client_coefficient_steps, received[c], data[c], loss_fn,
                          knobs["local_steps"], knobs["lr"], own_grads=own[c] if vc != "none" else None,
                          optimizer=knobs["optimizer"], batch_size=knobs["batch_size"], generator=gen)
        b = min(knobs["batch_size"] or len(data[c][0]), len(data[c][0]))
        flops[c] += knobs["local_steps"] * 3 * fwd_aug * b
        replies.append(ch.up(c, reply))
    # step 7: aggregate and truncate on the server
    new_state = fedlrt.server_truncate(state, bars, fedlrt.aggregate(replies, w), layers, knobs["tau"])
    comm = {f"{q}_{d}": {c: getattr(ch, q)[c][d] for c in participants} for q in ("floats", "bytes")
            for d in ("down", "up")}
    return new_state, comm | {"flops": dict(flops), "wall_time": dict(wall)}


# ----------------------------------------------------------------------------------------------------
# the shared loop

def _default_loss(y):
    return F.cross_entropy if not torch.is_floating_point(y) else F.mse_loss


@torch.no_grad()
def _evaluate(model, state, datasets, loss_fn, weights):
    w = np.asarray(weights, dtype=float) / np.sum(weights)
    loss, acc = 0.0, 0.0
    for wc, (X, y) in zip(w, datasets):
        out = functional_call(model, state, (X,))
        loss += wc * float(loss_fn(out, y))
        acc += wc * float((out.argmax(-1) == y).float().mean()) if not torch.is_floating_point(y) else 0.0
    return float(loss), (float(acc) if not torch.is_floating_point(datasets[0][1]) else None)


def _simulate(model, clients_data, rounds, knobs, *, loss_fn, seed, client_fraction, weighted, eval_data):
    if not clients_data:
        raise ValueError("Invalid clients_data: empty (expected a list of (X, y) per client)")
    if not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"Invalid rounds: {rounds!r} (expected an int >= 0)")
    if not 0 < client_fraction <= 1:
        raise ValueError(f"Invalid client_fraction: {client_fraction!r} (expected 0 < client_fraction <= 1)")
    loss_fn = loss_fn or _default_loss(clients_data[0][1])
    sim = {"model": model, "clients_data": clients_data, "loss_fn": loss_fn, "knobs": knobs, "seed": seed,
           "weighted": weighted, "dims": layer_dims(model, clients_data[0][0]),
           "bounds": {n: (m.r_min, m.r_max) for n, m in low_rank_layers(model).items()}}
    n_clients = len(clients_data)
    m = max(1, round(client_fraction * n_clients))
    pick = torch.Generator().manual_seed(seed)
    all_weights = [len(d[0]) for d in clients_data] if weighted else [1.0] * n_clients
    state = fedlrt.global_state(model)

    def record(t, participants, costs):
        loss, acc = _evaluate(model, state, clients_data, loss_fn, all_weights)
        rec = {"round": t, "loss": loss, "accuracy": acc,
               "ranks": {n: state[key(n, "S")].shape[0] for n in sim["bounds"]}, "clients": participants}
        if eval_data is not None:
            rec["test_loss"], rec["test_accuracy"] = _evaluate(model, state, [eval_data], loss_fn, [1.0])
        empty = {k: {} for k in ("floats_down", "floats_up", "bytes_down", "bytes_up", "flops", "wall_time")}
        return rec | (costs or empty)

    history = [record(0, [], None)]
    for t in range(1, rounds + 1):
        participants = (list(range(n_clients)) if m == n_clients
                        else sorted(torch.randperm(n_clients, generator=pick)[:m].tolist()))
        state, costs = _round(sim, state, participants, t)
        history.append(record(t, participants, costs))
    return {"history": history, "state": state, "model": fedlrt.load_state(model, state)}


def run_fedlrt(model_fn, clients_data, rounds, *, lr=0.1, local_steps=1, variance_correction="full",
               dynamic_rank=True, initial_rank=None, tau=0.1, r_min=None, r_max=None, exclude=(),
               optimizer="sgd", batch_size=None, loss_fn=None, seed=0, client_fraction=1.0, weighted=False,
               eval_data=None) -> dict:
    """FeDLRT (METHODS.md section 3). model_fn() is called after torch.manual_seed(seed).

    A dense model is factorised with `to_low_rank(model, initial_rank, exclude, r_min or 1, r_max)`; a
    model that already has low-rank layers is used as is (then initial_rank, r_min, r_max and exclude
    must be left unset: the layers carry their own bounds). clients_data is a
    list of (X, y) tensors. batch_size=None: every local step uses the client's whole local data
    (deterministic gradient descent, as in the paper's analysis). weighted=True weights the aggregation
    and the global loss by client sample counts, else the plain mean of METHODS.md.
    variance_correction: "full" (METHODS.md step 5), "simplified" (the kit's reading: correction on the
    r x r block only, from dL_c/dS sent with the basis gradients), or "none".
    Returns {"history": [per-round records], "state": final global state, "model": model holding it}.
    """
    fedlrt.validate_knobs(variance_correction, dynamic_rank, initial_rank, tau, local_steps, lr, optimizer,
                          batch_size)
    torch.manual_seed(seed)
    model = model_fn()
    if low_rank_layers(model):
        given = {k: v for k, v in dict(initial_rank=initial_rank, r_min=r_min, r_max=r_max, exclude=exclude or None)
                 .items() if v is not None}
        if given:  # silently ignoring them would train with bounds the caller did not ask for
            raise ValueError(f"Invalid {given}: model_fn already returns low-rank layers; set rank, r_min and "
                             "r_max on the layers (expected None here)")
    else:
        if initial_rank is None:
            raise ValueError("Invalid initial_rank: None (expected a positive int to factorise the dense model)")
        model = to_low_rank(model, initial_rank, exclude, r_min or 1, r_max)
    knobs = dict(variance_correction=variance_correction, dynamic_rank=dynamic_rank, tau=tau,
                 local_steps=local_steps, lr=lr, optimizer=optimizer, batch_size=batch_size)
    return _simulate(model, clients_data, rounds, knobs, loss_fn=loss_fn, seed=seed,
                     client_fraction=client_fraction, weighted=weighted, eval_data=eval_data)


def _run_dense(model_fn, clients_data, rounds, correction, lr, local_steps, optimizer, batch_size, loss_fn,
               seed, client_fraction, weighted, eval_data):
    fedlrt.validate_knobs(local_steps=local_steps, lr=lr, optimizer=optimizer, batch_size=batch_size)
    torch.manual_seed(seed)
    model = model_fn()
    if low_rank_layers(model):
        raise ValueError("Invalid model_fn: it returns low-rank layers (FedAvg/FedLin train dense weights)")
    knobs = dict(variance_correction=correction, dynamic_rank=False, tau=0.0, local_steps=local_steps, lr=lr,
                 optimizer=optimizer, batch_size=batch_size)
    return _simulate(model, clients_data, rounds, knobs, loss_fn=loss_fn, seed=seed,
                     client_fraction=client_fraction, weighted=weighted, eval_data=eval_data)


def run_fedavg(model_fn, clients_data, rounds, *, lr=0.1, local_steps=1, optimizer="sgd", batch_size=None,
               loss_fn=None, seed=0, client_fraction=1.0, weighted=False, eval_data=None) -> dict:
    """FedAvg (McMahan et al. 2017): broadcast W, local_steps steps on full weights, average. Same
    record format as run_fedlrt; per client and round n_params floats down and n_params up."""
    return _run_dense(model_fn, clients_data, rounds, "none", lr, local_steps, optimizer, batch_size, loss_fn,
                      seed, client_fraction, weighted, eval_data)


def run_fedlin(model_fn, clients_data, rounds, *, lr=0.1, local_steps=1, optimizer="sgd", batch_size=None,
               loss_fn=None, seed=0, client_fraction=1.0, weighted=False, eval_data=None) -> dict:
    """FedLin (Mitra et al. 2021): FedAvg plus the correction V_c = grad L - grad L_c at the round's start,
    on full weights; one extra exchange of gradients (n_params up, n_params down)."""
    return _run_dense(model_fn, clients_data, rounds, "full", lr, local_steps, optimizer, batch_size, loss_fn,
                      seed, client_fraction, weighted, eval_data)


def to_run_result(name: str, result: dict, config: dict, wall_time_s: float = 0.0):
    """A simulator result as a `lrkit.records.RunResult` for `records.save_run`.

    history: per round the scalar metrics, ranks, and the per-client costs summed over the participating
    clients (floats_*, bytes_*, flops, wall_time) plus bytes_per_client (down + up, mean over them).
    final: the last round's metrics, and the mean bytes_per_client and flops_per_client over rounds >= 1."""
    from lrkit.records import RunResult
    from lrkit.utils import device_info

    history = []
    for rec in result["history"]:
        row = {k: v for k, v in rec.items() if not isinstance(v, dict) and k != "clients"}
        row["ranks"] = dict(rec["ranks"])
        row["clients"] = len(rec["clients"])
        for k in ("floats_down", "floats_up", "bytes_down", "bytes_up", "flops", "wall_time"):
            row[k] = sum(rec[k].values())
        n = max(1, len(rec["clients"]))
        row["bytes_per_client"] = (row["bytes_down"] + row["bytes_up"]) / n
        row["flops_per_client"] = row["flops"] / n
        history.append(row)
    rounds = history[1:] or history
    final = {k: v for k, v in history[-1].items() if k not in ("round", "clients")}
    final |= {"rounds": history[-1]["round"],
              "bytes_per_client_round": float(np.mean([h["bytes_per_client"] for h in rounds])),
              "flops_per_client_round": float(np.mean([h["flops_per_client"] for h in rounds]))}
    info = device_info("cpu")
    return RunResult(name=name, config=dict(config), seed=int(config.get("seed", 0)), device=info["device"],
                     device_name=info["device_name"], history=history, final=final, wall_time_s=float(wall_time_s),
                     memory={})
