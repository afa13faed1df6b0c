"""The wide MLP memories' state update on a GPU: ``out = gam * c + sign * x^T y`` (float32 state,
bf16 operands) by ``nlc.runtime.fused.accumulate``'s kernel and by cuBLAS plus elementwise work.

    python benchmarks/wide_diag.py [--N 8] [--L 512] [--M 4096] [--P 1024] [--tiles 128:128:64:8:3,...]

The default shapes are the CMS level of ``benchmarks/specs/cms_level.nl`` (d 1024, hidden 4096,
B 8, period 512): ``x`` ``[N, L, M]``, ``y`` ``[N, L, P]``, the state ``[N, M, P]``. Rows:

* ``cublas product``: ``torch.bmm(x^T, y)`` alone, float32 out (the products' floor);
* ``cublas + torch``: that product, then ``gam * c + sign * r`` and its bf16 copy in torch;
* ``kernel TILE``: the kernel at each tile (rows:columns:reduction:warps:stages), with the state
  and the copy (``full``), without them (``product only``), and with ``x`` stored transposed.

Each row: microseconds a call (median of 50), TFLOP/s of the product, GB/s of the state's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nlc.runtime.fused.accumulate import TILE, accumulate


def timed(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return sorted(ts)[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=8)
    ap.add_argument("--L", type=int, default=512)
    ap.add_argument("--M", type=int, default=4096)
    ap.add_argument("--P", type=int, default=1024)
    ap.add_argument("--tiles", default=":".join(map(str, TILE)) + ",64:128:64:4:3,128:128:64:8:4")
    args = ap.parse_args()
    N, L, M, P = args.N, args.L, args.M, args.P
    dev = "cuda"
    x = torch.randn(N, L, M, device=dev, dtype=torch.bfloat16)
    xt = x.mT.contiguous().mT  # the same values, stored [N, M, L]
    y = torch.randn(N, L, P, device=dev, dtype=torch.bfloat16)
    c = torch.randn(N, M, P, device=dev)
    gam = torch.rand(N, device=dev)
    out = torch.empty(N, M, P, device=dev)
    op = torch.empty(N, M, P, device=dev, dtype=torch.bfloat16)
    flop = 2 * N * L * M * P
    state_bytes = N * M * P * (4 + 4 + 2)  # read c, write out and its copy

    rows = []

    def row(name, us, nbytes=state_bytes):
        r = {"row": name, "us": round(us, 1), "tflops": round(flop / us / 1e6, 1),
             "state_gbs": round(nbytes / us / 1e3, 1)}
        rows.append(r)
        print(json.dumps(r), flush=True)

    row("cublas product (float32 out)", timed(lambda: torch.bmm(x.mT, y, out_dtype=torch.float32)), 0)

    def composite():
        r = torch.bmm(x.mT, y, out_dtype=torch.float32)
        out.copy_(gam[:, None, None] * c - r)
        op.copy_(out)

    row("cublas + torch", timed(composite))
    for tile in args.tiles.split(","):
        os.environ["NLC_WIDE_TILE"] = tile
        row(f"kernel {tile} full",
            timed(lambda: accumulate(x, y, out, c=c, gam=gam, sign=-1.0, out_op=op)))  # fmt: skip
        row(f"kernel {tile} product only", timed(lambda: accumulate(x, y, out)), N * M * P * 4)
        row(f"kernel {tile} full, x stored transposed",
            timed(lambda: accumulate(xt, y, out, c=c, gam=gam, sign=-1.0, out_op=op)))  # fmt: skip
    ref = gam[:, None, None] * c - torch.bmm(x.mT.float(), y.float())
    os.environ["NLC_WIDE_TILE"] = ":".join(map(str, TILE))
    accumulate(x, y, out, c=c, gam=gam, sign=-1.0, out_op=op)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(json.dumps({"card": torch.cuda.get_device_name(), "shape": [N, L, M, P], "check_rel_err": err}))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"wide_diag_{N}_{L}_{M}_{P}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
