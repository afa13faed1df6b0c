"""run_chunks: the chunk schedule, resets, truncation, kept states; scan (compiled) == loop (eager)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves as pytree_leaves

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


# ---- final_state=False: no update where nothing reads the end state --------------------------


def _step_upd(state, xs, update=True):
    new, y = _step(state, xs)
    return (new if update else None), y


@pytest.mark.parametrize("T,opts,updates", [
    (16, {}, [True, True, True, False]),
    (19, {}, [True, True, True, True, False]),  # the partial chunk is the last one
    (16, {"reset_every": 8}, [True, False, True, False]),
    (16, {"truncate": 2}, [True, True, True, False]),  # a cut keeps the state: it is read
    (24, {"reset_every": 8, "truncate": 3}, [True, False, True, False, True, False]),
])
def test_no_update_where_nothing_reads_the_end_state(T, opts, updates):
    """``final_state=False`` runs the last chunk, and the last one before each reset, without
    their update; the reads are those of the full run, and the state returned is the last chunk's
    start state."""
    torch.manual_seed(0)
    w0 = torch.randn(2, 3)
    x = torch.randn(2, T, 3)
    def restart(c0):
        return ((w0 * (1 + c0),), (torch.zeros_like(w0),))

    calls = []

    def step(state, xs, update=True):
        calls.append(update)
        return _step_upd(state, xs, update)

    start = ((w0,), (torch.zeros_like(w0),))
    state, y, _ = run_chunks(step, start, (x,), T, 4, restart=restart, final_state=False, **opts)
    assert calls == updates
    _, ref, kept = run_chunks(_step, start, (x,), T, 4, restart=restart, keep_states=True, **opts)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    for a, b in zip(pytree_leaves(state), pytree_leaves(kept[-1])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("T", [12, 16, 19])
@pytest.mark.parametrize("opts", [{}, {"reset_every": 8}, {"reset_every": 4, "truncate": 3}])
def test_no_update_at_the_end_under_compile_equals_the_loop(T, opts):
    """The same under ``torch.compile`` (runs of full chunks through scan, a dead last chunk kept
    out of it): values and gradients of the eager loop with every update."""
    torch.manual_seed(0)
    w0 = torch.randn(2, 3, requires_grad=True)
    x = torch.randn(2, T, 3, requires_grad=True)

    def run(w0, x, final):
        state = ((w0,), (torch.zeros_like(w0),))

        def restart(c0):
            return ((w0 * (1 + c0),), (torch.zeros_like(w0),))

        step = _step if final else _step_upd
        _, y, _ = run_chunks(step, state, (x,), T, 4, restart=restart, final_state=final, **opts)
        return y.sum()

    eager = run(w0, x, True)
    ge = torch.autograd.grad(eager, (w0, x))
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(w0, x, False)
    gc = torch.autograd.grad(compiled, (w0, x))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


# ---- a flow passed twice (`let query = key`) --------------------------------------------------


def test_a_flow_passed_twice_stays_one_tensor_in_every_piece():
    x, v = torch.randn(2, 10, 3), torch.randn(2, 10, 3)
    seen = []

    def step(state, xs):
        k, val, q = xs
        seen.append((k is q, k is val))
        return state, k + val

    run_chunks(step, (), (x, v, x), 10, 4)
    assert seen == [(True, False)] * 3  # two full chunks and the partial one


def _cms_level():
    from ..codegen.helpers import level_classes, shrink
    from ..conftest import ROOT

    text = (ROOT / "benchmarks" / "specs" / "cms_level.nl").read_text()
    text = shrink(text, d=32).replace("period = 512", "period = 8")
    return level_classes(text)[1]["fast"]


def _matmuls(gm) -> int:
    import operator

    return sum(
        n.op == "call_function" and n.target in (operator.matmul, torch.matmul, torch.bmm)
        for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
    )


@pytest.mark.parametrize("compiled", [False, True])
def test_a_chunk_read_at_the_keys_reuses_their_forward(monkeypatch, compiled):
    """A level with ``let query = key`` reads through the inner loss's own forward (no second
    ``memories.forward``; compiled, fewer products in the traced graph, through torch's scan),
    with the values and gradients of a separate read."""
    import nlc.runtime.chunk as chunk_mod

    calls, products = [], []
    if not compiled:
        real_forward = chunk_mod.forward
        monkeypatch.setattr(chunk_mod, "forward", lambda *a: calls.append(1) or real_forward(*a))
    T = 20  # two full chunks of 8 and a partial one
    torch.manual_seed(0)
    level = _cms_level()().double()
    level.persist = True  # every chunk updates (no read-only last chunk): its reads are all shared
    x = torch.randn(2, T, 32, dtype=torch.float64, requires_grad=True)

    def counting(gm, example_inputs):
        products.append(_matmuls(gm))
        return gm

    def run():
        torch._dynamo.reset()
        level.carry = None  # each run from the learned initial state
        f = torch.compile(level, fullgraph=True, backend=counting) if compiled else level
        y = f(x)
        gx, *gp = torch.autograd.grad((y * torch.cos(y)).sum(), [x, *level.parameters()])
        return y, gx, gp

    y, gx, gp = run()
    assert calls == []
    # the same level with the query as its own tensor: a separate read at W_0
    real_step = chunk_mod.chunk_step

    def separate_query(spec, objective, rule, w, s, k, target, q, *rest, **kw):
        return real_step(spec, objective, rule, w, s, k, target, q.clone() if q is k else q, *rest, **kw)

    monkeypatch.setattr(chunk_mod, "chunk_step", separate_query)
    y2, gx2, gp2 = run()
    if compiled:
        assert len(products) == 2 and 0 < products[0] < products[1], products
    else:
        assert calls  # the separate read ran
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx2, rtol=1e-10, atol=1e-12)
    for a, b in zip(gp, gp2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
