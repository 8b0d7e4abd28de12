"""The shared language-model loop: argument validation and same seed -> same numbers on CPU."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from lrkit import seed_everything
from lrkit.data.text import TokenizedCorpus
from lrkit.models import build_llama
from lrkit.train import LMTrainConfig, eval_windows, train_lm


def _corpus():
    rng = np.random.default_rng(0)
    # A learnable toy stream: token t+1 = (t * 3 + 1) mod 64, with noise.
    ids = [0]
    for _ in range(6000):
        ids.append((ids[-1] * 3 + 1) % 64 if rng.random() > 0.1 else int(rng.integers(64)))
    ids = np.asarray(ids, dtype=np.int64)
    return TokenizedCorpus("toy", ids[:5000], ids[5000:], 64, None, ["a"], ["b"])


def _run(seed, **cfg_kw):
    seed_everything(seed)
    corpus = _corpus()
    model = build_llama("nano", 64, 32, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = LMTrainConfig(**{**dict(steps=30, batch_size=8, seq_len=32, lr=1e-2, eval_every=10, eval_windows=8,
                                  seed=seed, device="cpu"), **cfg_kw})
    return train_lm("adamw", model, opt, corpus, cfg)


def test_same_seed_same_numbers_and_learning():
    a, b = _run(0), _run(0)
    assert a.history == b.history and a.final == b.final
    assert a.final["val_loss"] < np.log(64) - 0.5  # learns beyond uniform
    assert _run(1).final["val_loss"] != a.final["val_loss"]
    assert [r["step"] for r in a.history] == [10, 20, 30]
    assert a.memory["optimizer_state_bytes"] >= 2 * a.memory["param_bytes"]


def test_eval_windows_cover_the_stream():
    ids = np.arange(1000)
    w = eval_windows(ids, 5, 10)
    t = eval_windows(ids, 5, 10, split="tuning")
    assert w.shape == t.shape == (5, 11) and w[0, 0] == 0 and t[-1, -1] == 999
    assert all((np.diff(x.numpy(), axis=1) == 1).all() for x in (w, t))  # whole windows of the stream


@pytest.mark.parametrize("n_ids,n,seq_len", [(1000, 5, 10), (1000, 45, 10), (977, 7, 64), (200, 64, 64),
                                             (10_000, 64, 64), (150, 1, 64)])
def test_tuning_and_claims_windows_share_no_token(n_ids, n, seq_len):
    """Learning-rate sweeps (eval_split="tuning") read held-out tokens the claims' windows never read, and
    every window lies inside the stream; as many of each (capped so both fit)."""
    from lrkit.train import eval_window_starts

    sets = {}
    for split in ("claims", "tuning"):
        starts = eval_window_starts(n_ids, n, seq_len, split)
        assert len(starts) == min(n, (n_ids - 1) // (2 * (seq_len + 1)))
        assert starts.min() >= 0 and starts.max() + seq_len + 1 <= n_ids
        idx = np.concatenate([np.arange(s, s + seq_len + 1) for s in starts])
        assert len(np.unique(idx)) == len(idx)  # the windows of one split do not overlap either
        sets[split] = set(idx.tolist())
    assert not sets["claims"] & sets["tuning"]


def test_train_lm_reads_the_split_it_names(monkeypatch):
    """train_lm evaluates on the windows of cfg.eval_split (a sweep on "tuning" never sees the claims' tokens)."""
    import lrkit.train as tr

    seen = []
    real = tr.eval_windows
    monkeypatch.setattr(tr, "eval_windows", lambda ids, n, seq_len, split="claims": seen.append(split) or real(ids, n, seq_len, split))
    for split in ("claims", "tuning"):
        _run(0, eval_split=split)
    assert seen == ["claims", "tuning"]
    with pytest.raises(ValueError, match="Invalid eval_split: 'test'"):
        LMTrainConfig(eval_split="test")


@pytest.mark.parametrize("bad", [{"steps": 0}, {"lr": float("nan")}, {"batch_size": 1.5}, {"warmup_frac": 1.0}])
def test_config_validation_names_the_value(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        LMTrainConfig(**bad)


def test_stability_rule_catches_runs_that_end_far_above_their_best():
    from lrkit.train import stability

    rows = lambda vals: [{"step": 10 * (i + 1), "train_loss": v, "val_loss": v} for i, v in enumerate(vals)]
    assert stability(rows([3.0, 2.5, 2.4]), False, 0.1) == {"best_val_loss": 2.4, "val_loss_above_best": 0.0,
                                                           "unstable": False}
    late = stability(rows([3.0, 2.5, 2.9]), False, 0.1)  # no NaN anywhere, yet it ended 0.4 nats above its best
    assert late["unstable"] and late["val_loss_above_best"] == pytest.approx(0.4)
    assert not stability(rows([3.0, 2.5, 2.6]), False, 0.1 + 1e-9)["unstable"]  # within the margin (strict >)
    assert stability(rows([3.0]) + [{"step": 20, "train_loss": None}], True, 0.1) == {
        "best_val_loss": None, "val_loss_above_best": None, "unstable": True}
    r = _run(0)
    assert r.final["unstable"] is False and r.final["best_val_loss"] <= r.final["val_loss"]
    with pytest.raises(ValueError, match="Invalid unstable_margin"):
        LMTrainConfig(unstable_margin=-1.0)


@pytest.mark.parametrize("method,kw", [("full", {}), ("galore", {"rank": 4, "update_proj_gap": 1}),
                                       ("adalomo", {}), ("galore", {"rank": 4, "per_layer": True})])
def test_a_non_finite_gradient_stops_the_run_naming_step_and_parameter(method, kw):
    """A NaN in one weight's gradient (finite loss) stops the run as diverged at that step, naming the
    parameter, before any update or SVD sees it (GaLore's SVD used to raise a bare LinAlgError)."""
    from lrkit.methods import prepare

    corpus = _corpus()
    seed_everything(0)
    model = build_llama("nano", corpus.vocab_size, 16, seed=0)
    target = "model.layers.0.mlp.up_proj.weight"
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("nan")) if calls["n"] == 4 else grad

    dict(model.named_parameters())[target].register_hook(poison)
    setup = prepare(method, model, lr=1e-3, **kw)
    cfg = LMTrainConfig(steps=6, batch_size=2, seq_len=16, eval_every=3, eval_windows=2)
    r = train_lm("nan", setup.model, setup.optimizer, corpus, cfg)
    assert r.final["diverged"] and r.final["steps"] == 4
    assert r.final["failure"] == f"step 4: non-finite gradient (NaN or Inf) in parameter {target}"
    assert all(torch.isfinite(p).all() for p in model.parameters())  # nothing non-finite was applied


# ---- the learning-rate schedule and gradient clipping, against hand-computed values ------------------
def test_cosine_schedule_values_against_the_closed_form():
    """Linear warm-up over W = int(warmup_frac * steps) steps, lr_s = peak (s + 1) / W for s < W, then
    cosine from the peak at s = W down to min_lr_ratio * peak at s = steps:
    lr_s = peak (m + (1 - m) (1 + cos(pi (s - W) / (steps - W))) / 2)."""
    from lrkit.train import cosine_schedule

    peak, m = 0.2, 0.1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = cosine_schedule(opt, steps=23, warmup_frac=0.25, min_lr_ratio=m)  # W = int(5.75) = 5, 18 decay steps
    lrs = []
    for _ in range(24):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = {0: 0.04, 1: 0.08, 2: 0.12, 3: 0.16, 4: 0.2,  # warm-up, peak reached at its last step
                5: 0.2,  # cosine start (progress 0)
                11: peak * (m + (1 - m) * 0.75),  # progress 1/3: cos = 1/2
                14: peak * (m + (1 - m) * 0.5),  # midpoint: halfway between peak and minimum
                17: peak * (m + (1 - m) * 0.25),  # progress 2/3: cos = -1/2
                22: peak * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * 17 / 18))),  # the last step trained
                23: peak * m}  # end value: min_lr_ratio of the peak
    for s, lr in expected.items():
        assert lrs[s] == pytest.approx(lr, rel=1e-12, abs=0), s
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))  # non-increasing after the warm-up
    assert min(lrs) == pytest.approx(peak * m, rel=1e-12)
    sched0 = cosine_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 10, 0.0, 0.0)
    assert sched0.get_last_lr() == [1.0]  # no warm-up: the first step is at the peak


def _sgd_by_hand(model, corpus, cfg, lrs, clip):
    """What train_lm should do with plain SGD: the same seeded batches, global-norm clipping of the whole
    batch's gradient to ``clip`` (coefficient min(1, clip / (||g|| + 1e-6)), as clip_grad_norm_), theta -=
    lr_s g_clipped. Returns the clip coefficients."""
    from lrkit.train import lm_loss, random_windows

    gen = torch.Generator().manual_seed(cfg.seed)
    coefs = []
    for lr in lrs:
        batch = random_windows(corpus.train, cfg.batch_size, cfg.seq_len, gen)
        model.zero_grad(set_to_none=True)
        lm_loss(model, batch).backward()
        norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
        coef = 1.0 if clip is None else min(1.0, clip / (norm + 1e-6))
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * coef * p.grad
        coefs.append(coef)
    return coefs


def _rel_diff(a, b):
    return max(float((p.detach() - q.detach()).abs().max() / q.detach().abs().max())
               for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_loop_clips_the_global_norm_and_follows_the_schedule(grad_accum):
    """train_lm with SGD and grad_clip on a float64 LLaMA equals the SGD trajectory computed by hand with
    the closed-form schedule (warm-up 2 of 4 steps: 0.5, 1, 1, (1 + m) / 2 of the peak) and the clipped
    gradient; clipping is active at every step and the unclipped trajectory is far from it."""
    corpus = _corpus()
    cfg = LMTrainConfig(steps=4, batch_size=4, seq_len=16, lr=0.5, warmup_frac=0.5, min_lr_ratio=0.1,
                        grad_clip=0.05, eval_every=4, eval_windows=2, log_every=1, seed=3, device="cpu",
                        grad_accum=grad_accum)
    lrs = [0.25, 0.5, 0.5, 0.5 * 0.55]
    model = build_llama("nano", 64, 16, seed=0).double()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    run = train_lm("clip", model, torch.optim.SGD(model.parameters(), lr=cfg.lr), corpus, cfg)
    assert [r["lr"] for r in run.history] == pytest.approx(lrs, rel=1e-12)

    hand = build_llama("nano", 64, 16, seed=0).double()
    hand.load_state_dict(start)
    coefs = _sgd_by_hand(hand, corpus, cfg, lrs, clip=cfg.grad_clip)
    assert max(coefs) < 0.5  # the clip bites at every step
    assert _rel_diff(model, hand) < 1e-12  # micro-batches (grad_accum 2) sum to the same gradient here

    free = build_llama("nano", 64, 16, seed=0).double()
    free.load_state_dict(start)
    _sgd_by_hand(free, corpus, cfg, lrs, clip=None)
    assert _rel_diff(free, hand) > 1e-2  # the test would see a loop that skipped the clip


def test_loop_with_fused_optimizer_clips_with_its_max_grad_norm():
    """Lomo (SGD updated inside backward, max_grad_norm: a norm pass then the update pass) in train_lm:
    the same hand-computed clipped trajectory, to fp32 rounding (Lomo updates in fp32)."""
    from lrkit.optim.lomo import Lomo

    corpus = _corpus()
    cfg = LMTrainConfig(steps=3, batch_size=4, seq_len=16, lr=0.5, warmup_frac=0.0, min_lr_ratio=0.1,
                        grad_clip=None, eval_every=3, eval_windows=2, seed=4, device="cpu")
    lrs = [0.5, 0.5 * 0.775, 0.5 * 0.325]  # no warm-up: cos(0), cos(pi/3), cos(2 pi/3)
    model = build_llama("nano", 64, 16, seed=0).double()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = Lomo(model.parameters(), lr=cfg.lr, max_grad_norm=0.05)
    train_lm("lomo-clip", model, opt, corpus, cfg)
    opt.remove_hooks()

    hand = build_llama("nano", 64, 16, seed=0).double()
    hand.load_state_dict(start)
    coefs = _sgd_by_hand(hand, corpus, cfg, lrs, clip=0.05)
    assert max(coefs) < 0.5
    assert _rel_diff(model, hand) < 1e-5
    free = build_llama("nano", 64, 16, seed=0).double()
    free.load_state_dict(start)
    _sgd_by_hand(free, corpus, cfg, lrs, clip=None)
    assert _rel_diff(free, hand) > 1e-2


# ---- the loop's read-outs (issue 22): token-weighted evaluation, a final evaluation, the last interval's loss
class _Fixed(torch.nn.Module):
    """Logits that depend on the input window only through its first token: each window's loss differs."""

    def __init__(self, vocab=64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(vocab, vocab))

    def forward(self, input_ids):
        logits = self.w[input_ids] + input_ids[:, :1, None].float() * torch.arange(64.0) / 64
        return type("Out", (), {"logits": logits})()


def test_evaluation_is_the_mean_over_every_window_whatever_the_batch():
    """5 windows in batches of 2: the short last batch must weigh 1 window, not half the result."""
    from lrkit.train import evaluate_lm, lm_loss

    windows = eval_windows(_corpus().val, 5, 16)
    model = _Fixed()
    per_window = [lm_loss(model, windows[i: i + 1]).item() for i in range(len(windows))]
    assert np.ptp(per_window) > 0.01  # the windows' losses differ, so a wrong weighting shows
    for bs in (1, 2, 3, 5):
        assert evaluate_lm(model, windows, bs, "cpu") == pytest.approx(np.mean(per_window), rel=1e-6)


def test_final_evaluation_runs_when_steps_is_not_a_multiple_of_eval_every():
    r = _run(0, steps=25)
    assert [h["step"] for h in r.history if "val_loss" in h] == [10, 20, 25]
    assert r.final["val_loss"] == r.history[-1]["val_loss"] and r.final["steps"] == 25


def test_logged_train_loss_covers_the_last_interval_only(monkeypatch):
    """Loss k at step k: the rows at steps 10, 20, 25 are the means of steps 1-10, 11-20, 21-25."""
    import lrkit.train as tr

    calls = {"n": 0}
    real = tr.lm_loss

    def counting(model, batch):
        if not model.training:  # evaluation
            return real(model, batch)
        calls["n"] += 1
        return real(model, batch) * 0 + calls["n"]
    monkeypatch.setattr(tr, "lm_loss", counting)
    r = _run(0, steps=25, log_every=5)
    rows = {h["step"]: h["train_loss"] for h in r.history}
    assert rows == pytest.approx({5: 3.0, 10: 8.0, 15: 13.0, 20: 18.0, 25: 23.0})


def test_seq_len_longer_than_the_corpus_is_an_error_before_any_allocation():
    seed_everything(0)
    corpus = _corpus()  # 5000 training and 1001 validation tokens
    model = build_llama("nano", 64, 32, seed=0)
    cfg = LMTrainConfig(steps=2, batch_size=2, seq_len=600, eval_every=1, eval_windows=2, device="cpu")
    with pytest.raises(ValueError, match="Invalid seq_len: 600 for corpus 'toy', whose validation stream has 1001 "
                                         "tokens \\(expected seq_len <= 499: two disjoint windows"):
        train_lm("x", model, torch.optim.SGD(model.parameters(), lr=0.1), corpus, replace(cfg, eval_split="tuning"))
    with pytest.raises(ValueError, match="Invalid seq_len: 1200 for corpus 'toy', whose validation stream has 1001 "
                                         "tokens \\(expected seq_len <= 1000: one window"):
        train_lm("x", model, torch.optim.SGD(model.parameters(), lr=0.1), corpus, replace(cfg, seq_len=1200))
    with pytest.raises(ValueError, match="Invalid seq_len: 6000 for corpus 'toy', whose training stream has 5000"):
        train_lm("x", model, torch.optim.SGD(model.parameters(), lr=0.1), corpus, replace(cfg, seq_len=6000))
