"""Each chunk's own part of the delta rule as Triton kernels (``nlc.runtime.fused.delta_chunks``).

The op's four outputs and the gradients of all five inputs are compared with
:func:`delta_chunks.reference` (plain torch, float64, autograd). ``scan`` through these kernels is
compared with the per-token reference in ``test_delta_kernel.py``. On CUDA the kernels run
compiled with TF32 off; on the CPU through Triton's interpreter::

    TRITON_INTERPRET=1 NLC_FUSED=interpret python -m pytest tests/runtime/test_delta_chunks.py

Without Triton (the CPU wheel of torch) every case skips.
"""

from __future__ import annotations

import pytest
import torch

from nlc.runtime import fused
from nlc.runtime.chunk import decay_matrix
from nlc.runtime.fused import delta_chunks

from . import test_delta_kernel as _kernel_tests
from .test_chunk import seed_of

device = _kernel_tests.device  # the same fixture: CUDA, or Triton's interpreter on the CPU
_close = _kernel_tests._close

F64 = torch.float64
NAMES = ["a", "u", "h", "eta", "decays"]


def _inputs(batch, C, D, E, read, seed, shared_decays=False, zeros=False, decay=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, C, D, generator=g, dtype=F64) * D**-0.5
    u = torch.randn(*batch, C, E, generator=g, dtype=F64)
    h = torch.randn(*batch, C, D, generator=g, dtype=F64) * D**-0.5 if read else None
    eta = 0.2 + 0.8 * torch.rand(*batch, C, generator=g, dtype=F64)
    lead = batch[1:] if shared_decays else batch  # decays broadcast over the first dimension
    alpha = 0.6 + 0.4 * torch.rand(*lead, C, generator=g, dtype=F64)
    if zeros:  # some rates and decays exactly zero (a decay of 0 forgets everything before it)
        eta[..., 1::5] = 0.0
        alpha[..., 3::7] = 0.0
    dx = decay_matrix(alpha, C, dtype=F64) if decay else None  # None: the kernels' constant form
    return [a, u, h, eta, dx]


def _outputs_and_grads(fn, leaves, device, dtype, used=(0, 1, 2, 3)):
    leaves = [None if t is None else t.to(device, dtype).requires_grad_() for t in leaves]
    outs = fn(*leaves)
    g = torch.Generator().manual_seed(11)
    probe = sum(
        (outs[i].double().cpu() * torch.randn(outs[i].shape, generator=g, dtype=F64)).sum()
        for i in used if outs[i] is not None
    )  # fmt: skip
    live = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(probe, live, allow_unused=True)
    grads = [torch.zeros_like(t) if d is None else d for t, d in zip(live, grads)]
    outs = [o.detach().double().cpu() for o in outs if o is not None]
    return outs, [d.double().cpu() for d in grads]


def _check(got, want, read, tol=2e-5, decay=True):
    names = ["P", "s", "qe", "z"] if read else ["P", "s"]
    assert len(got[0]) == len(want[0]) == len(names)
    for name, x, y in zip(names, got[0], want[0]):
        _close(x, y, name, tol)
    names = [n for n in NAMES if (read or n != "h") and (decay or n != "decays")]
    assert len(got[1]) == len(want[1]) == len(names)
    for name, x, y in zip(names, got[1], want[1]):
        _close(x, y, f"grad of {name}", tol)


@pytest.mark.parametrize("read", [True, False])
@pytest.mark.parametrize(
    "C,D,E,block,gates",
    [(16, 16, 16, 64, "random"), (16, 32, 16, 16, "random"), (32, 16, 64, 16, "random"),
     (64, 32, 32, 64, "random"), (64, 16, 32, 16, "random"), (32, 32, 16, 32, "zeros"),
     (16, 32, 16, 16, "no decay"), (64, 32, 64, 32, "no decay")],
)  # fmt: skip
def test_chunks_op_matches_reference(device, monkeypatch, read, C, D, E, block, gates):
    """Values ``P, s, qe, z`` and the gradients of the keys, values, queries, rates and the
    decay matrix (broadcast over the batch's first dimension), float32 kernels against float64
    torch; ``block`` 16 takes the kernels' loops over several blocks of columns, ``C`` 64 the
    inverse's four diagonal blocks, ``zeros`` rates and decays that are exactly zero, ``no
    decay`` no decay matrix at all (the kernels' constant form, against the reference's matrix of
    ones)."""
    monkeypatch.setenv("NLC_DELTA_CHUNKS_TUNE", f"block={block},bwd_block={block}")
    decay = gates != "no decay"
    leaves = _inputs((2, 3), C, D, E, read, seed_of("chunks", read, C, D, E, gates), shared_decays=True,
                     zeros=gates == "zeros", decay=decay)  # fmt: skip
    got = _outputs_and_grads(delta_chunks.run, leaves, device, torch.float32)
    want = _outputs_and_grads(delta_chunks.reference, leaves, "cpu", F64)
    _check(got, want, read, decay=decay)


@pytest.mark.parametrize("decay", [True, False])
def test_chunks_op_with_joint_grams(device, monkeypatch, decay):
    """The forward's other form (``joint=1``: both grams in one loop over the keys, before the
    inverse) against the reference too."""
    monkeypatch.setenv("NLC_DELTA_CHUNKS_TUNE", "joint=1,block=16")
    leaves = _inputs((2,), 32, 32, 16, True, seed_of("chunks joint", decay), decay=decay)
    got = _outputs_and_grads(delta_chunks.run, leaves, device, torch.float32)
    want = _outputs_and_grads(delta_chunks.reference, leaves, "cpu", F64)
    _check(got, want, True, decay=decay)


@pytest.mark.parametrize(
    "dtype,tol,used", [(torch.float32, 2e-5, (0, 1, 2, 3)), (torch.bfloat16, 1e-2, (0, 1, 2, 3)),
                       (torch.float16, 2e-3, (0, 1, 2, 3)), (torch.bfloat16, 1e-2, (0,)),
                       (torch.bfloat16, 1e-2, (1, 3))],
)  # fmt: skip
def test_chunks_op_reads_low_precision_operands(device, dtype, tol, used):
    """Keys, values and queries in bf16 or float16 are read as they are (no float32 copy of
    them), the values given negated (``neg_u``: the targets themselves): outputs and gradients
    match the float64 reference of the same rounded values, and each gradient comes back in its
    input's dtype (a float32 sum rounded once: ``tol`` is that dtype's rounding; the interpreter
    truncates where a GPU rounds); ``used``: outputs left out of the loss come to the backward as
    None, zeros made in their own dtypes."""
    import functools

    leaves = _inputs((2, 3), 32, 32, 16, True, seed_of("chunks low", dtype), shared_decays=True)
    leaves = [x.to(dtype).to(F64) if i < 3 else x for i, x in enumerate(leaves)]  # values dtype holds
    live = [x.to(device, dtype if i < 3 else torch.float32).requires_grad_() for i, x in enumerate(leaves)]
    outs = delta_chunks.run(*live, neg_u=True)
    g = torch.Generator().manual_seed(11)
    probe = sum((outs[i].double().cpu() * torch.randn(outs[i].shape, generator=g, dtype=F64)).sum() for i in used)
    grads = torch.autograd.grad(probe, live, allow_unused=True)
    grads = [torch.zeros_like(t) if d is None else d for t, d in zip(live, grads)]
    assert [d.dtype for d in grads] == [x.dtype for x in live]
    got = [o.detach().double().cpu() for o in outs], [d.double().cpu() for d in grads]
    want = _outputs_and_grads(functools.partial(delta_chunks.reference, neg_u=True), leaves, "cpu", F64, used)
    _check(got, want, True, tol=tol)


@pytest.mark.parametrize("used", [(0,), (1, 3), (2,)])
def test_chunks_op_with_outputs_unused(device, used):
    """Outputs left out of the loss come to the backward as None (not materialized); the inputs'
    gradients still match the reference."""
    leaves = _inputs((3,), 16, 32, 16, True, seed_of("chunks unused", used))
    got = _outputs_and_grads(delta_chunks.run, leaves, device, torch.float32, used)
    want = _outputs_and_grads(delta_chunks.reference, leaves, "cpu", F64, used)
    _check(got, want, True)


@pytest.mark.parametrize("tf32,tbf16", [(False, 0), (True, 0), (True, 1)])
@pytest.mark.parametrize("C,D,E", [(64, 128, 128), (32, 64, 32)])
def test_chunks_op_under_bf16_autocast_tracks_float64(device, monkeypatch, C, D, E, tf32, tbf16):
    """Under bf16 autocast the key and query products take bf16 operands (the inverse and the
    products with it stay float32): values and gradients within bf16's rounding. With TF32 on,
    at the benchmark's size (4,096 chunks): the case whose bf16 and TF32 products in one kernel
    read shared memory out of range (``delta_chunks._precisions``). ``tbf16``: the products with
    the inverse in bf16 too, within the same bound."""
    if device != "cuda":
        pytest.skip("bf16 products: CUDA")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    monkeypatch.setenv("NLC_DELTA_CHUNKS_TUNE", f"tbf16={tbf16}")
    batch = (8, 16, 32) if tf32 and C == 64 else (2, 4)
    leaves = _inputs(batch, C, D, E, True, seed_of("chunks bf16", C, D, E))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _outputs_and_grads(delta_chunks.run, leaves, device, torch.float32)
    want = _outputs_and_grads(delta_chunks.reference, leaves, device, F64)  # float64 on the GPU
    _check(got, want, True, tol=3e-2)


def test_chunks_kernels_decline(monkeypatch):
    monkeypatch.setenv("NLC_FUSED", "1")
    cuda = torch.device("cuda")
    assert delta_chunks.applies(128, 128, 64, 4096, cuda) == fused.available()
    assert not delta_chunks.applies(128, 128, 64, 4096, torch.device("cpu"))
    for din, dout, C in [(24, 128, 64), (128, 128, 8), (128, 128, 128), (128, 12, 64), (128, 2048, 64)]:
        assert not delta_chunks.applies(din, dout, C, 4096, cuda)
    monkeypatch.setenv("NLC_FUSED", "interpret")
    monkeypatch.setenv("NLC_DELTA_CHUNKS", "0")
    assert not delta_chunks.applies(128, 128, 64, 4096, cuda)


def test_a_bad_tuning_value_is_a_setting_error(monkeypatch):
    from nlc.diagnostics import SettingError

    for bad in ("block=48", "bwd_warps=3", "rows=32", "unroll=3", "bwd_maxnreg=100", "joint=2", "bwd_joint=1",
                "tbf16=2"):
        monkeypatch.setenv("NLC_DELTA_CHUNKS_TUNE", bad)
        with pytest.raises(SettingError, match="NLC_DELTA_CHUNKS_TUNE"):
            delta_chunks._tune()
    monkeypatch.setenv("NLC_DELTA_CHUNKS_TUNE", "block=16,bwd_warps=4")
    assert delta_chunks._tune() == dict(delta_chunks.TUNE, block=16, bwd_warps=4)


@pytest.mark.parametrize("read,decays,low,own", [(True, True, False, False), (False, True, False, False),
                                                  (True, False, False, False), (False, False, False, False),
                                                  (True, None, False, False), (False, None, False, False),
                                                  (True, None, True, False), (False, True, True, False),
                                                  (True, None, True, True), (True, True, False, True)])  # fmt: skip
def test_chunks_op_passes_opcheck(device, read, decays, low, own):
    """``torch.library.opcheck`` on ``nlc::delta_chunks``: its schema, fake tensors (the shapes and
    strides compiled callers plan with), autograd registration and AOT dispatch, with and without
    the read, with decays that need a gradient or not, or none (an empty decay matrix), with
    ``P``, ``qe`` written in bf16 (``low``), and with bf16 keys, values and queries read as they
    are, the values negated (``own``)."""
    a, u, h, eta, dx = (t if t is None else t.float().to(device) for t in _inputs((3,), 16, 32, 16, read, 7))
    if own:
        a, u, h = (t if t is None else t.bfloat16() for t in (a, u, h))
    for t in (a, u, h, eta):
        if t is not None:
            t.requires_grad_()
    if decays is None:
        dx = a.new_empty(0)
    else:
        dx.requires_grad_(decays)
    args = (a, u, h if read else a.new_empty(0), eta, dx, read, low, "ieee", "ieee", own)
    torch.library.opcheck(delta_chunks.delta_chunks, args)
    with torch.no_grad():  # the backward op on its own (no autograd of its own)
        p, wf, qe, z, t = delta_chunks.delta_chunks(*args)
        grads = [torch.randn_like(x) if x.numel() else x for x in (p, wf, qe, z)]  # in each dtype
        inputs = [x.detach() for x in args[:5]]
        args = (*inputs, t, p, wf, *grads, read, bool(decays), "ieee", "ieee", own)
    torch.library.opcheck(delta_chunks.delta_chunks_backward, args)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("fu", [True, False])
@pytest.mark.parametrize("read", [True, False])
def test_recurrence_op_passes_opcheck(device, read, fu, bf16):
    """``torch.library.opcheck`` on ``nlc::delta_recurrence`` (``fused.delta``) and on its backward
    op alone, with and without the read, with and without its ``Fu`` term, with the read's ``z``
    added (without ``Fu``), in float32 or with bf16 operands ``P``, ``a``, ``qe`` (their gradients
    come in bf16)."""
    from nlc.runtime.fused import delta

    g = torch.Generator().manual_seed(3)
    N, n, C, DI, DO = 2, 3, 16, 16, 32
    od = torch.bfloat16 if bf16 else torch.float32

    def r(*shape, scale=0.3, dtype=torch.float32):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    qe = r(N, n, C, DI, dtype=od) if read else torch.empty(0, device=device, dtype=od)
    Fu = r(N, n, C, DO) if fu else torch.empty(0, device=device)
    z = r(N, n, C, DO) if read and not fu else torch.empty(0, device=device)  # added to the read
    args = (r(N, DO, DI), r(N, n), r(N, n, C, DI, scale=0.02, dtype=od), r(N, n, C, DO), r(N, n, C), Fu,
            r(N, n, C, DI, dtype=od), qe, z, read, "bf16" if bf16 else "ieee")  # fmt: skip
    torch.library.opcheck(delta.delta_recurrence, args)
    with torch.no_grad():  # the backward op on its own
        _, wn, ws, rr = delta.delta_recurrence(*args)
        dy = torch.randn_like(rr) if read else torch.empty(0, device=device)
        bargs = (*(x.detach() for x in (args[1], args[2], args[4], args[5], args[6], args[7])), ws, rr, dy,
                 torch.randn_like(wn), read, args[-1])  # fmt: skip
        got = delta.delta_recurrence_backward(*bargs)
    dP, da, dqe = got[2], got[6], got[7]  # in the operands' dtype
    assert dP.dtype == da.dtype == od and (dqe.dtype == od or not read)
    torch.library.opcheck(delta.delta_recurrence_backward, bargs)


def test_sequence_without_queries_through_the_kernels(device, monkeypatch):
    """A memory that is only written (no queries) takes both kernels in ``linear_chunks`` and
    matches ``linear_chunks``' own float64 computation (itself checked against the per-token
    reference in ``test_delta_kernel.py``): the end state and the gradients of W_0, the keys, the
    targets, the rates and the decays."""
    from nlc.runtime import linear_chunks
    from nlc.runtime.chunk import RuleSpec
    from nlc.runtime.memories import MemorySpec

    spec, rule = MemorySpec("linear", 16, 32), RuleSpec("dgd")
    g = torch.Generator().manual_seed(5)
    B, H, T, C = 2, 2, 48, 16
    leaves = [
        torch.randn(H, 32, 16, generator=g, dtype=F64) * 0.2,  # W0, shared over the batch
        torch.nn.functional.normalize(torch.randn(B, H, T, 16, generator=g, dtype=F64), dim=-1),
        torch.randn(B, H, T, 32, generator=g, dtype=F64),
        torch.rand(B, H, T, generator=g, dtype=F64),
        0.8 + 0.2 * torch.rand(B, H, T, generator=g, dtype=F64),
    ]
    calls = []
    real = delta_chunks.run
    monkeypatch.setattr(delta_chunks, "run", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("NLC_LINEAR_CHUNKS", "1")
    probe = torch.randn(B, H, 32, 16, generator=g, dtype=F64)
    results = []
    for dev, dt in ((device, torch.float32), ("cpu", F64)):
        W0, k, tgt, eta, alpha = (t.to(dev, dt).requires_grad_() for t in leaves)
        y, W = linear_chunks.sequence(spec, rule, W0, k, tgt, None, eta, alpha, C, "causal")
        assert y is None
        grads = torch.autograd.grad((W.double().cpu() * probe).sum(), [W0, k, tgt, eta, alpha])
        results.append([W.detach().double().cpu(), *(d.double().cpu() for d in grads)])
    assert len(calls) == 1, "the float32 computation did not take the chunk kernels"
    for name, a, b in zip(["W", "W0", "k", "target", "eta", "alpha"], *results):
        _close(a, b, name, tol=1e-4)


def test_the_solve_switch_takes_the_batched_products(monkeypatch):
    """``NLC_LINEAR_INVERSE=solve`` means cuBLAS's solve, which only the batched products use: it
    turns the chunk kernels off in ``linear_chunks``."""
    from nlc.runtime import linear_chunks

    monkeypatch.setenv("NLC_FUSED", "interpret")
    monkeypatch.setattr(linear_chunks._delta, "triton", object())  # as if Triton were present
    cuda = torch.device("cuda")
    assert linear_chunks._fused_applies(128, 128, 64, 32, 128, cuda)
    monkeypatch.setenv("NLC_LINEAR_INVERSE", "solve")
    assert not linear_chunks._fused_applies(128, 128, 64, 32, 128, cuda)
