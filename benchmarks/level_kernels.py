"""Each level of a spec alone on a GPU: its step time, how many kernels it runs, their GPU time.

    python benchmarks/level_kernels.py SPEC [--dims d=768,heads=12,layers=1] [--B 4] [--T 2048]

Every level class of the generated model (``nlc.bench.load_spec``), regionally compiled
(``nlc.runtime.regional``), fwd+bwd of ``mean(out²)`` on ``[B, T, d]`` under bf16 autocast, not
in CUDA graphs. Per level: the first step (the compile), the median of 5 steps (CUDA events),
and, from the profiler, the number of kernels of one step and the sum of their GPU times. In
CUDA graphs the launches go but the kernels stay: a level's kernel count times a few
microseconds is a floor on its step, whatever the launch overhead. Results go to
``$OUT/level_kernels_<spec>.json`` when ``$OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nlc import bench
from nlc.runtime.regional import compile_regions


def measure(cls, B: int, T: int, d: int) -> dict:
    torch.manual_seed(0)
    m = cls().cuda()
    compile_regions(m)
    x = torch.randn(B, T, d, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
        x.grad = None
        for p in m.parameters():
            p.grad = None

    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(2):
        step()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"first_s": round(first, 1), "step_ms": round(sorted(times)[2], 2), "kernels": len(kernels),
            "kernel_ms_sum": round(sum(e.device_time for e in kernels) / 1e3, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--dims", default="")
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=2048)
    args = ap.parse_args()
    dims = {k: int(v) for k, _, v in (kv.partition("=") for kv in filter(None, args.dims.split(",")))}
    loaded = bench.load_spec(args.spec, {**dims, "seq": args.T})
    d = int(loaded.program.d_model)
    rows = []
    for name, cls in sorted(loaded.level_classes().items()):
        try:
            row = {"level": name, **measure(cls, args.B, args.T, d)}
        except Exception as e:  # noqa: BLE001 - a diagnostic: report and go on to the next level
            row = {"level": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch._dynamo.reset()
    if os.environ.get("OUT"):
        out = {"card": torch.cuda.get_device_name(), "spec": args.spec, "dims": dims, "B": args.B,
               "T": args.T, "levels": rows}
        Path(os.environ["OUT"], f"level_kernels_{Path(args.spec).stem}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
