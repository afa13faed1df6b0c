"""Time the fused MLP chunk kernels (``nlc.runtime.fused``) alone on a GPU.

    python benchmarks/fused_diag.py [--N 64] [--D 64] [--hidden 256] [--chunks 16,64]
                                    [--precisions bf16,tf32,ieee] [--warps 4,8] [--blocks 32]

For every chunk size, operand precision, warp count and block of the hidden width (``BLOCKS``,
the same for the write and the backward kernels): the microseconds per call of each kernel
(CUDA time from the profiler, averaged over calls), and each compiled kernel's registers and
spills. Then, per chunk size and precision, the fastest setting of each kernel, as the
``NLC_FUSED_WARPS`` and ``NLC_FUSED_BLOCKS`` values that select it (``benchmarks/level_diag.py``
times a level with them). ``N`` memories (batch x heads) of a depth-2 residual MLP with
momentum, the Titans configuration of ``specs/titans_memory.nl`` at B8 x 8 heads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nlc.runtime import fused

KERNELS = ("_read_kernel", "_write_kernel", "_bwd_sums_kernel", "_bwd_weights_kernel")


def compiled_stats(fn):
    """(registers, spills) of every compiled variant of a Triton kernel."""
    out = []
    try:
        for cache in fn.device_caches.values():
            for ck in cache[0].values():
                if hasattr(ck, "_init_handles"):
                    ck._init_handles()
                out.append((getattr(ck, "n_regs", None), getattr(ck, "n_spills", None)))
    except Exception as e:  # noqa: BLE001 - a diagnostic; the layout differs across Triton versions
        out.append(f"unavailable: {type(e).__name__}")
    return out


def chunk_inputs(N: int, C: int, D: int, HD: int, g: torch.Generator):
    """Random inputs of one chunk of ``N`` depth-2 residual MLP memories ``D -> HD -> D`` with
    momentum on CUDA: ``(k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb)`` as ``mlp2_chunk`` takes
    them, and the incoming gradients ``(gyq, gw1, gw2, gs1, gs2)`` of its backward."""

    def r(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=g) * scale

    k = torch.nn.functional.normalize(r(N, C, D), dim=-1)
    v, q = r(N, C, D), torch.nn.functional.normalize(r(N, C, D), dim=-1)
    w1, w2 = r(N, HD, D, scale=D**-0.5), r(N, D, HD, scale=HD**-0.5)
    s1, s2 = r(N, HD, D, scale=0.01), r(N, D, HD, scale=0.01)
    cw, cs = r(N, C).abs() * 0.1, r(N, C).abs() * 0.1
    gam, dd, bb = r(N).sigmoid(), r(N).sigmoid(), r(N).sigmoid()
    grads = (r(N, C, D), r(N, HD, D), r(N, D, HD), r(N, HD, D), r(N, D, HD))
    return (k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb), grads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunks", default="16,64")
    ap.add_argument("--precisions", default="bf16,tf32,ieee")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--blocks", default="32", help="hidden units per program (16, 32, 64)")
    args = ap.parse_args()
    N, D, HD = args.N, args.D, args.hidden
    g = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for C in (int(c) for c in args.chunks.split(",")):
        chunk, grads = chunk_inputs(N, C, D, HD, g)
        for prec in args.precisions.split(","):
            for warps, bh in ((int(w), int(b)) for w in args.warps.split(",") for b in args.blocks.split(",")):
                for table in (fused.mlp2.WARPS, fused.mlp2.WARPS_SMALL):  # every chunk size
                    table.update({name: warps for name in table})
                for table in (fused.mlp2.BLOCKS, fused.mlp2.BLOCKS_SMALL, fused.mlp2.BLOCKS_BF16_64):
                    table.update({name: bh for name in table})

                fa = (*chunk, "gelu", True, True, prec)
                ba = (*chunk, *grads, "gelu", True, True, prec)

                def call(fa=fa, ba=ba):
                    fused.mlp2_chunk(*fa)
                    fused.mlp2.mlp2_chunk_backward(*ba)

                for _ in range(3):
                    call()
                torch.cuda.synchronize()
                with torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CUDA]
                ) as p:
                    for _ in range(10):
                        call()
                    torch.cuda.synchronize()
                per = {}
                for ev in p.key_averages():
                    if ev.key in KERNELS:
                        per[ev.key] = round(ev.device_time_total / ev.count, 1)
                row = {"C": C, "prec": prec, "warps": warps, "blocks": bh, "us_per_call": per,
                       "fwd+bwd_us": round(sum(per.values()) + per.get("_read_kernel", 0), 1)}
                print(json.dumps(row), flush=True)
                results.append(row)
    stats = {name: compiled_stats(getattr(fused.mlp2, name)) for name in KERNELS}
    print(json.dumps({"regs_spills": stats}), flush=True)
    best = fastest(results)
    for b in best:
        print(json.dumps(b), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "fused_diag.json").write_text(
            json.dumps({"results": results, "regs_spills": stats, "fastest": best}, indent=1))


def fastest(results: list[dict]) -> list[dict]:
    """Per (chunk, precision): the read kernel's fastest warps, the write kernel's fastest
    (warps, block), and the backward's block with the least sums + weights time (each kernel at
    its fastest warps for that block), as environment settings."""
    out = []
    for key in sorted({(r["C"], r["prec"]) for r in results}):
        rows = [r for r in results if (r["C"], r["prec"]) == key]

        def t(r, name):
            return r["us_per_call"].get(name, float("inf"))

        read = min(rows, key=lambda r: t(r, "_read_kernel"))
        write = min(rows, key=lambda r: t(r, "_write_kernel"))
        per_block = {}
        for bh in {r["blocks"] for r in rows}:
            at = [r for r in rows if r["blocks"] == bh]
            sums = min(at, key=lambda r: t(r, "_bwd_sums_kernel"))
            weights = min(at, key=lambda r: t(r, "_bwd_weights_kernel"))
            per_block[bh] = (t(sums, "_bwd_sums_kernel") + t(weights, "_bwd_weights_kernel"), sums, weights)
        bh = min(per_block, key=lambda b: per_block[b][0])
        _, sums, weights = per_block[bh]
        us = t(read, "_read_kernel") + t(write, "_write_kernel") + per_block[bh][0]
        out.append({
            "C": key[0], "prec": key[1], "read+write+sums+weights_us": round(us, 1),
            "NLC_FUSED_WARPS": f"read={read['warps']},write={write['warps']},sums={sums['warps']},"
                               f"weights={weights['warps']}",
            "NLC_FUSED_BLOCKS": f"write={write['blocks']},backward={bh}",
        })
    return out


if __name__ == "__main__":
    main()
