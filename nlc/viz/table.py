"""The paper-style level table (Nested Learning §6 / reference table of HOPE's levels).

One row per level, from the fastest to the slowest, with the columns of the paper's table:
level, state / memory, update period, context flow, inner objective, learning rule, init
(knowledge transfer), reset, plus two columns the paper leaves implicit: gradient through
writes and read mode. Levels with the same update period share a number with letters
(``1a``, ``1b``), as the paper numbers Titans' memories.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from .. import ir
from . import labels

__all__ = ["COLUMNS", "TableRow", "level_table", "table_html", "table_markdown"]

COLUMNS = (
    ("num", "#"), ("level", "level"), ("memory", "state / memory"), ("period", "period"),
    ("context", "context flow"), ("objective", "objective"), ("rule", "rule"), ("init", "init"),
    ("reset", "reset"), ("grad", "grad through writes"), ("read", "read mode"),
)


@dataclass(frozen=True)
class TableRow:
    num: str
    level: str
    kind: str
    scope: str
    memory: str
    period: str
    context: str
    objective: str
    rule: str
    init: str
    reset: str
    grad: str
    read: str


def _numbers(program: ir.Program, levels: list[ir.Level]) -> list[str]:
    keys = [labels.rate_key(program, lv)[:2] for lv in levels]
    out, rank = [], 0
    for i, k in enumerate(keys):
        if i == 0 or k != keys[i - 1]:
            rank += 1
        same = [j for j, kk in enumerate(keys) if kk == k]
        out.append(f"{rank}{'abcdefghijklmnopqrstuvwxyz'[same.index(i)] if len(same) > 1 else ''}")
    return out


def level_table(program: ir.Program) -> list[TableRow]:
    """The rows of the level table, fastest level first."""
    levels = labels.ordered_levels(program)
    rows = []
    for num, lv in zip(_numbers(program, levels), levels):
        rows.append(TableRow(
            num=num, level=lv.name, kind=lv.kind.value, scope=labels.scope_text(program, lv)
            + (f" · per head ×{lv.heads}" if lv.per_head else ""),
            memory=labels.outer_memory_text(program) if lv.kind is ir.LevelKind.OUTER else labels.memory_text(lv), period=labels.period_text(lv, program.seq),
            context=labels.context_text(program, lv), objective=labels.objective_text(lv),
            rule=labels.rule_text(program, lv), init=labels.init_text(lv, program),
            reset=labels.reset_text(lv), grad=labels.grad_text(lv), read=labels.read_text(lv)))
    return rows


def table_html(program: ir.Program) -> str:
    """An HTML ``<table class="levels">``; each row has ``data-level`` for cross-highlighting."""
    head = "".join(f'<th scope="col" class="col-{k}">{escape(t)}</th>' for k, t in COLUMNS)
    body = []
    for r in level_table(program):
        level = (f'<th scope="row" class="col-level"><span class="name">{escape(r.level)}</span>'
                 f'<span class="kind kind-{escape(r.kind)}">{escape(r.kind.replace("_", "-"))}</span>'
                 f'<span class="scope">{escape(r.scope)}</span></th>')
        cells = [f'<td class="col-num">{escape(r.num)}</td>', level]
        for key, _ in COLUMNS[2:]:
            cells.append(f'<td class="col-{key}">{escape(getattr(r, key))}</td>')
        body.append(f'<tr data-level="{escape(r.level)}" id="row-{escape(r.level)}">{"".join(cells)}</tr>')
    return (f'<table class="levels"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def table_markdown(program: ir.Program) -> str:
    """The same table as GitHub Markdown (``|`` in cells escaped)."""
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(t for _, t in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in level_table(program):
        lines.append("| " + " | ".join(cell(getattr(r, k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"
