"""The fused depth-2 MLP chunk step (``nlc.runtime.fused``) equals ``chunk_step``'s float64 path.

Outputs and the gradients of every input (keys, targets, queries, weights, momentum, and the
gates through the coefficients) are compared with autograd through the unfused closed form in
float64, itself checked against the per-token reference in ``test_chunk.py``. On CUDA the
kernels run compiled (TF32 off); on the CPU they run through Triton's interpreter, which needs
``TRITON_INTERPRET=1`` before Triton is imported::

    TRITON_INTERPRET=1 python -m pytest tests/runtime/test_fused.py

Without Triton (the CPU wheel of torch) every case skips.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from nlc.diagnostics import SettingError
from nlc.runtime import fused
from nlc.runtime.chunk import RuleSpec, chunk_step
from nlc.runtime.memories import MemorySpec

needs_triton = pytest.mark.skipif(not fused.available(), reason="needs Triton")


def _devices():
    out = []
    if torch.cuda.is_available():
        out.append("cuda")
    if fused.available() and type(fused.mlp2._read_kernel).__name__ == "InterpretedFunction":
        out.append("cpu")
    return out or ["none"]


def _inputs(spec, B, H, C, mom, decay, gen):
    D = spec.din

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    k = torch.nn.functional.normalize(r(B, H, C, D), dim=-1)
    v = r(B, H, C, D)
    q = torch.nn.functional.normalize(r(B, H, C, D), dim=-1)
    w = [r(H, o, i, scale=i**-0.5) for o, i in spec.weight_shapes()]  # learned init: [H, ...]
    s = [r(B, H, o, i, scale=0.01) for o, i in spec.weight_shapes()] if mom else None
    eta = torch.rand(B, H, C, generator=gen, dtype=torch.float64) * 0.5
    alpha = 0.9 + 0.1 * torch.rand(B, H, C, generator=gen, dtype=torch.float64) if decay else None
    beta = torch.rand(B, H, C, generator=gen, dtype=torch.float64) if mom else None
    return k, v, q, w, s, eta, alpha, beta


def _run(spec, rule, tensors, dtype, device, step=None):
    """Outputs and gradients (float64, CPU) of ``step(spec, rule, w, s, k, v, q, eta, alpha,
    beta) -> (y, weights, momentum)`` (default one ``chunk_step``) under a random probe."""
    k, v, q, w, s, eta, alpha, beta = tensors
    leaves = [k, v, q, *w, *(s or []), eta, alpha, beta]
    leaves = [
        None if t is None else t.detach().to(device, dtype).requires_grad_() for t in leaves
    ]
    n = len(w)
    k, v, q = leaves[:3]
    w = leaves[3 : 3 + n]
    s = leaves[3 + n : 3 + 2 * n] if s is not None else None
    eta, alpha, beta = leaves[-3:]
    if step is None:
        y, w_end, s_end = chunk_step(spec, "l2", rule, w, s, k, v, q, eta, alpha, beta)
    else:
        y, w_end, s_end = step(spec, rule, w, s, k, v, q, eta, alpha, beta)
    outs = [y, *w_end, *(s_end or [])]
    gen = torch.Generator().manual_seed(7)
    probe = sum(
        (o.double().cpu() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
        for o in outs
    )
    probe.backward()
    grads = [None if t is None else t.grad.double().cpu() for t in leaves]
    return [o.detach().double().cpu() for o in outs], grads


def _close(a, b, tol):
    scale = b.abs().max().item() + 1e-12
    return (a - b).abs().max().item() / scale < tol


def _assert_matches(outs, grads, ref_outs, ref_grads):
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        assert _close(a, b, 1e-5), ("output", i)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        if b is None:
            assert a is None
            continue
        assert _close(a, b, 1e-4), ("grad", i, (a - b).abs().max().item(), b.abs().max().item())


@needs_triton
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize(
    "kind,act,rule_kind,decay,C,hidden",
    [
        ("residual_mlp", "gelu", "momentum", True, 16, 128),
        ("residual_mlp", "gelu", "momentum", True, 7, 64),
        ("mlp", "silu", "gd", True, 16, 48),
        ("mlp", "gelu", "gd", False, 33, 64),
        ("residual_mlp", "silu", "momentum", False, 64, 32),
    ],
)
def test_fused_chunk_matches_float64(monkeypatch, device, kind, act, rule_kind, decay, C, hidden):
    if device == "none":
        pytest.skip("no CUDA device and Triton is not in interpreter mode")
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    else:
        monkeypatch.setenv("NLC_FUSED", "interpret")
    spec = MemorySpec(kind, 32, 32, hidden=hidden, depth=2, act=act)
    rule = RuleSpec(rule_kind)
    gen = torch.Generator().manual_seed(0)
    tensors = _inputs(spec, 2, 3, C, rule.uses_momentum, decay, gen)
    probe = torch.zeros(1, 1, C, 32, device=device)
    assert fused.applies(spec, "l2", rule, "chunk", probe, probe, torch.float32)
    outs, grads = _run(spec, rule, tensors, torch.float32, device)
    with monkeypatch.context() as m:
        m.setenv("NLC_FUSED", "0")
        ref_outs, ref_grads = _run(spec, rule, tensors, torch.float64, "cpu")
    _assert_matches(outs, grads, ref_outs, ref_grads)


def test_fused_path_declines_what_it_does_not_cover(monkeypatch):
    monkeypatch.setenv("NLC_FUSED", "interpret")
    x = torch.zeros(1, 1, 16, 32)
    mlp = MemorySpec("mlp", 32, 32, hidden=64, depth=2, act="gelu")
    gd = RuleSpec("gd")
    if not fused.available():
        assert not fused.applies(mlp, "l2", gd, "chunk", x, x, torch.float32)
        return
    assert fused.applies(mlp, "l2", gd, "chunk", x, x, torch.float32)
    assert not fused.applies(mlp, "l2", gd, "chunk", x, x, torch.float64)
    assert not fused.applies(mlp, "l2", gd, "causal", x, x, torch.float32)
    assert not fused.applies(mlp, "dot", gd, "chunk", x, x, torch.float32)
    assert not fused.applies(mlp, "l2", RuleSpec("dgd"), "chunk", x, x, torch.float32)
    assert not fused.applies(mlp, "l2", gd, "chunk", None, x, torch.float32)
    deep = MemorySpec("mlp", 32, 32, hidden=64, depth=3, act="gelu")
    assert not fused.applies(deep, "l2", gd, "chunk", x, x, torch.float32)
    relu = MemorySpec("mlp", 32, 32, hidden=64, depth=2, act="relu")
    assert not fused.applies(relu, "l2", gd, "chunk", x, x, torch.float32)
    long = torch.zeros(1, 1, 65, 32)
    assert not fused.applies(mlp, "l2", gd, "chunk", long, long, torch.float32)
    w_big = [torch.zeros(3, 1, 64, 32), torch.zeros(3, 1, 32, 64)]  # more batch than the keys
    assert not fused.applies(mlp, "l2", gd, "chunk", x, x, torch.float32, w_big)
    w_ok = [torch.zeros(1, 64, 32), torch.zeros(1, 32, 64)]
    assert fused.applies(mlp, "l2", gd, "chunk", x, x, torch.float32, w_ok)
    wide = MemorySpec("mlp", 128, 128, hidden=256, depth=2, act="gelu")
    x128 = torch.zeros(1, 1, 16, 128)
    assert not fused.applies(wide, "l2", gd, "chunk", x128, x128, torch.float32)
    monkeypatch.setenv("NLC_FUSED", "0")
    assert not fused.applies(mlp, "l2", gd, "chunk", x, x, torch.float32)
    monkeypatch.setenv("NLC_FUSED", "1")
    assert not fused.applies(mlp, "l2", gd, "chunk", x, x, torch.float32)  # CPU tensors


@needs_triton
@pytest.mark.parametrize("device", _devices())
def test_titans_level_fused_and_compiled_equals_unfused(monkeypatch, device):
    """The generated Titans level, regional compile and fused kernels (the whole-sequence op for
    2 chunks, the chunk op for a partial one), against the same level eager and unfused (outputs
    and every gradient)."""
    from pathlib import Path

    from nlc.runtime.regional import compile_regions

    from ..codegen.helpers import level_classes

    if device == "none":
        pytest.skip("no CUDA device and Triton is not in interpreter mode")
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    root = Path(__file__).resolve().parents[2]
    src = (root / "benchmarks" / "specs" / "titans_memory.nl").read_text()
    src = src.replace("d = 512", "d = 64").replace("heads = 8", "heads = 2")
    _, classes, _ = level_classes(src.replace("chunk = 64", "chunk = 16"))
    torch.manual_seed(0)
    m = classes["memory"]().to(device)
    x = torch.randn(2, 40, 64, device=device, requires_grad=True)
    w = torch.linspace(-1, 1, 2 * 40 * 64, device=device).view(2, 40, 64)

    def run(mode):
        monkeypatch.setenv("NLC_FUSED", mode)
        x.grad = None
        m.zero_grad()
        (m(x) * w).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]

    ref = run("0")
    calls = []
    real = fused.run_sequence
    monkeypatch.setattr(fused, "run_sequence", lambda *a: calls.append(1) or real(*a))
    torch._dynamo.reset()
    counters.clear()
    assert "forward" in " ".join(compile_regions(m))
    mode = "interpret" if device == "cpu" else "1"
    # the first call runs eagerly and finds every chunk in the whole-sequence op
    for i, (a, b) in enumerate(zip(run(mode), ref)):
        assert _close(a, b, 1e-4), (i, (a - b).abs().max().item())
    assert calls, "the level did not take the whole-sequence op"
    assert list(m._nlc_region.whole.values()) == [True]
    monkeypatch.setattr(fused, "run_sequence", real)
    # later calls run the forward compiled whole, the op inside it, traced once
    for call in range(2):
        with torch.profiler.profile() as prof:
            got = run(mode)
        assert any("mlp2_sequence" in e.name for e in prof.events()), call
        for i, (a, b) in enumerate(zip(got, ref)):
            assert _close(a, b, 1e-4), (call, i, (a - b).abs().max().item())
    assert counters["stats"]["unique_graphs"] == 1 and not m._nlc_region.failed


@pytest.mark.skipif(
    not (fused.available() and torch.cuda.is_available()), reason="needs Triton and CUDA"
)
@pytest.mark.parametrize("C,blocks", [(16, None), (64, None), (64, 32)])
def test_fused_under_bf16_autocast_tracks_the_unfused_path(monkeypatch, C, blocks):
    """Under bf16 autocast both paths multiply bf16 operands (float32 state; on 64-token blocks
    the fused kernels use bf16 with hidden blocks of 64, the default there, and TF32 with
    smaller ones, ``blocks=32``): they agree to bf16 rounding."""
    if blocks is not None:
        for name in ("write", "backward"):
            monkeypatch.setitem(fused.mlp2.BLOCKS_BF16_64, name, blocks)
    spec = MemorySpec("residual_mlp", 64, 64, hidden=256, depth=2, act="gelu")
    rule = RuleSpec("momentum")
    gen = torch.Generator().manual_seed(0)
    tensors = _inputs(spec, 2, 4, C, True, True, gen)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert fused.precision("cuda") == "bf16"
        outs, grads = _run(spec, rule, tensors, torch.float32, "cuda")
        monkeypatch.setenv("NLC_FUSED", "0")
        ref_outs, ref_grads = _run(spec, rule, tensors, torch.float32, "cuda")
    for i, (a, b) in enumerate(zip(outs + grads, ref_outs + ref_grads)):
        if b is not None:
            assert _close(a, b, 3e-2), i


@needs_triton
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("momentum", [True, False])
def test_ops_pass_opcheck_with_strided_inputs(monkeypatch, device, momentum):
    """``torch.library.opcheck`` (schema, fake tensors, autograd registration) on inputs that are
    transposed views, as compiled callers hand them over: the fake outputs' strides must be the
    real ones."""
    if device == "none":
        pytest.skip("no CUDA device and Triton is not in interpreter mode")
    N, C, D, HD = 3, 16, 32, 64
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.2).to(device)

    k, v, q = (r(N, D, C).mT for _ in range(3))  # [N, C, D], not contiguous
    w1, w2 = r(N, D, HD).mT, r(N, HD, D).mT
    s1, s2 = r(N, HD, D), r(N, D, HD)
    cw, cs, gam, dd, bb = r(N, C).abs(), r(N, C).abs(), r(N), r(N), r(N)
    if not momentum:
        s1 = s2 = cs = dd = bb = k.new_empty(0)
    args = (k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb, "silu", False, momentum, "ieee")
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.numel() else a for a in args)
    torch.library.opcheck(fused.mlp2_chunk, args)


@needs_triton
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("name", ["titans_lmm", "cms_nested"])
def test_example_model_regional_fused_equals_eager_unfused(monkeypatch, device, name):
    """A whole example model (fused levels inside) under regional compile: loss and gradients
    as the eager, unfused model (T=200: a partial last chunk)."""
    import nlc
    from nlc.runtime.regional import compile_regions

    from ..codegen.helpers import shrink
    from ..conftest import ROOT

    if device == "none":
        pytest.skip("no CUDA device and Triton is not in interpreter mode")
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    text = shrink((ROOT / "examples" / f"{name}.nl").read_text(), d=64, heads=2, layers=2)
    torch.manual_seed(0)
    model = nlc.load(text)().to(device)
    idx = torch.randint(0, 256, (2, 200), device=device)
    monkeypatch.setenv("NLC_FUSED", "0")
    _, ref = model(idx, idx)
    ref.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    monkeypatch.setenv("NLC_FUSED", "interpret" if device == "cpu" else "1")
    torch._dynamo.reset()
    compile_regions(model)
    for _ in range(2):  # the first call eager (with compiled chunk steps), the second compiled
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, idx)
        loss.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        for n, g in grads.items():
            torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-3, atol=1e-5, msg=n)


@needs_triton
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("C,momentum", [(16, True), (7, True), (16, False), (33, True), (64, True)])
def test_coefficients_match_the_closed_form_with_zero_gates(monkeypatch, device, C, momentum):
    """``chunk_coefficients`` (float32) against ``chunk._Coeffs`` in float64, values and the
    gradients of every gate, with some gates exactly zero (products, never divisions)."""
    from nlc.runtime.chunk import _Coeffs

    if device == "none":
        pytest.skip("no CUDA device and Triton is not in interpreter mode")
    gen = torch.Generator().manual_seed(C)
    N = 5
    eta = torch.rand(N, C, generator=gen, dtype=torch.float64)
    alpha = 0.5 + 0.5 * torch.rand(N, C, generator=gen, dtype=torch.float64)
    beta = torch.rand(N, C, generator=gen, dtype=torch.float64)
    alpha[0, min(3, C - 1)] = 0.0
    alpha[3, 0] = 0.0
    beta[1, min(2, C - 1)] = 0.0
    beta[2, C - 1] = 0.0
    ref_leaves = [t.clone().requires_grad_() for t in (eta, alpha, beta)]
    co = _Coeffs(ref_leaves[1], ref_leaves[2] if momentum else None, C, momentum=momentum,
                 full=False, dgd=False, dtype=torch.float64, device="cpu")  # fmt: skip
    ref = [co.G_end * ref_leaves[0], co.gam_end]
    if momentum:
        ref += [co.mom_row * ref_leaves[0], co.d_end, co.b_end]
    probes = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in ref]
    sum((r * p).sum() for r, p in zip(ref, probes)).backward()
    leaves = [t.detach().to(device, torch.float32).requires_grad_() for t in (eta, alpha, beta)]
    cw, cs, gam, dd, bb = fused.chunk_coefficients(*leaves, momentum)
    out = [cw, gam] + ([cs, dd, bb] if momentum else [])
    sum((o.double().cpu() * p).sum() for o, p in zip(out, probes)).backward()
    for o, r in zip(out, ref):
        assert _close(o.detach().double().cpu(), r.detach(), 1e-6)
    for a, b in zip(leaves, ref_leaves):
        if b.grad is None:
            assert a.grad is None
        else:
            assert _close(a.grad.double().cpu(), b.grad, 1e-5)


def _run_sequence(spec, rule, tensors, C, dtype, device, fused_path):
    """``_run`` over a whole sequence: ``sequence_step`` (one fused op) when ``fused_path``, else
    ``chunk.scan`` (chunk by chunk)."""
    from nlc.runtime.chunk import scan
    from nlc.runtime.chunks import sequence_step

    def step(spec, rule, w, s, k, v, q, eta, alpha, beta):
        if not fused_path:
            return scan(spec, "l2", rule, w, s, k, v, q, eta, alpha, beta, C)
        done = sequence_step(spec, "l2", rule, w, s, k, v, q, eta, alpha, beta, chunk=C)
        assert done is not None
        return done

    return _run(spec, rule, tensors, dtype, device, step)


@needs_triton
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize(
    "kind,act,rule_kind,decay,C,T",
    [
        ("residual_mlp", "gelu", "momentum", True, 16, 64),
        ("residual_mlp", "gelu", "momentum", True, 16, 45),  # two full chunks and 13 tokens
        ("mlp", "silu", "gd", True, 7, 21),
        ("mlp", "gelu", "gd", False, 8, 8),  # one chunk
        ("residual_mlp", "silu", "momentum", False, 5, 23),
    ],
)
def test_fused_sequence_matches_the_chunks_in_float64(monkeypatch, device, kind, act, rule_kind,
                                                      decay, C, T):  # fmt: skip
    """``chunks.sequence_step`` (every chunk in one op) against ``chunk.scan`` chunk by chunk in
    float64 (unfused, itself checked per token): outputs, end state, and every gradient."""
    _check_sequence(monkeypatch, device, MemorySpec(kind, 32, 32, hidden=64, depth=2, act=act),
                    RuleSpec(rule_kind), decay, C, T, B=2, H=3, seed=1)  # fmt: skip


def _check_sequence(monkeypatch, device, spec, rule, decay, C, T, B, H, seed):
    """The fused sequence (float32 on ``device``; TF32 off on CUDA) against the chunks in float64
    on the CPU: outputs, end state and every gradient."""
    if device == "none":
        pytest.skip("no CUDA device and Triton is not in interpreter mode")
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    else:
        monkeypatch.setenv("NLC_FUSED", "interpret")
    gen = torch.Generator().manual_seed(seed)
    tensors = _inputs(spec, B, H, T, rule.uses_momentum, decay, gen)
    outs, grads = _run_sequence(spec, rule, tensors, C, torch.float32, device, True)
    with monkeypatch.context() as m:
        m.setenv("NLC_FUSED", "0")
        ref_outs, ref_grads = _run_sequence(spec, rule, tensors, C, torch.float64, "cpu", False)
    _assert_matches(outs, grads, ref_outs, ref_grads)


def test_sequence_step_declines_what_the_kernels_do_not_cover(monkeypatch):
    """``sequence_step`` returns None (the caller runs the chunks) off the fused path: CPU tensors
    without the interpreter, ``NLC_FUSED=0``, a causal read, fewer tokens than one chunk."""
    from nlc.runtime.chunks import sequence_step

    spec = MemorySpec("mlp", 32, 32, hidden=64, depth=2, act="gelu")
    x = torch.zeros(1, 2, 32, 32)
    w = [torch.zeros(1, 2, 64, 32), torch.zeros(1, 2, 32, 64)]
    eta = torch.zeros(1, 2, 32)
    monkeypatch.setenv("NLC_FUSED", "1")
    assert sequence_step(spec, "l2", RuleSpec("gd"), w, None, x, x, x, eta, chunk=16) is None
    monkeypatch.setenv("NLC_FUSED", "interpret")
    for kw in ({"chunk": 64}, {"chunk": 16, "read": "causal"}):
        assert sequence_step(spec, "l2", RuleSpec("gd"), w, None, x, x, x, eta, **kw) is None
    monkeypatch.setenv("NLC_FUSED", "0")
    assert sequence_step(spec, "l2", RuleSpec("gd"), w, None, x, x, x, eta, chunk=16) is None
    with pytest.raises(ValueError, match="chunk must be"):
        sequence_step(spec, "l2", RuleSpec("gd"), w, None, x, x, x, eta, chunk=0)


@needs_triton
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("momentum", [True, False])
def test_sequence_op_passes_opcheck(monkeypatch, device, momentum):
    """``torch.library.opcheck`` on ``mlp2_sequence``: schema, fake tensors, autograd."""
    if device == "none":
        pytest.skip("no CUDA device and Triton is not in interpreter mode")
    n, N, C, D, HD = 3, 2, 8, 16, 32
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.2).to(device)

    k, v, q = (r(n, N, C, D) for _ in range(3))
    w1, w2, s1, s2 = r(N, HD, D), r(N, D, HD), r(N, HD, D), r(N, D, HD)
    cw, cs, gam, dd, bb = r(n, N, C).abs(), r(n, N, C).abs(), r(n, N), r(n, N), r(n, N)
    if not momentum:
        s1 = s2 = cs = dd = bb = k.new_empty(0)
    args = (k, v, q, w1, w2, s1, s2, cw, cs, gam, dd, bb, "gelu", True, momentum, "ieee")
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.numel() else a for a in args)
    torch.library.opcheck(fused.mlp2_sequence, args)


@needs_triton
@pytest.mark.parametrize("device", _devices())
def test_fused_sequence_with_constant_gates(monkeypatch, device):
    """Constant gates (Python floats, as a spec's ``rule momentum(lr = 0.1, ...)`` gives them) are
    filled on the device, and the sequence equals the chunks in float64."""
    from nlc.runtime.chunk import scan
    from nlc.runtime.chunks import sequence_step

    if device == "none":
        pytest.skip("no CUDA device and Triton is not in interpreter mode")
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    else:
        monkeypatch.setenv("NLC_FUSED", "interpret")
    spec = MemorySpec("mlp", 16, 16, hidden=32, depth=2, act="silu")
    rule = RuleSpec("momentum")
    gen = torch.Generator().manual_seed(3)
    k, v, q, w, _, _, _, _ = _inputs(spec, 1, 2, 21, False, False, gen)
    args = (0.3, 0.95, 0.8)
    dev = [t.to(device, torch.float32) for t in (k, v, q, *w)]
    # lr a Python float, decay a 0-dim tensor, momentum a float; T = 21: 2 chunks of 8 and 5
    y, W, S = sequence_step(spec, "l2", rule, dev[3:], None, *dev[:3], args[0],
                            torch.tensor(args[1], device=device), args[2], chunk=8)  # fmt: skip
    monkeypatch.setenv("NLC_FUSED", "0")
    ry, rW, rS = scan(spec, "l2", rule, w, None, k, v, q, *args, 8)
    for a, b in zip([y, *W, *S], [ry, *rW, *rS]):
        assert _close(a.double().cpu(), b, 1e-5)


@needs_triton
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("C,T", [(16, 48), (20, 40)])  # token blocks of 16 (the small set), 32
@pytest.mark.parametrize("write,backward", [(16, 16), (64, 64)])
def test_fused_sequence_with_other_hidden_blocks(monkeypatch, device, C, T, write, backward):
    """The blocks of the hidden width are a tuning choice (``NLC_FUSED_BLOCKS``): other widths
    per program (one block, or four) give the same values and gradients as the chunks in
    float64, for both sets of settings (chunks of at most 16 tokens, and larger)."""
    for table in (fused.mlp2.BLOCKS, fused.mlp2.BLOCKS_SMALL, fused.mlp2.BLOCKS_BF16_64):
        monkeypatch.setitem(table, "write", write)
        monkeypatch.setitem(table, "backward", backward)
    if fused.available():
        assert fused.mlp2._blocks(C, 64, "write")[1] == write
        assert fused.mlp2._blocks(C, 64, "backward")[1] == backward
    _check_sequence(monkeypatch, device, MemorySpec("residual_mlp", 32, 32, hidden=64, depth=2,
                                                    act="gelu"),
                    RuleSpec("momentum"), True, C, T, B=1, H=2, seed=2)  # fmt: skip


@needs_triton
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("kind", ["residual_mlp", "mlp"])
def test_read_in_one_program_per_memory(monkeypatch, device, kind):
    """``NLC_FUSED_READ_SPLIT=0``: the errors and the reads of a chunk in one program per memory
    (the default gives them two) give the same values and gradients as the chunks in float64,
    in the sequence op and in the chunk op."""
    monkeypatch.setenv("NLC_FUSED_READ_SPLIT", "0")
    assert fused.mlp2._read_mode() == 1
    spec = MemorySpec(kind, 32, 32, hidden=64, depth=2, act="gelu")
    _check_sequence(monkeypatch, device, spec, RuleSpec("momentum"), True, 16, 48, B=1, H=2, seed=3)
    if device == "cpu":
        monkeypatch.setenv("NLC_FUSED", "interpret")
    gen = torch.Generator().manual_seed(0)
    tensors = _inputs(spec, 2, 3, 16, True, True, gen)
    outs, grads = _run(spec, RuleSpec("momentum"), tensors, torch.float32, device)
    with monkeypatch.context() as m:
        m.setenv("NLC_FUSED", "0")
        ref_outs, ref_grads = _run(spec, RuleSpec("momentum"), tensors, torch.float64, "cpu")
    _assert_matches(outs, grads, ref_outs, ref_grads)


@needs_triton
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("group", ["1", "2", "3", "all"])
def test_inputs_gradients_summed_for_groups_of_chunks(monkeypatch, device, group):
    """``NLC_FUSED_FINISH_GROUP``: the backward sums the inputs' gradients of several chunks in
    one launch (one chunk a launch, groups of 2 or 3 of 5 chunks, the last group partial, or all
    of them) with the same values and gradients as the chunks in float64."""
    monkeypatch.setenv("NLC_FUSED_FINISH_GROUP", group)
    assert fused.sequence._finish_group(5) == (5 if group == "all" else int(group))
    spec = MemorySpec("residual_mlp", 32, 32, hidden=64, depth=2, act="gelu")
    _check_sequence(monkeypatch, device, spec, RuleSpec("momentum"), True, 16, 80, B=1, H=2, seed=4)


def test_a_bad_finish_group_is_a_setting_error(monkeypatch):
    """A bad ``NLC_FUSED_FINISH_GROUP`` is a ``SettingError`` (reported by ``nlc`` as one line,
    as ``test_a_bad_setting_is_a_clear_cli_error`` shows for the other settings); a group larger
    than the sequence is the whole sequence; the default groups fit their parts in the budget."""
    monkeypatch.setenv("NLC_FUSED_FINISH_GROUP", "0")
    with pytest.raises(SettingError, match="NLC_FUSED_FINISH_GROUP: expected a positive integer"):
        fused.sequence._finish_group(4)
    monkeypatch.setenv("NLC_FUSED_FINISH_GROUP", "9")
    assert fused.sequence._finish_group(4) == 4
    monkeypatch.delenv("NLC_FUSED_FINISH_GROUP")
    budget = fused.sequence.FINISH_PARTS_BYTES
    assert fused.sequence._finish_group(32, budget // 32) == 32  # all fit: one group
    assert fused.sequence._finish_group(32, budget // 16) == 8  # two sets of 8 fit
    assert fused.sequence._finish_group(32, 2 * budget) == 1


def test_tuning_settings_come_from_the_environment(monkeypatch):
    """``NLC_FUSED_WARPS`` / ``NLC_FUSED_BLOCKS`` override the named settings and keep the rest;
    a name or value they do not know is refused with the expected form."""
    from nlc.runtime.fused.mlp2 import _tuning

    defaults, allowed = {"write": 32, "backward": 32}, (16, 32, 64)
    monkeypatch.setenv("NLC_TEST_TUNING", "backward=16")
    assert _tuning("NLC_TEST_TUNING", defaults, allowed) == {"write": 32, "backward": 16}
    assert defaults == {"write": 32, "backward": 32}
    monkeypatch.setenv("NLC_TEST_TUNING", " write = 64 ,backward=16")
    assert _tuning("NLC_TEST_TUNING", defaults, allowed) == {"write": 64, "backward": 16}
    monkeypatch.delenv("NLC_TEST_TUNING")
    assert _tuning("NLC_TEST_TUNING", defaults, allowed) == defaults
    for bad in ("width=16", "write=wide", "write", "write=48"):  # 48: not a power-of-2 block
        monkeypatch.setenv("NLC_TEST_TUNING", bad)
        with pytest.raises(ValueError, match="write=N,backward=N with N one of 16, 32, 64"):
            _tuning("NLC_TEST_TUNING", defaults, allowed)


def test_small_chunks_take_the_small_settings():
    """Chunks of at most 16 tokens (one 16-token block) use ``WARPS_SMALL``/``BLOCKS_SMALL``;
    larger ones ``WARPS``/``BLOCKS``; a hidden width the block does not divide falls back."""
    from nlc.runtime.fused import mlp2

    if not fused.available():
        pytest.skip("needs Triton (the block sizes use triton.next_power_of_2)")
    assert mlp2._warps(16) is mlp2.WARPS_SMALL and mlp2._warps(32) is mlp2.WARPS
    for C in (1, 8, 16):
        assert mlp2._blocks(C, 256, "write")[1] == mlp2.BLOCKS_SMALL["write"]
    assert mlp2._blocks(17, 256, "write")[1] == mlp2.BLOCKS["write"]
    assert mlp2._blocks(16, 48, "write")[1] == 16  # 48 = 3 x 16: no block of 32 or 64 fits


def test_bf16_on_64_token_blocks_only_with_hidden_blocks_of_64():
    """bf16 kernels on 64-token blocks take ``BLOCKS_BF16_64`` (hidden blocks of 64, the blocks
    whose bf16 kernels run there); with a smaller hidden block (a hidden width 64 does not
    divide, or a setting) those kernels use TF32; other chunk sizes and precisions are kept."""
    from nlc.runtime.fused import mlp2

    if not fused.available():
        pytest.skip("needs Triton (the block sizes use triton.next_power_of_2)")
    assert mlp2._blocks(64, 256, "backward", "bf16")[1] == mlp2.BLOCKS_BF16_64["backward"] == 64
    assert mlp2._blocks(40, 256, "write", "bf16")[1] == mlp2.BLOCKS_BF16_64["write"] == 64
    assert mlp2._blocks(64, 256, "write", "tf32")[1] == mlp2.BLOCKS["write"]
    assert mlp2._blocks(32, 256, "write", "bf16")[1] == mlp2.BLOCKS["write"]
    assert mlp2._blocks(64, 96, "write", "bf16")[1] == 32  # 96: no block of 64 fits
    assert mlp2._kernel_precision("bf16", 64, 64) == "bf16"
    assert mlp2._kernel_precision("bf16", 64, 32) == "tf32"
    assert mlp2._kernel_precision("bf16", 32, 16) == "bf16"
    assert mlp2._kernel_precision("ieee", 64, 16) == "ieee"



def test_a_bad_setting_is_a_clear_cli_error(monkeypatch, capsys):
    """``nlc`` reports a bad ``NLC_FUSED_BLOCKS`` (read where the fused kernels are imported,
    inside a subcommand) as one error line and exit status 2, not a traceback."""
    import argparse

    from nlc import cli
    from nlc.runtime.fused.mlp2 import _tuning

    def subcommand(args):
        _tuning("NLC_FUSED_BLOCKS", {"write": 32, "backward": 32}, (16, 32, 64))

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=subcommand)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setenv("NLC_FUSED_BLOCKS", "write=48")
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nlc: error: NLC_FUSED_BLOCKS: expected write=N,backward=N")
    assert "Traceback" not in err
