"""Measured memory: the gradient peak during backward and one training step's bytes per method."""
import pytest
import torch

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
