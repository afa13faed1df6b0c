"""nlc.runtime.progress: progress line, metrics JSONL, SVG loss plot."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET

from hypothesis import given
from hypothesis import strategies as st

from nlc.runtime.progress import MetricsWriter, Progress, format_duration, level_table, nice_ticks, write_loss_plot


@given(st.floats(-1e6, 1e6), st.floats(1e-3, 1e6))
def test_nice_ticks_cover_the_range(lo, width):
    ticks = nice_ticks(lo, lo + width)
    tol = 1e-9 * (abs(lo) + width)
    assert ticks[0] <= lo + tol and ticks[-1] >= lo + width - tol
    assert 2 <= len(ticks) <= 12
    steps = {round(b - a, 6) for a, b in zip(ticks, ticks[1:])}
    assert len({round(s / max(steps), 3) for s in steps}) == 1


def test_loss_plot_is_standalone_svg(tmp_path):
    records = [{"step": s, "loss": 5.0 / s, "val_loss": (5.5 / s if s % 10 == 0 else None)} for s in range(1, 51)]
    records.append({"step": 51, "loss": None, "val_loss": None})
    path = tmp_path / "loss.svg"
    write_loss_plot(path, records, title="spec <x> & y: loss")
    root = ET.parse(path).getroot()
    ns = {"s": "http://www.w3.org/2000/svg"}
    assert root.tag.endswith("svg")
    texts = [t.text for t in root.iterfind(".//s:text", ns)]
    assert "spec <x> & y: loss" in texts and "step" in texts and "train" in texts and "validation" in texts
    lines = {p.get("class"): p.get("points").split() for p in root.iterfind(".//s:polyline", ns)}
    assert len(lines["train"]) == 50 and len(lines["validation"]) == 5
    write_loss_plot(tmp_path / "empty.svg", [])  # no data: still a valid file
    ET.parse(tmp_path / "empty.svg")


def test_metrics_writer_resume_drops_later_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path)
    for s in (10, 20, 30):
        w.write({"step": s, "loss": 1.0 / s, "val_loss": None})
    w.write({"step": 30, "loss": None, "val_loss": 0.5})  # same step: merged
    with open(path, "a") as f:
        f.write('{"step": 40, "lo')  # cut short by a crash
    resumed = MetricsWriter(path, resume_step=20)
    assert [r["step"] for r in resumed.records] == [10, 20]
    resumed.write({"step": 30, "loss": float("nan"), "val_loss": 2.0})
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30] and lines[-1]["loss"] is None
    assert MetricsWriter(path).records == [] and path.read_text() == ""


def test_metrics_writer_merges_same_step(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl")
    w.write({"step": 5, "loss": 2.0, "val_loss": None})
    w.write({"step": 5, "loss": None, "val_loss": 1.5})
    assert w.records == [{"step": 5, "loss": 2.0, "val_loss": 1.5}]


def test_progress_plain_text_when_not_a_tty():
    buf = io.StringIO()
    p = Progress(100, stream=buf)
    p.step(1)  # no redraw without a terminal
    p.log(10, 2.5, 12345.0, "val_loss 2.6000")
    p.note("hello")
    p.close()
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    assert lines[0].startswith("[##") and "10/100" in lines[0] and "loss 2.5000" in lines[0] and "12.3k tok/s" in lines[0]
    assert "eta" in lines[0] and "val_loss 2.6000" in lines[0] and lines[1] == "hello"


def test_progress_redraws_in_place_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    buf = Tty()
    p = Progress(10, stream=buf, time_budget=60)
    p.log(5, 1.0, 100.0)
    p.log(6, 0.9, 100.0, "val_loss 0.9500")
    p.note("message")
    p.close()
    out = buf.getvalue()
    assert out.startswith("\r[") and "\x1b[K" in out and "message\n" in out
    assert "step 6: loss 0.9000  val_loss 0.9500\n" in out  # evaluations stay in the scrollback


def test_small_formatters():
    assert format_duration(75) == "1:15" and format_duration(3725) == "1:02:05" and format_duration(float("inf")) == "?"
    table = level_table([{"name": "titans", "kind": "mlp memory", "period": 16, "unit": "tokens", "params": 1234},
                         {"name": "outer", "kind": "adamw", "period": None, "unit": "never", "params": 5}])
    assert "16 tokens" in table[1] and "1,234" in table[1] and "never" in table[2]
