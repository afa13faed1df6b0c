"""nlc — the Nested Learning compiler.

Public API (everything else is private and may change)::

    nlc.parse(text_or_path)   -> nlc.ast.Spec        (raises SpecError)
    nlc.check(text_or_path)   -> nlc.ir.Program      (raises SpecError; warnings allowed)
    nlc.diagnose(text_or_path)-> CheckResult          (never raises for spec problems)
    nlc.compile(text_or_path) -> CompiledSpec        (generated sources)
    nlc.load(text_or_path)    -> the generated model class
    nlc.format(text)          -> canonical text

Heavy dependencies (torch) load only when code is generated or run.
"""

from __future__ import annotations

from pathlib import Path

from .diagnostics import CodegenError, Diagnostic, NLCError, SpecError

__version__ = "0.1.0"

__all__ = [
    "parse", "check", "diagnose", "compile", "load", "format",
    "NLCError", "SpecError", "CodegenError", "Diagnostic", "__version__",
]


def _source(text_or_path):
    from .pipeline import load_source
    from .source import SourceFile

    if isinstance(text_or_path, Path) or (
        isinstance(text_or_path, str) and "\n" not in text_or_path and text_or_path.endswith(".nl")
    ):
        source, problem = load_source(text_or_path)
        if problem is not None:
            raise SpecError([problem])
        return source
    return SourceFile("<string>", str(text_or_path))


def parse(text_or_path):
    """Parse a spec (text, or a path ending in .nl) into its AST."""
    from .parser import parse_source

    return parse_source(_source(text_or_path))


def diagnose(text_or_path):
    """Parse, resolve and verify; return a CheckResult with every diagnostic (never raises for a
    problem of the spec or its file)."""
    from .pipeline import CheckResult, check_source

    try:
        source = _source(text_or_path)
    except SpecError as e:  # a file that cannot be read (NL001/NL002)
        return CheckResult(None, tuple(e.diagnostics))
    return check_source(source)


def check(text_or_path):
    """Parse, resolve and verify; return the IR program or raise SpecError with all errors."""
    result = diagnose(text_or_path)
    if not result.ok:
        raise SpecError(result.errors, result.source)
    return result.program


def format(text: str) -> str:  # noqa: A001 - mirrors `nlc fmt`
    """The canonical text of a spec."""
    from .printer import print_spec

    return print_spec(parse(text))


def compile(text_or_path):  # noqa: A001 - the natural name
    """Generate code for a spec; returns the compiled sources (see nlc.codegen)."""
    from .codegen import compile_program

    return compile_program(check(text_or_path))


def load(text_or_path):
    """Compile a spec and import its generated module; returns the model class."""
    from .codegen import load_program

    return load_program(check(text_or_path))
