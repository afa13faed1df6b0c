"""Generated code on CUDA equals the float64 reference (skipped without a GPU).

Every in-context example level runs on the GPU in float64 (exact path) and in float32 with
TF32 off, against the literal per-token reference on the CPU in float64; the compiled model
(inductor) matches eager execution on the GPU.
"""

from __future__ import annotations

import pytest
import torch

import nlc
from nlc import ir
from nlc.reference_level import level_forward

from ..codegen.helpers import in_context_examples, level_classes, shrink

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("path", in_context_examples(), ids=lambda p: p.stem)
def test_levels_on_cuda_match_the_reference(path, dtype, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    program, classes, _ = level_classes(shrink(path.read_text(), d=32, heads=2))
    for lv in program.levels:
        if lv.kind is not ir.LevelKind.IN_CONTEXT or lv.init.mode == "from":
            continue
        torch.manual_seed(0)
        m = classes[lv.name]().double()
        x = torch.randn(2, 37, int(program.d_model), dtype=torch.float64)
        ref = level_forward(lv, m, x).detach()
        gm = m.to("cuda", dtype)
        y = gm(x.to("cuda", dtype)).double().cpu()
        err = (y - ref).abs().max().item() / (ref.abs().max().item() + 1e-12)
        assert err < tol, (lv.name, err)


@pytest.mark.parametrize("name", ["titans_lmm", "hope", "transformer_pp"])
def test_compiled_model_matches_eager_on_cuda(name):
    from ..conftest import ROOT

    text = shrink((ROOT / "examples" / f"{name}.nl").read_text(), d=64, heads=2, layers=2)
    Model = nlc.load(text)
    torch.manual_seed(0)
    model = Model().cuda()
    idx = torch.randint(0, 256, (2, 128), device="cuda")
    _, eager = model(idx, idx)
    torch._dynamo.reset()
    _, compiled = torch.compile(model, fullgraph=True)(idx, idx)
    torch.testing.assert_close(compiled, eager, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", ["titans_lmm", "hope", "cms_nested", "delta_rule"])
def test_regional_compile_matches_eager_on_cuda(name):
    """Inductor regions (compiled chunk steps and blocks) on CUDA: loss and gradients as eager, on
    the first call and on the next two, where a level whose sequence runs at once (Titans' fused
    op, the delta rule's linear form) runs its forward compiled whole."""
    from nlc.runtime.regional import compile_regions

    from ..conftest import ROOT

    text = shrink((ROOT / "examples" / f"{name}.nl").read_text(), d=64, heads=2, layers=2)
    Model = nlc.load(text)
    torch.manual_seed(0)
    model = Model().cuda()
    idx = torch.randint(0, 256, (2, 200), device="cuda")  # 200: a partial last chunk for every period
    _, eager = model(idx, idx)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compile_regions(model)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        _, regional = model(idx, idx)
        regional.backward()
        torch.testing.assert_close(regional, eager, rtol=2e-3, atol=2e-3)
        for n, g in grads.items():
            torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=5e-3, atol=5e-4, msg=n)
    if name in ("titans_lmm", "delta_rule"):
        regions = [m._nlc_region for m in model.modules() if "_nlc_region" in m.__dict__]
        assert regions and all(list(r.whole.values()) == [True] and not r.failed for r in regions)


def test_level_in_cuda_graphs_matches_eager():
    """A regionally compiled level captured by torch.cuda.make_graphed_callables replays the
    eager values and input gradients."""
    from nlc.runtime.regional import compile_regions

    from ..conftest import ROOT

    program, classes, _ = level_classes(shrink((ROOT / "examples" / "titans_lmm.nl").read_text(), d=64, heads=2))
    torch.manual_seed(0)
    m = classes["memory"]().cuda()
    x = torch.randn(2, 80, int(program.d_model), device="cuda", requires_grad=True)
    ref = m(x)
    (gx_ref,) = torch.autograd.grad(ref.square().mean(), x)
    ref = ref.detach()  # free the eager graph: its nodes would tie the capture to the default stream
    torch._dynamo.reset()
    compile_regions(m)
    sample = x.detach().clone().requires_grad_(True)  # a leaf no earlier graph used
    graphed = torch.cuda.make_graphed_callables(m, (sample,), num_warmup_iters=3)
    x2 = x.detach().clone().requires_grad_(True)
    y = graphed(x2)
    y.square().mean().backward()
    torch.testing.assert_close(y, ref, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(x2.grad, gx_ref, rtol=2e-3, atol=2e-6)


@pytest.mark.parametrize("how", ["levels", "whole"])
@pytest.mark.parametrize("name", ["titans_lmm", "hope", "cms_nested", "self_modifying_titans", "delta_rule"])
def test_training_with_cuda_graphs_matches_uncaptured(name, how):
    """nlc.runtime.graphs in training (each level captured, or the whole training call): 3
    optimizer steps, each after two accumulated backward passes, give the losses and weights of
    the same model run without graphs."""
    from nlc.runtime.graphs import graph_levels, graph_model, graph_report
    from nlc.runtime.regional import compile_regions

    from ..conftest import ROOT

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    Model = nlc.load(shrink((ROOT / "examples" / f"{name}.nl").read_text(), d=64, heads=2, layers=2))

    def train(graphs: bool):
        torch.manual_seed(0)
        model = Model().cuda()
        torch._dynamo.reset()
        compile_regions(model)
        if graphs:
            assert graph_levels(model) if how == "levels" else graph_model(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator(device="cuda").manual_seed(1)
        losses = []
        for _ in range(3):
            for _ in range(2):
                idx = torch.randint(0, 256, (2, 96), device="cuda", generator=gen)
                _, loss = model(idx, idx)
                loss.backward()
                losses.append(loss.item())
            opt.step()
            opt.zero_grad(set_to_none=True)
        return torch.tensor(losses), model

    ref_losses, ref = train(False)
    losses, model = train(True)
    if how == "levels":
        report = graph_report(model)
        assert report and all(r["failed"] is None for r in report), report
        if name != "cms_nested":  # its nested group runs uncaptured (it passes chunk states)
            assert all(r["replays"] >= 5 for r in report), report
    else:
        whole = model.__dict__["forward"]
        assert whole.failed is None and len(whole.graphs) == 1 and whole.replays == 6, vars(whole)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("read", ["causal", "chunk"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_linear_chunks_on_cuda_match_the_reference(dtype, tol, read):
    """The delta rule with every chunk at once (`nlc.runtime.linear_chunks`, the default on CUDA)
    against the per-token reference on the CPU in float64: outputs and every input gradient."""
    from nlc.reference import memory_scan
    from nlc.runtime import linear_chunks
    from nlc.runtime.chunk import RuleSpec, scan
    from nlc.runtime.memories import MemorySpec

    torch.backends.cuda.matmul.allow_tf32 = False
    spec, rule = MemorySpec("linear", 32, 32), RuleSpec("dgd")
    B, H, T, C = 2, 2, 3 * 16 + 5, 16
    assert linear_chunks.applies(spec, "dot", rule, read, T // C, torch.device("cuda"))
    g = torch.Generator().manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(B, H, T, 32, generator=g, dtype=torch.float64), dim=-1)
            for _ in range(2))  # fmt: skip
    v = torch.randn(B, H, T, 32, generator=g, dtype=torch.float64)
    eta = torch.rand(B, H, T, generator=g, dtype=torch.float64)
    alpha = torch.sigmoid(3 + torch.randn(B, H, T, generator=g, dtype=torch.float64))
    W0 = 0.1 * torch.randn(B, H, 32, 32, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (W0, k, v, q, eta, alpha)]
    y, W, _ = memory_scan(spec, "dot", rule, [leaves[0]], None, *leaves[1:4], leaves[4], leaves[5], None,
                          chunk=C, read=read)  # fmt: skip
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad((y * w).sum() + W[0].sum(), leaves)
    dev = [t.detach().to("cuda", dtype).requires_grad_() for t in (W0, k, v, q, eta, alpha)]
    yd, Wd, _ = scan(spec, "dot", rule, [dev[0]], None, *dev[1:4], dev[4], dev[5], None, chunk=C, read=read)
    got = torch.autograd.grad((yd * w.to("cuda", dtype)).sum() + Wd[0].sum(), dev)
    for a, b in zip([yd, Wd[0], *got], [y, W[0], *ref]):
        err = (a.double().cpu() - b.detach()).abs().max().item() / (b.abs().max().item() + 1e-12)
        assert err < tol, err


@pytest.mark.parametrize("scope", ["model", "levels"])
def test_nlc_train_on_cuda_with_each_graph_scope(tmp_path, run_cli, scope):
    """`nlc train` on CUDA with regional compile and CUDA graphs of either scope: the run says
    which it captured, trains (a finite, falling loss) and writes its checkpoint."""
    import json

    from ..codegen.helpers import shrink
    from ..conftest import ROOT

    spec = tmp_path / "titans_tiny.nl"
    spec.write_text(shrink((ROOT / "examples" / "titans_lmm.nl").read_text(), d=64, heads=2, layers=2))
    out = tmp_path / "run"
    code, _, err = run_cli("train", spec, "--device", "cuda", "--steps", "30", "--batch-size", "4",
                           "--seq-len", "64", "--lr", "3e-3", "--out", out, "--no-progress", "--eval-every", "0",
                           "--eval-batches", "2", "--log-every", "1", "--graph-scope", scope)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["compile"] == "regional" and config["cuda_graphs"] == scope
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) >= 25 and all(x == x for x in losses), losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert (out / "ckpt.pt").exists()
