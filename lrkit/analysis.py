"""Numbers the ablations read off run histories: loss spikes, jumps at subspace switches, steps to a
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
