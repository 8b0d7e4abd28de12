"""One call per run for the notebooks: build the model, set it up for a method, train, return the
record. Pre-training is a LLaMA on Shakespeare; fine-tuning is MiniLM on tweet sentiment.

    runs = {"galore r=4": dict(method="galore", rank=4, lr=0.01), "full-rank": dict(method="full")}
    results = run_all(pretrain, runs, out, corpus=corpus, train=LMTrainConfig(...), model_size="nano")
"""
from __future__ import annotations

from dataclasses import replace

from lrkit import records
from lrkit.finetune import ClassifierTrainConfig, train_classifier
from lrkit.methods import prepare
from lrkit.models import build_encoder_classifier, build_llama, count_parameters
from lrkit.records import RunResult
from lrkit.train import LMTrainConfig, train_lm
from lrkit.utils import seed_everything


def pretrain(name: str, corpus, train: LMTrainConfig, *, method: str, model_size: str, lr: float | None = None,
             **method_kw) -> RunResult:
    """Pre-train a fresh LLaMA of ``model_size`` on ``corpus`` with ``method`` (see lrkit.methods.prepare);
    ``lr`` overrides ``train.lr``."""
    train = replace(train, lr=lr) if lr is not None else train
    seed_everything(train.seed)
    model = build_llama(model_size, corpus.vocab_size, train.seq_len, seed=train.seed)
    setup = prepare(method, model, lr=train.lr, seed=train.seed, **method_kw)
    extra = {**setup.info, "model_size": model_size, "vocab_size": corpus.vocab_size,
             "parameters": count_parameters(model), "trainable": count_parameters(setup.model, True)}
    return train_lm(name, setup.model, setup.optimizer, corpus, train, extra_config=extra, callbacks=setup.callbacks)


def finetune(name: str, dataset: dict, train: ClassifierTrainConfig, *, method: str, lr: float | None = None,
             **method_kw) -> RunResult:
    """Fine-tune the pretrained MiniLM encoder on ``dataset`` with ``method``; ``lr`` overrides ``train.lr``.
    LoRA trains its adapters and the new classification head only (standard LoRA fine-tuning)."""
    train = replace(train, lr=lr) if lr is not None else train
    if method in ("lora", "relora"):
        method_kw.setdefault("lora_trainable", ("classifier",))
    seed_everything(train.seed)
    model, tokenizer = build_encoder_classifier(len(dataset["labels"]), seed=train.seed)
    setup = prepare(method, model, lr=train.lr, seed=train.seed, **method_kw)
    extra = {**setup.info, "model": "all-MiniLM-L6-v2", "parameters": count_parameters(model),
             "trainable": count_parameters(setup.model, True)}
    return train_classifier(name, setup.model, tokenizer, setup.optimizer, dataset, train, extra_config=extra,
                            callbacks=setup.callbacks)


def run_all(fn, runs: dict[str, dict], out, **common) -> dict[str, RunResult]:
    """Run ``fn(name, **common, **kwargs)`` for each named run, record each as it finishes, print a line."""
    results = {}
    for name, kwargs in runs.items():
        r = results[name] = fn(name, **common, **kwargs)
        records.save_run(out, r)
        shown = {k: v for k, v in r.final.items() if k in ("val_ppl", "val_loss", "accuracy", "macro_f1")}
        print(f"{name:>24}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items() if v is not None)
              + (" DIVERGED" if r.final.get("diverged") else "") + f" ({r.wall_time_s:.0f} s)", flush=True)
    return results
