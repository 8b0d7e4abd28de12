"""`make gpu-check`: the one prepared script for a lent GPU (under 8 minutes on one H100 or H200).

    python -m lrkit.gpu_check            # on a CUDA machine: writes reports/gpu-check/<device>.json
    python -m lrkit.gpu_check --dry-run  # anywhere: the same code paths at toy sizes, record to a temp dir

It runs, in order: (1) the CUDA-marked tests (``pytest -m cuda``); (2) bf16 peak memory and tokens/s of a
training step at LLaMA 60m and 130m for AdamW, the kit's GaLore, galore-torch's 8-bit GaLore, the kit's
AdaLomo and LOMO and lomo-optim's AdaLomo, side by side in one process (parameters in bf16, as LOMO and
AdaLomo train; the same for every optimizer); (3) a few hundred steps of the GaLore recipe at the gpu
profile's model size through ``lrkit.train`` (Shakespeare: the lent machine has no internet for C4).
``--dry-run`` does the same at LLaMA-nano on the CPU for a few steps, collects the CUDA tests without
running them, and skips what needs CUDA kernels (8-bit states, lomo-optim's hard-coded ``.cuda()``),
saying so in the record. Speed and memory are measured here, never asserted.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lrkit.utils import REPO_ROOT, REPORTS_DIR, atomic_write_bytes, device_info, resolve_device

SIZES, DRY_SIZES = ("60m", "130m"), ("nano",)


class OfficialAdaLomo:
    """lomo-optim's AdaLomo behind the optimizer interface the bench's step uses (it updates inside
    ``fused_backward`` and has no ``step``); its factored states are exposed as ``state`` for the byte count."""
    updates_in_backward = True

    def __init__(self, model, lr=1e-3):
        from lomo_optim import AdaLomo

        self.opt, self.lr = AdaLomo(model, lr=lr, loss_scale=0), lr  # bf16 needs no loss scaling

    def backward(self, loss):
        self.opt.fused_backward(loss, self.lr)

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass

    @property
    def state(self):
        o = self.opt
        return {n: {k: d[n] for k, d in (("row", o.exp_avg_sq_row), ("col", o.exp_avg_sq_col), ("sq", o.exp_avg_sq))
                    if n in d} for n in set(o.exp_avg_sq_row) | set(o.exp_avg_sq)}


def optimizers(cuda: bool) -> dict:
    """{name: build(model) -> (model, optimizer)} or {name: reason skipped}."""
    from lrkit.bench import build_optimizer

    names = ("adamw (torch)", "galore", "galore per-layer", "galore-torch", "adalomo fused", "lomo")
    names += ("galore-torch 8-bit", "adalomo (lomo-optim)") if cuda else ()
    # Rank 128 (the 60M-1B recipes'); the dry run's toy model has narrower weights, and a rank above a
    # weight's min(m, n) is an error: capped there.
    def rank(model):
        return min(128, *(min(p.shape) for p in model.parameters() if p.ndim == 2))
    out = {n: (lambda model, n=n: build_optimizer(n, model, rank=rank(model), update_proj_gap=200)) for n in names}
    if not cuda:
        out["galore-torch 8-bit"] = "skipped: bitsandbytes' 8-bit Adam kernels need CUDA"
        out["adalomo (lomo-optim)"] = "skipped: lomo-optim hard-codes .cuda()"
    return out


def cuda_tests(dry_run: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    if dry_run:
        cmd.append("--collect-only")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    return {"command": " ".join(cmd[2:]), "returncode": p.returncode, "summary": tail[0],
            "wall_s": time.perf_counter() - t0}


def recipe_run(dry_run: bool, out: Path) -> dict:
    from lrkit.train import load_recipe, run_recipe

    over = ["train.steps=3", "train.eval_every=3", "train.batch_size=2", "train.seq_len=32", "model_size=nano",
            "train.eval_windows=2", "checkpoint_every=0", "method_options.rank=8"] if dry_run else []
    recipe = load_recipe(REPO_ROOT / "configs/train/gpu_check_galore.yaml", over)
    t0 = time.perf_counter()
    r = run_recipe(recipe, out)
    wall = time.perf_counter() - t0
    return {"recipe": recipe, "steps": r.final["steps"], "val_loss": r.final["val_loss"], "wall_s": wall,
            "tokens_per_s": r.final["tokens"] / r.wall_time_s, "memory": r.memory}


def main(argv=None) -> int:
    from lrkit.bench import bench_one

    ap = argparse.ArgumentParser(prog="python -m lrkit.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on any device; record to a temp dir")
    ap.add_argument("--out", help="record directory (default reports/gpu-check, or a temp dir with --dry-run)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    from lrkit.cli import run_cli

    return run_cli(lambda: _main(args), debug=args.debug, prog=ap.prog)


def _main(args) -> int:
    from lrkit.bench import bench_one

    device = resolve_device("auto")
    if device.type != "cuda" and not args.dry_run:
        print("gpu-check needs a CUDA device; on this machine run it with --dry-run", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    info = device_info(device)
    out = Path(args.out or (tempfile.mkdtemp(prefix="gpu-check-") if args.dry_run else REPORTS_DIR / "gpu-check"))
    doc = {"device": info, "torch": torch.__version__, "cuda": torch.version.cuda, "dry_run": args.dry_run,
           "cuda_tests": cuda_tests(args.dry_run), "bench": [], "skipped": {}}
    print(f"[gpu-check] {info['device_name']}: CUDA tests {doc['cuda_tests']['summary']}", flush=True)
    steps, batch, seq = (2, 2, 32) if args.dry_run else (10, 8, 256)
    for size in DRY_SIZES if args.dry_run else SIZES:
        for name, build in optimizers(device.type == "cuda").items():
            if isinstance(build, str):
                doc["skipped"][name] = build
                continue
            row = bench_one(name, build, size, 32000, batch, seq, steps, warmup=2, device=device,
                            dtype=torch.bfloat16)
            doc["bench"].append({"size": size, "dtype": "bf16", "batch": [batch, seq], **row})
            print(f"[gpu-check] {size} {name:<44} {row['tokens_per_s']:>9.0f} tok/s "
                  f"peak {row.get('peak_cuda_bytes', 0) / 2**30:.2f} GiB", flush=True)
    doc["recipe_run"] = recipe_run(args.dry_run, out / "galore_run")
    doc["wall_s"] = time.perf_counter() - t0
    path = out / f"{info['device'].replace(':', '')}.json"
    atomic_write_bytes(path, json.dumps(doc, indent=1, default=str).encode())
    print(f"[gpu-check] done in {doc['wall_s']:.0f} s -> {path}")
    return 0 if doc["cuda_tests"]["returncode"] in (0, 5) else 1  # 5: no CUDA tests collected


if __name__ == "__main__":
    raise SystemExit(main())
