"""Where the time of one in-context level goes on a GPU: eager, compiled, in CUDA graphs.

    python benchmarks/level_diag.py [--chunk 64] [--modes eager,regional,graphs] [--profile]

The level is the Titans MLP memory of ``specs/titans_memory.nl`` (d 512, 8 heads x 64) on
B x T tokens, fwd+bwd under bf16 autocast; ``--spec FILE --level NAME --dims k=v,...`` times another
level instead (``--spec benchmarks/specs/cms_level.nl --level fast --dims d=1024,period=512 --T 4096``). Modes: ``eager``; ``scan`` / ``unrolled`` (the whole
level compiled, chunks through torch's scan / unrolled; ``unrolled_cg`` adds inductor's CUDA
graphs); ``regional`` (nlc.runtime.regional: the chunk step compiled, the loop eager); ``graphs``
/ ``regional_graphs`` (the eager / regional level captured by torch.cuda.make_graphed_callables).
A mode ending in ``-eagerfwd`` (``regional_graphs-eagerfwd``) is that mode without the regional
whole-forward region (``NLC_WHOLE_FORWARD=0``: the level's forward eager around its op).
A mode may end in ``@NAME=VALUE`` (several joined by ``+``) to run with those environment
settings, for comparisons in one process: ``regional_graphs@NLC_FUSED_READ_SPLIT=0``.
``NLC_FUSED=0`` turns off the fused MLP chunk kernels (``nlc.runtime.fused``); each result
records which it ran.
``--profile`` prints where the CPU and the GPU spend a step.
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


def level(chunk: int, d: int, heads: int, T: int, spec: str | None = None, name: str = "memory",
          dims: str = ""):
    """The level class ``name`` of ``spec`` (default: the Titans memory at ``chunk``, ``d``, ``heads``)
    and its model width. ``dims``: ``k=v,...`` overrides (``spec`` given: only these and ``seq``)."""
    if spec is None:
        spec, values = ROOT / "benchmarks" / "specs" / "titans_memory.nl", {"d": d, "heads": heads, "chunk": chunk}
    else:
        values = {}
    values["seq"] = T
    for item in filter(None, dims.split(",")):
        key, _, value = item.partition("=")
        values[key] = int(value)
    loaded = bench.load_spec(spec, values)
    return loaded.level_classes()[name], int(loaded.program.d_model)


def time_level(f, x, steps=5):
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
    ap.add_argument("--modes", default="eager,regional,graphs,regional_graphs")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-modes", default="regional", help="the modes --profile profiles")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    ap.add_argument("--spec", default=None, help="another spec (then --level names the level, --dims its sizes)")
    ap.add_argument("--level", default="memory")
    ap.add_argument("--dims", default="", help="k=v,... for --spec (e.g. d=1024,period=512)")
    args = ap.parse_args()
    cls, d = level(args.chunk, 512, 8, args.T, args.spec, args.level, args.dims)
    tag = f"{args.level}_{args.dims.replace(',', '_').replace('=', '')}" if args.spec else str(args.chunk)
    out = []
    base_env = dict(os.environ)
    for mode in args.modes.split(","):
        os.environ.clear()
        os.environ.update(base_env)
        mode, _, settings = mode.partition("@")
        label = f"{mode}@{settings}" if settings else mode
        for item in filter(None, settings.split("+")):
            name, _, value = item.partition("=")
            os.environ[name] = value
        torch.manual_seed(0)
        m = cls().cuda()
        x = torch.randn(args.B, args.T, d, device="cuda", requires_grad=True)
        os.environ["NLC_CHUNK_SCAN"] = "0" if mode.startswith("unrolled") else "1"
        # "-eagerfwd": regional compile without the whole-forward region (NLC_WHOLE_FORWARD=0)
        os.environ["NLC_WHOLE_FORWARD"] = "0" if mode.endswith("-eagerfwd") else "1"
        mode = mode.removesuffix("-eagerfwd")
        torch._dynamo.reset()
        if mode in ("eager", "graphs"):
            f = m
        elif mode.startswith("regional"):
            compile_regions(m)
            f = m
        elif mode.endswith("_cg"):  # CUDA graphs: launch overhead removed
            f = torch.compile(m, fullgraph=True, mode="reduce-overhead")
        else:
            f = torch.compile(m, fullgraph=True)
        try:
            if mode.endswith("graphs"):
                with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                    f = torch.cuda.make_graphed_callables(m, (x,), num_warmup_iters=3)
            first, ms, step = time_level(f, x, args.steps)
            r = {"mode": label, "chunk": args.chunk, "fused": os.environ.get("NLC_FUSED", "1"),
                 "first_s": round(first, 1), "step_ms": round(ms, 2),
                 "tokens_per_s": round(args.B * args.T / ms * 1e3)}
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc(limit=8)
            r = {"mode": label, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            step = None
        print(json.dumps(r), flush=True)
        out.append(r)
        if args.profile and step is not None and label in args.profile_modes.split(","):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as p:
                step()
                torch.cuda.synchronize()
            gpu = p.key_averages().table(sort_by="cuda_time_total", row_limit=12)
            cpu = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            print(gpu, cpu, sep="\n", flush=True)
            if os.environ.get("OUT"):  # the longer GPU table, kernel by kernel, to a file
                table = p.key_averages().table(sort_by="self_cuda_time_total", row_limit=80, max_name_column_width=90)
                Path(os.environ["OUT"], f"profile_{label}_{tag}.txt").write_text(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"level_diag_{tag}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
