"""AST to IR: names, defaults, option validation, dimension evaluation, flow typing.

Resolution never stops at the first problem: it records a diagnostic, substitutes a neutral
value and goes on, so one run reports every independent error. Checks that need the whole
program (graph structure, frequency order, shapes across levels) are in :mod:`nlc.verify`.

Decisions written down here (the language reference repeats them):

* A level with a memory after ':' (``level fast : mlp(d)``) has one state named like the
  level; its ``key``, ``value`` and ``query`` default to the level's input.
* In a level with several states, ``reads`` names what the level outputs; with one state it
  defaults to ``state(query)``.
* ``let key``, ``let value``, ``let query`` are the level's training keys, training values and
  read queries; every state is trained on (key, value), or on (key, M(value)) with
  ``target self`` (paper eq 83-85).
* A bare stage (``linear(d -> dh)``, ``l2norm``) at the start of a flow applies to the implicit
  input: the level input in ``let``/``reads``, the merged read in ``output``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import sympy

from . import ast, ir, options
from .diagnostics import Diagnostics, allowed, did_you_mean
from .source import SourceFile, Span

__all__ = ["resolve"]

_BOOL_TRUE = ("yes", "true")


class _Ctx:
    def __init__(self, source: SourceFile, diags: Diagnostics):
        self.source = source
        self.diags = diags
        self.dims: dict[str, Any] = {}
        self.dim_spans: dict[str, Span] = {}
        self.templates: dict[str, ast.MemoryDef] = {}

    def err(self, code, msg, span, hint="", notes=()):
        self.diags.error(code, msg, span, hint, notes)

    def warn(self, code, msg, span, hint=""):
        self.diags.warning(code, msg, span, hint)


# ---- numbers and dimensions --------------------------------------------------------------------


def _eval(ctx: _Ctx, e: ast.Expr, env: dict[str, Any], what: str = "dimension") -> Any:
    """Evaluate an arithmetic expression over dims/template parameters to a sympy number."""
    if isinstance(e, ast.Num):
        try:
            v = e.value
        except ValueError:
            ctx.err("NL105", f"malformed number `{e.text}`", e.span)
            return None
        return sympy.Integer(v) if isinstance(v, int) else sympy.Float(v)
    if isinstance(e, ast.Name):
        if e.id in env:
            return env[e.id]
        if e.id in ctx.dims:
            return ctx.dims[e.id]
        ctx.err("NL304", f"{what} `{e.id}` is not defined{did_you_mean(e.id, list(env) + list(ctx.dims))}",
                e.span)
        return None
    if isinstance(e, ast.Neg):
        v = _eval(ctx, e.operand, env, what)
        return -v if v is not None else None
    if isinstance(e, ast.BinOp):
        a = _eval(ctx, e.left, env, what)
        b = _eval(ctx, e.right, env, what)
        if a is None or b is None:
            return None
        if e.op == "+":
            return a + b
        if e.op == "-":
            return a - b
        if e.op == "*":
            return a * b
        if b == 0:
            ctx.err("NL301", "division by zero", e.span)
            return None
        return sympy.Rational(a, b) if (a.is_Integer and b.is_Integer) else a / b
    ctx.err("NL205", f"expected a number here, found `{_short(e)}`", e.span)
    return None


def _short(e: ast.Expr) -> str:
    from .printer import print_expr

    s = print_expr(e)
    return s if len(s) < 40 else s[:37] + "..."


def _dims(ctx: _Ctx, dims: ast.Dims) -> None:
    for dd in dims.defs:
        name = dd.name.text
        if name in ctx.dims:
            ctx.err("NL202", f"dimension `{name}` is defined twice", dd.name.span,
                    notes=[(ctx.dim_spans[name], "first defined here")])
            continue
        refs = {n.id for n in ast.walk(dd.value) if isinstance(n, ast.Name)}
        if name in refs:
            ctx.err("NL305", f"dimension `{name}` is defined in terms of itself", dd.value.span)
            ctx.dims[name] = None
            ctx.dim_spans[name] = dd.name.span
            continue
        v = _eval(ctx, dd.value, {}, "dimension")
        ctx.dims[name] = v
        ctx.dim_spans[name] = dd.name.span


# ---- keyword arguments -------------------------------------------------------------------------


def _split_args(args):
    pos, kw = [], {}
    for a in args:
        if isinstance(a, ast.Kwarg):
            kw.setdefault(a.name.text, a)
        else:
            pos.append(a)
    return pos, kw


def _check_kwargs(ctx: _Ctx, spec: options.ArgSpec, kw: dict, what: str, call_span: Span) -> None:
    for name, a in kw.items():
        if name not in spec.kwargs:
            hint = (f"{what} takes {allowed(spec.kwargs)}" if spec.kwargs else f"{what} takes no keyword arguments")
            ctx.err("NL203", f"unknown argument `{name}` of {what}{did_you_mean(name, spec.kwargs)}",
                    a.name.span, hint)
    for r in spec.required:
        if r not in kw:
            ctx.err("NL205", f"{what} needs `{r} = ...`", call_span)


def _name_value(ctx: _Ctx, e: ast.Expr, allowed_names: tuple[str, ...], what: str) -> str | None:
    if isinstance(e, ast.Name):
        if e.id in allowed_names:
            return e.id
        ctx.err("NL204", f"`{e.id}` is not a valid {what}{did_you_mean(e.id, allowed_names)}", e.span,
                f"{what} is {allowed(allowed_names)}")
        return None
    ctx.err("NL204", f"{what} must be a name, found `{_short(e)}`", e.span,
            f"{what} is {allowed(allowed_names)}")
    return None


def _typed_kw(ctx: _Ctx, kind: str, e: ast.Expr, what: str, env: dict) -> Any:
    if kind.startswith("name:"):
        return _name_value(ctx, e, tuple(kind[5:].split("|")), what)
    v = _eval(ctx, e, env, what)
    if v is None:
        return None
    if kind == "int":
        return v
    return float(v) if kind == "num" else v


# ---- memories ----------------------------------------------------------------------------------


def _memory(ctx: _Ctx, e: ast.Expr, env: dict, depth: int = 0) -> ir.MemoryType | None:
    """A memory expression (constructor call, template call or bare name) to a MemoryType."""
    if isinstance(e, ast.Name):
        func, args, span = ast.Ident(e.id, span=e.span), (), e.span
    elif isinstance(e, ast.Call):
        func, args, span = e.func, e.args, e.span
    else:
        ctx.err("NL205", f"expected a memory like `mlp(d)` or a memory template, found `{_short(e)}`",
                e.span)
        return None
    name = func.text
    if name in ctx.templates:
        if depth > 8:
            ctx.err("NL205", f"memory template `{name}` expands into itself", span)
            return None
        t = ctx.templates[name]
        pos, kw = _split_args(args)
        if kw:
            first = next(iter(kw.values()))
            ctx.err("NL205", f"memory template `{name}` takes positional arguments only", first.span)
        if len(pos) != len(t.params):
            ctx.err("NL205", f"memory template `{name}` takes {len(t.params)} argument(s), "
                    f"got {len(pos)}", span)
            return None
        sub = dict(env)
        for p, a in zip(t.params, pos):
            sub[p.text] = _eval(ctx, a, env, "argument")
        m = _memory(ctx, t.body, sub, depth + 1)
        return replace(m, span=span) if m is not None else None
    if name not in options.MEMORY_KINDS:
        ctx.err("NL203", f"unknown memory `{name}`{did_you_mean(name, list(options.MEMORY_KINDS) + list(ctx.templates))}",
                func.span, f"memories are {allowed(options.MEMORY_KINDS)} or a `memory` template")
        return None
    spec = options.MEMORY_KINDS[name]
    kind = "linear" if name == "matrix" else name
    pos, kw = _split_args(args)
    _check_kwargs(ctx, spec, kw, f"memory `{name}`", span)
    din = dout = None
    if spec.positional == "shape":
        if len(pos) != 1:
            ctx.err("NL205", f"memory `{name}` takes one shape, e.g. `{name}(d -> d)` or `{name}(d)`", span)
            return None
        p = pos[0]
        if isinstance(p, ast.Shape):
            din, dout = _eval(ctx, p.src, env), _eval(ctx, p.dst, env)
        else:
            din = dout = _eval(ctx, p, env)
    elif pos:
        ctx.err("NL205", f"memory `{name}` takes no positional arguments", pos[0].span)
    vals = {}
    for k, (typ, default) in spec.kwargs.items():
        vals[k] = _typed_kw(ctx, typ, kw[k].value, f"`{k}` of {name}", env) if k in kw else default
    if kind in ("mlp", "residual_mlp", "swiglu"):
        hidden = vals.get("hidden")
        if hidden is None:
            hidden = dout if kind != "swiglu" else (4 * din if din is not None else None)
        depth_v = vals.get("depth", 1)
        depth_i = int(depth_v) if depth_v is not None and getattr(depth_v, "is_integer", True) else 2
        return ir.MemoryType(kind, din, dout, hidden, depth_i if kind != "swiglu" else 1,
                             vals.get("act") or "silu", span=span)
    if kind == "attention":
        opts = []
        for k in ("heads", "window", "rope"):
            v = vals.get(k)
            if k == "rope":
                v = (v in _BOOL_TRUE) if isinstance(v, str) else bool(v)
            opts.append((k, v))
        return ir.MemoryType("attention", options=tuple(opts), span=span)
    return ir.MemoryType(kind, din, dout, span=span)


# ---- flows -------------------------------------------------------------------------------------


class _LevelScope:
    """Names visible inside one level while its flows are resolved."""

    def __init__(self, ctx, level_name, per_head, heads, input_width, states, lets, block_levels):
        self.ctx = ctx
        self.level = level_name
        self.per_head = per_head
        self.heads = heads
        self.input_width = input_width
        self.states: dict[str, ir.StateDecl] = states
        self.lets: dict[str, ast.Let] = lets
        self.block_levels: dict[str, Any] = block_levels  # name -> ast.Level (same block, earlier)
        self.resolved: dict[str, ir.Flow | None] = {}
        self.resolving: list[str] = []
        self.used: set[str] = set()
        self.used_states: set[str] = set()
        self.called_levels: list[tuple[str, Span]] = []

    def names(self):
        return list(self.lets) + list(self.states) + ["input"]


def _flow(scope: _LevelScope, e: ast.Expr, implicit: ir.Flow | None) -> ir.Flow | None:
    ctx = scope.ctx
    if isinstance(e, ast.Pipe):
        cur = _flow(scope, e.stages[0], implicit)
        for st in e.stages[1:]:
            if cur is None:
                return None
            cur = _stage(scope, st, cur)
        return cur
    if isinstance(e, ast.Num):
        return ir.Flow("const", value=e.value, width=sympy.Integer(1), per_head=False, span=e.span)
    if isinstance(e, ast.Neg) and isinstance(e.operand, ast.Num):
        return ir.Flow("const", value=-e.operand.value, width=sympy.Integer(1), span=e.span)
    if isinstance(e, ast.Name):
        n = e.id
        if n == "input":
            return ir.Flow("input", width=scope.input_width, per_head=False, span=e.span)
        if n in scope.lets:
            return _ref(scope, n, e.span)
        if n in scope.states:
            ctx.err("NL205", f"state `{n}` must be applied to something, e.g. `{n}(input)`", e.span)
            return None
        if n in options.OPS or n in scope.block_levels:
            if implicit is None:
                ctx.err("NL205", f"`{n}` needs an input here; write `x | {n}`", e.span)
                return None
            return _stage(scope, e, implicit)
        if n in ctx.dims:
            v = ctx.dims[n]
            return ir.Flow("const", value=v, width=sympy.Integer(1), span=e.span)
        ctx.err("NL201", f"unknown name `{n}` in level `{scope.level}`{did_you_mean(n, scope.names())}",
                e.span)
        return None
    if isinstance(e, ast.Call):
        f = e.func.text
        if f in scope.states or f in scope.block_levels:
            pos, kw = _split_args(e.args)
            if len(pos) != 1 or kw:
                ctx.err("NL205", f"`{f}(...)` takes exactly one input flow", e.span)
                return None
            arg = _flow(scope, pos[0], implicit)
            if arg is None:
                return None
            return _apply_callable(scope, f, arg, e.func.span, e.span)
        if f in options.OPS:
            if implicit is None:
                ctx.err("NL205", f"`{f}` needs an input here; write `x | {f}(...)`", e.span)
                return None
            return _stage(scope, e, implicit)
        ctx.err("NL201", f"unknown function `{f}` in level `{scope.level}`"
                f"{did_you_mean(f, list(scope.states) + list(options.OPS) + list(scope.block_levels))}",
                e.func.span, f"a flow stage is a state of this level, an earlier level of the block, or {allowed(options.OPS)}")
        return None
    if isinstance(e, ast.BinOp):
        v = _eval(ctx, e, {}, "constant")
        if v is None:
            return None
        return ir.Flow("const", value=float(v) if not v.is_Integer else int(v), width=sympy.Integer(1), span=e.span)
    ctx.err("NL205", f"`{_short(e)}` is not a flow", e.span,
            "a flow is `input`, a let-binding, a number, a state call like `mem(q)`, or a pipeline `a | f | g`")
    return None


def _ref(scope: _LevelScope, n: str, span: Span) -> ir.Flow | None:
    scope.used.add(n)
    if n in scope.resolving:
        cycle = scope.resolving[scope.resolving.index(n):] + [n]
        scope.ctx.err("NL501", f"flow cycle in level `{scope.level}`: {' -> '.join(cycle)}", span,
                      "a value cannot depend on itself within a chunk; use a state to carry it across chunks")
        return None
    if n not in scope.resolved:
        scope.resolving.append(n)
        let = scope.lets[n]
        scope.resolved[n] = _flow(scope, let.value, ir.Flow("input", width=scope.input_width, span=let.span))
        scope.resolving.pop()
    target = scope.resolved[n]
    if target is None:
        return None
    return ir.Flow("ref", name=n, width=target.width, per_head=target.per_head, span=span)


def _apply_callable(scope, f, arg, fspan, span) -> ir.Flow:
    if f in scope.states:
        scope.used_states.add(f)
        m = scope.states[f].memory
        return ir.Flow("read", name=f, arg=arg, width=m.dout, per_head=scope.per_head, span=span)
    scope.called_levels.append((f, span))
    return ir.Flow("call", name=f, arg=arg, width=None, per_head=arg.per_head, span=span)


def _stage(scope: _LevelScope, st: ast.Expr, prev: ir.Flow) -> ir.Flow | None:
    ctx = scope.ctx
    if isinstance(st, ast.Name):
        f, args, fspan = st.id, (), st.span
    elif isinstance(st, ast.Call):
        f, args, fspan = st.func.text, st.args, st.func.span
    else:
        ctx.err("NL205", f"`{_short(st)}` is not a flow stage", st.span,
                f"stages are {allowed(options.OPS)}, states or earlier levels")
        return None
    if f in scope.states or f in scope.block_levels:
        if args:
            ctx.err("NL205", f"`{f}` as a pipeline stage takes no arguments (`x | {f}`)", st.span)
        return _apply_callable(scope, f, prev, fspan, st.span)
    if f not in options.OPS:
        ctx.err("NL203", f"unknown flow stage `{f}`{did_you_mean(f, list(options.OPS) + list(scope.states))}",
                fspan, f"stages are {allowed(options.OPS)}, or a state of this level")
        return None
    spec = options.OPS[f]
    pos, kw = _split_args(args)
    _check_kwargs(ctx, spec, kw, f"stage `{f}`", st.span)
    params: list[tuple[str, Any]] = []
    width = prev.width
    per_head = prev.per_head
    if spec.positional == "shape":
        if len(pos) != 1 or not isinstance(pos[0], ast.Shape):
            ctx.err("NL205", f"`{f}` takes a shape, e.g. `{f}(d -> dh)`", st.span)
            return None
        a, b = _eval(ctx, pos[0].src, {}), _eval(ctx, pos[0].dst, {})
        params.append(("shape", (a, b)))
        width = b
        per_head = scope.per_head
    elif spec.positional in ("int", "num"):
        if len(pos) != 1:
            ctx.err("NL205", f"`{f}` takes one number, e.g. `{f}(4)`", st.span)
            return None
        v = _eval(ctx, pos[0], {}, "argument")
        params.append(("_", v if spec.positional == "int" else (float(v) if v is not None else None)))
    elif pos:
        ctx.err("NL205", f"`{f}` takes no arguments", st.span)
    if f == "mean":
        width = sympy.Integer(1)
    return ir.Flow("op", name=f, arg=prev, params=tuple(params), width=width, per_head=per_head,
                   span=st.span)


# ---- levels ------------------------------------------------------------------------------------

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
            ctx.err("NL304", f"level `{name}` is per head but no `heads` dimension is defined", lv.span,
                    "define `heads` in dims, or write `per head(4)`")
            hv = None
        heads = int(hv) if hv is not None and hv.is_Integer and hv > 0 else 1

    # states
    states: dict[str, ir.StateDecl] = {}
    primary_mem = None
    if lv.memory is not None:
        primary_mem = _memory(ctx, lv.memory, {})
        if primary_mem is not None:
            states[name] = ir.StateDecl(name, primary_mem, lv.memory.span)
    for it in lv.items:
        if isinstance(it, ast.State):
            mem = _memory(ctx, it.memory, {})
            for n in it.names:
                if n.text in states:
                    ctx.err("NL202", f"state `{n.text}` is declared twice in level `{name}`", n.span)
                    continue
                _check_ident(ctx, n)
                if mem is not None:
                    states[n.text] = ir.StateDecl(n.text, replace(mem, span=it.memory.span), n.span)
    lets: dict[str, ast.Let] = {}
    for it in lv.items:
        if isinstance(it, ast.Let):
            n = it.name.text
            if n in lets or n in states:
                ctx.err("NL202", f"`{n}` is defined twice in level `{name}`", it.name.span)
                continue
            _check_ident(ctx, it.name)
            lets[n] = it

    input_width = d_model
    scope = _LevelScope(ctx, name, lv.per_head, heads, input_width, states, lets, block_levels)
    bindings = []
    for n, let in lets.items():
        f = _ref(scope, n, let.name.span)
        scope.used.discard(n)
        if f is not None:
            bindings.append(ir.Binding(n, scope.resolved[n], let.span))

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
    if "rule" in clauses:
        r = clauses["rule"]
        rname = r.name.text
        if kind is ir.LevelKind.IN_CONTEXT:
            table = options.IN_CONTEXT_RULES
        elif kind is ir.LevelKind.OPTIMIZER:
            table = options.OPTIMIZER_RULES
        else:
            table = options.OUTER_RULES
        opt_levels = [n for n, l in all_levels.items() if _is_optimizer_ast(l)]
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
            if rname in every_rule:
                ctx.err("NL602", f"rule `{rname}` is not available for a {kind.value.replace('_', '-')} level",
                        r.name.span, f"this level takes {allowed(list(table) + (opt_levels if kind is ir.LevelKind.OUTER else []))}")
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
                if g.unit is None or g.unit.text not in ("chunks", "chunk"):
                    ctx.err("NL401", "the truncation length needs its unit `chunks`", g.span,
                            "write `grad through writes truncate 2 chunks`")
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
        elif len(states) > 1:
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


def _check_ident(ctx: _Ctx, ident: ast.Ident) -> None:
    if ident.text in options.RESERVED:
        ctx.err("NL208", f"`{ident.text}` is reserved and cannot name a state or binding", ident.span)
    elif ident.text.startswith("_"):
        ctx.err("NL208", f"names may not start with '_' (`{ident.text}`)", ident.span,
                "names starting with '_' are reserved for generated code")


def _period_count(ctx, value, unit, span, allow: set) -> int | None:
    v = _eval(ctx, value, {}, "period")
    if unit is None:
        ctx.err("NL401", f"the period `{_short(value)}` has no unit", span,
                "write `every 16 tokens` or `every 4 steps`")
        return int(v) if v is not None and v.is_Integer else None
    u = options.UNITS.get(unit.text)
    if u is None:
        ctx.err("NL204", f"unknown unit `{unit.text}`{did_you_mean(unit.text, options.UNITS)}", unit.span,
                "units are `tokens` and `steps`")
        return None
    if u not in allow:
        ctx.err("NL406", f"a reset counts `tokens`, not `{unit.text}`", unit.span)
    if v is None:
        return None
    if not v.is_Integer:
        ctx.err("NL301", f"the period {v} is not an integer", value.span)
        return None
    if v <= 0:
        ctx.err("NL302", f"the period must be at least 1, got {v}", value.span)
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
        period = ir.Period(n, ir.Unit(u) if u else ir.Unit.NEVER, p.span)
        if p.unit is None:
            # keep going with the most plausible unit for the level's place
            period = ir.Period(n, ir.Unit.STEPS if in_model else ir.Unit.TOKENS, p.span)
    if is_attention:
        if not (period.unit is ir.Unit.TOKENS and period.every == 1):
            ctx.err("NL406", f"attention level `{name}` updates with every token; its period is `every 1 tokens`",
                    period.span)
        return period, ir.LevelKind.ATTENTION
    if is_opt:
        if not in_model:
            ctx.err("NL207", f"optimizer level `{name}` (context grads) belongs at model scope, not in a block",
                    lv.name.span)
        if period.unit is ir.Unit.TOKENS:
            ctx.err("NL406", f"optimizer level `{name}` updates per outer step: use `every N steps`", period.span)
        return period, ir.LevelKind.OPTIMIZER
    if in_model:
        if period.unit is ir.Unit.TOKENS:
            ctx.err("NL406", f"level `{name}` at model scope counts outer `steps`; in-context levels live in blocks",
                    period.span)
        elif period.unit in (ir.Unit.NEVER, ir.Unit.FROZEN):
            ctx.err("NL207", f"model-scope level `{name}` must update every N steps", period.span)
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


# ---- blocks and the model ----------------------------------------------------------------------


def _all_levels(model: ast.Model) -> dict[str, ast.Level]:
    out: dict[str, ast.Level] = {}
    for it in model.items:
        if isinstance(it, ast.Level):
            out.setdefault(it.name.text, it)
        elif isinstance(it, ast.Block):
            for b in it.items:
                if isinstance(b, ast.Level):
                    out.setdefault(b.name.text, b)
                elif isinstance(b, ast.Cms):
                    for lv in b.levels:
                        out.setdefault(lv.name.text, lv)
    return out


def _nest(ctx: _Ctx, levels: list[ir.Level], names: list[str]) -> None:
    """Nested CMS (eq 72): each level after the first starts from the previous one's state and is
    re-initialised whenever that level updates. Unstated, these are filled in; stated, they must
    agree."""
    index = {lv.name: i for i, lv in enumerate(levels)}
    for parent_name, child_name in zip(names, names[1:]):
        parent, child = levels[index[parent_name]], levels[index[child_name]]
        if child.kind is not ir.LevelKind.IN_CONTEXT:
            continue
        stated = dict(child.clause_spans)
        init, reset = child.init, child.reset
        if "init" in stated:
            if not (init.mode == "from" and init.source == parent.name):
                ctx.err("NL207", f"in a nested CMS, `{child.name}` starts from `{parent.name}`'s state; "
                        f"its `init {init}` contradicts that", stated["init"],
                        f"write `init from {parent.name}` or use a sequential CMS")
        else:
            init = ir.Init("from", parent.name, span=child.name_span)
        if parent.kind is ir.LevelKind.IN_CONTEXT and parent.period.every:
            want = parent.period.every
            if "reset" in stated:
                if not (reset.mode == "every" and reset.every == want):
                    ctx.err("NL207", f"in a nested CMS, `{child.name}` is re-initialised whenever `{parent.name}` "
                            f"updates: its reset must be `every {want} tokens`", stated["reset"])
            else:
                reset = ir.Reset("every", want, span=child.name_span)
        levels[index[child_name]] = replace(child, init=init, reset=reset)


def resolve(spec: ast.Spec, source: SourceFile, diags: Diagnostics) -> ir.Program:
    """Resolve a parsed spec into a :class:`~nlc.ir.Program`, appending diagnostics."""
    ctx = _Ctx(source, diags)
    model = spec.model
    # first pass: dims and memory templates (usable from anywhere)
    dims_nodes = [it for it in model.items if isinstance(it, ast.Dims)]
    for extra in dims_nodes[1:]:
        ctx.err("NL209", "a model has one `dims` block", extra.span, "merge the dims blocks",
                notes=[(dims_nodes[0].span, "first dims block")])
    if dims_nodes:
        _dims(ctx, dims_nodes[0])
    for it in model.items:
        if isinstance(it, ast.MemoryDef):
            n = it.name.text
            if n in ctx.templates or n in options.MEMORY_KINDS:
                ctx.err("NL202", f"memory `{n}` is already defined", it.name.span)
                continue
            ctx.templates[n] = it

    all_levels = _all_levels(model)
    seen_names: dict[str, Span] = {}

    def claim(ident: ast.Ident, what: str) -> bool:
        if ident.text in seen_names:
            ctx.err("NL202", f"{what} `{ident.text}` is already defined", ident.span,
                    notes=[(seen_names[ident.text], "first defined here")])
            return False
        _check_ident(ctx, ident)
        seen_names[ident.text] = ident.span
        return True

    vocab = d_model = None
    embed_span = model.span
    head = "tied"
    final_norm = "rms"
    singles: dict[type, ast.Stmt] = {}
    blocks: list[ir.Block] = []
    cms_groups: list[ir.CmsGroup] = []
    levels: list[ir.Level] = []
    edges: list[ir.Edge] = []
    calls: list[tuple[str, str, Span]] = []

    for it in model.items:
        if isinstance(it, (ast.Embed, ast.Head, ast.Norm)):
            if type(it) in singles:
                ctx.err("NL209", f"the model states `{type(it).__name__.lower()}` twice", it.span,
                        notes=[(singles[type(it)].span, "first stated here")])
                continue
            singles[type(it)] = it
        if isinstance(it, ast.Embed):
            vocab = _eval(ctx, it.vocab, {}, "dimension")
            d_model = _eval(ctx, it.dim, {}, "dimension")
            embed_span = it.span
        elif isinstance(it, ast.Head):
            if it.mode.text in options.HEADS:
                head = it.mode.text
            else:
                ctx.err("NL204", f"`head {it.mode.text}` is not a head mode{did_you_mean(it.mode.text, options.HEADS)}",
                        it.mode.span, "head is `tied` (shares the embedding) or `untied`")
        elif isinstance(it, ast.Norm):
            if it.kind.text in options.NORMS:
                final_norm = it.kind.text
            else:
                ctx.err("NL204", f"unknown norm `{it.kind.text}`{did_you_mean(it.kind.text, options.NORMS)}",
                        it.kind.span, f"norms are {allowed(options.NORMS)}")

    for it in model.items:
        if isinstance(it, ast.Block):
            if not claim(it.name, "block"):
                continue
            repeat = 1
            if it.repeat is not None:
                rv = _eval(ctx, it.repeat, {}, "dimension")
                if rv is not None:
                    if not rv.is_Integer:
                        ctx.err("NL301", f"block repeat count {rv} is not an integer", it.repeat.span)
                    elif rv < 1:
                        ctx.err("NL302", f"block repeat count must be >= 1, got {rv}", it.repeat.span)
                    else:
                        repeat = int(rv)
            norm = "rms"
            sublayers: list[ir.Sublayer] = []
            block_seen: dict[str, ast.Level] = {}
            norm_seen = None
            for b in it.items:
                if isinstance(b, ast.Norm):
                    if norm_seen is not None:
                        ctx.err("NL209", f"block `{it.name.text}` states its norm twice", b.span)
                    norm_seen = b
                    if b.kind.text in options.NORMS:
                        norm = b.kind.text
                    else:
                        ctx.err("NL204", f"unknown norm `{b.kind.text}`{did_you_mean(b.kind.text, options.NORMS)}",
                                b.kind.span, f"norms are {allowed(options.NORMS)}")
                elif isinstance(b, ast.Level):
                    if not claim(b.name, "level"):
                        continue
                    res = _level(ctx, b, ("block", it.name.text), d_model, dict(block_seen), all_levels)
                    block_seen[b.name.text] = b
                    if res is None:
                        continue
                    lvl, called = res
                    levels.append(lvl)
                    sublayers.append(ir.Sublayer("level", lvl.name, b.span))
                    for callee, span in called:
                        calls.append((callee, lvl.name, span))
                elif isinstance(b, ast.Cms):
                    if not claim(b.name, "CMS group"):
                        continue
                    variant = b.variant.text
                    if variant not in options.CMS_VARIANTS:
                        ctx.err("NL204", f"unknown CMS variant `{variant}`{did_you_mean(variant, options.CMS_VARIANTS)}",
                                b.variant.span, f"CMS variants are {allowed(options.CMS_VARIANTS)}")
                        variant = "sequential"
                    agg = "sum"
                    pos, kw = _split_args(b.args)
                    if pos:
                        ctx.err("NL205", "CMS options are keyword arguments, e.g. `independent(agg = sum)`",
                                pos[0].span)
                    for k, a in kw.items():
                        if k != "agg":
                            ctx.err("NL203", f"unknown CMS option `{k}`{did_you_mean(k, ['agg'])}", a.name.span)
                        elif variant != "independent":
                            ctx.err("NL207", f"`agg` applies to independent CMS groups, not {variant}", a.span)
                        else:
                            agg = _name_value(ctx, a.value, options.CMS_AGG, "CMS aggregation") or "sum"
                    names = []
                    for lv in b.levels:
                        if not claim(lv.name, "level"):
                            continue
                        res = _level(ctx, lv, ("block", it.name.text, "cms", b.name.text), d_model,
                                     dict(block_seen), all_levels)
                        block_seen[lv.name.text] = lv
                        if res is None:
                            continue
                        lvl, called = res
                        levels.append(lvl)
                        names.append(lvl.name)
                        for callee, span in called:
                            calls.append((callee, lvl.name, span))
                    if not b.levels:
                        ctx.err("NL206", f"CMS group `{b.name.text}` has no levels", b.span)
                    if variant == "nested":
                        _nest(ctx, levels, names)
                    cms_groups.append(ir.CmsGroup(b.name.text, variant, tuple(names), agg, b.span))
                    sublayers.append(ir.Sublayer("cms", b.name.text, b.span))
            # levels that other levels call are generators, not residual sublayers
            generator_names = {c for c, _, _ in calls if c in block_seen}
            subl = tuple(s for s in sublayers if not (s.kind == "level" and s.name in generator_names))
            blocks.append(ir.Block(it.name.text, repeat, norm, subl, tuple(sorted(generator_names)), it.span))
        elif isinstance(it, ast.Level):
            if not claim(it.name, "level"):
                continue
            res = _level(ctx, it, ("model",), d_model, {}, all_levels)
            if res is not None:
                levels.append(res[0])

    for callee, caller, span in calls:
        edges.append(ir.Edge(callee, caller, ir.EdgeKind.GENERATES, "generates", span))

    outer = [lv.name for lv in levels if lv.kind is ir.LevelKind.OUTER]
    dims = tuple(ctx.dims.items())
    program = ir.Program(
        name=model.name.text, source=source, span=model.span, dims=dims,
        dim_spans=tuple(ctx.dim_spans.items()), vocab=vocab, d_model=d_model,
        embed_span=embed_span, head=head, final_norm=final_norm, blocks=tuple(blocks),
        cms=tuple(cms_groups), levels=tuple(levels), outer=outer[0] if outer else None,
        edges=tuple(edges),
    )
    # structural requirements
    missing = []
    if not dims_nodes:
        missing.append("`dims { ... }`")
    if ast.Embed not in singles:
        missing.append("`embed vocab -> d`")
    if not blocks:
        missing.append("a `block`")
    if ast.Head not in singles:
        missing.append("`head tied|untied`")
    if not outer:
        missing.append("an outer level (`level pretrain { objective next_token ... every 1 steps }`)")
    if missing:
        ctx.err("NL505", f"model `{model.name.text}` is missing {', '.join(missing)}", model.name.span)
    if len(outer) > 1:
        for name in outer[1:]:
            lv = program.level(name)
            ctx.err("NL202", f"model has more than one outer level (`{outer[0]}` and `{name}`)", lv.span,
                    "keep one pre-training level; other step-levels go in blocks or are optimizer levels")
    return program
