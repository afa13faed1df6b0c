"""The front end as functions: source → AST → IR → verified IR.

``check_source`` never raises for a problem in the spec: it returns every diagnostic it could
find. The public wrappers in ``nlc/__init__.py`` raise :class:`~nlc.diagnostics.SpecError`
instead, carrying the same diagnostics.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from . import ast, ir
from .diagnostics import Diagnostic, Diagnostics, SpecError
from .parser import parse_source
from .resolve import resolve
from .source import SourceFile, Span
from .verify import verify

__all__ = ["CheckResult", "check_source", "load_source", "check_file"]


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Everything the front end learned about one spec.

    ``ast``/``program`` are None when an earlier stage failed (a syntax error stops before
    resolution). ``ok`` is True when there is no error (warnings allowed).
    """

    source: SourceFile | None
    diagnostics: tuple[Diagnostic, ...]
    ast: ast.Spec | None = None
    program: ir.Program | None = None

    @property
    def ok(self) -> bool:
        return not any(d.is_error for d in self.diagnostics)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]


def load_source(path: str | Path) -> tuple[SourceFile | None, Diagnostic | None]:
    """Read a spec file; a missing or undecodable file becomes a diagnostic (NL001/NL002)."""
    p = Path(path)
    span = Span.unknown(str(path))
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return None, Diagnostic("NL001", f"no such file: {path}", span)
    except IsADirectoryError:
        return None, Diagnostic("NL001", f"{path} is a folder, not a .nl file", span)
    except OSError as e:
        return None, Diagnostic("NL001", f"cannot read {path}: {e.strerror or e}", span)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # point at the first bad byte: line and column of the text decoded so far
        before = data[: e.start].decode("utf-8")
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        span = Span(str(path), len(before), len(before) + 1, line, col, line, col + 1)
        return None, Diagnostic(
            "NL002", f"the file is not UTF-8 text: byte 0x{data[e.start]:02x} cannot be decoded", span)
    return SourceFile(str(path), text), None


def check_source(source: SourceFile) -> CheckResult:
    """Parse, resolve and verify one spec; collect every diagnostic."""
    try:
        spec = parse_source(source)
    except SpecError as e:
        return CheckResult(source, tuple(e.diagnostics))
    diags = Diagnostics()
    program = resolve(spec, source, diags)
    verify(program, diags)
    return CheckResult(source, tuple(diags.sorted()), spec, program)


def check_file(path: str | Path) -> CheckResult:
    source, problem = load_source(path)
    if problem is not None:
        return CheckResult(None, (problem,))
    return check_source(source)
