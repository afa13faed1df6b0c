"""Running a level's chunk step over a sequence: the chunk schedule, resets, truncation.

A generated in-context level defines ``chunk(state, xs) -> (state, y)``: one chunk of C tokens
read at the chunk-start state and then updated (paper eq 90). :func:`run_chunks` applies it to
the chunks of a sequence of T tokens, in order, with

* the last partial chunk (``T mod C`` tokens) applied at the end of the sequence;
* resets every ``reset_every`` tokens (a multiple of C): the state restarts from ``restart(c0)``;
* ``truncate``: the state is cut from the autograd graph every ``truncate`` chunks
  (``grad through writes truncate N chunks``);
* ``keep_states``: the state at the start of every chunk is returned too (a nested CMS level
  restarts its child from these).

Eagerly it is a Python loop. Under ``torch.compile`` the runs of full chunks go through the
``scan`` higher-order operator, so the traced graph holds the chunk step once rather than once
per chunk: compile time does not grow with ``T / C``. Both paths compute the same values and
gradients (tested).

The final state is for carrying (detached) and for the state norm: generated code never
back-propagates through it, and torch's ``scan`` backward rejects some gradients into final
carries, so do not. A level that does not carry its state asks for none (``final_state=False``):
the chunks whose end state nothing reads (the last one, and the last one before each reset) are
then read without their update.

``sequence``: a level may also hand ``run_chunks`` a whole-sequence step, ``sequence(state, xs,
final_state=...) -> (state, y)`` or ``None``. Where the sequence is one run of chunks (no reset
inside it, no truncation, no kept states), ``run_chunks`` tries it first and falls back to the
chunks when it returns ``None``. Generated levels whose chunk is one ``chunk_step`` pass one that calls
:func:`sequence_step`: every chunk of the sequence at once, where the fused kernels
(``nlc.runtime.fused``), the batched linear form (``nlc.runtime.linear_chunks``) or the wide
MLP op (``nlc.runtime.wide_chunks``) cover the memory.

Shapes: every tensor of ``xs`` has the token axis at dim -2 (``[B, H', T, w]``); ``y`` comes
back ``[B, H, T, w]``. ``state`` is any pytree of tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["run_chunks", "detach", "boundaries", "sequence_step", "record_paths"]

Step = Callable[[Any, tuple], tuple[Any, Tensor]]


def detach(state):
    """The same state cut from the autograd graph."""
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, state)


def boundaries(T: int, C: int, reset_every: int | None, truncate: int | None) -> list[tuple[int, int, bool, bool]]:
    """Segments ``(start, stop, reset_at_start, detach_at_start)`` of the token range ``[0, T)``.

    A segment is a run of chunks with no reset or truncation inside; only the last segment may
    end with a partial chunk. Static: depends on ints only.
    """
    starts = list(range(0, T, C))
    cuts = []
    for i, c0 in enumerate(starts):
        if c0 == 0:
            continue
        r = bool(reset_every) and c0 % reset_every == 0
        d = bool(truncate) and i % truncate == 0
        if r or d:
            cuts.append((c0, r, d))
    segs = []
    prev, prev_r, prev_d = 0, False, False
    for c0, r, d in cuts:
        segs.append((prev, c0, prev_r, prev_d))
        prev, prev_r, prev_d = c0, r, d
    segs.append((prev, T, prev_r, prev_d))
    return segs


_RECORDERS: list[list[bool]] = []


class record_paths:
    """``with record_paths() as paths:`` collects, for every eager :func:`run_chunks` call inside
    the block, whether the whole-sequence step ran it (``True``) or the chunk loop did
    (``False``). ``nlc.runtime.regional`` uses it to decide whether a level's forward may be
    compiled whole. Calls traced by ``torch.compile`` are not recorded."""

    def __enter__(self) -> list[bool]:
        _RECORDERS.append([])
        return _RECORDERS[-1]

    def __exit__(self, *exc) -> None:
        _RECORDERS.pop()


def _record(sequence_ran: bool) -> None:
    if _RECORDERS and not torch.compiler.is_compiling():
        _RECORDERS[-1].append(sequence_ran)


def _slice(xs, a: int, b: int):
    """Tokens ``[a, b)`` of every tensor of ``xs``; a tensor that is in ``xs`` twice is cut once."""
    xs, where = _distinct(xs)
    cut = [x[..., a:b, :] for x in xs]
    return tuple(cut[j] for j in where)


def _distinct(xs: tuple) -> tuple[tuple, list[int]]:
    """``xs`` without repeats (by identity) and the position of each of ``xs`` in it, so that a flow
    passed twice (``let query = key``) is sliced once and reaches the chunk step as one tensor
    (``chunk_step`` reuses the keys' forward for such a read)."""
    out: list = []
    where: list[int] = []
    for x in xs:
        j = next((i for i, u in enumerate(out) if u is x), None)
        if j is None:
            j = len(out)
            out.append(x)
        where.append(j)
    return tuple(out), where


def _pieces(xs, a: int, b: int, C: int) -> list[tuple]:
    """The chunks of tokens ``[a, b)`` of every tensor of ``xs``, one tuple per chunk (the last may
    be partial). One ``split`` per tensor, so the backward joins the chunk gradients with one
    concatenation instead of one full-length zero-padded gradient per chunk. A tensor that is
    in ``xs`` twice is split once: its chunks are the same objects in both places."""
    xs, where = _distinct(xs)
    T = xs[0].shape[-2]
    seg = xs if (a, b) == (0, T) else tuple(x[..., a:b, :] for x in xs)  # distinct already
    return [tuple(p[j] for j in where) for p in zip(*(x.split(C, dim=-2) for x in seg))]


def _use_scan() -> bool:
    # NLC_CHUNK_SCAN=0 unrolls the chunks in the compiled graph too (compile time grows with T/C)
    return torch.compiler.is_compiling() and os.environ.get("NLC_CHUNK_SCAN", "1") != "0"


def run_chunks(step: Step, state, xs: tuple, T: int, C: int, *, reset_every: int | None = None,
               restart: Callable[[int], Any] | None = None, truncate: int | None = None,
               keep_states: bool = False, sequence: Callable[[Any, tuple], Any] | None = None,
               final_state: bool = True):
    """Apply ``step`` to every chunk; returns ``(final state, y [.., T, w], chunk_states)``.

    ``chunk_states`` is the list of chunk-start states when ``keep_states``, else ``[]``.
    ``sequence``: a whole-sequence step tried first (module docstring).
    ``final_state=False``: the caller does not read the state at the end of the sequence, and its
    step takes ``update``. A chunk whose end state nothing reads (the last one, and the last one
    before each reset) then runs as ``step(state, xs, update=False)`` (its read only; the state
    that step returns is not used), and the state returned is the one at the start of the last
    chunk (at the end, where ``sequence`` ran: a whole-sequence op updates every chunk).
    """
    ys: list[Tensor] = []
    kept: list = []
    segments = boundaries(T, C, reset_every, truncate)
    if sequence is not None and not keep_states and len(segments) == 1:
        done = sequence(state, xs, final_state=final_state)
        if done is not None:
            _record(True)
            state, y = done
            return state, y, kept
    _record(False)
    for i, (s0, s1, reset, cut) in enumerate(segments):
        if cut:
            state = detach(state)
        if reset:  # after the cut: a fresh initial state keeps its gradient path to the init
            state = restart(s0)
        # the segment's end state is read by the next segment unless that one resets, and at the
        # end of the sequence by the caller if it asks for it (with final_state, every step
        # updates: the steps of such callers need not take `update`)
        end_read = final_state or (i + 1 < len(segments) and not segments[i + 1][2])
        n_full = (s1 - s0) // C
        full_end = s0 + n_full * C
        n_scan = n_full - (1 if not end_read and full_end == s1 else 0)  # keep a dead last chunk out
        rest = (full_end - (n_full - n_scan) * C, s1)  # the chunks after the scanned ones
        if n_scan >= 2 and _use_scan() and not keep_states:
            state, y = _scan(step, state, _slice(xs, s0, s0 + n_scan * C), n_scan, C)
            ys.append(y)
            pieces = _pieces(xs, *rest, C) if rest[0] < rest[1] else []
        else:
            pieces = _pieces(xs, s0, s1, C)  # full chunks, then the partial one if any
        for j, piece in enumerate(pieces):
            if keep_states:
                kept.append(state)
            if not end_read and j == len(pieces) - 1:
                _, y = step(state, piece, update=False)
            else:
                state, y = step(state, piece)
            ys.append(y)
    return state, torch.cat(ys, dim=-2) if len(ys) > 1 else ys[0], kept


def _scan(step: Step, state, xs: tuple, n: int, C: int):
    from torch._higher_order_ops.scan import scan

    xs, where = _distinct(xs)  # a flow passed twice is one input of the scan
    stacked = tuple(x.unflatten(-2, (n, C)).movedim(-3, 0) for x in xs)  # [n, ..., C, w] (views)
    # a fresh contiguous carry: scan may not alias its inputs
    state = pytree.tree_map(lambda t: t.clone(memory_format=torch.contiguous_format), state)
    state, y = scan(lambda s, x: step(s, tuple(x[j] for j in where)), state, stacked)
    return state, _ContiguousGrad.apply(y).movedim(0, -3).flatten(-3, -2)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    The gradient that reaches the scan's stacked outputs is usually permuted (the outputs are
    moved, flattened and merged across heads afterwards); the scan's backward re-traces the chunk
    step with that layout and fails on views of it, so it gets the plain layout."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def sequence_step(spec, objective: str, rule, weights0: Sequence[Tensor], moms0: Sequence[Tensor] | None,
                  k: Tensor, target: Tensor, q: Tensor, eta, alpha=None, beta=None, *, chunk: int,
                  read: str = "chunk", final: bool = True):
    """``chunk_step`` over every chunk of ``chunk`` tokens of a whole sequence at once; or ``None``
    where no whole-sequence form covers the memory (then run the chunks one by one).

    Three forms: ``nlc.runtime.fused.mlp2_sequence`` (one fused op: a depth-2 MLP memory the
    kernels cover), ``nlc.runtime.linear_chunks.sequence`` (a linear memory on ``dot`` with
    ``gd`` or ``dgd``: every chunk's state-free part batched, a short recurrence for the state)
    and ``nlc.runtime.wide_chunks.wide_mlp2_sequence`` (a depth-2 MLP memory with ``gd`` read at
    its keys, too wide for the fused kernels: one op of large products over a float32 state).
    Arguments as ``nlc.runtime.chunk.chunk_step``'s, with the keys, targets, queries
    ``[B, H, T, w]`` and gates ``[B, H, T]`` of the whole sequence. The full chunks go through
    the form; a last partial chunk (``T mod chunk`` tokens) through ``chunk_step``, as
    ``run_chunks`` applies it. Returns ``(y [B, H, T, dout], weights at the end, momentum at the
    end or None)``: the values of ``run_chunks`` over ``chunk_step``. ``final=False``: the caller
    does not read the end state; a partial last chunk is then read without its update, and so is
    a last full chunk by the wide form (the other forms update every full chunk); the state
    returned is the one at the start of the chunk left without its update.
    """
    from . import chunk as _chunk
    from . import fused as _fused
    from . import linear_chunks as _linear
    from . import wide_chunks as _wide

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    _chunk._check_call(rule, read, moms0, beta, objective)
    _chunk._check_shapes(spec, weights0, moms0, k, target, q, read)
    dt = _chunk._compute_dtype(*weights0, *(moms0 or ()), k, target, q, eta, alpha, beta)
    states = [*weights0, *(moms0 or ())]
    T = k.shape[-2]
    n = T // chunk
    full = n * chunk
    mom = rule.uses_momentum

    def head(t):
        return t[..., :full, :] if t.shape[-2] != full else t

    def per_token(g) -> bool:  # a gate with a token axis to cut (not a constant or broadcast one)
        return isinstance(g, Tensor) and g.dim() > 0 and g.shape[-1] != 1

    def head_gate(g):
        return g[..., :full] if per_token(g) and g.shape[-1] != full else g

    if n >= 1 and _fused.applies(spec, objective, rule, read, q, k, dt, states, chunk=chunk):
        y, W, S = _fused.run_sequence(
            spec, mom, list(weights0), list(moms0) if moms0 is not None else None, head(k),
            head(target), head(q), head_gate(eta), head_gate(alpha) if alpha is not None else None,
            head_gate(beta) if mom else None, chunk, _fused.precision(k.device.type),
        )  # fmt: skip
    elif _linear.applies(spec, objective, rule, read, n, k.device):
        y, W = _linear.run(
            spec, rule, weights0, head(k), head(target), head(q) if q is not None else None,
            head_gate(eta), head_gate(alpha) if alpha is not None else None, chunk, read,
        )  # fmt: skip
        S = None
    elif _wide.applies(spec, objective, rule, read, q, k, dt, n):
        last_read_only = not final and full == T  # nothing reads the last chunk's end state
        y, W = _wide.run(
            spec, objective, weights0, head(k), head(target), head_gate(eta),
            head_gate(alpha) if alpha is not None else None, chunk, _fused.precision(k.device.type),
            update_last=not last_read_only,
        )  # fmt: skip
        S = None
    else:
        return None
    if full == T:
        return y, W, S

    def tail_gate(g):
        return g[..., full:] if per_token(g) else g

    y2, W2, S2 = _chunk.chunk_step(
        spec, objective, rule, W, S, k[..., full:, :], target[..., full:, :],
        q[..., full:, :] if q is not None else None, tail_gate(eta),
        tail_gate(alpha) if alpha is not None else None,
        tail_gate(beta) if beta is not None else None, read=read, update=final,
    )  # fmt: skip
    if final:  # else the state at the start of the partial chunk, whose update nothing reads
        W, S = W2, S2
    if y is None:
        return None, W, S
    return torch.cat([y, y2], dim=-2), W, S
