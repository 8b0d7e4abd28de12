"""FeDLRT, FedAvg and FedLin against their algebraic definitions (issue 11, section 7).

Each test runs the kit on a small float64 least-squares problem with heterogeneous clients of unequal size
(so the variance correction V_c = G - G_c is not zero and weighted and plain means differ) and compares
with the same rounds written here from docs/methods.md, section 3, in plain torch: closed-form gradients
of the mean squared error, the basis augmentation as the top left singular vectors of the gradient's part
outside span(U), local SGD / Adam updates written out, the weighted mean, and the truncation rule. Nothing
here calls lrkit's round code; the kit and the reference agree to rounding (1e-12).

SGD on S_tilde is equivariant under a rotation of the new basis directions, so the dynamic-rank tests
compare W = U S V^T (any orthonormal basis of the augmented span gives the same W); Adam (elementwise) is
not, so its reference runs where the basis is fixed (dense FedAvg/FedLin, FeDLRT with dynamic_rank=False).
"""
import pytest
import torch
from torch import nn

from lrkit.fed.layers import LowRankLinear
from lrkit.fed.simulate import run_fedavg, run_fedlin, run_fedlrt

torch.set_num_threads(1)

N_IO, RANK, SIZES = 8, 2, (5, 9, 14)  # one 8 x 8 layer, rank 2, three clients of unequal size
LR, STEPS, ROUNDS, TAU = 0.1, 4, 2, 0.15  # dynamic rank 2 -> 3 -> 4
ATOL = 1e-12


def _problem():
    """Float64 clients (X_c, Y_c) with their own target W_c* (heterogeneous), and the starting factors."""
    g = torch.Generator().manual_seed(11)
    f64 = dict(generator=g, dtype=torch.float64)
    W_star = torch.randn(N_IO, N_IO, **f64)
    clients = []
    for m in SIZES:
        X = torch.randn(m, N_IO, **f64)
        W_c = W_star + 0.8 * torch.randn(N_IO, N_IO, **f64)
        clients.append((X, X @ W_c.T + 0.1 * torch.randn(m, N_IO, **f64)))
    U0 = torch.linalg.qr(torch.randn(N_IO, RANK, **f64))[0]
    V0 = torch.linalg.qr(torch.randn(N_IO, RANK, **f64))[0]
    S0 = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    W0, b0 = 0.3 * torch.randn(N_IO, N_IO, **f64), 0.1 * torch.randn(N_IO, **f64)
    return {"clients": clients, "U0": U0, "S0": S0, "V0": V0, "W0": W0, "b0": b0}


@pytest.fixture(scope="module")
def problem():
    return _problem()


def _low_rank_fn(p):
    """A float64 LowRankLinear holding the problem's U0, S0, V0 and b0 (used as is by run_fedlrt)."""
    def make():
        layer = LowRankLinear(N_IO, N_IO, RANK, bias=True)
        layer.set_factors(p["U0"], p["S0"], p["V0"])
        layer.bias = nn.Parameter(p["b0"].clone())
        return layer
    return make


def _dense_fn(p):
    def make():
        layer = nn.Linear(N_IO, N_IO).double()
        with torch.no_grad():
            layer.weight.copy_(p["W0"])
            layer.bias.copy_(p["b0"])
        return layer
    return make


# ---------------------------------------------------------------------------------------- the reference

def _grad(W, b, X, Y):
    """d/dW, d/db of mean((X W^T + b - Y)^2) (F.mse_loss), in closed form."""
    R = X @ W.T + b - Y
    c = 2.0 / R.numel()
    return c * R.T @ X, c * R.sum(0)


def _weights(weighted):
    w = torch.tensor(SIZES if weighted else [1.0] * len(SIZES), dtype=torch.float64)
    return w / w.sum()


def _wmean(w, xs):
    return sum(wc * x for wc, x in zip(w.tolist(), xs))


def _local(params, grad_fn, correction, optimizer):
    """STEPS optimizer steps on the list `params` (fresh optimizer state) with gradient grad_fn(params) +
    correction. SGD: p - lr g. Adam (Kingma & Ba, torch defaults): m, v moving averages with betas
    (0.9, 0.999), bias-corrected, p - lr m_hat / (sqrt(v_hat) + 1e-8)."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = [torch.zeros_like(x) for x in params]
    v = [torch.zeros_like(x) for x in params]
    for t in range(1, STEPS + 1):
        g = [gi + ci for gi, ci in zip(grad_fn(params), correction)]
        if optimizer == "sgd":
            params = [x - LR * gi for x, gi in zip(params, g)]
            continue
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        params = [x - LR * (mi / (1 - b1 ** t)) / ((vi / (1 - b2 ** t)).sqrt() + eps)
                  for x, mi, vi in zip(params, m, v)]
    return params


def _new_directions(U, G):
    """k = min(r, n - r) orthonormal directions spanning the part of G outside span(U): the top left singular
    vectors of (I - U U^T) G (the span the kit's QR([U | G]) adds, whatever basis of it the kit picks).
    That span is unique only if the projected gradient has rank k (else the kit adds arbitrary directions,
    docs/methods.md, section 3, departure 6): asserted, so the problem stays where the comparison is exact."""
    n, r = U.shape
    k = min(G.shape[1], n - r)
    P, sigma, _ = torch.linalg.svd(G - U @ (U.T @ G), full_matrices=False)
    assert sigma[k - 1] > 1e-6 * sigma[0], f"projected gradient of rank < {k}: the augmented span is not unique"
    return P[:, :k]


def _truncation_rank(sigma, tau):
    """Smallest r1 with ||sigma[r1:]|| <= tau ||sigma||, clamped to [1, len(sigma)] (r_max = n, not binding
    here); asserts no candidate sits within rounding of the threshold (the test would be fragile)."""
    tails = [float(sigma[j:].norm()) for j in range(len(sigma) + 1)]
    bound = tau * tails[0]
    assert min(abs(t - bound) for t in tails) > 1e-6 * tails[0], "threshold too close to a tail norm"
    return max(1, next(j for j, t in enumerate(tails) if t <= bound))


def _fedlrt_reference(p, vc, weighted=False, dynamic=True, optimizer="sgd"):
    """ROUNDS FeDLRT rounds (docs/methods.md, section 3) from U0, S0, V0, b0. Returns (U, S, V, b, ranks)."""
    U, S, V, b = p["U0"], p["S0"], p["V0"], p["b0"]
    w, ranks = _weights(weighted), [RANK]
    for _ in range(ROUNDS):
        r = S.shape[0]
        grads = [_grad(U @ S @ V.T, b, X, Y) for X, Y in p["clients"]]  # at the round's starting point
        if dynamic:  # steps 2-4
            G_U = _wmean(w, [gW @ V @ S.T for gW, _ in grads])
            G_V = _wmean(w, [gW.T @ U @ S for gW, _ in grads])
            U_t = torch.cat([U, _new_directions(U, G_U)], 1)
            V_t = torch.cat([V, _new_directions(V, G_V)], 1)
            S_t = torch.zeros(U_t.shape[1], V_t.shape[1], dtype=S.dtype)
            S_t[:r, :r] = S
        else:
            U_t, V_t, S_t = U, V, S
        # step 5: dL_c/dS_tilde = U_tilde^T dL_c/dW V_tilde at the start; V_c = mean - own
        g_S = [U_t.T @ gW @ V_t for gW, _ in grads]
        g_b = [gb for _, gb in grads]
        mean_S, mean_b = _wmean(w, g_S), _wmean(w, g_b)
        corrections = []
        for gS, gb in zip(g_S, g_b):
            if vc == "none":
                corrections.append([torch.zeros_like(S_t), torch.zeros_like(b)])
                continue
            cS = mean_S - gS
            if vc == "simplified" and dynamic:  # only the old r x r coefficients are corrected
                cS = torch.zeros_like(cS)
                cS[:r, :r] = (mean_S - gS)[:r, :r]
            corrections.append([cS, mean_b - gb])
        replies = []
        for (X, Y), corr in zip(p["clients"], corrections):  # step 6
            def grad_fn(params, X=X, Y=Y):
                gW, gb = _grad(U_t @ params[0] @ V_t.T, params[1], X, Y)
                return [U_t.T @ gW @ V_t, gb]
            replies.append(_local([S_t, b], grad_fn, corr, optimizer))
        S_t, b = _wmean(w, [q[0] for q in replies]), _wmean(w, [q[1] for q in replies])  # step 7
        if dynamic:
            P, sigma, Qh = torch.linalg.svd(S_t)
            r1 = _truncation_rank(sigma, TAU)
            U, S, V = U_t @ P[:, :r1], torch.diag(sigma[:r1]), V_t @ Qh[:r1].T
        else:
            S = S_t
        ranks.append(S.shape[0])
    return U, S, V, b, ranks


def _dense_reference(p, correction, weighted=False, optimizer="sgd"):
    """ROUNDS FedAvg (correction False) / FedLin (True: V_c = grad L - grad L_c at the round's start) rounds."""
    W, b, w = p["W0"], p["b0"], _weights(weighted)
    for _ in range(ROUNDS):
        grads = [_grad(W, b, X, Y) for X, Y in p["clients"]]
        mean = [_wmean(w, [g[0] for g in grads]), _wmean(w, [g[1] for g in grads])]
        replies = []
        for (X, Y), g in zip(p["clients"], grads):
            corr = [mean[0] - g[0], mean[1] - g[1]] if correction else [torch.zeros_like(W), torch.zeros_like(b)]
            replies.append(_local([W, b], lambda q, X=X, Y=Y: list(_grad(q[0], q[1], X, Y)), corr, optimizer))
        W, b = _wmean(w, [q[0] for q in replies]), _wmean(w, [q[1] for q in replies])
    return W, b


def _err(a, b):
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------- FeDLRT

def _check_fedlrt(p, vc, weighted=False, dynamic=True, optimizer="sgd"):
    res = run_fedlrt(_low_rank_fn(p), p["clients"], ROUNDS, lr=LR, local_steps=STEPS, variance_correction=vc,
                     dynamic_rank=dynamic, tau=TAU, weighted=weighted, optimizer=optimizer)
    U, S, V, b, ranks = _fedlrt_reference(p, vc, weighted, dynamic, optimizer)
    st = res["state"]
    assert [h["ranks"][""] for h in res["history"]] == ranks
    assert st["S"].dtype == torch.float64
    err = max(_err(st["U"] @ st["S"] @ st["V"].T, U @ S @ V.T), _err(st["bias"], b))
    assert err <= ATOL, (vc, weighted, dynamic, optimizer, err)
    return res, (U, S, V, b)


@pytest.mark.parametrize("vc", ["full", "simplified", "none"])
def test_fedlrt_round_equals_its_algebra(problem, vc):
    """Dynamic rank, SGD, plain mean, 3 heterogeneous clients, 4 local steps, 2 rounds (rank 2 -> 3 -> 4):
    the corrected trajectory S <- S - lr (dL_c/dS_tilde + V_c) with V_c = G - G_c ("full": all of S_tilde;
    "simplified": its r x r block) matches the algebra, and the arms really differ (V_c is not zero)."""
    res, ref = _check_fedlrt(problem, vc)
    others = {arm: _fedlrt_reference(problem, arm) for arm in ("full", "simplified", "none") if arm != vc}
    W = res["state"]["U"] @ res["state"]["S"] @ res["state"]["V"].T
    for arm, (U, S, V, b, _) in others.items():
        assert _err(W, U @ S @ V.T) > 1e-3, f"{vc} indistinguishable from {arm}: the correction is not exercised"


def test_fedlrt_weighted_equals_its_algebra(problem):
    """weighted=True: every average (basis gradients, correction gradients, S_tilde, bias) uses the
    weights 5/28, 9/28, 14/28; the plain-mean result is measurably different."""
    _, (U, S, V, _) = _check_fedlrt(problem, "full", weighted=True)
    U1, S1, V1, _, _ = _fedlrt_reference(problem, "full", weighted=False)
    assert _err(U @ S @ V.T, U1 @ S1 @ V1.T) > 1e-3


@pytest.mark.parametrize("vc", ["full", "simplified", "none"])
def test_fedlrt_frozen_basis_equals_its_algebra(problem, vc):
    """dynamic_rank=False: no augmentation, no truncation (an SVD of S would rotate U, V): U and V stay
    the initial ones bit for bit and S (2 x 2) follows the corrected local steps ("simplified" = "full" here)."""
    res, (U, S, V, b) = _check_fedlrt(problem, vc, dynamic=False)
    assert torch.equal(res["state"]["U"], problem["U0"]) and torch.equal(res["state"]["V"], problem["V0"])
    assert _err(res["state"]["S"], S) <= ATOL


def test_fedlrt_frozen_basis_adam_equals_its_algebra(problem):
    """optimizer="adam" on S in the frozen basis, with the full correction: a fresh torch-default Adam per round."""
    res, (U, S, V, b) = _check_fedlrt(problem, "full", dynamic=False, optimizer="adam")
    assert _err(res["state"]["S"], S) <= ATOL


# ---------------------------------------------------------------------------------------- FedAvg, FedLin

@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("algo", ["fedavg", "fedlin"])
def test_dense_baselines_equal_their_algebra(problem, algo, optimizer, weighted):
    """FedAvg: local steps on the full weights, weighted or plain mean. FedLin: the same with the correction
    V_c = grad L - grad L_c at the round's start. SGD and Adam; weight and bias to 1e-12."""
    run = run_fedavg if algo == "fedavg" else run_fedlin
    res = run(_dense_fn(problem), problem["clients"], ROUNDS, lr=LR, local_steps=STEPS, optimizer=optimizer,
              weighted=weighted)
    W, b = _dense_reference(problem, algo == "fedlin", weighted, optimizer)
    st = res["state"]
    assert st["weight"].dtype == torch.float64
    err = max(_err(st["weight"], W), _err(st["bias"], b))
    assert err <= ATOL, err
    W_other, _ = _dense_reference(problem, algo != "fedlin", weighted, optimizer)  # the other baseline
    assert _err(W, W_other) > 1e-3
