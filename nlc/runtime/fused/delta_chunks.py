"""Each chunk's own part of a linear memory's delta rule, one Triton program a chunk, each way.

``nlc.runtime.linear_chunks`` splits chunk ``c`` of a ``dgd`` memory on the ``dot`` objective
into a part that depends on its start state ``W_c`` and a part that does not; the recurrence over
``W_c`` runs in ``nlc.runtime.fused.delta``. This module computes the chunk-local part. With keys
``a`` ``[C, in]``, values ``u`` ``[C, out]`` (the objective's ``dl/dy = -target``), queries
``h`` ``[C, in]``, rates ``eta`` ``[C]`` and the chunk's decay matrix ``D`` ``[C+1, C+1]``
(``nlc.runtime.chunk.decay_matrix``: ``A[t, s] = D[t+1, s+1]``, ``A_prev[t, s] = D[t, s+1]``,
``gam[t] = D[t+1, 0]``, ``gam_prev[t] = D[t, 0]``; without decay ``D`` is left out and the
kernels use its constant form, all ones on and below the diagonal, without reading it):

    K      = eta[:, None] * A_prev * (a a^T)            strictly lower triangular
    T      = (I + K)^{-1}
    P      = -T ((eta * gam_prev)[:, None] * a)         [C, in]   (the part of r in W_c^T)
    s      = -T v,   v = eta[:, None] * u               [C, out]  (the state-free part of r, less v)
    qe     = gam[:, None] * h + (A * h a^T) P           [C, in]   (causal read: y = qe W_c^T + z)
    z      = -(A * h a^T) T v                           [C, out]

(``linear_chunks``' ``w_free = T K v = v + s``, as ``T K = I - T``; the chunk's write is
``Ae * (P W_c^T + s)`` with ``Ae`` the decays to its end, ``fused.delta`` without its ``Fu``).
One program per chunk (``_fwd_kernel``) forms ``a a^T`` and ``h a^T``, writes ``K`` to a scratch
buffer and inverts it (``triangular.invert``), then forms the four outputs block of columns by
block; ``T`` is kept for the backward. The backward (``_bwd_kernel``), one program per chunk
again, with ``gb = T^T dP'`` (``dP' = dP + (A * h a^T)^T dqe``) and ``gv = T^T dTv``
(``dTv = -ds - (A * h a^T)^T dz``):

    dK   = -tril(gb P^T + gv (T v)^T, -1)
    dv   = gv                       du = eta dv
    da   = (dS + dS^T) a + dhA'^T h - (eta gam_prev) gb,   dS = dK * eta A_prev
    dh   = gam dqe + dhA' a,   dhA' = A * (dqe P^T - dz (T v)^T)

and the gradients of ``eta`` and of ``D`` (every entry that enters: ``A``, ``A_prev``, ``gam``,
``gam_prev``; the decay matrix's own backward takes it from there).

Precision: the products of keys and queries (``a a^T``, ``h a^T``, ``(A * h a^T) P``, ``(A * h
a^T) T v`` and their gradients) follow ``mlp2.precision`` (bf16 operands under bf16 autocast,
else TF32 or IEEE float32 by ``torch.backends.cuda.matmul.allow_tf32``); the products with ``T``
and the inverse itself stay float32 under autocast (TF32 or IEEE by the same flag; the inverse in
IEEE), as ``linear_chunks``' solve does. Two exceptions (``_precisions``): a Triton workaround,
under bf16 autocast with TF32 on the key and query products run TF32 too (more precise than
bf16, not less); and the setting ``tbf16=1`` (off by default), under bf16 autocast every product
bf16, those with ``T`` too. The rates and decays are float32; keys, values and queries float32, bf16 or
float16, each read as float32 (a bf16 value is exact in TF32 and float32: no float32 copy of a
caller's bf16 projections is made), their gradients summed in float32 and written in their own
dtype; the values may come negated (``neg_u``: the targets themselves, no ``-target`` tensor made).
The outputs are float32 but for ``P`` and ``qe`` under bf16 autocast: those are ``fused.delta``'s
product operands, written in bf16 as it takes them (their gradients come back in bf16; the
backward's sums stay float32, but its products with ``P``, ``gb P^T`` and ``dqe P^T``, then take
the bf16-rounded ``P``: about 1e-3 relative on the gradients). Chunks of at most 64 tokens
(:func:`applies`). The loops over blocks of columns are not unrolled (``TUNE``): unrolled, ptxas
gave the forward 255 registers a thread without decay, against 180 (sm_90a).
``tests/runtime/test_delta_chunks.py`` checks both kernels against :func:`reference` in float64
(values and every gradient) through Triton's interpreter on a CPU and on CUDA.

``NLC_DELTA_CHUNKS=0`` keeps ``linear_chunks``' batched products for this part (for comparisons).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import tl, triton
from .delta import _device, pow2, switched_on, tune_from_env
from .mlp2 import precision

__all__ = ["applies", "delta_chunks", "reference", "run"]

READS = (torch.float32, torch.bfloat16, torch.float16)  # the keys', values' and queries' dtypes read

# for the forward and the backward kernel: columns of in / out per block of the products, warps
# per program (a program holds several [C, C] float32 matrices), the unroll factor of the loops
# over blocks of columns (unrolled, they kept every block's loads live: 255 registers a thread),
# and a cap on registers a thread (0: none; ptxas spills above it); for the forward, ``joint``: the
# grams a a^T and h a^T in one loop over the keys (1) or h a^T after the inverse (0; ptxas, sm_90a:
# 180 registers a thread without decay against 168 joint, but joint spills with decay; 0 is the
# setting timed); NLC_DELTA_CHUNKS_TUNE (key=N,...) overrides them, read at every call. Two warps
# in the forward: 0.40 ms of GPU time a step against 0.55 with four (H200, the delta-rule op of
# benchmarks/delta_diag.py; one 0.53, eight 1.20); the backward's 0.79 ms with four, 1.12 with two.
# ``tbf16=1`` gives the products with ``T`` bf16 operands too under bf16 autocast, both kernels
# (every product then bf16; ``_precisions``): a precision traded for speed, off by default
TUNE = {"block": 32, "warps": 2, "unroll": 1, "maxnreg": 0, "joint": 0, "tbf16": 0,
        "bwd_block": 32, "bwd_warps": 4, "bwd_unroll": 1, "bwd_maxnreg": 0}  # fmt: skip
_ALLOWED = {"block": (16, 32, 64, 128), "warps": (1, 2, 4, 8, 16), "unroll": (1, 2, 4),
            "maxnreg": (0, 96, 128, 168, 192, 232), "joint": (0, 1), "tbf16": (0, 1)}  # fmt: skip


def _launch(tune: dict, prefix: str = "") -> dict:
    """The launch options of one kernel from the settings (``prefix`` ``bwd_``: the backward's)."""
    opts = {"num_warps": tune[prefix + "warps"]}
    if tune[prefix + "maxnreg"]:
        opts["maxnreg"] = tune[prefix + "maxnreg"]
    return opts


def _tune() -> dict:
    return tune_from_env("NLC_DELTA_CHUNKS_TUNE", TUNE, _ALLOWED)


def applies(din: int, dout: int, C: int, N: int, device) -> bool:
    """Whether the kernels take a chunk of this shape: Triton present, a CUDA device (or
    ``NLC_FUSED=interpret``), ``NLC_DELTA_CHUNKS`` not ``0``; ``din``, ``dout`` and ``C`` powers of
    two from 16, ``C`` at most 64 (at 128 a program's ``[C, C]`` float32 matrices take 128
    registers a thread each: a case at ``C`` 128 did not finish in over three minutes on an H200),
    ``din`` and ``dout`` at most 1,024; ``N`` chunks in all, int32 offsets within the tensors."""
    if not switched_on("NLC_DELTA_CHUNKS", device):
        return False
    return pow2(din, 1024) and pow2(dout, 1024) and pow2(C, 64) and N * C * max(din, dout, C + 1) < 2**31


def _precisions(device_type: str) -> tuple[str, str]:
    """The precisions of the key and query products and of the products with ``T`` (by default
    float32 even under autocast: TF32 or IEEE; bf16 with ``tbf16=1``).

    Under bf16 autocast with TF32 on, **every** product runs TF32: bf16 and TF32 products in one
    of these kernels read shared memory out of range (Triton 3.6, H200: an illegal memory access
    now and then, "out-of-range shared or local address" under compute-sanitizer's memcheck, at
    every run; bf16 with IEEE, bf16 alone and TF32 alone are clean). The other way out, IEEE
    products with ``T``, made the delta-rule op 14.8 ms a step against 4.8 (``benchmarks/RESULTS.md``).
    The setting ``tbf16=1`` (``NLC_DELTA_CHUNKS_TUNE``) runs every product in bf16 under bf16
    autocast instead, the products with ``T`` too (``T`` rounded to bf16 as their operand; the
    inverse itself stays IEEE float32).
    """
    prec = precision(device_type)
    if prec == "bf16" and _tune()["tbf16"]:
        return "bf16", "bf16"
    tprec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if prec == "bf16" and tprec == "tf32":
        prec = "tf32"
    return prec, tprec


if triton is not None:
    from .mlp2 import _dot
    from .triangular import invert

    @triton.jit
    def _tiles(C: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr):
        """This program's chunk ``m`` and its offsets: tokens ``rc``, a block of columns of in
        ``rd`` and of out ``re``, and ``cc`` within a row-major ``[C, C]`` matrix."""
        rc = tl.arange(0, C)
        return (tl.program_id(0).to(tl.int64), rc, tl.arange(0, BD), tl.arange(0, BE),
                rc[:, None] * C + rc[None, :])  # fmt: skip

    @triton.jit
    def _decays(DX, m, C: tl.constexpr, HAS_DX: tl.constexpr):
        """``A, A_prev [C, C]`` and ``gam, gam_prev [C]`` of chunk ``m`` from its decay matrix, or
        without decay (``HAS_DX`` off) the constant matrix's."""
        X1: tl.constexpr = C + 1
        rc = tl.arange(0, C)
        if not HAS_DX:
            one = tl.full([C], 1.0, tl.float32)
            return (tl.where(rc[:, None] >= rc[None, :], 1.0, 0.0),
                    tl.where(rc[:, None] > rc[None, :], 1.0, 0.0), one, one)  # fmt: skip
        dx = DX + m * X1 * X1
        dec = tl.load(dx + (rc[:, None] + 1) * X1 + rc[None, :] + 1)
        decp = tl.load(dx + rc[:, None] * X1 + rc[None, :] + 1)
        return dec, decp, tl.load(dx + (rc + 1) * X1), tl.load(dx + rc * X1)

    @triton.jit
    def _grams(Ab, Hb, C: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, AA: tl.constexpr,
               HA: tl.constexpr, PREC: tl.constexpr, UNROLL: tl.constexpr):  # fmt: skip
        """``a a^T`` (``AA``) and ``h a^T`` (``HA``), ``[C, C]``, over blocks of ``BD`` columns."""
        rc = tl.arange(0, C)
        rd = tl.arange(0, BD)
        aa = tl.zeros([C, C], tl.float32)
        ha = tl.zeros([C, C], tl.float32)
        for j in tl.range(0, D // BD, loop_unroll_factor=UNROLL):
            off = rc[:, None] * D + j * BD + rd[None, :]
            a = tl.load(Ab + off).to(tl.float32)
            if AA:
                aa += _dot(a, tl.trans(a), PREC)
            if HA:
                ha += _dot(tl.load(Hb + off).to(tl.float32), tl.trans(a), PREC)
        return aa, ha

    @triton.jit
    def _fwd_kernel(
        A, U, H, ETA, DX, KS, T, P, S, QE, Z,
        C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
        READ: tl.constexpr, HAS_DX: tl.constexpr, PREC: tl.constexpr, TPREC: tl.constexpr,
        UNROLL: tl.constexpr, JOINT: tl.constexpr, SIGN: tl.constexpr,
    ):  # fmt: skip
        m, rc, rd, re, cc = _tiles(C, BD, BE)
        dec, decp, gam, gamp = _decays(DX, m, C, HAS_DX)
        eta = tl.load(ETA + m * C + rc)
        if JOINT:  # both grams in one loop over the keys
            aa, ha = _grams(A + m * C * D, H + m * C * D, C, D, BD, True, READ, PREC, UNROLL)
        else:
            aa, _ = _grams(A + m * C * D, H, C, D, BD, True, False, PREC, UNROLL)
        tl.store(KS + m * C * C + cc, eta[:, None] * decp * aa)
        tl.debug_barrier()
        invert(KS + m * C * C, T + m * C * C, C, 16)
        if not JOINT:  # h a^T after the inverse
            _, ha = _grams(A + m * C * D, H + m * C * D, C, D, BD, False, READ, PREC, UNROLL)
        hA = dec * ha
        t = tl.load(T + m * C * C + cc)
        cb = -(eta * gamp)
        for j in tl.range(0, D // BD, loop_unroll_factor=UNROLL):
            off = m * C * D + rc[:, None] * D + j * BD + rd[None, :]
            p = _dot(t, cb[:, None] * tl.load(A + off).to(tl.float32), TPREC)
            tl.store(P + off, p.to(P.dtype.element_ty))
            if READ:
                qe = gam[:, None] * tl.load(H + off).to(tl.float32) + _dot(hA, p, PREC)
                tl.store(QE + off, qe.to(QE.dtype.element_ty))
        for j in tl.range(0, E // BE, loop_unroll_factor=UNROLL):
            off = m * C * E + rc[:, None] * E + j * BE + re[None, :]
            v = (SIGN * eta)[:, None] * tl.load(U + off).to(tl.float32)
            tv = _dot(t, v, TPREC)
            tl.store(S + off, -tv)
            if READ:
                tl.store(Z + off, -_dot(hA, tv, PREC))

    @triton.jit
    def _bwd_kernel(
        A, U, H, ETA, DX, T, P, S, DP, DS, DQE, DZ, DA, DU, DH, DETA, DDX,
        C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
        READ: tl.constexpr, HAS_DX: tl.constexpr, DECAYS: tl.constexpr, PREC: tl.constexpr,
        TPREC: tl.constexpr, UNROLL: tl.constexpr, SIGN: tl.constexpr,
    ):  # fmt: skip
        m, rc, rd, re, cc = _tiles(C, BD, BE)
        X1: tl.constexpr = C + 1
        dx = DDX + m * X1 * X1  # the decay matrix's gradient, written in stages (rows overlap)
        eta = tl.load(ETA + m * C + rc)
        t = tl.load(T + m * C * C + cc)
        dec, _, _, _ = _decays(DX, m, C, HAS_DX)
        _, ha = _grams(A + m * C * D, H + m * C * D, C, D, BD, False, READ, PREC, UNROLL)
        hA = dec * ha
        dhA = tl.zeros([C, C], tl.float32)
        dK = tl.zeros([C, C], tl.float32)
        deta = tl.zeros([C], tl.float32)
        # 1. the columns of in: dhA += dqe P^T, gb = T^T (dP + hA^T dqe), dK -= gb P^T
        for j in tl.range(0, D // BD, loop_unroll_factor=UNROLL):
            off = m * C * D + rc[:, None] * D + j * BD + rd[None, :]
            p = tl.load(P + off).to(tl.float32)
            dp = tl.load(DP + off).to(tl.float32)
            if READ:
                dqe = tl.load(DQE + off).to(tl.float32)
                dhA += _dot(dqe, tl.trans(p), PREC)
                dp += _dot(tl.trans(hA), dqe, PREC)
            gb = _dot(tl.trans(t), dp, TPREC)
            dK -= _dot(gb, tl.trans(p), TPREC)
        # 2. the columns of out: with Tv = -s, dTv = -ds - hA^T dz, gv = T^T dTv = dL/dv
        for j in tl.range(0, E // BE, loop_unroll_factor=UNROLL):
            off = m * C * E + rc[:, None] * E + j * BE + re[None, :]
            tv = -tl.load(S + off)
            dtv = -tl.load(DS + off)
            if READ:
                dz = tl.load(DZ + off)
                dhA -= _dot(dz, tl.trans(tv), PREC)
                dtv -= _dot(tl.trans(hA), dz, PREC)
            gv = _dot(tl.trans(t), dtv, TPREC)
            tl.store(DU + off, ((SIGN * eta)[:, None] * gv).to(DU.dtype.element_ty))
            deta += SIGN * tl.sum(gv * tl.load(U + off).to(tl.float32), 1)
            dK -= _dot(gv, tl.trans(tv), TPREC)
        # 3. K = eta A_prev * aa, hA = A * ha (the grams again: fewer matrices live in 1 and 2);
        # A_prev's gradient fills rows 0..C-1 of the decays' gradient, then A's adds to rows 1..C
        dK = tl.where(rc[:, None] > rc[None, :], dK, 0.0)
        aa, ha = _grams(A + m * C * D, H + m * C * D, C, D, BD, True, READ, PREC, UNROLL)
        dec, decp, gam, gamp = _decays(DX, m, C, HAS_DX)
        dEK = dK * aa
        deta += tl.sum(dEK * decp, 1)
        if DECAYS:
            tl.store(dx + rc[:, None] * X1 + rc[None, :] + 1, eta[:, None] * dEK)
            tl.store(dx + C * X1 + rc + 1, tl.zeros([C], tl.float32))
            tl.store(dx + C * X1 + rc * 0, tl.zeros([C], tl.float32))
            tl.debug_barrier()
            lo = dx + (rc[:, None] + 1) * X1 + rc[None, :] + 1
            tl.store(lo, tl.load(lo) + tl.where(rc[:, None] >= rc[None, :], dhA * ha, 0.0))
        dS = dK * eta[:, None] * decp
        dS = dS + tl.trans(dS)
        dha = dhA * dec
        # 4. the columns of in again: da, dh and the gradient of eta * gam_prev
        dcb = tl.zeros([C], tl.float32)
        dgam = tl.zeros([C], tl.float32)
        cb = eta * gamp
        for j in tl.range(0, D // BD, loop_unroll_factor=UNROLL):
            off = m * C * D + rc[:, None] * D + j * BD + rd[None, :]
            a = tl.load(A + off).to(tl.float32)
            dp = tl.load(DP + off).to(tl.float32)
            if READ:
                dqe = tl.load(DQE + off).to(tl.float32)
                dp += _dot(tl.trans(hA), dqe, PREC)
            db = -_dot(tl.trans(t), dp, TPREC)  # b = cb a, P = -T b
            dcb += tl.sum(db * a, 1)
            da = cb[:, None] * db + _dot(dS, a, PREC)
            if READ:
                h = tl.load(H + off).to(tl.float32)
                da += _dot(tl.trans(dha), h, PREC)
                dgam += tl.sum(h * dqe, 1)
                tl.store(DH + off, (gam[:, None] * dqe + _dot(dha, a, PREC)).to(DH.dtype.element_ty))
            tl.store(DA + off, da.to(DA.dtype.element_ty))
        tl.store(DETA + m * C + rc, deta + dcb * gamp)
        # 5. the decays' column 0: gam_prev's gradient in rows 0..C-1, then gam's added to 1..C
        if DECAYS:
            tl.store(dx + rc * X1, dcb * eta)
            tl.debug_barrier()
            col = dx + (rc + 1) * X1
            tl.store(col, tl.load(col) + dgam)


@torch.library.custom_op("nlc::delta_chunks", mutates_args=())
def delta_chunks(
    a: Tensor, u: Tensor, h: Tensor, eta: Tensor, dx: Tensor, read: bool, low: bool, prec: str,
    tprec: str, neg_u: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The module's forward for ``M`` chunks: a, h ``[M, C, in]``, u ``[M, C, out]`` (``neg_u``:
    given as ``-u``, the targets), eta ``[M, C]``, dx ``[M, C+1, C+1]`` or an empty ``[0]`` tensor
    (no decay); eta and dx float32, a, u and h float32, bf16 or float16 (read as float32: a
    caller's bf16 keys, values and queries need no float32 copy), ``read`` off: ``h`` is ignored.
    Returns ``(P [M, C, in], s [M, C, out], qe [M, C, in], z [M, C, out],
    T [M, C, C])``, float32 but for ``P`` and ``qe``, bf16 with ``low`` (the recurrence's operands
    under bf16 autocast: written once, not cast after); ``qe`` and ``z`` are empty ``[0]`` tensors
    without the read; ``T`` is for the backward. ``dx`` must be zero above its diagonal, as
    ``chunk.decay_matrix``'s is: the kernels read it whole (masking it cost the backward 10% more
    register spills), and its gradient is zero there."""
    a, u, h, eta, dx = (x.contiguous() for x in (a, u, h, eta, dx))
    M, C, D = a.shape
    E = u.shape[-1]
    tune = _tune()
    BD, BE = min(D, tune["block"]), min(E, tune["block"])
    ks, t = eta.new_empty(M, C, C), eta.new_empty(M, C, C)
    od = torch.bfloat16 if low else torch.float32
    p, s = torch.empty_like(a, dtype=od), torch.empty_like(u, dtype=torch.float32)
    qe = torch.empty_like(a, dtype=od) if read else eta.new_empty(0)
    z = torch.empty_like(u, dtype=torch.float32) if read else eta.new_empty(0)
    if M:
        with _device(a):
            _fwd_kernel[(M,)](
                a, u, h if read else a, eta, dx if dx.dim() == 3 else eta, ks, t, p, s,
                qe if read else p, z if read else s, C, D, E, BD, BE, read, dx.dim() == 3, prec,
                tprec, tune["unroll"], bool(tune["joint"]), -1.0 if neg_u else 1.0, **_launch(tune),
            )  # fmt: skip
    return p, s, qe, z, t


@delta_chunks.register_fake
def _(a, u, h, eta, dx, read, low, prec, tprec, neg_u):
    M, C, _ = a.shape
    od = torch.bfloat16 if low else torch.float32
    qe = a.new_empty(a.shape, dtype=od) if read else eta.new_empty(0)
    z = eta.new_empty(u.shape) if read else eta.new_empty(0)
    return a.new_empty(a.shape, dtype=od), eta.new_empty(u.shape), qe, z, eta.new_empty(M, C, C)


@torch.library.custom_op("nlc::delta_chunks_backward", mutates_args=())
def delta_chunks_backward(
    a: Tensor, u: Tensor, h: Tensor, eta: Tensor, dx: Tensor, t: Tensor, p: Tensor, s: Tensor,
    dp: Tensor, ds: Tensor, dqe: Tensor, dz: Tensor, read: bool, decays: bool, prec: str,
    tprec: str, neg_u: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(a, u, h, eta, dx)`` of :func:`delta_chunks` from those of ``P, s`` and (with
    the read) ``qe, z`` (``P``'s and ``qe``'s in their dtype), each in its input's dtype (summed
    in float32, rounded once as it is written); ``dh`` is an empty ``[0]`` tensor without the
    read, ``ddx`` without ``decays`` (no decay matrix, or one that needs no gradient)."""
    a, u, h, eta, dx, t, p, s, dp, ds, dqe, dz = (
        x.contiguous() for x in (a, u, h, eta, dx, t, p, s, dp, ds, dqe, dz)
    )
    M, C, D = a.shape
    E = u.shape[-1]
    tune = _tune()
    BD, BE = min(D, tune["bwd_block"]), min(E, tune["bwd_block"])
    has_dx = dx.dim() == 3
    decays = decays and has_dx
    da, du = torch.empty_like(a), torch.empty_like(u)
    dh = torch.empty_like(h) if read else a.new_empty(0)
    deta = torch.empty_like(eta)
    ddx = torch.empty_like(dx) if decays else dx.new_empty(0)
    if M:
        with _device(a):
            _bwd_kernel[(M,)](
                a, u, h if read else a, eta, dx if has_dx else eta, t, p, s, dp, ds,
                dqe if read else dp, dz if read else ds, da, du, dh if read else da, deta,
                ddx if decays else deta, C, D, E, BD, BE, read, has_dx, decays, prec, tprec,
                tune["bwd_unroll"], -1.0 if neg_u else 1.0, **_launch(tune, "bwd_"),
            )  # fmt: skip
    return da, du, dh, deta, ddx


@delta_chunks_backward.register_fake
def _(a, u, h, eta, dx, t, p, s, dp, ds, dqe, dz, read, decays, prec, tprec, neg_u):
    dh = h.new_empty(h.shape) if read else a.new_empty(0)
    ddx = dx.new_empty(dx.shape) if decays and dx.dim() == 3 else dx.new_empty(0)
    return a.new_empty(a.shape), u.new_empty(u.shape), dh, eta.new_empty(eta.shape), ddx


def _setup_context(ctx, inputs, output):
    a, u, h, eta, dx, read, _, prec, tprec, neg_u = inputs
    p, s, _, _, t = output
    ctx.save_for_backward(a, u, h, eta, dx, t, p, s)
    ctx.read, ctx.prec, ctx.tprec, ctx.neg_u = read, prec, tprec, neg_u
    ctx.mark_non_differentiable(t)  # kept for the backward only
    ctx.set_materialize_grads(False)


def _backward(ctx, dp, ds, dqe, dz, _dt):
    a, u, h, eta, dx, t, p, s = ctx.saved_tensors

    def grad(g: Tensor | None, like: Tensor) -> Tensor:
        return torch.zeros_like(like) if g is None else g.contiguous()

    read, decays = ctx.read, ctx.needs_input_grad[4] and dx.dim() == 3
    empty = a.new_empty(0)
    da, du, dh, deta, ddx = delta_chunks_backward(
        a, u, h, eta, dx, t, p, s, grad(dp, p), grad(ds, s), grad(dqe, p) if read else empty,
        grad(dz, s) if read else empty, read, decays, ctx.prec, ctx.tprec, ctx.neg_u,
    )  # fmt: skip
    return da, du, dh if read else None, deta, ddx if decays else None, None, None, None, None, None


delta_chunks.register_autograd(_backward, setup_context=_setup_context)


def run(a: Tensor, u: Tensor, h: Tensor | None, eta: Tensor, dx: Tensor | None, neg_u: bool = False
        ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """:func:`delta_chunks` on the caller's tensors: keys ``a`` ``[..., C, in]``, values ``u``
    ``[..., C, out]`` (``neg_u``: given as ``-u``), queries ``h`` ``[..., C, in]`` or None (no
    causal read), rates ``eta`` ``[..., C]`` and decay matrices ``dx`` ``[..., C+1, C+1]`` (zero
    above the diagonal, as ``chunk.decay_matrix`` makes them) or None (no decay), batch shapes
    that broadcast, any float dtype (computed in float32; keys, values and queries in bf16 or
    float16 are read as they are, and their gradients come back in that dtype). Returns ``(P, s,
    qe, z)`` (the last two None without ``h``), shaped ``[..., C, x]``, in float32 but for ``P``
    and ``qe`` under bf16 autocast: bf16, the operand dtype ``fused.delta`` takes them in."""
    C, D = a.shape[-2:]
    E = u.shape[-1]
    shapes = [a.shape[:-2], u.shape[:-2], eta.shape[:-1]]
    for x in (h, dx):
        if x is not None:
            shapes.append(x.shape[:-2])
    batch = torch.broadcast_shapes(*shapes)
    M = 1
    for n in batch:
        M *= n

    def flat(x: Tensor, tail: tuple[int, ...], keep: bool = False) -> Tensor:
        if not (keep and x.dtype in READS):
            x = x.to(torch.float32)
        return torch.broadcast_to(x, (*batch, *tail)).reshape(M, *tail).contiguous()

    read = h is not None
    prec, tprec = _precisions(a.device.type)
    low = precision(a.device.type) == "bf16"  # fused.delta's operand dtype: bf16
    empty = a.new_empty(0, dtype=torch.float32)
    p, s, qe, z, _ = delta_chunks(
        flat(a, (C, D), True), flat(u, (C, E), True), flat(h, (C, D), True) if read else empty,
        flat(eta, (C,)), flat(dx, (C + 1, C + 1)) if dx is not None else empty, read, low, prec,
        tprec, neg_u,
    )  # fmt: skip

    def back(x: Tensor, last: int) -> Tensor:
        return x.view(*batch, C, last)

    if not read:
        return back(p, D), back(s, E), None, None
    return back(p, D), back(s, E), back(qe, D), back(z, E)


def reference(a: Tensor, u: Tensor, h: Tensor | None, eta: Tensor, dx: Tensor | None,
              neg_u: bool = False):
    """The module's equations in plain torch (autograd, any dtype): ``(P, s, qe, z)``."""
    C = a.shape[-2]
    if neg_u:
        u = -u
    if dx is None:
        idx = torch.arange(C + 1, device=a.device)
        dx = (idx[:, None] >= idx[None, :]).to(a.dtype)
    A, Ap = dx[..., 1:, 1:], dx[..., :-1, 1:]
    gam, gamp = dx[..., 1:, 0], dx[..., :-1, 0]
    K = (eta[..., :, None] * Ap * (a @ a.mT)).tril(-1)
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    T = torch.linalg.solve_triangular(eye + K, torch.broadcast_to(eye, K.shape), upper=False)
    v = eta[..., None] * u
    P = -T @ ((eta * gamp)[..., None] * a)
    Tv = T @ v
    if h is None:
        return P, -Tv, None, None
    hA = A.tril() * (h @ a.mT)
    return P, -Tv, gam[..., None] * h + hA @ P, -hA @ Tv
