"""The schedule: horizons, update/reset positions, and the SVG's rows and marks."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from nlc.viz import schedule_svg, timeline

from . import geometry
from .conftest import ROOT, load

NS = geometry.NS
ALL = sorted(p.stem for p in (ROOT / "examples").glob("*.nl")) + ["hope_cms4", "zoo"]


def _rows(svg: str):
    root = ET.fromstring(svg)
    return root, [g for g in root.iter(f"{NS}g") if "row" in g.get("class", "").split()]


def _update_marks(row) -> int:
    n = 0
    for el in row.iter():
        classes = el.get("class", "").split()
        if "update" in classes:
            n += 1
        elif "update-band" in classes:
            n += int(el.get("data-count"))
    return n


def test_cms_nested_timeline_by_hand():
    # attn every token; outer every 64 tokens; inner every 16, reset every 64; seq = 256
    tl = timeline(load("cms_nested"))
    assert (tl.tokens, tl.token_lcm, tl.seq) == (64, 64, 256)
    rows = {r.level: r for r in tl.rows}
    assert rows["attn"].updates == tuple(range(1, 65)) and rows["attn"].resets == (0,)
    assert rows["inner"].updates == (16, 32, 48, 64) and rows["inner"].resets == (0,)
    assert rows["outer"].updates == (64,)
    assert rows["pretrain"].axis == "steps" and rows["pretrain"].updates == tuple(range(1, 9))
    assert [r.level for r in tl.rows] == ["attn", "inner", "outer", "pretrain"]  # fastest first


def test_schedule_svg_rows_and_update_marks_small_spec():
    prog = load("cms_nested")
    _, rows = _rows(schedule_svg(prog))
    assert sorted(r.get("data-level") for r in rows) == sorted(lv.name for lv in prog.levels)
    marks = {r.get("data-level"): _update_marks(r) for r in rows}
    # 64 tokens shown: attention 64 appends, outer 64/64 = 1, inner 64/16 = 4; 8 steps of pretrain
    assert marks == {"attn": 64, "outer": 1, "inner": 4, "pretrain": 8}
    resets = {r.get("data-level"): len([e for e in r.iter() if "reset" in e.get("class", "").split()])
              for r in rows}
    assert resets == {"attn": 1, "outer": 1, "inner": 1, "pretrain": 0}


def test_seq_override_shows_the_partial_last_chunk():
    # seq = 40: horizon min(lcm 64, 40) = 40 reaches the end of the sequence; inner (16) updates
    # at 16 and 32 and applies its partial chunk at 40; outer (64) only the partial one
    tl = timeline(load("cms_nested"), seq=40)
    rows = {r.level: r for r in tl.rows}
    assert tl.tokens == 40 and tl.sequence_end_shown
    assert rows["inner"].updates == (16, 32) and rows["inner"].partial == (40,)
    assert rows["outer"].updates == () and rows["outer"].partial == (40,)
    root, svg_rows = _rows(schedule_svg(load("cms_nested"), seq=40))
    partial = [e for e in root.iter() if e.get("class") == "update partial"]
    assert len(partial) == 2
    assert {r.get("data-level"): _update_marks(r) for r in svg_rows}["inner"] == 3


def test_steps_levels_and_resets_every():
    tl = timeline(load("zoo"))
    rows = {r.level: r for r in tl.rows}
    assert tl.tokens == 48  # lcm(4, 6, 8, 12, 24, 48) and resets every 24 / 48
    assert rows["c3"].resets == (0, 24) and rows["c2"].resets == (0,)
    assert rows["quick"].carry and rows["quick"].resets == ()
    assert rows["fixed"].period is None and rows["fixed"].updates == ()
    assert rows["mem"].reads == "causal"
    assert {r.level for r in tl.axis_rows("steps")} == {"pretrain", "opt"}
    steps = timeline(load("hope_cms4"))
    srows = {r.level: r for r in steps.rows}
    assert steps.steps == 8 and srows["slowest"].updates == (4, 8) and srows["slowest"].axis == "steps"


def test_attention_only_horizon_is_stretched():
    tl = timeline(load("transformer_pp"))
    assert tl.token_lcm == 1 and tl.tokens == 16


@pytest.mark.parametrize("name", ALL)
def test_every_schedule_has_one_row_per_level_and_is_legible(name):
    prog = load(name)
    svg = schedule_svg(prog)
    _, rows = _rows(svg)
    assert len(rows) == len(prog.levels)
    tl = timeline(prog)
    for row in rows:
        r = next(x for x in tl.rows if x.level == row.get("data-level"))
        assert _update_marks(row) == r.update_count == int(row.get("data-updates"))  # partial ones included
    assert geometry.problems(svg) == []
