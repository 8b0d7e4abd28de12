"""Claims as data, verdicts by one rule.

A :class:`Claim` is a paper's statement made testable: which metric, which arms, what quantity is
compared with what bound. :func:`evaluate` turns per-seed measurements into a :class:`Verdict`:
**holds**, **contradicted** or **unresolved at this scale**, with the estimate, its 95 % interval and n.

The rule, written once:

1. Each claim reduces every seed to one number q (the quantity):
   ``value`` q = A; ``difference`` q = A - B; ``ratio`` q = A / B, with A and B measured on the same
   seed (same initialisation and data order where the method allows), so differences are *paired*.
   ``monotone`` claims give one q per adjacent pair of arms (arm[k+1] vs arm[k]); ``interior_optimum``
   claims give q = (best endpoint) - (best interior arm), positive when the optimum lies inside.
2. The 95 % interval is Student's t interval of the mean of q across seeds (df = n - 1); a ratio's
   interval is taken on log q and mapped back. Why t and not a bootstrap: with 3 to 5 seeds a bootstrap
   interval is too narrow (it can only resample the few values seen), while the t interval is exact for
   normal errors and conservative enough for this n.
3. Verdict: **holds** when the whole interval lies strictly on the claimed side of the bound
   (``op`` "<" or ">"; for "between", strictly inside (-bound, bound), or (1/bound, bound) for ratios);
   **contradicted** when the whole interval lies strictly on the other side (for "between": entirely
   outside); otherwise **unresolved at this scale**. An interval that touches the bound is unresolved.
   With one seed there is no interval: always unresolved. With zero spread the interval is the point.
   ``monotone`` holds when every adjacent step holds and is contradicted when any step is contradicted.
4. No correction for the many claims tested per notebook: each verdict is a 95 % statement on its own.

The rule is fixed before any result is looked at; notebooks only list claims and render verdicts.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

HOLDS, CONTRADICTED, UNRESOLVED = "holds", "contradicted", "unresolved at this scale"
KINDS = ("compare", "monotone", "interior_optimum")
QUANTITIES = ("value", "difference", "ratio")
OPS = ("<", ">", "between")
LEVEL = 0.95

# Equivalence ("on par", "tie", "matches", "near") and non-inferiority ("no worse than") margins: one scale per
# metric family across the kit, fixed before the rerun that reads them (issue 19). Claims use these bounds and
# quote the reason (``Claim.margin_reason``); a claim that needs another margin says why in its own reason.
MARGINS = {
    # language models: the ratio of two perplexities (exp of the loss difference), as Table 2 compares methods
    "perplexity": (1.05, "5 % in perplexity: twice the gap the GaLore paper calls comparable (Table 2, 60M: "
                         "GaLore / full-rank = 34.88 / 34.06 = 1.024), the kit's one margin for language models"),
    # classifiers: the difference of two accuracies or macro-F1s, as fractions (0.02 = 2 points)
    "accuracy": (0.02, "2 accuracy points: larger than every gap the papers call on par (GaLore Table 4: GLUE "
                       "averages within 0.7 points; FeDLRT: within about 1 point of FedAvg), the kit's one margin "
                       "for classifiers"),
}


@dataclass(frozen=True)
class Claim:
    """One testable statement of a paper.

    ``arms``: the measured arms it compares (names of runs without the seed): one for ``value``, two
    (A, B) for ``difference`` / ``ratio``, the knob's levels in order for ``monotone`` and
    ``interior_optimum``. ``bound``: the margin q is compared with (a ratio for ``quantity="ratio"``).
    ``lower_is_better``: the direction of the *metric* (False for accuracy, F1, scores): it orders the
    arms of ``interior_optimum`` claims, names the better arm in :attr:`Verdict.direction`, and says which
    value a failed run counts as (the failed-runs rule, :func:`evaluate`). ``paper``: the paper's own value
    of the same quantity where it reports one, for display, and ``paper_source`` the table or section it
    comes from. ``accounting``: a byte count, an analytic FLOP count or a formula identity (shown in its own
    table, never counted among the reproduced empirical claims). ``margin_reason``: why the bound is what it
    is; required for every equivalence ("between") and non-inferiority claim (see :data:`MARGINS`).
    """
    id: str
    statement: str
    source: str
    metric: str
    arms: tuple
    quantity: str = "difference"
    op: str = "<"
    bound: float = 0.0
    kind: str = "compare"
    lower_is_better: bool = True
    paper: float | None = None
    paper_source: str = ""
    accounting: bool = False
    margin_reason: str = ""

    def __post_init__(self):
        object.__setattr__(self, "arms", tuple(self.arms))
        if self.kind not in KINDS:
            raise ValueError(f"Invalid kind: {self.kind!r} for claim {self.id!r} (expected one of {KINDS})")
        if self.quantity not in QUANTITIES:
            raise ValueError(f"Invalid quantity: {self.quantity!r} for claim {self.id!r} (expected one of {QUANTITIES})")
        if self.op not in OPS:
            raise ValueError(f"Invalid op: {self.op!r} for claim {self.id!r} (expected one of {OPS})")
        need = {"value": 1, "difference": 2, "ratio": 2}[self.quantity] if self.kind == "compare" else None
        if need is not None and len(self.arms) != need:
            raise ValueError(f"Invalid arms: {self.arms!r} for claim {self.id!r} "
                             f"(a {self.quantity} claim compares exactly {need} arm(s))")
        if self.kind != "compare" and (len(self.arms) < (2 if self.kind == "monotone" else 3)
                                       or self.quantity == "value"):
            raise ValueError(f"Invalid arms: {self.arms!r} for {self.kind} claim {self.id!r} (expected at least "
                             f"{2 if self.kind == 'monotone' else 3} ordered arms and a difference or ratio)")
        if self.quantity == "ratio" and self.bound <= 0:
            raise ValueError(f"Invalid bound: {self.bound!r} for ratio claim {self.id!r} (expected a ratio > 0)")
        if self.op == "between" and (self.bound <= (1 if self.quantity == "ratio" else 0)):
            raise ValueError(f"Invalid bound: {self.bound!r} for 'between' claim {self.id!r} "
                             f"(expected a half-width > 0, or a ratio > 1)")

    @property
    def target(self) -> str:
        """The claimed inequality in words, e.g. 'A / B < 1.1'."""
        q = {"value": "{0}", "difference": "{0} - {1}", "ratio": "{0} / {1}"}[self.quantity]
        if self.kind == "monotone":
            q = "each step " + q.format("arm[k+1]", "arm[k]")
        elif self.kind == "interior_optimum":
            q = ("best endpoint - best interior" if self.lower_is_better else "best interior - best endpoint")
            q += " (ratio)" if self.quantity == "ratio" else ""
        else:
            q = q.format(*self.arms)
        q = f"{self.metric}: {q}"
        if self.op == "between":
            lo = 1 / self.bound if self.quantity == "ratio" else -self.bound
            return f"{_num(lo)} < {q} < {_num(self.bound)}"
        return f"{q} {self.op} {_num(self.bound)}"


@dataclass
class Verdict:
    claim: str
    verdict: str
    estimate: float
    low: float
    high: float
    n: int
    statement: str = ""
    source: str = ""
    target: str = ""
    paper: float | None = None
    note: str = ""
    quantity: str = "difference"
    op: str = "<"
    bound: float = 0.0
    steps: list = field(default_factory=list)  # monotone: one dict per adjacent pair
    accounting: bool = False  # bookkeeping (bytes, analytic FLOPs, formulas), not a reproduced claim
    margin_reason: str = ""  # why the bound (equivalence / non-inferiority margin)
    paper_source: str = ""  # where the paper value comes from (table or section)
    failed: int = 0  # runs of the compared arms that failed or diverged, counted by the failed-runs rule
    runs: int = 0  # runs of the compared arms (seeds x arms)
    reason: str = ""  # for an unresolved verdict: why (one seed, failed runs, too few seeds, no effect)
    direction: str = ""  # which arm the estimate favours, e.g. "galore better than full-rank"
    flags: list = field(default_factory=list)  # caveats on the inputs, e.g. a learning rate at its grid's edge

    def margin(self, x: float) -> float:
        """How far ``x`` lies on the claimed side of the bound (positive: the claim's side), in the
        quantity's units (log units for a ratio), so claims of any scale share one axis."""
        f = math.log if self.quantity == "ratio" else float
        if self.op == "<":
            return f(self.bound) - f(x)
        if self.op == ">":
            return f(x) - f(self.bound)
        return f(self.bound) - abs(f(x))

    def as_row(self) -> dict:
        return {"claim": self.claim, "verdict": self.verdict, "estimate": self.estimate,
                "ci95_low": self.low, "ci95_high": self.high, "n": self.n, "tested": self.target,
                "paper": self.paper, "source": self.source, "statement": self.statement, "note": self.note}


def interval(values, log: bool = False, level: float = LEVEL) -> tuple[float, float, float, int]:
    """(mean, low, high, n): Student's t interval of the mean; on log values (mapped back) if ``log``.
    n = 1 gives (value, nan, nan, 1); zero spread gives a zero-width interval."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if log:
        if (x <= 0).any():
            raise ValueError(f"Invalid ratio values {x.tolist()} (a ratio interval needs positive values)")
        x = np.log(x)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(x[0]) if np.ptp(x) == 0 else float(x.mean())  # identical values: exactly that value
    if n == 1:
        lo = hi = float("nan")
    else:
        half = 0.0 if np.ptp(x) == 0 else float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
        lo, hi = mean - half, mean + half
    f = math.exp if log else float
    return f(mean), (f(lo) if not math.isnan(lo) else lo), (f(hi) if not math.isnan(hi) else hi), n


def _decide(low: float, high: float, op: str, bound: float, ratio: bool) -> str:
    if math.isnan(low) or math.isnan(high):
        return UNRESOLVED
    if op == "<":
        return HOLDS if high < bound else CONTRADICTED if low > bound else UNRESOLVED
    if op == ">":
        return HOLDS if low > bound else CONTRADICTED if high < bound else UNRESOLVED
    lo_b = 1 / bound if ratio else -bound
    if lo_b < low and high < bound:
        return HOLDS
    return CONTRADICTED if (low > bound or high < lo_b) else UNRESOLVED


def _paired(measurements: dict, arms) -> tuple[list, dict]:
    """Seeds every arm has a finite value for, and each arm's values on them (in seed order)."""
    missing = [a for a in arms if a not in measurements]
    if missing:
        raise KeyError(f"no measurements for arm(s) {missing}; measured arms: {sorted(measurements)}")
    per = {a: dict(measurements[a]) if isinstance(measurements[a], dict) else dict(enumerate(measurements[a]))
           for a in arms}
    seeds = sorted(set.intersection(*(set(s for s, v in per[a].items()
                                          if v is not None and math.isfinite(v)) for a in arms)))
    return seeds, {a: np.array([per[a][s] for s in seeds], dtype=float) for a in arms}


def _quantity(claim: Claim, a: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    if claim.quantity == "value":
        return a
    return a - b if claim.quantity == "difference" else a / b


def evaluate(claim: Claim, measurements: dict) -> Verdict:
    """The verdict on ``claim`` from ``measurements``: {arm: {seed: value}} (or {arm: [values]}, paired
    by position). Seeds where any compared arm has no finite value (a diverged run) are left out and
    the note says how many."""
    ratio = claim.quantity == "ratio"
    seeds, v = _paired(measurements, claim.arms)
    total = len(set().union(*(set(dict(measurements[a]) if isinstance(measurements[a], dict)
                                   else range(len(measurements[a]))) for a in claim.arms)))
    note = f"{total - len(seeds)} seed(s) without a finite value in every arm left out" if total > len(seeds) else ""
    base = dict(claim=claim.id, statement=claim.statement, source=claim.source, target=claim.target,
                paper=claim.paper, quantity=claim.quantity, op=claim.op, bound=claim.bound)
    if claim.kind == "compare":
        q = _quantity(claim, v[claim.arms[0]], v[claim.arms[1]] if len(claim.arms) > 1 else None)
        est, lo, hi, n = interval(q, log=ratio)
        return Verdict(verdict=_decide(lo, hi, claim.op, claim.bound, ratio), estimate=est, low=lo, high=hi,
                       n=n, note=note, **base)
    if claim.kind == "monotone":
        steps = []
        for a, b in zip(claim.arms, claim.arms[1:]):
            est, lo, hi, n = interval(_quantity(claim, v[b], v[a]), log=ratio)
            steps.append({"from": a, "to": b, "estimate": est, "low": lo, "high": hi,
                          "verdict": _decide(lo, hi, claim.op, claim.bound, ratio)})
        verdicts = [s["verdict"] for s in steps]
        verdict = CONTRADICTED if CONTRADICTED in verdicts else HOLDS if all(x == HOLDS for x in verdicts) else UNRESOLVED
        # The step with the weakest evidence for the claim stands for the whole claim.
        weakest = max(steps, key=lambda s: _slack(s, claim.op, claim.bound, ratio))
        return Verdict(verdict=verdict, estimate=weakest["estimate"], low=weakest["low"], high=weakest["high"],
                       n=len(seeds), steps=steps,
                       note="; ".join(filter(None, [note, f"weakest step {weakest['from']} -> {weakest['to']}"])), **base)
    # interior optimum: the interior arm with the best mean against the better endpoint, per seed
    inner = claim.arms[1:-1]
    sign = 1 if claim.lower_is_better else -1
    best = min(inner, key=lambda arm: sign * np.mean(v[arm]) if len(seeds) else 0.0)
    ends = np.minimum(sign * v[claim.arms[0]], sign * v[claim.arms[-1]]) * sign
    q = (ends - v[best]) * sign if not ratio else (ends / v[best]) ** sign
    est, lo, hi, n = interval(q, log=ratio)
    return Verdict(verdict=_decide(lo, hi, claim.op, claim.bound, ratio), estimate=est, low=lo, high=hi, n=n,
                   note="; ".join(filter(None, [note, f"best interior arm: {best} (chosen by its mean, so "
                                                        "the interval is optimistic)"])), **base)


def _slack(step: dict, op: str, bound: float, ratio: bool) -> float:
    """How far a monotone step's interval is from holding (larger = weaker evidence)."""
    lo, hi = step["low"], step["high"]
    if math.isnan(lo):
        return math.inf
    f = math.log if ratio else float
    if op == "<":
        return f(hi) - f(bound)
    if op == ">":
        return f(bound) - f(lo)
    return max(f(hi) - f(bound), (-f(bound) if ratio else -bound) - f(lo))


def evaluate_all(claims, measurements_for) -> list[Verdict]:
    """Verdicts of ``claims``; ``measurements_for(metric)`` gives {arm: {seed: value}} for a metric."""
    return [evaluate(c, measurements_for(c.metric)) for c in claims]


def table(verdicts):
    """The verdicts as a DataFrame, one row per claim (what notebooks display and records keep)."""
    import pandas as pd

    return pd.DataFrame([v.as_row() for v in verdicts])


def sentence(v: Verdict) -> str:
    """One line per verdict, e.g. 'galore-vs-full (Table 2): holds; GaLore/full ... 0.96 [0.94, 0.98], n=5'."""
    ci = "no interval (one seed)" if v.n < 2 else f"95% CI [{_num(v.low)}, {_num(v.high)}]"
    paper = f"; paper: {_num(v.paper)}" if v.paper is not None else ""
    note = f" ({v.note})" if v.note else ""
    return (f"{v.claim} ({v.source}): {v.verdict.upper()}. {v.statement} Tested {v.target}: estimate "
            f"{_num(v.estimate)}, {ci}, n={v.n}{paper}{note}.")


def to_records(verdicts) -> list[dict]:
    """Verdicts as plain dicts for metrics.json (``records.save_summary(..., claims=...)``)."""
    return [asdict(v) for v in verdicts]


def _num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.4g}"
