"""Optimizer levels (nlc.runtime.optim) checked against torch.optim and the paper's equations."""

from __future__ import annotations

import io
import math

import pytest
import torch

from nlc.runtime import optim as O
from nlc.runtime.optim import (
    M3,
    OPTIMIZERS,
    AdamMemory,
    DeepMomentum,
    DeltaMomentum,
    MomentumMemory,
    Muon,
    build_optimizer,
    newton_schulz,
    orthogonalize,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Run these tiny-tensor tests on one intra-op thread, then restore the setting.

    On a busy 2-core machine, thread-pool contention makes a tiny backward pass about 100×
    slower with 2 threads (0.1 ms → 15 ms).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# helpers


def _model(dtype=F64, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8, bias=bias), torch.nn.Tanh(), torch.nn.Linear(8, 3, bias=bias)
    ).to(dtype)


def _data(dtype=F64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 4, generator=g, dtype=dtype), torch.randn(32, 3, generator=g, dtype=dtype)


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _train(make_opt, steps, dtype=F64, bias=True, model=None, opt=None):
    model = model if model is not None else _model(dtype, bias)
    opt = opt if opt is not None else make_opt(model.parameters())
    x, y = _data(next(model.parameters()).dtype)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    return model, opt


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _max_diff(a, b):
    return max((u - v).abs().max().item() for u, v in zip(a, b))


def _ns_literal(G, steps, coeffs=(3.4445, -4.7750, 2.0315), eps=1e-7):
    """Newton–Schulz written from the polynomial: X ← aX + b X XᵀX + c X (XᵀX)², no transposition."""
    a, b, c = coeffs
    X = G / (torch.sqrt((G * G).sum()) + eps)
    for _ in range(steps):
        S = X.T @ X
        X = a * X + b * (X @ S) + c * (X @ S @ S)
    return X


# ----------------------------------------------------------------------------------------------
# MomentumMemory == SGD, AdamMemory == AdamW


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_momentum_memory_equals_sgd(nesterov, weight_decay):
    kw = dict(nesterov=nesterov, weight_decay=weight_decay)
    ref, _ = _train(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, **kw), 20)
    outer, _ = _train(lambda p: MomentumMemory(p, lr=0.1, decay=0.9, **kw), 20)
    inner, _ = _train(lambda p: MomentumMemory(p, lr=0.1, decay=0.9, lr_placement="inner", **kw), 20)
    # outer form replays SGD's operations: bit-for-bit
    assert all(torch.equal(a, b) for a, b in zip(_params(ref), _params(outer)))
    # the paper's literal m = α m − η g form: same algebra, different rounding
    assert _max_diff(_params(ref), _params(inner)) < 1e-12


def test_momentum_memory_equals_sgd_with_scheduler():
    def run(make):
        model = _model()
        opt = make(model.parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        x, y = _data()
        for _ in range(20):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
            sched.step()
        return _params(model)

    ref = run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    mine = run(lambda p: MomentumMemory(p, lr=0.1, decay=0.9))
    assert all(torch.equal(a, b) for a, b in zip(ref, mine))


def test_gd_rule_is_plain_sgd():
    ref, _ = _train(lambda p: torch.optim.SGD(p, lr=0.1), 10)
    mine, opt = _train(lambda p: build_optimizer("gd", p, lr=0.1), 10)
    assert all(torch.equal(a, b) for a, b in zip(_params(ref), _params(mine)))
    assert opt.param_groups[0]["decay"] == 0.0


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_memory_equals_adamw(weight_decay):
    kw = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=weight_decay)
    ref, _ = _train(lambda p: torch.optim.AdamW(p, **kw), 20)
    mine, _ = _train(lambda p: AdamMemory(p, **kw), 20)
    assert _max_diff(_params(ref), _params(mine)) < 1e-10
    assert all(torch.equal(a, b) for a, b in zip(_params(ref), _params(mine)))


def test_adam_rule_is_coupled_adam():
    ref, _ = _train(lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1), 20)
    mine, _ = _train(lambda p: build_optimizer("adam", p, lr=0.01, wd=0.1), 20)
    assert _max_diff(_params(ref), _params(mine)) < 1e-10
    ref, _ = _train(lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), 20)
    mine, _ = _train(lambda p: build_optimizer("adamw", p, lr=0.01, wd=0.1, beta2=0.999), 20)
    assert _max_diff(_params(ref), _params(mine)) < 1e-10


# ----------------------------------------------------------------------------------------------
# Newton–Schulz and the output hook


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (40, 40), (8, 128)])
def test_newton_schulz_singular_values(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    # Muon's quintic: fast, not exact (σ ends in about [0.68, 1.2]). A random square matrix has
    # σ_min/‖G‖_F ≈ 1e-3, which needs two more steps to be lifted.
    steps = 7 if shape[0] == shape[1] else 5
    s = torch.linalg.svdvals(newton_schulz(G, steps=steps, coefficients="quintic"))
    assert 0.6 < s.min() and s.max() < 1.25
    if shape[0] != shape[1]:  # well-conditioned: the cubic iteration converges to exactly 1
        s = torch.linalg.svdvals(newton_schulz(G, steps=30, coefficients="cubic"))
        assert (s - 1).abs().max() < 1e-6
    assert torch.allclose(newton_schulz(G, 5), _ns_literal(G, 5), atol=1e-10)


def test_newton_schulz_batched_and_bf16():
    G = torch.randn(3, 2, 16, 24, generator=torch.Generator().manual_seed(4))
    X = newton_schulz(G, 5)
    assert X.shape == G.shape
    for i in range(3):
        for j in range(2):
            assert torch.allclose(X[i, j], newton_schulz(G[i, j], 5), atol=1e-6)
    Xb = newton_schulz(G.bfloat16(), 5)
    assert Xb.dtype == torch.bfloat16
    s = torch.linalg.svdvals(Xb.float())
    assert 0.55 < s.min() and s.max() < 1.3
    with pytest.raises(ValueError, match="ndim >= 2"):
        newton_schulz(torch.randn(5))
    with pytest.raises(ValueError, match="did you mean 'cubic'"):
        newton_schulz(G, coefficients="cubik")


def test_orthogonalize_nd_and_nonmatrix():
    d = torch.randn(6, 2, 5, dtype=F64)
    out = orthogonalize(d, steps=30, coefficients="cubic", scale="none")
    s = torch.linalg.svdvals(out.reshape(6, 10))
    assert out.shape == d.shape and (s - 1).abs().max() < 1e-6
    v = torch.randn(7, dtype=F64)
    assert torch.equal(orthogonalize(v), v)
    assert torch.allclose(orthogonalize(v, nonmatrix="polar"), v / v.norm())
    # shape scale of Muon: √max(1, rows/cols)
    tall = torch.randn(20, 5, dtype=F64)
    o = orthogonalize(tall, steps=30, coefficients="cubic", scale="shape")
    assert torch.allclose(torch.linalg.svdvals(o), torch.full((5,), 2.0, dtype=F64), atol=1e-6)


def test_muon_against_literal():
    model = _model(bias=False)
    opt = Muon(model.parameters(), lr=0.05, decay=0.95, nesterov=True)
    W = [p.detach().clone() for p in model.parameters()]
    bufs = [torch.zeros_like(w) for w in W]
    x, y = _data()
    for _ in range(6):
        opt.zero_grad()
        _loss(model, x, y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for i, g in enumerate(grads):
            bufs[i] = 0.95 * bufs[i] + g
            u = _ns_literal(g + 0.95 * bufs[i], 5)
            W[i] = W[i] - 0.05 * math.sqrt(max(1.0, W[i].shape[0] / W[i].shape[1])) * u
        assert _max_diff(W, _params(model)) < 1e-10
        with torch.no_grad():  # keep the literal and the optimizer on the same trajectory
            for p, w in zip(model.parameters(), W):
                p.copy_(w)


def test_output_hook_on_adam_and_inner_placement_rejected():
    model, _ = _train(lambda p: AdamMemory(p, lr=0.01, output="newton_schulz"), 5)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="lr_placement='outer'"):
        MomentumMemory(_model().parameters(), lr_placement="inner", output="newton_schulz")


# ----------------------------------------------------------------------------------------------
# M3 against a literal Algorithm 1


def _m3_literal(model, x, y, *, lr, betas, alpha, eps, T, f, K, eq75_timing=False):
    """Algorithm 1 of the paper, written as its two loops. eq75_timing: M2 absorbs g_t at t ≡ 0 (mod f)."""
    b1, b2, b3 = betas
    theta = [p.detach().clone() for p in model.parameters()]
    M1 = [torch.zeros_like(w) for w in theta]
    M2 = [torch.zeros_like(w) for w in theta]
    V = [torch.zeros_like(w) for w in theta]
    history = []  # history[t-1] = g_t (list over params)

    def grad(th):
        ps = [w.clone().requires_grad_(True) for w in th]
        h = torch.tanh(x @ ps[0].T)
        loss = ((h @ ps[1].T - y) ** 2).mean()
        return list(torch.autograd.grad(loss, ps))

    for k in range(K):
        if k >= 1 and not eq75_timing:  # M2 ← M2 + β3 Σ_{i=(k−1)f+1}^{kf} g_i ; O2 ← NS(M2)
            for j in range(len(theta)):
                M2[j] = M2[j] + b3 * sum(history[i][j] for i in range((k - 1) * f, k * f))
        O2 = [_ns_literal(m, T) for m in M2]
        for t in range(k * f + 1, (k + 1) * f + 1):
            g = grad(theta)
            history.append(g)
            if eq75_timing and t % f == 0:
                for j in range(len(theta)):
                    M2[j] = M2[j] + b3 * sum(history[i][j] for i in range(t - f, t))
                O2 = [_ns_literal(m, T) for m in M2]
            for j in range(len(theta)):
                M1[j] = M1[j] + b1 * g[j]
                V[j] = V[j] + b2 * g[j] ** 2
                O1 = _ns_literal(M1[j], T)
                theta[j] = theta[j] - lr * (O1 + alpha * O2[j]) / (torch.sqrt(V[j]) + eps)
    return theta


@pytest.mark.parametrize("timing", ["after_step", "before_step"])
def test_m3_equals_algorithm_1(timing):
    hyper = dict(lr=0.01, betas=(0.9, 0.95, 0.8), alpha=0.7, eps=1e-8)
    f, K, T = 4, 3, 5
    model = _model(bias=False)
    x, y = _data()
    expected = _m3_literal(model, x, y, T=T, f=f, K=K, eq75_timing=timing == "before_step", **hyper)
    _train(None, f * K, model=model,
           opt=M3(model.parameters(), ns_steps=T, slow_period=f, slow_timing=timing, **hyper))
    assert _max_diff(expected, _params(model)) < 1e-10


@pytest.mark.parametrize("opts", [
    dict(accumulate="ema"), dict(slow_sign="minus"), dict(slow_beta="beta2"),
    dict(eps_placement="inside"), dict(nonmatrix="identity", accumulate="ema"),
    dict(ns_coefficients="cubic", ns_steps=8), dict(alpha=0.0),
    dict(precondition="tensor"), dict(precondition="none"), dict(output="newton_schulz"),
])
def test_m3_options_run(opts):
    model, _ = _train(lambda p: M3(p, lr=0.01, slow_period=3, **opts), 7, bias=True)
    assert all(torch.isfinite(p).all() for p in model.parameters()), opts


def test_m3_vector_fallback_is_polar():
    b = torch.nn.Parameter(torch.randn(5, dtype=F64))
    b0 = b.detach().clone()
    g = torch.randn(5, dtype=F64)
    opt = M3([b], lr=0.1, betas=(0.9, 0.95, 0.9), eps=1e-8)
    _set_grad(b, g)
    opt.step()
    m1, v = 0.9 * g, 0.95 * g**2
    expected = b0 - 0.1 * (m1 / m1.norm()) / (v.sqrt() + 1e-8)
    assert torch.allclose(b.detach(), expected, atol=1e-12)


def test_m3_slow_level_timing():
    model = _model(bias=False)
    opt = M3(model.parameters(), lr=0.01, slow_period=3)
    x, y = _data()
    p0 = next(model.parameters())
    seen = []
    for _ in range(7):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        st = opt.state[p0]
        seen.append((st["step"], bool(st["o2"].abs().sum() > 0), bool(st["grad_sum"].abs().sum() > 0)))
    # O2 stays 0 until the end of step 3; the gradient sum is emptied at steps 3 and 6
    assert seen == [(1, False, True), (2, False, True), (3, True, False), (4, True, True),
                    (5, True, True), (6, True, False), (7, True, True)]


# ----------------------------------------------------------------------------------------------
# DeltaMomentum


def _set_grad(p, g):
    p.grad = g.clone()


@pytest.mark.parametrize("form", ["nl", "nips"])
@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4,), (2, 3, 4)])
def test_delta_momentum_equations(form, shape):
    gen = torch.Generator().manual_seed(7)
    p = torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=F64))
    w0 = p.detach().clone()
    g1, g2 = (torch.randn(*shape, generator=gen, dtype=F64) for _ in range(2))
    alpha, beta, lr = 0.9, 0.7, 0.1
    opt = DeltaMomentum([p], lr=lr, decay=alpha, beta=beta, form=form)
    _set_grad(p, g1)
    opt.step()
    _set_grad(p, g2)
    opt.step()
    b1 = g1
    gh = g2 / g2.norm()
    if len(shape) == 1:
        E = (b1 @ gh) * gh
    else:
        B, G = b1.reshape(shape[0], -1), gh.reshape(shape[0], -1)
        E = (B @ G.T @ G if form == "nl" else G @ G.T @ B).reshape(shape)
    b2 = alpha * b1 - beta * E + g2
    assert torch.allclose(p.detach(), w0 - lr * b1 - lr * b2, atol=1e-12)


def test_delta_momentum_beta0_equals_momentum_and_inner_form():
    ref, _ = _train(lambda p: MomentumMemory(p, lr=0.05, decay=0.9), 15)
    mine, _ = _train(lambda p: DeltaMomentum(p, lr=0.05, decay=0.9, beta=0.0), 15)
    assert all(torch.equal(a, b) for a, b in zip(_params(ref), _params(mine)))
    outer, _ = _train(lambda p: DeltaMomentum(p, lr=0.05), 15)
    inner, _ = _train(lambda p: DeltaMomentum(p, lr=0.05, lr_placement="inner"), 15)
    assert _max_diff(_params(outer), _params(inner)) < 1e-12


# ----------------------------------------------------------------------------------------------
# DeepMomentum


@pytest.mark.parametrize("objective", ["dot", "l2"])
@pytest.mark.parametrize("activation", ["tanh", "silu"])
def test_dmgd_inner_gradient_matches_autograd(objective, activation):
    gen = torch.Generator().manual_seed(5)
    x, v = torch.randn(50, generator=gen, dtype=F64), torch.randn(50, generator=gen, dtype=F64)
    theta = torch.randn(3, 6, generator=gen, dtype=F64)
    th = theta.clone().requires_grad_(True)
    act = torch.tanh if activation == "tanh" else torch.nn.functional.silu
    r = act(x[:, None] * th[0] + th[1]) @ th[2]
    loss = -(r * v).mean() if objective == "dot" else 0.5 * ((x + r - v) ** 2).mean()
    (expected,) = torch.autograd.grad(loss, th)
    got = O._dmgd_inner_grad(x, v, theta, activation, objective)
    assert torch.allclose(got, expected, atol=1e-12)


def test_dmgd_without_inner_learning_is_momentum():
    ref, _ = _train(lambda p: MomentumMemory(p, lr=0.05, decay=0.9), 15)
    mine, opt = _train(lambda p: DeepMomentum(p, lr=0.05, decay=0.9, inner_lr=0.0), 15)
    assert all(torch.equal(a, b) for a, b in zip(_params(ref), _params(mine)))
    learned, opt = _train(lambda p: DeepMomentum(p, lr=0.05, decay=0.9, inner_lr=0.05), 15)
    thetas = [opt.state[p]["mlp"] for p in learned.parameters()]
    assert all(t[2].abs().sum() > 0 for t in thetas)  # the MLP memory did learn
    assert all(t[2].abs().max() <= 0.05 / (1 - 0.99) + 1e-9 for t in thetas)


def test_dmgd_is_deterministic():
    a, _ = _train(lambda p: DeepMomentum(p, lr=0.05, inner_lr=0.05), 10)
    b, _ = _train(lambda p: DeepMomentum(p, lr=0.05, inner_lr=0.05), 10)
    assert all(torch.equal(u, v) for u, v in zip(_params(a), _params(b)))


# ----------------------------------------------------------------------------------------------
# every level decreases a convex quadratic and a tiny MLP's loss

DECREASING = {
    "delta_nl": lambda p: DeltaMomentum(p, lr=0.02),
    "delta_nips": lambda p: DeltaMomentum(p, lr=0.02, form="nips"),
    "delta_muon": lambda p: DeltaMomentum(p, lr=0.02, output="newton_schulz"),
    "dmgd_dot": lambda p: DeepMomentum(p, lr=0.02, inner_lr=0.05),
    "dmgd_l2": lambda p: DeepMomentum(p, lr=0.02, inner_lr=0.05, objective="l2"),
    "dmgd_silu_raw": lambda p: DeepMomentum(p, lr=0.05, decay=0.0, activation="silu", inner_lr=0.05),
    # Algorithm 1 divides the orthogonalized momentum by √V element-wise. Entries whose gradients
    # stay near 0 then get huge steps unless ε is large enough, hence ε = 1e-3 (see M3's docstring).
    "m3": lambda p: M3(p, lr=0.01, slow_period=5, eps=1e-3),
    "m3_tensor": lambda p: M3(p, lr=0.01, slow_period=5, precondition="tensor"),
    "m3_ema": lambda p: M3(p, lr=0.003, slow_period=5, accumulate="ema", eps=1e-3),
    "muon": lambda p: Muon(p, lr=0.01),
}


@pytest.mark.parametrize("name", sorted(DECREASING))
def test_decreases_convex_quadratic(name):
    gen = torch.Generator().manual_seed(11)
    A = torch.randn(10, 6, generator=gen, dtype=F64) / math.sqrt(10)
    B = torch.randn(10, 4, generator=gen, dtype=F64)
    c = torch.randn(4, generator=gen, dtype=F64)
    W = torch.nn.Parameter(torch.zeros(6, 4, dtype=F64))
    v = torch.nn.Parameter(torch.zeros(4, dtype=F64))

    def loss():
        return 0.5 * ((A @ W - B) ** 2).sum() + 0.5 * ((v - c) ** 2).sum()

    opt = DECREASING[name]([W, v])
    start = loss().item()
    for _ in range(150):
        opt.zero_grad()
        loss().backward()
        opt.step()
    optimum = 0.5 * ((A @ torch.linalg.lstsq(A, B).solution - B) ** 2).sum().item()
    assert loss().item() - optimum < 0.75 * (start - optimum), name


@pytest.mark.parametrize("name", sorted(DECREASING))
def test_decreases_tiny_mlp_loss(name):
    model = _model(F64)
    x, y = _data()
    start = _loss(model, x, y).item()
    _train(None, 60, model=model, opt=DECREASING[name](model.parameters()))
    assert _loss(model, x, y).item() < 0.8 * start, name


# ----------------------------------------------------------------------------------------------
# checkpoints: state_dict save → load → continue == uninterrupted

RESUMABLE = {
    "momentum": lambda p: MomentumMemory(p, lr=0.05, nesterov=True, weight_decay=0.01),
    "momentum_inner": lambda p: MomentumMemory(p, lr=0.05, lr_placement="inner"),
    "adamw": lambda p: AdamMemory(p, lr=0.01, weight_decay=0.1),
    "delta": lambda p: DeltaMomentum(p, lr=0.02, form="nips"),
    "dmgd": lambda p: DeepMomentum(p, lr=0.02, inner_lr=0.05),
    "m3": lambda p: M3(p, lr=0.01, slow_period=3),
    "muon": lambda p: Muon(p, lr=0.02),
}


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_state_dict_round_trip_continues_bit_identically(name):
    make = RESUMABLE[name]
    full, _ = _train(make, 10, dtype=torch.float32)

    first, opt = _train(make, 4, dtype=torch.float32)
    blob = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, blob)
    blob.seek(0)
    ckpt = torch.load(blob, weights_only=False)
    resumed = _model(torch.float32, seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed.parameters())
    opt2.load_state_dict(ckpt["opt"])
    _train(None, 6, model=resumed, opt=opt2)
    assert all(torch.equal(a, b) for a, b in zip(_params(full), _params(resumed)))


# ----------------------------------------------------------------------------------------------
# registry and option errors


def test_registry_keys():
    assert set(OPTIMIZERS) == {"gd", "momentum", "adam", "adamw", "delta", "dmgd", "m3", "muon"}
    for rule in OPTIMIZERS:
        opt = build_optimizer(rule, _model().parameters())
        assert isinstance(opt, torch.optim.Optimizer)
        assert set(O.rule_signature(rule)) >= {"lr"}


def test_unknown_rule_names_allowed_set():
    with pytest.raises(ValueError) as e:
        build_optimizer("adamm", _model().parameters())
    msg = str(e.value)
    assert "'adamm'" in msg and "did you mean 'adam'" in msg
    for rule in OPTIMIZERS:
        assert rule in msg


def test_unknown_hyper_parameter_and_option_values():
    with pytest.raises(ValueError, match="did you mean 'slow_period'"):
        build_optimizer("m3", _model().parameters(), slow_perod=10)
    with pytest.raises(ValueError, match=r"did you mean 'inner'.*|\{'inner', 'outer'\}"):
        MomentumMemory(_model().parameters(), lr_placement="inne")
    with pytest.raises(ValueError, match=r"\{'nips', 'nl'\}"):
        build_optimizer("delta", _model().parameters(), form="arxiv")
    with pytest.raises(ValueError, match="did you mean 'before_step'"):
        M3(_model().parameters(), slow_timing="before")
    with pytest.raises(ValueError, match="objective"):
        DeepMomentum(_model().parameters(), objective="huber")
    with pytest.raises(ValueError, match="slow_period"):
        M3(_model().parameters(), slow_period=0)
    with pytest.raises(ValueError, match="betas"):
        AdamMemory(_model().parameters(), betas=(0.9, 1.5))
    # options are validated for added parameter groups too
    opt = AdamMemory(_model().parameters())
    with pytest.raises(ValueError, match="weight_decay_mode"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay_mode": "l2"})


def test_param_groups_and_aliases():
    model = _model()
    opt = build_optimizer(
        "momentum",
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}],
        lr=0.01, momentum=0.8, wd=0.0,
    )
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert all(g["decay"] == 0.8 for g in opt.param_groups)
    with pytest.raises(ValueError, match="both"):
        build_optimizer("momentum", model.parameters(), momentum=0.8, decay=0.9)
    m3 = build_optimizer("m3", model.parameters(), beta3=0.5)
    assert m3.param_groups[0]["betas"] == (0.9, 0.999, 0.5)


@pytest.mark.parametrize("rule", sorted(OPTIMIZERS))
def test_every_rule_steps_bf16_params_with_closure(rule):
    model = _model(torch.bfloat16)
    x, y = _data(torch.bfloat16)
    opt = build_optimizer(rule, model.parameters(), lr=1e-3)

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
    assert loss is not None and torch.isfinite(loss)
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        assert all(t.dtype == torch.bfloat16 for t in opt.state[p].values() if torch.is_tensor(t))
