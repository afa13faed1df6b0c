"""Lowering of one level into a generated class: flows, the chunk loop, the closed-form updates."""

from __future__ import annotations

import re
from dataclasses import replace

from .. import ir
from ..verify.shapes import flow_width
from .plan import Attr, ClassPlan, Line, Namespace, camel, fail as _fail, line_comment as _line_comment, num as _num


def _int(v) -> int:
    return int(v)


def _mem_key(m: ir.MemoryType) -> tuple:
    return (m.kind, m.din, m.dout, m.hidden, m.depth, m.act)


def em_spec_code(m: ir.MemoryType) -> str:
    """``nl_mem.MemorySpec(...)`` for a memory type."""
    args = [repr(m.kind), f"din={_int(m.din)}", f"dout={_int(m.dout)}"]
    if m.kind in ("mlp", "residual_mlp", "swiglu"):
        args.append(f"hidden={_int(m.hidden)}")
    if m.kind in ("mlp", "residual_mlp"):
        args += [f"depth={m.depth}", f"act={m.act!r}"]
    return f"nl_mem.MemorySpec({', '.join(args)})"


def _plain(code: str) -> str:
    """A short variable-name stem for an expression (its last identifier)."""
    names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code)
    return names[-1] if names else "v"


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
        # memories of one shape updated together (stacked along the batch axis)
        self.batched = False
        self.batch_var = ""
        self.batch_spec = ""
        self.batch_index: dict[str, int] = {}
        self.batched_reads: dict[str, str] = {}
        self.prelude: list[Line] = []

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
            self.spec_const[state.name] = self.const(
                f"{self.lv.name}_{state.name}_memory" if state.name != self.lv.name else f"{self.lv.name}_memory",
                em_spec_code(m), state.span)
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
            if self.batched:  # every memory applied to this argument at once, then this memory's part
                if arg not in self.batched_reads:
                    var = self.locals(f"{_plain(arg)}_all")
                    self.batched_reads[arg] = var
                    self.prelude.append(Line(
                        f"{var} = nl_mem.forward({self.batch_spec}, {self.batch_var}, "
                        f"nl_flows.tile(nl_flows.heads({arg}, {self.H}), {len(self.lv.states)}))",
                        0, f"all {len(self.lv.states)} memories at once"))
                return f"nl_flows.part({self.batched_reads[arg]}, {self.batch_index[st.name]}, {len(self.lv.states)})"
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
        """The name, inside ``chunk``, of this chunk's slice of a whole-sequence flow (passed in xs)."""
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
        d.append("Inner gradients: closed form (nl_mem.forward_backward); updates: exact chunk form.")
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
    """An in-context level: hoisted flows in ``forward``, one chunk of the update in ``chunk``."""
    cls = ClassPlan(name=cns(camel(lv.name) + "Level"), level=lv.name, kind=lv.kind.value, doc=_doc(program, lv))
    em = _LevelEmitter(program, lv, cls, consts, cns)
    H = lv.heads
    C = lv.period.every
    rule_c = _rule_const(em)
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
    read_state, read_arg = node.name, node.arg

    cls.class_consts = [("period", str(C)), ("heads", str(H))]
    cls.signature = ("x, start_states=None" if nested_parent is not None else "x") + ", keep_chunk_states=False"
    momentum = lv.rule == "momentum" or (lv.rule == "dgd" and lv.rule_arg("momentum") is not None)
    em.locals = Namespace({"self", "state", "xs", "update", "states", "moms", "y", "target"})
    # memories of one shape (self-modifying Titans: k, v, η, α and the memory) are stacked along
    # the batch axis and updated by one chunk_step: one set of kernels instead of one per memory
    S = len(lv.states)
    batched = S > 1 and nested_parent is None and len({_mem_key(s.memory) for s in lv.states}) == 1
    if batched:
        spec_name = em.const(f"{lv.name}_memory", em_spec_code(lv.states[0].memory), lv.states[0].span)
        em.spec_const = {s.name: spec_name for s in lv.states}
    for st in lv.states:
        spec = em.memory_spec(st)
        em.state_var[st.name] = em.locals(st.name)
        if momentum:
            em.mom_var[st.name] = em.locals(f"{st.name}_s")
        if nested_parent is None and lv.init.mode == "learned":
            em.state_attr[st.name] = em.attr(
                f"{st.name}0", f"nl_flows.MemoryInit({spec}, heads={H})",
                lv.clause_span("init") if "init" in dict(lv.clause_spans) else st.span)
    if batched:
        em.batched = True
        em.batch_var = em.locals("w")
        em.batch_spec = spec_name
        em.batch_index = {s.name: i for i, s in enumerate(lv.states)}
        states = [em.batch_var]
        moms = [em.locals("w_s")] if momentum else []
    else:
        states = [em.state_var[s.name] for s in lv.states]
        moms = [em.mom_var[s.name] for s in lv.states] if momentum else []

    # ---- chunk(): one chunk of C tokens ---------------------------------------------------------
    em.pending_slices = []
    body: list[Line] = []
    order = _topo_bindings(lv)
    seq_bindings = [b for b in order if not _depends_on_state(lv, b.flow, em.dep_memo)]
    chunk_bindings = [b for b in order if _depends_on_state(lv, b.flow, em.dep_memo)]
    fwd_locals = Namespace({"self", "x", "xin", "B", "T", "state", "out", "chunk_states", "start_states",
                            "keep_chunk_states"})
    for b in seq_bindings:  # names of the whole-sequence flows (emitted into forward below)
        em.var[b.name] = fwd_locals(b.name)
    em.var["@input"] = "xin"
    chunk_lines: list[Line] = []
    for b in chunk_bindings:
        var = em.locals(f"{b.name}_c")
        em.prelude = []
        assigns = em.emit_assign(var, b.flow, "chunk", b.name)
        chunk_lines += em.prelude
        for j, code in enumerate(assigns):
            chunk_lines.append(Line(code, 0, "" if j else _line_comment(program, b.span)))
        em.cvar[b.name] = var

    def role(name: str) -> str:
        b = lv.binding(name)
        if b is not None:
            return em.emit(ir.Flow("ref", name=name, per_head=b.flow.per_head), "chunk", name)
        return em.emit(ir.Flow("input"), "chunk", name)

    key, value = role("key"), role("value")
    query = em.emit(read_arg, "chunk", "query")
    # `let query = key`: the keys' tensor is passed as the queries too, and chunk_step's read is
    # then the inner loss's own forward
    shared_keys = lv.reads_at_keys()

    def gate(name: str) -> str:
        h = lv.rule_arg(name)
        if h is None:
            return "None"
        if h.ref:
            return f"nl_flows.gate({em.emit(ir.Flow('ref', name=h.value), 'chunk', h.value)}, {H})"
        return _num(h.value)

    eta, alpha = gate("lr"), gate("decay")
    beta = gate("momentum") if momentum else "None"
    upd: list[Line] = []
    targets = {}
    huber = lv.objective_arg("delta")
    obj_args = f", huber_delta={_num(huber.value)}" if huber is not None else ""
    if batched:
        em.prelude = []
        w, ws = states[0], (moms[0] if moms else "None")
        if lv.target == "self":
            upd.append(Line("# target self: each memory is trained towards its own view of the values (eq 84-85)"))
            upd.append(Line(f"target = nl_mem.forward({em.batch_spec}, {w}, nl_flows.tile(nl_flows.heads({value}, {H}), {S}))"))
        else:
            upd.append(Line(f"target = nl_flows.tile(nl_flows.heads({value}, {H}), {S})"))
        read_kw = f", read={lv.read_mode!r}" if lv.read_mode != "chunk" else ""
        upd.append(Line(f"# rule {lv.rule} for all {S} memories at once: closed-form inner gradients at the "
                        "chunk-start state", 0, _line_comment(program, lv.clause_span("rule"))))
        tiled = [f"nl_flows.tile({g}, {S})" if g != "None" else "None" for g in (eta, alpha, beta)]
        keys = f"nl_flows.tile(nl_flows.heads({key}, {H}), {S})"
        queries = f"nl_flows.tile(nl_flows.heads({query}, {H}), {S})"
        if shared_keys:
            queries = keys = em.locals("keys")
            upd.append(Line(f"{keys} = nl_flows.tile(nl_flows.heads({key}, {H}), {S})  # also the queries"))
        upd.append(Line(
            f"y, {w}, {ws if momentum else '_'} = nl_chunk.chunk_step({em.batch_spec}, {lv.objective!r}, {rule_c}, "
            f"{w}, {ws}, {keys}, target, {queries}, {', '.join(tiled)}{read_kw}{obj_args}, update=update)"))
        upd.append(Line(f"y = nl_flows.part(y, {em.batch_index[read_state]}, {S})  # what `{read_state}` reads"))
    elif lv.target == "self":
        upd.append(Line("# target self: each memory is trained towards its own view of the values (eq 84-85)"))
        for st in lv.states:
            t = em.locals(f"{st.name}_target")
            upd.append(Line(f"{t} = nl_mem.forward({em.memory_spec(st)}, {em.state_var[st.name]}, "
                            f"nl_flows.heads({value}, {H}))"))
            targets[st.name] = t
    else:
        for st in lv.states:
            targets[st.name] = f"nl_flows.heads({value}, {H})"
    if not batched:
        upd.append(Line(f"# rule {lv.rule}: closed-form inner gradients at the chunk-start state, exact chunk form",
                        0, _line_comment(program, lv.clause_span("rule"))))
    step_args = {}
    keys, queries = f"nl_flows.heads({key}, {H})", f"nl_flows.heads({query}, {H})"
    if shared_keys and not batched:
        queries = keys = em.locals("keys")
        upd.append(Line(f"{keys} = nl_flows.heads({key}, {H})  # also the queries: one forward serves both"))
    for st in ([] if batched else lv.states):
        sv = em.state_var[st.name]
        mv = em.mom_var.get(st.name, "None")
        is_read = st.name == read_state
        q = queries if is_read else "None"
        read_kw = f", read={lv.read_mode!r}" if is_read and lv.read_mode != "chunk" else ""
        step_args[st.name] = (f"{em.memory_spec(st)}, {lv.objective!r}, {rule_c}, {sv}, {mv}, "
                              f"{keys}, {targets[st.name]}, {q}, {eta}, {alpha}, {beta}"
                              f"{read_kw}{obj_args}")
        upd.append(Line(
            f"{'y' if is_read else '_'}, {sv}, {mv if momentum else '_'} = nl_chunk.chunk_step("
            f"{step_args[st.name]}, update=update)"))
    if lv.grad_writes.mode == "stop":
        upd.append(Line("# grad through writes stop: the outer loss does not see the writes"))
        for v in states + moms:
            upd.append(Line(f"{v} = nl_flows.detach_state({v})"))
    slices = em.pending_slices
    xs_seq = [ln.code.split(" = nl_flows.chunk(")[1].split(",")[0] for ln in slices]
    xs_chunk = [ln.code.split(" = ")[0] for ln in slices]
    unpack_states = ", ".join(states) + ("," if len(states) == 1 else "")
    body.append(Line(f"({unpack_states}), ({', '.join(moms)}{',' if len(moms) == 1 else ''}) = state"
                     if moms else f"({unpack_states}), _ = state"))
    body.append(Line(f"{', '.join(xs_chunk)}{',' if len(xs_chunk) == 1 else ''} = xs  # this chunk's tokens"))
    if chunk_lines:
        body.append(Line("# flows that read the chunk-start states (paper eq 90)"))
    body += chunk_lines + upd
    body.append(Line(f"return (({unpack_states}), ({', '.join(moms)}{',' if len(moms) == 1 else ''})), y"))
    cls.methods.append(("chunk", "state, xs, update=True", [
        f"One chunk of at most {C} tokens: read at the chunk-start states, then update every state.",
        "", "state: ((weights of each state), (momentum of each state)); xs: this chunk's slices of",
        "the whole-sequence flows, each [B, H', C, w]. update=False: the read only, for a chunk",
        "whose end state nothing reads (run_chunks decides); the states come back None.",
        "Returns (the state at the chunk end, y [B, heads, C, w]).",
    ], body))

    # ---- sequence(): every chunk at once, where the chunk is one chunk_step -----------------------
    # of a memory a whole-sequence form may cover (nl_chunks.sequence_step): a depth-2 MLP on l2
    # with gd or momentum and a chunk read (the fused kernels), or a linear memory on dot with gd or
    # dgd (the batched linear form). One state read by itself, no flow reading the state, plain
    # targets, gradients through every write, no reset inside the sequence. sequence_step checks
    # the rest (sizes, device, momentum) at run time.
    mem0 = lv.states[0].memory
    mlp2 = (lv.objective == "l2" and lv.rule in ("gd", "momentum") and lv.read_mode == "chunk"
            and mem0.kind in ("mlp", "residual_mlp") and mem0.depth == 2)
    linear = lv.objective == "dot" and lv.rule in ("gd", "dgd") and mem0.kind == "linear"
    if (S == 1 and not batched and not chunk_lines and lv.target != "self" and lv.grad_writes.mode == "full"
            and nested_parent is None and lv.reset.mode != "every" and (mlp2 or linear)):
        st = lv.states[0]
        sv, mv = em.state_var[st.name], em.mom_var.get(st.name, "None")
        seq = [body[0], Line(f"{', '.join(xs_chunk)}{',' if len(xs_chunk) == 1 else ''} = xs  # the whole sequence's "
                             "tokens")]
        if shared_keys:
            seq.append(Line(f"{keys} = nl_flows.heads({key}, {H})  # also the queries"))
        seq.append(Line(f"done = nl_chunks.sequence_step({step_args[st.name]}, chunk={C}, final=final_state)", 0,
                        _line_comment(program, lv.clause_span("rule"))))
        seq.append(Line("if done is None:"))
        seq.append(Line("return None  # not covered: run_chunks runs `chunk`", 1))
        seq.append(Line(f"y, {sv}, {mv if momentum else '_'} = done"))
        seq.append(body[-1])
        cls.methods.append(("sequence", "state, xs, final_state=True", [
            f"The whole sequence in chunks of {C} tokens at once (nl_chunks.sequence_step), or None where",
            "no whole-sequence form covers the memory. Same values as `chunk` applied chunk by chunk.",
            "final_state=False: nothing reads the end state (a form may leave the last update out).",
        ], seq))
        kw_seq = ["sequence=self.sequence"]
    else:
        kw_seq = []

    # ---- start(): the state a sequence starts from ---------------------------------------------
    if nested_parent is None:
        start = []
        for st in lv.states:
            spec = em.memory_spec(st)
            if lv.init.mode == "zeros":
                start.append(f"nl_flows.zeros_state({spec}, B, {H}, like)")
            else:
                start.append(f"nl_flows.expand_state(self.{em.state_attr[st.name]}(), B)")
        mom0 = "tuple(nl_flows.zeros_like_state(s) for s in states)" if momentum else "()"
        if batched:
            inits = ", ".join(f"self.{em.state_attr[st.name]}()" for st in lv.states)
            sbody = [Line(f"states = (nl_flows.stack_states([{inits}], B),)",
                          0, f"{', '.join(s.name for s in lv.states)} stacked: [{S} * B, heads, out, in]")]
        else:
            sbody = [Line(f"states = ({', '.join(start)}{',' if len(start) == 1 else ''})")]
        sbody.append(Line(f"return states, {mom0}"))
        cls.methods.append(("start", "B, like", [f"The in-context state at the start of a sequence ({lv.init})."],
                            sbody))

    # ---- forward(): whole-sequence flows, then the chunks ----------------------------------------
    fwd = cls.body
    fwd.append(Line("B, T, _ = x.shape"))
    fwd.append(Line("xin = x.unsqueeze(1)  # [B, 1, T, d]: the input is shared by all heads"))
    if seq_bindings:
        fwd.append(Line("# flows that read no in-context state: computed once for the whole sequence"))
    for b in seq_bindings:
        for j, code in enumerate(em.emit_assign(em.var[b.name], b.flow, "seq", b.name)):
            fwd.append(Line(code, 0, "" if j else _line_comment(program, b.span)))
    if nested_parent is not None:
        N = lv.reset.every
        fwd.append(Line("if start_states is None:"))
        msg = (f"level `{lv.name}` is nested in `{nested_parent.name}`: call it with the chunk states of "
               f"`{nested_parent.name}`")
        fwd.append(Line(f"raise ValueError({msg!r})", 1))
        mom0 = "(nl_flows.zeros_like_state(start_states[0]),)" if momentum else "()"
        fwd.append(Line(f"start = lambda c0: ((nl_flows.expand_state(start_states[c0 // {N}], B),), "
                        f"{mom0.replace('start_states[0]', f'start_states[c0 // {N}]')})",
                        0, f"init from {nested_parent.name}, restarted when it updates"))
        first = "start(0)"
    else:
        first = "self.start(B, x)"
    fwd.append(Line(f"# in-context state at the start of the sequence ({lv.init})"))
    fwd.append(Line("if self.persist and self.carry is not None and nl_flows.batch_of(self.carry) == B:"))
    fwd.append(Line("state = self.carry  # kept from the previous call (reset never / test-time learning)", 1))
    fwd.append(Line("else:"))
    fwd.append(Line(f"state = {first}", 1))
    kw = []
    if lv.reset.mode == "every":
        restart = "start" if nested_parent is not None else "lambda c0: self.start(B, x)"
        kw.append(f"reset_every={lv.reset.every}, restart={restart}")
    if lv.grad_writes.mode == "truncate":
        kw.append(f"truncate={lv.grad_writes.chunks}")
    kw.append("keep_states=keep_chunk_states")
    kw.append("final_state=self.persist")  # otherwise no chunk updates a state nothing reads
    kw += kw_seq
    xs = ", ".join(xs_seq) + ("," if len(xs_seq) == 1 else "")
    fwd.append(Line(f"state, out, chunk_states = nl_chunks.run_chunks(self.chunk, state, ({xs}), T, {C}, "
                    f"{', '.join(kw)})", 0, _line_comment(program, lv.period.span) if lv.period.span.start else ""))
    fwd.append(Line("self.state_sq.copy_(nl_flows.sq_norm(*state[0]))"))
    fwd.append(Line("if self.persist:"))
    fwd.append(Line("self.carry = nl_chunks.detach(state)", 1))
    for op in reversed(post_ops):
        fwd.append(Line(f"out = {em.emit(_with_arg(op, ir.Flow('input', name='reads')), 'seq', 'out')}"))
    fwd.append(Line(f"out = nl_flows.merge_heads(out)  # [B, T, {H} * w]"))
    if lv.output is not None:
        code = em.emit(lv.output, "seq", "out", out_ctx=True)
        fwd.append(Line(f"out = {code}", 0, _line_comment(program, lv.clause_span("output"))))
    fwd.append(Line("if keep_chunk_states:"))
    fwd.append(Line("return out, [s[0][0] for s in chunk_states]  # chunk-start weights of the first state", 1))
    fwd.append(Line("return out"))
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
        n = program.seq or 4096
        cls.attrs.append(Attr("rope", f"nl_ops.RopeTables({dh}, {n})", f"rotary tables for up to {n} positions"))
        b.append(Line("cos, sin = self.rope(T, x.dtype)"))
        b.append(Line("q, k = nl_ops.apply_rope(q, cos, sin), nl_ops.apply_rope(k, cos, sin)"))
    b.append(Line(f"y = nl_ops.causal_attention(q, k, v, window={int(window) if window else None})"))
    b.append(Line("return self.proj(nl_ops.merge_heads(y))"))
    return cls
