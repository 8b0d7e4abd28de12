"""The shared language-model loop: argument validation and same seed -> same numbers on CPU."""
import numpy as np
import pytest
import torch

from lrkit import seed_everything
from lrkit.data.text import TokenizedCorpus
from lrkit.models import build_llama
from lrkit.train import LMTrainConfig, eval_windows, train_lm


def _corpus():
    rng = np.random.default_rng(0)
    # A learnable toy stream: token t+1 = (t * 3 + 1) mod 64, with noise.
    ids = [0]
    for _ in range(6000):
        ids.append((ids[-1] * 3 + 1) % 64 if rng.random() > 0.1 else int(rng.integers(64)))
    ids = np.asarray(ids, dtype=np.int64)
    return TokenizedCorpus("toy", ids[:5000], ids[5000:], 64, None, ["a"], ["b"])


def _run(seed):
    seed_everything(seed)
    corpus = _corpus()
    model = build_llama("nano", 64, 32, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = LMTrainConfig(steps=30, batch_size=8, seq_len=32, lr=1e-2, eval_every=10, eval_windows=8,
                        seed=seed, device="cpu")
    return train_lm("adamw", model, opt, corpus, cfg)


def test_same_seed_same_numbers_and_learning():
    a, b = _run(0), _run(0)
    assert a.history == b.history and a.final == b.final
    assert a.final["val_loss"] < np.log(64) - 0.5  # learns beyond uniform
    assert _run(1).final["val_loss"] != a.final["val_loss"]
    assert [r["step"] for r in a.history] == [10, 20, 30]
    assert a.memory["optimizer_state_bytes"] >= 2 * a.memory["param_bytes"]


def test_eval_windows_cover_the_stream():
    ids = np.arange(1000)
    w = eval_windows(ids, 5, 10)
    assert w.shape == (5, 11) and w[0, 0] == 0 and w[-1, -1] == 999


@pytest.mark.parametrize("bad", [{"steps": 0}, {"lr": float("nan")}, {"batch_size": 1.5}, {"warmup_frac": 1.0}])
def test_config_validation_names_the_value(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        LMTrainConfig(**bad)


def test_stability_rule_catches_runs_that_end_far_above_their_best():
    from lrkit.train import stability

    rows = lambda vals: [{"step": 10 * (i + 1), "train_loss": v, "val_loss": v} for i, v in enumerate(vals)]
    assert stability(rows([3.0, 2.5, 2.4]), False, 0.1) == {"best_val_loss": 2.4, "val_loss_above_best": 0.0,
                                                           "unstable": False}
    late = stability(rows([3.0, 2.5, 2.9]), False, 0.1)  # no NaN anywhere, yet it ended 0.4 nats above its best
    assert late["unstable"] and late["val_loss_above_best"] == pytest.approx(0.4)
    assert not stability(rows([3.0, 2.5, 2.6]), False, 0.1 + 1e-9)["unstable"]  # within the margin (strict >)
    assert stability(rows([3.0]) + [{"step": 20, "train_loss": None}], True, 0.1) == {
        "best_val_loss": None, "val_loss_above_best": None, "unstable": True}
    r = _run(0)
    assert r.final["unstable"] is False and r.final["best_val_loss"] <= r.final["val_loss"]
    with pytest.raises(ValueError, match="Invalid unstable_margin"):
        LMTrainConfig(unstable_margin=-1.0)


@pytest.mark.parametrize("method,kw", [("full", {}), ("galore", {"rank": 4, "update_proj_gap": 1}),
                                       ("adalomo", {}), ("galore", {"rank": 4, "per_layer": True})])
def test_a_non_finite_gradient_stops_the_run_naming_step_and_parameter(method, kw):
    """A NaN in one weight's gradient (finite loss) stops the run as diverged at that step, naming the
    parameter, before any update or SVD sees it (GaLore's SVD used to raise a bare LinAlgError)."""
    from lrkit.methods import prepare

    corpus = _corpus()
    seed_everything(0)
    model = build_llama("nano", corpus.vocab_size, 16, seed=0)
    target = "model.layers.0.mlp.up_proj.weight"
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("nan")) if calls["n"] == 4 else grad

    dict(model.named_parameters())[target].register_hook(poison)
    setup = prepare(method, model, lr=1e-3, **kw)
    cfg = LMTrainConfig(steps=6, batch_size=2, seq_len=16, eval_every=3, eval_windows=2)
    r = train_lm("nan", setup.model, setup.optimizer, corpus, cfg)
    assert r.final["diverged"] and r.final["steps"] == 4
    assert r.final["failure"] == f"step 4: non-finite gradient (NaN or Inf) in parameter {target}"
    assert all(torch.isfinite(p).all() for p in model.parameters())  # nothing non-finite was applied
