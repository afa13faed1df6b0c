"""Graphviz DOT text of the level diagram (no Graphviz needed to write it).

Nesting is expressed with ``cluster_N`` subgraphs: the outer level's cluster holds the blocks,
a block's cluster its sublayers, a CMS group's cluster its levels, and a nested CMS level's
cluster the level nested in it. Cluster ids are generated (``cluster_0``, ``cluster_1``, … in
document order), never taken from spec names, so a name can never decide what is a cluster
(Graphviz treats any subgraph whose id starts with ``cluster`` as a box). Node ids are
``lv_<level>`` and ``io_embed``/``io_head``; every id and label is a quoted DOT string with
``\\`` and ``"`` escaped, and labels use only ``box``/``note`` shapes (never ``record``, where
``{ } | < >`` would be syntax).

Rendering the text needs the ``dot`` binary (``dot -Tsvg in.dot``); nlc never requires it.
"""

from __future__ import annotations

import html

from . import labels
from .scene import Item, Scene, build_scene
from .style import CONTAINER_STYLES, FLOW_ORDER, FLOW_STYLES, IO_STYLE, KIND_STYLES

__all__ = ["quote", "to_dot"]

_FONT = "Helvetica"
_MONO = "monospace"
_HEADS = {"arrow": "normal", "open": "empty", "diamond": "diamond", "dot": "dot"}
_WRAP = 44


def quote(text: str) -> str:
    """A DOT double-quoted string; newlines become left-justified line breaks (``\\l``)."""
    body = str(text).replace("\\", "\\\\").replace('"', '\\"')
    if "\n" in body:
        body = body.replace("\n", "\\l") + "\\l"
    return f'"{body}"'


def _node_id(item: Item) -> str:
    if item.level is not None:
        return quote(f"lv_{item.level.name}")
    return quote(item.id.replace("-", "_"))


def _level_label(item: Item) -> str:
    lines = [f"{item.title}  [{item.tag}]"]
    for key, value in item.rows:
        wrapped = labels.wrap(value, _WRAP - 10)
        lines.append(f"{key:<9} {wrapped[0]}")
        lines.extend(" " * 10 + w for w in wrapped[1:])
    return "\n".join(lines)


def _attrs(**kw) -> str:
    return "[" + ", ".join(f"{k}={v}" for k, v in kw.items()) + "]"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.clusters = 0

    def emit(self, depth: int, text: str) -> None:
        self.lines.append("  " * depth + text)

    def cluster(self, depth: int, label: str, fill: str, stroke: str, style: str = "rounded,filled") -> None:
        self.emit(depth, f"subgraph cluster_{self.clusters} {{")
        self.clusters += 1
        self.emit(depth + 1, f"label={quote(label)}; labeljust=l; style={quote(style)}; "
                  f"fillcolor={quote(fill)}; color={quote(stroke)}; fontname={quote(_FONT)}; fontsize=11;")

    def level_node(self, depth: int, item: Item) -> None:
        ks = KIND_STYLES[item.level.kind.value]
        self.emit(depth, f"{_node_id(item)} {_attrs(label=quote(_level_label(item)), fillcolor=quote(ks.fill), color=quote(ks.stroke), fontname=quote(_MONO))};")

    def item(self, depth: int, item: Item) -> None:
        if item.kind == "io":
            fill, stroke = CONTAINER_STYLES["io"]
            self.emit(depth, f"{_node_id(item)} {_attrs(label=quote(item.title), shape='box', style=quote('rounded,filled'), fillcolor=quote(fill), color=quote(stroke))};")
        elif item.kind == "level" and not item.children:
            self.level_node(depth, item)
        elif item.kind == "level":  # a nested CMS level: a cluster holding its box and the next level
            ks = KIND_STYLES[item.level.kind.value]
            self.cluster(depth, f"{item.title} (nests {', '.join(c.title for c in item.children)})",
                         "#ffffff", ks.stroke, "rounded")
            self.level_node(depth + 1, item)
            for c in item.children:
                self.item(depth + 1, c)
            self.emit(depth, "}")
        else:
            title = item.title + (f"  {item.badge}" if item.badge else "")
            if item.kind == "outer":
                fill, stroke = KIND_STYLES["outer"].fill, KIND_STYLES["outer"].stroke
                label = f"{title} · {item.tag}"
            else:
                fill, stroke = CONTAINER_STYLES[item.kind]
                label = " · ".join([title, *item.notes])
            self.cluster(depth, label, fill, stroke)
            if item.kind == "outer" and item.level is not None:
                text = "\n".join([f"{item.title}  [outer level]", *item.notes])
                self.emit(depth + 1, f"{_node_id(item)} {_attrs(label=quote(text), shape='note', style='filled', fillcolor=quote('#ffffff'), color=quote(stroke), fontname=quote(_MONO))};")
            for c in item.children:
                self.item(depth + 1, c)
            self.emit(depth, "}")
        for s in item.sides:
            self.item(depth, s)


def _edge(scene: Scene, e, ids: dict[str, str]) -> str:
    style = FLOW_STYLES.get(e.kind, IO_STYLE)
    kw = {"color": quote(style.color), "style": style.dot_style, "penwidth": f"{style.width:g}",
          "arrowhead": _HEADS[style.head], "id": quote(e.id)}
    if e.label and e.kind not in ("data", "io", "owns") and e.label != "meta-learned init":
        kw["label"] = quote(e.label)
        kw["fontcolor"] = quote(style.color)
    elif e.kind == "owns" and e.label != "params":
        kw["label"] = quote(e.label)
    return f"{ids[e.src]} -> {ids[e.dst]} {_attrs(**kw)};"


_SAMPLES = {"solid": "────▶", "dashed": "─ ─ ▶", "dotted": "·····▶", "bold": "━━━━▶"}


def _legend(w: _Writer, kinds: list[str]) -> None:
    """One plain-text node: a sample line per flow kind drawn in the picture, in its colour."""
    rows = []
    for kind in kinds:
        s = FLOW_STYLES[kind]
        sample = "────◆" if s.head == "diamond" else "────●" if s.head == "dot" else \
            "────▷" if s.head == "open" else _SAMPLES[s.dot_style]
        rows.append(f'<tr><td align="left"><font color="{s.color}">{sample}</font></td>'
                    f'<td align="left">{html.escape(s.legend)}</td></tr>')
    label = f'<<table border="0" cellspacing="2"><tr><td colspan="2" align="left"><b>legend</b></td></tr>{"".join(rows)}</table>>'
    w.emit(1, f'"legend" [shape=box, style="rounded", color="#cbd5e1", fontname={quote(_MONO)}, fontsize=9, '
           f"label={label}];")


def to_dot(program_or_scene, *, legend: bool = True) -> str:
    """The DOT text of a program's level diagram (a string ending in a newline)."""
    scene = program_or_scene if isinstance(program_or_scene, Scene) else build_scene(program_or_scene)
    w = _Writer()
    w.emit(0, f"// {scene.program.name}: level graph, nested by update frequency (nlc viz)")
    w.emit(0, f"digraph {quote(scene.program.name)} {{")
    w.emit(1, f"graph [compound=true, rankdir=TB, newrank=true, nodesep=0.35, ranksep=0.45, fontname={quote(_FONT)}];")
    w.emit(1, f"node [shape=box, style={quote('rounded,filled')}, fontname={quote(_FONT)}, fontsize=10, margin={quote('0.12,0.06')}];")
    w.emit(1, f"edge [fontname={quote(_FONT)}, fontsize=9, arrowsize=0.7];")
    w.item(1, scene.root)
    for b in scene.beside:
        w.item(1, b)
    ids = {it.id: _node_id(it) for it in scene.items()}
    for e in scene.edges:
        w.emit(1, _edge(scene, e, ids))
    used = {e.kind for e in scene.edges}
    if legend and used:
        _legend(w, [k for k in reversed(FLOW_ORDER) if k in used])
    w.emit(0, "}")
    return "\n".join(w.lines) + "\n"
