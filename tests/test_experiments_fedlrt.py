"""The FeDLRT suite (lrkit/experiments/fedlrt.py): claims name arms the suites produce and use the kit's
margins, the read-outs against independent computations, seed pairing, tuning apart from evaluation (disjoint
index sets), the derived arms, the edge-of-grid flags, and each suite end to end at a tiny size."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from lrkit import claims, data, records
from lrkit.experiments import TUNING_SEED, Runs, fedlrt, lr_grid, tuned
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
    main = set(fedlrt.ls_arms(1, 1e-3)) | set(fedlrt.vision_arms(8, 0.02, 32)) | set(fedlrt.cnn_arms(8, 0.02, 32))
    assert {a for c in fedlrt.CLAIMS["fedlrt"] for a in c.arms} <= main
    assert {a for c in fedlrt.CLAIMS["ablation_dynamic_rank"] for a in c.arms} == {
        "dynamic rank", "frozen basis", "fixed at initial rank", "fixed at settled rank"}
    assert set(fedlrt.INITIAL_RANK_ENDS) == {"r0=2", "r0=16"}
    derived = {f"{m} ({k})" for m in fedlrt.HETEROGENEITY_METHODS for k in ("skewed", "mild")}
    derived |= {f"LS {vc} (most heterogeneous stable)" for vc in ("none", "full")}
    assert {a for c in fedlrt.CLAIMS["heterogeneity"] for a in c.arms} <= derived
    assert fedlrt.CLAIMS["tuning"] == []
    ids = [c.id for cl in fedlrt.CLAIMS.values() for c in cl]
    assert len(ids) == len(set(ids))
    # the dynamic-rank arm is fedlrt.ipynb's FeDLRT: it may share its tuned rate
    assert fedlrt.rank_arms(8, 0.02, 32, [8])["dynamic rank"] == fedlrt.vision_arms(8, 0.02, 32)["FeDLRT"]


def test_claims_directions_margins_and_accounting():
    every = [c for cl in fedlrt.CLAIMS.values() for c in cl]
    for c in every:
        if c.metric.startswith("accuracy"):
            assert c.lower_is_better is False, c.id
        if c.op == "between" or (c.op == ">" and c.bound < 0):  # equivalence or non-inferiority
            assert c.margin_reason, c.id
        if c.metric.startswith("accuracy") and (c.op == "between" or c.bound < 0):
            assert abs(c.bound) == claims.MARGINS["accuracy"][0] and c.margin_reason == claims.MARGINS["accuracy"][1]
    assert {c.id for c in every if c.accounting} == {"vision-communication", "vision-client-compute",
                                                     "cnn-communication", "cnn-client-compute"}
    assert all(c.paper == 10.0 and c.paper_source for c in every if c.accounting)


def test_vision_accuracy_is_an_equivalence():
    c = {c.id: c for c in fedlrt.CLAIMS["fedlrt"]}["vision-accuracy"]
    fedavg = {0: 0.80, 1: 0.80, 2: 0.80}
    below = claims.evaluate(c, {"FeDLRT": {0: 0.775, 1: 0.776, 2: 0.774}, "FedAvg": fedavg})
    near = claims.evaluate(c, {"FeDLRT": {0: 0.79, 1: 0.791, 2: 0.789}, "FedAvg": fedavg})
    above = claims.evaluate(c, {"FeDLRT": {0: 0.83, 1: 0.831, 2: 0.829}, "FedAvg": fedavg})  # 3 points better
    assert (below.verdict, near.verdict, above.verdict) == (claims.CONTRADICTED, claims.HOLDS, claims.CONTRADICTED)


# ---------------------------------------------------------------------------------------- one run

def test_vision_run_read_outs_pairing_and_determinism():
    fn = fedlrt.Vision(**TINY)
    a = fn("a", seed=0, method="fedavg", lr=0.1)
    b = fn("b", seed=0, **fedlrt.vision_arms(4, 0.1, 8)["FeDLRT"], lr=0.1, lr_from="vision/FeDLRT")
    again = fedlrt.Vision(**TINY)("a", seed=0, method="fedavg", lr=0.1)
    assert [h["test_accuracy"] for h in again.history] == [h["test_accuracy"] for h in a.history]
    acc = [h["test_accuracy"] for h in a.history]
    assert a.final["accuracy_tail"] == pytest.approx(np.mean(acc[-2:]), abs=1e-12)
    assert a.final["accuracy_auc"] == pytest.approx(np.mean(acc[1:]), abs=1e-12)  # every round after round 0
    assert a.final["mean_rank"] is None and b.final["mean_rank"] == np.mean(list(b.final["ranks"].values()))
    assert b.config["exclude"] == ["2"] and b.config["initial_rank"] == 4
    assert b.config["lr_from"] == "vision/FeDLRT" and a.config["lr_from"] is None
    # memory: FedAvg holds the MLP's weights; FeDLRT the augmented factors of layer 0, the dense rest and the
    # full correction's control variate over what it trains
    P = 784 * 16 + 16 + 16 * 10 + 10
    assert a.final["client_state_floats"] == P
    r = b.final["ranks"]["0"]
    k, dense = min(2 * r, 16), 16 + 16 * 10 + 10
    assert b.final["client_state_floats"] == (16 + 784) * k + k * k + dense + (k * k + dense)
    lin = fn("c", seed=0, method="fedlin", lr=0.1)
    assert lin.final["client_state_floats"] == 2 * P
    # paired: both arms trained on the same clients (the seed's subsample and partition)
    assert fn.clients(0, 0.5) is fn._clients[(0, 0.5)] and len(fn._clients) == 1
    other = fn("d", seed=1, method="fedavg", lr=0.1)
    assert [h["test_accuracy"] for h in other.history] != acc


def test_tuning_reads_a_split_disjoint_from_the_claims():
    """Tuning scores on images of the training split held out of the training subsample; the claims score on
    the test split. The index sets do not overlap, and they are the images the runs actually use."""
    d = data.load("fashion_mnist")
    val, claim = fedlrt.Vision(validation=True, **TINY), fedlrt.Vision(**TINY)
    vi, ci = val.split_indices(TUNING_SEED), claim.split_indices(0)
    assert vi["held"][0] == "train" and ci["held"][0] == "test"
    assert not set(vi["held"][1]) & set(vi["train"])  # validation images are not trained on
    tuning_images = {("train", int(i)) for i in vi["held"][1]}
    claims_images = {(ci["held"][0], int(i)) for i in ci["held"][1]}
    assert len(tuning_images) == 60 and len(claims_images) == 60 and not tuning_images & claims_images
    for fn, idx, seed in ((val, vi, TUNING_SEED), (claim, ci, 0)):
        X, _, (Xh, yh) = fn.images(seed)
        split = {"train": (d["x_train"], d["y_train"]), "test": (d["x_test"], d["y_test"])}[idx["held"][0]]
        assert torch.equal(X, torch.tensor(d["x_train"][idx["train"]] / 255.0, dtype=torch.float32).reshape(120, -1))
        assert torch.equal(Xh, torch.tensor(split[0][idx["held"][1]] / 255.0, dtype=torch.float32).reshape(60, -1))
        assert torch.equal(yh, torch.tensor(split[1][idx["held"][1]]))


def test_least_squares_run_read_outs():
    fn = fedlrt.LeastSquares(**LS_TINY)
    r = fn("x", seed=0, **fedlrt.ls_arms(1, 1e-3)["LS FeDLRT full"])
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


# ---------------------------------------------------------------------------------------- derived arms and flags

def test_heterogeneity_claim_runs_pick_the_stable_cell_on_the_tuning_seed():
    runs = Runs()
    for m in fedlrt.HETEROGENEITY_METHODS:
        for a in (0.1, 1.0):
            for s in (0, 1):
                arm = f"alpha={a:g} {m}"
                runs[(arm, s)] = _fake(arm, s, accuracy_tail=0.7, config={"lr": 0.1, "lr_from": f"g/{m}"})
    # on the claims' seeds het=1.5 diverges (it must not move the choice); on the tuning seed het=3 does
    for h, bad in ((0.5, set()), (1.5, {0, 1}), (3.0, {TUNING_SEED})):
        for vc in ("none", "full"):
            for s in (0, 1, TUNING_SEED):
                arm = ("select " if s == TUNING_SEED else "") + f"LS het={h:g} C=4 {vc}"
                runs[(arm, s)] = _fake(arm, s, excess_loss=None if s in bad else 0.1, diverged=s in bad,
                                       config={"heterogeneity": h, "num_clients": 4, "variance_correction": vc})
    best, table = fedlrt.heterogeneity_claim_runs(runs, [0.1, 1.0], {"num_clients": 4, "lr": 0.06})
    assert best[("FedLin (skewed)", 1)] is runs[("alpha=0.1 FedLin", 1)]
    assert best[("FeDLRT full (mild)", 0)] is runs[("alpha=1 FeDLRT full", 0)]
    assert best[("LS full (most heterogeneous stable)", 0)].config["heterogeneity"] == 1.5
    assert TUNING_SEED not in best.seeds  # the claims read the claims' seeds only
    # the diverged claim runs are kept (the claims rule counts them), not dropped
    v = claims.evaluate(fedlrt.CLAIMS_HETEROGENEITY[-1], best.measure("excess_loss"))
    assert v.n == 2 and v.failed == 4


def test_rank_claim_runs_name_the_initial_and_the_settled_rank():
    runs = Runs()
    for s, settled in ((0, 11.0), (1, 12.0), (2, 14.0)):
        runs[("dynamic rank", s)] = _fake("dynamic rank", s, mean_rank=settled)
        for r in (2, 4, 8, 16):
            runs[(f"fixed r={r}", s)] = _fake(f"fixed r={r}", s, mean_rank=float(r))
    out, picked = fedlrt.rank_claim_runs(runs, 4)
    assert picked == {"settled": 12.0, "nearest": 16}  # |log(16/12)| < |log(8/12)|
    assert out[("fixed at settled rank", 2)] is runs[("fixed r=16", 2)]
    assert out[("fixed at initial rank", 0)] is runs[("fixed r=4", 0)]
    with pytest.raises(ValueError, match="fixed_ranks"):
        fedlrt.rank_arms(8, 0.02, 32, [2, 4])


def test_flags_map_edge_rates_to_the_arms_that_read_them(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "REPORTS_DIR", tmp_path)
    out = records.report_dir("fedlrt/tuning", "cpu", root=tmp_path)
    edge = {"lr": 0.6, "grid": [0.15, 0.3, 0.6], "scores": [0.5, 0.6, 0.7], "at_edge": True, "extended": [0.6],
            "edge_reason": "diverges beyond", "runs": 3, "budget": "b"}
    inner = edge | {"lr": 0.3, "at_edge": False, "edge_reason": ""}
    records.save_summary(out, [], tuned={"vision": {"FeDLRT": edge, "FedAvg": inner},
                                           "dynamic rank": {"fixed r=8": inner}})
    runs = Runs()
    for arm, src in (("dynamic rank", "vision/FeDLRT"), ("fixed r=8", "dynamic rank/fixed r=8"), ("hand", None),
                     ("FedAvg", "vision/FedAvg")):
        runs[(arm, 0)] = _fake(arm, 0, config={"lr_from": src})
    runs[("alias", 0)] = runs[("dynamic rank", 0)]
    f = fedlrt.flags("cpu", runs)
    assert set(f) == {"dynamic rank", "alias"}
    assert "upper edge" in f["dynamic rank"] and "diverges beyond" in f["alias"]
    v = claims.evaluate_all([fedlrt.CLAIMS_DYNAMIC_RANK[1]], lambda m: {"dynamic rank": {0: 0.7, 1: 0.8},
                                                                       "fixed at initial rank": {0: 0.6, 1: 0.7}},
                            flags=f)
    assert v[0].flags and "dynamic rank" in v[0].flags[0]


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

def test_tuning_then_every_suite_reads_its_rates(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "REPORTS_DIR", tmp_path)
    out = records.report_dir("fedlrt/tuning", "cpu", root=tmp_path)
    cnn = dict(width=2, hidden=4, train_size=90, test_size=30, rounds=2, points=2)
    chosen = fedlrt.tuning(out, center=0.1, points=2, factor=2.0, initial_rank=2, tau=0.1, r_max=4, fixed_ranks=[2],
                           het_alphas=[0.1], het_train_size=90, het_rounds=2, cnn=cnn, **TINY)
    assert list(chosen) == ["vision", "dynamic rank", "heterogeneity alpha=0.1", "cnn"]
    assert set(chosen["cnn"]) == set(fedlrt.CNN_ARMS)
    assert chosen["cnn"]["CNN FeDLRT"]["problem"] == {"train_size": 90, "rounds": 2, "cnn_width": 2, "cnn_hidden": 4}
    assert set(chosen["vision"]) == {"FedAvg", "FedLin", "FeDLRT"}
    assert set(chosen["dynamic rank"]) == {"fixed r=2", "frozen basis"}
    assert set(chosen["heterogeneity alpha=0.1"]) == set(fedlrt.HETEROGENEITY_METHODS)
    for g in chosen.values():  # the same starting grid for every arm; more only where extended
        for c in g.values():
            assert set(lr_grid(0.1, 2, 2.0)) <= set(c["grid"])
            assert c["runs"] == 2 + len(c["extended"]) and c["lr"] in c["grid"]
    assert chosen["heterogeneity alpha=0.1"]["FedAvg"]["problem"] == {"train_size": 90, "rounds": 2, "alpha": 0.1}
    records.save_summary(out, fedlrt.sweep_table(chosen), tuned=chosen)
    rec = records.load(out)["runs"].values()
    assert all(r["config"]["validation"] and r["seed"] == TUNING_SEED for r in rec)  # never the test split
    assert {r["config"]["alpha"] for r in rec if r["config"]["tuning"].startswith("heterogeneity")} == {0.1}
    lrs = tuned("fedlrt", "cpu", "vision")
    assert lrs == {m: c["lr"] for m, c in chosen["vision"].items()}
    words = fedlrt.budget("smoke", ["vision"], {"train_size": 7})
    assert "tuning runs FedAvg" in words and "train_size 120 (here 7)" in words

    # ablation_dynamic_rank: every arm at its own tuned rate; read-outs that move across arms
    runs = fedlrt.dynamic_rank(tmp_path / "d", profile="cpu", seeds=[0], vision=TINY, initial_rank=2, tau=0.05,
                               r_max=6, fixed_ranks=[2])
    cfg = {a: runs[(a, 0)].config for a in runs.arms}
    assert runs.arms == ["dynamic rank", "fixed r=2", "frozen basis"]
    assert cfg["dynamic rank"]["lr"] == lrs["FeDLRT"] and cfg["dynamic rank"]["lr_from"] == "vision/FeDLRT"
    assert cfg["fixed r=2"]["lr"] == chosen["dynamic rank"]["fixed r=2"]["lr"]
    assert cfg["fixed r=2"]["r_min"] == cfg["fixed r=2"]["r_max"] == 2 and cfg["frozen basis"]["dynamic_rank"] is False
    assert {h["mean_rank"] for h in runs[("fixed r=2", 0)].history} == {2.0}
    for m in fedlrt.VISION_METRICS:
        vals = [runs[(a, 0)].final[m] for a in runs.arms]
        assert len(set(vals)) > 1, m  # no read-out is constant across the arms
    claim_runs, _ = fedlrt.rank_claim_runs(runs, 2)
    verdicts = claims.evaluate_all(fedlrt.CLAIMS["ablation_dynamic_rank"], claim_runs.measure,
                                   flags=fedlrt.flags("cpu", claim_runs))
    assert all(v.verdict == claims.UNRESOLVED and v.n == 1 for v in verdicts)  # one seed: never a verdict

    # heterogeneity: tuned rates per alpha, the stable-cell choice on the tuning seed
    ls = dict(LS_TINY, rounds=2)
    runs = fedlrt.heterogeneity(tmp_path / "h", profile="cpu", seeds=[0], ls=ls, ls_heterogeneities=[0.0],
                                ls_clients=[], ls_tau=1e-3, corrections=["none", "full"], vision=dict(TINY, rounds=2),
                                alphas=[0.1], initial_rank=2, r_max=4, default_tau=0.1, taus=[0.3],
                                client_fractions=[])
    het = tuned("fedlrt", "cpu", "heterogeneity alpha=0.1")
    assert all(runs[(f"alpha=0.1 {m}", 0)].config["lr"] == lr for m, lr in het.items())
    assert runs[("alpha=0.1 FedLin", 0)].config["lr_from"] == "heterogeneity alpha=0.1/FedLin"
    assert {"tau=0.1 frac=1", "tau=0.3 frac=1", "LS het=0 C=3 none", "select LS het=0 C=3 full"} <= set(runs.arms)
    assert {r["config"]["model"] for r in rec if r["config"]["tuning"] == "cnn"} == {"cnn"}
    assert runs[("select LS het=0 C=3 full", TUNING_SEED)].seed == TUNING_SEED
    best, _ = fedlrt.heterogeneity_claim_runs(runs, [0.1], ls)
    verdicts = claims.evaluate_all(fedlrt.CLAIMS["heterogeneity"], best.measure)
    assert len(verdicts) == len(fedlrt.CLAIMS["heterogeneity"])
    notes = fedlrt.heterogeneity_notes(runs, [0.1], 0.1)
    assert any(n.startswith("alpha=0.1 FeDLRT full - alpha=0.1 FeDLRT none, accuracy_tail") for n in notes)
    assert any("tau=0.3 frac=1 - tau=0.1 frac=1" in n for n in notes)

    # fedlrt.ipynb's CNN arm with cnn["lr"] None: each arm at its own rate of group "cnn", on the CNN problem
    cnn_main = dict(width=2, hidden=4, train_size=90, test_size=30, rounds=2, lr=None, seeds=[0])
    runs = fedlrt.main(None, profile="cpu", seeds=[0], ls=dict(LS_TINY, rounds=2), ls_initial_rank=1, ls_tau=1e-3,
                       vision=dict(TINY, rounds=1), lrs={m: 0.1 for m in fedlrt.METHODS}, initial_rank=2, tau=0.1,
                       r_max=4, cnn=cnn_main)
    for a in fedlrt.CNN_ARMS:
        c = runs[(a, 0)].config
        assert (c["lr"], c["lr_from"], c["model"]) == (chosen["cnn"][a]["lr"], f"cnn/{a}", "cnn")
    assert not fedlrt.hand_set_flags(runs)

    # initial rank: one rate (FeDLRT's) for every arm; the claims' ends must be run
    with pytest.raises(ValueError, match="r0=16"):
        fedlrt.initial_rank(tmp_path / "i", profile="cpu", seeds=[0], vision=TINY, initial_ranks=[2, 4], tau=0.1,
                            r_max=4)


# ---------------------------------------------------------------------------------------- the CNN arm and the horizon

def _curve_run(arm, seed, slope, rounds=8):
    h = [{"round": t, "test_accuracy": 0.5 + slope * t} for t in range(rounds + 1)]
    return RunResult(name=arm, config={"arm": arm}, seed=seed, device="cpu", device_name="cpu", history=h, final={})


def test_horizon_reads_the_last_quarter_of_the_rounds():
    runs = Runs()
    for s, slope in enumerate((0.001, 0.002, 0.0015)):
        runs[("flat", s)] = _curve_run("flat", s, slope)
        runs[("rising", s)] = _curve_run("rising", s, 10 * slope)
    table, flags = fedlrt.horizon(runs, ["flat", "rising"], tol=0.01)
    row = table.set_index("arm")
    # rounds 6..8 are the last quarter of 0..8: change = slope x 2 rounds, in points
    assert math.isclose(row.loc["flat", "last_quarter_change_points"], 100 * 2 * 0.0015, rel_tol=1e-9)
    assert bool(row.loc["flat", "converged"]) and not bool(row.loc["rising", "converged"])
    assert list(flags) == ["rising"] and "not converged at this horizon" in flags["rising"]


def test_main_runs_the_cnn_arm_and_flags_only_the_accuracy_rows():
    cnn = dict(width=2, hidden=4, train_size=TINY["train_size"], test_size=TINY["test_size"], rounds=4, lr=0.1,
               seeds=[0, 1])
    runs = fedlrt.main(None, profile="cpu", seeds=[0], ls=dict(LS_TINY, rounds=2), ls_initial_rank=1, ls_tau=1e-3,
                       vision=dict(TINY, rounds=2), lrs={m: 0.1 for m in fedlrt.METHODS}, initial_rank=2, tau=0.1,
                       r_max=4, cnn=cnn)
    assert set(fedlrt.CNN_ARMS) <= set(runs.arms) and runs.measure("accuracy_tail")["CNN FeDLRT"].keys() == {0, 1}
    for a in fedlrt.CNN_ARMS:
        c = runs[(a, 1)].config
        assert (c["model"], c["cnn_width"], c["lr"], c["lr_from"], c["rounds"]) == ("cnn", 2, 0.1, None, 4)
    assert runs[("CNN FeDLRT", 0)].config["initial_rank"] == 2 and runs[("CNN FedAvg", 0)].final["ranks"] == {}
    ranks = fedlrt.layer_ranks(runs)
    assert ranks.layer.tolist() == ["conv1", "conv2", "fc1"]
    assert ranks.full_rank.tolist() == [2, 4, 4] and ranks.initial_rank.tolist() == [2, 2, 2]
    final = [[runs[("CNN FeDLRT", s)].final["ranks"][l] for s in (0, 1)] for l in ranks.layer]
    assert ranks["rank"].tolist() == [float(np.mean(f)) for f in final]
    verdicts, table = fedlrt.main_verdicts("cpu", runs)
    assert [v.claim for v in verdicts] == [c.id for c in fedlrt.CLAIMS["fedlrt"]]
    v = {v.claim: v for v in verdicts}
    assert set(table.arm) == {"FeDLRT", "FedAvg", "CNN FeDLRT", "CNN FedAvg"}
    # one seed of the MLP arms: never shown converged; the cost rows read no accuracy and carry no horizon flag
    assert any("not converged at this horizon" in f for f in v["vision-accuracy"].flags)
    assert not any("horizon" in f for k in ("vision-communication", "cnn-communication", "cnn-client-compute")
                   for f in v[k].flags)
    # the CNN arms ran at one hand-set rate: every row reading them says so, the MLP rows do not
    assert all(any("hand-set" in f for f in v[k].flags) for k in ("cnn-accuracy", "cnn-communication"))
    assert not any("hand-set" in f for f in v["vision-accuracy"].flags)
    with pytest.raises(ValueError, match="Invalid cnn"):
        fedlrt.main(None, profile="cpu", seeds=[0], ls=LS_TINY, ls_initial_rank=1, ls_tau=1e-3, vision=TINY,
                    lrs={}, initial_rank=2, tau=0.1, r_max=4, cnn=dict(cnn, model="mlp"))
