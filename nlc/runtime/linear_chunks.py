"""Every chunk of a linear memory at once: the delta rule (``dgd`` on ``dot``) without a chunk loop.

``nlc.runtime.chunk.chunk_step`` computes one chunk from its chunk-start weights ``W_0``; a
sequence of ``n`` chunks is ``n`` such steps in a row, each a few dozen small operations (the
delta rule at B 8, T 2048, H 16, D 128, period 64: 32 steps, launch-bound eagerly, and a long
compile when unrolled). For a **linear** memory whose inner gradients do not depend on the
weights (objective ``dot``: ``g_t = -v_t k_t^T``) and a rule without momentum (``gd`` or
``dgd``), everything in a chunk except ``W_0`` itself depends only on the chunk's tokens and
gates, and the chunk is *affine* in ``W_0``. With ``chunk``'s notation (``A``, ``gamma``, the
preconditioner's unit-lower-triangular system ``(I + K) w = R``), ``R = -eta' gamma_prev (a
W_0^T) + R_free``, so the system's solution splits as ``w = P W_0^T + w_free`` with

    P      = (I + K)^{-1} diag(-eta' gamma_prev) a            [C, in]
    w_free = (I + K)^{-1} R_free                                [C, out]

and the chunk's read and end state are

    y      = Qeff W_0^T + z_free,   Qeff = gamma * q + (A o (q a^T)) P       (causal read)
    W_end  = W_0 M + F,             M = gamma_end I + (A_end * P)^T a,
                                    F = -sum_s A_end[s] eta_s u_s a_s^T + (A_end * w_free)^T a.

``M`` is the identity scaled plus a rank-``C`` term: the recurrence forms it as an ``[in, in]``
matrix where ``2 C >= in`` and applies its factors otherwise (``C`` much smaller than ``in``:
``2 C in^2`` per chunk instead of ``in^3``).

:func:`sequence` computes ``P, w_free, Qeff, z_free, M, F`` for all chunks at once (batched
products; each chunk's ``(I + K)^{-1}`` from one batched triangular solve against the identity,
:func:`solve_unit_lower`, or on a GPU one Triton program a matrix, ``nlc.runtime.fused.triangular``),
then runs the only sequential part, ``W_{c+1} = W_c M_c + F_c`` (in
float32 with autocast off, so the state is never rounded to bf16; ``_StateRecurrence``, whose
backward runs only the state's gradient chunk after chunk), and reads every chunk with one
batched product. The values are ``chunk_step``'s chunk after chunk, up to rounding (tested against the per-token
reference in float64, values and gradients). ``gd`` is the case ``P = 0``; a chunk read
(``read="chunk"``) is ``Qeff = q, z_free = 0``.

For ``dgd`` in float32 on a GPU (``nlc.runtime.fused.delta.applies``: ``in``, ``out`` and ``C``
powers of two from 16, ``in`` at most 256, ``C`` at most 128) the sequential part and the read of the state run instead as one Triton kernel each way
(``nlc.runtime.fused.delta``), without forming ``M`` or ``F``: the chunk's corrected values ``r =
P W_c^T + w_free`` and ``W_{c+1} = gamma_end W_c + (A_end * r - A_end eta u)^T a``, the same
chunk map. The delta-rule op at B 8, T 2048, H 16, D 128, period 64 ran 5.11 ms a step against
7.09 ms with ``_StateRecurrence`` (H200, ``benchmarks/RESULTS.md``).

Where ``fused.delta_chunks`` applies too (``in``, ``out`` and ``C`` powers of two from 16, ``C``
at most 64, ``in`` and ``out`` at most 1,024), each chunk's own part (``K``, its inverse, ``P``,
``w_free - v`` and the read's ``Qeff``, ``z_free``) runs as one Triton program a chunk each way
instead of ``_Coeffs``' matrices and the batched products (:func:`_fused_sequence`; 4.83 ms
against 5.20 at the shape above, same run; ``NLC_DELTA_CHUNKS=0``, or ``NLC_LINEAR_INVERSE=solve``,
keeps the batched products). There ``F``'s term folds into the chunk's write, the read's
state-free part is added inside the recurrence kernel, and a memory without decay builds no
decay matrix (3.73 ms a step at the shape above, H200). Under bf16 autocast, keys, targets and
queries in bf16 (a model's projections) reach both kernels as they are, with no float32 copies
and no casts of their gradients (:func:`keeps_operands`; 3.21 ms against 3.73 in one run); the
keys' gradient is then the sum of two bf16 parts (the chunk kernel's and the recurrence's)
instead of one float32 sum rounded once.

The products ``a a^T`` and ``q a^T`` go through ``_mm_nt``, whose backward gives both gradients in
their operands' own row-major layout (autograd's ``(x^T g)^T`` made compiled code sum the keys'
gradient across strides).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused import delta as _delta
from .fused import delta_chunks as _chunks
from .fused import triangular as _triangular

__all__ = ["applies", "run", "sequence", "solve_unit_lower"]


def applies(spec, objective: str, rule, read: str, n_chunks: int, device) -> bool:
    """Whether :func:`sequence` computes this memory: ``linear``, objective ``dot``, rule ``gd`` or
    ``dgd`` without momentum, at least two chunks, on a CUDA device.

    ``NLC_LINEAR_CHUNKS``: ``auto`` (default) on CUDA only, ``1`` on any device, ``0`` never. On a
    GPU the chunk loop is launch-bound and this form wins (the delta-rule op at B 8, T 2048, H 16,
    D 128, period 64, compiled: 2.11M tokens/s against 96k eager chunk by chunk on an H200); on a CPU, compute-bound, it did the
    same work slower (0.77-0.90x the loop, ``benchmarks/cpu_delta.py``)."""
    mode = os.environ.get("NLC_LINEAR_CHUNKS", "auto")
    on = mode == "1" or (mode != "0" and torch.device(device).type == "cuda")
    return (
        on
        and spec.kind == "linear"
        and objective == "dot"
        and rule.kind in ("gd", "dgd")
        and not rule.uses_momentum
        and read in ("chunk", "causal")
        and n_chunks >= 2
    )


class _UnitLowerInverse(torch.autograd.Function):
    """``(I + K)^{-1}`` of a strictly lower triangular ``K`` ``[..., C, C]``: forward one batched
    triangular solve against the identity, or where ``fused.triangular.applies`` (float32 on a GPU)
    its Triton kernel; backward ``dK = -tril(X^T dX X^T, -1)`` (two products, no second solve)."""

    @staticmethod
    def forward(K: Tensor) -> Tensor:
        if _triangular.applies(K):  # one Triton program a matrix (on a GPU)
            return _triangular.unit_lower_inverse(K)
        eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device).expand(K.shape)
        return torch.linalg.solve_triangular(K, eye, upper=False, unitriangular=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, dX: Tensor) -> Tensor:
        (X,) = ctx.saved_tensors
        return -(X.mT @ dX @ X.mT).tril(-1)


_AUTOCAST = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (not float64)


class _ProductNT(torch.autograd.Function):
    """``x @ y^T`` (batched) whose backward gives each gradient in its operand's own layout:
    ``dx = g y``, ``dy = g^T x``, both row-major. Autograd through ``x @ y.mT`` forms ``dy`` as
    ``(x^T g)^T``, a transposed tensor that every later sum of ``y``'s gradient reads across its
    rows (on an H200, 0.5 ms of the delta-rule op's step went to one such sum of the keys'
    gradient). The products run under the autocast state of the forward."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(x, y)
        dev = x.device.type
        ctx.amp = on, dt = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        if on and x.dtype in _AUTOCAST and y.dtype in _AUTOCAST:  # cast before the transpose:
            x, y = x.to(dt), y.to(dt)  # y^T stays a view of one cast copy, not a second one
        return x @ y.mT

    @staticmethod
    def backward(ctx, g: Tensor):
        x, y = ctx.saved_tensors
        on, dt = ctx.amp
        dx = dy = None
        with torch.autocast(x.device.type, dtype=dt, enabled=on):
            if ctx.needs_input_grad[0]:
                dx = (g @ y).to(x.dtype)
            if ctx.needs_input_grad[1]:
                dy = (g.mT @ x).to(y.dtype)
        return dx, dy


class _Gram(torch.autograd.Function):
    """``x @ x^T`` with ``dx = (g + g^T) x`` in ``x``'s layout (:class:`_ProductNT` for one
    operand)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        dev = x.device.type
        ctx.amp = on, dt = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        if on and x.dtype in _AUTOCAST:
            x = x.to(dt)
        return x @ x.mT

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        on, dt = ctx.amp
        with torch.autocast(x.device.type, dtype=dt, enabled=on):
            return ((g + g.mT) @ x).to(x.dtype)


def _mm_nt(x: Tensor, y: Tensor | None = None) -> Tensor:
    """``x @ y^T`` (``y`` None: ``x @ x^T``), gradients in the operands' layouts."""
    return _Gram.apply(x) if y is None else _ProductNT.apply(x, y)


def solve_unit_lower(K: Tensor, rhs: Tensor) -> Tensor:
    """``(I + K)^{-1} rhs`` for a strictly lower triangular ``K`` ``[..., C, C]``, ``rhs`` ``[..., C, m]``,
    in float32 or wider with autocast off.

    The inverse comes from :class:`_UnitLowerInverse` (one batched solve with ``C`` right-hand
    sides, not ``m``, or the Triton kernel on a GPU), then one product applies it."""
    dt = torch.promote_types(K.dtype, torch.float32)
    with torch.autocast(K.device.type, enabled=False):
        inv = _UnitLowerInverse.apply(K.to(dt))
        return (inv @ rhs.to(dt)).to(rhs.dtype)


class _StateRecurrence(torch.autograd.Function):
    """The chunk-to-chunk recurrence ``W_{c+1} = g_c W_c + (W_c L_c) R_c + F_c`` for ``c < n``.

    Inputs (one batch shape ``...`` for all): ``W0`` ``[..., out, in]``; ``g`` ``[..., n]`` or
    ``None`` (no ``g_c W_c`` term); ``L`` ``[..., n, in, r]`` or ``None`` (no product term);
    ``R`` ``[..., n, r, in]`` or ``None`` (then ``r = in`` and the term is ``W_c L_c``); ``F``
    ``[..., n, out, in]``. Returns the chunk-start states ``[..., n, out, in]`` (``W_0 ... W_{n-1}``)
    and ``W_n``.

    Only the state's gradient runs chunk after chunk backward (one product per chunk, or two in
    factors); the gradients of ``g, L, R, F`` come from it afterwards in batched products. Autograd
    through the loop itself would instead scatter each chunk's gradient into a full-size tensor."""

    @staticmethod
    def forward(W0: Tensor, g: Tensor | None, L: Tensor | None, R: Tensor | None, F_: Tensor):
        W = W0
        starts = []
        for c in range(F_.shape[-3]):
            starts.append(W)
            nxt = F_[..., c, :, :]
            if L is not None:
                WL = W @ L[..., c, :, :]
                nxt = nxt + (WL @ R[..., c, :, :] if R is not None else WL)
            if g is not None:
                nxt = nxt + g[..., c, None, None] * W
            W = nxt
        return torch.stack(starts, dim=-3), W

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, g, L, R, _ = inputs
        ctx.save_for_backward(output[0], g, L, R)

    @staticmethod
    def backward(ctx, dWs: Tensor | None, dWn: Tensor | None):
        Ws, g, L, R = ctx.saved_tensors
        n = Ws.shape[-3]
        G = dWn if dWn is not None else torch.zeros_like(Ws[..., 0, :, :])
        nexts = [None] * n  # dL/dW_{c+1}, all of it, for every c
        for c in range(n - 1, -1, -1):
            nexts[c] = G
            back = torch.zeros_like(G) if L is None and g is None else None
            if L is not None:
                GR = G @ R[..., c, :, :].mT if R is not None else G
                back = GR @ L[..., c, :, :].mT
            if g is not None:
                gG = g[..., c, None, None] * G
                back = gG if back is None else back + gG
            G = back if dWs is None else back + dWs[..., c, :, :]
        Gn = torch.stack(nexts, dim=-3)
        dg = (Ws * Gn).sum((-2, -1)) if g is not None and ctx.needs_input_grad[1] else None
        dL = dR = None
        if L is not None:
            if R is None:
                dL = Ws.mT @ Gn
            else:
                dL = Ws.mT @ (Gn @ R.mT)
                dR = (Ws @ L).mT @ Gn
        return G, dg, dL, dR, Gn


def sequence(spec, rule, W0: Tensor, k: Tensor, target: Tensor, q: Tensor | None, eta: Tensor,
             alpha: Tensor | None, C: int, read: str) -> tuple[Tensor | None, Tensor]:
    """``n = T / C`` full chunks of a linear memory (``applies``), all at once.

    ``W0`` ``[..., out, in]`` (broadcast to the keys' batch); keys ``k`` and queries ``q``
    ``[..., T, in]``, targets ``[..., T, out]``, gates ``eta``, ``alpha`` ``[..., T]`` (``alpha``
    ``None``: no decay), in the compute dtype (``chunk._prepare``; keys, targets and queries may
    be in a lower one, cast here unless both kernels read them as they are: :func:`keeps_operands`);
    ``T`` a multiple of ``C``. Returns ``(y [..., T, out] or None without queries, W at the end
    [..., out, in])``.
    """
    from .chunk import _Coeffs

    T = k.shape[-2]
    n = T // C
    dt = W0.dtype
    eta = eta.unflatten(-1, (n, C))
    alpha = alpha.unflatten(-1, (n, C)) if alpha is not None else None
    dgd = rule.kind == "dgd"
    din, dout = k.shape[-1], target.shape[-1]
    fused = dgd and dt == torch.float32 and _fused_applies(din, dout, C, n, _batch_size(W0, k), k.device)
    if not (fused and keeps_operands(k, target, q)):
        k, target = k.to(dt), target.to(dt)
        q = q.to(dt) if q is not None else None
    a = k.unflatten(-2, (n, C))  # [..., n, C, in]
    if dgd and rule.dgd_form == "normalized":
        eta = eta / (1.0 + eta * a.to(dt).square().sum(-1))
    if fused:  # the targets as they are: the chunk kernel takes them for -u
        return _fused_sequence(a, target.unflatten(-2, (n, C)), eta, alpha, W0, q, n, C, read)
    u = -target.unflatten(-2, (n, C))  # dl/dy of the dot objective: [..., n, C, out]
    full = dgd or read == "causal"
    co = _Coeffs(alpha, None, C, momentum=False, full=full, dgd=dgd, dtype=dt, device=k.device)

    def apply(coef: Tensor, ha: Tensor) -> Tensor:  # sum_s coef[t, s] g_s h_t, g_s = u_s a_s^T
        return (coef * ha) @ u  # ha = h a^T (``_mm_nt``)

    if dgd:
        geta = co.G * eta[..., None, :]
        geta_prev = F.pad(geta[..., :-1, :], (0, 0, 1, 0))
        aa = _mm_nt(a)
        K = eta[..., :, None] * co.A_prev * aa
        rhs = torch.cat([(-eta * co.gam_prev)[..., None] * a, eta[..., None] * apply(geta_prev, aa)], dim=-1)
        X = solve_unit_lower(K, rhs.to(K.dtype))
        P, w_free = X[..., : a.shape[-1]], X[..., a.shape[-1]:]
    if dgd and dt == torch.float32 and _delta.applies(din, dout, C, n, _batch_size(W0, k), k.device):
        return _kernel_sequence(co, a, u, eta, geta, apply, X, W0, q, n, C, read)
    # the chunk's end state, affine in its start state: W_end = W_0 M + F with
    # M = gamma_end I + U^T a, U = A_end * P (rank C): formed as an [in, in] matrix when that is
    # cheaper per chunk (2 C >= in: one product of in^3 in the loop), else applied in its factors
    # (2 C in^2 per chunk: gamma_end W + (W U^T) a)
    Fc = -(u * (co.G_end * eta)[..., None]).mT @ a  # -sum_s A_end[s] eta_s u_s a_s^T
    gam_end = torch.broadcast_to(co.gam_end, Fc.shape[:-2])  # no decay: a scalar 1
    U = P * co.A_end[..., None] if dgd else None
    if dgd:
        Fc = Fc + (w_free * co.A_end[..., None]).mT @ a
    dense = dgd and 2 * C >= din
    M = None
    if dense:
        M = gam_end[..., None, None] * torch.eye(din, dtype=dt, device=k.device) + U.mT @ a
    # the sequential part, in float32 without autocast (the state is never rounded to bf16)
    f32 = torch.promote_types(dt, torch.float32)
    with torch.autocast(k.device.type, enabled=False):
        batch = torch.broadcast_shapes(W0.shape[:-2], Fc.shape[:-3])
        W = torch.broadcast_to(W0.to(f32), (*batch, *W0.shape[-2:]))
        Fc = torch.broadcast_to(Fc.to(f32), (*batch, *Fc.shape[-3:]))
        g = L = R = None
        if dense:
            L = torch.broadcast_to(M.to(f32), (*batch, *M.shape[-3:]))
        else:
            g = torch.broadcast_to(gam_end.to(f32), (*batch, n))
            if dgd:  # gamma W + (W U^T) a
                L = torch.broadcast_to(U.to(f32).mT, (*batch, n, din, C))
                R = torch.broadcast_to(a.to(f32), (*batch, n, C, din))
        Ws, W = _StateRecurrence.apply(W, g, L, R, Fc)
        if q is None:
            return None, W
    h = q.unflatten(-2, (n, C))
    if read == "chunk":
        y = h @ Ws.mT
    else:
        ha = _mm_nt(h, a)
        hA = co.A * ha
        qeff = co.gam[..., None] * h
        z = -apply(geta if dgd else co.G * eta[..., None, :], ha)
        if dgd:  # hA [P | w_free] in one product
            hX = hA @ X
            qeff = qeff + hX[..., : a.shape[-1]]
            z = z + hX[..., a.shape[-1]:]
        y = qeff @ Ws.mT + z
    return y.flatten(-3, -2), W


def keeps_operands(k: Tensor, target: Tensor, q: Tensor | None) -> bool:
    """Whether the two kernels' path takes these keys, targets and queries in their own dtype
    (float32, bf16 or float16): the chunk kernel reads them as float32 and writes their gradients
    in their dtype; the recurrence casts the keys (and a chunk read's queries) to its products'
    operand dtype only where they differ from it (bf16 under bf16 autocast, else float32). So
    under bf16 autocast bf16 operands are copied nowhere. ``NLC_DELTA_OPERANDS=float32`` casts
    them first, as before (for comparisons)."""
    if os.environ.get("NLC_DELTA_OPERANDS", "own") == "float32":
        return False
    return all(x is None or x.dtype in _chunks.READS for x in (k, target, q))


def _batch_size(W0: Tensor, k: Tensor) -> int:
    """Memories in the batch: ``W0`` ``[..., out, in]`` against the keys ``[..., T, in]``."""
    N = 1
    for s in torch.broadcast_shapes(W0.shape[:-2], k.shape[:-2]):
        N *= s
    return N


def _fused_applies(din: int, dout: int, C: int, n: int, N: int, device) -> bool:
    """Both kernels take this memory: the recurrence (``fused.delta``) and each chunk's own part
    (``fused.delta_chunks``). ``NLC_LINEAR_INVERSE=solve`` asks for the batched products with
    cuBLAS's solve instead (for comparisons)."""
    if os.environ.get("NLC_LINEAR_INVERSE", "kernel") == "solve":
        return False
    return _delta.applies(din, dout, C, n, N, device) and _chunks.applies(din, dout, C, N * n, device)


def _fused_sequence(a, target, eta, alpha, W0, q, n: int, C: int, read: str):
    """The dgd chunks in two kernels each way (keys, targets and queries as they come: float32,
    bf16 or float16): every chunk's own part at once
    (``fused.delta_chunks``: ``P``, ``s = w_free - v`` and the read's ``Qeff, z_free`` from the
    keys, values, queries, rates and the chunk's decay matrix, without ``_Coeffs``' matrices or the
    batched products), then the recurrence and the read of the state (``fused.delta``). The
    chunk's write ``A_end * (r - v)`` (``F``'s term ``-A_end eta u`` folded in) is
    ``A_end * (P W^T + s)``: the recurrence takes ``s`` for ``w_free`` and no ``Fu``. Without decay
    the decay matrix is neither built nor read (the kernels use its constant form)."""
    from .chunk import decay_matrix

    h = q.unflatten(-2, (n, C)) if q is not None else None
    dt = eta.dtype  # the compute dtype (float32), whatever the keys'
    if alpha is None:
        dx = None
        gam_end = torch.ones(n, dtype=dt, device=a.device)
        Ae = torch.ones(n, C, dtype=dt, device=a.device)
    else:
        dx = decay_matrix(alpha, C, dtype=dt, device=a.device)  # [..., n, C+1, C+1]
        gam_end, Ae = dx[..., C, 0], dx[..., C, 1:]  # the decays to the chunk's end, and over it
    P, s, qe, z = _chunks.run(a, target, h if read == "causal" else None, eta, dx, neg_u=True)
    if read == "chunk":
        qe = h
    y, W = _delta.run(W0, gam_end, P, s, Ae, None, a, qe, z)  # y: qe W^T + z
    if q is None:
        return None, W
    return y.flatten(-3, -2), W


def _kernel_sequence(co, a, u, eta, geta, apply, X, W0, q, n: int, C: int, read: str):
    """The dgd recurrence and the read's state part in one kernel each way
    (``nlc.runtime.fused.delta``): ``r = P W^T + w_free`` is the chunk's solution at its start
    state, the end state ``W_end = gamma_end W + (A_end * r - A_end eta u)^T a`` (the dense ``M``
    and ``F`` above, unformed), and the read ``y = Qeff W^T + z_free``."""
    P, w_free = X[..., : a.shape[-1]], X[..., a.shape[-1]:]
    Fu = -(co.G_end * eta)[..., None] * u  # without momentum G_end is A_end
    qe = z = None
    if q is not None:
        h = q.unflatten(-2, (n, C))
        if read == "chunk":
            qe = h
        else:
            ha = _mm_nt(h, a)
            hX = (co.A * ha) @ X  # hA [P | w_free] in one product
            qe = co.gam[..., None] * h + hX[..., : a.shape[-1]]
            z = -apply(geta, ha) + hX[..., a.shape[-1]:]
    y, W = _delta.run(W0, co.gam_end, P, w_free, co.A_end, Fu, a, qe)
    if q is None:
        return None, W
    if z is not None:
        y = y + z
    return y.flatten(-3, -2), W


def run(spec, rule, weights0, k: Tensor, target: Tensor, q: Tensor | None, eta, alpha, C: int,
        read: str) -> tuple[Tensor | None, list[Tensor]]:
    """:func:`sequence` on the caller's tensors: ``weights0`` (one weight), keys, targets, queries
    and gates of the full chunks as ``chunk_step`` takes them, cast to the compute dtype
    (``chunk._prepare``; keys, targets and queries left in theirs where :func:`sequence` may keep
    them). Returns ``(y or None, [W at the end])`` in that dtype."""
    from .chunk import _prepare

    dt, W0, _, k, target, q, eta, alpha, _ = _prepare(
        weights0, None, k, target, q, eta, alpha, None, rule, operands=not keeps_operands(k, target, q)
    )
    y, w = sequence(spec, rule, W0[0], k, target, q, eta, alpha, C, read)
    return y, [w.to(dt)]
