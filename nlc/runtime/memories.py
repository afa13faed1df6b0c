"""In-context memories: kinds, forward pass, closed-form inner gradients.

A memory is a small function ``y = M(x)`` whose parameters are a list of weight matrices. The
weight list is ordered from the input side to the output side; every weight has shape
``[..., out, in]`` (usually ``[B, H, out, in]``: one memory per sequence and head) and is applied
as ``z = W h`` for every token, i.e. ``z = h @ W.mT`` on token tensors ``[..., C, in]``. Memories
have no biases.

Kinds (``MemorySpec.kind``):

``linear``
    ``y = W x``. One weight ``(dout, din)``.
``mlp`` (``depth`` L >= 1)
    ``h_0 = x``; ``h_l = act(W_l h_{l-1})`` for ``l < L``; ``y = W_L h_{L-1}``.
    Weights ``(hidden, din)``, ``(hidden, hidden)`` x (L - 2), ``(dout, hidden)``; depth 1 is
    ``linear``.
``residual_mlp`` (``depth`` L >= 1, ``din == dout``)
    ``y = x + mlp(x)``. The memory ``(.) + W1 act(W2 .)`` of the Nested Learning paper is
    ``residual_mlp`` of depth 2; note that our list order is input side first, so the paper's
    ``W2`` is ``weights[0]`` and its ``W1`` is ``weights[1]``.
``swiglu``
    ``y = W_o (act(W_g x) * (W_u x))`` with ``act = silu`` by default (SwiGLU; ``gelu`` gives
    GEGLU). Weights ``[W_g (hidden, din), W_u (hidden, din), W_o (dout, hidden)]``.

Objectives (inner loss per token, summed over the output features):

``l2``     ``l = 1/2 ||y - v||^2``        error ``e = y - v``
``dot``    ``l = -<y, v>``                error ``e = -v``
``huber``  ``l = sum_i huber_delta(y_i - v_i)``  error ``e = clamp(y - v, -delta, delta)``

``forward_backward`` returns, for every weight ``W_l``, the per-token pair ``(a_l, u_l)`` (that
layer's input and its output delta at the given weights) such that the per-token inner gradient
is ``dl_t/dW_l = u_{l,t} a_{l,t}^T``. The backward pass is written out with explicit activation
derivatives, so differentiating it (the outer loss back-propagating through the inner writes) is
ordinary first-order autograd: no double backward is ever needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "KINDS",
    "OBJECTIVES",
    "MemorySpec",
    "activation",
    "activation_and_derivative",
    "forward",
    "forward_backward",
    "forward_with",
    "has_closed_form",
    "init_weights",
    "inner_loss",
    "layer_inputs",
    "output_error",
]

KINDS = ("linear", "mlp", "residual_mlp", "swiglu")
OBJECTIVES = ("l2", "dot", "huber")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "tanh", "sigmoid", "identity")
INIT_SCHEMES = ("default", "zeros", "zero_last")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715


@dataclass(frozen=True)
class MemorySpec:
    """Shape and kind of one in-context memory (see the module docstring for the equations).

    ``hidden`` is required (> 0) for ``mlp``/``residual_mlp`` of depth >= 2 and for ``swiglu``;
    it is ignored otherwise. ``act`` is the hidden activation (for ``swiglu``: the gate
    activation). ``linear`` and ``swiglu`` have ``depth == 1``.
    """

    kind: str
    din: int
    dout: int
    hidden: int = 0
    depth: int = 1
    act: str = "silu"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"unknown memory kind {self.kind!r}; expected one of {KINDS}"
            )
        if self.act not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.act!r}; expected one of {ACTIVATIONS}"
            )
        if self.din < 1 or self.dout < 1:
            raise ValueError(
                f"memory dims must be >= 1, got din={self.din}, dout={self.dout}"
            )
        if self.depth < 1:
            raise ValueError(f"memory depth must be >= 1, got {self.depth}")
        if self.kind in ("linear", "swiglu") and self.depth != 1:
            raise ValueError(f"{self.kind} memory has depth 1, got depth={self.depth}")
        if self.kind == "residual_mlp" and self.din != self.dout:
            raise ValueError(
                f"residual_mlp needs din == dout (y = x + mlp(x)), got {self.din} -> {self.dout}"
            )
        needs_hidden = self.kind == "swiglu" or (
            self.kind in ("mlp", "residual_mlp") and self.depth >= 2
        )
        if needs_hidden and self.hidden < 1:
            raise ValueError(
                f"{self.kind} memory of depth {self.depth} needs hidden >= 1"
            )

    @property
    def n_weights(self) -> int:
        return (
            3 if self.kind == "swiglu" else (1 if self.kind == "linear" else self.depth)
        )

    def weight_shapes(self) -> list[tuple[int, int]]:
        """``(out, in)`` of every weight, input side first."""
        if self.kind == "linear" or (self.kind != "swiglu" and self.depth == 1):
            return [(self.dout, self.din)]
        if self.kind == "swiglu":
            return [
                (self.hidden, self.din),
                (self.hidden, self.din),
                (self.dout, self.hidden),
            ]
        inner = [(self.hidden, self.hidden)] * (self.depth - 2)
        return [(self.hidden, self.din), *inner, (self.dout, self.hidden)]

    def weight_names(self) -> list[str]:
        """Readable names for the weights, in list order (``W1`` is the input side)."""
        if self.kind == "swiglu":
            return ["W_g", "W_u", "W_o"]
        return [f"W{i + 1}" for i in range(self.n_weights)]

    def input_side(self) -> list[bool]:
        """For every weight, whether it is applied to the memory input itself."""
        if self.kind == "swiglu":
            return [True, True, False]
        return [i == 0 for i in range(self.n_weights)]


def has_closed_form(kind: str, objective: str) -> bool:
    """Whether ``(kind, objective)`` has a closed-form inner gradient in this module.

    Pairs without one go through ``nlc.runtime.chunk.chunk_step_autograd``.
    """
    return kind in KINDS and objective in OBJECTIVES


# --------------------------------------------------------------------------------------------
# activations with explicit derivatives


def activation(name: str, z: Tensor) -> Tensor:
    """``act(z)``; ``gelu`` is the exact (erf) GELU, ``gelu_tanh`` the tanh approximation."""
    if name == "silu":
        return z * torch.sigmoid(z)
    if name == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z * _INV_SQRT_2))
    if name == "gelu_tanh":
        return (
            0.5
            * z
            * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z)))
        )
    if name == "relu":
        return torch.clamp_min(z, 0.0)
    if name == "tanh":
        return torch.tanh(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "identity":
        return z
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def activation_and_derivative(name: str, z: Tensor) -> tuple[Tensor, Tensor]:
    """``(act(z), act'(z))`` written out explicitly (``relu'(0) = 0``)."""
    if name == "silu":
        s = torch.sigmoid(z)
        return z * s, s * (1.0 + z * (1.0 - s))
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return z * cdf, cdf + z * pdf
    if name == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z))
        dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
        return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    if name == "relu":
        pos = z > 0
        return torch.where(pos, z, torch.zeros_like(z)), pos.to(z.dtype)
    if name == "tanh":
        t = torch.tanh(z)
        return t, 1.0 - t * t
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s, s * (1.0 - s)
    if name == "identity":
        return z, torch.ones_like(z)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


# --------------------------------------------------------------------------------------------
# init


def init_weights(
    spec: MemorySpec,
    *,
    B_shape: Sequence[int] = (),
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    scheme: str = "default",
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Initial weights ``[*B_shape, out, in]``.

    Schemes: ``default`` draws every weight from N(0, 1/fan_in); ``zeros`` sets all to zero
    (note that a deep memory started at zero only ever updates its last layer: the deltas of
    the other layers are zero); ``zero_last`` draws like ``default`` but zeroes the output
    weight, so an ``mlp`` starts as the zero map and a ``residual_mlp`` as the identity.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(
            f"unknown init scheme {scheme!r}; expected one of {INIT_SCHEMES}"
        )
    shapes = spec.weight_shapes()
    out = []
    for i, (o, n_in) in enumerate(shapes):
        shape = (*tuple(B_shape), o, n_in)
        zero = scheme == "zeros" or (scheme == "zero_last" and i == len(shapes) - 1)
        if zero:
            out.append(torch.zeros(shape, dtype=dtype, device=device))
        else:
            w = torch.randn(shape, generator=generator, dtype=dtype, device=device)
            out.append(w * (1.0 / math.sqrt(n_in)))
    return out


# --------------------------------------------------------------------------------------------
# forward


def _linear_map(weight: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda h: h @ weight.mT


def forward_with(
    spec: MemorySpec, maps: Sequence[Callable[[Tensor], Tensor]], x: Tensor
) -> Tensor:
    """The memory's structure with every ``z = W_l h`` replaced by ``maps[l](h)``.

    ``maps[l]`` takes token inputs ``[..., C, in_l]`` and returns ``[..., C, out_l]``. With
    ``maps[l] = h -> h @ W_l.mT`` this is ``forward``; the chunk runtime passes maps that apply
    a different (time-t) weight to every token, which gives the layer-by-layer causal read.
    """
    if len(maps) != spec.n_weights:
        raise ValueError(
            f"{spec.kind} memory has {spec.n_weights} weights, got {len(maps)}"
        )
    if spec.kind == "swiglu":
        return maps[2](activation(spec.act, maps[0](x)) * maps[1](x))
    h = x
    last = len(maps) - 1
    for i, f in enumerate(maps):
        z = f(h)
        h = activation(spec.act, z) if i < last else z
    return x + h if spec.kind == "residual_mlp" else h


def forward(spec: MemorySpec, weights: Sequence[Tensor], x: Tensor) -> Tensor:
    """``y = M(x)``: weights ``[..., out, in]``, x ``[..., C, din]`` -> ``[..., C, dout]``."""
    return forward_with(spec, [_linear_map(w) for w in weights], x)


def layer_inputs(
    spec: MemorySpec, weights: Sequence[Tensor], x: Tensor
) -> list[Tensor]:
    """The input of every weight (``a_l``, ``[..., C, in_l]``) for memory input ``x``."""
    inputs: list[Tensor] = []

    def recorder(w: Tensor) -> Callable[[Tensor], Tensor]:
        def f(h: Tensor) -> Tensor:
            inputs.append(h)
            return h @ w.mT

        return f

    forward_with(spec, [recorder(w) for w in weights], x)
    return inputs


# --------------------------------------------------------------------------------------------
# objectives and the closed-form backward


def output_error(
    objective: str, y: Tensor, target: Tensor, huber_delta: float = 1.0
) -> Tensor:
    """``e = dl/dy`` of the per-token inner loss (see the module docstring)."""
    if objective == "l2":
        return y - target
    if objective == "dot":
        return torch.broadcast_to(-target, y.shape)
    if objective == "huber":
        return torch.clamp(y - target, -huber_delta, huber_delta)
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def inner_loss(
    spec: MemorySpec,
    weights: Sequence[Tensor],
    x: Tensor,
    target: Tensor,
    objective: str,
    huber_delta: float = 1.0,
) -> Tensor:
    """Per-token inner loss ``l_t`` (``[..., C]``), summed over output features."""
    y = forward(spec, weights, x)
    r = y - target
    if objective == "l2":
        return 0.5 * (r * r).sum(-1)
    if objective == "dot":
        return -(y * target).sum(-1)
    if objective == "huber":
        a = r.abs()
        quad = 0.5 * r * r
        lin = huber_delta * (a - 0.5 * huber_delta)
        return torch.where(a <= huber_delta, quad, lin).sum(-1)
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def forward_backward(
    spec: MemorySpec,
    weights: Sequence[Tensor],
    x: Tensor,
    target: Tensor,
    objective: str,
    huber_delta: float = 1.0,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Forward plus closed-form backward of the per-token inner loss.

    Returns ``(y, inputs, deltas)``: ``y`` ``[..., C, dout]``; for every weight ``l``,
    ``inputs[l]`` ``[..., C, in_l]`` and ``deltas[l]`` ``[..., C, out_l]`` with
    ``d l_t / d W_l = deltas[l][t] outer inputs[l][t]``.
    """
    if len(weights) != spec.n_weights:
        raise ValueError(
            f"{spec.kind} memory has {spec.n_weights} weights, got {len(weights)}"
        )
    if spec.kind == "swiglu":
        w_g, w_u, w_o = weights
        z_g = x @ w_g.mT
        z_u = x @ w_u.mT
        s, ds = activation_and_derivative(spec.act, z_g)
        hid = s * z_u
        y = hid @ w_o.mT
        e = output_error(objective, y, target, huber_delta)
        dh = e @ w_o
        return y, [x, x, hid], [dh * z_u * ds, dh * s, e]

    n = len(weights)
    inputs: list[Tensor] = []
    derivs: list[Tensor] = []
    h = x
    z = x
    for i, w in enumerate(weights):
        inputs.append(h)
        z = h @ w.mT
        if i < n - 1:
            h, dz = activation_and_derivative(spec.act, z)
            derivs.append(dz)
    y = x + z if spec.kind == "residual_mlp" else z
    u = output_error(objective, y, target, huber_delta)
    deltas: list[Tensor] = [u] * n
    for i in range(n - 1, 0, -1):
        u = (u @ weights[i]) * derivs[i - 1]
        deltas[i - 1] = u
    return y, inputs, deltas
