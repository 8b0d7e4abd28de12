"""FeDLRT core (lrkit/fed): augment/truncate algebra, exactness against a centralised reference,
communication accounting against docs/methods.md, section 3, partitions, determinism, and the least-squares
variance-correction experiment of arXiv 2406.17887 Sec. 4.1 at a tiny size."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from lrkit.fed import fedlrt, partition
from lrkit.fed.fedlrt import augment, augmented_coefficients, truncate
from lrkit.fed.layers import LowRankConv2d, LowRankLinear, low_rank_layers, to_low_rank
from lrkit.fed.problems import least_squares
from lrkit.fed.simulate import run_fedavg, run_fedlin, run_fedlrt, to_run_result

torch.set_num_threads(1)


def _orth(n, r, seed):
    return torch.linalg.qr(torch.randn(n, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def _comm(rec):
    return {k: rec[k] for k in ("floats_down", "floats_up", "bytes_down", "bytes_up")}


# ---------------------------------------------------------------------------------------- layers

def test_layers_match_dense_and_from_dense_is_svd():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    lr = LowRankLinear.from_dense(lin, rank=7)  # full rank: exact
    x = torch.randn(5, 12)
    torch.testing.assert_close(lr(x), lin(x), atol=1e-5, rtol=1e-5)
    assert torch.allclose(lr.U.T @ lr.U, torch.eye(7), atol=1e-5)
    conv = nn.Conv2d(3, 6, 3, padding=1, stride=2)
    lc = LowRankConv2d.from_dense(conv, rank=27)  # min(6, 3*3*3) = 6: rank clamped, still exact
    assert lc.rank == 6
    xi = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(lc(xi), conv(xi), atol=1e-5, rtol=1e-5)
    # scratch init: seeded, orthonormal
    a, b = LowRankLinear(10, 8, 3, seed=1), LowRankLinear(10, 8, 3, seed=1)
    assert torch.equal(a.U, b.U) and torch.allclose(a.V.T @ a.V, torch.eye(3), atol=1e-6)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(10, 8, 5, r_max=4)


def test_to_low_rank_converts_all_but_excluded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 10), nn.Linear(10, 3))
    model = to_low_rank(model, rank=2, exclude=["4"])
    assert list(low_rank_layers(model)) == ["0", "3"] and isinstance(model[4], nn.Linear)
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 3)
    with pytest.raises(ValueError, match="exclude"):
        to_low_rank(model, 2, exclude=["nope"])


# ---------------------------------------------------------------------------------------- augment / truncate

@pytest.mark.parametrize("n,r,G_kind", [(10, 3, "random"), (5, 3, "random"), (10, 3, "zero"), (10, 3, "in_span")])
def test_augment_orthonormal_and_contains_old_span(n, r, G_kind):
    U = _orth(n, r, 0)
    G = {"random": torch.randn(n, r, dtype=torch.float64), "zero": torch.zeros(n, r, dtype=torch.float64),
         "in_span": U @ torch.randn(r, r, dtype=torch.float64)}[G_kind]
    U_bar = augment(U, G)
    assert U_bar.shape == (n, min(r, n - r))  # 2r > n: clamped to n columns in all
    U_tilde = torch.cat([U, U_bar], 1)
    torch.testing.assert_close(U_tilde.T @ U_tilde, torch.eye(U_tilde.shape[1], dtype=torch.float64))
    torch.testing.assert_close(U_tilde @ (U_tilde.T @ U), U)  # span(U) inside span(U_tilde)
    if G_kind == "random":  # and the gradient directions too
        torch.testing.assert_close(U_tilde @ (U_tilde.T @ G), G)


def _ill_conditioned_gradients(U, seed=0):
    """Basis gradients on which an augmentation that orthogonalises G_U against U by one projection pass
    (classical Gram-Schmidt, G - U U^T G, then QR) loses orthogonality to U: the part of G outside span(U) is
    1e-14 of G (cancellation), or G is huge, or rank one and nearly inside span(U); and graded columns
    (condition number ~1e12), which ask the QR for the tiny directions."""
    n, r = U.shape
    g = torch.Generator().manual_seed(seed)
    A, N = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((r, r), (n, r)))
    return {"near_span": 1e8 * U @ A + 1e-6 * N, "huge": 1e12 * U @ A + N,
            "rank_one_near_span": (U @ A[:, :1] + 1e-9 * N[:, :1]) @ torch.ones(1, r, dtype=torch.float64),
            "graded": (U @ A + N) * torch.logspace(0, -12, r, dtype=torch.float64)}


@pytest.mark.parametrize("kind", ["near_span", "huge", "rank_one_near_span", "graded"])
def test_augment_is_orthonormal_to_1e_12_on_ill_conditioned_gradients(kind):
    """[U | U_bar] orthonormal to 1e-12 (float64) whatever the gradient's conditioning: a one-pass projection
    loses it (|U^T U_bar| 3e-4 to 0.3 on these gradients), so would a float32 QR (4e-7), a wrong slice of Q."""
    n, r = 48, 6
    U = _orth(n, r, 5)
    G = _ill_conditioned_gradients(U)[kind]
    U_bar = augment(U, G)
    assert U_bar.shape == (n, r) and U_bar.dtype == torch.float64
    U_tilde = torch.cat([U, U_bar], 1)
    err = (U_tilde.T @ U_tilde - torch.eye(2 * r, dtype=torch.float64)).abs().max()
    assert err < 1e-12, f"[U | U_bar] orthonormal only to {err:.1e}"
    if kind == "graded":  # the new directions still span every column of G, the tiniest (1e-12) included
        outside = G - U_tilde @ (U_tilde.T @ G)
        assert (outside.norm(dim=0) <= 1e-10 * G.norm(dim=0)).all()


def test_augmentation_alone_keeps_the_function():
    torch.manual_seed(0)
    model = to_low_rank(nn.Sequential(nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 4)), rank=3)
    X, y = torch.randn(20, 9), torch.randint(0, 4, (20,))
    state = fedlrt.global_state(model)
    G = fedlrt.client_basis_gradients(model, state, (X, y), nn.functional.cross_entropy)
    bars = fedlrt.server_augment(state, G, low_rank_layers(model))
    aug = fedlrt._augmented_state(model, state | bars)
    assert aug["0.S"].shape == (6, 6)
    torch.testing.assert_close(functional_call(model, aug, (X,)), functional_call(model, state, (X,)))


def test_truncate_tau_zero_returns_same_W_and_tau_picks_rank():
    U, V, S = _orth(10, 3, 1), _orth(8, 3, 2), torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    U_bar, V_bar = augment(U, torch.randn(10, 3, dtype=torch.float64)), augment(V, torch.randn(8, 3, dtype=torch.float64))
    U_t, V_t = torch.cat([U, U_bar], 1), torch.cat([V, V_bar], 1)
    S_t = augmented_coefficients(S, 3, 3)
    U1, S1, V1 = truncate(U_t, S_t, V_t, tau=0.0, r_min=1, r_max=6)
    torch.testing.assert_close(U1 @ S1 @ V1.T, U @ S @ V.T)
    assert S1.shape == (3, 3)  # the exact zeros of S_tilde are dropped
    # sigma = (3, 2, 1): ||(1)|| / ||sigma|| = 0.267, ||(2, 1)|| / ||sigma|| = 0.598
    assert truncate(U_t, S_t, V_t, tau=0.3)[1].shape == (2, 2)
    assert truncate(U_t, S_t, V_t, tau=0.6)[1].shape == (1, 1)
    assert truncate(U_t, S_t, V_t, tau=0.6, r_min=2)[1].shape == (2, 2)  # clamped to [r_min, r_max]
    assert truncate(U_t, S_t, V_t, tau=0.0, r_max=2)[1].shape == (2, 2)


def test_aggregate_weighted_mean():
    a, b = {"x": torch.tensor([0.0, 2.0])}, {"x": torch.tensor([4.0, 2.0])}
    torch.testing.assert_close(fedlrt.aggregate([a, b])["x"], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(fedlrt.aggregate([a, b], [3, 1])["x"], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="weights"):
        fedlrt.aggregate([a, b], [1])


# ---------------------------------------------------------------------------------------- exactness

def _centralised_round(U, S, V, X, Y, lr, steps, tau, r_max):
    """Reference: the same round written as plain tensor maths on the pooled data (no lrkit helpers
    except truncate's SVD). W = U S V^T, loss = mean((X W^T - Y)^2)."""
    loss = lambda U_, S_, V_: ((X @ (U_ @ S_ @ V_.T).T - Y) ** 2).mean()
    Ul, Vl = U.clone().requires_grad_(), V.clone().requires_grad_()
    G_U, G_V = torch.autograd.grad(loss(Ul, S, Vl), [Ul, Vl])
    U_t = torch.linalg.qr(torch.cat([U, G_U], 1))[0]  # span([U | G_U]); any orthonormal basis of it will do
    V_t = torch.linalg.qr(torch.cat([V, G_V], 1))[0]
    S_t = (U_t.T @ U @ S @ V.T @ V_t).requires_grad_()
    for _ in range(steps):
        (g,) = torch.autograd.grad(loss(U_t, S_t, V_t), [S_t])
        S_t = (S_t - lr * g).detach().requires_grad_()
    return truncate(U_t, S_t.detach(), V_t, tau, 1, r_max)


@pytest.mark.parametrize("n_clients,steps", [(1, 5), (3, 1)])
def test_full_correction_equals_centralised(n_clients, steps):
    """One client: nothing to correct, the round is the centralised one. Three equal clients and one local
    step: the corrected step is lr * (grad L_c + grad L - grad L_c) = lr * grad L, again centralised.
    The correction is zero or cancels here, so this checks the round's plumbing only; the correction itself
    is checked against its algebra where it is not zero in tests/test_fed_reference.py."""
    torch.set_default_dtype(torch.float64)
    try:
        P = least_squares(n=8, rank=2, num_clients=3, samples_per_client=10, seed=3)
        clients = [(X.double(), Y.double()) for X, Y in P["clients"]][:n_clients]
        model_fn = lambda: LowRankLinear(8, 8, rank=2, bias=False, seed=5)
        res = run_fedlrt(model_fn, clients, rounds=1, lr=0.05, local_steps=steps, variance_correction="full",
                         tau=0.0)  # the layer's r_max defaults to min(n_out, n_in) = 8
        m0 = model_fn()
        X, Y = torch.cat([c[0] for c in clients]), torch.cat([c[1] for c in clients])
        U, S, V = _centralised_round(m0.U, m0.S.detach(), m0.V, X, Y, 0.05, steps, 0.0, 8)
        torch.testing.assert_close(res["model"].weight_matrix(), U @ S @ V.T)
    finally:
        torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------------------------------- accounting

N, R = 16, 2


def _one_layer_run(vc, dynamic=True, **kw):
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(6, N, generator=g), torch.randn(6, N, generator=g)) for _ in range(2)]
    res = run_fedlrt(lambda: LowRankLinear(N, N, R, bias=False, r_max=R), clients, rounds=2, lr=0.01,
                     variance_correction=vc, dynamic_rank=dynamic, tau=0.0, **kw)
    h = res["history"]
    assert set(res["state"]) == {"U", "S", "V"} and h[2]["ranks"] == {"": R}  # nothing else leaks into the state
    assert _comm(h[2]) == _comm(h[1])  # same rank, same traffic
    return h[1]


@pytest.mark.parametrize("vc,down,up", [
    ("none", 2 * N * R + R**2 + 2 * N * R, 2 * N * R + 4 * R**2),
    ("full", 2 * N * R + R**2 + 2 * N * R + 4 * R**2, 2 * N * R + 4 * R**2 + 4 * R**2),
    ("simplified", 2 * N * R + R**2 + 2 * N * R + R**2, 2 * N * R + R**2 + 4 * R**2),  # kit's reading: +r^2 each way
])
def test_fedlrt_accounting_matches_methods_formulas(vc, down, up):
    rec = _one_layer_run(vc)
    # U_bar, V_bar have r new columns each (not 2r): 2nr down, and S_tilde is 2r x 2r = 4r^2 up
    assert rec["floats_down"] == {0: down, 1: down} and rec["floats_up"] == {0: up, 1: up}
    assert rec["bytes_down"] == {0: 4 * down, 1: 4 * down}  # float32
    r2 = 2 * R  # client FLOPs: one gradient at rank r, one local step at rank 2r (3 x forward, 6 samples)
    extra = 3 * 6 * 2 * (2 * N * r2 + r2**2) if vc == "full" else 0
    assert rec["flops"][0] == 3 * 6 * 2 * (2 * N * R + R**2) + 3 * 6 * 2 * (2 * N * r2 + r2**2) + extra


def test_fixed_rank_and_dense_baselines_accounting():
    rec = _one_layer_run("none", dynamic=False)
    assert rec["floats_down"][0] == 2 * N * R + R**2 and rec["floats_up"][0] == R**2 and rec["ranks"] == {"": R}
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(6, N, generator=g), torch.randn(6, N, generator=g)) for _ in range(2)]
    dense = lambda: nn.Linear(N, N, bias=False)
    avg = run_fedavg(dense, clients, rounds=2, lr=0.01)["history"]
    lin = run_fedlin(dense, clients, rounds=2, lr=0.01)["history"]
    assert avg[1]["floats_down"][0] == N * N and avg[1]["floats_up"][0] == N * N
    assert lin[1]["floats_down"][0] == 2 * N * N and lin[1]["floats_up"][0] == 2 * N * N
    assert avg[1]["flops"][0] == 3 * 6 * 2 * N * N and lin[1]["flops"][0] == 2 * 3 * 6 * 2 * N * N
    assert avg[-1]["loss"] < avg[0]["loss"] and lin[-1]["loss"] < lin[0]["loss"]


# ---------------------------------------------------------------------------------------- simulator

def _mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _classification_clients(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(90, 6, generator=g)
    y = (X[:, :3].argmax(1))
    parts = partition.dirichlet(y.numpy(), 3, alpha=0.5, seed=seed)
    return [(X[p], y[p]) for p in parts]


def test_determinism_and_partial_participation():
    clients = _classification_clients()
    kw = dict(rounds=3, lr=0.2, local_steps=3, initial_rank=3, exclude=["2"], client_fraction=0.67,
              batch_size=8, seed=4, variance_correction="simplified")
    h1, h2 = run_fedlrt(_mlp, clients, **kw)["history"], run_fedlrt(_mlp, clients, **kw)["history"]
    strip = lambda h: [{k: v for k, v in rec.items() if k != "wall_time"} for rec in h]
    assert strip(h1) == strip(h2)
    assert all(len(rec["clients"]) == 2 for rec in h1[1:]) and h1[-1]["accuracy"] is not None
    assert set(h1[1]["wall_time"]) == set(h1[1]["clients"])
    h3 = run_fedlrt(_mlp, clients, **(kw | {"seed": 5}))["history"]
    assert strip(h3) != strip(h1)


def test_conv_model_runs_and_counts_positions():
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(2)]
    net = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    rec = run_fedlrt(net, clients, 1, lr=0.1, initial_rank=2, exclude=["3"], tau=0.0, r_max=2)["history"][1]
    assert rec["ranks"] == {"0": 2}
    fwd = lambda r: 2 * 16 * (27 * r + r * r + r * 4) + 2 * 64 * 2  # 16 output positions; dense head
    # basis gradients at rank 2; "full" correction gradient and one local step at the augmented rank 4
    assert rec["flops"][0] == 3 * 8 * fwd(2) + 2 * 3 * 8 * fwd(4)


def test_knob_validation():
    clients = _classification_clients()
    for bad, match in [({"variance_correction": "partial"}, "variance_correction"), ({"tau": 1.5}, "tau"),
                       ({"local_steps": 0}, "local_steps"), ({"optimizer": "lion"}, "optimizer"),
                       ({"client_fraction": 0.0}, "client_fraction"), ({"initial_rank": None}, "initial_rank")]:
        kw = {"initial_rank": 2} | bad
        with pytest.raises(ValueError, match=match):
            run_fedlrt(_mlp, clients, 1, **kw)


# ---------------------------------------------------------------------------------------- partitions

@pytest.mark.parametrize("split", [
    lambda y, s: partition.iid(y, 5, seed=s),
    lambda y, s: partition.dirichlet(y, 5, alpha=0.3, seed=s),
    lambda y, s: partition.k_classes(y, 5, k=2, seed=s),
])
def test_partitions_cover_once_and_reproduce(split):
    y = np.random.default_rng(0).integers(0, 4, 200)
    a, b, c = split(y, 1), split(y, 1), split(y, 2)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(200))


def test_partition_contents_and_errors():
    y = np.repeat(np.arange(4), 25)
    parts = partition.k_classes(y, 4, k=1, seed=0)
    assert sorted(len(np.unique(y[p])) for p in parts) == [1, 1, 1, 1]
    for call, match in [(lambda: partition.iid(y, 0), "num_clients"), (lambda: partition.dirichlet(y, 2, 0), "alpha"),
                        (lambda: partition.k_classes(y, 2, k=1), "k"), (lambda: partition.iid([], 1), "labels")]:
        with pytest.raises(ValueError, match=match):
            call()


# ---------------------------------------------------------------------------------------- least squares

LS = dict(n=8, rank=2, num_clients=4, samples_per_client=10, heterogeneity=0.5, noise=1.0, seed=0)
# lr near the corrected method's stability limit (lr * local_steps * largest client curvature ~ 6): there the
# uncorrected drift is large, while the corrected iteration still converges.
LSR, LS_LR, LS_STEPS = 30, 0.06, 30


def test_least_squares_variance_correction_descends_further():
    """Heterogeneous clients, many local steps: without correction the clients drift towards their own
    minimisers and the global loss stalls; the full correction keeps descending towards the optimum."""
    P = least_squares(**LS)
    kw = dict(rounds=LSR, lr=LS_LR, local_steps=LS_STEPS, initial_rank=2, tau=1e-3)
    excess = {}
    for vc in ("none", "full"):
        h = run_fedlrt(lambda: nn.Linear(8, 8, bias=False), P["clients"], **kw, variance_correction=vc)["history"]
        excess[vc] = h[-1]["loss"] - P["loss_ls"]
        assert h[-1]["loss"] < 0.2 * h[0]["loss"]
    print("excess global loss over the least-squares floor:", excess, "floor", P["loss_ls"])
    # measured (float32, 2 CPU cores): none 4.26e-2, full 5.9e-7, ratio 1.4e-5; the bound is ~7x that ratio
    assert excess["none"] > 1e-2 * P["loss_ls"] and excess["full"] < 1e-4 * excess["none"]


def test_to_run_result_sums_clients_and_records():
    P = least_squares(**LS)
    res = run_fedlrt(lambda: nn.Linear(8, 8, bias=False), P["clients"], 2, initial_rank=2, variance_correction="full")
    rr = to_run_result("fedlrt", res, {"seed": 0, "rounds": 2}, wall_time_s=1.5)
    h = res["history"]
    assert [r["round"] for r in rr.history] == [0, 1, 2] and rr.history[0]["bytes_down"] == 0
    assert rr.history[2]["bytes_up"] == sum(h[2]["bytes_up"].values()) and rr.history[2]["clients"] == 4
    per = (sum(h[1]["bytes_down"].values()) + sum(h[1]["bytes_up"].values())) / 4
    assert rr.history[1]["bytes_per_client"] == per
    assert rr.final["loss"] == h[-1]["loss"] and rr.final["rounds"] == 2 and rr.wall_time_s == 1.5
    assert rr.final["ranks"] == h[-1]["ranks"]
    from lrkit.records import load, save_run
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        save_run(d, rr)
        assert load(d)["runs"]["fedlrt"]["final"]["rounds"] == 2


# ---------------------------------------------------------------------------------------- ResNet18, chunking, device

def _tiny_images(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [(X[: n // 2], y[: n // 2]), (X[n // 2:], y[n // 2:])]


def test_resnet18_is_resnet18_and_factorises_all_but_stem_and_head():
    from lrkit.fed.problems import RESNET18_DENSE, resnet18

    full = resnet18(3, 10)()
    # the well-known parameter count of the CIFAR ResNet18 (3x3 stem; GroupNorm has BatchNorm's affine params)
    assert sum(p.numel() for p in full.parameters()) == 11_173_962
    small = to_low_rank(resnet18(1, 3, width=4)(), 2, RESNET18_DENSE)
    convs = [n for n, m in small.named_modules() if isinstance(m, (nn.Conv2d, LowRankConv2d))]
    assert set(low_rank_layers(small)) == set(convs) - {"conv1"}  # 16 3x3 convs + 3 shortcuts, head dense
    assert len(low_rank_layers(small)) == 19
    with pytest.raises(ValueError, match="Invalid width: 3"):
        resnet18(width=3)


def test_chunked_gradients_and_evaluation_equal_whole_batch():
    from lrkit.fed.problems import RESNET18_DENSE, resnet18
    from lrkit.fed.simulate import default_loss, evaluate

    clients = _tiny_images()
    kw = dict(lr=0.05, local_steps=2, initial_rank=2, exclude=RESNET18_DENSE, tau=0.1)
    whole = run_fedlrt(resnet18(1, 3, width=4), clients, 2, **kw)
    chunked = run_fedlrt(resnet18(1, 3, width=4), clients, 2, **kw, chunk_size=4)
    for k in whole["state"]:
        torch.testing.assert_close(chunked["state"][k], whole["state"][k], rtol=1e-4, atol=1e-5)
    assert chunked["history"][-1]["ranks"] == whole["history"][-1]["ranks"]
    assert chunked["history"][-1]["loss"] == pytest.approx(whole["history"][-1]["loss"], rel=1e-5)
    model, data = whole["model"], clients[0]
    state = fedlrt.global_state(model)
    assert evaluate(model, state, data, default_loss(data[1]), 5)[0] == pytest.approx(
        evaluate(model, state, data, default_loss(data[1]))[0], rel=1e-6)
    with pytest.raises(ValueError, match="Invalid chunk_size: 0"):
        run_fedlrt(resnet18(1, 3, width=4), clients, 1, **kw, chunk_size=0)


@pytest.mark.cuda
def test_simulator_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lrkit.fed.problems import RESNET18_DENSE, resnet18

    clients = _tiny_images()
    kw = dict(lr=0.05, local_steps=2, initial_rank=2, exclude=RESNET18_DENSE, tau=0.1, batch_size=4)
    cpu = run_fedlrt(resnet18(1, 3, width=4), clients, 2, **kw)
    gpu = run_fedlrt(resnet18(1, 3, width=4), clients, 2, **kw, device="cuda")
    assert gpu["device"].startswith("cuda") and gpu["history"][-1]["ranks"] == cpu["history"][-1]["ranks"]
    for k in cpu["state"]:
        torch.testing.assert_close(gpu["state"][k].cpu(), cpu["state"][k], rtol=1e-3, atol=1e-4)
    assert [h["bytes_up"] for h in gpu["history"]] == [h["bytes_up"] for h in cpu["history"]]


# ---------------------------------------------------------------------------------------- issue 9: the fixed-rank arm,
# the low-rank least-squares optimum, divergence recorded

def test_fixed_rank_arm_keeps_its_rank_and_moves_its_basis():
    """r_min = r_max = initial_rank with dynamic_rank=True: augment, train, truncate back to the same rank
    every round (the fair 'no dynamic rank' arm); dynamic_rank=False keeps the initial basis bit for bit."""
    from lrkit.fed.simulate import build_model

    clients = _classification_clients()
    kw = dict(lr=0.3, local_steps=3, initial_rank=2, exclude=["2"], seed=1, tau=0.0)
    U0 = build_model(_mlp, 1, 2, None, None, ["2"]).get_submodule("0").U.double()
    fixed = run_fedlrt(_mlp, clients, 4, r_min=2, r_max=2, **kw)
    frozen = run_fedlrt(_mlp, clients, 4, dynamic_rank=False, **kw)
    free = run_fedlrt(_mlp, clients, 4, r_max=6, **kw)
    assert [h["ranks"]["0"] for h in fixed["history"]] == [2] * 5
    U = fixed["state"]["0.U"].double()
    torch.testing.assert_close(U.T @ U, torch.eye(2, dtype=torch.float64), atol=1e-6, rtol=0)
    moved = torch.linalg.norm(U - U0 @ (U0.T @ U))  # the part of the new basis outside the initial span
    assert moved > 0.1
    assert torch.equal(frozen["state"]["0.U"], U0.float()) and [h["ranks"]["0"] for h in frozen["history"]] == [2] * 5
    assert max(h["ranks"]["0"] for h in free["history"]) > 2  # tau = 0: the free rank grows
    # the fixed-rank arm exchanges what the dynamic arm exchanges at rank 2 (augmentation included)
    assert fixed["history"][1]["floats_up"] == free["history"][1]["floats_up"]


def test_rank_constrained_minimiser_matches_whitened_eckart_young():
    """Reduced-rank regression against an independent route: with M = (X^T X)^(1/2) the loss is
    ||M (B - W_ls^T)||_F^2 + const, whose rank-r minimiser is M^-1 [M W_ls^T]_r (truncated SVD)."""
    from lrkit.fed.problems import rank_constrained_minimiser

    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, 6, dtype=torch.float64)
    Y = torch.randn(40, 5, generator=g, dtype=torch.float64)
    W_ls = torch.linalg.lstsq(X, Y).solution.T
    evals, evecs = torch.linalg.eigh(X.T @ X)
    M, M_inv = evecs @ torch.diag(evals.sqrt()) @ evecs.T, evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    for r in (1, 2, 4):
        P, s, Qh = torch.linalg.svd(M @ W_ls.T, full_matrices=False)
        ref = (M_inv @ P[:, :r] @ torch.diag(s[:r]) @ Qh[:r]).T
        W_r = rank_constrained_minimiser(X, W_ls, r)
        torch.testing.assert_close(W_r, ref, atol=1e-10, rtol=1e-10)
        assert torch.linalg.matrix_rank(W_r) == r
        loss = lambda W: float(((X @ W.T - Y) ** 2).sum())
        P2, s2, Qh2 = torch.linalg.svd(W_ls, full_matrices=False)  # the naive rank-r truncation is worse
        assert loss(W_r) < loss(P2[:, :r] @ torch.diag(s2[:r]) @ Qh2[:r]) - 1e-9


def test_least_squares_low_rank_noise_makes_the_optimum_low_rank():
    iso, low = least_squares(**LS), least_squares(**LS, low_rank_noise=True)
    s_iso, s_low = torch.linalg.svdvals(iso["W_ls"].double()), torch.linalg.svdvals(low["W_ls"].double())
    assert s_iso[-1] / s_iso[0] > 1e-2  # isotropic noise: the optimum is full rank (8 of 8)
    assert s_low[2] / s_low[0] < 1e-5  # noise in the target's space: rank 2 (float32 rounding)
    assert low["loss_r"] == pytest.approx(low["loss_ls"], rel=1e-9) and iso["loss_r"] > iso["loss_ls"] * 1.01
    torch.testing.assert_close(low["W_r"], low["W_ls"], atol=1e-5, rtol=0)
    # the same inputs either way (only the targets' noise differs), and the data stay seeded
    assert torch.equal(iso["clients"][0][0], low["clients"][0][0])
    assert torch.equal(least_squares(**LS, low_rank_noise=True)["clients"][1][1], low["clients"][1][1])


def test_low_rank_least_squares_full_correction_finds_the_optimum_and_its_rank():
    """The design fix of issue 9: the optimum has rank 2 of 8, FeDLRT starts at rank 1 with r_max = n;
    with full correction it reaches the optimum at rank 2, without correction it stalls above it."""
    P = least_squares(**LS, low_rank_noise=True)
    kw = dict(rounds=30, lr=LS_LR, local_steps=LS_STEPS, initial_rank=1, tau=1e-3)
    out = {vc: run_fedlrt(lambda: nn.Linear(8, 8, bias=False), P["clients"], **kw, variance_correction=vc)["history"]
           for vc in ("none", "full")}
    excess = {vc: (h[-1]["loss"] - P["loss_ls"]) / P["loss_ls"] for vc, h in out.items()}
    assert out["full"][-1]["ranks"] == {"": 2} and excess["full"] < 1e-4
    assert excess["none"] > 1e-3 and max(h["ranks"][""] for h in out["full"]) >= 2


def test_divergence_is_recorded_not_raised():
    """A blow-up is a result: the run stops at the round it happens, its last record carries non-finite metrics and
    to_run_result marks it diverged; a sound run is not marked."""
    P = least_squares(**LS)
    lin = lambda: nn.Linear(8, 8, bias=False)
    lrt = run_fedlrt(lin, P["clients"], 20, lr=5.0, local_steps=10, initial_rank=2, variance_correction="full")
    avg = run_fedavg(lin, P["clients"], 20, lr=5.0, local_steps=10)
    ok = run_fedavg(lin, P["clients"], 3, lr=0.01, local_steps=2)
    for res in (lrt, avg):
        h = res["history"]
        assert res["diverged_at"] == h[-1]["round"] < 20 and not np.isfinite(h[-1]["loss"])
        rr = to_run_result("x", res, {"seed": 0})
        assert rr.final["diverged"] and not np.isfinite(rr.final["loss"]) and rr.final["bytes_per_client_round"] > 0
    # non-finite coefficients (truncate raises fedlrt.Diverged): stopped in round 1, nothing counted for it
    nan = run_fedlrt(lin, P["clients"], 5, lr=1e30, local_steps=5, initial_rank=2, variance_correction="full")
    assert nan["diverged_at"] == 1 and np.isnan(nan["history"][-1]["loss"]) and nan["history"][-1]["bytes_up"] == {}
    assert to_run_result("x", nan, {"seed": 0}).final["diverged"]
    with pytest.raises(fedlrt.Diverged):
        truncate(torch.eye(2), torch.full((2, 2), float("nan")), torch.eye(2), 0.1)
    assert ok["diverged_at"] is None and not to_run_result("x", ok, {"seed": 0}).final["diverged"]
    # ended above the untrained loss without blowing up: also diverged
    worse = {"history": [dict(ok["history"][0]), dict(ok["history"][-1], loss=ok["history"][0]["loss"] + 1)]}
    assert to_run_result("x", worse, {"seed": 0}).final["diverged"]


# ---------------------------------------------------------------------------------------- issue 11: float64 end to end

def _mean(messages):
    """The plain mean in the messages' own dtype, written independently of fedlrt.aggregate."""
    return {k: torch.stack([m[k] for m in messages]).mean(0) for k in messages[0]}


def _float64_reference(model, state, clients, rounds, lr, local_steps, tau):
    """FeDLRT rounds (full correction, dynamic rank, plain mean) from the steps of docs/methods.md, section 3, all in float64."""
    loss, layers = nn.functional.mse_loss, {"": (1, None)}
    for _ in range(rounds):
        bars = fedlrt.server_augment(state, _mean([fedlrt.client_basis_gradients(model, state, d, loss)
                                                   for d in clients]), layers)
        msg = state | bars
        own = [fedlrt.client_coefficient_gradients(model, msg, d, loss) for d in clients]
        msg = msg | _mean(own)
        S = [fedlrt.client_coefficient_steps(model, msg, d, loss, local_steps, lr, own_grads=o)
             for d, o in zip(clients, own)]
        state = fedlrt.server_truncate(state, bars, _mean(S), layers, tau)
    return state


def test_float64_run_equals_float64_algebra():
    """A float64 model stays float64 end to end: factorising its dense layer (bias included) and the plain mean of
    three clients (weights 1/3, once built in float32: off by ~5e-8) match float64 algebra to 1e-12."""
    P = least_squares(**LS)
    clients = [(X.double(), Y.double()) for X, Y in P["clients"]][:3]
    dense = lambda: nn.Linear(8, 8).double()
    res = run_fedlrt(dense, clients, 3, lr=0.05, local_steps=4, initial_rank=2, tau=0.01, variance_correction="full")
    torch.manual_seed(0)
    model = to_low_rank(dense(), 2)
    assert {v.dtype for v in fedlrt.global_state(model).values()} == {torch.float64}
    expected = _float64_reference(model, fedlrt.global_state(model), clients, 3, 0.05, 4, 0.01)
    assert res["state"].keys() == expected.keys()
    err = max(float((res["state"][k] - expected[k]).abs().max()) for k in expected)
    assert {v.dtype for v in res["state"].values()} == {torch.float64} and err <= 1e-12, err
    assert res["model"](clients[0][0]).dtype == torch.float64


def test_factorising_keeps_the_dtype_and_float32_is_unchanged():
    torch.manual_seed(0)
    lin64 = nn.Linear(12, 7).double()
    lr64 = LowRankLinear.from_dense(lin64, rank=3)
    assert {lr64.U.dtype, lr64.S.dtype, lr64.V.dtype, lr64.bias.dtype} == {torch.float64}
    P, sigma, Qh = torch.linalg.svd(lin64.weight.detach(), full_matrices=False)
    torch.testing.assert_close(lr64.weight_matrix(), P[:, :3] @ torch.diag(sigma[:3]) @ Qh[:3], rtol=0, atol=1e-12)
    conv64 = LowRankConv2d.from_dense(nn.Conv2d(3, 6, 3).double(), rank=2)
    assert conv64(torch.randn(1, 3, 5, 5, dtype=torch.float64)).dtype == torch.float64
    # float32: the factors are the float32 SVD's, bit for bit, and the plain mean uses float32 weights 1/m as before
    lin32 = nn.Linear(12, 7)
    lr32 = LowRankLinear.from_dense(lin32, rank=3)
    P, sigma, Qh = torch.linalg.svd(lin32.weight.detach(), full_matrices=False)
    assert lr32.U.dtype == torch.float32 and torch.equal(lr32.U, P[:, :3]) and torch.equal(lr32.V, Qh[:3].T)
    msgs = [{"S": torch.randn(3, 3)} for _ in range(3)]
    w = (torch.ones(3) / 3).tolist()
    assert torch.equal(fedlrt.aggregate(msgs)["S"], sum(wc * m["S"] for wc, m in zip(w, msgs)))
    msgs64 = [{k: v.double() for k, v in m.items()} for m in msgs]
    torch.testing.assert_close(fedlrt.aggregate(msgs64)["S"], _mean(msgs64)["S"], rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------- the factorised CNN

@pytest.mark.parametrize("rank", [2, 5])
def test_factorised_conv_equals_dense_conv_at_the_svd_of_its_kernel(rank):
    """LowRankConv2d with U, S, V = the (truncated) SVD of the kernel as an out x (in k_h k_w) matrix is the conv
    with that rank-r kernel: a non-square kernel, stride, padding and dilation catch a reshape in the wrong order."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), dtype=torch.float64)
    W = conv.weight.detach().reshape(5, -1)
    P, sigma, Qh = torch.linalg.svd(W, full_matrices=False)
    U, S, V = P[:, :rank], torch.diag(sigma[:rank]), Qh[:rank].T
    layer = LowRankConv2d(3, 5, (3, 2), rank, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    layer.set_factors(U, S, V)
    layer.bias = nn.Parameter(conv.bias.detach().clone())
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    W_r = (U @ S @ V.T).reshape(conv.weight.shape)
    torch.testing.assert_close(layer(x), torch.nn.functional.conv2d(x, W_r, conv.bias, (2, 1), (1, 2), (1, 2)))
    torch.testing.assert_close(layer.weight_matrix(), U @ S @ V.T)
    if rank == 5:  # full rank: the dense conv itself
        torch.testing.assert_close(layer(x), conv(x))


def test_small_cnn_factorises_every_layer_but_the_head():
    from lrkit.fed.problems import CNN_DENSE, cnn

    model = to_low_rank(cnn(1, width=4, hidden=8)(), rank=3, exclude=list(CNN_DENSE))
    assert list(low_rank_layers(model)) == ["conv1", "conv2", "fc1"] and isinstance(model.head, nn.Linear)
    assert {n: (m.n_out, m.n_in) for n, m in low_rank_layers(model).items()} == {
        "conv1": (4, 9), "conv2": (8, 36), "fc1": (8, 8 * 7 * 7)}
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="width"):
        cnn(1, width=0)


def test_cnn_flops_and_bytes_match_a_hand_count():
    """One round on SmallCNN(width 2, hidden 4, 8 x 8 images, 3 classes), FedAvg and FeDLRT (full correction,
    every factorised layer at rank 1, augmented to 2), against a count by hand of every exchanged float and of
    2 x positions x (matrix FLOPs) per sample."""
    from lrkit.fed.problems import CNN_DENSE, cnn

    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (6, 9)]
    net = cnn(1, classes=3, width=2, hidden=4, image_size=8)
    steps, batch = 2, 4
    # layers (n_out, n_in, positions): conv1 2 x 9 on 8 x 8, conv2 4 x 18 on 4 x 4, fc1 4 x 16, head 3 x 4 (dense)
    layers = [(2, 9, 64), (4, 18, 16), (4, 16, 1)]
    head = 2 * 3 * 4
    dense_fwd = sum(2 * P * i * o for o, i, P in layers) + head
    assert dense_fwd == 2304 + 2304 + 128 + 24
    params = (2 * 9 + 2) + (4 * 18 + 4) + (4 * 16 + 4) + (3 * 4 + 3)
    avg = run_fedavg(net, clients, 1, lr=0.05, local_steps=steps, batch_size=batch)["history"][1]
    for c, (X, _) in enumerate(clients):
        assert avg["flops"][c] == steps * 3 * min(batch, len(X)) * dense_fwd
        assert (avg["floats_down"][c], avg["floats_up"][c]) == (params, params)
        assert avg["bytes_down"][c] == avg["bytes_up"][c] == 4 * params

    lr_fwd = lambda r: sum(2 * P * (i * r + r * r + r * o) for o, i, P in layers) + head
    dense = 2 + 4 + 4 + (3 * 4 + 3)  # biases of the factorised layers and the head
    rec = run_fedlrt(net, clients, 1, lr=0.05, local_steps=steps, batch_size=batch, initial_rank=1, r_max=1,
                     exclude=list(CNN_DENSE), variance_correction="full", tau=0.0)["history"][1]
    assert rec["ranks"] == {"conv1": 1, "conv2": 1, "fc1": 1}
    sides = sum(o + i for o, i, _ in layers)  # one column of U and V per layer
    # down: U, S, V + dense; U_bar, V_bar; the averaged dL/dS_tilde (2 x 2) + dense gradients
    down = (sides + 3) + dense + sides + 3 * 4 + dense
    # up: G_U, G_V; dL_c/dS_tilde + dense gradients; S_tilde + dense parameters
    up = sides + (3 * 4 + dense) + (3 * 4 + dense)
    for c, (X, _) in enumerate(clients):
        n = len(X)
        assert rec["flops"][c] == 3 * n * lr_fwd(1) + 3 * n * lr_fwd(2) + steps * 3 * min(batch, n) * lr_fwd(2)
        assert (rec["floats_down"][c], rec["floats_up"][c]) == (down, up)
        assert (rec["bytes_down"][c], rec["bytes_up"][c]) == (4 * down, 4 * up)
