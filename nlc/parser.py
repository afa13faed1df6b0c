"""Text to AST: the lark LALR parser and the translation of its errors into diagnostics.

The parser is built once per process from ``grammar/nl.lark`` (LALR, contextual lexer,
``propagate_positions``). Lark exceptions never escape this module: every syntax error becomes
a :class:`~nlc.diagnostics.Diagnostic` whose message names tokens the way the user writes them
(``'{'``, ``a name``), never lark's internal terminal names.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import os
import re
import sys

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


def _cache_file(grammar: str) -> str | bool:
    """Where lark keeps the built LALR tables between processes: a file in the user's cache
    folder (``$XDG_CACHE_HOME/nlc`` or ``~/.cache/nlc``) named by the grammar's hash. Building the
    tables takes ~0.3 s; loading them ~5 ms, which is most of ``nlc check``'s start-up. Lark
    checks the hash inside the file and rebuilds on any mismatch or read error. ``False`` (no
    cache) when the folder cannot be created, or when ``NLC_NO_PARSER_CACHE`` is set."""
    if os.environ.get("NLC_NO_PARSER_CACHE"):
        return False
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "nlc")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        return False
    if not os.access(folder, os.W_OK):
        return False
    digest = hashlib.sha256(f"{grammar}{lark.__version__}{sys.version_info[:2]}".encode()).hexdigest()[:16]
    return os.path.join(folder, f"grammar-{digest}.lark-cache")


@functools.lru_cache(maxsize=1)
def parser() -> lark.Lark:
    """The process-wide LALR parser for the .nl grammar (tables cached on disk, see
    :func:`_cache_file`)."""
    grammar = read_grammar()
    return lark.Lark(
        grammar,
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=True,
        cache=_cache_file(grammar),
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
    if len(names) > 1 and "';'" in names:
        names.remove("';'")  # a separator is never what a user is missing
    if not names:
        return ""
    if len(names) > 9:
        shown = ", ".join(names[:8]) + f", or {len(names) - 8} others"
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


_NUMBER_TAIL = re.compile(r"[A-Za-z0-9_.]+")


def _malformed_number(source: SourceFile, pos: int) -> Diagnostic | None:
    """NL105 when the text at ``pos`` continues a number written right before it.

    The lexer splits ``2e``, ``0x10`` or ``1.2.3`` into a number and a name (or a second
    number); the parser then sees a token it does not expect. Reported as one malformed number
    covering all of it, which is what the user wrote.
    """
    text = source.text
    start = pos
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "._"):
        start -= 1
    while start < pos and not (text[start].isdigit() or (text[start] == "." and text[start + 1 : start + 2].isdigit())):
        start += 1  # skip a name glued before the number (`x2e`)
    if start >= pos or not (text[start].isdigit() or text[start] == "."):
        return None
    m = _NUMBER_TAIL.match(text, start)
    word = m.group(0)
    return Diagnostic(
        "NL105", f"malformed number `{word}`", source.span(start, start + len(word)),
        "write numbers like 16, 0.9 or 3e-4 (no hexadecimal, no unit glued to a number)",
    )


def _syntax_diagnostic(source: SourceFile, err: UnexpectedInput) -> Diagnostic:
    if isinstance(err, UnexpectedCharacters):
        pos = err.pos_in_stream
        ch = source.text[pos] if pos < len(source.text) else ""
        if ch == "." and pos > 0 and source.text[pos - 1].isdigit():
            bad = _malformed_number(source, pos)
            if bad is not None:
                return bad
        exp = _expected_list(err.allowed or ())
        msg = f"unexpected character {ch!r}"
        if exp:
            msg += f"; expected {exp}"
        hint = ""
        if ch.isalpha() and not ch.isascii():
            hint = "names are ASCII letters, digits and '_' (non-ASCII text belongs in comments)"
        elif ch in "\"'":
            hint = "the language has no strings: write names without quotes"
        return Diagnostic("NL101", msg, _span_at(source, pos), hint)
    if isinstance(err, UnexpectedEOF) or (
        isinstance(err, UnexpectedToken) and err.token.type == "$END"
    ):
        exp = _expected_list(getattr(err, "expected", ()) or ())
        pos = len(source.text.rstrip())
        msg = "unexpected end of file" + (f"; expected {exp}" if exp else "")
        return Diagnostic("NL102", msg, _span_at(source, max(0, pos - 1)))
    assert isinstance(err, UnexpectedToken)
    tok = err.token
    pos = tok.start_pos if tok.start_pos is not None else 0
    prev = err.token_history[-1] if getattr(err, "token_history", None) else None
    for glued in (tok, prev):  # `2e)`: the error is at `e`; `vocab = 0x100 seq`: at the name after
        if glued is None or glued.type not in ("NAME", "NUMBER") or not glued.start_pos:
            continue
        if glued is prev and glued.value in _UNIT_WORDS:
            continue  # `every 16tokens` is a period written tightly, not a malformed number
        if source.text[glued.start_pos - 1].isdigit() or source.text[glued.start_pos - 1] == ".":
            bad = _malformed_number(source, glued.start_pos)
            if bad is not None:
                return bad
    exp = _expected_list(err.expected)
    msg = f"unexpected {_describe_token(tok)}"
    if exp:
        msg += f"; expected {exp}"
    hint = ""
    after = source.text[tok.end_pos :].lstrip(" \t") if tok.end_pos is not None else ""
    keyword = tok.type in _literal_terminals() and str(tok.value).isalpha()
    if keyword and (after.startswith("=") or after.startswith(":")) and tok.type != "TIMES":
        hint = f"`{tok.value}` is a keyword and cannot be a name here; choose another name"
    elif tok.type == "EQ" and prev is not None and prev.type == "NAME" and "LET" in err.expected:
        hint = f"a binding inside a level is written `let {prev.value} = ...`"
    elif tok.type == "NAME" and after.startswith("=") and "LET" in err.expected:
        hint = f"a binding inside a level is written `let {tok.value} = ...`"
    elif tok.type in ("LEVEL", "BLOCK", "CMS", "DIMS", "MODEL", "MEMORY", "EMBED", "HEAD") and "RBRACE" in err.expected:
        hint = f"is a closing '}}' missing before this `{tok.value}`?"
    elif tok.type == "COLON" and "EQ" in err.expected:
        hint = "write `name = value` (with '='), not `name: value`"
    elif tok.type == "RPAR" and prev is not None and prev.type == "COMMA":
        hint = "remove the trailing ','"
    elif tok.type == "NAME" and tok.value in _KEYWORD_TYPOS:
        hint = f"did you mean `{_KEYWORD_TYPOS[tok.value]}`?"
    elif tok.type == "NAME":
        close = _close_keyword(tok.value, err.expected)
        if close:
            hint = f"did you mean `{close}`?"
    return Diagnostic("NL100", msg, _span_at(source, pos, len(str(tok.value))), hint)


_UNIT_WORDS = ("tokens", "token", "steps", "step", "chunks", "chunk")
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


# white space and whole comment lines, then `nl N` (a comment is consumed to its end, so the
# words `nl 1` inside a comment are never taken for the header)
_HEADER_RE = re.compile(r"\A(?:\s|#[^\n]*(?:\n|\Z))*nl\s+(\d+)")


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
    # NOTE: parsing allocates many objects that all stay alive (tokens, trees, AST nodes) and
    # creates no reference cycles; the cyclic collector would rescan them again and again, which
    # makes large specs parse in super-linear time (2x slower at 1000 levels). Pause it.
    collecting = gc.isenabled()
    gc.disable()
    try:
        try:
            tree = parser().parse(source.text)
        except UnexpectedInput as err:
            raise SpecError([_syntax_diagnostic(source, err)], source) from None
        diags = Diagnostics()
        spec = build_spec(tree, source, diags)
    finally:
        if collecting:
            gc.enable()
    if diags.has_errors:
        raise SpecError(diags.sorted(), source)
    return spec


def parse(text: str, name: str = "<string>") -> ast.Spec:
    """Parse spec text (convenience wrapper of :func:`parse_source`)."""
    return parse_source(SourceFile(name, text))
