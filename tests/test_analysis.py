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


def test_rise_share_counts_rises_beyond_the_recent_noise_only():
    from lrkit.analysis import rise_share

    smooth = [10 - 0.1 * i for i in range(30)]  # steady descent: never a rise
    assert rise_share(_run(smooth), k=3, window=5) == 0.0
    # descent with small alternating noise (+-0.05 around the trend), then three rises of 1.0: 3 of the 24 changes
    # judged (30 points, 29 changes, the first 5 only set the noise level) are rises far above the noise
    noisy = [10 - 0.1 * i + (0.05 if i % 2 else -0.05) for i in range(30)]
    for i in (12, 18, 24):
        noisy[i] += 1.0
    assert rise_share(_run(noisy), k=3, window=5) == 3 / 24
    # drops as large as those rises, that stay down, are not counted (an abs() or sign bug would count them)
    drops = [10 - 0.1 * i + (0.05 if i % 2 else -0.05) - 1.0 * sum(i >= j for j in (12, 18, 24)) for i in range(30)]
    assert rise_share(_run(drops), k=3, window=5) == 0.0
    # scale-free: the same curve in other units gives the same share
    assert rise_share(_run([5 * v + 2 for v in noisy]), k=3, window=5) == 3 / 24
    assert rise_share(_run(smooth[:5]), window=5) is None


def test_half_run_target_is_reached_by_every_run_by_half_its_length():
    from lrkit.analysis import half_run_target, reachable_target, to_target

    def lm(vals):
        r = _run(vals, every=10, val=vals)
        r.config.update(batch_size=1, seq_len=1)
        return r
    fast, slow = lm([5.0, 3.0, 2.0, 1.9, 1.8, 1.7]), lm([6.0, 5.5, 5.0, 4.0, 3.0, 2.5])
    target = half_run_target([fast, slow])
    assert target == 5.0  # slow's best up to step 30 (half of its last step 60)
    assert all(to_target(r, target) <= 30 for r in (fast, slow))
    # the worst run's best (the older target) is reached by that run only at its end
    assert to_target(slow, reachable_target([fast, slow])) == 60


def test_last_quarter_change_reads_the_last_quarter_only_and_horizon_flags_moving_arms():
    from lrkit.analysis import horizon, last_quarter_change

    # 17 points, steps 10..170: the last quarter of the span (10..170) starts at step 130 -> 5 points
    falling = [10 - 0.5 * i for i in range(17)]                        # still falling: -0.5 per 10 steps
    flat_end = [10 - 0.5 * min(i, 8) for i in range(17)]               # falls, then flat from step 90
    val = lambda v: _run(v, every=10, val=v)
    assert math.isclose(last_quarter_change(val(falling)), -0.5 * 4)   # slope x quarter length (40 steps)
    assert abs(last_quarter_change(val(flat_end))) < 1e-12             # an early fall is not read
    assert last_quarter_change(val([3.0, 2.0])) is None
    noise = [0.01, -0.01, 0.02]
    changes, flags = horizon({"moving": [val([f + e for f in falling]) for e in noise],
                              "settled": [val([f + e * (i > 12) for i, f in enumerate(flat_end)]) for e in noise],
                              "one-seed": [val(flat_end)],
                              "one-failed": [val(flat_end), val(flat_end[:1] + [0.0] * 16), val(flat_end[:2])]},
                             "val_loss", tol=0.1)
    assert changes["moving"][0] < -1.9 and changes["moving"][3] == 3
    assert set(flags) == {"moving", "one-seed", "one-failed"}          # one seed: no interval, not shown settled
    assert changes["one-failed"][3] == 2 and "n=2; 1 of 3 seeds without one" in flags["one-failed"]  # it counts
    assert "one seed, no interval" in flags["one-seed"] and "nan" not in flags["one-seed"]
    _, short = horizon({"short": [val([3.0, 2.0])] * 2}, "val_loss", tol=0.1)
    assert "no seed of 2 has a last-quarter change" in short["short"] and "nan" not in short["short"]
    assert "not converged at this horizon" in flags["moving"]
    import pytest
    with pytest.raises(ValueError, match="tol"):
        horizon({}, "val_loss", tol=0)


def test_curve_reads_any_history_key_as_x_without_a_step():
    from lrkit.analysis import curve, last_quarter_change

    r = RunResult("fed", {}, 0, "cpu", "cpu", history=[{"round": i, "acc": 0.1 * i} for i in range(1, 10)])
    xs, ys = curve(r, "acc", x="round")  # federated histories log rounds, not steps
    assert list(xs) == list(range(1, 10)) and math.isclose(ys[-1], 0.9)
    assert math.isclose(last_quarter_change(r, "acc", x="round"), 0.1 * 2)  # rounds 7-9
