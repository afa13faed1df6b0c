"""Lark parse tree to AST (with spans), and comments attached to the statements they annotate.

The builder is a :class:`lark.Transformer`; each grammar rule has one method returning one
AST node. Comments are dropped by the lexer and recovered here from the source text (the
language has no string literals, so ``#`` always starts a comment): a comment on a line of its
own belongs to the next statement of its enclosing brace block, or to the block's closing
brace; a comment after code on the same line is that statement's ``trailing`` comment.
"""

from __future__ import annotations

import bisect
import dataclasses
import re

import lark
from lark import Token, Transformer, v_args

from . import ast
from .diagnostics import Diagnostics
from .source import SourceFile, Span

__all__ = ["build_spec"]


def _tok_span(source: SourceFile, tok: Token) -> Span:
    return source.span(tok.start_pos, tok.end_pos)


def _meta_span(source: SourceFile, meta) -> Span:
    if getattr(meta, "empty", True):
        return Span.unknown(source.name)
    return source.span(meta.start_pos, meta.end_pos)


class _Builder(Transformer):
    def __init__(self, source: SourceFile, diags: Diagnostics):
        super().__init__(visit_tokens=False)
        self.source = source
        self.diags = diags

    # helpers ----------------------------------------------------------------------------------
    def ident(self, tok: Token) -> ast.Ident:
        return ast.Ident(str(tok), span=_tok_span(self.source, tok))

    def span(self, meta) -> Span:
        return _meta_span(self.source, meta)

    @staticmethod
    def _items(children) -> tuple:
        return tuple(
            c for c in children if isinstance(c, ast.Stmt) and not isinstance(c, ast.Sep)
        )

    @staticmethod
    def _args(arg_list) -> tuple:
        return tuple(arg_list) if arg_list is not None else ()

    # top level --------------------------------------------------------------------------------
    @v_args(meta=True)
    def start(self, meta, children):
        header, model = children
        return ast.Spec(version=header, model=model, span=self.span(meta))

    def header(self, children):
        return int(children[1])

    @v_args(meta=True)
    def model(self, meta, c):
        return ast.Model(self.ident(c[1]), self._items(c[3:-1]), span=self.span(meta))

    @v_args(meta=True)
    def sep(self, meta, c):
        return ast.Sep(span=self.span(meta))

    @v_args(meta=True)
    def dims(self, meta, c):
        defs = tuple(x for x in c[2:-1] if isinstance(x, ast.DimDef))
        return ast.Dims(defs, span=self.span(meta))

    @v_args(meta=True)
    def dim_def(self, meta, c):
        return ast.DimDef(self.ident(c[0]), c[2], span=self.span(meta))

    @v_args(meta=True)
    def memory_def(self, meta, c):
        # MEMORY NAME [LPAR param_list RPAR] EQ memref
        params = c[3] if c[3] is not None else ()
        return ast.MemoryDef(self.ident(c[1]), tuple(params), c[-1], span=self.span(meta))

    def param_list(self, c):
        return [self.ident(t) for t in c if isinstance(t, Token) and t.type == "NAME"]

    @v_args(meta=True)
    def embed(self, meta, c):
        return ast.Embed(c[1], c[3], span=self.span(meta))

    @v_args(meta=True)
    def head(self, meta, c):
        return ast.Head(self.ident(c[1]), span=self.span(meta))

    @v_args(meta=True)
    def norm_stmt(self, meta, c):
        return ast.Norm(self.ident(c[1]), span=self.span(meta))

    @v_args(meta=True)
    def block(self, meta, c):
        # BLOCK NAME [TIMES value] LBRACE block_item* RBRACE
        repeat = c[3]
        return ast.Block(self.ident(c[1]), repeat, self._items(c[5:-1]), span=self.span(meta))

    @v_args(meta=True)
    def cms(self, meta, c):
        # CMS NAME NAME [LPAR [arg_list] RPAR] LBRACE cms_item* RBRACE
        args = self._args(c[4])
        levels = tuple(x for x in c[7:-1] if isinstance(x, ast.Level))
        return ast.Cms(self.ident(c[1]), self.ident(c[2]), args, levels, span=self.span(meta))

    # levels -----------------------------------------------------------------------------------
    @v_args(meta=True)
    def level(self, meta, c):
        # LEVEL NAME [per_head] [COLON memref] level_body
        per = c[2]
        memory = c[4]
        body = c[5]
        per_head = per is not None
        heads = per if isinstance(per, ast.Node) else None
        return ast.Level(
            self.ident(c[1]), per_head, heads, memory, tuple(body), span=self.span(meta)
        )

    def per_head(self, c):
        # PER HEAD [LPAR value RPAR]
        return c[3] if c[3] is not None else True

    def braced_body(self, c):
        return self._items(c[1:-1])

    def inline_body(self, c):
        return self._items(c)

    @v_args(meta=True)
    def state_stmt(self, meta, c):
        names = tuple(self.ident(t) for t in c[1:-2] if isinstance(t, Token) and t.type == "NAME")
        return ast.State(names, c[-1], span=self.span(meta))

    @v_args(meta=True)
    def let_stmt(self, meta, c):
        return ast.Let(self.ident(c[1]), c[3], span=self.span(meta))

    @v_args(meta=True)
    def reads_stmt(self, meta, c):
        return ast.Reads(c[1], span=self.span(meta))

    @v_args(meta=True)
    def output_stmt(self, meta, c):
        return ast.Output(c[1], span=self.span(meta))

    @v_args(meta=True)
    def objective_stmt(self, meta, c):
        return ast.Objective(self.ident(c[1]), self._args(c[3]), span=self.span(meta))

    @v_args(meta=True)
    def rule_stmt(self, meta, c):
        return ast.Rule(self.ident(c[1]), self._args(c[3]), span=self.span(meta))

    @v_args(meta=True)
    def every_stmt(self, meta, c):
        unit = self.ident(c[2]) if c[2] is not None else None
        return ast.Every(c[1], unit, span=self.span(meta))

    @v_args(meta=True)
    def never_stmt(self, meta, c):
        return ast.Never(span=self.span(meta))

    @v_args(meta=True)
    def frozen_stmt(self, meta, c):
        return ast.Frozen(span=self.span(meta))

    @v_args(meta=True)
    def reset_per(self, meta, c):
        return ast.ResetPer(self.ident(c[2]), span=self.span(meta))

    @v_args(meta=True)
    def reset_never(self, meta, c):
        return ast.ResetNever(span=self.span(meta))

    @v_args(meta=True)
    def reset_every(self, meta, c):
        unit = self.ident(c[3]) if c[3] is not None else None
        return ast.ResetEvery(c[2], unit, span=self.span(meta))

    @v_args(meta=True)
    def init_mode(self, meta, c):
        return ast.InitMode(self.ident(c[1]), span=self.span(meta))

    @v_args(meta=True)
    def init_from(self, meta, c):
        return ast.InitFrom(self.ident(c[2]), span=self.span(meta))

    @v_args(meta=True)
    def grad_stmt(self, meta, c):
        # GRAD THROUGH WRITES NAME [value NAME]
        unit = self.ident(c[5]) if c[5] is not None else None
        return ast.GradWrites(self.ident(c[3]), c[4], unit, span=self.span(meta))

    @v_args(meta=True)
    def read_stmt(self, meta, c):
        return ast.ReadMode(self.ident(c[1]), span=self.span(meta))

    @v_args(meta=True)
    def target_stmt(self, meta, c):
        return ast.Target(self.ident(c[1]), span=self.span(meta))

    @v_args(meta=True)
    def context_stmt(self, meta, c):
        return ast.Context(c[1], span=self.span(meta))

    # values -----------------------------------------------------------------------------------
    @v_args(meta=True)
    def pipe(self, meta, c):
        stages = tuple(x for x in c if not isinstance(x, Token))
        return ast.Pipe(stages, span=self.span(meta))

    def _bin(self, meta, c, op):
        return ast.BinOp(op, c[0], c[2], span=self.span(meta))

    @v_args(meta=True)
    def add(self, meta, c):
        return self._bin(meta, c, "+")

    @v_args(meta=True)
    def sub(self, meta, c):
        return self._bin(meta, c, "-")

    @v_args(meta=True)
    def mul(self, meta, c):
        return self._bin(meta, c, "*")

    @v_args(meta=True)
    def div(self, meta, c):
        return self._bin(meta, c, "/")

    @v_args(meta=True)
    def neg(self, meta, c):
        return ast.Neg(c[1], span=self.span(meta))

    @v_args(meta=True)
    def number(self, meta, c):
        return ast.Num(str(c[0]), span=_tok_span(self.source, c[0]))

    @v_args(meta=True)
    def name(self, meta, c):
        return ast.Name(str(c[0]), span=_tok_span(self.source, c[0]))

    def paren(self, c):
        return c[1]

    @v_args(meta=True)
    def call(self, meta, c):
        return ast.Call(self.ident(c[0]), self._args(c[2]), span=self.span(meta))

    def arg_list(self, c):
        return [x for x in c if not isinstance(x, Token)]

    @v_args(meta=True)
    def kwarg(self, meta, c):
        return ast.Kwarg(self.ident(c[0]), c[2], span=self.span(meta))

    @v_args(meta=True)
    def shape(self, meta, c):
        return ast.Shape(c[0], c[2], span=self.span(meta))


# ---- comments ----------------------------------------------------------------------------------

_COMMENT = re.compile(r"#[^\n]*")


@dataclasses.dataclass
class _Comment:
    text: str
    start: int
    line: int
    own_line: bool  # nothing but white space before it on its line
    used: bool = False


def _scan_comments(source: SourceFile) -> list[_Comment]:
    out = []
    for m in _COMMENT.finditer(source.text):
        line_start = source.text.rfind("\n", 0, m.start()) + 1
        own = source.text[line_start : m.start()].strip() == ""
        line, _ = source.offset_to_linecol(m.start())
        out.append(_Comment(m.group(0).rstrip(), m.start(), line, own))
    return out


# fields that hold statement lists, per container type
_CONTAINERS = {
    ast.Model: "items",
    ast.Dims: "defs",
    ast.Block: "items",
    ast.Cms: "levels",
    ast.Level: "items",
}


def _unused_in(comments: list[_Comment], starts: list[int], lo: int, hi: int) -> list[_Comment]:
    """Comments not yet attached that start in ``[lo, hi)`` (``starts`` indexes ``comments``)."""
    i, j = bisect.bisect_left(starts, lo), bisect.bisect_left(starts, hi)
    return [c for c in comments[i:j] if not c.used]


def _attach(node, comments: list[_Comment], source: SourceFile, starts: list[int] | None = None):
    """Return ``node`` with comments inside its span attached to its statements.

    ``comments`` are in source order; every comment inside ``node`` ends up attached to exactly
    one statement (leading, trailing) or to the node's closing brace. Linear in the number of
    statements and comments (each lookup is a bisection over ``starts``).
    """
    field = _CONTAINERS.get(type(node))
    if field is None:
        return node
    if starts is None:
        starts = [c.start for c in comments]
    children = list(getattr(node, field))
    new_children = []
    gap_start = node.span.start
    for k, child in enumerate(children):
        # leading: comments before the child's start, not yet used, inside node. Besides
        # comments on lines of their own this takes a comment after an opening '{' (or inside a
        # container's header) on the same line, which would otherwise drift to the closing brace.
        lead = _unused_in(comments, starts, gap_start, child.span.start)
        # a comment inside a one-line statement written over several lines (an argument list, a
        # pipeline) leads that statement: its canonical form is one line
        if type(child) not in _CONTAINERS:
            lead += _unused_in(comments, starts, child.span.start, child.span.end)
        for c in lead:
            c.used = True
        # trailing: a comment on the line where the child ends, after it, unless another
        # statement starts between the two (the comment belongs to the last statement on the line)
        trail = ""
        i = bisect.bisect_left(starts, child.span.end)
        if i < len(comments):
            c = comments[i]
            next_start = children[k + 1].span.start if k + 1 < len(children) else None
            if (
                not c.used
                and not c.own_line
                and c.line == source.offset_to_linecol(max(child.span.end - 1, 0))[0]
                and not (next_start is not None and child.span.end <= next_start < c.start)
            ):
                trail = c.text
                c.used = True
        child = _attach(child, comments, source, starts)
        child = dataclasses.replace(
            child, comments=tuple(c.text for c in lead), trailing=trail
        )
        new_children.append(child)
        gap_start = child.span.end
    end = _unused_in(comments, starts, node.span.start, node.span.end)
    for c in end:
        c.used = True
    kwargs = {field: tuple(new_children), "end_comments": tuple(c.text for c in end)}
    return dataclasses.replace(node, **kwargs)


def build_spec(tree: lark.Tree, source: SourceFile, diags: Diagnostics) -> ast.Spec:
    """Build the AST of a parsed spec and attach its comments."""
    spec: ast.Spec = _Builder(source, diags).transform(tree)
    comments = _scan_comments(source)
    header_line = source.offset_to_linecol(spec.span.start)[0]
    lead, header_trailing, model_lead = [], "", []
    for c in comments:
        if c.start >= spec.model.span.start:
            break
        c.used = True
        if c.start < spec.span.start:
            lead.append(c.text)
        elif not c.own_line and c.line == header_line:
            header_trailing = c.text
        else:
            model_lead.append(c.text)
    model = _attach(spec.model, comments, source)
    model = dataclasses.replace(model, comments=tuple(model_lead))
    after = [c.text for c in comments if not c.used]
    return dataclasses.replace(
        spec,
        model=model,
        comments=tuple(lead),
        header_trailing=header_trailing,
        end_comments=tuple(after),
    )
