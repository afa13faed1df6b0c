"""Call the fused MLP chunk backward a few times at ``fused_diag.py``'s sizes, for Nsight Compute.

    ncu --clock-control none -k regex:'_bwd_(weights|sums)_kernel' -s 2 -c 2 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        --section LaunchStats --section MemoryWorkloadAnalysis \\
        python3 benchmarks/fused_backward_ncu.py [--C 64] [--prec bf16]

``N`` 64 memories of a depth-2 residual MLP 64 -> 256 -> 64 with momentum (the Titans level
at B 8 x 8 heads), the current ``NLC_FUSED_WARPS`` / ``NLC_FUSED_BLOCKS`` settings. Prints
each compiled backward kernel's registers a thread and spilled registers (no profiler of its
own, so it runs under ``ncu``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nlc.runtime import fused


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--C", type=int, default=64)
    ap.add_argument("--prec", default="bf16")
    args = ap.parse_args()
    N, C, D, HD = 64, args.C, 64, 256
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=g) * scale

    k = torch.nn.functional.normalize(r(N, C, D), dim=-1)
    v, q = r(N, C, D), torch.nn.functional.normalize(r(N, C, D), dim=-1)
    w1, w2 = r(N, HD, D, scale=D**-0.5), r(N, D, HD, scale=HD**-0.5)
    s1, s2 = r(N, HD, D, scale=0.01), r(N, D, HD, scale=0.01)
    cw, cs = r(N, C).abs() * 0.1, r(N, C).abs() * 0.1
    gam, dd, bb = r(N).sigmoid(), r(N).sigmoid(), r(N).sigmoid()
    gyq, gw1, gw2, gs1, gs2 = r(N, C, D), r(N, HD, D), r(N, D, HD), r(N, HD, D), r(N, D, HD)
    args_ = (k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb, gyq, gw1, gw2, gs1, gs2,
             "gelu", True, True, args.prec)  # fmt: skip
    for _ in range(4):
        fused.mlp2.mlp2_chunk_backward(*args_)
    torch.cuda.synchronize()
    for name in ("_bwd_sums_kernel", "_bwd_weights_kernel"):
        for cache in getattr(fused.mlp2, name).device_caches.values():
            for ck in cache[0].values():
                ck._init_handles()
                print(name, "registers", ck.n_regs, "spilled", ck.n_spills, flush=True)


if __name__ == "__main__":
    main()
