"""Plan data and names for lowering: IR to a flat code plan: one plan per generated class, its attributes and its statements.

Lowering makes every choice the generated code needs and records it in plain data the templates
print: Python names (through one :class:`Namespace`), which flows are computed once for the
whole sequence and which per chunk (those that read an in-context state, paper eq 90), the
chunk schedule, the closed-form update of every state, resets, gradient truncation, and the
optimizers. Templates contain no decisions.

A valid spec that uses something the code generator does not lower raises
:class:`~nlc.diagnostics.CodegenError` (code NL904) naming the construct and its line.
"""

from __future__ import annotations

import builtins
import keyword
import re
from dataclasses import dataclass, field

from .. import ir
from ..diagnostics import CodegenError, Diagnostic

__all__ = ["Namespace", "Line", "Attr", "ClassPlan", "OptimizerPlan", "ModelPlan", "camel", "fail", "line_comment", "num"]


# ---- names ---------------------------------------------------------------------------------------

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TAKEN = set(keyword.kwlist) | set(dir(builtins)) | {
    "self", "torch", "nn", "F", "math", "nl_chunk", "nl_chunks", "nl_flows", "nl_model", "nl_mem", "nl_ops", "nl_optim",
    "dataclass", "field", "annotations",
}


class Namespace:
    """Unique, Python-legal names that never shadow a keyword, builtin or imported module.

    Spec names are already identifiers (the grammar guarantees it); anything else is cleaned.
    Collisions get a numeric suffix. One namespace per Python scope.
    """

    def __init__(self, taken=()):
        self.used: set[str] = set(_TAKEN) | set(taken)

    def __call__(self, want: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_]", "_", want) or "v"
        if not _IDENT.match(base):
            base = "_" + base
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def camel(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in name.split("_") if p) or "Level"


# ---- plan data ------------------------------------------------------------------------------------


@dataclass
class Line:
    """One line of generated code at an indentation depth (relative to the function body)."""

    code: str
    depth: int = 0
    comment: str = ""


@dataclass
class Attr:
    """``self.<name> = <code>`` in ``__init__``."""

    name: str
    code: str
    comment: str = ""


@dataclass
class ClassPlan:
    name: str  # Python class name
    level: str  # spec name (or block/group name)
    kind: str
    doc: list[str]
    attrs: list[Attr] = field(default_factory=list)
    signature: str = "x"
    body: list[Line] = field(default_factory=list)
    class_consts: list[tuple[str, str]] = field(default_factory=list)  # name, value code
    is_level: bool = True
    methods: list[tuple[str, str, list[str], list[Line]]] = field(default_factory=list)  # name, args, doc, body


@dataclass
class OptimizerPlan:
    name: str  # level that owns it
    code: str  # expression building the optimizer from `groups`
    period: int
    params: str  # which parameters: "outer" or a steps-group level name
    comment: str = ""
    wd: str = "0.0"  # weight decay of the matrices


@dataclass
class ModelPlan:
    name: str
    spec_file: str
    spec_hash: str
    doc_table: list[str]
    consts: list[tuple[str, str, str]]  # name, code, comment
    classes: list[ClassPlan]
    blocks: list[tuple[str, str, int, str]]  # attr, class, repeat, comment
    config: list[tuple[str, str, str]]  # field, value, comment
    dims: list[tuple[str, str]]
    head: str
    final_norm: str
    vocab: int
    d_model: int
    seq_len: int
    optimizers: list[OptimizerPlan]
    level_kinds: list[tuple[str, str, str, str]]  # spec name, kind, period, module path template
    defaults: dict
    steps_groups: list[str]
    frozen: list[str]
    embed_comment: str = ""


def fail(span, message: str):
    raise CodegenError(Diagnostic("NL904", message, span))


def line_comment(program: ir.Program, span) -> str:
    """``hope.nl:31  let x = ...`` for a span (file basename; text sanitized to one line)."""
    file = span.file.replace("\\", "/").rsplit("/", 1)[-1]
    text = ""
    if program.source is not None:
        text = program.source.line(span.line).strip()
    text = re.sub(r"[\r\n\x00-\x1f]", " ", text)
    if len(text) > 70:
        text = text[:67] + "..."
    return f"{file}:{span.line}" + (f"  {text}" if text else "")


def num(v) -> str:
    """A Python literal for an (int-valued or float) sympy/py number."""
    if isinstance(v, bool):
        return repr(v)
    try:
        if float(v) == int(v) and not isinstance(v, float):
            return str(int(v))
    except (TypeError, ValueError):
        pass
    f = float(v)
    return repr(int(f)) if f.is_integer() and abs(f) < 1e15 and not isinstance(v, float) else repr(f)
