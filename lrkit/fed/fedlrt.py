"""FeDLRT client and server steps as pure tensor functions (Schotthoefer & Laiu, arXiv 2406.17887, Sec. 3,
Algorithm 1; the kit's reading is docs/methods.md, section 3, whose step numbers are cited below).

One round for every factorised layer W = U S V^T (U: n_out x r, V: n_in x r orthonormal, S: r x r):
  1. server -> clients: U, S, V                                    (`global_state`)
  2. clients -> server: G_U,c = dL_c/dU, G_V,c = dL_c/dV at U S V^T  (`client_basis_gradients`)
  3. server: G_U = mean_c G_U,c; U_bar = new orthonormal directions of QR([U | G_U]) (`augment`);
     server -> clients: U_bar, V_bar
  4. clients: U_tilde = [U | U_bar], V_tilde = [V | V_bar], S_tilde = [[S, 0], [0, 0]]
  5. variance correction V_c (`correction_term`), "full" needs one more exchange of dL_c/dS_tilde
  6. clients: s_star = `local_steps` steps on S_tilde only, bases fixed (`coefficient_steps`);
     clients -> server: S_tilde_c
  7. server: S_tilde = mean_c S_tilde_c, SVD, keep the smallest rank r1 with
     ||sigma[r1:]||_2 <= tau ||sigma||_2, clamped to [r_min, r_max] (`truncate`).
With dynamic_rank=False steps 2-4 and 7's SVD are skipped: clients train S (r x r) in the fixed bases
and the server averages it (the "frozen basis" arm of the dynamic-rank ablation; its "fixed rank" arm keeps
augmentation with r_min = r_max = r, docs/methods.md, section 3).

Messages are flat dicts {str: tensor}, keyed "<layer>.<symbol>" ("fc1.U_bar", "fc1.G_S_tilde") or
"<param>" / "<param>.grad" for the dense parameters (biases, layers kept dense), so a Flower
ServerApp/ClientApp can carry them unchanged. Dense parameters are trained alongside S_tilde, averaged
by the server and variance-corrected like the coefficients (the paper is silent on them; docs/methods.md, section 3, departure 7; this is the
kit's choice, the FedAvg/FedLin treatment of full weights).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lrkit.fed.layers import low_rank_layers

VARIANCE_CORRECTIONS = ("none", "simplified", "full")


class Diverged(ValueError):
    """Training produced non-finite coefficients (lr or local_steps too large): the simulator records the
    run as diverged instead of failing."""


OPTIMIZERS = ("sgd", "adam")

__all__ = [
    "VARIANCE_CORRECTIONS", "OPTIMIZERS", "Diverged", "key", "validate_knobs", "augment", "truncate", "aggregate",
    "augmented_coefficients", "correction_term", "coefficient_steps", "gradients", "global_state",
    "load_state", "dense_names", "client_basis_gradients", "client_coefficient_gradients",
    "client_coefficient_steps", "server_augment", "server_truncate", "STAGES", "server_round", "client_step",
    "client_generator",
]


# ----------------------------------------------------------------------------------------------------
# knobs and message keys

def key(name: str, symbol: str) -> str:
    """Message key "<layer>.<symbol>"; a model that is itself one layer has name "" and keys "U", "S"."""
    return f"{name}.{symbol}" if name else symbol


def validate_knobs(variance_correction="full", dynamic_rank=True, initial_rank=None, tau=0.1, local_steps=1,
                   lr=0.1, optimizer="sgd", batch_size=None, chunk_size=None) -> None:
    """Raise ValueError naming the bad value and what is accepted."""
    if variance_correction not in VARIANCE_CORRECTIONS:
        raise ValueError(f"Invalid variance_correction: {variance_correction!r} (expected one of {VARIANCE_CORRECTIONS})")
    if not isinstance(dynamic_rank, bool):
        raise ValueError(f"Invalid dynamic_rank: {dynamic_rank!r} (expected True or False)")
    if initial_rank is not None and (not isinstance(initial_rank, int) or initial_rank < 1):
        raise ValueError(f"Invalid initial_rank: {initial_rank!r} (expected a positive int or None)")
    if not (isinstance(tau, (int, float)) and 0 <= tau < 1):
        raise ValueError(f"Invalid tau: {tau!r} (expected a relative tolerance in [0, 1))")
    if not isinstance(local_steps, int) or local_steps < 1:
        raise ValueError(f"Invalid local_steps: {local_steps!r} (expected an int >= 1)")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"Invalid lr: {lr!r} (expected a positive float)")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer: {optimizer!r} (expected one of {OPTIMIZERS})")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"Invalid batch_size: {batch_size!r} (expected a positive int or None = full local data)")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"Invalid chunk_size: {chunk_size!r} (expected a positive int or None = all samples at once)")


# ----------------------------------------------------------------------------------------------------
# the linear algebra of one layer (docs/methods.md, section 3, steps 3, 4, 7)

def augment(U: torch.Tensor, G_U: torch.Tensor) -> torch.Tensor:
    """Step 3: U_bar, the orthonormal directions of QR([U | G_U]) orthogonal to span(U).

    U_bar has k = min(r, n - r) columns: the augmented basis [U | U_bar] has min(2r, n) columns (clamped
    when 2r > n). If G_U is rank deficient (e.g. zero, or inside span(U)) Householder QR still returns
    orthonormal columns; they are arbitrary directions orthogonal to U, harmless because S_tilde starts
    with zeros there and `truncate` drops them if training does not use them. Not clamped by r_max: a
    layer at r_max must still be able to rotate its basis; `truncate` enforces r_max.
    """
    n, r = U.shape
    k = min(G_U.shape[1], n - r)
    if k == 0:
        return U.new_zeros(n, 0)
    Q, _ = torch.linalg.qr(torch.cat([U, G_U], dim=1))  # reduced: n x min(n, 2r); Q[:, :r] = U diag(+-1)
    U_bar = Q[:, r:r + k]
    # Householder QR is backward stable column by column, so Q[:, r:] is orthogonal to span(U) to rounding
    # even for an ill-conditioned G_U (huge, graded, nearly inside span(U)): tests/test_fedlrt.py,
    # test_augment_is_orthonormal_to_1e_12_on_ill_conditioned_gradients. One more Gram-Schmidt pass
    # against U itself ("twice is enough") removes what rounding left of U in U_bar (about halves
    # |U^T U_bar|, ~1e-16 either way): cheap insurance, not what the orthonormality rests on.
    U_bar, _ = torch.linalg.qr(U_bar - U @ (U.T @ U_bar))
    return U_bar


def augmented_coefficients(S: torch.Tensor, k_U: int, k_V: int) -> torch.Tensor:
    """Step 4: S_tilde = [[S, 0], [0, 0]] = U_tilde^T (U S V^T) V_tilde, shape (r + k_U) x (r + k_V)."""
    return F.pad(S, (0, k_V, 0, k_U))


def truncate(U_tilde, S_tilde, V_tilde, tau: float, r_min: int = 1, r_max: int | None = None):
    """Step 7: SVD S_tilde = P diag(sigma) Q^T and keep the smallest rank r1 with
    ||sigma[r1:]||_2 <= tau ||sigma||_2, clamped to [r_min, r_max]. Returns (U, S, V) with
    U = U_tilde P[:, :r1], S = diag(sigma[:r1]), V = V_tilde Q[:, :r1].

    tau = 0 keeps every nonzero singular value, so W = U S V^T is unchanged (up to rounding) unless
    r_max binds. (The author's RobustDLRT code uses a strict '<'; '<=' is the kit's, docs/methods.md, section 3, departure 1.)
    """
    if not torch.isfinite(S_tilde).all():
        raise Diverged("Invalid S_tilde: non-finite entries (training diverged; lower lr or local_steps)")
    P, sigma, Qh = torch.linalg.svd(S_tilde, full_matrices=False)
    # tail[j] = ||sigma[j:]||_2 for j = 0..len(sigma); tail[len] = 0 so r1 = len(sigma) always qualifies.
    tail = torch.cat([sigma.flip(0).square().cumsum(0).flip(0).sqrt(), sigma.new_zeros(1)])
    r1 = int(torch.nonzero(tail <= tau * tail[0])[0])
    r_max = len(sigma) if r_max is None else min(r_max, len(sigma))
    r1 = max(r_min, min(r1, r_max))
    return U_tilde @ P[:, :r1], torch.diag(sigma[:r1]), V_tilde @ Qh[:r1].T


def aggregate(messages: list[dict], weights=None) -> dict:
    """Mean of the clients' messages, key by key; `weights` (e.g. sample counts) are normalised to sum 1.

    The plain mean's weights 1/m are built in the messages' floating dtype (float32 for a float32
    model, float64 for a float64 one), so a float64 run averages in float64; given weights are float64."""
    if not messages:
        raise ValueError("Invalid messages: empty list (need at least one client)")
    dtype = torch.float32
    for v in messages[0].values():
        if v.is_floating_point():
            dtype = torch.promote_types(dtype, v.dtype)
    w = torch.ones(len(messages), dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if len(w) != len(messages) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"Invalid weights: {weights!r} (expected {len(messages)} non-negative numbers, not all 0)")
    w = (w / w.sum()).tolist()
    return {k: sum(wc * m[k] for wc, m in zip(w, messages)) for k in messages[0]}


def correction_term(global_grads: dict, client_grads: dict, shapes: dict) -> dict:
    """Step 5: V_c = G - G_c per trained tensor (SCAFFOLD/FedLin control variate).

    `shapes` maps each trained tensor to its shape; a gradient of smaller shape (the "simplified" r x r
    dL/dS against an (r + k_U) x (r + k_V) S_tilde) is zero-padded into the top-left block, so the
    simplified correction acts on the original coefficients only. Tensors without a gradient get none.
    """
    V_c = {}
    for name, shape in shapes.items():
        if name not in global_grads:
            continue
        d = global_grads[name] - client_grads[name]
        V_c[name] = F.pad(d, (0, shape[1] - d.shape[1], 0, shape[0] - d.shape[0])) if d.dim() == 2 else d
    return V_c


def coefficient_steps(loss_at: Callable[[dict, int], torch.Tensor], params: dict, local_steps: int, lr: float,
                      correction: dict | None = None, optimizer: str = "sgd") -> dict:
    """Step 6: `local_steps` (s_star) optimizer steps on `params` with the bases held fixed,
    S_tilde <- S_tilde - lr (dL_c/dS_tilde + V_c) for SGD. `loss_at(params, step)` is the client loss.

    A fresh optimizer each round: clients are stateless (the coefficients change shape between rounds).
    """
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(params.values(), lr=lr)
    for step in range(local_steps):
        grads = torch.autograd.grad(loss_at(params, step), list(params.values()), allow_unused=True)
        for (k, p), g in zip(params.items(), grads):
            p.grad = torch.zeros_like(p) if g is None else g
            if correction and k in correction:
                p.grad += correction[k]
        opt.step()
    return {k: v.detach() for k, v in params.items()}


# ----------------------------------------------------------------------------------------------------
# the model as a function of a flat state dict

def dense_names(model: nn.Module) -> list[str]:
    """Trainable parameters that are not low-rank coefficients (biases, layers kept dense)."""
    factored = {key(n, "S") for n in low_rank_layers(model)}
    return [n for n, p in model.named_parameters() if n not in factored and p.requires_grad]


def global_state(model: nn.Module) -> dict:
    """The server's state: "<layer>.U/.S/.V" for each factorised layer plus the dense parameters."""
    state = {}
    for name, layer in low_rank_layers(model).items():
        state.update({key(name, "U"): layer.U, key(name, "S"): layer.S, key(name, "V"): layer.V})
    params = dict(model.named_parameters())
    state.update({n: params[n] for n in dense_names(model)})
    return {k: v.detach().clone() for k, v in state.items()}


@torch.no_grad()
def load_state(model: nn.Module, state: dict) -> nn.Module:
    """Write a global state back into the module (ranks may have changed)."""
    for name, layer in low_rank_layers(model).items():
        layer.set_factors(state[key(name, "U")], state[key(name, "S")], state[key(name, "V")])
    params = dict(model.named_parameters())
    for n in dense_names(model):
        params[n].copy_(state[n])
    return model


def _batches(data, batch_size, generator):
    """Full local data when batch_size is None, else a fresh seeded minibatch per call."""
    X, y = data

    def batch(step):
        if batch_size is None or batch_size >= len(X):
            return X, y
        idx = torch.randperm(len(X), generator=generator)[:batch_size]
        return X[idx], y[idx]
    return batch


def gradients(model, state: dict, wrt, data, loss_fn, chunk_size: int | None = None) -> dict:
    """d loss_fn(model_state(X), y) / d state[k] for k in wrt, by autograd through functional_call.

    chunk_size: forward and backward at most that many samples at a time and sum the chunks' gradients
    weighted by their share of the samples (the gradient of the mean loss; memory only, for large models
    such as ResNet18 on all local images). None: all samples at once."""
    X, y = data
    leaves = {k: v.detach().requires_grad_(k in wrt) for k, v in state.items()}
    if chunk_size is None or chunk_size >= len(X):
        loss = loss_fn(functional_call(model, leaves, (X,)), y)
        return dict(zip(wrt, torch.autograd.grad(loss, [leaves[k] for k in wrt])))
    total = None
    for i in range(0, len(X), chunk_size):
        Xi, yi = X[i:i + chunk_size], y[i:i + chunk_size]
        loss = loss_fn(functional_call(model, leaves, (Xi,)), yi) * (len(Xi) / len(X))
        g = torch.autograd.grad(loss, [leaves[k] for k in wrt])
        total = list(g) if total is None else [a + b for a, b in zip(total, g)]
    return dict(zip(wrt, total))


def _augmented_state(model, message: dict) -> dict:
    """Step 4 on the client: U_tilde, S_tilde, V_tilde from U, S, V and U_bar, V_bar (if sent)."""
    state = {n: message[n] for n in dense_names(model)}
    for name in low_rank_layers(model):
        U, S, V = (message[key(name, s)] for s in "USV")
        if key(name, "U_bar") in message:
            U_bar, V_bar = message[key(name, "U_bar")], message[key(name, "V_bar")]
            U, V, S = torch.cat([U, U_bar], 1), torch.cat([V, V_bar], 1), augmented_coefficients(
                S, U_bar.shape[1], V_bar.shape[1])
        state.update({key(name, "U"): U, key(name, "S"): S, key(name, "V"): V})
    return state


# ----------------------------------------------------------------------------------------------------
# client steps: (model, message, local data) -> reply message

def client_basis_gradients(model, message, data, loss_fn, with_coefficients=False, chunk_size=None) -> dict:
    """Step 2: G_U,c and G_V,c at U S V^T on the client's data.

    with_coefficients=True also returns "<layer>.G_S" and "<param>.grad" (the "simplified" variance
    correction piggybacks them on this message; docs/methods.md, section 3, step 5).
    """
    layers, dense = list(low_rank_layers(model)), dense_names(model)
    wrt = [key(n, s) for n in layers for s in "UV"]
    if with_coefficients:
        wrt += [key(n, "S") for n in layers] + dense
    g = gradients(model, _augmented_state(model, message), wrt, data, loss_fn, chunk_size)
    out = {key(n, "G_U"): g[key(n, "U")] for n in layers} | {key(n, "G_V"): g[key(n, "V")] for n in layers}
    if with_coefficients:
        out |= {key(n, "G_S"): g[key(n, "S")] for n in layers} | {key(p, "grad"): g[p] for p in dense}
    return out


def client_coefficient_gradients(model, message, data, loss_fn, chunk_size=None) -> dict:
    """Step 5 "full": dL_c/dS_tilde (2r x 2r) at the starting point S_tilde = [[S, 0], [0, 0]] and the
    dense gradients. Without U_bar/V_bar in the message (dynamic_rank=False) this is dL_c/dS."""
    layers, dense = list(low_rank_layers(model)), dense_names(model)
    g = gradients(model, _augmented_state(model, message), [key(n, "S") for n in layers] + dense, data, loss_fn,
                  chunk_size)
    return {key(n, "G_S_tilde"): g[key(n, "S")] for n in layers} | {key(p, "grad"): g[p] for p in dense}


def client_coefficient_steps(model, message, data, loss_fn, local_steps, lr, own_grads=None,
                             optimizer="sgd", batch_size=None, generator=None) -> dict:
    """Steps 4-6: build S_tilde, run s_star = local_steps steps on it (and the dense parameters) with
    the bases fixed, reply "<layer>.S_tilde" and the dense parameters.

    Variance correction: if the message carries the server's averaged gradient ("<layer>.G_S_tilde"
    for "full", "<layer>.G_S" for "simplified", plus "<param>.grad"), `own_grads` must hold this
    client's own reply from the earlier stage (kept client-side, like Flower's context.state; never sent
    again) and V_c = G - G_c is added to every local gradient.
    """
    layers, dense = list(low_rank_layers(model)), dense_names(model)
    state = _augmented_state(model, message)
    trained = [key(n, "S") for n in layers] + dense
    fixed = {k: v for k, v in state.items() if k not in trained}
    correction = None
    G = {key(n, "S"): message.get(key(n, "G_S_tilde"), message.get(key(n, "G_S"))) for n in layers}
    G |= {p: message.get(key(p, "grad")) for p in dense}
    G = {k: v for k, v in G.items() if v is not None}
    if G:
        if own_grads is None:
            raise ValueError("Invalid own_grads: None, but the message carries a variance correction")
        G_c = {key(n, "S"): own_grads.get(key(n, "G_S_tilde"), own_grads.get(key(n, "G_S"))) for n in layers}
        G_c |= {p: own_grads.get(key(p, "grad")) for p in dense}
        correction = correction_term(G, G_c, {k: state[k].shape for k in trained})
    batch = _batches(data, batch_size, generator)

    def loss_at(params, step):
        X, y = batch(step)
        return loss_fn(functional_call(model, fixed | params, (X,)), y)

    out = coefficient_steps(loss_at, {k: state[k] for k in trained}, local_steps, lr, correction, optimizer)
    return {key(n, "S_tilde"): out[key(n, "S")] for n in layers} | {p: out[p] for p in dense}


# ----------------------------------------------------------------------------------------------------
# server steps: (state, aggregated replies) -> message / new state

def server_augment(state: dict, grads: dict, layers) -> dict:
    """Step 3: {"<layer>.U_bar", "<layer>.V_bar"} from the averaged basis gradients."""
    out = {}
    for n in layers:
        out[key(n, "U_bar")] = augment(state[key(n, "U")], grads[key(n, "G_U")])
        out[key(n, "V_bar")] = augment(state[key(n, "V")], grads[key(n, "G_V")])
    return out


def server_truncate(state: dict, bars: dict | None, averaged: dict, layers: dict, tau: float) -> dict:
    """Step 7: new global state from the averaged S_tilde (and dense parameters).

    `layers` maps each factorised layer to its (r_min, r_max). With bars=None (dynamic_rank=False) the
    averaged S_tilde is the new S and the bases are kept: the rank never changes.
    """
    new = {k: v for k, v in averaged.items() if k not in {key(n, "S_tilde") for n in layers}}
    for n, (r_min, r_max) in layers.items():
        U, V, S_tilde = state[key(n, "U")], state[key(n, "V")], averaged[key(n, "S_tilde")]
        if bars is None:
            new.update({key(n, "U"): U, key(n, "S"): S_tilde, key(n, "V"): V})
            continue
        U_tilde, V_tilde = torch.cat([U, bars[key(n, "U_bar")]], 1), torch.cat([V, bars[key(n, "V_bar")]], 1)
        new.update(zip((key(n, "U"), key(n, "S"), key(n, "V")), truncate(U_tilde, S_tilde, V_tilde, tau, r_min, r_max)))
    return new


# ----------------------------------------------------------------------------------------------------
# one round as a message protocol: the server side is a generator, the client side one dispatch
# function; the simulator (`lrkit.fed.simulate`) and the Flower apps (`lrkit.fed.flower`) both drive them,
# so the two engines exchange the same tensors in the same stages.

STAGES = ("basis", "correction", "coefficients")


def server_round(state: dict, layers: dict, knobs: dict, weights=None):
    """The server's side of one round (steps 1-7), as a generator.

    Yields (stage, broadcast): every participating client is sent the tensors `broadcast` with the
    request to run `stage` (one of STAGES, see `client_step`). The driver sends back the list of the
    participants' replies, in participant order. Returns (StopIteration.value) the new global state.

      stage          broadcast (what is new for the client)        reply
      "basis"        U, S, V, dense                                 G_U, G_V (+ G_S, grads: "simplified")
      "correction"   U_bar, V_bar, or U, S, V, dense if no "basis"  G_S_tilde, grads
      "coefficients" whatever was not yet sent: state, bars, the    S_tilde, dense
                     averaged correction gradients
    "basis" runs if dynamic_rank (steps 2-3); "correction" for "full", and for "simplified" when there is
    no "basis" stage to carry dL_c/dS (step 5); "coefficients" always (steps 4, 6). `layers` maps each
    factorised layer to its (r_min, r_max); `weights` are the aggregation weights of the participants.
    """
    vc, dynamic = knobs["variance_correction"], knobs["dynamic_rank"]
    down, bars = dict(state), None  # step 1
    if dynamic and layers:
        G = aggregate((yield "basis", down), weights)  # step 2
        bars = server_augment(state, G, layers)  # step 3
        down = dict(bars)
        if vc == "simplified":  # the averaged G_S and dense gradients ride along
            basis = {key(n, s) for n in layers for s in ("G_U", "G_V")}
            down |= {k: v for k, v in G.items() if k not in basis}
    if vc == "full" or (vc == "simplified" and bars is None):  # step 5: one more exchange
        down = aggregate((yield "correction", down), weights)
    replies = yield "coefficients", down  # steps 4 and 6
    return server_truncate(state, bars, aggregate(replies, weights), layers, knobs["tau"])  # step 7


def client_step(stage: str, model, received: dict, own: dict | None, data, loss_fn, knobs: dict,
                generator=None) -> dict:
    """The client's side of `server_round`: run `stage` on everything `received` this round (the
    broadcasts of its stages so far, merged) and return the reply. `own` is this client's reply to its
    last gradient stage ("basis" or "correction") of the round, kept client-side for the variance
    correction; `generator` draws the minibatches of the coefficient steps."""
    if stage == "basis":
        return client_basis_gradients(model, received, data, loss_fn,
                                      with_coefficients=knobs["variance_correction"] == "simplified",
                                      chunk_size=knobs.get("chunk_size"))
    if stage == "correction":
        return client_coefficient_gradients(model, received, data, loss_fn, knobs.get("chunk_size"))
    if stage == "coefficients":
        return client_coefficient_steps(model, received, data, loss_fn, knobs["local_steps"], knobs["lr"],
                                        own_grads=own if knobs["variance_correction"] != "none" else None,
                                        optimizer=knobs["optimizer"], batch_size=knobs["batch_size"],
                                        generator=generator)
    raise ValueError(f"Invalid stage: {stage!r} (expected one of {STAGES})")


def client_generator(seed: int, round_: int, client: int) -> torch.Generator:
    """The minibatch generator of `client` in round `round_`: the same in every engine."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, round_, client]).generate_state(1)[0]))
