"""A fused chunk step for depth-2 MLP memories: one Triton kernel forward, one backward.

``nlc.runtime.chunk.chunk_step`` writes one chunk of an in-context memory as about a dozen
batched products, and its backward as several dozen more: at the small periods of Titans
(16 or 64 tokens) each of them is a tiny kernel, and a training step is a few thousand of
them in sequence. For the common case this module does the whole chunk in one kernel per
memory, and its backward in two more (``nlc.runtime.chunk._fused_step`` calls it):

* memory ``mlp`` or ``residual_mlp`` of depth 2 (``y = W2 act(W1 x) (+ x)``), ``din == dout``
  a power of two in 16..128, ``hidden`` a multiple of 16, activation ``gelu`` or ``silu``;
* objective ``l2``; rule ``gd`` or ``momentum`` (any decay); read ``chunk``; float32.

With ``u_s, a_s`` the factors of token ``s``'s inner gradient of weight ``l`` at the chunk-start
weights ``W_0`` (``nlc.runtime.memories.forward_backward``), ``chunk_step``'s chunk-end state is

    W_end = gam W_0 + dd S_0 - sum_s cw_s u_s a_s^T        S_end = bb S_0 - sum_s cs_s u_s a_s^T

with per-token coefficients ``cw, cs`` and per-memory scalars ``gam, dd, bb`` that depend only
on the gates (``chunk._Coeffs``). Those stay in PyTorch, so autograd reaches the gates through
them; the kernels take them as inputs and return their gradients. Kernels:

* ``_read_kernel`` (one program per memory): the error ``E = M_{W_0}(k) - v`` and the read
  ``y = M_{W_0}(q)``, which sum over the hidden width;
* ``_write_kernel`` (one program per memory and block of 32 hidden units): the chunk-end weights;
* ``_bwd_sums_kernel`` and ``_bwd_weights_kernel`` (the same grid): the backward, first the
  parts that sum over the hidden width (summed in PyTorch between the two), then the weight
  gradients. ``E`` (``_read_kernel`` again) and the hidden activations are recomputed.

The formulas of the backward are written out above ``_bwd_sums_kernel``; they are checked against
autograd through ``chunk_step`` (float64) by ``tests/runtime/test_fused.py`` on CPU through
Triton's interpreter and on CUDA. The products' operands are what the unfused path's ``matmul``
would use (``precision``): bf16 under bf16 autocast (TF32 for chunks of 33-128 tokens, see
``_kernel_precision``), TF32 when
``torch.backends.cuda.matmul.allow_tf32`` is on, IEEE float32 otherwise; state, accumulation and
everything elementwise stay float32.

``NLC_FUSED=0`` turns the fused path off; ``NLC_FUSED=interpret`` also uses it for CPU tensors
(it needs ``TRITON_INTERPRET=1`` set before Triton is imported; tests only).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU-only installs do without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = [
    "ACTS",
    "PRECISIONS",
    "applies",
    "available",
    "chunk_coefficients",
    "mlp2_chunk",
    "precision",
]

ACTS = {"gelu": 0, "silu": 1}


def available() -> bool:
    """Whether Triton can be imported."""
    return triton is not None


def _mode() -> str:
    return os.environ.get("NLC_FUSED", "1")


def applies(spec, objective: str, rule, read: str, q, k: Tensor, dtype) -> bool:
    """Whether ``chunk_step`` may take the fused path for these arguments."""
    mode = _mode()
    if mode == "0" or triton is None:
        return False
    if not (k.is_cuda or mode == "interpret"):
        return False
    C = k.shape[-2]
    D = spec.din
    return (
        spec.kind in ("mlp", "residual_mlp")
        and spec.depth == 2
        and spec.act in ACTS
        and spec.dout == D
        and D in (16, 32, 64, 128)
        and spec.hidden % 16 == 0
        and objective == "l2"
        and not rule.is_dgd
        and read == "chunk"
        and q is not None
        and q.shape == k.shape
        and dtype == torch.float32
        and 1 <= C <= 128
    )


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


def _kernel_precision(prec: str, bc: int) -> str:
    """``prec``, except TF32 (finer than bf16) for blocks of 64 tokens: there the bf16 kernels
    hit an illegal memory access with Triton 3.6 on an H200 (``benchmarks/fused_diag.py
    --chunks 64 --precisions bf16``), while TF32 and IEEE ran."""
    return "tf32" if prec == "bf16" and bc >= 64 else prec


def _blocks(C: int, hidden: int) -> tuple[int, int, int]:
    """(token block, hidden block of the per-block kernels, hidden step of the read loop)."""
    bc = max(16, triton.next_power_of_2(C))
    bh = 32 if hidden % 32 == 0 else 16
    br = 64 if hidden % 64 == 0 else bh
    return bc, bh, br


PRECISIONS = ("bf16", "tf32", "ieee")

# warps per program of each kernel (benchmarks/fused_diag.py tries others)
WARPS = {"read": 4, "write": 4, "sums": 4, "weights": 4}


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
        """Grid ``(N,)``: the memory at ``W_0`` on the keys (the error ``E = M(K) - V``) and, if
        ``READ``, on the queries (the read ``Yq``), summed over blocks of the hidden width."""
        n = tl.program_id(0)
        rc = tl.arange(0, BC)
        rd = tl.arange(0, D)
        rh = tl.arange(0, BH)
        m2 = (rc < C)[:, None]
        tok = n * C * D + rc[:, None] * D + rd[None, :]
        k = tl.load(K + tok, mask=m2, other=0.0)
        q = tl.load(Q + tok, mask=m2, other=0.0)
        if RES:
            y = k
            yq = q
        else:
            y = tl.zeros([BC, D], dtype=tl.float32)
            yq = tl.zeros([BC, D], dtype=tl.float32)
        for j in range(0, HD, BH):
            w1 = tl.load(W1 + n * HD * D + (j + rh)[:, None] * D + rd[None, :])  # W1[j:j+BH, :]
            w2 = tl.load(W2 + n * D * HD + rd[:, None] * HD + (j + rh)[None, :])  # W2[:, j:j+BH]
            h, _, _ = _act(_dot(k, tl.trans(w1), PREC), ACT)
            y += _dot(h, tl.trans(w2), PREC)
            if READ:
                hq, _, _ = _act(_dot(q, tl.trans(w1), PREC), ACT)
                yq += _dot(hq, tl.trans(w2), PREC)
        v = tl.load(V + tok, mask=m2, other=0.0)
        if READ:
            tl.store(YQ + tok, yq, mask=m2)
        tl.store(E + tok, tl.where(m2, y - v, 0.0), mask=m2)

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
        k = tl.load(K + tok, mask=m2, other=0.0)
        e = tl.load(E + tok, mask=m2, other=0.0)
        cw = tl.load(CW + n * C + rc, mask=mc, other=0.0)
        gam = tl.load(GAM + n)
        w1 = tl.load(W1 + p1)
        w2 = tl.load(W2 + p2)
        h, d1, _ = _act(_dot(k, tl.trans(w1), PREC), ACT)
        dl = _dot(e, w2, PREC) * d1
        w1e = gam * w1 - _dot(tl.trans(dl * cw[:, None]), k, PREC)
        w2e = gam * w2 - _dot(tl.trans(e * cw[:, None]), h, PREC)
        if MOM:
            cs = tl.load(CS + n * C + rc, mask=mc, other=0.0)
            dd = tl.load(DD + n)
            bb = tl.load(BB + n)
            s1 = tl.load(S1 + p1)
            s2 = tl.load(S2 + p2)
            w1e += dd * s1
            w2e += dd * s2
            s1e = bb * s1 - _dot(tl.trans(dl * cs[:, None]), k, PREC)
            s2e = bb * s2 - _dot(tl.trans(e * cs[:, None]), h, PREC)
            tl.store(S1E + p1, s1e)
            tl.store(S2E + p2, s2e)
        tl.store(W1E + p1, w1e)
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
        k = tl.load(K + tok, mask=m2, other=0.0)
        e = tl.load(E + tok, mask=m2, other=0.0)
        cw = tl.load(CW + n * C + rc, mask=mc, other=0.0)
        w1 = tl.load(W1 + p1)
        w2 = tl.load(W2 + p2)
        gw1 = tl.load(GW1 + p1)
        gw2 = tl.load(GW2 + p2)
        h, d1, _ = _act(_dot(k, tl.trans(w1), PREC), ACT)
        dl = _dot(e, w2, PREC) * d1
        kg1 = _dot(k, tl.trans(gw1), PREC)
        hg2 = _dot(h, tl.trans(gw2), PREC)
        gdl = -cw[:, None] * kg1
        gcw = -tl.sum(dl * kg1, axis=1) - tl.sum(e * hg2, axis=1)
        gk = -_dot(dl * cw[:, None], gw1, PREC)
        ge = -cw[:, None] * hg2
        if MOM:
            cs = tl.load(CS + n * C + rc, mask=mc, other=0.0)
            gs1 = tl.load(GS1 + p1)
            gs2 = tl.load(GS2 + p2)
            ks1 = _dot(k, tl.trans(gs1), PREC)
            hs2 = _dot(h, tl.trans(gs2), PREC)
            gdl -= cs[:, None] * ks1
            gcs = -tl.sum(dl * ks1, axis=1) - tl.sum(e * hs2, axis=1)
            gk -= _dot(dl * cs[:, None], gs1, PREC)
            ge -= cs[:, None] * hs2
            tl.store(GCS_P + (n * NJ + jb) * C + rc, gcs, mask=mc)
        ge += _dot(gdl * d1, tl.trans(w2), PREC)
        tl.store(GE_P + part, tl.where(m2, ge, 0.0), mask=m2)
        tl.store(GK_P + part, gk, mask=m2)
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
        k = tl.load(K + tok, mask=m2, other=0.0)
        e = tl.load(E + tok, mask=m2, other=0.0)
        ge = tl.zeros([BC, D], dtype=tl.float32)
        for i in range(NJ):
            ge += tl.load(GE_P + (n * NJ + i) * C * D + rc[:, None] * D + rd[None, :], mask=m2,
                          other=0.0)  # fmt: skip
        cw = tl.load(CW + n * C + rc, mask=mc, other=0.0)
        gam = tl.load(GAM + n)
        w1 = tl.load(W1 + p1)
        w2 = tl.load(W2 + p2)
        gw1 = tl.load(GW1 + p1)
        gw2 = tl.load(GW2 + p2)
        sc = (n * NJ + jb) * 3
        tl.store(SC_P + sc, tl.sum(tl.sum(gw1 * w1, 1), 0) + tl.sum(tl.sum(gw2 * w2, 1), 0))
        h, d1, d2 = _act(_dot(k, tl.trans(w1), PREC), ACT)
        pp = _dot(e, w2, PREC)
        gdl = -cw[:, None] * _dot(k, tl.trans(gw1), PREC)
        gh = _dot(ge, w2, PREC) - cw[:, None] * _dot(
            e, gw2, PREC
        )
        if MOM:
            cs = tl.load(CS + n * C + rc, mask=mc, other=0.0)
            dd = tl.load(DD + n)
            bb = tl.load(BB + n)
            gs1 = tl.load(GS1 + p1)
            gs2 = tl.load(GS2 + p2)
            gdl -= cs[:, None] * _dot(k, tl.trans(gs1), PREC)
            gh -= cs[:, None] * _dot(e, gs2, PREC)
            tl.store(DS1 + p1, dd * gw1 + bb * gs1)
            tl.store(DS2 + p2, dd * gw2 + bb * gs2)
            s1 = tl.load(S1 + p1)
            s2 = tl.load(S2 + p2)
            tl.store(SC_P + sc + 1, tl.sum(tl.sum(gw1 * s1, 1), 0) + tl.sum(tl.sum(gw2 * s2, 1), 0))
            tl.store(SC_P + sc + 2, tl.sum(tl.sum(gs1 * s1, 1), 0) + tl.sum(tl.sum(gs2 * s2, 1), 0))
        gz = gdl * pp * d2 + gh * d1
        dw1 = gam * gw1 + _dot(tl.trans(gz), k, PREC)
        dw2 = (
            gam * gw2
            + _dot(tl.trans(e), gdl * d1, PREC)
            + _dot(tl.trans(ge), h, PREC)
        )
        gk = _dot(gz, w1, PREC)
        # the read at W_0
        q = tl.load(Q + tok, mask=m2, other=0.0)
        gyq = tl.load(GYQ + tok, mask=m2, other=0.0)
        hq, dq1, _ = _act(_dot(q, tl.trans(w1), PREC), ACT)
        gzq = _dot(gyq, w2, PREC) * dq1
        dw2 += _dot(tl.trans(gyq), hq, PREC)
        dw1 += _dot(tl.trans(gzq), q, PREC)
        tl.store(DW1 + p1, dw1)
        tl.store(DW2 + p2, dw2)
        tl.store(GK_P + part, gk, mask=m2)
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
    bc, bh, br = _blocks(C, HD)
    prec = _kernel_precision(prec, bc)
    k, v, q, w1, w2, cw, gam = (t.contiguous() for t in (k, v, q, w1, w2, cw, gam))
    yq, e = torch.empty_like(k), torch.empty_like(k)
    w1e, w2e = torch.empty_like(w1), torch.empty_like(w2)
    if momentum:
        s1, s2, cs, dd, bb = (t.contiguous() for t in (s1, s2, cs, dd, bb))
        s1e, s2e = torch.empty_like(s1), torch.empty_like(s2)
    else:
        s1, s2, s1e, s2e = w1, w2, w1e, w2e  # never read or written (MOM off)
        cs = dd = bb = gam
    with torch.cuda.device(k.device) if k.is_cuda else _null():
        _read_kernel[(N,)](
            k, v, q, w1, w2, yq, e, C, HD, D, bc, br, ACTS[act], residual, True, prec,
            num_warps=WARPS["read"],
        )  # fmt: skip
        _write_kernel[(N, HD // bh)](
            k, e, w1, w2, s1, s2, cw, cs, gam, dd, bb, w1e, w2e, s1e, s2e,
            C, HD, D, bc, bh, ACTS[act], momentum, prec, num_warps=WARPS["write"],
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
    bc, bh, _ = _blocks(C, HD)
    prec = _kernel_precision(prec, bc)
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
    with torch.cuda.device(k.device) if k.is_cuda else _null():
        _read_kernel[(N,)](
            k, v, q, w1, w2, e, e, C, HD, D, bc, _blocks(C, HD)[2], a, residual, False, prec,
            num_warps=WARPS["read"],
        )  # fmt: skip
        _bwd_sums_kernel[(N, nj)](
            k, e, w1, w2, gw1, gw2, gs1, gs2, cw, cs, ge_p, gk_p, gcw_p, gcs_p,
            C, HD, D, bc, bh, a, momentum, prec, num_warps=WARPS["sums"],
        )  # fmt: skip
        _bwd_weights_kernel[(N, nj)](
            k, q, e, ge_p, gyq, w1, w2, gw1, gw2, gs1, gs2, s1, s2, cw, cs, gam, dd, bb,
            dw1, dw2, ds1, ds2, gk2_p, gq_p, sc_p,
            C, HD, D, bc, bh, a, momentum, prec, num_warps=WARPS["weights"],
        )  # fmt: skip
        _bwd_finish_kernel[(N,)](
            ge_p, gk_p, gk2_p, gq_p, gcw_p, gcs_p, sc_p, gyq, dk, dv, dq, dcw, dcs, dgam, ddd, dbb,
            C, nj, D, bc, residual, momentum, num_warps=WARPS["read"],
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
    with torch.cuda.device(eta.device) if eta.is_cuda else _null():
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
    with torch.cuda.device(eta.device) if eta.is_cuda else _null():
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


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


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
