"""Source files and spans: where every piece of a spec came from.

A :class:`Span` is a half-open character range of one :class:`SourceFile`, with 1-based line
and column numbers of both ends. Every AST and IR node carries one, so every diagnostic can
point at the exact text it is about.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
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

    @functools.cached_property
    def _line_starts(self) -> list[int]:
        """Offsets where each line begins (lines end at '\n' only), computed once."""
        starts = [0]
        find = self.text.find
        i = find("\n")
        while i >= 0:
            starts.append(i + 1)
            i = find("\n", i + 1)
        return starts

    @classmethod
    def read(cls, path: str | Path) -> "SourceFile":
        """Read a spec from disk (UTF-8). Raises ``OSError``/``UnicodeDecodeError``."""
        p = Path(path)
        return cls(str(path), p.read_bytes().decode("utf-8"))

    def line(self, lineno: int) -> str:
        """The text of 1-based line ``lineno`` without its line break ('' past the end).

        Lines end at '\n' (a '\r' before it is dropped), exactly as :meth:`offset_to_linecol`
        counts them; other characters Python treats as line breaks (form feed, ...) do not end a
        line, so a caret is always drawn under the line its number names.
        """
        starts = self._line_starts
        if not 1 <= lineno <= len(starts):
            return ""
        begin = starts[lineno - 1]
        end = starts[lineno] - 1 if lineno < len(starts) else len(self.text)
        text = self.text[begin:end]
        return text[:-1] if text.endswith("\r") else text

    def offset_to_linecol(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset (O(log lines))."""
        offset = max(0, min(offset, len(self.text)))
        line = bisect.bisect_right(self._line_starts, offset)
        return line, offset - self._line_starts[line - 1] + 1

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
    # a tab counts one column, like every character: draw it as one space so the caret lines up
    text = source.line(span.line).replace("\t", " ")
    col = max(1, span.col)
    if span.end_line == span.line:
        width = max(1, span.end_col - span.col)
    else:
        width = max(1, len(text) - col + 1)
    width = min(width, max(1, len(text) - col + 1))
    gutter = f"{span.line:>4} | "
    pad = " " * (len(gutter) - 2) + "| "
    return f"{gutter}{text}\n{pad}{' ' * (col - 1)}^{'~' * (width - 1)}"
