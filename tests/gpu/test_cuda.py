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
