"""nlc.runtime.graphs off CUDA and its switch: the wrapped level runs its own forward.

Capture and replay themselves need a GPU: tests/gpu/test_cuda.py trains with and without graphs.
"""

from __future__ import annotations

import pytest
import torch

import nlc
from nlc.runtime.distributed import DistributedError, use_graphs
from nlc.runtime.graphs import GraphedLevel, GraphedModel, graph_levels, graph_model, graph_report

from ..codegen.helpers import shrink
from ..conftest import ROOT


def _model(name: str):
    torch.manual_seed(0)
    return nlc.load(shrink((ROOT / "examples" / f"{name}.nl").read_text(), d=16, heads=2, layers=2))().double()


def test_wrapped_levels_run_their_own_forward_on_the_cpu():
    model = _model("cms_nested")
    idx = torch.randint(0, 256, (2, 40))
    _, ref = model(idx, idx)
    ref.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert sorted(graph_levels(model)) == ["inner", "inner", "outer", "outer"]
    assert graph_levels(model) == []  # twice: nothing more
    assert all(isinstance(m.__dict__["forward"], GraphedLevel) for m in model.level_modules("outer"))
    _, loss = model(idx, idx)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    for n, g in grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=0, atol=0, msg=n)
    assert all(r["graphs"] == 0 and r["replays"] == 0 and r["failed"] is None for r in graph_report(model))


def test_whole_model_wrapper_runs_the_model_on_the_cpu():
    model = _model("titans_lmm")
    idx = torch.randint(0, 256, (2, 40))
    ref_logits, ref = model(idx, idx)
    assert graph_model(model) is True
    assert graph_model(model) is False  # twice: nothing more
    assert isinstance(model.__dict__["forward"], GraphedModel)
    logits, loss = model(idx, idx)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.__dict__["forward"].replays == 0 and not model.__dict__["forward"].graphs
    with pytest.raises(ValueError, match="one by one"):
        graph_model(_levels_graphed())


def _levels_graphed():
    m = _model("titans_lmm")
    graph_levels(m)
    return m


def test_when_graphs_are_used():
    hope, tpp = _model("hope"), _model("transformer_pp")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_graphs(None, hope, cuda, "regional", "none") is True
    assert use_graphs(None, hope, cuda, "regional", "ddp") is False  # DDP: only when asked for
    assert use_graphs(True, hope, cuda, "regional", "ddp") is True
    assert use_graphs(None, hope, cuda, "regional", "fsdp") is False
    assert use_graphs(None, hope, cuda, "full", "none") is False
    assert use_graphs(None, hope, cpu, "regional", "none") is False
    assert use_graphs(None, tpp, cuda, "full", "none") is False
    assert use_graphs(False, hope, cuda, "regional", "none") is False
    for flag_model, device, scope, parallel, needle in [
        (hope, cpu, "regional", "none", "needs a CUDA device"),
        (hope, cuda, "regional", "fsdp", "fsdp"),
        (tpp, cuda, "full", "none", "no in-context level"),
        (hope, cuda, "full", "none", "whole-model compile"),
    ]:
        with pytest.raises(DistributedError, match=needle):
            use_graphs(True, flag_model, device, scope, parallel)
