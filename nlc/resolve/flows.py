"""Flow expressions inside a level: typing (width, per head) and name resolution."""

from __future__ import annotations

from typing import Any

import sympy

from .. import ast, ir, options
from ..diagnostics import allowed, did_you_mean
from ..source import Span
from .values import _check_kwargs, _eval, _short, _split_args

__all__ = ["_LevelScope", "_flow"]


class _LevelScope:
    """Names visible inside one level while its flows are resolved."""

    def __init__(self, ctx, level_name, per_head, heads, input_width, states, lets, block_levels,
                 all_levels=None):
        self.ctx = ctx
        self.level = level_name
        self.per_head = per_head
        self.heads = heads
        self.input_width = input_width
        self.states: dict[str, ir.StateDecl] = states
        self.lets: dict[str, ast.Let] = lets
        self.block_levels: dict[str, Any] = block_levels  # name -> ast.Level (same block, earlier)
        self.all_levels: dict[str, Any] = all_levels or {}  # every level of the model, for messages
        self.resolved: dict[str, ir.Flow | None] = {}
        self.resolving: list[str] = []
        self.used: set[str] = set()
        self.used_states: set[str] = set()
        self.called_levels: list[tuple[str, Span]] = []

    def names(self):
        return list(self.lets) + list(self.states) + ["input"]

    def not_callable(self, name: str, span: Span) -> bool:
        """NL201 for a level this level cannot call (not an earlier level of its block)."""
        if name not in self.all_levels or name in self.block_levels:
            return False
        self.ctx.err("NL201", f"level `{self.level}` cannot call level `{name}`: a flow calls only levels "
                     "defined above it in the same block", span,
                     f"move `{name}` above `{self.level}` in the block, or compute the value inside this level")
        return True


def _flow(scope: _LevelScope, e: ast.Expr, implicit: ir.Flow | None) -> ir.Flow | None:
    ctx = scope.ctx
    if isinstance(e, ast.Pipe):
        cur = _flow(scope, e.stages[0], implicit)
        for st in e.stages[1:]:
            if cur is None:
                return None
            cur = _stage(scope, st, cur)
        return cur
    if isinstance(e, ast.Num) or (isinstance(e, ast.Neg) and isinstance(e.operand, ast.Num)):
        v = _eval(ctx, e, {}, "constant")  # reports malformed and out-of-range numbers
        if v is None:
            return None
        value = e.value if isinstance(e, ast.Num) else -e.operand.value
        return ir.Flow("const", value=value, width=sympy.Integer(1), per_head=False, span=e.span)
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
        if scope.not_callable(n, e.span):
            return None
        ctx.err("NL201", f"unknown name `{n}` in level `{scope.level}`{did_you_mean(n, scope.names())}",
                e.span, "a flow names `input`, a `let` binding or a state of this level, an earlier level of "
                "the block, a stage or a dimension")
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
        if scope.not_callable(f, e.func.span):
            return None
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
        if scope.not_callable(f, fspan):
            return None
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
        # `linear(a -> b)`, or `linear(n)` for `n -> n` (as for memories, see options.ArgSpec)
        if len(pos) != 1:
            ctx.err("NL205", f"`{f}` takes a shape, e.g. `{f}(d -> dh)`", st.span)
            return None
        if isinstance(pos[0], ast.Shape):
            a, b = _eval(ctx, pos[0].src, {}), _eval(ctx, pos[0].dst, {})
        else:
            a = b = _eval(ctx, pos[0], {})
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
