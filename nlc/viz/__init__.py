"""Pictures of a program's levels and of its schedule (``nlc viz``).

Public API (stable; everything in the submodules is private unless re-exported here)::

    render(program, fmt="svg", *, schedule=False, seq=None) -> str | bytes
    write(program, path, *, fmt=None, schedule=False, seq=None) -> Path
    format_for(path) -> str                 # the format an output path's extension picks

    to_svg(program)       -> str   # the level diagram, pure-Python layout
    to_dot(program)       -> str   # Graphviz text, nested cluster_* subgraphs
    to_mermaid(program)   -> str   # Mermaid flowchart with subgraphs
    schedule_svg(program, seq=None) -> str
    html_report(program, *, seq=None, code=True) -> str
    timeline(program, seq=None) -> Timeline     # the schedule as data
    level_table(program)  -> list[TableRow]     # the paper-style level table as data
    png_renderers()       -> list[str]          # "cairosvg", "dot" where available

Formats (:data:`FORMATS`): ``svg``, ``dot``, ``mmd``, ``html``, ``png``, ``md`` (the level
table as Markdown). ``png`` needs cairosvg or Graphviz's ``dot``; without either,
:class:`PngUnavailable` names the alternatives. Every text output is deterministic (same
program, same bytes). See docs/viz.md for what the pictures show.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .. import ir
from ..diagnostics import NLCError
from .diagram import to_svg
from .dot import to_dot
from .mermaid import to_mermaid
from .png import PngUnavailable, dot_to_png, svg_to_png
from .png import renderers as png_renderers
from .report import html_report
from .schedule import Timeline, timeline
from .schedule_svg import schedule_svg
from .table import TableRow, level_table, table_markdown

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "PngUnavailable",
    "TableRow",
    "Timeline",
    "VizError",
    "format_for",
    "html_report",
    "level_table",
    "png_renderers",
    "render",
    "schedule_svg",
    "table_markdown",
    "timeline",
    "to_dot",
    "to_mermaid",
    "to_svg",
    "write",
]

FORMATS = ("svg", "dot", "mmd", "html", "png", "md")
EXTENSIONS = {".svg": "svg", ".dot": "dot", ".gv": "dot", ".mmd": "mmd", ".mermaid": "mmd",
              ".html": "html", ".htm": "html", ".png": "png", ".md": "md"}
_ALIASES = {"mermaid": "mmd", "gv": "dot", "htm": "html", "markdown": "md"}


class VizError(NLCError):
    """A picture cannot be made as asked (unknown format, schedule in a text format, ...)."""


def format_for(path: str | os.PathLike) -> str:
    """The format picked by an output path's extension; raises VizError for an unknown one."""
    ext = Path(path).suffix.lower()
    if ext not in EXTENSIONS:
        known = ", ".join(sorted(EXTENSIONS))
        raise VizError(f"cannot tell the format of `{path}` from its extension; use one of {known}")
    return EXTENSIONS[ext]


def _fmt(fmt: str) -> str:
    f = _ALIASES.get(fmt.lower().lstrip("."), fmt.lower().lstrip("."))
    if f not in FORMATS:
        raise VizError(f"unknown format `{fmt}`; formats are {', '.join(FORMATS)}")
    return f


def render(program: ir.Program, fmt: str = "svg", *, schedule: bool = False, seq: int | None = None,
           code: str | bool = True, diagnostics=()) -> str | bytes:
    """Draw ``program`` in ``fmt``; ``bytes`` for png, ``str`` otherwise.

    Arguments:
      program: a resolved program (``nlc.check(path)`` or ``check_file(path).program``).
      fmt: one of :data:`FORMATS` (``mermaid`` is an alias of ``mmd``).
      schedule: draw the schedule instead of the level diagram (``svg`` and ``png`` only; the
        ``html`` report always holds both).
      seq: sequence length in tokens for the schedule (default ``program.seq``).
      code: html only: ``True`` shows generated code when codegen works, ``False`` omits it.
      diagnostics: html only: warnings to list at the top of the page.

    Raises:
      VizError: unknown format, or a schedule asked in a format that cannot draw it.
      PngUnavailable: ``png`` without cairosvg or ``dot``.
    """
    f = _fmt(fmt)
    if seq is not None and seq < 1:
        raise VizError(f"the sequence length must be at least 1 token, not {seq}")
    if schedule and f not in ("svg", "png", "html"):
        raise VizError(f"the schedule is drawn as svg, png or inside the html report, not as {f}")
    if f == "html":
        return html_report(program, seq=seq, code=code, diagnostics=diagnostics)
    if f == "dot":
        return to_dot(program)
    if f == "mmd":
        return to_mermaid(program)
    if f == "md":
        return table_markdown(program)
    svg = schedule_svg(program, seq) if schedule else to_svg(program)
    if f == "svg":
        return svg
    if "cairosvg" in png_renderers():
        return svg_to_png(svg)
    if schedule:
        raise PngUnavailable("cannot write the schedule as PNG: it needs the Python package cairosvg "
                             "(`pip install cairosvg`); or write it as .svg or .html")
    return dot_to_png(to_dot(program))


def write(program: ir.Program, path: str | os.PathLike, *, fmt: str | None = None, schedule: bool = False,
          seq: int | None = None, code: str | bool = True, diagnostics=()) -> Path:
    """Render and write atomically (a temporary file renamed over ``path``); returns the path."""
    path = Path(path)
    data = render(program, fmt or format_for(path), schedule=schedule, seq=seq, code=code,
                  diagnostics=diagnostics)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent if str(path.parent) else "."))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
