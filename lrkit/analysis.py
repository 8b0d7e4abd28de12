"""Numbers the ablations read off run histories: loss spikes and rises, jumps at subspace switches, steps to a
target. Pure functions of a RunResult's history, so they are tested on hand-made histories."""
from __future__ import annotations

import numpy as np


def train_curve(result) -> tuple[np.ndarray, np.ndarray]:
    """(steps, train losses) of the logged rows; a diverged run's last row (loss None) is dropped."""
    rows = [r for r in result.history if r.get("train_loss") is not None]
    return np.array([r["step"] for r in rows]), np.array([r["train_loss"] for r in rows], dtype=float)


def loss_spikes(result, window: int = 10, threshold: float = 0.1) -> int:
    """How many logged points exceed the minimum of the previous ``window`` points by more than
    ``threshold`` (nats): transient instabilities, as opposed to slow drift."""
    _, loss = train_curve(result)
    return int(sum(loss[i] - loss[max(0, i - window): i].min() > threshold for i in range(1, len(loss))))


def jump_at(result, steps, window: int = 3) -> float:
    """Mean change in logged train loss across the given steps: the mean of the ``window`` points just
    after each step minus the mean of the ``window`` points just before it (nan if none fits)."""
    s, loss = train_curve(result)
    jumps = []
    for t in steps:
        before, after = loss[(s <= t)][-window:], loss[(s > t)][:window]
        if len(before) == window and len(after) == window:
            jumps.append(after.mean() - before.mean())
    return float(np.mean(jumps)) if jumps else float("nan")


def steps_to(result, target: float, metric: str = "val_loss") -> int | None:
    """First logged step at which ``metric`` is at or below ``target``; None if never."""
    for r in result.history:
        if r.get(metric) is not None and r[metric] <= target:
            return r["step"]
    return None


# --- convergence speed that every arm can be scored on (issue 9, sections 4 and 5) ---------------------
def curve(result, metric: str = "val_loss", x: str = "tokens") -> tuple[np.ndarray, np.ndarray]:
    """(x, metric) of the history rows that logged ``metric`` (finite values only). ``x="tokens"`` is the
    step times the run's batch size and sequence length (``config``), so arms of one notebook share it."""
    rows = [r for r in result.history if r.get(metric) is not None and np.isfinite(r[metric])]
    if x == "tokens":
        steps = np.array([r["step"] for r in rows], dtype=float)
        xs = steps * result.config["batch_size"] * result.config["seq_len"]
    else:
        xs = np.array([r[x] for r in rows], dtype=float)
    return xs, np.array([r[metric] for r in rows], dtype=float)


def reachable_target(results, metric: str = "val_loss") -> float:
    """The lowest ``metric`` every run attains: the largest of the runs' best (minimum) values. Every run
    reaches it, so :func:`to_target` is defined for all of them."""
    best = [curve(r, metric)[1].min() for r in results if len(curve(r, metric)[1])]
    if not best:
        raise ValueError(f"no run logged {metric!r}")
    return float(max(best))


def to_target(result, target: float, metric: str = "val_loss", x: str = "tokens") -> float | None:
    """The ``x`` (tokens by default) at which ``metric`` first reaches ``target`` (lower is better),
    interpolated linearly between the two evaluations around the crossing; the first evaluation's ``x``
    if it is already there; None if never."""
    xs, ys = curve(result, metric, x)
    hit = np.flatnonzero(ys <= target)
    if not len(hit):
        return None
    i = int(hit[0])
    if i == 0:
        return float(xs[0])
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return float(x0 + (y0 - target) / (y0 - y1) * (x1 - x0))


def mean_over_run(result, metric: str = "val_loss", x: str = "tokens") -> float | None:
    """Area under the ``metric`` curve divided by its span (trapezoid rule): the run's average ``metric``
    over training, lower for a run that gets low sooner. Two runs with the same evaluation points compare
    directly; None with fewer than two evaluations."""
    xs, ys = curve(result, metric, x)
    if len(xs) < 2:
        return None
    return float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(xs)) / (xs[-1] - xs[0]))


# --- read-outs that can move (issue 19, item 7) ---------------------------------------------------------
def rise_share(result, k: float = 3.0, window: int = 10) -> float | None:
    """Share of the logged train-loss changes that are rises larger than ``k`` times the median absolute
    change of the ``window`` changes before them: how often the loss jumps *up* by more than its own recent
    noise (an unstable run jumps up often; a smooth descent, however slow, rarely). Scale-free: a curve
    multiplied by a constant, or shifted, has the same share. None with ``window`` or fewer changes."""
    if not (isinstance(window, int) and window >= 1 and k > 0):
        raise ValueError(f"Invalid rise_share arguments: k={k!r}, window={window!r} (expected k > 0, window >= 1)")
    _, loss = train_curve(result)
    d = np.diff(loss)
    if len(d) <= window:
        return None
    rises = [d[i] > k * np.median(np.abs(d[i - window:i])) for i in range(window, len(d))]
    return float(np.mean(rises))


def half_run_target(results, metric: str = "val_loss") -> float:
    """A target every run reaches by half of its own run: the largest, over ``results``, of each run's best
    ``metric`` among the evaluations at or before half its last logged tokens (the first evaluation when none
    is that early). Unlike :func:`reachable_target` (the worst run's best,
    reached by that run only at its end) no run's :func:`to_target` is then capped at the run's length."""
    best = []
    for r in results:
        xs, ys = curve(r, metric)
        if len(xs):
            early = xs <= xs[-1] / 2
            best.append(ys[early].min() if early.any() else ys[0])
    if not best:
        raise ValueError(f"no run logged {metric!r}")
    return float(max(best))


# --- horizons (issue 20, item 3): has the metric a claim reads stopped moving? ---------------------------
def last_quarter_change(result, metric: str = "val_loss", x: str = "step") -> float | None:
    """How much ``metric`` still moves over the last quarter of the run: the least-squares slope of the logged
    points whose ``x`` is in the last quarter of the run's span, times that quarter's length (in the metric's
    units; negative while a loss still falls, positive while an accuracy still rises). None with fewer than
    three points in the quarter."""
    xs, ys = curve(result, metric, x)
    if len(xs) < 3:
        return None
    start = xs[0] + 0.75 * (xs[-1] - xs[0])
    last = xs >= start
    if last.sum() < 3:
        return None
    slope = np.polyfit(xs[last], ys[last], 1)[0]
    return float(slope * (xs[-1] - start))


def horizon(results_by_arm: dict, metric: str, tol: float, x: str = "step") -> tuple[dict, dict]:
    """The last-quarter change (:func:`last_quarter_change`) of each arm across its seeds, and the arms that
    have not converged at this horizon. ``results_by_arm``: {arm: [RunResult per seed]}; ``tol`` > 0, in the
    metric's units: an arm has converged when the 95 % interval of its per-seed changes lies inside
    [-tol, tol] and every seed has a change. Returns ({arm: (mean, low, high, n)}, {arm: flag text} for the arms
    that have not: one seed gives no interval, and a run without a change (failed, or too few evaluations in its
    last quarter) is not shown converged), the flags ready for ``lrkit.claims.evaluate_all(..., flags=...)``."""
    from lrkit.claims import interval

    if not tol > 0:
        raise ValueError(f"Invalid tol: {tol!r} (expected a tolerance > 0 in the units of {metric!r})")
    changes, flags = {}, {}
    for arm, results in results_by_arm.items():
        mean, lo, hi, n = interval([last_quarter_change(r, metric, x) for r in results])
        changes[arm] = (mean, lo, hi, n)
        if n < len(results) or not (np.isfinite(lo) and np.isfinite(hi) and -tol <= lo and hi <= tol):
            if n == 0:
                what = (f"no seed of {len(results)} has a last-quarter change of {metric} (fewer than 3 evaluations "
                        "in its last quarter, or failed)")
            else:
                ci = f"95% CI [{lo:+.3g}, {hi:+.3g}]" if n > 1 else "one seed, no interval"
                what = f"last-quarter change of {metric} {mean:+.3g}, {ci}, n={n}"
                if n < len(results):
                    what += f"; {len(results) - n} of {len(results)} seeds without one (too few evaluations, or failed)"
            flags[arm] = f"{arm}: not converged at this horizon ({what}; converged: inside +/-{tol:g})"
    return changes, flags
