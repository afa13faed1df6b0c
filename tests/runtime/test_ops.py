"""Model building blocks (nlc.runtime.ops): causality, exactness, and torch.compile cleanliness."""

from __future__ import annotations

import math

import pytest
import torch

from nlc.runtime import ops
from nlc.runtime.ops import (
    MLP,
    CausalConv1d,
    RMSNorm,
    SwiGLU,
    apply_rope,
    causal_attention,
    causal_conv1d,
    chunk_schedule,
    l2_normalize,
    merge_heads,
    rms_norm,
    rope_cache,
    sliding_window_mask,
    split_heads,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Run these tiny-tensor tests on one intra-op thread, then restore the setting.

    On a busy 2-core machine, thread-pool contention makes a tiny backward pass about 100×
    slower with 2 threads (0.1 ms → 15 ms).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# normalization


def test_rms_norm_matches_formula():
    x = torch.randn(2, 5, 16, generator=_gen(), dtype=F64)
    w = torch.randn(16, generator=_gen(1), dtype=F64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * w
    assert torch.allclose(rms_norm(x, w, 1e-6), expected, atol=1e-14)
    assert torch.allclose(rms_norm(x, None, 1e-6), expected / w, atol=1e-12)
    norm = RMSNorm(16).double()
    assert torch.allclose(norm(x), expected / w, atol=1e-12)
    xb = x.bfloat16()
    assert rms_norm(xb, w.bfloat16()).dtype == torch.bfloat16


def test_l2_normalize():
    x = torch.randn(3, 7, generator=_gen(), dtype=F64)
    y = l2_normalize(x)
    assert torch.allclose(y.norm(dim=-1), torch.ones(3, dtype=F64))
    assert torch.allclose(y, torch.nn.functional.normalize(x, dim=-1))
    assert torch.allclose(l2_normalize(x, dim=0).norm(dim=0), torch.ones(7, dtype=F64))
    z = torch.zeros(2, 4, requires_grad=True)
    l2_normalize(z).sum().backward()
    assert torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------------------------
# causal convolution


def test_causal_conv_is_causal_and_matches_formula():
    torch.manual_seed(0)
    conv = CausalConv1d(6, 4).double()
    x = torch.randn(2, 10, 6, generator=_gen(), dtype=F64)
    y = conv(x)
    assert y.shape == x.shape
    # explicit formula: y[t, c] = Σ_j w[c, j] · x[t − (W−1) + j, c]
    w = conv.weight[:, 0, :]
    xp = torch.nn.functional.pad(x, (0, 0, 3, 0))
    expected = sum(w[:, j] * xp[:, j : j + 10, :] for j in range(4))
    assert torch.allclose(y, expected, atol=1e-12)
    # perturbing the future leaves the past unchanged, and does change the present
    for t0 in (0, 4, 9):
        x2 = x.clone()
        x2[:, t0:] += torch.randn_like(x2[:, t0:])
        y2 = conv(x2)
        assert torch.equal(y2[:, :t0], y[:, :t0])
        assert not torch.allclose(y2[:, t0], y[:, t0])
    # functional form with a [C, W] weight
    assert torch.allclose(causal_conv1d(x, w), y)


# ----------------------------------------------------------------------------------------------
# rotary embeddings


def test_rope_preserves_norms_and_is_relative():
    T, D = 12, 8
    cos, sin = rope_cache(T, D, dtype=F64)
    assert cos.shape == (T, D) and sin.shape == (T, D)
    x = torch.randn(2, 3, T, D, generator=_gen(), dtype=F64)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12)
    assert torch.allclose(apply_rope(x[:, :, :1], cos[:1], sin[:1]), x[:, :, :1])  # position 0
    # ⟨rope(q)_s, rope(k)_t⟩ depends only on s − t
    q = torch.randn(D, generator=_gen(1), dtype=F64).expand(1, 1, T, D)
    k = torch.randn(D, generator=_gen(2), dtype=F64).expand(1, 1, T, D)
    scores = apply_rope(q, cos, sin)[0, 0] @ apply_rope(k, cos, sin)[0, 0].T
    assert torch.allclose(scores[5, 2], scores[9, 6]) and torch.allclose(scores[3, 3], scores[7, 7])
    # offset continues the same table
    cos_o, sin_o = rope_cache(4, D, offset=8, dtype=F64)
    assert torch.allclose(cos_o, cos[8:12]) and torch.allclose(sin_o, sin[8:12])
    with pytest.raises(ValueError, match="even"):
        rope_cache(4, 7)


# ----------------------------------------------------------------------------------------------
# attention


def _brute_attention(q, k, v, window):
    T = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        for s in range(T):
            allowed[t, s] = s <= t and (window is None or t - s < window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("window", [None, 1, 3, 16])
def test_attention_matches_brute_force(window):
    q, k, v = (torch.randn(2, 3, 9, 4, generator=_gen(i), dtype=F64) for i in range(3))
    out = causal_attention(q, k, v, window)
    assert torch.allclose(out, _brute_attention(q, k, v, window), atol=1e-12)
    if window == 1:
        assert torch.allclose(out, v)


@pytest.mark.parametrize("window", [None, 3])
def test_attention_is_causal(window):
    q, k, v = (torch.randn(1, 2, 10, 4, generator=_gen(i), dtype=F64) for i in range(3))
    out = causal_attention(q, k, v, window)
    for t0 in (1, 5, 9):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for z in (q2, k2, v2):
            z[:, :, t0:] += torch.randn_like(z[:, :, t0:])
        out2 = causal_attention(q2, k2, v2, window)
        assert torch.allclose(out2[:, :, :t0], out[:, :, :t0], atol=1e-14)
        assert not torch.allclose(out2[:, :, t0], out[:, :, t0])


def test_sliding_window_mask_and_bad_window():
    m = sliding_window_mask(5, 2)
    assert m.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [False, True, True, False, False],
        [False, False, True, True, False],
        [False, False, False, True, True],
    ]
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="window"):
        causal_attention(q, q, q, window=0)


def test_split_merge_heads_round_trip():
    x = torch.randn(2, 7, 12, generator=_gen())
    h = split_heads(x, 3)
    assert h.shape == (2, 3, 7, 4)
    assert torch.equal(h[:, 1, :, :], x[:, :, 4:8])
    assert torch.equal(merge_heads(h), x)


# ----------------------------------------------------------------------------------------------
# feed-forward blocks


def test_feed_forward_blocks():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    sw = SwiGLU(8, 16)
    assert sw(x).shape == x.shape
    gate, up = sw.w_in.weight[:16], sw.w_in.weight[16:]
    expected = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ sw.w_out.weight.T
    assert torch.allclose(sw(x), expected, atol=1e-6)
    for act in ops.ACTIVATIONS:
        mlp = MLP(8, 16, act)
        assert mlp(x).shape == x.shape
    for module in (sw, MLP(8, 16)):
        assert all(name.endswith("weight") for name, _ in module.named_parameters())  # bias-free
    with pytest.raises(ValueError, match="did you mean 'gelu'"):
        MLP(8, 16, act="gellu")


# ----------------------------------------------------------------------------------------------
# chunk schedule


def test_chunk_schedule():
    assert chunk_schedule(8, 4) == [(0, 4), (4, 8)]
    assert chunk_schedule(10, 4) == [(0, 4), (4, 8), (8, 10)]  # last partial chunk kept
    assert chunk_schedule(3, 16) == [(0, 3)]
    assert chunk_schedule(0, 4) == []
    assert chunk_schedule(5, 1) == [(i, i + 1) for i in range(5)]
    for T in range(30):
        for C in (1, 3, 7):
            chunks = chunk_schedule(T, C)
            covered = [t for a, b in chunks for t in range(a, b)]
            assert covered == list(range(T))
            assert all(b - a == C for a, b in chunks[:-1])
    with pytest.raises(ValueError, match="C must be"):
        chunk_schedule(8, 0)


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)


def test_functional_ops_compile_fullgraph():
    def block(x, w_norm):
        T = x.shape[1]
        h = rms_norm(x, w_norm)
        q = l2_normalize(split_heads(h, 2))
        k = split_heads(h, 2)
        cos, sin = rope_cache(T, 4, device=x.device, dtype=x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        full = causal_attention(q, k, k)
        local = causal_attention(q, k, k, window=3)
        out = merge_heads(full + local)
        pieces = [out[:, a:b].cumsum(1) for a, b in chunk_schedule(T, 4)]
        return torch.cat(pieces, dim=1)

    x, w = torch.randn(2, 10, 8), torch.randn(8)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x, w), block(x, w), atol=1e-6)


def test_modules_compile_fullgraph():
    torch.manual_seed(0)
    net = torch.nn.Sequential(RMSNorm(8), CausalConv1d(8, 4), SwiGLU(8, 16), MLP(8, 16, "relu2"))
    x = torch.randn(2, 6, 8, requires_grad=True)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    assert torch.allclose(y, net(x), atol=1e-6)
    y.sum().backward()  # the backward graph compiles as well
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("hin", [1, 3])
def test_head_linear_equals_a_product_per_head(hin):
    """HeadLinear: a shared input (``H' = 1``, one 2-D product) and per-head inputs give each head
    ``x_h @ W_h^T``, values and gradients (float64)."""
    from nlc.runtime.flows import HeadLinear

    torch.manual_seed(0)
    lin = HeadLinear(3, 8, 5).double()
    x = torch.randn(2, hin, 7, 8, dtype=torch.float64, requires_grad=True)
    y = lin(x)
    assert y.shape == (2, 3, 7, 5)
    w = lin.weight.detach().clone().requires_grad_()
    ref = torch.stack([x[:, h if hin > 1 else 0] @ w[h].T for h in range(3)], dim=1)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad((y * g).sum(), (x, lin.weight))
    rx, rw = torch.autograd.grad((ref * g).sum(), (x, w))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
