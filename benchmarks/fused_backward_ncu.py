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

from fused_diag import chunk_inputs  # this script's folder is on the path

from nlc.runtime import fused


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--C", type=int, default=64)
    ap.add_argument("--prec", default="bf16")
    args = ap.parse_args()
    N, C, D, HD = 64, args.C, 64, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    chunk, grads = chunk_inputs(N, C, D, HD, g)
    args_ = (*chunk, *grads, "gelu", True, True, args.prec)
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
