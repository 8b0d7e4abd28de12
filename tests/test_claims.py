"""The verdict rule (lrkit.claims): intervals against scipy, every verdict reachable, the edge cases."""
import math

import numpy as np
import pytest
from scipy import stats

from lrkit.claims import CONTRADICTED, HOLDS, UNRESOLVED, Claim, evaluate, interval, sentence, table


def pair(a, b):
    return {"A": dict(enumerate(a)), "B": dict(enumerate(b))}


def test_interval_is_students_t():
    x = np.array([1.0, 2.0, 4.0, 3.5])
    mean, lo, hi, n = interval(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert n == 4 and mean == pytest.approx(x.mean()) and (lo, hi) == pytest.approx(ref, rel=1e-12)


def test_ratio_interval_is_taken_on_logs():
    x = np.array([1.1, 1.2, 0.9])
    mean, lo, hi, _ = interval(x, log=True)
    ref = stats.t.interval(0.95, 2, loc=np.log(x).mean(), scale=stats.sem(np.log(x)))
    assert mean == pytest.approx(math.exp(np.log(x).mean())) and (lo, hi) == pytest.approx(np.exp(ref))


def test_differences_are_paired_by_seed():
    # A is B minus a constant 0.1 on every seed, although the seeds themselves vary a lot: paired, it holds.
    b = [3.0, 5.0, 4.0]
    c = Claim("c", "A lower", "T", "loss", ("A", "B"), op="<", bound=0.0)
    v = evaluate(c, {"A": {2: 3.9, 0: 2.9, 1: 4.9}, "B": dict(enumerate(b))})
    assert v.verdict == HOLDS and v.estimate == pytest.approx(-0.1) and v.high - v.low == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("a, verdict", [
    ([1.00, 1.01, 0.99, 1.00], HOLDS),          # ratio ~1.0, clearly < 1.1
    ([1.30, 1.32, 1.29, 1.31], CONTRADICTED),   # ratio ~1.3, clearly > 1.1
    ([1.00, 1.25, 0.95, 1.20], UNRESOLVED),     # interval straddles 1.1
])
def test_ratio_claim_reaches_every_verdict(a, verdict):
    c = Claim("r", "within 10%", "T", "ppl", ("A", "B"), quantity="ratio", op="<", bound=1.10)
    assert evaluate(c, pair(a, [1.0] * 4)).verdict == verdict


def test_one_seed_is_unresolved_whatever_the_gap():
    c = Claim("g", "A lower", "T", "loss", ("A", "B"), op="<", bound=0.0)
    v = evaluate(c, pair([0.0], [100.0]))
    assert v.verdict == UNRESOLVED and v.n == 1 and math.isnan(v.low) and v.estimate == -100.0
    assert "no interval (one seed)" in sentence(v)


def test_zero_spread_gives_a_point_interval():
    c = Claim("z", "bytes equal", "T", "bytes", ("A", "B"), op=">", bound=5.0, quantity="ratio")
    v = evaluate(c, pair([600.0] * 3, [100.0] * 3))
    assert v.verdict == HOLDS and v.low == v.high == pytest.approx(6.0)
    assert evaluate(c, pair([400.0] * 3, [100.0] * 3)).verdict == CONTRADICTED


def test_interval_touching_the_bound_is_unresolved():
    c = Claim("t", "A - B < 1", "T", "m", ("A", "B"), op="<", bound=1.0)
    assert evaluate(c, pair([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])).verdict == UNRESOLVED  # point on the bound
    # an interval whose upper end is exactly the bound: build values with known t half-width
    d = np.array([-1.0, 0.0, 1.0])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    v = evaluate(c, pair(list(d + 1.0 - half), [0.0] * 3))
    assert v.high == pytest.approx(1.0, abs=1e-12)
    lower = Claim("t2", "A - B > lo", "T", "m", ("A", "B"), op=">", bound=v.low)
    assert evaluate(lower, pair(list(d + 1.0 - half), [0.0] * 3)).verdict == UNRESOLVED


@pytest.mark.parametrize("diffs, verdict", [([0.01, -0.01, 0.0], HOLDS), ([0.5, 0.6, 0.55], CONTRADICTED),
                                            ([-0.5, 0.6, 0.0], UNRESOLVED)])
def test_between_is_an_equivalence_test(diffs, verdict):
    c = Claim("tie", "A ties B", "T", "m", ("A", "B"), op="between", bound=0.1)
    assert evaluate(c, pair(diffs, [0.0] * 3)).verdict == verdict


def test_monotone_needs_every_step_and_fails_on_any_reversed_step():
    c = Claim("mono", "loss falls with rank", "Fig", "loss", ("r2", "r4", "r8"), kind="monotone", op="<", bound=0)
    base = np.array([0.0, 0.01, -0.01])
    m = {"r2": dict(enumerate(3 + base)), "r4": dict(enumerate(2 + base)), "r8": dict(enumerate(1 + base))}
    v = evaluate(c, m)
    assert v.verdict == HOLDS and len(v.steps) == 2
    m["r8"] = dict(enumerate(2.5 + base))  # reversed last step
    assert evaluate(c, m).verdict == CONTRADICTED
    m["r8"] = dict(enumerate(2 + np.array([0.3, -0.3, 0.0])))  # flat, noisy last step
    assert evaluate(c, m).verdict == UNRESOLVED


def test_interior_optimum():
    c = Claim("opt", "T=200 best", "Fig 5", "loss", ("T50", "T200", "T1000"), kind="interior_optimum", op=">", bound=0)
    noise = np.array([0.0, 0.01, -0.01])
    inside = {"T50": 2.0 + noise, "T200": 1.0 + noise, "T1000": 2.5 + noise}
    assert evaluate(c, {k: list(v) for k, v in inside.items()}).verdict == HOLDS
    edge = {"T50": 0.5 + noise, "T200": 1.0 + noise, "T1000": 2.5 + noise}
    v = evaluate(c, {k: list(v) for k, v in edge.items()})
    assert v.verdict == CONTRADICTED and v.estimate == pytest.approx(-0.5)
    higher = Claim("acc", "best inside", "F", "acc", ("a", "b", "c"), kind="interior_optimum", op=">", bound=0,
                   lower_is_better=False)
    assert evaluate(higher, {"a": [0.5, 0.51, 0.49], "b": [0.9, 0.91, 0.89], "c": [0.6, 0.6, 0.61]}).verdict == HOLDS


def test_seeds_missing_in_an_arm_are_left_out_and_said():
    c = Claim("d", "A lower", "T", "loss", ("A", "B"), op="<", bound=0)
    v = evaluate(c, {"A": {0: 1.0, 1: None, 2: 1.0, 3: 1.1}, "B": {0: 2.0, 1: 2.0, 2: 2.1, 3: 2.0}})
    assert v.n == 3 and "1 seed(s)" in v.note and v.verdict == HOLDS


def test_value_claim_and_table():
    c = Claim("v", "beats baseline", "T", "gain", ("A",), quantity="value", op=">", bound=0)
    v = evaluate(c, {"A": [0.5, 0.6, 0.55]})
    df = table([v])
    assert v.verdict == HOLDS and list(df.claim) == ["v"] and df.n.item() == 3 and "gain: A > 0" in v.target


@pytest.mark.parametrize("kw, match", [
    (dict(kind="nope"), "Invalid kind"), (dict(quantity="log"), "Invalid quantity"), (dict(op="<="), "Invalid op"),
    (dict(arms=("A",)), "exactly 2 arm"), (dict(quantity="ratio", bound=0.0), "ratio > 0"),
    (dict(op="between", bound=0.0), "half-width"), (dict(kind="monotone", arms=("A",)), "ordered arms"),
])
def test_bad_claims_are_refused_with_the_value(kw, match):
    args = dict(id="x", statement="s", source="T", metric="m", arms=("A", "B")) | kw
    with pytest.raises(ValueError, match=match):
        Claim(**args)


def test_unknown_arm_names_the_measured_ones():
    c = Claim("x", "s", "T", "m", ("A", "C"))
    with pytest.raises(KeyError, match="measured arms"):
        evaluate(c, pair([1.0], [1.0]))
