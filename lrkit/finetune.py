"""Fine-tuning a pretrained encoder for sentence classification: the kit's offline stand-in for the
papers' GLUE (GaLore, Table 4) and instruction-tuning (AdaLomo) experiments.

All-MiniLM-L6-v2 with a fresh classification head on a labelled text set (tweet sentiment, BBC News
topics: ``lrkit.data``); accuracy and macro-F1 on a held-out split. The same optimizers and
:func:`lrkit.methods.prepare` as pre-training.

A run that learned nothing is recorded as **failed** (``final["failed"]``), not as a result. The rule
(:func:`failed`), fixed before any result was looked at: at the final evaluation the run failed when

1. at least ``FAILED_CLASS_SHARE`` (95 %) of its test predictions fall in one class (it predicts, nearly,
   one class: the classic collapse of a fine-tune with a bad learning rate), or
2. its accuracy does not beat the majority-class accuracy of the same test set (always answering the
   most common label) by at least ``FAILED_MIN_GAIN`` (2 points).

Read-outs that feed verdicts (``lrkit.experiments.galore``) skip failed runs, and tables count them.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lrkit.records import RunResult
from lrkit.memory import memory_figures
from lrkit.train import backward_and_clip, cosine_schedule
from lrkit.utils import device_info, progress, resolve_device

FAILED_CLASS_SHARE = 0.95  # rule 1: share of test predictions in the most predicted class
FAILED_MIN_GAIN = 0.02  # rule 2: accuracy points a run must gain over the majority-class answer


@dataclass
class ClassifierTrainConfig:
    epochs: int = 1
    batch_size: int = 32
    max_len: int = 48
    lr: float = 5e-5
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    train_size: int = 512  # examples drawn (seeded) from the training split; 0 = all
    test_size: int = 512
    test_seed: int | None = None  # draws the test subset; None = seed + 1. Fix it to score every seed on one set
    eval_every: int = 0  # steps; 0 = only at the end
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        for k in ("epochs", "batch_size", "max_len"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {k}: {v!r} (expected a positive int)")
        if self.test_seed is not None and (not isinstance(self.test_seed, int) or self.test_seed < 0):
            raise ValueError(f"Invalid test_seed: {self.test_seed!r} (expected None or an int >= 0)")
        for k in ("train_size", "test_size", "eval_every"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"Invalid {k}: {v!r} (expected an int >= 0)")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Invalid lr: {self.lr!r} (expected a finite positive number)")


def _subset(split: dict, size: int, seed: int) -> tuple[list[str], np.ndarray]:
    n = len(split["text"])
    idx = np.arange(n) if size == 0 or size >= n else np.random.default_rng(seed).permutation(n)[:size]
    return [split["text"][i] for i in idx], split["label"][idx]


@torch.no_grad()
def evaluate_classifier(model, tokenizer, texts, labels, cfg: ClassifierTrainConfig, device) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    was_training = model.training
    model.eval()
    preds, loss_sum = [], 0.0
    for i in range(0, len(texts), cfg.batch_size):
        enc = tokenizer(texts[i: i + cfg.batch_size], truncation=True, max_length=cfg.max_len, padding=True,
                        return_tensors="pt").to(device)
        y = torch.as_tensor(labels[i: i + cfg.batch_size], device=device)
        logits = model(**enc).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        preds.append(logits.argmax(-1).cpu().numpy())
    model.train(was_training)
    preds = np.concatenate(preds)
    labels = np.asarray(labels)
    return {"accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
            "test_loss": loss_sum / len(texts),
            "majority_accuracy": float(np.bincount(labels).max() / len(labels)),
            "top_class_share": float(np.bincount(preds).max() / len(preds))}


def failed(metrics: dict, class_share: float = FAILED_CLASS_SHARE, min_gain: float = FAILED_MIN_GAIN) -> bool:
    """The failure rule of the module docstring on one evaluation's metrics (``evaluate_classifier``)."""
    return bool(metrics["top_class_share"] >= class_share
                or metrics["accuracy"] < metrics["majority_accuracy"] + min_gain)


def train_classifier(name: str, model, tokenizer, optimizer, dataset: dict, cfg: ClassifierTrainConfig,
                     extra_config: dict | None = None, callbacks=()) -> RunResult:
    """Fine-tune ``model`` on ``dataset`` ({'train': {'text', 'label'}, 'test': ...}) and evaluate."""
    device = resolve_device(cfg.device)
    model.to(device).train()
    train_x, train_y = _subset(dataset["train"], cfg.train_size, cfg.seed)
    test_x, test_y = _subset(dataset["test"], cfg.test_size, cfg.seed + 1 if cfg.test_seed is None else cfg.test_seed)
    steps_per_epoch = math.ceil(len(train_x) / cfg.batch_size)
    steps = cfg.epochs * steps_per_epoch
    scheduler = cosine_schedule(optimizer, steps, cfg.warmup_frac, cfg.min_lr_ratio)
    gen = np.random.default_rng(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history, running, n_running, step = [], 0.0, 0, 0
    t0 = time.perf_counter()
    bar = progress(total=steps, desc=name, unit="step")
    for _ in range(cfg.epochs):
        order = gen.permutation(len(train_x))
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i: i + cfg.batch_size]
            enc = tokenizer([train_x[j] for j in idx], truncation=True, max_length=cfg.max_len, padding=True,
                            return_tensors="pt").to(device)
            y = torch.as_tensor(train_y[idx], device=device)
            loss = torch.nn.functional.cross_entropy(model(**enc).logits.float(), y)
            lr = optimizer.param_groups[0]["lr"]
            backward_and_clip(loss, model, optimizer, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            for cb in callbacks:
                cb(step)
            running, n_running = running + loss.item(), n_running + 1
            bar.update(1)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == steps:
                row = {"step": step, "train_loss": running / n_running, "lr": lr,
                       **evaluate_classifier(model, tokenizer, test_x, test_y, cfg, device)}
                history.append(row)
                running, n_running = 0.0, 0
                bar.set_postfix(acc=f"{row['accuracy']:.3f}")
    bar.close()
    wall = time.perf_counter() - t0
    final = {k: history[-1][k] for k in ("accuracy", "macro_f1", "test_loss", "train_loss", "majority_accuracy",
                                         "top_class_share")}
    final.update(failed=failed(history[-1]), steps=step, train_examples=len(train_x), test_examples=len(test_x))
    info = device_info(device)
    return RunResult(name=name, config={**asdict(cfg), **(extra_config or {})}, seed=cfg.seed,
                     device=info["device"], device_name=info["device_name"], history=history, final=final,
                     wall_time_s=wall, memory=memory_figures(model, optimizer, device))
