"""One level: its clauses, kind, period, rule and objective, states and flows."""

from __future__ import annotations

from dataclasses import replace


from .. import ast, ir, options
from ..diagnostics import allowed, did_you_mean
from ..source import Span
from .flows import _LevelScope, _apply_callable, _flow, _ref
from .values import _Ctx, _check_kwargs, _eval, _memory, _short, _split_args, _typed_kw

__all__ = ["_level"]


_CLAUSE_NAMES = {
    ast.Objective: "objective", ast.Rule: "rule", ast.Every: "period", ast.Never: "period",
    ast.Frozen: "period", ast.ResetPer: "reset", ast.ResetNever: "reset", ast.ResetEvery: "reset",
    ast.InitMode: "init", ast.InitFrom: "init", ast.GradWrites: "grad", ast.ReadMode: "read",
    ast.Target: "target", ast.Context: "context", ast.Reads: "reads", ast.Output: "output",
}


def _level(ctx: _Ctx, lv: ast.Level, scope_t: tuple, d_model, block_levels: dict,
           all_levels: dict) -> tuple[ir.Level, list[tuple[str, Span]]]:
    name = lv.name.text
    clauses: dict[str, ast.Stmt] = {}
    spans: dict[str, Span] = {}
    for it in lv.items:
        key = _CLAUSE_NAMES.get(type(it))
        if key is None:
            continue
        if key in clauses:
            ctx.err("NL209", f"level `{name}` states its {key} twice", it.span,
                    notes=[(clauses[key].span, "first stated here")])
            continue
        clauses[key] = it
        spans[key] = it.span

    # heads
    heads = 1
    if lv.per_head:
        if lv.heads is not None:
            hv = _eval(ctx, lv.heads, {}, "dimension")
        elif "heads" in ctx.dims:
            hv = ctx.dims["heads"]
        else:
            ctx.err("NL304", f"level `{name}` is per head but no `heads` dimension is defined", lv.name.span,
                    "define `heads` in dims, or write `per head(4)`")
            hv = None
        if hv is not None and lv.heads is not None and not (hv.is_Integer and hv > 0):
            if not hv.is_Integer:
                ctx.err("NL301", f"level `{name}` is split into {hv} heads, not a whole number", lv.heads.span)
            else:
                ctx.err("NL302", f"level `{name}` is split into {hv} heads; it needs at least 1", lv.heads.span)
            hv = None
        if hv is None or not (hv.is_Integer and hv > 0):
            hv = ctx.dims.get("heads")  # keep going with the model's head count (or 1)
        heads = int(hv) if hv is not None and hv.is_Integer and hv > 0 else 1

    # states
    states: dict[str, ir.StateDecl] = {}
    primary_mem = None
    if lv.memory is not None:
        # "state" is recorded even when the memory does not resolve (already reported), so that
        # the verifier does not also report the level as having no memory
        spans.setdefault("state", lv.memory.span)
        primary_mem = _memory(ctx, lv.memory, {})
        if primary_mem is not None:
            states[name] = ir.StateDecl(name, primary_mem, lv.memory.span)
    for it in lv.items:
        if isinstance(it, ast.State):
            spans.setdefault("state", it.span)
            mem = _memory(ctx, it.memory, {})
            for n in it.names:
                if n.text in states:
                    ctx.err("NL202", f"state `{n.text}` is declared twice in level `{name}`", n.span)
                    continue
                if not _check_ident(ctx, n, "state"):
                    continue  # a reserved name would shadow a stage or `input` in every flow
                if mem is not None:
                    states[n.text] = ir.StateDecl(n.text, replace(mem, span=it.memory.span), n.span)
    lets: dict[str, ast.Let] = {}
    for it in lv.items:
        if isinstance(it, ast.Let):
            n = it.name.text
            if n in lets or n in states:
                ctx.err("NL202", f"`{n}` is defined twice in level `{name}`", it.name.span)
                continue
            if not _check_ident(ctx, it.name, "binding"):
                continue
            lets[n] = it

    input_width = d_model
    scope = _LevelScope(ctx, name, lv.per_head, heads, input_width, states, lets, block_levels, all_levels)
    bindings = []
    for n, let in lets.items():
        f = _ref(scope, n, let.name.span)
        scope.used.discard(n)
        if f is not None:
            bindings.append(ir.Binding(n, scope.resolved[n], let.span))
        else:
            # already reported; keep the name bound to a flow of unknown width so that checks of
            # keys, values and gates do not report the same mistake again
            bindings.append(ir.Binding(n, ir.Flow("input", name="<error>", span=let.value.span), let.span))

    # kind and period
    period, kind = _period(ctx, lv, clauses, scope_t, primary_mem, states)

    # context
    context, context_of = "tokens", None
    if "context" in clauses:
        c = clauses["context"].value
        if isinstance(c, ast.Call) and c.func.text == "grads":
            pos, kw = _split_args(c.args)
            if len(pos) == 1 and isinstance(pos[0], ast.Name) and not kw:
                context, context_of = "grads", pos[0].id
            else:
                ctx.err("NL205", "`grads(...)` takes one level name", c.span)
        elif isinstance(c, ast.Name) and c.id == "tokens":
            context = "tokens"
        else:
            ctx.err("NL204", f"unknown context `{_short(c)}`", c.span, "context is `tokens` or `grads(level)`")

    # objective
    objective, obj_args = None, ()
    if "objective" in clauses:
        o = clauses["objective"]
        table = (options.OUTER_OBJECTIVES if kind in (ir.LevelKind.OUTER, ir.LevelKind.STEPS_GROUP)
                 else options.OPTIMIZER_OBJECTIVES if kind is ir.LevelKind.OPTIMIZER
                 else options.IN_CONTEXT_OBJECTIVES)
        everything = {**options.IN_CONTEXT_OBJECTIVES, **options.OUTER_OBJECTIVES}
        oname = o.name.text
        if oname not in everything:
            ctx.err("NL203", f"unknown objective `{oname}`{did_you_mean(oname, everything)}", o.name.span,
                    f"objectives are {allowed(everything)}")
        else:
            objective = oname
            if oname in table:
                obj_args = _hyper_args(ctx, table[oname], o.args, f"objective `{oname}`", o.span, scope, lets)
            else:
                obj_args = ()

    # rule
    rule, rule_args = None, ()
    no_update = kind in (ir.LevelKind.ATTENTION, ir.LevelKind.STATIC, ir.LevelKind.FROZEN)
    if "rule" in clauses and not no_update:
        r = clauses["rule"]
        rname = r.name.text
        if kind is ir.LevelKind.IN_CONTEXT:
            table = options.IN_CONTEXT_RULES
        elif kind is ir.LevelKind.OPTIMIZER:
            table = options.OPTIMIZER_RULES
        else:
            table = options.OUTER_RULES
        if rname in table:
            rule = rname
            rule_args = _hyper_args(ctx, table[rname], r.args, f"rule `{rname}`", r.span, scope, lets)
        elif kind in (ir.LevelKind.OUTER, ir.LevelKind.STEPS_GROUP) and rname in all_levels:
            rule = rname  # an optimizer level: validated by the graph pass
            if r.args:
                ctx.err("NL205", f"rule `{rname}` names an optimizer level; its hyper-parameters live there",
                        r.args[0].span)
        else:
            every_rule = set(options.IN_CONTEXT_RULES) | set(options.OUTER_RULES) | set(options.OPTIMIZER_RULES)
            # (only on this error path: scanning every level per rule would make resolution quadratic)
            opt_levels = [n for n, l in all_levels.items() if _is_optimizer_ast(l)]
            takes = allowed(list(table) + (opt_levels if kind is ir.LevelKind.OUTER else []))
            if rname in every_rule:
                ctx.err("NL602", f"rule `{rname}` is not available for {kind.a_label} level",
                        r.name.span, f"this level takes {takes}")
            elif rname in all_levels:
                ctx.err("NL602", f"`rule {rname}` names a level, but only the outer level and steps levels "
                        f"are updated by optimizer levels; `{name}` is {kind.a_label} level",
                        r.name.span, f"this level takes {takes}")
            else:
                ctx.err("NL203", f"unknown rule `{rname}`{did_you_mean(rname, list(table) + opt_levels)}",
                        r.name.span, f"this level takes {allowed(list(table) + (opt_levels if kind is ir.LevelKind.OUTER else []))}")

    # reset / init / grad / read / target
    reset = ir.Reset("sequence")
    if "reset" in clauses:
        r = clauses["reset"]
        if isinstance(r, ast.ResetPer):
            if r.what.text not in options.RESET_PER:
                ctx.err("NL204", f"`reset per {r.what.text}` is not a reset policy{did_you_mean(r.what.text, options.RESET_PER)}",
                        r.what.span, "reset is `per sequence`, `never` or `every N tokens`")
            reset = ir.Reset("sequence", span=r.span)
        elif isinstance(r, ast.ResetNever):
            reset = ir.Reset("never", span=r.span)
        else:
            n = _period_count(ctx, r.value, r.unit, r.span, allow={"tokens"})
            reset = ir.Reset("every", n, span=r.span)
    init = ir.Init("learned")
    if "init" in clauses:
        i = clauses["init"]
        if isinstance(i, ast.InitFrom):
            init = ir.Init("from", i.source.text, span=i.span)
        elif i.mode.text in options.INIT_MODES:
            init = ir.Init(i.mode.text, span=i.span)
        else:
            ctx.err("NL204", f"`init {i.mode.text}` is not an init mode{did_you_mean(i.mode.text, options.INIT_MODES)}",
                    i.mode.span, "init is `learned`, `zeros` or `from <level>`")
    grad = ir.GradWrites("full")
    if "grad" in clauses:
        g = clauses["grad"]
        m = g.mode.text
        if m not in options.GRAD_MODES:
            ctx.err("NL204", f"`grad through writes {m}` is not a mode{did_you_mean(m, options.GRAD_MODES)}",
                    g.mode.span, "write `full`, `stop` or `truncate N chunks`")
        elif m == "truncate":
            if g.count is None:
                ctx.err("NL205", "`truncate` needs a count: `grad through writes truncate 2 chunks`", g.span)
                grad = ir.GradWrites("full", span=g.span)
            else:
                if g.unit is None:
                    ctx.err("NL401", "the truncation length needs its unit `chunks`", g.span,
                            f"write `grad through writes truncate {_short(g.count)} chunks`")
                elif g.unit.text not in ("chunks", "chunk"):
                    ctx.err("NL406", f"gradients are truncated after a number of `chunks`, not `{g.unit.text}`",
                            g.unit.span, f"write `grad through writes truncate {_short(g.count)} chunks`")
                n = _eval(ctx, g.count, {}, "count")
                grad = ir.GradWrites("truncate", int(n) if n is not None and n.is_Integer else None, span=g.span)
        else:
            if g.count is not None:
                ctx.err("NL205", f"`grad through writes {m}` takes no count", g.count.span)
            grad = ir.GradWrites(m, span=g.span)
    read_mode = "chunk"
    if "read" in clauses:
        rm = clauses["read"].mode
        if rm.text in options.READ_MODES:
            read_mode = rm.text
        else:
            ctx.err("NL204", f"`read {rm.text}` is not a read mode{did_you_mean(rm.text, options.READ_MODES)}",
                    rm.span, "read is `chunk` (paper eq 90) or `causal`")
    target = "plain"
    if "target" in clauses:
        tm = clauses["target"].mode
        if tm.text in options.TARGET_MODES:
            target = tm.text
        else:
            ctx.err("NL204", f"`target {tm.text}` is not a target mode{did_you_mean(tm.text, options.TARGET_MODES)}",
                    tm.span, "target is `plain` (train on value) or `self` (train on M(value), eq 83-85)")

    # reads and output
    implicit_input = ir.Flow("input", width=input_width, span=lv.span)
    reads = None
    if "reads" in clauses:
        reads = _flow(scope, clauses["reads"].value, implicit_input)
    elif kind is not ir.LevelKind.OPTIMIZER and kind is not ir.LevelKind.OUTER:
        if len(states) == 1:
            (only,) = states
            q = _ref(scope, "query", lv.span) if "query" in lets else implicit_input
            if q is not None:
                reads = _apply_callable(scope, only, q, lv.span, lv.span)
        elif len(states) > 1 and kind is not ir.LevelKind.ATTENTION:
            ctx.err("NL206", f"level `{name}` has {len(states)} states; say which one it outputs with `reads`",
                    lv.span, f"e.g. `reads {next(iter(states))}(query)`")
    for role in ("key", "value"):
        if role in lets:
            scope.used.add(role)
    if target == "self":
        for s in states:
            scope.used_states.add(s)  # every state generates its own values
    output = None
    if "output" in clauses:
        width = reads.width * heads if (reads is not None and reads.width is not None) else None
        merged = ir.Flow("input", name="reads", width=width, per_head=False, span=clauses["output"].span)
        output = _flow(scope, clauses["output"].value, merged)

    # gate references count as uses
    for _, h in rule_args:
        if h.ref:
            scope.used.add(h.value)

    # unused bindings
    for n, let in lets.items():
        if n not in scope.used and n not in ("query",):
            ctx.err("NL502", f"`{n}` is computed but never used in level `{name}`", let.name.span,
                    "use it in `reads`, a rule argument, or as `key`/`value`/`query`; or delete it")
        if n == "query" and n not in scope.used:
            ctx.err("NL502", f"`query` is computed but nothing reads it in level `{name}`", let.name.span)
    if kind in (ir.LevelKind.IN_CONTEXT,):
        for s, decl in states.items():
            if s not in scope.used_states and not (len(states) == 1):
                ctx.err("NL503", f"state `{s}` of level `{name}` is updated but nothing reads it", decl.span,
                        f"read it (e.g. `let k = {s}(input)`), or delete it")

    out_width = None
    if output is not None:
        out_width = output.width
    elif reads is not None and reads.width is not None:
        out_width = reads.width * heads if lv.per_head else reads.width
    elif primary_mem is not None and primary_mem.kind == "attention":
        out_width = d_model

    level = ir.Level(
        name=name, kind=kind, span=lv.span, name_span=lv.name.span, scope=scope_t, per_head=lv.per_head, heads=heads,
        input_width=input_width, states=tuple(states.values()), bindings=tuple(bindings),
        reads=reads, output=output, objective=objective, objective_args=obj_args, rule=rule,
        rule_args=rule_args, period=period, reset=reset, init=init, grad_writes=grad,
        read_mode=read_mode, target=target, context=context, context_of=context_of,
        output_width=out_width, clause_spans=tuple(spans.items()),
    )
    return level, scope.called_levels


def _is_optimizer_ast(lv: ast.Level) -> bool:
    return any(isinstance(it, ast.Context) and isinstance(it.value, ast.Call)
               and it.value.func.text == "grads" for it in lv.items)


def _check_ident(ctx: _Ctx, ident: ast.Ident, what: str = "") -> bool:
    """Report a reserved name (NL208); True when the name is usable."""
    if ident.text in options.RESERVED:
        kind = ("the flow input" if ident.text == "input" else
                "a flow stage" if ident.text in options.OPS else "a memory constructor")
        ctx.err("NL208", f"`{ident.text}` is reserved ({kind}) and cannot name a {what or 'state or binding'}",
                ident.span, f"rename it, e.g. `{ident.text}_{what.split()[-1] if what else 'x'}`")
        return False
    if ident.text.startswith("_"):
        ctx.err("NL208", f"names may not start with '_' (`{ident.text}`)", ident.span,
                "names starting with '_' are reserved for generated code")
        return False
    return True


def _period_count(ctx, value, unit, span, allow: set) -> int | None:
    v = _eval(ctx, value, {}, "period")
    if unit is None:
        ctx.err("NL401", f"the period `{_short(value)}` has no unit", span,
                f"write `{_short(value)} tokens` (within a sequence) or `{_short(value)} steps` (outer optimizer steps)")
        return int(v) if v is not None and v.is_Integer else None
    u = options.UNITS.get(unit.text)
    if u is None:
        ctx.err("NL204", f"unknown unit `{unit.text}`{did_you_mean(unit.text, options.UNITS)}", unit.span,
                "units are `tokens` and `steps`")
        return None
    if u not in allow:
        ctx.err("NL406", f"a reset counts `tokens`, not `{unit.text}`", unit.span,
                "write `reset every N tokens`")
        return None
    if v is None:
        return None
    if not v.is_Integer:
        ctx.err("NL301", f"the period {v} is not an integer", value.span,
                "a period counts whole tokens or steps")
        return None
    if v <= 0:
        ctx.err("NL302", f"the period must be at least 1, got {v}", value.span,
                "a level updates at most once per token (`every 1 tokens`); for no updates write `never`")
        return None
    return int(v)


def _period(ctx, lv, clauses, scope_t, primary_mem, states):
    name = lv.name.text
    in_model = scope_t == ("model",)
    is_attention = primary_mem is not None and primary_mem.kind == "attention"
    is_opt = "context" in clauses and isinstance(clauses["context"].value, ast.Call) and \
        clauses["context"].value.func.text == "grads"
    p = clauses.get("period")
    if p is None:
        if is_attention:
            return ir.Period(1, ir.Unit.TOKENS), ir.LevelKind.ATTENTION
        ctx.err("NL206", f"level `{name}` has no period", lv.name.span,
                "add `every N tokens`, `every N steps`, `never` or `frozen`")
        kind = ir.LevelKind.OPTIMIZER if is_opt else (ir.LevelKind.OUTER if in_model else ir.LevelKind.STATIC)
        return ir.Period(None, ir.Unit.NEVER), kind
    if isinstance(p, ast.Never):
        period = ir.Period(None, ir.Unit.NEVER, p.span)
    elif isinstance(p, ast.Frozen):
        period = ir.Period(None, ir.Unit.FROZEN, p.span)
    else:
        n = _period_count(ctx, p.value, p.unit, p.span, allow={"tokens", "steps"})
        u = options.UNITS.get(p.unit.text) if p.unit is not None else None
        if u is None:
            # missing or unknown unit (reported): keep going with the most plausible unit for the
            # level's place, so the level keeps its kind and its other clauses are checked as such
            period = ir.Period(n, ir.Unit.STEPS if (in_model or is_opt) else ir.Unit.TOKENS, p.span)
        else:
            period = ir.Period(n, ir.Unit(u), p.span)
    if is_attention:
        if not (period.unit is ir.Unit.TOKENS and period.every == 1):
            ctx.err("NL406", f"attention level `{name}` updates with every token; its period is `every 1 tokens`",
                    period.span, "remove the period (attention is non-parametric); for a window write "
                    "`attention(window = N)`")
        return period, ir.LevelKind.ATTENTION
    if is_opt:
        if not in_model:
            ctx.err("NL207", f"optimizer level `{name}` (context grads) belongs at model scope, not in a block",
                    lv.name.span, f"move level `{name}` out of the block, next to the outer level")
        if period.unit is ir.Unit.TOKENS:
            ctx.err("NL406", f"optimizer level `{name}` updates per outer step: use `every N steps`", period.span)
        return period, ir.LevelKind.OPTIMIZER
    if in_model:
        if period.unit is ir.Unit.TOKENS:
            ctx.err("NL406", f"level `{name}` at model scope counts outer `steps`; in-context levels live in blocks",
                    period.span)
        elif period.unit in (ir.Unit.NEVER, ir.Unit.FROZEN):
            ctx.err("NL207", f"model-scope level `{name}` must update every N steps", period.span,
                    "the outer level takes one optimizer step per batch: write `every 1 steps`")
        return period, ir.LevelKind.OUTER
    if period.unit is ir.Unit.TOKENS:
        return period, ir.LevelKind.IN_CONTEXT
    if period.unit is ir.Unit.STEPS:
        return period, ir.LevelKind.STEPS_GROUP
    if period.unit is ir.Unit.FROZEN:
        return period, ir.LevelKind.FROZEN
    return period, ir.LevelKind.STATIC


def _hyper_args(ctx, spec: options.ArgSpec, args, what, span, scope, lets) -> tuple:
    pos, kw = _split_args(args)
    if pos:
        ctx.err("NL205", f"{what} takes keyword arguments only (e.g. `lr = 0.1`)", pos[0].span)
    _check_kwargs(ctx, spec, kw, what, span)
    out = []
    for k, (typ, default) in spec.kwargs.items():
        if k not in kw:
            continue
        a = kw[k].value
        if typ == "gate":
            if isinstance(a, ast.Name) and a.id in lets:
                out.append((k, ir.Hyper(a.id, ref=True, span=a.span)))
                continue
            if isinstance(a, ast.Name) and a.id not in ctx.dims:
                ctx.err("NL201", f"`{k} = {a.id}`: no binding named `{a.id}` in level `{scope.level}`"
                        f"{did_you_mean(a.id, list(lets))}", a.span,
                        f"a gate is a number or a `let` binding of the level (e.g. `let {a.id} = ... | sigmoid`)")
                continue
            v = _eval(ctx, a, {}, f"`{k}`")
            if v is not None:
                out.append((k, ir.Hyper(float(v), span=a.span)))
            continue
        v = _typed_kw(ctx, typ, a, f"`{k}` of {what}", {})
        if v is None:
            continue
        if typ == "int":
            if not v.is_Integer or v <= 0:
                ctx.err("NL204", f"`{k}` of {what} must be a positive integer, got {v}", a.span)
                continue
            v = int(v)
        out.append((k, ir.Hyper(v, span=a.span)))
    return tuple(out)
