"""Where the time of one in-context level goes on a GPU: eager vs compiled (scan / unrolled).

    python benchmarks/level_diag.py [--chunk 64] [--modes eager,scan,unrolled] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nlc  # noqa: E402


def level(chunk: int, d: int, heads: int):
    text = (ROOT / "examples" / "titans_lmm.nl").read_text().replace("every 16 tokens", f"every {chunk} tokens")
    text = re.sub(r"(?m)^(\s*)d = .*$", rf"\g<1>d = {d}", text)
    text = re.sub(r"(?m)^(\s*)heads = .*$", rf"\g<1>heads = {heads}", text)
    text = re.sub(r"(?m)^(\s*)seq = .*$", r"\g<1>seq = 2048", text)
    Model = nlc.load(text)
    return sys.modules[Model.__module__].MemoryLevel


def bench(f, x, steps=5):
    def step():
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = f(x)
        y.float().square().mean().backward()

    t0 = time.time()
    step()
    torch.cuda.synchronize()
    first = time.time() - t0
    step()
    torch.cuda.synchronize()
    ts = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return first, sorted(ts)[len(ts) // 2], step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--modes", default="eager,scan,unrolled")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=2048)
    args = ap.parse_args()
    cls = level(args.chunk, 512, 8)
    out = []
    for mode in args.modes.split(","):
        torch.manual_seed(0)
        m = cls().cuda()
        x = torch.randn(args.B, args.T, 512, device="cuda", requires_grad=True)
        os.environ["NLC_CHUNK_SCAN"] = "0" if mode.startswith("unrolled") else "1"
        torch._dynamo.reset()
        if mode == "eager":
            f = m
        elif mode.endswith("_cg"):  # CUDA graphs: launch overhead removed
            f = torch.compile(m, fullgraph=True, mode="reduce-overhead")
        else:
            f = torch.compile(m, fullgraph=True)
        try:
            first, ms, step = bench(f, x)
            r = {"mode": mode, "chunk": args.chunk, "first_s": round(first, 1), "step_ms": round(ms, 2),
                 "tokens_per_s": round(args.B * args.T / ms * 1e3)}
        except Exception as e:  # noqa: BLE001
            r = {"mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            step = None
        print(json.dumps(r), flush=True)
        out.append(r)
        if args.profile and step is not None:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as p:
                step()
                torch.cuda.synchronize()
            print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
            print(p.key_averages().table(sort_by="cpu_time_total", row_limit=8), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"level_diag_{args.chunk}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
