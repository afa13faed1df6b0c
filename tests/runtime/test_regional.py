"""Regional compilation (nlc.runtime.regional): compiled chunk steps and blocks equal eager.

The default suite uses the ``aot_eager`` backend (AOTAutograd traces, no kernels); the GPU suite
repeats it with inductor on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import nlc
from nlc.runtime.distributed import resolve_scope
from nlc.runtime.regional import compile_regions, has_in_context

from ..codegen.helpers import shrink
from ..conftest import ROOT

EXAMPLES = ["hope", "titans_lmm", "cms_nested", "self_modifying_titans", "transformer_pp"]


def _model(name: str, layers: int = 2):
    text = shrink((ROOT / "examples" / f"{name}.nl").read_text(), d=16, heads=2, layers=layers)
    torch.manual_seed(0)
    return nlc.load(text)().double()


def _loss_and_grads(model, idx):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, idx)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", EXAMPLES)
def test_regional_equals_eager(name):
    model = _model(name)
    idx = torch.randint(0, 256, (2, 75))  # 75: a partial last chunk for periods 16 and 64
    loss, grads = _loss_and_grads(model, idx)
    torch._dynamo.reset()
    done = compile_regions(model, backend="aot_eager")
    assert done
    loss2, grads2 = _loss_and_grads(model, idx)
    torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-12)
    for n, g in grads.items():
        torch.testing.assert_close(grads2[n], g, rtol=1e-9, atol=1e-12, msg=n)
    # a parameter eager leaves without a gradient gets a zero one at most (a level whose single
    # chunk's update is never read: the compiled step returns zeros for it)
    for n in set(grads2) - set(grads):
        assert not grads2[n].any(), n


def test_what_is_compiled():
    model = _model("hope")
    assert has_in_context(model)
    done = compile_regions(model, backend="aot_eager")
    assert "layer.0.titans.chunk" in done and "layer.1.mid.chunk" in done
    assert "layer.0.slow" in done and "norm" in done  # blocks without in-context levels: whole
    assert not any(d.startswith("layer.0.titans.") and not d.endswith("chunk") for d in done)
    # levels with a whole-sequence step also get a whole-forward region (used where the step runs)
    assert "layer.0.fast.forward" in done and "layer.0.titans.forward" not in done
    assert compile_regions(model, backend="aot_eager") == []  # twice: nothing more
    tpp = _model("transformer_pp")
    assert not has_in_context(tpp)
    assert compile_regions(tpp, backend="aot_eager") == ["Model"]  # one region: the whole model


def _graphs_after_two_steps(layers: int) -> tuple[int, int]:
    model = _model("titans_lmm", layers=layers)
    torch._dynamo.reset()
    counters.clear()
    compile_regions(model, backend="aot_eager")
    first = None
    for i in range(2):
        _loss_and_grads(model, torch.randint(0, 256, (2, 64)))
        if i == 0:
            first = counters["stats"]["unique_graphs"]
    return first, counters["stats"]["unique_graphs"]


def test_layers_share_compiled_code_and_new_data_does_not_recompile():
    one_first, one_second = _graphs_after_two_steps(1)
    three_first, three_second = _graphs_after_two_steps(3)
    assert one_second == one_first and three_second == three_first  # new data: no recompile
    assert three_first == one_first  # three layers of one class compile what one layer does


def test_resolve_scope():
    assert resolve_scope(_model("hope"), "auto") == "regional"
    assert resolve_scope(_model("transformer_pp"), "auto") == "full"
    assert resolve_scope(_model("hope"), "full") == "full"
    with pytest.raises(ValueError, match="unknown compile scope"):
        resolve_scope(_model("hope"), "most")


def test_torch_layers_are_left_alone():
    """`norm layer` makes nn.LayerNorm modules: compiled alone they hold no frame to compile
    (fullgraph raises), so regional compilation leaves them to run as they are."""
    text = (ROOT / "examples" / "hope.nl").read_text().replace("norm rms", "norm layer")
    torch.manual_seed(0)
    model = nlc.load(shrink(text, d=16, heads=2, layers=1))().double()
    assert any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    idx = torch.randint(0, 256, (2, 40))
    loss, grads = _loss_and_grads(model, idx)
    torch._dynamo.reset()
    done = compile_regions(model, backend="aot_eager")
    assert not any(d.endswith("_norm") for d in done)
    loss2, grads2 = _loss_and_grads(model, idx)
    torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-12)


def test_many_shapes_do_not_exhaust_the_recompile_limit():
    """Each batch size, sequence length and grad mode compiles the chunk step once more: more
    than dynamo's default limit of 8, which would make a fullgraph compile raise."""
    model = _model("titans_lmm", layers=1)
    torch._dynamo.reset()
    compile_regions(model, backend="aot_eager")
    for B in (1, 2, 3, 4, 5):
        for T in (32, 40):
            _loss_and_grads(model, torch.randint(0, 256, (B, T)))
            with torch.no_grad():
                model(torch.randint(0, 256, (B, T)))


def test_whole_forward_region_only_where_the_sequence_step_runs(monkeypatch):
    """A level with a whole-sequence step gets a forward region. Its first call per signature is
    eager; where a chunk loop ran (here: no fused kernels on the CPU) later calls stay eager with
    the compiled chunk step. A compile that fails leaves the level eager, with a warning."""
    from torch._dynamo.exc import Unsupported

    model = _model("titans_lmm", layers=1)
    idx = torch.randint(0, 256, (2, 40))
    loss, grads = _loss_and_grads(model, idx)
    torch._dynamo.reset()
    compile_regions(model, backend="aot_eager")
    level = model.layer[0].memory
    region = level._nlc_region
    for _ in range(2):
        loss2, grads2 = _loss_and_grads(model, idx)
        torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-12)
        for n, g in grads.items():
            torch.testing.assert_close(grads2[n], g, rtol=1e-9, atol=1e-12, msg=n)
    assert list(region.whole.values()) == [False]  # the chunks ran one by one: not compiled whole

    def broken(x):
        raise Unsupported("stand-in for a failed trace")

    region.whole = {k: True for k in region.whole}  # as if the sequence step had run
    monkeypatch.setattr(region, "compiled", broken)
    with pytest.warns(UserWarning, match="compiling its forward whole failed"):
        loss3, _ = _loss_and_grads(model, idx)
    torch.testing.assert_close(loss3, loss, rtol=1e-12, atol=1e-12)
    assert region.failed and "stand-in" in region.failed


def test_whole_forward_region_of_the_delta_rule_equals_eager(monkeypatch):
    """The delta rule's chunks all run at once (``linear_chunks``, here turned on for the CPU): from
    the second call its level's forward runs compiled whole, with the eager values and gradients
    (T = 75: two chunks of 32 and a partial one)."""
    monkeypatch.setenv("NLC_LINEAR_CHUNKS", "1")
    text = shrink((ROOT / "examples" / "delta_rule.nl").read_text(), d=16, heads=2, layers=2)
    text = text.replace("every 64 tokens", "every 32 tokens")
    torch.manual_seed(0)
    model = nlc.load(text)().double()
    idx = torch.randint(0, 256, (2, 75))
    loss, grads = _loss_and_grads(model, idx)
    torch._dynamo.reset()
    counters.clear()
    done = compile_regions(model, backend="aot_eager")
    assert "layer.0.delta.forward" in done
    regions = [m._nlc_region for m in model.modules() if "_nlc_region" in m.__dict__]
    assert len(regions) == 2
    calls = []

    def counting(f):
        def run(x):
            calls.append(1)
            return f(x)

        return run

    for r in regions:
        r.compiled = counting(r.compiled)
    for _ in range(3):
        loss2, grads2 = _loss_and_grads(model, idx)
        torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-12)
        for n, g in grads.items():
            torch.testing.assert_close(grads2[n], g, rtol=1e-9, atol=1e-12, msg=n)
    assert all(list(r.whole.values()) == [True] and not r.failed for r in regions)
    assert len(calls) == 4  # calls 2 and 3 of both layers ran the compiled forward
