"""The scalars of one chunk's update from its gates, as a Triton op with its own backward.

See ``chunk_coefficients`` for the formulas; ``nlc.runtime.chunk._Coeffs`` is the reference.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ._triton import tl, triton

__all__ = ["chunk_coefficients"]

if triton is not None:

    @triton.jit
    def _lin_combine(a1, b1, a2, b2):
        """Compose ``y -> a1 y + b1`` (first in scan order) with ``y -> a2 y + b2``."""
        return a1 * a2, b2 + a2 * b1

    @triton.jit
    def _shift(x, ri, BC: tl.constexpr, BY: tl.constexpr):
        """``y[:, i] = x[:, i - BY]`` (0 where ``i - BY`` is outside ``[0, BC)``), exactly."""
        rj = tl.arange(0, BC)
        hit = ri[None, :, None] == (rj[None, None, :] + BY)
        return tl.sum(tl.where(hit, x[:, None, :], 0.0), axis=2)

    @triton.jit
    def _coeffs_kernel(
        ETA, ALPHA, BETA, G_CW, G_CS, G_GAM, G_DD, G_BB,
        CW, CS, GAM, DD, BB, D_ETA, D_ALPHA, D_BETA,
        N, C,
        BN: tl.constexpr, BC: tl.constexpr, MOM: tl.constexpr, BWD: tl.constexpr,
    ):  # fmt: skip
        """Grid ``(cdiv(N, BN),)``: the chunk's coefficients from its gates (``BWD``: their
        gradients). Token ``i`` of ``0..C-1`` (see ``coefficients`` for the formulas)."""
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        ri = tl.arange(0, BC)
        mn = rn < N
        row = rn[:, None] * C
        m = mn[:, None] & (ri[None, :] < C)
        m1 = mn[:, None] & (ri[None, :] + 1 < C)
        eta = tl.load(ETA + row + ri[None, :], mask=m, other=0.0)
        a0 = tl.load(ALPHA + rn * C, mask=mn, other=1.0)  # alpha of token 0
        a_next = tl.load(ALPHA + row + ri[None, :] + 1, mask=m1, other=1.0)  # alpha_{i+1}
        asuf = tl.cumprod(a_next, axis=1, reverse=True)  # prod_{j > i} alpha_j
        gam = a0 * tl.sum(tl.where(ri[None, :] == 0, asuf, 0.0), axis=1)
        if MOM:
            b0 = tl.load(BETA + rn * C, mask=mn, other=1.0)
            b_next1 = tl.load(BETA + row + ri[None, :] + 1, mask=m1, other=1.0)
            b_next0 = tl.load(BETA + row + ri[None, :] + 1, mask=m1, other=0.0)
            msuf = tl.cumprod(b_next1, axis=1, reverse=True)  # prod_{j > i} beta_j
            # G_i = Asuf_i + beta_{i+1} G_{i+1}, G_{C-1} = 1
            _, g = tl.associative_scan((b_next0, asuf), 1, _lin_combine, reverse=True)
            g0 = tl.sum(tl.where(ri[None, :] == 0, g, 0.0), axis=1)
            m0 = tl.sum(tl.where(ri[None, :] == 0, msuf, 0.0), axis=1)
            cw_coef = g
        else:
            cw_coef = asuf
        if not BWD:
            tl.store(CW + row + ri[None, :], cw_coef * eta, mask=m)
            tl.store(GAM + rn, gam, mask=mn)
            if MOM:
                tl.store(CS + row + ri[None, :], msuf * eta, mask=m)
                tl.store(DD + rn, b0 * g0, mask=mn)
                tl.store(BB + rn, b0 * m0, mask=mn)
        else:
            gcw = tl.load(G_CW + row + ri[None, :], mask=m, other=0.0)
            ggam = tl.load(G_GAM + rn, mask=mn, other=0.0)
            first = ri[None, :] == 0
            a_here = tl.load(ALPHA + row + ri[None, :], mask=m, other=1.0)  # alpha_i
            deta = gcw * cw_coef
            if MOM:
                gcs = tl.load(G_CS + row + ri[None, :], mask=m, other=0.0)
                gdd = tl.load(G_DD + rn, mask=mn, other=0.0)
                gbb = tl.load(G_BB + rn, mask=mn, other=0.0)
                b_here = tl.load(BETA + row + ri[None, :], mask=m, other=1.0)  # beta_i
                deta += gcs * msuf
                # dd = beta_0 G_0, bb = beta_0 Msuf_0
                dbeta = tl.where(first, (gdd * g0 + gbb * m0)[:, None], 0.0)
                # through G: gGt_i = gG_i + beta_i gGt_{i-1} (a forward scan)
                gg = gcw * eta + tl.where(first, (gdd * b0)[:, None], 0.0)
                _, ggt = tl.associative_scan(
                    (tl.where(first, 0.0, b_here), gg), 1, _lin_combine
                )
                g_next = _shift(g, ri, BC, -1)  # G_{i+1}
                gasuf = ggt
                # through Msuf_i = prod_{j > i} beta_j: d/dbeta_{j+1} = Msuf_{j+1} R_j,
                # R_j = gMsuf_j + beta_j R_{j-1}
                gm = gcs * eta + tl.where(first, (gbb * b0)[:, None], 0.0)
                _, rm = tl.associative_scan((tl.where(first, 0.0, b_here), gm), 1, _lin_combine)
                dbeta += _shift(ggt * g_next + _shift(msuf, ri, BC, -1) * rm, ri, BC, 1)
                tl.store(D_BETA + row + ri[None, :], dbeta, mask=m)
            else:
                gasuf = gcw * eta
            # gam = alpha_0 Asuf_0; Asuf_i = prod_{j > i} alpha_j: d/dalpha_{j+1} = Asuf_{j+1} R_j
            gasuf += tl.where(first, (ggam * a0)[:, None], 0.0)
            _, ra = tl.associative_scan((tl.where(first, 0.0, a_here), gasuf), 1, _lin_combine)
            asuf0 = tl.sum(tl.where(first, asuf, 0.0), axis=1)
            dalpha = tl.where(first, (ggam * asuf0)[:, None], 0.0)
            dalpha += _shift(_shift(asuf, ri, BC, -1) * ra, ri, BC, 1)
            tl.store(D_ALPHA + row + ri[None, :], dalpha, mask=m)
            tl.store(D_ETA + row + ri[None, :], deta, mask=m)


def _coeff_blocks(C: int) -> tuple[int, int]:
    bc = max(16, triton.next_power_of_2(C))
    return max(1, min(16, 16384 // (bc * bc))), bc


@torch.library.custom_op("nlc::chunk_coefficients", mutates_args=())
def chunk_coefficients(
    eta: Tensor, alpha: Tensor, beta: Tensor, momentum: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The scalars of one chunk's update from its gates, ``[N, C]`` each (float32).

    With tokens ``i = 0..C-1``, ``Asuf_i = prod_{j > i} alpha_j`` and ``Msuf_i = prod_{j > i}
    beta_j``: ``gam = prod_j alpha_j``; ``gd``: ``cw_i = Asuf_i eta_i``; momentum:
    ``G_i = Asuf_i + beta_{i+1} G_{i+1}`` (``G_{C-1} = 1``), ``cw_i = G_i eta_i``,
    ``cs_i = Msuf_i eta_i``, ``dd = beta_0 G_0``, ``bb = prod_j beta_j``. These equal
    ``chunk._Coeffs``' ``G_end * eta``, ``mom_row * eta``, ``gam_end``, ``d_end`` and ``b_end``.
    Only products and sums (no division), so zero gates are exact in value and gradient.
    Returns ``(cw, cs, gam, dd, bb)``; without momentum ``cs, dd, bb`` are empty and ``beta`` is
    ignored.
    """
    N, C = eta.shape
    bn, bc = _coeff_blocks(C)
    eta, alpha = eta.contiguous(), alpha.contiguous()
    beta = beta.contiguous() if momentum else alpha
    cw, gam = torch.empty_like(eta), eta.new_empty(N)
    if momentum:
        cs, dd, bb = torch.empty_like(eta), eta.new_empty(N), eta.new_empty(N)
    else:
        cs, dd, bb = cw, gam, gam  # never written
    with torch.cuda.device(eta.device) if eta.is_cuda else contextlib.nullcontext():
        _coeffs_kernel[(triton.cdiv(N, bn),)](
            eta, alpha, beta, eta, eta, eta, eta, eta, cw, cs, gam, dd, bb, eta, eta, eta,
            N, C, bn, bc, momentum, False, num_warps=4,
        )  # fmt: skip
    if not momentum:
        cs, dd, bb = eta.new_empty(0), eta.new_empty(0), eta.new_empty(0)
    return cw, cs, gam, dd, bb


@chunk_coefficients.register_fake
def _(eta, alpha, beta, momentum):
    N, C = eta.shape
    if momentum:
        return (eta.new_empty(N, C), eta.new_empty(N, C), eta.new_empty(N), eta.new_empty(N),
                eta.new_empty(N))  # fmt: skip
    return eta.new_empty(N, C), eta.new_empty(0), eta.new_empty(N), eta.new_empty(0), \
        eta.new_empty(0)  # fmt: skip


@torch.library.custom_op("nlc::chunk_coefficients_backward", mutates_args=())
def chunk_coefficients_backward(
    eta: Tensor,
    alpha: Tensor,
    beta: Tensor,
    gcw: Tensor,
    gcs: Tensor,
    ggam: Tensor,
    gdd: Tensor,
    gbb: Tensor,
    momentum: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(eta, alpha, beta)`` of ``chunk_coefficients`` (``beta``'s empty without
    momentum): the reverse of its products and linear recurrences, as forward scans."""
    N, C = eta.shape
    bn, bc = _coeff_blocks(C)
    eta, alpha, gcw, ggam = (t.contiguous() for t in (eta, alpha, gcw, ggam))
    deta, dalpha = torch.empty_like(eta), torch.empty_like(eta)
    if momentum:
        beta, gcs, gdd, gbb = (t.contiguous() for t in (beta, gcs, gdd, gbb))
        dbeta = torch.empty_like(eta)
    else:
        beta, gcs, gdd, gbb, dbeta = alpha, gcw, ggam, ggam, deta  # never read or written
    with torch.cuda.device(eta.device) if eta.is_cuda else contextlib.nullcontext():
        _coeffs_kernel[(triton.cdiv(N, bn),)](
            eta, alpha, beta, gcw, gcs, ggam, gdd, gbb, eta, eta, eta, eta, eta,
            deta, dalpha, dbeta, N, C, bn, bc, momentum, True, num_warps=4,
        )  # fmt: skip
    if not momentum:
        dbeta = eta.new_empty(0)
    return deta, dalpha, dbeta


@chunk_coefficients_backward.register_fake
def _(eta, alpha, beta, gcw, gcs, ggam, gdd, gbb, momentum):
    return (eta.new_empty(eta.shape), eta.new_empty(eta.shape),
            eta.new_empty(eta.shape) if momentum else eta.new_empty(0))  # fmt: skip


def _coeff_setup(ctx, inputs, output):
    eta, alpha, beta, momentum = inputs
    ctx.save_for_backward(eta, alpha, beta)
    ctx.momentum = momentum


def _coeff_backward(ctx, gcw, gcs, ggam, gdd, gbb):
    eta, alpha, beta = ctx.saved_tensors
    mom = ctx.momentum
    gcw = torch.zeros_like(eta) if gcw is None else gcw
    ggam = eta.new_zeros(eta.shape[0]) if ggam is None else ggam
    if mom:
        gcs = torch.zeros_like(eta) if gcs is None else gcs
        gdd = eta.new_zeros(eta.shape[0]) if gdd is None else gdd
        gbb = eta.new_zeros(eta.shape[0]) if gbb is None else gbb
    else:
        gcs = gdd = gbb = eta.new_empty(0)
    deta, dalpha, dbeta = chunk_coefficients_backward(
        eta, alpha, beta, gcw, gcs, ggam, gdd, gbb, mom
    )
    return deta, dalpha, (dbeta if mom else None), None


chunk_coefficients.register_autograd(_coeff_backward, setup_context=_coeff_setup)
