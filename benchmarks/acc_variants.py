"""Forms of the wide memories' state update kernel, ``out = gam * c + sign * x^T y`` (float32
state, bf16 operands), timed side by side on one GPU: the pointer kernel of
``nlc.runtime.fused.accumulate`` against tensor-descriptor (TMA) kernels, one tile a program or
persistent (a program per SM slot walking the tiles), with and without the compiler's warp
specialization.

    python benchmarks/acc_variants.py [--N 8] [--L 512] [--M 4096] [--P 1024]

Default shapes: the CMS level of ``benchmarks/specs/cms_level.nl`` at period 512 (see
``wide_diag.py``). Each row: microseconds a call (median of 50), the product's TFLOP/s, the
largest error against a float32 reference relative to its largest value; a form that does not
compile prints its error instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    sys.exit("acc_variants.py needs Triton (and a CUDA GPU)")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the same timing as the kernel's other benchmark (this folder is on the path when run as a script)
from wide_diag import timed

from nlc.runtime.fused.accumulate import accumulate


@triton.jit
def _tma_kernel(x_desc, y_desc, c_ptr, gam_ptr, out_desc, op_desc, N, L, M, P, scn, scm, scp, sign,
                BM: tl.constexpr, BP: tl.constexpr, BL: tl.constexpr, PROGS: tl.constexpr,
                PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr, WS: tl.constexpr,
                TMA_OUT: tl.constexpr, out_ptr, op_ptr):  # fmt: skip
    tiles_m = M // BM
    tiles_p = P // BP
    per_n = tiles_m * tiles_p
    num_tiles = N * per_n
    k_tiles = L // BL
    step = PROGS if PERSISTENT else num_tiles  # one tile a program: a single pass of the loop
    for t in tl.range(tl.program_id(0), num_tiles, step, flatten=FLATTEN, warp_specialize=WS):
        n = t // per_n
        r = t % per_n
        pm = r // tiles_p
        pp = r % tiles_p
        acc = tl.zeros((BM, BP), dtype=tl.float32)
        for ki in range(k_tiles):
            xt = x_desc.load([n * L + ki * BL, pm * BM])
            yt = y_desc.load([n * L + ki * BL, pp * BP])
            acc = tl.dot(xt.T, yt, acc)
        rm = pm * BM + tl.arange(0, BM)
        rp = pp * BP + tl.arange(0, BP)
        cv = tl.load(c_ptr + n.to(tl.int64) * scn + rm[:, None] * scm + rp[None, :] * scp)
        cv = cv * tl.load(gam_ptr + n)
        acc = cv + sign * acc
        if TMA_OUT:
            out_desc.store([n * M + pm * BM, pp * BP], acc)
            op_desc.store([n * M + pm * BM, pp * BP], acc.to(tl.bfloat16))
        else:
            offs = n.to(tl.int64) * M * P + rm[:, None] * P + rp[None, :]
            tl.store(out_ptr + offs, acc)
            tl.store(op_ptr + offs, acc.to(tl.bfloat16))


def tma_accumulate(x, y, out, c, gam, sign, op, tile, persistent, flatten, ws, progs_per_sm=1, tma_out=True):
    BM, BP, BL, warps, stages = tile
    N, L, M = x.shape
    P = y.shape[-1]
    xd = TensorDescriptor(x, [N * L, M], [M, 1], [BL, BM])
    yd = TensorDescriptor(y, [N * L, P], [P, 1], [BL, BP])
    od = TensorDescriptor(out, [N * M, P], [P, 1], [BM, BP])
    opd = TensorDescriptor(op, [N * M, P], [P, 1], [BM, BP])
    tiles = N * (M // BM) * (P // BP)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    progs = min(tiles, sms * progs_per_sm) if persistent else tiles
    _tma_kernel[(progs,)](
        xd, yd, c, gam, od, opd, N, L, M, P, c.stride(0), c.stride(1), c.stride(2), float(sign),
        BM, BP, BL, progs, persistent, flatten, ws, tma_out, out, op, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def overlap(x, y, out, c, gam, op, rows):
    """The update kernel (``A``) and a chunk's read product (``B``: ``[C, D] x [D, H]``, bf16, as
    the next chunk's ``Z = K W1^T``) alone, one after the other, and launched on two streams at
    once: whether the kernel's memory-bound part leaves room for the product's compute."""
    N, L, M = x.shape
    kb = torch.randn(N, L, 1024, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(N, M, 1024, device="cuda", dtype=torch.bfloat16)
    zb = torch.empty(N, L, M, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()

    def a():
        accumulate(x, y, out, c=c, gam=gam, sign=-1.0, out_op=op)

    def b():
        torch.bmm(kb, wb.mT, out=zb)

    def both():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            a()
        b()
        torch.cuda.current_stream().wait_stream(side)

    def epilogue():  # cuBLAS adds the product to the float32 state in its epilogue (no decay), then the copy
        torch.baddbmm(out, x.mT, y, alpha=-1.0, out_dtype=torch.float32, out=out)
        op.copy_(out)

    for name, fn in (("update kernel alone", a), ("read product alone", b),
                     ("cublas baddbmm into the state", lambda: torch.baddbmm(out, x.mT, y, alpha=-1.0,
                                                                             out_dtype=torch.float32, out=out)),
                     ("cublas baddbmm into the state, then its bf16 copy", epilogue),
                     ("one after the other", lambda: (a(), b())), ("two streams at once", both),
                     ("two products after the other", lambda: (b(), b()))):  # fmt: skip
        r = {"row": name, "us": round(timed(fn), 1)}
        rows.append(r)
        print(json.dumps(r), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=8)
    ap.add_argument("--L", type=int, default=512)
    ap.add_argument("--M", type=int, default=4096)
    ap.add_argument("--P", type=int, default=1024)
    ap.add_argument("--overlap", action="store_true",
                    help="only the update kernel beside one of the chunk's products on a second stream")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("acc_variants.py needs a CUDA GPU")
    N, L, M, P = args.N, args.L, args.M, args.P
    x = torch.randn(N, L, M, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(N, L, P, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(N, M, P, device="cuda")
    gam = torch.rand(N, device="cuda")
    out = torch.empty(N, M, P, device="cuda")
    op = torch.empty(N, M, P, device="cuda", dtype=torch.bfloat16)
    ref = gam[:, None, None] * c - torch.bmm(x.mT.float(), y.float())
    flop = 2 * N * L * M * P
    rows = []

    def row(name, fn):
        try:
            out.zero_()
            fn()
            torch.cuda.synchronize()
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            us = timed(fn)
            r = {"row": name, "us": round(us, 1), "tflops": round(flop / us / 1e6, 1), "rel_err": err}
        except Exception as e:  # noqa: BLE001 - a form the compiler refuses: its error, and go on
            r = {"row": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(r)
        print(json.dumps(r), flush=True)

    row("cublas product alone", lambda: torch.bmm(x.mT, y, out_dtype=torch.float32, out=out))
    if args.overlap:
        overlap(x, y, out, c, gam, op, rows)
        return
    for tile in ("64:128:64:4:3", "128:256:64:8:3"):
        os.environ["NLC_WIDE_TILE"] = tile
        row(f"pointer kernel {tile}", lambda: accumulate(x, y, out, c=c, gam=gam, sign=-1.0, out_op=op))
    os.environ.pop("NLC_WIDE_TILE", None)
    forms = [  # (persistent, flatten, ws, programs per SM, TMA stores)
        (False, False, False, 1, True), (True, False, False, 1, True), (True, True, False, 1, True),
        (False, False, False, 1, False), (True, False, False, 1, False), (True, True, False, 1, False),
        (True, False, False, 2, False), (True, True, False, 2, False),
    ]
    tiles = [(128, 128, 64, 4, 4), (128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4),
             (64, 256, 64, 4, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 2), (64, 128, 64, 4, 3)]
    if os.environ.get("ACC_FULL_SWEEP"):
        forms += [(True, False, True, 1, True), (True, True, True, 1, True)]
    for tile in tiles:
        for pers, flat, ws, k, tma_out in forms:
            if not pers and (flat or ws or k > 1):
                continue
            name = (f"tma {':'.join(map(str, tile))} " + ("persistent x" + str(k) if pers else "one tile a program")
                    + (" flatten" if flat else "") + (" ws" if ws else "")
                    + (" tma stores" if tma_out else " pointer stores"))
            row(name, lambda t=tile, p=pers, f=flat, w=ws, k=k, o=tma_out: tma_accumulate(x, y, out, c, gam, -1.0, op, t, p, f, w, k, o))
    os.environ["NLC_WIDE_TILE"] = "64:128:64:4:3"
    row("pointer kernel 64:128:64:4:3, again", lambda: accumulate(x, y, out, c=c, gam=gam, sign=-1.0, out_op=op))
    os.environ.pop("NLC_WIDE_TILE", None)
    print(json.dumps({"card": torch.cuda.get_device_name(), "shape": [N, L, M, P]}))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"acc_variants_{N}_{L}_{M}_{P}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
