"""Measured memory: the gradient peak during backward and one training step's bytes per method."""
import math
import weakref

import pytest
import torch

from helpers import hand_state_numel, held_state_bytes
from lrkit.memory import GradientPeak
from lrkit.methods import prepare
from lrkit.models import build_llama
from lrkit.train import lm_loss

VOCAB = 256
X = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))


def _largest_param_bytes(model):
    return max(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("peak_first", [True, False])
def test_gradient_peak_sees_per_layer_gradients_whichever_hooks_come_first(peak_first):
    # Per-layer GaLore frees each gradient in its post-accumulate hook: only one is alive at a time, so
    # the peak is the largest gradient, whether GradientPeak was entered before or after prepare().
    model = build_llama("nano", VOCAB, 32, seed=0)
    peak = GradientPeak(model).__enter__() if peak_first else None
    p = prepare("galore", model, lr=1e-3, rank=4, per_layer=True)
    peak = peak or GradientPeak(model).__enter__()
    p.optimizer.backward(lm_loss(p.model, X))
    p.optimizer.step()
    peak.__exit__(None, None, None)
    assert peak.peak == _largest_param_bytes(model)
    assert all(q.grad is None for q in model.parameters())


# ---- AdaLomo: state and gradients measured from the tensors themselves ----------------------------------
class LiveGradients:
    """Measures which gradients are still alive, by weak reference: a post-accumulate hook registered
    before the optimizer's (so it runs first) takes a weak reference to each final ``.grad``. A gradient
    counts as alive while any reference to it (or a view of it) exists anywhere, ``.grad`` or not."""

    def __init__(self, model):
        self.refs, self.peak = [], 0
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in model.parameters()]

    def alive_bytes(self):
        return sum(n for r, n in self.refs if r() is not None)

    def _hook(self, p):
        self.refs.append((weakref.ref(p.grad), p.grad.numel() * p.grad.element_size()))
        self.peak = max(self.peak, self.alive_bytes())

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("second_moment,k,fused", [("nmf", 1, True), ("nmf", 1, False), ("nmf", 2, True),
                                                    ("svd", 2, True), ("qr", 4, True), ("full", 1, True)])
def test_adalomo_state_and_live_gradients_measured(second_moment, k, fused):
    """After each step the optimizer holds exactly the fp32 factors counted by hand (every storage in
    optimizer.state, measured) and no gradient is alive; fused, one gradient is alive at a time (the peak
    is the largest, the 256 x 64 embedding or head), unfused all of them before step()."""
    from lrkit.optim.adalomo import AdaLomo

    model = build_llama("nano", VOCAB, 32, seed=0)
    live = LiveGradients(model)  # before the optimizer: its hook runs first
    opt = AdaLomo(model.parameters(), lr=1e-3, second_moment=second_moment, factor_rank=k, fused=fused)
    hand = 4 * sum(hand_state_numel(tuple(p.shape), second_moment, k) for p in model.parameters())
    for step in range(2):
        lm_loss(model, X).backward()
        opt.step()
        opt.zero_grad()
        assert live.alive_bytes() == 0, f"gradients alive after step {step}"
        assert held_state_bytes(opt) == hand
    live.remove()
    largest = 4 * VOCAB * 64  # the embedding and the head, 256 x 64
    assert live.peak == (largest if fused else sum(4 * p.numel() for p in model.parameters()))
    assert opt.persistent_state_bytes() == hand  # the formula agrees with the measurement
    if (second_moment, k) == ("nmf", 1):  # 2 x (4 x (64 + 64) + 3 x (176 + 64) + 2 x 64) + 64 + 2 x (256 + 64)
        assert hand == 4 * 3424
    if second_moment == "full":
        assert hand == 4 * sum(p.numel() for p in model.parameters())
