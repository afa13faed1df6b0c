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


def _compile_twice(path, backend: str):
    text = shrink(path.read_text(), d=16, heads=2, layers=1)
    Model = nlc.load(text)
    torch.manual_seed(0)
    model = Model()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # the second step has new data and must reuse the graph
            idx = torch.randint(0, 256, (2, 32))
            _, loss = compiled(idx, idx)
            loss.backward()
            assert torch.isfinite(loss)
            for p in model.parameters():
                if p.requires_grad and p.grad is not None:
                    assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_compiles_fullgraph_without_recompiling(path):
    _compile_twice(path, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_compiles_with_inductor(path):
    _compile_twice(path, "inductor")
