"""`make bench`: every optimizer side by side in one process, on this machine.

    python -m lrkit.bench [--quick] [--sizes micro 20m 60m] [--repeats 5] [--device auto]

Each number is the median of ``--repeats`` timings after untimed warm-up ones, all in one process
(so the ratios compare like with like even on a loaded machine). Sections of the record
``reports/bench/<device>.json`` (with the hardware) and of its figure ``reports/bench/<device>.png``:

* ``steps``: per LLaMA size and optimizer (on CUDA also lomo-optim's AdaLomo), the optimizer step alone
  (gradients fixed; optimizers that update inside backward have none) and the training step (forward,
  backward, update). GaLore's refresh (the SVD every T steps) is timed apart, as a step that refreshes
  (update_proj_gap = 1) minus one that does not, and amortised: step(T) = plain step + refresh / T,
  for T = 200 and the refresh-heavy T = 10; the kit's (with its default SVD refresh, galore-torch's numbers,
  and with ``proj_method="eigh"``, "galore eigh") and galore-torch's optimizer steps are timed in turns.
  Memory: optimizer-state bytes and the peak gradient bytes alive at once (CPU), peak allocated (CUDA).
* ``refresh``: one projector refresh of each block-weight shape of LLaMA-60M at rank 128 by full SVD,
  the float64 Gram eigendecomposition ("eigh"), randomized SVD (power_iters 2, the default, and 1) and
  random projection; and the final validation perplexity of one short GaLore run with each (refresh every
  10 steps), against the full SVD's, with the full SVD at a second seed as the noise floor of that comparison.
* ``fed``: FeDLRT (initial rank 8, tau 0.02: the cpu profile's) against FedAvg, one round each on 2
  clients of random data: bytes per client and round, client FLOPs (the accounting of lrkit.fed.simulate),
  client wall time, for the cpu-profile vision MLP and ResNet18 at full width (it fits a CPU: measured,
  with FedAvg's analytic bytes, 2 x 4 x parameters, beside the measured ones as a check).
* ``ratios``: the targets of issue 12 as measured ratios.

``--quick`` runs every section at toy sizes in seconds (the unit test). Speed is measured here, never
asserted in a unit test. :func:`readme_section` turns the records into markdown for reports/README.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from lrkit.memory import GradientPeak, optimizer_state_bytes
from lrkit.methods import block_linears, prepare
from lrkit.models import build_llama, count_parameters
from lrkit.optim.galore import _orthonormal, _randomized_svd, gram_eigh
from lrkit.train import backward_and_clip, lm_loss
from lrkit.utils import REPORTS_DIR, atomic_write_bytes, device_info, resolve_device, seed_everything

RANKS = {"nano": 8, "micro": 32, "20m": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512}  # GaLore paper's
SIZES = {"cpu": ("micro", "20m", "60m"), "cuda": ("60m", "130m", "350m", "1b")}
NO_REFRESH = 10**9  # update_proj_gap that never comes round inside a benchmark
GALORE = ("galore", "galore eigh", "galore per-layer", "galore-torch")
PAIRED = ("galore", "galore eigh", "galore-torch")  # timed in turns, see _galore_pair
OPTIMIZERS = ("adamw (torch)", "galore", "galore eigh", "galore per-layer", "galore-torch", "adalomo fused",
              "adalomo unfused", "lomo", "adafactor")
REFRESH_METHODS = {"svd": dict(proj_method="svd"), "eigh": dict(proj_method="eigh"), "randomized_svd": dict(proj_method="randomized_svd"),
                   "randomized_svd (power_iters 1)": dict(proj_method="randomized_svd", power_iters=1),
                   "random": dict(proj_method="random")}
QUICK = dict(sizes=("nano",), vocab=128, batch_size=2, seq_len=16, repeats=2, warmup=1,
             refresh_shapes=((64, 32), (32, 64)), refresh_rank=8, ppl_steps=4, ppl_size="nano",
             fed_samples=4, fed_width=4, fed_hidden=16, fed_rank=2)
FULL = dict(vocab=32000, batch_size=2, seq_len=64, repeats=5, warmup=1, refresh_shapes=None, refresh_rank=128,
            ppl_steps=200, ppl_size="micro", fed_samples=16, fed_width=64, fed_hidden=256, fed_rank=8)


def median_ms(fn, repeats, warmup, device) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _say(what):
    print(f"[bench {time.strftime('%H:%M:%S')}] {what}", flush=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_optimizer(name, model, rank, update_proj_gap=NO_REFRESH):
    """(model, optimizer) for one of OPTIMIZERS at the kit's defaults (GaLore: scale 0.25, std projection)."""
    galore = dict(rank=rank, update_proj_gap=update_proj_gap, scale=0.25)
    if name == "adalomo (lomo-optim)":  # CUDA only: lomo-optim hard-codes .cuda()
        from lrkit.gpu_check import OfficialAdaLomo

        return model, OfficialAdaLomo(model)
    if name == "adamw (torch)":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)
    if name in ("galore-torch", "galore-torch 8-bit"):
        ids = {id(m.weight) for m in block_linears(model).values()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in ids]},
                  {"params": [p for p in model.parameters() if id(p) in ids], "proj_type": "std", **galore}]
        if name == "galore-torch 8-bit":  # CUDA only: bitsandbytes' 8-bit kernels
            from lrkit.optim import GaLoreAdamW8bit

            return model, GaLoreAdamW8bit(groups, lr=1e-2)
        from galore_torch import GaLoreAdamW as Official

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its HF AdamW deprecation notice
            return model, Official(groups, lr=1e-2)
    kw = {"galore": dict(method="galore", lr=1e-2, **galore),
          "galore eigh": dict(method="galore", lr=1e-2, proj_method="eigh", **galore),
          "galore per-layer": dict(method="galore", lr=1e-2, per_layer=True, **galore),
          "adalomo fused": dict(method="adalomo", lr=1e-3),
          "adalomo unfused": dict(method="adalomo", lr=1e-3, fused=False),
          "lomo": dict(method="lomo", lr=1e-2),
          "adafactor": dict(method="adafactor", lr=1e-3)}[name]
    p = prepare(model=model, **kw)
    return p.model, p.optimizer


def bench_one(name, build_optimizer, size, vocab, batch_size, seq_len, steps, warmup, device,
              dtype=torch.float32) -> dict:
    """Median of ``steps`` timed training steps after ``warmup``, parameters in ``dtype`` (lrkit.gpu_check's
    bf16 side by side): tokens/s, step ms, state and peak gradient bytes, and on CUDA peak allocated."""
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
        torch.cuda.reset_peak_memory_stats(device)
    with GradientPeak(model) as peak:
        ms = median_ms(step, steps, 0, device)
    out = {"method": name, "tokens_per_s": batch_size * seq_len / (ms / 1e3), "step_ms": ms,
           "optimizer_state_bytes": optimizer_state_bytes(optimizer), "grad_peak_bytes": peak.peak,
           "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def _fixed_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    lm_loss(model, batch).backward()


def bench_steps(size, cfg, device, optimizers=OPTIMIZERS) -> list[dict]:
    """Optimizer step alone and training step of every optimizer on LLaMA-``size`` (fp32)."""
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg["vocab"], (cfg["batch_size"], cfg["seq_len"] + 1), generator=gen).to(device)
    rank, rows = RANKS[size], []
    pair = _galore_pair(size, rank, batch, cfg, [n for n in PAIRED if n in optimizers], device) \
        if {"galore", "galore-torch"} <= set(optimizers) else {}
    for name in optimizers:
        def fresh(gap=NO_REFRESH):
            seed_everything(0)
            model = build_llama(size, cfg["vocab"], cfg["seq_len"], seed=0).to(device).train()
            return build_optimizer(name, model, rank, gap)

        _say(f"LLaMA-{size}: {name}")
        row = {"size": size, "method": name, "rank": rank if name in GALORE else None}
        model, opt = fresh()
        row["parameters"] = count_parameters(model)
        if name in pair:  # measured in turns with its counterpart
            row.update(pair[name])
        elif not getattr(opt, "updates_in_backward", False):  # the optimizer step alone, gradients fixed
            _fixed_gradients(model, batch)
            row["opt_step_ms"] = median_ms(opt.step, cfg["repeats"], cfg["warmup"], device)
        if name in PAIRED and name not in pair:
            m2, o2 = fresh(gap=1)  # every step refreshes
            _fixed_gradients(m2, batch)
            row["refresh_step_ms"] = median_ms(o2.step, cfg["repeats"], cfg["warmup"], device)
            del m2, o2
        del model, opt  # before the next model: nothing of this one counts in the next CUDA peak
        rows.append(_training_step(row, *fresh(), batch, cfg, device))
    _amortise(rows)
    return rows


def _galore_pair(size, rank, batch, cfg, names, device) -> dict:
    """The kit's GaLoreAdamW (its default SVD refresh, and "eigh") and galore-torch's, optimizer step alone at
    equal settings, timed in turns (kit, kit eigh, official, kit, ...) so that a load that comes and goes on
    the machine hits all alike: {name: {"opt_step_ms": no refresh, "refresh_step_ms": a refresh every step}}."""
    out = {name: {} for name in names}
    for gap, key in ((NO_REFRESH, "opt_step_ms"), (1, "refresh_step_ms")):
        opts = {}
        for name in out:
            seed_everything(0)
            model, opt = build_optimizer(name, build_llama(size, cfg["vocab"], cfg["seq_len"], seed=0).to(device),
                                         rank, gap)
            _fixed_gradients(model, batch)
            opts[name] = opt
        times = {name: [] for name in opts}
        for i in range(cfg["warmup"] + cfg["repeats"]):
            for name, opt in opts.items():
                _sync(device)
                t0 = time.perf_counter()
                opt.step()
                _sync(device)
                if i >= cfg["warmup"]:
                    times[name].append(time.perf_counter() - t0)
        for name in opts:
            out[name][key] = 1e3 * statistics.median(times[name])
        del opts
    return out


def _training_step(row, model, opt, batch, cfg, device) -> dict:
    """Adds the median training step (one untimed step first), tokens/s and the memory figures to ``row``."""
    def train_step():
        backward_and_clip(lm_loss(model, batch), model, opt, None)
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with GradientPeak(model) as peak:
        row["train_step_ms"] = median_ms(train_step, cfg["repeats"], 0, device)
    row["tokens_per_s"] = cfg["batch_size"] * cfg["seq_len"] / (row["train_step_ms"] / 1e3)
    row.update(optimizer_state_bytes=optimizer_state_bytes(opt), grad_peak_bytes=peak.peak,
               param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    if device.type == "cuda":
        row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return row


def _amortise(rows):
    """step(T) = plain step + (refreshing step - plain step) / T, for the optimizer and the training step;
    per-layer GaLore's refresh is the kit's GaLoreAdamW's (the same code, run from a hook)."""
    extra = {r["method"]: r["refresh_step_ms"] - r["opt_step_ms"] for r in rows if "refresh_step_ms" in r}
    extra["galore per-layer"] = extra.get("galore")
    for r in rows:
        e = (extra.get(r["method"]) or 0.0) if r["method"] in GALORE else 0.0
        for T in (200, 10):
            if "opt_step_ms" in r:
                r[f"opt_step_ms_T{T}"] = r["opt_step_ms"] + e / T
            r[f"train_step_ms_T{T}"] = r["train_step_ms"] + e / T


def llama_block_shapes(size) -> list[tuple[tuple[int, int], int]]:
    """[((m, n), count)]: the distinct shapes of LLaMA-``size``'s projected block weights, with how many."""
    shapes = [tuple(m.weight.shape) for m in block_linears(build_llama(size, 64, 16, seed=0)).values()]
    return [(s, shapes.count(s)) for s in sorted(set(shapes))]


def bench_refresh(cfg, device) -> dict:
    """Time of one refresh per shape and method, and the final perplexity of a short run with each."""
    shapes = [(s, 1) for s in cfg["refresh_shapes"]] if cfg["refresh_shapes"] else llama_block_shapes("60m")
    r, gen, rows = cfg["refresh_rank"], torch.Generator().manual_seed(0), []
    for (m, n), count in shapes:
        _say(f"refresh {m}x{n}")
        G = torch.randn(m, n, generator=gen).to(device)
        side_rows = n if m >= n else m  # the projector GaLore keeps ('std': Q of r x n when m >= n)
        fns = {"svd": lambda: torch.linalg.svd(G, full_matrices=False),
               "eigh": lambda: gram_eigh(G, r, "right" if m >= n else "left"),
               "randomized_svd": lambda: _randomized_svd(G, r, gen),
               "randomized_svd (power_iters 1)": lambda: _randomized_svd(G, r, gen, niter=1),
               "random": lambda: _orthonormal(torch.randn(side_rows, r, generator=gen).to(G))}
        row = {"shape": [m, n], "count": count, "rank": r}
        for name, fn in fns.items():
            row[f"{name}_ms"] = median_ms(fn, cfg["repeats"], cfg["warmup"], device)
        rows.append(row)
    return {"shapes": rows, "perplexity": _refresh_perplexity(cfg, device)}


def _refresh_perplexity(cfg, device) -> dict:
    """Final validation perplexity of one short GaLore run (T = 10) per refresh method, same seed and data,
    and of the full SVD at another seed (initialisation and batches): the noise floor of the comparison."""
    from lrkit import data
    from lrkit.train import LMTrainConfig, train_lm

    corpus = data.load("shakespeare", vocab_size=4096)
    steps = cfg["ppl_steps"]
    train = LMTrainConfig(steps=steps, batch_size=8, seq_len=64, lr=1e-2, eval_every=steps, eval_windows=32,
                          device=device.type, seed=0)
    size = cfg["ppl_size"]
    out = {}
    runs = [(name, kw, 0) for name, kw in REFRESH_METHODS.items()] + [("svd (seed 1)", REFRESH_METHODS["svd"], 1)]
    for name, kw, seed in runs:
        _say(f"short run ({size}, {steps} steps): {name}")
        seed_everything(seed)
        model = build_llama(size, corpus.vocab_size, train.seq_len, seed=seed)
        setup = prepare("galore", model, lr=train.lr, rank=RANKS[size], update_proj_gap=10, scale=0.25,
                        proj_method=kw["proj_method"], seed=seed)
        for group in setup.optimizer.param_groups:  # power_iters is a GaLoreAdamW group key, not a prepare() one
            group["power_iters"] = kw.get("power_iters", 2)
        res = train_lm(f"bench-refresh-{name}", setup.model, setup.optimizer, corpus, replace(train, seed=seed))
        out[name] = res.final["val_ppl"]
    return {"model_size": size, "steps": steps, "update_proj_gap": 10, "val_ppl": out}


def bench_fed(cfg, device) -> list[dict]:
    """One round of FeDLRT and of FedAvg, 2 clients: bytes per client, client FLOPs, client wall time."""
    from lrkit.fed import problems
    from lrkit.fed.simulate import run_fedavg, run_fedlrt

    gen = torch.Generator().manual_seed(0)

    def clients(shape, n):
        return [(torch.randn(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for _ in range(2)]

    def one_round(model_fn, exclude, data, rank):
        out = {}
        for method, run in (("fedlrt", run_fedlrt), ("fedavg", run_fedavg)):
            kw = dict(initial_rank=rank, tau=0.02, exclude=exclude) if method == "fedlrt" else {}
            h = run(model_fn, data, 1, lr=0.1, local_steps=1, device=device, **kw)["history"][-1]
            out[method] = {k: statistics.mean(h[k].values()) for k in ("bytes_down", "bytes_up", "flops", "wall_time")}
            out[method]["bytes"] = out[method]["bytes_down"] + out[method]["bytes_up"]
        return out

    _say("fed: one round each of FeDLRT and FedAvg")
    s, hidden, width = cfg["fed_samples"], cfg["fed_hidden"], cfg["fed_width"]
    cases = [(f"vision MLP 784-{hidden}-10 (cpu profile)", problems.mlp(784, hidden), ["2"], (784,)),
             (f"ResNet18 width {width}", lambda: problems.ResNet18(3, 10, width=width),
              list(problems.RESNET18_DENSE), (3, 32, 32))]
    rows = []
    for name, model_fn, exclude, shape in cases:
        measured = one_round(model_fn, exclude, clients(shape, s), cfg["fed_rank"])
        n_params = count_parameters(model_fn())
        rows.append({"model": name, "parameters": n_params, "samples_per_client": s, "initial_rank": cfg["fed_rank"],
                     "measured": measured, "fedavg_bytes_analytic": 2 * 4 * n_params,  # W down and up, fp32
                     "bytes_ratio": measured["fedavg"]["bytes"] / measured["fedlrt"]["bytes"],
                     "flops_ratio": measured["fedavg"]["flops"] / measured["fedlrt"]["flops"]})
    return rows


def ratios(doc) -> dict:
    """The issue's targets as measured ratios (None where a section or an optimizer was not run)."""
    by = {(r["size"], r["method"]): r for r in doc["steps"]}
    size = doc["config"]["sizes"][-1]
    out = {"size": size}
    kit, off = by.get((size, "galore")), by.get((size, "galore-torch"))
    if kit and off:
        for T in (200, 10):
            out[f"galore_opt_step_vs_galore_torch_T{T}"] = kit[f"opt_step_ms_T{T}"] / off[f"opt_step_ms_T{T}"]
            out[f"galore_train_step_vs_galore_torch_T{T}"] = kit[f"train_step_ms_T{T}"] / off[f"train_step_ms_T{T}"]
    eigh = by.get((size, "galore eigh"))
    if eigh and off:
        for T in (200, 10):
            out[f"galore_eigh_opt_step_vs_galore_torch_T{T}"] = eigh[f"opt_step_ms_T{T}"] / off[f"opt_step_ms_T{T}"]
            out[f"galore_eigh_train_step_vs_galore_torch_T{T}"] = (eigh[f"train_step_ms_T{T}"]
                                                                   / off[f"train_step_ms_T{T}"])
    ref = doc["refresh"]
    svd = sum(r["count"] * r["svd_ms"] for r in ref["shapes"])  # a refresh of every projected weight
    ppl = ref["perplexity"]["val_ppl"]
    for name in ("eigh", "randomized_svd", "randomized_svd (power_iters 1)", "random"):
        out[f"refresh_speedup {name}"] = svd / sum(r["count"] * r[f"{name}_ms"] for r in ref["shapes"])
        out[f"ppl_rel_diff {name}"] = abs(ppl[name] - ppl["svd"]) / ppl["svd"]
    out["ppl_rel_diff svd seed 1 vs seed 0"] = abs(ppl["svd (seed 1)"] - ppl["svd"]) / ppl["svd"]
    out["fed_bytes_ratio"] = {r["model"]: r["bytes_ratio"] for r in doc["fed"]}
    return out


def figure(doc):
    """Four panels: optimizer step at T = 200 / 10 (largest size), training step and memory against model
    size (scaling), time per refresh by shape."""
    import matplotlib.pyplot as plt
    import pandas as pd

    steps = pd.DataFrame(doc["steps"])
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    big = steps[steps["size"] == doc["config"]["sizes"][-1]].set_index("method")
    cols = [c for c in ("opt_step_ms_T200", "opt_step_ms_T10") if c in big]
    big[cols].dropna(how="all").plot.barh(ax=axes[0, 0])
    axes[0, 0].set(title=f"optimizer step alone, LLaMA-{big['size'].iloc[0]} (median)", xlabel="ms per step", ylabel="")
    mem = "peak_cuda_bytes" if "peak_cuda_bytes" in steps else None
    memory = steps[mem] if mem else steps["optimizer_state_bytes"] + steps["grad_peak_bytes"]
    steps = steps.assign(memory_mb=memory / 1e6)
    for name, g in steps.groupby("method", sort=False):
        axes[0, 1].plot(g["parameters"], g["train_step_ms_T200"], marker="o", label=name)
        axes[1, 0].plot(g["parameters"], g["memory_mb"], marker="o", label=name)
    for ax, what in ((axes[0, 1], "training step (ms, T = 200)"),
                     (axes[1, 0], "peak allocated (MB)" if mem else "optimizer state + peak gradients (MB)")):
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel=what, title=f"scaling: {what}")
        ax.legend(fontsize=7)
    ref = pd.DataFrame(doc["refresh"]["shapes"])
    ref.index = [f"{m}x{n}" for m, n in ref["shape"]]
    ref[[c for c in ref if c.endswith("_ms")]].rename(columns=lambda c: c[:-3]).plot.bar(ax=axes[1, 1], rot=0)
    axes[1, 1].set(title=f"one projector refresh, rank {ref['rank'].iloc[0]}", ylabel="ms", xlabel="weight shape")
    fig.suptitle(f"lrkit bench on {doc['device']['device_name']} ({doc['threads']} torch threads)")
    fig.tight_layout()
    return fig


def readme_section(root: Path | None = None) -> list[str]:
    """Markdown lines for reports/README.md: per bench record, the hardware, the step table, the ratios and
    the figure (paths relative to reports/)."""
    root = Path(root or REPORTS_DIR)
    lines = []
    for path in sorted((root / "bench").glob("*.json")):
        doc = json.loads(path.read_text())
        c, rt = doc["config"], doc["ratios"]
        lines += [f"### Benchmark: {doc['device']['device_name']} ({doc['threads']} torch threads, "
                  f"{doc['measured_at']})",
                  "", f"`python -m lrkit.bench` (median of {c['repeats']} after {c['warmup']} warm-up; batch "
                  f"{c['batch_size']} x {c['seq_len']}, vocabulary {c['vocab']}, fp32). Milliseconds per step.", "",
                  "| size | method | opt step T=200 | opt step T=10 | train step T=200 | train step T=10 "
                  "| state MB | grad peak MB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in doc["steps"]:
            f = lambda k: f"{r[k]:.1f}" if r.get(k) is not None else "in backward"  # noqa: E731
            lines.append(f"| {r['size']} | {r['method']} | {f('opt_step_ms_T200')} | {f('opt_step_ms_T10')} | "
                         f"{r['train_step_ms_T200']:.1f} | {r['train_step_ms_T10']:.1f} | "
                         f"{r['optimizer_state_bytes'] / 1e6:.2f} | {r['grad_peak_bytes'] / 1e6:.2f} |")
        lines += ["", f"Ratios at LLaMA-{rt['size']}:", ""]
        for k, v in rt.items():
            if isinstance(v, float):
                lines.append(f"* {k}: {v:.3g}")
            elif isinstance(v, dict):
                lines += [f"* FedAvg / FeDLRT bytes per round, {m}: {x:.3g}" for m, x in v.items()]
        lines += [f"* refresh perplexity check: {doc['refresh']['verdict']}", "",
                  f"![bench]({path.with_suffix('.png').relative_to(root).as_posix()})", ""]
    return lines


def run(cfg, device) -> dict:
    doc = {"device": device_info(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "config": {k: v for k, v in cfg.items()}, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    names = OPTIMIZERS + (("adalomo (lomo-optim)",) if device.type == "cuda" else ())
    doc["steps"] = [row for size in cfg["sizes"] for row in bench_steps(size, cfg, device, names)]
    doc["refresh"] = bench_refresh(cfg, device)
    ppl = doc["refresh"]["perplexity"]["val_ppl"]
    off = {k: abs(ppl[k] - ppl["svd"]) / ppl["svd"] for k in REFRESH_METHODS if k != "svd"}
    noise = abs(ppl["svd (seed 1)"] - ppl["svd"]) / ppl["svd"]
    doc["refresh"]["verdict"] = "; ".join(
        [f"{k}: perplexity {'within' if d <= 0.01 else 'NOT within'} 1 % of the full SVD's ({100 * d:.2f} %)"
         for k, d in off.items()] + [f"full SVD, seed 1 against seed 0: {100 * noise:.2f} % (the noise floor)"])
    doc["fed"] = bench_fed(cfg, device)
    doc["ratios"] = ratios(doc)
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrkit.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy sizes, seconds (the unit test)")
    ap.add_argument("--sizes", nargs="+", help="LLaMA sizes (default: micro 20m 60m on CPU, 60m..1b on CUDA)")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    from lrkit.cli import run_cli

    return run_cli(lambda: _main(args), debug=args.debug, prog=ap.prog)


def _main(args) -> int:
    device = resolve_device(args.device)
    cfg = dict(QUICK if args.quick else FULL)
    cfg["sizes"] = tuple(args.sizes or cfg.get("sizes") or SIZES[device.type])
    for s in cfg["sizes"]:
        if s not in RANKS:
            raise ValueError(f"Invalid size: {s!r} (expected one of {list(RANKS)})")
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError(f"Invalid --repeats: {args.repeats} (expected an int >= 1)")
        cfg["repeats"] = args.repeats
    doc = run(cfg, device)
    path = REPORTS_DIR / "bench" / f"{doc['device']['device'].replace(':', '')}.json"
    atomic_write_bytes(path, json.dumps(doc, indent=1).encode())
    from lrkit.records import savefig

    savefig(figure(doc), path.parent, path.stem)
    print("\n".join(readme_section(REPORTS_DIR)))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
