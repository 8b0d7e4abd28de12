import math

from lrkit.analysis import jump_at, loss_spikes, steps_to, train_curve
from lrkit.records import RunResult


def _run(losses, every=1, val=None):
    hist = [{"step": (i + 1) * every, "train_loss": l} for i, l in enumerate(losses)]
    for row, v in zip(hist, val or []):
        row["val_loss"] = v
    return RunResult("r", {}, 0, "cpu", "cpu", history=hist)


def test_spikes_count_transient_jumps_not_descent():
    assert loss_spikes(_run([5, 4, 3, 2, 1])) == 0
    assert loss_spikes(_run([5, 4, 3, 3.5, 2.9, 2.8]), threshold=0.3) == 1


def test_jump_at_switch_steps():
    r = _run([3, 3, 3, 4, 4, 4, 3, 3, 3, 4, 4, 4])
    assert jump_at(r, [3, 9], window=3) == 1.0
    assert math.isnan(jump_at(r, [1], window=3))


def test_steps_to_target_and_diverged_rows():
    r = _run([3, 2, 1], every=10, val=[3.0, 2.0, 1.0])
    assert steps_to(r, 2.0) == 20 and steps_to(r, 0.5) is None
    r.history.append({"step": 40, "train_loss": None})
    assert len(train_curve(r)[1]) == 3
