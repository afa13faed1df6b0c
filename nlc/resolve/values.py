"""Numbers, dimensions, keyword arguments and memory types (sympy-exact)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import sympy

from .. import ast, ir, options
from ..diagnostics import Diagnostics, allowed, did_you_mean
from ..source import SourceFile, Span

__all__ = ["_Ctx", "_eval", "_dims", "_memory"]


_BOOL_TRUE = ("yes", "true")


class _Ctx:
    def __init__(self, source: SourceFile, diags: Diagnostics):
        self.source = source
        self.diags = diags
        self.dims: dict[str, Any] = {}
        self.dim_spans: dict[str, Span] = {}
        self.templates: dict[str, ast.MemoryDef] = {}
        # while dims are evaluated: dims defined further down (name -> span), for NL304 messages
        self.later_dims: dict[str, Span] = {}

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
        if isinstance(v, float) and not math.isfinite(v):
            ctx.err("NL105", f"the number `{e.text}` is too large to represent", e.span,
                    "numbers must be finite 64-bit floats (at most about 1.8e308)")
            return None
        return sympy.Integer(v) if isinstance(v, int) else sympy.Float(v)
    if isinstance(e, ast.Name):
        if e.id in env:
            return env[e.id]
        if e.id in ctx.dims:
            return ctx.dims[e.id]
        where = "" if what == "dimension" else f" (in {what})"
        later = ctx.later_dims.get(e.id)
        if later is not None:
            ctx.err("NL304", f"dimension `{e.id}` is used before its definition on line {later.line}{where}",
                    e.span, "define each dim from ones defined above it: move it up")
            return None
        ctx.err("NL304", f"dimension `{e.id}` is not defined{where}{did_you_mean(e.id, list(env) + list(ctx.dims))}",
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
            ctx.err("NL301", "division by zero", e.span, "divide by a dimension or number that is not 0")
            return None
        return sympy.Rational(a, b) if (a.is_Integer and b.is_Integer) else a / b
    ctx.err("NL205", f"expected a number here, found `{_short(e)}`", e.span)
    return None


def _short(e: ast.Expr) -> str:
    from ..printer import print_expr

    s = print_expr(e)
    return s if len(s) < 40 else s[:37] + "..."


def _dim_cycle(name: str, defs: dict[str, ast.DimDef]) -> list[str] | None:
    """The first circular chain of definitions through ``name`` (``[a, b, a]``), or None."""
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        if n in path:
            return path[path.index(n):] + [n] if n == name else None
        if n not in defs:
            return None
        path.append(n)
        for ref in (x.id for x in ast.walk(defs[n].value) if isinstance(x, ast.Name)):
            found = visit(ref)
            if found:
                return found
        path.pop()
        return None

    return visit(name)


def _dims(ctx: _Ctx, dims: ast.Dims) -> None:
    """Evaluate dims in order. A dim that is not a positive integer is reported here, once, and
    its value becomes unknown (None), so that nothing computed from it is reported again."""
    first: dict[str, ast.DimDef] = {}
    for dd in dims.defs:
        first.setdefault(dd.name.text, dd)
    in_reported_cycle: set[str] = set()
    for i, dd in enumerate(dims.defs):
        name = dd.name.text
        if name in ctx.dims:
            ctx.err("NL202", f"dimension `{name}` is defined twice", dd.name.span,
                    notes=[(ctx.dim_spans[name], "first defined here")])
            continue
        cycle = None if name in in_reported_cycle else _dim_cycle(name, first)
        if cycle is not None or name in in_reported_cycle:
            if cycle is None:
                pass  # reported at the first dim of its circle
            elif len(cycle) == 2:
                ctx.err("NL305", f"dimension `{name}` is defined in terms of itself", dd.value.span)
            else:
                ctx.err("NL305", f"dimensions are defined in a circle: {' -> '.join(cycle)}", dd.value.span)
                in_reported_cycle.update(cycle)
            ctx.dims[name] = None
            ctx.dim_spans[name] = dd.name.span
            continue
        ctx.later_dims = {d.name.text: d.name.span for d in dims.defs[i + 1:] if d.name.text not in ctx.dims}
        v = _eval(ctx, dd.value, {}, "dimension")
        ctx.later_dims = {}
        if v is not None and not (v.is_Integer and v > 0):
            if not v.is_Integer:
                ctx.err("NL301", f"dimension `{name}` is {v}, not an integer", dd.name.span,
                        "make the division exact, e.g. pick d divisible by heads" if isinstance(dd.value, ast.BinOp)
                        and dd.value.op == "/" else "dimensions are integers >= 1")
            else:
                ctx.err("NL302", f"dimension `{name}` is {v}; it must be at least 1", dd.name.span)
            v = None
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
            ctx.err("NL205", f"{what} needs `{r} = ...`", call_span, f"add `{r} = <value>` to its arguments")


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
            params = ", ".join(p.text for p in t.params)
            ctx.err("NL205", f"memory template `{name}` takes positional arguments only", first.span,
                    f"write `{name}({params})` with values in that order")
            return None
        if len(pos) != len(t.params):
            params = ", ".join(p.text for p in t.params)
            ctx.err("NL205", f"memory template `{name}` takes {len(t.params)} argument(s), "
                    f"got {len(pos)}", span, f"it is defined as `{name}({params})` on line {t.span.line}")
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
