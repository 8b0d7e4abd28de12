"""The verdict rule (lrkit.claims.evaluate), table-driven: every kind x quantity x op, each with an interval
wholly on the claim's side, wholly on the other side (both sides for "between"), straddling, and touching the
bound, with the verdict and estimate written by hand. Then a property: a ratio claim and the same claim on the
logs of its values (a difference claim with bound log b) give the same verdict and interval.

Per seed the quantity is q = m + d * (-1, 0, 1) (n = 3): mean m, sd d, so the t interval is m +- 2.484 d
(t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321); for ratios the same on log q."""
import math

import numpy as np
import pytest

from lrkit.claims import CONTRADICTED, HOLDS, UNRESOLVED, Claim, evaluate

H, C, U = HOLDS, CONTRADICTED, UNRESOLVED
SEEDS = (0, 1, 2)


def q3(m, d):
    return [m - d, m, m + d]


def lin(m, d):  # additive quantities
    return q3(m, d)


def rat(m, d):  # ratios: log q = log m + d * (-1, 0, 1)
    return [math.exp(v) for v in q3(math.log(m), d)]


def measurements(kind, quantity, qs):
    """Arm values that give the per-seed quantity ``qs`` (one list per compared pair for monotone)."""
    base = [2.0, 3.0, 4.0]  # B differs by seed: the rule must pair by seed
    if kind == "compare":
        if quantity == "value":
            return {"A": dict(zip(SEEDS, qs))}
        a = [b + q for b, q in zip(base, qs)] if quantity == "difference" else [b * q for b, q in zip(base, qs)]
        return {"A": dict(zip(SEEDS, a)), "B": dict(zip(SEEDS, base))}
    if kind == "monotone":  # qs: (step 1, step 2)
        arms, cur = {"a0": dict(zip(SEEDS, base))}, base
        for k, step in enumerate(qs, 1):
            cur = [c + s for c, s in zip(cur, step)] if quantity == "difference" else [c * s for c, s in zip(cur, step)]
            arms[f"a{k}"] = dict(zip(SEEDS, cur))
        return arms
    # interior optimum, lower is better: both ends at ends(best, q), the middle arm the best interior one
    mid = base
    ends = [b + q for b, q in zip(mid, qs)] if quantity == "difference" else [b * q for b, q in zip(mid, qs)]
    far = [e + 100 for e in ends] if quantity == "difference" else [e * 100 for e in ends]
    return {"e0": dict(zip(SEEDS, ends)), "mid": dict(zip(SEEDS, mid)), "e1": dict(zip(SEEDS, far))}


ARMS = {"compare": {"value": ("A",), "difference": ("A", "B"), "ratio": ("A", "B")},
        "monotone": ("a0", "a1", "a2"), "interior_optimum": ("e0", "mid", "e1")}

# (kind, quantity, op, bound, qs, verdict, estimate); qs is a list (one per seed) or, for monotone, two lists
CASES = []
for quantity, f, bound, inside, outside, far_out in (
        ("value", lin, 0.0, -5.0, 5.0, None), ("difference", lin, 0.0, -5.0, 5.0, None),
        ("ratio", rat, 1.1, 0.5, 2.0, None)):
    for kind in ("compare",) if quantity == "value" else ("compare", "interior_optimum"):
        small = 0.01
        CASES += [
            (kind, quantity, "<", bound, f(inside, small), H, inside),
            (kind, quantity, "<", bound, f(outside, small), C, outside),
            (kind, quantity, "<", bound, f(bound if quantity != "ratio" else bound, 1.0 if quantity != "ratio" else 0.1),
             U, bound),  # straddles
            (kind, quantity, "<", bound, [bound] * 3, U, bound),  # touching: a point interval on the bound
            (kind, quantity, ">", bound, f(outside, small), H, outside),
            (kind, quantity, ">", bound, f(inside, small), C, inside),
            (kind, quantity, ">", bound, [bound] * 3, U, bound),
            (kind, quantity, ">", bound, f(bound, 1.0 if quantity != "ratio" else 0.1), U, bound),  # straddles
        ]
# equivalence bands: (-1, 1) for additive quantities, (1/1.05, 1.05) for ratios
for kind in ("compare", "interior_optimum"):
    for quantity in ("value", "difference", "ratio"):
        if kind != "compare" and quantity == "value":
            continue
        f, b, centre, lo_out, hi_out, edge = ((rat, 1.05, 1.0, 0.5, 2.0, 1.05) if quantity == "ratio"
                                              else (lin, 1.0, 0.0, -5.0, 5.0, 1.0))
        CASES += [
            (kind, quantity, "between", b, f(centre, 0.001), H, centre),
            (kind, quantity, "between", b, f(lo_out, 0.001), C, lo_out),  # wholly below the band
            (kind, quantity, "between", b, f(hi_out, 0.001), C, hi_out),  # wholly above it
            (kind, quantity, "between", b, f(edge, 0.001 if quantity == "ratio" else 0.01), U, edge),  # straddles
            (kind, quantity, "between", b, [edge] * 3, U, edge),  # touching the upper edge
            (kind, quantity, "between", b, [1 / edge if quantity == "ratio" else -edge] * 3, U,
             1 / edge if quantity == "ratio" else -edge),  # touching the lower edge
        ]
# monotone: two steps; the weakest step stands for the claim
for quantity, f, bound, good, bad, centre, band in (("difference", lin, 0.0, -5.0, 5.0, 0.0, 1.0),
                                                    ("ratio", rat, 1.1, 0.5, 2.0, 1.0, 1.05)):
    s = 0.01
    CASES += [
        ("monotone", quantity, "<", bound, (f(good, s), f(good * 0.5 if quantity == "difference" else 0.8, s)), H,
         good * 0.5 if quantity == "difference" else 0.8),  # both steps hold; the weaker one is the estimate
        ("monotone", quantity, "<", bound, (f(good, s), f(bad, s)), C, bad),  # any reversed step contradicts
        ("monotone", quantity, "<", bound, (f(good, s), [bound] * 3), U, bound),  # one step touches the bound
        ("monotone", quantity, ">", bound, (f(bad, s), f(bad, s)), H, bad),
        ("monotone", quantity, ">", bound, (f(bad, s), f(good, s)), C, good),
        ("monotone", quantity, ">", bound, (f(bad, s), [bound] * 3), U, bound),
        ("monotone", quantity, ">", bound, (f(bad, s), f(bound, 0.1)), U, bound),  # a straddling step
        ("monotone", quantity, "between", band, (f(centre, 0.001), [band] * 3), U, band),
        ("monotone", quantity, "between", band, (f(centre, 0.001), f(centre, 0.001)), H, centre),
        ("monotone", quantity, "between", band, (f(centre, 0.001), f(good if quantity == "ratio" else -5.0, 0.001)),
         C, good if quantity == "ratio" else -5.0),  # a step wholly below the band
    ]


def _id(case):
    kind, quantity, op, bound, _, verdict, est = case
    return f"{kind}-{quantity}-{op}{bound:g}-{verdict.split()[0]}-{est:.3g}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_verdict_and_estimate_by_hand(case):
    kind, quantity, op, bound, qs, verdict, estimate = case
    arms = ARMS[kind][quantity] if kind == "compare" else ARMS[kind]
    claim = Claim("c", "s", "src", "m", arms, quantity=quantity, op=op, bound=bound, kind=kind,
                  margin_reason="test" if op == "between" else "")
    v = evaluate(claim, measurements(kind, quantity, qs))
    assert v.verdict == verdict
    assert v.estimate == pytest.approx(estimate, rel=1e-9, abs=1e-12)
    assert v.n == 3 and v.low <= v.estimate <= v.high


def test_the_table_covers_every_kind_quantity_and_op():
    seen = {(k, q, o) for k, q, o, *_ in CASES}
    want = {(k, q, o) for k in ("compare", "monotone", "interior_optimum") for q in ("value", "difference", "ratio")
            for o in ("<", ">", "between") if not (k != "compare" and q == "value")}
    assert seen == want
    for combo in want:  # each combination reaches all three verdicts
        assert {c[5] for c in CASES if c[:3] == combo} == {H, C, U}, combo


def test_the_interval_half_width_is_students_t_by_hand():
    claim = Claim("c", "s", "src", "m", ("A",), quantity="value", op="<", bound=0.0)
    v = evaluate(claim, {"A": dict(zip(SEEDS, q3(-5.0, 1.0)))})
    assert (v.estimate - v.low, v.high - v.estimate) == pytest.approx((2.48414, 2.48414), abs=1e-5)


def test_a_ratio_claim_equals_the_same_claim_on_logs():
    """Property (400 seeded random cases): ratio claim on (A, B) with bound b == difference claim on
    (log A, log B) with bound log b, for compare and monotone claims and every op: same verdict, and the
    ratio's estimate and interval are the exponentials of the difference's."""
    rng = np.random.default_rng(0)
    for _ in range(400):
        kind = rng.choice(["compare", "monotone"])
        op = rng.choice(["<", ">", "between"])
        n = int(rng.integers(2, 6))
        seeds = list(range(n))
        k = 2 if kind == "compare" else 3
        arms = ("A", "B") if kind == "compare" else ("a0", "a1", "a2")
        vals = np.exp(rng.normal(0, 0.1, size=(k, n)) + rng.normal(0, 0.05, size=(k, 1)))
        b = float(np.exp(abs(rng.normal(0, 0.05))) + (1e-3 if op == "between" else 0.0))
        if op != "between" and rng.random() < 0.5:
            b = 1 / b
        ratio = Claim("r", "s", "src", "m", arms, quantity="ratio", op=op, bound=b, kind=kind, margin_reason="t")
        logs = Claim("d", "s", "src", "m", arms, quantity="difference", op=op, bound=math.log(b), kind=kind,
                     margin_reason="t")
        mr = {a: dict(zip(seeds, vals[i])) for i, a in enumerate(arms)}
        ml = {a: dict(zip(seeds, np.log(vals[i]))) for i, a in enumerate(arms)}
        vr, vl = evaluate(ratio, mr), evaluate(logs, ml)
        assert vr.verdict == vl.verdict, (kind, op, b, vals)
        for x, y in ((vr.estimate, vl.estimate), (vr.low, vl.low), (vr.high, vl.high)):
            assert math.log(x) == pytest.approx(y, rel=1e-9, abs=1e-12)
