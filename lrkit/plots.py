"""The few figure types every notebook uses, so notebooks only choose what to plot. One seaborn style;
curves over seeds show the mean with a band (min to max over seeds), verdicts show their intervals."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

sns.set_theme(style="whitegrid", context="notebook")
VERDICT_COLOURS = {"holds": "#2a9d8f", "contradicted": "#e76f51", "unresolved at this scale": "#8d99ae"}
LABELS = {"val_loss": "validation loss (nats/token)", "val_ppl": "validation perplexity",
          "train_loss": "training loss (nats/token)", "step": "training step", "round": "communication round",
          "test_accuracy": "test accuracy", "loss": "global training loss", "accuracy": "accuracy",
          "macro_f1": "macro-F1", "tokens": "tokens seen"}


def label(name: str) -> str:
    """Axis label in words for a metric name."""
    return LABELS.get(name, name.replace("_", " "))


def history_frame(results) -> pd.DataFrame:
    """All runs' history rows in one long frame with ``run``, ``arm`` and ``seed`` columns."""
    items = results.items() if isinstance(results, dict) else ((None, r) for r in results)
    frames = []
    for _, r in items:
        arm = r.config.get("arm", r.name)
        frames.append(pd.DataFrame(r.history).assign(run=r.name, arm=arm, seed=r.seed,
                                                     diverged=bool(r.final.get("diverged"))))
    return pd.concat(frames, ignore_index=True)


def curves(results, y: str = "val_loss", x: str = "step", ax=None, title: str | None = None,
           baseline: float | None = None, baseline_label: str = "baseline", logy: bool = False, arms=None):
    """One line per arm of ``y`` against ``x``: the mean over seeds with a band from the lowest to the
    highest seed. An arm with a diverged seed is marked '(diverged)' in the legend and its seeds end where
    they diverged."""
    df = history_frame(results).dropna(subset=[y])
    if arms is not None:
        df = df[df.arm.isin(arms)]
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    div = set(df[df.diverged].arm)
    df = df.assign(arm=[f"{a} (diverged)" if a in div else a for a in df.arm])
    sns.lineplot(data=df, x=x, y=y, hue="arm", errorbar=("pi", 100), marker="o", markersize=3, ax=ax)
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", label=baseline_label)
    if logy:
        ax.set_yscale("log")
    ax.set(title=title or "", xlabel=label(x), ylabel=label(y))
    n = df.groupby("arm").seed.nunique()
    ax.legend(title=f"arm (band: min-max over {n.max()} seed{'s' if n.max() > 1 else ''})", fontsize=8,
              title_fontsize=8)
    return ax


def bars(df: pd.DataFrame, x: str, y: str, ax=None, title: str | None = None, hue: str | None = None,
         fmt: str = "{:.3g}", lo: str | None = None, hi: str | None = None):
    """A labelled bar per row: ``y`` for each ``x``; with ``lo``/``hi`` columns, error bars of the interval."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    sns.barplot(data=df, x=x, y=y, hue=hue or x, ax=ax, legend=bool(hue))
    if lo and hi and not hue:
        centres = np.arange(len(df))  # categorical positions; a bar of NaN height (a failed arm) draws no patch
        err = np.array([(df[y] - df[lo]).to_numpy(), (df[hi] - df[y]).to_numpy()])
        ax.errorbar(centres, df[y], yerr=np.nan_to_num(err), fmt="none", ecolor="black", capsize=4)
    for c in ax.containers:
        if hasattr(c, "datavalues"):
            ax.bar_label(c, fmt=lambda v: fmt.format(v), fontsize=8)
    ax.set(title=title or "", xlabel=label(x), ylabel=label(y))
    ax.tick_params(axis="x", rotation=20)
    return ax


def verdicts(verdicts, ax=None, title: str = "Claims: estimate and 95% interval, relative to the tested bound"):
    """A forest plot: one row per claim, its estimate and interval drawn as the margin to the bound it is
    tested against (``Verdict.margin``: right of zero is the claim's side; log units for ratios), coloured
    by verdict. A claim holds when its whole interval is right of zero, is contradicted when it is wholly
    left of it."""
    vs = list(verdicts)
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.5 * len(vs) + 1.4))
    for i, v in enumerate(vs):
        colour = VERDICT_COLOURS.get(v.verdict, "black")
        if not (v.estimate is not None and math.isfinite(v.estimate)):
            continue
        est = v.margin(v.estimate)
        if v.n > 1 and math.isfinite(v.low) and math.isfinite(v.high):
            ends = [v.margin(v.low), v.margin(v.high)]
            if v.op == "between" and min(v.low, v.high) < (1 if v.quantity == "ratio" else 0) < max(v.low, v.high):
                ends.append(v.margin(1.0 if v.quantity == "ratio" else 0.0))
            lo, hi = min(ends), max(ends)
        else:
            lo = hi = est
        ax.errorbar([est], [i], xerr=[[est - lo], [hi - est]], fmt="o", color=colour, capsize=4,
                    mfc="white" if v.n < 2 else colour)
        failed = f", {v.failed} of {v.runs} runs failed" if getattr(v, "failed", 0) else ""
        kind = " [accounting]" if getattr(v, "accounting", False) else ""
        ax.text(1.01, i, f"{v.verdict} (n={v.n}{failed}){kind}", transform=ax.get_yaxis_transform(), va="center",
                fontsize=8, color=colour)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(range(len(vs)), [v.claim for v in vs], fontsize=8)
    ax.set_ylim(len(vs) - 0.5, -0.5)
    ax.set(xlabel="margin to the tested bound (right: the claim's side; log units for ratios)", title=title)
    return ax
