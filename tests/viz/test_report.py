"""The HTML report: self-contained, complete, and robust to missing code generation."""

from __future__ import annotations

import re
import sys
import types
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

from nlc.viz import html_report
from nlc.viz.report import generated_code

from .conftest import load


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict]]:
    p = _Tags()
    p.feed(html)
    return p.tags


def test_report_is_self_contained_and_complete():
    prog = load("hope_cms4")
    html = html_report(prog, code=False)
    assert html.startswith("<!DOCTYPE html>")
    tags = _tags(html)
    # nothing to fetch: no external scripts, styles, images or links; only in-page anchors
    for tag, attrs in tags:
        assert "src" not in attrs, tag
        if "href" in attrs:
            assert attrs["href"].startswith("#"), attrs["href"]
        assert tag not in ("link", "iframe", "img", "object", "embed")
    assert set(re.findall(r"https?://[^\s\"'<>)]+", html)) <= {"http://www.w3.org/2000/svg"}
    # both pictures, as well-formed inline SVG with distinct id prefixes
    svgs = re.findall(r"<svg .*?</svg>", html, re.DOTALL)
    assert len(svgs) == 2
    for s in svgs:
        ET.fromstring(s)
    ids = [a["id"] for _, a in tags if "id" in a]
    assert len(ids) == len(set(ids))
    # the level table: one row per level, the paper's columns
    rows = [a for t, a in tags if t == "tr" and "data-level" in a]
    assert sorted(a["data-level"] for a in rows) == sorted(lv.name for lv in prog.levels)
    for col in ("state / memory", "period", "context flow", "objective", "rule", "init", "reset",
                "grad through writes", "read mode"):
        assert f">{col}</th>" in html
    # the spec source, escaped
    assert "linear(d -&gt; dh)" in html and "model</span> hope_cms4" in html
    assert 'id="code"' not in html  # code=False leaves the section out


def test_report_shows_given_code_or_says_why_not(monkeypatch):
    prog = load("cms_nested")
    html = html_report(prog, code="class Model:  # <generated>\n    pass\n")
    assert "class Model:  # &lt;generated&gt;" in html and "model.py (2 lines)" in html
    monkeypatch.setitem(sys.modules, "nlc.codegen", None)  # import fails
    text, why = generated_code(prog)
    assert text is None and "not available" in why
    assert "No generated code: code generation is not available" in html_report(prog)


def test_report_survives_a_failing_code_generator(monkeypatch):
    fake = types.ModuleType("nlc.codegen")

    def compile_program(program):
        raise ValueError("lowering <boom>")

    fake.compile_program = compile_program
    monkeypatch.setitem(sys.modules, "nlc.codegen", fake)
    html = html_report(load("m3"))
    assert "code generation failed for this spec: ValueError: lowering &lt;boom&gt;" in html


def test_report_uses_the_schedule_seq():
    html = html_report(load("cms_nested"), seq=40, code=False)
    assert "40 tokens of a 40-token sequence" in html


def test_spec_text_cannot_inject_markup(tmp_path):
    from nlc.pipeline import check_file

    from .conftest import spec_path

    text = spec_path("cms_nested").read_text(encoding="utf-8")
    hostile = tmp_path / "hostile.nl"
    hostile.write_text("# </pre><script>alert(1)</script> & <!-- \n" + text, encoding="utf-8")
    result = check_file(hostile)
    assert result.ok
    html = html_report(result.program, code=False)
    assert html.count("<script>") == 1  # ours
    assert "# &lt;/pre&gt;&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;!-- " in html
