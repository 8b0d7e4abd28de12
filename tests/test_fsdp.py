"""FSDP2 (issue 21, first slice): 2 gloo processes under torchrun shard a tiny LLaMA with ``lrkit.fsdp.wrap`` and
train it on the fixed global batches of tests/test_distributed.py; the whole parameters after the steps must equal
one unsharded process on the same global batches (the DDP tests' tolerances), both ranks must agree exactly, and
each rank must hold about half of the optimizer state one process holds.

This file is also the worker script torchrun runs (``python -m torch.distributed.run ... this_file out_dir``).
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import CASES as DDP_CASES  # noqa: E402
from test_distributed import build, global_batches, lm_loss, max_diff, train_initial  # noqa: E402

from lrkit import distributed, fsdp  # noqa: E402

TIMEOUT_S = 240
# the DDP file's cases for the methods this slice supports; galore_refresh draws a new projector every 2 steps
# (proj_method "random"), so the refresh's all-gather and both projection sides run every other step
CASES = ["full", "galore", "galore_refresh", "lora", "low_rank"]


CKPT_CASE, CKPT_STEP = "galore_refresh", 2  # every state layout (element-wise, left, right), a refresh after resume


def train_case(name, sharded: bool, save_to=None, resume_from=None):
    """One case on the fixed global batches; with ``save_to`` a checkpoint after step CKPT_STEP, with
    ``resume_from`` the run starts from that checkpoint (steps after CKPT_STEP only)."""
    method, kw, micro, clip, _ = DDP_CASES[name]
    prepared = build(name)
    model, opt = (fsdp.wrap(method, prepared.model, prepared.optimizer) if sharded
                  else (prepared.model, prepared.optimizer))
    first = 1
    if resume_from is not None:
        first = fsdp.load_checkpoint(resume_from, model, opt)["step"] + 1
    losses = []
    for step, global_batch in enumerate(global_batches(), 1):
        if step < first:
            continue
        step_loss = 0.0
        batches = distributed.shard(global_batch) if sharded else global_batch
        for batch in batches.chunk(micro):
            loss = lm_loss(model, batch) / micro
            loss.backward()
            step_loss += loss.item()
        losses.append(distributed.mean(step_loss) if sharded else step_loss)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if save_to is not None and step == CKPT_STEP:
            fsdp.save_checkpoint(save_to, model, opt, extra={"step": step})
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {"params": fsdp.full_parameters(model), "losses": torch.tensor(losses, dtype=torch.float64),
            "state_bytes": state}


def worker(out_dir, mode):
    torch.set_num_threads(1)
    setup = distributed.init()
    assert setup.distributed and setup.backend == "gloo"
    out = Path(out_dir)
    if mode == "train":  # every case, and the checkpointed case saving at CKPT_STEP
        results = {name: train_case(name, sharded=True) for name in CASES}
        results["saved"] = train_case(CKPT_CASE, sharded=True, save_to=out / "ckpt")
    else:  # resume the checkpoint on this world size
        results = {"resumed": train_case(CKPT_CASE, sharded=True, resume_from=out / "ckpt")}
    torch.save(results, out / f"{mode}_rank{setup.rank}.pt")
    distributed.destroy()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])


def _torchrun(tmp_path, mode, t0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, str(tmp_path), mode]
    root = str(Path(fsdp.__file__).parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # own process group: a hang kills torchrun and its workers


def _wait(proc, t0):
    try:
        out, _ = proc.communicate(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"2-process FSDP run did not finish in {TIMEOUT_S} s (hang?):\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]


def test_fsdp_equals_one_process_and_halves_the_state(tmp_path):
    """Every supported method sharded over 2 ranks against one process; then a sharded checkpoint saved at step
    CKPT_STEP on 2 ranks resumes on 2 ranks (bit for bit the uninterrupted sharded run) and on 1 unsharded
    process (the same end within the case's tolerance)."""
    t0 = time.monotonic()
    proc = _torchrun(tmp_path, "train", t0)
    torch.set_num_threads(1)
    single = {name: train_case(name, sharded=False) for name in CASES}  # one process, meanwhile
    _wait(proc, t0)
    proc = _torchrun(tmp_path, "resume", t0)
    on_one = train_case(CKPT_CASE, sharded=False, resume_from=tmp_path / "ckpt")
    _wait(proc, t0)
    ranks = [torch.load(tmp_path / f"train_rank{r}.pt", weights_only=True) for r in (0, 1)]
    resumed = [torch.load(tmp_path / f"resume_rank{r}.pt", weights_only=True)["resumed"] for r in (0, 1)]
    failures = []
    for name in CASES:
        across = max_diff(ranks[0][name]["params"], ranks[1][name]["params"])
        vs_single = max(max_diff(r[name]["params"], single[name]["params"]) for r in ranks)
        moved = max_diff(single[name]["params"], train_initial(name))
        loss_diff = (ranks[0][name]["losses"] - single[name]["losses"]).abs().max().item()
        ratio = max(r[name]["state_bytes"] for r in ranks) / single[name]["state_bytes"]
        print(f"{name:16s} max |rank0 - rank1| = {across:.1e}   max |fsdp - one process| = {vs_single:.1e}"
              f"   logged loss {loss_diff:.1e}   state per rank / one process {ratio:.3f}   (moved {moved:.1e})")
        if across != 0.0 or vs_single > DDP_CASES[name][4] or moved < 1e-4 or loss_diff > 1e-5 or ratio > 0.55:
            failures.append(name)
    assert not failures, f"FSDP differs from one process, or keeps too much state: {failures}"
    saved = ranks[0]["saved"]["params"]
    on_two = max(max_diff(r["params"], saved) for r in resumed)
    one = max_diff(on_one["params"], saved)
    tol = DDP_CASES[CKPT_CASE][4]
    print(f"checkpoint at step {CKPT_STEP} ({CKPT_CASE}): resumed on 2 ranks vs uninterrupted {on_two:.1e}, "
          f"on 1 process {one:.1e} (tolerance {tol:.0e})")
    assert max_diff(saved, ranks[0][CKPT_CASE]["params"]) == 0.0  # saving changes nothing
    assert on_two == 0.0 and one <= tol
    assert max_diff(on_one["params"], single[CKPT_CASE]["params"]) <= tol


def test_wrap_refuses_what_it_does_not_shard_yet():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(NotImplementedError, match="'adalomo' under FSDP2: not supported yet"):
        fsdp.wrap("adalomo", model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="Invalid method: 'sgd'"):
        fsdp.wrap("sgd", model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="initialised process group"):
        fsdp.wrap("full", model, torch.optim.SGD(model.parameters(), lr=0.1))
