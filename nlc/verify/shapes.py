"""Dimensions and widths (sympy): every dim a positive integer, every flow fits its consumer.

Widths are exact sympy numbers, so ``dh = d / heads`` with ``d = 250, heads = 4`` is reported
as the non-integer ``125/2`` at the line that defines it, not as a runtime shape error.
"""

from __future__ import annotations

import sympy

from .. import ir
from ..diagnostics import Diagnostics

__all__ = ["check", "flow_width"]


# levels whose state another level can start from (the graph pass reports the others)
_INIT_SOURCES = (ir.LevelKind.IN_CONTEXT, ir.LevelKind.STATIC, ir.LevelKind.FROZEN, ir.LevelKind.STEPS_GROUP)


def _ok_int(v) -> bool:
    return v is not None and isinstance(v, sympy.Basic) and v.is_Integer and v > 0


def _check_value(diags: Diagnostics, what: str, v, span) -> bool:
    """Report a non-integer or non-positive width; True when it is a positive integer."""
    if v is None:
        return False
    if not isinstance(v, sympy.Basic):
        v = sympy.sympify(v)
    if not v.is_Integer:
        diags.error("NL301", f"{what} is {v}, not an integer", span)
        return False
    if v <= 0:
        diags.error("NL302", f"{what} is {v}; it must be at least 1", span)
        return False
    return True


def flow_width(program: ir.Program, level: ir.Level, flow: ir.Flow | None):
    """The per-token width ``flow`` produces (None when unknown because of earlier errors)."""
    if flow is None:
        return None
    if flow.kind == "ref":
        b = level.binding(flow.name)
        return flow_width(program, level, b.flow) if b else None
    if flow.kind == "call":
        callee = program.level(flow.name)
        return callee.output_width if callee else None
    if flow.kind == "op" and flow.name in ("conv", "l2norm", "scale", "sigmoid", "softplus", "silu",
                                           "gelu", "relu", "tanh"):
        return flow_width(program, level, flow.arg)
    return flow.width


def check(program: ir.Program, diags: Diagnostics) -> None:
    spans = dict(program.dim_spans)
    for name, v in program.dims:
        _check_value(diags, f"dimension `{name}`", v, spans.get(name, program.span))
    _check_value(diags, "the vocabulary size", program.vocab, program.embed_span)
    _check_value(diags, "the model width", program.d_model, program.embed_span)
    d = program.d_model

    for lv in program.levels:
        for s in lv.states:
            _memory(diags, s.memory, f"memory of `{lv.name}.{s.name}`" if s.name != lv.name else f"memory of `{lv.name}`", d, program)
        for b in lv.bindings:
            _flow(program, lv, b.flow, diags)
        _flow(program, lv, lv.reads, diags)
        _flow(program, lv, lv.output, diags)
        if lv.kind is ir.LevelKind.IN_CONTEXT:
            _roles(program, lv, diags)
        for gate in ("lr", "decay", "momentum"):
            h = lv.rule_arg(gate)
            if h is not None and h.ref:
                b = lv.binding(h.value)
                w = flow_width(program, lv, b.flow) if b else None
                if w is not None and _ok_int(w) and w != 1:
                    diags.error("NL605", f"`{gate}` of level `{lv.name}` is `{h.value}`, which has width {w}; "
                                "a gate is one number per token (per head)", h.span)
        _output(program, lv, diags, d)
        if lv.init.mode == "from" and lv.init.source:
            src = program.level(lv.init.source)
            if src is not None and src is not lv and src.states and lv.states and src.kind in _INIT_SOURCES:
                a, b = src.primary.memory, lv.primary.memory
                if (a.kind, a.din, a.dout, a.hidden, a.depth) != (b.kind, b.din, b.dout, b.hidden, b.depth):
                    diags.error("NL303", f"level `{lv.name}` starts from `{src.name}`'s state, but their memories "
                                f"differ: {b.describe()} vs {a.describe()}", lv.init.span)


def _memory(diags, m: ir.MemoryType, what: str, d, program) -> None:
    if m.kind in ("linear", "mlp", "residual_mlp", "swiglu"):
        ok_in = _check_value(diags, f"the input width of the {what}", m.din, m.span)
        ok_out = _check_value(diags, f"the output width of the {what}", m.dout, m.span)
        if m.kind != "linear":
            _check_value(diags, f"the hidden width of the {what}", m.hidden, m.span)
        if m.kind in ("mlp", "residual_mlp") and m.depth < 1:
            diags.error("NL302", f"the depth of the {what} must be at least 1", m.span)
        if m.kind == "residual_mlp" and ok_in and ok_out and m.din != m.dout:
            diags.error("NL303", f"the {what} is residual, so its input and output widths must agree "
                        f"({m.din} -> {m.dout})", m.span, "use `mlp` for a change of width")
    elif m.kind == "attention":
        heads = m.option("heads")
        if heads is None:
            heads = program.dim("heads")
            declared = "heads" in dict(program.dims)  # declared but invalid: reported at its definition
            if heads is None and not declared and not diags.has_error_within(m.span):
                diags.error("NL304", f"the {what} needs `heads = ...` (or a `heads` dimension)", m.span)
            if heads is None:
                return
        if _check_value(diags, f"the head count of the {what}", heads, m.span) and _ok_int(d):
            q = sympy.Rational(d, heads)
            if not q.is_Integer:
                diags.error("NL301", f"the {what} splits width {d} into {heads} heads of {q}", m.span,
                            "choose a head count that divides the model width")
        w = m.option("window")
        if w is not None:
            _check_value(diags, f"the window of the {what}", w, m.span)


def _flow(program, lv: ir.Level, flow: ir.Flow | None, diags) -> None:
    if flow is None:
        return
    for f in flow.walk():
        if f.kind == "op" and f.name == "linear":
            a, b = f.param("shape")
            _check_value(diags, "the input width of `linear`", a, f.span)
            _check_value(diags, "the output width of `linear`", b, f.span)
            w = flow_width(program, lv, f.arg)
            if _ok_int(w) and _ok_int(a) and w != a:
                diags.error("NL303", f"`linear({a} -> {b})` receives a flow of width {w}", f.span,
                            f"write `linear({w} -> {b})`, or change what flows in")
        elif f.kind == "op" and f.name == "conv":
            _check_value(diags, "the width of `conv`", f.param("_"), f.span)
        elif f.kind == "read":
            s = lv.state(f.name)
            w = flow_width(program, lv, f.arg)
            if s is not None and _ok_int(w) and _ok_int(s.memory.din) and w != s.memory.din:
                diags.error("NL303", f"state `{f.name}` takes width {s.memory.din} but receives {w}", f.span)
        elif f.kind == "call":
            callee = program.level(f.name)
            w = flow_width(program, lv, f.arg)
            if callee is not None and _ok_int(w) and _ok_int(callee.input_width) and w != callee.input_width:
                diags.error("NL303", f"level `{f.name}` reads the block stream of width {callee.input_width} "
                            f"but receives {w}", f.span)


def _roles(program, lv: ir.Level, diags) -> None:
    key = lv.binding("key")
    val = lv.binding("value")
    kw = flow_width(program, lv, key.flow) if key else lv.input_width
    vw = flow_width(program, lv, val.flow) if val else lv.input_width
    kspan = key.span if key else lv.name_span
    vspan = val.span if val else lv.name_span
    for s in lv.states:
        m = s.memory
        if m.kind not in ("linear", "mlp", "residual_mlp", "swiglu"):
            continue
        if _ok_int(kw) and _ok_int(m.din) and kw != m.din:
            diags.error("NL303", f"state `{s.name}` of level `{lv.name}` maps width {m.din}, but its keys have "
                        f"width {kw}", kspan, "set `let key = ...` to the memory's input width")
        if lv.target == "self":
            if _ok_int(vw) and _ok_int(m.din) and vw != m.din:
                diags.error("NL303", f"with `target self`, state `{s.name}` is applied to the values (width {vw}), "
                            f"but it takes width {m.din}", lv.clause_span("target"))
            if _ok_int(m.din) and _ok_int(m.dout) and m.din != m.dout:
                pass  # M(v) has width dout, and dout is what it is trained to produce: consistent
        elif _ok_int(vw) and _ok_int(m.dout) and vw != m.dout:
            diags.error("NL303", f"state `{s.name}` of level `{lv.name}` produces width {m.dout}, but its "
                        f"training values have width {vw}", vspan, "set `let value = ...` to the memory's output width")


def _output(program, lv: ir.Level, diags, d) -> None:
    sub = lv.kind in (ir.LevelKind.IN_CONTEXT, ir.LevelKind.STATIC, ir.LevelKind.FROZEN,
                      ir.LevelKind.STEPS_GROUP)
    if not sub or not _ok_int(d):
        return
    block = program.block(lv.block) if lv.block is not None else None
    if block is not None and lv.name in block.generators:
        return
    w = lv.output_width
    if lv.output is None and lv.reads is not None:
        rw = flow_width(program, lv, lv.reads)
        w = rw * lv.heads if (rw is not None and lv.per_head) else rw
    if _ok_int(w) and w != d:
        where = lv.clause_span("output") if lv.output is not None else (lv.clause_span("reads"))
        hint = (f"add `output linear({w} -> {d})`" if lv.output is None
                else f"end the output with width {d}")
        diags.error("NL303", f"level `{lv.name}` outputs width {w} into a residual stream of width {d}", where,
                    hint)
