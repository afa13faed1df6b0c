"""The resolved program: a small, closed set of frozen node kinds (the IR).

Names are resolved, defaults applied and dimensions evaluated (sympy, exact rationals: a
non-integer width survives here so that the shape pass can report it). Every node keeps the
:class:`~nlc.source.Span` of the text it came from.

Node kinds, listed once:

* :class:`Program` — one model: dims, embedding, blocks, levels, the outer level.
* :class:`Block` — residual sublayers (levels or CMS groups), repeated ``repeat`` times.
* :class:`CmsGroup` — a Continuum Memory System: sequential, nested or independent levels.
* :class:`Level` — one optimization problem: states, flows, objective, rule, period, reset,
  init, gradient through writes, read mode. Its :class:`LevelKind` is one of seven.
* :class:`MemoryType` — what a state parameterizes (linear, mlp, residual_mlp, swiglu,
  attention, elementwise).
* Flows — :class:`Flow` trees of :data:`FLOW_KINDS` (input, ref, const, read, call, op).
* :class:`Period`, :class:`Reset`, :class:`Init`, :class:`GradWrites`, :class:`Hyper`.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Any, Iterator

import sympy

from .source import SourceFile, Span

__all__ = [
    "Unit", "LevelKind", "Period", "Reset", "Init", "GradWrites", "MemoryType", "StateDecl",
    "Flow", "FLOW_KINDS", "Binding", "Hyper", "Level", "CmsGroup", "Sublayer", "Block",
    "Program", "Edge", "EdgeKind",
]

_NOSPAN = Span.unknown()


class Unit(str, enum.Enum):
    TOKENS = "tokens"  # position within a sequence
    STEPS = "steps"  # outer optimizer steps
    NEVER = "never"  # no update of its own; its parameters belong to the outer level
    FROZEN = "frozen"  # never updated by anything


class LevelKind(str, enum.Enum):
    IN_CONTEXT = "in_context"  # state per sequence, updated every C tokens by its own rule
    ATTENTION = "attention"  # non-parametric in-context memory (period 1 token, "frequency ∞")
    STATIC = "static"  # `never`: parameters updated only by the outer level
    FROZEN = "frozen"  # parameters never updated
    STEPS_GROUP = "steps_group"  # in a block, updated by the outer loss every N steps
    OUTER = "outer"  # the pre-training level: owns every learnable parameter not owned elsewhere
    OPTIMIZER = "optimizer"  # a level whose context is grads(L): compiles to an Optimizer

    @property
    def label(self) -> str:
        """The kind as messages write it: ``in-context``, ``attention``, `` `never` ``, ``steps``..."""
        return _KIND_LABELS[self.value]

    @property
    def a_label(self) -> str:
        """The label with its article: ``an in-context``, ``a steps``."""
        return ("an " if self.label[0] in "aeiou" else "a ") + self.label


_KIND_LABELS = {
    "in_context": "in-context", "attention": "attention", "static": "`never`", "frozen": "`frozen`",
    "steps_group": "steps", "outer": "outer", "optimizer": "optimizer",
}


@dataclass(frozen=True)
class Period:
    """When a level's state is updated by its own rule: ``every`` units of ``unit``."""

    every: int | None
    unit: Unit
    span: Span = field(default=_NOSPAN, compare=False)

    def __str__(self) -> str:
        if self.unit in (Unit.NEVER, Unit.FROZEN):
            return self.unit.value
        return f"every {self.every} {self.unit.value}"


@dataclass(frozen=True)
class Reset:
    """When an in-context state returns to its initial value."""

    mode: str  # "sequence" | "never" | "every"
    every: int | None = None  # tokens, for mode "every"
    span: Span = field(default=_NOSPAN, compare=False)

    def __str__(self) -> str:
        if self.mode == "sequence":
            return "per sequence"
        if self.mode == "never":
            return "never"
        return f"every {self.every} tokens"


@dataclass(frozen=True)
class Init:
    """How an in-context state starts: meta-learned, zeros, or another level's state."""

    mode: str  # "learned" | "zeros" | "from"
    source: str | None = None
    span: Span = field(default=_NOSPAN, compare=False)

    def __str__(self) -> str:
        return f"from {self.source}" if self.mode == "from" else self.mode


@dataclass(frozen=True)
class GradWrites:
    """Whether the outer loss back-propagates through a level's in-context writes."""

    mode: str  # "full" | "stop" | "truncate"
    chunks: int | None = None
    span: Span = field(default=_NOSPAN, compare=False)

    def __str__(self) -> str:
        return f"truncate {self.chunks} chunks" if self.mode == "truncate" else self.mode


@dataclass(frozen=True)
class MemoryType:
    """The function a state parameterizes.

    ``kind`` is one of linear, mlp, residual_mlp, swiglu, attention, elementwise. Widths are
    sympy numbers (integers once verified). ``options`` holds kind-specific settings
    (attention: heads, window, rope).
    """

    kind: str
    din: Any = None
    dout: Any = None
    hidden: Any = None
    depth: int = 1
    act: str = "silu"
    options: tuple[tuple[str, Any], ...] = ()
    span: Span = field(default=_NOSPAN, compare=False)

    def option(self, name: str, default=None):
        return dict(self.options).get(name, default)

    def describe(self) -> str:
        if self.kind == "elementwise":
            return "elementwise"
        if self.kind == "attention":
            opts = ", ".join(f"{k}={v}" for k, v in self.options)
            return f"attention({opts})"
        s = f"{self.kind}({self.din} -> {self.dout}"
        if self.kind in ("mlp", "residual_mlp", "swiglu"):
            s += f", hidden={self.hidden}"
        if self.kind in ("mlp", "residual_mlp"):
            s += f", depth={self.depth}, act={self.act}"
        return s + ")"


@dataclass(frozen=True)
class StateDecl:
    name: str
    memory: MemoryType
    span: Span = field(default=_NOSPAN, compare=False)


FLOW_KINDS = ("input", "ref", "const", "read", "call", "op")


@dataclass(frozen=True)
class Flow:
    """One node of a flow expression.

    kinds:
      * ``input`` — the level's input stream (the normalized residual stream of its block).
      * ``ref`` — a ``let`` binding of the same level (``name``).
      * ``const`` — a number (``value``).
      * ``read`` — a state of this level applied to ``arg`` at the chunk-start state.
      * ``call`` — another level of the same block applied to ``arg`` (knowledge transfer by
        generation: that level produces this value).
      * ``op`` — a stage ``name`` with ``params`` applied to ``arg`` (linear, conv, l2norm, …).
    ``width`` is the per-token width it produces; ``per_head`` whether it has one value per
    head (in a ``per head`` level). In a program with errors only, a binding whose flow could
    not be resolved is bound to ``Flow("input", name="<error>", width=None)`` (unknown width),
    so that later checks do not report the same mistake again.
    """

    kind: str
    name: str = ""
    arg: "Flow | None" = None
    params: tuple[tuple[str, Any], ...] = ()
    value: float | int | None = None
    width: Any = None
    per_head: bool = False
    span: Span = field(default=_NOSPAN, compare=False)

    def param(self, name: str, default=None):
        return dict(self.params).get(name, default)

    def walk(self) -> Iterator["Flow"]:
        yield self
        if self.arg is not None:
            yield from self.arg.walk()

    def describe(self) -> str:
        if self.kind == "input":
            return self.name or "input"
        if self.kind == "ref":
            return self.name
        if self.kind == "const":
            return repr(self.value)
        if self.kind in ("read", "call"):
            return f"{self.name}({self.arg.describe() if self.arg else ''})"
        ps = ", ".join(
            f"{v[0]} -> {v[1]}" if k == "shape" else (f"{v}" if k == "_" else f"{k}={v}")
            for k, v in self.params
        )
        inner = self.arg.describe() if self.arg else "input"
        return f"{inner} | {self.name}" + (f"({ps})" if ps else "")


@dataclass(frozen=True)
class Binding:
    name: str
    flow: Flow
    span: Span = field(default=_NOSPAN, compare=False)


@dataclass(frozen=True)
class Hyper:
    """A rule/objective argument: a number, a name (an option value) or a binding reference."""

    value: Any  # int | float | str
    ref: bool = False  # True: ``value`` names a let-binding producing one number per token
    span: Span = field(default=_NOSPAN, compare=False)

    def __str__(self) -> str:
        return str(self.value)


@dataclass(frozen=True)
class Level:
    """One level: an optimization problem with its state, context, objective, rule and period."""

    name: str
    kind: LevelKind
    span: Span = field(default=_NOSPAN, compare=False)
    name_span: Span = field(default=_NOSPAN, compare=False)
    scope: tuple[str, ...] = ()  # ("block", name) or ("block", name, "cms", group) or ("model",)
    per_head: bool = False
    heads: int = 1
    input_width: Any = None
    states: tuple[StateDecl, ...] = ()
    bindings: tuple[Binding, ...] = ()
    reads: Flow | None = None
    output: Flow | None = None
    objective: str | None = None
    objective_args: tuple[tuple[str, Hyper], ...] = ()
    rule: str | None = None
    rule_args: tuple[tuple[str, Hyper], ...] = ()
    period: Period = Period(None, Unit.NEVER)
    reset: Reset = Reset("sequence")
    init: Init = Init("learned")
    grad_writes: GradWrites = GradWrites("full")
    read_mode: str = "chunk"
    target: str = "plain"
    context: str = "tokens"  # "tokens" | "grads"
    context_of: str | None = None  # for context grads(L): L
    output_width: Any = None
    clause_spans: tuple[tuple[str, Span], ...] = field(default=(), compare=False)

    def clause_span(self, clause: str) -> Span:
        return dict(self.clause_spans).get(clause, self.span)

    def state(self, name: str) -> StateDecl | None:
        for s in self.states:
            if s.name == name:
                return s
        return None

    def binding(self, name: str) -> Binding | None:
        for b in self.bindings:
            if b.name == name:
                return b
        return None

    def rule_arg(self, name: str, default=None) -> Hyper | None:
        return dict(self.rule_args).get(name, default)

    def flow_source(self, flow: Flow | None) -> str | None:
        """What a flow is after following its bindings' plain renames (``let query = key``): the
        name of the first binding that computes something, ``"@input"`` for the level input, or
        ``None`` for any other expression."""
        seen: set[str] = set()
        while flow is not None and flow.kind == "ref" and flow.name not in seen:
            seen.add(flow.name)
            b = self.binding(flow.name)
            if b is None or b.flow.kind not in ("ref", "input"):
                return flow.name if b is not None else None
            flow = b.flow
        return "@input" if flow is not None and flow.kind == "input" else None

    def reads_at_keys(self) -> bool:
        """Does the level read its memory at its keys (``let query = key``, or both the level
        input)? Its chunk read is then the inner loss's own forward (``chunk_step`` with
        ``q is k``)."""
        node = self.reads
        while node is not None and node.kind == "op":
            node = node.arg
        if node is None or node.kind != "read":
            return False
        key = self.binding("key")
        key_src = self.flow_source(Flow("ref", name="key")) if key is not None else "@input"
        return key_src is not None and self.flow_source(node.arg) == key_src

    def objective_arg(self, name: str, default=None) -> Hyper | None:
        return dict(self.objective_args).get(name, default)

    @property
    def block(self) -> str | None:
        return self.scope[1] if len(self.scope) >= 2 and self.scope[0] == "block" else None

    @property
    def cms(self) -> str | None:
        return self.scope[3] if len(self.scope) >= 4 else None

    @property
    def primary(self) -> StateDecl | None:
        """The state the level reads (its memory), when there is one."""
        if self.reads is not None and self.reads.kind == "read":
            return self.state(self.reads.name)
        return self.states[0] if self.states else None


@dataclass(frozen=True)
class CmsGroup:
    name: str
    variant: str  # sequential | nested | independent
    levels: tuple[str, ...]
    agg: str = "sum"  # independent only: sum | mean | learned
    span: Span = field(default=_NOSPAN, compare=False)


@dataclass(frozen=True)
class Sublayer:
    """One residual sublayer of a block: ``x = x + f(norm(x))``, f a level or a CMS group."""

    kind: str  # "level" | "cms"
    name: str
    span: Span = field(default=_NOSPAN, compare=False)


@dataclass(frozen=True)
class Block:
    name: str
    repeat: int
    norm: str
    sublayers: tuple[Sublayer, ...]
    generators: tuple[str, ...] = ()  # levels only called by other levels (not sublayers)
    span: Span = field(default=_NOSPAN, compare=False)


class EdgeKind(str, enum.Enum):
    DATA = "data"  # the residual stream: a sublayer feeds the next
    GRADS = "grads"  # an optimizer level's context is this level's gradient stream
    OPTIMIZES = "optimizes"  # an optimizer level produces this level's update
    INIT = "init"  # knowledge transfer by initialization (init from / init learned)
    GENERATES = "generates"  # one level produces another's values (keys, values, lr, ...)
    OWNS = "owns"  # the outer level owns (updates) this level's parameters
    NESTS = "nests"  # CMS nesting / block membership


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    kind: EdgeKind
    label: str = ""
    span: Span = field(default=_NOSPAN, compare=False)


@dataclass(frozen=True)
class Program:
    """A resolved model."""

    name: str
    source: SourceFile | None = field(default=None, compare=False, repr=False)
    span: Span = field(default=_NOSPAN, compare=False)
    dims: tuple[tuple[str, Any], ...] = ()  # evaluated (sympy Rational/Integer)
    dim_spans: tuple[tuple[str, Span], ...] = field(default=(), compare=False)
    vocab: Any = None
    d_model: Any = None
    embed_span: Span = field(default=_NOSPAN, compare=False)
    head: str = "tied"
    final_norm: str = "rms"
    blocks: tuple[Block, ...] = ()
    cms: tuple[CmsGroup, ...] = ()
    levels: tuple[Level, ...] = ()
    outer: str | None = None
    edges: tuple[Edge, ...] = ()

    @functools.cached_property
    def _index(self) -> tuple[dict, dict, dict, dict]:
        # name -> node lookups, built on first use (the IR is immutable); keeps the verifier
        # linear in the number of levels
        levels: dict[str, Level] = {}
        for lv in self.levels:
            levels.setdefault(lv.name, lv)
        groups: dict[str, CmsGroup] = {}
        for g in self.cms:
            groups.setdefault(g.name, g)
        blocks: dict[str, Block] = {}
        for b in self.blocks:
            blocks.setdefault(b.name, b)
        return levels, groups, dict(self.dims), blocks

    def dim(self, name: str):
        return self._index[2].get(name)

    @property
    def seq(self) -> int | None:
        v = self.dim("seq")
        return int(v) if v is not None and getattr(v, "is_integer", False) else None

    def level(self, name: str) -> Level | None:
        """The first level named ``name`` (O(1))."""
        return self._index[0].get(name)

    def cms_group(self, name: str) -> CmsGroup | None:
        """The first CMS group named ``name`` (O(1))."""
        return self._index[1].get(name)

    def block(self, name: str) -> Block | None:
        """The first block named ``name`` (O(1))."""
        return self._index[3].get(name)



def is_int(v) -> bool:
    """True for a sympy/python integer value."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, sympy.Basic) and v.is_integer is True

