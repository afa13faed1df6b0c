"""The chunk-parallel runtime against the literal per-token reference (float64).

Every cell compares outputs, final states and the gradients of a random scalar outer loss with
respect to W_0, S_0, k, target, q, eta, alpha and beta.
"""

from __future__ import annotations

import itertools
import zlib
from functools import partial

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nlc.reference import memory_scan
from nlc.runtime.chunk import (
    RuleSpec,
    chunk_step,
    chunk_step_autograd,
    decay_matrix,
    scan,
)
from nlc.runtime.memories import MemorySpec, forward, init_weights, layer_inputs

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention (and noise on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MEMORIES = {
    "linear": ("linear", 1, "silu"),
    "mlp1": ("mlp", 1, "silu"),
    "mlp2": ("mlp", 2, "silu"),
    "mlp3": ("mlp", 3, "gelu_tanh"),
    "res1": ("residual_mlp", 1, "silu"),
    "res2": ("residual_mlp", 2, "tanh"),
    "res3": ("residual_mlp", 3, "gelu"),
    "swiglu": ("swiglu", 1, "silu"),
}
RULES = {
    "gd": RuleSpec("gd"),
    "momentum": RuleSpec("momentum"),
    "dgd_eq88": RuleSpec("dgd"),
    "dgd_normalized": RuleSpec("dgd", dgd_form="normalized"),
    "dgd_momentum": RuleSpec("dgd", momentum=True),
}
OBJECTIVES = ("dot", "l2", "huber")
READS = ("chunk", "causal")
# periods 1, 2, 3 run on the first T_SHORT tokens (2 and 3 do not divide 7: a partial last
# chunk); period 16 runs on all T_LONG tokens (one full chunk of 16 plus a partial one)
T_SHORT, T_LONG = 7, 17
PERIODS = ((1, T_SHORT), (2, T_SHORT), (3, T_SHORT), (16, T_LONG))


def make_spec(
    name: str, din: int = 3, hidden: int = 4, dout: int | None = None
) -> MemorySpec:
    kind, depth, act = MEMORIES[name]
    dout = din if (dout is None or kind == "residual_mlp") else dout
    return MemorySpec(kind, din, dout, hidden=hidden, depth=depth, act=act)


def make_problem(spec, rule, *, B=2, H=2, T=T_LONG, seed=0, dtype=F64, gates="random"):
    """Leaf tensors (requires_grad) of one problem; small gates keep the states O(1)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    def uni(lo, hi):
        return lo + (hi - lo) * torch.rand(B, H, T, generator=g, dtype=dtype)

    W0 = init_weights(spec, B_shape=(B, H), generator=g, dtype=dtype)
    S0 = [rnd(*w.shape, scale=0.1) for w in W0] if rule.uses_momentum else None
    p = {
        "W0": W0,
        "S0": S0,
        "k": rnd(B, H, T, spec.din, scale=spec.din**-0.5),
        "v": rnd(B, H, T, spec.dout),
        "q": rnd(B, H, T, spec.din, scale=spec.din**-0.5),
        "eta": uni(0.0, 0.3),
        "alpha": uni(0.6, 1.0),
        "beta": uni(0.0, 0.9) if rule.uses_momentum else None,
    }
    if gates == "edges":
        # alpha in {0, 1, random}, beta in {0, random}, eta in {0, random}
        sel = torch.randint(0, 3, (B, H, T), generator=g)
        p["alpha"] = torch.where(sel == 0, 0.0, torch.where(sel == 1, 1.0, p["alpha"]))
        if p["beta"] is not None:
            p["beta"] = torch.where(
                torch.rand(B, H, T, generator=g, dtype=dtype) < 0.4, 0.0, p["beta"]
            )
        p["eta"] = torch.where(
            torch.rand(B, H, T, generator=g, dtype=dtype) < 0.3, 0.0, p["eta"]
        )
    for val in p.values():
        if isinstance(val, list):
            for t in val:
                t.requires_grad_(True)
        elif val is not None:
            val.requires_grad_(True)
    return p


def leaves(p):
    out = list(p["W0"]) + list(p["S0"] or [])
    out += [
        p[key] for key in ("k", "v", "q", "eta", "alpha", "beta") if p[key] is not None
    ]
    return out


def run(fn, spec, objective, rule, p, chunk, read, T=None, **kw):
    """Outputs, final states and the gradients of a fixed random outer loss (on the first T
    tokens when T is given)."""
    seq = {key: p[key] for key in ("k", "v", "q", "eta", "alpha", "beta")}
    if T is not None:
        seq = {key: (x[:, :, :T] if x is not None else None) for key, x in seq.items()}
    y, W, S = fn(
        spec,
        objective,
        rule,
        p["W0"],
        p["S0"],
        seq["k"],
        seq["v"],
        seq["q"],
        seq["eta"],
        seq["alpha"],
        seq["beta"],
        chunk,
        read,
        **kw,
    )
    g = torch.Generator().manual_seed(1234)

    def coef(t):
        return torch.randn(t.shape, generator=g, dtype=t.dtype)

    outer = (y * coef(y)).sum() + sum((w * coef(w)).sum() for w in W)
    if S is not None:
        outer = outer + sum((s * coef(s)).sum() for s in S)
    grads = torch.autograd.grad(outer, leaves(p), allow_unused=True)
    return [y, *W, *(S or [])], list(grads)


def assert_close(a, b, tol=1e-10, what=""):
    assert a.shape == b.shape, what
    scale = 1.0 + b.abs().max().item()
    torch.testing.assert_close(
        a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}"
    )


def compare(spec, objective, rule, p, chunk, read, tol=1e-10, fn=scan, T=None, **kw):
    vals, grads = run(fn, spec, objective, rule, p, chunk, read, T, **kw)
    rvals, rgrads = run(memory_scan, spec, objective, rule, p, chunk, read, T)
    names = (
        ["y"]
        + [f"W{i}" for i in range(len(p["W0"]))]
        + [f"S{i}" for i in range(len(p["S0"] or []))]
    )
    for name, a, b in zip(names, vals, rvals):
        assert_close(a, b, tol, f"{name} (chunk={chunk}, read={read})")
    for i, (a, b) in enumerate(zip(grads, rgrads)):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
            continue
        assert_close(a, b, tol, f"grad of leaf {i} (chunk={chunk}, read={read})")
    return vals


def seed_of(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) % 10_000


# ------------------------------------------------------------------------------------------
# the full matrix


@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("mem", list(MEMORIES))
def test_scan_matches_reference(mem, objective, rule_name):
    spec, rule = make_spec(mem), RULES[rule_name]
    p = make_problem(spec, rule, seed=seed_of(mem, objective, rule_name))
    for chunk, T in PERIODS:
        states = {}
        for read in READS:
            vals = compare(spec, objective, rule, p, chunk, read, T=T)
            states[read] = vals[1:]
        # the writes do not depend on the read mode
        for a, b in zip(states["chunk"], states["causal"]):
            assert_close(a, b, 1e-12, f"chunk vs causal states (chunk={chunk})")


@pytest.mark.parametrize(
    "mem,rule",
    [
        ("mlp3", RuleSpec("dgd", momentum=True, dgd_form="normalized")),
        ("mlp2", RuleSpec("dgd", dgd_layers="input")),
        (
            "swiglu",
            RuleSpec("dgd", momentum=True, dgd_layers="input", dgd_form="normalized"),
        ),
        ("res2", RuleSpec("gd", momentum=True)),  # gd + momentum is the momentum rule
    ],
)
@pytest.mark.parametrize("read", READS)
def test_scan_matches_reference_more_rules(mem, rule, read):
    spec = make_spec(mem)
    p = make_problem(spec, rule, T=9, seed=seed_of(mem, rule, read))
    for chunk in (1, 4):
        compare(spec, "l2", rule, p, chunk, read)


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    mem=st.sampled_from(list(MEMORIES)),
    objective=st.sampled_from(OBJECTIVES),
    kind=st.sampled_from(["gd", "momentum", "dgd"]),
    dgd_momentum=st.booleans(),
    form=st.sampled_from(["eq88", "normalized"]),
    layers=st.sampled_from(["all", "input"]),
    read=st.sampled_from(READS),
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    T=st.integers(1, 20),
    chunk=st.integers(1, 20),
    din=st.integers(1, 6),
    dout=st.integers(1, 6),
    hidden=st.integers(1, 6),
    gates=st.sampled_from(["random", "edges"]),
    seed=st.integers(0, 2**16),
)
def test_scan_matches_reference_random(
    mem,
    objective,
    kind,
    dgd_momentum,
    form,
    layers,
    read,
    B,
    H,
    T,
    chunk,
    din,
    dout,
    hidden,
    gates,
    seed,
):
    rule = RuleSpec(
        kind, momentum=dgd_momentum and kind == "dgd", dgd_form=form, dgd_layers=layers
    )
    spec = make_spec(mem, din=din, hidden=hidden, dout=dout)
    p = make_problem(spec, rule, B=B, H=H, T=T, seed=seed, gates=gates)
    compare(spec, objective, rule, p, chunk, read, tol=1e-9)


# ------------------------------------------------------------------------------------------
# period 1, read modes, gate edges


@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize("mem", ["linear", "res2", "swiglu"])
def test_period_one_causal_is_chunk_read_one_token_later(mem, rule_name):
    """At period 1 token t's causal read sees W_t; the chunk read of token t+1 sees the same
    state, so causal outputs equal chunk outputs with the queries shifted by one token."""
    spec, rule = make_spec(mem), RULES[rule_name]
    p = make_problem(spec, rule, T=8, seed=seed_of(mem, rule_name))
    with torch.no_grad():
        y_causal, _W_c, _ = scan(
            spec,
            "l2",
            rule,
            p["W0"],
            p["S0"],
            p["k"],
            p["v"],
            p["q"],
            p["eta"],
            p["alpha"],
            p["beta"],
            1,
            "causal",
        )

        def pad(t):  # one extra token at the end (its values do not matter)
            if t.dim() == 3:
                return torch.cat([t, t[..., -1:]], dim=-1)
            return torch.cat([t, t[..., -1:, :]], dim=-2)

        q_shift = torch.cat([p["q"][..., :1, :], p["q"]], dim=-2)
        y_chunk, _, _ = scan(
            spec,
            "l2",
            rule,
            p["W0"],
            p["S0"],
            pad(p["k"]),
            pad(p["v"]),
            q_shift,
            pad(p["eta"]),
            pad(p["alpha"]),
            pad(p["beta"]) if p["beta"] is not None else None,
            1,
            "chunk",
        )
    assert_close(y_causal, y_chunk[..., 1:, :], 1e-12)


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize("mem", ["linear", "mlp2", "swiglu"])
def test_gate_edges(mem, rule_name, read):
    """alpha in {0, 1}, beta = 0, eta = 0 at random tokens: values and gradients exact."""
    spec, rule = make_spec(mem), RULES[rule_name]
    p = make_problem(spec, rule, T=9, seed=seed_of(mem, rule_name, read), gates="edges")
    assert (p["alpha"] == 0).any() and (p["alpha"] == 1).any() and (p["eta"] == 0).any()
    for chunk in (1, 4):
        compare(spec, "l2", rule, p, chunk, read)


@pytest.mark.parametrize("rule_name", list(RULES))
def test_gate_extremes(rule_name):
    spec, rule = make_spec("mlp2"), RULES[rule_name]
    p = make_problem(spec, rule, T=6, seed=7)
    with torch.no_grad():
        zero = torch.zeros_like(p["eta"])
        y, W, S = scan(
            spec,
            "l2",
            rule,
            p["W0"],
            p["S0"],
            p["k"],
            p["v"],
            p["q"],
            zero,
            torch.ones_like(zero),
            zero if rule.uses_momentum else None,
            3,
            "causal",
        )
        # eta = 0, alpha = 1, beta = 0: no write, no decay, the momentum is dropped
        for w, w0 in zip(W, p["W0"]):
            assert_close(w, w0, 1e-14)
        for s in S or []:
            assert torch.count_nonzero(s) == 0
        assert_close(y, forward(spec, p["W0"], p["q"]), 1e-14)
        # alpha = 0 everywhere: each token's update starts from W = 0
        y, W, S = scan(
            spec,
            "l2",
            rule,
            p["W0"],
            p["S0"],
            p["k"],
            p["v"],
            p["q"],
            p["eta"],
            zero,
            p["beta"],
            3,
            "causal",
        )
        rv, rW, rS = memory_scan(
            spec,
            "l2",
            rule,
            p["W0"],
            p["S0"],
            p["k"],
            p["v"],
            p["q"],
            p["eta"],
            zero,
            p["beta"],
            3,
            "causal",
        )
        for a, b in zip([y, *W, *(S or [])], [rv, *rW, *(rS or [])]):
            assert_close(a, b)


# ------------------------------------------------------------------------------------------
# the reference against the paper's equations written by hand


def _mat(p, name, t=None):
    x = p[name].detach()
    return x[0, 0] if t is None else x[0, 0, t]


def test_reference_linear_attention():
    """linear + dot + gd, alpha = 1, period 1, causal read: M_t = M_{t-1} + eta_t v_t k_t^T,
    y_t = M_t q_t (paper eqs 14-18)."""
    spec, rule = make_spec("linear"), RULES["gd"]
    p = make_problem(spec, rule, B=1, H=1, T=6, seed=5)
    M = p["W0"][0].detach()[0, 0].clone()
    ys = []
    for t in range(6):
        M = M + _mat(p, "eta", t) * torch.outer(_mat(p, "v", t), _mat(p, "k", t))
        ys.append(M @ _mat(p, "q", t))
    for fn in (memory_scan, scan):
        y, W, _ = fn(
            spec,
            "dot",
            rule,
            p["W0"],
            None,
            p["k"],
            p["v"],
            p["q"],
            p["eta"],
            None,
            None,
            1,
            "causal",
        )
        assert_close(y[0, 0].detach(), torch.stack(ys))
        assert_close(W[0][0, 0].detach(), M)


def test_reference_dgd_eq93():
    """linear + l2 + dgd(eq88), chunk C: W_t = W_{t-1}(alpha_t I - eta_t k k^T)
    - eta_t (W_0 k_t - v_t) k_t^T, every gradient at the chunk-start W_0 (paper eq 93)."""
    spec, rule = make_spec("linear"), RULES["dgd_eq88"]
    p = make_problem(spec, rule, B=1, H=1, T=7, seed=6)
    C = 3
    W = p["W0"][0].detach()[0, 0].clone()
    ys = []
    for c0 in range(0, 7, C):
        W0 = W.clone()
        for t in range(c0, min(c0 + C, 7)):
            k, v = _mat(p, "k", t), _mat(p, "v", t)
            eta, alpha = _mat(p, "eta", t), _mat(p, "alpha", t)
            W = W @ (
                alpha * torch.eye(3, dtype=F64) - eta * torch.outer(k, k)
            ) - eta * torch.outer(W0 @ k - v, k)
            ys.append(W0 @ _mat(p, "q", t))
    for fn in (memory_scan, scan):
        y, Wf, _ = fn(
            spec,
            "l2",
            rule,
            p["W0"],
            None,
            p["k"],
            p["v"],
            p["q"],
            p["eta"],
            p["alpha"],
            None,
            C,
            "chunk",
        )
        assert_close(y[0, 0].detach(), torch.stack(ys))
        assert_close(Wf[0][0, 0].detach(), W)


def test_reference_titans_eq16():
    """linear + l2 + gd with decay, one chunk: W_C = g_C W_0 - sum_i eta_i (g_C / g_i)
    (W_0 k_i - v_i) k_i^T with g_i = prod_{j<=i} alpha_j (Titans eq 16-17)."""
    spec, rule = make_spec("linear"), RULES["gd"]
    p = make_problem(spec, rule, B=1, H=1, T=5, seed=8)
    W0 = p["W0"][0].detach()[0, 0]
    gam = torch.cumprod(_mat(p, "alpha"), 0)
    W = gam[-1] * W0
    for i in range(5):
        k, v = _mat(p, "k", i), _mat(p, "v", i)
        W = W - _mat(p, "eta", i) * gam[-1] / gam[i] * torch.outer(W0 @ k - v, k)
    for fn in (memory_scan, scan):
        _, Wf, _ = fn(
            spec,
            "l2",
            rule,
            p["W0"],
            None,
            p["k"],
            p["v"],
            p["q"],
            p["eta"],
            p["alpha"],
            None,
            5,
            "chunk",
        )
        assert_close(Wf[0][0, 0].detach(), W)


def test_momentum_matches_torch_sgd():
    """Constant eta and beta, alpha = 1, period 1: the momentum rule is SGD with momentum
    (dampening 0) on the per-token inner loss."""
    spec, rule = make_spec("mlp2"), RULES["momentum"]
    p = make_problem(spec, rule, B=1, H=1, T=6, seed=9)
    lr, mu = 0.2, 0.7
    params = [torch.nn.Parameter(w.detach()[0, 0].clone()) for w in p["W0"]]
    opt = torch.optim.SGD(params, lr=lr, momentum=mu)
    for t in range(6):
        opt.zero_grad()
        y = forward(spec, params, p["k"].detach()[0, 0, t : t + 1])
        (0.5 * ((y - p["v"].detach()[0, 0, t : t + 1]) ** 2).sum()).backward()
        opt.step()
    full = torch.ones(1, 1, 6, dtype=F64)
    _, W, _ = scan(
        spec,
        "l2",
        rule,
        [w.detach() for w in p["W0"]],
        None,
        p["k"].detach(),
        p["v"].detach(),
        None,
        lr * full,
        None,
        mu * full,
        1,
    )
    for w, prm in zip(W, params):
        assert_close(w[0, 0], prm.detach(), 1e-12)


# ------------------------------------------------------------------------------------------
# isolation, broadcasting, dtypes


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize("mem", ["mlp2", "swiglu"])
def test_batch_isolation(mem, rule_name, read):
    spec, rule = make_spec(mem), RULES[rule_name]
    p = make_problem(spec, rule, B=3, H=2, T=7, seed=11)
    args = lambda d: (
        spec,
        "l2",
        rule,
        d["W0"],
        d["S0"],
        d["k"],
        d["v"],
        d["q"],
        d["eta"],
        d["alpha"],
        d["beta"],
        3,
        read,
    )
    with torch.no_grad():
        y, W, S = scan(*args(p))
        g = torch.Generator().manual_seed(0)
        p2 = {}
        for key, val in p.items():
            if val is None:
                p2[key] = None
                continue
            vals = val if isinstance(val, list) else [val]
            new = []
            for t in vals:
                t = t.detach().clone()
                t[1] = t[1] + torch.rand(
                    t[1].shape, generator=g, dtype=t.dtype
                )  # sequence b' = 1 only
                new.append(t)
            p2[key] = new if isinstance(val, list) else new[0]
        y2, W2, S2 = scan(*args(p2))
    assert not torch.equal(y[1], y2[1])
    for b in (0, 2):
        assert torch.equal(y[b], y2[b])
        for a, c in zip(W + (S or []), W2 + (S2 or [])):
            assert torch.equal(a[b], c[b])


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("rule_name", ["gd", "momentum", "dgd_momentum"])
@pytest.mark.parametrize("shared_keys", [False, True])
def test_a_step_without_its_update_reads_the_same(rule_name, read, shared_keys):
    """``update=False`` (a chunk whose end state nothing reads): the read and its gradients of the
    full step, and no end states. With the keys as queries too (``q is k``) for a chunk read."""
    spec, rule = make_spec("res2"), RULES[rule_name]
    p = make_problem(spec, rule, B=2, H=2, T=5, seed=21)
    q = p["k"] if shared_keys and read == "chunk" else p["q"]
    args = (spec, "l2", rule, p["W0"], p["S0"], p["k"], p["v"], q, p["eta"], p["alpha"], p["beta"])
    y, W, _ = chunk_step(*args, read=read)
    y0, W0, S0 = chunk_step(*args, read=read, update=False)
    assert W0 is None and S0 is None and W is not None
    assert_close(y0, y)
    leaves = [t for t in (*p["W0"], p["k"], q, p["eta"]) if t.requires_grad]
    ga = torch.autograd.grad((y0 * y0.cos()).sum(), leaves, allow_unused=True)
    gb = torch.autograd.grad((y * y.cos()).sum(), leaves, allow_unused=True)
    for a, b, t in zip(ga, gb, leaves):  # an unused input (eta for a chunk read) as zeros
        assert_close(torch.zeros_like(t) if a is None else a, torch.zeros_like(t) if b is None else b)
    assert chunk_step(*args[:7], None, *args[8:], read=read, update=False) == (None, None, None)


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("rule_name", ["gd", "dgd_momentum"])
def test_shared_initial_state_broadcasts(rule_name, read):
    """A learned initial state [H, out, in] broadcasts over B; its gradient is the sum of the
    per-sequence gradients."""
    spec, rule = make_spec("res2"), RULES[rule_name]
    p = make_problem(spec, rule, B=2, H=2, T=6, seed=12)
    shared = [w.detach()[0].clone().requires_grad_(True) for w in p["W0"]]
    out = scan(
        spec,
        "l2",
        rule,
        shared,
        p["S0"],
        p["k"],
        p["v"],
        p["q"],
        p["eta"],
        p["alpha"],
        p["beta"],
        4,
        read,
    )
    expanded = [
        w.detach()[0].expand_as(w0).clone().requires_grad_(True)
        for w, w0 in zip(p["W0"], p["W0"])
    ]
    ref = memory_scan(
        spec,
        "l2",
        rule,
        expanded,
        p["S0"],
        p["k"],
        p["v"],
        p["q"],
        p["eta"],
        p["alpha"],
        p["beta"],
        4,
        read,
    )
    assert out[0].shape == ref[0].shape and all(
        a.shape == b.shape for a, b in zip(out[1], ref[1])
    )
    for a, b in zip([out[0], *out[1]], [ref[0], *ref[1]]):
        assert_close(a, b)
    loss = lambda o: (o[0] ** 2).sum() + sum((w**2).sum() for w in o[1])
    g_shared = torch.autograd.grad(loss(out), shared)
    g_exp = torch.autograd.grad(loss(ref), expanded)
    for a, b in zip(g_shared, g_exp):
        assert_close(a, b.sum(0))


def test_float32_and_dtype_promotion():
    spec, rule = make_spec("swiglu"), RULES["dgd_momentum"]
    p = make_problem(spec, rule, T=10, seed=13)
    ref, rW, rS = memory_scan(
        spec,
        "l2",
        rule,
        p["W0"],
        p["S0"],
        p["k"],
        p["v"],
        p["q"],
        p["eta"],
        p["alpha"],
        p["beta"],
        4,
        "causal",
    )
    f32 = {
        k: (
            [t.detach().float() for t in v]
            if isinstance(v, list)
            else v.detach().float()
        )
        for k, v in p.items()
        if v is not None
    }
    f32["S0"] = f32.get("S0")
    y, W, S = scan(
        spec,
        "l2",
        rule,
        f32["W0"],
        f32["S0"],
        f32["k"],
        f32["v"],
        f32["q"],
        f32["eta"],
        f32["alpha"],
        f32["beta"],
        4,
        "causal",
    )
    assert (
        y.dtype == torch.float32
        and W[0].dtype == torch.float32
        and S[0].dtype == torch.float32
    )
    for a, b in zip([y, *W, *S], [ref, *rW, *rS]):
        assert_close(a.double(), b.detach(), 1e-5)
    # mixed precision promotes (never below float32)
    y64, _, _ = chunk_step(
        spec,
        "l2",
        rule,
        f32["W0"],
        f32["S0"],
        f32["k"],
        f32["v"],
        f32["q"],
        f32["eta"].double(),
        f32["alpha"],
        f32["beta"],
        "causal",
    )
    assert y64.dtype == F64
    y16, W16, _ = chunk_step(
        spec,
        "l2",
        rule,
        [w.bfloat16() for w in f32["W0"]],
        f32["S0"],
        f32["k"].bfloat16(),
        f32["v"],
        f32["q"],
        f32["eta"],
        f32["alpha"],
        f32["beta"],
        "causal",
    )
    assert y16.dtype == torch.float32 and W16[0].dtype == torch.float32


# ------------------------------------------------------------------------------------------
# the torch.func fallback


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize(
    "rule_name", ["gd", "momentum", "dgd_normalized", "dgd_momentum"]
)
@pytest.mark.parametrize("mem", ["linear", "mlp2", "swiglu"])
def test_autograd_fallback_matches_closed_form(mem, rule_name, read):
    spec, rule = make_spec(mem), RULES[rule_name]
    p = make_problem(
        spec, rule, B=2, H=1, T=7, seed=seed_of("fb", mem, rule_name, read)
    )
    a_vals, a_grads = run(
        scan, spec, "huber", rule, p, 3, read, step_fn=chunk_step_autograd
    )
    c_vals, c_grads = run(scan, spec, "huber", rule, p, 3, read)
    for a, b in zip(a_vals + a_grads, c_vals + c_grads):
        assert_close(a, b)
    # a user-supplied forward (materializes per-token weights for the causal read)
    custom = partial(
        chunk_step_autograd,
        forward_fn=partial(forward, spec),
        inputs_fn=partial(layer_inputs, spec),
    )
    u_vals, u_grads = run(scan, spec, "huber", rule, p, 3, read, step_fn=custom)
    for a, b in zip(u_vals + u_grads, c_vals + c_grads):
        assert_close(a, b)


def test_autograd_fallback_custom_memory():
    """A memory kind with no closed form (a normalized hidden layer), checked against a
    literal per-token loop of the momentum rule with autograd gradients."""

    def fwd(ws, x):
        h = torch.tanh(x @ ws[0].mT)
        h = h / (1.0 + (h * h).sum(-1, keepdim=True)).sqrt()
        return h @ ws[1].mT

    def loss_fn(y, v):
        return ((y - v) ** 4).sum()

    g = torch.Generator().manual_seed(3)
    B, H, T, C = 2, 1, 6, 4
    W0 = [
        torch.randn(B, H, 5, 3, generator=g, dtype=F64) * 0.5,
        torch.randn(B, H, 2, 5, generator=g, dtype=F64) * 0.5,
    ]
    k = torch.randn(B, H, T, 3, generator=g, dtype=F64)
    v = torch.randn(B, H, T, 2, generator=g, dtype=F64)
    q = torch.randn(B, H, T, 3, generator=g, dtype=F64)
    eta = 0.1 * torch.rand(B, H, T, generator=g, dtype=F64)
    alpha = 0.5 + 0.5 * torch.rand(B, H, T, generator=g, dtype=F64)
    beta = torch.rand(B, H, T, generator=g, dtype=F64)
    rule = RuleSpec("momentum")
    step = partial(chunk_step_autograd, forward_fn=fwd, loss_fn=loss_fn)
    y, W, S = scan(
        None, None, rule, W0, None, k, v, q, eta, alpha, beta, C, "causal", step_fn=step
    )

    W_ref = [w.clone() for w in W0]
    S_ref = [torch.zeros_like(w) for w in W0]
    ys = []
    for c0 in range(0, T, C):
        start = [w.detach().requires_grad_(True) for w in W_ref]
        for t in range(c0, min(c0 + C, T)):
            grads = torch.autograd.grad(
                loss_fn(fwd(start, k[:, :, t : t + 1]), v[:, :, t : t + 1]), start
            )
            for i in range(2):
                S_ref[i] = (
                    beta[:, :, t, None, None] * S_ref[i]
                    - eta[:, :, t, None, None] * grads[i]
                )
                W_ref[i] = alpha[:, :, t, None, None] * W_ref[i] + S_ref[i]
            ys.append(fwd(W_ref, q[:, :, t : t + 1])[:, :, 0])
    assert_close(y, torch.stack(ys, 2).detach())
    for a, b in zip(W + S, W_ref + S_ref):
        assert_close(a, b.detach())


# ------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize(
    "mem,rule,read",
    [
        ("res2", RuleSpec("dgd", momentum=True, dgd_form="normalized"), "causal"),
        ("swiglu", RuleSpec("gd"), "chunk"),
    ],
)
def test_compile_fullgraph_no_recompile(mem, rule, read):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    spec = make_spec(mem, din=4, hidden=8)
    compiled = torch.compile(chunk_step, fullgraph=True, backend="aot_eager")
    for i in range(2):
        p = make_problem(spec, rule, B=2, H=2, T=8, seed=20 + i, dtype=torch.float32)
        args = (
            spec,
            "l2",
            rule,
            p["W0"],
            p["S0"],
            p["k"],
            p["v"],
            p["q"],
            p["eta"],
            p["alpha"],
            p["beta"],
        )
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            y, W, S = compiled(*args, read=read)
        outer = (
            (y**2).sum()
            + sum((w**2).sum() for w in W)
            + sum((s**2).sum() for s in S or [])
        )
        grads = torch.autograd.grad(outer, leaves(p))
        ey, eW, eS = chunk_step(*args, read=read)
        eouter = (
            (ey**2).sum()
            + sum((w**2).sum() for w in eW)
            + sum((s**2).sum() for s in eS or [])
        )
        egrads = torch.autograd.grad(eouter, leaves(p))
        for a, b in zip([y, *W, *grads], [ey, *eW, *egrads]):
            assert_close(a, b, 1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


# ------------------------------------------------------------------------------------------
# small pieces and errors


def test_decay_matrix():
    g = torch.tensor([[0.5, 0.0, 2.0, 0.3]], dtype=F64)
    P = decay_matrix(g, 4, dtype=F64)
    for t, s in itertools.product(range(5), range(5)):
        expect = torch.prod(g[0, s:t]) if s <= t else torch.tensor(0.0, dtype=F64)
        assert P[0, t, s] == expect
    assert torch.equal(
        decay_matrix(None, 3, dtype=F64), torch.ones(4, 4, dtype=F64).tril()
    )


@pytest.mark.parametrize("C", [1, 5, 16])
def test_decay_products_gradients_with_zero_gates(C):
    """The decay matrix and the chunk-end row (``_end_row``) have closed-form gradients: they
    pass gradcheck and gradgradcheck in float64 with gates exactly 0 and 1, and equal the
    gradients of the products written out one by one."""
    from nlc.runtime.chunk import _end_row

    gen = torch.Generator().manual_seed(C)
    g = torch.rand(2, 3, C, dtype=F64, generator=gen)
    g[0, 1, 0] = 0.0
    g[1, 2, C - 1] = 0.0
    g[1, 0, C // 2] = 1.0
    g.requires_grad_(True)

    def rows(g):
        gam, row = _end_row(g, C, dtype=F64, device=None)
        return torch.cat([gam[..., None], row], -1)

    for f in (lambda g: decay_matrix(g, C, dtype=F64), rows):
        assert torch.autograd.gradcheck(f, (g,))
        assert torch.autograd.gradgradcheck(f, (g,))

    def literal(g):  # P[t, s] = prod_{j=s+1..t} g_j, one product per entry
        out = torch.zeros(*g.shape[:-1], C + 1, C + 1, dtype=F64)
        for t, s in itertools.product(range(C + 1), range(C + 1)):
            if s <= t:
                out[..., t, s] = torch.prod(g[..., s:t], -1)
        return out

    w = torch.randn(2, 3, C + 1, C + 1, dtype=F64, generator=gen)
    (a,) = torch.autograd.grad((decay_matrix(g, C, dtype=F64) * w).sum(), g)
    (b,) = torch.autograd.grad((literal(g) * w).sum(), g)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    (a,) = torch.autograd.grad((rows(g) * w[..., -1, :]).sum(), g)
    (b,) = torch.autograd.grad((literal(g)[..., -1, :] * w[..., -1, :]).sum(), g)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_decay_backward_traces_without_a_loop():
    """Traced with gradients on (as torch.compile traces a backward), the decay matrix's backward
    is a few dozen operations at C = 128, where cumprod's own backward unrolls into a loop of
    over a thousand (each a kernel in the compiled chunk step)."""
    from collections import Counter

    from torch.fx.experimental.proxy_tensor import make_fx

    from nlc.runtime.chunk import _end_row

    def count(f):
        def traced(g):
            (gr,) = torch.autograd.grad(f(g).sum(), g, create_graph=True)
            return gr

        gm = make_fx(traced, tracing_mode="fake")(torch.rand(2, 4, 128, requires_grad=True))
        return sum(Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function").values())

    assert count(lambda g: decay_matrix(g, 128, dtype=g.dtype)) < 100
    assert count(lambda g: _end_row(g, 128, dtype=g.dtype, device=None)[1]) < 100
    assert count(lambda g: torch.cumprod(g, -1)) > 1000  # what the closed forms avoid


def test_read_none_and_errors():
    spec = make_spec("linear")
    p = make_problem(spec, RULES["momentum"], T=4)
    y, W, S = chunk_step(
        spec,
        "l2",
        RULES["momentum"],
        p["W0"],
        None,
        p["k"],
        p["v"],
        None,
        p["eta"],
        None,
        p["beta"],
    )
    assert y is None and len(W) == 1 and len(S) == 1
    with pytest.raises(ValueError, match="beta"):
        chunk_step(
            spec,
            "l2",
            RULES["momentum"],
            p["W0"],
            None,
            p["k"],
            p["v"],
            p["q"],
            p["eta"],
        )
    with pytest.raises(ValueError, match="moms0"):
        chunk_step(
            spec, "l2", RULES["gd"], p["W0"], p["S0"], p["k"], p["v"], p["q"], p["eta"]
        )
    with pytest.raises(ValueError, match="read"):
        chunk_step(
            spec,
            "l2",
            RULES["gd"],
            p["W0"],
            None,
            p["k"],
            p["v"],
            p["q"],
            p["eta"],
            read="lookahead",
        )
    with pytest.raises(ValueError):
        chunk_step(
            spec, "kl", RULES["gd"], p["W0"], None, p["k"], p["v"], p["q"], p["eta"]
        )
    with pytest.raises(ValueError):
        RuleSpec("adam")
    with pytest.raises(ValueError):
        RuleSpec("dgd", dgd_form="eq57")
    with pytest.raises(ValueError):
        RuleSpec("dgd", dgd_layers="first")
    with pytest.raises(ValueError):
        scan(
            spec,
            "l2",
            RULES["gd"],
            p["W0"],
            None,
            p["k"],
            p["v"],
            p["q"],
            p["eta"],
            None,
            None,
            0,
        )


def test_shape_errors():
    spec = make_spec("mlp2")
    p = make_problem(spec, RULES["gd"], T=4)
    args = {"eta": p["eta"]}
    with pytest.raises(ValueError, match="weights"):
        chunk_step(
            spec, "l2", RULES["gd"], p["W0"][:1], None, p["k"], p["v"], p["q"], **args
        )
    with pytest.raises(ValueError, match="keys"):
        chunk_step(
            spec,
            "l2",
            RULES["gd"],
            p["W0"],
            None,
            p["k"][..., :2],
            p["v"],
            p["q"],
            **args,
        )
    with pytest.raises(ValueError, match="targets"):
        chunk_step(
            spec,
            "l2",
            RULES["gd"],
            p["W0"],
            None,
            p["k"],
            p["v"][..., :2],
            p["q"],
            **args,
        )
    with pytest.raises(ValueError, match="causal"):
        chunk_step(
            spec,
            "l2",
            RULES["gd"],
            p["W0"],
            None,
            p["k"],
            p["v"],
            p["q"][..., :2, :],
            read="causal",
            **args,
        )


@pytest.mark.parametrize("rule_name", ["gd", "dgd_eq88", "dgd_momentum"])
def test_linear_dot_is_period_invariant(rule_name):
    """With a linear memory and the dot objective the inner gradient -v k^T does not depend on
    the state, so the causal read is exact at every period: linear attention (gd) and the
    (gated) delta rule (dgd) need no per-token recurrence."""
    spec, rule = make_spec("linear"), RULES[rule_name]
    p = make_problem(spec, rule, T=10, seed=21)
    with torch.no_grad():
        outs = [
            scan(
                spec,
                "dot",
                rule,
                p["W0"],
                p["S0"],
                p["k"],
                p["v"],
                p["q"],
                p["eta"],
                p["alpha"],
                p["beta"],
                c,
                "causal",
            )
            for c in (1, 4, 10)
        ]
    for y, W, S in outs[1:]:
        assert_close(y, outs[0][0], 1e-12)
        for a, b in zip(W + (S or []), outs[0][1] + (outs[0][2] or [])):
            assert_close(a, b, 1e-12)


# ------------------------------------------------------------------------------------------
# a linear memory's chunks all at once (nlc.runtime.linear_chunks)


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize(
    "rule,gates",
    [
        (RuleSpec("dgd"), "random"),
        (RuleSpec("dgd"), "edges"),
        (RuleSpec("dgd", dgd_form="normalized"), "random"),
        (RuleSpec("gd"), "random"),
        (RuleSpec("dgd"), "no decay"),
    ],
)
@pytest.mark.parametrize("chunk", [8, 2])  # 2 C >= in: the state map formed; 2 C < in: its factors
def test_linear_chunks_at_once_match_reference(monkeypatch, rule, gates, read, chunk):
    """The delta rule and gd on ``dot`` of a linear memory: ``scan`` takes every full chunk at
    once (``linear_chunks.sequence``; a partial chunk after them) and matches the per-token
    reference in float64: outputs, final state, and the gradients of W_0 (a shared [H, out, in]
    initial state here), k, v, q and the gates."""
    from nlc.runtime import linear_chunks

    spec = MemorySpec("linear", 6, 5)
    p = make_problem(spec, rule, B=2, H=3, T=3 * 8 + 5, seed=seed_of(rule, gates, read),
                     gates="random" if gates == "no decay" else gates)  # fmt: skip
    if gates == "no decay":
        p["alpha"] = None
    p["W0"] = [torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(3), dtype=F64).requires_grad_()]
    calls = []
    real = linear_chunks.sequence
    monkeypatch.setattr(linear_chunks, "sequence", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("NLC_LINEAR_CHUNKS", "1")  # on the CPU too
    compare(spec, "dot", rule, p, chunk, read, tol=1e-9)
    assert calls, "scan did not take linear_chunks.sequence"
    monkeypatch.setenv("NLC_LINEAR_CHUNKS", "0")  # the chunk loop, for the record: the same values
    compare(spec, "dot", rule, p, chunk, read, tol=1e-9)
    assert len(calls) == 1


@pytest.mark.parametrize("C", [1, 2, 3, 5, 8, 33, 64])
def test_solve_unit_lower_matches_the_triangular_solve(C):
    """``linear_chunks.solve_unit_lower`` (the inverse by a solve against the identity, its own
    backward) gives ``torch.linalg.solve_triangular``'s values and gradients (float64)."""
    from nlc.runtime.linear_chunks import solve_unit_lower

    g = torch.Generator().manual_seed(C)
    K0 = (0.3 * torch.randn(2, 3, C, C, generator=g, dtype=F64)).tril(-1).requires_grad_()
    R0 = torch.randn(2, 3, C, 7, generator=g, dtype=F64).requires_grad_()
    w = torch.randn(2, 3, C, 7, generator=g, dtype=F64)
    X = solve_unit_lower(K0, R0)
    got = (X, *torch.autograd.grad((X * w).sum(), (K0, R0)))
    Xr = torch.linalg.solve_triangular(K0, R0, upper=False, unitriangular=True)
    want = (Xr, *torch.autograd.grad((Xr * w).sum(), (K0, R0)))
    for i, (a, b) in enumerate(zip(got, want)):
        if i == 1:  # the solve reads only the strictly lower part of K
            a, b = a.tril(-1), b.tril(-1)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_linear_chunks_decline(monkeypatch):
    from nlc.runtime import linear_chunks

    lin = MemorySpec("linear", 4, 4)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert linear_chunks.applies(lin, "dot", RuleSpec("dgd"), "causal", 2, cuda)  # default: CUDA only
    assert not linear_chunks.applies(lin, "dot", RuleSpec("dgd"), "causal", 2, cpu)
    monkeypatch.setenv("NLC_LINEAR_CHUNKS", "1")
    assert linear_chunks.applies(lin, "dot", RuleSpec("dgd"), "causal", 2, cpu)
    assert not linear_chunks.applies(lin, "l2", RuleSpec("dgd"), "causal", 2, cpu)  # gradient reads W
    assert not linear_chunks.applies(lin, "dot", RuleSpec("momentum"), "causal", 2, cpu)
    assert not linear_chunks.applies(lin, "dot", RuleSpec("dgd"), "causal", 1, cpu)  # one chunk
    assert not linear_chunks.applies(make_spec("mlp2"), "dot", RuleSpec("dgd"), "causal", 4, cpu)
    monkeypatch.setenv("NLC_LINEAR_CHUNKS", "0")
    assert not linear_chunks.applies(lin, "dot", RuleSpec("dgd"), "causal", 2, cuda)


def test_linear_chunks_under_bf16_autocast_track_the_chunk_loop(monkeypatch):
    """Under bf16 autocast both paths multiply bf16 operands; the batched form keeps its state
    recurrence in float32 (autocast off): the two agree to bf16 rounding, and the state stays
    float32."""
    spec, rule = MemorySpec("linear", 16, 16), RuleSpec("dgd")
    p = make_problem(spec, rule, B=2, H=2, T=4 * 16, seed=7, dtype=torch.float32)
    args = (spec, "dot", rule, p["W0"], None, p["k"], p["v"], p["q"], p["eta"], p["alpha"], None)
    monkeypatch.setenv("NLC_LINEAR_CHUNKS", "1")  # on the CPU too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, W, _ = scan(*args, chunk=16, read="causal")
        monkeypatch.setenv("NLC_LINEAR_CHUNKS", "0")
        y0, W0, _ = scan(*args, chunk=16, read="causal")
    assert W[0].dtype == torch.float32
    for a, b in ((y, y0), (W[0], W0[0])):
        err = (a.float() - b.float()).abs().max() / b.float().abs().max()
        assert err < 1.5e-2, err.item()
