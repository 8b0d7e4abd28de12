"""GaLoreAdamW: parity with galore-torch, the torch.optim contract, the ablation knobs, per-layer mode, memory."""
import io
import math
import re
import warnings

import pytest
import torch

from lrkit.optim.galore import (GaLoreAdamW, GaLoreAdamW8bit, PerLayerGaLore, adam_state_numel,
                                galore_state_numel, gram_eigh, optimizer_state_bytes)

galore_torch = pytest.importorskip("galore_torch")
T, RANK = 5, 4


def mlp(dtype=torch.float32):
    # tall (32x16), wide (24x32, 10x24) projected weights; the head and the biases in a plain group
    torch.manual_seed(0)
    L = torch.nn.Linear
    return torch.nn.Sequential(L(16, 32), torch.nn.Tanh(), L(32, 24), torch.nn.Tanh(), L(24, 10), torch.nn.Tanh(),
                               L(10, 2)).to(dtype)


def groups(model, **rank_keys):
    W = [model[i].weight for i in (0, 2, 4)]
    rest = [p for p in model.parameters() if all(p is not w for w in W)]
    keys = dict(rank=RANK, update_proj_gap=T, scale=0.25, proj_type="std") | rank_keys
    return [{"params": rest}, {"params": W, **keys}]


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x.to(model[0].weight.dtype)).float(), y)


def train(model, opt, data, accumulation=1, max_grad_norm=None, scheduler=None):
    """The shared loop: optimizers with ``updates_in_backward`` get ``opt.backward`` and clip themselves."""
    in_backward = getattr(opt, "updates_in_backward", False)
    for x, y in data:
        for xs, ys in zip(x.chunk(accumulation), y.chunk(accumulation)):
            loss = loss_fn(model, xs, ys) / accumulation
            opt.backward(loss) if in_backward else loss.backward()
        if max_grad_norm is not None and not in_backward:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
    return model


def max_rel_err(a, b):
    return max(((pa - pb).abs().max() / pb.abs().max()).item() for pa, pb in zip(a.parameters(), b.parameters()))


def official(params, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # galore-torch's HF AdamW deprecation notice
        return galore_torch.GaLoreAdamW(params, **kw)


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
@pytest.mark.parametrize("kw", [{}, dict(lr=1e-2, weight_decay=0.1)], ids=["defaults", "lr_wd"])
def test_parity_with_galore_torch(proj_type, kw):
    ours, ref, data = mlp(), mlp(), batches(4 * T)  # 4 refresh periods, projectors refreshed at 0, 5, 10, 15
    train(ours, GaLoreAdamW(groups(ours, proj_type=proj_type), **kw), data)
    train(ref, official(groups(ref, proj_type=proj_type), **kw), data)
    err = max_rel_err(ours, ref)
    print(f"parity {proj_type} {kw}: max rel err {err:.3g}")
    assert err < 1e-5
    assert max_rel_err(ours, mlp()) > 1e-3  # and it did train


# ------------------------------------------------------------- shapes: square, tall, wide in every projection
# Square weights (every LLaMA q/k/v/o) are where the side rule's tie lives: galore-torch projects an m x n
# gradient on the right when m >= n, so a square one keeps Q (r x n). The gradients are given (not computed
# from the weights), so the two optimizers decompose bit-identical matrices; T = 2 over 6 steps refreshes the
# projectors at steps 0, 2 and 4, with the moments carried across two refreshes.
SHAPES = {"square": (12, 12), "tall": (16, 10), "wide": (10, 16)}
PROJ_TYPES = ["std", "reverse_std", "right", "left", "full"]
SHAPE_STEPS, SHAPE_T, SHAPE_RANK = 6, 2, 3


def shape_weights():
    g = torch.Generator().manual_seed(4)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES.values()]


def shape_grads():
    g = torch.Generator().manual_seed(5)
    return [[torch.randn(*s, generator=g) for s in SHAPES.values()] for _ in range(SHAPE_STEPS)]


def run_given_grads(opt, weights):
    for grads in shape_grads():
        for w, G in zip(weights, grads):
            w.grad = G.clone()
        opt.step()
    return [w.detach().clone() for w in weights]


SHAPE_KW = dict(lr=1e-2, weight_decay=0.1)


def shape_group(weights, proj_type, **keys):
    return [{"params": weights, "rank": SHAPE_RANK, "update_proj_gap": SHAPE_T, "scale": 0.25,
             "proj_type": proj_type, **keys}]


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_parity_with_galore_torch_square_tall_wide(proj_type):
    ours, ref = shape_weights(), shape_weights()
    a = run_given_grads(GaLoreAdamW(shape_group(ours, proj_type), **SHAPE_KW), ours)
    b = run_given_grads(official(shape_group(ref, proj_type), **SHAPE_KW), ref)
    for name, wa, wb, w0 in zip(SHAPES, a, b, shape_weights()):
        torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        assert (wa - w0).abs().max() > 1e-2  # and it did train


def _gram_schmidt(A):
    """Orthonormal columns by modified Gram-Schmidt (float64): the QR factor with a positive diagonal."""
    cols = []
    for j in range(A.shape[1]):
        v = A[:, j].clone()
        for q in cols:
            v -= (q @ v) * q
        cols.append(v / v.norm())
    return torch.stack(cols, 1)


def reference_galore(W, grads, proj_type, policy, method, lr, weight_decay, rank=SHAPE_RANK, T=SHAPE_T,
                     scale=0.25, betas=(0.9, 0.999), eps=1e-6, pca_lr=0.1):
    """GaLore (arXiv 2403.03507, Alg. 2, galore-torch's step) for one m x n weight, written out in float64 from
    the papers, with every moments_on_switch policy and Online Subspace Descent (arXiv 2408.12857) as the
    optimizer's docstring states them. The SVD is taken of the same fp32 gradient (the same singular vectors,
    signs included, as the optimizer's)."""
    W, (m, n) = W.detach().double().clone(), W.shape
    side = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right"}.get(proj_type, proj_type)
    left, right = side in ("left", "full"), side in ("right", "full")
    P = Q = M = V = None
    b1, b2 = betas
    k = 0  # steps since the moments (re)started
    for t, G32 in enumerate(grads):
        G = G32.double()
        if t == 0 or method == "online_pca" or t % T == 0:
            if t > 0 and method == "online_pca":  # one normalised descent step on ||G - B B^T G||^2, then QR
                def descend(B, A):
                    AAtB = A @ (A.t() @ B)
                    return _gram_schmidt(B + pca_lr * (AAtB - B @ (B.t() @ AAtB)) / (A * A).sum())
                P_new = descend(P, G) if left else None
                Q_new = descend(Q.t(), G.t()).t() if right else None
            else:
                U, _, Vh = torch.linalg.svd(G32, full_matrices=False)
                P_new = U[:, :rank].double() if left else None
                Q_new = Vh[:rank].double() if right else None
            if M is not None and policy != "keep":
                CL = P_new.t() @ P if left else None  # new coordinates from old ones
                CR = Q @ Q_new.t() if right else None
                if policy == "reset":
                    M, V, k = torch.zeros_like(M), torch.zeros_like(V), 0
                elif policy == "rotate":
                    M = (CL if left else torch.eye(M.shape[0]).double()) @ M @ (CR if right else torch.eye(M.shape[1]).double())
                    V = ((CL if left else torch.eye(V.shape[0]).double()) @ V
                         @ (CR if right else torch.eye(V.shape[1]).double())).clamp_min(0)
                else:  # ldadam, entry by entry
                    M, V = (x.double() for x in ldadam_transport(M, V, CL, CR, k, betas))
            P, Q = P_new, Q_new
        R = G
        if left:
            R = P.t() @ R
        if right:
            R = R @ Q.t()
        if M is None:
            M, V = torch.zeros_like(R), torch.zeros_like(R)
        M, V, k = b1 * M + (1 - b1) * R, b2 * V + (1 - b2) * R * R, k + 1
        N = M / (V.sqrt() + eps)
        if left:
            N = P @ N
        if right:
            N = N @ Q
        W = W - lr * math.sqrt(1 - b2 ** k) / (1 - b1 ** k) * scale * N
        W = W - lr * weight_decay * W
    return W.float()


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("policy", ["keep", "reset", "rotate", "ldadam"])
@pytest.mark.parametrize("method", ["svd", "online_pca"])
def test_every_moments_policy_and_online_pca_match_a_reference_square_tall_wide(method, policy, proj_type):
    # eps 1e-3: "rotate" clamps rotated second moments at 0, and M / (0 + 1e-6) would turn fp32 rounding into
    # steps of order 10 (eps still well below sqrt(V) ~ 0.05, so V shapes every update)
    weights, kw = shape_weights(), dict(SHAPE_KW, eps=1e-3)
    opt = GaLoreAdamW(shape_group(weights, proj_type, moments_on_switch=policy, proj_method=method), **kw)
    ours = run_given_grads(opt, weights)
    grads = shape_grads()
    for i, (name, W0) in enumerate(zip(SHAPES, shape_weights())):
        ref = reference_galore(W0, [g[i] for g in grads], proj_type, policy, method, **kw)
        torch.testing.assert_close(ours[i], ref, rtol=1e-5, atol=5e-6, msg=lambda m: f"{name}: {m}")
        assert (ours[i] - W0).abs().max() > 1e-2


def test_online_pca_step_lowers_the_reconstruction_error():
    # Online Subspace Descent moves P *down* ||G - P P^T G||_F: with the same G every step, the error falls
    g = torch.Generator().manual_seed(2)
    G = torch.randn(10, 4, generator=g) @ torch.randn(4, 16, generator=g) + 0.1 * torch.randn(10, 16, generator=g)
    p = torch.nn.Parameter(torch.zeros(10, 16))
    opt = GaLoreAdamW([{"params": [p], "rank": 3, "proj_method": "online_pca", "pca_lr": 0.5}])
    errors = []
    for step in range(4):
        step_once(opt, p, torch.randn(10, 16, generator=g) if step == 0 else G)  # step 0: SVD of another G
        P = opt.state[p]["P"]
        errors.append((G - P @ (P.t() @ G)).norm().item())
    assert errors[1] > errors[2] > errors[3]


# ---------------------------------------------------------------------- the "eigh" refresh
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)], ids=["wide", "tall"])
def test_gram_eigh_is_the_svd_subspace_more_accurately_than_the_fp32_svd(shape):
    # singular values 1 .. 1e-3 (condition 1e3, squared 1e6 in the Gram matrix): float64 keeps it exact
    g = torch.Generator().manual_seed(0)
    m, n = shape
    U0 = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    V0 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    k = min(m, n)
    G = (U0[:, :k] * torch.logspace(0, -3, k, dtype=torch.float64)) @ V0[:, :k].t()
    G32, r = G.float(), 12
    U, _, Vh = torch.linalg.svd(G32.double(), full_matrices=False)  # the truth for the fp32 input
    U32, _, Vh32 = torch.linalg.svd(G32, full_matrices=False)
    P, Q = gram_eigh(G32, r, "left"), gram_eigh(G32, r, "right")
    assert P.dtype == Q.dtype == torch.float32 and P.shape == (m, r) and Q.shape == (r, n)

    def err(B, truth):  # distance of the column spaces, as projectors
        return torch.linalg.matrix_norm(B.double() @ B.double().t() - truth @ truth.t(), 2).item()

    e_left, e_right = err(P, U[:, :r]), err(Q.t(), Vh[:r].t())
    assert e_left < 1e-6 and e_right < 1e-6  # the rounding of the result to fp32
    assert e_left < err(U32[:, :r], U[:, :r]) and e_right < err(Vh32[:r].t(), Vh[:r].t())
    # descending order (as the SVD's) and the sign rule: each column's largest entry is positive
    torch.testing.assert_close(P.abs(), U[:, :r].abs().float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(Q.abs(), Vh[:r].abs().float(), atol=1e-5, rtol=0)
    for B in (P, Q.t()):
        assert (B.gather(0, B.abs().argmax(0, keepdim=True)) > 0).all()
    assert torch.equal(gram_eigh(-G32, r, "left"), P)  # a function of the subspace, not of G's sign


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_eigh_refresh_trains_as_the_svd_refresh(proj_type):
    # Column signs cancel in P N_t and in the moments of one basis, so "eigh" and "svd" give the same
    # trajectory while no moment crosses a refresh: T beyond the run, or "reset" at every refresh.
    # With "keep" a flipped column carries its old moments reversed, so there the two runs may part.
    data, opts = batches(4 * T), []
    for keys in (dict(update_proj_gap=10 ** 6), dict(moments_on_switch="reset")):
        eigh, svd = mlp(), mlp()
        opts.append(opt := GaLoreAdamW(groups(eigh, proj_type=proj_type, proj_method="eigh", **keys), lr=1e-2))
        train(eigh, opt, data)
        train(svd, GaLoreAdamW(groups(svd, proj_type=proj_type, proj_method="svd", **keys), lr=1e-2), data)
        assert max_rel_err(eigh, svd) < 1e-4, keys
        assert max_rel_err(eigh, mlp()) > 1e-2  # and it did train
    # the projectors kept (T beyond the run) are gram_eigh's of the step-0 gradients, signs included
    first = mlp()
    loss_fn(first, *data[0]).backward()
    for i, W in zip((0, 2, 4), opts[0].param_groups[1]["params"]):
        G, st = first[i].weight.grad, opts[0].state[W]
        side = {"std": "right" if G.shape[0] >= G.shape[1] else "left",
                "reverse_std": "left" if G.shape[0] >= G.shape[1] else "right"}.get(proj_type, "full")
        for key, which in (("P", "left"), ("Q", "right")):
            assert (key in st) == (side in (which, "full"))
            if key in st:
                torch.testing.assert_close(st[key], gram_eigh(G, RANK, which), atol=1e-6, rtol=0)


def test_defaults_match_official():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert {k: v for k, v in GaLoreAdamW(p).defaults.items() if k in ("lr", "betas", "eps", "weight_decay",
            "correct_bias")} == dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True)


def test_non_2d_and_oversized_rank_fall_back_to_full_rank_adam():
    # biases (1-D; galore-torch raises IndexError) and a 2x10 weight at rank 2 (= min; above it is an error)
    a, b = mlp(), mlp()
    with pytest.warns(UserWarning, match="full-rank Adam") as record:
        oa = GaLoreAdamW([{"params": [a[6].weight, a[6].bias, a[4].bias], "rank": 2},
                          {"params": [a[6].bias.new_zeros(3, 3).requires_grad_()], "rank": 3}])
    assert len(record) == 1  # once per optimizer
    ob = GaLoreAdamW([{"params": [b[6].weight, b[6].bias, b[4].bias]}])
    train(a, oa, batches(6))
    train(b, ob, batches(6))
    assert max_rel_err(a, b) == 0.0
    assert set(oa.state[a[6].weight]) == {"step", "moment_step", "exp_avg", "exp_avg_sq"}


# ------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("kw, bad, value", [
    (dict(lr=-1.0), "learning rate", -1.0), (dict(lr=float("nan")), "learning rate", "nan"),
    (dict(lr=float("inf")), "learning rate", "inf"), (dict(betas=(1.0, 0.999)), "beta", 1.0),
    (dict(betas=(0.9, -0.1)), "beta", -0.1), (dict(eps=-1e-8), "epsilon", -1e-8),
    (dict(weight_decay=-0.1), "weight_decay", -0.1), (dict(scale=0.0), "scale", 0.0),
    (dict(scale=float("inf")), "scale", "inf"), (dict(update_proj_gap=0), "update_proj_gap", 0),
    (dict(proj_type="diag"), "proj_type", "'diag'"), (dict(proj_method="qr"), "proj_method", "'qr'"),
    (dict(moments_on_switch="flip"), "moments_on_switch", "'flip'"), (dict(pca_lr=0.0), "pca_lr", 0.0),
    (dict(switch_subspace="no"), "switch_subspace", "'no'"), (dict(seed=-1), "seed", -1),
])
def test_invalid_arguments(kw, bad, value):
    with pytest.raises(ValueError, match=rf"Invalid {bad}.*: {re.escape(str(value))} \("):
        GaLoreAdamW(mlp().parameters(), **kw)


@pytest.mark.parametrize("rank", [0, -2, 1.5])
def test_invalid_rank(rank):
    with pytest.raises(ValueError, match=f"Invalid rank: {rank}"):
        GaLoreAdamW([{"params": mlp().parameters(), "rank": rank}])
    with pytest.raises(ValueError, match="Invalid update_proj_gap: 0"):  # group keys are checked too
        GaLoreAdamW([{"params": mlp().parameters(), "rank": 2, "update_proj_gap": 0}])


def test_closure_returns_loss():
    model, (x, y) = mlp(), batches(1)[0]
    opt = GaLoreAdamW(groups(model))

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss
    assert torch.isfinite(opt.step(closure))


@pytest.mark.parametrize("method, policy", [("svd", "keep"), ("random", "rotate"), ("online_pca", "keep"),
                                            ("randomized_svd", "reset"), ("svd", "ldadam")])
def test_state_dict_resume_is_exact(method, policy):
    kw, data = dict(proj_method=method, moments_on_switch=policy), batches(3 * T)
    full = mlp()
    train(full, GaLoreAdamW(groups(full, **kw), seed=3), data)

    first = mlp()
    opt = GaLoreAdamW(groups(first, **kw), seed=3)
    train(first, opt, data[:7])  # stop between refreshes
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # the state holds tensors and plain numbers only
    resumed = mlp()
    resumed.load_state_dict(ckpt["model"])
    opt = GaLoreAdamW(groups(resumed, **kw), seed=3)
    opt.load_state_dict(ckpt["opt"])
    train(resumed, opt, data[7:])
    assert max_rel_err(resumed, full) == 0.0


# ------------------------------------------------------------------------------------------ knobs
def step_once(opt, p, G):
    p.grad = G.clone()
    opt.step()


def snapshot(opt, p):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}


def test_switch_subspace_false_keeps_projector():
    for switch in (True, False):
        p = torch.nn.Parameter(torch.randn(12, 20))
        opt = GaLoreAdamW([{"params": [p], "rank": 3, "update_proj_gap": T, "switch_subspace": switch}])
        step_once(opt, p, torch.randn(12, 20))
        P0 = opt.state[p]["P"].clone()
        for _ in range(2 * T):
            step_once(opt, p, torch.randn(12, 20))
        assert torch.equal(opt.state[p]["P"], P0) is (not switch)


@pytest.mark.parametrize("policy", ["keep", "reset", "rotate", "ldadam"])
def test_moments_on_switch(policy):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(12, 20))  # wide: left projector P
    b1, b2 = 0.9, 0.999
    opt = GaLoreAdamW([{"params": [p], "rank": 3, "update_proj_gap": T, "moments_on_switch": policy}])
    for _ in range(T):
        step_once(opt, p, torch.randn(12, 20))
    before = snapshot(opt, p)
    G = torch.randn(12, 20)
    step_once(opt, p, G)  # step T: a new P, then the moments are handled, then updated with R = P^T G
    after = snapshot(opt, p)
    P_old, P_new = before["P"], after["P"]
    assert not torch.allclose(P_old, P_new)
    R = P_new.t() @ G
    M, V = before["exp_avg"], before["exp_avg_sq"]
    if policy == "reset":
        M, V = torch.zeros_like(M), torch.zeros_like(V)
        assert after["moment_step"] == 1  # bias correction restarts with the moments
    elif policy == "rotate":
        C = P_new.t() @ P_old
        M, V = C @ M, (C @ V).clamp_min(0)
    elif policy == "ldadam":
        M, V = ldadam_transport(M, V, P_new.t() @ P_old, None, before["moment_step"], (b1, b2))
    torch.testing.assert_close(after["exp_avg"], b1 * M + (1 - b1) * R, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(after["exp_avg_sq"], b2 * V + (1 - b2) * R * R, rtol=1e-5, atol=1e-9)


def test_rotate_right_projector():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(20, 12))  # tall: right projector Q
    opt = GaLoreAdamW([{"params": [p], "rank": 3, "update_proj_gap": T, "moments_on_switch": "rotate"}],
                      betas=(0.5, 0.5))
    for _ in range(T):
        step_once(opt, p, torch.randn(20, 12))
    before = snapshot(opt, p)
    G = torch.randn(20, 12)
    step_once(opt, p, G)
    Q_old, Q_new = before["Q"], opt.state[p]["Q"]
    expected = 0.5 * before["exp_avg"] @ (Q_old @ Q_new.t()) + 0.5 * G @ Q_new.t()
    torch.testing.assert_close(opt.state[p]["exp_avg"], expected, rtol=1e-5, atol=1e-7)


def ldadam_transport(M, V, C_left, C_right, t, betas):
    """LDAdam's projection-aware moment transport (arXiv 2410.16103, Sec. 3.1) written out entry by entry
    in float64, independently of the optimizer's matrix form: mean m_hat = M / c1 and variance
    s = V / c2 - m_hat^2 per coordinate; a new coordinate is a sum of old ones with weights C_left[i, k] *
    C_right[l, j], so its mean is the weighted sum of means and, for independent coordinates, its variance
    the sum of variances weighted by the squared weights; V_new = c2 |s_new + m_hat_new^2|."""
    import numpy as np

    M, V = M.double().numpy(), V.double().numpy()
    r1, r2 = M.shape
    CL = np.eye(r1) if C_left is None else C_left.double().numpy()
    CR = np.eye(r2) if C_right is None else C_right.double().numpy()
    c1, c2 = 1 - betas[0] ** t, 1 - betas[1] ** t
    Mn, Vn = np.zeros((CL.shape[0], CR.shape[1])), np.zeros((CL.shape[0], CR.shape[1]))
    for i in range(Mn.shape[0]):
        for j in range(Mn.shape[1]):
            mean = var = 0.0
            for k in range(r1):
                for l in range(r2):
                    w = CL[i, k] * CR[l, j]
                    mean += w * M[k, l] / c1
                    var += w * w * (V[k, l] / c2 - (M[k, l] / c1) ** 2)
            Mn[i, j], Vn[i, j] = mean * c1, c2 * abs(var + mean ** 2)
    return torch.from_numpy(Mn).float(), torch.from_numpy(Vn).float()


@pytest.mark.parametrize("shape, proj_type", [((12, 20), "std"), ((20, 12), "std"), ((14, 18), "full")],
                         ids=["left", "right", "both"])
def test_ldadam_moment_transport_matches_its_formula(shape, proj_type):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(*shape))
    betas = (0.8, 0.95)
    opt = GaLoreAdamW([{"params": [p], "rank": 3, "update_proj_gap": T, "moments_on_switch": "ldadam",
                        "proj_type": proj_type}], betas=betas)
    for _ in range(T):
        step_once(opt, p, torch.randn(*shape))
    before = snapshot(opt, p)
    G = torch.randn(*shape)
    step_once(opt, p, G)
    after = snapshot(opt, p)
    P_old, P_new, Q_old, Q_new = before.get("P"), after.get("P"), before.get("Q"), after.get("Q")
    assert proj_type != "full" or (P_new is not None and Q_new is not None)
    CL = P_new.t() @ P_old if P_new is not None else None
    CR = Q_old @ Q_new.t() if Q_new is not None else None
    M, V = ldadam_transport(before["exp_avg"], before["exp_avg_sq"], CL, CR, before["moment_step"], betas)
    R = G if P_new is None else P_new.t() @ G
    R = R if Q_new is None else R @ Q_new.t()
    assert after["moment_step"] == T + 1  # LDAdam keeps counting: bias correction does not restart
    torch.testing.assert_close(after["exp_avg"], betas[0] * M + (1 - betas[0]) * R, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after["exp_avg_sq"], betas[1] * V + (1 - betas[1]) * R * R, rtol=1e-5, atol=1e-6)
    assert (after["exp_avg_sq"] >= 0).all()


def test_ldadam_same_subspace_is_identity_and_stale_moments_move():
    # an unchanged basis leaves the moments as they are; a basis permutation permutes them exactly
    torch.manual_seed(0)
    M, V = torch.randn(3, 5), torch.rand(3, 5) + 1.0
    Mn, Vn = ldadam_transport(M, V, torch.eye(3), None, 4, (0.9, 0.999))
    torch.testing.assert_close((Mn, Vn), (M, V))
    perm = torch.eye(3)[[2, 0, 1]]
    Mn, Vn = ldadam_transport(M, V, perm, None, 4, (0.9, 0.999))
    torch.testing.assert_close((Mn, Vn), (perm @ M, perm @ V))


@pytest.mark.parametrize("method", ["svd", "eigh", "randomized_svd", "random", "online_pca"])
def test_methods_decrease_loss_and_are_deterministic(method):
    def run(seed):
        torch.manual_seed(0)
        X, A = torch.randn(64, 32), torch.randn(32, 4) @ torch.randn(4, 24) / 2  # low-rank linear target
        W = torch.nn.Parameter(torch.zeros(32, 24))
        opt = GaLoreAdamW([{"params": [W], "rank": 4, "update_proj_gap": 10, "proj_method": method}],
                          lr=0.1, seed=seed)
        losses = []
        for _ in range(100):
            loss = (X @ W - X @ A).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, W.detach().clone(), opt
    losses, W, opt = run(0)
    # a random rank-4 subspace of 24 directions per period learns more slowly than the gradient's own
    assert losses[-1] < (0.5 if method == "random" else 0.1) * losses[0]
    P = opt.state[opt.param_groups[0]["params"][0]]["Q"]
    torch.testing.assert_close(P @ P.t(), torch.eye(4), atol=1e-5, rtol=0)  # orthonormal rows
    assert torch.equal(run(0)[1], W)  # same seed: bit-identical
    if method in ("random", "randomized_svd"):
        assert not torch.equal(run(1)[1], W)


def test_online_pca_moves_every_step():
    p = torch.nn.Parameter(torch.randn(12, 20))
    opt = GaLoreAdamW([{"params": [p], "rank": 3, "proj_method": "online_pca", "update_proj_gap": 100}])
    step_once(opt, p, torch.randn(12, 20))
    P0 = opt.state[p]["P"].clone()
    step_once(opt, p, torch.randn(12, 20))
    P1 = opt.state[p]["P"]
    assert not torch.equal(P0, P1) and (P1 - P0).norm() < 0.2 * math.sqrt(3)  # a small move: pca_lr 0.1


def test_bf16_smoke():
    model = mlp(torch.bfloat16)
    w0 = model[0].weight.detach().clone()
    opt = GaLoreAdamW(groups(model, proj_method="online_pca", moments_on_switch="rotate"), lr=1e-2)
    train(model, opt, batches(2 * T))
    assert all(torch.isfinite(p).all() for p in model.parameters()) and not torch.equal(model[0].weight, w0)
    state = opt.state[model[0].weight]
    assert state["Q"].dtype == state["exp_avg"].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ per-layer
def per_layer_kw(**kw):
    return dict(lr=1e-2, weight_decay=0.01) | kw


@pytest.mark.parametrize("accumulation", [1, 4])
@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_per_layer_matches_normal_mode(accumulation, max_grad_norm):
    kw, data = per_layer_kw(), batches(3 * T)
    normal = mlp()
    train(normal, GaLoreAdamW(groups(normal, proj_method="random"), **kw), data, accumulation, max_grad_norm)
    layered = mlp()
    per_layer = PerLayerGaLore(groups(layered, proj_method="random"), accumulation_steps=accumulation,
                               max_grad_norm=max_grad_norm, **kw)
    assert isinstance(per_layer, torch.optim.Optimizer) and per_layer.updates_in_backward
    n_steps, stepped = 0, []
    per_layer.register_step_post_hook(lambda *_: stepped.append(True))
    for x, y in data:
        for j, (xs, ys) in enumerate(zip(x.chunk(accumulation), y.chunk(accumulation))):
            before = [p.detach().clone() for p in layered.parameters()]
            per_layer.backward(loss_fn(layered, xs, ys) / accumulation)
            last = j == accumulation - 1
            # gradients freed once the update ran (with clipping: at the end of the k-th backward)
            assert all((p.grad is None) is last for p in layered.parameters())
            assert all(torch.equal(a, b) is not last for a, b in zip(before, layered.parameters()))
        after = [p.detach().clone() for p in layered.parameters()]
        per_layer.step()  # a no-op: the hooks did everything
        assert all(torch.equal(a, b) for a, b in zip(after, layered.parameters()))
        per_layer.zero_grad()
        n_steps += 1
    assert len(stepped) == n_steps
    assert max_rel_err(layered, normal) < 1e-6
    # every parameter stepped once per optimizer step, not once per micro-batch (GaLore issue #78)
    assert {s["step"] for s in per_layer.state.values()} == {len(data)}
    assert len(per_layer.state) == len(list(layered.parameters()))
    assert optimizer_state_bytes(per_layer) == sum(
        4 * galore_state_numel(p.shape, RANK if p.dim() == 2 and p is not layered[6].weight else None)
        for p in layered.parameters())
    per_layer.remove()


@pytest.mark.parametrize("accumulation", [1, 2])
def test_per_layer_follows_lr_scheduler(accumulation):
    data = batches(3 * T)

    def run(cls, **extra):
        model = mlp()
        opt = cls(groups(model, proj_method="random"), **per_layer_kw(), **extra)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: [1.0, 0.5, 2.0, 0.0, 1.5][s % 5])
        train(model, opt, data, accumulation, scheduler=sched)
        return model, opt

    normal, _ = run(GaLoreAdamW)
    layered, opt = run(PerLayerGaLore, accumulation_steps=accumulation)
    assert max_rel_err(layered, normal) < 1e-6
    assert opt.param_groups[0]["lr"] == 1e-2 * [1.0, 0.5, 2.0, 0.0, 1.5][len(data) % 5]
    model = mlp()
    plain = PerLayerGaLore(groups(model, proj_method="random"), accumulation_steps=accumulation, **per_layer_kw())
    train(model, plain, data, accumulation)
    assert max_rel_err(model, layered) > 1e-3  # the schedule did change the updates


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_per_layer_state_dict_resume_is_exact(max_grad_norm):
    kw = per_layer_kw(proj_method="random", moments_on_switch="rotate")
    make = lambda m: PerLayerGaLore(groups(m, **kw), accumulation_steps=2, max_grad_norm=max_grad_norm, seed=3)
    data = batches(3 * T)
    full = mlp()
    train(full, make(full), data, accumulation=2)

    first = mlp()
    opt = make(first)
    train(first, opt, data[:7], accumulation=2)
    opt.remove()
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert set(ckpt["opt"]["state"]) == set(range(len(list(first.parameters()))))
    resumed = mlp()
    resumed.load_state_dict(ckpt["model"])
    opt = make(resumed)
    opt.load_state_dict(ckpt["opt"])
    train(resumed, opt, data[7:], accumulation=2)
    assert max_rel_err(resumed, full) == 0.0
    # the same format as GaLoreAdamW: its checkpoint continues in a normal-mode optimizer too
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # afresh: load_state_dict aliases the tensors it is given
    normal = mlp()
    normal.load_state_dict(ckpt["model"])
    opt = GaLoreAdamW(groups(normal, **kw), seed=3)
    opt.load_state_dict(ckpt["opt"])
    train(normal, opt, data[7:], accumulation=2, max_grad_norm=max_grad_norm)
    assert max_rel_err(normal, full) < 1e-6


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_per_layer_step_completes_what_hooks_did_not(max_grad_norm):
    # an unused parameter (no grad: never ready) and a gradient set by hand (no hook saw it)
    def setup(cls, **extra):
        model = mlp()
        torch.manual_seed(5)
        unused, manual = torch.nn.Parameter(torch.randn(6, 7)), torch.nn.Parameter(torch.randn(6, 7))
        g = groups(model, proj_method="random")
        g[1]["params"] += [unused, manual]
        return model, manual, cls(g, **per_layer_kw(), **extra)

    def run(model, manual, opt, in_backward):
        for i, (x, y) in enumerate(batches(2 * T)):
            loss = loss_fn(model, x, y)
            opt.backward(loss) if in_backward else loss.backward()
            manual.grad = torch.full_like(manual, 0.1 * (i + 1))
            if not in_backward and max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(model.parameters()) + [manual], max_grad_norm)
            opt.step()
            if in_backward:  # the hooks freed theirs, step() freed the rest
                assert all(p.grad is None for p in model.parameters()) and manual.grad is None
            opt.zero_grad()
        return model, manual

    a, ma = run(*setup(GaLoreAdamW), in_backward=False)
    b, mb = run(*setup(PerLayerGaLore, max_grad_norm=max_grad_norm), in_backward=True)
    assert max_rel_err(b, a) < 1e-6
    torch.testing.assert_close(mb, ma, rtol=1e-6, atol=0)


def test_per_layer_without_hooks_is_galore_adamw():
    data = batches(2 * T)
    normal = mlp()
    train(normal, GaLoreAdamW(groups(normal, proj_method="random"), **per_layer_kw()), data, 2, 0.05)
    layered = mlp()
    opt = PerLayerGaLore(groups(layered, proj_method="random"), max_grad_norm=0.05, **per_layer_kw())
    opt.remove_hooks()
    for x, y in data:  # plain loss.backward(): gradients accumulate, step() updates and clips
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            (loss_fn(layered, xs, ys) / 2).backward()
        assert all(p.grad is not None for p in layered.parameters())
        opt.step()
        opt.zero_grad()
    assert max_rel_err(layered, normal) < 1e-6


def test_per_layer_zero_grad_discards_partial_accumulation():
    model, (x, y) = mlp(), batches(1)[0]
    opt = PerLayerGaLore(groups(model), accumulation_steps=2)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt.backward(loss_fn(model, x, y))
    opt.step()  # mid-accumulation: nothing to do
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.backward(loss_fn(model, x, y))  # the count restarted: still accumulating
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    opt.backward(loss_fn(model, x, y))
    assert not any(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_per_layer_hooks_die_with_the_optimizer():
    model, (x, y) = mlp(), batches(1)[0]
    opt = PerLayerGaLore(groups(model))
    del opt
    import gc
    gc.collect()
    loss_fn(model, x, y).backward()  # no hook left: plain gradients
    assert all(p.grad is not None for p in model.parameters())


def test_fused_optimizer_protocol():
    from lrkit.optim import AdaLomo, Lomo
    p = [torch.nn.Parameter(torch.zeros(3, 3))]
    assert Lomo(p, fused=True).updates_in_backward is True
    assert Lomo(p, fused=False).updates_in_backward is False
    assert AdaLomo(p, fused=False).updates_in_backward is False


def test_per_layer_argument_validation():
    with pytest.raises(ValueError, match="Invalid accumulation_steps: 0"):
        PerLayerGaLore(mlp().parameters(), accumulation_steps=0)
    with pytest.raises(ValueError, match="Invalid max_grad_norm: -1"):
        PerLayerGaLore(mlp().parameters(), max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="Invalid learning rate"):  # GaLoreAdamW's own checks
        PerLayerGaLore(mlp().parameters(), lr=-1.0)


# ------------------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_state_bytes_match_formula(proj_type):
    ours, ref = mlp(), mlp()
    oa = GaLoreAdamW(groups(ours, proj_type=proj_type))
    ob = official(groups(ref, proj_type=proj_type))
    train(ours, oa, batches(1))
    train(ref, ob, batches(1))
    expected = sum(galore_state_numel(p.shape, RANK if p.dim() == 2 and p is not ours[6].weight else None,
                                      proj_type) for p in ours.parameters())
    assert optimizer_state_bytes(oa) == optimizer_state_bytes(ob) == 4 * expected
    assert galore_state_numel((32, 16), 4) == 4 * 16 + 2 * 32 * 4  # Q (r x n) + M, V (m x r)
    assert galore_state_numel((24, 32), 4) == 24 * 4 + 2 * 4 * 32  # P (m x r) + M, V (r x n)
    assert galore_state_numel((10,), 4) == adam_state_numel((10,)) == 20


# ------------------------------------------------------------------------------------------ 8-bit
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_8bit_raises_clearly_on_cpu():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        GaLoreAdamW8bit(mlp().parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_8bit_trains_on_cuda():
    pytest.importorskip("bitsandbytes")
    model = torch.nn.Linear(256, 256).cuda()
    opt = GaLoreAdamW8bit([{"params": [model.weight], "rank": 8, "update_proj_gap": T, "scale": 0.25,
                            "proj_type": "std"}, {"params": [model.bias]}], lr=1e-3)
    x = torch.randn(32, 256, device="cuda")
    losses = []
    for _ in range(10):
        loss = (model(x) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_8bit_galore_builds_its_bitsandbytes_base_by_keyword():
    """galore-torch 1.0 passes percentile_clipping=100 and block_wise=True by position into bitsandbytes'
    max_unorm and skip_zeros slots; the kit's class must leave them at bitsandbytes' defaults (built on
    CPU here: the slots are set at construction, the 8-bit kernels need CUDA only at step())."""
    pytest.importorskip("bitsandbytes")
    from galore_torch import GaLoreAdamW8bit as Official

    from lrkit.optim.galore import _keyword_adamw8bit_class

    params = [torch.nn.Parameter(torch.zeros(64, 64))]
    ours = _keyword_adamw8bit_class()(params, lr=1e-2)
    theirs = Official([torch.nn.Parameter(torch.zeros(64, 64))], lr=1e-2)
    assert (theirs.args.max_unorm, theirs.args.skip_zeros) == (100, True)  # the official slip, as documented
    assert (ours.args.max_unorm, ours.args.skip_zeros, ours.args.optim_bits) == (0.0, False, 8)
    assert ours.param_groups[0]["lr"] == 1e-2 and ours.param_groups[0]["weight_decay"] == 1e-2
