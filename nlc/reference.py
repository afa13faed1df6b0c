"""The literal per-token reference of nlc's in-context memory semantics.

This module is the executable statement of ``docs/semantics.md``: it loops over chunks and over
the tokens of every chunk, takes each token's inner gradient with ``torch.autograd.grad`` of the
inner loss at the chunk-start weights (an oracle independent of the closed forms in
``nlc.runtime.memories``), applies the rule's equation to every weight matrix one token at a
time, and reads per the read mode. It is written for clarity, not speed; use it in float64 as
the oracle of ``nlc.runtime.chunk.scan`` and of generated code.

It shares nothing with the runtime except the two spec dataclasses. Sequences and heads are
carried as leading batch dimensions ``[B, H]`` of every tensor; every operation acts on each
``(b, h)`` separately (a per-``(b, h)`` matrix-vector product, an inner loss summed over
``(b, h)`` whose gradient with respect to ``W[b, h]`` only sees sequence ``b``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nlc.runtime.chunk import RuleSpec
from nlc.runtime.memories import MemorySpec

__all__ = ["memory_apply", "memory_layer_inputs", "memory_scan", "token_loss"]


def _act(name: str, z: Tensor) -> Tensor:
    if name == "silu":
        return F.silu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "relu":
        return F.relu(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "identity":
        return z
    raise ValueError(f"unknown activation {name!r}")


def _matvec(W: Tensor, x: Tensor) -> Tensor:
    """``W x`` for every (b, h): W ``[B, H, out, in]``, x ``[B, H, in]``."""
    return (W @ x[..., None])[..., 0]


def _run(
    spec: MemorySpec, weights: Sequence[Tensor], x: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """``(M(x), [input of every weight])`` for one token ``x`` ``[B, H, din]``."""
    inputs: list[Tensor] = []
    if spec.kind == "swiglu":
        w_g, w_u, w_o = weights
        hidden = _act(spec.act, _matvec(w_g, x)) * _matvec(w_u, x)
        return _matvec(w_o, hidden), [x, x, hidden]
    h = x
    for i, W in enumerate(weights):
        inputs.append(h)
        h = _matvec(W, h)
        if i < len(weights) - 1:
            h = _act(spec.act, h)
    if spec.kind == "residual_mlp":
        h = x + h
    return h, inputs


def memory_apply(spec: MemorySpec, weights: Sequence[Tensor], x: Tensor) -> Tensor:
    """``M(x)`` for one token ``x`` ``[B, H, din]``."""
    return _run(spec, weights, x)[0]


def memory_layer_inputs(
    spec: MemorySpec, weights: Sequence[Tensor], x: Tensor
) -> list[Tensor]:
    """The input ``a`` of every weight for one token ``x`` ``[B, H, din]``."""
    return _run(spec, weights, x)[1]


def token_loss(
    objective: str, y: Tensor, v: Tensor, huber_delta: float = 1.0
) -> Tensor:
    """The inner loss of one token, summed over features and over (b, h)."""
    if objective == "l2":
        return 0.5 * ((y - v) ** 2).sum()
    if objective == "dot":
        return -(y * v).sum()
    if objective == "huber":
        return F.huber_loss(y, v, reduction="sum", delta=huber_delta)
    raise ValueError(f"unknown objective {objective!r}")


def _scalar(g: Tensor, t: int) -> Tensor:
    """Gate of token t as ``[B, H, 1, 1]`` (a scalar per matrix)."""
    return g[..., t][..., None, None]


def memory_scan(
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
) -> tuple[Tensor | None, list[Tensor], list[Tensor] | None]:
    """The literal per-token loop. Same arguments and results as ``nlc.runtime.chunk.scan``.

    For each chunk (the last one may be partial) with start weights ``W0``:
    for each token t of the chunk, ``g_t = d l(M_{W0}(k_t), target_t) / d W0`` by autograd, then
    for every weight matrix W (with input ``a_t`` at ``W0`` for dgd)::

        gd            W <- alpha_t W - eta_t g_t
        momentum      S <- beta_t S - eta_t g_t ;  W <- alpha_t W + S
        dgd           W <- W (alpha_t I - eta'_t a_t a_t^T) - eta_t g_t
        dgd+momentum  S <- beta_t S - eta_t g_t ;  W <- W (alpha_t I - eta'_t a_t a_t^T) + S

    with ``eta' = eta`` (``eq88``), or ``eta`` replaced everywhere by
    ``eta / (1 + eta ||a_t||^2)`` (``normalized``); ``dgd_layers='input'`` preconditions only
    the weights applied to the memory input. The read ``y_t = M(q_t)`` uses ``W0`` (``chunk``)
    or the weights just after token t's update (``causal``).
    """
    if read not in ("chunk", "causal"):
        raise ValueError(f"unknown read mode {read!r}")
    B, H, T = k.shape[:3]
    momentum = rule.uses_momentum
    ones = torch.ones(B, H, T, dtype=k.dtype, device=k.device)
    eta = torch.broadcast_to(eta, (B, H, T))
    alpha = ones if alpha is None else torch.broadcast_to(alpha, (B, H, T))
    beta = torch.broadcast_to(beta, (B, H, T)) if momentum else None
    if rule.is_dgd:
        precond = (
            [True] * len(weights0) if rule.dgd_layers == "all" else spec.input_side()
        )
    else:
        precond = [False] * len(weights0)

    with torch.enable_grad():
        W = [w.expand(B, H, *w.shape[-2:]).clone() for w in weights0]
        S = None
        if momentum:
            S = (
                [torch.zeros_like(w) for w in W]
                if moms0 is None
                else [s.clone() for s in moms0]
            )
        ys: list[Tensor] = []
        for c0 in range(0, T, chunk):
            c1 = min(c0 + chunk, T)
            # the chunk-start weights: every inner gradient of this chunk is taken here
            W0 = [w if w.requires_grad else w.detach().requires_grad_(True) for w in W]
            W = list(W0)
            for t in range(c0, c1):
                y_fit = memory_apply(spec, W0, k[:, :, t])
                loss = token_loss(objective, y_fit, target[:, :, t], huber_delta)
                g = torch.autograd.grad(loss, W0, create_graph=True)
                a_in = memory_layer_inputs(spec, W0, k[:, :, t])
                for i in range(len(W)):
                    lr = _scalar(eta, t)
                    decay = _scalar(alpha, t)
                    if precond[i] and rule.dgd_form == "normalized":
                        sq = (a_in[i] * a_in[i]).sum(-1)[..., None, None]
                        lr = lr / (1.0 + lr * sq)
                    if momentum:
                        S[i] = _scalar(beta, t) * S[i] - lr * g[i]
                        write = S[i]
                    else:
                        write = -lr * g[i]
                    if precond[i]:
                        a = a_in[i]
                        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
                        P = decay * eye - lr * (a[..., :, None] * a[..., None, :])
                        W[i] = W[i] @ P + write
                    else:
                        W[i] = decay * W[i] + write
                if q is not None:
                    read_w = W if read == "causal" else W0
                    ys.append(memory_apply(spec, read_w, q[:, :, t]))
        y = torch.stack(ys, dim=2) if q is not None else None
    return y, W, S
