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
2. **Failed runs count.** A run that failed, diverged or ended as a constant predictor has no finite
   value (its reader gives None, nan or inf). It is never dropped: it counts as the *worst* finite value of
   the claim's metric among every arm and seed measured for it (the highest when the metric's
   ``lower_is_better``, else the lowest), so a method whose runs fail is charged for them. The verdict's
   ``failed`` says how many of its ``runs`` were counted so, and its note names them and the value used.
   If no run of the metric has a finite value the claim is unresolved ("every run failed"); a ratio claim
   whose worst value is not positive is unresolved too (a ratio needs positive values). Only a seed that
   an arm was never run on (absent from its measurements) is left out of the pairing, and the note says so.
3. The 95 % interval is Student's t interval of the mean of q across seeds (df = n - 1); a ratio's
   interval is taken on log q and mapped back. Why t and not a bootstrap: with 3 to 5 seeds a bootstrap
   interval is too narrow (it can only resample the few values seen), while the t interval is exact for
   normal errors and conservative enough for this n.
4. Verdict: **holds** when the whole interval lies strictly on the claimed side of the bound
   (``op`` "<" or ">"; for "between", strictly inside (-bound, bound), or (1/bound, bound) for ratios:
   an equivalence test); **contradicted** when the whole interval lies strictly on the other side (for
   "between": entirely outside); otherwise **unresolved at this scale**. An interval that touches the bound
   is unresolved. With one seed there is no interval: always unresolved. With zero spread the interval is
   the point. ``monotone`` holds when every adjacent step holds and is contradicted when any step is
   contradicted; the weakest step stands for the claim.
5. An unresolved verdict says why (``Verdict.reason``): "one seed"; "k of n runs failed" when failed runs
   are among its evidence; else, from the observed mean and spread of q, the smallest n at which the t
   interval's half-width would be below the distance d of the mean from the bound (quantity units, log
   for ratios; for "between" the distance to the nearer edge of the band; the weakest step of a monotone
   claim): "too few seeds for this effect" with that n when it is at most :data:`MAX_SEEDS`, else "no
   effect at this scale" (the estimate sits at the bound).
6. A compare claim on a difference or ratio also states its ``direction``: which arm is better (by the
   metric's ``lower_is_better``) when the 95 % interval excludes no difference (0, or 1 for a ratio), else
   that the two are indistinguishable (nothing with one seed, which has no interval); so a one-sided "no
   worse than" that holds because A is much better shows it.
7. No correction for the many claims tested per notebook: each verdict is a 95 % statement on its own.
   Claims marked ``accounting`` (byte counts, analytic FLOPs, formula identities) get verdicts by the same
   rule but are bookkeeping, not reproduced results: reports show them apart and leave them out of the
   tally.

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
MAX_SEEDS = 50  # an unresolved claim that would need more seeds than this shows "no effect at this scale"
# Why a verdict is unresolved (the start of ``Verdict.reason``), the categories the reports tally.
REASON_KINDS = {"one seed": "one seed", "every run failed": "runs failed", "too few seeds": "too few seeds",
                "no effect at this scale": "no effect at this scale"}

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
        if self.op == "between" and not str(self.margin_reason).strip():
            raise ValueError(f"Invalid margin_reason: {self.margin_reason!r} for 'between' claim {self.id!r} "
                             f"(expected why the equivalence margin is {self.bound!r}; see lrkit.claims.MARGINS)")

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
                "ci95_low": self.low, "ci95_high": self.high, "n": self.n, "failed": self.failed, "runs": self.runs,
                "direction": self.direction, "reason": self.reason, "tested": self.target, "paper": self.paper,
                "paper_source": self.paper_source, "source": self.source, "statement": self.statement,
                "note": self.note, "flags": "; ".join(self.flags), "accounting": self.accounting,
                "margin_reason": self.margin_reason}


def reason_kind(reason: str) -> str:
    """The category of an unresolved verdict's reason, as the reports tally it: "one seed", "runs failed",
    "too few seeds", "no effect at this scale" (or "reason not recorded" for records made before reasons)."""
    if not reason:
        return "reason not recorded"
    for start, kind in REASON_KINDS.items():
        if reason.startswith(start):
            return kind
    return "runs failed" if "runs failed" in reason else "other"


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


def _finite(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _per_seed(values) -> dict:
    return dict(values) if isinstance(values, dict) else dict(enumerate(values))


def _sorted(seeds) -> list:
    try:
        return sorted(seeds)
    except TypeError:  # seeds of mixed kinds: a stable order all the same
        return sorted(seeds, key=str)


def _paired(measurements: dict, arms, lower_is_better: bool = True):
    """The failed-runs rule applied to ``measurements`` for ``arms``: (seeds every arm was run on, each arm's
    values on them in seed order with every failed run replaced by the worst finite value, the failed runs
    as (arm, seed), that worst value (None when no run of any arm has a finite value), how many seeds some
    arm was never run on)."""
    missing = [a for a in arms if a not in measurements]
    if missing:
        raise KeyError(f"no measurements for arm(s) {missing}; measured arms: {sorted(measurements)}")
    per = {a: _per_seed(m) for a, m in measurements.items()}
    finite = [float(x) for vals in per.values() for x in vals.values() if _finite(x)]
    worst = (max if lower_is_better else min)(finite) if finite else None
    seeds = _sorted(set.intersection(*(set(per[a]) for a in arms)))
    absent = len(set().union(*(set(per[a]) for a in arms))) - len(seeds)
    failed = [(a, s) for a in arms for s in seeds if not _finite(per[a][s])]
    fill = float("nan") if worst is None else worst
    values = {a: np.array([float(per[a][s]) if _finite(per[a][s]) else fill for s in seeds], dtype=float)
              for a in arms}
    return seeds, values, failed, worst, absent


def _quantity(claim: Claim, a: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    if claim.quantity == "value":
        return a
    return a - b if claim.quantity == "difference" else a / b


def _units(q: np.ndarray, ratio: bool) -> np.ndarray:
    return np.log(q) if ratio else np.asarray(q, dtype=float)


def seeds_needed(q, op: str, bound: float, ratio: bool = False, max_seeds: int = MAX_SEEDS) -> int | None:
    """The smallest number of seeds n (2 <= n <= ``max_seeds``) at which the t interval's half-width,
    t(0.975, n-1) * sd / sqrt(n) with the observed sd of ``q``, falls below the distance of the observed
    mean from ``bound`` (log units for a ratio; for "between" the distance to the nearer edge of the band);
    None when even ``max_seeds`` would not do (or the mean sits on the bound, or there is no spread to
    extrapolate from: fewer than two values)."""
    x = _units(np.asarray(q, dtype=float), ratio)
    if len(x) < 2:
        return None
    b = math.log(bound) if ratio else float(bound)
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    d = abs(b - abs(mean)) if op == "between" else abs(mean - b)
    if not d > 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, max_seeds + 1):
        if stats.t.ppf(0.5 + LEVEL / 2, n - 1) * sd / math.sqrt(n) < d:
            return n
    return None


def _reason(verdict: str, n: int, failed: int, runs: int, q, claim: Claim) -> str:
    """Why a verdict is unresolved (rule 5 of the module docstring); "" for a firm verdict."""
    if verdict != UNRESOLVED:
        return ""
    if n == 0:
        return "no seed was run on every arm"
    if n < 2:
        return "one seed"
    if failed:
        return f"{failed} of {runs} runs failed"
    need = seeds_needed(q, claim.op, claim.bound, claim.quantity == "ratio")
    if need is not None:
        return (f"too few seeds for this effect: about {need} seeds would resolve it at the observed effect "
                "and spread")
    return f"no effect at this scale: the estimate sits at the bound (> {MAX_SEEDS} seeds would be needed)"


def _direction(claim: Claim, low: float, high: float) -> str:
    """Which arm the interval favours, by the metric's direction (rule 6); "" for claims on one arm."""
    if claim.kind != "compare" or claim.quantity == "value":
        return ""
    a, b = claim.arms
    if math.isnan(low) or math.isnan(high):  # one seed: no interval, no direction to state
        return ""
    null = 1.0 if claim.quantity == "ratio" else 0.0
    if high < null:
        lower, higher = a, b
    elif low > null:
        lower, higher = b, a
    else:
        return f"{a} and {b} indistinguishable"
    better, worse = (lower, higher) if claim.lower_is_better else (higher, lower)
    return f"{better} better than {worse}"


def _flags(claim: Claim, flags: dict | None) -> list:
    out = []
    for arm in claim.arms:
        text = (flags or {}).get(arm)
        if text and text not in out:
            out.append(str(text))
    return out


CONSTANT_READOUT = "read-out constant across every arm and seed of this notebook: it measures nothing here"


def _constant(measurements: dict) -> list:
    """[:data:`CONSTANT_READOUT`] when the metric takes one value on every run of two or more arms (a read-out
    that cannot move, e.g. an instability count that is 0 everywhere), else []."""
    vals = [float(x) for m in measurements.values() for x in (m.values() if isinstance(m, dict) else m)
            if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]
    return [CONSTANT_READOUT] if len(measurements) >= 2 and len(vals) >= 2 and np.ptp(vals) == 0 else []


def evaluate(claim: Claim, measurements: dict, flags: dict | None = None) -> Verdict:
    """The verdict on ``claim`` from ``measurements``: {arm: {seed: value}} (or {arm: [values]}, paired
    by position), every arm measured for the claim's metric (the failed-runs rule takes its worst value
    among all of them). A failed run (None, nan, inf) counts at that worst value and the verdict says so;
    a seed an arm was never run on is left out. ``flags``: {arm: text}, caveats on arms (e.g. a learning
    rate at the edge of its grid) carried into the verdict of every claim comparing a flagged arm."""
    ratio = claim.quantity == "ratio"
    seeds, v, failed, worst, absent = _paired(measurements, claim.arms, claim.lower_is_better)
    n, runs = len(seeds), len(seeds) * len(claim.arms)
    notes = [f"{absent} seed(s) not run on every arm left out"] if absent else []
    if failed:
        who = ", ".join(f"{a} seed {s}" for a, s in failed)
        notes.append(f"{len(failed)} of {runs} runs failed ({who}), counted at the worst value of the metric "
                     f"among this notebook's runs ({_num(worst)})" if worst is not None
                     else f"{len(failed)} of {runs} runs failed ({who}): no run of this metric has a finite value")
    base = dict(claim=claim.id, statement=claim.statement, source=claim.source, target=claim.target,
                paper=claim.paper, quantity=claim.quantity, op=claim.op, bound=claim.bound,
                accounting=claim.accounting, margin_reason=claim.margin_reason, paper_source=claim.paper_source,
                failed=len(failed), runs=runs, flags=_flags(claim, flags) + _constant(measurements), n=n)
    nan = float("nan")

    def unresolved(reason: str) -> Verdict:
        return Verdict(verdict=UNRESOLVED, estimate=nan, low=nan, high=nan, note="; ".join(notes), reason=reason,
                       **base)

    if failed and worst is None:
        return unresolved("every run failed")
    if failed and ratio and worst <= 0:
        return unresolved(f"{len(failed)} of {runs} runs failed and the worst value of the metric ({_num(worst)}) "
                          "is not positive, so a failed run has no ratio")
    if claim.kind == "compare":
        q = _quantity(claim, v[claim.arms[0]], v[claim.arms[1]] if len(claim.arms) > 1 else None)
        est, lo, hi, _ = interval(q, log=ratio)
        verdict = _decide(lo, hi, claim.op, claim.bound, ratio)
        return Verdict(verdict=verdict, estimate=est, low=lo, high=hi, note="; ".join(notes),
                       reason=_reason(verdict, n, len(failed), runs, q, claim), direction=_direction(claim, lo, hi),
                       **base)
    if claim.kind == "monotone":
        steps, qs = [], []
        for a, b in zip(claim.arms, claim.arms[1:]):
            q = _quantity(claim, v[b], v[a])
            est, lo, hi, _ = interval(q, log=ratio)
            steps.append({"from": a, "to": b, "estimate": est, "low": lo, "high": hi,
                          "verdict": _decide(lo, hi, claim.op, claim.bound, ratio)})
            qs.append(q)
        verdicts = [s["verdict"] for s in steps]
        verdict = CONTRADICTED if CONTRADICTED in verdicts else HOLDS if all(x == HOLDS for x in verdicts) else UNRESOLVED
        # The step with the weakest evidence for the claim stands for the whole claim.
        k = max(range(len(steps)), key=lambda i: _slack(steps[i], claim.op, claim.bound, ratio))
        weakest = steps[k]
        notes.append(f"weakest step {weakest['from']} -> {weakest['to']}")
        return Verdict(verdict=verdict, estimate=weakest["estimate"], low=weakest["low"], high=weakest["high"],
                       steps=steps, note="; ".join(notes),
                       reason=_reason(verdict, n, len(failed), runs, qs[k], claim), **base)
    # interior optimum: the interior arm with the best mean against the better endpoint, per seed
    inner = claim.arms[1:-1]
    sign = 1 if claim.lower_is_better else -1
    best = min(inner, key=lambda arm: sign * np.mean(v[arm]) if len(seeds) else 0.0)
    ends = np.minimum(sign * v[claim.arms[0]], sign * v[claim.arms[-1]]) * sign
    q = (ends - v[best]) * sign if not ratio else (ends / v[best]) ** sign
    est, lo, hi, _ = interval(q, log=ratio)
    verdict = _decide(lo, hi, claim.op, claim.bound, ratio)
    notes.append(f"best interior arm: {best} (chosen by its mean, so the interval is optimistic)")
    return Verdict(verdict=verdict, estimate=est, low=lo, high=hi, note="; ".join(notes),
                   reason=_reason(verdict, n, len(failed), runs, q, claim), **base)


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


def evaluate_all(claims, measurements_for, flags: dict | None = None) -> list[Verdict]:
    """Verdicts of ``claims``; ``measurements_for(metric)`` gives {arm: {seed: value}} for a metric;
    ``flags`` {arm: text} go into the verdict of every claim whose arms include a flagged arm."""
    return [evaluate(c, measurements_for(c.metric), flags=flags) for c in claims]


def table(verdicts):
    """The verdicts as a DataFrame, one row per claim (what notebooks display and records keep)."""
    import pandas as pd

    return pd.DataFrame([v.as_row() for v in verdicts])


def sentence(v: Verdict) -> str:
    """One line per verdict, e.g. 'galore-vs-full (Table 2): HOLDS. ... Tested ...: estimate 0.96, 95% CI
    [0.94, 0.98], n=5; galore better than full-rank; paper: 1.024 (Table 2, 60M).': with the reason of an
    unresolved verdict, the margin's reason in short, the failed runs, the direction, the flags and the note."""
    ci = "no interval (one seed)" if v.n < 2 else f"95% CI [{_num(v.low)}, {_num(v.high)}]"
    verdict = v.verdict.upper() + (f" ({v.reason})" if v.reason else "")
    kind = " [accounting: bookkeeping, not a reproduced claim]" if v.accounting else ""
    margin = f" (margin: {_compact(v.margin_reason)})" if v.margin_reason else ""
    failed = f" ({v.failed} of {v.runs} runs failed)" if v.failed else ""
    direction = f"; {v.direction}" if v.direction else ""
    paper = (f"; paper: {_num(v.paper)}" + (f" ({v.paper_source})" if v.paper_source else "")
             if v.paper is not None else "")
    flags = f"; flags: {'; '.join(v.flags)}" if v.flags else ""
    note = f" ({v.note})" if v.note else ""
    return (f"{v.claim} ({v.source}): {verdict}{kind}. {v.statement} Tested {v.target}{margin}: estimate "
            f"{_num(v.estimate)}, {ci}, n={v.n}{failed}{direction}{paper}{flags}{note}.")


def _compact(reason: str, width: int = 60) -> str:
    """A margin's reason in short: up to its first colon (MARGINS' reasons start with the margin in words)."""
    head = reason.split(":", 1)[0].strip()
    return head if len(head) <= width else head[:width - 1].rstrip() + "…"


def to_records(verdicts) -> list[dict]:
    """Verdicts as plain dicts for metrics.json (``records.save_summary(..., claims=...)``)."""
    return [asdict(v) for v in verdicts]


def _num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.4g}"
