"""The scaling notebooks (``notebooks/galore/scaling.ipynb``, ``notebooks/adalomo/scaling.ipynb``, issue 20): each
paper's pre-training headline at several LLaMA sizes, with the token budget growing with size, learning rates
tuned per size, and a claim on the trend of the gap with size.

* The ladder (:func:`run_ladder`): for every size of ``sizes`` (``lrkit.models.LLAMA_SIZES``), (1) the
  learning-rate sweep of the folder's tuning notebooks, the same for every arm and size (``lrkit.experiments.tune``:
  ``points`` rates ``factor`` apart around the arm's centre, the tuning seed, ``eval_split="tuning"``, extended by
  up to ``max_extend`` rates on the side of an edge optimum), scored by the final validation loss on the tuning
  windows; then (2) every arm at its size's tuned rate on ``seeds``. Arms are named "<size> <arm>". An arm is
  exactly what the folder's main notebook runs (the same run functions, methods and fixed knobs): only the model
  size, the steps and, for the low-rank methods, the rank change.
* The token rule (:func:`steps_for`): steps (at a fixed batch of ``batch_size`` x ``seq_len`` tokens) proportional
  to parameters ** ``token_exponent``, anchored at the largest size (which runs ``steps``). The cpu profile uses
  exponent 0.5 (steps ~ sqrt(parameters)): a fixed number of tokens per parameter (exponent 1) would give the
  smallest rung a twelfth of the largest one's steps, too few to leave warm-up. The paper profile uses exponent 1
  (~20 tokens per parameter, GaLore's Table 2 budgets).
* The read-out: per size and seed, the ratio of the compared arm's final validation perplexity to its baseline's
  (GaLore / full-rank, LoRA / full-rank; AdaLomo / AdamW, AdaLomo / LOMO); its mean and 95 % interval
  (``lrkit.claims.interval``, log=True) per size (:func:`ratio_table`, :func:`ratio_figure`), and the trend: per
  seed, the least-squares slope of the natural log of the ratio against log10 parameters across the sizes
  (:func:`slopes`), so the slope is the change of log ratio per tenfold of parameters.
* Claims (:func:`galore_claims`, :func:`adalomo_claims`): per size, the folder's headline claims (ratio inside the
  kit's perplexity margin, two-sided; AdaLomo below LOMO); the trend claim, a ``quantity="value"`` claim that the
  slope is below log(1.05) per decade: the gap grows by less than the kit's 5 % perplexity margin per tenfold of
  parameters (one-sided, fixed before any run).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from lrkit.claims import MARGINS, Claim, interval
from lrkit.experiments import LMTrainConfig, Runs, edge_flag, lm_corpus, run_all, tune

PPL_MARGIN, PPL_REASON = MARGINS["perplexity"]
TREND_BOUND = math.log(PPL_MARGIN)  # per decade of parameters: the kit's perplexity margin per tenfold
TREND_REASON = ("log(1.05) ~ 0.049 per decade: the ratio may grow by at most the kit's 5 % perplexity margin "
                "(lrkit.claims.MARGINS) per tenfold of parameters; one-sided (a shrinking gap satisfies it), "
                "fixed before any run")
SIZES = ("pico", "nano", "micro")  # the cpu ladder: 0.09 M, 0.23 M, 1.07 M parameters at vocabulary 1024
# GaLore Table 2: training tokens per size (C4; 60M: 1.1B ... 1B: 13.1B), about 20 tokens per parameter.
PAPER_TOKENS = {"60m": 1.1e9, "130m": 2.2e9, "350m": 6.4e9, "1b": 13.1e9}
PAPER_VOCAB = 32000  # the GaLore configs' vocabulary (T5 tokenizer): the parameter counts of the paper's points


def parameters(sizes, vocab_size: int) -> dict:
    """{size: parameter count} of a LLaMA of each size at ``vocab_size`` (``lrkit.memory.parameter_count``, the
    exact count of the model the runs build)."""
    from lrkit.memory import parameter_count
    from lrkit.models import LLAMA_SIZES

    bad = [s for s in sizes if s not in LLAMA_SIZES]
    if bad or not sizes or len(set(sizes)) != len(sizes):
        raise ValueError(f"Invalid sizes: {list(sizes)!r} (expected distinct names of lrkit.models.LLAMA_SIZES)")
    return {s: parameter_count(s, vocab_size) for s in sizes}


def steps_for(params: dict, top_steps: int, exponent: float) -> dict:
    """The token rule: {size: steps} with steps proportional to ``params[size] ** exponent``, the largest size
    at ``top_steps`` (at least one step each). Tokens per step are fixed, so tokens grow the same way."""
    if not isinstance(top_steps, int) or isinstance(top_steps, bool) or top_steps < 1:
        raise ValueError(f"Invalid steps: {top_steps!r} (expected a positive int, the largest size's steps)")
    if not (isinstance(exponent, (int, float)) and not isinstance(exponent, bool) and 0 <= exponent <= 2):
        raise ValueError(f"Invalid token_exponent: {exponent!r} (expected a number in [0, 2])")
    top = max(params.values())
    return {s: max(1, round(top_steps * (n / top) ** exponent)) for s, n in params.items()}


@dataclass
class Ladder:
    """What :func:`run_ladder` ran: the runs (arms "<size> <arm>"), the sweep per size, the sizes' parameter
    counts and steps, the tokens per step, and the measured cost per size."""
    runs: Runs
    tuned: dict  # {size: tune() result}
    params: dict  # {size: parameters}, smallest first
    steps: dict  # {size: steps}
    tokens_per_step: int
    arms: tuple
    cost: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def sizes(self) -> list:
        return list(self.params)


def run_ladder(out, *, fn, arms_for, centers: dict, sizes, vocab_size: int, steps: int, token_exponent: float,
               batch_size: int, seq_len: int, evals: int, eval_windows: int, seeds, points: int, factor: float,
               max_extend: int, corpus: str = "shakespeare", corpus_options: dict | None = None) -> Ladder:
    """Every size of ``sizes``, smallest first: the sweep (``tune(fn, ...)``, group "<size>", every arm of
    ``arms_for(size, None)`` on the same ``points`` x ``factor`` grid around ``centers[arm]``, ``max_extend``,
    the tuning seed, the tuning windows), then every arm of ``arms_for(size, lrs)`` ({arm: kwargs of ``fn``}
    with the chosen rates ``lrs``) on ``seeds``, at :func:`steps_for`'s steps and ``evals`` evaluations a run.
    Records every run in ``out`` and times each size's sweep and runs (the cost table)."""
    params = parameters(sizes, vocab_size)
    params = dict(sorted(params.items(), key=lambda kv: kv[1]))
    if len(params) < 2:
        raise ValueError(f"Invalid sizes: {list(sizes)!r} (a trend needs at least two sizes)")
    if not isinstance(evals, int) or isinstance(evals, bool) or evals < 1:
        raise ValueError(f"Invalid evals: {evals!r} (expected a positive int: evaluations per run)")
    seeds = list(seeds)
    by_size = steps_for(params, steps, token_exponent)
    data = lm_corpus(corpus, vocab_size, corpus_options)
    runs, chosen, rows, arms = Runs(), {}, [], ()
    for size, n in params.items():
        train = LMTrainConfig(steps=by_size[size], batch_size=batch_size, seq_len=seq_len,
                              eval_every=max(1, by_size[size] // evals), eval_windows=eval_windows)
        kinds = {a: {k: v for k, v in kw.items() if k != "lr"} for a, kw in arms_for(size, None).items()}
        arms = tuple(kinds)
        t0 = time.perf_counter()
        chosen[size] = tune(fn, kinds, out, centers=centers, metric="val_loss", points=points, factor=factor,
                            group=size, max_extend=max_extend, corpus=data, train=replace(train, eval_split="tuning"),
                            model_size=size)
        t1 = time.perf_counter()
        lrs = {a: c["lr"] for a, c in chosen[size].items()}
        runs = runs.merge(run_all(fn, {f"{size} {a}": kw for a, kw in arms_for(size, lrs).items()}, out,
                                  seeds=seeds, corpus=data, train=train, model_size=size))
        t2 = time.perf_counter()
        tokens = by_size[size] * batch_size * seq_len
        tuning_runs = sum(c["runs"] for c in chosen[size].values())
        rows.append({"size": size, "params": n, "steps": by_size[size], "tokens": tokens,
                     "tokens_per_param": tokens / n, "tuning_runs": tuning_runs, "tuning_s": t1 - t0,
                     "runs": len(arms) * len(seeds), "runs_s": t2 - t1, "total_s": t2 - t0,
                     "s_per_run": (t2 - t0) / (tuning_runs + len(arms) * len(seeds))})
    return Ladder(runs=runs, tuned=chosen, params=params, steps=by_size, tokens_per_step=batch_size * seq_len,
                  arms=arms, cost=pd.DataFrame(rows))


# ------------------------------------------------------------------------------------------ read-outs
def per_seed_ratios(measured: dict, size: str, arm: str, base: str) -> dict:
    """{seed: measured["<size> <arm>"][seed] / measured["<size> <base>"][seed]} over the seeds both ran (None
    where either run has no finite positive value, e.g. diverged): paired by seed, never by position."""
    a, b = measured.get(f"{size} {arm}", {}), measured.get(f"{size} {base}", {})
    out = {}
    for s in sorted(set(a) & set(b)):
        x, y = a[s], b[s]
        ok = all(v is not None and math.isfinite(v) and v > 0 for v in (x, y))
        out[s] = float(x / y) if ok else None
    return out


def slopes(measured: dict, params: dict, arm: str, base: str) -> dict:
    """The trend per seed: {seed: least-squares slope of ln(arm / base) against log10(parameters) across the
    sizes of ``params``} (the change of log ratio per tenfold of parameters); None for a seed where some size's
    ratio is missing or not finite (the claims rule counts it as failed)."""
    per = {size: per_seed_ratios(measured, size, arm, base) for size in params}
    seeds = sorted(set().union(*(set(p) for p in per.values())))
    x = np.log10([float(params[size]) for size in params])
    out = {}
    for s in seeds:
        r = [per[size].get(s) for size in params]
        out[s] = None if any(v is None for v in r) else float(np.polyfit(x, np.log(r), 1)[0])
    return out


def trend_arm(arm: str, base: str) -> str:
    """The name a pair's ratio and trend are read under, e.g. "galore / full-rank"."""
    return f"{arm} / {base}"


def measure(ladder: Ladder, pairs):
    """``measurements_for`` of ``lrkit.claims.evaluate_all``: "slope" gives {"<arm> / <base>": :func:`slopes`
    of val_ppl} for each (arm, base) of ``pairs``; any other metric the runs' ``final[metric]``."""
    def measure_for(metric):
        if metric == "slope":
            ppl = ladder.runs.measure("val_ppl")
            return {trend_arm(a, b): slopes(ppl, ladder.params, a, b) for a, b in pairs}
        return ladder.runs.measure(metric)
    return measure_for


def ratio_table(ladder: Ladder, pairs, paper: dict | None = None, metric: str = "val_ppl") -> pd.DataFrame:
    """Per size and (arm, base) pair: the mean ratio of ``metric`` over seeds with its 95 % interval (t interval
    on the log ratio, ``interval(..., log=True)``), n, the chosen learning rates, and the paper's ratio where
    ``paper`` ({(arm, base): {size: ratio}}) has one."""
    measured, rows = ladder.runs.measure(metric), []
    for size, n in ladder.params.items():
        for a, b in pairs:
            vals = [v for v in per_seed_ratios(measured, size, a, b).values() if v is not None]
            mean, lo, hi, k = interval(vals, log=True) if vals else (math.nan, math.nan, math.nan, 0)
            rows.append({"size": size, "params": n, "steps": ladder.steps[size], "pair": trend_arm(a, b),
                         "ratio": mean, "ratio_lo": lo, "ratio_hi": hi, "n": k,
                         "lr": ladder.tuned[size][a]["lr"], "base_lr": ladder.tuned[size][b]["lr"],
                         "paper": (paper or {}).get((a, b), {}).get(size)})
    return pd.DataFrame(rows)


def flags(ladder: Ladder, pairs) -> dict:
    """``flags`` for ``evaluate_all``: {"<size> <arm>": text} for every arm whose chosen rate at that size is
    still at the edge of its grid after extension, and for each trend arm the texts of the arms it reads."""
    out = {f"{size} {arm}": text for size, arms in ladder.tuned.items() for arm, t in arms.items()
           if (text := edge_flag(f"{size} {arm}", t))}
    for a, b in pairs:
        texts = [out[f"{s} {x}"] for s in ladder.params for x in (a, b) if f"{s} {x}" in out]
        if texts:
            out[trend_arm(a, b)] = "; ".join(texts)
    return out


def budget_note(ladder: Ladder, paper_tokens_per_param: float | None = None, reference: str = "the paper") -> str:
    """The token rule and budget in words, against ``reference``'s tokens per parameter where given."""
    c = ladder.cost
    text = (f"Token budget: {ladder.tokens_per_step} tokens a step, steps "
            + ", ".join(f"{r.size} {r.steps} ({r.tokens / 1e3:,.0f}k tokens, {r.tokens_per_param:.2f} tokens per "
                        f"parameter)" for r in c.itertuples()))
    if paper_tokens_per_param:
        text += (f"; {reference} trains on about {paper_tokens_per_param:.0f} tokens per parameter, "
                 f"{paper_tokens_per_param / c.tokens_per_param.max():.0f} to "
                 f"{paper_tokens_per_param / c.tokens_per_param.min():.0f} times more")
    return text + "."


def cost_note(ladder: Ladder) -> str:
    """The measured time per point (this machine, this profile), per size: runs x seconds."""
    c = ladder.cost
    return ("Cost per point (measured here): " + ", ".join(
        f"{r.size} {r.tuning_runs + r.runs} runs x {r.s_per_run:.1f} s = {r.total_s:.0f} s" for r in c.itertuples())
        + f"; in all {c.total_s.sum() / 60:.1f} min.")


def slope_note(ladder: Ladder, pairs) -> str:
    """The trend per seed in words: each pair's slope of ln(ratio) per decade of parameters, seed by seed."""
    ppl = ladder.runs.measure("val_ppl")
    parts = []
    for a, b in pairs:
        per = slopes(ppl, ladder.params, a, b)
        parts.append(f"{trend_arm(a, b)}: " + ", ".join(
            f"seed {s} {v:+.4f}" if v is not None else f"seed {s} failed" for s, v in per.items()))
    return ("Slope of ln(ratio) per tenfold of parameters over " + ", ".join(ladder.params) + " (least squares, "
            "per seed): " + "; ".join(parts) + ".")


def sweep_table(ladder: Ladder) -> pd.DataFrame:
    """One row per size, arm and learning rate of the sweeps: score (final val loss, tuning windows), chosen,
    added by the extension, the arm's edge state and its runs (the same grid for every arm: equal budgets)."""
    rows = []
    for size, arms in ladder.tuned.items():
        for arm, t in arms.items():
            added = {float(x) for x in t.get("extended", [])}
            for lr, sc in zip(t["grid"], t["scores"]):
                rows.append({"size": size, "arm": arm, "lr": lr, "score": sc, "chosen": lr == t["lr"],
                             "extended": float(lr) in added, "at_edge": t["at_edge"],
                             "edge_reason": t["edge_reason"], "runs": t["runs"], "budget": t["budget"]})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ figure
def ratio_figure(table: pd.DataFrame, paper_points: pd.DataFrame | None = None, ax=None, title: str = ""):
    """The ratio with its 95 % interval against parameters (log x axis), one series per pair, the kit's
    perplexity margin as a band around 1, and the paper's points (``paper_points``: params, ratio, pair, source)
    as open markers of the same colour."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5))
    colours = dict(zip(table.pair.unique(), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for pair, df in table.groupby("pair", sort=False):
        err = np.nan_to_num(np.array([(df.ratio - df.ratio_lo).to_numpy(), (df.ratio_hi - df.ratio).to_numpy()]))
        ax.errorbar(df.params, df.ratio, yerr=err, fmt="o-", capsize=4, color=colours[pair],
                    label=f"{pair}, kit (95% CI, {int(df.n.max())} seeds)")
    if paper_points is not None and len(paper_points):
        for pair, df in paper_points.groupby("pair", sort=False):
            ax.plot(df.params, df.ratio, "s--", mfc="white", color=colours.get(pair, "grey"),
                    label=f"{pair}, paper ({df.source.iloc[0]})")
    ax.axhline(1.0, color="black", lw=1)
    ax.axhspan(1 / PPL_MARGIN, PPL_MARGIN, color="grey", alpha=0.15, label="kit's margin (1/1.05, 1.05)")
    ax.set_xscale("log")
    ax.set(xlabel="parameters (log scale)", ylabel="ratio of final validation perplexities", title=title)
    ax.legend(fontsize=8)
    return ax


# ------------------------------------------------------------------------------------------ GaLore
GALORE_PAIRS = (("galore", "full-rank"), ("lora", "full-rank"))


def galore_arms(ranks: dict, *, scale: float, update_proj_gap: int):
    """``arms_for`` of :func:`run_ladder` for the GaLore headline: the full-rank baseline (``equal_lr_control``),
    GaLore and LoRA as galore.ipynb runs them (``lrkit.experiments.galore.pretrain_arms``), at the size's rank."""
    from lrkit.experiments import galore as g

    def arms_for(size, lrs):
        return g.pretrain_arms(lrs or g.CENTERS["pretrain"], rank=ranks[size], scale=scale,
                               update_proj_gap=update_proj_gap, arms=(g.BASELINE, "galore", "lora"))
    return arms_for


def run_galore(out, *, sizes, ranks, vocab_size: int, steps: int, token_exponent: float, batch_size: int,
               seq_len: int, evals: int, eval_windows: int, scale: float, update_proj_gap: int, seeds,
               points: int, factor: float, max_extend: int, corpus: str = "shakespeare",
               corpus_options: dict | None = None) -> Ladder:
    """galore/scaling.ipynb: :func:`run_ladder` with GaLore, the full-rank baseline and LoRA (rank ``ranks[k]`` at
    ``sizes[k]``), centred on the folder's pre-training centres (``galore.CENTERS``: 0.02 for GaLore and the
    baseline, whose grid 0.01-0.04 holds both rates the cpu tuning chose at nano; 0.01 for LoRA, its rate there)."""
    from lrkit.experiments import galore as g

    if len(ranks) != len(sizes):
        raise ValueError(f"Invalid ranks: {ranks!r} (expected one per size of {list(sizes)!r})")
    return run_ladder(out, fn=g.pretrain_run, arms_for=galore_arms(dict(zip(sizes, ranks)), scale=scale,
                                                                  update_proj_gap=update_proj_gap),
                      centers=g.CENTERS["pretrain"], sizes=sizes, vocab_size=vocab_size, steps=steps,
                      token_exponent=token_exponent, batch_size=batch_size, seq_len=seq_len, evals=evals,
                      eval_windows=eval_windows, seeds=seeds, points=points, factor=factor, max_extend=max_extend,
                      corpus=corpus, corpus_options=corpus_options)


def galore_paper() -> dict:
    """{(arm, base): {size: ratio}}: Table 2's GaLore / full-rank and LoRA / full-rank at 60M-1B."""
    from lrkit.experiments.galore import PAPER, paper_ratio

    return {(a, b): {s: paper_ratio(a, b, s) for s in PAPER["pretrain_ppl"]} for a, b in GALORE_PAIRS}


def galore_paper_points() -> pd.DataFrame:
    """Table 2's ratios as points: size, parameters (the official configs at vocabulary 32000), tokens, ratio."""
    from lrkit.memory import parameter_count

    return pd.DataFrame([{"size": s, "params": parameter_count(s, PAPER_VOCAB), "tokens": PAPER_TOKENS[s],
                          "pair": trend_arm(a, b), "ratio": r, "source": "Table 2, C4"}
                         for (a, b), by in galore_paper().items() for s, r in by.items()])


def paper_slope(points: pd.DataFrame, pair: str) -> float:
    """The paper's own trend: least-squares slope of ln(ratio) against log10(parameters) over its points."""
    df = points[points.pair == pair]
    return float(np.polyfit(np.log10(df.params.astype(float)), np.log(df.ratio), 1)[0])


def paper_tokens_per_param() -> float:
    """Table 2's mean tokens per parameter (60M-1B)."""
    p = galore_paper_points().drop_duplicates("size")
    return float((p.tokens / p.params).mean())


def galore_claims(sizes) -> list:
    """Per size: GaLore / full-rank and LoRA / full-rank equivalent within the kit's perplexity margin (Table 2's
    value beside it where the paper has the size); and the trend: GaLore's gap does not grow with size."""
    from lrkit.experiments.galore import BASELINE

    paper = galore_paper()
    out = []
    for size in sizes:
        for arm, what in (("galore", "GaLore"), ("lora", "LoRA")):
            p = paper[(arm, BASELINE)].get(size)
            out.append(Claim(
                f"{arm}-vs-full-rank-{size}", f"LLaMA-{size}: {what} pre-trains to the perplexity of the full-rank "
                f"baseline (AdamW with GaLore's two learning-rate groups), each tuned at this size: equivalent "
                f"within the kit's perplexity margin (Table 2: {what} / full-rank "
                + ", ".join(f"{v:.3f} at {s.upper()}" for s, v in paper[(arm, BASELINE)].items()) + ").",
                "Table 2", "val_ppl", (f"{size} {arm}", f"{size} {BASELINE}"), quantity="ratio", op="between",
                bound=PPL_MARGIN, margin_reason=PPL_REASON, paper=p,
                paper_source=f"Table 2 ({size.upper()})" if p is not None else ""))
    out.append(Claim(
        "galore-gap-does-not-grow", "The GaLore / full-rank gap does not grow with model size (Table 2: 1.024 at 60M, "
        "1.011 at 130M, 1.008 at 350M, 1.005 at 1B, it shrinks): per seed, the least-squares slope of ln(GaLore / "
        "full-rank perplexity) against log10(parameters) across the sizes, below log(1.05) per decade.",
        "Table 2 (60M-1B)", "slope", (trend_arm("galore", BASELINE),), quantity="value", op="<", bound=TREND_BOUND,
        margin_reason=TREND_REASON, paper=paper_slope(galore_paper_points(), trend_arm("galore", BASELINE)),
        paper_source="Table 2: slope over 60M-1B (parameters of the official configs, vocabulary 32000)"))
    return out


# ------------------------------------------------------------------------------------------ AdaLomo
ADALOMO_PAIRS = (("AdaLomo", "AdamW"), ("AdaLomo", "LOMO"))


def adalomo_arms(size, lrs):
    """``arms_for`` of :func:`run_ladder` for AdaLomo's headline: ``adalomo.METHODS`` (AdaLomo, AdamW, LOMO with
    their fixed recipes), at the chosen rates ``lrs`` (none: for the sweep)."""
    from lrkit.experiments.adalomo import METHODS

    return {m: dict(kw, **({"lr": lrs[m]} if lrs else {})) for m, kw in METHODS.items()}


def run_adalomo(out, *, sizes, vocab_size: int, steps: int, token_exponent: float, batch_size: int, seq_len: int,
                evals: int, eval_windows: int, seeds, points: int, factor: float, max_extend: int,
                corpus: str = "shakespeare", corpus_options: dict | None = None) -> Ladder:
    """adalomo/scaling.ipynb: :func:`run_ladder` with AdaLomo, AdamW and LOMO as adalomo.ipynb pre-trains them
    (``lrkit.experiments.pretrain`` with ``adalomo.METHODS``), centred on ``adalomo.PRETRAIN_CENTERS`` (the rates the
    cpu tuning chose at nano)."""
    from lrkit.experiments import pretrain
    from lrkit.experiments.adalomo import PRETRAIN_CENTERS

    return run_ladder(out, fn=pretrain, arms_for=adalomo_arms, centers=PRETRAIN_CENTERS, sizes=sizes,
                      vocab_size=vocab_size, steps=steps, token_exponent=token_exponent, batch_size=batch_size,
                      seq_len=seq_len, evals=evals, eval_windows=eval_windows, seeds=seeds, points=points,
                      factor=factor, max_extend=max_extend, corpus=corpus, corpus_options=corpus_options)


def adalomo_claims(sizes) -> list:
    """Per size: AdaLomo on par with AdamW (equivalence within the kit's perplexity margin) and AdaLomo below
    LOMO (adalomo.ipynb's pre-training headline); and the trend: AdaLomo's gap to AdamW does not grow with size.
    The paper reports no pre-training number to set beside them (its further pre-training is shown as loss
    curves of LLaMA-7B, Sec. 4, with no table), so no claim has a paper value."""
    from lrkit.experiments.adalomo import MAIN_CLAIMS

    on_par = next(c for c in MAIN_CLAIMS if c.id == "adalomo-on-par-with-adamw")
    beats = next(c for c in MAIN_CLAIMS if c.id == "adalomo-beats-lomo")
    out = []
    for size in sizes:
        out.append(replace(on_par, id=f"{on_par.id}-{size}", arms=(f"{size} AdaLomo", f"{size} AdamW"),
                           statement=f"LLaMA-{size}, each method tuned at this size: {on_par.statement}"))
        out.append(replace(beats, id=f"{beats.id}-{size}", arms=(f"{size} AdaLomo", f"{size} LOMO"),
                           statement=f"LLaMA-{size}, each method tuned at this size: {beats.statement}"))
    out.append(Claim(
        "adalomo-gap-does-not-grow", "AdaLomo's gap to AdamW does not grow with model size (the paper compares them "
        "at 7B to 65B): per seed, the least-squares slope of ln(AdaLomo / AdamW perplexity) against "
        "log10(parameters) across the sizes, below log(1.05) per decade.", "Abstract; Sec. 4 (7B-65B)", "slope",
        (trend_arm("AdaLomo", "AdamW"),), quantity="value", op="<", bound=TREND_BOUND, margin_reason=TREND_REASON))
    return out
