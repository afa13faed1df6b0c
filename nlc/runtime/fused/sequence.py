"""A whole sequence of chunks of a depth-2 MLP memory as one custom op, forward and backward.

``mlp2.mlp2_chunk`` is one chunk: a training step of a Titans level at period 16 calls it 128
times per sequence, and around every call sit the chunk's slicing, dtype casts, the coefficient
op, autograd's bookkeeping and the sums of the state gradients: a few dozen small kernels per
chunk, more GPU time than the chunk kernels themselves. ``mlp2_sequence`` runs every chunk of a
sequence inside one op instead:

* the inputs are laid out once per sequence, chunk-major (``[chunks, N, C, D]``), so chunk ``c``
  is the contiguous slice ``[c]`` and the same kernels as ``mlp2_chunk`` read it in place;
* the forward launches two kernels per chunk (``_read_kernel``, ``_write_kernel``), writing each
  chunk's end state straight into the next chunk's start slot of one buffer; it keeps the
  chunk-start states and the errors ``E = M_{W_0}(K) - V`` of every chunk for the backward
  (outputs the caller ignores; they are not differentiable);
* the backward walks the chunks in reverse with two kernels each on the chain that carries the
  state gradient from a chunk's end to its start (``_bwd_sums_kernel``, ``_bwd_weights_kernel``;
  two ping-pong buffers; the saved ``E`` spares a recomputed read). Nothing on the chain waits
  for the inputs' gradients (``_bwd_finish_kernel``, the sums of the blocks' parts), so they
  run once for a group of chunks (``_finish_group``: by default all of them, where their parts
  fit in ``FINISH_PARTS_BYTES``), one program per (chunk, memory), writing into the chunks'
  slices; with more than one group, on a side CUDA stream beside the next group's chain
  (``NLC_FUSED_SIDE=0``: one stream).

The values and gradients are those of ``mlp2_chunk`` chunk after chunk (tested); the coefficient
op (``coefficients.chunk_coefficients``) runs once for all chunks, one row per (chunk, memory).
Memory: the chunk-start states, ``4 * chunks * N * hidden * D`` floats with momentum (what
autograd keeps for the chunk-by-chunk loop too), and in the backward the parts of a group of
chunks, ``4 * N * blocks * C * D`` floats a chunk (``blocks`` of the hidden width).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from ...diagnostics import SettingError
from . import mlp2 as _k  # the kernels (defined where Triton imports)
from .mlp2 import ACTS, _blocks, _kernel_precision, _read_mode, _warps

__all__ = ["mlp2_sequence"]


def _device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# The most bytes the backward keeps of the blocks' parts by default (``_finish_group``).
FINISH_PARTS_BYTES = 1 << 30


def _finish_group(n: int, chunk_bytes: int = 0) -> int:
    """Chunks whose inputs' gradients the backward sums in one launch, of ``n`` chunks whose
    parts take ``chunk_bytes`` each (``4 * N * blocks * C * D`` floats for ``C`` tokens and
    ``blocks`` of the hidden width: what a chunk-start state takes with momentum where a block
    is ``C`` wide). Larger groups launch fewer, fuller finish kernels and keep more parts until
    their group is done.

    ``NLC_FUSED_FINISH_GROUP``: a positive integer, or ``all``. Default: all ``n`` where their
    parts fit in ``FINISH_PARTS_BYTES``, else groups of that budget (two sets of them live at
    once). The Titans level on an H200: 5.15 ms with one group at period 64 and 8.4 ms at period
    16, against 5.34-5.41 and 9.1-9.2 ms with a launch per chunk (``benchmarks/RESULTS.md``)."""
    raw = os.environ.get("NLC_FUSED_FINISH_GROUP", "").strip()
    n = max(n, 1)
    if raw == "all":
        return n
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise SettingError(
                f"NLC_FUSED_FINISH_GROUP: expected a positive integer or 'all'; got {raw!r} "
                "(unset it for the default)"
            )
        return min(int(raw), n)
    if n * chunk_bytes <= FINISH_PARTS_BYTES:
        return n
    return max(1, min(n, FINISH_PARTS_BYTES // (2 * chunk_bytes)))


_finish_group(1)  # a bad NLC_FUSED_FINISH_GROUP is reported where the kernels are imported

_SIDE: dict = {}


def _side_stream(device) -> torch.cuda.Stream:
    """One side stream per device, made once (not while a CUDA graph is being captured)."""
    key = torch.device(device).index
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(device)
    return _SIDE[key]


@torch.library.custom_op("nlc::mlp2_sequence", mutates_args=())
def mlp2_sequence(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``n`` chunks of ``N`` depth-2 MLP memories, chunk after chunk.

    k, v, q ``[n, N, C, D]`` (chunk-major); w1, s1 ``[N, hidden, D]`` and w2, s2 ``[N, D, hidden]``
    the state at the start of the first chunk; cw, cs ``[n, N, C]`` and gam, dd, bb ``[n, N]``
    each chunk's coefficients. Without momentum s1, s2, cs, dd and bb are ignored.

    Returns ``(yq [n, N, C, D], w1_end, w2_end, s1_end, s2_end, w1_starts, w2_starts, s1_starts,
    s2_starts, e)``: the reads, the state at the end of the last chunk, and, for the backward,
    the state at the start of every chunk (``[n, N, ...]``) and the errors ``e [n, N, C, D]``.
    The momentum outputs are empty ``[0]`` tensors without momentum. All float32.
    """
    n, N, C, D = k.shape
    HD = w1.shape[-2]
    bc, bh, br = _blocks(C, HD, "write", prec)
    prec_r, prec_w = _kernel_precision(prec, bc, br), _kernel_precision(prec, bc, bh)
    a = ACTS[act]
    read = _read_mode()
    k, v, q, cw, gam = (t.contiguous() for t in (k, v, q, cw, gam))
    yq, e = torch.empty_like(k), torch.empty_like(k)
    w1s, w2s = k.new_empty(n, N, HD, D), k.new_empty(n, N, D, HD)
    w1s[0].copy_(w1)
    w2s[0].copy_(w2)
    w1e, w2e = k.new_empty(N, HD, D), k.new_empty(N, D, HD)
    if momentum:
        cs, dd, bb = (t.contiguous() for t in (cs, dd, bb))
        s1s, s2s = torch.empty_like(w1s), torch.empty_like(w2s)
        s1s[0].copy_(s1)
        s2s[0].copy_(s2)
        s1e, s2e = torch.empty_like(w1e), torch.empty_like(w2e)
    else:
        s1s, s2s, s1e, s2e = w1s, w2s, w1e, w2e  # never read or written (MOM off)
        cs, dd, bb = cw, gam, gam
    with _device(k):
        for c in range(n):
            last = c + 1 == n
            o1, o2 = (w1e, w2e) if last else (w1s[c + 1], w2s[c + 1])
            m1, m2 = (s1e, s2e) if last else (s1s[c + 1], s2s[c + 1])
            _k._read_kernel[(N, 2 if read == 2 else 1)](
                k[c], v[c], q[c], w1s[c], w2s[c], yq[c], e[c],
                C, HD, D, bc, br, a, residual, read, prec_r, num_warps=_warps(bc)["read"],
            )  # fmt: skip
            _k._write_kernel[(N, HD // bh)](
                k[c], e[c], w1s[c], w2s[c], s1s[c], s2s[c], cw[c], cs[c], gam[c], dd[c], bb[c],
                o1, o2, m1, m2, C, HD, D, bc, bh, a, momentum, prec_w, num_warps=_warps(bc)["write"],
            )  # fmt: skip
    if not momentum:
        s1e, s2e, s1s, s2s = (k.new_empty(0) for _ in range(4))
    return yq, w1e, w2e, s1e, s2e, w1s, w2s, s1s, s2s, e


@mlp2_sequence.register_fake
def _(k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb, act, residual, momentum, prec):
    n, N, _, D = k.shape
    HD = w1.shape[-2]
    w1e, w2e = k.new_empty(N, HD, D), k.new_empty(N, D, HD)
    w1s, w2s = k.new_empty(n, N, HD, D), k.new_empty(n, N, D, HD)
    if momentum:
        s1e, s2e, s1s, s2s = w1e.new_empty(w1e.shape), w2e.new_empty(w2e.shape), \
            w1s.new_empty(w1s.shape), w2s.new_empty(w2s.shape)  # fmt: skip
    else:
        s1e, s2e, s1s, s2s = (k.new_empty(0) for _ in range(4))
    return k.new_empty(k.shape), w1e, w2e, s1e, s2e, w1s, w2s, s1s, s2s, k.new_empty(k.shape)


@torch.library.custom_op("nlc::mlp2_sequence_backward", mutates_args=())
def mlp2_sequence_backward(
    k: Tensor,
    q: Tensor,
    e: Tensor,
    w1s: Tensor,
    w2s: Tensor,
    s1s: Tensor,
    s2s: Tensor,
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
    """Gradients ``(k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb)`` of ``mlp2_sequence`` from those
    of its reads ``gyq [n, N, C, D]`` and end state ``gw1, gw2, gs1, gs2`` (shapes as there; the
    momentum ones are empty ``[0]`` tensors without momentum)."""
    n, N, C, D = k.shape
    HD = w1s.shape[-2]
    bc, bh, _ = _blocks(C, HD, "backward", prec)
    prec = _kernel_precision(prec, bc, bh)
    nj = HD // bh
    a = ACTS[act]
    k, q, e, cw, gam, gyq, gw1, gw2 = (
        t.contiguous() for t in (k, q, e, cw, gam, gyq, gw1, gw2)
    )
    # the state gradient, carried from a chunk's end to its start: read one pair, write the other
    pair = [(k.new_empty(N, HD, D), k.new_empty(N, D, HD)) for _ in range(2)]
    if momentum:
        cs, dd, bb, gs1, gs2 = (t.contiguous() for t in (cs, dd, bb, gs1, gs2))
        spair = [(k.new_empty(N, HD, D), k.new_empty(N, D, HD)) for _ in range(2)]
    else:
        s1s, s2s, cs, dd, bb = w1s, w2s, cw, gam, gam  # never read (MOM off)
        spair = pair  # never written (MOM off)
        gs1, gs2 = gw1, gw2
    # The inputs' gradients (_bwd_finish_kernel: the sums of the blocks' parts) are off the chain
    # that carries the state gradient (sums -> weights -> the previous chunk's sums). They run
    # once per group of G chunks (_finish_group), for the whole group in one launch; with more
    # than one group, on a side CUDA stream, beside the next group's chain. The parts live in two
    # sets of G chunks' slots, used by alternate groups; a set is reused two groups later, after
    # the side stream is done with it.
    G = _finish_group(n, 4 * N * nj * C * D * k.element_size())
    groups = -(-n // G)
    sets = 1 if groups == 1 else 2
    parts = [
        (*(k.new_empty(G, N, nj, C, D) for _ in range(4)), k.new_empty(G, N, nj, C),
         k.new_empty(G, N, nj, C), k.new_empty(G, N, nj, 3))
        for _ in range(sets)
    ]  # fmt: skip
    dk, dv, dq = torch.empty_like(k), torch.empty_like(k), torch.empty_like(k)
    dcw, dgam = torch.empty_like(cw), torch.empty_like(gam)
    if momentum:
        dcs, ddd, dbb = torch.empty_like(cw), torch.empty_like(gam), torch.empty_like(gam)
    else:
        dcs, ddd, dbb = dcw, dgam, dgam  # never written (MOM off)
    main = torch.cuda.current_stream(k.device) if k.is_cuda else None
    side = None
    if k.is_cuda and groups > 1 and os.environ.get("NLC_FUSED_SIDE", "1") != "0":
        side = _side_stream(k.device)
    freed: list = [None, None]
    g1, g2, h1, h2 = gw1, gw2, gs1, gs2
    with _device(k):
        if side is not None:
            side.wait_stream(main)
        for step, c in enumerate(reversed(range(n))):
            o1, o2 = pair[step % 2]
            p1, p2 = spair[step % 2]
            lo = c // G * G
            hi = min(lo + G, n)
            owned = parts[c // G % sets]
            if c == hi - 1 and freed[c // G % sets] is not None:
                main.wait_event(freed[c // G % sets])
            ge_p, gk_p, gk2_p, gq_p, gcw_p, gcs_p, sc_p = (t[c - lo] for t in owned)
            _k._bwd_sums_kernel[(N, nj)](
                k[c], e[c], w1s[c], w2s[c], g1, g2, h1, h2, cw[c], cs[c], ge_p, gk_p, gcw_p, gcs_p,
                C, HD, D, bc, bh, a, momentum, prec, num_warps=_warps(bc)["sums"],
            )  # fmt: skip
            _k._bwd_weights_kernel[(N, nj)](
                k[c], q[c], e[c], ge_p, gyq[c], w1s[c], w2s[c], g1, g2, h1, h2, s1s[c], s2s[c],
                cw[c], cs[c], gam[c], dd[c], bb[c], o1, o2, p1, p2, gk2_p, gq_p, sc_p,
                C, HD, D, bc, bh, a, momentum, prec, num_warps=_warps(bc)["weights"],
            )  # fmt: skip
            g1, g2, h1, h2 = o1, o2, p1, p2
            if c != lo:
                continue
            # the group's chunks lo..hi-1 are done: their inputs' gradients in one launch, one
            # program per (chunk, memory) (the slots and the outputs are chunk-major alike)
            if side is not None:
                side.wait_stream(main)
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                _k._bwd_finish_kernel[((hi - lo) * N,)](
                    *(t[: hi - lo] for t in owned), gyq[lo:hi],
                    dk[lo:hi], dv[lo:hi], dq[lo:hi], dcw[lo:hi], dcs[lo:hi], dgam[lo:hi],
                    ddd[lo:hi], dbb[lo:hi],
                    C, nj, D, bc, residual, momentum, num_warps=_warps(bc)["read"],
                )  # fmt: skip
            if side is not None:
                freed[c // G % sets] = side.record_event()
        if side is not None:
            main.wait_stream(side)
    if momentum:
        return dk, dv, dq, g1, g2, h1, h2, dcw, dcs, dgam, ddd, dbb
    none = [k.new_empty(0) for _ in range(5)]
    return dk, dv, dq, g1, g2, none[0], none[1], dcw, none[2], dgam, none[3], none[4]


@mlp2_sequence_backward.register_fake
def _(k, q, e, w1s, w2s, s1s, s2s, cw, cs, gam, dd, bb, gyq, gw1, gw2, gs1, gs2, act, residual,
      momentum, prec):  # fmt: skip
    _, N, _, D = k.shape
    HD = w1s.shape[-2]

    def new(*shape):
        return k.new_empty(shape)

    w1, w2 = new(N, HD, D), new(N, D, HD)
    if momentum:
        return (new(*k.shape), new(*k.shape), new(*k.shape), w1, w2, new(N, HD, D), new(N, D, HD),
                new(*cw.shape), new(*cw.shape), new(*gam.shape), new(*gam.shape),
                new(*gam.shape))  # fmt: skip
    return (new(*k.shape), new(*k.shape), new(*k.shape), w1, w2, new(0), new(0), new(*cw.shape),
            new(0), new(*gam.shape), new(0), new(0))  # fmt: skip


def _setup_context(ctx, inputs, output):
    k, _, q, _, _, _, _, cw, cs, gam, dd, bb, act, residual, momentum, prec = inputs
    _, _, _, _, _, w1s, w2s, s1s, s2s, e = output
    ctx.save_for_backward(k, q, e, w1s, w2s, s1s, s2s, cw, cs, gam, dd, bb)
    ctx.mark_non_differentiable(w1s, w2s, s1s, s2s, e)
    ctx.act, ctx.residual, ctx.momentum, ctx.prec = act, residual, momentum, prec


def _backward(ctx, gyq, gw1, gw2, gs1, gs2, *_saved):
    k, q, e, w1s, w2s, s1s, s2s, cw, cs, gam, dd, bb = ctx.saved_tensors
    mom = ctx.momentum
    _, N, _, D = k.shape
    HD = w1s.shape[-2]
    gyq = torch.zeros_like(k) if gyq is None else gyq
    gw1 = k.new_zeros(N, HD, D) if gw1 is None else gw1
    gw2 = k.new_zeros(N, D, HD) if gw2 is None else gw2
    if mom:
        gs1 = k.new_zeros(N, HD, D) if gs1 is None else gs1
        gs2 = k.new_zeros(N, D, HD) if gs2 is None else gs2
    else:
        gs1, gs2 = k.new_empty(0), k.new_empty(0)
    dk, dv, dq, dw1, dw2, ds1, ds2, dcw, dcs, dgam, ddd, dbb = mlp2_sequence_backward(
        k, q, e, w1s, w2s, s1s, s2s, cw, cs, gam, dd, bb, gyq, gw1, gw2, gs1, gs2,
        ctx.act, ctx.residual, mom, ctx.prec,
    )  # fmt: skip
    if not mom:
        return (dk, dv, dq, dw1, dw2, None, None, dcw, None, dgam) + (None,) * 6
    return (dk, dv, dq, dw1, dw2, ds1, ds2, dcw, dcs, dgam, ddd, dbb) + (None,) * 4


mlp2_sequence.register_autograd(_backward, setup_context=_setup_context)


def run_sequence(spec, momentum: bool, W0, S0, k, target, q, eta, alpha, beta, C: int, prec: str):
    """``nlc.runtime.chunks.sequence_step``'s fused path: ``T // C`` full chunks of ``[..., T, D]``
    keys, targets and queries (``T`` a multiple of ``C``) with gates ``[..., T]`` (``alpha=None``:
    no decay) from weights ``W0`` and momentum ``S0`` (``[..., out, in]``, broadcast to the keys'
    batch; ``S0=None`` with momentum: zeros). Returns ``(y [..., T, D], weights, momentum or
    None)``, float32."""
    from .coefficients import chunk_coefficients

    *batch, T, D = k.shape
    N = 1
    for b in batch:
        N *= b
    n = T // C
    f32 = torch.float32

    def packed(t: Tensor) -> Tensor:  # a contiguous float32 copy, whatever t's dtype and strides
        return t.new_empty(t.shape, dtype=f32).copy_(t)

    def tokens(t: Tensor) -> Tensor:  # [..., T, D] -> [n, N, C, D], float32, one copy
        t = torch.broadcast_to(t, (*batch, T, D)).unflatten(-2, (n, C)).movedim(-3, 0)
        return packed(t).view(n, N, C, D)

    def gates(g) -> Tensor:  # [..., T] -> [n * N, C] (row = chunk-major (chunk, memory))
        if not isinstance(g, Tensor):  # a constant: filled on the device (no copy from the host,
            return k.new_full((n * N, C), float(g), dtype=f32)  # which CUDA graphs cannot capture)
        g = torch.broadcast_to(g.to(k.device), (*batch, T))
        return packed(g.unflatten(-1, (n, C)).movedim(-2, 0)).view(n * N, C)

    def state(t: Tensor, shape) -> Tensor:
        return torch.broadcast_to(t.to(f32), (*batch, *shape)).reshape(N, *shape)

    shapes = [tuple(w.shape[-2:]) for w in W0]
    w1, w2 = (state(w, sh) for w, sh in zip(W0, shapes))
    eta_r = gates(eta)
    alpha_r = gates(alpha) if alpha is not None else torch.ones_like(eta_r)
    beta_r = gates(beta) if momentum else alpha_r
    cw, cs, gam, dd, bb = chunk_coefficients(eta_r, alpha_r, beta_r, momentum)
    cw = cw.view(n, N, C)
    gam = gam.view(n, N)
    if momentum:
        cs, dd, bb = cs.view(n, N, C), dd.view(n, N), bb.view(n, N)
        if S0 is None:
            s1, s2 = torch.zeros_like(w1), torch.zeros_like(w2)
        else:
            s1, s2 = (state(s, sh) for s, sh in zip(S0, shapes))
    else:
        s1 = s2 = k.new_empty(0, dtype=f32)
    yq, w1e, w2e, s1e, s2e, *_ = mlp2_sequence(
        tokens(k), tokens(target), tokens(q), w1, w2, s1, s2, cw, cs, gam, dd, bb,
        spec.act, spec.kind == "residual_mlp", momentum, prec,
    )  # fmt: skip
    y = yq.transpose(0, 1).reshape(*batch, T, D)
    w_end = [w1e.reshape(*batch, *shapes[0]), w2e.reshape(*batch, *shapes[1])]
    s_end = None
    if momentum:
        s_end = [s1e.reshape(*batch, *shapes[0]), s2e.reshape(*batch, *shapes[1])]
    return y, w_end, s_end
