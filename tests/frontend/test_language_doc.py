"""``docs/language.md`` agrees with the compiler: option tables, keywords, examples.

Every closed set of ``nlc/options.py`` has a table in the page, after a marker
``<!-- table: NAME -->``. The first column lists the allowed names in the same order; for
constructors, rules, objectives and stages the second column lists the arguments with their
defaults, formatted by :func:`fmt_args`. When an option changes, ``NLC_UPDATE_GOLDEN=1`` rewrites
the names and arguments columns (a new row takes its meaning from ``ArgSpec.doc``; check it).
"""

from __future__ import annotations

import os
import re

import pytest

from nlc import options
from nlc.parser import parser

from ..conftest import ROOT

DOC = ROOT / "docs" / "language.md"
_MARKER = re.compile(r"<!-- table: (\w+) -->\n((?:\|.*\|\n?)+)")
TABLES = [n for n in options.__all__ if n not in ("ArgSpec", "RESERVED")] + ["OPTIMIZER_RULE_OBJECTIVE"]


def fmt_args(spec: options.ArgSpec) -> str:
    """The arguments cell of a constructor/rule/objective/stage row."""
    items = []
    if spec.positional == "shape":
        items.append("`in -> out` (or `n` for `n -> n`)")
    elif spec.positional == "int":
        items.append("an integer")
    elif spec.positional == "num":
        items.append("a number")
    for k, (kind, default) in spec.kwargs.items():
        tags = ["gate"] if kind == "gate" else []
        if k in spec.required:
            tags.append("required")
        elif default is None:
            tags.append("optional")
        item = f"`{k}`" + (f" ({', '.join(tags)})" if tags else "")
        if k not in spec.required and default is not None:
            item += f" = `{default}`"
        if kind.startswith("name:"):
            others = [v for v in kind[5:].split("|") if v != default]
            item += " (or " + ", ".join(f"`{v}`" for v in others) + ")"
        items.append(item)
    return ", ".join(items) if items else "—"


def _cells(row: str) -> list[str]:
    # split on '|' not escaped as '\|'
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def _tables() -> dict[str, list[list[str]]]:
    out = {}
    for m in _MARKER.finditer(DOC.read_text(encoding="utf-8")):
        rows = [_cells(r) for r in m.group(2).strip().splitlines()]
        assert set(rows[1][0]) <= set("-: "), f"table {m.group(1)}: header separator expected"
        out[m.group(1)] = rows[2:]
    return out


def test_every_option_set_has_a_table():
    missing = set(TABLES) - set(_tables())
    assert not missing, f"docs/language.md lacks tables for {sorted(missing)}"
    unknown = set(_tables()) - set(TABLES)
    assert not unknown, f"tables for unknown option sets: {sorted(unknown)}"


def _expected_rows(name: str, old_rows: list[list[str]]) -> list[list[str]]:
    """The table as options.py says it should be, keeping the page's meanings."""
    obj = getattr(options, name)
    meaning = {r[0].strip("`"): r[-1] for r in old_rows}
    rows = []
    for key in obj:
        value = obj[key] if isinstance(obj, dict) else None
        doc = meaning.get(key) or (value.doc if isinstance(value, options.ArgSpec) else "") or "(to document)"
        if isinstance(value, options.ArgSpec):
            rows.append([f"`{key}`", fmt_args(value), doc])
        elif isinstance(obj, dict):
            rows.append([f"`{key}`", f"`{value}`"])
        else:
            rows.append([f"`{key}`", doc])
    return rows


def _rewrite(name: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    m = next(m for m in _MARKER.finditer(text) if m.group(1) == name)
    lines = m.group(2).strip().splitlines()
    rows = _expected_rows(name, [_cells(r) for r in lines[2:]])
    table = "\n".join(lines[:2] + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    DOC.write_text(text[:m.start(2)] + table + text[m.end(2):], encoding="utf-8")


@pytest.mark.parametrize("name", TABLES)
def test_option_table_matches_options_py(name):
    if os.environ.get("NLC_UPDATE_GOLDEN") == "1":
        _rewrite(name)
    rows = _tables()[name]
    obj = getattr(options, name)
    names = [r[0].strip("`") for r in rows]
    assert names == list(obj), f"{name}: the page lists {names}, options.py has {list(obj)}"
    if isinstance(obj, dict):
        for row, (key, value) in zip(rows, obj.items()):
            if isinstance(value, options.ArgSpec):
                assert row[1] == fmt_args(value), f"{name}.{key}: write `{fmt_args(value)}`"
            else:
                assert row[1] == f"`{value}`", f"{name}.{key}: write `{value}`"
    for row in rows:
        assert row[-1] and row[-1] != "(to document)", f"{name}: every row says what it means"


def test_keyword_list_matches_the_grammar():
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"The keywords are `([^`]+)`", text.replace("\n  ", " "))
    assert m, "the lexical rules list the keywords"
    documented = set(m.group(1).split())
    grammar = {t.pattern.value for t in parser().terminals
               if hasattr(t.pattern, "value") and t.pattern.value.isalpha() and t.pattern.type == "str"}
    assert documented == grammar


def test_examples_named_in_the_page_exist():
    text = DOC.read_text(encoding="utf-8")
    named = set(re.findall(r"`(\w+)\.nl`", text))
    assert named, "the page points at examples"
    for stem in named:
        assert (ROOT / "examples" / f"{stem}.nl").exists(), stem
    every = {p.stem for p in (ROOT / "examples").glob("*.nl")}
    assert every <= named, f"examples not in the page: {sorted(every - named)}"


def test_level_statement_table_covers_every_clause():
    """Each statement keyword of a level appears in the statement table of §6."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## 6. Levels"):text.index("### 6.1")]
    for word in ("state", "let", "reads", "output", "objective", "rule", "every", "never", "frozen",
                 "reset", "init", "grad through writes", "read", "target", "context"):
        assert f"`{word}" in section, word
