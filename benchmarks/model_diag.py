"""Where a generated model's training step spends its time on a GPU.

    python benchmarks/model_diag.py SPEC [--dims d=384,...] [--B 16] [--T 512]
                                    [--modes compiled] [--profile] [--steps 20]

A training step as ``benchmarks/peers.py`` times it (``model_candidate``): bf16 autocast, the
spec's optimizers at their periods. Modes:

- ``eager``: the generated model as it is;
- ``compiled``: regional compilation (``nlc.runtime.regional``) and each in-context level in
  CUDA graphs (``nlc.runtime.graphs``; ``--graph-scope levels`` of ``train.py``);
- ``regional``: regional compilation without the graphs;
- ``whole``: regional compilation and the whole training call (forward and backward) in CUDA
  graphs, as ``peers.py`` and the generated ``train.py`` run it by default (``--graph-scope
  model``).

Each mode reports its first step (the compile), the median step time over ``--steps`` (CUDA
events, a sync after every step) and, with ``--profile``, the GPU time of one step against its
wall time (how much of the step the GPU is busy) and the kernels that take most of it. Results go
to ``$OUT/model_diag_<spec>.json`` when ``$OUT`` is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nlc import bench


def parse_dims(text: str | None) -> dict:
    out = {}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        out[name.strip()] = int(value)
    return out


def build(spec: Path, dims: dict, B: int, T: int, mode: str):
    """The model, its optimizers and one training step, as ``peers.model_candidate`` has them."""
    loaded = bench.load_spec(spec, {**dims, "seq": T})
    module = loaded.module
    cfg = module.ModelConfig()
    if "seq_len" in {f.name for f in dataclasses.fields(cfg)}:
        cfg = dataclasses.replace(cfg, seq_len=T)
    torch.manual_seed(0)
    model = loaded.Model(cfg).cuda().train()
    optimizers = module.build_optimizers(model)
    periods = [int(p) for p in module.optimizer_periods()]
    if mode in ("compiled", "regional", "whole"):
        from nlc.runtime.regional import compile_regions

        compile_regions(model)
    if mode in ("compiled", "whole"):
        from nlc.runtime.graphs import capture

        capture(model, "levels" if mode == "compiled" else "model")
    g = torch.Generator().manual_seed(0)
    vocab = int(cfg.vocab_size)
    x = torch.randint(0, vocab, (B, T), generator=g).cuda()
    y = torch.randint(0, vocab, (B, T), generator=g).cuda()
    count = [0]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        for opt, period in zip(optimizers, periods):
            if (count[0] + 1) % period == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
        count[0] += 1

    return model, step


def timed(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return out


def busy_ms(p, top: int = 40) -> tuple[float, int, list[dict]]:
    """How long the GPU ran kernels in the profiled step (the union of the kernels' intervals, so
    overlapping kernels count once), how many kernels ran, and the ``top`` kernel names by total
    time (kernels replayed from CUDA graphs included), from the profiler's trace."""
    path = Path(tempfile.mkdtemp()) / "trace.json"
    p.export_chrome_trace(str(path))
    events = [e for e in json.loads(path.read_text()).get("traceEvents", [])
              if e.get("cat") == "kernel" and "ts" in e]
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events)
    total, end = 0.0, None
    for a, b in spans:
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    by_name: dict[str, list[float]] = {}
    for e in events:
        row = by_name.setdefault(e.get("name", "?"), [0.0, 0])
        row[0] += e.get("dur", 0)
        row[1] += 1
    names = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    table = [{"ms": round(us / 1e3, 3), "calls": n, "name": name[:120]} for name, (us, n) in names]
    return total / 1e3, len(spans), table


def profile(step, top: int) -> dict:
    """GPU time of one step (profiler rows, which count a kernel under its aten op as well:
    an upper bound), the time the GPU was busy running kernels, against the step's wall time,
    and the ``top`` rows by GPU time."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as p:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    busy, n_kernels, by_kernel = busy_ms(p, top)
    rows = []
    for ev in p.key_averages():
        dev = getattr(ev, "self_device_time_total", 0.0) or 0.0
        if dev > 0:
            rows.append((dev / 1e3, ev.count, ev.key))
    rows.sort(reverse=True)
    gpu = sum(r[0] for r in rows)
    return {
        "wall_ms": round(wall, 2),
        "gpu_ms": round(gpu, 2),
        "busy_ms": round(busy, 2),
        "kernels_run": n_kernels,
        "by_kernel": by_kernel,
        "kernels": [{"ms": round(ms, 3), "calls": n, "name": name[:120]} for ms, n, name in rows[:top]],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--dims", default=None)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--modes", default="compiled")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    spec = Path(args.spec)
    results = {"card": torch.cuda.get_device_name(), "spec": str(spec), "B": args.B, "T": args.T,
               "dims": args.dims, "modes": []}
    for mode in args.modes.split(","):
        model, step = build(spec, parse_dims(args.dims), args.B, args.T, mode)
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        for _ in range(args.warmup):
            step()
        ts = timed(step, args.steps)
        med = statistics.median(ts)
        row = {"mode": mode, "first_s": round(first, 1), "step_ms": round(med, 2),
               "tokens_per_s": round(args.B * args.T / med * 1e3)}
        print(json.dumps(row), flush=True)
        if args.profile:
            row["profile"] = profile(step, args.top)
            prof = row["profile"]
            print(f"[{mode}] one step: wall {prof['wall_ms']} ms, GPU busy {prof['busy_ms']} ms "
                  f"({prof['kernels_run']} kernels), profiler rows {prof['gpu_ms']} ms", flush=True)
            for k in prof["kernels"]:
                print(f"  {k['ms']:8.3f} ms {k['calls']:5d}x  {k['name']}", flush=True)
            print(f"[{mode}] kernels by name (from the trace):", flush=True)
            for k in prof["by_kernel"]:
                print(f"  {k['ms']:8.3f} ms {k['calls']:5d}x  {k['name']}", flush=True)
        results["modes"].append(row)
        del model, step
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"model_diag_{spec.stem}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
