"""`nlc bench` on the CPU: the JSON it writes, the dims overrides, and its FLOP counts checked
against torch.utils.flop_counter.FlopCounterMode."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nlc import bench
from nlc.runtime import chunk as nl_chunk
from nlc.runtime import memories as nl_mem

from ..conftest import ROOT

EX = ROOT / "examples"
TINY = "d=32,heads=2,layers=1,vocab=64"


def counted(fn) -> dict:
    """FlopCounterMode's counts of ``fn()`` per aten op name."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return {str(op): n for op, n in fc.get_flop_counts()["Global"].items()}


def not_attention(counts: dict) -> int:
    return sum(n for op, n in counts.items() if "attention" not in op)


# ---- the command ----------------------------------------------------------------------------------


def test_bench_cli_writes_sane_json(run_cli, tmp_path):
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(
        "bench",
        EX / "titans_lmm.nl",
        "--dims",
        TINY,
        "--seq-len",
        "48",
        "--batch-size",
        "2",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--json",
        out,
        "-q",
    )
    assert code == 0, err
    assert "tokens/s" in stdout and "MFU" in stdout
    r = json.loads(out.read_text())
    assert r["spec"]["dims_overridden"] == {"d": 32, "heads": 2, "layers": 1, "vocab": 64, "seq": 48}
    assert r["config"]["tokens_per_step"] == 2 * 48 and r["config"]["compile"] is False
    assert r["timing"]["steps"] == 3
    assert r["timing"]["tokens_per_s"]["median"] > 0
    assert r["timing"]["step_ms"]["p10"] <= r["timing"]["step_ms"]["median"] <= r["timing"]["step_ms"]["p90"]
    f = r["flops_per_token"]
    assert f["6n"] == 6 * r["params"]["n_6n"] and f["dense"] == 6 * r["params"]["n_dense"]
    assert f["inner"] > 0 and f["model"] == pytest.approx(f["dense"] + f["attention"] + f["inner"])
    assert r["levels"][0]["name"] == "memory" and r["levels"][0]["period"] == 16
    assert r["mfu"]["vs_peak"]["model"] is None  # no spec peak for a CPU
    assert r["mfu"]["vs_gemm"]["model"] > 0 and r["ceilings"]["gemm_tflops"] > 0
    assert r["env"]["torch"] == torch.__version__ and r["env"]["date"]
    assert r["command"].startswith("nlc bench ")


def test_bench_usage_errors(run_cli):
    code, _, err = run_cli("bench", EX / "transformer_pp.nl", "--dims", "width=8", "--device", "cpu")
    assert code == 2 and "no dim 'width'" in err
    code, _, err = run_cli("bench", EX / "transformer_pp.nl", "--dims", "d=x", "--device", "cpu")
    assert code == 2 and "not an integer" in err
    code, _, err = run_cli("bench", EX / "transformer_pp.nl", "--dims", "heads=3", "--device", "cpu")
    assert code == 1 and "NL301" in err  # d / heads is no integer: the spec's own diagnostic


def test_apply_dims_keeps_the_rest_of_the_text():
    text = (EX / "titans_lmm.nl").read_text()
    new = bench.apply_dims(text, {"d": 64, "layers": 3})
    assert new.count("\n") == text.count("\n")  # line numbers unchanged
    prog = bench.load_spec(new).program
    assert int(prog.d_model) == 64 and int(prog.dim("dh")) == 16  # derived dims follow
    with pytest.raises(bench.BenchError, match="did you mean 'heads'"):
        bench.apply_dims(text, {"head": 2})


# ---- FLOP counts against FlopCounterMode -------------------------------------------------------------


def test_6n_part_matches_flop_counter():
    """Transformer++: forward + backward matrix products are exactly 6 N_dense per token."""
    loaded = bench.load_spec(EX / "transformer_pp.nl", bench.parse_dims(TINY))
    torch.manual_seed(0)
    model = loaded.Model()
    B, T = 2, 40
    flops = bench.count_flops(loaded.program, model, T)
    gains = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert flops["inner"] == 0 and flops["params"]["n_dense"] == flops["params"]["n_6n"] - gains  # tied head
    x = torch.randint(0, 64, (B, T))

    def step():
        _, loss = model(x, x)
        loss.backward()

    assert not_attention(counted(step)) == flops["dense"] * B * T  # tolerance: none


@pytest.mark.parametrize(
    "spec,level,exact",
    [("titans_lmm.nl", "memory", True), ("delta_rule.nl", "delta", True), ("hope.nl", "titans", False)],
)
def test_inner_loop_of_a_level_matches_flop_counter(monkeypatch, spec, level, exact):
    """One in-context level, forward: the analytic count equals what runs (Titans LMM, the delta
    rule chunk by chunk), or bounds it from below where the generated code does more than the
    level needs (HOPE's memories are applied to the queries all at once, though one is read; the
    delta rule's chunks all at once, ``nlc.runtime.linear_chunks``, which also forms each chunk's
    state map): the model count is the work the level needs, as MFU counts it, never more.

    Forward + backward: the backward runs 0.7 to 1.1 x the 2 x forward convention (autograd
    skips the gradient of an operand that needs none: decay masks, constants), once the
    closed-form gradients of the decay products are taken out (``chunk._Products`` /
    ``_Suffix``: a ``(C+1)^3`` product per gate and chunk, bookkeeping of the gates rather than
    work of the memory)."""
    if spec == "delta_rule.nl":  # the batched form does a little more than the level needs
        from nlc.runtime import linear_chunks

        monkeypatch.setenv("NLC_LINEAR_CHUNKS", "1")
        loaded = bench.load_spec(EX / spec, bench.parse_dims(TINY))
        lv = loaded.program.level(level)
        torch.manual_seed(0)
        m = loaded.level_classes()[level]()
        B, T = 2, 2 * int(lv.period.every) + 5
        x = torch.randn(B, T, 32)
        f = bench.level_flops(lv, T)
        calls = []
        real = linear_chunks.sequence
        monkeypatch.setattr(linear_chunks, "sequence", lambda *a: calls.append(1) or real(*a))
        inner = not_attention(counted(lambda: m(x))) - 2 * bench_level_dense(m) * B * T
        assert calls  # the batched form ran
        monkeypatch.setattr(linear_chunks, "sequence", real)
        # beyond the chunk loop's work: each full chunk applies its system's inverse to 2 x dh
        # right-hand sides (2 C^2 (in + out) per chunk and head), which the loop's solve does
        # without a product
        C, H, dh = int(lv.period.every), 2, 16
        inverse = B * H * (T // C) * 2 * C * C * (dh + dh)
        assert f["matmul"] * B < inner <= 1.25 * f["matmul"] * B + inverse
        monkeypatch.setenv("NLC_LINEAR_CHUNKS", "0")  # the exact count: chunk by chunk
    loaded = bench.load_spec(EX / spec, bench.parse_dims(TINY))
    lv = loaded.program.level(level)
    torch.manual_seed(0)
    m = loaded.level_classes()[level]()
    B, T = 2, 2 * int(lv.period.every) + 5  # two chunks and a partial one
    x = torch.randn(B, T, 32, requires_grad=True)
    f = bench.level_flops(lv, T)
    dense = bench_level_dense(m) * B * T

    fwd = counted(lambda: m(x))
    inner_fwd = not_attention(fwd) - 2 * dense
    if exact:
        assert inner_fwd == f["matmul"] * B
    else:
        assert f["matmul"] * B <= inner_fwd <= 1.25 * f["matmul"] * B
    y = m(x)
    decay = decay_backward_flops(monkeypatch)
    bwd = counted(lambda: y.square().mean().backward())
    # FlopCounterMode ignores `groups` in the backward of a convolution (a depthwise one is counted
    # as if dense, `channels` times too much): take the convolutions' backward as 2 x forward
    conv = sum(n for op, n in fwd.items() if op.startswith("aten.convolution"))
    conv_bwd = sum(n for op, n in bwd.items() if op.startswith("aten.convolution_backward"))
    inner_bwd = not_attention(bwd) - conv_bwd + 2 * conv - 4 * dense - decay[0]
    assert 0.7 <= (inner_fwd + inner_bwd) / (3 * inner_fwd) <= 1.1
    if spec == "delta_rule.nl":
        assert f["solve"] > 0  # dgd: the C x C triangular solves are counted apart


@pytest.mark.parametrize("persist", [False, True])
def test_inner_loop_count_follows_the_level_persistence(persist):
    """A level that keeps its state (``persist``: test-time learning) updates its last chunk too;
    one that does not, reads it only: ``level_flops(..., persist=)`` counts each exactly."""
    loaded = bench.load_spec(EX / "titans_lmm.nl", bench.parse_dims(TINY))
    lv = loaded.program.level("memory")
    torch.manual_seed(0)
    m = loaded.level_classes()["memory"]()
    m.persist = persist
    B, T = 2, 2 * int(lv.period.every) + 5
    x = torch.randn(B, T, 32)
    inner = not_attention(counted(lambda: m(x))) - 2 * bench_level_dense(m) * B * T
    assert inner == bench.level_flops(lv, T, persist=persist)["matmul"] * B
    if not persist:
        assert bench.level_flops(lv, T) == bench.level_flops(lv, T, persist=False)


def decay_backward_flops(monkeypatch) -> list[int]:
    """A one-item list that sums the matmul FLOPs of the decay products' closed-form backward
    calls from now on (``P^T dP``: ``2 n^3``; the chunk-end row's ``2 (n-1) n``, per batch row)."""
    from nlc.runtime import chunk

    total = [0]

    def wrap(cls, flops):
        real = cls.backward

        def backward(ctx, grad):
            n = grad.shape[-1]
            total[0] += flops(n) * (grad.numel() // (n * n if cls is chunk._Products else n))
            return real(ctx, grad)

        monkeypatch.setattr(cls, "backward", staticmethod(backward))

    wrap(chunk._Products, lambda n: 2 * n**3)
    wrap(chunk._Suffix, lambda n: 2 * (n - 1) * n)
    return total


def bench_level_dense(m) -> int:
    from nlc.runtime.flows import MemoryInit

    init = {id(p) for mm in m.modules() if isinstance(mm, MemoryInit) for p in mm.parameters()}
    return sum(p.numel() for p in m.parameters() if p.dim() >= 2 and id(p) not in init)


def _specs():
    mems = [
        nl_mem.MemorySpec("linear", 5, 6),
        nl_mem.MemorySpec("mlp", 5, 6, hidden=7, depth=3),
        nl_mem.MemorySpec("residual_mlp", 5, 5, hidden=7, depth=2),
        nl_mem.MemorySpec("swiglu", 5, 6, hidden=7),
    ]
    rules = [
        nl_chunk.RuleSpec("gd"),
        nl_chunk.RuleSpec("momentum"),
        nl_chunk.RuleSpec("dgd"),
        nl_chunk.RuleSpec("dgd", momentum=True),
        nl_chunk.RuleSpec("dgd", dgd_layers="input"),
    ]
    return list(itertools.product(mems, rules, ("chunk", "causal")))


@pytest.mark.parametrize("spec,rule,read", _specs(), ids=lambda v: getattr(v, "kind", v))
def test_chunk_step_flops_are_exact(spec, rule, read):
    B, H, C = 2, 3, 8
    g = torch.Generator().manual_seed(0)
    W0 = [torch.randn(B, H, o, i, generator=g) for o, i in spec.weight_shapes()]
    S0 = [torch.randn_like(w) for w in W0] if rule.uses_momentum else None
    k, q = torch.randn(B, H, C, spec.din, generator=g), torch.randn(B, H, C, spec.din, generator=g)
    v = torch.randn(B, H, C, spec.dout, generator=g)
    eta, alpha = torch.rand(B, H, C, generator=g), torch.rand(B, H, C, generator=g)
    beta = torch.rand(B, H, C, generator=g) if rule.uses_momentum else None
    got = counted(lambda: nl_chunk.chunk_step(spec, "l2", rule, W0, S0, k, v, q, eta, alpha, beta, read=read))
    matmul, solve = bench.chunk_step_flops(spec, rule, read, C, True)
    assert sum(got.values()) == matmul * B * H
    assert (solve > 0) == rule.is_dgd


def test_attention_flops_are_causal_and_windowed():
    prog = bench.load_spec(EX / "titans_mal.nl", bench.parse_dims(TINY)).program
    swa = prog.level("swa")
    T, w, d = 100, int(prog.dim("window")), 32
    assert bench.attention_flops(swa, T, d) == 4 * d * sum(min(t + 1, w) for t in range(T))
    attn = bench.load_spec(EX / "transformer_pp.nl", bench.parse_dims(TINY)).program.level("attn")
    assert bench.attention_flops(attn, T, d) == 4 * d * T * (T + 1) // 2


@pytest.mark.slow
def test_bench_compiled_on_cpu(tmp_path):
    """The compile path: fullgraph holds, cold and warm compile are measured, no recompiles."""
    r = bench.run_bench(
        EX / "transformer_pp.nl",
        dims=bench.parse_dims(TINY),
        batch_size=2,
        seq_len=32,
        steps=3,
        warmup=1,
        compile=True,
        device="cpu",
        ceilings=False,
    )
    c = r["compile"]
    assert c["enabled"] and c["fullgraph_ok"] is True and c["graph_breaks"] == 0
    assert c["recompiles_after_warmup"] == 0
    assert c["cold_s"] > 0 and c["warm_s"] is not None and c["warm_s"] < c["cold_s"]


def test_bench_regional_counts_the_whole_forward_compile(monkeypatch):
    """A level whose forward region compiles on its second call (the delta rule, its chunks all at
    once: turned on for the CPU here): the compile phase is two steps, the region compiled whole,
    nothing recompiles after the warm-up."""
    monkeypatch.setenv("NLC_LINEAR_CHUNKS", "1")
    r = bench.run_bench(
        EX / "delta_rule.nl",
        dims=bench.parse_dims(TINY),
        batch_size=2,
        seq_len=2 * 64 + 5,
        steps=2,
        warmup=1,
        compile=True,
        compile_scope="regional",
        compile_times=False,
        device="cpu",
        ceilings=False,
    )
    c = r["compile"]
    assert c["compile_steps"] == 2 and c["fullgraph_ok"] is True and c["graph_breaks"] == 0
    assert c["recompiles_after_warmup"] == 0 and c["cold_s"] > 0
