"""The hook base shared by LOMO, AdaLomo and per-layer GaLore (lrkit/optim/in_backward.py): its options
give the same updates whichever way they are combined (accumulation, two-pass or deferred clipping)."""
import pytest
import torch

from lrkit.optim import AdaLomo, InBackwardOptimizer, Lomo, PerLayerGaLore


def mlp():
    torch.manual_seed(0)
    L = torch.nn.Linear
    return torch.nn.Sequential(L(16, 32), torch.nn.Tanh(), L(32, 24), torch.nn.Tanh(), L(24, 2))


def batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def train(model, opt, k=1):
    for x, y in batches():
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            loss = torch.nn.functional.mse_loss(model(xs), ys) / k
            opt.backward(loss) if opt.updates_in_backward else loss.backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def galore(model, **kw):
    W = [model[0].weight, model[2].weight]
    rest = [p for p in model.parameters() if all(p is not w for w in W)]
    return PerLayerGaLore([{"params": rest}, {"params": W, "rank": 4, "update_proj_gap": 2, "proj_method": "random"}],
                          lr=1e-2, **kw)


MAKERS = {
    "adalomo": lambda m, **kw: AdaLomo(m.parameters(), lr=0.05, **kw),
    "lomo": lambda m, **kw: Lomo(m.parameters(), lr=0.1, **kw),
    "galore_per_layer": galore,
}


@pytest.mark.parametrize("name", MAKERS)
def test_every_subclass_uses_the_base(name):
    assert isinstance(MAKERS[name](mlp()), InBackwardOptimizer)


@pytest.mark.parametrize("name", MAKERS)
def test_two_pass_and_deferred_clipping_agree(name):
    make = MAKERS[name]
    a, b = mlp(), mlp()
    two_pass = train(a, make(a, max_grad_norm=0.05, clipping="two_pass"))
    deferred = train(b, make(b, max_grad_norm=0.05, clipping="deferred"))
    c = mlp()
    unclipped = train(c, make(c))
    torch.testing.assert_close(two_pass, deferred, rtol=1e-5, atol=1e-6)
    assert (two_pass - unclipped).abs().max() > 1e-3  # max_grad_norm=0.05 did clip


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_accumulation_in_backward_equals_one_big_batch(name, max_grad_norm):
    make = MAKERS[name]
    a, b = mlp(), mlp()
    one = train(a, make(a, max_grad_norm=max_grad_norm))
    accumulated_opt = make(b, max_grad_norm=max_grad_norm, accumulation_steps=2)
    assert accumulated_opt.clipping == "deferred"  # the default once gradients are held anyway
    accumulated = train(b, accumulated_opt, k=2)
    torch.testing.assert_close(accumulated, one, rtol=1e-5, atol=1e-6)


def test_accumulating_parameter_is_left_alone_and_extra_backward_raises():
    model = mlp()
    opt = AdaLomo(model.parameters(), lr=0.05, accumulation_steps=2)
    w0 = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]
    opt.backward(torch.nn.functional.mse_loss(model(x), y))
    opt.step()  # mid-accumulation: nothing to apply
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert all(p.grad is not None for p in model.parameters())
    opt.backward(torch.nn.functional.mse_loss(model(x), y))  # the 2nd: update, gradients freed
    assert all(p.grad is None for p in model.parameters())
    assert not any(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    with pytest.raises(RuntimeError, match="already updated in this step"):
        opt.backward(torch.nn.functional.mse_loss(model(x), y))


@pytest.mark.parametrize("kw, match", [
    (dict(accumulation_steps=0), r"Invalid accumulation_steps: 0 \(expected an int >= 1\)"),
    (dict(clipping="sometimes"), "Invalid clipping: 'sometimes'"),
    (dict(reduction="sum"), "Invalid reduction: 'sum'"),
    (dict(max_grad_norm=1.0, clipping="two_pass", accumulation_steps=2), "Invalid clipping: 'two_pass'"),
])
def test_invalid_options(kw, match):
    for make in MAKERS.values():
        with pytest.raises(ValueError, match=match):
            make(mlp(), **kw)


def test_mean_reduction_without_process_group_raises():
    model = mlp()
    opt = Lomo(model.parameters(), lr=0.1, reduction="mean")
    x, y = batches(1)[0]
    with pytest.raises(RuntimeError, match="reduction='mean' needs an initialised"):
        opt.backward(torch.nn.functional.mse_loss(model(x), y))


# ---------------------------------------------------------------------- every clipping path, both sides
# Two tensors with gradients (1, 2, 2) and ((0, 4), (0, 0)) (a loss linear in the weights, so the gradient is
# exactly these numbers): global norm 5. A threshold of 8 lies above it: the coefficient must be exactly 1
# (an uncapped 8 / 5 would scale the gradient *up*); 2.5 lies below it: coefficient 2.5 / (5 + 1e-6).
# LOMO (plain SGD) shows the coefficient directly in the update.
G_A, G_B = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([[0.0, 4.0], [0.0, 0.0]])
LR = 0.1


def clipped_lomo_step(max_grad_norm, path):
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))
    w0 = [a.detach().clone(), b.detach().clone()]
    k = 2 if path == "deferred_accumulated" else 1
    kw = dict(fused=False) if path == "unfused" else dict(
        clipping="two_pass" if path == "two_pass" else "deferred", accumulation_steps=k)
    opt = Lomo([a, b], lr=LR, max_grad_norm=max_grad_norm, **kw)
    for _ in range(k):
        loss = ((a * G_A).sum() + (b * G_B).sum()) / k
        opt.backward(loss) if opt.updates_in_backward else loss.backward()
    opt.step()
    return w0, [a.detach(), b.detach()]


@pytest.mark.parametrize("path", ["two_pass", "deferred", "deferred_accumulated", "unfused"])
@pytest.mark.parametrize("max_grad_norm, coef", [(8.0, 1.0), (2.5, 2.5 / (5.0 + 1e-6))], ids=["below", "above"])
def test_clip_coefficient_is_one_below_the_threshold(path, max_grad_norm, coef):
    w0, w = clipped_lomo_step(max_grad_norm, path)
    for p0, p, g in zip(w0, w, (G_A, G_B)):
        torch.testing.assert_close(p, p0 - LR * coef * g, rtol=1e-6, atol=1e-7)
    if coef == 1.0:  # exactly the unclipped update, bit for bit
        _, unclipped = clipped_lomo_step(None, path)
        assert all(torch.equal(p, q) for p, q in zip(w, unclipped))
