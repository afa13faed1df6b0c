"""The inverse of many small unit-lower-triangular matrices, one Triton program each.

``nlc.runtime.linear_chunks`` inverts ``I + K`` for every chunk of a delta-rule memory (``K``
strictly lower triangular, ``C x C``). cuBLAS's batched triangular solve against the identity
took 0.42 ms for 4,096 matrices of 64 x 64 on an H200 (``benchmarks/RESULTS.md``), as much as the
whole recurrence kernel. :func:`unit_lower_inverse` instead keeps one matrix's inverse in
program: its diagonal blocks of 16 x 16 by forward substitution, all at once,

    X_ii[r, :] = e_r - sum_{s < r} K_ii[r, s] X_ii[s, :],

then the blocks below the diagonal one diagonal after the other, ``X_ij = -X_ii sum_{j <= k < i}
K_ik X_kj``, in products of 16 x 16 blocks, all in IEEE float32 (no TF32). Only the strictly
lower part of ``K`` is read, as the solve does.

``applies`` says when it runs: Triton present, a CUDA tensor (or ``NLC_FUSED=interpret``),
``NLC_LINEAR_INVERSE`` not ``solve`` (the solve, for comparisons), float32, ``C`` a power of two
from 16 to 128. ``tests/runtime/test_delta_kernel.py`` checks it against the solve in float64.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from ._triton import tl, triton

__all__ = ["applies", "invert", "unit_lower_inverse"]


def applies(K: Tensor) -> bool:
    mode = os.environ.get("NLC_FUSED", "1")
    if triton is None or mode == "0" or os.environ.get("NLC_LINEAR_INVERSE", "kernel") == "solve":
        return False
    if not (K.is_cuda or mode == "interpret"):
        return False
    C = K.shape[-1]
    return K.dtype == torch.float32 and 16 <= C <= 128 and C & (C - 1) == 0 and K.numel() < 2**31


if triton is not None:

    @triton.jit
    def _inverse_kernel(K, X, C: tl.constexpr, B: tl.constexpr):
        m = tl.program_id(0).to(tl.int64)
        invert(K + m * C * C, X + m * C * C, C, B)

    @triton.jit
    def invert(Kb, Xb, C: tl.constexpr, B: tl.constexpr):
        """``Xb <- (I + tril(Kb, -1))^{-1}`` for one row-major ``[C, C]`` matrix at ``Kb`` (a
        different buffer from ``Xb``); ends with a barrier, so the program may read ``Xb`` back."""
        NB: tl.constexpr = C // B
        rb = tl.arange(0, B)
        blk = rb[:, None] * C + rb[None, :]  # one [B, B] block, from its corner
        # 1. the NB diagonal blocks at once ([NB, B, B]), each by forward substitution
        rn = tl.arange(0, NB)
        corner = rn * (B * C + B)
        diag = corner[:, None, None] + blk[None, :, :]
        Kd = tl.load(Kb + diag)
        rows = rb[None, :, None]
        inv = tl.where(rows == rb[None, None, :], 1.0, 0.0) + tl.zeros([NB, B, B], tl.float32)
        for i in range(1, B):
            row = tl.sum(tl.where(rows == i, Kd, 0.0), 1)  # [NB, B]: row i of each block
            row = tl.where(rb[None, :] < i, row, 0.0)
            new = tl.where(rb[None, :] == i, 1.0, 0.0) - tl.sum(row[:, :, None] * inv, 1)
            inv = tl.where(rows == i, new[:, None, :], inv)
        tl.store(Xb + diag, inv)
        # 2. the blocks above the diagonal are zero
        for bi in tl.static_range(NB):
            for bj in tl.static_range(bi + 1, NB):
                tl.store(Xb + bi * B * C + bj * B + blk, tl.zeros([B, B], tl.float32))
        tl.debug_barrier()
        # 3. below it, one diagonal after the other: X_ij = -X_ii sum_{j <= k < i} K_ik X_kj
        for d in tl.static_range(1, NB):
            for j in tl.static_range(NB - d):
                acc = tl.zeros([B, B], tl.float32)
                for k in tl.static_range(j, j + d):
                    Kik = tl.load(Kb + (j + d) * B * C + k * B + blk)
                    Xkj = tl.load(Xb + k * B * C + j * B + blk)
                    acc += tl.dot(Kik, Xkj, input_precision="ieee")
                Xii = tl.load(Xb + (j + d) * (B * C + B) + blk)
                tl.store(Xb + (j + d) * B * C + j * B + blk, -tl.dot(Xii, acc, input_precision="ieee"))
            tl.debug_barrier()


@torch.library.custom_op("nlc::unit_lower_inverse", mutates_args=())
def unit_lower_inverse(K: Tensor) -> Tensor:
    """``(I + tril(K, -1))^{-1}`` of every ``[C, C]`` matrix of ``K`` ``[..., C, C]`` (float32)."""
    C = K.shape[-1]
    flat = K.reshape(-1, C, C).contiguous()
    out = torch.empty_like(flat)
    if flat.shape[0]:
        with torch.cuda.device(K.device) if K.is_cuda else contextlib.nullcontext():
            _inverse_kernel[(flat.shape[0],)](flat, out, C, 16, num_warps=4)
    return out.view(K.shape)


@unit_lower_inverse.register_fake
def _(K):
    return K.new_empty(K.shape)
