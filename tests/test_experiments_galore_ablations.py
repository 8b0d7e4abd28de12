"""The GaLore ablation suites (lrkit/experiments/galore_ablations.py): claims that name the arms the suites
build, the paper-equivalent T, the read-outs on hand-made records (exact), the learning-rate fallback, and
short seeded runs of the suites themselves on a nano LLaMA."""
import math

import pytest

from lrkit import claims, records
from lrkit.experiments import Runs, galore_ablations as suite
from lrkit.records import RunResult


@pytest.fixture
def reports(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "REPORTS_DIR", tmp_path)
    return tmp_path


def _rec(arm, seed, vals, *, T=10, steps=40, wall=10.0, proj=1.0, method="svd", switch=True, ppl=None, **final):
    hist = [{"step": 10 * (i + 1), "train_loss": v, "val_loss": v} for i, v in enumerate(vals)]
    cfg = {"arm": arm, "update_proj_gap": T, "proj_method": method, "switch_subspace": switch, "batch_size": 2,
           "seq_len": 4, "lr": 0.01, "scale": 0.25}
    fin = {"val_loss": vals[-1], "val_ppl": ppl or math.exp(vals[-1]), "steps": steps, "projector_time_s": proj,
           "diverged": False, "unstable": False, "val_loss_above_best": vals[-1] - min(vals)} | final
    return RunResult(name=f"{arm} | seed {seed}", config=cfg, seed=seed, device="cpu", device_name="cpu",
                     history=hist, final=fin, wall_time_s=wall, memory={"optimizer_state_bytes": 100})


def test_paper_equivalent_T_counts_switches_per_run():
    assert suite.paper_T(5, 500) == 200.0  # 99 switches in 500 steps ~ the paper's T = 200 in 20,000 steps
    assert suite.paper_T(25, 500) == 1000.0 and suite.paper_T(10, 500, "60m") == 200.0
    assert suite.PAPER_STEPS == {"60m": 10_000, "130m": 20_000}


def test_claims_name_the_arms_the_suites_build():
    gaps, scales, policies, methods = [50, 100, 200, 500, 1000], [0.1, 0.25, 0.5, 1.0, 4.0], \
        ["keep", "reset", "ldadam"], ["svd", "randomized_svd", "random", "online_pca"]
    built = {
        "gap": ({suite.gap_arm(T) for T in gaps}, suite.update_gap_claims(gaps, 1200)),
        "scale": ({suite.scale_arm(a) for a in scales}, suite.scale_claims(scales)),
        "switch": ({suite.FIXED} | {suite.policy_arm(p) for p in policies}, suite.switching_claims(policies)),
        "proj": ({suite.projection_arm(m) for m in methods}, suite.projection_claims(methods)),
    }
    ids = []
    for arms, cs in built.values():
        assert cs
        for c in cs:
            assert set(c.arms) <= arms, c.id
            ids.append(c.id)
    assert len(ids) == len(set(ids))
    gap = {c.id: c for c in built["gap"][1]}
    assert gap["update-gap-interior-optimum"].kind == "interior_optimum"
    assert gap["update-gap-interior-optimum"].arms == ("T=50", "T=100", "T=200", "T=500", "T=1000")
    assert gap["update-gap-overhead-small"].arms == ("T=200",)
    # no claim that cannot fail: the recipe-near-best claims are gone (the notebooks say why)
    every = [c for _, cs in built.values() for c in cs]
    assert not {"update-gap-recipe-near-best", "scale-recipe-near-best", "scale-recipe-stable"} & {c.id for c in every}
    unstable = {c.id: c for c in built["scale"][1]}["scale-large-alpha-unstable"]
    assert unstable.metric == "loss_rises" and unstable.arms == ("alpha=4", "alpha=0.25")
    # on-par claims are two-sided with the kit's margin and its reason; "not worse" keeps one side
    proj = {c.id: c for c in built["proj"][1]}
    assert proj["randomized-svd-ties-svd"].op == "between" and proj["randomized-svd-ties-svd"].bound == 1.05
    assert proj["online-pca-not-worse"].op == "<" and all(c.margin_reason for c in proj.values() if c.bound == 1.05)
    assert {c.id for c in built["switch"][1]} >= {"fixed-subspace-worse", "ldadam-moments-beat-keep"}
    assert [c.id for c in suite.switching_claims(["keep"])] == ["fixed-subspace-worse", "fixed-subspace-slower"]


def test_refreshes():
    assert suite.refreshes(_rec("a", 0, [3.0], T=10, steps=40)) == 4  # steps 0, 10, 20, 30
    assert suite.refreshes(_rec("a", 0, [3.0], T=7, steps=40)) == 6
    assert suite.refreshes(_rec("a", 0, [3.0], switch=False)) == 1
    assert suite.refreshes(_rec("a", 0, [3.0], method="online_pca", steps=40)) == 40


def test_readers_on_hand_made_records():
    runs = Runs()
    runs[("A", 0)] = _rec("A", 0, [4.0, 3.0, 2.0, 1.0], ppl=10.0, proj=2.0, wall=10.0)  # best ppl of seed 0
    runs[("B", 0)] = _rec("B", 0, [4.0, 3.5, 3.0, 2.5], ppl=11.0)
    runs[("A", 1)] = _rec("A", 1, [4.0, 3.0, 2.0, 2.0], ppl=12.0, unstable=True)
    runs[("B", 1)] = _rec("B", 1, [4.0, 2.0, 1.5, 1.5], ppl=8.0)
    m = suite.measure(runs)
    # the target of a seed is the worst run's best loss by half the run (steps <= 20: 3.5 on seed 0, 3.0 on
    # seed 1), so every run reaches it by half its run; tokens = step x 2 x 4
    assert m("tokens_to_target")["A"] == {0: pytest.approx(15 * 8), 1: pytest.approx(20 * 8)}
    assert m("tokens_to_target")["B"] == {0: pytest.approx(20 * 8), 1: pytest.approx(15 * 8)}
    assert m("val_ppl_over_best") == {"A": {0: 1.0, 1: 1.5}, "B": {0: 1.1, 1: 1.0}}
    # 4 refreshes cost 2 s: 0.5 s each; a step without refreshes (10 - 2) / 40 = 0.2 s; at T = 200: 0.5 / 40.5
    assert m("projector_share_T200")["A"][0] == pytest.approx(0.5 / (0.5 + 200 * 0.2))
    assert m("projector_share")["A"][0] == pytest.approx(0.2)
    # loss_rises: too few logged changes for the default window; with a window of 1, B's seed-1 flat end
    # (change 0 after -0.5) is no rise, and a rise of +1 after -1 is
    assert m("loss_rises")["A"][0] is None and m("optimizer_state_bytes")["B"][1] == 100.0
    runs[("C", 0)] = _rec("C", 0, [4.0, 3.0, 4.0, 3.0])
    m1 = suite.measure(runs, rise_window=1, rise_k=0.5)("loss_rises")
    assert m1["B"][1] == 0.0 and m1["C"][0] == 0.5
    assert m("val_ppl")["B"] == {0: 11.0, 1: 8.0}  # any other name: a key of final
    v = claims.evaluate(claims.Claim("x", "s", "src", "val_ppl_over_best", ("A",), quantity="value", bound=2.0),
                        m("val_ppl_over_best"))
    assert v.n == 2 and v.estimate == pytest.approx(1.25)


def test_learning_rate_falls_back_to_the_recipe_without_a_tuning_record(reports):
    lr, source = suite.galore_lr("cpu", model_size="nano", steps=500, batch_size=16, seq_len=64)
    assert lr == suite.RECIPE["lr"] == 0.01 and "recipe" in source


TINY = dict(model_size="nano", vocab_size=1024, steps=4, batch_size=2, seq_len=16, eval_every=2, eval_windows=2,
            log_every=1)


@pytest.mark.parametrize("policies", [["keep", "ldadam"]])
def test_switching_suite_runs_paired_and_records_every_seed(reports, policies):
    runs = suite.run_switching(reports / "sw", profile="cpu", seeds=[0, 1], policies=policies, rank=4, scale=0.25,
                               update_proj_gap=2, **TINY)
    assert set(runs) == {(a, s) for a in (suite.FIXED, "switch, keep", "switch, ldadam") for s in (0, 1)}
    assert all(r.config["lr"] == 0.01 and r.config["lr_source"].startswith("paper") for r in runs.values())
    assert runs[(suite.FIXED, 0)].config["switch_subspace"] is False
    assert runs[("switch, ldadam", 1)].config["moments_on_switch"] == "ldadam"
    # same seed, same first batch and initialisation: the first logged train loss is identical across arms
    first = {a: runs[(a, 0)].history[0]["train_loss"] for a in runs.arms}
    assert len(set(first.values())) == 1
    table = suite.switching_table(runs, "nano", 1024)
    assert list(table["arm"]) == runs.arms and (table["state_vs_adamw"] < 1).all()
    assert len(records.load(reports / "sw")["runs"]) == 6
    verdicts = claims.evaluate_all(suite.switching_claims(policies), suite.measure(runs))
    assert all(v.n == 2 for v in verdicts)


def test_update_gap_and_projection_tables(reports):
    gaps = suite.run_update_gap(None, profile="cpu", seeds=[0], gaps=[1, 3], rank=4, scale=0.25, **TINY)
    t = suite.update_gap_table(gaps)
    assert list(t["T"]) == [1, 3] and list(t["switches"]) == [3, 1]
    assert list(t["paper_T"]) == [suite.paper_T(1, 4), suite.paper_T(3, 4)]
    assert (t["projector_share"] > 0).all() and (t["tokens_to_target"] > 0).all()
    proj = suite.run_projection(None, profile="cpu", seeds=[0], proj_methods=["svd", "random"], rank=4, scale=0.25,
                                update_proj_gap=2, **TINY)
    assert list(suite.projection_table(proj)["proj_method"]) == ["svd", "random"]
    sc = suite.run_scale(None, profile="cpu", seeds=[0], scales=[0.25, 1.0], rank=4, update_proj_gap=2, **TINY)
    assert list(suite.scale_table(sc)["block_lr"]) == [pytest.approx(0.0025), pytest.approx(0.01)]


def test_horizon_flags_reach_the_curve_claims_rows_for_a_still_moving_arm_only(reports):
    # 12 evaluations at steps 10..120; the last quarter (steps >= 92.5) holds steps 100, 110, 120
    runs = Runs()
    for s in range(3):
        settled = [4.0 - 0.2 * i for i in range(8)] + [2.4, 2.4 + 0.001 * s, 2.4, 2.4 - 0.001 * s]
        moving = [4.0 - 0.1 * i - 0.01 * s for i in range(12)]  # falls 0.1 per evaluation to the end
        runs[(suite.gap_arm(200), s)] = _rec(suite.gap_arm(200), s, settled, steps=120)
        runs[(suite.gap_arm(50), s)] = _rec(suite.gap_arm(50), s, moving, steps=120, wall=10.0 + s)
    assert suite.HORIZON_TOL == pytest.approx(math.log(1.05) / 4)  # a quarter of the perplexity margin, in nats
    table = suite.horizon_table(runs).set_index("arm")
    # the moving arm's last-quarter change: slope -0.01 / step over the quarter's 27.5 steps
    assert table.loc["T=50", "last_quarter_change"] == pytest.approx(-0.01 * 27.5)
    assert table.loc["T=50", "converged"] == False and table.loc["T=200", "converged"] == True  # noqa: E712
    assert abs(table.loc["T=200", "last_quarter_change"]) < suite.HORIZON_TOL and (table["n"] == 3).all()
    cs = [claims.Claim("gap", "s", "src", "val_loss", ("T=50", "T=200"), op=">", bound=0.0),
          claims.Claim("settled", "s", "src", "val_ppl", ("T=200",), quantity="value", op="<", bound=100.0),
          claims.Claim("overhead", "s", "src", "projector_share_T200", ("T=50",), quantity="value", op="<",
                       bound=0.05)]
    rows = claims.table(suite.evaluate(cs, runs, "cpu")).set_index("claim")
    assert "T=50: not converged at this horizon" in rows.loc["gap", "flags"]
    assert "T=200" not in rows.loc["gap", "flags"]  # the settled arm carries no flag
    assert rows.loc["settled", "flags"] == "" and rows.loc["overhead", "flags"] == ""  # not a curve read-out
    # a tolerance wider than the moving arm's change: converged, no flag
    assert suite.horizon(runs, tol=0.5)[1] == {}
