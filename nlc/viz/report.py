"""One self-contained HTML page about a spec: diagram, schedule, level table, source, code.

The page fetches nothing: the pictures are inline SVG, the style an inline ``<style>``, and
the only script a few lines of vanilla JavaScript that highlight a level everywhere (diagram,
schedule, table) when it is hovered or clicked in any of them. It renders without the script.

Generated code is shown when ``nlc.codegen`` imports and compiles the program; otherwise the
section says why (the report never fails because code generation does).
"""

from __future__ import annotations

import re
from html import escape

from .. import __version__, ir
from . import labels
from .diagram import to_svg
from .schedule import timeline
from .schedule_svg import schedule_svg
from .table import table_html

__all__ = ["generated_code", "html_report"]

_CSS = """
:root { --ink:#0f172a; --muted:#64748b; --line:#e2e8f0; --bg:#ffffff; --soft:#f8fafc; --accent:#0369a1; }
* { box-sizing: border-box; }
body { margin:0; font: 14px/1.5 system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif;
       color:var(--ink); background:var(--bg); }
header { padding:20px 28px 12px; border-bottom:1px solid var(--line); background:var(--soft); }
header h1 { margin:0 0 4px; font-size:22px; }
header p { margin:0; color:var(--muted); }
nav { margin-top:8px; display:flex; gap:16px; flex-wrap:wrap; }
nav a { color:var(--accent); text-decoration:none; }
nav a:hover { text-decoration:underline; }
main { padding:8px 28px 40px; }
section { margin-top:24px; }
h2 { font-size:17px; margin:0 0 8px; border-bottom:1px solid var(--line); padding-bottom:4px; }
.figure { overflow:auto; border:1px solid var(--line); border-radius:8px; background:#fff; max-height:90vh; }
.figure svg { display:block; }
.note { color:var(--muted); margin:4px 0 8px; }
.warn { border-left:3px solid #d97706; background:#fffbeb; padding:6px 10px; margin:8px 0; }
table.levels { border-collapse:collapse; font-size:12.5px; width:100%; }
table.levels th, table.levels td { border:1px solid var(--line); padding:5px 7px; vertical-align:top; text-align:left; }
table.levels .col-context, table.levels .col-memory, table.levels .name { overflow-wrap:anywhere; }
table.levels .col-num { white-space:nowrap; }
table.levels thead th { background:var(--soft); position:sticky; top:0; }
table.levels td, table.levels .col-level { font-family:'DejaVu Sans Mono', Menlo, Consolas, monospace; }
table.levels .col-level .name { font-weight:bold; display:block; }
table.levels .kind, table.levels .scope { display:block; color:var(--muted); font-weight:normal; font-size:11.5px; }
.table-wrap { overflow:auto; }
tr.hl td, tr.hl th { background:#fef9c3; }
svg .hl > rect:first-of-type { stroke-width:3px; }
svg g.row.hl > rect.row-bg { fill:#fef9c3; }
pre.code { margin:0; padding:10px 0; background:var(--soft); border:1px solid var(--line); border-radius:8px;
           overflow:auto; font: 12.5px/1.45 'DejaVu Sans Mono', Menlo, Consolas, monospace; counter-reset:line; }
pre.code .ln { display:inline-block; width:3.5em; padding-right:1em; text-align:right; color:#94a3b8;
               user-select:none; }
pre.code .c { color:#64748b; font-style:italic; }
pre.code .k { color:#7c3aed; font-weight:bold; }
pre.code .n { color:#b45309; }
details summary { cursor:pointer; color:var(--accent); margin:6px 0; }
footer { color:var(--muted); padding:12px 28px 24px; border-top:1px solid var(--line); font-size:12px; }
"""

_JS = """
(function () {
  function mark(name, on) {
    document.querySelectorAll('[data-level="' + name + '"]').forEach(function (el) {
      el.classList.toggle('hl', on);
    });
  }
  var pinned = null;
  document.querySelectorAll('g.level[data-level], g.row[data-level], tr[data-level]').forEach(function (el) {
    var name = el.getAttribute('data-level');
    el.addEventListener('mouseenter', function () { if (!pinned) mark(name, true); });
    el.addEventListener('mouseleave', function () { if (!pinned) mark(name, false); });
    el.addEventListener('click', function () {
      if (pinned) mark(pinned, false);
      pinned = pinned === name ? null : name;
      if (pinned) mark(pinned, true);
    });
  });
})();
"""

_KEYWORDS = ["nl", "model", "dims", "memory", "embed", "head", "norm", "block", "level", "cms", "state", "let", "reads", "output", "objective", "rule", "every", "never", "frozen", "reset", "per", "init", "learned", "zeros", "from", "grad", "through", "writes", "read", "target", "context", "tokens", "steps", "sequence", "sequential", "nested", "independent"]
_TOKEN = re.compile(r"(#.*$)|\b(" + "|".join(sorted(set(_KEYWORDS), key=len, reverse=True)) + r")\b|(\b\d[\d.e+-]*\b)")


def _highlight(line: str) -> str:
    out, pos = [], 0
    for m in _TOKEN.finditer(line):
        out.append(escape(line[pos:m.start()]))
        klass = "c" if m.group(1) else "k" if m.group(2) else "n"
        out.append(f'<span class="{klass}">{escape(m.group(0))}</span>')
        pos = m.end()
    out.append(escape(line[pos:]))
    return "".join(out)


def _source_html(text: str, highlight: bool = True) -> str:
    lines = text.rstrip("\n").split("\n")
    body = "\n".join(f'<span class="ln">{i}</span>{_highlight(s) if highlight else escape(s)}'
                     for i, s in enumerate(lines, 1))
    return f'<pre class="code">{body}</pre>'


def generated_code(program: ir.Program) -> tuple[str | None, str]:
    """``(model source, "")`` when code generation works, else ``(None, why not)``."""
    try:
        from ..codegen import compile_program
    except ImportError as e:
        return None, f"code generation is not available in this installation ({e})."
    try:
        return compile_program(program).model_source, ""
    except Exception as e:  # noqa: BLE001 - a report must not fail because codegen does
        return None, f"code generation failed for this spec: {type(e).__name__}: {e}"


def _inline(svg: str) -> str:
    return svg.strip()


def html_report(program: ir.Program, *, seq: int | None = None, source_text: str | None = None,
                code: str | None | bool = True, diagnostics=()) -> str:
    """The HTML report of a program (a complete, self-contained page).

    Arguments:
      program: a resolved program.
      seq: sequence length for the schedule (default ``program.seq``).
      source_text: the spec text to show (default: the program's source file).
      code: ``True`` to try code generation, ``False`` to leave the section out, or a string of
        generated code to show as is.
      diagnostics: warnings to list at the top (``Diagnostic`` objects).
    """
    name = program.name
    src = source_text if source_text is not None else (program.source.text if program.source else "")
    src_name = program.source.name if program.source else "spec"
    tl = timeline(program, seq)
    n_levels = len(program.levels)
    blocks = ", ".join(f"{b.name} × {b.repeat}" for b in program.blocks)
    sections = []
    warn = "".join(f'<div class="warn">warning {escape(d.code)} (line {d.span.line}): {escape(d.message)}</div>'
                   for d in diagnostics)
    sections.append(
        '<section id="diagram"><h2>Level diagram</h2>'
        '<p class="note">Levels nested by update frequency: the outer (pre-training) level holds the blocks; '
        'a block holds its sublayers in order and is drawn once with its multiplicity. Hover or click a level '
        'to find it in the schedule and the table.</p>'
        f'<div class="figure">{_inline(to_svg(program, id_prefix="d-"))}</div></section>')
    sections.append(
        '<section id="schedule"><h2>Schedule</h2>'
        f'<p class="note">One common period: {tl.tokens} tokens'
        + (f" of a {tl.seq}-token sequence" if tl.seq else "")
        + f" and {tl.steps} outer steps. Bars are updates (end of each chunk), red triangles resets.</p>"
        f'<div class="figure">{_inline(schedule_svg(tl, id_prefix="s-"))}</div></section>')
    sections.append(
        '<section id="levels"><h2>Levels</h2><p class="note">From the fastest level to the slowest, '
        'in the columns of the paper\'s level table (Nested Learning §6).</p>'
        f'<div class="table-wrap">{table_html(program)}</div></section>')
    sections.append(f'<section id="spec"><h2>Spec <span class="note">{escape(src_name)}</span></h2>'
                    f"{_source_html(src) if src else '<p class=note>no source text</p>'}</section>")
    if code is not False:
        text, why = (code, "") if isinstance(code, str) else generated_code(program)
        body = (f"<details open><summary>model.py ({len(text.splitlines())} lines)</summary>"
                f"{_source_html(text, highlight=False)}</details>" if text
                else f'<p class="note">No generated code: {escape(why)}</p>')
        sections.append(f'<section id="code"><h2>Generated code</h2>{body}</section>')
    nav = "".join(f'<a href="#{k}">{t}</a>' for k, t in (
        ("diagram", "diagram"), ("schedule", "schedule"), ("levels", "level table"), ("spec", "spec"),
        ("code", "generated code")) if code is not False or k != "code")
    fastest = labels.ordered_levels(program)
    summary = (f"{n_levels} levels · blocks: {blocks or 'none'} · fastest: "
               f"{fastest[0].name if fastest else '—'} · outer: {program.outer or '—'}")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(name)} · nlc levels</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{escape(name)}</h1><p>{escape(summary)}</p><nav>{nav}</nav></header>"
        f"<main>{warn}{''.join(sections)}</main>"
        f"<footer>Generated by nlc {escape(__version__)} (<code>nlc viz</code>) from {escape(src_name)}. "
        "Self-contained: no external resources.</footer>"
        f"<script>{_JS}</script></body></html>\n"
    )
