"""Each chunk's own part of a linear memory's delta rule, one Triton program a chunk, each way.

``nlc.runtime.linear_chunks`` splits chunk ``c`` of a ``dgd`` memory on the ``dot`` objective
into a part that depends on its start state ``W_c`` and a part that does not; the recurrence over
``W_c`` runs in ``nlc.runtime.fused.delta``. This module computes the chunk-local part. With keys
``a`` ``[C, in]``, values ``u`` ``[C, out]`` (the objective's ``dl/dy = -target``), queries
``h`` ``[C, in]``, rates ``eta`` ``[C]`` and the chunk's decay matrix ``D`` ``[C+1, C+1]``
(``nlc.runtime.chunk.decay_matrix``: ``A[t, s] = D[t+1, s+1]``, ``A_prev[t, s] = D[t, s+1]``,
``gam[t] = D[t+1, 0]``, ``gam_prev[t] = D[t, 0]``):

    K      = eta[:, None] * A_prev * (a a^T)            strictly lower triangular
    T      = (I + K)^{-1}
    P      = -T ((eta * gam_prev)[:, None] * a)         [C, in]   (the part of r in W_c^T)
    wf     = v - T v,   v = eta[:, None] * u            [C, out]  (the state-free part of r)
    qe     = gam[:, None] * h + (A * h a^T) P           [C, in]   (causal read: y = qe W_c^T + z)
    z      = -(A * h a^T) T v                           [C, out]

(``wf = T K v`` in ``linear_chunks``' notation, ``T K = I - T``). One program per chunk
(``_fwd_kernel``) forms ``a a^T`` and ``h a^T``, writes ``K`` to a scratch buffer and inverts it
(``triangular.invert``), then forms the four outputs block of columns by block; ``T`` is kept for
the backward. The backward (``_bwd_kernel``), one program per chunk again, with ``gb = T^T dP'``
(``dP' = dP + (A * h a^T)^T dqe``) and ``gv = T^T dTv`` (``dTv = -dwf - (A * h a^T)^T dz``):

    dK   = -tril(gb P^T + gv (T v)^T, -1)
    dv   = dwf + gv                 du = eta dv
    da   = (dS + dS^T) a + dhA'^T h - (eta gam_prev) gb,   dS = dK * eta A_prev
    dh   = gam dqe + dhA' a,   dhA' = A * (dqe P^T - dz (T v)^T)

and the gradients of ``eta`` and of ``D`` (every entry that enters: ``A``, ``A_prev``, ``gam``,
``gam_prev``; the decay matrix's own backward takes it from there).

Precision: the products of keys and queries (``a a^T``, ``h a^T``, ``(A * h a^T) P``, ``(A * h
a^T) T v`` and their gradients) follow ``mlp2.precision`` (bf16 operands under bf16 autocast,
else TF32 or IEEE float32 by ``torch.backends.cuda.matmul.allow_tf32``); the products with ``T``
and the inverse itself stay float32 under autocast (TF32 or IEEE by the same flag; the inverse in
IEEE), as ``linear_chunks``' solve does. One exception, a Triton workaround (``_precisions``):
under bf16 autocast with TF32 on, the key and query products run TF32 too (more precise than
bf16, not less). Inputs and outputs are float32.
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

# columns of in / out per block of the kernels' products, and warps per program (a program holds
# several [C, C] float32 matrices), for the forward and the backward kernel; NLC_DELTA_CHUNKS_TUNE
# (key=N,...) overrides them, read at every call
TUNE = {"block": 32, "warps": 4, "bwd_block": 32, "bwd_warps": 4}
_ALLOWED = {"block": (16, 32, 64, 128), "warps": (1, 2, 4, 8, 16)}


def _tune() -> dict:
    return tune_from_env("NLC_DELTA_CHUNKS_TUNE", TUNE, _ALLOWED)


def applies(din: int, dout: int, C: int, N: int, device) -> bool:
    """Whether the kernels take a chunk of this shape: Triton present, a CUDA device (or
    ``NLC_FUSED=interpret``), ``NLC_DELTA_CHUNKS`` not ``0``; ``din``, ``dout`` and ``C`` powers of
    two from 16 (``C`` at most 128, ``din`` and ``dout`` at most 1,024: the kernels' loops over
    blocks of columns are unrolled); ``N`` chunks in all, int32 offsets within the tensors."""
    if not switched_on("NLC_DELTA_CHUNKS", device):
        return False
    return pow2(din, 1024) and pow2(dout, 1024) and pow2(C, 128) and N * C * max(din, dout, C + 1) < 2**31


def _precisions(device_type: str) -> tuple[str, str]:
    """The precisions of the key and query products and of the products with ``T`` (float32 even
    under autocast: TF32 or IEEE).

    Under bf16 autocast with TF32 on, **every** product runs TF32: bf16 and TF32 products in one
    of these kernels read shared memory out of range (Triton 3.6, H200: an illegal memory access
    now and then, "out-of-range shared or local address" under compute-sanitizer's memcheck, at
    every run; bf16 with IEEE, bf16 alone and TF32 alone are clean). The other way out, IEEE
    products with ``T``, made the delta-rule op 14.8 ms a step against 4.8 (``benchmarks/RESULTS.md``).
    """
    prec = precision(device_type)
    tprec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if prec == "bf16" and tprec == "tf32":
        prec = "tf32"
    return prec, tprec


if triton is not None:
    from .mlp2 import _dot
    from .triangular import invert

    @triton.jit
    def _decays(DX, m, C: tl.constexpr):
        """``A, A_prev [C, C]`` and ``gam, gam_prev [C]`` of chunk ``m`` from its decay matrix."""
        X1: tl.constexpr = C + 1
        rc = tl.arange(0, C)
        dx = DX + m * X1 * X1
        dec = tl.load(dx + (rc[:, None] + 1) * X1 + rc[None, :] + 1)
        decp = tl.load(dx + rc[:, None] * X1 + rc[None, :] + 1)
        return dec, decp, tl.load(dx + (rc + 1) * X1), tl.load(dx + rc * X1)

    @triton.jit
    def _grams(Ab, Hb, C: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, AA: tl.constexpr,
               HA: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
        """``a a^T`` (``AA``) and ``h a^T`` (``HA``), ``[C, C]``, over blocks of ``BD`` columns."""
        rc = tl.arange(0, C)
        rd = tl.arange(0, BD)
        aa = tl.zeros([C, C], tl.float32)
        ha = tl.zeros([C, C], tl.float32)
        for j in tl.static_range(D // BD):
            off = rc[:, None] * D + j * BD + rd[None, :]
            a = tl.load(Ab + off)
            if AA:
                aa += _dot(a, tl.trans(a), PREC)
            if HA:
                ha += _dot(tl.load(Hb + off), tl.trans(a), PREC)
        return aa, ha

    @triton.jit
    def _fwd_kernel(
        A, U, H, ETA, DX, KS, T, P, WF, QE, Z,
        C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
        READ: tl.constexpr, PREC: tl.constexpr, TPREC: tl.constexpr,
    ):  # fmt: skip
        m = tl.program_id(0).to(tl.int64)
        rc = tl.arange(0, C)
        rd = tl.arange(0, BD)
        re = tl.arange(0, BE)
        cc = rc[:, None] * C + rc[None, :]
        dec, decp, gam, gamp = _decays(DX, m, C)
        eta = tl.load(ETA + m * C + rc)
        aa, ha = _grams(A + m * C * D, H + m * C * D, C, D, BD, True, READ, PREC)
        tl.store(KS + m * C * C + cc, eta[:, None] * decp * aa)
        hA = dec * ha
        tl.debug_barrier()
        invert(KS + m * C * C, T + m * C * C, C, 16)
        t = tl.load(T + m * C * C + cc)
        cb = -(eta * gamp)
        for j in tl.static_range(D // BD):
            off = m * C * D + rc[:, None] * D + j * BD + rd[None, :]
            p = _dot(t, cb[:, None] * tl.load(A + off), TPREC)
            tl.store(P + off, p)
            if READ:
                tl.store(QE + off, gam[:, None] * tl.load(H + off) + _dot(hA, p, PREC))
        for j in tl.static_range(E // BE):
            off = m * C * E + rc[:, None] * E + j * BE + re[None, :]
            v = eta[:, None] * tl.load(U + off)
            tv = _dot(t, v, TPREC)
            tl.store(WF + off, v - tv)
            if READ:
                tl.store(Z + off, -_dot(hA, tv, PREC))

    @triton.jit
    def _bwd_kernel(
        A, U, H, ETA, DX, T, P, WF, DP, DWF, DQE, DZ, DA, DU, DH, DETA, DDX,
        C: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
        READ: tl.constexpr, DECAYS: tl.constexpr, PREC: tl.constexpr, TPREC: tl.constexpr,
    ):  # fmt: skip
        m = tl.program_id(0).to(tl.int64)
        rc = tl.arange(0, C)
        rd = tl.arange(0, BD)
        re = tl.arange(0, BE)
        cc = rc[:, None] * C + rc[None, :]
        X1: tl.constexpr = C + 1
        dx = DDX + m * X1 * X1  # the decay matrix's gradient, written in stages (rows overlap)
        eta = tl.load(ETA + m * C + rc)
        t = tl.load(T + m * C * C + cc)
        dec, _, _, _ = _decays(DX, m, C)
        _, ha = _grams(A + m * C * D, H + m * C * D, C, D, BD, False, READ, PREC)
        hA = dec * ha
        dhA = tl.zeros([C, C], tl.float32)
        dK = tl.zeros([C, C], tl.float32)
        deta = tl.zeros([C], tl.float32)
        # 1. the columns of in: dhA += dqe P^T, gb = T^T (dP + hA^T dqe), dK -= gb P^T
        for j in tl.static_range(D // BD):
            off = m * C * D + rc[:, None] * D + j * BD + rd[None, :]
            p = tl.load(P + off)
            dp = tl.load(DP + off)
            if READ:
                dqe = tl.load(DQE + off)
                dhA += _dot(dqe, tl.trans(p), PREC)
                dp += _dot(tl.trans(hA), dqe, PREC)
            gb = _dot(tl.trans(t), dp, TPREC)
            dK -= _dot(gb, tl.trans(p), TPREC)
        # 2. the columns of out: with Tv = v - wf, dTv = -dwf - hA^T dz, gv = T^T dTv
        for j in tl.static_range(E // BE):
            off = m * C * E + rc[:, None] * E + j * BE + re[None, :]
            u = tl.load(U + off)
            dwf = tl.load(DWF + off)
            tv = eta[:, None] * u - tl.load(WF + off)
            dtv = -dwf
            if READ:
                dz = tl.load(DZ + off)
                dhA -= _dot(dz, tl.trans(tv), PREC)
                dtv -= _dot(tl.trans(hA), dz, PREC)
            gv = _dot(tl.trans(t), dtv, TPREC)
            dv = dwf + gv
            tl.store(DU + off, eta[:, None] * dv)
            deta += tl.sum(dv * u, 1)
            dK -= _dot(gv, tl.trans(tv), TPREC)
        # 3. K = eta A_prev * aa, hA = A * ha (the grams again: fewer matrices live in 1 and 2);
        # A_prev's gradient fills rows 0..C-1 of the decays' gradient, then A's adds to rows 1..C
        dK = tl.where(rc[:, None] > rc[None, :], dK, 0.0)
        aa, ha = _grams(A + m * C * D, H + m * C * D, C, D, BD, True, READ, PREC)
        dec, decp, gam, gamp = _decays(DX, m, C)
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
        for j in tl.static_range(D // BD):
            off = m * C * D + rc[:, None] * D + j * BD + rd[None, :]
            a = tl.load(A + off)
            dp = tl.load(DP + off)
            if READ:
                dqe = tl.load(DQE + off)
                dp += _dot(tl.trans(hA), dqe, PREC)
            db = -_dot(tl.trans(t), dp, TPREC)  # b = cb a, P = -T b
            dcb += tl.sum(db * a, 1)
            da = cb[:, None] * db + _dot(dS, a, PREC)
            if READ:
                h = tl.load(H + off)
                da += _dot(tl.trans(dha), h, PREC)
                dgam += tl.sum(h * dqe, 1)
                tl.store(DH + off, gam[:, None] * dqe + _dot(dha, a, PREC))
            tl.store(DA + off, da)
        tl.store(DETA + m * C + rc, deta + dcb * gamp)
        # 5. the decays' column 0: gam_prev's gradient in rows 0..C-1, then gam's added to 1..C
        if DECAYS:
            tl.store(dx + rc * X1, dcb * eta)
            tl.debug_barrier()
            col = dx + (rc + 1) * X1
            tl.store(col, tl.load(col) + dgam)


@torch.library.custom_op("nlc::delta_chunks", mutates_args=())
def delta_chunks(
    a: Tensor, u: Tensor, h: Tensor, eta: Tensor, dx: Tensor, read: bool, prec: str, tprec: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The module's forward for ``M`` chunks: a, h ``[M, C, in]``, u ``[M, C, out]``, eta
    ``[M, C]``, dx ``[M, C+1, C+1]``, all float32 and contiguous (``read`` off: ``h`` is ignored).
    Returns ``(P [M, C, in], wf [M, C, out], qe [M, C, in], z [M, C, out], T [M, C, C])``; ``qe``
    and ``z`` are empty ``[0]`` tensors without the read; ``T`` is for the backward. ``dx`` must be
    zero above its diagonal, as ``chunk.decay_matrix``'s is: the kernels read it whole (masking it
    cost the backward 10% more register spills), and its gradient is zero there."""
    a, u, h, eta, dx = (x.contiguous() for x in (a, u, h, eta, dx))
    M, C, D = a.shape
    E = u.shape[-1]
    tune = _tune()
    BD, BE = min(D, tune["block"]), min(E, tune["block"])
    ks, t = a.new_empty(M, C, C), a.new_empty(M, C, C)
    p, wf = torch.empty_like(a), torch.empty_like(u)
    qe = torch.empty_like(a) if read else a.new_empty(0)
    z = torch.empty_like(u) if read else a.new_empty(0)
    if M:
        with _device(a):
            _fwd_kernel[(M,)](
                a, u, h if read else a, eta, dx, ks, t, p, wf, qe if read else p, z if read else wf,
                C, D, E, BD, BE, read, prec, tprec, num_warps=tune["warps"],
            )  # fmt: skip
    return p, wf, qe, z, t


@delta_chunks.register_fake
def _(a, u, h, eta, dx, read, prec, tprec):
    M, C, _ = a.shape
    qe = a.new_empty(a.shape) if read else a.new_empty(0)
    z = u.new_empty(u.shape) if read else a.new_empty(0)
    return a.new_empty(a.shape), u.new_empty(u.shape), qe, z, a.new_empty(M, C, C)


@torch.library.custom_op("nlc::delta_chunks_backward", mutates_args=())
def delta_chunks_backward(
    a: Tensor, u: Tensor, h: Tensor, eta: Tensor, dx: Tensor, t: Tensor, p: Tensor, wf: Tensor,
    dp: Tensor, dwf: Tensor, dqe: Tensor, dz: Tensor, read: bool, decays: bool, prec: str,
    tprec: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(a, u, h, eta, dx)`` of :func:`delta_chunks` from those of ``P, wf`` and (with
    the read) ``qe, z``; ``dh`` is an empty ``[0]`` tensor without the read, ``ddx`` without
    ``decays`` (the decay matrix needs no gradient)."""
    a, u, h, eta, dx, t, p, wf, dp, dwf, dqe, dz = (
        x.contiguous() for x in (a, u, h, eta, dx, t, p, wf, dp, dwf, dqe, dz)
    )
    M, C, D = a.shape
    E = u.shape[-1]
    tune = _tune()
    BD, BE = min(D, tune["bwd_block"]), min(E, tune["bwd_block"])
    da, du = torch.empty_like(a), torch.empty_like(u)
    dh = torch.empty_like(a) if read else a.new_empty(0)
    deta = torch.empty_like(eta)
    ddx = torch.empty_like(dx) if decays else dx.new_empty(0)
    if M:
        with _device(a):
            _bwd_kernel[(M,)](
                a, u, h if read else a, eta, dx, t, p, wf, dp, dwf, dqe if read else dp,
                dz if read else dwf, da, du, dh if read else da, deta, ddx if decays else deta,
                C, D, E, BD, BE, read, decays, prec, tprec, num_warps=tune["bwd_warps"],
            )  # fmt: skip
    return da, du, dh, deta, ddx


@delta_chunks_backward.register_fake
def _(a, u, h, eta, dx, t, p, wf, dp, dwf, dqe, dz, read, decays, prec, tprec):
    dh = a.new_empty(a.shape) if read else a.new_empty(0)
    ddx = dx.new_empty(dx.shape) if decays else dx.new_empty(0)
    return a.new_empty(a.shape), u.new_empty(u.shape), dh, eta.new_empty(eta.shape), ddx


def _setup_context(ctx, inputs, output):
    a, u, h, eta, dx, read, prec, tprec = inputs
    p, wf, _, _, t = output
    ctx.save_for_backward(a, u, h, eta, dx, t, p, wf)
    ctx.read, ctx.prec, ctx.tprec = read, prec, tprec
    ctx.mark_non_differentiable(t)  # kept for the backward only
    ctx.set_materialize_grads(False)


def _backward(ctx, dp, dwf, dqe, dz, _dt):
    a, u, h, eta, dx, t, p, wf = ctx.saved_tensors

    def grad(g: Tensor | None, like: Tensor) -> Tensor:
        return torch.zeros_like(like) if g is None else g.contiguous()

    read, decays = ctx.read, ctx.needs_input_grad[4]
    empty = a.new_empty(0)
    da, du, dh, deta, ddx = delta_chunks_backward(
        a, u, h, eta, dx, t, p, wf, grad(dp, p), grad(dwf, wf), grad(dqe, a) if read else empty,
        grad(dz, u) if read else empty, read, decays, ctx.prec, ctx.tprec,
    )  # fmt: skip
    return da, du, dh if read else None, deta, ddx if decays else None, None, None, None


delta_chunks.register_autograd(_backward, setup_context=_setup_context)


def run(a: Tensor, u: Tensor, h: Tensor | None, eta: Tensor, dx: Tensor
        ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """:func:`delta_chunks` on the caller's tensors: keys ``a`` ``[..., C, in]``, values ``u``
    ``[..., C, out]``, queries ``h`` ``[..., C, in]`` or None (no causal read), rates ``eta``
    ``[..., C]`` and decay matrices ``dx`` ``[..., C+1, C+1]`` (zero above the diagonal, as
    ``chunk.decay_matrix`` makes them), batch shapes that broadcast, any
    float dtype (computed in float32). Returns ``(P, wf, qe, z)`` (the last two None without
    ``h``) in float32, shaped ``[..., C, x]``."""
    C, D = a.shape[-2:]
    E = u.shape[-1]
    shapes = [a.shape[:-2], u.shape[:-2], eta.shape[:-1], dx.shape[:-2]]
    if h is not None:
        shapes.append(h.shape[:-2])
    batch = torch.broadcast_shapes(*shapes)
    M = 1
    for s in batch:
        M *= s

    def flat(x: Tensor, tail: tuple[int, ...]) -> Tensor:
        x = torch.broadcast_to(x.to(torch.float32), (*batch, *tail))
        return x.reshape(M, *tail).contiguous()

    read = h is not None
    prec, tprec = _precisions(a.device.type)
    p, wf, qe, z, _ = delta_chunks(
        flat(a, (C, D)), flat(u, (C, E)), flat(h, (C, D)) if read else a.new_empty(0, dtype=torch.float32),
        flat(eta, (C,)), flat(dx, (C + 1, C + 1)), read, prec, tprec,
    )  # fmt: skip

    def back(x: Tensor, last: int) -> Tensor:
        return x.view(*batch, C, last)

    if not read:
        return back(p, D), back(wf, E), None, None
    return back(p, D), back(wf, E), back(qe, D), back(z, E)


def reference(a: Tensor, u: Tensor, h: Tensor | None, eta: Tensor, dx: Tensor):
    """The module's equations in plain torch (autograd, any dtype): ``(P, wf, qe, z)``."""
    A, Ap = dx[..., 1:, 1:], dx[..., :-1, 1:]
    gam, gamp = dx[..., 1:, 0], dx[..., :-1, 0]
    K = (eta[..., :, None] * Ap * (a @ a.mT)).tril(-1)
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    T = torch.linalg.solve_triangular(eye + K, torch.broadcast_to(eye, K.shape), upper=False)
    v = eta[..., None] * u
    P = -T @ ((eta * gamp)[..., None] * a)
    Tv = T @ v
    if h is None:
        return P, v - Tv, None, None
    hA = A.tril() * (h @ a.mT)
    return P, v - Tv, gam[..., None] * h + hA @ P, -hA @ Tv
