"""Source files and spans: where every piece of a spec came from.

A :class:`Span` is a half-open character range of one :class:`SourceFile`, with 1-based line
and column numbers of both ends. Every AST and IR node carries one, so every diagnostic can
point at the exact text it is about.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

__all__ = ["SourceFile", "Span", "render_caret"]


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """The text of one spec and the name it is reported under.

    Arguments:
        name: what diagnostics print before ``:line:col`` (a path, or ``<string>``).
        text: the whole file as a string.
    """

    name: str
    text: str

    @classmethod
    def read(cls, path: str | Path) -> "SourceFile":
        """Read a spec from disk (UTF-8). Raises ``OSError``/``UnicodeDecodeError``."""
        p = Path(path)
        return cls(str(path), p.read_bytes().decode("utf-8"))

    def line(self, lineno: int) -> str:
        """The text of 1-based line ``lineno`` without its newline ('' past the end)."""
        lines = self.text.splitlines()
        if 1 <= lineno <= len(lines):
            return lines[lineno - 1]
        return ""

    def offset_to_linecol(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        offset = max(0, min(offset, len(self.text)))
        line = self.text.count("\n", 0, offset) + 1
        start = self.text.rfind("\n", 0, offset) + 1
        return line, offset - start + 1

    def span(self, start: int, end: int) -> "Span":
        """A :class:`Span` of this file from character offsets."""
        line, col = self.offset_to_linecol(start)
        end_line, end_col = self.offset_to_linecol(end)
        return Span(self.name, start, end, line, col, end_line, end_col)


@dataclasses.dataclass(frozen=True)
class Span:
    """A range of characters in a spec.

    ``start``/``end`` are 0-based character offsets (end exclusive); ``line``/``col`` and
    ``end_line``/``end_col`` are 1-based, as editors show them.
    """

    file: str
    start: int
    end: int
    line: int
    col: int
    end_line: int
    end_col: int

    @classmethod
    def unknown(cls, file: str = "<unknown>") -> "Span":
        return cls(file, 0, 0, 1, 1, 1, 1)

    def merge(self, other: "Span") -> "Span":
        """The smallest span covering both (same file)."""
        a, b = (self, other) if self.start <= other.start else (other, self)
        end = max(self, other, key=lambda s: s.end)
        return Span(self.file, a.start, end.end, a.line, a.col, end.end_line, end.end_col)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


def render_caret(source: SourceFile | None, span: Span) -> str:
    """The source line of ``span`` and a caret line under it (``^~~~``).

    Returns '' when the source text is not available. Multi-line spans are underlined to the
    end of their first line.
    """
    if source is None:
        return ""
    text = source.line(span.line)
    if not text and span.line > 1 and span.start >= len(source.text):
        text = source.line(span.line)
    text = text.replace("\t", " ")
    col = max(1, span.col)
    if span.end_line == span.line:
        width = max(1, span.end_col - span.col)
    else:
        width = max(1, len(text) - col + 1)
    width = min(width, max(1, len(text) - col + 1))
    gutter = f"{span.line:>4} | "
    pad = " " * (len(gutter) - 2) + "| "
    return f"{gutter}{text}\n{pad}{' ' * (col - 1)}^{'~' * (width - 1)}"
