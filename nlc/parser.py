"""Text to AST: the lark LALR parser and the translation of its errors into diagnostics.

The parser is built once per process from ``grammar/nl.lark`` (LALR, contextual lexer,
``propagate_positions``). Lark exceptions never escape this module: every syntax error becomes
a :class:`~nlc.diagnostics.Diagnostic` whose message names tokens the way the user writes them
(``'{'``, ``a name``), never lark's internal terminal names.
"""

from __future__ import annotations

import functools
import re

import lark
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ast
from ._resources import read_grammar
from .build import build_spec
from .diagnostics import Diagnostic, Diagnostics, SpecError
from .source import SourceFile, Span

__all__ = ["parse_source", "parse", "parser", "token_name", "SUPPORTED_VERSIONS"]

SUPPORTED_VERSIONS = (1,)

# Terminals that are patterns rather than literal strings, named for humans.
_PATTERN_NAMES = {
    "NAME": "a name",
    "NUMBER": "a number",
    "INT": "an integer",
    "COMMENT": "a comment",
    "WS": "white space",
    "$END": "the end of the file",
}


@functools.lru_cache(maxsize=1)
def parser() -> lark.Lark:
    """The process-wide LALR parser for the .nl grammar."""
    return lark.Lark(
        read_grammar(),
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=True,
        cache=False,
    )


@functools.lru_cache(maxsize=1)
def _literal_terminals() -> dict[str, str]:
    out = {}
    for t in parser().terminals:
        pat = t.pattern
        if isinstance(pat, lark.lexer.PatternStr):
            out[t.name] = f"'{pat.value}'"
    return out


def token_name(terminal: str) -> str:
    """How a user would name a terminal: ``'{'``, ``'level'``, ``a name``."""
    if terminal in _PATTERN_NAMES:
        return _PATTERN_NAMES[terminal]
    lit = _literal_terminals().get(terminal)
    if lit:
        return lit
    return terminal.lower()


def _expected_list(expected) -> str:
    names = sorted({token_name(e) for e in expected if e not in ("COMMENT", "WS")})
    if not names:
        return ""
    if len(names) > 8:
        shown = ", ".join(names[:8]) + f", or one of {len(names) - 8} more"
    elif len(names) == 1:
        shown = names[0]
    else:
        shown = ", ".join(names[:-1]) + " or " + names[-1]
    return shown


def _describe_token(tok: lark.Token) -> str:
    if tok.type == "$END":
        return "the end of the file"
    if tok.type == "NAME":
        return f"name `{tok.value}`"
    if tok.type == "NUMBER":
        return f"number `{tok.value}`"
    return f"'{tok.value}'"


def _span_at(source: SourceFile, pos: int, length: int = 1) -> Span:
    end = min(len(source.text), pos + max(1, length))
    return source.span(pos, end)


def _syntax_diagnostic(source: SourceFile, err: UnexpectedInput) -> Diagnostic:
    if isinstance(err, UnexpectedCharacters):
        pos = err.pos_in_stream
        ch = source.text[pos] if pos < len(source.text) else ""
        exp = _expected_list(err.allowed or ())
        msg = f"unexpected character {ch!r}"
        if exp:
            msg += f"; expected {exp}"
        return Diagnostic("NL101", msg, _span_at(source, pos))
    if isinstance(err, UnexpectedEOF) or (
        isinstance(err, UnexpectedToken) and err.token.type == "$END"
    ):
        exp = _expected_list(getattr(err, "expected", ()) or ())
        pos = len(source.text.rstrip())
        msg = "unexpected end of file" + (f"; expected {exp}" if exp else "")
        return Diagnostic("NL102", msg, _span_at(source, max(0, pos - 1)))
    assert isinstance(err, UnexpectedToken)
    tok = err.token
    exp = _expected_list(err.expected)
    pos = tok.start_pos if tok.start_pos is not None else 0
    msg = f"unexpected {_describe_token(tok)}"
    if exp:
        msg += f"; expected {exp}"
    hint = ""
    prev = err.token_history[-1] if getattr(err, "token_history", None) else None
    if prev is not None and prev.type == "NAME" and tok.type == "EQ" and "LET" not in err.expected:
        pass
    if tok.type == "EQ" and prev is not None and prev.type == "NAME":
        hint = f"a binding inside a level is written `let {prev.value} = ...`"
    elif tok.type == "NAME" and tok.value in _KEYWORD_TYPOS:
        hint = f"did you mean `{_KEYWORD_TYPOS[tok.value]}`?"
    elif tok.type == "NAME":
        close = _close_keyword(tok.value, err.expected)
        if close:
            hint = f"did you mean `{close}`?"
    return Diagnostic("NL100", msg, _span_at(source, pos, len(str(tok.value))), hint)


_KEYWORD_TYPOS = {"layer": "level", "levels": "level", "objectives": "objective", "rules": "rule"}


def _close_keyword(word: str, expected) -> str:
    import difflib

    lits = [
        _literal_terminals()[e].strip("'")
        for e in expected
        if e in _literal_terminals() and _literal_terminals()[e].strip("'").isalpha()
    ]
    close = difflib.get_close_matches(word, lits, n=1, cutoff=0.7)
    return close[0] if close else ""


_HEADER_RE = re.compile(r"\A(?:\s|#[^\n]*\n?)*nl\s+(\d+)")


def _check_header(source: SourceFile) -> Diagnostic | None:
    m = _HEADER_RE.match(source.text)
    if not m:
        stripped = source.text.lstrip()
        # find first non-comment token for the span
        pos = len(source.text) - len(stripped)
        while stripped.startswith("#"):
            nl = source.text.find("\n", pos)
            if nl < 0:
                pos = len(source.text)
                break
            rest = source.text[nl + 1 :]
            pos = nl + 1 + (len(rest) - len(rest.lstrip()))
            stripped = source.text[pos:]
        return Diagnostic(
            "NL103",
            "the spec does not start with a version header",
            _span_at(source, min(pos, max(0, len(source.text) - 1))),
        )
    version = int(m.group(1))
    if version not in SUPPORTED_VERSIONS:
        start = m.start(1)
        return Diagnostic(
            "NL104",
            f"language version {version} is not supported (this nlc reads version "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))})",
            _span_at(source, start, len(m.group(1))),
        )
    return None


def parse_source(source: SourceFile) -> ast.Spec:
    """Parse a spec into its AST.

    Raises:
        SpecError: with the syntax diagnostic (NL1xx) of the first error found.
    """
    header = _check_header(source)
    if header is not None:
        raise SpecError([header], source)
    try:
        tree = parser().parse(source.text)
    except UnexpectedInput as err:
        raise SpecError([_syntax_diagnostic(source, err)], source) from None
    diags = Diagnostics()
    spec = build_spec(tree, source, diags)
    if diags.has_errors:
        raise SpecError(diags.sorted(), source)
    return spec


def parse(text: str, name: str = "<string>") -> ast.Spec:
    """Parse spec text (convenience wrapper of :func:`parse_source`)."""
    return parse_source(SourceFile(name, text))
