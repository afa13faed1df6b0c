"""A batched product added to a float32 state in one pass: ``out = gam * c + sign * x^T y``.

The wide MLP memories' whole-sequence op (``nlc.runtime.wide_chunks``) keeps its state in
float32 and multiplies with its bf16 copy. Each chunk's update of a weight, and each chunk's
step of the state gradient backward, is a product of the chunk's tokens added to that state:

    W_{c+1}  = gam_c W_c  - (cw * U)^T A         (forward; ``[out, in]``, summed over C tokens)
    gW_c     = gam_c gW_{c+1} + X^T Y            (backward)

With cuBLAS and elementwise kernels that is three passes over the state: the product written
out, then read with the state and summed, then the sum converted to the next products' bf16
operand. :func:`accumulate` does it in one Triton kernel: each program loads its tile of ``c``
as the starting value of its tile of the product, accumulates the product onto it, and stores
the sum in float32 and, when asked, its operand copy. Elsewhere (the CPU, float64, no Triton)
the same values come from ``torch.bmm``. ``NLC_WIDE_UPDATE=cublas`` (CUDA, no decay) runs cuBLAS
with the state added in its epilogue, then the operand copy, instead: slower in the CMS level on
an H200 (13.0-13.2 against 12.3-12.4 ms a step), kept for that comparison.

Shapes: ``x`` ``[N, L, M]``, ``y`` ``[N, L, P]`` (the products' operands: bf16, or float32 for
TF32 / IEEE products); ``c`` ``[N, M, P]`` (any strides, e.g. a broadcast initial state) or
``None``; ``gam`` ``[N]`` or ``None`` (1); ``out`` ``[N, M, P]`` float32 (or float64 on the torch
path), contiguous; ``out_op`` ``[N, M, P]`` in the operand dtype or ``None``.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from ...diagnostics import SettingError
from ._triton import tl, triton

__all__ = ["accumulate", "product"]

# (rows, columns, reduction) of a program's tile, warps, pipeline stages: the fastest of the six
# tried on an H200 in the CMS level's first sweep (13.9 ms a step at period 512, 14.3-14.7 for
# the others); in a later run 128 x 256 x 64 at 8 warps was as fast (12.88 vs 12.92 ms).
# ``benchmarks/wide_diag.py`` times them alone.
# ``NLC_WIDE_TILE=rows,columns,reduction,warps,stages`` (or ``:``-separated) overrides it (tuning runs).
TILE = (64, 128, 64, 4, 3)


def _tile() -> tuple[int, ...]:
    raw = os.environ.get("NLC_WIDE_TILE", "").strip()
    if not raw:
        return TILE
    parts = raw.replace(":", ",").split(",")  # ":" also separates (inside other lists of settings)
    if len(parts) != 5 or not all(p.strip().isdigit() for p in parts):
        raise SettingError(
            f"NLC_WIDE_TILE: expected rows,columns,reduction,warps,stages (five integers); got {raw!r}"
        )
    vals = tuple(int(p) for p in parts)
    if any(v < 16 or v & (v - 1) for v in vals[:3]) or vals[3] not in (1, 2, 4, 8, 16) or not 1 <= vals[4] <= 8:
        raise SettingError(
            f"NLC_WIDE_TILE: tile sizes are powers of two >= 16, warps 1-16 (a power of two), "
            f"stages 1-8; got {raw!r}"
        )
    return vals


def _use_kernel(x: Tensor, out: Tensor) -> bool:
    mode = os.environ.get("NLC_FUSED", "1")
    if triton is None or mode == "0":
        return False
    if not (x.is_cuda or mode == "interpret"):
        return False
    return out.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float32)


def product(a: Tensor, b: Tensor, dtype: torch.dtype, out: Tensor | None = None, *, acc: Tensor | None = None,
            alpha: float = 1.0) -> Tensor:
    """``a @ b`` (batched) with its result in ``dtype``: operands already in ``dtype`` multiply as
    they are (bf16 ones accumulate in float32 in cuBLAS); bf16 operands on CUDA with a float32
    ``dtype`` give the float32 result straight from cuBLAS (``out_dtype``), not a rounded copy.

    ``acc`` (``dtype``): ``acc + alpha * a @ b`` instead, the sum in the product's epilogue on CUDA
    (``baddbmm``: no separate pass for the addition); ``out`` may be ``acc``."""
    if acc is not None:
        if a.is_cuda:
            kw = {} if a.dtype == dtype else {"out_dtype": dtype}
            if out is not None:
                return torch.baddbmm(acc, a, b, alpha=alpha, out=out, **kw)
            return torch.baddbmm(acc, a, b, alpha=alpha, **kw)
        r = product(a, b, dtype)
        r = acc + r if alpha == 1.0 else acc + alpha * r
        return out.copy_(r) if out is not None else r
    if a.dtype == dtype:
        return torch.bmm(a, b, out=out) if out is not None else torch.bmm(a, b)
    if a.is_cuda:
        if out is not None:
            return torch.bmm(a, b, out_dtype=dtype, out=out)
        return torch.bmm(a, b, out_dtype=dtype)
    r = torch.bmm(a.to(dtype), b.to(dtype))
    return out.copy_(r) if out is not None else r


def accumulate(x: Tensor, y: Tensor, out: Tensor, *, c: Tensor | None = None, gam: Tensor | None = None,
               sign: float = 1.0, out_op: Tensor | None = None, prec: str = "bf16",
               more: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``out = gam * c + sign * x^T y`` (``out_op``: the same in the operands' dtype), ``sign`` +1 or
    -1. Returns ``out``. ``more=(x2, y2)`` (``[N, L2, M]``, ``[N, L2, P]``) adds ``sign * x2^T y2``
    too, in the same pass (as if ``x, x2`` and ``y, y2`` were concatenated along ``L``).

    ``prec``: the products' precision for float32 operands (``tf32`` or ``ieee``; bf16 operands are
    bf16 products). ``out`` may be ``c`` itself (each tile is read before it is written)."""
    N, L, M = x.shape
    P = y.shape[-1]
    if sign not in (1.0, -1.0):
        raise ValueError(f"accumulate: sign must be +1 or -1, got {sign}")
    if x.is_cuda and gam is None and os.environ.get("NLC_WIDE_UPDATE", "kernel") == "cublas":
        # cuBLAS with the state added in its epilogue, then the operand copy: a comparison
        # (``benchmarks/acc_variants.py``) for updates without decay
        kw = {} if x.dtype == out.dtype else {"out_dtype": out.dtype}
        if c is None:
            torch.bmm(x.mT, y, out=out, **kw)
            if sign != 1.0:
                out.neg_()
        else:
            torch.baddbmm(torch.broadcast_to(c, (N, M, P)), x.mT, y, alpha=sign, out=out, **kw)
        if more is not None:
            torch.baddbmm(out, more[0].mT, more[1], alpha=sign, out=out, **kw)
        if out_op is not None:
            out_op.copy_(out)
        return out
    if _use_kernel(x, out):
        if c is not None:
            c = torch.broadcast_to(c, (N, M, P))
        cc = c if c is not None else out
        gg = gam if gam is not None else out
        o16 = out_op if out_op is not None else out
        BM, BP, BL, warps, stages = _tile()
        x2, y2 = more if more is not None else (x, y)
        L2 = x2.shape[1] if more is not None else 0
        grid = (triton.cdiv(M, BM), triton.cdiv(P, BP), N)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _acc_kernel[grid](
                x, y, x2, y2, cc, gg, out, o16, L, L2, M, P,
                x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
                x2.stride(0), x2.stride(1), x2.stride(2), y2.stride(0), y2.stride(1), y2.stride(2),
                cc.stride(0), cc.stride(1), cc.stride(2),
                float(sign), c is not None, gam is not None, out_op is not None,
                BM, BP, BL, "bf16" if x.dtype == torch.bfloat16 else prec, not x.is_cuda,
                M % BM == 0 and P % BP == 0 and L % BL == 0 and L2 % BL == 0,
                num_warps=warps, num_stages=stages,
            )  # fmt: skip
        return out
    if more is not None:
        x, y = torch.cat([x, more[0]], 1), torch.cat([y, more[1]], 1)
    r = product(x.mT, y, out.dtype)
    if sign != 1.0:
        r = r * sign
    if c is not None:
        r = r + (c if gam is None else gam[:, None, None].to(out.dtype) * c)
    out.copy_(r)
    if out_op is not None:
        out_op.copy_(r)
    return out


if triton is not None:

    @triton.jit
    def _tile_dot(xt, yt, acc, PREC: tl.constexpr, INTERPRETED: tl.constexpr):
        """``acc + xt^T yt`` with float32 accumulation."""
        if INTERPRETED:  # Triton's interpreter multiplies bf16 tiles wrongly: exact float32 products
            return tl.dot(tl.trans(xt.to(tl.float32)), yt.to(tl.float32), acc, input_precision="ieee")
        elif PREC == "bf16":
            return tl.dot(tl.trans(xt), yt, acc)
        else:
            return tl.dot(tl.trans(xt), yt, acc, input_precision=PREC)

    @triton.jit
    def _product_rows(xb, yb, sxl, syl, L: tl.constexpr, rl, mm, mp, acc, BL: tl.constexpr,
                      PREC: tl.constexpr, INTERPRETED: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
        """``acc + x^T y`` over the ``L`` rows of one pair, ``BL`` at a time (``xb``, ``yb``: the
        tile's columns in row 0; ``EVEN``: the tiles divide the shapes, no masks)."""
        for l0 in range(0, L, BL):
            if EVEN:
                xt = tl.load(xb + (l0 + rl)[:, None] * sxl)
                yt = tl.load(yb + (l0 + rl)[:, None] * syl)
            else:
                ml = (l0 + rl) < L
                xt = tl.load(xb + (l0 + rl)[:, None] * sxl, mask=ml[:, None] & mm[None, :], other=0.0)
                yt = tl.load(yb + (l0 + rl)[:, None] * syl, mask=ml[:, None] & mp[None, :], other=0.0)
            acc = _tile_dot(xt, yt, acc, PREC, INTERPRETED)
        return acc

    @triton.jit
    def _acc_kernel(
        x_ptr, y_ptr, x2_ptr, y2_ptr, c_ptr, gam_ptr, out_ptr, op_ptr, L: tl.constexpr, L2: tl.constexpr, M, P,
        sxn, sxl, sxm, syn, syl, syp, s2xn, s2xl, s2xm, s2yn, s2yl, s2yp, scn, scm, scp,
        sign, HAS_C: tl.constexpr, HAS_GAM: tl.constexpr, HAS_OP: tl.constexpr,
        BM: tl.constexpr, BP: tl.constexpr, BL: tl.constexpr, PREC: tl.constexpr,
        INTERPRETED: tl.constexpr, EVEN: tl.constexpr,
    ):  # fmt: skip
        """One ``[BM, BP]`` tile of ``out[n]``: the state's tile scaled, the product over ``L`` in
        steps of ``BL`` accumulated onto it, stored in float32 (and the operand dtype)."""
        pm = tl.program_id(0)
        pp = tl.program_id(1)
        n = tl.program_id(2).to(tl.int64)
        rm = pm * BM + tl.arange(0, BM)
        rp = pp * BP + tl.arange(0, BP)
        rl = tl.arange(0, BL)
        mm = rm < M
        mp = rp < P
        xb = x_ptr + n * sxn + rm[None, :] * sxm
        yb = y_ptr + n * syn + rp[None, :] * syp
        mask = mm[:, None] & mp[None, :]
        # the state's tile first, as the product's starting value (sign * gam * c; sign is +-1, so
        # sign * (that + x^T y) is the result): its load overlaps the product's first loads, and
        # the tile needs no registers of its own after the loop
        acc = tl.zeros((BM, BP), dtype=tl.float32)
        if HAS_C:
            if EVEN:
                cv = tl.load(c_ptr + n * scn + rm[:, None] * scm + rp[None, :] * scp)
            else:
                cv = tl.load(c_ptr + n * scn + rm[:, None] * scm + rp[None, :] * scp, mask=mask, other=0.0)
            if HAS_GAM:
                cv = cv * tl.load(gam_ptr + n)
            acc = cv * sign
        acc = _product_rows(xb, yb, sxl, syl, L, rl, mm, mp, acc, BL, PREC, INTERPRETED, EVEN)
        if L2 > 0:  # the second pair (``more``): the same loop over its L2 rows
            xb2 = x2_ptr + n * s2xn + rm[None, :] * s2xm
            yb2 = y2_ptr + n * s2yn + rp[None, :] * s2yp
            acc = _product_rows(xb2, yb2, s2xl, s2yl, L2, rl, mm, mp, acc, BL, PREC, INTERPRETED, EVEN)
        acc = acc * sign
        offs = n * M * P + rm[:, None] * P + rp[None, :]
        if EVEN:
            tl.store(out_ptr + offs, acc)
            if HAS_OP:
                tl.store(op_ptr + offs, acc.to(op_ptr.dtype.element_ty))
        else:
            tl.store(out_ptr + offs, acc, mask=mask)
            if HAS_OP:
                tl.store(op_ptr + offs, acc.to(op_ptr.dtype.element_ty), mask=mask)
