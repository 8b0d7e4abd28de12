"""The run-and-record loop over arms and seeds, the read-outs, and the equal-budget lr sweep."""
import json

import pytest

from lrkit import records
from lrkit.experiments import Runs, lr_grid, run_all, run_name, tail_mean, tune, tuned, TUNING_SEED
from lrkit.records import RunResult


def fake(name, *, seed, lr=1.0, offset=0.0, diverge=False):
    """A stand-in training run: loss = (log2 lr)^2 + offset + seed/100, history of 4 evaluations."""
    import math

    loss = None if diverge else math.log2(lr) ** 2 + offset + seed / 100
    hist = [{"step": s, "val_loss": None if loss is None else loss + (4 - s) / 10} for s in range(1, 5)]
    return RunResult(name=name, config={"lr": lr}, seed=seed, device="cpu", device_name="cpu", history=hist,
                     final={"val_loss": loss, "diverged": diverge})


def test_run_all_records_every_arm_and_seed(tmp_path):
    runs = run_all(fake, {"a": dict(offset=0.0), "b": dict(offset=1.0)}, tmp_path, seeds=[0, 1, 2])
    assert set(runs) == {(a, s) for a in "ab" for s in (0, 1, 2)} and runs.arms == ["a", "b"] and runs.seeds == [0, 1, 2]
    doc = records.load(tmp_path)
    assert set(doc["runs"]) == {run_name(a, s) for a in "ab" for s in (0, 1, 2)}
    assert doc["runs"]["b | seed 2"]["config"]["arm"] == "b"
    m = runs.measure("val_loss")
    assert m["b"][2] == pytest.approx(1.02) and m["a"][0] == 0.0
    summ = runs.summary(["val_loss"]).set_index("arm")
    assert summ.loc["b", "val_loss"] == pytest.approx(1.01) and summ.loc["b", "n"] == 3
    assert summ.loc["b", "val_loss_lo"] < 1.01 < summ.loc["b", "val_loss_hi"]


def test_tail_mean_and_diverged_runs():
    runs = run_all(fake, {"ok": {}, "bad": dict(diverge=True)}, None, seeds=[0])
    assert runs.measure(tail_mean("val_loss", 2))["ok"][0] == pytest.approx(0.05)
    assert runs.measure("val_loss")["bad"][0] is None
    assert runs.summary(["val_loss"]).set_index("arm").loc["bad", "diverged"] == 1
    with pytest.raises(ValueError, match="Invalid k"):
        tail_mean("val_loss", 0)


@pytest.mark.parametrize("seeds", [[], [0, 0], [-1], ["1"], [True]])
def test_bad_seeds_are_refused(seeds):
    with pytest.raises(ValueError, match="Invalid seeds"):
        run_all(fake, {"a": {}}, None, seeds=seeds)


def test_lr_grid_is_log_symmetric():
    assert lr_grid(0.01, 5, 2) == pytest.approx([0.0025, 0.005, 0.01, 0.02, 0.04])
    assert lr_grid(1.0, 1) == [1.0]
    with pytest.raises(ValueError, match="Invalid lr grid"):
        lr_grid(0.0)


def test_tune_gives_every_method_the_same_budget_and_picks_the_best(tmp_path):
    chosen = tune(fake, {"a": {}, "b": dict(offset=0.5)}, tmp_path, centers={"a": 1.0, "b": 4.0}, metric="val_loss",
                  group="pretrain")
    assert chosen["a"]["lr"] == 1.0 and chosen["b"]["lr"] == 1.0  # optimum of (log2 lr)^2 at lr = 1
    # b's grid (1 .. 16) had its best at the lower end: one rate further out (0.5) brackets it
    assert len(chosen["a"]["grid"]) == 5 and chosen["a"]["extended"] == [] and chosen["a"]["runs"] == 5
    assert chosen["b"]["extended"] == [0.5] and chosen["b"]["grid"] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert chosen["b"]["runs"] == 6 and chosen["b"]["scores"][0] == pytest.approx(11.5)
    assert not chosen["b"]["at_edge"] and not chosen["a"]["at_edge"] and chosen["b"]["edge_reason"] == ""
    doc = records.load(tmp_path)
    assert all(r["seed"] == TUNING_SEED for r in doc["runs"].values()) and len(doc["runs"]) == 11
    with pytest.raises(ValueError, match="no centre lr"):
        tune(fake, {"c": {}}, None, centers={}, metric="val_loss")


def test_tune_never_picks_a_diverged_lr():
    def unstable(name, *, seed, lr):
        return fake(name, seed=seed, lr=lr, diverge=lr < 1)
    t = tune(unstable, {"a": {}}, None, centers={"a": 0.5}, metric="val_loss")["a"]
    # the best finite rate (1.0) sits next to a diverged one (0.5): no extension, the record says why
    assert t["lr"] == 1.0 and t["at_edge"] and t["edge_reason"] == "diverges beyond" and t["extended"] == []
    with pytest.raises(RuntimeError, match="every learning rate"):
        tune(lambda name, seed, lr: fake(name, seed=seed, diverge=True), {"a": {}}, None, centers={"a": 1.0},
             metric="val_loss")


def test_tuned_reads_the_tuning_record_and_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "REPORTS_DIR", tmp_path)
    import lrkit.experiments as ex

    monkeypatch.setattr(ex.records, "report_dir",
                        lambda nb, prof, root=None: tmp_path / nb / prof)
    with pytest.raises(FileNotFoundError, match="make run/notebooks/galore/tuning.ipynb"):
        tuned("galore", "cpu", "pretrain")
    out = tmp_path / "galore" / "tuning" / "cpu"
    out.mkdir(parents=True)
    records.save_summary(out, [], tuned={"pretrain": {"full": {"lr": 0.003}, "galore": {"lr": 0.01}}})
    assert tuned("galore", "cpu", "pretrain") == {"full": 0.003, "galore": 0.01}
    assert tuned("galore", "smoke", "pretrain") == {"full": 0.003, "galore": 0.01}  # smoke falls back to cpu
    with pytest.raises(KeyError, match="no tuning group 'finetune'"):
        tuned("galore", "cpu", "finetune")


def test_tune_extends_an_edge_optimum_up_to_its_limit_and_says_so():
    import math

    far = lambda name, *, seed, lr: fake(name, seed=seed, lr=lr / 8)  # optimum at lr = 8
    t = tune(far, {"a": {}}, None, centers={"a": 0.25}, metric="val_loss")["a"]  # grid 1/16 .. 1
    assert t["extended"] == [2.0, 4.0, 8.0] and t["lr"] == 8.0 and t["runs"] == 8
    assert t["at_edge"] and t["edge_reason"] == "still improving at the extension limit"
    t = tune(far, {"a": {}}, None, centers={"a": 0.25}, metric="val_loss", max_extend=4)["a"]
    assert t["extended"] == [2.0, 4.0, 8.0, 16.0] and t["lr"] == 8.0 and not t["at_edge"]
    # higher-is-better metrics extend toward the better side too
    up = lambda name, *, seed, lr: RunResult(name=name, config={"lr": lr}, seed=seed, device="cpu",
                                             device_name="cpu", history=[], final={"acc": -abs(math.log2(lr) + 6)})
    t = tune(up, {"a": {}}, None, centers={"a": 1.0}, metric="acc", lower_is_better=False, max_extend=6)["a"]
    assert t["lr"] == pytest.approx(1 / 64) and not t["at_edge"] and len(t["extended"]) == 5
    with pytest.raises(ValueError, match="Invalid max_extend: -1"):
        tune(far, {"a": {}}, None, centers={"a": 1.0}, metric="val_loss", max_extend=-1)


def test_edge_flags_name_the_arms_still_at_an_edge(tmp_path, monkeypatch):
    import lrkit.experiments as ex

    monkeypatch.setattr(ex.records, "report_dir", lambda nb, prof, root=None: tmp_path / nb / prof)
    assert ex.edge_flags("galore", "cpu", "pretrain") == {}  # no record: nothing to flag
    chosen = tune(fake, {"in": {}}, None, centers={"in": 1.0}, metric="val_loss")
    chosen |= tune(lambda name, *, seed, lr: fake(name, seed=seed, lr=lr, diverge=lr > 4), {"edge": {}}, None,
                   centers={"edge": 0.125}, metric="val_loss", max_extend=0)
    out = tmp_path / "galore" / "tuning" / "cpu"
    out.mkdir(parents=True)
    records.save_summary(out, [], tuned={"pretrain": chosen})
    flags = ex.edge_flags("galore", "cpu", "pretrain")
    assert list(flags) == ["edge"] and "0.5 at the upper edge" in flags["edge"] and "extension limit" in flags["edge"]
