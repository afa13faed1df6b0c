"""The surface syntax of a spec as frozen dataclasses (the AST).

The AST mirrors what the user wrote, one class per statement form, with a
:class:`~nlc.source.Span` on every node. It is *structural*: spans are excluded from
equality, so ``parse(print(ast)) == ast`` states the printer's round-trip property directly.
Comments are kept (``comments`` before a statement, ``trailing`` after it on the same line,
``end_comments`` before a closing brace) so that ``nlc fmt`` loses nothing.

Meaning (names resolved, defaults applied, dims evaluated) lives in :mod:`nlc.ir`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .source import Span

__all__ = [
    "Node", "Stmt", "Ident",
    "Num", "Name", "Call", "BinOp", "Neg", "Pipe", "Kwarg", "Shape", "Expr",
    "Spec", "Model", "Dims", "DimDef", "MemoryDef", "Embed", "Head", "Norm", "Block", "Cms",
    "Level", "State", "Let", "Reads", "Output", "Objective", "Rule", "Every", "Never", "Frozen",
    "ResetPer", "ResetNever", "ResetEvery", "InitMode", "InitFrom", "GradWrites", "ReadMode",
    "Target", "Context", "Sep",
    "walk",
]

_NOSPAN = Span.unknown()


@dataclass(frozen=True, kw_only=True)
class Node:
    span: Span = field(default=_NOSPAN, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True)
class Stmt(Node):
    comments: tuple[str, ...] = ()
    trailing: str = ""


@dataclass(frozen=True)
class Ident(Node):
    """A name as written where something is declared or referenced by a clause."""

    text: str


# ---- expressions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Num(Node):
    text: str  # as written ("3e-4"), so printing is exact

    @property
    def value(self) -> int | float:
        try:
            return int(self.text)
        except ValueError:
            return float(self.text)


@dataclass(frozen=True)
class Name(Node):
    id: str


@dataclass(frozen=True)
class Call(Node):
    func: Ident
    args: tuple["Expr", ...] = ()


@dataclass(frozen=True)
class BinOp(Node):
    op: str  # + - * /
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True)
class Neg(Node):
    operand: "Expr"


@dataclass(frozen=True)
class Pipe(Node):
    """``a | f | g(x)``: a flow through stages, left to right."""

    stages: tuple["Expr", ...]


@dataclass(frozen=True)
class Kwarg(Node):
    name: Ident
    value: "Expr"


@dataclass(frozen=True)
class Shape(Node):
    """``d -> dh``: an input width and an output width."""

    src: "Expr"
    dst: "Expr"


Expr = Union[Num, Name, Call, BinOp, Neg, Pipe, Kwarg, Shape]


# ---- statements --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sep(Stmt):
    """A ';' (dropped by the builder; never in a finished AST)."""


@dataclass(frozen=True)
class DimDef(Stmt):
    name: Ident
    value: Expr


@dataclass(frozen=True)
class Dims(Stmt):
    defs: tuple[DimDef, ...]
    end_comments: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemoryDef(Stmt):
    name: Ident
    params: tuple[Ident, ...]
    body: Expr


@dataclass(frozen=True)
class Embed(Stmt):
    vocab: Expr
    dim: Expr


@dataclass(frozen=True)
class Head(Stmt):
    mode: Ident


@dataclass(frozen=True)
class Norm(Stmt):
    kind: Ident


@dataclass(frozen=True)
class State(Stmt):
    names: tuple[Ident, ...]
    memory: Expr


@dataclass(frozen=True)
class Let(Stmt):
    name: Ident
    value: Expr


@dataclass(frozen=True)
class Reads(Stmt):
    value: Expr


@dataclass(frozen=True)
class Output(Stmt):
    value: Expr


@dataclass(frozen=True)
class Objective(Stmt):
    name: Ident
    args: tuple[Expr, ...] = ()


@dataclass(frozen=True)
class Rule(Stmt):
    name: Ident
    args: tuple[Expr, ...] = ()


@dataclass(frozen=True)
class Every(Stmt):
    value: Expr
    unit: Ident | None = None


@dataclass(frozen=True)
class Never(Stmt):
    pass


@dataclass(frozen=True)
class Frozen(Stmt):
    pass


@dataclass(frozen=True)
class ResetPer(Stmt):
    what: Ident


@dataclass(frozen=True)
class ResetNever(Stmt):
    pass


@dataclass(frozen=True)
class ResetEvery(Stmt):
    value: Expr
    unit: Ident | None = None


@dataclass(frozen=True)
class InitMode(Stmt):
    mode: Ident


@dataclass(frozen=True)
class InitFrom(Stmt):
    source: Ident


@dataclass(frozen=True)
class GradWrites(Stmt):
    mode: Ident
    count: Expr | None = None
    unit: Ident | None = None


@dataclass(frozen=True)
class ReadMode(Stmt):
    mode: Ident


@dataclass(frozen=True)
class Target(Stmt):
    mode: Ident


@dataclass(frozen=True)
class Context(Stmt):
    value: Expr


@dataclass(frozen=True)
class Level(Stmt):
    name: Ident
    per_head: bool = False
    heads: Expr | None = None
    memory: Expr | None = None
    items: tuple[Stmt, ...] = ()
    end_comments: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cms(Stmt):
    name: Ident
    variant: Ident
    args: tuple[Expr, ...] = ()
    levels: tuple[Level, ...] = ()
    end_comments: tuple[str, ...] = ()


@dataclass(frozen=True)
class Block(Stmt):
    name: Ident
    repeat: Expr | None = None
    items: tuple[Stmt, ...] = ()
    end_comments: tuple[str, ...] = ()


@dataclass(frozen=True)
class Model(Stmt):
    name: Ident
    items: tuple[Stmt, ...] = ()
    end_comments: tuple[str, ...] = ()


@dataclass(frozen=True)
class Spec(Node):
    version: int
    model: Model
    comments: tuple[str, ...] = ()  # before the header
    header_trailing: str = ""
    end_comments: tuple[str, ...] = ()  # after the model


def walk(node):
    """Yield every AST node at or below ``node`` (a node or a tuple of nodes), in source order."""
    if isinstance(node, (list, tuple)):
        for x in node:
            yield from walk(x)
        return
    if not isinstance(node, Node):
        return
    yield node
    for f in node.__dataclass_fields__:
        if f not in ("span", "comments", "trailing", "end_comments"):
            yield from walk(getattr(node, f))
