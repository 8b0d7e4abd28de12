"""One training loop for language-model pre-training, shared by every method and baseline.

Batches are random windows of the tokenized training stream drawn from a seeded generator; validation
uses fixed, evenly spaced windows of the held-out works, so every run of a notebook sees the same data.
Schedule: linear warm-up then cosine decay to ``min_lr_ratio`` of the peak (the GaLore recipe).

Failure, in a run's ``final`` dict (the rule, written once):

* ``diverged``: the train loss became NaN or infinite (training stopped there), or the last validation
  loss is not finite;
* ``unstable``: diverged, or the run *ended far worse than its best point*: its final validation loss
  exceeds the lowest validation loss it logged by more than ``unstable_margin`` nats (default 0.1, a
  perplexity 10.5 % above the run's own best). Under a decaying schedule a healthy run ends at or near
  its best, so this catches late blow-ups and loss plateaus broken by spikes that NaN checks miss.
  ``val_loss_above_best`` (final minus best, >= 0) is the continuous measure behind it and
  ``best_val_loss`` the best point; both are None for a diverged run.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lrkit.memory import memory_figures
from lrkit.records import RunResult
from lrkit.utils import device_info, progress, resolve_device


@dataclass
class LMTrainConfig:
    steps: int = 50
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1e-3
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    eval_every: int = 25
    eval_windows: int = 64
    log_every: int = 0  # history row with the train loss every log_every steps; 0 = at evaluations only
    seed: int = 0
    device: str = "auto"
    unstable_margin: float = 0.1  # nats: final val loss this far above the run's best = unstable

    def __post_init__(self):
        for k in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {k}: {v!r} (expected a positive int)")
        if not isinstance(self.log_every, int) or self.log_every < 0:
            raise ValueError(f"Invalid log_every: {self.log_every!r} (expected an int >= 0)")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Invalid lr: {self.lr!r} (expected a finite positive number)")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"Invalid warmup_frac: {self.warmup_frac!r} (expected 0 <= x < 1)")
        if not (isinstance(self.unstable_margin, (int, float)) and math.isfinite(self.unstable_margin)
                and self.unstable_margin >= 0):
            raise ValueError(f"Invalid unstable_margin: {self.unstable_margin!r} (expected a finite number >= 0)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"Invalid min_lr_ratio: {self.min_lr_ratio!r} (expected 0 <= x <= 1)")


def cosine_schedule(optimizer, steps: int, warmup_frac: float, min_lr_ratio: float):
    warmup = int(warmup_frac * steps)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def random_windows(ids: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([torch.from_numpy(ids[s: s + seq_len + 1].astype(np.int64)) for s in starts.tolist()])


def eval_windows(ids: np.ndarray, n: int, seq_len: int) -> torch.Tensor:
    """``n`` evenly spaced, non-overlapping windows covering the whole validation stream."""
    n = min(n, (len(ids) - 1) // (seq_len + 1))
    starts = np.linspace(0, len(ids) - seq_len - 1, n).astype(np.int64)
    return torch.stack([torch.from_numpy(ids[s: s + seq_len + 1].astype(np.int64)) for s in starts])


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token)."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate_lm(model, windows: torch.Tensor, batch_size: int, device) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i: i + batch_size].to(device)
        total += lm_loss(model, batch).item() * len(batch)
        count += len(batch)
    model.train(was_training)
    return total / count


def backward_and_clip(loss, model, optimizer, grad_clip) -> None:
    """Backward, then global-norm clipping; optimizers that update inside backward (``backward``
    method: AdaLomo, Lomo, per-layer GaLore) run their own backward and clip with their own
    ``max_grad_norm``, since no full set of gradients exists after it."""
    if getattr(optimizer, "updates_in_backward", False):
        optimizer.backward(loss)
        return
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)


def stability(history: list[dict], diverged: bool, margin: float) -> dict:
    """``best_val_loss``, ``val_loss_above_best`` and ``unstable`` of a run's history (the rule in the
    module docstring): unstable when diverged or when the last validation loss exceeds the lowest one
    logged by more than ``margin`` nats."""
    vals = [r["val_loss"] for r in history if r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
    if diverged or not vals:
        return {"best_val_loss": None, "val_loss_above_best": None, "unstable": True}
    best = min(vals)
    above = history[-1]["val_loss"] - best
    return {"best_val_loss": best, "val_loss_above_best": above, "unstable": above > margin}


def train_lm(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, corpus,
             cfg: LMTrainConfig, extra_config: dict | None = None, scheduler=None,
             callbacks=()) -> RunResult:
    """Train ``model`` on ``corpus`` (a :class:`lrkit.data.TokenizedCorpus`) and return the record.

    History rows hold the step, train loss (mean since the last row), learning rate and, every
    ``eval_every`` steps and at the end, the validation loss and perplexity. ``callbacks`` are called
    as ``cb(step)`` after each optimizer step (e.g. ReLoRA merges).
    """
    device = resolve_device(cfg.device)
    model.to(device).train()
    gen = torch.Generator().manual_seed(cfg.seed)
    val = eval_windows(corpus.val, cfg.eval_windows, cfg.seq_len)
    if scheduler is None:
        scheduler = cosine_schedule(optimizer, cfg.steps, cfg.warmup_frac, cfg.min_lr_ratio)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    history, running, n_running = [], 0.0, 0
    t0 = time.perf_counter()
    bar = progress(range(1, cfg.steps + 1), desc=name, unit="step")
    for step in bar:
        batch = random_windows(corpus.train, cfg.batch_size, cfg.seq_len, gen).to(device)
        loss = lm_loss(model, batch)
        lr = optimizer.param_groups[0]["lr"]
        backward_and_clip(loss, model, optimizer, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        for cb in callbacks:
            cb(step)
        loss = loss.item()
        if not math.isfinite(loss):
            history.append({"step": step, "train_loss": None, "lr": lr})
            break
        running, n_running = running + loss, n_running + 1
        evaluate = step % cfg.eval_every == 0 or step == cfg.steps
        if evaluate or (cfg.log_every and step % cfg.log_every == 0):
            row = {"step": step, "train_loss": running / n_running, "lr": lr}
            if evaluate:
                row["val_loss"] = evaluate_lm(model, val, cfg.batch_size, device)
                row["val_ppl"] = math.exp(min(row["val_loss"], 700.0))  # no OverflowError on divergence
                bar.set_postfix(train=f"{row['train_loss']:.3f}", val=f"{row['val_loss']:.3f}")
            history.append(row)
            running, n_running = 0.0, 0
    wall = time.perf_counter() - t0

    last = history[-1]
    diverged = last.get("train_loss") is None or not math.isfinite(last.get("val_loss", 0.0))
    final = {"val_loss": None if diverged else last["val_loss"],
             "val_ppl": None if diverged else last["val_ppl"],
             "train_loss": last.get("train_loss"), "diverged": diverged,
             **stability(history, diverged, cfg.unstable_margin), "steps": step,
             "tokens": step * cfg.batch_size * cfg.seq_len,
             **(optimizer.timings() if hasattr(optimizer, "timings") else {})}
    info = device_info(device)
    return RunResult(name=name, config={**asdict(cfg), **(extra_config or {})}, seed=cfg.seed,
                     device=info["device"], device_name=info["device_name"], history=history,
                     final=final, wall_time_s=wall, memory=memory_figures(model, optimizer, device))
