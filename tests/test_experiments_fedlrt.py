"""The FeDLRT suite (lrkit/experiments/fedlrt.py): claims name arms the suites produce, the read-outs
against independent computations, seed pairing, the best-learning-rate rule, the tuning record round
trip, and each suite end to end at a tiny size."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from lrkit import claims, records
from lrkit.experiments import Runs, fedlrt, tuned
from lrkit.records import RunResult

torch.set_num_threads(1)
TINY = dict(train_size=120, test_size=60, num_clients=3, alpha=0.5, rounds=3, local_steps=1, batch_size=16,
            hidden=16, tail_rounds=2)
LS_TINY = dict(n=6, rank=2, num_clients=3, samples=8, heterogeneity=0.5, noise=1.0, rounds=4, lr=0.05, local_steps=5)


def _fake(arm, seed, **final):
    return RunResult(name=arm, config={"arm": arm, **final.pop("config", {})}, seed=seed, device="cpu",
                     device_name="cpu", history=[], final=final)


# ---------------------------------------------------------------------------------------- claims

def test_claims_name_the_arms_their_suites_produce():
    main = set(fedlrt.ls_arms(1, 1e-3)) | set(fedlrt.vision_arms(8, 0.02, 32))
    assert {a for c in fedlrt.CLAIMS["fedlrt"] for a in c.arms} <= main
    assert {a for c in fedlrt.CLAIMS["ablation_dynamic_rank"] for a in c.arms} == {
        "dynamic rank", "fixed rank", "frozen basis", "fixed at settled rank"}
    assert set(fedlrt.INITIAL_RANK_ENDS) == {"r0=2", "r0=16"}
    derived = {f"{m} ({k})" for m in fedlrt.HETEROGENEITY_METHODS for k in ("skewed", "mild")}
    derived |= {f"LS {vc} (most heterogeneous stable)" for vc in ("none", "full")}
    assert {a for c in fedlrt.CLAIMS["heterogeneity"] for a in c.arms} <= derived
    assert fedlrt.CLAIMS["tuning"] == []
    ids = [c.id for cl in fedlrt.CLAIMS.values() for c in cl]
    assert len(ids) == len(set(ids))


def test_vision_claims_read_the_paper_margins():
    by_id = {c.id: c for c in fedlrt.CLAIMS["fedlrt"]}
    assert by_id["vision-accuracy"].bound == -fedlrt.ACCURACY_MARGIN == -0.02
    assert by_id["vision-communication"].quantity == "ratio" and by_id["vision-communication"].bound == 5.0
    # a 2.5-point gap on every seed contradicts "within 2 points"; 1 point holds
    v = claims.evaluate(by_id["vision-accuracy"], {"FeDLRT": {0: 0.775, 1: 0.776, 2: 0.774},
                                                  "FedAvg": {0: 0.80, 1: 0.80, 2: 0.80}})
    assert v.verdict == claims.CONTRADICTED
    v = claims.evaluate(by_id["vision-accuracy"], {"FeDLRT": {0: 0.79, 1: 0.791, 2: 0.789},
                                                  "FedAvg": {0: 0.80, 1: 0.80, 2: 0.80}})
    assert v.verdict == claims.HOLDS


# ---------------------------------------------------------------------------------------- one run

def test_vision_run_read_outs_pairing_and_determinism():
    fn = fedlrt.Vision(**TINY)
    a = fn("a", seed=0, method="fedavg", lr=0.1)
    b = fn("b", seed=0, **fedlrt.vision_arms(4, 0.1, 8)["FeDLRT"], lr=0.1)
    again = fedlrt.Vision(**TINY)("a", seed=0, method="fedavg", lr=0.1)
    assert [h["test_accuracy"] for h in again.history] == [h["test_accuracy"] for h in a.history]
    acc = [h["test_accuracy"] for h in a.history]
    assert a.final["accuracy_tail"] == pytest.approx(np.mean(acc[-2:]), abs=1e-12)
    assert a.final["mean_rank"] is None and b.final["mean_rank"] == np.mean(list(b.final["ranks"].values()))
    assert b.config["exclude"] == ["2"] and b.config["initial_rank"] == 4
    # paired: both arms trained on the same clients (the seed's subsample and partition)
    assert fn.clients(0, 0.5) is fn._clients[(0, 0.5)] and len(fn._clients) == 1
    other = fn("c", seed=1, method="fedavg", lr=0.1)
    assert [h["test_accuracy"] for h in other.history] != acc
    # the validation split is held out of the training subsample, not the test set
    val = fedlrt.Vision(validation=True, **TINY)
    X, _, (Xv, _) = val.images(0)
    assert len(X) == 120 and len(Xv) == 60
    assert not (torch.cdist(Xv.reshape(60, -1), X.reshape(120, -1)).min(1).values == 0).any()


def test_least_squares_run_read_outs():
    fn = fedlrt.LeastSquares(**LS_TINY)
    r = fn("x", seed=0, **fedlrt.ls_arms(1, 1e-3)["LS FeDLRT full"])
    from lrkit import data

    P = data.load("least_squares", n=6, rank=2, num_clients=3, samples_per_client=8, heterogeneity=0.5, noise=1.0,
                  seed=0, low_rank_noise=True)
    floor = P["loss_ls"]
    assert r.final["loss_optimum"] == floor
    assert r.final["excess_loss"] == pytest.approx(max((r.final["loss"] - floor) / floor, fedlrt.EXCESS_FLOOR))
    assert [h["excess_loss"] for h in r.history][0] == pytest.approx((r.history[0]["loss"] - floor) / floor)
    assert r.final["rank"] == r.final["ranks"][""] and r.final["rank_error"] == r.final["rank"] - 2
    dense = fn("y", seed=0, method="fedlin")
    assert dense.final["rank"] is None and dense.final["rel_error_W"] > 0
    het = fn("z", seed=0, method="fedavg", heterogeneity=0.0, num_clients=2)
    assert het.config["heterogeneity"] == 0.0 and het.config["num_clients"] == 2


# ---------------------------------------------------------------------------------------- derived arms and notes

def test_best_lr_rule_and_stable_least_squares_cell():
    runs = Runs()
    accs = {("FedAvg", 0.1): [0.70, 0.72], ("FedAvg", 0.3): [0.75, None], ("FedLin", 0.1): [0.60, 0.62],
            ("FedLin", 0.3): [0.65, 0.66]}
    for (m, lr), vals in accs.items():
        for s, v in enumerate(vals):
            arm = f"alpha=0.1 {m} lr={lr:.3g}"
            runs[(arm, s)] = _fake(arm, s, accuracy_tail=v, diverged=v is None, config={"lr": lr})
    for h, div in ((0.5, False), (1.5, True)):
        for vc in ("none", "full"):
            for s in (0, 1):
                arm = f"LS het={h:g} C=4 {vc}"
                runs[(arm, s)] = _fake(arm, s, excess_loss=0.1 if vc == "none" else 0.01,
                                       diverged=div and vc == "full",
                                       config={"heterogeneity": h, "num_clients": 4, "variance_correction": vc})
    best, table = fedlrt.best_lr(runs, [0.1], {"num_clients": 4})
    # FedAvg at 0.3 has a diverged seed: never chosen, even with the higher finite value
    assert best[("FedAvg (skewed)", 0)].config["lr"] == 0.1 and best[("FedLin (skewed)", 1)].config["lr"] == 0.3
    assert best[("FedAvg (mild)", 0)] is best[("FedAvg (skewed)", 0)]  # one alpha: skewed = mild
    assert best[("LS full (most heterogeneous stable)", 0)].config["heterogeneity"] == 0.5
    assert table.set_index("derived arm").loc["FedLin (skewed)", "at grid edge"]


def test_paired_note_is_the_t_interval_of_the_paired_differences():
    runs = Runs()
    a, b = [0.80, 0.82, 0.79, 0.81], [0.78, 0.79, 0.79, 0.77]
    for s, (x, y) in enumerate(zip(a, b)):
        runs[("A", s)], runs[("B", s)] = _fake("A", s, m=x), _fake("B", s, m=y)
    d = np.subtract(a, b) * 100
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / math.sqrt(4)
    note = fedlrt.paired_note(runs, "m", "A", "B", scale=100, unit=" points")
    assert note == (f"A - B, m: {d.mean():+.3g} points (95% CI [{d.mean() - half:+.3g}, {d.mean() + half:+.3g}], "
                    "n=4, paired by seed).")


# ---------------------------------------------------------------------------------------- suites end to end

def test_tuning_record_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "REPORTS_DIR", tmp_path)
    out = records.report_dir("fedlrt/tuning", "cpu", root=tmp_path)
    chosen = fedlrt.tuning(out, center=0.1, points=2, factor=2.0, initial_rank=2, tau=0.1, r_max=4,
                           **{k: v for k, v in TINY.items()})
    assert set(chosen[fedlrt.TUNING_GROUP]) == {"FedAvg", "FedLin", "FeDLRT"}
    assert all(c["grid"] == pytest.approx([0.1 / math.sqrt(2), 0.1 * math.sqrt(2)]) for c in chosen["vision"].values())
    records.save_summary(out, fedlrt.sweep_table(chosen), tuned=chosen)
    lrs = tuned("fedlrt", "cpu", "vision")
    assert lrs == {m: c["lr"] for m, c in chosen["vision"].items()}
    assert fedlrt.learning_rates("smoke", {"FedAvg": None, "FeDLRT": 0.5}) == {"FedAvg": lrs["FedAvg"], "FeDLRT": 0.5}
    assert "2 learning rates x 1 seed (1000)" in fedlrt.budget("smoke", {"FedAvg": None})
    assert all(r["config"]["validation"] for r in records.load(out)["runs"].values())


def test_dynamic_rank_suite_arms(tmp_path):
    runs = fedlrt.dynamic_rank(tmp_path, profile="cpu", seeds=[0], vision=TINY, lr=0.2, initial_rank=2, tau=0.05,
                               r_max=6)
    cfg = {a: runs[(a, 0)].config for a in runs.arms}
    assert runs.arms == ["dynamic rank", "fixed rank", "frozen basis", "fixed at settled rank"]
    assert cfg["fixed rank"]["r_min"] == cfg["fixed rank"]["r_max"] == 2
    assert cfg["frozen basis"]["dynamic_rank"] is False
    settled = round(runs[("dynamic rank", 0)].final["mean_rank"])
    assert cfg["fixed at settled rank"]["initial_rank"] == cfg["fixed at settled rank"]["r_max"] == settled
    assert {h["mean_rank"] for h in runs[("fixed rank", 0)].history} == {2.0}
    verdicts = claims.evaluate_all(fedlrt.CLAIMS["ablation_dynamic_rank"], runs.measure)
    assert all(v.verdict == claims.UNRESOLVED and v.n == 1 for v in verdicts)  # one seed: never a verdict


def test_heterogeneity_suite_grid_and_notes(tmp_path):
    ls = dict(LS_TINY, rounds=2)
    runs = fedlrt.heterogeneity(tmp_path, profile="cpu", seeds=[0], ls=ls, ls_heterogeneities=[0.0], ls_clients=[],
                                ls_tau=1e-3, corrections=["none", "full"], vision=dict(TINY, rounds=2), alphas=[0.1],
                                lr_center=0.1, lr_points=2, lr_factor=3.0, lr=0.1, initial_rank=2, r_max=4,
                                default_tau=0.05, taus=[0.3], client_fractions=[])
    sweep = fedlrt.sweep_frame(runs)
    assert len(sweep) == 8 and sorted(sweep.lr.unique()) == pytest.approx([0.1 / math.sqrt(3), 0.1 * math.sqrt(3)])
    assert set(sweep.method) == set(fedlrt.HETEROGENEITY_METHODS)
    assert {"tau=0.05 frac=1", "tau=0.3 frac=1", "LS het=0 C=3 none", "LS het=0 C=3 full"} <= set(runs.arms)
    best, _ = fedlrt.best_lr(runs, [0.1], ls)
    verdicts = claims.evaluate_all(fedlrt.CLAIMS["heterogeneity"], best.measure)
    assert len(verdicts) == len(fedlrt.CLAIMS["heterogeneity"])
    notes = fedlrt.heterogeneity_notes(runs, [0.1], 0.05)
    assert any(n.startswith("alpha=0.1, lr=") for n in notes)
    assert any("tau=0.3 frac=1 - tau=0.05 frac=1" in n for n in notes)
