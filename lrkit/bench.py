"""`make bench`: throughput and memory of every optimizer on one model, on this machine.

    python -m lrkit.bench [--size micro] [--steps 20] [--batch-size 8] [--seq-len 128]

For each method: tokens per second over timed steps (after warm-up steps), optimizer-state bytes,
peak gradient bytes alive at once, and on CUDA the peak allocated memory; galore-torch's GaLoreAdamW
runs beside the kit's for a side-by-side. Results go to reports/bench/<device>.json with the device name,
and a table is printed. Speed is measured here, never asserted in a unit test.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from lrkit.memory import GradientPeak, optimizer_state_bytes
from lrkit.methods import prepare
from lrkit.models import build_llama
from lrkit.train import backward_and_clip, lm_loss
from lrkit.utils import REPORTS_DIR, atomic_write_bytes, device_info, resolve_device, seed_everything

METHODS = {
    "adamw (full-rank)": dict(method="full", lr=1e-3),
    "galore": dict(method="galore", lr=1e-2, rank=32, update_proj_gap=200),
    "galore per-layer": dict(method="galore", lr=1e-2, rank=32, update_proj_gap=200, per_layer=True),
    "adalomo": dict(method="adalomo", lr=1e-3),
    "lomo": dict(method="lomo", lr=1e-2),
    "adafactor": dict(method="adafactor", lr=1e-3),
    "lora": dict(method="lora", lr=1e-3, rank=32),
}


def _official_galore(model, rank):
    from galore_torch import GaLoreAdamW as Official

    from lrkit.methods import block_linears

    ids = {id(m.weight) for m in block_linears(model).values()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids]},
              {"params": [p for p in model.parameters() if id(p) in ids], "rank": rank,
               "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}]
    return Official(groups, lr=1e-2)


def bench_one(name, build_optimizer, size, vocab, batch_size, seq_len, steps, warmup, device,
              dtype=torch.float32) -> dict:
    """Median-free simple timing of ``steps`` training steps after ``warmup``; parameters in ``dtype``."""
    seed_everything(0)
    model = build_llama(size, vocab, seq_len, seed=0).to(device, dtype)
    model, optimizer = build_optimizer(model)
    model.to(device).train()
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=gen).to(device)

    def step():
        backward_and_clip(lm_loss(model, batch), model, optimizer, None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with GradientPeak(model) as peak:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    out = {"method": name, "tokens_per_s": steps * batch_size * seq_len / wall, "step_ms": 1e3 * wall / steps,
           "optimizer_state_bytes": optimizer_state_bytes(optimizer), "grad_peak_bytes": peak.peak,
           "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrkit.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="micro")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    builders = {}
    for name, kw in METHODS.items():
        def build(model, kw=kw):
            p = prepare(model=model, **kw)
            return p.model, p.optimizer
        builders[name] = build
    builders["galore (galore-torch 1.0)"] = lambda model: (model, _official_galore(model, 32))
    rows = [bench_one(name, b, args.size, args.vocab, args.batch_size, args.seq_len, args.steps, args.warmup, device)
            for name, b in builders.items()]
    info = device_info(device)
    doc = {"device": info, "torch": torch.__version__, "config": vars(args), "results": rows,
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = REPORTS_DIR / "bench" / f"{info['device'].replace(':', '')}.json"
    atomic_write_bytes(path, json.dumps(doc, indent=1).encode())
    print(f"{info['device_name']}, LLaMA-{args.size}, batch {args.batch_size} x {args.seq_len}, {args.steps} timed steps")
    print(f"{'method':<28} {'tokens/s':>10} {'step ms':>9} {'state MB':>9} {'grad peak MB':>13}")
    for r in rows:
        print(f"{r['method']:<28} {r['tokens_per_s']:>10.0f} {r['step_ms']:>9.1f} {r['optimizer_state_bytes'] / 1e6:>9.2f} "
              f"{r['grad_peak_bytes'] / 1e6:>13.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
