"""The AdaLomo suite (lrkit/experiments/adalomo.py): claims that name the arms the suites build, the tuning
record the notebooks read, the fine-tune failure rule, the measure functions, and short seeded runs of the
suites themselves (tuning -> main, normalization, factorization) on a nano LLaMA."""
import math

import numpy as np
import pytest

from lrkit import claims, records
from lrkit.experiments import LMTrainConfig, Runs, adalomo as suite, pretrain, tuned
from lrkit.records import RunResult


def _run(name, final, arm=None, seed=0):
    return RunResult(name=name, config={"arm": arm or name, "lr": 0.1}, seed=seed, device="cpu", device_name="cpu",
                     final=final, wall_time_s=1.0)


@pytest.fixture
def reports(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "REPORTS_DIR", tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def corpus():
    from lrkit import data

    return data.load("shakespeare", vocab_size=1024)


TINY = LMTrainConfig(steps=3, batch_size=2, seq_len=16, eval_every=3, eval_windows=2, log_every=1)


def test_claims_name_the_arms_the_suites_build():
    main_arms = set(suite.METHODS)
    for c in suite.MAIN_CLAIMS:
        assert set(c.arms) <= main_arms, c.id
    norm_arms = {"grouped", "none", "global", "layer", "grouped (high lr)", "none (high lr)"}
    for c in suite.NORMALIZATION_CLAIMS:
        assert set(c.arms) <= norm_arms, c.id
    for c in suite.FACTORIZATION_CLAIMS:
        for v in c.arms:
            assert suite.variant_knobs(v)["second_moment"] in ("nmf", "svd", "qr", "full"), c.id
    ids = [c.id for cs in suite.CLAIMS.values() for c in cs]
    assert len(ids) == len(set(ids))
    assert suite.CLAIMS["adalomo"][0].id == "adalomo-on-par-with-adamw"  # the headline, 5 seeds at cpu


def test_variant_knobs():
    assert suite.variant_knobs("qr:2", 5) == dict(second_moment="qr", factor_rank=2, nmf_iters=5)
    assert suite.variant_knobs("full")["factor_rank"] == 1


def test_majority_macro_f1():
    from sklearn.metrics import f1_score

    for labels in ([0, 0, 0, 1], [1, 1, 0, 0, 0, 0, 0], [0, 1, 2, 2, 2]):
        y = np.array(labels)
        major = np.full_like(y, np.bincount(y).argmax())
        expect = f1_score(y, major, average="macro", labels=np.unique(y), zero_division=0)
        assert suite.majority_macro_f1({"test": {"label": y}}) == pytest.approx(expect)


def test_measure_main_pairs_by_seed_and_drops_failed_finetunes():
    pre, fine, mem = Runs(), Runs(), Runs()
    for s in (0, 1, 2):
        for arm, loss in (("AdaLomo", 4.0 + s / 10), ("AdamW", 4.1 + s / 10), ("LOMO", 4.6 + s / 10)):
            pre[(arm, s)] = _run(f"{arm} | seed {s}", {"val_loss": loss}, arm, s)
            mem[(f"mem {arm}", s)] = _run("m", {"held_bytes": {"AdaLomo": 10, "AdamW": 100, "LOMO": 9}[arm]},
                                          f"mem {arm}", s)
            fine[(f"ft {arm}", s)] = _run("f", {"macro_f1": 0.8, "failed": arm == "LOMO" and s == 1}, f"ft {arm}", s)
    measure = suite.measure_main(pre, fine, mem)
    assert measure("val_loss")["AdaLomo"] == {0: 4.0, 1: 4.1, 2: 4.2}
    assert measure("held_bytes")["AdamW"] == {0: 100, 1: 100, 2: 100}
    assert measure("ft_macro_f1")["LOMO"] == {0: 0.8, 1: None, 2: 0.8}
    v = {x.claim: x for x in claims.evaluate_all(suite.MAIN_CLAIMS, measure)}
    assert v["adalomo-beats-lomo"].verdict == claims.HOLDS and v["adalomo-beats-lomo"].n == 3
    assert v["adalomo-memory-far-below-adamw"].verdict == claims.HOLDS  # 0.1, zero spread
    assert v["adalomo-on-par-with-adamw"].estimate == pytest.approx(np.exp(np.mean(np.log([4.0 / 4.1, 4.1 / 4.2,
                                                                                           4.2 / 4.3]))))


def test_sweep_table_and_budget(reports):
    chosen = {"pretrain": {"A": {"lr": 0.1, "grid": [0.03, 0.1, 0.3], "scores": [4.2, 4.0, None], "at_edge": False,
                                 "budget": "3 learning rates x 1 seed (1000), factor 3 apart"},
                           "B": {"lr": 1e-3, "grid": [1e-3, 3e-3, 9e-3], "scores": [4.1, 4.3, 4.4], "at_edge": True,
                                 "budget": "3 learning rates x 1 seed (1000), factor 3 apart"}}}
    t = suite.sweep_table(chosen)
    assert len(t) == 6 and t.chosen.sum() == 2 and set(t[t.chosen].lr) == {0.1, 1e-3}
    records.save_summary(records.report_dir("adalomo/tuning", "cpu"), t, tuned=chosen)
    assert tuned("adalomo", "smoke", "pretrain") == {"A": 0.1, "B": 1e-3}  # smoke falls back to the cpu record
    b = suite.budget("smoke", "pretrain")
    assert "cpu record" in b and "3 learning rates" in b and "edge for B" in b
    with pytest.raises(FileNotFoundError):
        suite.budget("gpu", "pretrain")


def test_adalomo_pretrain_grouped_equals_the_shared_pretrain(corpus):
    a = suite.adalomo_pretrain("a", corpus, TINY, model_size="nano", lr=0.1, seed=3)
    b = pretrain("b", corpus, TINY, method="adalomo", model_size="nano", lr=0.1, seed=3)
    assert a.final["val_loss"] == b.final["val_loss"] and a.final["state_bytes"] == b.memory["optimizer_state_bytes"]
    c = suite.adalomo_pretrain("c", corpus, TINY, model_size="nano", lr=0.1, seed=3, normalization="layer")
    assert c.config["normalization"] == "layer" and math.isfinite(c.final["val_loss"])


def test_suites_end_to_end(reports, corpus):
    """tuning -> main (two seeds), normalization with the lm-eval cloze task, factorization: every record
    written, verdicts computed on paired seeds."""
    chosen = suite.tuning(reports / "t", corpus=corpus, train=TINY, model_size="nano", points=1)
    records.save_summary(records.report_dir("adalomo/tuning", "cpu"), suite.sweep_table(chosen), tuned=chosen)
    pre, fine, mem = suite.main(reports / "m", profile="cpu", corpus=corpus, train=TINY, model_size="nano",
                                seeds=[0, 1])
    assert fine is None and set(pre.arms) == set(suite.METHODS) and pre.seeds == [0, 1]
    table, _ = suite.main_tables(pre, fine, mem)
    assert table.set_index("arm").loc["AdamW", "held vs AdamW"] == 1.0
    v = {x.claim: x for x in claims.evaluate_all(suite.MAIN_CLAIMS[:3], suite.measure_main(pre, fine, mem))}
    assert v["adalomo-memory-far-below-adamw"].verdict == claims.HOLDS and v["adalomo-memory-far-below-adamw"].n == 2
    assert len(records.load(reports / "m")["runs"]) == 12

    pytest.importorskip("lm_eval")
    runs, lr = suite.normalization(reports / "n", profile="cpu", corpus=corpus, train=TINY, model_size="nano",
                                   seeds=[0], normalizations=["grouped", "none"], high_lr_factor=3.0, cloze_docs=8)
    assert lr == chosen["pretrain"]["AdaLomo"]["lr"]
    assert runs["none (high lr)", 0].config["lr"] == pytest.approx(3 * lr)
    assert all(0 <= r.final["cloze_acc"] <= 1 for r in runs.values())
    runs, memory = suite.factorization(reports / "f", profile="cpu", corpus=corpus, train=TINY, model_size="nano",
                                       seeds=[0], variants=["nmf:1", "qr:1"], memory_variants=["qr:2"])
    assert list(memory.variant) == ["nmf:1", "qr:1", "qr:2"]
    assert (memory.state_bytes == memory.persistent_bytes).all()
    assert runs["qr:1", 0].final["state_bytes"] == memory.set_index("variant").loc["qr:1", "state_bytes"]
