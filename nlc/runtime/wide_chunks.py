"""Every chunk of a wide depth-2 MLP memory as one op: GEMM-bound chunks over a float32 state.

A Continuum Memory System level (a period of hundreds of tokens, an MLP as wide as the model's
feed-forward) spends its products on large matrices: at d 1024, hidden 4096, B 8 and 512-token
chunks, each chunk's read, inner gradient and update are 3 + 2 products of 34 GFLOP. What made
it slow was everything around them: the float32 state (``2 x 4096 x 1024`` floats a sequence)
converted to bf16 for every product, each update written as a bf16 product then added to the
state in float32, and autograd's backward adding each product's state-sized gradient to the
state gradient in one more pass: about 8 of the 14.3 ms of GPU time at period 512 on an H200
were such elementwise passes over the state (``benchmarks/RESULTS.md``).

:func:`wide_mlp2_sequence` runs all chunks of a sequence in one custom op with its backward
written out. Per chunk ``c`` (``N`` memories, ``C`` tokens, ``K`` the keys, ``V`` the targets)::

    Z = K W1^T      H, H' = act(Z), act'(Z)      Y = H W2^T (+ K)      E = err(Y, V)
    G = E W2        U = G * H'
    W1 <- gam W1 - (cw * U)^T K                 W2 <- gam W2 - (cw * E)^T H

(``chunk.chunk_step``'s chunk read at the keys with rule ``gd``: ``Y`` is the read, ``cw`` and
``gam`` the chunk's coefficients of the gates, ``err`` the inner objective's output error.)
The products take the state's bf16 copy (under bf16 autocast; else float32); each update is one
:func:`~nlc.runtime.fused.accumulate.accumulate` (product, state added, float32 result and its
bf16 copy in one pass), so the state is read once and written once per chunk and weight. The
elementwise work of a chunk is seven small functions of its tokens, each one fused kernel on CUDA
(inductor; ``NLC_WIDE_COMPILE=0`` leaves them uncompiled). The op keeps each chunk's operand
copies of the weights and ``Z``, ``G``, ``E`` for the backward; where nothing reads the end
state (``update_last=False``), the last chunk is a read only.

The backward walks the chunks in reverse with the state gradients ``gW1, gW2`` of the chunk end::

    P1 = K gW1^T   P2 = H gW2^T                  gcw = -sum(U * P1) - sum(E * P2)
    gU = -cw P1    gE = -cw P2 + (gU * H') W2^T  gH = -(cw E) gW2 + gY' W2
    gY' = gY + gE (l2)                           gZ = gH * H' + gU * G * act''(Z)
    gK = -(cw U) gW1 + gZ W1 (+ gY')             gV = -gE (l2, dot)
    gW1 <- gam gW1 + gZ^T K                      gW2 <- gam gW2 + [E; gY']^T [gU * H'; H]

the two state gradients again one ``accumulate`` each (the two products of ``gW2`` in one
pass). ``ggam = <gW1_end, W1_c> + <gW2_end, W2_c>`` only with decay (then the op keeps the
float32 chunk-start states too).

Values and gradients are ``run_chunks`` over ``chunk_step``'s, up to rounding: tested against the
per-token reference in float64 (``tests/runtime/test_wide_chunks.py``), and on CUDA in float32
and bf16 against the chunk loop in float64. On an H200 the CMS level above went from 14.5-14.7
to 12.1 ms a step at period 512, and HOPE's CMS levels at d 768 by a fifth; the state update
kernel is now the largest part (about 160 us a call, 30 calls, 4.8 of 11.8 ms of GPU time a step
at period 512: its product runs at 1.5-2x cuBLAS's time), then the products (about 4 ms;
``benchmarks/RESULTS.md``, where the kernel's other forms tried are too).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .chunk import RuleSpec, _end_row, _prepare
from .fused.accumulate import accumulate, product
from .memories import activation_and_derivative, output_error

__all__ = ["applies", "run", "wide_mlp2_sequence"]

ACTS = ("silu", "gelu", "relu", "tanh", "sigmoid", "identity")
OBJECTIVES = ("l2", "dot")


def applies(spec, objective: str, rule, read: str, q, k: Tensor, dtype, n_chunks: int) -> bool:
    """Whether :func:`run` computes this memory: ``mlp`` or ``residual_mlp`` of depth 2 with an
    activation of ``ACTS``, objective ``l2`` or ``dot``, rule ``gd`` (no momentum, no dgd; any
    decay), a chunk read at the keys (``q is k``: ``let query = key``), at least two chunks,
    float32 or float64.

    ``NLC_WIDE_CHUNKS``: ``auto`` (default) on CUDA only, ``1`` on any device, ``0`` never."""
    mode = os.environ.get("NLC_WIDE_CHUNKS", "auto")
    on = mode == "1" or (mode != "0" and k.is_cuda)
    return (
        on
        and spec.kind in ("mlp", "residual_mlp")
        and spec.depth == 2
        and spec.act in ACTS
        and objective in OBJECTIVES
        and rule.kind == "gd"
        and not rule.uses_momentum
        and read == "chunk"
        and q is k
        and n_chunks >= 2
        and dtype in (torch.float32, torch.float64)
    )


def _act2(name: str, z: Tensor) -> Tensor:
    """``act''(z)`` of the activations in ``ACTS``."""
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    if name == "gelu":
        return torch.exp(-0.5 * z * z) * 0.3989422804014327 * (2.0 - z * z)
    if name == "tanh":
        t = torch.tanh(z)
        return -2.0 * t * (1.0 - t * t)
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1.0 - s) * (1.0 - 2.0 * s)
    return torch.zeros_like(z)  # relu, identity


def _operand_dtype(prec: str, dt: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if prec == "bf16" and dt == torch.float32 else dt


def _chunk_major(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` ``[N, n, ...]`` as ``[n, N, ...]``, contiguous, in ``dtype``: one pass (each chunk's
    operand then a contiguous slice)."""
    out = t.new_empty(t.shape[1], t.shape[0], *t.shape[2:], dtype=dtype)
    return out.copy_(t.transpose(0, 1))


# --------------------------------------------------------------------------------------------
# the elementwise work of a chunk, in a few functions of its tokens: each one fused kernel on
# CUDA (inductor), so a chunk's activations are read and written a few times, not once per
# operation. ``od``: the products' operand dtype; ``dt``: the computation's (float32 or float64).


def _fused(fn):
    """``fn`` compiled by inductor where its first tensor is on CUDA, else ``fn`` itself.
    ``NLC_WIDE_COMPILE=0``: uncompiled everywhere (for comparisons); ``all``: compiled on any
    device (the CPU tests of the compiled functions)."""
    compiled = []

    def call(*args):
        mode = os.environ.get("NLC_WIDE_COMPILE", "1")
        if mode == "0" or not (args[0].is_cuda or mode == "all"):
            return fn(*args)
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=False, fullgraph=True))
        return compiled[0](*args)

    call.__name__ = call.__qualname__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


@_fused
def _hidden(z: Tensor, act: str, od: torch.dtype, dt: torch.dtype) -> Tensor:
    """``H = act(Z)`` as an operand."""
    return activation_and_derivative(act, z.to(dt))[0].to(od)


@_fused
def _hidden_and_write(z: Tensor, g: Tensor, cw: Tensor, act: str, od: torch.dtype, dt: torch.dtype):
    """``(H, cw * U)`` as operands, ``U = G * act'(Z)``."""
    h, dh = activation_and_derivative(act, z.to(dt))
    return h.to(od), (cw[..., None] * g.to(dt) * dh).to(od)


@_fused
def _write(z: Tensor, g: Tensor, cw: Tensor, act: str, od: torch.dtype, dt: torch.dtype) -> Tensor:
    """``cw * U`` as an operand, ``U = G * act'(Z)`` (the forward has ``H`` already)."""
    return (cw[..., None] * g.to(dt) * activation_and_derivative(act, z.to(dt))[1]).to(od)


@_fused
def _errors(y: Tensor, kc: Tensor, v: Tensor, cw: Tensor, objective: str, residual: bool, od: torch.dtype,
            dt: torch.dtype, y_out: Tensor, e_out: Tensor) -> Tensor:  # fmt: skip
    """The read ``Y`` (``dt``) and the errors ``E`` (``od``) written into ``y_out``, ``e_out`` (the
    op's outputs: no copy after); returns ``cw * E``, the update's operand (``od``)."""
    y = y.to(dt)
    if residual:
        y = y + kc
    e = output_error(objective, y, v)
    y_out.copy_(y)
    e_out.copy_(e)
    return (cw[..., None] * e).to(od)


@_fused
def _backward_g(p1: Tensor, p2: Tensor, z: Tensor, g: Tensor, e: Tensor, cw: Tensor, act: str,
                od: torch.dtype, dt: torch.dtype, gcw_out: Tensor):  # fmt: skip
    """``((gU * H') as an operand, gE's update part -cw P2, cw * E as an operand)``; ``gcw`` written
    into ``gcw_out``."""
    _, dh = activation_and_derivative(act, z.to(dt))
    g, e, cwc = g.to(dt), e.to(dt), cw[..., None]
    p1, p2 = p1.to(dt), p2.to(dt)
    gcw_out.copy_(-(g * dh * p1).sum(-1) - (e * p2).sum(-1))
    return (-cwc * p1 * dh).to(od), -cwc * p2, (cwc * e).to(od)


@_fused
def _backward_y(ge: Tensor, gy: Tensor, objective: str, od: torch.dtype, gv_out: Tensor):
    """``(gY' as an operand, gY')``: the read's gradient with the errors' (``l2``); ``gV = -gE``
    written into ``gv_out``."""
    gyt = gy + ge if objective == "l2" else gy
    gv_out.copy_(-ge)
    return gyt.to(od), gyt


@_fused
def _backward_z(gh_read: Tensor, gh_write: Tensor, p1: Tensor, z: Tensor, g: Tensor, cw: Tensor, act: str,
                od: torch.dtype, dt: torch.dtype) -> Tensor:  # fmt: skip
    """``gZ = (gY' W2 - (cw E) gW2) * H' + gU * G * act''(Z)`` as an operand, ``gU = -cw P1``."""
    zz = z.to(dt)
    _, dh = activation_and_derivative(act, zz)
    gh = gh_read.to(dt) - gh_write.to(dt)
    gu = -cw[..., None] * p1.to(dt)
    return (gh * dh + gu * g.to(dt) * _act2(act, zz)).to(od)


@_fused
def _backward_read(gh: Tensor, z: Tensor, act: str, od: torch.dtype, dt: torch.dtype) -> Tensor:
    """``gZ = gH * H'`` as an operand (a chunk read only)."""
    return (gh.to(dt) * activation_and_derivative(act, z.to(dt))[1]).to(od)


@torch.library.custom_op("nlc::wide_mlp2_sequence", mutates_args=())
def wide_mlp2_sequence(
    k: Tensor,
    v: Tensor,
    w1: Tensor,
    w2: Tensor,
    cw: Tensor,
    gam: Tensor,
    act: str,
    residual: bool,
    objective: str,
    prec: str,
    decay: bool,
    update_last: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``n`` chunks of ``N`` depth-2 MLP memories, chunk after chunk (module docstring).

    k ``[N, n, C, D]`` and v ``[N, n, C, Do]`` (the tokens' own order: sequence, then chunk),
    w1 ``[N, hidden, D]`` and w2 ``[N, Do, hidden]`` the state at the start of the first chunk,
    cw ``[n, N, C]`` and gam ``[n, N]`` each chunk's coefficients (gam is used only with
    ``decay``), all in one dtype (float32 or float64). ``prec``: ``bf16`` for bf16 operands of
    the products, else the dtype's. ``update_last=False``: the last chunk is read only (nothing
    reads its end state).

    Returns ``(y [N, n, C, Do], w1_end, w2_end, w1_ops, w2_ops, z, g, e, w1_starts, w2_starts)``:
    the reads and the state at the end of the last chunk (at its start without ``update_last``);
    for the backward, every chunk's weights, ``Z``, ``G`` and ``E`` in the operand dtype
    (chunk-major, ``[n, N, ...]``), and with ``decay`` the float32 chunk-start states (else empty
    ``[0]`` tensors).
    """
    N, n, C, D = k.shape
    H, Do = w1.shape[-2], w2.shape[-2]
    dt = k.dtype
    od = _operand_dtype(prec, dt)
    y = v.new_empty(N, n, C, Do)
    z, g, e = k.new_empty(n, N, C, H, dtype=od), k.new_empty(n, N, C, H, dtype=od), v.new_empty(n, N, C, Do, dtype=od)
    w1o, w2o = k.new_empty(n, N, H, D, dtype=od), k.new_empty(n, N, Do, H, dtype=od)
    w1o[0].copy_(w1)
    w2o[0].copy_(w2)
    if decay:
        w1s, w2s = k.new_empty(n, N, H, D), k.new_empty(n, N, Do, H)
        w1s[0].copy_(w1)
        w2s[0].copy_(w2)
    else:
        w1s, w2s = k.new_empty(0), k.new_empty(0)
    w1e, w2e = k.new_empty(N, H, D), k.new_empty(N, Do, H)
    s1, s2 = w1, w2  # the float32 state at the start of chunk c
    kbs = _chunk_major(k, od)  # every chunk's keys as operands, in one pass
    for c in range(n):
        kc, kb = k[:, c], kbs[c]
        product(kb, w1o[c].mT, od, out=z[c])
        hb = _hidden(z[c], act, od, dt)
        xe = _errors(product(hb, w2o[c].mT, od), kc, v[:, c], cw[c], objective, residual, od, dt, y[:, c], e[c])
        ec = e[c]
        if c == n - 1 and not update_last:  # read only: the end state is the start state
            if s1 is not w1e:
                w1e.copy_(s1)
                w2e.copy_(s2)
            break
        product(ec, w2o[c], od, out=g[c])
        xu = _write(z[c], g[c], cw[c], act, od, dt)
        last = c == n - 1
        o1 = w1e if last else (w1s[c + 1] if decay else w1e)
        o2 = w2e if last else (w2s[c + 1] if decay else w2e)
        gc = gam[c] if decay else None
        accumulate(xu, kb, o1, c=s1, gam=gc, sign=-1.0, out_op=None if last else w1o[c + 1], prec=prec)
        accumulate(xe, hb, o2, c=s2, gam=gc, sign=-1.0, out_op=None if last else w2o[c + 1], prec=prec)
        s1, s2 = o1, o2
    return y, w1e, w2e, w1o, w2o, z, g, e, w1s, w2s


@wide_mlp2_sequence.register_fake
def _(k, v, w1, w2, cw, gam, act, residual, objective, prec, decay, update_last):
    N, n, C, D = k.shape
    H, Do = w1.shape[-2], w2.shape[-2]
    od = _operand_dtype(prec, k.dtype)
    y = v.new_empty(N, n, C, Do)
    starts = (k.new_empty(n, N, H, D), k.new_empty(n, N, Do, H)) if decay else (k.new_empty(0), k.new_empty(0))
    return (y, k.new_empty(N, H, D), k.new_empty(N, Do, H), k.new_empty(n, N, H, D, dtype=od),
            k.new_empty(n, N, Do, H, dtype=od), k.new_empty(n, N, C, H, dtype=od),
            k.new_empty(n, N, C, H, dtype=od), v.new_empty(n, N, C, Do, dtype=od), *starts)  # fmt: skip


@torch.library.custom_op("nlc::wide_mlp2_sequence_backward", mutates_args=())
def wide_mlp2_sequence_backward(
    k: Tensor,
    cw: Tensor,
    gam: Tensor,
    w1o: Tensor,
    w2o: Tensor,
    z: Tensor,
    g: Tensor,
    e: Tensor,
    w1s: Tensor,
    w2s: Tensor,
    gy: Tensor,
    gw1: Tensor,
    gw2: Tensor,
    act: str,
    residual: bool,
    objective: str,
    prec: str,
    decay: bool,
    update_last: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward of :func:`wide_mlp2_sequence` (module docstring): ``(gk, gv, gw1, gw2, gcw,
    ggam)`` from the saved tensors and the gradients of the reads and of the end state (``gw1``,
    ``gw2`` empty ``[0]``: zero, not materialised)."""
    n = k.shape[1]
    N, H, D = w1o.shape[1:]
    Do = w2o.shape[2]
    dt = k.dtype
    od = _operand_dtype(prec, dt)
    gk, gv = torch.empty_like(k), torch.empty_like(gy)
    gcw = torch.empty_like(cw)
    ggam = torch.zeros_like(gam) if decay else k.new_empty(0)
    zero_end = gw1.numel() == 0  # no gradient reached the end state (empty gw1, gw2)
    if zero_end and update_last:  # the last update's backward multiplies by them: zeros
        gw1, gw2, zero_end = k.new_zeros(N, H, D), k.new_zeros(N, Do, H), False
    t1, t2 = k.new_empty(N, H, D), k.new_empty(N, Do, H)  # the state gradients, updated in place
    g1, g2 = (None, None) if zero_end else (gw1, gw2)  # None: zero (a read-only last chunk adds to nothing)
    if zero_end:
        g1o, g2o = k.new_empty(N, H, D, dtype=od), k.new_empty(N, Do, H, dtype=od)
    else:
        g1o, g2o = gw1.to(od, copy=True), gw2.to(od, copy=True)  # rewritten in place below
    kbs = _chunk_major(k, od)
    for c in reversed(range(n)):
        kb = kbs[c]
        zc, gc, ec = z[c], g[c], e[c]
        if c == n - 1 and not update_last:  # a read only: gW1 += gZ^T K, gW2 += gY^T H
            hb = _hidden(zc, act, od, dt)
            gcw[c] = 0.0
            gv[:, c] = 0.0
            if decay:
                ggam[c] = 0.0
            gyb = gy[:, c].to(od)
            gzb = _backward_read(product(gyb, w2o[c], od), zc, act, od, dt)
            product(gzb, w1o[c], dt, out=gk[:, c], acc=gy[:, c] if residual else None)
            accumulate(gzb, kb, t1, c=g1, out_op=g1o, prec=prec)
            accumulate(gyb, hb, t2, c=g2, out_op=g2o, prec=prec)
            g1, g2 = t1, t2
            continue
        hb, xu = _hidden_and_write(zc, gc, cw[c], act, od, dt)
        p1 = product(kb, g1o.mT, od)
        p2 = product(hb, g2o.mT, od)
        ggb, ge_write, xe = _backward_g(p1, p2, zc, gc, ec, cw[c], act, od, dt, gcw[c])
        ge = product(ggb, w2o[c].mT, dt, acc=ge_write)
        gytb, gyt = _backward_y(ge, gy[:, c], objective, od, gv[:, c])
        gzb = _backward_z(product(gytb, w2o[c], od), product(xe, g2o, od), p1, zc, gc, cw[c], act, od, dt)
        product(gzb, w1o[c], dt, out=gk[:, c], acc=gyt if residual else None)
        product(xu, g1o, dt, out=gk[:, c], acc=gk[:, c], alpha=-1.0)  # gK = gZ W1 (+ gY') - (cw U) gW1
        if decay:
            ggam[c] = (g1 * w1s[c]).sum((-2, -1)) + (g2 * w2s[c]).sum((-2, -1))
        gmc = gam[c] if decay else None
        first = c == 0
        accumulate(gzb, kb, t1, c=g1, gam=gmc, out_op=None if first else g1o, prec=prec)
        accumulate(ec, ggb, t2, c=g2, gam=gmc, out_op=None if first else g2o, prec=prec, more=(gytb, hb))
        g1, g2 = t1, t2
    return gk, gv, g1, g2, gcw, ggam


@wide_mlp2_sequence_backward.register_fake
def _(k, cw, gam, w1o, w2o, z, g, e, w1s, w2s, gy, gw1, gw2, act, residual, objective, prec, decay, update_last):
    return (torch.empty_like(k), torch.empty_like(gy), k.new_empty(w1o.shape[1:]), k.new_empty(w2o.shape[1:]),
            torch.empty_like(cw), torch.empty_like(gam) if decay else k.new_empty(0))  # fmt: skip


def _setup_context(ctx, inputs, output):
    k, _, _, _, cw, gam, act, residual, objective, prec, decay, update_last = inputs
    _, _, _, w1o, w2o, z, g, e, w1s, w2s = output
    ctx.save_for_backward(k, cw, gam, w1o, w2o, z, g, e, w1s, w2s)
    ctx.mark_non_differentiable(w1o, w2o, z, g, e, w1s, w2s)
    ctx.set_materialize_grads(False)  # an unused output's gradient comes as None, not as zeros
    ctx.args = (act, residual, objective, prec, decay, update_last)


def _backward(ctx, gy, gw1, gw2, *_saved):
    k, cw, gam, w1o, w2o, z, g, e, w1s, w2s = ctx.saved_tensors
    N, n, C, D = k.shape
    H, Do = w1o.shape[-2], w2o.shape[-2]
    gy = k.new_zeros(N, n, C, Do) if gy is None else gy.contiguous()
    if gw1 is None and gw2 is None:  # nothing read the end state: no zeros made (empty stands for them)
        gw1, gw2 = k.new_empty(0), k.new_empty(0)
    else:
        gw1 = k.new_zeros(N, H, D) if gw1 is None else gw1.contiguous()
        gw2 = k.new_zeros(N, Do, H) if gw2 is None else gw2.contiguous()
    gk, gv, g1, g2, gcw, ggam = wide_mlp2_sequence_backward(
        k, cw, gam, w1o, w2o, z, g, e, w1s, w2s, gy, gw1, gw2, *ctx.args
    )
    decay = ctx.args[4]
    return gk, gv, g1, g2, gcw, ggam if decay else None, None, None, None, None, None, None


wide_mlp2_sequence.register_autograd(_backward, setup_context=_setup_context)


def run(spec, objective: str, weights0, k: Tensor, target: Tensor, eta, alpha, C: int, prec: str,
        update_last: bool = True):
    """``chunks.sequence_step``'s wide path: ``T // C`` full chunks of keys and targets
    ``[..., T, w]`` (``T`` a multiple of ``C``; the keys are also the queries) with gates
    ``[..., T]`` (``alpha=None``: no decay) from weights ``weights0`` (``[..., out, in]``,
    broadcast to the keys' batch). Returns ``(y [..., T, dout], [w1_end, w2_end])`` in the
    compute dtype (``chunk._prepare``); ``update_last=False``: the last chunk read only, and the
    weights at its start."""
    dt, W0, _, k, target, _, eta, alpha, _ = _prepare(weights0, None, k, target, None, eta, alpha, None,
                                                      RuleSpec("gd"))  # fmt: skip
    *batch, T, D = k.shape
    Do = target.shape[-1]
    N = 1
    for b in batch:
        N *= b
    n = T // C

    def tokens(t: Tensor, w: int) -> Tensor:  # [..., T, w] -> [N, n, C, w]: a view where it can be
        return torch.broadcast_to(t, (*batch, T, w)).reshape(N, n, C, w).contiguous()

    def chunked(g: Tensor) -> Tensor:  # [..., T] -> [..., n, C]
        return torch.broadcast_to(g, (*batch, T)).unflatten(-1, (n, C))

    eta = chunked(eta)  # _prepare gave the gates the keys' shape
    decay = alpha is not None
    gam, a_end = _end_row(chunked(alpha) if decay else None, C, dtype=dt, device=k.device)
    cw = (a_end * eta).reshape(N, n, C).transpose(0, 1).contiguous()
    gam = torch.broadcast_to(gam, (*batch, n)).reshape(N, n).transpose(0, 1).contiguous() if decay \
        else k.new_ones(n, N)  # fmt: skip
    shapes = [tuple(w.shape[-2:]) for w in W0]
    w1, w2 = (torch.broadcast_to(w, (*batch, *sh)).reshape(N, *sh) for w, sh in zip(W0, shapes))
    y, w1e, w2e, *_ = wide_mlp2_sequence(
        tokens(k, D), tokens(target, Do), w1, w2, cw, gam, spec.act, spec.kind == "residual_mlp",
        objective, prec, decay, update_last,
    )  # fmt: skip
    y = y.reshape(*batch, T, Do)
    return y, [w1e.reshape(*batch, *shapes[0]), w2e.reshape(*batch, *shapes[1])]
