"""run_chunks: the chunk schedule, resets, truncation, kept states; scan (compiled) == loop (eager)."""

from __future__ import annotations

import pytest
import torch

from nlc.runtime.chunks import boundaries, run_chunks


def test_boundaries():
    assert boundaries(10, 4, None, None) == [(0, 10, False, False)]
    assert boundaries(16, 4, 8, None) == [(0, 8, False, False), (8, 16, True, False)]
    assert boundaries(16, 4, None, 2) == [(0, 8, False, False), (8, 16, False, True)]
    assert boundaries(13, 4, 8, 3) == [(0, 8, False, False), (8, 12, True, False), (12, 13, False, True)]


def _step(state, xs):
    (w,), (m,) = state
    (x,) = xs
    y = x * w.unsqueeze(-2) + m.unsqueeze(-2)
    new_w = 0.9 * w + x.mean(-2)
    new_m = 0.5 * m + torch.tanh(new_w)
    return ((new_w,), (new_m,)), y


@pytest.mark.parametrize("T", [1, 7, 16, 19])
@pytest.mark.parametrize("opts", [{}, {"reset_every": 8}, {"truncate": 2}, {"reset_every": 4, "truncate": 3}])
def test_scan_under_compile_equals_the_loop(T, opts):
    torch.manual_seed(0)
    w0 = torch.randn(2, 3, requires_grad=True)
    x = torch.randn(2, T, 3, requires_grad=True)

    def run(w0, x):
        state = ((w0,), (torch.zeros_like(w0),))
        restart = lambda c0: ((w0 * (1 + c0),), (torch.zeros_like(w0),))  # noqa: E731
        state, y, _ = run_chunks(_step, state, (x,), T, 4, restart=restart, **opts)
        # generated levels never back-propagate through the final state (it is only carried,
        # detached); torch's scan backward rejects gradients into some final carries
        return y.sum()

    eager = run(w0, x)
    ge = torch.autograd.grad(eager, (w0, x))
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(w0, x)
    gc = torch.autograd.grad(compiled, (w0, x))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_keep_states_returns_every_chunk_start():
    w0 = torch.zeros(1, 2)
    state = ((w0,), (torch.zeros_like(w0),))
    x = torch.ones(1, 10, 2)
    _, y, kept = run_chunks(_step, state, (x,), 10, 4, keep_states=True)
    assert len(kept) == 3 and y.shape == (1, 10, 2)
    assert torch.equal(kept[0][0][0], w0)
    assert torch.allclose(kept[1][0][0], torch.ones(1, 2))
