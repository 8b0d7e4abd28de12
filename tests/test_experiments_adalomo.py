"""The AdaLomo suite (lrkit/experiments/adalomo.py): claims that name the arms the suites build, the tuning
record the notebooks read (and the edge flags taken from it), tuning data disjoint from the claims' test
examples, the fine-tune failure rule, the history read-outs, the measure functions, and short seeded runs of
the suites themselves (tuning -> main, normalization, factorization) on a nano LLaMA."""
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
    main_arms = set(suite.METHODS) | {f"{p} {m}" for p in ("ft", "mem") for m in suite.METHODS}
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
    # the read-outs the claims name are final metrics the runs record or the suite's history readers
    names = {c.metric.removeprefix("ft_") for cs in suite.CLAIMS.values() for c in cs}
    assert names <= {"val_ppl", "macro_f1", "held_bytes", "state_bytes", "cloze_acc"} | set(suite.READERS)


def test_claims_are_two_sided_where_they_say_on_par_and_bytes_are_accounting():
    by_id = {c.id: c for cs in suite.CLAIMS.values() for c in cs}
    ppl, acc = claims.MARGINS["perplexity"][0], claims.MARGINS["accuracy"][0]
    for cid in ("adalomo-on-par-with-adamw", "grouped-matches-global", "grouped-matches-layer", "nmf-rank1-near-full",
                "nmf-rank1-as-good-as-rank4"):
        c = by_id[cid]
        assert (c.metric, c.quantity, c.op, c.bound) == ("val_ppl", "ratio", "between", ppl), cid
    c = by_id["adalomo-on-par-finetune"]
    assert (c.quantity, c.op, c.bound, c.lower_is_better) == ("difference", "between", acc, False)
    for cid in ("grouped-no-worse-than-none", "nmf-no-worse-than-svd", "nmf-no-worse-than-pivoted-qr"):
        assert (by_id[cid].op, by_id[cid].bound) == ("<", ppl) and by_id[cid].margin_reason, cid
    assert {c.id for c in by_id.values() if c.accounting} == {"adalomo-memory-far-below-adamw", "nmf-rank1-state-small"}
    assert all(not c.lower_is_better for c in by_id.values() if "f1" in c.metric or "acc" in c.metric)
    # a "much better" AdaLomo (26 % lower perplexity, the old one-sided claim's "holds") is now no equivalence
    m = {"val_ppl": {"AdaLomo": {s: 56.0 + s for s in range(5)}, "AdamW": {s: 76.0 + s for s in range(5)}}}
    assert claims.evaluate(by_id["adalomo-on-par-with-adamw"], m["val_ppl"]).verdict == claims.CONTRADICTED


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


def test_measure_main_pairs_by_seed_and_counts_failed_finetunes():
    pre, fine, mem = Runs(), Runs(), Runs()
    for s in (0, 1, 2):
        for arm, loss in (("AdaLomo", 4.0 + s / 10), ("AdamW", 4.1 + s / 10), ("LOMO", 4.6 + s / 10)):
            pre[(arm, s)] = _run(f"{arm} | seed {s}", {"val_loss": loss, "val_ppl": math.exp(loss)}, arm, s)
            mem[(f"mem {arm}", s)] = _run("m", {"held_bytes": {"AdaLomo": 10, "AdamW": 100, "LOMO": 9}[arm]},
                                          f"mem {arm}", s)
            fine[(f"ft {arm}", s)] = _run("f", {"macro_f1": 0.8 - 0.01 * s, "failed": arm == "AdamW" and s == 1},
                                          f"ft {arm}", s)
    measure = suite.measure_main(pre, fine, mem)
    assert measure("val_loss")["AdaLomo"] == {0: 4.0, 1: 4.1, 2: 4.2}
    assert measure("held_bytes")["mem AdamW"] == {0: 100, 1: 100, 2: 100}
    assert measure("ft_macro_f1")["ft AdamW"] == {0: 0.8, 1: None, 2: 0.78}
    v = {x.claim: x for x in claims.evaluate_all(suite.MAIN_CLAIMS, measure, flags={"ft AdamW": "edge"})}
    assert v["adalomo-beats-lomo"].verdict == claims.HOLDS and v["adalomo-beats-lomo"].n == 3
    assert v["adalomo-memory-far-below-adamw"].verdict == claims.HOLDS and v["adalomo-memory-far-below-adamw"].accounting
    assert v["adalomo-on-par-with-adamw"].estimate == pytest.approx(math.exp(-0.1))
    ft = v["adalomo-on-par-finetune"]  # the failed AdamW fine-tune is counted, not dropped
    assert ft.n == 3 and ft.failed == 1 and ft.flags and not v["adalomo-on-par-with-adamw"].flags


def test_sweep_table_budget_and_flags(reports):
    b3 = "3 learning rates x 1 seed (1000), factor 3 apart, extended by up to 2 on the side of an edge optimum"
    chosen = {"pretrain": {"AdaLomo": {"lr": 0.1, "grid": [0.03, 0.1, 0.3], "scores": [4.2, 4.0, None],
                                       "at_edge": False, "extended": [], "edge_reason": "", "runs": 3, "budget": b3},
                           "AdamW": {"lr": 1e-4, "grid": [1e-4, 3e-4, 1e-3, 3e-3, 9e-3],
                                     "scores": [4.0, 4.05, 4.1, 4.3, 4.4], "at_edge": True, "extended": [3e-4, 1e-4],
                                     "edge_reason": "still improving at the extension limit", "runs": 5, "budget": b3}},
              "finetune": {"AdamW": {"lr": 1e-3, "grid": [1e-4, 3e-4, 1e-3, 3e-3], "scores": [0.5, 0.6, 0.7, 0.65],
                                     "at_edge": False, "extended": [3e-3], "edge_reason": "", "runs": 4, "budget": b3}}}
    t = suite.sweep_table(chosen)
    assert len(t) == 12 and t.chosen.sum() == 3 and t.extended.sum() == 3
    assert set(t[t.extended & (t.group == "pretrain")].lr) == {1e-4, 3e-4}
    records.save_summary(records.report_dir("adalomo/tuning", "cpu"), t, tuned=chosen)
    assert tuned("adalomo", "smoke", "pretrain") == {"AdaLomo": 0.1, "AdamW": 1e-4}  # smoke falls back to cpu
    b = suite.budget("smoke", "pretrain")
    assert "cpu record" in b and "3 learning rates" in b and "AdaLomo 3, AdamW 5" in b
    assert "extended for AdamW by 0.0003, 0.0001" in b and "edge for AdamW (still improving" in b
    assert "still at the grid's edge" not in suite.budget("cpu", "finetune")
    # the flag of an edge rate reaches every notebook arm that reads it, and no other
    f = suite.main_flags("cpu")
    assert set(f) == {"AdamW"} and "edge" in f["AdamW"]
    assert suite.flags("cpu", "pretrain", {"grouped": "AdaLomo", "AdamW (high lr)": "AdamW"}).keys() == {"AdamW (high lr)"}
    with pytest.raises(FileNotFoundError):
        suite.budget("gpu", "pretrain")


def _hist_run(losses, diverged=False, **final):
    r = _run("h", {"diverged": diverged, **final})
    r.config |= {"batch_size": 2, "seq_len": 4}
    r.history = [{"step": 10 * (i + 1), "train_loss": v, "val_loss": v + 0.1} for i, v in enumerate(losses)]
    return r


def test_loss_rise_and_constant_readouts():
    smooth, spiky = [5.0, 4.5, 4.2, 4.0, 3.9, 3.8], [5.0, 4.5, 4.2, 4.9, 3.9, 3.8]
    read = suite.loss_rise(window=3)
    assert read(_hist_run(smooth)) == 0.0
    assert read(_hist_run(spiky)) == pytest.approx(0.7)  # 4.9 above the minimum 4.2 of the 3 points before it
    assert suite.loss_rise(window=1)(_hist_run([5.0, 4.0, 4.3, 4.6])) == pytest.approx(0.3)  # window counts
    assert read(_hist_run(spiky, diverged=True)) is None
    assert suite.reader("val_loss_auc")(_hist_run(smooth)) < suite.reader("val_loss_auc")(_hist_run(spiky))
    runs = Runs()
    for s, losses in enumerate((smooth, spiky)):
        runs[("a", s)] = _hist_run(losses, val_ppl=50.0, held_bytes=10)
        runs[("b", s)] = _hist_run(smooth, val_ppl=50.0 + s, held_bytes=10)
    assert suite.constant_readouts(runs, ["loss_rise", "val_ppl", "held_bytes"]) == ["held_bytes"]
    with pytest.raises(ValueError, match="window"):
        suite.loss_rise(window=0)


def _tweets_like(n_train=50, n_test=20):
    texts = [f"tweet {i}" for i in range(n_train + n_test)]
    labels = np.arange(n_train + n_test) % 2
    train = {"text": texts[:n_train], "label": labels[:n_train]}
    train["text"][3] = texts[n_train + 5]  # the source repeats a test tweet in the training split
    return {"train": train, "test": {"text": texts[n_train:], "label": labels[n_train:]}, "labels": ["neg", "pos"]}


def test_tuning_split_never_holds_a_test_text():
    ds = _tweets_like()
    split = suite.tuning_split(ds)
    seen = set(split["train"]["text"]) | set(split["test"]["text"])
    assert not seen & set(ds["test"]["text"])
    assert len(split["train"]["text"]) + len(split["test"]["text"]) == 49  # only the repeated one dropped
    assert len(split["test"]["label"]) == len(split["test"]["text"])


def test_tuning_reads_no_claims_data(reports, monkeypatch):
    """The sweep's runs read the tuning windows (pre-training) and the development split (fine-tuning), never the
    claims' windows or the test split; every method gets the same grid and only its learning rate varies."""
    seen = []

    def fake_pretrain(name, *, corpus, train, model_size, lr, seed, **kw):
        seen.append(("pretrain", train.eval_split, kw, lr))
        return _run(name, {"val_loss": 4.0 + abs(math.log(lr / suite.PRETRAIN_CENTERS[name.split()[2]]))})

    def fake_finetune(name, *, dataset, train, lr, seed, **kw):
        seen.append(("finetune", dataset, kw, lr))
        return _run(name, {"macro_f1": 0.7 - abs(math.log(lr / suite.FINETUNE_CENTERS[name.split()[2]])) / 10})

    monkeypatch.setattr(suite, "pretrain", fake_pretrain)
    monkeypatch.setattr(suite, "finetune_run", fake_finetune)
    ds = _tweets_like()
    chosen = suite.tuning(reports / "t", corpus=None, train=TINY, model_size="nano", dataset=ds, points=3, factor=3.0,
                          max_extend=2)
    assert {e[1] for e in seen if e[0] == "pretrain"} == {"tuning"}
    test = set(ds["test"]["text"])
    for _, dataset, _, _ in (e for e in seen if e[0] == "finetune"):
        assert not (set(dataset["test"]["text"]) | set(dataset["train"]["text"])) & test
    for group in ("pretrain", "finetune"):
        assert [c["runs"] for c in chosen[group].values()] == [3, 3, 3]  # interior optimum: no extension
        assert all(c["lr"] == pytest.approx(getattr(suite, f"{group.upper()}_CENTERS")[a])
                   for a, c in chosen[group].items())
    knobs = {m: [e[2] for e in seen if e[0] == "pretrain" and e[2].get("method") == kw["method"]]
             for m, kw in suite.METHODS.items()}
    assert all(all(k == suite.METHODS[m] for k in ks) and len(ks) == 3 for m, ks in knobs.items())


def test_the_claims_test_examples_are_not_in_the_tuning_split():
    """On the real tweets: the examples the fine-tune sweep reads (its training and development parts) and the
    test examples the claims' fine-tunes score (the subset ``train_classifier`` draws, every seed) share no
    text, and the development split is carved from the training split's rows only."""
    from lrkit import data
    from lrkit.finetune import _subset

    tweets = data.load("tweets_sentiment", binary=True)
    split = suite.tuning_split(tweets)
    tuning_texts = set(split["train"]["text"]) | set(split["test"]["text"])
    assert tuning_texts <= set(tweets["train"]["text"])
    for seed in (0, 1, 2, 3, 4):
        claims_test, _ = _subset(tweets["test"], 256, seed + 1)
        assert not tuning_texts & set(claims_test)
    assert not tuning_texts & set(tweets["test"]["text"])


def test_adalomo_pretrain_grouped_equals_the_shared_pretrain(corpus):
    a = suite.adalomo_pretrain("a", corpus, TINY, model_size="nano", lr=0.1, seed=3)
    b = pretrain("b", corpus, TINY, method="adalomo", model_size="nano", lr=0.1, seed=3)
    assert a.final["val_loss"] == b.final["val_loss"] and a.final["state_bytes"] == b.memory["optimizer_state_bytes"]
    c = suite.adalomo_pretrain("c", corpus, TINY, model_size="nano", lr=0.1, seed=3, normalization="layer")
    assert c.config["normalization"] == "layer" and math.isfinite(c.final["val_loss"])


def test_suites_end_to_end(reports, corpus):
    """tuning -> main (two seeds), normalization with the lm-eval cloze task, factorization: every record
    written, verdicts computed on paired seeds."""
    chosen = suite.tuning(reports / "t", corpus=corpus, train=TINY, model_size="nano", points=1, max_extend=0)
    assert all(c["at_edge"] and c["runs"] == 1 for c in chosen["pretrain"].values())  # one point: at its edge
    assert all(r["config"]["eval_split"] == "tuning" for r in records.load(reports / "t")["runs"].values())
    records.save_summary(records.report_dir("adalomo/tuning", "cpu"), suite.sweep_table(chosen), tuned=chosen)
    pre, fine, mem = suite.main(reports / "m", profile="cpu", corpus=corpus, train=TINY, model_size="nano",
                                seeds=[0, 1])
    assert fine is None and set(pre.arms) == set(suite.METHODS) and pre.seeds == [0, 1]
    assert all(r.config["eval_split"] == "claims" for r in pre.values())
    table, _ = suite.main_tables(pre, fine, mem)
    assert table.set_index("arm").loc["AdamW", "held vs AdamW"] == 1.0
    assert {"val_loss_auc", "loss_rise", "rise_share"} <= set(table.columns)
    flags = suite.main_flags("cpu", finetune=False)
    assert set(flags) == set(suite.METHODS)  # every rate of a one-point grid is at its edge
    v = {x.claim: x for x in claims.evaluate_all(suite.MAIN_CLAIMS[:3], suite.measure_main(pre, fine, mem), flags=flags)}
    assert v["adalomo-memory-far-below-adamw"].verdict == claims.HOLDS and v["adalomo-memory-far-below-adamw"].n == 2
    assert v["adalomo-on-par-with-adamw"].flags and not v["adalomo-memory-far-below-adamw"].flags
    assert len(records.load(reports / "m")["runs"]) == 12

    pytest.importorskip("lm_eval")
    runs, lr = suite.normalization(reports / "n", profile="cpu", corpus=corpus, train=TINY, model_size="nano",
                                   seeds=[0], normalizations=["grouped", "none"], high_lr_factor=3.0, cloze_docs=8)
    assert lr == chosen["pretrain"]["AdaLomo"]["lr"]
    assert runs["none (high lr)", 0].config["lr"] == pytest.approx(3 * lr)
    assert all(0 <= r.final["cloze_acc"] <= 1 for r in runs.values())
    assert set(suite.ablation_flags("cpu", runs)) == set(runs.arms)
    runs, memory = suite.factorization(reports / "f", profile="cpu", corpus=corpus, train=TINY, model_size="nano",
                                       seeds=[0], variants=["nmf:1", "nmf:2", "qr:1"], memory_variants=["qr:2"])
    assert list(memory.variant) == ["nmf:1", "nmf:2", "qr:1", "qr:2"]
    assert runs["nmf:2", 0].config["factor_rank"] == 2 and math.isfinite(runs["nmf:2", 0].final["val_loss"])
    assert (memory.state_bytes == memory.persistent_bytes).all()
    assert runs["qr:1", 0].final["state_bytes"] == memory.set_index("variant").loc["qr:1", "state_bytes"]
