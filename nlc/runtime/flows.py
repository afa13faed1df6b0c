"""Flow stages and level plumbing used by generated models.

Inside an in-context level every flow is a tensor ``[B, H', T, w]`` where ``H'`` is the number
of heads (``per head`` levels) or 1 (a value shared by all heads, and every level that is not
per head). Projections broadcast a shared input to all heads; state calls expand to heads.

Shapes in docstrings: B sequences, H heads, T tokens (C in a chunk), w widths.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import memories

__all__ = [
    "HeadLinear", "HeadConv", "MemoryInit", "StaticMemory", "heads", "merge_heads", "chunk",
    "l2norm", "gate", "sq_norm", "all_finite", "zeros_state", "expand_state", "detach_state",
    "detach_carry", "zeros_like_state", "batch_of", "stack_states", "tile", "part",
]


class HeadLinear(nn.Module):
    """A learned projection per head: ``[B, H' , T, din] -> [B, H, T, dout]`` (no bias).

    ``H' = 1`` inputs (shared by all heads) are broadcast. Weights ``[H, dout, din]``, initialised
    like ``nn.Linear`` (uniform ±1/sqrt(din)).
    """

    def __init__(self, heads: int, din: int, dout: int):
        super().__init__()
        self.heads, self.din, self.dout = heads, din, dout
        bound = 1.0 / math.sqrt(din)
        self.weight = nn.Parameter(torch.empty(heads, dout, din).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1 and self.heads > 1:
            # shared input: one [B*T, din] x [din, H*dout] product, not a batched one over an
            # expanded copy of x (and a weight gradient summed over B); a [B, H, T, dout] view
            B, _, T, _ = x.shape
            w = self.weight.permute(2, 0, 1).reshape(self.din, self.heads * self.dout)
            y = x.reshape(B * T, self.din) @ w
            return y.view(B, T, self.heads, self.dout).transpose(1, 2)
        return torch.matmul(x, self.weight.transpose(-1, -2))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, din={self.din}, dout={self.dout}"


class HeadConv(nn.Module):
    """Short causal depthwise convolution over time of ``[B, H', T, w]`` (``H'·w`` channels)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        with torch.no_grad():  # start close to the identity: most weight on the current token
            self.weight[:, 0, -1] += 1.0

    def forward(self, x: Tensor) -> Tensor:
        B, Hp, T, w = x.shape
        y = x.permute(0, 1, 3, 2).reshape(B, Hp * w, T)
        y = F.conv1d(F.pad(y, (self.width - 1, 0)), self.weight, groups=Hp * w)
        return y.reshape(B, Hp, w, T).permute(0, 1, 3, 2)


class MemoryInit(nn.Module):
    """The learned initial state of an in-context memory (``init learned``): weights ``[H, out, in]``.

    The outer level meta-learns them (knowledge transfer by initialization, paper eq 28).
    """

    def __init__(self, spec: memories.MemorySpec, heads: int):
        super().__init__()
        self.spec = spec
        self.weights = nn.ParameterList(
            [nn.Parameter(w) for w in memories.init_weights(spec, B_shape=(heads,))]
        )

    def forward(self) -> list[Tensor]:
        return list(self.weights)


def zeros_state(spec: memories.MemorySpec, B: int, heads: int, like: Tensor) -> list[Tensor]:
    """``init zeros``: every weight ``[B, H, out, in]`` zero."""
    return [like.new_zeros(B, heads, o, i) for o, i in spec.weight_shapes()]


def zeros_like_state(weights: Sequence[Tensor]) -> list[Tensor]:
    """A zero momentum for a state (``[B, H, out, in]`` each)."""
    return [torch.zeros_like(w) for w in weights]


def batch_of(state) -> int:
    """The batch size B of a carried state ((weights...), (momenta...))."""
    return state[0][0][0].shape[0]


def expand_state(weights: Sequence[Tensor], B: int) -> list[Tensor]:
    """Give a state ``[H, out, in]`` its batch dimension (a view: no copy)."""
    return [w.unsqueeze(0).expand(B, *w.shape) if w.dim() == 3 else w for w in weights]


class StaticMemory(nn.Module):
    """A memory with no in-context update (``never``/``frozen``/steps levels): ``[..., din] -> [..., dout]``.

    A SwiGLU keeps its gate and up projections in one ``[2 * hidden, din]`` weight (one matrix
    product instead of two); ``weights`` still lists ``[W_g, W_u, W_o]`` (views) for inspection.
    """

    def __init__(self, spec: memories.MemorySpec):
        super().__init__()
        self.spec = spec
        ws = memories.init_weights(spec)
        if spec.kind == "swiglu":
            self.w_in = nn.Parameter(torch.cat(ws[:2], dim=0))
            self.w_out = nn.Parameter(ws[2])
        else:
            self.ws = nn.ParameterList([nn.Parameter(w) for w in ws])

    @property
    def weights(self) -> list[Tensor]:
        if self.spec.kind == "swiglu":
            h = self.spec.hidden
            return [self.w_in[:h], self.w_in[h:], self.w_out]
        return list(self.ws)

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.kind == "swiglu":
            gate, up = (x @ self.w_in.mT).chunk(2, dim=-1)
            return (memories.activation(self.spec.act, gate) * up) @ self.w_out.mT
        return memories.forward(self.spec, list(self.ws), x)


def stack_states(states: Sequence[Sequence[Tensor]], B: int) -> list[Tensor]:
    """S states of one memory shape as one: weight l becomes ``[S * B, H, out, in]`` (state s at
    rows ``s*B:(s+1)*B``). Learned initial states ``[H, out, in]`` get their batch axis first."""
    out = []
    for ws in zip(*states):
        out.append(torch.cat([w.unsqueeze(0).expand(B, *w.shape) if w.dim() == 3 else w for w in ws], dim=0))
    return out


def tile(x: Tensor | float, S: int) -> Tensor | float:
    """``[B, ...] -> [S * B, ...]``: the same value for each of S stacked memories."""
    if not isinstance(x, Tensor):
        return x
    return x.repeat(S, *([1] * (x.dim() - 1)))


def part(x: Tensor, s: int, S: int) -> Tensor:
    """Memory ``s`` of S stacked ones: rows ``s*B:(s+1)*B`` of ``[S * B, ...]`` (a view)."""
    B = x.shape[0] // S
    return x[s * B:(s + 1) * B]


def heads(x: Tensor, H: int) -> Tensor:
    """Broadcast ``[B, 1, T, w]`` to ``[B, H, T, w]`` (a view)."""
    return x if x.shape[1] == H else x.expand(x.shape[0], H, *x.shape[2:])


def merge_heads(x: Tensor) -> Tensor:
    """``[B, H, T, w] -> [B, T, H·w]`` (heads concatenated)."""
    B, H, T, w = x.shape
    return x.transpose(1, 2).reshape(B, T, H * w)


def chunk(x: Tensor, c0: int, c1: int) -> Tensor:
    """Tokens ``c0:c1`` of ``[..., T, w]``."""
    return x[..., c0:c1, :]


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Divide by the L2 norm over the last dimension."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def gate(x: Tensor | float, H: int) -> Tensor | float:
    """A per-token scalar flow ``[B, H', C, 1]`` as the ``[B, H, C]`` gate a rule takes."""
    if not isinstance(x, Tensor):
        return x
    return heads(x, H).squeeze(-1)


def detach_state(state: Sequence[Tensor] | None) -> list[Tensor] | None:
    """The same state cut from the autograd graph (``grad through writes stop``/``truncate``)."""
    return None if state is None else [w.detach() for w in state]


def detach_carry(*states: Sequence[Tensor] | None) -> tuple:
    """States kept across calls (``reset never``): detached, so each call back-propagates alone."""
    return tuple(detach_state(s) for s in states)


def sq_norm(*states: Sequence[Tensor] | None) -> Tensor:
    """Sum of squares of every weight of the given states (detached, float32). One reduction
    pass a weight, no squared copy (a wide level's state is hundreds of MB: an eager
    ``pow(2).sum()`` wrote and read it once more each step)."""
    total = None
    for st in states:
        for w in st or ():
            v = torch.linalg.vector_norm(w.detach().float()).square()
            total = v if total is None else total + v
    return total if total is not None else torch.zeros(())


def all_finite(module: nn.Module) -> bool:
    """Are all parameters and recorded state norms of ``module`` finite? (Outside compiled code.)"""
    for p in module.parameters():
        if not torch.isfinite(p).all():
            return False
    for name, b in module.named_buffers():
        if name.rsplit(".", 1)[-1] == "state_sq" and not torch.isfinite(b).all():
            return False
    return True
