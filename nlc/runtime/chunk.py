"""One chunk of an in-context memory update, in exact chunk-parallel form.

Every rule below updates each weight matrix ``W`` (``[B, H, out, in]``) of a memory token by
token, ``t = 1..C``, with **every inner gradient taken at the chunk-start weights** ``W_0``
(paper eq 90; TTT mini-batch GD; Titans eq 16). Per token the gradient of weight ``W`` is the
rank-1 matrix ``g_t = u_t a_t^T`` (``nlc.runtime.memories.forward_backward``), and
``eta_t, alpha_t, beta_t`` are scalars per ``(b, h, t)``:

``gd``            ``W_t = alpha_t W_{t-1} - eta_t g_t``
``momentum``      ``S_t = beta_t S_{t-1} - eta_t g_t``;  ``W_t = alpha_t W_{t-1} + S_t``
``dgd``           ``W_t = W_{t-1} (alpha_t I - eta'_t a_t a_t^T) - eta_t g_t``
``dgd+momentum``  ``S_t = beta_t S_{t-1} - eta_t g_t``;
                  ``W_t = W_{t-1} (alpha_t I - eta'_t a_t a_t^T) + S_t``

``dgd_form="eq88"``: ``eta' = eta``. ``dgd_form="normalized"``: ``eta`` is replaced everywhere
(preconditioner, gradient write, momentum write) by ``eta_t / (1 + eta_t ||a_t||^2)``, the exact
proximal (Sherman-Morrison) step of paper eqs 56-57 with ``lambda = ||a_t||^2``.

Nothing here loops over tokens, and no per-token weight copy is formed. With the decay products
``A[t, s] = prod_{j=s+1..t} alpha_j`` (``gamma_t = A[t, 0]``), ``Bm[t, s]`` the same for
``beta``, ``G = A`` (gd) or ``G = A @ Bm`` (momentum) and ``d = A @ Bm[:, 0]``::

    W_t = gamma_t W_0 + d_t S_0 - sum_{s<=t} G[t,s] eta_s u_s a_s^T  +  sum_{s<=t} A[t,s] w_s a_s^T

where the last term exists only for ``dgd``; its vectors ``w_s`` (= ``-eta'_s W_{s-1} a_s``)
solve the unit-lower-triangular C x C system ``(I + K) w = R`` with

    K[t, s] = eta'_t A[t-1, s] (a_t . a_s)                                   (s < t)
    R_t     = -eta'_t ( gamma_{t-1} W_0 a_t + d_{t-1} S_0 a_t
                        - sum_{s<t} G[t-1, s] eta_s (a_s . a_t) u_s ).

The chunk-end state is row ``C``; a causal read applies row ``t`` to the token's query, which is
a masked C x C product (layer by layer for deep memories). The decay products are computed with
``cumprod`` over a masked C x C matrix (never ``exp`` of log differences), so ``alpha_t = 0`` and
``beta_t = 0`` are exact in value and in gradient, and no quantity is ever divided by a decay.
See ``docs/semantics.md`` for the full statement and derivation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fused as _fused
from . import linear_chunks as _linear
from .memories import (
    OBJECTIVES,
    MemorySpec,
    forward,
    forward_backward,
    forward_with,
    has_closed_form,
    layer_inputs,
)

__all__ = [
    "DGD_FORMS",
    "DGD_LAYERS",
    "READ_MODES",
    "RULE_KINDS",
    "RuleSpec",
    "chunk_step",
    "chunk_step_autograd",
    "decay_matrix",
    "has_closed_form",
    "scan",
]

RULE_KINDS = ("gd", "momentum", "dgd")
DGD_FORMS = ("eq88", "normalized")
DGD_LAYERS = ("all", "input")
READ_MODES = ("chunk", "causal")


@dataclass(frozen=True)
class RuleSpec:
    """Update rule of an in-context memory.

    ``kind``: ``gd`` | ``momentum`` | ``dgd``. ``momentum=True`` adds a momentum state to
    ``dgd`` (``gd`` with ``momentum=True`` is the ``momentum`` rule). ``dgd_form``: ``eq88``
    (``eta' = eta``) or ``normalized`` (``eta -> eta / (1 + eta ||a||^2)``). ``dgd_layers``:
    which weights of a deep memory get the ``(alpha I - eta' a a^T)`` preconditioner: ``all``
    (default: every weight, each with its own input ``a``) or ``input`` (only the weights applied
    to the memory input: the first layer of an MLP, ``W_g`` and ``W_u`` of a SwiGLU; the other
    weights follow the plain ``gd``/``momentum`` rule with decay ``alpha``).
    """

    kind: str
    momentum: bool = False
    dgd_form: str = "eq88"
    dgd_layers: str = "all"

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ValueError(
                f"unknown rule {self.kind!r}; expected one of {RULE_KINDS}"
            )
        if self.dgd_form not in DGD_FORMS:
            raise ValueError(
                f"unknown dgd_form {self.dgd_form!r}; expected one of {DGD_FORMS}"
            )
        if self.dgd_layers not in DGD_LAYERS:
            raise ValueError(
                f"unknown dgd_layers {self.dgd_layers!r}; expected one of {DGD_LAYERS}"
            )

    @property
    def uses_momentum(self) -> bool:
        return self.kind == "momentum" or self.momentum

    @property
    def is_dgd(self) -> bool:
        return self.kind == "dgd"


# --------------------------------------------------------------------------------------------
# decay coefficients


def _products(gp: Tensor) -> Tensor:
    """``P[..., t, s] = prod_{j=s+1..t} gp_j`` (``0 <= s <= t < n``, else 0) for ``gp [..., n]``:
    a ``cumprod`` along the last axis of a masked matrix, so zeros are exact and nothing is
    divided."""
    n = gp.shape[-1]
    idx = torch.arange(n, device=gp.device)
    # built transposed, [..., s, t] = gp_t for t > s, so the cumprod runs along the last axis.
    # Down a leading axis of 129 (C = 128), inductor (torch 2.11, CUDA) failed to generate the
    # scan's code; a scan along the last axis is its common case. Same products, same order.
    after = idx[:, None] < idx[None, :]
    m = torch.where(after, gp[..., None, :], torch.ones((), dtype=gp.dtype, device=gp.device))
    p = torch.cumprod(m, dim=-1).mT
    return torch.where(idx[:, None] >= idx[None, :], p, torch.zeros((), dtype=p.dtype, device=p.device))


class _Products(torch.autograd.Function):
    """:func:`_products` with its gradient in closed form: ``dP[t, s] / dgp_j = P[j-1, s] P[t, j]``
    for ``s < j <= t``, so ``dgp_j = sum_s P[j-1, s] (P^T dP)[j, s]``: one batched matrix product,
    products only (zeros exact).

    torch's own ``cumprod`` backward, traced with gradients on (as ``torch.compile`` traces a
    backward), unrolls into a loop over the scanned axis: at C = 128, 1,570 operations per decay
    matrix (46 here), hundreds of small kernels in the compiled chunk step. The backward here
    recomputes ``P`` with differentiable operations, so it is itself differentiable."""

    generate_vmap_rule = True  # usable under torch.func transforms

    @staticmethod
    def forward(gp: Tensor) -> Tensor:
        return _products(gp)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (gp,) = ctx.saved_tensors
        p = _products(gp)
        m = p.mT @ grad
        return F.pad((m[..., 1:, :] * p[..., :-1, :]).sum(-1), (1, 0))


class _Suffix(torch.autograd.Function):
    """``rev[..., s] = prod_{j=s+1..C} g_j`` for ``s = 0..C`` (``g [..., C]``, token ``j`` at index
    ``j - 1``; ``rev[C] = 1``), a reversed ``cumprod`` in O(C), with the gradient
    ``dg_j = rev[j] sum_{s<j} P[j-1, s] drev[s]`` (:func:`_products`; O(C^2), products only)
    instead of ``cumprod``'s unrolled backward (see :class:`_Products`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor) -> Tensor:
        return _suffix(g)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (g,) = ctx.saved_tensors
        p = _products(F.pad(g, (1, 0), value=1.0))
        u = (p[..., :-1, :] @ grad[..., :, None])[..., 0]
        return u * _suffix(g)[..., 1:]


def _suffix(g: Tensor) -> Tensor:
    return F.pad(torch.cumprod(g.flip(-1), dim=-1), (1, 0), value=1.0).flip(-1)


# _Suffix's backward forms a (C+1) x (C+1) matrix per row: beyond this chunk size the plain
# cumprod (its own backward) is used instead
SUFFIX_MATRIX_MAX = 1024


def decay_matrix(
    g: Tensor | None, C: int, *, dtype: torch.dtype, device=None
) -> Tensor:
    """``P[..., t, s] = prod_{j=s+1..t} g_j`` for ``0 <= s <= t <= C``, else 0.

    ``g`` is ``[..., C]`` (token ``j`` of the chunk is index ``j - 1``); index 0 of ``P`` is the
    chunk start, so ``P[..., t, 0]`` is the cumulative product ``g_1 ... g_t`` and the diagonal
    is 1. Computed as a ``cumprod`` down the columns of a masked matrix, so zeros in ``g`` are
    exact (value and gradient) and nothing is divided; the gradient is a closed form
    (:class:`_Products`). ``g=None`` means ``g == 1``.
    """
    if g is None:
        idx = torch.arange(C + 1, device=device)
        return (idx[:, None] >= idx[None, :]).to(dtype)
    gp = F.pad(g, (1, 0), value=1.0)  # [..., C+1]; the chunk-start slot is a dummy 1
    return _Products.apply(gp) if gp.requires_grad else _products(gp)


def _end_row(
    g: Tensor | None, C: int, *, dtype: torch.dtype, device
) -> tuple[Tensor, Tensor]:
    """``(prod_{j=1..C} g_j, [prod_{j=s+1..C} g_j for s = 1..C])`` in O(C) (a reversed cumprod)."""
    if g is None:
        return torch.ones((), dtype=dtype, device=device), torch.ones(
            C, dtype=dtype, device=device
        )
    rev = _Suffix.apply(g) if g.requires_grad and C <= SUFFIX_MATRIX_MAX else _suffix(g)
    return rev[..., 0], rev[..., 1:]


class _Coeffs:
    """Scalar coefficients of one chunk, shared by all weights of a memory.

    ``full=False`` (chunk read, no dgd) computes only what the chunk-end state needs: O(C) for
    ``gd``, one C x C decay matrix of ``beta`` and a vector-matrix product for ``momentum``.
    ``full=True`` (causal read or dgd) computes the C x C matrices; with momentum this includes
    ``G = A @ Bm``, O(C^3) scalar work per (b, h), negligible next to the O(C^2 d) products
    for the chunk sizes where causal reads and dgd are used.
    """

    def __init__(
        self,
        alpha: Tensor | None,
        beta: Tensor | None,
        C: int,
        *,
        momentum: bool,
        full: bool,
        dgd: bool,
        dtype: torch.dtype,
        device,
    ) -> None:
        self.full = full
        self.d: Tensor | None = None
        self.d_end: Tensor | None = None
        if full:
            a_ext = decay_matrix(alpha, C, dtype=dtype, device=device)
            self.gam = a_ext[..., 1:, 0]  # gamma_t, t = 1..C
            self.A = a_ext[..., 1:, 1:]
            self.gam_end = self.gam[..., -1]
            self.A_end = self.A[..., -1, :]
        else:
            self.gam_end, self.A_end = _end_row(alpha, C, dtype=dtype, device=device)
        if momentum:
            b_ext = decay_matrix(beta, C, dtype=dtype, device=device)
            bm = b_ext[..., 1:, 1:]
            b = b_ext[..., 1:, 0]
            self.mom_row = bm[..., -1, :]
            self.b_end = b[..., -1]
            if full:
                self.G = self.A @ bm
                self.d = (self.A @ b[..., None])[..., 0]
                self.G_end = self.G[..., -1, :]
                self.d_end = self.d[..., -1]
            else:
                self.G_end = (self.A_end[..., None, :] @ bm)[..., 0, :]
                self.d_end = (self.A_end * b).sum(-1)
        else:
            if full:
                self.G = self.A
            self.G_end = self.A_end
        if dgd:
            assert full
            self.A_prev = a_ext[..., :-1, 1:]  # row t holds A[t-1, :], strictly lower
            self.gam_prev = a_ext[..., :-1, 0]  # gamma_{t-1}, gamma_0 = 1
            if self.d is not None:
                self.d_prev = F.pad(self.d[..., :-1], (1, 0))


# --------------------------------------------------------------------------------------------
# gradient representations


class _Factored:
    """Per-token gradients ``g_s = u_s a_s^T`` kept as the pair ``(u, a)``."""

    def __init__(self, u: Tensor, a: Tensor) -> None:
        self.u, self.a = u, a

    def apply(self, coef: Tensor, h: Tensor) -> Tensor:
        """``out_t = sum_s coef[t, s] g_s h_t`` -> ``[..., C, out]``."""
        return (coef * (h @ self.a.mT)) @ self.u

    def total(self, c: Tensor) -> Tensor:
        """``sum_s c_s g_s`` -> ``[..., out, in]``."""
        return (self.u * c[..., None]).mT @ self.a

    def per_token(self, coef: Tensor) -> Tensor:
        """``sum_s coef[t, s] g_s`` for every t -> ``[..., C, out, in]``."""
        return torch.einsum("...ts,...so,...si->...toi", coef, self.u, self.a)


class _Dense:
    """Per-token gradients as full matrices ``g`` ``[..., C, out, in]`` (autograd fallback)."""

    def __init__(self, g: Tensor) -> None:
        self.g = g

    def apply(self, coef: Tensor, h: Tensor) -> Tensor:
        return torch.einsum("...ts,...soi,...ti->...to", coef, self.g, h)

    def total(self, c: Tensor) -> Tensor:
        return torch.einsum("...s,...soi->...oi", c, self.g)

    def per_token(self, coef: Tensor) -> Tensor:
        return torch.einsum("...ts,...soi->...toi", coef, self.g)


# --------------------------------------------------------------------------------------------
# one weight matrix over one chunk


class _Layer:
    """The rule algebra of one weight matrix over one chunk."""

    def __init__(
        self,
        W0: Tensor,
        S0: Tensor | None,
        grad,
        a: Tensor | None,
        eta: Tensor,
        co: _Coeffs,
        precond: bool,
    ) -> None:
        self.W0 = W0
        self.S0 = S0
        self.grad = grad
        self.a = a
        self.eta = (
            eta  # the write coefficient; also eta' of the preconditioner (section 5)
        )
        self.co = co
        self.precond = precond
        if not co.full:
            return
        self.Geta = co.G * eta[..., None, :]  # G[t, s] eta_s
        if precond:
            assert a is not None
            aa = a @ a.mT
            R = co.gam_prev[..., None] * (a @ W0.mT)
            if S0 is not None:
                R = R + co.d_prev[..., None] * (a @ S0.mT)
            geta_prev = F.pad(self.Geta[..., :-1, :], (0, 0, 1, 0))
            R = -eta[..., None] * (R - grad.apply(geta_prev, a))
            K = eta[..., :, None] * co.A_prev * aa
            self.w_pre = torch.linalg.solve_triangular(
                K, R, upper=False, unitriangular=True
            )

    def apply(self, h: Tensor) -> Tensor:
        """``W_t h_t`` for every token t of the chunk (``h`` ``[..., C, in]``)."""
        co = self.co
        z = co.gam[..., None] * (h @ self.W0.mT)
        if self.S0 is not None and co.d is not None:
            z = z + co.d[..., None] * (h @ self.S0.mT)
        z = z - self.grad.apply(self.Geta, h)
        if self.precond:
            z = z + (co.A * (h @ self.a.mT)) @ self.w_pre
        return z

    def per_token_weights(self) -> Tensor:
        """``W_t`` for every t, ``[..., C, out, in]`` (only the generic-forward fallback)."""
        co = self.co
        w = co.gam[..., None, None] * self.W0[..., None, :, :]
        if self.S0 is not None and co.d is not None:
            w = w + co.d[..., None, None] * self.S0[..., None, :, :]
        w = w - self.grad.per_token(self.Geta)
        if self.precond:
            w = w + torch.einsum("...ts,...so,...si->...toi", co.A, self.w_pre, self.a)
        return w

    def end_weight(self) -> Tensor:
        co = self.co
        w = co.gam_end[..., None, None] * self.W0
        if self.S0 is not None and co.d_end is not None:
            w = w + co.d_end[..., None, None] * self.S0
        w = w - self.grad.total(co.G_end * self.eta)
        if self.precond:
            w = w + (self.w_pre * co.A_end[..., None]).mT @ self.a
        return w

    def end_momentum(self) -> Tensor:
        co = self.co
        assert self.S0 is not None
        return co.b_end[..., None, None] * self.S0 - self.grad.total(
            co.mom_row * self.eta
        )


# --------------------------------------------------------------------------------------------
# entry points


def _compute_dtype(*tensors) -> torch.dtype:
    dt = torch.float32
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point():
            dt = torch.promote_types(dt, t.dtype)
    return dt


def _gate(g, shape, dtype, device) -> Tensor:
    if not isinstance(g, Tensor):  # a constant: filled on the device (no host copy: CUDA graphs)
        return torch.full(shape, float(g), dtype=dtype, device=device)
    return torch.broadcast_to(g.to(dtype=dtype, device=device), shape)


def _check_call(rule: RuleSpec, read: str, moms0, beta, objective: str | None) -> None:
    if not isinstance(rule, RuleSpec):
        raise TypeError(f"rule must be a RuleSpec, got {type(rule).__name__}")
    if read not in READ_MODES:
        raise ValueError(f"unknown read mode {read!r}; expected one of {READ_MODES}")
    if rule.uses_momentum and beta is None:
        raise ValueError(
            f"rule {rule} has momentum and needs beta (the momentum gates)"
        )
    if not rule.uses_momentum and moms0 is not None:
        raise ValueError(f"rule {rule} has no momentum state, but moms0 was given")
    if objective is not None and objective not in OBJECTIVES:
        raise ValueError(
            f"unknown objective {objective!r}; expected one of {OBJECTIVES}"
        )


def _apply_rule(
    spec: MemorySpec | None,
    rule: RuleSpec,
    W0: list[Tensor],
    S0: list[Tensor] | None,
    grads: list,
    a_list: list[Tensor] | None,
    eta: Tensor,
    alpha: Tensor | None,
    beta: Tensor | None,
    q: Tensor | None,
    read: str,
    C: int,
    dtype: torch.dtype,
    fwd: Callable | None,
    y_keys: Tensor | None = None,
    update: bool = True,
):
    """The rule over one chunk from its per-token gradients. ``y_keys``: the memory at ``W_0`` on
    the keys, when the caller has it; a chunk read whose queries are the keys returns it instead
    of computing the same forward again. ``update=False``: the read only, ``None`` end states."""
    momentum = rule.uses_momentum
    n = len(W0)
    if rule.is_dgd:
        if rule.dgd_layers == "all":
            precond = [True] * n
        elif spec is None:
            raise ValueError(
                "dgd_layers='input' needs a MemorySpec to know the input weights"
            )
        else:
            precond = spec.input_side()
    else:
        precond = [False] * n
    full = read == "causal" or any(precond)
    co = _Coeffs(
        alpha,
        beta,
        C,
        momentum=momentum,
        full=full,
        dgd=any(precond),
        dtype=dtype,
        device=eta.device,
    )
    layers = []
    for i in range(n):
        a = a_list[i] if a_list is not None else None
        eta_l = eta
        if precond[i] and rule.dgd_form == "normalized":
            eta_l = eta / (1.0 + eta * (a * a).sum(-1))
        s0 = S0[i] if S0 is not None else None
        layers.append(_Layer(W0[i], s0, grads[i], a, eta_l, co, precond[i]))

    if q is None:
        y = None
    elif read == "chunk" and y_keys is not None:
        y = y_keys
    elif read == "chunk":
        y = fwd(W0, q) if fwd is not None else forward(spec, W0, q)
    elif fwd is None:
        y = forward_with(spec, [lay.apply for lay in layers], q)
    else:
        wt = [lay.per_token_weights() for lay in layers]
        y = fwd(wt, q[..., None, :])[..., 0, :]
    if not update:
        return y, None, None
    w_end = [lay.end_weight() for lay in layers]
    s_end = [lay.end_momentum() for lay in layers] if momentum else None
    return y, w_end, s_end


def _check_shapes(spec: MemorySpec, weights0, moms0, k, target, q, read) -> None:
    shapes = spec.weight_shapes()
    got = [tuple(w.shape[-2:]) for w in weights0]
    if got != shapes:
        raise ValueError(
            f"{spec.kind} memory expects weights {shapes} (out, in), got {got}"
        )
    if moms0 is not None and [tuple(s.shape[-2:]) for s in moms0] != shapes:
        raise ValueError(f"momentum states must match the weights {shapes}")
    if k.dim() < 2 or k.shape[-1] != spec.din:
        raise ValueError(f"keys must be [..., C, {spec.din}], got {tuple(k.shape)}")
    if target.shape[:-1] != k.shape[:-1] or target.shape[-1] != spec.dout:
        raise ValueError(
            f"targets must be [..., C, {spec.dout}] like the keys, got {tuple(target.shape)}"
        )
    if q is not None:
        if q.shape[-1] != spec.din:
            raise ValueError(
                f"queries must be [..., C, {spec.din}], got {tuple(q.shape)}"
            )
        if read == "causal" and q.shape[:-1] != k.shape[:-1]:
            raise ValueError(
                "a causal read needs one query per key (token t reads W_t)"
            )


def _prepare(weights0, moms0, k, target, q, eta, alpha, beta, rule, operands: bool = True):
    """Everything cast to the compute dtype (``operands`` off: the keys, targets and queries
    left as they are, for a caller that casts them only where it must)."""
    dt = _compute_dtype(*weights0, *(moms0 or ()), k, target, q, eta, alpha, beta)
    dev = k.device
    shape = k.shape[:-1]
    W0 = [w.to(dt) for w in weights0]
    S0 = None
    if rule.uses_momentum:
        S0 = (
            [torch.zeros_like(w) for w in W0]
            if moms0 is None
            else [s.to(dt) for s in moms0]
        )
    if operands:
        k = k.to(dt)
        target = target.to(dt)
        q = q.to(dt) if q is not None else None
    eta = _gate(eta, shape, dt, dev)
    alpha = _gate(alpha, shape, dt, dev) if alpha is not None else None
    beta = _gate(beta, shape, dt, dev) if rule.uses_momentum else None
    return dt, W0, S0, k, target, q, eta, alpha, beta


def chunk_step(
    spec: MemorySpec,
    objective: str,
    rule: RuleSpec,
    weights0: Sequence[Tensor],
    moms0: Sequence[Tensor] | None,
    k: Tensor,
    target: Tensor,
    q: Tensor | None,
    eta: Tensor,
    alpha: Tensor | None = None,
    beta: Tensor | None = None,
    read: str = "chunk",
    huber_delta: float = 1.0,
    update: bool = True,
) -> tuple[Tensor | None, list[Tensor] | None, list[Tensor] | None]:
    """One chunk of ``C`` tokens of one memory, closed-form inner gradients.

    Args:
        weights0: chunk-start weights, each ``[B, H, out, in]`` (or broadcastable to it, e.g. a
            learned initial state ``[H, out, in]``).
        moms0: chunk-start momentum states (same shapes), ``None`` for rules without momentum
            (zeros are used when a momentum rule gets ``None``).
        k, target: keys ``[B, H, C, din]`` and targets ``[B, H, C, dout]`` of the inner loss.
        q: queries ``[B, H, C, din]`` (``None``: no read). The keys themselves (``q is k``, a
            level with ``let query = key``): a chunk read is then the inner loss's own forward.
        eta, alpha, beta: per-token gates ``[B, H, C]`` (anything broadcastable is accepted).
            ``alpha=None`` means 1 (no decay); ``beta`` is required iff the rule has momentum.
        read: ``chunk`` (every token reads ``W_0``) or ``causal`` (token t reads ``W_t``).
        update: ``False`` for a chunk whose end state nothing reads (the last chunk of a
            sequence or of a segment before a reset, ``run_chunks(..., final_state=False)``):
            the read only (a chunk read is the memory's forward at ``W_0``; no inner gradient),
            and ``None`` for the end states.

    Returns ``(y [B, H, C, dout], weights at chunk end, momentum states at chunk end or None)``.
    All tensors are computed in the promotion of the inputs' dtypes with float32.
    """
    _check_call(rule, read, moms0, beta, objective)
    if not has_closed_form(spec.kind, objective):
        raise ValueError(
            f"no closed form for ({spec.kind}, {objective}); use chunk_step_autograd"
        )
    _check_shapes(spec, weights0, moms0, k, target, q, read)
    reads_keys = q is k  # the level reads at its keys (`let query = key`): one forward serves both
    dt, W0, S0, k, target, q, eta, alpha, beta = _prepare(
        weights0, moms0, k, target, q, eta, alpha, beta, rule
    )
    if reads_keys:
        q = k
    if not update and (q is None or read == "chunk"):
        return (forward(spec, W0, q) if q is not None else None), None, None
    if _fused.applies(spec, objective, rule, read, q, k, dt, [*W0, *(S0 or ())]):  # a chunk read:
        return _fused_step(spec, rule, W0, S0, k, target, q, eta, alpha, beta, dt)  # update is on
    y_k, a_list, u_list = forward_backward(spec, W0, k, target, objective, huber_delta)
    grads = [_Factored(u, a) for u, a in zip(u_list, a_list)]
    return _apply_rule(
        spec,
        rule,
        W0,
        S0,
        grads,
        a_list,
        eta,
        alpha,
        beta,
        q,
        read,
        k.shape[-2],
        dt,
        None,
        y_k if reads_keys else None,
        update,
    )


def _fused_step(spec, rule, W0, S0, k, target, q, eta, alpha, beta, dt):
    """``chunk_step`` through ``nlc.runtime.fused``: the gates' coefficients and the chunk, each
    a custom op of Triton kernels (forward and backward)."""
    *batch, C, D = k.shape
    n = 1
    for b in batch:
        n *= b
    mom = rule.uses_momentum

    def rows(t: Tensor, tail) -> Tensor:
        return torch.broadcast_to(t, (*batch, *tail)).reshape(n, *tail)

    shapes = [tuple(w.shape[-2:]) for w in W0]
    w1, w2 = (rows(w, sh) for w, sh in zip(W0, shapes))
    # the coefficients of _Coeffs (full=False), from the gates in one kernel each way
    eta_r = rows(eta, (C,))
    alpha_r = rows(alpha, (C,)) if alpha is not None else torch.ones_like(eta_r)
    beta_r = rows(beta, (C,)) if mom else alpha_r
    cw, cs, gam, dd, bb = _fused.chunk_coefficients(eta_r, alpha_r, beta_r, mom)
    if mom:
        s1, s2 = (rows(s, sh) for s, sh in zip(S0, shapes))
    else:
        s1 = s2 = k.new_empty(0)
    yq, w1e, w2e, s1e, s2e = _fused.mlp2_chunk(
        k.reshape(n, C, D),
        target.reshape(n, C, D),
        q.reshape(n, C, D),
        w1, w2, s1, s2, cw, cs, gam, dd, bb,
        spec.act, spec.kind == "residual_mlp", mom, _fused.precision(k.device.type),
    )  # fmt: skip
    w_end = [w1e.reshape(*batch, *shapes[0]), w2e.reshape(*batch, *shapes[1])]
    s_end = None
    if mom:
        s_end = [s1e.reshape(*batch, *shapes[0]), s2e.reshape(*batch, *shapes[1])]
    return yq.reshape(*batch, C, D), w_end, s_end


def _token_loss(objective: str, huber_delta: float, y: Tensor, v: Tensor) -> Tensor:
    if objective == "l2":
        return 0.5 * ((y - v) ** 2).sum()
    if objective == "dot":
        return -(y * v).sum()
    if objective == "huber":
        return F.huber_loss(y, v, reduction="sum", delta=huber_delta)
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def chunk_step_autograd(
    spec: MemorySpec | None,
    objective,
    rule: RuleSpec,
    weights0: Sequence[Tensor],
    moms0: Sequence[Tensor] | None,
    k: Tensor,
    target: Tensor,
    q: Tensor | None,
    eta: Tensor,
    alpha: Tensor | None = None,
    beta: Tensor | None = None,
    read: str = "chunk",
    huber_delta: float = 1.0,
    *,
    forward_fn: Callable[[list[Tensor], Tensor], Tensor] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    inputs_fn: Callable[[list[Tensor], Tensor], list[Tensor]] | None = None,
) -> tuple[Tensor | None, list[Tensor], list[Tensor] | None]:
    """``chunk_step`` with per-token gradients from ``torch.func.vmap(torch.func.grad(...))``.

    The fallback for memories or objectives without a closed form, and a test oracle. Same
    arguments and results as ``chunk_step``, plus:

    ``forward_fn(weights, x)``: the memory (weights ``[..., out, in]``, x ``[..., C, din]``);
    default ``forward(spec, ...)``. ``loss_fn(y, v)``: scalar loss of one token (``[dout]``
    each); default from ``objective``. ``inputs_fn(weights, x)``: each weight's input, needed
    by ``dgd`` when ``forward_fn`` is given.

    Per-token gradients are materialized (``[B, H, C, out, in]`` per weight), and a causal read
    with a custom ``forward_fn`` materializes one weight per token; differentiating the result
    is a double backward through ``torch.func.grad`` (works in eager, not under
    ``torch.compile``). Use ``chunk_step`` wherever a closed form exists.
    """
    _check_call(rule, read, moms0, beta, objective if loss_fn is None else None)
    if loss_fn is None and objective is None:
        raise ValueError("chunk_step_autograd needs an objective or a loss_fn")
    if forward_fn is None and spec is None:
        raise ValueError("chunk_step_autograd needs a MemorySpec or a forward_fn")
    dt, W0, S0, k, target, q, eta, alpha, beta = _prepare(
        weights0, moms0, k, target, q, eta, alpha, beta, rule
    )
    fwd = forward_fn if forward_fn is not None else partial(forward, spec)
    tok_loss_fn = (
        loss_fn if loss_fn is not None else partial(_token_loss, objective, huber_delta)
    )
    *batch, C, din = k.shape
    n_seq = 1
    for b in batch:
        n_seq *= b
    W0_full = [torch.broadcast_to(w, (*batch, *w.shape[-2:])) for w in W0]

    def tok_loss(ws, x, v):
        return tok_loss_fn(fwd(list(ws), x[None, :])[0], v)

    per_tok = torch.func.vmap(torch.func.grad(tok_loss), in_dims=(None, 0, 0))
    per_seq = torch.func.vmap(per_tok, in_dims=(0, 0, 0))
    g = per_seq(
        tuple(w.reshape(n_seq, *w.shape[-2:]) for w in W0_full),
        k.reshape(n_seq, C, din),
        target.reshape(n_seq, C, target.shape[-1]),
    )
    grads = [_Dense(gl.reshape(*batch, C, *gl.shape[-2:])) for gl in g]
    a_list = None
    if rule.is_dgd:
        if inputs_fn is not None:
            a_list = list(inputs_fn(W0, k))
        elif forward_fn is None:
            a_list = layer_inputs(spec, W0, k)
        else:
            raise ValueError(
                "dgd with a custom forward_fn needs inputs_fn (each weight's input)"
            )
    return _apply_rule(
        spec,
        rule,
        W0,
        S0,
        grads,
        a_list,
        eta,
        alpha,
        beta,
        q,
        read,
        C,
        dt,
        fwd if forward_fn is not None else None,
    )


def scan(
    spec: MemorySpec,
    objective: str,
    rule: RuleSpec,
    weights0: Sequence[Tensor],
    moms0: Sequence[Tensor] | None,
    k: Tensor,
    target: Tensor,
    q: Tensor | None,
    eta: Tensor,
    alpha: Tensor | None,
    beta: Tensor | None,
    chunk: int,
    read: str = "chunk",
    huber_delta: float = 1.0,
    step_fn: Callable | None = None,
) -> tuple[Tensor | None, list[Tensor], list[Tensor] | None]:
    """A whole sequence ``[B, H, T, .]`` in chunks of ``chunk`` tokens.

    A Python loop over the ``ceil(T / chunk)`` chunks (``T`` and ``chunk`` are static ints); a
    last partial chunk of ``T mod chunk`` tokens is applied at the end, its tokens reading its
    own chunk-start state. ``step_fn`` defaults to ``chunk_step`` (``chunk_step_autograd`` is
    the other choice). Returns ``(y [B, H, T, dout], final weights, final moms or None)``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    T = k.shape[-2]
    if T < 1:
        raise ValueError("scan needs at least one token")
    step = step_fn if step_fn is not None else chunk_step
    shape = k.shape[:-1]
    gate_dtype = torch.promote_types(k.dtype, torch.float32)

    def full_gate(g):
        if g is None:
            return None
        if not isinstance(g, Tensor):
            g = torch.as_tensor(g, dtype=gate_dtype, device=k.device)
        return torch.broadcast_to(g, shape)

    eta, alpha, beta = full_gate(eta), full_gate(alpha), full_gate(beta)
    W, S = list(weights0), moms0
    ys = []
    start = 0
    if step_fn is None and _linear.applies(spec, objective, rule, read, T // chunk, k.device):
        # every full chunk at once (nlc.runtime.linear_chunks), the partial one below
        _check_call(rule, read, moms0, beta, objective)
        _check_shapes(spec, weights0, moms0, k, target, q, read)
        start = T // chunk * chunk

        def full(x: Tensor | None, dim: int) -> Tensor | None:  # the full chunks' tokens
            if x is None or start == T:  # the whole (no slice: eagerly its backward copies)
                return x
            return x.narrow(dim, 0, start)

        y, W = _linear.run(
            spec, rule, weights0, full(k, -2), full(target, -2), full(q, -2), full(eta, -1),
            full(alpha, -1), chunk, read,
        )  # fmt: skip
        if y is not None:
            ys.append(y)
    for c0 in range(start, T, chunk):
        sl = slice(c0, min(c0 + chunk, T))
        y, W, S = step(
            spec,
            objective,
            rule,
            W,
            S,
            k[..., sl, :],
            target[..., sl, :],
            q[..., sl, :] if q is not None else None,
            eta[..., sl],
            alpha[..., sl] if alpha is not None else None,
            beta[..., sl] if beta is not None else None,
            read=read,
            huber_delta=huber_delta,
        )
        ys.append(y)
    if q is None:
        return None, W, S
    # one part (all chunks full, or one chunk): itself, not a copy (compiled, a one-tensor cat
    # copies it: the size of the read)
    return (ys[0] if len(ys) == 1 else torch.cat(ys, dim=-2)), W, S
