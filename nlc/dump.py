"""Readable, stable text dumps of the AST and the IR (``nlc compile --emit ast|ir``).

Both dumps are deterministic (same spec → same bytes) and free of object ids and memory
addresses, so they can be diffed and used as golden files.
"""

from __future__ import annotations

import dataclasses

from . import ast, ir
from .printer import print_expr
from .verify.graph import build_graph

__all__ = ["dump_ast", "dump_ir"]


def dump_ast(node, indent: int = 0) -> str:
    """An indented tree: one line per node, ``Type @line:col`` then its scalar fields."""
    lines: list[str] = []
    _ast_lines(node, indent, lines, "")
    return "\n".join(lines) + "\n"


def _ast_lines(node, depth: int, out: list[str], label: str) -> None:
    pad = "  " * depth
    prefix = f"{label}: " if label else ""
    if isinstance(node, (ast.Num, ast.Name, ast.Call, ast.BinOp, ast.Neg, ast.Pipe, ast.Kwarg, ast.Shape)):
        out.append(f"{pad}{prefix}{type(node).__name__} `{print_expr(node)}` @{node.span.line}:{node.span.col}")
        return
    if isinstance(node, ast.Ident):
        out.append(f"{pad}{prefix}`{node.text}` @{node.span.line}:{node.span.col}")
        return
    if isinstance(node, tuple):
        for x in node:
            _ast_lines(x, depth, out, label)
        return
    if not isinstance(node, ast.Node):
        out.append(f"{pad}{prefix}{node!r}")
        return
    out.append(f"{pad}{prefix}{type(node).__name__} @{node.span.line}:{node.span.col}")
    for f in dataclasses.fields(node):
        if f.name in ("span",):
            continue
        v = getattr(node, f.name)
        if v in ((), "", None, False):
            continue
        if isinstance(v, (ast.Node, tuple)):
            if isinstance(v, tuple) and v and isinstance(v[0], str):
                out.append(f"{pad}  {f.name}: {list(v)!r}")
                continue
            out.append(f"{pad}  {f.name}:")
            _ast_lines(v, depth + 2, out, "")
        else:
            out.append(f"{pad}  {f.name}: {v!r}")


def _hyper(args) -> str:
    return ", ".join(f"{k}={'@' if h.ref else ''}{h.value}" for k, h in args)


def dump_ir(program: ir.Program) -> str:
    """The resolved program: dims, blocks, every level's fields, and the level graph's edges."""
    L: list[str] = [f"program {program.name}"]
    L.append("  dims: " + ", ".join(f"{k}={v}" for k, v in program.dims))
    L.append(f"  embed: {program.vocab} -> {program.d_model}; head {program.head}; final norm {program.final_norm}")
    L.append(f"  outer: {program.outer}")
    for b in program.blocks:
        L.append(f"  block {b.name} x{b.repeat} (norm {b.norm})")
        for s in b.sublayers:
            if s.kind == "cms":
                g = program.cms_group(s.name)
                extra = f" agg={g.agg}" if g.variant == "independent" else ""
                L.append(f"    cms {g.name} {g.variant}{extra}: {', '.join(g.levels)}")
            else:
                L.append(f"    level {s.name}")
        if b.generators:
            L.append(f"    generators: {', '.join(b.generators)}")
    for lv in program.levels:
        L.append(f"  level {lv.name} [{lv.kind.value}] @{lv.span.line}")
        if lv.scope and lv.scope != ("model",):
            L.append(f"    scope: {'/'.join(lv.scope)}")
        if lv.per_head:
            L.append(f"    heads: {lv.heads}")
        L.append(f"    period: {lv.period}")
        for s in lv.states:
            L.append(f"    state {s.name}: {s.memory.describe()}")
        for bnd in lv.bindings:
            L.append(f"    let {bnd.name} = {bnd.flow.describe()}  (width {_w(bnd.flow)}{', per head' if bnd.flow.per_head else ''})")
        if lv.reads is not None:
            L.append(f"    reads: {lv.reads.describe()}")
        if lv.output is not None:
            L.append(f"    output: {lv.output.describe()}")
        if lv.objective:
            L.append(f"    objective: {lv.objective}" + (f"({_hyper(lv.objective_args)})" if lv.objective_args else ""))
        if lv.rule:
            L.append(f"    rule: {lv.rule}" + (f"({_hyper(lv.rule_args)})" if lv.rule_args else ""))
        if lv.kind is ir.LevelKind.IN_CONTEXT:
            L.append(f"    reset: {lv.reset}; init: {lv.init}; grad through writes: {lv.grad_writes}; "
                     f"read: {lv.read_mode}; target: {lv.target}")
        if lv.context == "grads":
            L.append(f"    context: grads({lv.context_of})")
        if lv.output_width is not None:
            L.append(f"    output width: {lv.output_width}")
    g = build_graph(program)
    L.append("  edges:")
    for u, v, data in sorted(g.edges(data=True), key=lambda e: (e[2]["kind"].value, e[0], e[1])):
        label = f" ({data['label']})" if data.get("label") else ""
        L.append(f"    {data['kind'].value}: {u} -> {v}{label}")
    return "\n".join(L) + "\n"


def _w(flow: ir.Flow):
    return flow.width if flow.width is not None else "?"
