"""Diagnostics and the one exception hierarchy of nlc.

Every problem nlc finds in a user's spec, data path or flags is a :class:`Diagnostic` with a
stable code (``NL201``), a severity, a :class:`~nlc.source.Span`, a message and a hint. The
codes are listed once, in :data:`CODES`; ``docs/errors.md`` documents each with a minimal
failing spec and its fix (a test keeps the two in step).

Exceptions all derive from :class:`NLCError`. Internal invariants use ``assert``; nothing a
user can cause does.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
from typing import Iterable, Sequence

from .source import SourceFile, Span, render_caret

__all__ = [
    "CODES",
    "Severity",
    "Diagnostic",
    "Diagnostics",
    "NLCError",
    "SpecError",
    "CodegenError",
    "did_you_mean",
    "render",
    "to_json",
]


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"


# code -> (title, default hint). Codes are stable: never renumber, only add.
CODES: dict[str, tuple[str, str]] = {
    # 0xx: reading the input
    "NL001": ("file not found", "check the path; `nlc check` takes paths of .nl files"),
    "NL002": ("file is not valid UTF-8 text", "save the spec as UTF-8"),
    # 1xx: syntax
    "NL100": ("unexpected token", "see docs/language.md for the statement forms"),
    "NL101": ("unexpected character", "remove the character or quote it in a comment (#)"),
    "NL102": ("unexpected end of file", "a '}' or a statement is missing at the end"),
    "NL103": ("missing version header", "start the file with `nl 1`"),
    "NL104": ("unsupported language version", "this nlc reads version 1: write `nl 1`"),
    "NL105": ("malformed number", "write numbers like 16, 0.9 or 3e-4"),
    # 2xx: names and options
    "NL201": ("unknown name", "declare it first, or fix the spelling"),
    "NL202": ("duplicate name", "every level, state, binding, dim and memory needs its own name"),
    "NL203": ("unknown option", "use one of the allowed names"),
    "NL204": ("invalid option value", "use one of the allowed values"),
    "NL205": ("wrong arguments", "check the number and names of the arguments"),
    "NL206": ("missing statement", "add the statement the level kind requires"),
    "NL207": ("statement not allowed here", "move the statement or remove it"),
    "NL208": ("reserved or invalid identifier", "choose another name"),
    "NL209": ("repeated statement", "state each clause once per level"),
    # 3xx: dimensions and shapes
    "NL301": ("dimension is not an integer", "make the division exact, e.g. pick d divisible by heads"),
    "NL302": ("dimension is not positive", "dimensions must be integers >= 1"),
    "NL303": ("shape mismatch", "make the producer's width equal the consumer's"),
    "NL304": ("dimension is not defined", "add it to `dims { ... }`"),
    "NL305": ("circular dimension definition", "define each dim from ones defined before it"),
    # 4xx: periods, units and schedules
    "NL401": ("period without a unit", "write `every 16 tokens` or `every 4 steps`"),
    "NL402": ("nesting violates frequency order", "an inner (nested) level must update at least as often as its parent"),
    "NL403": ("period does not fit the sequence", "use a period <= seq, or declare a longer `seq`"),
    "NL404": ("reset does not align with the period", "reset every multiple of the level's period"),
    "NL405": ("periods are not divisible", "make the slower period a multiple of the faster one"),
    "NL406": ("unit not allowed here", "in-context levels count `tokens`; outer, optimizer and CMS-outer levels count `steps`"),
    # 5xx: the level graph and its flows
    "NL501": ("flow cycle without a state update", "break the cycle: a value cannot depend on itself within one chunk"),
    "NL502": ("unused flow", "use the binding, or delete it"),
    "NL503": ("nothing reads this", "read it (reads/let/rule), or delete it"),
    "NL504": ("dangling flow", "point the flow at something that produces it"),
    "NL505": ("model structure is incomplete", "a model needs dims, `embed`, at least one block, `head` and one outer level"),
    # 6xx: rules, objectives and memories that do not fit together
    "NL601": ("rule does not fit the memory", "choose a rule the memory supports"),
    "NL602": ("rule or objective does not fit the level", "choose a rule/objective allowed for this level kind"),
    "NL603": ("read mode without in-context updates", "`read causal` applies to levels updated every N tokens"),
    "NL604": ("a learnable part can never learn", "let gradients through writes, or make it fixed"),
    "NL605": ("gate must be one number per token", "end the flow with `| mean` or a projection to width 1"),
    # 9xx: flags, data and checkpoints (CLI)
    "NL901": ("bad command-line usage", "see `nlc --help`"),
    "NL902": ("data path problem", "point --data at a text file or a folder of text files"),
    "NL903": ("checkpoint problem", "point --resume at a checkpoint written by `nlc train`"),
    "NL904": ("code generation is not available for this spec", "see the message for the construct; the spec itself is valid"),
}


@dataclasses.dataclass(frozen=True)
class Diagnostic:
    """One finding about a spec.

    Arguments:
        code: a key of :data:`CODES`.
        message: what is wrong, in one sentence, naming the thing.
        span: where.
        hint: how to fix it (defaults to the code's hint).
        severity: error (the spec is invalid) or warning.
        notes: extra (span, text) pairs, e.g. "first defined here".
    """

    code: str
    message: str
    span: Span
    hint: str = ""
    severity: Severity = Severity.ERROR
    notes: tuple[tuple[Span, str], ...] = ()

    def __post_init__(self) -> None:
        assert self.code in CODES, f"unregistered diagnostic code {self.code}"
        if not self.hint:
            object.__setattr__(self, "hint", CODES[self.code][1])

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    def to_dict(self) -> dict:
        return {
            "code": self.code,
            "severity": self.severity.value,
            "message": self.message,
            "hint": self.hint,
            "file": self.span.file,
            "line": self.span.line,
            "col": self.span.col,
            "end_line": self.span.end_line,
            "end_col": self.span.end_col,
            "notes": [
                {"file": s.file, "line": s.line, "col": s.col, "message": m} for s, m in self.notes
            ],
        }


class Diagnostics:
    """An ordered, de-duplicated collection of diagnostics that passes append to."""

    def __init__(self) -> None:
        self._items: list[Diagnostic] = []
        self._seen: set[tuple] = set()

    def add(self, diag: Diagnostic) -> None:
        key = (diag.code, diag.span.start, diag.span.end, diag.message)
        if key not in self._seen:
            self._seen.add(key)
            self._items.append(diag)

    def error(self, code: str, message: str, span: Span, hint: str = "", notes=()) -> None:
        self.add(Diagnostic(code, message, span, hint, Severity.ERROR, tuple(notes)))

    def warning(self, code: str, message: str, span: Span, hint: str = "", notes=()) -> None:
        self.add(Diagnostic(code, message, span, hint, Severity.WARNING, tuple(notes)))

    def extend(self, diags: Iterable[Diagnostic]) -> None:
        for d in diags:
            self.add(d)

    @property
    def has_errors(self) -> bool:
        return any(d.is_error for d in self._items)

    def has_error_within(self, span: Span) -> bool:
        """Is an error already reported inside ``span``? Passes use it to stay quiet about a
        construct whose own text was already found wrong (no cascades)."""
        return any(
            d.is_error and d.span.file == span.file and span.start <= d.span.start and d.span.end <= span.end
            for d in self._items
        )

    def sorted(self) -> list[Diagnostic]:
        return sorted(self._items, key=lambda d: (d.span.file, d.span.start, d.code))

    def __iter__(self):
        return iter(self.sorted())

    def __len__(self) -> int:
        return len(self._items)


class NLCError(Exception):
    """Root of every exception nlc raises on purpose."""


class SpecError(NLCError):
    """A spec is invalid. Carries all its diagnostics (and the source, for rendering)."""

    def __init__(self, diagnostics: Sequence[Diagnostic], source: SourceFile | None = None):
        self.diagnostics = list(diagnostics)
        self.source = source
        super().__init__(render(self.diagnostics, {source.name: source} if source else {}))


class CodegenError(NLCError):
    """A valid spec uses a construct the code generator cannot lower (code NL904)."""

    def __init__(self, diagnostic: Diagnostic, source: SourceFile | None = None):
        self.diagnostics = [diagnostic]
        self.source = source
        super().__init__(render(self.diagnostics, {source.name: source} if source else {}))


class SettingError(NLCError, ValueError):
    """An ``NLC_*`` environment variable has a value nlc does not accept."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' (did you mean `x`?)' for the closest option, or ''."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def allowed(options: Iterable[str]) -> str:
    """'one of `a`, `b`, `c`' for a hint."""
    opts = sorted(options)
    return "one of " + ", ".join(f"`{o}`" for o in opts)


def render(diags: Iterable[Diagnostic], sources: dict[str, SourceFile] | None = None) -> str:
    """Render diagnostics the way `nlc check` prints them.

    ``file:line:col: NL123 error: message`` then the source line with a caret, then
    ``hint: ...`` and any notes.
    """
    sources = sources or {}
    out: list[str] = []
    for d in diags:
        sev = "" if d.is_error else "warning: "
        out.append(f"{d.span}: {d.code} {sev}{d.message}")
        caret = render_caret(sources.get(d.span.file), d.span)
        if caret:
            out.append(caret)
        for span, text in d.notes:
            out.append(f"  note: {span}: {text}")
        if d.hint:
            out.append(f"  hint: {d.hint}")
    return "\n".join(out)


def to_json(diags: Iterable[Diagnostic]) -> str:
    return json.dumps([d.to_dict() for d in diags], indent=2)
