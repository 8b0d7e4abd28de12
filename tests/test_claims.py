"""The verdict rule (lrkit.claims): intervals against scipy, every verdict reachable, the edge cases."""
import math

import numpy as np
import pytest
from scipy import stats

from lrkit.claims import (CONTRADICTED, HOLDS, MARGINS, UNRESOLVED, Claim, evaluate, evaluate_all, interval,
                          reason_kind, seeds_needed, sentence, table, to_records)


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
    c = Claim("tie", "A ties B", "T", "m", ("A", "B"), op="between", bound=0.1, margin_reason="a tenth")
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


def test_seeds_never_run_on_an_arm_are_left_out_and_said():
    c = Claim("d", "A lower", "T", "loss", ("A", "B"), op="<", bound=0)
    v = evaluate(c, {"A": {0: 1.0, 2: 1.0, 3: 1.1}, "B": {0: 2.0, 1: 2.0, 2: 2.1, 3: 2.0}})
    assert v.n == 3 and v.failed == 0 and v.runs == 6 and "1 seed(s) not run on every arm" in v.note
    assert v.verdict == HOLDS


def test_value_claim_and_table():
    c = Claim("v", "beats baseline", "T", "gain", ("A",), quantity="value", op=">", bound=0)
    v = evaluate(c, {"A": [0.5, 0.6, 0.55]})
    df = table([v])
    assert v.verdict == HOLDS and list(df.claim) == ["v"] and df.n.item() == 3 and "gain: A > 0" in v.target


@pytest.mark.parametrize("kw, match", [
    (dict(kind="nope"), "Invalid kind"), (dict(quantity="log"), "Invalid quantity"), (dict(op="<="), "Invalid op"),
    (dict(arms=("A",)), "exactly 2 arm"), (dict(quantity="ratio", bound=0.0), "ratio > 0"),
    (dict(op="between", bound=0.0, margin_reason="r"), "half-width"),
    (dict(kind="monotone", arms=("A",)), "ordered arms"),
    (dict(op="between", bound=0.1), "Invalid margin_reason: '' for 'between' claim 'x'"),
    (dict(op="between", bound=0.1, margin_reason="  "), "Invalid margin_reason"),
])
def test_bad_claims_are_refused_with_the_value(kw, match):
    args = dict(id="x", statement="s", source="T", metric="m", arms=("A", "B")) | kw
    with pytest.raises(ValueError, match=match):
        Claim(**args)


def test_unknown_arm_names_the_measured_ones():
    c = Claim("x", "s", "T", "m", ("A", "C"))
    with pytest.raises(KeyError, match="measured arms"):
        evaluate(c, pair([1.0], [1.0]))


# ------------------------------------------------------------------------------------------ failed runs count
def test_a_failed_run_counts_at_the_worst_value_of_all_arms_when_lower_is_better():
    # A's seed 1 failed; the worst (highest) loss anywhere in the metric's measurements is C's 5.0
    c = Claim("f", "A lower", "T", "loss", ("A", "B"), op="<", bound=0)
    m = {"A": {0: 1.0, 1: None, 2: 1.1}, "B": {0: 2.0, 1: 2.1, 2: 2.0}, "C": {0: 5.0, 1: 3.0, 2: float("nan")}}
    v = evaluate(c, m)
    assert (v.n, v.failed, v.runs) == (3, 1, 6)  # not dropped: n is the seeds run
    assert v.estimate == pytest.approx(np.mean([1.0 - 2.0, 5.0 - 2.1, 1.1 - 2.0]))  # not the best value (1.0)
    assert v.verdict == UNRESOLVED and v.reason == "1 of 6 runs failed"
    assert "1 of 6 runs failed (A seed 1), counted at the worst value of the metric" in v.note and "(5)" in v.note
    assert "(1 of 6 runs failed)" in sentence(v)


def test_a_failed_run_counts_at_the_lowest_value_when_higher_is_better():
    c = Claim("acc", "A more accurate", "T", "accuracy", ("A", "B"), op=">", bound=0, lower_is_better=False)
    m = {"A": {0: 0.80, 1: float("nan"), 2: 0.82}, "B": {0: 0.70, 1: 0.71, 2: float("inf")}, "C": {0: 0.10}}
    v = evaluate(c, m)
    assert (v.n, v.failed, v.runs) == (3, 2, 6)
    assert v.estimate == pytest.approx(np.mean([0.80 - 0.70, 0.10 - 0.71, 0.82 - 0.10]))
    assert "A seed 1, B seed 2" in v.note and "(0.1)" in v.note and v.reason == "2 of 6 runs failed"


def test_a_failed_run_is_evidence_not_silently_dropped():
    # without its failed seed A would be "no worse than B" (holds); the failure, counted at the worst loss
    # (C's 3.0), leaves the claim unresolved with that reason
    c = Claim("g", "A no worse than B", "T", "loss", ("A", "B"), op="<", bound=0.5, margin_reason="half a nat")
    m = {"A": [1.0, 1.02, 0.99, 1.01, None], "B": [1.0] * 5, "C": [3.0]}
    assert evaluate(c, {**m, "A": m["A"][:4], "B": m["B"][:4]}).verdict == HOLDS
    v = evaluate(c, m)
    assert v.n == 5 and v.failed == 1 and v.runs == 10 and v.estimate == pytest.approx((0.02 - 0.01 + 0.01 + 2) / 5)
    assert v.verdict == UNRESOLVED and v.reason == "1 of 10 runs failed"
    mono = Claim("m", "loss falls", "T", "loss", ("B", "A"), kind="monotone", op="<", bound=0)
    assert evaluate(mono, m).failed == 1
    opt = Claim("o", "best inside", "T", "loss", ("B", "A", "C"), kind="interior_optimum", op=">", bound=0)
    assert evaluate(opt, {**m, "C": [3.0] * 5}).failed == 1


def test_every_run_failed_is_unresolved_with_that_reason():
    c = Claim("e", "A lower", "T", "loss", ("A", "B"), op="<", bound=0)
    v = evaluate(c, {"A": [None, None], "B": [float("nan"), None]})
    assert v.verdict == UNRESOLVED and v.reason == "every run failed" and (v.n, v.failed, v.runs) == (2, 4, 4)
    assert reason_kind(v.reason) == "runs failed"


def test_a_ratio_whose_failed_run_would_be_worth_zero_is_unresolved_and_says_why():
    c = Claim("r", "A within 5 %", "T", "accuracy", ("A", "B"), quantity="ratio", op=">", bound=0.95,
              lower_is_better=False, margin_reason="m")
    v = evaluate(c, {"A": [None, 0.5, 0.5], "B": [0.4, 0.5, 0.5], "C": [0.0, 0.0, 0.0]})
    assert v.verdict == UNRESOLVED and "not positive" in v.reason and v.failed == 1


# ----------------------------------------------------------------------------------- why a verdict is unresolved
def test_seeds_needed_by_hand():
    # q = 0.1, 0.2, 0.3: mean 0.2 (distance 0.2 from the bound 0), sd 0.1.
    # n = 3: t(0.975, 2) = 4.303 -> half-width 4.303 * 0.1 / sqrt(3) = 0.248 > 0.2 (unresolved now);
    # n = 4: t(0.975, 3) = 3.182 -> 3.182 * 0.1 / 2 = 0.159 < 0.2. So 4 seeds.
    q = [0.1, 0.2, 0.3]
    assert seeds_needed(q, ">", 0.0) == 4 and seeds_needed(q, "<", 0.0) == 4
    assert seeds_needed(np.exp(q), ">", 1.0, ratio=True) == 4  # log units for ratios
    # between (-0.2, 0.2), mean 0.1, sd 0.05: nearer edge 0.1 away; n = 3: 4.303 * 0.05 / 1.732 = 0.124 > 0.1;
    # n = 4: 3.182 * 0.05 / 2 = 0.080 < 0.1
    assert seeds_needed([0.05, 0.15, 0.10], "between", 0.2) == 4
    assert seeds_needed([-0.05, -0.15, -0.10], "between", 0.2) == 4  # the nearer edge is -0.2, not 0.2
    assert seeds_needed(np.exp([-0.05, -0.15, -0.10]), "between", math.exp(0.2), ratio=True) == 4
    assert seeds_needed([-0.1, 0.1, 0.0], ">", 0.0) is None  # the mean is on the bound
    c = Claim("u", "A higher", "T", "m", ("A",), quantity="value", op=">", bound=0)
    v = evaluate(c, {"A": q})
    assert v.verdict == UNRESOLVED and v.reason == ("too few seeds for this effect: about 4 seeds would resolve "
                                                    "it at the observed effect and spread")
    assert reason_kind(v.reason) == "too few seeds" and v.reason in sentence(v)


def test_an_effect_at_the_bound_is_no_effect_at_this_scale_and_one_seed_says_so():
    c = Claim("u", "A higher", "T", "m", ("A",), quantity="value", op=">", bound=0)
    v = evaluate(c, {"A": [-0.1, 0.12, 0.0]})  # mean 0.0067, sd 0.11: hundreds of seeds
    assert v.reason.startswith("no effect at this scale") and reason_kind(v.reason) == "no effect at this scale"
    assert evaluate(c, {"A": [0.3]}).reason == "one seed"
    assert evaluate(c, {"A": [0.3, 0.31, 0.32]}).reason == ""  # a firm verdict has no reason


def test_a_monotone_claims_reason_comes_from_its_weakest_step():
    c = Claim("mono", "falls", "F", "loss", ("a", "b", "c"), kind="monotone", op="<", bound=0)
    m = {"a": [3.0, 3.0, 3.0], "b": [2.0, 2.01, 1.99], "c": [1.9, 1.8, 1.7]}  # b -> c: -0.1, -0.21, -0.29
    v = evaluate(c, m)
    assert v.verdict == UNRESOLVED and "b -> c" in v.note
    assert v.reason == (f"too few seeds for this effect: about {seeds_needed([-0.1, -0.21, -0.29], '<', 0)} seeds "
                        "would resolve it at the observed effect and spread")


# ------------------------------------------------------------------------------------------------- direction
def test_direction_names_the_better_arm_by_the_metrics_direction():
    a, b = [1.0, 1.1, 0.9], [2.0, 2.0, 2.0]
    loss = Claim("l", "A no worse", "T", "loss", ("galore", "adamw"), op="<", bound=0.1, margin_reason="m")
    v = evaluate(loss, {"galore": a, "adamw": b})
    assert v.verdict == HOLDS and v.direction == "galore better than adamw"
    acc = Claim("a", "A no worse", "T", "accuracy", ("galore", "adamw"), op="<", bound=0.1, lower_is_better=False,
                margin_reason="m")
    assert evaluate(acc, {"galore": a, "adamw": b}).direction == "adamw better than galore"
    tie = evaluate(loss, {"galore": [1.0, 2.0, 3.0], "adamw": [2.0, 1.0, 3.0]})
    assert tie.direction == "galore and adamw indistinguishable"
    assert evaluate(loss, {"galore": [1.0], "adamw": [2.0]}).direction == ""  # one seed: no interval, no direction
    # a one-sided non-inferiority that holds because A is far better shows it, in the row and the sentence
    ratio = Claim("p", "A on perplexity no worse", "T", "val_ppl", ("A", "B"), quantity="ratio", op="<",
                  bound=MARGINS["perplexity"][0], margin_reason=MARGINS["perplexity"][1])
    v = evaluate(ratio, {"A": [0.74, 0.75, 0.73], "B": [1.0, 1.0, 1.0]})
    assert v.verdict == HOLDS and v.direction == "A better than B" and table([v]).direction.item() == v.direction
    assert "; A better than B" in sentence(v) and "(margin: 5 % in perplexity)" in sentence(v)
    worse = evaluate(ratio, {"A": [1.2, 1.21, 1.19], "B": [1.0, 1.0, 1.0]})
    assert worse.direction == "B better than A"
    value = Claim("v", "positive", "T", "m", ("A",), quantity="value", op=">", bound=0)
    assert evaluate(value, {"A": [1.0, 1.1, 1.2]}).direction == ""


# ---------------------------------------------------------------------------------- flags, rows and records
def test_flags_reach_every_verdict_comparing_a_flagged_arm_only():
    claims = [Claim("ab", "s", "T", "loss", ("A", "B")), Claim("cb", "s", "T", "loss", ("C", "B")),
              Claim("mono", "s", "T", "loss", ("C", "B", "A"), kind="monotone")]
    m = {"A": [1.0, 1.1], "B": [2.0, 2.1], "C": [3.0, 3.1]}
    flags = {"A": "A: lr 0.04 at the top of its grid (still improving)"}
    ab, cb, mono = evaluate_all(claims, lambda metric: m, flags=flags)
    assert ab.flags == [flags["A"]] and cb.flags == [] and mono.flags == [flags["A"]]
    assert table([ab, cb])["flags"].tolist() == [flags["A"], ""]
    assert "flags: A: lr 0.04 at the top" in sentence(ab)
    assert evaluate_all(claims, lambda metric: m)[0].flags == []


def test_rows_and_records_carry_the_new_fields():
    c = Claim("bytes", "fewer bytes", "Table 1", "state_bytes", ("A", "B"), quantity="ratio", op="<", bound=1,
              accounting=True, paper=0.6, paper_source="Table 1, 60M")
    v = evaluate(c, {"A": [60.0] * 3, "B": [100.0] * 3}, flags={"B": "B flagged"})
    row = table([v]).iloc[0].to_dict()
    assert {k: row[k] for k in ("accounting", "failed", "runs", "reason", "direction", "flags", "margin_reason",
                                "paper_source")} == {"accounting": True, "failed": 0, "runs": 6, "reason": "",
                                                     "direction": "A better than B", "flags": "B flagged",
                                                     "margin_reason": "", "paper_source": "Table 1, 60M"}
    rec = to_records([v])[0]
    assert rec["accounting"] is True and rec["flags"] == ["B flagged"] and rec["paper_source"] == "Table 1, 60M"
    assert rec["runs"] == 6 and rec["direction"] == "A better than B"
    s = sentence(v)
    assert "paper: 0.6 (Table 1, 60M)" in s and "[accounting" in s


def test_a_read_out_constant_across_every_arm_is_flagged():
    """An instability count that is 0 in every run measures nothing: the verdict says so in its flags."""
    from lrkit.claims import CONSTANT_READOUT

    c = Claim("c", "s", "src", "spikes", ("a", "b"), op="<", bound=1.0)
    flat = {"a": {0: 0.0, 1: 0.0}, "b": {0: 0.0, 1: 0.0}, "c": {0: 0.0}}
    assert evaluate(c, flat).flags == [CONSTANT_READOUT]
    moving = {"a": {0: 0.0, 1: 0.0}, "b": {0: 0.0, 1: 0.0}, "c": {0: 2.0}}  # another arm moves: it can
    assert evaluate(c, moving).flags == []
    one_arm = Claim("v", "s", "src", "rank_error", ("a",), quantity="value", op="<", bound=1.0)
    assert evaluate(one_arm, {"a": {0: 0.0, 1: 0.0, 2: 0.0}}).flags == []  # one arm's exact result is a result
