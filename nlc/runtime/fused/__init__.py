"""Fused chunk steps for depth-2 MLP memories: Triton kernels as custom ops, forward and backward.

``nlc.runtime.chunk.chunk_step`` writes one chunk of an in-context memory as about a dozen
batched products plus the gates' decay products, and autograd makes its backward several dozen
more: at the small periods of Titans (16 or 64 tokens) each is a tiny kernel, and a training
step is thousands of them in sequence. For the common case ``chunk._fused_step`` runs the chunk
as two custom ops instead, each a few Triton kernels with a hand-written backward:

* memory ``mlp`` or ``residual_mlp`` of depth 2 (``y = W2 act(W1 x) (+ x)``), ``din == dout``
  16, 32 or 64, ``hidden`` a multiple of 16, activation ``gelu`` or ``silu``;
* objective ``l2``; rule ``gd`` or ``momentum`` (any decay); read ``chunk``; float32 state;
  chunks of at most 64 tokens (the sizes run on an H200; larger tiles are untried there).

With ``u_s, a_s`` the factors of token ``s``'s inner gradient of weight ``l`` at the chunk-start
weights ``W_0`` (``nlc.runtime.memories.forward_backward``), ``chunk_step``'s chunk-end state is

    W_end = gam W_0 + dd S_0 - sum_s cw_s u_s a_s^T        S_end = bb S_0 - sum_s cs_s u_s a_s^T

with per-token coefficients ``cw, cs`` and per-memory scalars ``gam, dd, bb`` that depend only
on the gates (``chunk._Coeffs``):

* ``coefficients.chunk_coefficients``: ``cw, cs, gam, dd, bb`` from the gates (suffix products
  and one linear recurrence, as Triton scans; one kernel each way);
* ``mlp2.mlp2_chunk``: the read ``y = M_{W_0}(q)`` and the chunk-end state (``_read_kernel``,
  ``_write_kernel``); its backward recomputes the error and the hidden activations
  (``_read_kernel``, ``_bwd_sums_kernel``, ``_bwd_weights_kernel``, ``_bwd_finish_kernel``).

A whole sequence goes through one more op, ``sequence.mlp2_sequence``: every chunk of it, the
same kernels launched chunk after chunk inside one op, with the inputs laid out once
(``nlc.runtime.chunks.sequence_step``; generated levels whose chunk is one ``chunk_step`` try it
first). Its backward sums the inputs' gradients once for a group of chunks, off the chain that
carries the state gradient (``NLC_FUSED_FINISH_GROUP``: chunks a group, or ``all``; several
groups run on a side CUDA stream, ``NLC_FUSED_SIDE=0`` keeps them on the one stream). The read
kernel gives each memory two programs, one for the chunk's errors (the keys) and one for its
reads (the queries), which run side by side (one chunk of 64 memories fills half an H200's
SMs); ``NLC_FUSED_READ_SPLIT=0`` does both in one program (for comparisons).

``tests/runtime/test_fused.py`` checks them against autograd through the unfused closed form in
float64, on CUDA and on the CPU through Triton's interpreter. The products' operands are what
the unfused path's ``matmul`` would use (``precision``): bf16 under bf16 autocast (for chunks of
33-64 tokens only with hidden blocks of 64, the default there, else TF32:
``mlp2._kernel_precision`` says why), TF32 when
``torch.backends.cuda.matmul.allow_tf32`` is on, IEEE float32 otherwise; state, accumulation and
everything elementwise stay float32.

Differences from the unfused path: the read comes back in float32 (under autocast the unfused
``mlp`` read is bf16), and there are no gradients of gradients (``create_graph=True`` through a
fused level raises; run with ``NLC_FUSED=0`` for that).

The kernels' warps and blocks of the hidden width come from two tables in ``mlp2`` (chunks of
at most 16 tokens, and larger: ``benchmarks/fused_diag.py`` sweeps them), which
``NLC_FUSED_WARPS`` and ``NLC_FUSED_BLOCKS`` override (``key=int,...``).

``NLC_FUSED=0`` turns the fused path off; ``NLC_FUSED=interpret`` also uses it for CPU tensors
(it needs ``TRITON_INTERPRET=1`` set before Triton is imported; tests only).

More kernels live here for other memories: ``accumulate`` (the wide MLP op's state updates,
``nlc.runtime.wide_chunks``), ``delta`` (a linear memory's delta-rule recurrence),
``delta_chunks`` (each chunk's own part of it) and ``triangular`` (the chunks' unit-lower
inverses; all three ``nlc.runtime.linear_chunks``); the same two switches apply to them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ._triton import triton
from .coefficients import chunk_coefficients
from .mlp2 import ACTS, PRECISIONS, WARPS, mlp2_chunk, precision
from .sequence import mlp2_sequence, run_sequence

__all__ = [
    "ACTS",
    "PRECISIONS",
    "WARPS",
    "applies",
    "available",
    "chunk_coefficients",
    "mlp2_chunk",
    "mlp2_sequence",
    "precision",
    "run_sequence",
]


def available() -> bool:
    """Whether Triton can be imported."""
    return triton is not None


def _mode() -> str:
    return os.environ.get("NLC_FUSED", "1")


def applies(spec, objective: str, rule, read: str, q, k: Tensor, dtype, states=(),
            chunk: int | None = None) -> bool:
    """Whether ``chunk_step`` may take the fused path for these arguments.

    ``states``: the chunk-start weights and momentum (``[..., out, in]``); their batch shape
    must broadcast to the keys' (``[..., C, din]``), and every kernel offset must fit in int32.
    ``chunk``: the period, for a whole sequence of keys (``chunks.sequence_step``); default the
    keys' length.
    """
    mode = _mode()
    if mode == "0" or triton is None:
        return False
    if not (k.is_cuda or mode == "interpret"):
        return False
    C = k.shape[-2] if chunk is None else chunk
    D = spec.din
    return (
        spec.kind in ("mlp", "residual_mlp")
        and spec.depth == 2
        and spec.act in ACTS
        and spec.dout == D
        and D in (16, 32, 64)
        and spec.hidden % 16 == 0
        and objective == "l2"
        and not rule.is_dgd
        and read == "chunk"
        and q is not None
        and q.shape == k.shape
        and dtype == torch.float32
        and 1 <= C <= 64
        and _fits(k, states, spec.hidden, C)
    )


def _fits(k: Tensor, states, hidden: int, C: int) -> bool:
    batch = tuple(k.shape[:-2])
    try:
        if torch.broadcast_shapes(batch, *(tuple(s.shape[:-2]) for s in states)) != batch:
            return False  # a state with more batch than the keys: the unfused path broadcasts
    except RuntimeError:
        return False
    n = 1
    for b in batch:
        n *= b
    T, D = k.shape[-2:]
    # the kernels' offsets are int32 (per chunk; the coefficients' over the whole keys)
    return n * hidden * D * max(C, 1) < 2**31 and n * max(T, 1) * D < 2**31
