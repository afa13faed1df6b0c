"""The negative corpus: every spec in ``invalid/`` fails with exactly the diagnostics it declares.

Each file states its expectations in comments at the top::

    # A level writes a width other than the model width into the residual stream.
    # expect: NL303 @ 19
    # expect-warning: NL604 @ 22

``expect`` lines give the exact set of (code, line) *errors* the file must produce (one line per
error; several when one run must report several independent errors). ``expect-warning`` lines,
when present, give the exact set of warnings; files without them do not constrain warnings.
A line may also pin the column: ``# expect: NL303 @ 19:5``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nlc.diagnostics import CODES, render
from nlc.pipeline import check_file

HERE = Path(__file__).resolve().parent
CORPUS = sorted((HERE / "invalid").glob("*.nl"))
_EXPECT = re.compile(r"^#\s*expect(-warning)?:\s*(NL\d{3})\s*@\s*(\d+)(?::(\d+))?\s*$", re.M)

# codes a spec file cannot carry, and the test here that covers each instead
COVERED_ELSEWHERE = {"NL001": "test_missing_file_is_nl001"}


def expectations(path: Path) -> tuple[set, set, dict]:
    """(errors, warnings, columns) a corpus file declares; columns maps (code, line) -> col."""
    text = path.read_bytes().decode("utf-8", errors="replace")  # NL002's file is not UTF-8
    errors, warnings, cols = set(), set(), {}
    for m in _EXPECT.finditer(text):
        key = (m.group(2), int(m.group(3)))
        (warnings if m.group(1) else errors).add(key)
        if m.group(4):
            cols[key] = int(m.group(4))
    return errors, warnings, cols


def _ids():
    return [p.stem for p in CORPUS]


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 40


@pytest.mark.parametrize("path", CORPUS, ids=_ids())
def test_invalid_spec(path: Path):
    want_errors, want_warnings, cols = expectations(path)
    assert want_errors or want_warnings, f"{path.name} declares no `# expect:` line"
    result = check_file(path)
    got_errors = {(d.code, d.span.line) for d in result.diagnostics if d.is_error}
    got_warnings = {(d.code, d.span.line) for d in result.diagnostics if not d.is_error}
    shown = render(result.diagnostics, {result.source.name: result.source} if result.source else {})
    assert got_errors == want_errors, f"\n{shown}"
    if want_warnings:
        assert got_warnings == want_warnings, f"\n{shown}"
    by_key = {(d.code, d.span.line): d for d in result.diagnostics}
    for key, col in cols.items():
        assert by_key[key].span.col == col, f"{key}: column {by_key[key].span.col}, expected {col}"
    assert not result.ok or not want_errors


@pytest.mark.parametrize("path", CORPUS, ids=_ids())
def test_file_name_states_its_code(path: Path):
    """``nl303_something.nl`` expects NL303 (the corpus is navigable by code)."""
    m = re.match(r"nl(\d{3})_", path.name)
    if m is None:
        assert path.name.startswith("multi_"), "name corpus files nlXXX_what.nl or multi_what.nl"
        return
    errors, warnings, _ = expectations(path)
    assert f"NL{m.group(1)}" in {c for c, _ in errors | warnings}


@pytest.mark.parametrize("path", CORPUS, ids=_ids())
def test_diagnostics_read_well(path: Path):
    """Messages name things the way users write them; carets sit on the line; hints exist."""
    result = check_file(path)
    for d in result.diagnostics:
        assert d.message and not d.message.endswith("."), d.message
        assert d.hint, f"{d.code} has no hint"
        assert not re.search(r"__ANON|\$END|\b(LBRACE|RBRACE|LPAR|RPAR|NAME|NUMBER|SEMI)\b", d.message), d.message
        if result.source is not None:
            line = result.source.line(d.span.line)
            assert 1 <= d.span.col <= len(line) + 1, (d, line)


def test_independent_errors_all_reported_in_one_run():
    """One run reports an error from the resolver and from every verifier pass."""
    result = check_file(HERE / "invalid" / "multi_independent_errors.nl")
    codes = {d.code for d in result.errors}
    assert {"NL203", "NL204", "NL303", "NL401", "NL406", "NL502"} <= codes
    assert len(result.errors) == 6


def test_missing_file_is_nl001(tmp_path: Path):
    for missing in (tmp_path / "nope.nl", tmp_path):  # absent, and a folder
        result = check_file(missing)
        assert [d.code for d in result.diagnostics] == ["NL001"]
        assert result.source is None and not result.ok


def test_every_spec_code_is_in_the_corpus():
    """Every code a spec can trigger (NL0xx-NL6xx) is exercised by a corpus file (or by the test
    named in COVERED_ELSEWHERE). NL9xx are command-line codes, tested in test_cli.py."""
    spec_codes = {c for c in CODES if "NL000" <= c < "NL700"}
    seen = set()
    for path in CORPUS:
        errors, warnings, _ = expectations(path)
        seen |= {c for c, _ in errors | warnings}
    missing = spec_codes - seen - set(COVERED_ELSEWHERE)
    assert not missing, f"no corpus spec triggers {sorted(missing)}"
    assert seen <= set(CODES), f"unregistered codes expected: {sorted(seen - set(CODES))}"
