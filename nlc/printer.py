"""The canonical printer: AST back to .nl text (``nlc fmt``).

Canonical form: two-space indentation, one statement per line, no ';', braces on every level,
a blank line around multi-line items, operators spaced, parentheses only where precedence needs
them. Comments are kept where they were attached (see :mod:`nlc.build`). Properties (tested
over every example): ``parse(print(a)) == a`` and ``print(parse(print(a))) == print(a)``.
"""

from __future__ import annotations

from . import ast

__all__ = ["print_spec", "print_expr"]

_INDENT = "  "

# precedence: pipe < sum < product < unary < atom
_PREC = {"|": 0, "+": 1, "-": 1, "*": 2, "/": 2}


def _prec(e: ast.Expr) -> int:
    if isinstance(e, ast.Pipe):
        return 0
    if isinstance(e, ast.BinOp):
        return _PREC[e.op]
    if isinstance(e, ast.Neg):
        return 3
    return 4


def print_expr(e: ast.Expr) -> str:
    """One expression in canonical form."""
    if isinstance(e, ast.Num):
        return e.text
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Call):
        return f"{e.func.text}({', '.join(print_expr(a) for a in e.args)})"
    if isinstance(e, ast.Kwarg):
        return f"{e.name.text} = {print_expr(e.value)}"
    if isinstance(e, ast.Shape):
        return f"{print_expr(e.src)} -> {print_expr(e.dst)}"
    if isinstance(e, ast.Pipe):
        return " | ".join(_wrap(s, 1) for s in e.stages)
    if isinstance(e, ast.Neg):
        return "-" + _wrap(e.operand, 3)
    if isinstance(e, ast.BinOp):
        p = _PREC[e.op]
        left = _wrap(e.left, p)
        # left-associative: a right operand of equal precedence needs parentheses
        right = _wrap(e.right, p + 1)
        return f"{left} {e.op} {right}"
    raise TypeError(f"not an expression: {e!r}")


def _wrap(e: ast.Expr, min_prec: int) -> str:
    s = print_expr(e)
    return f"({s})" if _prec(e) < min_prec else s


def _args(args) -> str:
    return f"({', '.join(print_expr(a) for a in args)})" if args else ""


class _Printer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def emit(self, depth: int, text: str, trailing: str = "") -> None:
        line = _INDENT * depth + text
        if trailing:
            line += "  " + trailing
        self.lines.append(line.rstrip())

    def comments(self, depth: int, comments) -> None:
        for c in comments:
            self.emit(depth, c)

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    # containers -------------------------------------------------------------------------------
    def items(self, depth: int, items, group_kinds: bool = False) -> None:
        """Print statements; a blank line around multi-line ones, and (at model scope) between
        statements of different kinds."""
        prev = None
        for it in items:
            if prev is not None and (
                _is_multiline(it) or _is_multiline(prev) or (group_kinds and _group(it) != _group(prev))
            ):
                self.blank()
            self.stmt(depth, it)
            prev = it

    def braced(self, depth: int, head: str, node, items, trailing: str) -> None:
        if not items and not node.end_comments:
            self.emit(depth, head + " {}", trailing)
            return
        self.emit(depth, head + " {")
        self.items(depth + 1, items, group_kinds=isinstance(node, ast.Model))
        self.comments(depth + 1, node.end_comments)
        self.emit(depth, "}", trailing)

    def stmt(self, depth: int, s: ast.Stmt) -> None:
        self.comments(depth, s.comments)
        t = s.trailing
        if isinstance(s, ast.Model):
            self.braced(depth, f"model {s.name.text}", s, s.items, t)
        elif isinstance(s, ast.Dims):
            self.braced(depth, "dims", s, s.defs, t)
        elif isinstance(s, ast.Block):
            rep = f" x {print_expr(s.repeat)}" if s.repeat is not None else ""
            self.braced(depth, f"block {s.name.text}{rep}", s, s.items, t)
        elif isinstance(s, ast.Cms):
            self.braced(depth, f"cms {s.name.text} {s.variant.text}{_args(s.args)}", s, s.levels, t)
        elif isinstance(s, ast.Level):
            head = f"level {s.name.text}"
            if s.per_head:
                head += " per head" + (f"({print_expr(s.heads)})" if s.heads is not None else "")
            if s.memory is not None:
                head += f" : {print_expr(s.memory)}"
            if not s.items and not s.end_comments:
                self.emit(depth, head, t)
            else:
                self.braced(depth, head, s, s.items, t)
        else:
            self.emit(depth, _simple(s), t)


def _group(s: ast.Stmt) -> str:
    """Model-scope statements of one group print without blank lines between them."""
    return "io" if isinstance(s, (ast.Embed, ast.Head, ast.Norm)) else type(s).__name__


def _is_multiline(s: ast.Stmt) -> bool:
    if isinstance(s, (ast.Model, ast.Dims, ast.Block, ast.Cms)):
        return True
    if isinstance(s, ast.Level):
        return bool(s.items) or bool(s.end_comments)
    return False


def _simple(s: ast.Stmt) -> str:
    if isinstance(s, ast.DimDef):
        return f"{s.name.text} = {print_expr(s.value)}"
    if isinstance(s, ast.MemoryDef):
        params = f"({', '.join(p.text for p in s.params)})" if s.params else ""
        return f"memory {s.name.text}{params} = {print_expr(s.body)}"
    if isinstance(s, ast.Embed):
        return f"embed {print_expr(s.vocab)} -> {print_expr(s.dim)}"
    if isinstance(s, ast.Head):
        return f"head {s.mode.text}"
    if isinstance(s, ast.Norm):
        return f"norm {s.kind.text}"
    if isinstance(s, ast.State):
        return f"state {', '.join(n.text for n in s.names)} : {print_expr(s.memory)}"
    if isinstance(s, ast.Let):
        return f"let {s.name.text} = {print_expr(s.value)}"
    if isinstance(s, ast.Reads):
        return f"reads {print_expr(s.value)}"
    if isinstance(s, ast.Output):
        return f"output {print_expr(s.value)}"
    if isinstance(s, ast.Objective):
        return f"objective {s.name.text}{_args(s.args)}"
    if isinstance(s, ast.Rule):
        return f"rule {s.name.text}{_args(s.args)}"
    if isinstance(s, ast.Every):
        unit = f" {s.unit.text}" if s.unit is not None else ""
        return f"every {print_expr(s.value)}{unit}"
    if isinstance(s, ast.Never):
        return "never"
    if isinstance(s, ast.Frozen):
        return "frozen"
    if isinstance(s, ast.ResetPer):
        return f"reset per {s.what.text}"
    if isinstance(s, ast.ResetNever):
        return "reset never"
    if isinstance(s, ast.ResetEvery):
        unit = f" {s.unit.text}" if s.unit is not None else ""
        return f"reset every {print_expr(s.value)}{unit}"
    if isinstance(s, ast.InitMode):
        return f"init {s.mode.text}"
    if isinstance(s, ast.InitFrom):
        return f"init from {s.source.text}"
    if isinstance(s, ast.GradWrites):
        extra = ""
        if s.count is not None:
            extra = f" {print_expr(s.count)} {s.unit.text if s.unit else ''}".rstrip()
        return f"grad through writes {s.mode.text}{extra}"
    if isinstance(s, ast.ReadMode):
        return f"read {s.mode.text}"
    if isinstance(s, ast.Target):
        return f"target {s.mode.text}"
    if isinstance(s, ast.Context):
        return f"context {print_expr(s.value)}"
    raise TypeError(f"cannot print {type(s).__name__}")


def print_spec(spec: ast.Spec) -> str:
    """The canonical text of a spec (ends with a newline)."""
    p = _Printer()
    p.comments(0, spec.comments)
    p.emit(0, f"nl {spec.version}", spec.header_trailing)
    p.blank()
    p.stmt(0, spec.model)
    if spec.end_comments:
        p.blank()
        p.comments(0, spec.end_comments)
    return "\n".join(p.lines) + "\n"
