"""The few figure types every notebook uses, so notebooks only choose what to plot."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

sns.set_theme(style="whitegrid", context="notebook")


def history_frame(results) -> pd.DataFrame:
    """All runs' history rows in one long frame with a ``run`` column."""
    return pd.concat([pd.DataFrame(r.history).assign(run=r.name) for r in results], ignore_index=True)


def curves(results, y: str = "val_loss", x: str = "step", ax=None, title: str | None = None,
           baseline: float | None = None, baseline_label: str = "baseline", logy: bool = False):
    """One line per run of ``y`` against ``x`` (rows where ``y`` was measured)."""
    df = history_frame(results).dropna(subset=[y])
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=df, x=x, y=y, hue="run", marker="o", markersize=4, ax=ax)
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", label=baseline_label)
        ax.legend()
    if logy:
        ax.set_yscale("log")
    ax.set(title=title or "")
    return ax


def bars(df: pd.DataFrame, x: str, y: str, ax=None, title: str | None = None, hue: str | None = None,
         fmt: str = "{:.3g}"):
    """A labelled bar per row: ``y`` for each ``x``."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    sns.barplot(data=df, x=x, y=y, hue=hue or x, ax=ax, legend=bool(hue))
    for c in ax.containers:
        ax.bar_label(c, fmt=lambda v: fmt.format(v), fontsize=8)
    ax.set(title=title or "")
    ax.tick_params(axis="x", rotation=20)
    return ax
