"""Memory kinds: shapes, init, and the closed-form inner backward against torch.autograd."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

from nlc.runtime.memories import (
    ACTIVATIONS,
    KINDS,
    OBJECTIVES,
    MemorySpec,
    activation,
    activation_and_derivative,
    forward,
    forward_backward,
    has_closed_form,
    init_weights,
    inner_loss,
    layer_inputs,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention (and noise on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# every kind, with mlp / residual_mlp at depths 1..3
SHAPES = [
    ("linear", 1),
    ("mlp", 1),
    ("mlp", 2),
    ("mlp", 3),
    ("residual_mlp", 1),
    ("residual_mlp", 2),
    ("residual_mlp", 3),
    ("swiglu", 1),
]


def make_spec(
    kind: str,
    depth: int,
    act: str = "silu",
    din: int = 3,
    dout: int = 3,
    hidden: int = 4,
):
    if kind == "residual_mlp":
        dout = din
    return MemorySpec(kind, din, dout, hidden=hidden, depth=depth, act=act)


def _data(spec: MemorySpec, B=2, H=2, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = init_weights(spec, B_shape=(B, H), generator=g, dtype=F64)
    x = torch.randn(B, H, C, spec.din, generator=g, dtype=F64)
    v = torch.randn(B, H, C, spec.dout, generator=g, dtype=F64)
    return ws, x, v


def _oracle_token_loss(objective: str, y, v, delta):
    if objective == "l2":
        return 0.5 * ((y - v) ** 2).sum()
    if objective == "dot":
        return -(y * v).sum()
    return F.huber_loss(y, v, reduction="sum", delta=delta)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("kind,depth", SHAPES)
def test_forward_backward_matches_autograd(kind, depth, objective, act):
    spec = make_spec(kind, depth, act)
    ws, x, v = _data(
        spec, seed=zlib.crc32(f"{kind}{depth}{objective}{act}".encode()) % 1000
    )
    x = 1.5 * x  # exercise the huber clamp and the activations' tails
    delta = 0.7
    y, inputs, deltas = forward_backward(spec, ws, x, v, objective, huber_delta=delta)
    torch.testing.assert_close(y, forward(spec, ws, x), rtol=0, atol=0)
    assert [a.shape[-1] for a in inputs] == [s[1] for s in spec.weight_shapes()]
    assert [u.shape[-1] for u in deltas] == [s[0] for s in spec.weight_shapes()]
    for a, b in zip(inputs, layer_inputs(spec, ws, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    C = x.shape[-2]
    leaves = [w.clone().requires_grad_(True) for w in ws]
    for t in range(C):
        # loss of token t summed over (b, h): its gradient w.r.t. W[b, h] is token t of sequence b
        loss = _oracle_token_loss(
            objective,
            forward(spec, leaves, x[..., t : t + 1, :]),
            v[..., t : t + 1, :],
            delta,
        )
        grads = torch.autograd.grad(loss, leaves)
        for g, a, u in zip(grads, inputs, deltas):
            closed = u[..., t, :, None] * a[..., t, None, :]
            torch.testing.assert_close(closed, g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_inner_loss_matches_oracle(objective):
    spec = make_spec("mlp", 2, "gelu")
    ws, x, v = _data(spec)
    per_token = inner_loss(spec, ws, 2 * x, v, objective, huber_delta=0.5)
    assert per_token.shape == x.shape[:-1]
    total = _oracle_token_loss(objective, forward(spec, ws, 2 * x), v, 0.5)
    torch.testing.assert_close(per_token.sum(), total, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_derivative(act):
    z = torch.linspace(-4, 4, 101, dtype=F64)
    z = z[z != 0].requires_grad_(True)  # relu'(0) is a convention, see below
    s, ds = activation_and_derivative(act, z)
    torch.testing.assert_close(s, activation(act, z), rtol=0, atol=0)
    (auto,) = torch.autograd.grad(s.sum(), z)
    torch.testing.assert_close(ds, auto, rtol=1e-12, atol=1e-12)
    ref = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "relu": F.relu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "identity": lambda t: t,
    }[act]
    torch.testing.assert_close(s, ref(z), rtol=1e-12, atol=1e-12)


def test_relu_derivative_at_zero_is_zero():
    _, d = activation_and_derivative("relu", torch.zeros(3))
    assert torch.equal(d, torch.zeros(3))


@pytest.mark.parametrize("kind,depth", SHAPES)
@pytest.mark.parametrize("objective", ["l2", "dot"])
def test_closed_form_is_differentiable(kind, depth, objective):
    """The closed form is an ordinary forward computation: first-order autograd through it
    (what the outer loss does through the writes) agrees with finite differences."""
    spec = make_spec(kind, depth, "gelu", din=2, dout=2, hidden=3)
    ws, x, v = _data(spec, B=1, H=1, C=2, seed=3)
    n = len(ws)

    def fn(*args):
        y, inputs, deltas = forward_backward(
            spec, list(args[:n]), args[n], args[n + 1], objective
        )
        return (y, *inputs, *deltas)

    args = [t.clone().requires_grad_(True) for t in (*ws, x, v)]
    assert torch.autograd.gradcheck(fn, args)


def test_weight_shapes_and_names():
    assert MemorySpec("linear", 3, 5).weight_shapes() == [(5, 3)]
    assert MemorySpec("mlp", 3, 5, hidden=7, depth=1).weight_shapes() == [(5, 3)]
    assert MemorySpec("mlp", 3, 5, hidden=7, depth=3).weight_shapes() == [
        (7, 3),
        (7, 7),
        (5, 7),
    ]
    assert MemorySpec("residual_mlp", 4, 4, hidden=8, depth=2).weight_shapes() == [
        (8, 4),
        (4, 8),
    ]
    sw = MemorySpec("swiglu", 3, 5, hidden=6)
    assert sw.weight_shapes() == [(6, 3), (6, 3), (5, 6)]
    assert sw.weight_names() == ["W_g", "W_u", "W_o"]
    assert sw.input_side() == [True, True, False]
    assert MemorySpec("mlp", 3, 5, hidden=7, depth=3).input_side() == [
        True,
        False,
        False,
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "conv", "din": 2, "dout": 2},
        {"kind": "linear", "din": 2, "dout": 2, "act": "swish"},
        {"kind": "residual_mlp", "din": 2, "dout": 3, "hidden": 4, "depth": 2},
        {"kind": "mlp", "din": 2, "dout": 2, "depth": 2},  # missing hidden
        {"kind": "swiglu", "din": 2, "dout": 2},  # missing hidden
        {"kind": "linear", "din": 2, "dout": 2, "depth": 2},
        {"kind": "mlp", "din": 0, "dout": 2},
        {"kind": "mlp", "din": 2, "dout": 2, "depth": 0},
    ],
)
def test_spec_validation(kwargs):
    with pytest.raises(ValueError):
        MemorySpec(**kwargs)


def test_has_closed_form():
    for kind, obj in itertools.product(KINDS, OBJECTIVES):
        assert has_closed_form(kind, obj)
    assert not has_closed_form("attention", "l2")
    assert not has_closed_form("mlp", "kl")


def test_init_weights():
    spec = MemorySpec("residual_mlp", 4, 4, hidden=6, depth=2)
    a = init_weights(spec, B_shape=(2, 3), generator=torch.Generator().manual_seed(1))
    b = init_weights(spec, B_shape=(2, 3), generator=torch.Generator().manual_seed(1))
    assert [w.shape for w in a] == [(2, 3, 6, 4), (2, 3, 4, 6)]
    assert all(w.dtype == torch.float32 for w in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    big = init_weights(MemorySpec("linear", 400, 50), B_shape=(4,), dtype=F64)[0]
    assert abs(big.std().item() - 400**-0.5) < 0.1 * 400**-0.5
    zeros = init_weights(spec, scheme="zeros", dtype=F64)
    assert all(torch.count_nonzero(w) == 0 for w in zeros)
    ident = init_weights(spec, scheme="zero_last", dtype=F64)
    assert torch.count_nonzero(ident[0]) > 0
    x = torch.randn(5, 4, dtype=F64)
    torch.testing.assert_close(
        forward(spec, ident, x), x
    )  # residual memory starts as identity
    with pytest.raises(ValueError):
        init_weights(spec, scheme="orthogonal")


def test_forward_broadcasts_shared_weights():
    """Weights without batch dims (a shared initial state) broadcast over [B, H]."""
    spec = make_spec("swiglu", 1)
    ws, x, v = _data(spec)
    shared = [w[0, 0] for w in ws]
    y, inputs, deltas = forward_backward(spec, shared, x, v, "l2")
    y2, inputs2, deltas2 = forward_backward(
        spec, [w.expand_as(w0) for w, w0 in zip(shared, ws)], x, v, "l2"
    )
    torch.testing.assert_close(y, y2)
    for p, r in zip(deltas + inputs, deltas2 + inputs2):
        torch.testing.assert_close(p, r)
