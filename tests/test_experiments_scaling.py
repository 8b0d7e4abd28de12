"""lrkit.experiments.scaling: the trend slope is read per seed from the right ratios, the token rule, and the
per-size sweep gives every arm the same budget on the tuning windows and seed."""
import math

import numpy as np
import pytest

from lrkit.experiments import TUNING_SEED, scaling
from lrkit.records import RunResult

PARAMS = {"s": 10 ** 5, "m": 10 ** 6, "l": 10 ** 7}  # one decade apart


def test_slope_is_per_seed_ln_ratio_per_decade_paired_by_seed():
    # seed 0: ratio 1.0, e, e^2 (slope +1 per decade); seed 1: e^2, e, 1 (slope -1). The baseline's dicts list
    # the seeds in the other order, so pairing by position instead of by seed gives other slopes.
    r0, r1 = [1.0, math.e, math.e ** 2], [math.e ** 2, math.e, 1.0]
    measured = {}
    for k, size in enumerate(PARAMS):
        base = {1: 10.0 + k, 0: 20.0 + k}
        measured[f"{size} base"] = base
        measured[f"{size} arm"] = {0: base[0] * r0[k], 1: base[1] * r1[k]}
    out = scaling.slopes(measured, PARAMS, "arm", "base")
    assert out == pytest.approx({0: 1.0, 1: -1.0})  # ln ratio over log10 params: not /ln 10, not log10 ratio


def test_a_missing_ratio_fails_that_seed_only():
    measured = {f"{s} arm": {0: 2.0, 1: 2.0} for s in PARAMS} | {f"{s} base": {0: 1.0, 1: 1.0} for s in PARAMS}
    measured["m arm"][1] = None
    out = scaling.slopes(measured, PARAMS, "arm", "base")
    assert out[0] == pytest.approx(0.0) and out[1] is None


def test_token_rule_is_anchored_at_the_largest_size():
    steps = scaling.steps_for({"a": 100, "b": 400, "c": 1600}, 80, 0.5)
    assert steps == {"a": 20, "b": 40, "c": 80}
    assert scaling.steps_for({"a": 100, "b": 400}, 80, 1.0) == {"a": 20, "b": 80}
    with pytest.raises(ValueError, match="Invalid token_exponent"):
        scaling.steps_for({"a": 1}, 10, -1)
    with pytest.raises(ValueError, match="Invalid steps"):
        scaling.steps_for({"a": 1}, 0, 0.5)


def test_every_arm_and_size_gets_the_same_sweep(monkeypatch):
    monkeypatch.setattr(scaling, "lm_corpus", lambda *a, **k: "corpus")
    calls = []

    def fn(name, *, seed, lr, corpus, train, model_size, method):
        calls.append(dict(name=name, seed=seed, lr=lr, split=train.eval_split, steps=train.steps, size=model_size,
                          method=method))
        loss = (math.log(lr) - math.log(0.01)) ** 2 + 1  # optimum at 0.01: interior for every centre below
        return RunResult(name=name, config={"lr": lr}, seed=seed, device="cpu", device_name="cpu",
                         final={"val_loss": loss, "val_ppl": math.exp(loss)})

    def arms_for(size, lrs):
        return {a: dict(method=a, **({"lr": lrs[a]} if lrs else {})) for a in ("x", "y")}

    ladder = scaling.run_ladder(None, fn=fn, arms_for=arms_for, centers={"x": 0.01, "y": 0.02},
                                sizes=["micro", "pico"], vocab_size=64, steps=40, token_exponent=0.5, batch_size=2,
                                seq_len=4, evals=2, eval_windows=2, seeds=[0, 1, 2], points=3, factor=2.0,
                                max_extend=1)
    assert ladder.sizes == ["pico", "micro"]  # smallest first, whatever the order given
    tuning = [c for c in calls if c["name"].startswith("tune")]
    assert {c["seed"] for c in tuning} == {TUNING_SEED} and {c["split"] for c in tuning} == {"tuning"}
    for size in ladder.sizes:
        grids = {a: sorted(c["lr"] for c in tuning if c["size"] == size and c["method"] == a) for a in ("x", "y")}
        assert [len(g) for g in grids.values()] == [3, 4]  # y's optimum at its lower edge: one added rate
        assert np.allclose(np.diff(np.log(grids["x"])), math.log(2.0))
        assert np.allclose(np.diff(np.log(grids["y"])), math.log(2.0))
        assert {c["steps"] for c in calls if c["size"] == size} == {ladder.steps[size]}
    runs = [c for c in calls if not c["name"].startswith("tune")]
    assert {c["split"] for c in runs} == {"claims"} and len(runs) == 2 * 2 * 3
    assert {c["lr"] for c in runs if c["method"] == "y"} == {0.01}
    assert list(ladder.cost["tuning_runs"]) == [7, 7] and list(ladder.cost["runs"]) == [6, 6]


def test_galore_trend_claim_reads_the_slope_and_the_paper_gap_shrinks():
    claims = scaling.galore_claims(["pico", "nano", "micro"])
    trend = claims[-1]
    assert trend.metric == "slope" and trend.quantity == "value" and trend.bound == pytest.approx(math.log(1.05))
    assert trend.paper < 0  # Table 2: 1.024, 1.011, 1.008, 1.005 from 60M to 1B
    assert [c.arms for c in claims[:2]] == [("pico galore", "pico full-rank"), ("pico lora", "pico full-rank")]
    assert scaling.galore_claims(["60m"])[0].paper == pytest.approx(34.88 / 34.06)
