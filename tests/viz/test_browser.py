"""The HTML report in a real browser: headless Chromium, no console errors, a screenshot.

Opt-in (``python -m pytest -m browser``); installs nothing and skips when no ``chromium``,
``chromium-browser`` or ``google-chrome`` is on PATH. Console messages, exceptions, failed
loads and network requests are read over the DevTools protocol (see chromium.py). Set
``NLC_VIZ_SHOTS=DIR`` to keep the screenshots.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from nlc.verify.graph import build_graph
from nlc.viz import html_report

from .chromium import find_chromium, load_page
from .conftest import load

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Real-font legibility, measured by the browser: text boxes must not overlap and no flow
# arrow may pass through a text (sampled every 2 px along each path).
_LEGIBILITY_JS = """
(function (sel) {
  var svg = document.querySelector(sel), out = [];
  var texts = Array.from(svg.querySelectorAll('text')).filter(function (t) { return t.textContent.trim(); })
    .filter(function (t) { return !t.classList.contains('flow-label'); });
  var boxes = texts.map(function (t) { var b = t.getBBox(); return [b.x, b.y, b.x + b.width, b.y + b.height, t.textContent]; });
  for (var i = 0; i < boxes.length; i++) for (var j = i + 1; j < boxes.length; j++) {
    var a = boxes[i], b = boxes[j];
    if (a[0] < b[2] - 1 && b[0] < a[2] - 1 && a[1] < b[3] - 1 && b[1] < a[3] - 1) out.push('overlap: ' + a[4] + ' / ' + b[4]);
  }
  svg.querySelectorAll('path.flow, path.io-flow').forEach(function (p) {
    var n = p.getTotalLength();
    for (var s = 0; s <= n; s += 2) {
      var q = p.getPointAtLength(s);
      for (var k = 0; k < boxes.length; k++) { var b = boxes[k];
        if (q.x > b[0] + 1 && q.x < b[2] - 1 && q.y > b[1] + 1 && q.y < b[3] - 1) { out.push(p.id + ' crosses ' + b[4]); return; } }
    }
  });
  return out;
})
"""


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def chromium():
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium on PATH (apt-get install chromium); this test installs nothing")
    return exe


@pytest.mark.parametrize("name", ["hope_cms4", "zoo"])
def test_report_renders_in_chromium(chromium, tmp_path, name):
    prog = load(name)
    page = tmp_path / f"{name}.html"
    page.write_text(html_report(prog), encoding="utf-8")
    evaluate = {
        "flows": "document.querySelectorAll('#d-svg path.flow').length",
        "rows": "document.querySelectorAll('#s-svg g.row').length",
        "table_rows": "document.querySelectorAll('table.levels tbody tr').length",
        "widths": "Array.from(document.querySelectorAll('svg')).map(function (s) "
                  "{ return s.getBoundingClientRect().width; })",
        "diagram": _LEGIBILITY_JS + "('#d-svg')",
        "schedule": _LEGIBILITY_JS + "('#s-svg')",
        "click": "(function () { var g = document.querySelector('#d-svg g.level'); "
                 "g.dispatchEvent(new MouseEvent('click', {bubbles: true})); "
                 "var n = g.getAttribute('data-level'); "
                 "return document.querySelector('tr[data-level=\"' + n + '\"]').classList.contains('hl'); })()",
    }
    report = load_page(page, chromium=chromium, evaluate=evaluate)
    shot = tmp_path / f"{name}.png"
    shot.write_bytes(report.screenshot)
    if os.environ.get("NLC_VIZ_SHOTS"):
        keep = Path(os.environ["NLC_VIZ_SHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep / shot.name)
    assert report.problems == [], report.problems
    assert report.requests == [page.resolve().as_uri()], "the page must fetch nothing"
    v = report.values
    assert v["flows"] == build_graph(prog).number_of_edges()
    assert v["rows"] == v["table_rows"] == len(prog.levels)
    assert len(v["widths"]) == 2 and min(v["widths"]) > 300
    assert v["diagram"] == [], json.dumps(v["diagram"][:5])
    assert v["schedule"] == [], json.dumps(v["schedule"][:5])
    assert v["click"] is True
    w, h = _png_size(report.screenshot)
    assert w >= 1280 and h > 1500
