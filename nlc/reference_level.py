"""The literal reference of a whole in-context level, from its IR (the oracle of generated code).

For one level of a spec and the generated module that implements it, :func:`level_forward`
recomputes the level's output from the equations, sharing nothing with the generated code but
the module's learned parameters:

* flows that read no state are evaluated over the sequence with literal stage definitions
  (projections as explicit products, the causal convolution as an explicit sum over its window);
* for every chunk, flows that read a state are evaluated token by token at the chunk-start
  states of all memories (paper eq 90), targets are the values or, with ``target self``, each
  memory's own view of them (eq 84-85);
* each state is then advanced through the chunk by :func:`nlc.reference.memory_scan`, the
  per-token loop with autograd gradients at the chunk-start weights;
* resets, gradient truncation and the output stages follow the level's clauses.

Use it in float64 (``module.double()``, ``x.double()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ir
from .reference import memory_apply, memory_scan
from .runtime.chunk import RuleSpec
from .runtime.memories import MemorySpec

__all__ = ["level_forward", "memory_spec", "rule_spec"]


def memory_spec(m: ir.MemoryType) -> MemorySpec:
    hidden = int(m.hidden) if m.hidden is not None else 0
    return MemorySpec(m.kind, din=int(m.din), dout=int(m.dout), hidden=hidden,
                      depth=m.depth if m.kind != "linear" else 1, act=m.act)


def rule_spec(lv: ir.Level) -> RuleSpec:
    form = lv.rule_arg("form")
    momentum = lv.rule == "dgd" and lv.rule_arg("momentum") is not None
    return RuleSpec(lv.rule, momentum=momentum, dgd_form=str(form.value) if form else "eq88")


class _Eval:
    def __init__(self, lv: ir.Level, module, x: Tensor):
        self.lv = lv
        self.module = module
        self.H = lv.heads
        self.xin = x.unsqueeze(1)  # [B, 1, T, d]
        self.seq: dict[str, Tensor] = {}

    def attr(self, flow: ir.Flow):
        return getattr(self.module, self.module.flow_attrs[flow.span.start])

    def depends(self, flow: ir.Flow | None) -> bool:
        if flow is None:
            return False
        for f in flow.walk():
            if f.kind == "read":
                return True
            if f.kind == "ref" and self.depends(self.lv.binding(f.name).flow):
                return True
        return False

    def ev(self, flow: ir.Flow, sl: slice, states, merged: Tensor | None = None) -> Tensor | float:
        k = flow.kind
        if k == "input":
            return merged if flow.name == "reads" else self.xin[:, :, sl]
        if k == "const":
            return float(flow.value)
        if k == "ref":
            if flow.name in self.seq:
                return self.seq[flow.name][:, :, sl]
            return self.ev(self.lv.binding(flow.name).flow, sl, states)
        if k == "read":
            arg = self.ev(flow.arg, sl, states)
            st = self.lv.state(flow.name)
            spec = memory_spec(st.memory)
            W = states[flow.name]
            arg = arg.expand(arg.shape[0], self.H, *arg.shape[2:])
            return torch.stack([memory_apply(spec, W, arg[:, :, t]) for t in range(arg.shape[2])], dim=2)
        if k == "call":
            raise NotImplementedError("the level reference does not evaluate generator levels")
        arg = self.ev(flow.arg, sl, states, merged)
        name = flow.name
        if name == "linear":
            mod = self.attr(flow)
            if isinstance(mod, torch.nn.Linear):  # `output` stage on merged heads [B, T, w]
                return torch.einsum("bti,oi->bto", arg, mod.weight)
            return torch.einsum("bhti,hoi->bhto", arg, mod.weight)
        if name == "conv":
            return _conv(arg, self.attr(flow).weight)
        if name == "l2norm":
            return arg / torch.sqrt((arg * arg).sum(-1, keepdim=True) + 1e-6)
        if name == "mean":
            return arg.mean(-1, keepdim=True)
        if name == "scale":
            return arg * float(flow.param("_"))
        acts = {"silu": F.silu, "gelu": F.gelu, "relu": torch.relu, "tanh": torch.tanh,
                "sigmoid": torch.sigmoid, "softplus": F.softplus}
        return acts[name](arg)


def _conv(x: Tensor, weight: Tensor) -> Tensor:
    """y[t] = sum_j w[j] x[t - (K-1) + j] per channel, zeros before the sequence (literal)."""
    B, Hp, T, w = x.shape
    K = weight.shape[-1]
    flat = x.permute(0, 2, 1, 3).reshape(B, T, Hp * w)  # channel index = head * w + feature
    out = torch.zeros_like(flat)
    for t in range(T):
        for j in range(K):
            s = t - (K - 1) + j
            if s >= 0:
                out[:, t] = out[:, t] + weight[:, 0, j] * flat[:, s]
    return out.reshape(B, T, Hp, w).permute(0, 2, 1, 3)


def _init(lv: ir.Level, module, name: str, B: int, like: Tensor) -> list[Tensor]:
    st = lv.state(name)
    if lv.init.mode == "zeros":
        return [like.new_zeros(B, lv.heads, o, i) for o, i in memory_spec(st.memory).weight_shapes()]
    ws = list(getattr(module, module.state_attrs[name])())
    return [w.unsqueeze(0).expand(B, *w.shape) for w in ws]


def level_forward(lv: ir.Level, module, x: Tensor, start_states=None) -> Tensor:
    """The level's output ``[B, T, d]`` for input ``x`` ``[B, T, d]``, computed literally."""
    ev = _Eval(lv, module, x)
    B, T, _ = x.shape
    H, C = lv.heads, lv.period.every
    everything = slice(0, T)
    for b in lv.bindings:
        if not ev.depends(b.flow):
            ev.seq[b.name] = ev.ev(b.flow, everything, None)
    rule = rule_spec(lv)
    momentum = rule.uses_momentum
    if start_states is not None:  # nested in another level (init from): start from its state
        states = {lv.states[0].name: start_states[0]}
    else:
        states = {s.name: _init(lv, module, s.name, B, x) for s in lv.states}
    moms = {s.name: None for s in lv.states}
    node = lv.reads
    post = []
    while node.kind == "op":
        post.append(node)
        node = node.arg
    read_state, read_arg = node.name, node.arg
    huber = lv.objective_arg("delta")
    ys = []
    for i, c0 in enumerate(range(0, T, C)):
        c1 = min(T, c0 + C)
        sl = slice(c0, c1)
        if lv.reset.mode == "every" and c0 > 0 and c0 % lv.reset.every == 0:
            if start_states is not None:
                states = {lv.states[0].name: start_states[c0 // lv.reset.every]}
            else:
                states = {s.name: _init(lv, module, s.name, B, x) for s in lv.states}
            moms = {s.name: None for s in lv.states}

        def role(name):
            b = lv.binding(name)
            v = ev.ev(ir.Flow("ref", name=name) if b else ir.Flow("input"), sl, states)
            return v.expand(B, H, *v.shape[2:])

        def gate(name, default):
            h = lv.rule_arg(name)
            if h is None:
                return default
            if h.ref:
                g = ev.ev(ir.Flow("ref", name=h.value), sl, states)
                return g.expand(B, H, *g.shape[2:])[..., 0]
            return torch.full((B, H, c1 - c0), float(h.value), dtype=x.dtype)

        key, value = role("key"), role("value")
        query = ev.ev(read_arg, sl, states)
        query = query.expand(B, H, *query.shape[2:])
        eta = gate("lr", None)
        alpha = gate("decay", None)
        beta = gate("momentum", None) if momentum else None
        targets = {}
        for s in lv.states:
            spec = memory_spec(s.memory)
            if lv.target == "self":
                targets[s.name] = torch.stack(
                    [memory_apply(spec, states[s.name], value[:, :, t]) for t in range(c1 - c0)], dim=2)
            else:
                targets[s.name] = value
        new_states, new_moms = {}, {}
        for s in lv.states:
            is_read = s.name == read_state
            y, w, m = memory_scan(
                memory_spec(s.memory), lv.objective, rule, states[s.name], moms[s.name], key,
                targets[s.name], query if is_read else None, eta, alpha, beta, chunk=C,
                read=lv.read_mode if is_read else "chunk",
                huber_delta=float(huber.value) if huber is not None else 1.0,
            )
            if is_read:
                ys.append(y)
            new_states[s.name], new_moms[s.name] = w, m
        states, moms = new_states, new_moms
        gw = lv.grad_writes
        if gw.mode == "stop" or (gw.mode == "truncate" and (i + 1) % gw.chunks == 0):
            states = {k: [w.detach() for w in v] for k, v in states.items()}
            moms = {k: (None if v is None else [w.detach() for w in v]) for k, v in moms.items()}
    out = torch.cat(ys, dim=2)
    for op in reversed(post):
        out = ev.ev(ir.Flow(op.kind, name=op.name, arg=ir.Flow("input", name="reads"), params=op.params,
                            span=op.span), everything, states, merged=out)
    out = out.transpose(1, 2).reshape(B, T, -1)
    if lv.output is not None:
        out = ev.ev(lv.output, everything, states, merged=out)
    return out
