"""One training loop for language-model pre-training, shared by every method and baseline.

Batches are random windows of the tokenized training stream drawn from a seeded generator; validation
uses fixed, evenly spaced windows of the held-out works, so every run of a notebook sees the same data.
Schedule: linear warm-up then cosine decay to ``min_lr_ratio`` of the peak (the GaLore recipe; the warm-up
factor is (step + 1) / W, so the first step trains at lr / W and the peak comes at step W - 1, one step ahead
of galore's training_utils, whose step / W starts at 0).

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

import contextlib
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lrkit import distributed
from lrkit.memory import memory_figures
from lrkit.optim.in_backward import NonFiniteGradient
from lrkit.records import RunResult
from lrkit.utils import device_info, progress, resolve_device


PRECISIONS = ("auto", "fp32", "bf16")
EVAL_SPLITS = ("claims", "tuning")


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
    grad_accum: int = 1  # micro-batches per step: the step's batch is split, so the data do not depend on it
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU (the papers' scripts); "fp32"; "bf16"
    # Which held-out windows the evaluations read (eval_windows): "claims" (what the verdicts read) or "tuning"
    # (learning-rate sweeps: windows interleaved between the claims' ones, disjoint from them).
    eval_split: str = "claims"

    def __post_init__(self):
        for k in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {k}: {v!r} (expected a positive int)")
        if not isinstance(self.log_every, int) or self.log_every < 0:
            raise ValueError(f"Invalid log_every: {self.log_every!r} (expected an int >= 0)")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Invalid lr: {self.lr!r} (expected a finite positive number)")
        if not (isinstance(self.warmup_frac, (int, float)) and 0 <= self.warmup_frac < 1):
            raise ValueError(f"Invalid warmup_frac: {self.warmup_frac!r} (expected 0 <= x < 1)")
        if not (isinstance(self.unstable_margin, (int, float)) and math.isfinite(self.unstable_margin)
                and self.unstable_margin >= 0):
            raise ValueError(f"Invalid unstable_margin: {self.unstable_margin!r} (expected a finite number >= 0)")
        if not isinstance(self.grad_accum, int) or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"Invalid grad_accum: {self.grad_accum!r} (expected a positive int dividing "
                             f"batch_size={self.batch_size})")
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"Invalid eval_split: {self.eval_split!r} (expected one of {EVAL_SPLITS})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"Invalid precision: {self.precision!r} (expected one of {PRECISIONS})")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"Invalid min_lr_ratio: {self.min_lr_ratio!r} (expected 0 <= x <= 1)")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and not isinstance(
                self.grad_clip, bool) and math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"Invalid grad_clip: {self.grad_clip!r} (expected None or a finite number >= 0; "
                             "None or 0 = no clipping)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"Invalid seed: {self.seed!r} (expected an int >= 0)")


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


def eval_window_starts(n_ids: int, n: int, seq_len: int, split: str = "claims") -> np.ndarray:
    """Start offsets of the held-out windows of ``split`` in a validation stream of ``n_ids`` tokens.

    "claims": ``n`` evenly spaced windows of ``seq_len + 1`` tokens covering the whole stream (what every
    verdict reads). "tuning": as many windows, each starting halfway between two consecutive "claims"
    windows, so the two sets share no token: learning-rate sweeps select on data the claims never read.
    Both sets are capped so that they fit side by side (at most ``(n_ids - 1) // (2 (seq_len + 1))``); a stream
    with room for one window only has that one "claims" window and no "tuning" windows (an error)."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"Invalid eval split: {split!r} (expected one of {EVAL_SPLITS})")
    width = seq_len + 1
    n = min(n, (n_ids - 1) // (2 * width))
    if n < 1:
        if split == "claims" and n_ids >= width:  # a stream with room for one window only: no tuning windows
            return np.zeros(1, dtype=np.int64)
        raise ValueError(f"validation stream of {n_ids} tokens is too short for the {split!r} windows of {width} "
                         f"tokens (seq_len {seq_len}): the tuning split needs two disjoint windows and a token")
    # the claims' windows: evenly spaced over the stream less one window for the tuning set's last one
    starts = np.linspace(0, n_ids - 2 * width, n).astype(np.int64) if n > 1 else np.zeros(1, dtype=np.int64)
    if split == "claims":
        return starts
    gaps = np.diff(np.append(starts, n_ids))  # from each claims window's start to the next's (the last: the end)
    return starts + width + (gaps - 2 * width) // 2  # centred between a claims window's end and the next start


def eval_windows(ids: np.ndarray, n: int, seq_len: int, split: str = "claims") -> torch.Tensor:
    """The held-out windows of ``split`` (:func:`eval_window_starts`) as a (n, seq_len + 1) id tensor."""
    starts = eval_window_starts(len(ids), n, seq_len, split)
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
    """Backward, a check that every gradient is finite (:func:`check_gradients`), then global-norm clipping;
    optimizers that update inside backward (``backward``
    method: AdaLomo, Lomo, per-layer GaLore) run their own backward and clip with their own
    ``max_grad_norm``, since no full set of gradients exists after it."""
    if getattr(optimizer, "updates_in_backward", False):
        optimizer.backward(loss)
        return
    loss.backward()
    check_and_clip(model, grad_clip)


def check_and_clip(model, grad_clip) -> None:
    """After the step's last backward of a step()-based optimizer: every gradient finite, then global-norm
    clipping to ``grad_clip`` (None: no clipping)."""
    check_gradients(model)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)


def check_gradients(model) -> None:
    """Raise :class:`NonFiniteGradient` naming the first parameter whose gradient holds NaN or Inf (one fused
    norm per step; called before ``optimizer.step()``, so nothing non-finite reaches the weights or an SVD)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return
    norms = torch.stack(torch._foreach_norm([p.grad for p in params]))
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        p = params[int(bad.nonzero()[0])]
        raise NonFiniteGradient(p, f"non-finite gradient in a {tuple(p.shape)} parameter")


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


def autocast(device, precision: str):
    """bf16 autocast on CUDA (precision "auto" or "bf16"), nothing on CPU (fp32)."""
    if precision == "bf16" and device.type != "cuda":
        raise ValueError(f"Invalid precision: 'bf16' on {device.type} (bf16 autocast is for CUDA; use 'auto' or 'fp32')")
    if device.type == "cuda" and precision != "fp32":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Checkpoint:
    """``<dir>/last.pt``: everything a run needs to go on exactly where it stopped (model, optimizer state
    with GaLore projectors and moments or AdaLomo factors, scheduler, callbacks such as ReLoRA's, the RNG
    states of every device, the data generator, the history). Written to a temporary file and renamed,
    so a kill mid-write leaves the previous checkpoint; read with ``torch.load(weights_only=True)``."""

    def __init__(self, directory, every: int = 0):
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"Invalid checkpoint_every: {every!r} (expected an int >= 0; 0 = only on SIGTERM)")
        self.path, self.every = Path(directory) / "last.pt", every

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say so, never train from half of it
            raise RuntimeError(f"Invalid checkpoint {self.path}: {type(e).__name__}: {e} (delete it to start over)") from e

    def save(self, state: dict) -> None:
        atomic_torch_save(state, self.path)


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Configuration keys a resumed run may change: where it runs, not what it computes (the global batch is split
# across any number of processes into the same step).
RESUMABLE_KEYS = ("device", "world_size", "parallel")


def _run_config(cfg: LMTrainConfig, extra_config: dict | None) -> dict:
    """The run's configuration as a checkpoint keeps it (plain JSON values, so ``weights_only`` loads it), less
    :data:`RESUMABLE_KEYS`: a resume must find the same, or it would train with the checkpoint's values."""
    import json

    conf = {**asdict(cfg), **(extra_config or {})}
    return json.loads(json.dumps({k: v for k, v in conf.items() if k not in RESUMABLE_KEYS}, default=repr))


def _rng_states(gen: torch.Generator) -> dict:
    return {"data": gen.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2]),
            "python": list(random.getstate()[1])}


def _set_rng_states(gen: torch.Generator, st: dict) -> None:
    gen.set_state(st["data"])
    torch.set_rng_state(st["torch"])
    if st["cuda"]:
        torch.cuda.set_rng_state_all(st["cuda"])
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), int(st["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(st["python"]), None))


class _Sigterm:
    """While active, SIGTERM only sets a flag: the loop saves a checkpoint after the current step and exits."""

    def __init__(self, active: bool):
        self.active, self.received, self._old = active and threading.current_thread() is threading.main_thread(), False, None

    def __enter__(self):
        if self.active:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGTERM, self._old)


def train_lm(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, corpus,
             cfg: LMTrainConfig, extra_config: dict | None = None, scheduler=None,
             callbacks=(), checkpoint_dir=None, checkpoint_every: int = 0, restart: bool = False) -> RunResult:
    """Train ``model`` on ``corpus`` (a :class:`lrkit.data.TokenizedCorpus`) and return the record.

    History rows hold the step, train loss (mean since the last row), learning rate and, every
    ``eval_every`` steps and at the end, the validation loss and perplexity. ``callbacks`` are called
    as ``cb(step)`` after each optimizer step (e.g. ReLoRA merges); one with ``state_dict`` is checkpointed.

    ``checkpoint_dir``: save a :class:`Checkpoint` every ``checkpoint_every`` steps (0: never on a timer)
    and on SIGTERM (then exit with status 143), and resume from it when it exists: rerunning the same
    command continues the run, and its numbers equal an uninterrupted run's. A checkpoint written with another
    configuration (any key of ``cfg`` or ``extra_config`` but :data:`RESUMABLE_KEYS`: lr, rank, ...) is an error
    naming the keys; ``restart=True`` ignores it and starts over (the next checkpoint replaces it).

    Under ``torchrun`` (``model`` and ``optimizer`` from ``lrkit.distributed.wrap``) every rank draws the same
    global batch of ``cfg.batch_size`` windows and trains on its shard; the logged loss is the rank average,
    every rank evaluates the same held-out windows with the same weights, rank 0 writes the checkpoints,
    and a SIGTERM on any rank stops every rank at the same step. With FSDP2 (``lrkit.fsdp.wrap``) the model
    and optimizer go into a sharded checkpoint beside ``last.pt`` (``lrkit.fsdp.save_checkpoint``, every rank
    its shards, ``last.pt`` naming it), which resumes on any number of ranks or in one process.
    """
    # windows of seq_len + 1 tokens: a random one for training needs one token more than a window; the claims'
    # evaluation one window; the tuning split's windows sit between the claims' ones, so it needs two and a token
    need = {"training": (corpus.train, 2, "a window and one more token"),
            "validation": (corpus.val, *((1, "one window") if cfg.eval_split == "claims"
                                         else (2, "two disjoint windows and one more token (eval_split 'tuning')")))}
    for split, (ids, windows, what) in need.items():
        extra = 0 if windows == 1 else 1
        if len(ids) < windows * (cfg.seq_len + 1) + extra:
            raise ValueError(f"Invalid seq_len: {cfg.seq_len} for corpus {corpus.name!r}, whose {split} stream has "
                             f"{len(ids)} tokens (expected seq_len <= {(len(ids) - extra) // windows - 1}: "
                             f"{what} of seq_len + 1 tokens)")
    device = resolve_device(cfg.device)
    model.to(device).train()
    bare = distributed.unwrap(model)  # the module itself: state_dict, evaluation
    gen = torch.Generator().manual_seed(cfg.seed)
    val = eval_windows(corpus.val, cfg.eval_windows, cfg.seq_len, cfg.eval_split)
    if scheduler is None:
        scheduler = cosine_schedule(optimizer, cfg.steps, cfg.warmup_frac, cfg.min_lr_ratio)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    in_backward = getattr(optimizer, "updates_in_backward", False)
    if cfg.grad_accum > 1 and in_backward and getattr(optimizer, "accumulation_steps", 1) != cfg.grad_accum:
        raise ValueError(f"Invalid grad_accum: {cfg.grad_accum} for {type(optimizer).__name__}, which updates "
                         f"inside backward with accumulation_steps={getattr(optimizer, 'accumulation_steps', 1)} "
                         "(expected them equal)")
    stateful = [cb for cb in callbacks if hasattr(cb, "state_dict")]
    ckpt = Checkpoint(checkpoint_dir, checkpoint_every) if checkpoint_dir is not None else None
    sharded = any(type(p).__name__ == "DTensor" for p in bare.parameters())  # FSDP2 (lrkit.fsdp.wrap)

    history, running, n_running, start, wall_before = [], 0.0, 0, 1, 0.0
    run_config = _run_config(cfg, extra_config)
    state = ckpt.load() if ckpt and not restart else None
    if state is not None:
        if state["name"] != name or state["steps"] != cfg.steps:
            raise ValueError(f"Invalid checkpoint {ckpt.path}: it holds run {state['name']!r} of {state['steps']} "
                             f"steps (expected {name!r} of {cfg.steps}); use another checkpoint_dir")
        changed = {k: (state["config"].get(k), run_config.get(k)) for k in sorted(set(state["config"]) | set(run_config))
                   if state["config"].get(k) != run_config.get(k)} if "config" in state else {}
        if changed:
            raise ValueError(f"Invalid checkpoint {ckpt.path}: it was written by a run with another configuration "
                             "(key: checkpoint's value -> this run's) "
                             + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                             + "; resuming would train with the checkpoint's values. Rerun with the checkpoint's "
                               "values, or start over (python -m lrkit.train --restart, or delete the checkpoint)")
        if state.get("sharded"):  # model and optimizer in lrkit.fsdp's checkpoint, on any number of ranks
            from lrkit import fsdp

            fsdp.load_checkpoint(ckpt.path.parent / state["sharded"], bare, optimizer)
        elif sharded:
            raise ValueError(f"Invalid checkpoint {ckpt.path}: written by an unsharded (DDP or one-process) run, "
                             "which an FSDP2 run cannot resume yet; resume it without parallel=fsdp, or --restart")
        else:
            bare.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for cb, cs in zip(stateful, state["callbacks"]):
            cb.load_state_dict(cs)
        _set_rng_states(gen, state["rng"])
        history, running, n_running = state["history"], state["running"], state["n_running"]
        start, wall_before = state["step"] + 1, state["wall_s"]
        for k, v in state["timings"].items():  # measured overheads so far (timings() keys are attributes)
            setattr(optimizer, k, getattr(optimizer, k, 0.0) + v)

    def snapshot(step, shards=None):  # shards: the sharded checkpoint's directory name, holding model and optimizer
        return {"name": name, "steps": cfg.steps, "config": run_config, "step": step, "sharded": shards,
                "model": {} if shards else bare.state_dict(), "optimizer": {} if shards else optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "callbacks": [cb.state_dict() for cb in stateful], "rng": _rng_states(gen),
                "history": history, "running": running, "n_running": n_running,
                "wall_s": wall_before + time.perf_counter() - t0,
                "timings": optimizer.timings() if hasattr(optimizer, "timings") else {}}

    t0 = time.perf_counter()
    step = start - 1
    bar = progress(range(start, cfg.steps + 1), desc=name, unit="step", initial=start - 1, total=cfg.steps)
    with _Sigterm(ckpt is not None) as sigterm:
        for step in bar:
            batch = distributed.shard(random_windows(corpus.train, cfg.batch_size, cfg.seq_len, gen))
            lr = optimizer.param_groups[0]["lr"]
            try:
                if cfg.grad_accum == 1:
                    with autocast(device, cfg.precision):
                        loss = lm_loss(model, batch.to(device))
                    backward_and_clip(loss, model, optimizer, cfg.grad_clip)
                    loss = distributed.mean(loss)
                else:
                    loss = distributed.mean(accumulate(model, optimizer, batch, cfg, device))
            except NonFiniteGradient as e:  # the run stops here as diverged, saying where
                pname = next((n for n, q in bare.named_parameters() if q is e.param), "?")
                failure = f"step {step}: non-finite gradient (NaN or Inf) in parameter {pname}"
                history.append({"step": step, "train_loss": None, "lr": lr, "failure": failure})
                print(f"[{name}] {failure}; the run stops (diverged)", flush=True)
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            for cb in callbacks:
                cb(step)
            if not math.isfinite(loss):
                history.append({"step": step, "train_loss": None, "lr": lr})
                break
            running, n_running = running + loss, n_running + 1
            evaluate = step % cfg.eval_every == 0 or step == cfg.steps
            if evaluate or (cfg.log_every and step % cfg.log_every == 0):
                row = {"step": step, "train_loss": running / n_running, "lr": lr}
                if evaluate:
                    with autocast(device, cfg.precision):
                        row["val_loss"] = evaluate_lm(bare, val, cfg.batch_size, device)
                    row["val_ppl"] = math.exp(min(row["val_loss"], 700.0))  # no OverflowError on divergence
                    bar.set_postfix(train=f"{row['train_loss']:.3f}", val=f"{row['val_loss']:.3f}")
                history.append(row)
                running, n_running = 0.0, 0
            stop = sigterm.received if distributed.world_size() == 1 else distributed.mean(sigterm.received) > 0
            if ckpt and (stop or (ckpt.every and step % ckpt.every == 0) or step == cfg.steps):
                shards = None
                if sharded:  # every rank writes its shards; last.pt (rank 0, atomic) then names them
                    from lrkit import fsdp

                    shards = f"sharded-{step}"
                    fsdp.save_checkpoint(ckpt.path.parent / shards, bare, optimizer)
                if distributed.is_main():
                    ckpt.save(snapshot(step, shards))
                    for old in ckpt.path.parent.glob("sharded-*"):  # earlier sharded checkpoints
                        if old.name != shards:
                            shutil.rmtree(old, ignore_errors=True)
                if stop:
                    print(f"[{name}] SIGTERM: checkpoint at step {step} in {ckpt.path}; rerun to resume", flush=True)
                    raise SystemExit(143)
    wall = wall_before + time.perf_counter() - t0

    last = history[-1]
    diverged = last.get("train_loss") is None or not math.isfinite(last.get("val_loss", 0.0))
    failure = last.get("failure") or ((f"step {last['step']}: non-finite train loss" if last.get("train_loss") is None
                                      else f"step {last['step']}: non-finite validation loss") if diverged else None)
    final = {"val_loss": None if diverged else last["val_loss"],
             "val_ppl": None if diverged else last["val_ppl"],
             "train_loss": last.get("train_loss"), "diverged": diverged, "failure": failure,
             **stability(history, diverged, cfg.unstable_margin), "steps": step,
             "tokens": step * cfg.batch_size * cfg.seq_len,
             **(optimizer.timings() if hasattr(optimizer, "timings") else {})}
    info = device_info(device)
    return RunResult(name=name, config={**asdict(cfg), **(extra_config or {})}, seed=cfg.seed,
                     device=info["device"], device_name=info["device_name"], history=history,
                     final=final, wall_time_s=wall, memory=memory_figures(model, optimizer, device))


def accumulate(model, optimizer, batch, cfg: LMTrainConfig, device) -> float:
    """One step's gradients from ``cfg.grad_accum`` micro-batches of ``batch`` (each loss weighted by its
    share of the batch, so the gradient is the full batch's mean), then global-norm clipping; returns the
    batch's mean loss."""
    total = 0.0
    micro = batch.chunk(cfg.grad_accum)
    for i, mb in enumerate(micro):
        with autocast(device, cfg.precision):
            loss = lm_loss(model, mb.to(device)) * (len(mb) / len(batch))
        if getattr(optimizer, "updates_in_backward", False):
            optimizer.backward(loss)  # the optimizer accumulates and updates at its last micro-batch
        else:
            with distributed.no_sync(model, last=i == len(micro) - 1):  # DDP reduces once, at the last
                loss.backward()
        total += loss.item()
    if not getattr(optimizer, "updates_in_backward", False):
        check_and_clip(model, cfg.grad_clip)
    return total


# ---------------------------------------------------------------------------------------------------
# The command line: one recipe file, run as `python -m lrkit.train --config configs/train/<recipe>.yaml`.
RECIPE_KEYS = {"name": str, "method": str, "model_size": str, "corpus": str, "corpus_options": dict,
               "method_options": dict, "train": dict, "out": str, "checkpoint_every": int, "parallel": str}
PARALLEL = ("ddp", "fsdp")  # recipe key parallel: lrkit.distributed.wrap (the default) or lrkit.fsdp.wrap


def load_recipe(path, overrides=()) -> dict:
    """A recipe YAML (keys :data:`RECIPE_KEYS`) with ``overrides`` ("train.steps=20", values in YAML; numbers
    such as ``1e-3`` read as numbers, ``lrkit.cli.yaml_value``)."""
    import yaml

    from lrkit.cli import yaml_value

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Invalid config: {str(path)!r} (expected a recipe YAML such as configs/train/tiny_cpu.yaml)")
    try:
        recipe = yaml_value(path.read_text())
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"Invalid config: {str(path)!r} is not a YAML text file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]}); expected a recipe YAML such as configs/train/tiny_cpu.yaml") from e
    recipe = {} if recipe is None else recipe
    if not isinstance(recipe, dict):
        raise ValueError(f"Invalid config: {str(path)!r} holds a {type(recipe).__name__}, not a mapping (expected "
                         f"keys such as {sorted(RECIPE_KEYS)[:4]}..., as in configs/train/tiny_cpu.yaml)")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Invalid override: {item!r} (expected KEY=VALUE, e.g. train.steps=20)")
        *parents, leaf = key.split(".")
        node = recipe
        for k in parents:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"Invalid override: {item!r} ({k!r} holds {node!r}, not a mapping; expected "
                                 "KEY=VALUE with KEY a path of mappings, e.g. train.steps=20)")
        node[leaf] = yaml_value(value)
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"Invalid recipe keys {unknown} in {path} (expected some of {sorted(RECIPE_KEYS)})")
    for k in ("method", "model_size", "train"):
        if k not in recipe:
            raise ValueError(f"Invalid recipe {path}: missing {k!r}")
    for k, v in recipe.items():
        if not isinstance(v, RECIPE_KEYS[k]) or isinstance(v, bool):
            raise ValueError(f"Invalid {k}: {v!r} in {path} (expected {RECIPE_KEYS[k].__name__})")
    if recipe.get("parallel", "ddp") not in PARALLEL:
        raise ValueError(f"Invalid parallel: {recipe['parallel']!r} in {path} (expected one of {PARALLEL})")
    fields = set(LMTrainConfig.__dataclass_fields__)
    bad = sorted(set(recipe["train"]) - fields)
    if bad:
        raise ValueError(f"Invalid train keys {bad} in {path} (expected some of {sorted(fields)})")
    return recipe


def run_recipe(recipe: dict, out=None, restart: bool = False) -> RunResult:
    """Build the corpus, model and method of ``recipe``, train with checkpoints in ``<out>/checkpoint``
    (resumed when present, unless ``restart``), write ``<out>/metrics.json`` and ``<out>/model.pt``."""
    from lrkit import data, records
    from lrkit.methods import prepare
    from lrkit.models import build_llama, count_parameters
    from lrkit.utils import seed_everything

    out = Path(out or recipe.get("out") or f"runs/{recipe.get('name', recipe['method'])}")
    setup = distributed.init()  # torchrun: join the process group; else a single process
    cfg = LMTrainConfig(**{"device": str(setup.device), **recipe["train"]})
    if cfg.batch_size % (setup.world_size * cfg.grad_accum):
        raise ValueError(f"Invalid batch_size: {cfg.batch_size} (the global batch; expected a multiple of "
                         f"{setup.world_size} processes x grad_accum {cfg.grad_accum})")
    name = recipe.get("name", recipe["method"])
    corpus_name = recipe.get("corpus", "shakespeare")
    corpus = data.load(corpus_name, **recipe.get("corpus_options", {}))
    seed_everything(cfg.seed)
    model = build_llama(recipe["model_size"], corpus.vocab_size, cfg.seq_len, seed=cfg.seed)
    opts = dict(recipe.get("method_options", {}))
    if cfg.grad_accum > 1 and (recipe["method"] in ("adalomo", "lomo") or opts.get("per_layer")):
        opts.setdefault("accumulation_steps", cfg.grad_accum)  # in-backward optimizers count micro-batches
    prep = prepare(recipe["method"], model, lr=cfg.lr, seed=cfg.seed, **opts)
    extra = {**prep.info, "model_size": recipe["model_size"], "corpus": corpus_name,
             "vocab_size": corpus.vocab_size, "parameters": count_parameters(model),
             "trainable": count_parameters(prep.model, True), "world_size": setup.world_size,
             "parallel": recipe.get("parallel", "ddp")}
    if recipe.get("parallel") == "fsdp" and setup.distributed:
        from lrkit import fsdp

        method = "galore_per_layer" if recipe["method"] == "galore" and opts.get("per_layer") else recipe["method"]
        net, optimizer = fsdp.wrap(method, prep.model.to(setup.device), prep.optimizer, prep.callbacks)
    else:  # DDP, or one process (where FSDP2 would shard nothing)
        net, optimizer = distributed.wrap(recipe["method"], prep.model.to(setup.device), prep.optimizer)
    result = train_lm(name, net, optimizer, corpus, cfg, extra_config=extra,
                      callbacks=prep.callbacks, checkpoint_dir=out / "checkpoint",
                      checkpoint_every=recipe.get("checkpoint_every", 0), restart=restart)
    weights = {k: v.full_tensor() if type(v).__name__ == "DTensor" else v  # FSDP2: every rank gathers
               for k, v in distributed.unwrap(net).state_dict().items()}
    if distributed.is_main():
        records.save_run(out, result)
        atomic_torch_save(weights, out / "model.pt")
        print(f"[{name}] {result.final['steps']} steps, val loss {result.final['val_loss']} -> {out}", flush=True)
    return result


def main(argv=None) -> int:
    import argparse
    import sys

    from lrkit.cli import run_cli

    ap = argparse.ArgumentParser(prog="python -m lrkit.train", description="Train one language model from a "
                                 "recipe YAML; rerun the same command to resume from its last checkpoint.")
    ap.add_argument("--config", required=True, help="recipe YAML, e.g. configs/train/galore_60m_c4.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key (YAML value), e.g. --set train.steps=20; repeatable")
    ap.add_argument("--out", help="run directory (default: the recipe's `out`, else runs/<name>)")
    ap.add_argument("--restart", action="store_true", help="ignore the run directory's checkpoint and start over")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)

    def go():
        try:
            return run_recipe(load_recipe(args.config, args.set), args.out, restart=args.restart)
        finally:
            distributed.destroy()
    result = run_cli(go, debug=args.debug, prog=ap.prog)
    if isinstance(result, int):  # the error was printed: exit status 2
        return result
    if result.final["diverged"]:  # recorded (the history up to the failure), and said
        print(f"run diverged: {result.final['failure']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import sys

    import lrkit.train as _train  # the imported module, not this __main__ copy (one LMTrainConfig class)

    sys.exit(_train.main())
