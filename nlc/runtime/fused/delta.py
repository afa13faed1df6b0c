"""The chunk-to-chunk recurrence of a linear memory's delta rule as one Triton kernel each way.

``nlc.runtime.linear_chunks`` computes every chunk's state-free part at once in batched
products; what is left is sequential. With ``P, wf`` the chunk system's solution split into its
parts proportional to and free of the chunk-start state ``W_c`` (``[C, in]``, ``[C, out]``),
``a`` the keys, ``Ae`` the decays from each token to the chunk's end, ``Fu`` the state-free part
of each token's write and ``g`` the decay over the whole chunk, chunk ``c`` is

    r_c     = P_c W_c^T + wf_c                      [C, out]  the corrected values
    y_c     = Qe_c W_c^T                            [C, out]  the state's part of the read
    W_{c+1} = g_c W_c + (Ae_c * r_c + Fu_c)^T a_c   [out, in]

(``linear_chunks``' read's state-free part ``z`` may be given: ``y_c = Qe_c W_c^T + z_c``, added
as ``y`` is written, the gradient of ``z`` being ``y``'s). ``Fu`` may be left out (no such
term): ``linear_chunks`` folds it into ``wf`` when each chunk's own part runs in
``fused.delta_chunks`` (``Ae * r + Fu = Ae * (P W^T + wf - v)``), which saves writing ``Fu`` and
its gradient, a tensor the size of the values each. :func:`delta_recurrence` runs all
``n`` chunks in one kernel launch (``_fwd_kernel``): a program per (memory, block of output rows)
keeps its rows of the state in registers in float32 from the first chunk to the last, and writes
each chunk's start state, ``r`` and ``y``. Its backward is one launch for the part that must run
chunk after chunk (``_bwd_kernel``, the chunks in reverse): a program carries its rows of
``G_{c+1} = dL/dW_{c+1}``,

    de = a G^T,   dr = Ae * de,   G_c = g G + dr^T P + dy^T Qe,

and writes ``G_{c+1}``, ``de`` (``Fu``'s gradient, when given), ``dr`` (``wf``'s), and its
rows' parts of ``dg = <W_c, G_{c+1}>`` and ``dAe = sum_rows(r * de)``. The gradients that sum over output rows
come after it, every chunk at once in batched products: ``dP = dr W_c``, ``dQe = dy W_c`` and
``da = (Ae * r + Fu) G_{c+1}`` (their operands written by the kernel in the products' dtype,
and their results in it too: the gradients of ``P``, ``a`` and ``Qe`` in those operands' dtype).

Precision follows ``mlp2.precision``: under bf16 autocast the products take bf16 operands (the
state's rows rounded as a product's operand, as autocast would), and the chunk-start states and
``G`` are kept in bf16 for the batched products (so ``dg`` sums float32 products of bf16 start
states); otherwise TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is on, IEEE float32 when
not. The running state, the running ``G`` and the sums stay float32; inputs are float32 but for
``P``, ``a`` and ``Qe`` (a float64 computation keeps ``linear_chunks``' own recurrence).
:func:`reference` is the same recurrence in plain torch (any dtype, autograd): ``tests/runtime/test_delta_kernel.py`` checks
the kernels, in float32, against it in float64 (values and all gradients) on CUDA and through
Triton's interpreter, and under bf16 autocast on CUDA (the interpreter's bf16 products are not
trustworthy).

The chunk count ``n`` is a compile-time constant of the kernels (Triton's interpreter cannot
loop over a runtime count with numpy 2): one compile per sequence length.

``NLC_DELTA_KERNEL=0`` keeps ``linear_chunks``' own recurrence (for comparisons).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from ...diagnostics import SettingError
from ._triton import tl, triton
from .accumulate import product as _product
from .mlp2 import precision

__all__ = ["applies", "delta_recurrence", "reference", "run"]


# rows of the state per program, warps per program, and software-pipeline stages (the kernels'
# loads of each chunk's operands; 1: none), for the forward and the backward kernel; chosen on an
# H200 (benchmarks/RESULTS.md); NLC_DELTA_TUNE (key=N,...) overrides them, read at every call
TUNE = {"rows": 32, "warps": 4, "stages": 2, "bwd_rows": 32, "bwd_warps": 4, "bwd_stages": 2}


_ALLOWED = {"rows": (16, 32, 64, 128), "warps": (1, 2, 4, 8, 16), "stages": (1, 2, 3, 4)}


def _tune() -> dict:
    return tune_from_env("NLC_DELTA_TUNE", TUNE, _ALLOWED)


def tune_from_env(name: str, defaults: dict, allowed: dict) -> dict:
    """``defaults`` with the overrides of the environment variable ``name`` (``key=N,...``; a key
    ``bwd_x`` takes ``x``'s values); a key or value not allowed is a ``SettingError``."""
    out = dict(defaults)
    for item in filter(None, os.environ.get(name, "").split(",")):
        key, _, value = (x.strip() for x in item.partition("="))
        ok = allowed.get(key.removeprefix("bwd_"), ()) if key in out else ()
        if not value.isdigit() or int(value) not in ok:
            values = "; ".join(f"{k} one of {', '.join(map(str, v))}" for k, v in allowed.items())
            raise SettingError(
                f"{name}: expected key=N,... with keys {', '.join(defaults)}; {values}; got "
                f"{item!r} (unset it for the defaults)"
            )
        out[key] = int(value)
    return out


def applies(din: int, dout: int, C: int, n: int, N: int, device) -> bool:
    """Whether the kernels take this recurrence: Triton present, a CUDA device (or
    ``NLC_FUSED=interpret``), ``NLC_DELTA_KERNEL`` not ``0``; ``din``, ``dout`` and ``C`` powers of
    two from 16 (``din`` at most 256, ``C`` at most 128); int32 offsets."""
    if not switched_on("NLC_DELTA_KERNEL", device):
        return False
    return pow2(din, 256) and pow2(dout, 1 << 14) and pow2(C, 128) and N * n * max(din, dout) * max(C, dout) < 2**31


def switched_on(switch: str, device) -> bool:
    """Triton present, a CUDA device (or ``NLC_FUSED=interpret``), and neither ``NLC_FUSED`` nor
    the kernel's own ``switch`` set to ``0``."""
    mode = os.environ.get("NLC_FUSED", "1")
    if triton is None or mode == "0" or os.environ.get(switch, "1") == "0":
        return False
    return torch.device(device).type == "cuda" or mode == "interpret"


def pow2(x: int, hi: int) -> bool:
    """``x`` a power of two from 16 to ``hi``."""
    return 16 <= x <= hi and x & (x - 1) == 0


def _device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


if triton is not None:
    from .mlp2 import _dot  # a product with bf16, TF32 or IEEE float32 operands

    @triton.jit
    def _tiles(C: tl.constexpr, DI: tl.constexpr, DO: tl.constexpr, BO: tl.constexpr):
        """This program's memory ``b`` and its block ``ob`` of state rows: ``(b, ob, token offsets rc,
        [BO, DI] offsets within a state, [C, DI] and [C, BO] offsets within a chunk)``. One grid
        axis (no 65,535 cap), a memory's row blocks side by side."""
        pid = tl.program_id(0)
        b = pid // (DO // BO)
        ob = pid % (DO // BO)
        ro = ob * BO + tl.arange(0, BO)
        ri = tl.arange(0, DI)
        rc = tl.arange(0, C)
        return b, ob, rc, ro[:, None] * DI + ri[None, :], rc[:, None] * DI + ri[None, :], rc[:, None] * DO + ro[None, :]

    @triton.jit
    def _fwd_kernel(
        W0, GAM, P, WF, AE, FU, A, QE, Z, WS, R, Y, WN,
        n: tl.constexpr, C: tl.constexpr, DI: tl.constexpr, DO: tl.constexpr, BO: tl.constexpr,
        READ: tl.constexpr, HAS_FU: tl.constexpr, HAS_Z: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        b, _, rc, s_off, t_in, t_out = _tiles(C, DI, DO, BO)
        W = tl.load(W0 + b * DO * DI + s_off).to(tl.float32)
        for c in range(n):
            bc = b * n + c
            tl.store(WS + bc * DO * DI + s_off, W.to(WS.dtype.element_ty))
            p = tl.load(P + bc * C * DI + t_in)
            r = _dot(p, tl.trans(W), PREC) + tl.load(WF + bc * C * DO + t_out).to(tl.float32)
            tl.store(R + bc * C * DO + t_out, r)
            if READ:
                qe = tl.load(QE + bc * C * DI + t_in)
                y = _dot(qe, tl.trans(W), PREC)
                if HAS_Z:
                    y += tl.load(Z + bc * C * DO + t_out).to(tl.float32)
                tl.store(Y + bc * C * DO + t_out, y)
            e = tl.load(AE + bc * C + rc).to(tl.float32)[:, None] * r
            if HAS_FU:
                e += tl.load(FU + bc * C * DO + t_out).to(tl.float32)
            a = tl.load(A + bc * C * DI + t_in)
            g = tl.load(GAM + bc).to(tl.float32)
            W = g * W + _dot(tl.trans(e), a, PREC)
        tl.store(WN + b * DO * DI + s_off, W)

    @triton.jit
    def _bwd_kernel(
        GAM, P, AE, FU, A, QE, WS, R, DY, DWN, DW0, GN, DGAM_P, DAE_P, DE, DR, DRO, DYO, EO, N,
        n: tl.constexpr, C: tl.constexpr, DI: tl.constexpr, DO: tl.constexpr, BO: tl.constexpr,
        READ: tl.constexpr, HAS_FU: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        b, ob, rc, s_off, t_in, t_out = _tiles(C, DI, DO, BO)
        G = tl.load(DWN + b * DO * DI + s_off).to(tl.float32)
        for i in range(n):
            bc = b * n + (n - 1 - i)
            pc = ob * N * n + bc  # this block's part of a sum over output rows
            ws = tl.load(WS + bc * DO * DI + s_off).to(tl.float32)
            tl.store(DGAM_P + pc, tl.sum(tl.sum(ws * G, 1), 0))
            tl.store(GN + bc * DO * DI + s_off, G.to(GN.dtype.element_ty))
            a = tl.load(A + bc * C * DI + t_in)
            de = _dot(a, tl.trans(G), PREC)  # [C, BO]
            r = tl.load(R + bc * C * DO + t_out)
            tl.store(DAE_P + pc * C + rc, tl.sum(r * de, 1))
            ae = tl.load(AE + bc * C + rc).to(tl.float32)
            e = ae[:, None] * r
            if HAS_FU:
                tl.store(DE + bc * C * DO + t_out, de)
                e += tl.load(FU + bc * C * DO + t_out).to(tl.float32)
            tl.store(EO + bc * C * DO + t_out, e.to(EO.dtype.element_ty))
            dr = ae[:, None] * de
            tl.store(DR + bc * C * DO + t_out, dr)
            tl.store(DRO + bc * C * DO + t_out, dr.to(DRO.dtype.element_ty))
            p = tl.load(P + bc * C * DI + t_in)
            G = tl.load(GAM + bc).to(tl.float32) * G + _dot(tl.trans(dr), p, PREC)
            if READ:
                dy = tl.load(DY + bc * C * DO + t_out).to(tl.float32)
                tl.store(DYO + bc * C * DO + t_out, dy.to(DYO.dtype.element_ty))
                qe = tl.load(QE + bc * C * DI + t_in)
                G += _dot(tl.trans(dy), qe, PREC)
        tl.store(DW0 + b * DO * DI + s_off, G)


@torch.library.custom_op("nlc::delta_recurrence", mutates_args=())
def delta_recurrence(
    W0: Tensor, gam: Tensor, P: Tensor, wf: Tensor, Ae: Tensor, Fu: Tensor, a: Tensor, qe: Tensor,
    z: Tensor, read: bool, prec: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` chunks of ``N`` linear memories' delta rule, chunk after chunk (the module's equations).

    W0 ``[N, out, in]``; gam ``[N, n]``; P, a, qe ``[N, n, C, in]``; wf, Fu ``[N, n, C, out]``;
    Ae ``[N, n, C]``; all contiguous, float32 but for P, a, qe, which are in the products' operand
    dtype (bf16 for ``prec`` bf16). ``read`` off: ``qe`` and ``z`` are ignored (pass anything).
    ``Fu`` an empty ``[0]`` tensor: no such term; ``z`` ``[N, n, C, out]`` (float32) is added to
    the read, or an empty ``[0]`` tensor.
    Returns ``(y [N, n, C, out], W_n [N, out, in], starts [N, n, out, in], r [N, n, C, out])``:
    float32 but for ``starts``, in P's dtype; ``y`` is an empty ``[0]`` tensor without the read;
    the last two are for the backward (not differentiable).
    """
    N, n, C, DI = P.shape
    DO = W0.shape[-2]
    t = _tune()
    BO = min(DO, t["rows"])
    ws = P.new_empty(N, n, DO, DI)  # the start states in the products' operand dtype
    r = W0.new_empty(N, n, C, DO)
    y = W0.new_empty(N, n, C, DO) if read else W0.new_empty(0)
    wn = torch.empty_like(W0)
    fu, hz = Fu.dim() == 4, read and z.dim() == 4
    with _device(W0):
        _fwd_kernel[(N * (DO // BO),)](
            W0, gam, P, wf, Ae, Fu if fu else wf, a, qe if read else P, z if hz else wf, ws, r,
            y if read else r, wn, n, C, DI, DO, BO, read, fu, hz, prec, num_warps=t["warps"],
            num_stages=t["stages"],
        )  # fmt: skip
    return y, wn, ws, r


@delta_recurrence.register_fake
def _(W0, gam, P, wf, Ae, Fu, a, qe, z, read, prec):
    N, n, C, DI = P.shape
    DO = W0.shape[-2]
    y = W0.new_empty(N, n, C, DO) if read else W0.new_empty(0)
    return y, W0.new_empty(W0.shape), P.new_empty(N, n, DO, DI), W0.new_empty(N, n, C, DO)


@torch.library.custom_op("nlc::delta_recurrence_backward", mutates_args=())
def delta_recurrence_backward(
    gam: Tensor, P: Tensor, Ae: Tensor, Fu: Tensor, a: Tensor, qe: Tensor, ws: Tensor, r: Tensor,
    dy: Tensor, dwn: Tensor, read: bool, prec: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(W0, gam, P, wf, Ae, Fu, a, qe)`` of :func:`delta_recurrence` from those of its
    read ``dy`` (ignored without the read) and its end state ``dwn``; ``ws, r`` its saved outputs.
    The gradient of ``qe`` is an empty ``[0]`` tensor without the read, ``Fu``'s without ``Fu``.
    Those of ``P``, ``a`` and ``qe`` come in ``P``'s dtype, the products' operand dtype that the
    three share (:func:`run` casts them to it), the rest in float32."""
    N, n, C, DI = P.shape
    DO = ws.shape[-2]
    t = _tune()
    BO = min(DO, t["bwd_rows"])
    nb = DO // BO
    dw0 = dwn.new_empty(N, DO, DI)
    gn = ws.new_empty(N, n, DO, DI)  # G_{c+1} = dL/dW_{c+1} of every chunk
    dgam_p, dae_p = dwn.new_empty(nb, N, n), dwn.new_empty(nb, N, n, C)
    fu = Fu.dim() == 4
    de = dwn.new_empty(N, n, C, DO) if fu else dwn.new_empty(0)
    dr = dwn.new_empty(N, n, C, DO)
    # dr, dy and e = Ae r + Fu as the operands of the products below, written by the kernel
    dro, eo = ws.new_empty(N, n, C, DO), ws.new_empty(N, n, C, DO)
    dyo = ws.new_empty(N, n, C, DO) if read else eo
    with _device(dwn):
        _bwd_kernel[(N * nb,)](
            gam, P, Ae, Fu if fu else r, a, qe if read else P, ws, r, dy if read else dwn, dwn, dw0,
            gn, dgam_p, dae_p, de if fu else dr, dr, dro, dyo, eo, N, n, C, DI, DO, BO, read, fu,
            prec, num_warps=t["bwd_warps"], num_stages=t["bwd_stages"],
        )  # fmt: skip

    # every chunk's other gradients at once: batched products over (memory, chunk)
    def mm(x: Tensor, y: Tensor) -> Tensor:
        return _product(x.flatten(0, 1), y.flatten(0, 1), ws.dtype).view(N, n, C, DI)

    dP = mm(dro, ws)
    da = mm(eo, gn)
    dqe = mm(dyo, ws) if read else dwn.new_empty(0)
    return dw0, dgam_p.sum(0), dP, dr, dae_p.sum(0), de, da, dqe


@delta_recurrence_backward.register_fake
def _(gam, P, Ae, Fu, a, qe, ws, r, dy, dwn, read, prec):
    def new(t):  # float32 whatever the input's dtype
        return dwn.new_empty(t.shape)

    # the gradients of the products' operands P, a, qe in their (common) dtype: the start states',
    # P's (bf16 under bf16 autocast)
    return (new(dwn), new(gam), P.new_empty(P.shape), new(r), new(Ae),
            new(r) if Fu.dim() == 4 else dwn.new_empty(0), P.new_empty(a.shape),
            P.new_empty(qe.shape) if read else dwn.new_empty(0))  # fmt: skip


def _setup_context(ctx, inputs, output):
    _, gam, P, _, Ae, Fu, a, qe, z, read, prec = inputs
    _, _, ws, r = output
    ctx.save_for_backward(gam, P, Ae, Fu, a, qe, ws, r)
    ctx.read, ctx.prec, ctx.z = read, prec, read and z.dim() == 4
    ctx.mark_non_differentiable(ws, r)  # saved for the backward only
    ctx.set_materialize_grads(False)  # an unused output's gradient comes as None, not as zeros


def _backward(ctx, dy, dwn, _dws, _dr):
    gam, P, Ae, Fu, a, qe, ws, r = ctx.saved_tensors
    if dwn is None:
        dwn = ws.new_zeros(ws[:, 0].shape, dtype=torch.float32)
    dwn = dwn.contiguous()
    if ctx.read:
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
    else:
        dy = r.new_empty(0)
    dw0, dgam, dP, dwf, dAe, dFu, da, dqe = delta_recurrence_backward(
        gam, P, Ae, Fu, a, qe, ws, r, dy, dwn, ctx.read, ctx.prec
    )
    dqe = dqe if ctx.read else None
    dFu = dFu if Fu.dim() == 4 else None
    dz = dy if ctx.z else None  # y = ... + z
    return dw0, dgam, dP, dwf, dAe, dFu, da, dqe, dz, None, None


delta_recurrence.register_autograd(_backward, setup_context=_setup_context)


def run(W0: Tensor, gam: Tensor, P: Tensor, wf: Tensor, Ae: Tensor, Fu: Tensor | None, a: Tensor,
        qe: Tensor | None, z: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
    """:func:`delta_recurrence` on the caller's tensors: any batch shape ``...`` that broadcasts
    (``W0`` ``[..., out, in]``, ``gam`` ``[..., n]``, the rest as there with ``[..., n, C, x]``;
    ``Fu`` None: no such term; ``z``, added to the read, only with ``qe``),
    any float dtype (cast to float32; ``P``, ``a`` and ``qe`` to the products' operand dtype, bf16
    under bf16 autocast). Returns ``(y [..., n, C, out] or None, W_n [..., out, in])`` in float32."""
    n, C, DI = P.shape[-3:]
    DO = W0.shape[-2]
    batch = torch.broadcast_shapes(W0.shape[:-2], gam.shape[:-1], P.shape[:-3], wf.shape[:-3],
                                   Ae.shape[:-2], *(() if Fu is None else (Fu.shape[:-3],)), a.shape[:-3],
                                   *(() if qe is None else (qe.shape[:-3],)),
                                   *(() if z is None else (z.shape[:-3],)))  # fmt: skip
    N = 1
    for s in batch:
        N *= s

    prec = precision(P.device.type)
    od = torch.bfloat16 if prec == "bf16" else torch.float32  # the products' operands

    def flat(t: Tensor, tail: tuple[int, ...], dtype=torch.float32) -> Tensor:
        return torch.broadcast_to(t.to(dtype), (*batch, *tail)).reshape(N, *tail).contiguous()

    read = qe is not None
    y, wn, _, _ = delta_recurrence(
        flat(W0, (DO, DI)), flat(gam, (n,)), flat(P, (n, C, DI), od), flat(wf, (n, C, DO)),
        flat(Ae, (n, C)), flat(Fu, (n, C, DO)) if Fu is not None else wf.new_empty(0, dtype=torch.float32),
        flat(a, (n, C, DI), od), flat(qe, (n, C, DI), od) if read else P.new_empty(0, dtype=od),
        flat(z, (n, C, DO)) if read and z is not None else P.new_empty(0, dtype=torch.float32), read,
        prec,
    )  # fmt: skip
    y = y.reshape(*batch, n, C, DO) if read else None
    return y, wn.reshape(*batch, DO, DI)


def reference(W0: Tensor, gam: Tensor, P: Tensor, wf: Tensor, Ae: Tensor, Fu: Tensor | None,
              a: Tensor, qe: Tensor | None, z: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
    """The recurrence of :func:`run` chunk after chunk in plain torch (autograd, any dtype)."""
    W = W0
    ys = []
    for c in range(P.shape[-3]):
        r = P[..., c, :, :] @ W.mT + wf[..., c, :, :]
        if qe is not None:
            ys.append(qe[..., c, :, :] @ W.mT + (z[..., c, :, :] if z is not None else 0.0))
        e = Ae[..., c, :, None] * r + (Fu[..., c, :, :] if Fu is not None else 0.0)
        W = gam[..., c, None, None] * W + e.mT @ a[..., c, :, :]
    return (torch.stack(ys, dim=-3) if qe is not None else None), W
