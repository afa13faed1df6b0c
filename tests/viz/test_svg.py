"""The pure-Python SVG level diagram: well-formed, complete, one element per flow, legible."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from nlc.verify.graph import build_graph
from nlc.viz import to_svg
from nlc.viz.layout import layout
from nlc.viz.scene import build_scene

from . import geometry
from .conftest import ROOT, load

NS = geometry.NS
ALL = sorted(p.stem for p in (ROOT / "examples").glob("*.nl")) + ["hope_cms4", "zoo"]


def _classes(el) -> list[str]:
    return el.get("class", "").split()


@pytest.mark.parametrize("name", ALL)
def test_svg_is_well_formed_and_complete(name):
    prog = load(name)
    svg = to_svg(prog)
    root = ET.fromstring(svg)  # raises on malformed XML
    assert root.tag == f"{NS}svg"
    levels = {g.get("data-level") for g in root.iter(f"{NS}g") if "level" in _classes(g)}
    outer = {g.get("data-level") for g in root.iter(f"{NS}g") if "box-outer" in _classes(g)}
    assert levels | outer == {lv.name for lv in prog.levels}
    texts = " ".join(t.text or "" for t in root.iter(f"{NS}text"))
    for lv in prog.levels:
        assert lv.name in texts
    # one path per flow edge of the level graph, each naming its two levels
    g = build_graph(prog)
    flows = [p for p in root.iter(f"{NS}path") if "flow" in _classes(p)]
    assert len(flows) == g.number_of_edges()
    got = sorted((p.get("data-src"), p.get("data-dst"), p.get("data-kind")) for p in flows)
    assert got == sorted((u, v, k) for u, v, k in g.edges(keys=True))
    ids = [el.get("id") for el in root.iter() if el.get("id")]
    assert len(ids) == len(set(ids)), "ids must be unique"


@pytest.mark.parametrize("name", ALL)
def test_svg_is_legible(name):
    """No overlapping text, no arrow through text, text inside its box, boxes nested or apart."""
    assert geometry.problems(to_svg(load(name))) == []


def test_the_checker_finds_problems():
    bad = ('<svg xmlns="http://www.w3.org/2000/svg" width="200" height="100">'
           '<text x="10" y="20" font-size="12">hello world</text><text x="30" y="24" font-size="12">x</text>'
           '<path class="flow flow-data" id="e" d="M40,0V50"/>'
           '<g class="level" data-level="a"><rect x="0" y="40" width="20" height="20"/>'
           '<text x="5" y="55" font-size="12">too long</text></g></svg>')
    found = geometry.problems(bad)
    assert any("overlap" in p for p in found)
    assert any("crosses" in p for p in found)
    assert any("leaves the box" in p for p in found)


def test_hope_cms4_at_12_layers():
    """The legibility fixture: one block drawn once with × 12, four CMS levels in order."""
    prog = load("hope_cms4")
    svg = to_svg(prog)
    root = ET.fromstring(svg)
    badges = [t.text for t in root.iter(f"{NS}text") if "badge" in _classes(t)]
    assert badges == ["× 12"]
    assert len([r for r in root.iter(f"{NS}rect") if "repeat-copy" in _classes(r)]) == 2
    lay = layout(build_scene(prog))
    ys = [lay.boxes[f"lv-{n}"].y for n in ("titans", "high", "mid", "low", "slowest")]
    assert ys == sorted(ys), "sublayers are drawn in data order"
    cms = lay.boxes["lv-high"].parent
    assert cms.item.kind == "cms" and [c.item.title for c in cms.children] == ["high", "mid", "low", "slowest"]
    # readable sizes: nothing smaller than 10.5 px
    sizes = [float(t.get("font-size")) for t in root.iter(f"{NS}text")]
    assert min(sizes) >= 10.5


def test_nested_cms_levels_are_boxes_within_boxes():
    lay = layout(build_scene(load("zoo")))
    c1, c2, c3 = (lay.boxes[f"lv-{n}"] for n in ("c1", "c2", "c3"))
    assert c2.parent is c1 and c3.parent is c2
    assert c1.x < c2.x < c3.x and c3.right < c2.right < c1.right and c3.bottom < c2.bottom < c1.bottom


def test_generators_and_optimizers_sit_beside_their_level():
    lay = layout(build_scene(load("zoo")))
    gen, mem = lay.boxes["lv-gate_generator_with_a_long_name"], lay.boxes["lv-mem"]
    assert gen in mem.sides and gen.x > mem.right and gen.y == mem.y
    opt, outer = lay.boxes["lv-opt"], lay.boxes["lv-pretrain"]
    assert opt in outer.sides and opt.x > outer.right


def test_edge_styles_by_kind():
    root = ET.fromstring(to_svg(load("zoo")))
    style = {}
    for p in root.iter(f"{NS}path"):
        if "flow" in _classes(p):
            style.setdefault(p.get("data-kind"), set()).add((p.get("stroke-dasharray"), p.get("stroke-width"),
                                                             p.get("stroke")))
    assert all(len(v) == 1 for v in style.values())  # one look per kind
    looks = {k: next(iter(v)) for k, v in style.items()}
    assert looks["data"][0] is None  # solid
    assert looks["grads"][0] and looks["init"][0] and looks["grads"][0] != looks["init"][0]  # dashed vs dotted
    assert float(looks["generates"][1]) > float(looks["data"][1])  # bold
    assert len({v[2] for v in looks.values()}) == len(looks)  # every kind its colour
    legend = [t.text for g in root.iter(f"{NS}g") if "legend" in _classes(g) for t in g.iter(f"{NS}text")]
    assert any("gradient" in t for t in legend) and any("residual" in t for t in legend)
