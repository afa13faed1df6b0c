"""Every example's forward+backward compiles with torch.compile(fullgraph=True): no graph break,
and no recompilation on a second step with new data.

The default suite uses the cheap ``aot_eager`` backend (it traces forward and backward through
AOTAutograd without generating kernels); ``-m slow`` repeats it with inductor.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import nlc

from ..conftest import EXAMPLES
from .helpers import shrink


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def _compile_twice(path, backend: str):
    text = shrink(path.read_text(), d=16, heads=2, layers=1)
    Model = nlc.load(text)
    torch.manual_seed(0)
    model = Model()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # the second step has new data and must reuse the graph
            idx = torch.randint(0, 256, (2, 48))
            model.zero_grad()
            _, loss = compiled(idx, idx)
            loss.backward()
            compiled_grads = _grads(model)
            # the compiled graph (chunk runs through `scan`) equals eager execution (a Python loop)
            model.zero_grad()
            _, eager_loss = model(idx, idx)
            eager_loss.backward()
            torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
            for a, b in zip(compiled_grads, _grads(model)):
                if a is not None or b is not None:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            assert torch.isfinite(loss)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_compiles_fullgraph_without_recompiling(path):
    _compile_twice(path, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_compiles_with_inductor(path):
    _compile_twice(path, "inductor")


def test_inductor_compiles_a_per_head_memory_level():
    """Inductor (not only aot_eager) lowers the scan over chunks, forward and backward, for a level
    whose flows come out of per-head projections in a permuted layout (a regression once)."""
    text = shrink((EXAMPLES[0].parent / "titans_lmm.nl").read_text(), d=64, heads=2)
    Model = nlc.load(text)
    module = __import__("sys").modules[Model.__module__]
    torch.manual_seed(0)
    level = module.MemoryLevel()
    x = torch.randn(2, 64, 64, requires_grad=True)
    torch._dynamo.reset()
    y = torch.compile(level, fullgraph=True)(x)
    y.square().sum().backward()
    g = x.grad.clone()
    x.grad = None
    ye = level(x)
    ye.square().sum().backward()
    torch.testing.assert_close(y, ye, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g, x.grad, rtol=1e-3, atol=1e-4)
