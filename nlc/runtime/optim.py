r"""Optimizer levels: ``torch.optim.Optimizer`` subclasses whose state is a memory of gradients.

In Nested Learning an optimizer is itself a level. Its state (a momentum buffer, Adam's moments,
a small MLP) is an associative memory whose *context flow* is the gradient stream of another
level, ``grads(L)`` in a spec. Each class below is one such level. Generated training code
builds them from a spec's ``rule`` through :func:`build_optimizer`. The user-facing
description is ``docs/optimizers.md``.

Equation numbers are those of the arXiv paper [NL] (2512.24695). NeurIPS camera-ready numbers
[NL-NIPS] are given where they differ. Notation: ``g = ∇_W L`` is the gradient of the level
that owns ``W``, ``u = −g`` the descent direction, ``η`` the learning rate (``lr``), ``α``
the retention/decay of the memory (``decay``).

Shared conventions
------------------
* All hyper-parameters are keyword arguments with defaults, and every one of them may be
  overridden per parameter group. Named options take strings from a closed set. A wrong value
  raises ``ValueError`` naming the allowed set, with a "did you mean" hint. Each class's
  ``CHOICES`` attribute lists the sets.
* State lives in ``self.state[p]``. It holds a Python-int ``step`` plus tensors in the dtype
  of ``p``, as ``torch.optim`` does. The update maths calls no ``.item()``. Branches depend
  only on hyper-parameters and the integer step (codegen-time constants and Python ints),
  never on tensor values.
* ``state_dict()`` / ``load_state_dict()`` round-trip exactly: after load, training continues
  bit-identically to an uninterrupted run.
* ``lr`` and the other numeric hyper-parameters are Python numbers (they may change between
  steps, e.g. through an LR scheduler); tensor-valued ``lr`` is not supported.
* ``step(closure=None)`` runs under ``torch.no_grad()``. Parameters without ``.grad`` are
  skipped: their state, including their step counter, does not advance.
* **Output hook** ([NL] eq 52, [NL-NIPS] eq 24: ``W ← W + σ(m(u))``). Every class accepts
  ``output="identity" | "newton_schulz"``. With ``"newton_schulz"``, the lr-free update
  direction ``d`` becomes ``σ(d) = s · NS_T(d)`` before ``W ← W − η σ(d)``; momentum followed by
  NS is Muon ([NL] eqs 42–44). The hook's options:

  - ``ns_steps`` (T): number of Newton–Schulz iterations.
  - ``ns_coefficients``: ``"quintic"`` (Muon's polynomial) or ``"cubic"`` (the classic
    1.5/−0.5 iteration), or an explicit ``(a, b, c)`` triple.
  - ``ns_scale`` (s): ``"none"``; ``"shape"`` (default), ``√max(1, rows/cols)`` as in Muon;
    or ``"rms"``, ``0.2·√max(rows, cols)``, which gives the update AdamW's RMS.
  - ``nonmatrix``: what happens to tensors with ``ndim < 2``. ``"identity"`` (default)
    leaves them alone. ``"polar"`` uses ``d/‖d‖``, the exact polar factor of a ``1×n``
    matrix, i.e. the limit NS would reach.

  N-D tensors (``ndim > 2``) are orthogonalized as the matrix ``(shape[0], prod(shape[1:]))``.
  Newton–Schulz itself runs in fp32 for fp16/bf16 inputs (see :func:`newton_schulz`).

Levels (classes)
----------------
``MomentumMemory`` — momentum as a 2-level memory ([NL] eqs 10–13, 33–34; [NL-NIPS] 7–11).
    Inner level: ``m`` minimizes the dot objective ``−⟨m, u⟩ = ⟨m, g⟩`` with retention ``α``
    (eq 13: ``m_{t+1} = argmin_m ⟨m, g⟩ + (1/2η)‖m − α m_t‖²``). One GD step gives
    ``m_{t+1} = α m_t − η g_t``, and the outer level applies ``W_{t+1} = W_t + m_{t+1}``.
    ``lr_placement="outer"`` (default) stores ``buf = −m/η`` (``buf ← α buf + g``,
    ``W ← W − η buf``), which is ``torch.optim.SGD`` operation for operation. With a constant
    ``η`` it is the same algebra as the paper's form: ``m_{t+1} = −η buf_{t+1} =
    −η(α buf_t + g) = α m_t − η g``. ``"inner"`` stores ``m`` itself (the paper's literal
    eq 10). The two differ only when ``η`` varies over time: ``"outer"`` scales the whole
    memory by the current ``η``, ``"inner"`` keeps each gradient's own ``η_t``.
    ``nesterov=True`` applies ``W ← W + α m_{t+1} − η g_t`` (= SGD nesterov).
    ``weight_decay_mode="coupled"`` (default, as SGD) adds ``λW`` to ``g``; ``"decoupled"``
    multiplies ``W`` by ``1 − ηλ``.

``Muon`` — ``MomentumMemory`` with ``output="newton_schulz"``, ``nesterov=True``, ``decay=0.95``
    and decoupled weight decay: ``W ← W − η s·NS_T(g + α buf)`` ([NL] eqs 42, 52).

``AdamMemory`` — Adam as the optimal memory for an element-wise L2 objective ([NL] App. B,
    eqs 101–105). ``L̃_t = Σ_i ‖m ⊙ g_i − P‖² + λ‖m‖²`` has the optimum
    ``m* = (H + λI)^{-1} ⊙ M̃ ⊙ P`` (102), where ``M̃`` accumulates ``β₁ g`` and ``H``
    accumulates ``β₂ g²``. With ``P = √(Σ g²)`` this is Adam (105). The two memories
    ``M̃`` and ``H`` see the same gradient stream at the same frequency (``=^f``). As in
    Adam, the accumulations are exponential moving averages with bias correction:
    ``M̃ ← β₁ M̃ + (1−β₁) g``, ``H ← β₂ H + (1−β₂) g²``, ``W ← W − η (M̃/(1−β₁^t)) /
    (√(H/(1−β₂^t)) + ε)``. ``weight_decay_mode="decoupled"`` (default) equals
    ``torch.optim.AdamW``; ``"coupled"`` equals ``torch.optim.Adam(weight_decay=…)``.

``DeltaMomentum`` — delta momentum ([NL] eqs 48–49; [NL-NIPS] 21–22). The memory ``m`` is
    trained with the L2 objective ``‖m(ĝ) − P‖²``, with the gradient as the key, by one
    delta-rule step per outer step. Written in the ``"outer"`` form (``m = −η b``)::

        b ← α b − β E(b, Ĝ) + G          W ← W − η σ(b)
        form="nl"   (arXiv eq 49):     E = b Ĝᵀ Ĝ     (keys = rows of G, right multiplication)
        form="nips" ([NL-NIPS] 22):    E = Ĝ Ĝᵀ b     (keys = columns of G, left multiplication)

    ``Ĝ = G/(‖G‖_F + ε)`` when ``normalize=True`` (default); this is what keeps the step
    stable. ``ĜᵀĜ`` then has spectral norm ≤ 1, so ``αI − βĜᵀĜ`` has eigenvalues in
    ``[α−β, α]``. ``normalize=False`` is the paper's literal raw-gradient key, which diverges
    for large gradients. ``β`` (``beta``, default 1) is the delta-rule step; the paper
    writes 1. Matrices are used as they are. An N-D tensor is the matrix
    ``(shape[0], prod(shape[1:]))``. For a vector both forms use the rank-1 rule
    ``E = ⟨b, ĝ⟩ ĝ``; taken literally, one of them would degenerate to a scalar. Tensors with a
    single element skip the erase term. ``β = 0`` gives ``MomentumMemory`` exactly. The
    paper's value ``P`` is the identity here; use ``output`` for a non-linear map.

``DeepMomentum`` — DMGD, deep momentum GD ([NL] eq 50; [NL-NIPS] 23). The paper leaves the
    MLP and its inner objective open (§7 item 20). nlc's concrete design, per parameter tensor::

        b_t  = α b_{t−1} + g_t                          linear momentum memory (as MomentumMemory)
        s_t  = rms(b_t) + ε ;  k_t = b_t / s_t          scale-free key
        φ_θ(x) = x + r_θ(x),  r_θ(x) = Σ_j c_j σ(a_j x + b_j)    element-wise residual MLP ℝ→ℝ, width h
        ℓ_t(θ) = −mean(r_θ(k_{t−1}) ⊙ ĝ_t)              objective="dot"  (ĝ = g / (rms(g) + ε))
               = ½ mean((φ_θ(k_{t−1}) − ĝ_t)²)          objective="l2"
        θ_t  = θ₀ + ρ(θ_{t−1} − θ₀) − η_in ∇ℓ_t(θ_{t−1})     one inner GD step, retention ρ towards θ₀
        W_t  = W_{t−1} − η s_t φ_{θ_t}(k_t)

    The MLP is a memory that maps each key (the previous momentum direction) to the gradient
    that followed it. With the dot objective this is the linearized outer loss after the
    previous step (``∂L(W_t)/∂θ ∝ −⟨g_t, ∂r(k_{t−1})/∂θ⟩``). Its parameters are its state,
    and it is trained by GD with retention, as eq 50 says. Init (deterministic, no RNG):
    ``a = 1``, ``b = linspace(−1, 1, h)``, ``c = 0``, so ``φ = identity`` and DMGD starts out
    as (and with ``inner_lr = 0`` stays exactly) ``MomentumMemory``. With ``decay = 0`` the
    MLP reads the raw gradient, the literal ``W ← W + m(u)`` of eq 50.
    Options: ``hidden`` (h), ``inner_lr`` (η_in), ``inner_decay`` (ρ),
    ``objective ∈ {"dot", "l2"}``, ``activation ∈ {"tanh", "silu"}``.

``M3`` — multi-scale momentum Muon ([NL] §7.2, eq 75, Algorithm 1). It has a fast momentum
    ``M1``, a slow momentum ``M2`` that updates every ``f = slow_period`` steps from the sum
    of the gradients since its last update, and a second moment ``V``::

        M1 ← M1 + β₁ g ;  V ← V + β₂ g² ;  O1 = NS_T(M1)
        every f steps:  M2 ← M2 + β₃ Σ_{since last} g ;  O2 = NS_T(M2)
        W  ← W − η (O1 + α O2) / (√V + ε)

    Each ambiguity of §7 item 19 is a named option; the defaults follow Algorithm 1:

    - ``accumulate="sum"``: literal un-decayed sums. ``"ema"`` gives
      ``M ← βM + (1−β)·x``, with bias-corrected ``V``.
    - ``slow_sign="plus"``: Algorithm 1's ``+``. ``"minus"`` is eq 75's ``M2 − β Σ g``.
    - ``slow_beta="beta3"``: Algorithm 1. ``"beta2"`` is eq 75, which reuses β₂.
    - ``slow_timing="after_step"``: Algorithm 1 updates ``M2``/``O2`` at the top of the next
      slow iteration, so the new ``O2`` first acts on step ``kf+1``. ``"before_step"`` is
      eq 75: at ``t ≡ 0 (mod f)``, ``M2`` absorbs ``g_t`` and the new ``O2`` acts on step
      ``t`` itself.
    - ``eps_placement="outside"``: ``√V + ε``. ``"inside"`` uses ``√(V + ε)``.
    - ``precondition="elementwise"``: Algorithm 1's ``/(√V + ε)``. ``"tensor"`` divides by
      ``√mean(V) + ε``, one scalar per tensor. ``"none"`` drops ``V`` (multi-scale Muon).
      An element whose gradient stays near 0 gets a step of about ``η/(√n·ε)`` from the
      literal element-wise division, so use a larger ``eps`` or ``"tensor"`` on such models.
    - ``nonmatrix="polar"``: tensors with ``ndim < 2`` use ``M/‖M‖``, the exact polar factor
      of a ``1×n`` matrix, in place of NS. ``"identity"`` skips the orthogonalization.

    Each gradient enters ``M2`` exactly once. Algorithm 1's inclusive range
    ``Σ_{i=(k−1)f}^{kf}`` would count the boundary gradient twice (f+1 terms), which we read
    as an indexing slip. ``O2 = 0`` until the first slow update.

``newton_schulz(G, steps, coefficients)`` — ``X₀ = G/‖G‖_F``, then
``X ← aX + (bA + cA²)X`` with ``A = XXᵀ``, batched over leading dimensions.

Registry
--------
``OPTIMIZERS`` maps a spec's ``rule`` name to its class. ``build_optimizer(rule, params,
**hyper)`` applies the rule's defaults (``RULE_DEFAULTS``: ``gd`` means ``decay=0``; ``adam``
means coupled weight decay) and hyper-parameter aliases (``wd`` → ``weight_decay``,
``momentum`` → ``decay``, ``beta1..3`` → ``betas``). It validates everything with "did you
mean" errors.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "M3",
    "NS_COEFFICIENTS",
    "OPTIMIZERS",
    "RULE_DEFAULTS",
    "AdamMemory",
    "DeepMomentum",
    "DeltaMomentum",
    "MomentumMemory",
    "Muon",
    "build_optimizer",
    "newton_schulz",
    "orthogonalize",
    "rule_signature",
]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

#: Newton–Schulz polynomial coefficients ``(a, b, c)`` of ``X ← aX + (bA + cA²)X``, ``A = XXᵀ``.
#: ``quintic`` is the polynomial of the Muon optimizer (K. Jordan et al., 2024, "Muon: an
#: optimizer for hidden layers in neural networks"; coefficients 3.4445, -4.7750, 2.0315): it
#: pushes singular values into about [0.68, 1.2] in 5 steps, fast but not exactly to 1.
#: ``cubic`` is the classic iteration, which converges to the exact polar factor (σ → 1) for
#: 0 < σ < √3, slowly for small σ.
NS_COEFFICIENTS: dict[str, tuple[float, float, float]] = {
    "quintic": (3.4445, -4.7750, 2.0315),
    "cubic": (1.5, -0.5, 0.0),
}


# ----------------------------------------------------------------------------------------------
# option validation


def _hint(value: Any, allowed: Iterable[Any]) -> str:
    names = [a for a in allowed if isinstance(a, str)]
    if isinstance(value, str):
        close = difflib.get_close_matches(value, names, n=1, cutoff=0.5)
        if close:
            return f"; did you mean {close[0]!r}?"
    return ""


def _fmt_allowed(allowed: Iterable[Any]) -> str:
    return "{" + ", ".join(repr(a) for a in sorted(allowed, key=str)) + "}"


def _check_choice(owner: str, name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{owner}: option {name}={value!r} is not one of {_fmt_allowed(allowed)}"
            f"{_hint(value, allowed)}"
        )


def _check_range(owner: str, name: str, value: Any, lo: float | None = None,
                 hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}")
    bad = (
        (lo is not None and (value < lo or (lo_open and value == lo)))
        or (hi is not None and (value > hi or (hi_open and value == hi)))
        or math.isnan(value)
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        raise ValueError(f"{owner}: {name}={value!r} is outside {left}{lo_s}, {hi_s}{right}")


def _check_int(owner: str, name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{owner}: {name} must be an integer >= {lo}, got {value!r}")


def _resolve_ns_coefficients(coefficients: str | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(coefficients, str):
        _check_choice("newton_schulz", "coefficients", coefficients, tuple(NS_COEFFICIENTS))
        return NS_COEFFICIENTS[coefficients]
    coeffs = tuple(float(c) for c in coefficients)
    if len(coeffs) != 3:
        raise ValueError(
            "newton_schulz: coefficients must be 'quintic', 'cubic' or a triple (a, b, c), "
            f"got {coefficients!r}"
        )
    return coeffs  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Newton–Schulz


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: str | Sequence[float] = "quintic",
    eps: float = 1e-7,
) -> Tensor:
    r"""Approximate the orthogonal polar factor ``U Vᵀ`` of ``G = U Σ Vᵀ`` by Newton–Schulz.

    Shapes: ``G`` is ``[..., m, n]`` with ``ndim >= 2``; leading dimensions are a batch, and
    each matrix is normalized and iterated on its own. Returns the same shape and dtype as ``G``.

    Iteration: ``X₀ = G / (‖G‖_F + eps)`` puts every singular value in ``[0, 1]``. Then
    ``X ← a X + (b A + c A²) X`` with ``A = X Xᵀ``, ``steps`` times. Each step maps every
    singular value by the odd polynomial ``p(σ) = aσ + bσ³ + cσ⁵`` and leaves the singular
    vectors unchanged. The iteration runs on the wide orientation (``m <= n``, transposing if
    needed) so that ``A`` is the smaller Gram matrix.

    ``coefficients``: ``"quintic"`` (Muon's ``(3.4445, −4.7750, 2.0315)``; singular values land
    in about ``[0.68, 1.2]`` after 5 steps), ``"cubic"`` (``(1.5, −0.5, 0)``, exact limit 1,
    needs more steps when σ_min/‖G‖_F is small), or an explicit ``(a, b, c)``.

    Precision: fp16/bf16 inputs are computed in fp32 and cast back; fp32/fp64 inputs are
    computed in their own dtype. The paper's orthogonality objective (eq 43) and its GD step
    (eq 44) give a cubic of this family.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz: expected a tensor with ndim >= 2, got shape {tuple(G.shape)}")
    _check_int("newton_schulz", "steps", steps, 0)
    a, b, c = _resolve_ns_coefficients(coefficients)
    X = G if G.dtype in (torch.float32, torch.float64) else G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, ord="fro", keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A) if c != 0.0 else b * A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def _as_matrix(t: Tensor) -> Tensor:
    """View a tensor with ``ndim >= 2`` as the matrix ``(shape[0], prod(shape[1:]))``."""
    return t if t.ndim == 2 else t.reshape(t.shape[0], -1)


def orthogonalize(
    d: Tensor,
    steps: int = 5,
    coefficients: str | Sequence[float] = "quintic",
    scale: str = "shape",
    nonmatrix: str = "identity",
    eps: float = 1e-7,
) -> Tensor:
    """The Newton–Schulz output map ``σ`` of [NL] eq 52 applied to one parameter's update.

    ``d``: any shape. A tensor with ``ndim >= 2`` is orthogonalized as the matrix
    ``(shape[0], prod(shape[1:]))``, multiplied by ``scale``, and reshaped back:
    ``"none"`` → 1, ``"shape"`` → ``√max(1, rows/cols)`` (Muon), ``"rms"`` →
    ``0.2·√max(rows, cols)`` (AdamW-like update RMS). A tensor with ``ndim < 2`` gets
    ``nonmatrix``: ``"identity"`` returns ``d`` unchanged, ``"polar"`` returns
    ``d/(‖d‖ + eps)``, the exact polar factor of ``d`` seen as a ``1×n`` matrix (the sign for a
    scalar).
    """
    if d.ndim < 2:
        if nonmatrix == "identity":
            return d
        return d / (torch.linalg.vector_norm(d) + eps)
    M = _as_matrix(d)
    O = newton_schulz(M, steps, coefficients, eps)
    rows, cols = M.shape
    if scale == "shape":
        O = O * math.sqrt(max(1.0, rows / cols))
    elif scale == "rms":
        O = O * (0.2 * math.sqrt(max(rows, cols)))
    return O.reshape(d.shape)


# ----------------------------------------------------------------------------------------------
# base class


class _GradientLevel(torch.optim.Optimizer):
    """Common machinery: option validation, the output hook and the ``step`` loop."""

    #: Named options and their allowed values (the spec's option sets).
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "output": ("identity", "newton_schulz"),
        "ns_scale": ("none", "shape", "rms"),
        "nonmatrix": ("identity", "polar"),
    }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # -- validation --------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        owner = type(self).__name__
        for name, allowed in self.CHOICES.items():
            if name in group:
                _check_choice(owner, name, group[name], allowed)
        _check_range(owner, "lr", group["lr"], 0.0)
        if "weight_decay" in group:
            _check_range(owner, "weight_decay", group["weight_decay"], 0.0)
        if "eps" in group:
            _check_range(owner, "eps", group["eps"], 0.0)
        if "ns_steps" in group:
            _check_int(owner, "ns_steps", group["ns_steps"], 0)
        if "ns_coefficients" in group:
            try:
                _resolve_ns_coefficients(group["ns_coefficients"])
            except ValueError as exc:
                raise ValueError(f"{owner}: {exc}") from None

    # -- output hook (eq 52) -------------------------------------------------------------------
    @staticmethod
    def _output(d: Tensor, group: dict[str, Any]) -> Tensor:
        """``σ(d)`` of eq 52 on the lr-free descent direction ``d``."""
        if group.get("output", "identity") == "identity":
            return d
        return orthogonalize(
            d,
            steps=group["ns_steps"],
            coefficients=group["ns_coefficients"],
            scale=group["ns_scale"],
            nonmatrix=group["nonmatrix"],
        )

    # -- step loop -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one outer step: every parameter with a gradient updates its memory, then itself."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._update(p, p.grad, self.state[p], group)
        return loss

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError


def _output_defaults(output: str, ns_steps: int, ns_coefficients: Any, ns_scale: str,
                     nonmatrix: str) -> dict[str, Any]:
    return dict(output=output, ns_steps=ns_steps, ns_coefficients=ns_coefficients,
                ns_scale=ns_scale, nonmatrix=nonmatrix)


# ----------------------------------------------------------------------------------------------
# 1. momentum as a memory of gradients


class MomentumMemory(_GradientLevel):
    r"""Momentum as a 2-level associative memory of gradients ([NL] eqs 10–13, 33–34).

    The inner level ``m`` is trained on the gradient stream with the dot objective
    ``−⟨m, u⟩`` (``u = −∇L``, the descent direction) and retention ``α = decay``, by one GD
    step of size ``η = lr`` per outer step (eq 13)::

        m_{t+1} = argmin_m ⟨m, ∇L(W_t)⟩ + (1/2η)‖m − α m_t‖²  =  α m_t − η ∇L(W_t)
        W_{t+1} = W_t + m_{t+1}

    **Equality with SGD.** ``torch.optim.SGD(lr=η, momentum=α)`` keeps ``buf ← α buf + g``
    and applies ``W ← W − η buf``. Put ``m = −η·buf``. Then ``m_{t+1} = −η(α buf_t + g_t) =
    α(−η buf_t) − η g_t = α m_t − η g_t`` and ``W − η buf_{t+1} = W + m_{t+1}``. The first
    step agrees as well: ``m₀ = 0`` and ``buf₁ = g₁``. ``lr_placement="outer"`` (default)
    stores ``buf`` and runs SGD's exact operations, so the two agree bit for bit, with
    schedulers too. ``lr_placement="inner"`` stores ``m`` (the paper's literal state). With a
    constant ``η`` it agrees with SGD to rounding. When ``η_t`` changes, each gradient keeps
    the ``η`` it was written with.

    ``nesterov=True``: ``W ← W + α m_{t+1} − η g_t``, which is SGD's
    ``W ← W − η(g + α buf)``.
    ``weight_decay`` (λ): ``weight_decay_mode="coupled"`` (default, as SGD) uses
    ``g ← g + λW``; ``"decoupled"`` uses ``W ← (1 − ηλ) W`` before the step.
    ``decay = 0`` is plain GD (the spec rule ``gd`` without ``decay``).
    Output hook: see the module docstring (``output="newton_schulz"`` gives Muon). It needs
    ``lr_placement="outer"``, because ``σ`` must see the lr-free memory.

    State per parameter: ``step`` (int) and ``momentum_buffer`` (outer) or ``m`` (inner).
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        **_GradientLevel.CHOICES,
        "lr_placement": ("outer", "inner"),
        "weight_decay_mode": ("coupled", "decoupled"),
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.01,
        decay: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        weight_decay_mode: str = "coupled",
        lr_placement: str = "outer",
        output: str = "identity",
        ns_steps: int = 5,
        ns_coefficients: str | Sequence[float] = "quintic",
        ns_scale: str = "shape",
        nonmatrix: str = "identity",
    ) -> None:
        defaults = dict(
            lr=lr, decay=decay, weight_decay=weight_decay, nesterov=nesterov,
            weight_decay_mode=weight_decay_mode, lr_placement=lr_placement,
            **_output_defaults(output, ns_steps, ns_coefficients, ns_scale, nonmatrix),
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        owner = type(self).__name__
        _check_range(owner, "decay", group["decay"], 0.0, 1.0)
        if group["nesterov"] and group["decay"] == 0:
            raise ValueError(f"{owner}: nesterov=True needs decay > 0")
        if group["lr_placement"] == "inner" and group["output"] != "identity":
            raise ValueError(
                f"{owner}: output={group['output']!r} needs lr_placement='outer' "
                "(the output map must see the lr-free memory: W ← W − η·σ(buf))"
            )

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        lr, decay, wd = group["lr"], group["decay"], group["weight_decay"]
        state["step"] = state.get("step", 0) + 1
        if wd != 0:
            if group["weight_decay_mode"] == "coupled":
                g = g.add(p, alpha=wd)
            else:
                p.mul_(1 - lr * wd)
        if group["lr_placement"] == "outer":
            d = g
            if decay != 0:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = torch.clone(g).detach()
                    state["momentum_buffer"] = buf
                else:
                    buf.mul_(decay).add_(g)
                d = g.add(buf, alpha=decay) if group["nesterov"] else buf
            p.add_(self._output(d, group), alpha=-lr)
        else:
            m = state.get("m")
            if m is None:
                m = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["m"] = m
            m.mul_(decay).add_(g, alpha=-lr)
            if group["nesterov"]:
                p.add_(m, alpha=decay).add_(g, alpha=-lr)
            else:
                p.add_(m)


class Muon(MomentumMemory):
    r"""Muon: momentum followed by the Newton–Schulz output map ([NL] eqs 42–44, 52).

    ``buf ← α buf + g``; ``W ← (1 − ηλ)W − η s·NS_T(g + α buf)`` with Nesterov (default) or
    ``NS_T(buf)`` without. This is :class:`MomentumMemory` with the defaults
    ``output="newton_schulz"``, ``decay=0.95``, ``nesterov=True`` and decoupled weight decay.
    Tensors with ``ndim < 2`` follow ``nonmatrix`` (default ``"identity"``, i.e. plain
    momentum SGD). The usual practice is to give embeddings, heads and 1-D parameters their
    own parameter group, or their own level with ``adamw``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.02,
        decay: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        *,
        weight_decay_mode: str = "decoupled",
        output: str = "newton_schulz",
        ns_steps: int = 5,
        ns_coefficients: str | Sequence[float] = "quintic",
        ns_scale: str = "shape",
        nonmatrix: str = "identity",
    ) -> None:
        super().__init__(
            params, lr=lr, decay=decay, weight_decay=weight_decay, nesterov=nesterov,
            weight_decay_mode=weight_decay_mode, lr_placement="outer", output=output,
            ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_scale=ns_scale,
            nonmatrix=nonmatrix,
        )


# ----------------------------------------------------------------------------------------------
# 2. Adam as a memory


class AdamMemory(_GradientLevel):
    r"""Adam as the optimal memory of an element-wise L2 objective ([NL] App. B, eqs 101–105).

    Objective (101): ``L̃_t(m) = Σ_i ‖m ⊙ g_i − P‖² + λ‖m‖²``. Its optimum (102) is
    ``m* = (H + λI)^{-1} ⊙ M̃ ⊙ P``, where ``M̃`` accumulates ``β₁ g`` and ``H`` accumulates
    ``β₂ g²``. With ``P = √(Σ g²)`` it is Adam (105). The first and second moments are two
    memories of the same gradient stream at the same frequency (``=^f``). As in Adam, the
    accumulations here are bias-corrected EMAs::

        M̃ ← β₁ M̃ + (1−β₁) g          H ← β₂ H + (1−β₂) g²
        W ← W − η · (M̃ / (1−β₁^t)) / (√(H / (1−β₂^t)) + ε)

    ``weight_decay_mode="decoupled"`` (default): ``W ← (1 − ηλ)W`` first. This equals
    ``torch.optim.AdamW`` operation for operation. ``"coupled"``: ``g ← g + λW``, which equals
    ``torch.optim.Adam(weight_decay=λ)``.
    Output hook: with ``output="newton_schulz"``, the bias-corrected direction goes through
    ``σ`` before ``−η`` is applied.

    State per parameter: ``step`` (int), ``exp_avg`` (M̃), ``exp_avg_sq`` (H).
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {**_GradientLevel.CHOICES, "weight_decay_mode": ("coupled", "decoupled")}

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        weight_decay_mode: str = "decoupled",
        output: str = "identity",
        ns_steps: int = 5,
        ns_coefficients: str | Sequence[float] = "quintic",
        ns_scale: str = "shape",
        nonmatrix: str = "identity",
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            weight_decay_mode=weight_decay_mode,
            **_output_defaults(output, ns_steps, ns_coefficients, ns_scale, nonmatrix),
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        owner = type(self).__name__
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            _check_range(owner, f"betas[{i}]", b, 0.0, 1.0, hi_open=True)

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if wd != 0:
            if group["weight_decay_mode"] == "decoupled":
                p.mul_(1 - lr * wd)
            else:
                g = g.add(p, alpha=wd)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
        if group["output"] == "identity":
            p.addcdiv_(exp_avg, denom, value=-step_size)
        else:
            d = (exp_avg / denom).div_(bias_correction1)
            p.add_(self._output(d, group), alpha=-lr)


# ----------------------------------------------------------------------------------------------
# 3. delta momentum


def _delta_erase(b: Tensor, g: Tensor, form: str, normalize: bool, eps: float) -> Tensor | None:
    """The delta rule's erase term ``E(b, Ĝ)`` of :class:`DeltaMomentum` (``None`` when absent)."""
    if b.numel() <= 1:
        return None
    gh = g / (torch.linalg.vector_norm(g) + eps) if normalize else g
    if b.ndim == 1:
        return torch.dot(b, gh) * gh
    B, Gh = _as_matrix(b), _as_matrix(gh)
    rows, cols = B.shape
    if form == "nl":  # B Ĝᵀ Ĝ: associate through the smaller Gram matrix
        E = (B @ Gh.mT) @ Gh if rows <= cols else B @ (Gh.mT @ Gh)
    else:  # Ĝ Ĝᵀ B
        E = Gh @ (Gh.mT @ B) if cols <= rows else (Gh @ Gh.mT) @ B
    return E.reshape(b.shape)


class DeltaMomentum(_GradientLevel):
    r"""Delta momentum: momentum trained with an L2 objective by the delta rule ([NL] eqs 48–49).

    The momentum memory maps the gradient (its key) to a value ``P`` under the L2 objective
    ``‖m(Ĝ) − P‖²`` with retention ``α``. One delta-rule step per outer step gives, in the
    ``"outer"`` form ``m = −η b``::

        b ← α b − β E(b, Ĝ) + G                 W ← (1 − ηλ) W − η σ(b)
        form="nl"   ([NL] eq 49,  arXiv):     E = b Ĝᵀ Ĝ    m(αI − ∇L∇Lᵀ) — keys are the rows of G
        form="nips" ([NL-NIPS] eq 22):        E = Ĝ Ĝᵀ b    (αI − ∇Lᵀ∇L)m — keys are the columns of G

    Expanded, the ``"nl"`` step is one GD step of size 1 on
    ``ℓ(m) = (β/2)‖m Ĝᵀ‖² + η⟨m, G⟩ + ((1−α)/2)‖m‖²``. That is the L2 objective
    ``(β/2)‖m Ĝᵀ − V‖²`` whose value ``V`` satisfies ``β V Ĝ = −η G``; the paper's value
    ``P_i`` is the identity preconditioner here. The paper's ``η`` in front of ``P∇L`` is
    kept, and its erase term carries no ``η``.

    How it acts on each shape:

    - **Matrix** ``(r, c)``: as written above. ``E`` is computed through the smaller Gram
      matrix (``min(r, c)²``).
    - **N-D** tensor: as the matrix ``(shape[0], prod(shape[1:]))``.
    - **Vector**: ``E = ⟨b, ĝ⟩ ĝ`` for both forms, the rank-1 delta rule with the whole
      gradient as the key. Taken literally, one of the two forms would collapse to a
      scalar ``(α − β)``.
    - **Single element**: no erase term (plain momentum).

    **Stability.** With ``normalize=True`` (default), ``Ĝ = G/(‖G‖_F + eps)``, so
    ``‖ĜᵀĜ‖₂ ≤ 1`` and ``b(αI − βĜᵀĜ)`` has gain ≤ ``max(α, |α − β|)`` < 1 for
    ``0 ≤ β < 1 + α``. ``normalize=False`` is the paper's raw gradient key, which is unstable
    whenever ``‖G‖`` is large.

    ``lr_placement="outer"`` (default) stores ``b`` and applies ``−η`` at read-out (torch
    convention). ``"inner"`` stores ``m`` with ``η`` inside the write: ``m ← αm − βE(m, Ĝ) −
    ηG``, ``W ← W + m``. ``beta=0`` equals :class:`MomentumMemory` exactly. The output hook
    (``output="newton_schulz"``) needs the outer form. State per parameter: ``step`` (int)
    and ``m``.
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        **_GradientLevel.CHOICES,
        "form": ("nl", "nips"),
        "lr_placement": ("outer", "inner"),
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.01,
        decay: float = 0.9,
        form: str = "nl",
        normalize: bool = True,
        beta: float = 1.0,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        *,
        lr_placement: str = "outer",
        output: str = "identity",
        ns_steps: int = 5,
        ns_coefficients: str | Sequence[float] = "quintic",
        ns_scale: str = "shape",
        nonmatrix: str = "identity",
    ) -> None:
        defaults = dict(
            lr=lr, decay=decay, form=form, normalize=normalize, beta=beta,
            weight_decay=weight_decay, eps=eps, lr_placement=lr_placement,
            **_output_defaults(output, ns_steps, ns_coefficients, ns_scale, nonmatrix),
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        owner = type(self).__name__
        _check_range(owner, "decay", group["decay"], 0.0, 1.0)
        _check_range(owner, "beta", group["beta"], 0.0)
        if not isinstance(group["normalize"], bool):
            raise ValueError(f"{owner}: normalize must be True or False, got {group['normalize']!r}")
        if group["lr_placement"] == "inner" and group["output"] != "identity":
            raise ValueError(
                f"{owner}: output={group['output']!r} needs lr_placement='outer' "
                "(the output map must see the lr-free memory)"
            )

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        lr, decay, beta, wd = group["lr"], group["decay"], group["beta"], group["weight_decay"]
        if "m" not in state:
            state["step"] = 0
            state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        m = state["m"]
        if wd != 0:
            p.mul_(1 - lr * wd)
        erase = (
            _delta_erase(m, g, group["form"], group["normalize"], group["eps"]) if beta != 0 else None
        )
        m.mul_(decay)
        if erase is not None:
            m.sub_(erase, alpha=beta)
        if group["lr_placement"] == "outer":
            m.add_(g)
            p.add_(self._output(m, group), alpha=-lr)
        else:
            m.add_(g, alpha=-lr)
            p.add_(m)


# ----------------------------------------------------------------------------------------------
# 4. deep momentum (DMGD)


def _dmgd_init(hidden: int, like: Tensor) -> Tensor:
    """Deterministic θ₀ = (a, b, c) stacked as ``[3, hidden]``: a = 1, b = linspace(−1, 1), c = 0."""
    theta = torch.zeros(3, hidden, dtype=like.dtype, device=like.device)
    theta[0] = 1.0
    if hidden > 1:
        theta[1] = torch.linspace(-1.0, 1.0, hidden, dtype=like.dtype, device=like.device)
    return theta


def _act(z: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """Activation value and derivative."""
    if activation == "tanh":
        t = torch.tanh(z)
        return t, 1 - t * t
    s = torch.sigmoid(z)
    return z * s, s * (1 + z * (1 - s))


def _dmgd_residual(x: Tensor, theta: Tensor, activation: str) -> Tensor:
    """``r_θ(x) = Σ_j c_j σ(a_j x + b_j)`` element-wise; ``x`` is flat ``[n]``."""
    a, b, c = theta[0], theta[1], theta[2]
    t, _ = _act(x[:, None] * a + b, activation)
    return t @ c


def _dmgd_inner_grad(x: Tensor, v: Tensor, theta: Tensor, activation: str, objective: str) -> Tensor:
    """Closed-form ``∇_θ ℓ`` of the DMGD inner objective on flat key ``x`` and value ``v``."""
    n = x.numel()
    a, b, c = theta[0], theta[1], theta[2]
    t, dt = _act(x[:, None] * a + b, activation)          # [n, h]
    r = t @ c                                              # [n]
    if objective == "dot":
        e = v / (-n)                                       # dℓ/dr for ℓ = −mean(r ⊙ v)
    else:
        e = (x + r - v) / n                                # dℓ/dr for ℓ = ½ mean((x + r − v)²)
    w = e[:, None] * c * dt                                # [n, h]
    return torch.stack((x @ w, w.sum(0), e @ t))          # (∂a, ∂b, ∂c)


class DeepMomentum(_GradientLevel):
    r"""DMGD, deep momentum gradient descent ([NL] eq 50; [NL-NIPS] eq 23), concretely specified.

    Eq 50 says the momentum is an MLP memory of gradients, trained by its own inner objective
    and rule: ``W_{i+1} = W_i + m_{i+1}(u_i)``, ``m_{i+1} = α m_i − η ∇L⁽²⁾(m_i; u_i, 1)``. The
    paper gives no MLP size and no concrete objective, and reports no experiment (§7 item 20).
    nlc's design, per parameter tensor, is cheap (a few numbers plus one buffer) and
    deterministic::

        b_t    = α b_{t−1} + g_t                        linear momentum memory (SGD form, b₀ = 0)
        s_t    = rms(b_t) + ε ;   k_t = b_t / s_t       scale-free key, rms(k) ≈ 1
        φ_θ(x) = x + r_θ(x) ,     r_θ(x) = Σ_{j<h} c_j σ(a_j x + b_j)   element-wise MLP ℝ→ℝ
        ĝ_t    = g_t / (rms(g_t) + ε)
        ℓ_t(θ) = −mean(r_θ(k_{t−1}) ⊙ ĝ_t)                   objective="dot"
               = ½ mean((φ_θ(k_{t−1}) − ĝ_t)²)               objective="l2"
        θ_t    = θ₀ + ρ (θ_{t−1} − θ₀) − η_in ∇_θ ℓ_t(θ_{t−1})     (from step 2 on)
        W_t    = (1 − ηλ) W_{t−1} − η s_t φ_{θ_t}(k_t)

    The MLP is an associative memory whose keys are the momentum directions and whose values
    are the gradients that followed them; the ``"dot"`` case is the paper's dot attentional
    bias ``−⟨M(k), v⟩``. That objective is the outer loss after the previous step, linearized:
    ``∂L(W_t)/∂θ = −η s ⟨g_t, ∂r_θ(k_{t−1})/∂θ⟩``. The memory therefore learns which update
    magnitudes (per value of the normalized momentum) the gradient stream rewarded. The
    ``"l2"`` objective instead regresses the next normalized gradient on the current key.
    Retention ``ρ = inner_decay`` pulls θ back towards its initialization θ₀. (The paper's
    ``α m_i`` decays towards 0; for a residual MLP the neutral point is the identity, which
    is θ₀.) The state is bounded: with the dot objective and ``tanh``, ``|c_j| ≤ η_in/(1 − ρ)``
    (Cauchy–Schwarz: ``|∂ℓ/∂c_j| ≤ rms(ĝ)·rms(tanh) ≤ 1``).

    Init, deterministic: ``a = 1``, ``b = linspace(−1, 1, h)``, ``c = 0``. So ``φ = id`` and
    the first step is exactly :class:`MomentumMemory`. With ``inner_lr = 0`` every step is.
    With ``decay = 0`` the MLP reads the raw gradient, the literal ``W ← W + m(u)`` of eq 50.

    Cost: ``O(n·h)`` element-wise work and temporaries per step, for a tensor with ``n``
    elements. Named options: ``objective ∈ {"dot", "l2"}``, ``activation ∈ {"tanh", "silu"}``.
    Numbers: ``hidden`` (h), ``inner_lr`` (η_in), ``inner_decay`` (ρ), ``decay`` (α).
    State per parameter: ``step`` (int), ``momentum_buffer`` (b), ``mlp`` (θ = (a, b, c) as
    ``[3, h]``), ``prev_key`` (k_{t−1}).
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        **_GradientLevel.CHOICES,
        "objective": ("dot", "l2"),
        "activation": ("tanh", "silu"),
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.01,
        decay: float = 0.9,
        hidden: int = 4,
        inner_lr: float = 0.01,
        inner_decay: float = 0.99,
        objective: str = "dot",
        activation: str = "tanh",
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        *,
        output: str = "identity",
        ns_steps: int = 5,
        ns_coefficients: str | Sequence[float] = "quintic",
        ns_scale: str = "shape",
        nonmatrix: str = "identity",
    ) -> None:
        defaults = dict(
            lr=lr, decay=decay, hidden=hidden, inner_lr=inner_lr, inner_decay=inner_decay,
            objective=objective, activation=activation, weight_decay=weight_decay, eps=eps,
            **_output_defaults(output, ns_steps, ns_coefficients, ns_scale, nonmatrix),
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        owner = type(self).__name__
        _check_range(owner, "decay", group["decay"], 0.0, 1.0)
        _check_int(owner, "hidden", group["hidden"], 1)
        _check_range(owner, "inner_lr", group["inner_lr"], 0.0)
        _check_range(owner, "inner_decay", group["inner_decay"], 0.0, 1.0)

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        lr, decay, wd, eps = group["lr"], group["decay"], group["weight_decay"], group["eps"]
        hidden, act = group["hidden"], group["activation"]
        if "momentum_buffer" not in state:
            state["step"] = 0
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["mlp"] = _dmgd_init(hidden, p)
            state["prev_key"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        buf, theta, prev_key = state["momentum_buffer"], state["mlp"], state["prev_key"]
        if wd != 0:
            p.mul_(1 - lr * wd)
        buf.mul_(decay).add_(g)
        n = buf.numel()
        scale = torch.linalg.vector_norm(buf) / math.sqrt(n) + eps
        key = (buf / scale).reshape(-1)
        if state["step"] > 1 and group["inner_lr"] != 0:
            value = g.reshape(-1) / (torch.linalg.vector_norm(g) / math.sqrt(n) + eps)
            grad_theta = _dmgd_inner_grad(prev_key.reshape(-1), value, theta, act, group["objective"])
            theta0 = _dmgd_init(hidden, theta)
            theta.sub_(theta0).mul_(group["inner_decay"]).add_(theta0)
            theta.sub_(grad_theta, alpha=group["inner_lr"])
        d = buf + (scale * _dmgd_residual(key, theta, act)).reshape(buf.shape)
        prev_key.copy_(key.reshape(prev_key.shape))
        p.add_(self._output(d, group), alpha=-lr)


# ----------------------------------------------------------------------------------------------
# 5. M3


class M3(_GradientLevel):
    r"""M3, multi-scale momentum Muon ([NL] §7.2, eq 75, Algorithm 1).

    M3 is CMS (the independent variant, eq 74) applied to the optimizer. It has two momentum
    levels at different frequencies, Adam's second moment, and Newton–Schulz.
    Algorithm 1 (inputs η, T, β₁, β₂, β₃, α, ε, f; ``M1 = M2 = V = 0``)::

        for k = 0, 1, 2, …:                                    # slow level, every f steps
            M2 ← M2 + β₃ Σ_{i=(k−1)f}^{kf} g_i ;  O2 ← NS_T(M2)
            for t = kf+1 … (k+1)f:                             # fast level, every step
                M1 ← M1 + β₁ g_t ;  V ← V + β₂ g_t² ;  O1 ← NS_T(M1)
                Θ ← Θ − η (O1 + α O2) / (√V + ε)

    Per step, with ``t`` the parameter's own step count and ``f = slow_period``::

        W ← (1 − ηλ) W                                     (weight_decay, decoupled)
        M1, V updated                                       (accumulate: "sum" | "ema")
        acc ← acc + g                                       (gradients since M2's last update)
        [slow_timing="before_step" and t % f == 0: slow update]
        O1 = NS_T(M1)
        d = (O1 + α O2) / (√V̂ + ε)                          (precondition, eps_placement)
        W ← W − η σ(d)                                      (output hook, identity by default)
        [slow_timing="after_step"  and t % f == 0: slow update]

        slow update, with β = β₃ (slow_beta) and ± = slow_sign:
            M2 ← M2 ± β·acc   (sum)     or     M2 ← β·M2 ± (1−β)·acc   (ema)
            acc ← 0 ;  O2 ← NS_T(M2)

    Named options, one per ambiguity of §7 item 19. The defaults follow Algorithm 1.

    - ``accumulate``: ``"sum"`` (Algorithm 1; un-decayed sums, so ``1/√V`` decays like
      AdaGrad) or ``"ema"`` (decayed averages; ``V`` bias-corrected, as in Adam).
    - ``slow_sign``: ``"plus"`` (Algorithm 1) or ``"minus"`` (eq 75 writes
      ``M2 − β Σ g``; with ``Θ − η(…)``, that sign moves the slow term uphill).
    - ``slow_beta``: ``"beta3"`` (Algorithm 1) or ``"beta2"`` (eq 75 reuses β₂).
    - ``slow_timing``: ``"after_step"`` (Algorithm 1; the new O2 first acts on step ``kf+1``)
      or ``"before_step"`` (eq 75; at ``t ≡ 0 (mod f)``, ``M2`` absorbs ``g_t`` before step
      ``t``). ``O2`` is recomputed only when ``M2`` changes, and cached in the state.
    - Window: ``M2`` receives exactly the ``f`` gradients since its last update, each once.
      Algorithm 1's inclusive ``Σ_{(k−1)f}^{kf}`` would count the boundary gradient twice.
    - ``eps_placement``: ``"outside"`` (``√V + ε``, Algorithm 1) or ``"inside"`` (``√(V + ε)``).
    - ``precondition``: ``"elementwise"`` (Algorithm 1), ``"tensor"`` (``√mean(V)``, one scalar
      per tensor) or ``"none"`` (no ``V``: multi-scale Muon). **Caveat of the literal form.**
      The numerator is orthogonalized (entries ``≈ 1/√n``) but the denominator is per
      element. An element whose gradient stays near 0 therefore gets a step of about
      ``η/(√n·ε)``. On a tiny tanh MLP, ``eps=1e-8`` makes the loss blow up from step 1; use
      ``eps≈1e-3`` or ``precondition="tensor"``. The un-decayed sums also make ``M1`` an
      undamped momentum (retention 1), so it keeps pushing after the gradient has vanished.
      ``accumulate="ema"`` damps it.
    - ``ns_steps`` (T, default 5) and ``ns_coefficients`` (default ``"quintic"``). The paper
      gives neither. ``ns_scale`` defaults to ``"none"`` here, because Algorithm 1 applies no
      shape factor.
    - ``nonmatrix``: tensors with ``ndim < 2`` have no Newton–Schulz. ``"polar"`` (default)
      uses ``O = M/‖M‖``, the polar factor NS converges to for a ``1×n`` matrix, so the
      scale matches the matrix case. ``"identity"`` uses ``O = M``; with ``"sum"`` that grows
      like ``√t``.

    N-D tensors are orthogonalized as ``(shape[0], prod(shape[1:]))``. Since NS output is
    scale-free, ``β₁`` and ``β₃`` matter only in ``"ema"`` mode. With ``"sum"``, the step size
    is ``≈ η/(√(β₂ t)·|g|·√max(dims))``; choose ``lr`` with that in mind.
    State per parameter: ``step`` (int), ``m1``, ``m2``, ``v``, ``o2``, ``grad_sum``. The slow
    period counts the parameter's own steps, so a step in which it had no gradient does not
    count.
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        **_GradientLevel.CHOICES,
        "accumulate": ("sum", "ema"),
        "slow_sign": ("plus", "minus"),
        "slow_beta": ("beta3", "beta2"),
        "slow_timing": ("after_step", "before_step"),
        "eps_placement": ("outside", "inside"),
        "precondition": ("elementwise", "tensor", "none"),
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.02,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9),
        alpha: float = 1.0,
        eps: float = 1e-8,
        ns_steps: int = 5,
        slow_period: int = 100,
        weight_decay: float = 0.0,
        *,
        accumulate: str = "sum",
        slow_sign: str = "plus",
        slow_beta: str = "beta3",
        slow_timing: str = "after_step",
        eps_placement: str = "outside",
        precondition: str = "elementwise",
        ns_coefficients: str | Sequence[float] = "quintic",
        ns_scale: str = "none",
        nonmatrix: str = "polar",
        output: str = "identity",
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), alpha=alpha, eps=eps, slow_period=slow_period,
            weight_decay=weight_decay, accumulate=accumulate, slow_sign=slow_sign,
            slow_beta=slow_beta, slow_timing=slow_timing, eps_placement=eps_placement,
            precondition=precondition,
            **_output_defaults(output, ns_steps, ns_coefficients, ns_scale, nonmatrix),
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        owner = type(self).__name__
        betas = group["betas"]
        if len(betas) != 3:
            raise ValueError(f"{owner}: betas must be a triple (beta1, beta2, beta3), got {betas!r}")
        for i, b in enumerate(betas):
            if group["accumulate"] == "ema":
                _check_range(owner, f"betas[{i}]", b, 0.0, 1.0, hi_open=True)
            else:
                _check_range(owner, f"betas[{i}]", b, 0.0)
        _check_range(owner, "alpha", group["alpha"], 0.0)
        _check_int(owner, "slow_period", group["slow_period"], 1)

    def _orth(self, M: Tensor, group: dict[str, Any]) -> Tensor:
        # O = NS_T(M): the level's own orthogonalization (no extra scale unless ns_scale says so).
        return orthogonalize(M, group["ns_steps"], group["ns_coefficients"], group["ns_scale"],
                             group["nonmatrix"])

    def _slow_update(self, state: dict[str, Any], group: dict[str, Any]) -> None:
        _, beta2, beta3 = group["betas"]
        coef = beta3 if group["slow_beta"] == "beta3" else beta2
        sign = 1.0 if group["slow_sign"] == "plus" else -1.0
        m2, acc = state["m2"], state["grad_sum"]
        if group["accumulate"] == "sum":
            m2.add_(acc, alpha=sign * coef)
        else:
            m2.mul_(coef).add_(acc, alpha=sign * (1 - coef))
        acc.zero_()
        state["o2"].copy_(self._orth(m2, group))

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        lr, (beta1, beta2, _), wd = group["lr"], group["betas"], group["weight_decay"]
        if "m1" not in state:
            state["step"] = 0
            for name in ("m1", "m2", "v", "o2", "grad_sum"):
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t, f = state["step"], group["slow_period"]
        m1, v = state["m1"], state["v"]
        if wd != 0:
            p.mul_(1 - lr * wd)
        if group["accumulate"] == "sum":
            m1.add_(g, alpha=beta1)
            v.addcmul_(g, g, value=beta2)
            v_hat = v
        else:
            m1.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            v_hat = v / (1 - beta2**t)
        state["grad_sum"].add_(g)
        slow_now = t % f == 0
        if slow_now and group["slow_timing"] == "before_step":
            self._slow_update(state, group)
        o1 = self._orth(m1, group)
        num = o1 if group["alpha"] == 0 else o1 + group["alpha"] * state["o2"]
        precondition = group["precondition"]
        if precondition == "none":
            d = num
        else:
            if precondition == "tensor":
                v_hat = v_hat.mean()
            if group["eps_placement"] == "outside":
                denom = v_hat.sqrt().add_(group["eps"])
            else:
                denom = (v_hat + group["eps"]).sqrt_()
            d = num / denom
        p.add_(self._output(d, group), alpha=-lr)
        if slow_now and group["slow_timing"] == "after_step":
            self._slow_update(state, group)


# ----------------------------------------------------------------------------------------------
# registry


#: Spec rule name → optimizer class.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "gd": MomentumMemory,
    "momentum": MomentumMemory,
    "adam": AdamMemory,
    "adamw": AdamMemory,
    "delta": DeltaMomentum,
    "dmgd": DeepMomentum,
    "m3": M3,
    "muon": Muon,
}

#: Per-rule defaults applied by :func:`build_optimizer` over the class defaults.
#: ``gd`` is gradient descent (no momentum unless ``decay`` is given); ``adam`` couples weight
#: decay into the gradient (``torch.optim.Adam``), ``adamw`` decouples it.
RULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "gd": {"decay": 0.0},
    "adam": {"weight_decay_mode": "coupled"},
}

#: Hyper-parameter spellings accepted by :func:`build_optimizer` → the constructor's name.
HYPER_ALIASES: dict[str, str] = {"wd": "weight_decay", "momentum": "decay"}


def _constructor_params(cls: type) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    return {n: p for n, p in sig.parameters.items() if n not in ("self", "params")}


def rule_signature(rule: str) -> dict[str, Any]:
    """Hyper-parameters of a spec rule and their defaults (rule defaults applied).

    Useful to the resolver for validating a spec's ``rule name(k = v, …)`` before codegen.
    Allowed values of named options are in ``OPTIMIZERS[rule].CHOICES``.
    """
    cls = _lookup_rule(rule)
    out = {n: p.default for n, p in _constructor_params(cls).items()}
    out.update(RULE_DEFAULTS.get(rule, {}))
    return out


def _lookup_rule(rule: str) -> type[torch.optim.Optimizer]:
    if rule not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer rule {rule!r}{_hint(rule, OPTIMIZERS)} "
            f"(allowed: {', '.join(sorted(OPTIMIZERS))})"
        )
    return OPTIMIZERS[rule]


def build_optimizer(rule: str, params: ParamsT, **hyper: Any) -> torch.optim.Optimizer:
    """Instantiate the optimizer level named by a spec ``rule``.

    ``hyper`` may use the constructor's names, or the aliases ``wd`` (→ ``weight_decay``),
    ``momentum`` (→ ``decay``), and ``beta1``, ``beta2``, ``beta3`` (each replaces one entry
    of ``betas``). An unknown rule, an unknown hyper-parameter or an option value outside its
    set raises ``ValueError``. The message names the offender, the allowed set and the
    closest match.
    """
    cls = _lookup_rule(rule)
    accepted = _constructor_params(cls)
    kwargs: dict[str, Any] = dict(RULE_DEFAULTS.get(rule, {}))
    beta_parts: dict[int, Any] = {}
    for name, value in hyper.items():
        if name in ("beta1", "beta2", "beta3") and "betas" in accepted:
            beta_parts[int(name[-1]) - 1] = value
            continue
        target = HYPER_ALIASES.get(name, name)
        if target not in accepted:
            allowed = sorted(accepted) + sorted(a for a, t in HYPER_ALIASES.items() if t in accepted)
            if "betas" in accepted:
                allowed += ["beta1", "beta2"] + (["beta3"] if cls is M3 else [])
            raise ValueError(
                f"optimizer rule {rule!r} has no hyper-parameter {name!r}"
                f"{_hint(name, allowed)} (allowed: {', '.join(sorted(set(allowed)))})"
            )
        if target != name and target in hyper:
            raise ValueError(f"optimizer rule {rule!r}: both {name!r} and its alias target {target!r} given")
        kwargs[target] = value
    if beta_parts:
        betas = list(kwargs.get("betas", accepted["betas"].default))
        for i, value in beta_parts.items():
            if i >= len(betas):
                raise ValueError(f"optimizer rule {rule!r} has only {len(betas)} betas, got beta{i + 1}")
            betas[i] = value
        kwargs["betas"] = tuple(betas)
    return cls(params, **kwargs)
