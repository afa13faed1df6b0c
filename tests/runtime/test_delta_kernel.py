"""The delta rule's chunk recurrence as Triton kernels (``nlc.runtime.fused.delta``).

The op's values and the gradients of all its inputs are compared with :func:`delta.reference`
(plain torch, float64, autograd); then ``scan`` on a linear memory (dgd on ``dot``), taking the
kernels through ``linear_chunks``, is compared with the literal per-token reference in float64.
On CUDA the kernels run compiled with TF32 off; on the CPU through Triton's interpreter::

    TRITON_INTERPRET=1 NLC_FUSED=interpret python -m pytest tests/runtime/test_delta_kernel.py

Without Triton (the CPU wheel of torch) every case skips.
"""

from __future__ import annotations

import pytest
import torch

from nlc.runtime import fused
from nlc.runtime.chunk import RuleSpec, scan
from nlc.runtime.fused import delta
from nlc.runtime.memories import MemorySpec

from .test_chunk import compare, make_problem, seed_of

F64 = torch.float64


def _devices():
    out = []
    if torch.cuda.is_available() and fused.available():
        out.append("cuda")
    if fused.available() and type(delta._fwd_kernel).__name__ == "InterpretedFunction":
        out.append("cpu")
    return out or ["none"]


@pytest.fixture(params=_devices())
def device(request, monkeypatch):
    if request.param == "none":
        pytest.skip("needs Triton on CUDA, or its interpreter (TRITON_INTERPRET=1)")
    if request.param == "cpu":
        monkeypatch.setenv("NLC_FUSED", "interpret")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    return request.param


def _op_inputs(batch, n, C, DI, DO, read, seed, fu=True, z=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=F64) * scale

    W0 = r(*batch[1:], DO, DI, scale=DI**-0.5)  # shared over the first batch dimension
    gam = 0.5 + 0.5 * torch.rand(*batch, n, generator=g, dtype=F64)
    P = r(*batch, n, C, DI, scale=0.3 / C)
    wf = r(*batch, n, C, DO)
    Ae = torch.rand(*batch, n, C, generator=g, dtype=F64)
    Fu = r(*batch, n, C, DO, scale=0.3) if fu else None  # None: no such term
    a = r(*batch, n, C, DI, scale=DI**-0.5)
    qe = r(*batch, n, C, DI, scale=DI**-0.5) if read else None
    if z and read:  # a state-free part added to the read
        return [W0, gam, P, wf, Ae, Fu, a, qe, r(*batch, n, C, DO)]
    return [W0, gam, P, wf, Ae, Fu, a, qe]


def _outputs_and_grads(fn, leaves, device, dtype):
    leaves = [None if t is None else t.to(device, dtype).requires_grad_() for t in leaves]
    y, W = fn(*leaves)
    outs = [o for o in (y, W) if o is not None]
    g = torch.Generator().manual_seed(11)
    probe = sum((o.double().cpu() * torch.randn(o.shape, generator=g, dtype=F64)).sum() for o in outs)
    live = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(probe, live, allow_unused=True)  # unused: a zero gradient
    grads = [torch.zeros_like(t) if d is None else d for t, d in zip(live, grads)]
    return [o.detach().double().cpu() for o in outs], [d.double().cpu() for d in grads]


def _close(a, b, what, tol=2e-5):
    scale = 1.0 + b.abs().max().item()
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("read", [True, False])
@pytest.mark.parametrize(
    "DI,DO,fu,z", [(16, 16, True, False), (32, 16, True, False), (16, 128, True, False), (32, 64, False, True),
                   (16, 32, True, True)],
)  # fmt: skip
def test_recurrence_op_matches_reference(device, read, DI, DO, fu, z):
    """Values (read and end state) and the gradients of W0 (broadcast over the batch), the decays,
    P, wf, Ae, Fu (or without that term), the keys, the read's queries and a ``z`` added to the
    read (or none), float32 kernels against float64 torch; 128 rows take four blocks of 32."""
    leaves = _op_inputs((2, 3), 4, 16, DI, DO, read, seed_of("op", read, DI, DO, z), fu=fu, z=z)
    got = _outputs_and_grads(delta.run, leaves, device, torch.float32)
    want = _outputs_and_grads(delta.reference, leaves, "cpu", F64)
    names = ["y", "W_n"] if read else ["W_n"]
    for name, a, b in zip(names, got[0], want[0]):
        _close(a, b, name)
    gone = ({"Fu"} if not fu else set()) | ({"z"} if not z else set()) | (set() if read else {"qe", "z"})
    names = [x for x in ["W0", "gam", "P", "wf", "Ae", "Fu", "a", "qe", "z"] if x not in gone]
    assert len(got[1]) == len(names)
    for name, a, b in zip(names, got[1], want[1]):
        _close(a, b, f"grad of {name}")


@pytest.mark.parametrize("used", ["y", "W_n"])
def test_recurrence_op_with_one_output_unused(device, used):
    """Only the read, or only the end state, in the loss: the other output's gradient comes as
    None (not materialized) and the inputs' gradients still match the reference."""
    leaves = _op_inputs((2,), 3, 16, 32, 64, True, seed_of("unused", used))

    def only(fn):
        def call(*args):
            y, W = fn(*args)
            return (y, None) if used == "y" else (None, W)

        return call

    got = _outputs_and_grads(only(delta.run), leaves, device, torch.float32)
    want = _outputs_and_grads(only(delta.reference), leaves, "cpu", F64)
    _close(got[0][0], want[0][0], used)
    for name, a, b in zip(["W0", "gam", "P", "wf", "Ae", "Fu", "a", "qe"], got[1], want[1]):
        _close(a, b, f"grad of {name}")


def test_float64_keeps_the_float64_recurrence(device, monkeypatch):
    """A float64 computation never takes the float32 kernels (nor the inverse kernel)."""
    from nlc.runtime.fused import triangular

    calls = []
    real_run, real_inv = delta.run, triangular.unit_lower_inverse
    monkeypatch.setattr(delta, "run", lambda *a: calls.append("delta") or real_run(*a))
    monkeypatch.setattr(triangular, "unit_lower_inverse", lambda K: calls.append("inv") or real_inv(K))
    monkeypatch.setenv("NLC_LINEAR_CHUNKS", "1")
    spec, rule = MemorySpec("linear", 16, 16), RuleSpec("dgd")
    p = make_problem(spec, rule, B=1, H=2, T=2 * 16, seed=5)
    y, W, _ = scan(spec, "dot", rule, [w.to(device) for w in p["W0"]], None, p["k"].to(device),
                   p["v"].to(device), p["q"].to(device), p["eta"].to(device), p["alpha"].to(device),
                   None, chunk=16, read="causal")  # fmt: skip
    assert y.dtype == torch.float64 and W[0].dtype == torch.float64
    assert calls == []


@pytest.mark.parametrize("DI,DO", [(128, 128), (64, 32)])
def test_recurrence_op_under_bf16_autocast_tracks_float64(device, DI, DO):
    """Under bf16 autocast the products take bf16 operands (the state and every sum stay
    float32): values and gradients within bf16's rounding of the float64 reference."""
    if device != "cuda":
        pytest.skip("bf16 products: CUDA")
    leaves = _op_inputs((2, 3), 8, 64, DI, DO, True, seed_of("bf16", DI, DO))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _outputs_and_grads(delta.run, leaves, device, torch.float32)
    want = _outputs_and_grads(delta.reference, leaves, "cpu", F64)
    for name, a, b in zip(["y", "W_n"], got[0], want[0]):
        _close(a, b, name, tol=3e-2)
    for name, a, b in zip(["W0", "gam", "P", "wf", "Ae", "Fu", "a", "qe"], got[1], want[1]):
        _close(a, b, f"grad of {name}", tol=3e-2)


@pytest.mark.parametrize("chunks", ["1", "0"])  # each chunk's own part by its kernels, or not
@pytest.mark.parametrize("read", ["chunk", "causal"])
@pytest.mark.parametrize(
    "rule,gates,din,dout",
    [
        (RuleSpec("dgd"), "random", 16, 16),
        (RuleSpec("dgd"), "edges", 32, 16),
        (RuleSpec("dgd", dgd_form="normalized"), "random", 16, 32),
        (RuleSpec("dgd"), "no decay", 16, 16),
    ],
)
def test_scan_through_the_kernels_matches_the_per_token_reference(device, monkeypatch, rule, gates,
                                                                  din, dout, read, chunks):
    """``scan`` on a linear memory (dgd on ``dot``, period 16, three full chunks and a partial
    one) takes the kernels, in float32, and matches the per-token reference in float64: outputs,
    final state, and the gradients of W_0 (shared over the batch), k, v, q and the gates. With
    ``NLC_DELTA_CHUNKS=0`` each chunk's own part runs in ``linear_chunks``' batched products."""
    from nlc.runtime.fused import delta_chunks

    spec = MemorySpec("linear", din, dout)
    p = make_problem(spec, rule, B=2, H=2, T=3 * 16 + 5, seed=seed_of("scan", rule, gates, din),
                     gates="random" if gates == "no decay" else gates)  # fmt: skip
    if gates == "no decay":
        p["alpha"] = None
    g = torch.Generator().manual_seed(3)
    p["W0"] = [(torch.randn(2, dout, din, generator=g, dtype=F64) * din**-0.5).requires_grad_()]
    calls = []
    real, real_chunks = delta.run, delta_chunks.run
    monkeypatch.setattr(delta, "run", lambda *a: calls.append("delta") or real(*a))
    monkeypatch.setattr(delta_chunks, "run", lambda *a, **kw: calls.append("chunks") or real_chunks(*a, **kw))
    monkeypatch.setenv("NLC_LINEAR_CHUNKS", "1")  # on the CPU too
    monkeypatch.setenv("NLC_DELTA_CHUNKS", chunks)

    def on_device(spec, objective, rule, W0, S0, k, v, q, eta, alpha, beta, chunk, read):
        def mv(t):
            return None if t is None else t.to(device, torch.float32)

        y, W, _ = scan(spec, objective, rule, [mv(w) for w in W0], None, mv(k), mv(v), mv(q),
                       mv(eta), mv(alpha), None, chunk=chunk, read=read)  # fmt: skip
        return y.double().cpu(), [w.double().cpu() for w in W], None

    compare(spec, "dot", rule, p, 16, read, tol=1e-4, fn=on_device)
    assert "delta" in calls, "scan did not take the delta kernels"
    assert ("chunks" in calls) == (chunks == "1")


class _BigCopies:
    """Counts copies (``_to_copy``, ``copy_``, ``clone``) and negations (a ``-target`` made) of
    tensors with at least ``numel`` elements, forward and backward, while active (ops outside
    the custom ops: a dispatch mode does not see inside them)."""

    def __init__(self, numel: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.count = 0
        ops = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.clone.default,
               torch.ops.aten.neg.default}  # fmt: skip

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in ops and args[0].numel() >= numel:
                    outer.count += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


@pytest.mark.parametrize("decay", [True, False])
def test_scan_under_bf16_autocast_reads_bf16_operands_as_they_are(device, monkeypatch, decay):
    """Under bf16 autocast a model's bf16 keys, values and queries reach both kernels as they are
    and their gradients come back in bf16: no copy the size of the keys runs, forward or backward
    (``NLC_DELTA_OPERANDS=float32``, the float32 copies first, makes several: the count can
    fail). The read and end state equal that path's, the values' and queries' gradients too; the
    keys' (two bf16 parts summed, against a float32 sum rounded once) agree to bf16 rounding."""
    if device != "cuda":
        pytest.skip("bf16 products: CUDA")
    spec, rule = MemorySpec("linear", 32, 32), RuleSpec("dgd")
    g = torch.Generator().manual_seed(seed_of("bf16 operands", decay))
    B, H, T = 2, 2, 64
    k = torch.nn.functional.normalize(torch.randn(B, H, T, 32, generator=g), dim=-1)
    leaves = [k, torch.randn(B, H, T, 32, generator=g), torch.randn(B, H, T, 32, generator=g) * 32**-0.5]
    W0 = (torch.randn(H, 32, 32, generator=g) * 0.1).to(device)
    eta = torch.rand(B, H, T, generator=g).to(device)
    alpha = (0.9 + 0.1 * torch.rand(B, H, T, generator=g)).to(device) if decay else None
    probe = torch.randn(B, H, T, 32, generator=g).to(device)
    results = []
    for operands in ("own", "float32"):
        monkeypatch.setenv("NLC_DELTA_OPERANDS", operands)
        k, v, q = (x.to(device, torch.bfloat16).requires_grad_() for x in leaves)
        copies = _BigCopies(k.numel())
        with copies.mode, torch.autocast("cuda", dtype=torch.bfloat16):
            y, W, _ = scan(spec, "dot", rule, [W0], None, k, v, q, eta, alpha, None, chunk=16, read="causal")
            (y * probe).sum().backward()
        assert [x.grad.dtype for x in (k, v, q)] == [torch.bfloat16] * 3
        results.append((copies.count, y.detach(), W[0].detach(), k.grad, v.grad, q.grad))
    own, cast = results
    assert own[0] == 0, f"{own[0]} copies the size of the keys"
    assert cast[0] >= 3
    for name, a, b in zip(["y", "W", "dk", "dv", "dq"], own[1:], cast[1:]):
        tol = 1e-2 if name == "dk" else 1e-6
        _close(a.double().cpu(), b.double().cpu(), name, tol)


def test_scan_reads_bf16_operands_without_autocast(device, monkeypatch):
    """bf16 keys, values and queries without autocast (float32 products): the chunk kernel gets
    them as they are, the targets for ``-u`` (``neg_u``), and the recurrence takes a float32 copy
    of the keys (its operands' dtype); the read, end state and gradients match the path that
    copies all three to float32 first (``NLC_DELTA_OPERANDS=float32``, whose chunk kernel gets
    float32), the gradients to bf16 rounding, all of them in bf16."""
    from nlc.runtime.fused import delta_chunks

    given = []
    real = delta_chunks.run

    def spy(a, u, h, eta, dx, neg_u=False):
        given.append((a.dtype, u.dtype, h.dtype, neg_u))
        return real(a, u, h, eta, dx, neg_u=neg_u)

    monkeypatch.setattr(delta_chunks, "run", spy)
    spec, rule = MemorySpec("linear", 16, 32), RuleSpec("dgd")
    g = torch.Generator().manual_seed(seed_of("bf16 no autocast"))
    B, H, T = 2, 2, 48
    leaves = [torch.nn.functional.normalize(torch.randn(B, H, T, 16, generator=g), dim=-1),
              torch.randn(B, H, T, 32, generator=g), torch.randn(B, H, T, 16, generator=g) * 0.25]  # fmt: skip
    W0 = (torch.randn(H, 32, 16, generator=g) * 0.1).to(device)
    eta, alpha = torch.rand(B, H, T, generator=g).to(device), (0.9 + 0.1 * torch.rand(B, H, T, generator=g)).to(device)
    probe = torch.randn(B, H, T, 32, generator=g).to(device)
    monkeypatch.setenv("NLC_LINEAR_CHUNKS", "1")
    results = []
    for operands in ("own", "float32"):
        monkeypatch.setenv("NLC_DELTA_OPERANDS", operands)
        k, v, q = (x.to(device, torch.bfloat16).requires_grad_() for x in leaves)
        y, W, _ = scan(spec, "dot", rule, [W0], None, k, v, q, eta, alpha, None, chunk=16, read="causal")
        (y * probe).sum().backward()
        assert y.dtype == W[0].dtype == torch.float32
        assert [x.grad.dtype for x in (k, v, q)] == [torch.bfloat16] * 3
        results.append([t.detach().double().cpu() for t in (y, W[0], k.grad, v.grad, q.grad)])
    assert given == [(torch.bfloat16,) * 3 + (True,), (torch.float32,) * 3 + (True,)]
    for name, a, b in zip(["y", "W", "dk", "dv", "dq"], *results):
        _close(a, b, name, 1e-2 if name.startswith("d") else 1e-6)


@pytest.mark.parametrize("C", [16, 64, 128])
def test_unit_lower_inverse_matches_the_solve(device, C):
    """``fused.triangular.unit_lower_inverse`` (float32, forward substitution) against the
    triangular solve against the identity in float64; only the strictly lower part is read."""
    from nlc.runtime.fused import triangular

    g = torch.Generator().manual_seed(C)
    K = 0.3 * torch.randn(2, 3, C, C, generator=g, dtype=F64) / C**0.5
    got = triangular.unit_lower_inverse(K.to(device, torch.float32)).double().cpu()
    eye = torch.eye(C, dtype=F64).expand(K.shape)
    want = torch.linalg.solve_triangular(K.tril(-1), eye, upper=False, unitriangular=True)
    _close(got, want, "inverse", tol=1e-5)
    assert triangular.applies(K.to(device, torch.float32))


def test_kernels_decline(monkeypatch):
    monkeypatch.setenv("NLC_FUSED", "1")
    cuda = torch.device("cuda")
    assert delta.applies(128, 128, 64, 32, 128, cuda) == fused.available()
    assert not delta.applies(128, 128, 64, 32, 128, torch.device("cpu"))  # CPU: interpreter only
    for din, dout, C in [(24, 128, 64), (128, 128, 8), (512, 128, 64), (128, 128, 256), (128, 12, 64)]:
        assert not delta.applies(din, dout, C, 32, 128, cuda)
    from nlc.runtime.fused import triangular

    assert not triangular.applies(torch.zeros(2, 64, 64))  # a CPU tensor: the solve
    assert not triangular.applies(torch.zeros(2, 8, 8, dtype=torch.float64))


def test_the_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("NLC_DELTA_KERNEL", "0")
    assert not delta.applies(128, 128, 64, 32, 128, torch.device("cuda"))
    monkeypatch.setenv("NLC_DELTA_KERNEL", "1")
    monkeypatch.setenv("NLC_FUSED", "0")
    assert not delta.applies(128, 128, 64, 32, 128, torch.device("cuda"))
    from nlc.runtime.fused import triangular

    monkeypatch.setenv("NLC_FUSED", "interpret")
    monkeypatch.setenv("NLC_LINEAR_INVERSE", "solve")
    assert not triangular.applies(torch.zeros(2, 64, 64))


def test_a_bad_tuning_value_is_a_setting_error(monkeypatch):
    from nlc.diagnostics import SettingError

    for bad in ("rows=48", "rows=8", "bwd_stages=8", "warps=3", "colour=4"):
        monkeypatch.setenv("NLC_DELTA_TUNE", bad)
        with pytest.raises(SettingError, match="NLC_DELTA_TUNE"):
            delta._tune()
    monkeypatch.setenv("NLC_DELTA_TUNE", "rows=16,bwd_stages=3")
    assert delta._tune()["rows"] == 16 and delta._tune()["bwd_stages"] == 3
