"""Wide MLP memories' chunks in one op (``nlc.runtime.wide_chunks``) against the per-token
reference, and the product-plus-state kernel (``nlc.runtime.fused.accumulate``) against torch."""

from __future__ import annotations

import pytest
import torch

import nlc
from nlc.runtime import fused, wide_chunks
from nlc.runtime.chunk import RuleSpec, scan
from nlc.runtime.chunks import sequence_step
from nlc.runtime.fused.accumulate import accumulate
from nlc.runtime.memories import MemorySpec

from ..codegen.helpers import shrink
from ..conftest import ROOT
from .test_chunk import compare, make_problem, seed_of
from .test_fused import (
    _devices,  # CUDA, and the CPU where Triton runs as its interpreter
)

F64 = torch.float64


def _sequence(calls):
    """``compare``'s ``fn``: the whole sequence through ``sequence_step`` (the wide op for the full
    chunks, ``chunk_step`` for a partial last one); counts the op's calls."""

    def fn(spec, objective, rule, W0, S0, k, v, q, eta, alpha, beta, chunk, read):
        assert q is k
        done = sequence_step(spec, objective, rule, W0, S0, k, v, q, eta, alpha, beta, chunk=chunk, read=read)
        assert done is not None, "sequence_step declined"
        return done

    return fn


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = wide_chunks.wide_mlp2_sequence
    monkeypatch.setattr(wide_chunks, "wide_mlp2_sequence", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("NLC_WIDE_CHUNKS", "1")  # on the CPU too
    return calls


@pytest.mark.parametrize(
    "kind,act,objective,decay,C,T,shared",
    [
        ("mlp", "silu", "l2", True, 4, 3 * 4 + 3, False),  # three full chunks and a partial one
        ("mlp", "silu", "l2", False, 5, 10, True),  # no decay; a shared [H, out, in] initial state
        ("residual_mlp", "tanh", "l2", True, 3, 9, False),
        ("mlp", "gelu", "dot", True, 4, 8, True),
        ("mlp", "sigmoid", "l2", True, 2, 6, False),
        ("residual_mlp", "identity", "dot", False, 3, 7, False),
        ("mlp", "relu", "l2", True, 4, 8, False),
    ],
)
def test_wide_sequence_matches_reference(counted, kind, act, objective, decay, C, T, shared):
    """``sequence_step`` through the wide op matches the per-token reference in float64: the reads,
    the end state, and the gradients of W_0, the keys (also the queries), targets and gates."""
    spec = MemorySpec(kind, 6, 6 if kind == "residual_mlp" else 5, hidden=7, depth=2, act=act)
    rule = RuleSpec("gd")
    p = make_problem(spec, rule, B=2, H=3, T=T, seed=seed_of(kind, act, objective, decay, C))
    p["q"] = p["k"]  # a read at the keys (`let query = key`)
    if not decay:
        p["alpha"] = None
    if shared:
        g = torch.Generator().manual_seed(5)
        p["W0"] = [(0.5 * torch.randn(3, *w.shape[-2:], generator=g, dtype=F64)).requires_grad_() for w in p["W0"]]
    compare(spec, objective, rule, p, C, "chunk", tol=1e-9, fn=_sequence(counted))
    assert counted, "sequence_step did not take the wide op"


def test_wide_sequence_declines(monkeypatch):
    spec = MemorySpec("mlp", 8, 8, hidden=16, depth=2)
    k = torch.zeros(1, 1, 8, 8)
    gd = RuleSpec("gd")

    def ok(spec=spec, objective="l2", rule=gd, read="chunk", q=k, x=k, dtype=torch.float32, n=2):
        return wide_chunks.applies(spec, objective, rule, read, q, x, dtype, n)

    monkeypatch.setenv("NLC_WIDE_CHUNKS", "auto")
    assert not ok()  # CPU tensors: only with NLC_WIDE_CHUNKS=1
    monkeypatch.setenv("NLC_WIDE_CHUNKS", "1")
    assert ok() and ok(objective="dot") and ok(dtype=F64)
    assert not ok(q=k.clone())  # queries other than the keys
    assert not ok(read="causal")
    assert not ok(rule=RuleSpec("momentum")) and not ok(rule=RuleSpec("dgd"))
    assert not ok(objective="huber")
    assert not ok(n=1)
    assert not ok(spec=MemorySpec("mlp", 8, 8, hidden=16, depth=3))
    assert not ok(spec=MemorySpec("mlp", 8, 8, hidden=16, depth=2, act="gelu_tanh"))
    assert not ok(spec=MemorySpec("swiglu", 8, 8, hidden=16))
    assert not ok(dtype=torch.bfloat16)
    monkeypatch.setenv("NLC_WIDE_CHUNKS", "0")
    assert not ok()


def test_compiled_elementwise_functions_match_reference(counted, monkeypatch):
    """The chunks' elementwise functions compiled by inductor (as on CUDA; ``NLC_WIDE_COMPILE=all``
    compiles them here too), writing the op's outputs in place, give the reference's values and
    gradients (float64; a residual MLP with tanh, decay, objective l2)."""
    monkeypatch.setenv("NLC_WIDE_COMPILE", "all")
    spec = MemorySpec("residual_mlp", 6, 6, hidden=7, depth=2, act="tanh")
    rule = RuleSpec("gd")
    p = make_problem(spec, rule, B=2, H=3, T=9, seed=seed_of("compiled", "tanh"))
    p["q"] = p["k"]
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    compare(spec, "l2", rule, p, 3, "chunk", tol=1e-9, fn=_sequence(counted))
    assert counted, "sequence_step did not take the wide op"
    assert counters["stats"]["unique_graphs"] > before, "nothing was compiled"


def test_wide_sequence_under_bf16_autocast_tracks_the_chunk_loop(monkeypatch):
    """Under bf16 autocast the op multiplies bf16 copies of its float32 state, as the chunk loop's
    products do: the two agree to bf16 rounding, and the state stays float32."""
    spec, rule = MemorySpec("mlp", 16, 16, hidden=32, depth=2), RuleSpec("gd")
    p = make_problem(spec, rule, B=2, H=2, T=4 * 8, seed=7, dtype=torch.float32)
    args = (spec, "l2", rule, p["W0"], None, p["k"], p["v"], p["k"], p["eta"], p["alpha"], None)
    monkeypatch.setenv("NLC_WIDE_CHUNKS", "1")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, W, _ = sequence_step(*args, chunk=8)
        y0, W0, _ = scan(*args, chunk=8)
    assert W[0].dtype == torch.float32
    for a, b in ((y, y0), (W[0], W0[0]), (W[1], W0[1])):
        err = (a.float() - b.float()).abs().max() / b.float().abs().max()
        assert err < 2e-2, err.item()


def test_wide_level_compiles_fullgraph_and_matches_eager(monkeypatch):
    """The CMS level of ``benchmarks/specs/cms_level.nl`` (shrunk) through the op: compiled with
    ``fullgraph=True`` (the op's fake forward and backward) it gives eager's values and gradients."""
    monkeypatch.setenv("NLC_WIDE_CHUNKS", "1")
    text = shrink((ROOT / "benchmarks" / "specs" / "cms_level.nl").read_text(), d=16)
    text = text.replace("period = 512", "period = 8").replace("seq = 4096", "seq = 32")
    from nlc import bench

    loaded = bench.load_spec(text, {})
    cls = loaded.level_classes()["fast"]
    torch.manual_seed(0)
    m = cls().double()
    x = torch.randn(2, 32, 16, dtype=F64, requires_grad=True)
    calls = []
    real = wide_chunks.wide_mlp2_sequence
    monkeypatch.setattr(wide_chunks, "wide_mlp2_sequence", lambda *a: calls.append(1) or real(*a))

    def grads(f):
        y = f(x)
        gs = torch.autograd.grad((y * y).sum(), [x, *m.parameters()])
        return y.detach(), gs

    y0, g0 = grads(m)
    assert calls
    torch._dynamo.reset()
    y1, g1 = grads(torch.compile(m, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------------------------
# the kernel


@pytest.mark.skipif(not fused.available(), reason="needs Triton")
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("operands", ["bf16", "ieee"])
@pytest.mark.parametrize("shape", [(2, 70, 130, 33), (1, 128, 256, 128)])  # N, L, M, P: edges, full tiles
def test_accumulate_kernel_matches_torch(monkeypatch, device, operands, shape):
    """``out = gam * c + sign * x^T y`` and its bf16 copy, by the kernel and by torch: with and
    without ``c`` (broadcast over the batch), ``gam``, a sign, and in place (``out`` is ``c``)."""
    if device == "none":
        pytest.skip("no CUDA device and Triton is not in interpreter mode")
    if device == "cpu":
        monkeypatch.setenv("NLC_FUSED", "interpret")
    else:
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    N, L, M, P = shape
    g = torch.Generator().manual_seed(L)
    od = torch.bfloat16 if operands == "bf16" else torch.float32
    x = torch.randn(N, L, M, generator=g).to(device, od)
    y = torch.randn(N, L, P, generator=g).to(device, od)
    c = torch.randn(1, M, P, generator=g).to(device).expand(N, M, P)
    gam = torch.rand(N, generator=g).to(device)
    want = gam[:, None, None] * c - x.double().mT.matmul(y.double()).float()
    for kw in ({"c": c, "gam": gam, "sign": -1.0}, {"c": c, "sign": 1.0}, {}):
        out = torch.empty(N, M, P, device=device)
        op = torch.empty(N, M, P, device=device, dtype=torch.bfloat16)
        accumulate(x, y, out, out_op=op, prec="ieee", **kw)
        ref = x.double().mT.matmul(y.double()) * kw.get("sign", 1.0)
        if "c" in kw:
            ref = ref + (kw["gam"][:, None, None] if "gam" in kw else 1.0) * c.double()
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4 * L**0.5)
        # the operand copy: bf16 of the float32 result (one ulp: the interpreter rounds differently)
        torch.testing.assert_close(op.float(), out, rtol=2**-7, atol=1e-30)
    inplace = c.clone()  # (a copy: c itself is read again below)
    accumulate(x, y, inplace, c=inplace, gam=gam, sign=-1.0, prec="ieee")
    torch.testing.assert_close(inplace.double(), want.double(), rtol=1e-5, atol=1e-4 * L**0.5)
    # a second pair of operands in the same pass (L2 rows of its own)
    x2 = torch.randn(N, L + 6, M, generator=g).to(device, od)
    y2 = torch.randn(N, L + 6, P, generator=g).to(device, od)
    out = torch.empty(N, M, P, device=device)
    accumulate(x, y, out, c=c, gam=gam, sign=-1.0, prec="ieee", more=(x2, y2))
    ref = want.double() - x2.double().mT.matmul(y2.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-4 * L**0.5)


def test_accumulate_takes_a_sign_of_one(monkeypatch):
    monkeypatch.setenv("NLC_FUSED", "0")
    x, y, out = torch.ones(1, 2, 3), torch.ones(1, 2, 4), torch.empty(1, 3, 4)
    accumulate(x, y, out, sign=-1.0, more=(x, y))
    assert (out == -4.0).all()
    with pytest.raises(ValueError, match="sign must be"):
        accumulate(x, y, out, sign=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast,kind", [(False, "mlp"), (True, "mlp"), (True, "residual_mlp")])
def test_wide_sequence_on_cuda_tracks_float64(monkeypatch, autocast, kind):
    """On CUDA (the default there: the op and its kernel): float32 with IEEE products against the
    chunk loop in float64 on the CPU, to float32 rounding; under bf16 autocast, to bf16 rounding.
    Outputs, end state and the gradients of every input (the residual form's key gradient takes
    the read's gradient in cuBLAS's epilogue)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    spec, rule = MemorySpec(kind, 128, 128, hidden=256, depth=2, act="silu"), RuleSpec("gd")  # too wide to fuse
    p = make_problem(spec, rule, B=2, H=2, T=4 * 32, seed=11)
    p["q"] = p["k"]

    def on(device, dtype):
        leaves = [t.detach().to(device, dtype).requires_grad_() for t in (*p["W0"], p["k"], p["v"], p["eta"], p["alpha"])]
        w1, w2, k, v, eta, alpha = leaves
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast and device == "cuda"):
            if device == "cuda":
                y, W, _ = sequence_step(spec, "l2", rule, [w1, w2], None, k, v, k, eta, alpha, None, chunk=32)
            else:
                y, W, _ = scan(spec, "l2", rule, [w1, w2], None, k, v, k, eta, alpha, None, chunk=32)
        g = torch.Generator().manual_seed(3)
        outs = [y, *W]
        loss = sum((o.float() * torch.randn(o.shape, generator=g).to(device, o.dtype)).sum() for o in outs)
        return [o.detach().cpu().double() for o in outs], [t.cpu().double() for t in torch.autograd.grad(loss, leaves)]

    calls = []
    real = wide_chunks.wide_mlp2_sequence
    monkeypatch.setattr(wide_chunks, "wide_mlp2_sequence", lambda *a: calls.append(1) or real(*a))
    outs, grads = on("cuda", torch.float32)
    assert calls
    monkeypatch.setenv("NLC_WIDE_CHUNKS", "0")
    ref_outs, ref_grads = on("cpu", F64)
    tol = 3e-2 if autocast else 1e-4
    names = ["y", "W1", "W2", "gW1", "gW2", "gk", "gv", "geta", "galpha"]
    errs = {n: ((a - b).abs().max() / b.abs().max()).item() for n, a, b in zip(names, outs + grads, ref_outs + ref_grads)}
    assert max(errs.values()) < tol, errs


def test_a_bad_tile_setting_is_a_setting_error(monkeypatch):
    from nlc.diagnostics import SettingError
    from nlc.runtime.fused.accumulate import TILE, _tile

    assert _tile() == TILE
    monkeypatch.setenv("NLC_WIDE_TILE", "64,128,32,4,4")
    assert _tile() == (64, 128, 32, 4, 4)
    for bad in ("64,128,32,4", "64,100,32,4,4", "a,b,c,d,e", "64,128,32,3,4", "64,128,32,4,0"):
        monkeypatch.setenv("NLC_WIDE_TILE", bad)
        with pytest.raises(SettingError, match="NLC_WIDE_TILE"):
            _tile()


@pytest.mark.parametrize("decay", [True, False])
@pytest.mark.parametrize("T", [12, 14])  # three full chunks of 4; and a partial chunk of 2 after them
def test_without_a_final_state_the_last_update_is_left_out(counted, decay, T):
    """``final=False`` (nothing reads the end state): the reads and every gradient of a loss on them
    are those of ``final=True`` (itself checked against the reference above), and the weights
    returned are those at the start of the last chunk (the chunk loop over the tokens before it)."""
    spec, rule = MemorySpec("mlp", 6, 5, hidden=7, depth=2), RuleSpec("gd")
    p = make_problem(spec, rule, B=2, H=3, T=T, seed=T)
    if not decay:
        p["alpha"] = None
    leaves = [*p["W0"], p["k"], p["v"], p["eta"]] + ([p["alpha"]] if decay else [])
    w = torch.randn(2, 3, T, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    end_grads = []  # the sizes of the end-state gradients the backward got (0: none reached it)
    real_backward = wide_chunks.wide_mlp2_sequence_backward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wide_chunks, "wide_mlp2_sequence_backward",
                   lambda *a: end_grads.append(a[11].numel()) or real_backward(*a))  # fmt: skip
        got = _final_and_not(spec, rule, p, w, leaves)
    assert counted
    # a loss on the reads only: without a partial chunk after them, no gradient reaches the op's end
    # state, and the backward makes no zeros for it (a partial chunk reads that state: a real one)
    assert end_grads and all((n == 0) == (T % 4 == 0) for n in end_grads), end_grads
    for a, b in zip(got[False][2], got[True][2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[False][0], got[True][0], rtol=1e-12, atol=1e-12)
    start = T - 4 if T % 4 == 0 else T - T % 4  # the last chunk's first token
    cut = {key: p[key][:, :, :start] if p[key] is not None else None for key in ("k", "v", "eta", "alpha")}
    _, W_start, _ = scan(spec, "l2", rule, p["W0"], None, cut["k"], cut["v"], cut["k"], cut["eta"], cut["alpha"],
                         None, chunk=4)  # fmt: skip
    for a, b in zip(got[False][1], W_start):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _final_and_not(spec, rule, p, w, leaves):
    got = {}
    for final in (True, False):
        y, W, _ = sequence_step(spec, "l2", rule, p["W0"], None, p["k"], p["v"], p["k"], p["eta"], p["alpha"],
                                chunk=4, final=final)  # fmt: skip
        got[final] = (y, W, torch.autograd.grad((y * w).sum(), leaves))
    return got


@pytest.mark.parametrize("example", ["hope", "cms_sequential", "cms_independent", "hope_attention"])
def test_a_model_with_the_wide_op_equals_the_chunk_loop(monkeypatch, example):
    """A whole model whose CMS levels the op covers (shrunk, float64): its loss and every parameter's
    gradient equal the chunk loop's; 75 tokens leave a partial last chunk."""
    text = shrink((ROOT / "examples" / f"{example}.nl").read_text(), d=16, heads=2, layers=2)
    idx = torch.randint(0, 256, (2, 75), generator=torch.Generator().manual_seed(0))
    calls = []
    real = wide_chunks.wide_mlp2_sequence
    monkeypatch.setattr(wide_chunks, "wide_mlp2_sequence", lambda *a: calls.append(1) or real(*a))
    out = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("NLC_WIDE_CHUNKS", mode)
        torch.manual_seed(0)
        model = nlc.load(text)().double()
        _, loss = model(idx, idx)
        loss.backward()
        out[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        if mode == "1":
            assert calls, f"no level of {example} took the wide op"
    torch.testing.assert_close(out["1"][0], out["0"][0], rtol=1e-12, atol=1e-12)
    assert out["1"][1].keys() == out["0"][1].keys()
    for n, g in out["0"][1].items():
        torch.testing.assert_close(out["1"][1][n], g, rtol=1e-9, atol=1e-12, msg=n)
