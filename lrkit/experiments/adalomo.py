"""The AdaLomo paper's experiments at the kit's scale: constants with their sources, the claims of each
notebook in ``notebooks/adalomo/``, and the experiment definitions the notebooks call.

Paper: Lv, Yan, Guo, Lv, Qiu, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate", Findings of
ACL 2024, arXiv 2310.10195. LOMO (its predecessor): Lv et al., arXiv 2306.09782.

* :func:`tuning` (``tuning.ipynb``): the learning-rate sweep every compared method gets, same grid size,
  factor and extension limit for all (equal budgets; one tuned knob each, the peak learning rate), in
  pre-training ("pretrain", scored on the tuning windows, disjoint from the claims' windows) and fine-tuning
  ("finetune", scored on a development split carved from the training split: :func:`tuning_split`).
* :func:`main` (``adalomo.ipynb``): AdaLomo, AdamW and LOMO pre-training a LLaMA (the paper's further
  pre-training) and fine-tuning MiniLM (its instruction tuning), and the bytes each method holds.
* :func:`normalization` (``ablation_normalization.ipynb``): grouped vs none / global / layer-wise update
  normalisation, at the tuned learning rate and a higher one, with an lm-eval benchmark of every model.
* :func:`factorization` (``ablation_factorization.ipynb``): the rank-1 NMF second moment vs SVD, the
  rank-revealing (column-pivoted) QR and the full second moment.

Every run is recorded by ``run_all``/``tune`` as it finishes; the claims are evaluated by ``lrkit.claims``
with the kit's margins (``lrkit.claims.MARGINS``): "on par" / "matches" / "near" are equivalence tests on
the perplexity ratio (language models) or the macro-F1 / accuracy difference (classifiers), "no worse than"
one-sided non-inferiority on the same scale, byte counts accounting. Verdicts that read a learning rate still
at the edge of its tuning grid carry a flag (:func:`flags`).
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from lrkit import records
from lrkit.claims import MARGINS, Claim
from lrkit.experiments import MAX_EXTEND, edge_flags, final_metric, finetune, pretrain, run_all, tune, tuned
from lrkit.records import RunResult

PAPER = "Lv et al. 2024, AdaLomo (Findings of ACL 2024, arXiv 2310.10195)"

# ---------------------------------------------------------------------------------- paper constants
# The authors' recipes (Sec. 4 setup, and the official OpenLMLab/LOMO configs): AdaLomo's relative lr.
PAPER_LR = {"instruction_tuning": 5e-4, "further_pretraining": 1e-3}
# AdaLomo's defaults (Sec. 3, Algorithm 1; official lomo_optim.AdaLomo): eps1, eps2, clip threshold d,
# decay rate of beta2_t = 1 - t^c.
PAPER_DEFAULTS = {"eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8}
# The paper evaluates its instruction-tuned LLaMA on these (Sec. 4.1); AlpacaFarm is judged by GPT-4.
PAPER_BENCHMARKS = ("mmlu", "bbh", "gsm8k", "humaneval", "alpacafarm")
# LOMO paper (arXiv 2306.09782) Table 1: LLaMA-7B training memory in GB (= GiB), activations included.
LOMO_PAPER_7B_GIB = {"adamw": 102.20, "sgd": 51.99, "lomo": 14.58}

# ---------------------------------------------------------------------------------- the kit's arms
# One name per method (the AdamW baseline is "AdamW" everywhere). Each method has ONE tuned knob, its peak learning
# rate, swept on the same grid; everything else is its paper's fixed recipe, never tuned: AdamW with torch's
# defaults and the training loop's global clipping at 1, LOMO with global gradient-norm clipping at 1 (its paper's
# recipe; two backward passes per step), AdaLomo unclipped with its paper's defaults (PAPER_DEFAULTS), its grouped
# update normalisation replacing clipping. Same schedule (warm-up, cosine), batches and steps for all.
METHODS = {"AdaLomo": dict(method="adalomo"), "AdamW": dict(method="full"),
           "LOMO": dict(method="lomo", max_grad_norm=1.0)}
# Centres of the sweeps (from the kit's earlier one-seed probes at the cpu size; the sweep itself decides).
# AdaLomo's step is lr x RMS(theta): the paper's 1e-3 is meant for pretrained 7B weights and barely
# moves a model trained from scratch, whose matrices start at RMS ~0.02.
PRETRAIN_CENTERS = {"AdaLomo": 0.1, "AdamW": 3e-3, "LOMO": 1.0}
FINETUNE_CENTERS = {"AdaLomo": 1e-2, "AdamW": 3e-4, "LOMO": 0.3}
TUNING_METRICS = {"pretrain": ("val_loss", True), "finetune": ("macro_f1", False)}  # (metric, lower is better)

# ---------------------------------------------------------------------------------- claims
PPL_MARGIN, PPL_REASON = MARGINS["perplexity"]  # equivalence / non-inferiority on the perplexity ratio
ACC_MARGIN, ACC_REASON = MARGINS["accuracy"]  # ... on accuracy / macro-F1 differences (fractions)
STABILITY_WINDOW = 5  # logged points (50 steps at log_every 10) behind the running minimum of loss_rise

MAIN_CLAIMS = [
    Claim("adalomo-on-par-with-adamw", "AdaLomo achieves results on par with AdamW (read as: final validation "
          "perplexity within the kit's 5 % equivalence margin of AdamW's, on either side).",
          "Abstract; Sec. 4 (further pre-training)", "val_ppl", ("AdaLomo", "AdamW"), quantity="ratio",
          op="between", bound=PPL_MARGIN, margin_reason=PPL_REASON),
    Claim("adalomo-beats-lomo", "LOMO converges worse than AdaLomo: the adaptive learning rate closes the gap "
          "to AdamW that SGD leaves (read as: AdaLomo's final validation perplexity below LOMO's).",
          "Abstract; Sec. 2 and 4", "val_ppl", ("AdaLomo", "LOMO"), quantity="ratio", op="<", bound=1.0),
    Claim("adalomo-memory-far-below-adamw", "AdaLomo significantly reduces memory against AdamW (read as: the "
          "bytes held besides the weights, optimizer state plus the peak of gradients alive at once, at "
          "most a fifth of AdamW's).", "Abstract; Sec. 4.4", "held_bytes", ("mem AdaLomo", "mem AdamW"),
          quantity="ratio", op="<", bound=0.2, accounting=True,
          margin_reason="a fifth: AdamW holds two moments and every gradient per weight, AdaLomo about one "
                        "gradient at a time plus n + m factors per matrix; fixed by the shapes"),
    Claim("adalomo-on-par-finetune", "AdaLomo fine-tunes on par with AdamW (read as: held-out macro-F1 within "
          "the kit's 2-point equivalence margin of AdamW's, on either side).",
          "Abstract; Sec. 4.1 (instruction tuning)", "ft_macro_f1", ("ft AdaLomo", "ft AdamW"),
          quantity="difference", op="between", bound=ACC_MARGIN, lower_is_better=False, margin_reason=ACC_REASON),
    Claim("adalomo-beats-lomo-finetune", "In fine-tuning too AdaLomo does better than LOMO (read as: held-out "
          "macro-F1 above LOMO's).", "Sec. 4.1, Table 1 (instruction tuning: AdaLomo above LOMO)", "ft_macro_f1",
          ("ft AdaLomo", "ft LOMO"), quantity="difference", op=">", bound=0.0, lower_is_better=False),
]
NORMALIZATION_CLAIMS = [
    Claim("grouped-stabilises-high-lr", "Grouped update normalisation stabilises convergence (read as: at 3x "
          "the tuned learning rate, a smaller loss_rise, the largest rise of the logged training loss above its "
          "running minimum, than without normalisation).", "Abstract; Sec. 3.2", "loss_rise",
          ("grouped (high lr)", "none (high lr)"), quantity="difference", op="<", bound=0.0),
    Claim("grouped-better-at-high-lr", "At 3x the tuned learning rate grouped normalisation ends better than no "
          "normalisation (read as: a lower final validation perplexity).", "Sec. 3.2", "val_ppl",
          ("grouped (high lr)", "none (high lr)"), quantity="ratio", op="<", bound=1.0),
    Claim("grouped-no-worse-than-none", "At the tuned learning rate grouped normalisation costs nothing (read as: "
          "final validation perplexity no worse than no normalisation's by more than the kit's 5 % margin).",
          "Sec. 3.2", "val_ppl", ("grouped", "none"), quantity="ratio", op="<", bound=PPL_MARGIN,
          margin_reason=PPL_REASON),
    Claim("grouped-matches-global", "Normalising each tensor's update (grouped, fusable) is as good as one "
          "global RMS over all updates (which needs every gradient first): perplexity ratio inside the kit's "
          "5 % equivalence margin.", "Sec. 3.2", "val_ppl", ("grouped", "global"), quantity="ratio", op="between",
          bound=PPL_MARGIN, margin_reason=PPL_REASON),
    Claim("grouped-matches-layer", "Grouped normalisation is as good as a per-layer (per transformer block) "
          "RMS: perplexity ratio inside the kit's 5 % equivalence margin.", "Sec. 3.2", "val_ppl",
          ("grouped", "layer"), quantity="ratio", op="between", bound=PPL_MARGIN, margin_reason=PPL_REASON),
    Claim("grouped-downstream-no-worse", "Grouped normalisation does not cost downstream accuracy (read as: "
          "held-out cloze accuracy no more than the kit's 2 points below no normalisation; the kit's offline "
          "stand-in for the paper's benchmarks).", "Sec. 4.1 benchmarks (stand-in)", "cloze_acc",
          ("grouped", "none"), quantity="difference", op=">", bound=-ACC_MARGIN, lower_is_better=False,
          margin_reason=ACC_REASON),
]
FACTORIZATION_CLAIMS = [
    Claim("nmf-rank1-near-full", "Storing the second moment as a rank-1 non-negative factorisation loses little "
          "against the full second moment (read as: final validation perplexity ratio inside the kit's 5 % "
          "equivalence margin).", "Sec. 3.1", "val_ppl", ("nmf:1", "full:1"), quantity="ratio", op="between",
          bound=PPL_MARGIN, margin_reason=PPL_REASON),
    Claim("nmf-rank1-state-small", "The rank-1 NMF keeps n + m values per n x m matrix: under a tenth of the "
          "full second moment's state.", "Sec. 3.1", "state_bytes", ("nmf:1", "full:1"), quantity="ratio",
          op="<", bound=0.1, accounting=True,
          margin_reason="a tenth: n + m against n x m values per matrix, at most 1/32 for the nano model's "
                        "64 x 64 matrices (1-D weights are stored whole by both); fixed by the shapes"),
    Claim("nmf-no-worse-than-svd", "The non-negative rank-1 factorisation is no worse than a truncated SVD of "
          "the same rank (read as: perplexity ratio below the kit's 5 % margin).", "Sec. 3.1 (choice of NMF)",
          "val_ppl", ("nmf:1", "svd:1"), quantity="ratio", op="<", bound=PPL_MARGIN, margin_reason=PPL_REASON),
    Claim("nmf-no-worse-than-pivoted-qr", "The non-negative rank-1 factorisation is no worse than a rank-revealing "
          "(column-pivoted) QR of the same rank (read as: perplexity ratio below the kit's 5 % margin).",
          "Sec. 3.1 (choice of NMF)", "val_ppl", ("nmf:1", "qr:1"), quantity="ratio", op="<", bound=PPL_MARGIN,
          margin_reason=PPL_REASON),
    Claim("nmf-rank1-as-good-as-rank4", "Rank 1 is enough: a rank-4 NMF second moment does not train better "
          "or worse (read as: perplexity ratio nmf:1 / nmf:4 inside the kit's 5 % equivalence margin).",
          "Sec. 3.1 (the rank-1 choice; ranks 2 and 4 are the kit's ablation)", "val_ppl", ("nmf:1", "nmf:4"),
          quantity="ratio", op="between", bound=PPL_MARGIN, margin_reason=PPL_REASON),
]
CLAIMS = {"adalomo": MAIN_CLAIMS, "ablation_normalization": NORMALIZATION_CLAIMS,
          "ablation_factorization": FACTORIZATION_CLAIMS}


# ---------------------------------------------------------------------------------- tuning
def tuning_split(dataset: dict, fraction: float = 0.2, seed: int = 0) -> dict:
    """The fine-tuning sweep's data: ``lrkit.data.text_classification.validation_split(dataset)`` (a
    development split carved from the training split, returned as "test"), with every example whose text
    also occurs in the real test split dropped from both parts (the tweets source repeats a few tweets across
    its splits), so the sweep never reads a test example, by index or by text. The test split is read once,
    by the claims."""
    from lrkit.data.text_classification import validation_split

    val = validation_split(dataset, fraction=fraction, seed=seed)
    test_texts = set(dataset["test"]["text"])
    out = {"labels": val["labels"]}
    for part in ("train", "test"):
        keep = [i for i, t in enumerate(val[part]["text"]) if t not in test_texts]
        out[part] = {"text": [val[part]["text"][i] for i in keep], "label": np.asarray(val[part]["label"])[keep]}
    return out


def tuning(out, *, corpus, train, model_size: str, dataset=None, ft_train=None, points: int = 3,
           factor: float = 3.0, max_extend: int = MAX_EXTEND, methods=tuple(METHODS)) -> dict:
    """The sweep of ``tuning.ipynb``: every method in ``methods`` on the same ``points``-point grid
    ``factor`` apart around its centre, extended by up to ``max_extend`` rates on the side of an edge optimum
    (``lrkit.experiments.tune``), in pre-training (group "pretrain", best final validation loss on the tuning
    windows: ``train`` with ``eval_split="tuning"``) and, with ``dataset``, fine-tuning (group "finetune",
    best macro-F1 on :func:`tuning_split`, never the test split). Returns {group: {arm: chosen}}."""
    arms = {m: METHODS[m] for m in methods}
    chosen = {"pretrain": tune(pretrain, arms, out, centers=PRETRAIN_CENTERS, metric="val_loss", points=points,
                               factor=factor, max_extend=max_extend, group="pretrain", corpus=corpus,
                               train=replace(train, eval_split="tuning"), model_size=model_size)}
    if dataset is not None:
        chosen["finetune"] = tune(finetune_run, arms, out, centers=FINETUNE_CENTERS, metric="macro_f1",
                                  points=points, factor=factor, max_extend=max_extend, lower_is_better=False,
                                  group="finetune", dataset=tuning_split(dataset), train=ft_train)
    return chosen


def sweep_table(chosen: dict) -> pd.DataFrame:
    """One row per (group, method, lr) of the sweep: the score, whether it was chosen, whether the rate was
    added by the extension (``extended``), and per method the tuning runs and why a chosen rate is still at the
    grid's edge (``edge_reason``, "" when interior)."""
    rows = []
    for group, arms in chosen.items():
        metric = TUNING_METRICS[group][0]
        for arm, c in arms.items():
            added = c.get("extended", [])
            for lr, score in zip(c["grid"], c["scores"]):
                rows.append({"group": group, "method": arm, "lr": lr, "metric": metric, "score": score,
                             "chosen": lr == c["lr"], "extended": any(math.isclose(lr, x) for x in added),
                             "runs": c.get("runs", len(c["grid"])), "at_edge": c["at_edge"],
                             "edge_reason": c.get("edge_reason", ""), "budget": c["budget"]})
    return pd.DataFrame(rows)


def budget(profile: str, group: str) -> str:
    """The tuning budget behind ``tuned("adalomo", profile, group)``, in words, for the notebooks to print
    beside every comparison: the grid, the tuning runs each method took (the extension included) and the
    methods whose chosen rate is still at the grid's edge."""
    path = records.tuning_record("adalomo", profile)
    if path is None:
        raise FileNotFoundError(f"no tuning record for adalomo at profile {profile!r}: run tuning.ipynb first")
    arms = records.load(path)["summary"]["tuned"][group]
    b = next(iter(arms.values()))["budget"]
    runs = ", ".join(f"{a} {v.get('runs', len(v['grid']))}" for a, v in arms.items())
    ext = [f"{a} by {', '.join(f'{x:.3g}' for x in v['extended'])}" for a, v in arms.items() if v.get("extended")]
    edge = [f"{a} ({v.get('edge_reason') or 'not extended'})" for a, v in arms.items() if v.get("at_edge")]
    return (f"learning rates from tuning.ipynb ({path.parent.name} record, group {group!r}): {b}, the same for "
            f"{', '.join(arms)}; tuning runs: {runs}" + (f"; grid extended for {'; '.join(ext)}" if ext else "")
            + (f"; best lr still at the grid's edge for {', '.join(edge)}" if edge else ""))


def flags(profile: str, group: str, arms: dict[str, str]) -> dict:
    """``claims.evaluate_all(..., flags=)`` for a notebook: {notebook arm: flag text} for every arm whose
    learning rate comes from a tuned arm (``arms``: {notebook arm: tuned arm of ``group``}) whose chosen rate
    is still at the edge of its grid (``lrkit.experiments.edge_flags``)."""
    edge = edge_flags("adalomo", profile, group)
    return {arm: edge[t] for arm, t in arms.items() if t in edge}


# ---------------------------------------------------------------------------------- adalomo.ipynb
def memory_run(name: str, *, seed: int, model_size: str, method: str, vocab_size: int, batch_size: int,
               seq_len: int, steps: int = 2, **kw) -> RunResult:
    """``lrkit.experiments.memory.measure_method_memory`` as a run record: bytes of optimizer state, the peak of
    gradients alive at once and their sum ``held_bytes`` in ``final``."""
    from lrkit.experiments.memory import measure_method_memory
    from lrkit.utils import device_info

    t0 = time.perf_counter()
    m = measure_method_memory(model_size, method, vocab_size=vocab_size, batch_size=batch_size, seq_len=seq_len,
                              steps=steps, seed=seed, **kw)
    figures = {k: v for k, v in m.items() if k.endswith("_bytes")}
    info = device_info(m["device"])
    return RunResult(name=name, config={"model_size": model_size, "method": method, "steps": steps, **kw},
                     seed=seed, device=info["device"], device_name=info["device_name"],
                     final={"loss": m["loss"], **figures}, wall_time_s=time.perf_counter() - t0, memory=figures)


def finetune_run(name: str, dataset, train, **kw) -> RunResult:
    """``experiments.finetune``, failed (``final["failed"]``) when it stayed at, or near, the constant
    predictor: the kit's rule (``lrkit.finetune.failed``: accuracy not 2 points above the majority class of the
    scored examples, or 95 % of the predictions in one class) or a held-out macro-F1 no better than always
    predicting the majority class (+ 0.02). Such a run is kept and reported as failed: its readers give None
    and the claims rule counts it."""
    r = finetune(name, dataset, train, **kw)
    r.final["failed"] = bool(r.final.get("failed")) or bool(r.final["macro_f1"] <= majority_macro_f1(dataset) + 0.02)
    return r


def majority_macro_f1(dataset) -> float:
    """Macro-F1 of always predicting the test split's majority class: (2p / (1 + p)) / number of classes
    for a majority share p (p / (1 + p) for two classes)."""
    labels = np.asarray(dataset["test"]["label"])
    p = np.bincount(labels).max() / len(labels)
    return float(2 * p / (1 + p) / len(np.unique(labels)))


def main(out, *, profile: str, corpus, train, model_size: str, seeds, dataset=None, ft_train=None, ft_seeds=(0,),
         memory_steps: int = 2, methods=tuple(METHODS)):
    """``adalomo.ipynb``: pre-training (every method on ``seeds``, lrs from the tuning record), fine-tuning
    (on ``ft_seeds``, arms named "ft <method>", scored on the test split, which only these runs read; a run at
    the constant predictor is kept and marked failed, :func:`finetune_run`) and measured memory on ``seeds``
    ("mem <method>": the same bytes on every seed, the claims rule needs them paired). Returns (pre, fine,
    mem) Runs."""
    lrs, arms = tuned("adalomo", profile, "pretrain"), {m: METHODS[m] for m in methods}
    pre = run_all(pretrain, {m: dict(kw, lr=lrs[m]) for m, kw in arms.items()}, out, seeds=seeds, corpus=corpus,
                  train=train, model_size=model_size)
    fine = None
    if dataset is not None:
        ft_lrs = tuned("adalomo", profile, "finetune")
        fine = run_all(finetune_run, {f"ft {m}": dict(kw, lr=ft_lrs[m]) for m, kw in arms.items()}, out,
                       seeds=ft_seeds, dataset=dataset, train=ft_train)
    mem = run_all(memory_run, {f"mem {m}": kw for m, kw in arms.items()}, out, seeds=seeds, model_size=model_size,
                  vocab_size=corpus.vocab_size, batch_size=train.batch_size, seq_len=train.seq_len,
                  steps=memory_steps)
    return pre, fine, mem


def reader(metric: str):
    """The read-out of a run a claim or table names: :data:`READERS` (history read-outs), else ``final[metric]``
    (None when missing or not finite)."""
    return READERS[metric]() if metric in READERS else final_metric(metric)


def measure(runs):
    """``measurements_for`` of ``claims.evaluate_all`` over one set of runs, with :func:`reader`."""
    return lambda metric: runs.measure(reader(metric))


def measure_main(pre, fine, mem):
    """The reader ``claims.evaluate_all`` needs for the main notebook: metric -> {arm: {seed: value}};
    "ft_<metric>" reads the fine-tunes (arms "ft <method>"; a failed fine-tune gives None, which the claims rule
    counts as a failed run), "held_bytes" and the other byte counts the memory runs ("mem <method>"), anything
    else the pre-training runs (arms "<method>")."""
    def read(metric):
        if metric.startswith("ft_"):
            return fine.measure(lambda r: None if r.final.get("failed") else final_metric(metric[3:])(r))
        if metric.endswith("_bytes"):
            return mem.measure(metric)
        return measure(pre)(metric)
    return read


def ablation_flags(profile: str, runs) -> dict:
    """:func:`flags` of an ablation notebook: every arm trains at AdaLomo's tuned pre-training rate (or a
    multiple of it), so every arm carries AdaLomo's flag when that rate is at its grid's edge."""
    return flags(profile, "pretrain", {arm: "AdaLomo" for arm in runs.arms})


def main_flags(profile: str, finetune: bool = True) -> dict:
    """:func:`flags` of the main notebook: the pre-training arms read group "pretrain", "ft <method>" group
    "finetune" (the memory runs use no learning rate)."""
    out = flags(profile, "pretrain", {m: m for m in METHODS})
    return out | (flags(profile, "finetune", {f"ft {m}": m for m in METHODS}) if finetune else {})


def tokens_per_s(r: RunResult) -> float:
    """Training throughput of a run (evaluation included, the same for every arm), tokens per second."""
    return r.final["tokens"] / r.wall_time_s


def count(runs, arm: str, flag: str) -> int:
    """How many of an arm's runs carry ``final[flag]`` (e.g. "failed", "diverged")."""
    return sum(bool(r.final.get(flag)) for r in runs.arm(arm))


# History read-outs by name (claims and tables name them like final metrics; :func:`reader`):
# * loss_rise: stability, the largest rise (nats) of the logged training loss above the minimum of the
#   STABILITY_WINDOW logged points before it; continuous, so it moves with every spike (the training loop's
#   ``unstable`` flag, final val loss 0.1 nats above the run's best, was 0 in every run of this folder);
# * rise_share: ``lrkit.analysis.rise_share``, the share of logged changes that rise above 3x the recent noise;
# * val_loss_auc: convergence speed, the mean validation loss over the run (area under its curve per token,
#   ``lrkit.analysis.mean_over_run``), lower for a run that gets low sooner; never capped at the run's length.
def loss_rise(window: int = STABILITY_WINDOW):
    """Reader: the largest rise of a run's logged training loss above the minimum of the ``window`` logged
    points before it (nats, >= 0); None for a diverged run (the claims rule counts it as the worst)."""
    from lrkit.analysis import train_curve

    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"Invalid window: {window!r} (expected an int >= 1)")

    def read(r):
        _, loss = train_curve(r)
        if r.final.get("diverged") or len(loss) < 2:
            return None
        return float(max(0.0, max(loss[i] - loss[max(0, i - window): i].min() for i in range(1, len(loss)))))
    read.__name__ = "loss_rise"
    return read


def rise_share():
    """Reader: ``lrkit.analysis.rise_share`` (k = 3, window 10); None for a diverged run."""
    from lrkit.analysis import rise_share as share

    def read(r):
        return None if r.final.get("diverged") else share(r)
    read.__name__ = "rise_share"
    return read


def val_loss_auc():
    """Reader: the mean validation loss over the run (``lrkit.analysis.mean_over_run``); None if diverged."""
    from lrkit.analysis import mean_over_run

    def read(r):
        return None if r.final.get("diverged") else mean_over_run(r, "val_loss")
    read.__name__ = "val_loss_auc"
    return read


READERS = {"loss_rise": loss_rise, "rise_share": rise_share, "val_loss_auc": val_loss_auc}
LM_READOUTS = ("val_loss", "val_ppl", "val_loss_auc", "loss_rise", "rise_share")  # every LM table shows these


def constant_readouts(runs, metrics) -> list[str]:
    """The ``metrics`` whose values are the same (to 1e-12) in every run of ``runs`` that has one: read-outs
    that cannot separate the arms (issue 19); the notebooks print the list, which should be empty."""
    out = []
    for m in metrics:
        name = m if isinstance(m, str) else m.__name__
        vals = [v for arm in runs.measure(reader(m) if isinstance(m, str) else m).values() for v in arm.values()
                if v is not None]
        if len(vals) > 1 and max(vals) - min(vals) <= 1e-12 * max(1.0, abs(max(vals))):
            out.append(name)
    return out


def main_tables(pre, fine, mem) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(pre-training table, fine-tuning table): per method the mean and 95 % t interval over seeds of the
    final validation loss and perplexity, the mean validation loss over the run (convergence speed), the
    stability read-outs, throughput, the bytes held and their ratio to AdamW's; per fine-tune the macro-F1,
    accuracy, the majority-class accuracy of the scored examples, and the count of failed runs (at the
    constant predictor)."""
    t = pre.summary([reader(m) for m in LM_READOUTS] + [tokens_per_s])
    t.insert(1, "lr", [pre.arm(a)[0].config["lr"] for a in t.arm])
    held = {a.removeprefix("mem "): mem.arm(a)[0].final for a in mem.arms}
    t["state_bytes"] = [held[a]["optimizer_state_bytes"] for a in t.arm]
    t["held_bytes"] = [held[a]["held_bytes"] for a in t.arm]
    t["held vs AdamW"] = t["held_bytes"] / held["AdamW"]["held_bytes"]
    if fine is None:
        return t, None
    f = fine.summary(["macro_f1", "accuracy", "majority_accuracy"])
    f.insert(1, "lr", [fine.arm(a)[0].config["lr"] for a in f.arm])
    f.insert(2, "steps", [fine.arm(a)[0].final["steps"] for a in f.arm])
    f["failed"] = [count(fine, a, "failed") for a in f.arm]
    return t, f


def analytic_memory(sizes=("7b", "13b", "30b", "65b")) -> pd.DataFrame:
    """Analytic training memory (GiB, activations excluded) of LLaMA ``sizes`` per recipe
    (``lrkit.memory.recipe_memory_bytes``), beside the LOMO paper's measured 7B figures."""
    from lrkit.memory import GIB, RECIPES, recipe_memory_bytes

    rows = []
    for size in sizes:
        for recipe in RECIPES:
            b = recipe_memory_bytes(size, recipe)
            rows.append({"model": size, "recipe": recipe, "params_B": b["parameters"] / 1e9,
                         "state_GiB": b["state_bytes"] / GIB, "total_GiB": b["total_bytes"] / GIB,
                         "paper_GiB": LOMO_PAPER_7B_GIB.get(recipe) if size == "7b" else None})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------- normalization
def adalomo_pretrain(name: str, corpus, train, *, model_size: str, lr: float, seed: int,
                     normalization: str = "grouped", eval_tasks=(), include_path=None,
                     allow_code_execution: bool = False, **optim_kw) -> RunResult:
    """Pre-train a fresh LLaMA with AdaLomo (as ``experiments.pretrain`` with method "adalomo"), building one
    param group per transformer block for ``normalization="layer"`` (``layer_groups``), then evaluate the
    trained model on lm-eval ``eval_tasks`` (scores in ``final`` as "<task>_<metric>")."""
    from lrkit.models import build_llama, count_parameters
    from lrkit.optim.adalomo import AdaLomo, layer_groups
    from lrkit.train import train_lm
    from lrkit.utils import seed_everything

    train = replace(train, lr=lr, seed=seed)
    seed_everything(seed)
    model = build_llama(model_size, corpus.vocab_size, train.seq_len, seed=seed)
    params = layer_groups(model) if normalization == "layer" else [p for p in model.parameters() if p.requires_grad]
    opt = AdaLomo(params, lr=lr, normalization=normalization, **optim_kw)
    r = train_lm(name, model, opt, corpus, train, callbacks=(), extra_config={
        "method": "adalomo", "lr": lr, "normalization": normalization, "model_size": model_size,
        "parameters": count_parameters(model), **optim_kw})
    opt.remove_hooks()
    r.final["state_bytes"] = r.memory["optimizer_state_bytes"]
    if eval_tasks and not r.final.get("diverged"):
        from lrkit.evaluation import run_lm_eval

        scores = run_lm_eval(model, corpus.tokenizer, list(eval_tasks), include_path=include_path,
                             device=r.device, max_length=train.seq_len, allow_code_execution=allow_code_execution)
        r.final |= {f"{task}_{k}": v for task, ms in scores.items() for k, v in ms.items() if k != "sample_len"}
    return r


def cloze_task(folder, corpus, n: int, seed: int = 0) -> Path:
    """Write the offline benchmark, "cloze" (held-out Shakespeare: pick the true 8-token continuation of a
    32-token context among 4), as an lm-eval task file; returns the include path."""
    from lrkit.evaluation import cloze_docs, write_task

    return write_task(folder, "cloze", cloze_docs(corpus.val, corpus.tokenizer, n=n, seed=seed))


def normalization(out, *, profile: str, corpus, train, model_size: str, seeds, normalizations, high_lr_factor: float,
                  high_normalizations=("grouped", "none"), cloze_docs: int = 100, benchmark_tasks=(),
                  allow_code_execution: bool = False):
    """``ablation_normalization.ipynb``: AdaLomo with each normalisation at the tuned lr, and those in
    ``high_normalizations`` at ``high_lr_factor`` times it (arms "<norm> (high lr)"). Every trained model
    is evaluated through lm-eval on the offline cloze task and ``benchmark_tasks`` (online lm-eval tasks,
    the paper profile; HumanEval also needs ``allow_code_execution``). Returns (runs, lr)."""
    from lrkit.optim.adalomo import NORMALIZATIONS

    bad = [n for n in (*normalizations, *high_normalizations) if n not in NORMALIZATIONS]
    if bad:  # before any arm trains
        raise ValueError(f"Invalid normalizations: {bad!r} (expected some of {NORMALIZATIONS})")
    lr = tuned("adalomo", profile, "pretrain")["AdaLomo"]
    tasks = (["cloze"] if cloze_docs else []) + list(benchmark_tasks)
    include = cloze_task(Path(out) / "lm_eval_tasks", corpus, cloze_docs) if cloze_docs else None
    arms = {n: dict(normalization=n, lr=lr) for n in normalizations}
    arms |= {f"{n} (high lr)": dict(normalization=n, lr=lr * high_lr_factor) for n in high_normalizations}
    runs = run_all(adalomo_pretrain, arms, out, seeds=seeds, corpus=corpus, train=train, model_size=model_size,
                   eval_tasks=tasks, include_path=include, allow_code_execution=allow_code_execution)
    return runs, lr


def ablation_table(runs, metrics=LM_READOUTS + (tokens_per_s,)) -> pd.DataFrame:
    """``runs.summary`` of ``metrics`` (names through :func:`reader`, or readers) plus each arm's lr: final
    performance (val_loss, val_ppl), convergence speed (val_loss_auc), stability (loss_rise, rise_share) and
    throughput; the summary counts diverged runs."""
    t = runs.summary([reader(m) if isinstance(m, str) else m for m in metrics])
    t.insert(1, "lr", [runs.arm(a)[0].config["lr"] for a in t.arm])
    return t


# ---------------------------------------------------------------------------------- factorization
def variant_knobs(variant: str, nmf_iters: int = 3) -> dict:
    """"<second_moment>:<factor_rank>" -> AdaLomo's knobs, e.g. "qr:1" -> second_moment="qr", factor_rank=1."""
    from lrkit.optim.adalomo import SECOND_MOMENTS

    kind, _, rank = variant.partition(":") if isinstance(variant, str) else (None, "", "")
    if kind not in SECOND_MOMENTS or not (rank == "" or (rank.isdigit() and int(rank) >= 1)):
        raise ValueError(f"Invalid variant: {variant!r} (expected '<second_moment>' or '<second_moment>:<factor_rank>' "
                         f"with second_moment one of {SECOND_MOMENTS} and factor_rank an int >= 1, e.g. 'qr:1')")
    return dict(second_moment=kind, factor_rank=int(rank or 1), nmf_iters=nmf_iters)


def factorization(out, *, profile: str, corpus, train, model_size: str, seeds, variants, memory_variants=(),
                  nmf_iters: int = 3):
    """``ablation_factorization.ipynb``: AdaLomo (tuned lr) with each second-moment ``variants`` trained on
    ``seeds`` (the cpu profile: NMF at ranks 1, 2 and 4, SVD, pivoted QR and the full second moment at rank
    1; SVD and QR above rank 1 produce negative entries that the eps1 clamp turns into huge updates, see
    docs/methods.md, so they are ``memory_variants``: measured, not trained); then the persistent state and
    modelled transient peak of every variant from one measured step. Returns (runs, memory table)."""
    from lrkit.experiments.memory import measure_method_memory

    lr = tuned("adalomo", profile, "pretrain")["AdaLomo"]
    runs = run_all(adalomo_pretrain, {v: dict(lr=lr, **variant_knobs(v, nmf_iters)) for v in variants}, out,
                   seeds=seeds, corpus=corpus, train=train, model_size=model_size)
    rows = []
    for v in dict.fromkeys(list(variants) + list(memory_variants)):
        m = measure_method_memory(model_size, "adalomo", vocab_size=corpus.vocab_size, batch_size=train.batch_size,
                                  seq_len=train.seq_len, steps=1, seed=seeds[0], **variant_knobs(v, nmf_iters))
        rows.append({"variant": v, "trained": v in variants, "state_bytes": m["optimizer_state_bytes"],
                     "persistent_bytes": m["persistent_state_bytes"],
                     "transient_peak_bytes": m["transient_peak_bytes"]})
    mem = pd.DataFrame(rows)
    mem["state vs nmf:1"] = mem["state_bytes"] / mem.set_index("variant").loc["nmf:1", "state_bytes"] \
        if "nmf:1" in set(mem.variant) else math.nan
    return runs, mem
