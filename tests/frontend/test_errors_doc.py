"""``docs/errors.md`` documents every code, and its examples are true.

For each code of :data:`nlc.diagnostics.CODES` there is a ``## NLxxx`` section whose bold title is
the code's title. Sections of codes a spec can trigger (NL1xx-NL6xx) hold a failing spec (an
``nl`` block, the corpus file it names without its ``# expect:`` lines) and what nlc prints for
it (the ``text`` block before it); both are checked here. ``NLC_UPDATE_GOLDEN=1`` rewrites the
``text`` blocks from the current output.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from nlc.diagnostics import CODES, render
from nlc.pipeline import check_source
from nlc.source import SourceFile

from ..conftest import ROOT

DOC = ROOT / "docs" / "errors.md"
INVALID = Path(__file__).resolve().parent / "invalid"
_SECTION = re.compile(r"^## (NL\d{3})\s*$", re.M)
_BLOCK = re.compile(r"```(\w+)\n(.*?)\n```", re.S)


def _sections(text: str) -> dict[str, str]:
    parts = _SECTION.split(text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _spec_codes():
    return [c for c in CODES if "NL100" <= c < "NL700"]


def test_every_code_has_one_section_in_order():
    text = DOC.read_text(encoding="utf-8")
    found = _SECTION.findall(text)
    assert found == list(CODES), "sections must follow CODES, one per code"


@pytest.mark.parametrize("code", list(CODES))
def test_section_states_title_when_and_fix(code):
    body = _sections(DOC.read_text(encoding="utf-8"))[code]
    title = CODES[code][0]
    assert body.lstrip().startswith(f"**{title[0].upper() + title[1:]}.**"), "bold title first"
    assert "**Fix.**" in body
    assert f"[{code}](#{code.lower()})" in DOC.read_text(encoding="utf-8"), "listed in the table"


def _render(spec: str) -> tuple[set[str], str]:
    source = SourceFile("spec.nl", spec + "\n")
    result = check_source(source)
    return {d.code for d in result.diagnostics}, render(result.diagnostics, {source.name: source})


@pytest.mark.parametrize("code", _spec_codes())
def test_documented_spec_produces_its_code_and_output(code):
    text = DOC.read_text(encoding="utf-8")
    body = _sections(text)[code]
    blocks = _BLOCK.findall(body)
    specs = [b for lang, b in blocks if lang == "nl"]
    outputs = [b for lang, b in blocks if lang == "text"]
    assert len(specs) == 1 and len(outputs) == 1, "one failing spec and one output per section"
    codes, shown = _render(specs[0])
    assert code in codes
    corpus = re.search(r"tests/frontend/invalid/(\w+\.nl)", body)
    assert corpus, "name the corpus file the spec comes from"
    lines = (INVALID / corpus.group(1)).read_text(encoding="utf-8").split("\n")
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    assert "\n".join(lines).rstrip() == specs[0].rstrip(), f"the spec differs from {corpus.group(1)}"
    if outputs[0] != shown and os.environ.get("NLC_UPDATE_GOLDEN") == "1":
        DOC.write_text(text.replace(f"```text\n{outputs[0]}\n```", f"```text\n{shown}\n```", 1), encoding="utf-8")
        return
    assert outputs[0] == shown, "docs/errors.md is stale; rerun with NLC_UPDATE_GOLDEN=1"


def test_every_output_shown_is_real():
    """Every ``spec.nl:...`` output in the page (the introduction's too) is one the specs print."""
    text = DOC.read_text(encoding="utf-8")
    real = "\n".join(_render(b)[1] for lang, b in _BLOCK.findall(text) if lang == "nl")
    for lang, block in _BLOCK.findall(text):
        if lang == "text" and block.startswith("spec.nl:"):
            assert block in real, block.splitlines()[0]
