"""AdaLomo and LOMO (lrkit/optim/adalomo.py, lrkit/optim/lomo.py) against a float64 reference written
from docs/methods.md, section 2, against the official lomo_optim code, and for the fused-update contract."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import hand_state_numel, held_state_bytes
from lrkit.optim.adalomo import AdaLomo, adalomo_state_numel, layer_groups, nmf_refine
from lrkit.optim.lomo import Lomo

V, D, STEPS = 11, 8, 6
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Tiny(nn.Module):
    """Embedding tied to the output head (one parameter used twice), a block, a norm."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.block = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx)
        return self.head(self.norm(h + self.block(h)))


def tiny(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    m = Tiny().to(device=device, dtype=dtype)
    with torch.no_grad():  # LayerNorm starts at exactly (1, 0): perturb so every tensor is generic
        m.emb.weight.mul_(0.3)  # values ~ 1: fp32 rounding alone would be ~1e-7 per step
        m.norm.weight.add_(0.1 * torch.randn(D, dtype=dtype, device=device))
        m.norm.bias.add_(0.1 * torch.randn(D, dtype=dtype, device=device))
    return m


def batch(step, device="cpu"):
    g = torch.Generator().manual_seed(step)
    return (torch.randint(0, V, (4, 5), generator=g).to(device),
            torch.randint(0, V, (4, 5), generator=g).to(device))


def loss_of(model, step):
    x, y = batch(step, model.emb.weight.device)
    return F.cross_entropy(model(x).float().view(-1, V), y.view(-1))


def groups(m):  # one group per "layer", for normalization="layer"
    return [{"params": m.emb.parameters()}, {"params": m.block.parameters()}, {"params": m.norm.parameters()}]


def train(model, opt, steps=STEPS, start=0):
    for t in range(start, start + steps):
        loss = loss_of(model, t)
        if isinstance(opt, (AdaLomo, Lomo)):
            opt.backward(loss)  # loss.backward(), plus the norm pass when fused clipping is on
        else:
            loss.backward()
        opt.step()
        opt.zero_grad()


def max_diff(a, b):
    return max((p.double() - q.double()).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


class Reference:
    """docs/methods.md, section 2, written plainly in float64: one loop over parameters per step."""

    def __init__(self, params, lr, weight_decay=0.0, eps1=1e-30, eps2=1e-3, d=1.0, decay_rate=-0.8,
                 max_grad_norm=None):
        self.params, self.lr, self.wd = list(params), lr, weight_decay
        self.eps1, self.eps2, self.d, self.decay_rate, self.max_grad_norm = eps1, eps2, d, decay_rate, max_grad_norm
        self.t, self.state = 0, [None] * len(self.params)

    @torch.no_grad()
    def step(self):
        self.t += 1
        beta2 = 1 - self.t ** self.decay_rate
        grads = [p.grad.double() for p in self.params]
        if self.max_grad_norm is not None:
            total = math.sqrt(sum((G * G).sum().item() for G in grads))
            grads = [G * min(1.0, self.max_grad_norm / (total + 1e-6)) for G in grads]
        for i, (p, G) in enumerate(zip(self.params, grads)):
            S = G * G + self.eps1
            if p.dim() == 2:
                n, m = p.shape
                r_new = torch.tensor([sum(S[a, b] for b in range(m)) / m for a in range(n)], dtype=torch.float64)
                c_new = torch.tensor([sum(S[a, b] for a in range(n)) / n for b in range(m)], dtype=torch.float64)
                r, c = self.state[i] if self.state[i] is not None else (0 * r_new, 0 * c_new)
                r, c = beta2 * r + (1 - beta2) * r_new, beta2 * c + (1 - beta2) * c_new
                self.state[i] = (r, c)
                V_hat = torch.outer(r, c) / r.mean()
            else:
                v = self.state[i] if self.state[i] is not None else 0 * S
                self.state[i] = V_hat = beta2 * v + (1 - beta2) * S
            U = G / V_hat.sqrt()
            rms = lambda x: math.sqrt((x * x).mean().item())
            U_hat = U / max(1.0, rms(U) / self.d)
            eta = self.lr * max(self.eps2, rms(p.double()))
            p.copy_(p.double() * (1 - eta * self.wd) - eta * U_hat)


def run_reference(steps=STEPS, **kw):
    ref = tiny(torch.float64)
    opt = Reference(ref.parameters(), **kw)
    for t in range(steps):
        loss_of(ref, t).backward()
        opt.step()
        ref.zero_grad()
    return ref


# ---- correctness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_matches_float64_reference(fused, max_grad_norm):
    model = tiny()
    opt = AdaLomo(model.parameters(), lr=0.05, weight_decay=0.1, fused=fused, max_grad_norm=max_grad_norm)
    train(model, opt)
    ref = run_reference(lr=0.05, weight_decay=0.1, max_grad_norm=max_grad_norm)
    err = max_diff(model, ref)
    print(f"max |kit - float64 reference| = {err:.2e}")
    assert err < 1e-6
    assert max_diff(model, tiny()) > 1e-2  # and it did move


def _official(model, monkeypatch=None):
    if monkeypatch is not None:  # the official code hard-codes .cuda(): make it a no-op on CPU
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    from lomo_optim import AdaLomo as OfficialAdaLomo
    return OfficialAdaLomo(model, lr=0.05, weight_decay=0.1)


def _compare_official(device, monkeypatch=None):
    ours, theirs = tiny(device=device), tiny(device=device)  # tied weights included
    opt, off = AdaLomo(ours.parameters(), lr=0.05, weight_decay=0.1), _official(theirs, monkeypatch)
    for t in range(STEPS):
        loss_of(ours, t).backward()
        opt.step()
        off.fused_backward(loss_of(theirs, t), 0.05)
    return max_diff(ours, theirs)


def test_matches_official_on_cpu(monkeypatch):
    err = _compare_official("cpu", monkeypatch)
    print(f"max |kit - lomo_optim.AdaLomo| = {err:.2e}")
    assert err < 1e-6


@pytest.mark.cuda
@cuda
def test_matches_official_on_cuda():
    assert _compare_official("cuda") < 1e-6


@pytest.mark.cuda
@cuda
def test_cuda_runs_and_matches_cpu():
    m_cpu, m_gpu = tiny(), tiny(device="cuda")
    train(m_cpu, AdaLomo(m_cpu.parameters(), lr=0.05))
    train(m_gpu, AdaLomo(m_gpu.parameters(), lr=0.05))
    assert max_diff(m_cpu, m_gpu.cpu()) < 1e-5


def test_bf16_weights_get_fp32_update_rounded_once():
    model, twin = tiny(torch.bfloat16), tiny(torch.bfloat16)
    opt = AdaLomo(model.parameters(), lr=0.05)
    loss_of(model, 0).backward()
    opt.step()
    loss_of(twin, 0).backward()  # the same bf16 gradients, kept for the reference
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.dtype == torch.bfloat16
        G, theta = q.grad.double(), q.double()
        S = G * G + 1e-30
        V_hat = torch.outer(S.mean(1), S.mean(0)) / S.mean() if p.dim() == 2 else S
        U = G / V_hat.sqrt()
        U = U / max(1.0, U.pow(2).mean().sqrt().item())
        expected = theta - 0.05 * max(1e-3, theta.pow(2).mean().sqrt().item()) * U
        torch.testing.assert_close(p.double(), expected.to(torch.bfloat16).double(), rtol=2**-7, atol=1e-6)
        assert not torch.equal(p, q)


# ---- fused machinery ------------------------------------------------------------------------------
VARIANTS = [("grouped", "nmf", 1), ("none", "nmf", 1), ("global", "nmf", 1), ("layer", "nmf", 1),
            ("grouped", "nmf", 2), ("grouped", "svd", 2), ("grouped", "qr", 4), ("grouped", "full", 1)]


@pytest.mark.parametrize("normalization,second_moment,factor_rank", VARIANTS)
def test_fused_equals_unfused(normalization, second_moment, factor_rank):
    kw = dict(lr=0.05, normalization=normalization, second_moment=second_moment, factor_rank=factor_rank)
    a, b = tiny(), tiny()
    train(a, AdaLomo(groups(a), fused=True, **kw))
    train(b, AdaLomo(groups(b), fused=False, **kw))
    assert max_diff(a, b) < 1e-6
    assert all(torch.isfinite(p).all() for p in a.parameters()) and max_diff(a, tiny()) > 1e-2


def test_layer_with_one_tensor_per_group_is_grouped():
    a, b = tiny(), tiny()
    train(a, AdaLomo([{"params": [p]} for p in a.parameters()], lr=0.05, normalization="layer"))
    train(b, AdaLomo(b.parameters(), lr=0.05))
    assert max_diff(a, b) < 1e-7


def test_fused_frees_every_grad_and_tied_weight_updates_once():
    model = tiny()
    opt = AdaLomo(model.parameters(), lr=0.05)
    calls = {}
    real = opt._on_grad
    opt._on_grad = lambda p: (calls.__setitem__(id(p), calls.get(id(p), 0) + 1), real(p))
    loss_of(model, 0).backward()
    assert all(p.grad is None for p in model.parameters())
    assert sorted(calls.values()) == [1] * len(list(model.parameters()))  # tied weight: one hook call
    opt.step()
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())


def test_new_fused_optimizer_takes_over_the_hooks():
    model = tiny()
    old = AdaLomo(model.parameters(), lr=0.05)
    with pytest.warns(UserWarning, match="takes over"):
        new = AdaLomo(model.parameters(), lr=0.05)
    train(model, new, steps=1)
    assert not old.state and len(new.state) == len(list(model.parameters()))


def test_gradient_accumulation_in_fused_mode_raises():
    model = tiny()
    opt = AdaLomo(model.parameters())
    loss_of(model, 0).backward()
    with pytest.raises(RuntimeError, match="fused=False"):
        loss_of(model, 1).backward()


def test_unfused_accumulation_equals_summed_loss():
    a, b = tiny(), tiny()
    oa, ob = AdaLomo(a.parameters(), lr=0.05, fused=False), AdaLomo(b.parameters(), lr=0.05, fused=False)
    loss_of(a, 0).backward()
    loss_of(a, 1).backward()
    (loss_of(b, 0) + loss_of(b, 1)).backward()
    oa.step()
    ob.step()
    assert max_diff(a, b) < 1e-6


def test_clipping_two_pass_and_no_stale_coefficient():
    model = tiny()
    opt = AdaLomo(model.parameters(), lr=0.05, max_grad_norm=0.5)
    with pytest.raises(RuntimeError, match="grad_norm_pass"):  # no norm pass: refuse, update nothing
        loss_of(model, 0).backward()
    assert max_diff(model, tiny()) == 0
    opt.zero_grad()
    opt.backward(loss_of(model, 0))  # pass 1 (norms) + pass 2 (update)
    opt.step()
    with pytest.raises(RuntimeError, match="grad_norm_pass"):  # last step's coefficient is gone
        loss_of(model, 1).backward()
    with pytest.raises(RuntimeError, match="fused=True"):
        with AdaLomo(tiny().parameters(), fused=False, max_grad_norm=1.0).grad_norm_pass():
            pass


def test_paused_updates_nothing_and_leaves_grads():
    model = tiny()
    opt = AdaLomo(model.parameters(), lr=0.05)
    model.eval()
    with opt.paused():
        loss_of(model, 0).backward()
    assert max_diff(model, tiny()) == 0 and all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    model.train()
    train(model, opt, steps=1)
    assert max_diff(model, tiny()) > 0


def test_step_applies_grads_whose_hook_did_not_fire():
    a, b = tiny(), tiny()
    oa, ob = AdaLomo(a.parameters(), lr=0.05), AdaLomo(b.parameters(), lr=0.05, fused=False)
    with oa.paused():
        loss_of(a, 0).backward()
    loss_of(b, 0).backward()
    oa.step()
    ob.step()
    assert max_diff(a, b) == 0 and all(p.grad is None for p in a.parameters())


def test_lr_scheduler_sets_the_lr_used_inside_backward():
    model = tiny()
    opt = AdaLomo(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s == 0 else 0.0)
    train(model, opt, steps=1)
    sched.step()
    after_one = copy.deepcopy(model)
    assert max_diff(after_one, tiny()) > 0
    train(model, opt, steps=2, start=1)
    assert max_diff(model, after_one) == 0 and opt.state[model.emb.weight]["step"] == 3


@pytest.mark.parametrize("second_moment,factor_rank", [("nmf", 1), ("nmf", 2), ("svd", 2), ("qr", 2), ("full", 1)])
def test_state_dict_round_trip_continues_identically(second_moment, factor_rank):
    kw = dict(lr=0.05, second_moment=second_moment, factor_rank=factor_rank)
    model = tiny()
    opt = AdaLomo(model.parameters(), **kw)
    train(model, opt, steps=3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for s in saved_opt["state"].values():
        assert all(isinstance(v, (torch.Tensor, int, float)) for v in s.values())
    train(model, opt, steps=3, start=3)
    opt.remove_hooks()

    resumed = tiny()
    resumed.load_state_dict(saved_model)
    opt2 = AdaLomo(resumed.parameters(), **kw)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, steps=3, start=3)
    assert max_diff(model, resumed) == 0


@pytest.mark.parametrize("second_moment,factor_rank", [("nmf", 4), ("qr", 2)])
def test_deterministic(second_moment, factor_rank):
    a, b = tiny(), tiny()
    for m in (a, b):
        train(m, AdaLomo(m.parameters(), lr=0.05, second_moment=second_moment, factor_rank=factor_rank))
    assert max_diff(a, b) == 0


def test_conv_weight_factored_over_last_two_dims():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    opt = AdaLomo(conv.parameters(), lr=0.05)
    conv(torch.randn(2, 2, 5, 5)).square().mean().backward()
    opt.step()
    st = opt.state[conv.weight]
    assert st["r"].shape == (3, 2, 3) and st["c"].shape == (3, 2, 3)
    assert torch.isfinite(conv.weight).all()


# ---- ablation knobs ---------------------------------------------------------------------------------
def test_rank1_nmf_reduces_to_closed_form():
    torch.manual_seed(0)
    n, m = 5, 7
    A, B = torch.rand(n, 1) + 0.5, torch.rand(m, 1) + 0.5  # any positive start
    r, c = torch.zeros(n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    for t in range(1, 7):
        beta2 = 1 - t ** -0.8
        S = torch.randn(n, m).square() + 1e-30
        r = beta2 * r + (1 - beta2) * S.double().mean(1)
        c = beta2 * c + (1 - beta2) * S.double().mean(0)
        A, B = nmf_refine(beta2 * A @ B.T + (1 - beta2) * S, A, B, iters=1)
        torch.testing.assert_close((A @ B.T).double(), torch.outer(r, c) / r.mean(), rtol=1e-5, atol=0)


def test_memory_accounting():
    sizes = {}
    for kind, k in [("nmf", 1), ("nmf", 2), ("svd", 2), ("qr", 2), ("full", 1)]:
        model = tiny()
        opt = AdaLomo(model.parameters(), second_moment=kind, factor_rank=k)
        predicted = opt.persistent_state_bytes()
        train(model, opt, steps=1)
        measured = held_state_bytes(opt)
        assert measured == 4 * sum(hand_state_numel(p.shape, kind, k) for p in model.parameters())
        assert predicted == measured
        sizes[kind, k] = (predicted, opt.transient_peak_bytes())
    # Tiny: emb 11 x 8 (tied head), 16 x 8 and 8 x 16 weights, biases 16 + 8, LayerNorm 8 + 8
    assert sizes["nmf", 1][0] == 4 * ((11 + 8) + 2 * (16 + 8) + 16 + 8 + 8 + 8)
    assert sizes["full", 1][0] == 4 * sum(p.numel() for p in tiny().parameters())
    assert sizes["nmf", 1][0] < sizes["nmf", 2][0] < sizes["full", 1][0]
    assert sizes["nmf", 1][1] < sizes["nmf", 2][1] <= sizes["svd", 2][1]
    biggest = max(p.numel() for p in tiny().parameters())
    assert sizes["nmf", 1][1] == 4 * 2 * biggest  # G and U of the largest tensor


# ---- validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(lr=-1.0), dict(eps=(1e-30,)), dict(eps=(-1.0, 1e-3)), dict(clip_threshold=0.0),
    dict(decay_rate=0.5), dict(weight_decay=-0.1), dict(normalization="batch"),
    dict(second_moment="adam"), dict(factor_rank=0), dict(second_moment="full", factor_rank=2),
    dict(max_grad_norm=0.0), dict(fused="yes"), dict(nmf_iters=0), dict(seed=-1),
])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError, match="Invalid"):
        AdaLomo(tiny().parameters(), **kwargs)


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(weight_decay=-1.0), dict(max_grad_norm=-1.0)])
def test_lomo_invalid_arguments(kwargs):
    with pytest.raises(ValueError, match="Invalid"):
        Lomo(tiny().parameters(), **kwargs)


# ---- LOMO baseline -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_lomo_equals_sgd_with_scheduler(fused):
    a, b = tiny(), tiny()
    oa = Lomo(a.parameters(), lr=0.1, weight_decay=0.01, fused=fused)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, weight_decay=0.01)
    sa, sb = (torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (oa, ob))
    for t in range(STEPS):
        loss_of(a, t).backward()
        if fused:
            assert all(p.grad is None for p in a.parameters())
        loss_of(b, t).backward()
        for o, s in ((oa, sa), (ob, sb)):
            o.step()
            o.zero_grad()
            s.step()
    assert max_diff(a, b) < 1e-6


def test_lomo_clipping_matches_torch_clip():
    a, b = tiny(), tiny()
    oa, ob = Lomo(a.parameters(), lr=0.1, max_grad_norm=0.3), torch.optim.SGD(b.parameters(), lr=0.1)
    for t in range(3):
        oa.backward(loss_of(a, t))
        oa.step()
        loss_of(b, t).backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 0.3)
        ob.step()
        ob.zero_grad()
    assert max_diff(a, b) < 1e-6


# ---- memory formulas and helpers for the notebooks ----------------------------------------------------
@pytest.mark.parametrize("second_moment,factor_rank", [("nmf", 1), ("nmf", 2), ("svd", 2), ("qr", 4), ("full", 1)])
def test_state_numel_formula_equals_measured_state_of_a_llama(second_moment, factor_rank):
    from lrkit.memory import llama_weight_shapes
    from lrkit.models import build_llama

    vocab = 96
    model = build_llama("nano", vocab, 16, seed=0)
    opt = AdaLomo(model.parameters(), lr=0.01, second_moment=second_moment, factor_rank=factor_rank)
    x = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    measured = {p: sum(v.numel() for v in opt.state[p].values() if isinstance(v, torch.Tensor)) for p in model.parameters()}
    assert all(measured[p] == hand_state_numel(p.shape, second_moment, factor_rank) for p in model.parameters())
    assert held_state_bytes(opt) == 4 * sum(measured.values())  # fp32, no shared or oversized storage
    if (second_moment, factor_rank) == ("nmf", 1):  # 2 blocks x (q k v o 64 x 64, gate up 176 x 64, down
        assert sum(measured.values()) == 3104  # 64 x 176, 2 norms) + final norm + embedding and head 96 x 64
    analytic = sum(adalomo_state_numel(s, second_moment, factor_rank) for _, s in llama_weight_shapes("nano", vocab))
    assert 4 * analytic == held_state_bytes(opt) == opt.persistent_state_bytes()


def test_state_numel_of_llama_7b_and_recipe_bytes():
    from lrkit.memory import GIB, llama_weight_shapes, recipe_memory_bytes

    assert adalomo_state_numel((11008, 4096)) == 11008 + 4096 and adalomo_state_numel((4096,)) == 4096
    assert adalomo_state_numel((3, 5, 7)) == 3 * (5 + 7)  # leading dims are a batch
    n = sum(adalomo_state_numel(s) for _, s in llama_weight_shapes("7b"))
    assert n == 2_836_992  # docs/methods.md, section 2: about 11 MiB for LLaMA-7B
    rec = {r: recipe_memory_bytes("7b", r) for r in ("adamw", "sgd", "lomo", "adalomo")}
    params = rec["adamw"]["parameters"]
    assert rec["adamw"]["total_bytes"] == 16 * params and rec["sgd"]["total_bytes"] == 8 * params
    assert rec["adalomo"]["state_bytes"] == 4 * n
    assert rec["lomo"]["grad_bytes"] == rec["adalomo"]["grad_bytes"] == 2 * 32000 * 4096  # one gradient: the embedding's
    # the LOMO paper's Table 1 (GiB, activations included) sits ~2 GiB above the weights+grads+states count
    for recipe, paper in (("adamw", 102.20), ("sgd", 51.99), ("lomo", 14.58)):
        assert 0 < paper - rec[recipe]["total_bytes"] / GIB < 2.5
    with pytest.raises(ValueError, match="Invalid recipe"):
        recipe_memory_bytes("7b", "adam")


def test_layer_groups_one_group_per_block():
    from lrkit.models import build_llama

    model = build_llama("nano", 64, 16, seed=0)
    groups = layer_groups(model)
    assert [g["name"] for g in groups] == ["layers.0", "layers.1", "rest"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".layers.1." in names[id(p)] for p in groups[1]["params"])
    assert {names[id(p)] for p in groups[2]["params"]} == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    # "layer" normalisation over these groups: each block's updates share one RMS, fused == unfused
    a, b = build_llama("nano", 64, 16, seed=0), build_llama("nano", 64, 16, seed=0)
    oa = AdaLomo(layer_groups(a), lr=0.05, normalization="layer")
    ob = AdaLomo(layer_groups(b), lr=0.05, normalization="layer", fused=False)
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    for m, o in ((a, oa), (b, ob)):
        for _ in range(2):
            m(input_ids=x, labels=x).loss.backward()
            o.step()
            o.zero_grad()
    assert max_diff(a, b) < 1e-6


def test_layer_normalization_with_one_group_warns():
    with pytest.warns(UserWarning, match="which is 'global'"):
        AdaLomo(tiny().parameters(), normalization="layer")


def test_measure_method_memory_fused_holds_one_gradient():
    from lrkit.experiments.memory import measure_method_memory

    full = measure_method_memory("nano", "full", vocab_size=64, seq_len=8, steps=1)
    ada = measure_method_memory("nano", "adalomo", vocab_size=64, seq_len=8, steps=1)
    assert full["grad_peak_bytes"] == full["param_bytes"]  # every gradient alive before step()
    assert full["optimizer_state_bytes"] == 2 * full["param_bytes"]  # Adam's M and V
    from lrkit.models import build_llama

    largest = max(p.numel() for p in build_llama("nano", 64, 8).parameters())
    assert ada["grad_peak_bytes"] == 4 * largest  # fused: one gradient at a time
    model = build_llama("nano", 64, 8)
    assert ada["optimizer_state_bytes"] == ada["persistent_state_bytes"] == 4 * sum(
        hand_state_numel(p.shape) for p in model.parameters())
    assert ada["held_bytes"] < full["held_bytes"] / 5


# ---- "qr": rank-revealing QR (column pivoting), truncated to k ---------------------------------------
@pytest.mark.parametrize("n,m,k", [(6, 9, 1), (6, 9, 3), (9, 6, 4), (5, 5, 5), (7, 3, 2)])
def test_pivoted_qr_matches_scipy(n, m, k):
    from scipy.linalg import qr

    from lrkit.optim.adalomo import pivoted_qr

    T = torch.randn(n, m, generator=torch.Generator().manual_seed(n * m + k), dtype=torch.float64).square()
    Q, R, piv = pivoted_qr(T, k)
    Qs, Rs, Ps = qr(T.numpy(), pivoting=True, mode="economic")  # LAPACK geqp3
    assert piv.tolist() == Ps[:k].tolist()
    Qs_k = torch.from_numpy(Qs[:, :k])
    torch.testing.assert_close(Q @ Q.T, Qs_k @ Qs_k.T, rtol=0, atol=1e-12)  # same subspace (signs aside)
    torch.testing.assert_close(Q.T @ Q, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(R[:, piv].abs().triu(), torch.from_numpy(Rs[:k, :k]).abs(), rtol=0, atol=1e-12)
    torch.testing.assert_close(R, Q.T @ T, rtol=0, atol=1e-12)


def test_pivoted_qr_rank_k_bounds():
    """Eckart-Young: no rank-k approximation beats the truncated SVD (sigma_{k+1} in the 2-norm); column
    pivoting stays within a factor of it that is exponential in k in the worst case (Gu & Eisenstat 1996;
    the factor below is a loose stand-in). A rank-k matrix is recovered exactly, and past its rank the
    extra columns are zero."""
    from lrkit.optim.adalomo import pivoted_qr

    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        n, m = 8 + trial % 5, 12
        T = torch.randn(n, m, generator=g, dtype=torch.float64).square()
        s = torch.linalg.svdvals(T)
        for k in (1, 2, 4):
            Q, R, _ = pivoted_qr(T, k)
            err = torch.linalg.matrix_norm(T - Q @ R, ord=2)
            assert s[k] - 1e-12 <= err <= math.sqrt(k * (m - k) + 1) * 2 ** k * s[k]
    low = torch.randn(9, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 7, generator=g, dtype=torch.float64)
    Q, R, _ = pivoted_qr(low, 2)
    torch.testing.assert_close(Q @ R, low, rtol=0, atol=1e-12)
    Q, R, _ = pivoted_qr(low, 4)  # past the rank: zero columns, still exact
    torch.testing.assert_close(Q @ R, low, rtol=0, atol=1e-12)
    assert (Q[:, 2:] == 0).all()


def test_pivoted_qr_batched_scale_free_and_zero():
    from lrkit.optim.adalomo import pivoted_qr

    T = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(1))
    Q, R, piv = pivoted_qr(T, 2)
    assert Q.shape == (3, 5, 2) and R.shape == (3, 2, 6) and piv.shape == (3, 2)
    for i in range(3):
        Qi, Ri, pi = pivoted_qr(T[i], 2)
        torch.testing.assert_close(Q[i] @ R[i], Qi @ Ri)
        assert pi.tolist() == piv[i].tolist()
        Qt, Rt, pt = pivoted_qr(T[i] * 1e-30, 2)  # second moments of tiny gradients: no underflow
        assert pt.tolist() == pi.tolist()
        torch.testing.assert_close(Qt @ Rt, Qi @ Ri * 1e-30, rtol=1e-4, atol=0)
    Q, R, _ = pivoted_qr(torch.zeros(4, 3), 2)
    assert (Q == 0).all() and (R == 0).all()


def test_qr_second_moment_is_the_pivoted_qr_of_the_ema_target():
    """One parameter, two steps, by hand: T = beta2 Q W + (1 - beta2)(G*G + eps1), V = clamp(Q_k Q_k^T T)."""
    from scipy.linalg import qr

    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 5))
    opt = AdaLomo([w], lr=0.05, second_moment="qr", factor_rank=2, fused=False)
    V = torch.zeros(6, 5, dtype=torch.float64)
    ref = w.detach().double().clone()
    for t in (1, 2):
        g = torch.randn(6, 5)
        w.grad = g.clone()
        opt.step()
        beta2 = 1 - t ** -0.8
        T = beta2 * V + (1 - beta2) * (g.double() ** 2 + 1e-30)
        Qs, _, _ = qr(T.numpy(), pivoting=True, mode="economic")
        Qk = torch.from_numpy(Qs[:, :2])
        V = Qk @ Qk.T @ T
        U = g.double() / V.clamp_min(1e-30).sqrt()
        U = U / max(1.0, U.square().mean().sqrt().item())
        ref -= 0.05 * max(1e-3, ref.square().mean().sqrt().item()) * U
        st = opt.state[w]
        torch.testing.assert_close((st["Q"] @ st["W"]).double(), V, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.detach().double(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("second_moment", ["svd", "qr"])
def test_rank_k_clamp_warns_once_and_rank_1_never(second_moment):
    """A rank >= 2 svd/qr second moment that goes below eps1 is clamped and warned about once (docs/methods.md:
    the clamped entries take the tensor's whole update); at rank 1 the factors of the non-negative target are
    non-negative and nothing is clamped."""
    import warnings

    torch.manual_seed(0)
    # Random gradients drive the rank-2 SVD below eps1 within three steps; pivoted QR stays positive on them.
    for rank, expect in [(2, int(second_moment == "svd")), (1, 0)]:
        w = torch.nn.Parameter(torch.randn(64, 32))
        opt = AdaLomo([w], lr=1e-2, fused=False, second_moment=second_moment, factor_rank=rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                w.grad = torch.randn(64, 32)
                opt.step()
        msgs = [str(c.message) for c in caught if "clamped" in str(c.message)]
        assert len(msgs) == expect, (rank, msgs)
        if expect:
            assert f"second_moment={second_moment!r} at rank 2" in msgs[0]


# ---------------------------------------------------------------------- the update clip, both sides
@pytest.mark.parametrize("normalization", ["grouped", "global"])
@pytest.mark.parametrize("d, coef", [(2.0, 1.0), (0.5, 0.5)], ids=["below", "above"])
def test_update_clip_is_one_below_the_threshold(normalization, d, coef):
    # step 1 of a vector: beta2_1 = 0, so V = G^2 + eps1 and U = G / |G| = sign(G), RMS(U) = 1 exactly. A
    # clip_threshold d above 1 leaves U alone (dividing by an uncapped RMS / d = 0.5 would double it); below 1 it
    # divides U by RMS / d. Then theta -= lr * max(eps2, RMS(theta)) * U_hat, by hand.
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6))
    p0, g = p.detach().clone(), torch.tensor([0.5, -1.0, 2.0, -0.25, 1.5, -3.0])
    opt = AdaLomo([p], lr=0.1, clip_threshold=d, normalization=normalization)
    opt.backward((p * g).sum())
    opt.step()
    eta = 0.1 * max(1e-3, (p0.square().mean().sqrt()).item())
    torch.testing.assert_close(p.detach(), p0 - eta * coef * g.sign(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- sets whose last gradient never comes
@pytest.mark.parametrize("normalization", ["global", "layer"])
def test_normalisation_set_with_an_unused_parameter_is_applied_at_step(normalization):
    """Layer 0 holds an unused parameter (requires grad, never in the graph): its set ("global": every
    parameter) waits for a gradient that never arrives and is applied by step(); layer 1 holds a frozen
    parameter, which no set waits for ("layer": layer 1 is applied inside backward). Either way the trained
    weights equal those of the same model without the two extra parameters (the RMS is over the updates
    that arrived)."""
    def build(extra):
        torch.manual_seed(0)
        l0, l1 = nn.Linear(6, 5), nn.Linear(5, 3)
        unused, frozen = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(3), requires_grad=False)
        g0, g1 = list(l0.parameters()), list(l1.parameters())
        if extra:
            g0, g1 = g0 + [unused], g1 + [frozen]
        opt = AdaLomo([{"params": g0}, {"params": g1}], lr=0.05, normalization=normalization)
        return l0, l1, unused, opt

    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    runs = {}
    for extra in (True, False):
        l0, l1, unused, opt = build(extra)
        u0 = unused.detach().clone()
        for step in range(3):
            before = [q.detach().clone() for q in (*l0.parameters(), *l1.parameters())]
            opt.backward(torch.tanh(l1(torch.tanh(l0(x)))).square().mean())
            if extra and step == 0:  # inside backward: only complete sets were applied
                moved = [not torch.equal(b, q) for b, q in zip(before, (*l0.parameters(), *l1.parameters()))]
                assert moved == [False, False] + [normalization == "layer"] * 2
            opt.step()
            opt.zero_grad()
            assert all(not torch.equal(b, q) for b, q in zip(before, (*l0.parameters(), *l1.parameters())))
        runs[extra] = torch.cat([q.detach().flatten() for q in (*l0.parameters(), *l1.parameters())])
        assert torch.equal(unused, u0)
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-6, atol=1e-7)
