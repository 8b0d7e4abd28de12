"""Every AdaLomo variant (lrkit/optim/adalomo.py) against an independent float64 reference.

The reference below is written from the algorithm's definition (docs/methods.md, section 2: "AdaLomo
update step" and "Variants"; Lv et al. 2024, Algorithm 1; Adafactor's factored second moment) in plain
torch/numpy/scipy, one parameter at a time; it calls none of the kit's helpers (no ``nmf_refine``, no
``pivoted_qr``, no ``adalomo_state_shapes``).

The kit computes in fp32 by design (every gradient and state is cast to ``torch.float32``). To compare
the *algorithm* at ~1e-12 rather than at fp32 rounding, ``float64_kit`` runs the kit's unchanged code with
the name ``torch.float32`` bound to float64 inside the three optimizer modules (nothing else differs;
the test checks the state really is float64). The real fp32 path is also compared, at fp32 tolerance.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.linalg import qr as scipy_qr
from torch import nn

import lrkit.optim.adalomo as adalomo_mod
import lrkit.optim.in_backward as in_backward_mod
import lrkit.optim.lomo as lomo_mod
from lrkit.optim.adalomo import AdaLomo

V, D, STEPS = 11, 8, 5


class Net(nn.Module):
    """A tied embedding/head, a batch of two matrices (3-dim parameter: factored over its last two dims),
    an MLP with biases, a LayerNorm and a 0-dim temperature: every kind of tensor AdaLomo treats."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Parameter(0.3 * torch.randn(2, D, D))
        self.fc1, self.fc2 = nn.Linear(D, 12), nn.Linear(12, D)
        self.norm = nn.LayerNorm(D)
        self.temp = nn.Parameter(torch.tensor(1.3))
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx)
        h = h + torch.tanh(h @ self.mix[0]) @ self.mix[1]
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(self.norm(h)) * self.temp


def net(dtype):
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():  # LayerNorm starts at exactly (1, 0): make every tensor generic
        m.emb.weight.mul_(0.5)
        m.norm.weight.add_(0.1 * torch.randn(D))
        m.norm.bias.add_(0.05 * torch.randn(D))  # RMS ~ 0.05: below eps2 = 0.1 in the "eps" variant
    return m.to(dtype)


def groups(m):  # parameter order = model.parameters() order; one group per "layer"
    return [{"params": [m.emb.weight, m.mix]}, {"params": list(m.fc1.parameters()) + list(m.fc2.parameters())},
            {"params": [m.norm.weight, m.norm.bias, m.temp]}]


def loss_of(model, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randint(0, V, (4, 6), generator=g), torch.randint(0, V, (4, 6), generator=g)
    return F.cross_entropy(model(x).view(-1, V), y.view(-1))


# ---- the reference --------------------------------------------------------------------------------
def rms(x):
    return math.sqrt(float((x * x).mean()))


def nmf_init(S, k, seed, index, t, dtype):
    """Step 1 of rank-k "nmf": positive jittered copies of the rank-1 answer (r, c / mean r), split
    over k columns. The jitter is drawn on CPU in fp32 from one stream per (seed, parameter index, step)."""
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + index) * 1_000_003 + t) % 2**63)
    r, c = S.mean(-1), S.mean(-2)
    A = r.unsqueeze(-1) * (0.5 + torch.rand(S.shape[:-1] + (k,), generator=gen)).to(dtype)
    B = (c / r.mean(-1, keepdim=True)).unsqueeze(-1) * (0.5 + torch.rand(S.shape[:-2] + (S.shape[-1], k),
                                                                          generator=gen)).to(dtype) / k
    return A, B


def kl_nmf(T, A, B, iters):
    """Lee & Seung's multiplicative updates for the generalised KL divergence D(T || A B^T):
    A <- A * ((T / AB^T) B) / colsum(B), then B <- B * ((T / AB^T)^T A) / colsum(A) with the new A."""
    for _ in range(iters):
        A = A * ((T / (A @ B.transpose(-1, -2))) @ B) / B.sum(-2, keepdim=True)
        B = B * ((T / (A @ B.transpose(-1, -2))).transpose(-1, -2) @ A) / A.sum(-2, keepdim=True)
    return A, B


def truncated_svd(T, k):
    """Best rank-k approximation (Eckart-Young), numpy's LAPACK gesdd, per matrix of the batch."""
    u, s, vh = np.linalg.svd(T.numpy(), full_matrices=False)
    return torch.from_numpy((u[..., :k] * s[..., None, :k]) @ vh[..., :k, :])


def pivoted_qr_projection(T, k):
    """Q_k Q_k^T T, Q_k the first k columns of LAPACK's column-pivoted QR (geqp3), per matrix."""
    T3 = T.reshape(-1, *T.shape[-2:]).numpy()
    out = []
    for M in T3:
        Q = scipy_qr(M, pivoting=True, mode="economic")[0][:, :k]
        out.append(Q @ (Q.T @ M))
    return torch.from_numpy(np.stack(out)).reshape(T.shape)


class Reference:
    def __init__(self, params_by_group, lr, weight_decay, eps, d, decay_rate, normalization, second_moment,
                 factor_rank, nmf_iters, seed):
        self.groups = [list(g) for g in params_by_group]
        self.params = [p for g in self.groups for p in g]
        self.lr, self.wd, (self.eps1, self.eps2), self.d, self.decay = lr, weight_decay, eps, d, decay_rate
        self.norm, self.kind, self.rank, self.iters, self.seed = (normalization, second_moment, factor_rank,
                                                                  nmf_iters, seed)
        self.t, self.state = 0, {}

    def second_moment(self, i, p, S, beta2):
        st = self.state.setdefault(i, {})
        if p.dim() < 2 or self.kind == "full":  # unfactored EMA
            st["v"] = beta2 * st.get("v", torch.zeros_like(S)) + (1 - beta2) * S
            return st["v"]
        n, m = p.shape[-2:]
        k = min(self.rank, n, m)
        if self.kind == "nmf" and k == 1:  # Adafactor: row and column means, V = r c^T / mean(r)
            st["r"] = beta2 * st.get("r", 0) + (1 - beta2) * S.mean(-1)
            st["c"] = beta2 * st.get("c", 0) + (1 - beta2) * S.mean(-2)
            return st["r"].unsqueeze(-1) * st["c"].unsqueeze(-2) / st["r"].mean(-1)[..., None, None]
        if self.kind == "nmf":
            if self.t == 1:
                st["A"], st["B"] = nmf_init(S, k, self.seed, i, self.t, S.dtype)
            T = beta2 * st["A"] @ st["B"].transpose(-1, -2) + (1 - beta2) * S
            st["A"], st["B"] = kl_nmf(T, st["A"], st["B"], self.iters)
            return st["A"] @ st["B"].transpose(-1, -2)
        T = beta2 * st.get("V", torch.zeros_like(S)) + (1 - beta2) * S  # dense EMA target
        st["V"] = truncated_svd(T, k) if self.kind == "svd" else pivoted_qr_projection(T, k)
        return st["V"].clamp(min=self.eps1)  # a rank-k approximation of a positive matrix can dip below 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        beta2 = 1 - self.t ** self.decay
        U = {}
        for i, p in enumerate(self.params):
            G = p.grad.double()
            U[i] = G / self.second_moment(i, p, G * G + self.eps1, beta2).sqrt()
        if self.norm == "grouped":
            sets = [[i] for i in U]
        elif self.norm == "global":
            sets = [list(U)]
        elif self.norm == "layer":
            index = {id(p): i for i, p in enumerate(self.params)}
            sets = [[index[id(p)] for p in g] for g in self.groups]
        else:
            sets = []
        for members in sets:  # U_hat = U / max(1, RMS(U over the set) / d)
            total = math.sqrt(sum(float((U[i] ** 2).sum()) for i in members) / sum(U[i].numel() for i in members))
            for i in members:
                U[i] = U[i] / max(1.0, total / self.d)
        for i, p in enumerate(self.params):
            theta = p.double()
            eta = self.lr * max(self.eps2, rms(theta))
            p.copy_(theta * (1 - eta * self.wd) - eta * U[i])


# ---- running the kit --------------------------------------------------------------------------------
class _TorchFloat64:
    """The torch module, except that ``torch.float32`` is float64."""
    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.fixture
def float64_kit(monkeypatch):
    for mod in (adalomo_mod, lomo_mod, in_backward_mod):
        monkeypatch.setattr(mod, "torch", _TorchFloat64())


BASE = dict(lr=0.05, weight_decay=0.0, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, nmf_iters=3,
            seed=0)
# (normalization, second_moment, factor_rank, overrides of BASE)
VARIANTS = {
    "grouped-nmf1": ("grouped", "nmf", 1, {}),
    "none-nmf1": ("none", "nmf", 1, {"clip_threshold": 0.3}),  # d is unused by "none"
    "global-nmf1": ("global", "nmf", 1, {"clip_threshold": 0.7}),
    "layer-nmf1": ("layer", "nmf", 1, {"clip_threshold": 0.7}),
    "grouped-nmf2": ("grouped", "nmf", 2, {}),
    "grouped-nmf3-iters2": ("grouped", "nmf", 3, {"nmf_iters": 2, "seed": 5}),
    "grouped-svd2": ("grouped", "svd", 2, {}),
    "grouped-svd3": ("grouped", "svd", 3, {}),
    "grouped-qr2": ("grouped", "qr", 2, {}),
    "grouped-qr3": ("grouped", "qr", 3, {}),
    "grouped-full": ("grouped", "full", 1, {}),
    "layer-svd2": ("layer", "svd", 2, {}),
    "global-qr2": ("global", "qr", 2, {}),
    # every other hyperparameter off its default: eps1 large enough to matter, eps2 above RMS(norm.bias)
    "eps-wd-decay": ("grouped", "nmf", 1, {"eps": (1e-3, 0.1), "weight_decay": 0.2, "decay_rate": -0.5,
                                           "clip_threshold": 0.8, "lr": 0.03}),
    "eps-full": ("grouped", "full", 1, {"eps": (1e-3, 0.1), "weight_decay": 0.2}),
}


def run_pair(variant, dtype, fused=True, steps=STEPS):
    normalization, second_moment, factor_rank, over = VARIANTS[variant]
    kw = {**BASE, **over}
    kit, ref = net(dtype), net(torch.float64)
    opt = AdaLomo(groups(kit), normalization=normalization, second_moment=second_moment,
                  factor_rank=factor_rank, fused=fused, **kw)
    reference = Reference([g["params"] for g in groups(ref)], kw["lr"], kw["weight_decay"], kw["eps"],
                          kw["clip_threshold"], kw["decay_rate"], normalization, second_moment, factor_rank,
                          kw["nmf_iters"], kw["seed"])
    for t in range(steps):
        loss_of(kit, t).backward()
        opt.step()
        opt.zero_grad()
        loss_of(ref, t).backward()
        reference.step()
        ref.zero_grad()
    return kit, ref, opt


def rel_err(kit, ref):
    """max over parameters of max|kit - ref| / max|ref|"""
    return max(float((p.detach().double() - q.detach()).abs().max() / q.detach().abs().max())
               for p, q in zip(kit.parameters(), ref.parameters()))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float64_kit_equals_reference(variant, float64_kit):
    kit, ref, opt = run_pair(variant, torch.float64)
    assert all(v.dtype == torch.float64 for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    err = rel_err(kit, ref)
    moved = rel_err(net(torch.float64), ref)
    print(f"{variant}: max relative |kit - reference| = {err:.1e}; moved {moved:.2e}")
    assert err < 1e-12
    assert moved > 1e-2  # and the weights did move


@pytest.mark.parametrize("variant", ["grouped-nmf2", "layer-svd2", "global-qr2"])
def test_float64_kit_unfused_equals_reference(variant, float64_kit):
    kit, ref, _ = run_pair(variant, torch.float64, fused=False)
    assert rel_err(kit, ref) < 1e-12


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp32_kit_is_the_reference_to_fp32_rounding(variant):
    """The real (fp32) code path; fp32 rounding alone grows to ~1e-6 over a few steps."""
    kit, ref, opt = run_pair(variant, torch.float32)
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    assert rel_err(kit, ref) < 2e-5


def test_reference_variants_differ():
    """The variants are different algorithms on this net (else one reference could stand for another)."""
    finals = {v: run_pair(v, torch.float64, steps=2)[1] for v in VARIANTS}
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert rel_err(finals[a], finals[b]) > 1e-6, (a, b)
