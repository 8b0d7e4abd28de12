"""Data parallelism for every method: 2 gloo processes under torchrun train a tiny LLaMA on a fixed global
batch; parameters must be identical across the ranks and equal to one process on the same global batch.

GaLore 8-bit (bitsandbytes' kernels, CUDA only) is step()-based and DDP-wrapped exactly as "galore" is; its
2-GPU NCCL run is not part of this CPU file (`lrkit.distributed.wrap` is the same call for both).

This file is also the worker script torchrun runs (``python -m torch.distributed.run ... this_file out_dir``).
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lrkit import distributed
from lrkit.methods import METHODS, prepare
from lrkit.models import build_llama

VOCAB, SEQ, GLOBAL_BATCH, STEPS, TIMEOUT_S = 64, 16, 8, 4, 240

# name: (prepare() method, its kwargs, micro-batches per step, the loop's clip for step()-based methods,
# tolerance against one process). Every method of lrkit.methods.METHODS; the in-backward ones (per-layer
# GaLore, AdaLomo, LOMO) clip with their own max_grad_norm (small enough to clip): two-pass at one
# micro-batch, deferred at two.
#
# Tolerances: a rank average and a one-process mean differ in rounding only (~1e-7 here) and most methods
# keep that (atol 1e-6 in fp32). SVD-based GaLore amplifies it by about 1 / (relative gap between the
# singular values it splits or orders): this nano LLaMA's gate_proj has a 0.4 % gap inside its top 8, so
# 2e-6 after a few steps (atol 1e-5), and a subspace refresh after Adam's moments have built up was
# measured to amplify it to 4e-3 -- the same happens to one process that merely splits its batch into
# micro-batches, so it says nothing about DDP. The SVD cases therefore compute their projector at step 0
# only; the refresh under DDP is checked with proj_method="random" (every T steps, the projector drawn
# from (seed, parameter, step), independent of the gradient's rounding). Across the ranks every case,
# SVD ones included, must agree exactly (parameters and projectors). A missing or wrong reduction moves
# parameters by ~lr (1e-3 .. 1e-2), far above every tolerance -- for a method whose update sees the
# gradient's scale: Adam (its eps is tiny), AdaLomo's normalised update and every clipped update (the clip
# threshold sets the step) are nearly blind to a gradient that is the rank *sum* instead of the average, so
# the unclipped LOMO cases (plain SGD, at one micro-batch and accumulated over two) are the ones that see
# the in-backward reduction's division by the world size.
RANDOM_REFRESH = dict(rank=8, update_proj_gap=2, proj_method="random")
SVD_ONCE = dict(rank=8, update_proj_gap=1000)
CASES = {
    "full": ("full", dict(lr=3e-3), 2, 0.5, 1e-6),
    "galore": ("galore", dict(lr=1e-2, **SVD_ONCE), 2, 0.5, 1e-5),
    "galore_rsvd": ("galore", dict(lr=1e-2, **SVD_ONCE, proj_method="randomized_svd", seed=7), 2, 0.5, 1e-5),
    "galore_refresh": ("galore", dict(lr=1e-2, **RANDOM_REFRESH, seed=3), 2, 0.5, 1e-6),
    "galore_per_layer": ("galore", dict(lr=1e-2, **RANDOM_REFRESH, per_layer=True, max_grad_norm=0.5,
                                        accumulation_steps=2), 2, None, 1e-6),
    "galore_per_layer_svd_two_pass": ("galore", dict(lr=1e-2, **SVD_ONCE, per_layer=True, max_grad_norm=0.5,
                                                     clipping="two_pass"), 1, None, 1e-5),
    "lora": ("lora", dict(lr=3e-3, rank=4), 2, 0.5, 1e-6),
    "low_rank": ("low_rank", dict(lr=3e-3, rank=4), 2, 0.5, 1e-6),
    "relora": ("relora", dict(lr=3e-3, rank=4, relora_every=2), 2, 0.5, 1e-6),
    "adalomo": ("adalomo", dict(lr=1e-2, max_grad_norm=0.5), 1, None, 1e-6),
    "adalomo_accumulated": ("adalomo", dict(lr=1e-2, max_grad_norm=0.5, accumulation_steps=2), 2, None, 1e-6),
    "adalomo_unfused": ("adalomo", dict(lr=1e-2, max_grad_norm=0.5, fused=False), 2, None, 1e-6),
    "lomo": ("lomo", dict(lr=1e-1, max_grad_norm=0.5), 1, None, 1e-6),
    "lomo_accumulated": ("lomo", dict(lr=1e-1, max_grad_norm=0.5, accumulation_steps=2), 2, None, 1e-6),
    "lomo_unclipped": ("lomo", dict(lr=1e-1), 1, None, 1e-6),
    "lomo_unclipped_accumulated": ("lomo", dict(lr=1e-1, accumulation_steps=2), 2, None, 1e-6),
    "adafactor": ("adafactor", dict(lr=1e-2), 2, 0.5, 1e-6),
}


def build(name):
    """prepare() for a case; per-layer GaLore with clipping="two_pass" (not a prepare() option) is rebuilt
    from prepare()'s param groups."""
    method, kw, *_ = CASES[name]
    kw = dict(kw)
    clipping = kw.pop("clipping", None)
    prepared = prepare(method, build_llama("nano", VOCAB, SEQ, seed=0), **kw)
    if clipping is not None:
        old = prepared.optimizer
        old.remove_hooks()
        prepared.optimizer = type(old)([dict(g) for g in old.param_groups], max_grad_norm=kw["max_grad_norm"],
                                       clipping=clipping, seed=old.seed)
    return prepared


def global_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def lm_loss(model, batch):
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def train_case(name):
    """One method on the fixed global batches, in this process's world (1 or 2 ranks); returns the
    trained parameters by name, GaLore's projectors, and the logged (rank-averaged) loss of each step."""
    method, kw, micro, clip, _ = CASES[name]
    prepared = build(name)
    wrapper = {"galore": "galore_per_layer" if kw.get("per_layer") else "galore"}.get(method, method)
    model, opt = distributed.wrap(wrapper, prepared.model, prepared.optimizer)
    in_backward = getattr(opt, "updates_in_backward", False)
    losses = []
    for step, global_batch in enumerate(global_batches(), 1):
        step_loss = 0.0  # this rank's mean loss over its shard
        for j, batch in enumerate(distributed.shard(global_batch).chunk(micro)):
            with distributed.no_sync(model, last=j == micro - 1):
                loss = lm_loss(model, batch) / micro
                opt.backward(loss) if in_backward else loss.backward()
            step_loss += loss.item()
        losses.append(distributed.mean(step_loss))  # the global batch's mean loss, for logging
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for cb in prepared.callbacks:
            cb(step)
    params = {n: p.detach().clone() for n, p in distributed.unwrap(model).named_parameters()}
    projectors = {f"{i}.{k}": s[k].clone() for i, s in enumerate(opt.state.values()) for k in ("P", "Q") if k in s}
    return {"params": params, "projectors": projectors, "losses": torch.tensor(losses, dtype=torch.float64)}


def worker(out_dir):
    torch.set_num_threads(1)
    setup = distributed.init()
    assert setup.distributed and setup.backend == "gloo" and setup.device.type == "cpu"
    names = os.environ.get("LRKIT_DDP_CASES", ",".join(CASES)).split(",")  # a subset, when debugging
    results = {name: train_case(name) for name in names}
    torch.save(results, Path(out_dir) / f"rank{setup.rank}.pt")
    distributed.destroy()


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max().item() for k in a), default=0.0)


def test_cases_cover_every_method():
    assert {CASES[c][0] for c in CASES} == set(METHODS)


def test_ddp_equals_one_process_for_every_method(tmp_path):
    from helpers import torchrun, wait_torchrun

    proc = torchrun(__file__, tmp_path)
    t0 = time.monotonic()
    torch.set_num_threads(1)
    single = {name: train_case(name) for name in CASES}  # one process, meanwhile
    wait_torchrun(proc, TIMEOUT_S - (time.monotonic() - t0), f"the 2-process run ({TIMEOUT_S} s)")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    failures = []
    for name in CASES:
        across = max_diff(ranks[0][name]["params"], ranks[1][name]["params"])
        vs_single = max(max_diff(r[name]["params"], single[name]["params"]) for r in ranks)
        proj = max_diff(ranks[0][name]["projectors"], ranks[1][name]["projectors"])
        moved = max_diff(single[name]["params"], train_initial(name))
        loss_diff = (ranks[0][name]["losses"] - single[name]["losses"]).abs().max().item()
        print(f"{name:28s} max |rank0 - rank1| = {across:.1e}   max |ddp - one process| = {vs_single:.1e}"
              f"   projectors across ranks {proj:.1e}   logged loss {loss_diff:.1e}   (moved {moved:.1e})")
        if across != 0.0 or proj != 0.0 or vs_single > CASES[name][4] or moved < 1e-4 or loss_diff > 1e-5 \
                or not torch.equal(ranks[0][name]["losses"], ranks[1][name]["losses"]):
            failures.append(name)
    assert all(ranks[0][n]["projectors"] for n in CASES if n.startswith("galore"))
    assert not failures, f"ranks disagree or differ from one process: {failures}"


_INITIAL = {}


def train_initial(name):
    """The parameters before training (to check that every case really moved them)."""
    if name not in _INITIAL:
        model = build(name).model
        _INITIAL[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return _INITIAL[name]


def test_shard_and_wrap_in_one_process():
    batch = torch.arange(12).reshape(6, 2)
    assert torch.equal(distributed.shard(batch), batch)
    two = distributed.Setup(1, 2, 1, torch.device("cpu"), "gloo")
    assert torch.equal(distributed.shard(batch, two), batch[3:])
    assert distributed.shard({"x": batch}, two)["x"].shape == (3, 2)
    with pytest.raises(ValueError, match=r"Invalid global batch size: 6 \(expected a multiple of the world size 4\)"):
        distributed.shard(batch, distributed.Setup(0, 4, 0, torch.device("cpu"), "gloo"))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert distributed.wrap("full", model, opt) == (model, opt)  # one process: unchanged
    with pytest.raises(ValueError, match="Invalid method: 'sgd'"):
        distributed.wrap("sgd", model, opt)
    assert distributed.is_main() and distributed.world_size() == 1 and distributed.mean(torch.tensor(2.5)) == 2.5
    if "WORLD_SIZE" not in os.environ:
        setup = distributed.init()
        assert (setup.rank, setup.world_size, setup.backend, setup.is_main) == (0, 1, None, True)


if __name__ == "__main__":
    worker(sys.argv[1])


@pytest.mark.parametrize("method", ["galore", "adalomo"])
def test_torchrun_cli_equals_one_process(method, tmp_path):
    """`torchrun --nproc-per-node 2 -m lrkit.train` (gloo) trains as `python -m lrkit.train` does on the same
    global batches: same history to rounding, parameters within 1e-5, one record written (by rank 0)."""
    import json

    import yaml

    recipe = {"name": method, "method": method, "model_size": "nano", "corpus": "shakespeare",
              "corpus_options": {"vocab_size": 4096},
              "method_options": {"rank": 8, "update_proj_gap": 1000} if method == "galore" else {"max_grad_norm": 1.0},
              "train": {"steps": 4, "batch_size": 4, "seq_len": 16, "lr": 3e-3, "eval_every": 2, "eval_windows": 4,
                        "grad_clip": None}}
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(distributed.__file__).parents[1])}
    runs = {"one": [sys.executable, "-m", "lrkit.train"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "lrkit.train"]}
    for name, cmd in runs.items():
        p = subprocess.run(cmd + ["--config", str(cfg), "--out", str(tmp_path / name)], env=env, capture_output=True,
                           text=True, timeout=TIMEOUT_S)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rec = {n: next(iter(json.loads((tmp_path / n / "metrics.json").read_text())["runs"].values())) for n in runs}
    assert rec["two"]["config"]["world_size"] == 2 and rec["one"]["config"]["world_size"] == 1
    for a, b in zip(rec["one"]["history"], rec["two"]["history"]):
        assert a["step"] == b["step"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    pa, pb = (torch.load(tmp_path / n / "model.pt", weights_only=True) for n in runs)
    diff = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    print(f"{method}: torchrun x2 vs one process, max parameter difference {diff:.2e}")
    assert diff < 1e-5
