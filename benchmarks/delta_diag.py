"""Where the time of nlc's delta-rule op goes on a GPU, and A/B runs of its variants.

    python benchmarks/delta_diag.py [--modes linear,linear_cg,fla] [--T 2048] [--profile]

The op is ``benchmarks/peers.py``'s delta case: ``nlc.runtime.chunk.scan`` on a linear memory,
``dgd`` on ``dot``, causal read, period ``--chunk`` (64), B 8, H 16, D 128, fwd+bwd under bf16
autocast with TF32 on, compiled with ``fullgraph=True`` (every chunk at once:
``nlc.runtime.linear_chunks``). Modes:

- ``linear``: the op compiled (``torch.compile(fullgraph=True)``);
- ``linear_cg``: the same in CUDA graphs (``mode="reduce-overhead"``: the compiled op's kernels
  replayed without the CPU launching each);
- ``loop``: the chunk loop (``NLC_LINEAR_CHUNKS=0``), compiled unrolled;
- ``fla``: flash-linear-attention's ``chunk_delta_rule`` on the same inputs (when installed);
- ``sdpa``: causal attention (``scaled_dot_product_attention``) on the same B, T, H, D;
- ``linear_old``, ``linear_cg_old``: ``linear``, ``linear_cg`` with ``linear_chunks``' own
  recurrence instead of the delta kernels (``NLC_DELTA_KERNEL=0``; ``nlc.runtime.fused.delta``);
  ``..._solve``: with cuBLAS's triangular solve for the chunks' inverses instead of
  ``nlc.runtime.fused.triangular`` (``NLC_LINEAR_INVERSE=solve``, which takes the batched products
  too); ``..._split``: each chunk's own part in batched products instead of
  ``nlc.runtime.fused.delta_chunks`` (``NLC_DELTA_CHUNKS=0``); ``..._cast``: the bf16 keys, values
  and queries copied to float32 first (``NLC_DELTA_OPERANDS=float32``) instead of read as they are.

Every mode is timed with CUDA events (median of ``--steps``) in one process; ``--profile`` prints
(and writes to ``$OUT``) the GPU kernels of one step of each nlc mode. Results go to
``$OUT/delta_diag_T<T>.json`` when ``$OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nlc.runtime import chunk as nl_chunk
from nlc.runtime import memories as nl_mem


def inputs(B, T, H, D, layout="bhtd"):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (B, H, T, D) if layout == "bhtd" else (B, T, H, D)
    q = F.normalize(torch.randn(shape, device="cuda", generator=g), dim=-1).bfloat16().requires_grad_()
    k = F.normalize(torch.randn(shape, device="cuda", generator=g), dim=-1).bfloat16().requires_grad_()
    v = torch.randn(shape, device="cuda", generator=g).bfloat16().requires_grad_()
    beta = torch.rand(shape[:-1], device="cuda", generator=g).bfloat16().requires_grad_()
    return q, k, v, beta


def nlc_step(B, T, H, D, C, graphs=False):
    spec = nl_mem.MemorySpec("linear", din=D, dout=D)
    rule = nl_chunk.RuleSpec("dgd")
    W0 = torch.zeros(B, H, D, D, device="cuda")
    q, k, v, beta = inputs(B, T, H, D)

    def op(q, k, v, beta):
        y, _, _ = nl_chunk.scan(spec, "dot", rule, [W0], None, k, v, q, beta, None, None, chunk=C, read="causal")
        return y

    fn = torch.compile(op, fullgraph=True, mode="reduce-overhead" if graphs else None)

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(q, k, v, beta)
        y.float().square().mean().backward()
        for t in (q, k, v, beta):
            t.grad = None

    return step, lambda: op(q, k, v, beta)


def fla_step(B, T, H, D):
    from fla.ops.delta_rule import chunk_delta_rule

    q, k, v, beta = inputs(B, T, H, D, layout="bthd")

    def step():
        y = chunk_delta_rule(q, k, v, beta)[0]
        y.float().square().mean().backward()
        for t in (q, k, v, beta):
            t.grad = None

    return step


def sdpa_step(B, T, H, D):
    q, k, v, _ = inputs(B, T, H, D)

    def step():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y.float().square().mean().backward()
        for t in (q, k, v):
            t.grad = None

    return step


def timed(step, steps):
    t0 = time.time()
    step()
    torch.cuda.synchronize()
    first = time.time() - t0
    for _ in range(2):
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
    return first, sorted(ts)[len(ts) // 2]


def profile(step, name, out_dir):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    print(f"--- profile {name} (3 steps)\n{table}", flush=True)
    if out_dir:
        (Path(out_dir) / f"delta_profile_{name}.txt").write_text(table)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="linear,linear_cg,fla")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tunes", default="", help="';'-separated NLC_DELTA_TUNE values "
                    "(nlc.runtime.fused.delta), or NLC_DELTA_CHUNKS_TUNE values prefixed 'chunks:' "
                    "(nlc.runtime.fused.delta_chunks): the kernel modes run once for each")
    args = ap.parse_args()
    torch.set_float32_matmul_precision("high")
    out_dir = os.environ.get("OUT")
    B, T, H, D = args.B, args.T, args.H, args.D
    rows = []
    ref = None
    runs = []
    for mode in args.modes.split(","):
        kernel = mode.startswith(("linear", "loop")) and "_old" not in mode
        runs += [(mode, t) for t in (args.tunes.split(";") if kernel and args.tunes else [None])]
    for mode, tune in runs:
        torch._dynamo.reset()
        os.environ.pop("NLC_DELTA_TUNE", None)
        os.environ.pop("NLC_DELTA_CHUNKS_TUNE", None)
        if tune:
            _, prefixed, value = tune.rpartition("chunks:")
            os.environ["NLC_DELTA_CHUNKS_TUNE" if prefixed else "NLC_DELTA_TUNE"] = value
        base, flags = mode, set()
        while base.endswith(("_old", "_solve", "_split", "_cast")):
            base, _, flag = base.rpartition("_")
            flags.add(flag)
        os.environ["NLC_LINEAR_CHUNKS"] = "0" if base == "loop" else "1"
        os.environ["NLC_DELTA_KERNEL"] = "0" if "old" in flags else "1"
        os.environ["NLC_LINEAR_INVERSE"] = "solve" if "solve" in flags else "kernel"
        os.environ["NLC_DELTA_CHUNKS"] = "0" if "split" in flags else "1"
        os.environ["NLC_DELTA_OPERANDS"] = "float32" if "cast" in flags else "own"
        row = {"mode": mode, "tune": tune, "B": B, "T": T, "H": H, "D": D, "chunk": args.chunk}
        try:
            if base in ("linear", "linear_cg", "loop"):
                step, eager = nlc_step(B, T, H, D, args.chunk, graphs=base == "linear_cg")
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    y = eager().float()
                if ref is None:
                    ref = y
                row["rel_diff_vs_first"] = ((y - ref).norm() / ref.norm()).item()
            elif mode == "fla":
                step = fla_step(B, T, H, D)
            elif mode == "sdpa":
                step = sdpa_step(B, T, H, D)
            else:
                raise ValueError(f"unknown mode {mode}")
            torch.cuda.reset_peak_memory_stats()
            first, ms = timed(step, args.steps)
            row.update(first_s=round(first, 2), ms=round(ms, 3), tokens_per_s=round(B * T / ms * 1e3),
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
            if args.profile and base not in ("sdpa", "linear_cg"):
                profile(step, mode + ("" if tune is None else "_" + tune.replace(",", "_").replace("=", "").replace(":", "_")), out_dir)
        except Exception as e:  # noqa: BLE001 - a failed mode is a result
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        rows.append(row)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if out_dir:
        (Path(out_dir) / f"delta_diag_T{T}.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
