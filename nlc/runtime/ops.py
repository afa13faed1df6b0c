"""Model building blocks imported by generated nlc models.

These are small functional ops and ``nn.Module``s. Every op here is
``torch.compile(fullgraph=True)``-clean: no ``.item()``, no data-dependent Python branching,
and integer arguments (window, chunk size, heads) are codegen-time constants.

Shape letters: ``B`` batch, ``T`` time (tokens), ``C``/``d`` channels (model width), ``H``
heads, ``D`` head dimension.

=========================  ===================================================================
``rms_norm``/``RMSNorm``   ``x / √(mean(x²) + eps) · w`` over the last dim
``l2_normalize``           ``x / max(‖x‖₂, eps)`` along ``dim``
``CausalConv1d``           depthwise short causal convolution over time on ``[B, T, C]``
``rope_cache``/``apply_rope``  rotary position embeddings on ``[B, H, T, D]`` (rotate-half)
``causal_attention``       causal softmax attention, full or sliding window, ``[B, H, T, D]``
``split_heads``/``merge_heads``  ``[B, T, H·D] ↔ [B, H, T, D]``
``SwiGLU``, ``MLP``        bias-free feed-forward blocks
``chunk_schedule``         static ``(start, stop)`` chunks of a sequence
=========================  ===================================================================

``LayerNorm`` is re-exported from ``torch.nn`` unchanged, so generated code imports every
block from one place.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "CausalConv1d",
    "LayerNorm",
    "RMSNorm",
    "SwiGLU",
    "apply_rope",
    "causal_attention",
    "causal_conv1d",
    "chunk_schedule",
    "l2_normalize",
    "merge_heads",
    "rms_norm",
    "rope_cache", "RopeTables",
    "sliding_window_mask",
    "split_heads",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: ``torch.nn.LayerNorm``, re-exported unchanged.
LayerNorm = nn.LayerNorm


def _choice_error(what: str, value: object, allowed: list[str]) -> ValueError:
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.5)
        if close:
            hint = f"; did you mean {close[0]!r}?"
    return ValueError(f"{what} {value!r} is not one of {{{', '.join(map(repr, sorted(allowed)))}}}{hint}")


# ----------------------------------------------------------------------------------------------
# normalization


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Root-mean-square normalization over the last dimension.

    ``y = x / √(mean(x², dim=-1) + eps) · weight``.
    Shapes: ``x`` is ``[..., C]``; ``weight`` is ``[C]`` or ``None`` (no gain); ``y`` is like ``x``.
    fp16/bf16 inputs are normalized in fp32 and cast back before the gain is applied.
    """
    xf = x.float() if x.dtype in _LOW_PRECISION else x
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * weight


class RMSNorm(nn.Module):
    """:func:`rms_norm` with a learnable gain ``weight`` of shape ``[dim]``, initialized to ones.

    Input ``[..., dim]`` → output ``[..., dim]``.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-6) -> Tensor:
    """``x / max(‖x‖₂, eps)`` along ``dim``; any shape in, same shape out.

    This is the same function as ``F.normalize``, written so that the gradient at ``x = 0``
    is finite (the norm is clamped from below). It is used for the L2-normalized keys and
    queries of paper memories.
    """
    sq = x.pow(2).sum(dim=dim, keepdim=True)
    return x * torch.rsqrt(sq.clamp_min(eps * eps))


# ----------------------------------------------------------------------------------------------
# short causal convolution


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Depthwise causal convolution over time.

    Shapes: ``x`` is ``[B, T, C]``; ``weight`` is ``[C, W]`` (or Conv1d's ``[C, 1, W]``);
    ``bias`` is ``[C]`` or ``None``. The output is ``[B, T, C]``, with
    ``y[b, t, c] = Σ_{j<W} weight[c, j] · x[b, t − (W − 1) + j, c] (+ bias[c])``.
    So ``weight[:, W−1]`` multiplies the current token, and positions before the start count
    as zero (left padding). Token ``t`` sees only tokens ``≤ t``.
    """
    w = weight if weight.ndim == 3 else weight.unsqueeze(1)
    width = w.shape[-1]
    xt = F.pad(x.transpose(1, 2), (width - 1, 0))
    return F.conv1d(xt, w, bias, groups=w.shape[0]).transpose(1, 2)


class CausalConv1d(nn.Module):
    """Depthwise short causal convolution over time, such as the size-4 convolution after q/k/v.

    ``CausalConv1d(channels, width)``: input ``[B, T, channels]`` → output ``[B, T, channels]``.
    Each channel has its own ``width`` taps (``weight`` is ``[channels, 1, width]``,
    ``nn.Conv1d``'s default initialization). There is no mixing across channels and no
    leakage from the future (see :func:`causal_conv1d`). ``bias`` is off by default.
    """

    def __init__(self, channels: int, width: int, bias: bool = False) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"CausalConv1d: width must be >= 1, got {width}")
        conv = nn.Conv1d(channels, channels, width, groups=channels, bias=bias)
        self.weight = conv.weight
        self.bias = conv.bias
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        return causal_conv1d(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, width={self.width}, bias={self.bias is not None}"


# ----------------------------------------------------------------------------------------------
# rotary embeddings


def rope_cache(
    T: int,
    dim: int,
    base: float = 10000.0,
    *,
    offset: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Cosine and sine tables for rotary embeddings, rotate-half convention.

    Returns ``(cos, sin)``, each ``[T, dim]``. For position ``p = offset + t`` and frequency
    ``i < dim/2``, the angle is ``θ_{p,i} = p · base^(−2i/dim)``. Column ``i`` and column
    ``i + dim/2`` both hold ``θ_{p,i}``, because :func:`apply_rope` rotates the pair
    ``(x_i, x_{i+dim/2})``. Angles are computed in float64, then cast to ``dtype``.
    ``dim`` must be even.
    """
    if dim % 2:
        raise ValueError(f"rope_cache: dim must be even, got {dim}")
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    pos = torch.arange(offset, offset + T, dtype=torch.float64, device=device)
    angles = torch.outer(pos, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class RopeTables(nn.Module):
    """Precomputed :func:`rope_cache` tables for up to ``max_len`` positions (non-persistent
    buffers, so they follow ``.to(device)`` and stay out of checkpoints).

    ``forward(T, dtype) -> (cos, sin)``, each ``[T, dim]``; longer sequences are computed on the fly.
    """

    def __init__(self, dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim, self.base = dim, base
        cos, sin = rope_cache(max_len, dim, base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, T: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if T > self.cos.shape[0]:
            return rope_cache(T, self.dim, self.base, device=self.cos.device, dtype=dtype)
        return self.cos[:T].to(dtype), self.sin[:T].to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` by position: ``x·cos + rotate_half(x)·sin``.

    Shapes: ``x`` is ``[B, H, T, D]``; ``cos`` and ``sin`` are ``[T, D]`` from
    :func:`rope_cache`, or any shape broadcastable to ``x``. ``rotate_half(x)`` is
    ``(−x₂, x₁)``, where ``x₁``, ``x₂`` are the halves of the last dimension. Each pair
    ``(x_i, x_{i+D/2})`` is rotated by an angle, so norms are preserved and
    ``⟨rope(q)_s, rope(k)_t⟩`` depends only on ``s − t``. Computed in ``x.dtype``.
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# attention


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, T, H·D]`` → ``[B, H, T, D]`` with ``H = heads``."""
    B, T, C = x.shape
    return x.view(B, T, heads, C // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``[B, H, T, D]`` → ``[B, T, H·D]``; the inverse of :func:`split_heads`."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def sliding_window_mask(T: int, window: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean ``[T, T]`` mask, ``True`` where query ``t`` may attend to key ``s``.

    The condition is ``t − window < s ≤ t``: each token sees itself and the ``window − 1``
    tokens before it. ``window ≥ T`` is full causal attention.
    """
    i = torch.arange(T, device=device)
    diff = i[:, None] - i[None, :]
    return (diff >= 0) & (diff < window)


def causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """Causal softmax attention through ``F.scaled_dot_product_attention``.

    Shapes: ``q``, ``k`` and ``v`` are ``[B, H, T, D]`` (``v`` may have its own last dimension
    ``Dv``). The output is ``[B, H, T, Dv]``. ``scale`` defaults to ``1/√D``.

    ``window=None`` is full causal attention (``is_causal=True``, so flash kernels apply).
    ``window=w`` (an int ≥ 1, a codegen-time constant) is sliding-window attention: token ``t``
    attends to keys ``s`` with ``t − w < s ≤ t``, i.e. itself and the ``w − 1`` previous
    tokens. The window is a boolean ``[T, T]`` band mask (:func:`sliding_window_mask`). That
    is exact, but it costs O(T²) memory and rules out the flash kernel; correctness comes
    before speed here. Every query has at least itself to attend to, so no row is fully
    masked.
    """
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"causal_attention: window must be None or an int >= 1, got {window!r}")
    mask = sliding_window_mask(q.shape[-2], window, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ----------------------------------------------------------------------------------------------
# feed-forward blocks


def _relu2(x: Tensor) -> Tensor:
    return F.relu(x).square()


#: Activation names accepted by :class:`MLP` (and by specs' ``act = …``).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
    "relu2": _relu2,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


class SwiGLU(nn.Module):
    """Bias-free SwiGLU feed-forward: ``W_out(silu(x W_gate) ⊙ (x W_up))``.

    ``SwiGLU(d, hidden)``: input ``[..., d]`` → output ``[..., d]``. Gate and up projections
    share one ``Linear(d, 2·hidden)`` (``w_in``; the gate is its first half) so that they
    run as one GEMM. ``w_out`` is ``Linear(hidden, d)``.
    """

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


class MLP(nn.Module):
    """Bias-free two-layer feed-forward: ``W_out(act(x W_in))``.

    ``MLP(d, hidden, act="gelu")``: input ``[..., d]`` → output ``[..., d]``. ``act`` is one
    of :data:`ACTIVATIONS` (``gelu``, ``silu``, ``relu``, ``relu2``, ``tanh``, ``identity``).
    """

    def __init__(self, d: int, hidden: int, act: str = "gelu") -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise _choice_error("MLP: activation", act, list(ACTIVATIONS))
        self.act_name = act
        self.act = ACTIVATIONS[act]
        self.w_in = nn.Linear(d, hidden, bias=False)
        self.w_out = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(self.act(self.w_in(x)))

    def extra_repr(self) -> str:
        return f"act={self.act_name!r}"


# ----------------------------------------------------------------------------------------------
# chunking


def chunk_schedule(T: int, C: int) -> list[tuple[int, int]]:
    """Split ``range(T)`` into chunks of ``C`` tokens, as a static list of ``(start, stop)``.

    ``[(0, C), (C, 2C), …]``. If ``C`` does not divide ``T``, the **last chunk is partial**,
    ``(C·⌊T/C⌋, T)``, and it is applied at the end of the sequence like any other chunk. It
    is never dropped and never padded (``docs/semantics.md``). ``T = 0`` gives ``[]``. ``T`` and ``C``
    are Python ints (codegen-time constants), so under ``torch.compile`` a loop over the
    schedule unrolls.
    """
    for name, value, lo in (("T", T, 0), ("C", C, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"chunk_schedule: {name} must be an int >= {lo}, got {value!r}")
    return [(start, min(start + C, T)) for start in range(0, T, C)]
