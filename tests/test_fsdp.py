"""FSDP2 (issue 21, first slice): 2 gloo processes under torchrun shard a tiny LLaMA with ``lrkit.fsdp.wrap`` and
train it on the fixed global batches of tests/test_distributed.py; the whole parameters after the steps must equal
one unsharded process on the same global batches (the DDP tests' tolerances), both ranks must agree exactly, and
each rank must hold about half of the optimizer state one process holds.

This file is also the worker script torchrun runs (``python -m torch.distributed.run ... this_file out_dir``).
"""
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import CASES as DDP_CASES  # noqa: E402
from test_distributed import build, global_batches, lm_loss, max_diff, train_initial  # noqa: E402
from helpers import torchrun, wait_torchrun  # noqa: E402

from lrkit import distributed, fsdp  # noqa: E402

TIMEOUT_S = 240
# the DDP file's cases for the methods this slice supports; galore_refresh draws a new projector every 2 steps
# (proj_method "random"), so the refresh's all-gather and both projection sides run every other step
CASES = ["full", "galore", "galore_refresh", "galore_per_layer", "galore_per_layer_svd_two_pass", "lora", "low_rank",
         "relora", "adalomo", "adalomo_accumulated", "adalomo_unfused", "lomo", "lomo_accumulated", "lomo_unclipped",
         "lomo_unclipped_accumulated", "adafactor"]


# galore_refresh: every GaLore state layout (element-wise, left, right) and a refresh after the resume; adalomo_accumulated:
# AdaLomo's row / column factors (and fused accumulation) across the checkpoint; adafactor: transformers' class's
# row / column statistics
CKPT_CASES, CKPT_STEP = ("galore_refresh", "adalomo_accumulated", "adafactor"), 2


def train_case(name, sharded: bool, save_to=None, resume_from=None):
    """One case on the fixed global batches; with ``save_to`` a checkpoint after step CKPT_STEP, with
    ``resume_from`` the run starts from that checkpoint (steps after CKPT_STEP only)."""
    method, kw, micro, clip, _ = DDP_CASES[name]
    prepared = build(name)
    wrapper = "galore_per_layer" if kw.get("per_layer") else method
    model, opt = (fsdp.wrap(wrapper, prepared.model, prepared.optimizer, prepared.callbacks) if sharded
                  else (prepared.model, prepared.optimizer))
    in_backward = getattr(opt, "updates_in_backward", False)
    first = 1
    if resume_from is not None:
        first = fsdp.load_checkpoint(resume_from, model, opt)["step"] + 1
    losses, consumed = [], []
    for step, global_batch in enumerate(global_batches(), 1):
        if step < first:
            continue
        step_loss = 0.0
        batches = distributed.shard(global_batch) if sharded else global_batch
        for batch in batches.chunk(micro):
            loss = lm_loss(model, batch) / micro
            opt.backward(loss) if in_backward else loss.backward()
            step_loss += loss.item()
        losses.append(distributed.mean(step_loss) if sharded else step_loss)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
        if in_backward:  # the hooks FSDP2 called consumed every gradient before step()
            consumed.append(all(p.grad is None for p in model.parameters()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        for cb in prepared.callbacks:  # ReLoRA's merge every 2 steps
            cb(step)
        if save_to is not None and step == CKPT_STEP:
            fsdp.save_checkpoint(save_to, model, opt, extra={"step": step})
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    weights = sum(fsdp.local(p).numel() * p.element_size() for p in model.parameters())  # this rank's
    return {"params": fsdp.full_parameters(model), "losses": torch.tensor(losses, dtype=torch.float64),
            "state_bytes": state, "param_bytes": weights, "consumed_in_backward": bool(consumed) and all(consumed)}


def cli_recipe():
    """lrkit.train's recipe for the CLI test: GaLore (refresh every 3 steps) on FSDP2, a checkpoint every 4 steps."""
    from test_train_resume import recipe

    return recipe("galore", steps=12, parallel="fsdp")


class Crash(Exception):
    pass


def cli_worker(out: Path) -> None:
    """lrkit.train.run_recipe on FSDP2: an uninterrupted run; one that crashes in step 7 (after the checkpoint of
    step 4), whose directory rank 0 then copies to on_one/ (for the test to resume in one process); then the crashed
    run rerun, resuming from its sharded checkpoint on disk (the same ranks' processes: a torchrun start costs two
    interpreters' imports; nothing of the crashed run is left in memory but the process group)."""
    import shutil

    import torch.distributed as dist

    from lrkit import train as T

    calls, windows = {"n": 0}, T.random_windows

    def counting(*a, **k):
        calls["n"] += 1
        return windows(*a, **k)

    T.random_windows = counting
    try:
        T.run_recipe(cli_recipe(), out / "straight")
    finally:
        T.random_windows = windows
    straight_draws, calls["n"] = calls["n"], 0

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise Crash
        return windows(*a, **k)

    T.random_windows = crashing
    try:
        T.run_recipe(cli_recipe(), out / "crashed")
    except Crash:
        pass
    finally:
        T.random_windows = windows
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.copytree(out / "crashed", out / "on_one")
    dist.barrier()
    calls["n"] = 0  # counted again: a resume draws the batches of steps 5..12 only, a silent restart all 12
    T.random_windows = counting
    try:
        T.run_recipe(cli_recipe(), out / "crashed")
    finally:
        T.random_windows = windows
    (out / f"draws_rank{dist.get_rank()}.txt").write_text(f"{straight_draws} {calls['n']}")


def worker(out_dir, mode):
    torch.set_num_threads(1)
    setup = distributed.init()
    assert setup.distributed and setup.backend == "gloo"
    out = Path(out_dir)
    if mode == "cli":
        cli_worker(out)
        distributed.destroy()
        return
    # every case, and the checkpointed cases saving at CKPT_STEP; then fresh models and optimizers resume those
    # checkpoints on this world size (one launch: each torchrun start costs two interpreters' imports)
    results = {name: train_case(name, sharded=True) for name in CASES}
    for c in CKPT_CASES:
        results[f"saved {c}"] = train_case(c, sharded=True, save_to=out / f"ckpt {c}")
    torch.save(results, out / f"train_rank{setup.rank}.pt")
    resumed = {c: train_case(c, sharded=True, resume_from=out / f"ckpt {c}") for c in CKPT_CASES}
    torch.save(resumed, out / f"resume_rank{setup.rank}.pt")
    distributed.destroy()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])


def test_fsdp_equals_one_process_and_halves_the_state(tmp_path):
    """Every supported method sharded over 2 ranks against one process; then a sharded checkpoint saved at step
    CKPT_STEP on 2 ranks resumes on 2 ranks (bit for bit the uninterrupted sharded run) and on 1 unsharded
    process (the same end within the case's tolerance)."""
    t0 = time.monotonic()
    left = lambda: TIMEOUT_S - (time.monotonic() - t0)  # noqa: E731
    proc = torchrun(__file__, tmp_path, "train")
    torch.set_num_threads(1)
    single = {name: train_case(name, sharded=False) for name in CASES}  # one process, meanwhile
    wait_torchrun(proc, left(), "the 2-process FSDP run and resume")
    on_one = {c: train_case(c, sharded=False, resume_from=tmp_path / f"ckpt {c}") for c in CKPT_CASES}
    ranks = [torch.load(tmp_path / f"train_rank{r}.pt", weights_only=True) for r in (0, 1)]
    resumed = [torch.load(tmp_path / f"resume_rank{r}.pt", weights_only=True) for r in (0, 1)]
    failures = []
    for name in CASES:
        across = max_diff(ranks[0][name]["params"], ranks[1][name]["params"])
        vs_single = max(max_diff(r[name]["params"], single[name]["params"]) for r in ranks)
        moved = max_diff(single[name]["params"], train_initial(name))
        loss_diff = (ranks[0][name]["losses"] - single[name]["losses"]).abs().max().item()
        ratio = max(r[name]["state_bytes"] for r in ranks) / max(single[name]["state_bytes"], 1)  # LOMO: none
        weights = max(r[name]["param_bytes"] for r in ranks) / single[name]["param_bytes"]
        print(f"{name:16s} max |rank0 - rank1| = {across:.1e}   max |fsdp - one process| = {vs_single:.1e}"
              f"   logged loss {loss_diff:.1e}   per rank / one process: state {ratio:.3f}, weights {weights:.3f}"
              f"   (moved {moved:.1e})")
        fused = getattr(build(name).optimizer, "updates_in_backward", False)
        if fused and not all(r[name]["consumed_in_backward"] for r in ranks):
            failures.append(f"{name} (gradients left for step())")
        if across != 0.0 or vs_single > DDP_CASES[name][4] or moved < 1e-4 or loss_diff > 1e-5 or ratio > 0.55 \
                or weights > 0.55:
            failures.append(name)
    assert not failures, f"FSDP differs from one process, or keeps too much state: {failures}"
    for c in CKPT_CASES:
        saved = ranks[0][f"saved {c}"]["params"]
        on_two = max(max_diff(r[c]["params"], saved) for r in resumed)
        one = max_diff(on_one[c]["params"], saved)
        tol = DDP_CASES[c][4]
        print(f"checkpoint at step {CKPT_STEP} ({c}): resumed on 2 ranks vs uninterrupted {on_two:.1e}, "
              f"on 1 process {one:.1e} (tolerance {tol:.0e})")
        assert max_diff(saved, ranks[0][c]["params"]) == 0.0  # saving changes nothing
        assert on_two == 0.0 and one <= tol
        assert max_diff(on_one[c]["params"], single[c]["params"]) <= tol


def test_wrap_refuses_what_it_does_not_shard_yet():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(NotImplementedError, match="'galore_8bit' under FSDP2: not supported yet"):
        fsdp.wrap("galore_8bit", model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="Invalid method: 'sgd'"):
        fsdp.wrap("sgd", model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="initialised process group"):
        fsdp.wrap("full", model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_per_gpu_memory_divides_what_is_sharded_by_the_world_size():
    for size, method, rank in (("1b", "galore", 512), ("7b", "adalomo", None), ("1b", "full", None)):
        one, eight = fsdp.per_gpu_memory(size, method, 1, rank), fsdp.per_gpu_memory(size, method, 8, rank)
        assert one["ddp_bytes"] == eight["ddp_bytes"] == one["params_bytes"] + one["grads_bytes"] + one["state_bytes"]
        fused = method == "adalomo"  # its gradient is consumed shard by shard: no gradient buffer under FSDP2
        sharded = one["params_bytes"] + (0 if fused else one["grads_bytes"]) + one["state_bytes"]
        assert eight["fsdp_bytes"] == pytest.approx(sharded / 8 + eight["transient_bytes"], rel=1e-12)
        assert eight["fsdp_bytes"] < 0.3 * eight["ddp_bytes"]
    table = fsdp.paper_memory_table(8)
    assert table.paper_value.notna().sum() == 3 and (table.paper_source != "").all()
    with pytest.raises(ValueError, match="Invalid method: 'sgd'"):
        fsdp.per_gpu_memory("1b", "sgd", 8)


def test_train_cli_on_fsdp_resumes_a_crashed_run_on_two_ranks_and_on_one(tmp_path):
    """lrkit.train with parallel=fsdp under torchrun (2 gloo ranks): a run that crashes in step 7 resumes from its
    sharded checkpoint of step 4 to exactly the uninterrupted sharded run; the same checkpoint resumed in one
    unsharded process ends within the DDP tests' GaLore tolerance; the recipe key is checked."""
    from test_train_resume import outcome

    from lrkit import train as T

    t0 = time.monotonic()
    left = lambda: TIMEOUT_S - (time.monotonic() - t0)  # noqa: E731
    wait_torchrun(torchrun(__file__, tmp_path, "cli"), left(), "the 2-rank FSDP CLI runs")
    ckpt = torch.load(tmp_path / "on_one/checkpoint/last.pt", weights_only=True)  # the crashed run, as it was left
    assert ckpt["step"] == 4 and ckpt["sharded"] == "sharded-4" and ckpt["model"] == {}
    assert not (tmp_path / "on_one" / "metrics.json").exists()
    draws = {tuple(map(int, (tmp_path / f"draws_rank{r}.txt").read_text().split())) for r in (0, 1)}
    assert len(draws) == 1 and [8 * a == 12 * b for a, b in draws] == [True], \
        f"the rerun did not resume from step 4 (batches drawn: uninterrupted, rerun): {draws}"
    straight, resumed = outcome(tmp_path / "straight"), outcome(tmp_path / "crashed")
    assert straight[1] == resumed[1] and max_diff(straight[2], resumed[2]) == 0.0
    T.run_recipe(cli_recipe(), tmp_path / "on_one")  # world size 1: GaLoreAdamW unsharded, the sharded checkpoint
    one = outcome(tmp_path / "on_one")
    diff = max_diff(straight[2], one[2])
    print(f"FSDP CLI: crashed at step 7, resumed from step 4 on 2 ranks: difference 0; on 1 process {diff:.1e}")
    assert diff < 1e-5 and [h["step"] for h in one[1]] == [h["step"] for h in straight[1]]
    with pytest.raises(ValueError, match="Invalid parallel: 'zero3'"):
        import yaml

        (tmp_path / "r.yaml").write_text(yaml.safe_dump(dict(cli_recipe(), parallel="zero3")))
        T.load_recipe(tmp_path / "r.yaml")
