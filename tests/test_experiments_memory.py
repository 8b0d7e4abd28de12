"""The memory runners (lrkit/experiments/memory.py): measured bytes of a few training steps per method."""
import pytest
from lrkit.experiments.memory import measure_step_memory, step_memory_run
from lrkit.models import build_llama

VOCAB = 256


def _largest_param_bytes(model):
    return max(p.numel() * p.element_size() for p in model.parameters())


def test_measure_step_memory_matches_the_formula_and_frees_gradients_per_layer():
    kw = dict(vocab_size=VOCAB, batch_size=2, seq_len=16, steps=2, device="cpu")
    full = measure_step_memory("nano", "full", **kw)
    galore = measure_step_memory("nano", "galore", rank=4, **kw)
    per_layer = measure_step_memory("nano", "galore_per_layer", rank=4, **kw)
    for m in (full, galore, per_layer):
        assert m["optimizer_state_bytes"] == m["analytic_state_bytes"]
        assert m["param_bytes"] == 4 * m["parameters"] and "peak_cuda_bytes" not in m
    assert full["grad_peak_bytes"] == galore["grad_peak_bytes"] == full["param_bytes"]
    assert per_layer["grad_peak_bytes"] == _largest_param_bytes(build_llama("nano", VOCAB, 16))
    assert galore["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    # Per-layer mode changes when the update runs, not what it computes.
    assert per_layer["optimizer_state_bytes"] == galore["optimizer_state_bytes"]
    assert per_layer["loss"] == pytest.approx(galore["loss"], rel=1e-5)


def test_step_memory_run_records_the_figures_as_final_metrics():
    r = step_memory_run("nano galore", model_size="nano", method="galore", rank=4, vocab_size=VOCAB, seq_len=16,
                        steps=1, device="cpu")
    assert r.name == "nano galore" and r.config["rank"] == 4 and r.config["seq_len"] == 16 and r.device == "cpu"
    assert r.final["optimizer_state_bytes"] == r.final["analytic_state_bytes"] == r.memory["optimizer_state_bytes"]
    assert r.final["grad_peak_bytes"] == r.final["param_bytes"] and r.final["loss"] > 0


@pytest.mark.parametrize("kwargs, error, match", [
    ({"method": "adam"}, ValueError, "Invalid method: 'adam'"),
    ({"method": "galore"}, ValueError, "Invalid rank: None"),
    ({"method": "full", "steps": 0}, ValueError, "Invalid steps: 0"),
    ({"method": "full", "model_size": "2m"}, ValueError, "Invalid model size: '2m'"),
    ({"method": "galore_8bit", "rank": 4, "device": "cpu"}, RuntimeError, "needs a CUDA device"),
])
def test_measure_step_memory_rejects_bad_arguments(kwargs, error, match):
    kwargs = {"model_size": "nano", **kwargs}
    with pytest.raises(error, match=match):
        measure_step_memory(kwargs.pop("model_size"), vocab_size=VOCAB, **kwargs)


@pytest.mark.cuda
def test_measure_step_memory_8bit_galore_on_cuda():
    kw = dict(rank=16, vocab_size=1024, batch_size=2, seq_len=64, steps=2, device="cuda")
    galore = measure_step_memory("micro", "galore", **kw)
    eight = measure_step_memory("micro", "galore_8bit", **kw)
    assert eight["analytic_state_bytes"] is None and eight["peak_cuda_bytes"] > eight["param_bytes"]
    assert eight["optimizer_state_bytes"] < galore["optimizer_state_bytes"]
    assert eight["grad_peak_bytes"] == galore["grad_peak_bytes"] == galore["param_bytes"]
