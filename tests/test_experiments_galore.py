"""The GaLore suite (lrkit.experiments.galore), the fine-tuning failure rule (lrkit.finetune.failed) and the
convergence read-outs it uses (lrkit.analysis): hand-made records checked against independent arithmetic,
and the two-group full-rank baseline (equal_lr_control, equal_lr_finetune) on tiny models."""
import json
import math

import numpy as np
import pytest

from lrkit import analysis, claims, records
from lrkit.experiments import Runs
from lrkit.experiments import galore as suite
from lrkit.finetune import FAILED_CLASS_SHARE, FAILED_MIN_GAIN, ClassifierTrainConfig, failed
from lrkit.records import RunResult


def lm_run(arm, seed, losses, steps=None, batch_size=4, seq_len=8, **final):
    steps = steps or [10 * (i + 1) for i in range(len(losses))]
    hist = [{"step": s, "train_loss": v, "val_loss": v, "val_ppl": math.exp(v)} for s, v in zip(steps, losses)]
    return RunResult(name=f"{arm} | seed {seed}", config={"arm": arm, "batch_size": batch_size, "seq_len": seq_len},
                     seed=seed, device="cpu", device_name="cpu", history=hist,
                     final={"val_loss": losses[-1], "val_ppl": math.exp(losses[-1]), **final},
                     memory={"optimizer_state_bytes": 100})


def ft_run(arm, seed, f1, is_failed=False, rank=None):
    return RunResult(name=f"{arm} | seed {seed}", config={"arm": arm, "rank": rank, "lr": 1e-4}, seed=seed,
                     device="cpu", device_name="cpu", history=[],
                     final={"macro_f1": f1, "accuracy": f1, "failed": is_failed, "majority_accuracy": 0.5},
                     memory={"optimizer_state_bytes": 10})


# ------------------------------------------------------------------------------ convergence read-outs
def test_to_target_interpolates_between_evaluations_and_counts_tokens():
    r = lm_run("a", 0, [5.0, 4.0, 3.0], steps=[10, 20, 30], batch_size=4, seq_len=8)  # 32 tokens a step
    assert analysis.to_target(r, 3.5) == pytest.approx(25 * 32)  # halfway between steps 20 and 30
    assert analysis.to_target(r, 4.0) == pytest.approx(20 * 32)  # exactly on an evaluation
    assert analysis.to_target(r, 9.0) == pytest.approx(10 * 32)  # already there at the first evaluation
    assert analysis.to_target(r, 2.0) is None
    assert analysis.to_target(r, 3.5, x="step") == pytest.approx(25)


def test_reachable_target_is_reached_by_every_run():
    runs = [lm_run("a", 0, [5.0, 4.0, 3.0]), lm_run("b", 0, [6.0, 3.5, 3.8])]  # b's best is 3.5, not its last
    target = analysis.reachable_target(runs)
    assert target == 3.5
    assert all(analysis.to_target(r, target) is not None for r in runs)
    with pytest.raises(ValueError, match="no run logged"):
        analysis.reachable_target([lm_run("a", 0, [1.0])], metric="accuracy")


def test_mean_over_run_is_the_trapezoid_area_over_the_span():
    r = lm_run("a", 0, [5.0, 4.0, 1.0], steps=[10, 20, 40])
    xs = np.array([10, 20, 40]) * 32.0
    expected = ((5 + 4) / 2 * (xs[1] - xs[0]) + (4 + 1) / 2 * (xs[2] - xs[1])) / (xs[2] - xs[0])
    assert analysis.mean_over_run(r) == pytest.approx(expected)
    assert analysis.mean_over_run(lm_run("a", 0, [5.0])) is None
    # a run that gets low sooner has the lower mean, with the same end point
    fast, slow = lm_run("f", 0, [5.0, 2.0, 2.0]), lm_run("s", 0, [5.0, 4.0, 2.0])
    assert analysis.mean_over_run(fast) < analysis.mean_over_run(slow)


# ------------------------------------------------------------------------------ fine-tuning failure rule
def test_failure_rule_edges():
    ok = {"accuracy": 0.80, "majority_accuracy": 0.50, "top_class_share": 0.60}
    assert not failed(ok)
    assert failed(ok | {"top_class_share": FAILED_CLASS_SHARE})  # one class, exactly at the share
    assert not failed(ok | {"top_class_share": FAILED_CLASS_SHARE - 1e-9})
    assert failed(ok | {"accuracy": 0.50 + FAILED_MIN_GAIN - 1e-9})  # not 2 points above majority
    assert not failed(ok | {"accuracy": 0.50 + FAILED_MIN_GAIN})
    # the tweets case: always answering "negative" on a 70/30 set is 70 % accurate, and failed
    assert failed({"accuracy": 0.70, "majority_accuracy": 0.70, "top_class_share": 1.0})


def test_test_seed_is_validated():
    assert ClassifierTrainConfig(test_seed=0).test_seed == 0
    with pytest.raises(ValueError, match="Invalid test_seed"):
        ClassifierTrainConfig(test_seed=-1)


# ------------------------------------------------------------------------------ read-outs and scores
def test_score_is_the_mean_over_tasks_and_a_failed_run_has_none():
    runs = Runs()
    for s, (a, b, bad) in enumerate([(0.8, 0.6, False), (0.7, 0.9, False), (0.9, 0.5, True)]):
        runs[("tweets galore", s)] = ft_run("tweets galore", s, a)
        runs[("bbc galore", s)] = ft_run("bbc galore", s, b, is_failed=bad)
    assert suite.score(runs, ["tweets", "bbc"], "galore") == {0: pytest.approx(0.7), 1: pytest.approx(0.8), 2: None}
    m = suite.measure(runs, ["tweets", "bbc"], ["galore"])
    assert m("score") == {"galore": {0: pytest.approx(0.7), 1: pytest.approx(0.8), 2: None}}
    assert m("bbc macro_f1") == {"galore": {0: 0.6, 1: 0.9, 2: None}}  # prefix stripped, failed left out
    t = suite.score_table(runs, ["tweets", "bbc"], ["galore"])
    assert t.loc[0, "n"] == 2 and t.loc[0, "score"] == pytest.approx(0.75)
    ft = suite.finetune_table(runs, ["tweets", "bbc"], ["galore"])
    assert ft.set_index("task").loc["bbc", "failed"] == 1 and ft.set_index("task").loc["bbc", "n"] == 3


def test_failed_runs_are_counted_in_verdicts_not_dropped():
    runs = Runs()
    for s in range(3):
        runs[("tweets full", s)] = ft_run("tweets full", s, 0.80 + 0.01 * s)
        runs[("tweets galore", s)] = ft_run("tweets galore", s, 0.79 + 0.01 * s, is_failed=s == 2)
    c = claims.Claim("x", "s", "Table 4", "tweets macro_f1", ("galore", "full"), op=">", bound=-0.02,
                     lower_is_better=False)
    v = claims.evaluate(c, suite.measure(runs, ["tweets"])(c.metric))
    # the failed run counts at the worst macro-F1 measured (0.79), not dropped: differences -0.01, -0.01, -0.03
    assert v.n == 3 and v.failed == 1 and v.estimate == pytest.approx(-0.05 / 3)


def test_score_counts_a_seed_with_a_missing_task_as_failed():
    runs = Runs()
    for s in range(2):
        runs[("tweets galore", s)] = ft_run("tweets galore", s, 0.8)
    runs[("bbc galore", 0)] = ft_run("bbc galore", 0, 0.6)  # seed 1's bbc run is missing
    assert suite.score(runs, ["tweets", "bbc"], "galore") == {0: pytest.approx(0.7), 1: None}


def test_pretrain_table_ratios_are_paired_by_seed():
    runs = Runs()
    for s, (f, g) in enumerate([(4.0, 4.1), (3.0, 3.05)]):
        runs[("full-rank", s)] = lm_run("full-rank", s, [5.0, f])
        runs[("galore", s)] = lm_run("galore", s, [5.0, g])
    t = suite.pretrain_table(runs).set_index("arm")
    expected = np.mean([math.exp(4.1) / math.exp(4.0), math.exp(3.05) / math.exp(3.0)])
    assert t.loc["galore", "vs_full_rank"] == pytest.approx(expected)
    assert t.loc["galore", "paper_60m_ppl"] == 34.88 and t.loc["full-rank", "paper_60m_ppl"] == 34.06


# ------------------------------------------------------------------------------ paper constants, claims
def test_paper_numbers_and_claims():
    p = suite.PAPER["pretrain_ppl"]["60m"]
    assert (p["full-rank"], p["galore"], p["lora"], p["low-rank"]) == (34.06, 34.88, 34.99, 78.18)
    # Table 4's averages are the means of its eight task scores (checked when the numbers were entered)
    assert suite.PAPER["glue_avg"]["galore r=8"] == 85.94 and suite.PAPER["glue_avg"]["lora r=8"] == 85.93
    by_id = {c.id: c for c in suite.CLAIMS_GALORE}
    assert len(by_id) == len(suite.CLAIMS_GALORE)
    head = by_id["galore-vs-full-rank"]
    assert head.paper == pytest.approx(34.88 / 34.06) and head.arms == ("galore", suite.BASELINE)
    assert head.op == "between" and head.bound == claims.MARGINS["perplexity"][0] and head.margin_reason
    assert by_id["baseline-not-beaten"].arms == (suite.REFERENCE, suite.BASELINE)
    # every claim reading the full-rank arm reads the two-group baseline, never the one-lr reference
    assert all(suite.BASELINE in c.arms for c in suite.CLAIMS_GALORE if "full-rank" in c.id or "low-rank" in c.id)
    tie = {c.id: c for c in suite.CLAIMS_LORA}["galore-lora-tie-r16"]
    assert tie.op == "between" and tie.bound == 1.05 and tie.paper == pytest.approx(34.88 / 34.99)
    # two-sided where the paper says on par, a margin reason wherever there is a margin, scores higher-is-better
    every = (suite.CLAIMS_GALORE + suite.CLAIMS_LORA + suite.rank_claims()
             + suite.memory_claims(["nano", "micro"], suite.MEMORY_METHODS + ("galore_8bit",)))
    for c in every:
        assert (c.op == "between") <= bool(c.margin_reason), c.id
        assert c.lower_is_better == (c.metric not in ("score",) and "macro_f1" not in c.metric), c.id
        assert c.accounting == (c.metric.endswith("_bytes") or c.metric in ("state_formula_gap", "state_ratio",
                                                                            "grad_share")), c.id
    assert {c.id for c in every if c.op == "between"} >= {"galore-vs-full-rank", "lora-vs-full-rank",
                                                          "ft-galore-vs-full", "ft-galore-vs-lora",
                                                          "galore-lora-tie-r16", "galore-lora-speed-tie-r16",
                                                          "ft-rank-4-vs-8"}
    rank = {c.id: c for c in suite.rank_claims([16, 2, 8, 4])}
    assert rank["ppl-falls-with-rank"].arms == ("galore r=2", "galore r=4", "galore r=8", "galore r=16")
    assert "ft-rank-4-vs-8" not in {c.id for c in suite.rank_claims([2, 16])}
    mem = {c.id for c in suite.memory_claims(["nano"])}
    assert "state-cut-grows-with-size" not in mem and "8bit-state-cut" not in mem
    # Table 6's value of the monotone claim's quantity: its weakest step (the kit's estimate is its weakest step
    # too), 60M -> 130M: 0.28/0.51 - 0.13/0.23; the other steps are larger cuts
    grows = {c.id: c for c in suite.memory_claims(["nano", "micro"])}["state-cut-grows-with-size"]
    assert grows.paper == pytest.approx(0.28 / 0.51 - 0.13 / 0.23) and "Table 6" in grows.paper_source
    assert "60M -> 130M" in grows.paper_source
    assert suite.paper_weakest_state_step(("130m", "350m", "1b"))[1:] == ("350m", "1b")
    assert "8bit-state-cut" in {c.id for c in suite.memory_claims(["nano", "micro"], suite.MEMORY_METHODS + ("galore_8bit",))}


def test_arms_carry_their_tuned_rates_and_knobs():
    lrs = {"full-rank": 1e-3, "galore": 1e-2, "lora": 2e-2, "low-rank": 3e-3, suite.REFERENCE: 5e-3}
    arms = suite.pretrain_arms(lrs, rank=8, scale=0.25, update_proj_gap=50)
    # the baseline: GaLore's two learning-rate groups at GaLore's alpha, at its own tuned rate
    assert arms["full-rank"] == {"method": "equal_lr_control", "lr": 1e-3, "scale": 0.25}
    assert arms[suite.REFERENCE] == {"method": "full", "lr": 5e-3}
    assert arms["galore"] == {"method": "galore", "lr": 1e-2, "rank": 8, "scale": 0.25, "update_proj_gap": 50}
    assert arms["low-rank"]["method"] == "low_rank" and arms["lora"]["rank"] == 8
    ft = suite.ft_arms({"full": 1e-4, "galore": 2e-4, "lora": 1e-3}, rank=4, scale=4.0, update_proj_gap=8,
                       prefix="bbc ")
    assert set(ft) == {"bbc full", "bbc galore", "bbc lora"} and "rank" not in ft["bbc full"]
    assert ft["bbc full"] == {"method": "equal_lr_finetune", "lr": 1e-4, "scale": 4.0}
    assert "scale" not in ft["bbc lora"]
    # same grid points for GaLore and its baseline; one knob (the lr) per method
    assert suite.CENTERS["pretrain"]["galore"] == suite.CENTERS["pretrain"]["full-rank"]


def test_fine_tunes_refresh_the_projector_at_least_twice():
    f = suite.FINETUNE_SCALE
    steps = f["epochs"] * -(-f["train_size"] // f["batch_size"])
    assert suite.ft_refreshes(steps, f["update_proj_gap"]) >= 2
    assert suite.ft_refreshes(24, 500) == 0 and suite.ft_refreshes(24, 8) == 2 and suite.ft_refreshes(25, 8) == 3


def test_edge_flags_are_mapped_to_the_notebook_arms(monkeypatch):
    import lrkit.experiments as ex

    def fake(paper, profile, group):
        return {"pretrain": {"galore": "galore: at the upper edge"}, "bbc": {"lora": "lora: at the upper edge"},
                "tweets": {}}[group]
    monkeypatch.setattr(ex, "edge_flags", fake)
    f = suite.galore_flags("cpu", ["tweets", "bbc"])
    assert set(f) == {"galore", "lora", "bbc lora"} and "pretrain" in f["galore"] and "bbc" in f["lora"]
    assert set(suite.rank_flags("cpu", [4, 8], ["tweets"])) == {"galore r=4", "galore r=8"}
    assert set(suite.lora_flags("cpu", [4])) == {"galore r=4"}


def test_memory_measure_ratios():
    runs = Runs()
    for size, full, gal in (("nano", 100, 70), ("micro", 400, 200)):
        for m, b in (("full", full), ("galore", gal), ("galore_per_layer", gal)):
            runs[(f"{size} {m}", 0)] = RunResult(
                name=f"{size} {m} | seed 0", config={}, seed=0, device="cpu", device_name="cpu",
                final={"optimizer_state_bytes": b, "analytic_state_bytes": b + (1 if m == "galore" else 0),
                       "grad_peak_bytes": 10 if m == "galore_per_layer" else 40})
    m = suite.memory_measure(runs, ["nano", "micro"])
    assert m("state_ratio") == {"nano": {0: 0.7}, "micro": {0: 0.5}}
    assert m("grad_share") == {"nano galore_per_layer": {0: 0.25}, "micro galore_per_layer": {0: 0.25}}
    assert m("state_formula_gap")["micro galore"] == {0: 1.0} and m("state_formula_gap")["micro full"] == {0: 0.0}


# ------------------------------------------------------------------------------ tuning record
def test_tuned_lrs_and_budget_read_the_tuning_record(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(records, "REPORTS_DIR", tmp_path)
    out = records.report_dir("galore/tuning", "cpu")
    chosen = {"pretrain": {a: {"lr": lr, "grid": [lr / 2, lr, lr * 2], "scores": [3.0, 2.0, 2.5], "at_edge": a == "lora",
                               "budget": "3 learning rates x 1 seed (1000), factor 2 apart"}
                           for a, lr in (("full-rank", 1e-3), ("lora", 4e-3))}}
    records.save_run(out, RunResult(name="tune pretrain full-rank lr=0.001", seed=1000, device="cpu", device_name="cpu",
                                    config={"tuning": "pretrain", "steps": 500, "model_size": "nano"}))
    records.save_summary(out, [], tuned=chosen)
    assert suite.tuned_lrs("smoke", "pretrain", steps=30, model_size="nano") == {"full-rank": 1e-3, "lora": 4e-3}
    printed = capsys.readouterr().out
    assert "cpu tuning record" in printed and "'steps': (500, 30)" in printed and "model_size" not in printed
    note = suite.tuning_budget("cpu", "pretrain")
    assert "full-rank 0.001" in note and "at the edge of its grid after extension: lora" in note and "factor 2" in note
    assert json.loads((out / "metrics.json").read_text())["summary"]["tuned"]["pretrain"]["lora"]["lr"] == 4e-3


# ------------------------------------------------------------------------------ the equal-lr control
@pytest.fixture(scope="module")
def corpus():
    from lrkit import data
    return data.load("shakespeare", vocab_size=1024)


def test_control_with_scale_one_is_plain_adamw(corpus):
    """Full-rank AdamW with GaLore's per-group rates at scale 1 is AdamW at one rate: the same numbers."""
    from lrkit.experiments import LMTrainConfig, pretrain

    train = LMTrainConfig(steps=3, batch_size=2, seq_len=16, eval_every=3, eval_windows=2)
    ctl = suite.equal_lr_control("c", corpus, train, model_size="nano", lr=3e-3, scale=1.0, seed=0)
    ref = pretrain("r", corpus, train, method="full", model_size="nano", lr=3e-3, seed=0)
    assert ctl.final["val_loss"] == ref.final["val_loss"]
    assert ctl.memory["optimizer_state_bytes"] == ref.memory["optimizer_state_bytes"]


def test_control_gives_the_projected_weights_lr_times_scale(corpus, monkeypatch):
    import lrkit.train
    from lrkit.experiments import LMTrainConfig
    from lrkit.methods import block_linears

    seen = {}

    def fake_train_lm(name, model, opt, corpus, train, extra_config=None):
        seen.update(model=model, opt=opt, extra=extra_config)
        return "result"
    monkeypatch.setattr(lrkit.train, "train_lm", fake_train_lm)
    train = LMTrainConfig(steps=1, batch_size=2, seq_len=16, eval_every=1, eval_windows=2)
    assert suite.pretrain_run("c", corpus, train, method="equal_lr_control", model_size="nano", lr=0.01,
                              scale=0.25, seed=1) == "result"
    rest, blocks = seen["opt"].param_groups
    assert rest["lr"] == 0.01 and blocks["lr"] == pytest.approx(0.0025)
    assert {id(p) for p in blocks["params"]} == {id(m.weight) for m in block_linears(seen["model"]).values()}
    assert len(rest["params"]) + len(blocks["params"]) == len(list(seen["model"].parameters()))
    assert seen["extra"]["block_lr"] == pytest.approx(0.0025) and seen["extra"]["control"] == "equal_lr"


def test_full_fine_tuning_gets_galores_groups(monkeypatch):
    import lrkit.finetune
    from lrkit.experiments import ClassifierTrainConfig
    from lrkit.methods import block_linears

    seen = {}

    def fake(name, model, tokenizer, opt, dataset, train, extra_config=None):
        seen.update(model=model, opt=opt, extra=extra_config)
        return "result"
    monkeypatch.setattr(lrkit.finetune, "train_classifier", fake)
    ds = {"labels": ["a", "b"]}
    assert suite.finetune_run("f", ds, ClassifierTrainConfig(), method="equal_lr_finetune", lr=1e-4, scale=4.0,
                              seed=0) == "result"
    rest, blocks = seen["opt"].param_groups
    assert rest["lr"] == 1e-4 and blocks["lr"] == pytest.approx(4e-4)
    assert {id(p) for p in blocks["params"]} == {id(m.weight) for m in block_linears(seen["model"]).values()}
    assert len(rest["params"]) + len(blocks["params"]) == len(list(seen["model"].parameters()))


# ------------------------------------------------------------------------------ one scale for the folder
@pytest.mark.parametrize("nb", ["tuning", "galore", "ablation_rank", "ablation_lora"])
def test_cpu_profile_runs_at_the_scale_the_learning_rates_were_tuned_at(nb):
    """Every notebook that reads the tuning record runs, at the cpu profile, at the tuning notebook's
    pre-training (and fine-tuning) scale: a tuned learning rate is only valid at the scale it was tuned at."""
    from pathlib import Path

    import papermill
    import yaml

    root = Path(__file__).resolve().parents[1]

    def cpu_params(name):
        path = root / "notebooks" / "galore" / f"{name}.ipynb"
        params = {k: eval(v["default"]) for k, v in papermill.inspect_notebook(str(path)).items()}
        return params | (yaml.safe_load((root / "configs" / "cpu" / "galore" / f"{name}.yaml").read_text()) or {})

    mine, tuning = cpu_params(nb), cpu_params("tuning")
    for key, value in suite.PRETRAIN_SCALE.items():
        if key in mine:
            assert mine[key] == tuning[key] == value, (nb, key)
    for key, value in suite.FINETUNE_SCALE.items():
        if f"ft_{key}" in mine:
            assert mine[f"ft_{key}"] == tuning[f"ft_{key}"] == value, (nb, key)
    if "tasks" in mine:
        assert set(mine["tasks"]) <= set(tuning["tasks"]) == set(suite.TASKS)
