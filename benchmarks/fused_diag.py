"""Time the fused MLP chunk kernels (``nlc.runtime.fused``) alone on a GPU.

    python benchmarks/fused_diag.py [--N 64] [--D 64] [--hidden 256] [--chunks 16,64]
                                    [--precisions bf16,tf32,ieee] [--warps 4,8]

For every chunk size, operand precision and warp count: the microseconds per call of each
kernel (CUDA time from the profiler, averaged over calls), and each compiled kernel's registers
and spills. ``N`` memories (batch x heads) of a depth-2 residual MLP with momentum, the Titans
configuration of ``specs/titans_memory.nl`` at B8 x 8 heads.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunks", default="16,64")
    ap.add_argument("--precisions", default="bf16,tf32,ieee")
    ap.add_argument("--warps", default="4,8")
    args = ap.parse_args()
    N, D, HD = args.N, args.D, args.hidden
    g = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for C in (int(c) for c in args.chunks.split(",")):

        def r(*shape, scale=1.0):
            return torch.randn(*shape, device="cuda", generator=g) * scale

        k = torch.nn.functional.normalize(r(N, C, D), dim=-1)
        v, q = r(N, C, D), torch.nn.functional.normalize(r(N, C, D), dim=-1)
        w1, w2 = r(N, HD, D, scale=D**-0.5), r(N, D, HD, scale=HD**-0.5)
        s1, s2 = r(N, HD, D, scale=0.01), r(N, D, HD, scale=0.01)
        cw, cs = r(N, C).abs() * 0.1, r(N, C).abs() * 0.1
        gam, dd, bb = r(N).sigmoid(), r(N).sigmoid(), r(N).sigmoid()
        gyq, gw1, gw2, gs1, gs2 = r(N, C, D), r(N, HD, D), r(N, D, HD), r(N, HD, D), r(N, D, HD)
        for prec in args.precisions.split(","):
            for warps in (int(w) for w in args.warps.split(",")):
                fused.WARPS.update({name: warps for name in fused.WARPS})

                fa = (k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb, "gelu", True, True, prec)
                ba = (*fa[:12], gyq, gw1, gw2, gs1, gs2, "gelu", True, True, prec)

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
                row = {"C": C, "prec": prec, "warps": warps, "us_per_call": per,
                       "fwd+bwd_us": round(sum(per.values()) + per.get("_read_kernel", 0), 1)}
                print(json.dumps(row), flush=True)
                results.append(row)
    stats = {name: compiled_stats(getattr(fused.mlp2, name)) for name in KERNELS}
    print(json.dumps({"regs_spills": stats}), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "fused_diag.json").write_text(
            json.dumps({"results": results, "regs_spills": stats}, indent=1))


if __name__ == "__main__":
    main()
