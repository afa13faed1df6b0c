"""DOT and Mermaid text: golden files, nesting, escaping, one link per flow edge."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from nlc.verify.graph import build_graph
from nlc.viz import render, to_dot, to_mermaid
from nlc.viz.dot import quote
from nlc.viz.mermaid import mm_text

from .conftest import ROOT, load

GOLDEN_EXAMPLES = ("hope", "cms_nested", "m3")
ALL = sorted(p.stem for p in (ROOT / "examples").glob("*.nl")) + ["hope_cms4", "zoo"]


@pytest.mark.parametrize("name", GOLDEN_EXAMPLES)
def test_dot_golden(name, golden):
    golden(f"{name}.dot", to_dot(load(name)))


@pytest.mark.parametrize("name", GOLDEN_EXAMPLES)
def test_mermaid_golden(name, golden):
    golden(f"{name}.mmd", to_mermaid(load(name)))


@pytest.mark.parametrize("name", ALL)
def test_one_link_per_flow_edge(name):
    prog = load(name)
    n_flows = build_graph(prog).number_of_edges()
    dot = to_dot(prog)
    assert len(re.findall(r'id="flow-', dot)) == n_flows
    mmd = to_mermaid(prog)
    links = [ln for ln in mmd.splitlines() if re.match(r"\s+lv_\w+ (-->|-\.->|==>|--o)\S* lv_\w+$", ln)]
    assert len(links) == n_flows
    assert mmd.count("linkStyle") == len([ln for ln in mmd.splitlines() if re.search(r" (-->|-\.->|==>|--o)", ln)])


@pytest.mark.parametrize("name", ALL)
def test_text_outputs_are_deterministic(name):
    from nlc.pipeline import check_file

    from .conftest import spec_path

    again = check_file(spec_path(name)).program  # a fresh program, not the cached one
    assert to_dot(again) == to_dot(load(name))
    assert to_mermaid(again) == to_mermaid(load(name))


def test_dot_clusters_nest_like_the_levels():
    dot = to_dot(load("cms_nested"))
    # outer level > block > cms group > nested level `outer` holding level `inner`
    stack, where = [], {}
    for line in dot.splitlines():
        if line.strip().startswith("subgraph cluster_"):
            label = re.search(r'label="([^"]*)"', dot[dot.index(line):]).group(1)
            stack.append(label)
        elif line.strip() == "}" and stack:
            stack.pop()
        m = re.match(r'\s+"(lv_\w+)" \[', line)
        if m:
            where[m.group(1)] = list(stack)
    assert [s.split(" ")[0] for s in where["lv_inner"][:4]] == ["pretrain", "block", "cms", "outer"]
    assert len(where["lv_inner"]) == len(where["lv_outer"]) == 4
    assert len(where["lv_attn"]) == 2  # pretrain > block
    assert "× 2" in where["lv_attn"][1]
    # cluster ids are generated, never spec names
    assert set(re.findall(r"subgraph (\S+)", dot)) <= {f"cluster_{i}" for i in range(20)}


def test_dot_and_mermaid_escaping():
    assert quote('a "b" \\ c') == '"a \\"b\\" \\\\ c"'
    assert quote("one\ntwo") == '"one\\ltwo\\l"'
    assert mm_text('x < y > "z" & w') == "x #lt; y #gt; #quot;z#quot; #amp; w"
    # flows with `->` and `|` survive in labels of every example
    for name in ALL:
        dot = to_dot(load(name))
        for label in re.findall(r'label="((?:[^"\\]|\\.)*)"', dot):
            assert '"' not in label.replace('\\"', "")


def test_mermaid_ids_are_prefixed():
    mmd = to_mermaid(load("hope"))
    node_ids = re.findall(r"^\s+(\w+)[\[\(]", mmd, re.MULTILINE)
    assert node_ids and all(i.startswith(("lv_", "io_")) for i in node_ids)
    lines = [ln.strip() for ln in mmd.splitlines()]
    assert "subgraph sg0" in mmd
    assert sum(ln.startswith("subgraph ") for ln in lines) == lines.count("end")


def test_markdown_table_has_a_row_per_level():
    md = render(load("hope_cms4"), "md")
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| #")]
    assert len(rows) == len(load("hope_cms4").levels)
    assert "\\|" in md  # flows written with `|` are escaped


@pytest.mark.skipif(not shutil.which("dot"), reason="Graphviz `dot` is not installed")
@pytest.mark.parametrize("name", ["hope", "zoo"])
def test_graphviz_accepts_the_dot_text(name):
    res = subprocess.run(["dot", "-Tsvg"], input=to_dot(load(name)).encode(), capture_output=True, timeout=60, check=False)
    assert res.returncode == 0 and res.stderr == b"", res.stderr.decode()
    assert b"<svg" in res.stdout
