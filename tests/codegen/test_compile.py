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
