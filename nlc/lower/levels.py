"""Lowering of one level into a generated class: flows, the chunk loop, the closed-form updates."""

from __future__ import annotations

from dataclasses import replace

from .. import ir
from ..verify.shapes import flow_width
from .plan import Attr, ClassPlan, Line, Namespace, camel, fail as _fail, line_comment as _line_comment, num as _num


def _int(v) -> int:
    return int(v)


def _primary(code: str) -> str:
    """``code`` parenthesized unless it is already a primary (a name, call or attribute)."""
    depth = 0
    for ch in code:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and ch == " ":
            return f"({code})"
    return code


_ARG = "\x00"  # placeholder for a stage's input while a pipeline is assembled


# ---- flows -----------------------------------------------------------------------------------------

_ACT = {
    "silu": "F.silu({})", "gelu": "F.gelu({})", "relu": "F.relu({})", "tanh": "torch.tanh({})",
    "sigmoid": "torch.sigmoid({})", "softplus": "F.softplus({})",
}


def _depends_on_state(lv: ir.Level, flow: ir.Flow | None, memo: dict) -> bool:
    if flow is None:
        return False
    for f in flow.walk():
        if f.kind == "read":
            return True
        if f.kind == "ref":
            if f.name not in memo:
                memo[f.name] = False  # guard (cycles are rejected by the verifier)
                b = lv.binding(f.name)
                memo[f.name] = _depends_on_state(lv, b.flow if b else None, memo)
            if memo[f.name]:
                return True
    return False


def _topo_bindings(lv: ir.Level) -> list[ir.Binding]:
    order: list[ir.Binding] = []
    seen: set[str] = set()

    def visit(b: ir.Binding):
        if b.name in seen:
            return
        seen.add(b.name)
        for f in b.flow.walk():
            if f.kind == "ref":
                dep = lv.binding(f.name)
                if dep is not None:
                    visit(dep)
        order.append(b)

    for b in lv.bindings:
        visit(b)
    return order


class _LevelEmitter:
    """Emits one level class: attributes for every learned stage, and the forward body."""

    def __init__(self, program: ir.Program, lv: ir.Level, plan: ClassPlan, consts, cns: Namespace):
        self.program = program
        self.lv = lv
        self.plan = plan
        self.consts = consts  # module-level constants (shared list)
        self.cns = cns  # module-level constant namespace
        self.attrs = Namespace({"forward", "training", "persist", "carry", "state_sq", "period", "heads"})
        self.locals = Namespace({"x", "xin", "B", "T", "c0", "c1", "i", "ys", "start_states",
                                 "keep_chunk_states", "chunk_states"})
        self.H = lv.heads
        self.var: dict[str, str] = {}  # binding name -> python variable (whole sequence)
        self.cvar: dict[str, str] = {}  # binding name -> python variable (current chunk)
        self.state_var: dict[str, str] = {}
        self.mom_var: dict[str, str] = {}
        self.spec_const: dict[str, str] = {}
        self.dep_memo: dict[str, bool] = {}
        self.static = False  # static levels read their states as modules
        self.state_attr: dict[str, str] = {}
        self.pending_slices: list[Line] = []
        self.flow_attrs: dict[int, str] = {}  # source offset of a learned stage -> attribute

    # attributes and constants
    def attr(self, want: str, code: str, span=None) -> str:
        name = self.attrs(want)
        self.plan.attrs.append(Attr(name, code, _line_comment(self.program, span) if span else ""))
        return name

    def const(self, want: str, code: str, span=None) -> str:
        name = self.cns(want.upper())
        self.consts.append((name, code, _line_comment(self.program, span) if span else ""))
        return name

    def memory_spec(self, state: ir.StateDecl) -> str:
        if state.name not in self.spec_const:
            m = state.memory
            if m.kind not in ("linear", "mlp", "residual_mlp", "swiglu"):
                _fail(state.span, f"state `{state.name}` is a `{m.kind}` memory, which the code generator "
                      "cannot update in context")
            args = [repr(m.kind), f"din={_int(m.din)}", f"dout={_int(m.dout)}"]
            if m.kind in ("mlp", "residual_mlp", "swiglu"):
                args.append(f"hidden={_int(m.hidden)}")
            if m.kind in ("mlp", "residual_mlp"):
                args += [f"depth={m.depth}", f"act={m.act!r}"]
            self.spec_const[state.name] = self.const(
                f"{self.lv.name}_{state.name}_memory" if state.name != self.lv.name else f"{self.lv.name}_memory",
                f"nl_mem.MemorySpec({', '.join(args)})", state.span)
        return self.spec_const[state.name]

    # flows
    def emit(self, flow: ir.Flow, ctx: str, owner: str, out_ctx: bool = False) -> str:
        """Python expression for ``flow``. ctx: "seq" (whole sequence) or "chunk"."""
        k = flow.kind
        if k == "input":
            if flow.name == "reads":
                return owner  # the merged read, for `output`
            return "xin" if ctx == "seq" else self.chunk_of("xin", "input")
        if k == "const":
            return _num(flow.value)
        if k == "ref":
            if ctx == "chunk":
                if flow.name in self.cvar:
                    return self.cvar[flow.name]
                return self.chunk_of(self.var[flow.name], flow.name)
            if flow.name not in self.var:
                _fail(flow.span, f"`{flow.name}` reads an in-context state; it cannot be used outside the chunk loop")
            return self.var[flow.name]
        if k == "read":
            if self.static:
                arg = self.emit(flow.arg, ctx, owner)
                return f"self.{self.state_attr[flow.name]}({arg})"
            if ctx != "chunk":
                _fail(flow.span, "a state read outside the chunk loop")
            st = self.lv.state(flow.name)
            arg = self.emit(flow.arg, ctx, owner)
            return f"nl_mem.forward({self.memory_spec(st)}, {self.state_var[st.name]}, nl_flows.heads({arg}, {self.H}))"
        if k == "call":
            callee = self.program.level(flow.name)
            arg = self.emit(flow.arg, ctx, owner)
            if ctx == "chunk":
                _fail(flow.span, f"level `{flow.name}` is called on a flow that reads an in-context state")
            if flow.arg.per_head:
                _fail(flow.span, f"level `{flow.name}` is called on a per-head flow; call it on the block stream")
            attr = self.attr(flow.name, f"{flow.name}  # generator level, shared with the block", flow.span)
            self.plan.attrs[-1] = Attr(attr, "generators[" + repr(callee.name) + "]",
                                       _line_comment(self.program, flow.span))
            return f"self.{attr}({arg}.squeeze(1)).unsqueeze(1)"
        assert k == "op", k
        return self.op_code(flow, self.emit(flow.arg, ctx, owner, out_ctx), ctx, owner, out_ctx)

    def emit_assign(self, var: str, flow: ir.Flow, ctx: str, owner: str, out_ctx: bool = False) -> list[str]:
        """``var = <flow>``; a long pipeline becomes one statement per stage (``var = f(var)``)."""
        ops = []
        node = flow
        while node.kind == "op":
            ops.append(node)
            node = node.arg
        base = self.emit(node, ctx, owner, out_ctx)
        stages = [self.op_code(op, _ARG, ctx, owner, out_ctx) for op in reversed(ops)]
        single = base
        for st in stages:
            single = st.replace(_ARG, single)
        if len(var) + len(single) <= 84 or not stages:
            return [f"{var} = {single}"]
        lines = [f"{var} = {base}"]
        for st in stages:
            lines.append(f"{var} = {st.replace(_ARG, var)}")
        return lines

    def op_code(self, flow: ir.Flow, arg: str, ctx: str, owner: str, out_ctx: bool = False) -> str:
        """The code of one stage applied to the expression ``arg``."""
        name = flow.name
        if name == "linear":
            a, b = flow.param("shape")
            if out_ctx:
                attr = self.attr(f"{owner}_linear", f"nn.Linear({_int(a)}, {_int(b)}, bias=False)", flow.span)
            else:
                attr = self.attr(f"{owner}_linear", f"nl_flows.HeadLinear({self.H}, {_int(a)}, {_int(b)})", flow.span)
            self.flow_attrs[flow.span.start] = attr
            return f"self.{attr}({arg})"
        if name == "conv":
            if ctx == "chunk" or out_ctx:
                _fail(flow.span, "`conv` on a flow that reads an in-context state (or on the output) is not lowered; "
                      "convolve the level input instead")
            width = flow_width(self.program, self.lv, flow.arg)
            hp = self.H if flow.arg.per_head else 1
            attr = self.attr(f"{owner}_conv", f"nl_flows.HeadConv({hp} * {_int(width)}, {_int(flow.param('_'))})",
                             flow.span)
            self.flow_attrs[flow.span.start] = attr
            return f"self.{attr}({arg})"
        if name == "l2norm":
            return f"nl_flows.l2norm({arg})"
        if name == "mean":
            return f"{_primary(arg)}.mean(-1, keepdim=True)"
        if name == "scale":
            return f"{_primary(arg)} * {_num(flow.param('_'))}"
        if name in _ACT:
            return _ACT[name].format(arg)
        _fail(flow.span, f"flow stage `{name}` is not lowered for this level")

    def chunk_of(self, seq_var: str, want: str) -> str:
        key = "@" + seq_var
        if key not in self.cvar:
            self.cvar[key] = self.locals(f"{want}_c")
            self.pending_slices.append(Line(f"{self.cvar[key]} = nl_flows.chunk({seq_var}, c0, c1)"))
        return self.cvar[key]


# ---- levels ---------------------------------------------------------------------------------------


def _doc(program: ir.Program, lv: ir.Level) -> list[str]:
    where = _line_comment(program, lv.name_span).split("  ")[0]
    d = [f"Level `{lv.name}` ({where}): {lv.kind.value.replace('_', '-')}, {lv.period}."]
    if lv.per_head:
        d.append(f"Per head: {lv.heads} heads.")
    for s in lv.states:
        d.append(f"state {s.name}: {s.memory.describe()}")
    if lv.objective:
        d.append(f"objective {lv.objective}; rule {lv.rule}"
                 + (f"({', '.join(f'{k}={h}' for k, h in lv.rule_args)})" if lv.rule_args else ""))
    if lv.kind is ir.LevelKind.IN_CONTEXT:
        d.append(f"reset {lv.reset}; init {lv.init}; grad through writes {lv.grad_writes}; "
                 f"read {lv.read_mode}; target {lv.target}")
    return d


def _rule_const(em: _LevelEmitter) -> str:
    lv = em.lv
    mom = lv.rule_arg("momentum") is not None
    kind = lv.rule
    form = lv.rule_arg("form")
    args = [repr(kind)]
    if kind == "dgd" and mom:
        args.append("momentum=True")
    if form is not None:
        args.append(f"dgd_form={str(form.value)!r}")
    return em.const(f"{lv.name}_rule", f"nl_chunk.RuleSpec({', '.join(args)})", lv.clause_span("rule"))


def lower_in_context(program: ir.Program, lv: ir.Level, consts, cns, nested_parent: ir.Level | None) -> ClassPlan:
    cls = ClassPlan(name=cns(camel(lv.name) + "Level"), level=lv.name, kind=lv.kind.value, doc=_doc(program, lv))
    em = _LevelEmitter(program, lv, cls, consts, cns)
    H = lv.heads
    C = lv.period.every
    body = cls.body
    rule_c = _rule_const(em)
    objective = lv.objective
    huber = lv.objective_arg("delta")
    reads = lv.reads
    if reads is None or not any(f.kind == "read" for f in reads.walk()):
        _fail(lv.name_span, f"level `{lv.name}` must read one of its states (`reads state(query)`)")
    # the read: innermost `read` node; the stages after it are applied to the whole output
    post_ops: list[ir.Flow] = []
    node = reads
    while node.kind == "op":
        post_ops.append(node)
        node = node.arg
    if node.kind != "read":
        _fail(reads.span, "`reads` must be a state call followed by stages, e.g. `reads mem(q) | l2norm`")
    read_state = node.name
    read_arg = node.arg

    cls.class_consts = [("period", str(C)), ("heads", str(H))]
    if nested_parent is not None:
        cls.signature = "x, start_states=None"
    cls.signature += ", keep_chunk_states=False"

    # initial states
    for st in lv.states:
        spec = em.memory_spec(st)
        em.state_var[st.name] = em.locals(st.name)
        if lv.init.mode == "learned" or (lv.init.mode == "from" and nested_parent is None):
            em.state_attr[st.name] = em.attr(
                f"{st.name}0", f"nl_flows.MemoryInit({spec}, heads={H})",
                lv.clause_span("init") if "init" in dict(lv.clause_spans) else st.span)
    momentum = lv.rule == "momentum" or (lv.rule == "dgd" and lv.rule_arg("momentum") is not None)
    for st in lv.states:
        if momentum:
            em.mom_var[st.name] = em.locals(f"{st.name}_s")

    body.append(Line("B, T, _ = x.shape"))
    body.append(Line("xin = x.unsqueeze(1)  # [B, 1, T, d]: the input is shared by all heads"))

    # flows computed once for the whole sequence
    order = _topo_bindings(lv)
    seq_bindings = [b for b in order if not _depends_on_state(lv, b.flow, em.dep_memo)]
    chunk_bindings = [b for b in order if _depends_on_state(lv, b.flow, em.dep_memo)]
    if seq_bindings:
        body.append(Line("# flows that read no in-context state: computed once for the whole sequence"))
    for b in seq_bindings:
        var = em.locals(b.name)
        for j, code in enumerate(em.emit_assign(var, b.flow, "seq", b.name)):
            body.append(Line(code, 0, "" if j else _line_comment(program, b.span)))
        em.var[b.name] = var

    def init_expr(st: ir.StateDecl) -> str:
        spec = em.memory_spec(st)
        if lv.init.mode == "zeros":
            return f"nl_flows.zeros_state({spec}, B, {H}, x)"
        return f"nl_flows.expand_state(self.{em.state_attr[st.name]}(), B)"

    states = [em.state_var[s.name] for s in lv.states]
    moms = [em.mom_var[s.name] for s in lv.states] if momentum else []
    body.append(Line(f"# in-context states at the start of the sequence ({lv.init})"))
    start_lines = []
    if nested_parent is not None:
        body.append(Line("if start_states is None:"))
        body.append(Line(f"raise ValueError({('level `' + lv.name + '` is nested in `' + nested_parent.name + '`: call it with the chunk states of `' + nested_parent.name + '`')!r})", 1))
    for st in lv.states:
        if nested_parent is not None:
            start_lines.append(Line(f"{em.state_var[st.name]} = nl_flows.expand_state(start_states[0], B)",
                                    0, f"init from {nested_parent.name}"))
        else:
            start_lines.append(Line(f"{em.state_var[st.name]} = {init_expr(st)}"))
    for m in moms:
        start_lines.append(Line(f"{m} = None  # momentum starts at zero"))
    body.append(Line("if self.persist and self.carry is not None and self.carry[0][0].shape[0] == B:"))
    names = ", ".join(states + moms)
    body.append(Line(f"{names}{',' if len(states + moms) == 1 else ''} = self.carry", 1,
                     "persisted state (reset never / test-time learning)"))
    body.append(Line("else:"))
    for ln in start_lines:
        body.append(Line(ln.code, 1, ln.comment))

    body.append(Line("ys = []"))
    body.append(Line("chunk_states = []"))
    body.append(Line(f"for i, (c0, c1) in enumerate(nl_ops.chunk_schedule(T, {C})):",
                     0, _line_comment(program, lv.period.span) if lv.period.span.start else ""))
    loop: list[Line] = []
    # resets
    if lv.reset.mode == "every":
        N = lv.reset.every
        loop.append(Line(f"if c0 > 0 and c0 % {N} == 0:", 0, _line_comment(program, lv.reset.span)))
        for st in lv.states:
            if nested_parent is not None:
                loop.append(Line(f"{em.state_var[st.name]} = nl_flows.expand_state(start_states[c0 // {N}], B)", 1))
            else:
                loop.append(Line(f"{em.state_var[st.name]} = {init_expr(st)}", 1))
        for m in moms:
            loop.append(Line(f"{m} = None", 1))
    loop.append(Line(f"if keep_chunk_states:"))
    loop.append(Line(f"chunk_states.append({states[0]})", 1))
    em.pending_slices = []
    chunk_lines: list[Line] = []
    if chunk_bindings:
        chunk_lines.append(Line("# flows that read the chunk-start states (paper eq 90)"))
    for b in chunk_bindings:
        var = em.locals(f"{b.name}_c")
        for j, code in enumerate(em.emit_assign(var, b.flow, "chunk", b.name)):
            chunk_lines.append(Line(code, 0, "" if j else _line_comment(program, b.span)))
        em.cvar[b.name] = var

    def role(name: str) -> str:
        if lv.binding(name) is not None:
            return em.emit(ir.Flow("ref", name=name, per_head=lv.binding(name).flow.per_head), "chunk", name)
        return em.emit(ir.Flow("input"), "chunk", name)

    key = role("key")
    value = role("value")
    query = em.emit(read_arg, "chunk", "query")

    def gate(name: str) -> str:
        h = lv.rule_arg(name)
        if h is None:
            return "None"
        if h.ref:
            return f"nl_flows.gate({em.emit(ir.Flow('ref', name=h.value), 'chunk', h.value)}, {H})"
        return _num(h.value)

    eta, alpha = gate("lr"), gate("decay")
    beta = gate("momentum") if momentum else "None"
    # targets
    upd: list[Line] = []
    targets = {}
    if lv.target == "self":
        upd.append(Line("# target self: each memory is trained towards its own view of the values (eq 84-85)"))
        for st in lv.states:
            t = em.locals(f"{st.name}_target")
            upd.append(Line(f"{t} = nl_mem.forward({em.memory_spec(st)}, {em.state_var[st.name]}, "
                            f"nl_flows.heads({value}, {H}))"))
            targets[st.name] = t
    else:
        for st in lv.states:
            targets[st.name] = f"nl_flows.heads({value}, {H})"
    upd.append(Line(f"# update every state with rule {lv.rule}: closed-form gradients at the chunk-start state",
                    0, _line_comment(program, lv.clause_span("rule"))))
    y_var = em.locals("y")
    obj_args = f", huber_delta={_num(huber.value)}" if huber is not None else ""
    for st in lv.states:
        sv = em.state_var[st.name]
        mv = em.mom_var.get(st.name, "None")
        is_read = st.name == read_state
        q = f"nl_flows.heads({query}, {H})" if is_read else "None"
        out = y_var if is_read else "_"
        mom_out = mv if momentum else "_"
        read_kw = f", read={lv.read_mode!r}" if is_read and lv.read_mode != "chunk" else ""
        upd.append(Line(
            f"{out}, {sv}, {mom_out} = nl_chunk.chunk_step({em.memory_spec(st)}, {objective!r}, {rule_c}, "
            f"{sv}, {mv}, nl_flows.heads({key}, {H}), {targets[st.name]}, {q}, {eta}, {alpha}, {beta}"
            f"{read_kw}{obj_args})"))
    # gradient through writes
    gw = lv.grad_writes
    if gw.mode == "stop":
        upd.append(Line("# grad through writes stop: the outer loss does not see the writes"))
        for v in states + moms:
            upd.append(Line(f"{v} = nl_flows.detach_state({v})"))
    elif gw.mode == "truncate":
        upd.append(Line(f"if (i + 1) % {gw.chunks} == 0:  # grad through writes truncate {gw.chunks} chunks"))
        for v in states + moms:
            upd.append(Line(f"{v} = nl_flows.detach_state({v})", 1))
    upd.append(Line(f"ys.append({y_var})"))
    for ln in em.pending_slices + chunk_lines + upd:
        loop.append(Line(ln.code, ln.depth, ln.comment))
    for ln in loop:
        body.append(Line(ln.code, ln.depth + 1, ln.comment))

    body.append(Line(f"self.state_sq.copy_(nl_flows.sq_norm({', '.join(states)}))"))
    body.append(Line("if self.persist:"))
    body.append(Line(f"self.carry = nl_flows.detach_carry({', '.join(states + moms)})", 1))
    out = em.locals("out")
    body.append(Line(f"{out} = torch.cat(ys, dim=2)  # [B, {H}, T, w]"))
    for op in reversed(post_ops):
        body.append(Line(f"{out} = {em.emit(_with_arg(op, ir.Flow('input', name='reads')), 'seq', out)}"))
    body.append(Line(f"{out} = nl_flows.merge_heads({out})  # [B, T, heads * w]"))
    if lv.output is not None:
        code = em.emit(lv.output, "seq", out, out_ctx=True)
        body.append(Line(f"{out} = {code}", 0, _line_comment(program, lv.clause_span("output"))))
    body.append(Line(f"return ({out}, chunk_states) if keep_chunk_states else {out}"))
    cls.class_consts.append(("flow_attrs", repr(em.flow_attrs)))
    cls.class_consts.append(("state_attrs", repr(em.state_attr)))
    cls.attrs.insert(0, Attr("persist", repr(lv.reset.mode == "never"),
                             "keep the state across calls (reset never, or test-time learning)"))
    cls.attrs.insert(1, Attr("carry", "None"))
    return cls


def _with_arg(op: ir.Flow, arg: ir.Flow) -> ir.Flow:
    return replace(op, arg=arg)


def lower_static(program: ir.Program, lv: ir.Level, consts, cns) -> ClassPlan:
    """A level with no in-context update (never / frozen / every N steps): its memory is a module."""
    cls = ClassPlan(name=cns(camel(lv.name) + "Level"), level=lv.name, kind=lv.kind.value, doc=_doc(program, lv))
    em = _LevelEmitter(program, lv, cls, consts, cns)
    em.static = True
    if lv.per_head:
        _fail(lv.name_span, f"level `{lv.name}` is per head but has no in-context update; the code generator "
              "lowers per-head levels only when they are updated every N tokens")
    for st in lv.states:
        em.state_attr[st.name] = em.attr(st.name, f"nl_flows.StaticMemory({em.memory_spec(st)})", st.span)
    body = cls.body
    body.append(Line("xin = x.unsqueeze(1)  # [B, 1, T, d]"))
    for b in _topo_bindings(lv):
        var = em.locals(b.name)
        for j, code in enumerate(em.emit_assign(var, b.flow, "seq", b.name)):
            body.append(Line(code, 0, "" if j else _line_comment(program, b.span)))
        em.var[b.name] = var
    out = em.locals("out")
    body.append(Line(f"{out} = {em.emit(lv.reads, 'seq', 'reads')}.squeeze(1)"))
    if lv.output is not None:
        body.append(Line(f"{out} = {em.emit(lv.output, 'seq', out, out_ctx=True)}", 0,
                         _line_comment(program, lv.clause_span("output"))))
    body.append(Line(f"return {out}"))
    cls.class_consts.append(("flow_attrs", repr(em.flow_attrs)))
    return cls


def lower_attention(program: ir.Program, lv: ir.Level, d: int, cns) -> ClassPlan:
    """Causal softmax attention: the non-parametric level updated at every token (paper eq 62)."""
    cls = ClassPlan(name=cns(camel(lv.name) + "Level"), level=lv.name, kind=lv.kind.value, doc=_doc(program, lv))
    m = lv.primary.memory
    heads = int(m.option("heads") or program.dim("heads"))
    window = m.option("window")
    rope = bool(m.option("rope", True))
    dh = d // heads
    cls.doc.append(f"{heads} heads of {dh}; " + (f"sliding window of {int(window)} tokens" if window else "full causal")
                   + ("; rotary positions" if rope else ""))
    where = _line_comment(program, lv.primary.memory.span)
    cls.attrs.append(Attr("qkv", f"nn.Linear({d}, {3 * d}, bias=False)", where))
    cls.attrs.append(Attr("proj", f"nn.Linear({d}, {d}, bias=False)"))
    b = cls.body
    b.append(Line("B, T, _ = x.shape"))
    b.append(Line(f"q, k, v = self.qkv(x).split({d}, dim=-1)"))
    b.append(Line(f"q, k, v = (nl_ops.split_heads(t, {heads}) for t in (q, k, v))  # [B, {heads}, T, {dh}]"))
    if rope:
        b.append(Line(f"cos, sin = nl_ops.rope_cache(T, {dh}, device=x.device, dtype=x.dtype)"))
        b.append(Line("q, k = nl_ops.apply_rope(q, cos, sin), nl_ops.apply_rope(k, cos, sin)"))
    b.append(Line(f"y = nl_ops.causal_attention(q, k, v, window={int(window) if window else None})"))
    b.append(Line("return self.proj(nl_ops.merge_heads(y))"))
    return cls
