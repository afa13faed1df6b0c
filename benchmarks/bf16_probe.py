"""Which hidden blocks the fused MLP kernels run in bf16 on a chunk size, on this GPU.

    python benchmarks/bf16_probe.py [--chunk 64] [--configs 4:64/16,4:64/32,8:64/32,4:64/64]

``nlc.runtime.fused.mlp2._kernel_precision`` keeps bf16 off where the bf16 kernels failed
(64-token blocks with hidden blocks under 64: an illegal memory access with Triton 3.6 on an
H200). This probe forces bf16 on every kernel anyway and runs one chunk forward and backward
(``mlp2_chunk``, ``mlp2_chunk_backward``: N 64 memories, D 64, hidden 256, momentum) per
configuration ``WARPS:WRITE/BACKWARD`` (warps of every kernel; hidden blocks of the write and
of the backward kernels), each in its own process with ``CUDA_LAUNCH_BLOCKING=1`` (an illegal
memory access leaves the CUDA context unusable), and prints for each: whether it ran, the
kernel call that failed, or the largest relative difference of its outputs to the TF32 kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(warps: int, write: int, backward: int, C: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from nlc.runtime.fused import mlp2

    for table in (mlp2.WARPS, mlp2.WARPS_SMALL):
        table.update({k: warps for k in table})
    for table in (mlp2.BLOCKS, mlp2.BLOCKS_SMALL, mlp2.BLOCKS_BF16_64):
        table.update({"write": write, "backward": backward})
    N, D, HD = 64, 64, 256
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=g) * scale

    k, q = (torch.nn.functional.normalize(r(N, C, D), dim=-1) for _ in range(2))
    v = r(N, C, D)
    w1, w2 = r(N, HD, D, scale=D**-0.5), r(N, D, HD, scale=HD**-0.5)
    s1, s2 = r(N, HD, D, scale=0.01), r(N, D, HD, scale=0.01)
    cw, cs = r(N, C).abs() * 0.1, r(N, C).abs() * 0.1
    gam, dd, bb = r(N).sigmoid(), r(N).sigmoid(), r(N).sigmoid()
    grads = (r(N, C, D), r(N, HD, D), r(N, D, HD), r(N, HD, D), r(N, D, HD))

    def run(prec):
        fa = (k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb, "gelu", True, True, prec)
        out = list(mlp2.mlp2_chunk(*fa))
        out += list(mlp2.mlp2_chunk_backward(*fa[:12], *grads, "gelu", True, True, prec))
        torch.cuda.synchronize()
        return out

    ref = run("tf32")
    mlp2._kernel_precision = lambda prec, bc, bh: prec  # bf16 everywhere, whatever the blocks
    row = {"chunk": C, "warps": warps, "write": write, "backward": backward}
    try:
        got = run("bf16")
    except Exception as e:  # noqa: BLE001 - the probe's finding
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.endswith("mlp2.py")]
        return {**row, "ran": False, "error": str(e)[:200],
                "at": f"mlp2.py:{frames[-1].lineno} ({frames[-1].name})" if frames else None}
    rel = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got, ref) if a.numel())
    return {**row, "ran": True, "max_rel_to_tf32": rel}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--configs", default="4:64/16,4:64/32,8:64/32,4:64/64",
                    help="WARPS:WRITE/BACKWARD, comma-separated")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one config
    args = ap.parse_args()
    if args.one:
        w, _, blocks = args.one.partition(":")
        write, _, backward = blocks.partition("/")
        print(json.dumps(one(int(w), int(write), int(backward), args.chunk)), flush=True)
        return
    rows = []
    for cfg in args.configs.split(","):
        env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
        p = subprocess.run([sys.executable, __file__, "--chunk", str(args.chunk), "--one", cfg],
                           check=False, capture_output=True, text=True, env=env, timeout=300)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"config": cfg, "ran": False,
                                                    "error": p.stderr.strip()[-300:]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"bf16_probe_{args.chunk}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
