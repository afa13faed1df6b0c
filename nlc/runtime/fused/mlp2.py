"""One chunk of a depth-2 MLP memory as Triton kernels: read, update and their backward.

``mlp2_chunk`` takes the coefficients of ``coefficients.chunk_coefficients`` and returns their
gradients, so autograd reaches the gates. See ``nlc.runtime.fused`` for when it applies; the
backward's formulas are written out above ``_bwd_sums_kernel``.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from ...diagnostics import SettingError
from ._triton import tl, triton

__all__ = ["ACTS", "PRECISIONS", "WARPS", "mlp2_chunk", "precision"]

ACTS = {"gelu": 0, "silu": 1}

def _kernel_precision(prec: str, bc: int, bh: int) -> str:
    """``prec`` for a kernel on blocks of ``bc`` tokens and ``bh`` hidden units, except TF32
    (finer than bf16) for bf16 on blocks of 64 tokens with a hidden block under 64: there the
    bf16 write kernel hits an illegal memory access with Triton 3.6 on an H200 (hidden blocks of
    16 and 32), while hidden blocks of 64 ran and matched TF32 to bf16's rounding
    (``benchmarks/bf16_probe.py``; ``benchmarks/fused_diag.py --chunks 64 --blocks 32,64`` times them)."""
    return "tf32" if prec == "bf16" and bc >= 64 and bh < 64 else prec


def _blocks(C: int, hidden: int, kind: str = "backward", prec: str = "tf32") -> tuple[int, int, int]:
    """(token block, hidden block of the per-block kernels of ``kind`` (``write`` or
    ``backward``) for operands in ``prec``, hidden step of the read loop)."""
    bc = max(16, triton.next_power_of_2(C))
    want = _block_table(bc, prec)[kind]
    bh = want if hidden % want == 0 else (32 if hidden % 32 == 0 else 16)
    br = 64 if hidden % 64 == 0 else (32 if hidden % 32 == 0 else 16)
    return bc, bh, br


def _block_table(bc: int, prec: str) -> dict:
    """``BLOCKS_SMALL`` for blocks of 16 tokens, ``BLOCKS_BF16_64`` for bf16 on blocks of 64 (the
    only hidden blocks whose bf16 kernels run there, ``_kernel_precision``), else ``BLOCKS``."""
    if bc <= 16:
        return BLOCKS_SMALL
    return BLOCKS_BF16_64 if bc >= 64 and prec == "bf16" else BLOCKS


PRECISIONS = ("bf16", "tf32", "ieee")


def _tuning(name: str, defaults: dict, allowed: tuple[int, ...]) -> dict:
    """``defaults``, updated from ``$name`` (``key=int,...``, each value one of ``allowed``): a
    knob for tuning runs (``benchmarks/fused_diag.py`` sweeps the values;
    ``benchmarks/level_diag.py`` times a level with them)."""
    out = dict(defaults)
    form = ",".join(f"{k}=N" for k in defaults)
    for item in filter(None, os.environ.get(name, "").split(",")):
        key, _, value = (p.strip() for p in item.partition("="))
        if key not in out or not value.isdigit() or int(value) not in allowed:
            raise SettingError(
                f"{name}: expected {form} with N one of {', '.join(map(str, allowed))}; got "
                f"{item!r} (unset it for the defaults)"
            )
        out[key] = int(value)
    return out


# Warps per program of each kernel (the backward's finish kernel uses "read") and hidden units
# per program of the write kernel and of the backward's per-block kernels (16, 32 or 64; a hidden
# width they do not divide falls back to 32 or 16): for chunks of 16 tokens or fewer, and for
# larger ones (and bf16 on blocks of 64 tokens, where only hidden blocks of 64 run). The values
# are the fastest of benchmarks/fused_diag.py's sweep on an H200 (benchmarks/RESULTS.md); the
# environment variables override every set.
_W, _B = (1, 2, 4, 8, 16), (16, 32, 64)
WARPS_SMALL = _tuning("NLC_FUSED_WARPS", {"read": 8, "write": 4, "sums": 2, "weights": 4}, _W)
WARPS = _tuning("NLC_FUSED_WARPS", {"read": 4, "write": 4, "sums": 4, "weights": 4}, _W)
BLOCKS_SMALL = _tuning("NLC_FUSED_BLOCKS", {"write": 64, "backward": 32}, _B)
BLOCKS = _tuning("NLC_FUSED_BLOCKS", {"write": 32, "backward": 32}, _B)
BLOCKS_BF16_64 = _tuning("NLC_FUSED_BLOCKS", {"write": 64, "backward": 64}, _B)


def _read_mode() -> int:
    """How the read kernel forms a chunk's errors and reads: 2, in two programs per memory (the
    default); 1, in one (``NLC_FUSED_READ_SPLIT=0``, for comparisons)."""
    return 1 if os.environ.get("NLC_FUSED_READ_SPLIT", "1") == "0" else 2


def _warps(bc: int) -> dict:
    return WARPS_SMALL if bc <= 16 else WARPS


def precision(device_type: str) -> str:
    """The operand precision of the kernels' products, as the unfused path would have them.

    Under bf16 autocast ``chunk_step``'s products run with bf16 operands (float32 state and
    accumulation): ``bf16``. Otherwise TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is
    on, else IEEE float32.
    """
    if (
        torch.is_autocast_enabled(device_type)
        and torch.get_autocast_dtype(device_type) == torch.bfloat16
    ):
        return "bf16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


if triton is not None:

    @triton.jit
    def _dot(a, b, PREC: tl.constexpr):
        """``a @ b`` with float32 accumulation; operands in bf16, TF32 or IEEE float32."""
        if PREC == "bf16":
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            return tl.dot(a, b, input_precision=PREC)

    @triton.jit
    def _op(x, PREC: tl.constexpr):
        """``x`` as a product's operand: bf16 for ``PREC`` bf16 (what ``_dot`` would round it
        to anyway), else unchanged."""
        if PREC == "bf16":
            return x.to(tl.bfloat16)
        else:
            return x

    @triton.jit
    def _act(z, ACT: tl.constexpr):
        """``(act(z), act'(z), act''(z))`` for gelu (erf) or silu."""
        if ACT == 0:
            cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
            pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
            return z * cdf, cdf + z * pdf, pdf * (2.0 - z * z)
        else:
            s = tl.sigmoid(z)
            return (
                z * s,
                s * (1.0 + z * (1.0 - s)),
                s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s)),
            )

    @triton.jit
    def _read_kernel(
        K, V, Q, W1, W2, YQ, E,
        C,
        HD: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr,
        ACT: tl.constexpr, RES: tl.constexpr, READ: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """The memory at ``W_0`` on the keys (the error ``E = M(K) - V``) and on the queries (the
        read ``Yq``), summed over blocks of the hidden width. ``READ``: 0, grid ``(N,)``: ``E``
        only; 1, grid ``(N,)``: both in one program; 2, grid ``(N, 2)``: program ``(n, 0)``
        gives ``E``, ``(n, 1)`` ``Yq`` (half the work each: a chunk's 64 memories fill half an
        H200's SMs, so the two halves run side by side)."""
        n = tl.program_id(0)
        rc = tl.arange(0, BC)
        rd = tl.arange(0, D)
        rh = tl.arange(0, BH)
        m2 = (rc < C)[:, None]
        tok = n * C * D + rc[:, None] * D + rd[None, :]
        queries = False
        if READ == 2:
            queries = tl.program_id(1) == 1
        if queries:
            k = tl.load(Q + tok, mask=m2, other=0.0)
        else:
            k = tl.load(K + tok, mask=m2, other=0.0)
        if READ == 1:
            q = tl.load(Q + tok, mask=m2, other=0.0)
        if RES:
            y = k
        else:
            y = tl.zeros([BC, D], dtype=tl.float32)
        if READ == 1:
            if RES:
                yq = q
            else:
                yq = tl.zeros([BC, D], dtype=tl.float32)
        for j in range(0, HD, BH):
            w1 = tl.load(W1 + n * HD * D + (j + rh)[:, None] * D + rd[None, :])  # W1[j:j+BH, :]
            w2 = tl.load(W2 + n * D * HD + rd[:, None] * HD + (j + rh)[None, :])  # W2[:, j:j+BH]
            h, _, _ = _act(_dot(k, tl.trans(w1), PREC), ACT)
            y += _dot(h, tl.trans(w2), PREC)
            if READ == 1:
                hq, _, _ = _act(_dot(q, tl.trans(w1), PREC), ACT)
                yq += _dot(hq, tl.trans(w2), PREC)
        if queries:
            tl.store(YQ + tok, y, mask=m2)
        else:
            v = tl.load(V + tok, mask=m2, other=0.0)
            tl.store(E + tok, tl.where(m2, y - v, 0.0), mask=m2)
            if READ == 1:
                tl.store(YQ + tok, yq, mask=m2)

    @triton.jit
    def _write_kernel(
        K, E, W1, W2, S1, S2, CW, CS, GAM, DD, BB, W1E, W2E, S1E, S2E,
        C,
        HD: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr,
        ACT: tl.constexpr, MOM: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """Grid ``(N, hidden / BH)``: the chunk-end weights (and momentum) of one block of the
        hidden width: ``W1e = gam W1 + dd S1 - (cw*Dl)^T K``, ``W2e = gam W2 + dd S2 - (cw*E)^T H``,
        ``S1e = bb S1 - (cs*Dl)^T K``, ``S2e = bb S2 - (cs*E)^T H`` with ``H = act(K W1^T)`` and
        ``Dl = (E W2) * act'(K W1^T)``."""
        n = tl.program_id(0)
        j = tl.program_id(1) * BH
        rc = tl.arange(0, BC)
        rd = tl.arange(0, D)
        rh = tl.arange(0, BH)
        mc = rc < C
        m2 = mc[:, None]
        tok = n * C * D + rc[:, None] * D + rd[None, :]
        p1 = n * HD * D + (j + rh)[:, None] * D + rd[None, :]
        p2 = n * D * HD + rd[:, None] * HD + (j + rh)[None, :]
        # The first layer's end state, then the second's (fewer live tiles: the kernel spills
        # otherwise): a layer's float32 tiles give their own terms first; W1, W2 and K are
        # otherwise only products' operands, held in the operand precision (``_op``; W2 is
        # loaded once as an operand and once in float32).
        cw = tl.load(CW + n * C + rc, mask=mc, other=0.0)
        gam = tl.load(GAM + n)
        if MOM:
            cs = tl.load(CS + n * C + rc, mask=mc, other=0.0)
            dd = tl.load(DD + n)
            bb = tl.load(BB + n)
        w1 = tl.load(W1 + p1)
        w1e = gam * w1
        if MOM:
            s1 = tl.load(S1 + p1)
            w1e += dd * s1
            s1e = bb * s1
        k = _op(tl.load(K + tok, mask=m2, other=0.0), PREC)
        h, d1, _ = _act(_dot(k, tl.trans(_op(w1, PREC)), PREC), ACT)
        h = _op(h, PREC)
        e = tl.load(E + tok, mask=m2, other=0.0)
        dl = _dot(e, _op(tl.load(W2 + p2), PREC), PREC) * d1
        w1e -= _dot(tl.trans(dl * cw[:, None]), k, PREC)
        tl.store(W1E + p1, w1e)
        if MOM:
            s1e -= _dot(tl.trans(dl * cs[:, None]), k, PREC)
            tl.store(S1E + p1, s1e)
        w2e = gam * tl.load(W2 + p2)
        if MOM:
            s2 = tl.load(S2 + p2)
            w2e += dd * s2
            s2e = bb * s2 - _dot(tl.trans(e * cs[:, None]), h, PREC)
            tl.store(S2E + p2, s2e)
        w2e -= _dot(tl.trans(e * cw[:, None]), h, PREC)
        tl.store(W2E + p2, w2e)

    # The backward. G* are the incoming gradients of W1e, W2e, S1e, S2e, gYq that of Yq.
    # Through the writes: gDl = -(cw * K GW1^T + cs * K GS1^T), gH_w = -(cw * E GW2 + cs * E GS2),
    # gE_w = -(cw * H GW2^T + cs * H GS2^T), gK_w = -((cw*Dl) GW1 + (cs*Dl) GS1),
    # gcw = -rowsum(Dl * K GW1^T) - rowsum(E * H GW2^T) (gcs the same with GS1, GS2).
    # Through Dl = P * act'(Z), P = E W2: gP = gDl * act'(Z), gZ_dl = gDl * P * act''(Z),
    # gE_p = gP W2^T, gW2_p = E^T gP. Through E = H W2^T (+ K) - V, with gE the sum of the two:
    # gH = gH_w + gE W2, gW2_e = gE^T H, gK += gE (residual), gV = -gE. Through H = act(Z),
    # Z = K W1^T: gZ = gZ_dl + gH * act'(Z), gW1 = gZ^T K, gK += gZ W1. The read at W_0 adds
    # the plain MLP backward of gYq. And gW1 += gam GW1, gS1 = dd GW1 + bb GS1 (also for W2).

    @triton.jit
    def _bwd_sums_kernel(
        K, E, W1, W2, GW1, GW2, GS1, GS2, CW, CS, GE_P, GK_P, GCW_P, GCS_P,
        C,
        HD: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr,
        ACT: tl.constexpr, MOM: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """Grid ``(N, hidden / BH)``: one block's part of the sums over the hidden width,
        ``gE = gE_w + gE_p``, ``gK_w``, ``gcw`` and ``gcs``, each stored at ``[n, block]``."""
        n = tl.program_id(0)
        jb = tl.program_id(1)
        j = jb * BH
        NJ: tl.constexpr = HD // BH
        rc = tl.arange(0, BC)
        rd = tl.arange(0, D)
        rh = tl.arange(0, BH)
        mc = rc < C
        m2 = mc[:, None]
        tok = n * C * D + rc[:, None] * D + rd[None, :]
        part = (n * NJ + jb) * C * D + rc[:, None] * D + rd[None, :]
        p1 = n * HD * D + (j + rh)[:, None] * D + rd[None, :]
        p2 = n * D * HD + rd[:, None] * HD + (j + rh)[None, :]
        # every weight tile and K are only products' operands here (``_op``); E also enters
        # the gates' sums, in float32. The first layer's terms come first, then the second's,
        # each tile loaded where first used (fewer live tiles: the kernel spills otherwise).
        k = _op(tl.load(K + tok, mask=m2, other=0.0), PREC)
        cw = tl.load(CW + n * C + rc, mask=mc, other=0.0)
        h, d1, _ = _act(_dot(k, tl.trans(_op(tl.load(W1 + p1), PREC)), PREC), ACT)
        h = _op(h, PREC)
        gw1 = _op(tl.load(GW1 + p1), PREC)
        kg1 = _dot(k, tl.trans(gw1), PREC)
        gdl = -cw[:, None] * kg1
        if MOM:
            cs = tl.load(CS + n * C + rc, mask=mc, other=0.0)
            gs1 = _op(tl.load(GS1 + p1), PREC)
            ks1 = _dot(k, tl.trans(gs1), PREC)
            gdl -= cs[:, None] * ks1
        e = tl.load(E + tok, mask=m2, other=0.0)
        w2 = _op(tl.load(W2 + p2), PREC)
        dl = _dot(e, w2, PREC) * d1
        gcw = -tl.sum(dl * kg1, axis=1)
        gk = -_dot(dl * cw[:, None], gw1, PREC)
        if MOM:
            gcs = -tl.sum(dl * ks1, axis=1)
            gk -= _dot(dl * cs[:, None], gs1, PREC)
        tl.store(GK_P + part, gk, mask=m2)
        ge = _dot(gdl * d1, tl.trans(w2), PREC)
        hg2 = _dot(h, tl.trans(_op(tl.load(GW2 + p2), PREC)), PREC)
        gcw -= tl.sum(e * hg2, axis=1)
        ge -= cw[:, None] * hg2
        if MOM:
            hs2 = _dot(h, tl.trans(_op(tl.load(GS2 + p2), PREC)), PREC)
            gcs -= tl.sum(e * hs2, axis=1)
            ge -= cs[:, None] * hs2
            tl.store(GCS_P + (n * NJ + jb) * C + rc, gcs, mask=mc)
        tl.store(GE_P + part, tl.where(m2, ge, 0.0), mask=m2)
        tl.store(GCW_P + (n * NJ + jb) * C + rc, gcw, mask=mc)

    @triton.jit
    def _bwd_weights_kernel(
        K, Q, E, GE_P, GYQ, W1, W2, GW1, GW2, GS1, GS2, S1, S2, CW, CS, GAM, DD, BB,
        DW1, DW2, DS1, DS2, GK_P, GQ_P, SC_P,
        C,
        HD: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr,
        ACT: tl.constexpr, MOM: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """Grid ``(N, hidden / BH)``: one block's weight gradients (complete), its parts of
        ``gK`` (``gZ W1``) and ``gQ`` (the read's ``gZq W1``), and of the gradients of ``gam``,
        ``dd``, ``bb`` (``<GW, W>``, ``<GW, S>``, ``<GS, S>`` over the block), stored at
        ``[n, block]``. ``gE`` is the sum of ``_bwd_sums_kernel``'s parts."""
        n = tl.program_id(0)
        jb = tl.program_id(1)
        j = jb * BH
        NJ: tl.constexpr = HD // BH
        rc = tl.arange(0, BC)
        rd = tl.arange(0, D)
        rh = tl.arange(0, BH)
        mc = rc < C
        m2 = mc[:, None]
        tok = n * C * D + rc[:, None] * D + rd[None, :]
        part = (n * NJ + jb) * C * D + rc[:, None] * D + rd[None, :]
        p1 = n * HD * D + (j + rh)[:, None] * D + rd[None, :]
        p2 = n * D * HD + rd[:, None] * HD + (j + rh)[None, :]
        # The float32 weight tiles first serve what needs them in float32 (the gates' parts, dS,
        # the accumulators' start gam GW); after that every tile this program holds is only a
        # product's operand, kept in the operand precision (``_op``: half the registers in bf16,
        # where the kernel would otherwise spill).
        cw = tl.load(CW + n * C + rc, mask=mc, other=0.0)
        gam = tl.load(GAM + n)
        w1 = tl.load(W1 + p1)
        w2 = tl.load(W2 + p2)
        gw1 = tl.load(GW1 + p1)
        gw2 = tl.load(GW2 + p2)
        sc = (n * NJ + jb) * 3
        tl.store(SC_P + sc, tl.sum(tl.sum(gw1 * w1, 1), 0) + tl.sum(tl.sum(gw2 * w2, 1), 0))
        dw1 = gam * gw1
        dw2 = gam * gw2
        if MOM:
            cs = tl.load(CS + n * C + rc, mask=mc, other=0.0)
            dd = tl.load(DD + n)
            bb = tl.load(BB + n)
            gs1 = tl.load(GS1 + p1)
            gs2 = tl.load(GS2 + p2)
            tl.store(DS1 + p1, dd * gw1 + bb * gs1)
            tl.store(DS2 + p2, dd * gw2 + bb * gs2)
            s1 = tl.load(S1 + p1)
            s2 = tl.load(S2 + p2)
            tl.store(SC_P + sc + 1, tl.sum(tl.sum(gw1 * s1, 1), 0) + tl.sum(tl.sum(gw2 * s2, 1), 0))
            tl.store(SC_P + sc + 2, tl.sum(tl.sum(gs1 * s1, 1), 0) + tl.sum(tl.sum(gs2 * s2, 1), 0))
            gs1 = _op(gs1, PREC)
            gs2 = _op(gs2, PREC)
        w1 = _op(w1, PREC)
        w2 = _op(w2, PREC)
        gw1 = _op(gw1, PREC)
        gw2 = _op(gw2, PREC)
        k = _op(tl.load(K + tok, mask=m2, other=0.0), PREC)
        e = _op(tl.load(E + tok, mask=m2, other=0.0), PREC)
        ge = tl.zeros([BC, D], dtype=tl.float32)
        for i in range(NJ):
            ge += tl.load(GE_P + (n * NJ + i) * C * D + rc[:, None] * D + rd[None, :], mask=m2,
                          other=0.0)  # fmt: skip
        ge = _op(ge, PREC)
        # the intermediates too are converted once where they only feed products, and each is
        # used as soon as it exists
        h, d1, d2 = _act(_dot(k, tl.trans(w1), PREC), ACT)
        dw2 += _dot(tl.trans(ge), _op(h, PREC), PREC)
        gdl = -cw[:, None] * _dot(k, tl.trans(gw1), PREC)
        if MOM:
            gdl -= cs[:, None] * _dot(k, tl.trans(gs1), PREC)
        dw2 += _dot(tl.trans(e), _op(gdl * d1, PREC), PREC)
        gh = _dot(ge, w2, PREC) - cw[:, None] * _dot(e, gw2, PREC)
        if MOM:
            gh -= cs[:, None] * _dot(e, gs2, PREC)
        gz = _op(gdl * _dot(e, w2, PREC) * d2 + gh * d1, PREC)
        dw1 += _dot(tl.trans(gz), k, PREC)
        tl.store(GK_P + part, _dot(gz, w1, PREC), mask=m2)
        # the read at W_0
        q = _op(tl.load(Q + tok, mask=m2, other=0.0), PREC)
        gyq = _op(tl.load(GYQ + tok, mask=m2, other=0.0), PREC)
        hq, dq1, _ = _act(_dot(q, tl.trans(w1), PREC), ACT)
        dw2 += _dot(tl.trans(gyq), _op(hq, PREC), PREC)
        tl.store(DW2 + p2, dw2)
        gzq = _op(_dot(gyq, w2, PREC) * dq1, PREC)
        dw1 += _dot(tl.trans(gzq), q, PREC)
        tl.store(DW1 + p1, dw1)
        tl.store(GQ_P + part, _dot(gzq, w1, PREC), mask=m2)

    @triton.jit
    def _bwd_finish_kernel(
        GE_P, GK_P, GK2_P, GQ_P, GCW_P, GCS_P, SC_P, GYQ,
        DK, DV, DQ, DCW, DCS, DGAM, DDD, DBB,
        C,
        NJ: tl.constexpr, D: tl.constexpr, BC: tl.constexpr,
        RES: tl.constexpr, MOM: tl.constexpr,
    ):  # fmt: skip
        """Grid ``(N,)``: the sums of the blocks' parts: ``gK``, ``gV = -gE``, ``gQ``, ``gcw``,
        ``gcs`` and the gradients of ``gam``, ``dd``, ``bb``."""
        n = tl.program_id(0)
        rc = tl.arange(0, BC)
        rd = tl.arange(0, D)
        mc = rc < C
        m2 = mc[:, None]
        tok = n * C * D + rc[:, None] * D + rd[None, :]
        ge = tl.zeros([BC, D], dtype=tl.float32)
        gk = tl.zeros([BC, D], dtype=tl.float32)
        gq = tl.zeros([BC, D], dtype=tl.float32)
        gcw = tl.zeros([BC], dtype=tl.float32)
        gcs = tl.zeros([BC], dtype=tl.float32)
        r3 = tl.arange(0, 4)
        sc = tl.zeros([4], dtype=tl.float32)
        for i in range(NJ):
            part = (n * NJ + i) * C * D + rc[:, None] * D + rd[None, :]
            ge += tl.load(GE_P + part, mask=m2, other=0.0)
            gk += tl.load(GK_P + part, mask=m2, other=0.0) + tl.load(GK2_P + part, mask=m2,
                                                                     other=0.0)  # fmt: skip
            gq += tl.load(GQ_P + part, mask=m2, other=0.0)
            gcw += tl.load(GCW_P + (n * NJ + i) * C + rc, mask=mc, other=0.0)
            if MOM:
                gcs += tl.load(GCS_P + (n * NJ + i) * C + rc, mask=mc, other=0.0)
                sc += tl.load(SC_P + (n * NJ + i) * 3 + r3, mask=r3 < 3, other=0.0)
            else:
                sc += tl.load(SC_P + (n * NJ + i) * 3 + r3, mask=r3 < 1, other=0.0)
        if RES:
            gk += ge
            gq += tl.load(GYQ + tok, mask=m2, other=0.0)
        tl.store(DK + tok, gk, mask=m2)
        tl.store(DV + tok, -ge, mask=m2)
        tl.store(DQ + tok, gq, mask=m2)
        tl.store(DCW + n * C + rc, gcw, mask=mc)
        if MOM:
            tl.store(DCS + n * C + rc, gcs, mask=mc)
        tl.store(DGAM + n, tl.sum(tl.where(r3 == 0, sc, 0.0), 0))
        if MOM:
            tl.store(DDD + n, tl.sum(tl.where(r3 == 1, sc, 0.0), 0))
            tl.store(DBB + n, tl.sum(tl.where(r3 == 2, sc, 0.0), 0))


@torch.library.custom_op("nlc::mlp2_chunk", mutates_args=())
def mlp2_chunk(
    k: Tensor,
    v: Tensor,
    q: Tensor,
    w1: Tensor,
    w2: Tensor,
    s1: Tensor,
    s2: Tensor,
    cw: Tensor,
    cs: Tensor,
    gam: Tensor,
    dd: Tensor,
    bb: Tensor,
    act: str,
    residual: bool,
    momentum: bool,
    prec: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One chunk of ``N`` depth-2 MLP memories.

    k, v, q ``[N, C, D]``; w1, s1 ``[N, hidden, D]``; w2, s2 ``[N, D, hidden]``; cw, cs ``[N, C]``;
    gam, dd, bb ``[N]``. Without momentum, s1, s2, cs, dd and bb are ignored (pass anything).
    Returns ``(yq [N, C, D], w1_end, w2_end, s1_end, s2_end)``; the momentum outputs are empty
    ``[0]`` tensors without momentum. All float32.
    """
    N, C, D = k.shape
    HD = w1.shape[-2]
    bc, bh, br = _blocks(C, HD, "write", prec)
    prec_r, prec_w = _kernel_precision(prec, bc, br), _kernel_precision(prec, bc, bh)
    k, v, q, w1, w2, cw, gam = (t.contiguous() for t in (k, v, q, w1, w2, cw, gam))
    yq, e = torch.empty_like(k), torch.empty_like(k)
    w1e, w2e = torch.empty_like(w1), torch.empty_like(w2)
    if momentum:
        s1, s2, cs, dd, bb = (t.contiguous() for t in (s1, s2, cs, dd, bb))
        s1e, s2e = torch.empty_like(s1), torch.empty_like(s2)
    else:
        s1, s2, s1e, s2e = w1, w2, w1e, w2e  # never read or written (MOM off)
        cs = dd = bb = gam
    with torch.cuda.device(k.device) if k.is_cuda else contextlib.nullcontext():
        mode = _read_mode()
        _read_kernel[(N, 2 if mode == 2 else 1)](
            k, v, q, w1, w2, yq, e, C, HD, D, bc, br, ACTS[act], residual, mode, prec_r,
            num_warps=_warps(bc)["read"],
        )  # fmt: skip
        _write_kernel[(N, HD // bh)](
            k, e, w1, w2, s1, s2, cw, cs, gam, dd, bb, w1e, w2e, s1e, s2e,
            C, HD, D, bc, bh, ACTS[act], momentum, prec_w, num_warps=_warps(bc)["write"],
        )  # fmt: skip
    if not momentum:
        s1e, s2e = k.new_empty(0), k.new_empty(0)
    return yq, w1e, w2e, s1e, s2e


@mlp2_chunk.register_fake
def _(k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb, act, residual, momentum, prec):
    # contiguous, like the real outputs (empty_like would keep an input's strides)
    def new(t):
        return t.new_empty(t.shape)

    if momentum:
        s1e, s2e = new(w1), new(w2)
    else:
        s1e, s2e = k.new_empty(0), k.new_empty(0)
    return new(k), new(w1), new(w2), s1e, s2e


@torch.library.custom_op("nlc::mlp2_chunk_backward", mutates_args=())
def mlp2_chunk_backward(
    k: Tensor,
    v: Tensor,
    q: Tensor,
    w1: Tensor,
    w2: Tensor,
    s1: Tensor,
    s2: Tensor,
    cw: Tensor,
    cs: Tensor,
    gam: Tensor,
    dd: Tensor,
    bb: Tensor,
    gyq: Tensor,
    gw1: Tensor,
    gw2: Tensor,
    gs1: Tensor,
    gs2: Tensor,
    act: str,
    residual: bool,
    momentum: bool,
    prec: str,
) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor
]:
    """Gradients ``(k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb)`` of ``mlp2_chunk`` (see its
    shapes; those of the momentum inputs are empty ``[0]`` tensors without momentum).

    Four kernels: ``_read_kernel`` (``E`` again), ``_bwd_sums_kernel``, ``_bwd_weights_kernel``
    and ``_bwd_finish_kernel`` (the sums over the blocks of the hidden width).
    """
    N, C, D = k.shape
    HD = w1.shape[-2]
    bc, bh, br = _blocks(C, HD, "backward", prec)
    prec_r, prec = _kernel_precision(prec, bc, br), _kernel_precision(prec, bc, bh)
    nj = HD // bh
    k, v, q, w1, w2, cw, gam, gyq, gw1, gw2 = (
        t.contiguous() for t in (k, v, q, w1, w2, cw, gam, gyq, gw1, gw2)
    )
    e = torch.empty_like(k)
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
    ge_p = k.new_empty(N, nj, C, D)
    gk_p = k.new_empty(N, nj, C, D)
    gk2_p = k.new_empty(N, nj, C, D)
    gq_p = k.new_empty(N, nj, C, D)
    gcw_p = k.new_empty(N, nj, C)
    if momentum:
        s1, s2, cs, dd, bb, gs1, gs2 = (
            t.contiguous() for t in (s1, s2, cs, dd, bb, gs1, gs2)
        )
        ds1, ds2 = torch.empty_like(w1), torch.empty_like(w2)
        gcs_p = k.new_empty(N, nj, C)
    else:
        s1, s2, gs1, gs2, ds1, ds2 = w1, w2, w1, w2, dw1, dw2  # never read or written
        cs = dd = bb = gam
        gcs_p = gcw_p
    sc_p = k.new_empty(N, nj, 3)
    dk, dv, dq = torch.empty_like(k), torch.empty_like(k), torch.empty_like(k)
    dcw, dgam = torch.empty_like(cw), k.new_empty(N)
    if momentum:
        dcs, ddd, dbb = torch.empty_like(cw), k.new_empty(N), k.new_empty(N)
    else:
        dcs, ddd, dbb = dcw, dgam, dgam  # never written without momentum
    a = ACTS[act]
    with torch.cuda.device(k.device) if k.is_cuda else contextlib.nullcontext():
        _read_kernel[(N,)](
            k, v, q, w1, w2, e, e, C, HD, D, bc, br, a, residual, 0, prec_r,
            num_warps=_warps(bc)["read"],
        )  # fmt: skip
        _bwd_sums_kernel[(N, nj)](
            k, e, w1, w2, gw1, gw2, gs1, gs2, cw, cs, ge_p, gk_p, gcw_p, gcs_p,
            C, HD, D, bc, bh, a, momentum, prec, num_warps=_warps(bc)["sums"],
        )  # fmt: skip
        _bwd_weights_kernel[(N, nj)](
            k, q, e, ge_p, gyq, w1, w2, gw1, gw2, gs1, gs2, s1, s2, cw, cs, gam, dd, bb,
            dw1, dw2, ds1, ds2, gk2_p, gq_p, sc_p,
            C, HD, D, bc, bh, a, momentum, prec, num_warps=_warps(bc)["weights"],
        )  # fmt: skip
        _bwd_finish_kernel[(N,)](
            ge_p, gk_p, gk2_p, gq_p, gcw_p, gcs_p, sc_p, gyq, dk, dv, dq, dcw, dcs, dgam, ddd, dbb,
            C, nj, D, bc, residual, momentum, num_warps=_warps(bc)["read"],
        )  # fmt: skip
    if momentum:
        return dk, dv, dq, dw1, dw2, ds1, ds2, dcw, dcs, dgam, ddd, dbb
    none = [k.new_empty(0) for _ in range(5)]
    return dk, dv, dq, dw1, dw2, none[0], none[1], dcw, none[2], dgam, none[3], none[4]


@mlp2_chunk_backward.register_fake
def _(k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb, gyq, gw1, gw2, gs1, gs2, act, residual,
      momentum, prec):  # fmt: skip
    def new(t):  # contiguous, like the real outputs
        return t.new_empty(t.shape)

    def none():
        return k.new_empty(0)

    if momentum:
        return (new(k), new(k), new(k), new(w1), new(w2), new(w1), new(w2), new(cw), new(cw),
                new(gam), new(gam), new(gam))  # fmt: skip
    return (new(k), new(k), new(k), new(w1), new(w2), none(), none(), new(cw), none(), new(gam),
            none(), none())  # fmt: skip


def _setup_context(ctx, inputs, output):
    k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb, act, residual, momentum, prec = inputs
    ctx.save_for_backward(k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb)
    ctx.act, ctx.residual, ctx.momentum, ctx.prec = act, residual, momentum, prec


def _backward(ctx, gyq, gw1, gw2, gs1, gs2):
    k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb = ctx.saved_tensors
    mom = ctx.momentum
    gyq = torch.zeros_like(k) if gyq is None else gyq
    gw1 = torch.zeros_like(w1) if gw1 is None else gw1
    gw2 = torch.zeros_like(w2) if gw2 is None else gw2
    if mom:
        gs1 = torch.zeros_like(w1) if gs1 is None else gs1
        gs2 = torch.zeros_like(w2) if gs2 is None else gs2
    else:
        gs1, gs2 = k.new_empty(0), k.new_empty(0)
    dk, dv, dq, dw1, dw2, ds1, ds2, dcw, dcs, dgam, ddd, dbb = mlp2_chunk_backward(
        k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb, gyq, gw1, gw2, gs1, gs2,
        ctx.act, ctx.residual, mom, ctx.prec,
    )  # fmt: skip
    if not mom:
        return (dk, dv, dq, dw1, dw2, None, None, dcw, None, dgam) + (None,) * 6
    return (dk, dv, dq, dw1, dw2, ds1, ds2, dcw, dcs, dgam, ddd, dbb) + (None,) * 4


mlp2_chunk.register_autograd(_backward, setup_context=_setup_context)
