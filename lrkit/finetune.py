"""Fine-tuning a pretrained encoder for sentence classification: the kit's offline stand-in for the
papers' GLUE (GaLore, Table 4) and instruction-tuning (AdaLomo) experiments.

All-MiniLM-L6-v2 with a fresh classification head on tweet sentiment; accuracy and macro-F1 on a
held-out split. The same optimizers and :func:`lrkit.methods.prepare` as pre-training.
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
    eval_every: int = 0  # steps; 0 = only at the end
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        for k in ("epochs", "batch_size", "max_len"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {k}: {v!r} (expected a positive int)")
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
    return {"accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, average="macro")), "test_loss": loss_sum / len(texts)}


def train_classifier(name: str, model, tokenizer, optimizer, dataset: dict, cfg: ClassifierTrainConfig,
                     extra_config: dict | None = None, callbacks=()) -> RunResult:
    """Fine-tune ``model`` on ``dataset`` ({'train': {'text', 'label'}, 'test': ...}) and evaluate."""
    device = resolve_device(cfg.device)
    model.to(device).train()
    train_x, train_y = _subset(dataset["train"], cfg.train_size, cfg.seed)
    test_x, test_y = _subset(dataset["test"], cfg.test_size, cfg.seed + 1)
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
    final = {k: history[-1][k] for k in ("accuracy", "macro_f1", "test_loss", "train_loss")}
    final.update(steps=step, train_examples=len(train_x), test_examples=len(test_x))
    info = device_info(device)
    return RunResult(name=name, config={**asdict(cfg), **(extra_config or {})}, seed=cfg.seed,
                     device=info["device"], device_name=info["device_name"], history=history, final=final,
                     wall_time_s=wall, memory=memory_figures(model, optimizer, device))
