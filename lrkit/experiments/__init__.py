"""One call per run for the notebooks, and the run-and-record loop over arms and seeds, written once.

* :func:`pretrain`: a fresh LLaMA on a tokenized corpus with one method (see ``lrkit.methods.prepare``).
* :func:`finetune`: the pretrained MiniLM encoder on a labelled text set with one method.
* :func:`federated`: one federated run (FedAvg, FedLin or FeDLRT) in the in-process simulator.
* :func:`run_all`: every arm on every seed, each recorded as it finishes; returns :class:`Runs`.
* :func:`lm_corpus`: the language-model corpus a notebook names (``corpus``, ``corpus_options``).

Arms are paired by seed: the same seed gives every arm the same initialisation and data order where the
method allows, so the claims rule (``lrkit.claims``) compares arms on paired differences.

    runs = run_all(pretrain, {"galore": dict(method="galore", rank=4, lr=0.01),
                              "full-rank": dict(method="full", lr=0.003)},
                   out, seeds=[0, 1, 2], corpus=corpus, train=LMTrainConfig(...), model_size="nano")
    runs.measure("val_loss")    # {"galore": {0: ..., 1: ..., 2: ...}, "full-rank": {...}}

The per-paper suites (``lrkit.experiments.galore``, ``.adalomo``, ``.fedlrt``) hold each paper's
constants, claims and the notebooks' experiment definitions.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pandas as pd

from lrkit import data, records
from lrkit.claims import interval
from lrkit.finetune import ClassifierTrainConfig, train_classifier
from lrkit.methods import prepare
from lrkit.models import build_encoder_classifier, build_llama, count_parameters
from lrkit.records import RunResult
from lrkit.train import LMTrainConfig, train_lm
from lrkit.utils import seed_everything

__all__ = ["lm_corpus", "LM_CORPORA", "pretrain", "finetune", "federated", "run_all", "Runs", "run_name",
           "final_metric", "tail_mean", "tune", "tuned", "edge_flag", "edge_flags", "LMTrainConfig", "ClassifierTrainConfig"]


# The corpora a language-model notebook can name: Shakespeare offline (smoke and cpu profiles), C4 at gpu and
# paper (lrkit.data.text.load_c4_corpus: data_files, tokenizer, train_tokens, val_tokens as corpus_options).
LM_CORPORA = ("shakespeare", "c4")


def lm_corpus(corpus: str = "shakespeare", vocab_size: int | None = None, options: dict | None = None):
    """The corpus of an LM notebook's ``corpus`` and ``corpus_options`` parameters:
    ``data.load(corpus, vocab_size=vocab_size, **options)`` (options override vocab_size). Shakespeare with no
    options is exactly ``data.load("shakespeare", vocab_size=vocab_size)``, the cpu profile's corpus."""
    if corpus not in LM_CORPORA:
        raise ValueError(f"Invalid corpus: {corpus!r} (expected one of {list(LM_CORPORA)})")
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"Invalid corpus_options: {options!r} (expected a dict of {corpus!r} loader arguments)")
    return data.load(corpus, **({"vocab_size": vocab_size} | (options or {})))


def pretrain(name: str, corpus, train: LMTrainConfig, *, method: str, model_size: str, lr: float | None = None,
             seed: int | None = None, **method_kw) -> RunResult:
    """Pre-train a fresh LLaMA of ``model_size`` on ``corpus`` with ``method`` (see lrkit.methods.prepare);
    ``lr`` and ``seed`` override ``train.lr`` and ``train.seed``."""
    train = replace(train, **{k: v for k, v in dict(lr=lr, seed=seed).items() if v is not None})
    seed_everything(train.seed)
    model = build_llama(model_size, corpus.vocab_size, train.seq_len, seed=train.seed)
    setup = prepare(method, model, lr=train.lr, seed=train.seed, **method_kw)
    extra = {**setup.info, "model_size": model_size, "vocab_size": corpus.vocab_size,
             "parameters": count_parameters(model), "trainable": count_parameters(setup.model, True)}
    return train_lm(name, setup.model, setup.optimizer, corpus, train, extra_config=extra, callbacks=setup.callbacks)


def finetune(name: str, dataset: dict, train: ClassifierTrainConfig, *, method: str, lr: float | None = None,
             seed: int | None = None, **method_kw) -> RunResult:
    """Fine-tune the pretrained MiniLM encoder on ``dataset`` with ``method``; ``lr`` and ``seed`` override
    ``train.lr`` and ``train.seed``. LoRA trains its adapters and the new classification head only
    (standard LoRA fine-tuning)."""
    train = replace(train, **{k: v for k, v in dict(lr=lr, seed=seed).items() if v is not None})
    if method in ("lora", "relora"):
        method_kw.setdefault("lora_trainable", ("classifier",))
    seed_everything(train.seed)
    model, tokenizer = build_encoder_classifier(len(dataset["labels"]), seed=train.seed)
    setup = prepare(method, model, lr=train.lr, seed=train.seed, **method_kw)
    extra = {**setup.info, "model": "all-MiniLM-L6-v2", "parameters": count_parameters(model),
             "trainable": count_parameters(setup.model, True)}
    return train_classifier(name, setup.model, tokenizer, setup.optimizer, dataset, train, extra_config=extra,
                            callbacks=setup.callbacks)


def federated(name: str, *, method: str, model_fn, clients, rounds: int, seed: int = 0, config: dict | None = None,
              **kw) -> RunResult:
    """One federated run in the in-process simulator: ``method`` is "fedavg", "fedlin" or "fedlrt" (the
    latter takes FeDLRT's knobs in ``kw``: variance_correction, dynamic_rank, initial_rank, tau, ...).
    ``config`` adds descriptive keys (problem, number of clients, ...) to the record."""
    from lrkit.fed import run_fedavg, run_fedlin, run_fedlrt, to_run_result

    runners = {"fedavg": run_fedavg, "fedlin": run_fedlin, "fedlrt": run_fedlrt}
    if method not in runners:
        raise ValueError(f"Invalid method: {method!r} (expected one of {sorted(runners)})")
    t0 = time.perf_counter()
    res = runners[method](model_fn, clients, rounds, seed=seed, **kw)
    cfg = {**(config or {}), "method": method, "rounds": rounds, "seed": seed,
           **{k: v for k, v in kw.items() if k not in ("eval_data", "loss_fn")}}
    result = to_run_result(name, res, cfg, time.perf_counter() - t0)
    result.model = res["model"]  # not recorded: for notebooks that read the trained map (least squares)
    return result


def run_name(arm: str, seed: int) -> str:
    """The record name of one arm on one seed."""
    return f"{arm} | seed {seed}"


def run_all(fn, runs: dict[str, dict], out, seeds=(0,), **common) -> "Runs":
    """Run ``fn(name, seed=seed, **common, **kwargs)`` for every arm (``runs``: {arm: kwargs}) and seed, seed
    by seed (so a cut-short run still has whole seeds), record each as it finishes, print one line."""
    seeds = _check_seeds(seeds)
    results = Runs()
    for seed in seeds:
        for arm, kwargs in runs.items():
            name = run_name(arm, seed)
            r = fn(name, seed=seed, **common, **kwargs)
            r.config["arm"] = arm
            results[(arm, seed)] = r
            if out is not None:
                records.save_run(out, r)
            shown = {k: v for k, v in r.final.items()
                     if k in ("val_ppl", "val_loss", "accuracy", "macro_f1", "test_accuracy", "loss")}
            print(f"{name:>32}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items() if isinstance(v, float))
                  + (" DIVERGED" if r.final.get("diverged") else "") + f" ({r.wall_time_s:.0f} s)", flush=True)
    return results


def _check_seeds(seeds) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ValueError(f"Invalid seeds: {seeds!r} (expected a non-empty list of distinct non-negative ints)")
    return seeds


def final_metric(metric: str):
    """Reader of ``result.final[metric]`` (None when missing or not finite, e.g. a diverged run)."""
    def read(r: RunResult):
        v = r.final.get(metric)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None
    read.__name__ = metric
    return read


def tail_mean(metric: str, k: int):
    """Reader of the mean of the last ``k`` logged values of ``metric`` in the history: the
    low-noise read-out for metrics that fluctuate from evaluation to evaluation (e.g. test accuracy
    per federated round). None if the run has fewer than ``k`` values or any is not finite."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid k: {k!r} (expected a positive int)")

    def read(r: RunResult):
        vals = [h[metric] for h in r.history if h.get(metric) is not None]
        if len(vals) < k or not all(math.isfinite(v) for v in vals[-k:]):
            return None
        return float(np.mean(vals[-k:]))
    read.__name__ = f"{metric} (mean of last {k})"
    return read


class Runs(dict):
    """{(arm, seed): RunResult} with the read-outs the claims rule and the tables need."""

    @property
    def arms(self) -> list[str]:
        return list(dict.fromkeys(a for a, _ in self))

    @property
    def seeds(self) -> list[int]:
        return sorted({s for _, s in self})

    def arm(self, arm: str) -> list[RunResult]:
        return [r for (a, _), r in self.items() if a == arm]

    def measure(self, metric, arms=None) -> dict:
        """{arm: {seed: value}}; ``metric`` is a key of ``final`` or a reader ``f(RunResult) -> float``."""
        read = final_metric(metric) if isinstance(metric, str) else metric
        out = {}
        for (a, s), r in self.items():
            if arms is None or a in arms:
                out.setdefault(a, {})[s] = read(r)
        return out

    def summary(self, metrics, arms=None) -> pd.DataFrame:
        """One row per arm: n seeds, and per metric the mean and 95 % t interval across seeds
        (columns ``<metric>``, ``<metric>_lo``, ``<metric>_hi``), plus how many runs diverged."""
        rows = []
        for a in arms or self.arms:
            row = {"arm": a, "n": len(self.arm(a)),
                   "diverged": sum(bool(r.final.get("diverged")) for r in self.arm(a))}
            for m in metrics:
                name = m if isinstance(m, str) else m.__name__
                mean, lo, hi, _ = interval(self.measure(m, [a]).get(a, {}).values())
                row |= {name: mean, f"{name}_lo": lo, f"{name}_hi": hi}
            rows.append(row)
        return pd.DataFrame(rows)

    def merge(self, other: "Runs") -> "Runs":
        out = Runs(self)
        out.update(other)
        return out


# ------------------------------------------------------------------------------------------ tuning
TUNING_SEED = 1000  # tuning runs use their own seed, never one of the seeds the verdicts are read from


def lr_grid(center: float, points: int = 5, factor: float = 2.0) -> list[float]:
    """``points`` learning rates spaced by ``factor`` around ``center`` (log-symmetric): the sweep every
    compared method gets, so each has the same tuning budget."""
    if not (isinstance(points, int) and points >= 1 and center > 0 and factor > 1):
        raise ValueError(f"Invalid lr grid: center={center!r}, points={points!r}, factor={factor!r} "
                         "(expected center > 0, points >= 1, factor > 1)")
    k0 = (points - 1) / 2
    return [float(center * factor ** (k - k0)) for k in range(points)]


MAX_EXTEND = 3  # extra learning rates a sweep may add on the side where its best rate sits at the grid's edge


def tune(fn, methods: dict[str, dict], out, *, centers: dict[str, float], metric: str, points: int = 5,
         factor: float = 2.0, lower_is_better: bool = True, seed: int = TUNING_SEED, group: str = "",
         max_extend: int = MAX_EXTEND, **common) -> dict:
    """The learning-rate sweep: each method in ``methods`` ({arm: kwargs without lr}) runs on
    :func:`lr_grid` around its ``centers[arm]`` (same points and factor for all: equal budgets) with the
    tuning seed; the best final ``metric`` wins (a diverged run never does).

    A grid must bracket the optimum: while the best rate is at an end of the grid, the sweep adds the rate
    ``factor`` further out on that side, up to ``max_extend`` extra rates, and stops as soon as the best is
    interior or the next rate out diverged (the record then says so: the optimum may lie between the best
    rate and the diverging one, which the grid cannot resolve). Records each run as ``tune <group> <arm> lr=<lr>`` and returns
    {arm: {"lr", "grid", "scores", "at_edge", "extended", "edge_reason", "runs", "budget"}}: ``grid`` and
    ``scores`` in increasing lr (added rates included), ``extended`` the added rates, ``at_edge`` whether the
    best rate is still at an end after extension and ``edge_reason`` why ("diverges beyond": the next rate
    out diverged; "still improving at the extension limit"; "" when interior)."""
    missing = sorted(set(methods) - set(centers))
    if missing:
        raise ValueError(f"Invalid centers: no centre lr for {missing} (expected one per method)")
    if not isinstance(max_extend, int) or isinstance(max_extend, bool) or max_extend < 0:
        raise ValueError(f"Invalid max_extend: {max_extend!r} (expected an int >= 0)")
    read = final_metric(metric)
    sign = 1 if lower_is_better else -1
    chosen = {}
    for arm, kwargs in methods.items():
        scores: dict[float, float | None] = {}

        def run(lr):
            name = f"tune {group + ' ' if group else ''}{arm} lr={lr:.3g}"
            r = fn(name, seed=seed, lr=lr, **common, **kwargs)
            r.config |= {"arm": arm, "tuning": group or True}
            if out is not None:
                records.save_run(out, r)
            scores[lr] = read(r)
            print(f"{name:>40}: {metric} {scores[lr] if scores[lr] is None else round(scores[lr], 4)}", flush=True)

        for lr in lr_grid(centers[arm], points, factor):
            run(lr)
        extended, reason = [], ""
        while True:
            ok = [lr for lr in sorted(scores) if scores[lr] is not None]  # the rates that did not diverge
            if not ok:
                raise RuntimeError(f"every learning rate of the sweep diverged for {arm!r}: {sorted(scores)}")
            best = min(ok, key=lambda lr: (sign * scores[lr], lr))
            sides = [side for side, end in ((-1, ok[0]), (1, ok[-1])) if best == end]
            if not sides:
                reason = ""
                break
            # a side is closed when the next rate out was run already (so it diverged)
            open_sides = [side for side in sides if not any(abs(math.log(lr / (best * factor ** side))) < 1e-9
                                                            for lr in scores)]
            if not open_sides:
                reason = "diverges beyond"
                break
            if len(extended) >= max_extend:
                reason = "still improving at the extension limit"
                break
            extended.append(best * factor ** open_sides[0])
            run(extended[-1])
        grid = sorted(scores)
        chosen[arm] = {"lr": best, "grid": grid, "scores": [scores[lr] for lr in grid],
                       "at_edge": bool(reason), "extended": extended, "edge_reason": reason, "runs": len(grid),
                       "budget": f"{points} learning rates x 1 seed ({seed}), factor {factor:g} apart, extended "
                                 f"by up to {max_extend} on the side of an edge optimum"}
    return chosen


def edge_flag(label: str, chosen: dict) -> str | None:
    """The flag text for one tuned arm (``chosen``: an entry of ``tune``'s result), named ``label`` in the row:
    which edge of its grid its rate sits at and why, or None when the rate is interior."""
    if not chosen.get("at_edge"):
        return None
    finite = [lr for lr, sc in zip(chosen["grid"], chosen["scores"]) if sc is not None]
    side = "lower" if chosen["lr"] == min(finite) else "upper"
    why = chosen.get("edge_reason") or "grid not extended (tuned before extension)"
    return f"{label}: learning rate {chosen['lr']:.3g} at the {side} edge of its tuning grid ({why})"


def edge_flags(paper: str, profile: str, group: str = "") -> dict:
    """{arm: flag text} for the arms of a tuning group whose chosen learning rate is still at the edge of its
    grid after extension (``tune``; text from :func:`edge_flag`): verdicts that read such a rate show the flag
    in their row (``lrkit.claims.evaluate_all(..., flags=...)``). Empty when every chosen rate is interior."""
    path = records.tuning_record(paper, profile)
    if path is None:
        return {}
    groups = records.load(path).get("summary", {}).get("tuned", {})
    return {arm: text for arm, t in groups.get(group, {}).items() if (text := edge_flag(arm, t))}


def tuned(paper: str, profile: str, group: str = "") -> dict:
    """The learning rates a paper's tuning notebook chose ({arm: lr}), read from its record
    ``reports/<paper>/tuning/<profile>``. At the smoke profile, without a smoke record, the committed cpu
    record is used (nbval runs the tuning notebook after the others)."""
    path = records.tuning_record(paper, profile)
    if path is None:
        order = [profile] + (["cpu"] if profile == "smoke" else [])
        raise FileNotFoundError(f"no tuning record for {paper!r} at profile {profile!r} "
                                f"(looked for {[str(records.report_dir(f'{paper}/tuning', p)) for p in order]}): "
                                f"run `make run/notebooks/{paper}/tuning.ipynb PROFILE={profile}` first")
    groups = records.load(path).get("summary", {}).get("tuned", {})
    if group not in groups:
        raise KeyError(f"{path} has no tuning group {group!r} (it has {sorted(groups)})")
    return {arm: v["lr"] for arm, v in groups[group].items()}


# ------------------------------------------------------------------------------------------ report
def report(out, verdicts, table, headline: str | None = None, notes=(), **extra) -> list[str]:
    """Record a notebook's summary: its table, headline figure, the verdicts of its claims (rendered by
    ``lrkit.claims.sentence``, never by hand) and ``notes``: plain measured statements that are not
    verdicts (e.g. "refresh takes 12% of step time"). Prints and returns the lines."""
    from lrkit import claims as _claims

    verdicts = list(verdicts)
    lines = [_claims.sentence(v) for v in verdicts] + list(notes)
    records.save_summary(out, table, headline=headline, conclusions=lines, claims=_claims.to_records(verdicts),
                         **extra)
    print(*lines, sep="\n")
    return lines
