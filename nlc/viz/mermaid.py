"""Mermaid flowchart text of the level diagram (renders in Markdown on GitHub and elsewhere).

Nesting is expressed with ``subgraph`` blocks (generated ids ``sg0``, ``sg1``, …); levels are
nodes ``lv_<name>`` (the prefix keeps Mermaid keywords such as ``end`` out of ids). Labels
are double-quoted with ``"``, ``<``, ``>`` and ``&`` written as Mermaid entities (``#quot;``,
``#lt;``, ``#gt;``, ``#amp;``) and lines joined with ``<br/>``.

Flow kinds map to Mermaid links (``-->`` data, ``-.->`` grads and init, ``==>`` generates,
``--o`` nests) and each link gets a ``linkStyle`` with the kind's colour and dash pattern, so
grads (dashed) and init (dotted) stay distinct. Mermaid often ignores a subgraph's own
``direction`` (mermaid issue #6785), so an independent CMS may be drawn as a column.
"""

from __future__ import annotations

from .scene import Item, Scene, build_scene
from .style import CONTAINER_STYLES, FLOW_STYLES, IO_STYLE, KIND_STYLES

__all__ = ["mm_text", "to_mermaid"]

_SUBGRAPH_STYLES = {"outer": (KIND_STYLES["outer"].fill, KIND_STYLES["outer"].stroke),
                   "block": CONTAINER_STYLES["block"], "cms": CONTAINER_STYLES["cms"]}
_LINKS = {"data": "-->", "io": "-->", "grads": "-.->", "init": "-.->", "generates": "==>",
          "optimizes": "-->", "owns": "-->", "nests": "--o"}


def mm_text(text: str) -> str:
    """Escape text for a double-quoted Mermaid label."""
    out = str(text).replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
    return out.replace("\n", "<br/>")


def _id(item: Item) -> str:
    return f"lv_{item.level.name}" if item.level is not None else item.id.replace("-", "_")


def _level_label(item: Item) -> str:
    lines = [f"<b>{mm_text(item.title)}</b> · {mm_text(item.tag)}"]
    for key, value in item.rows:
        lines.append(f"{mm_text(key)}: {mm_text(value)}")
    return "<br/>".join(lines)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.subgraphs = 0
        self.classes: dict[str, list[str]] = {}
        self.styles: list[str] = []

    def emit(self, depth: int, text: str) -> None:
        self.lines.append("  " * depth + text)

    def node(self, depth: int, item: Item) -> None:
        if item.kind == "io":
            self.emit(depth, f'{_id(item)}(["{mm_text(item.title)}"])')
            self.classes.setdefault("io", []).append(_id(item))
            return
        self.emit(depth, f'{_id(item)}["{_level_label(item)}"]')
        self.classes.setdefault(item.level.kind.value, []).append(_id(item))

    def item(self, depth: int, item: Item) -> None:
        if item.kind in ("io", "level") and not item.children:
            self.node(depth, item)
        elif item.kind == "level":  # a nested CMS level: a subgraph with its node and the next level
            self.subgraph(depth, f"{item.title} · nests {', '.join(c.title for c in item.children)}")
            self.node(depth + 1, item)
            for c in item.children:
                self.item(depth + 1, c)
            self.emit(depth, "end")
        else:
            if item.kind == "outer":
                title = f"{item.title} · {item.tag}"
            else:
                title = " · ".join([item.title + (f" {item.badge}" if item.badge else ""), *item.notes])
            self.subgraph(depth, title, item.kind)
            if item.arrange == "row":
                self.emit(depth + 1, "direction LR")
            if item.kind == "outer" and item.level is not None:
                text = "<br/>".join([f"<b>{mm_text(item.title)}</b> · outer level",
                                     *(mm_text(n) for n in item.notes)])
                self.emit(depth + 1, f'{_id(item)}["{text}"]')
                self.classes.setdefault("outer", []).append(_id(item))
            for c in item.children:
                self.item(depth + 1, c)
            self.emit(depth, "end")
        for s in item.sides:
            self.item(depth, s)

    def subgraph(self, depth: int, title: str, kind: str = "level") -> None:
        sid = f"sg{self.subgraphs}"
        self.emit(depth, f'subgraph {sid}["{mm_text(title)}"]')
        self.subgraphs += 1
        fill, stroke = _SUBGRAPH_STYLES.get(kind, ("#ffffff", "#0369a1"))
        self.styles.append(f"style {sid} fill:{fill},stroke:{stroke}")


def to_mermaid(program_or_scene) -> str:
    """The Mermaid text of a program's level diagram (a string ending in a newline)."""
    scene = program_or_scene if isinstance(program_or_scene, Scene) else build_scene(program_or_scene)
    w = _Writer()
    w.emit(0, f"%% {scene.program.name}: level graph, nested by update frequency (nlc viz)")
    w.emit(0, "flowchart TB")
    w.item(1, scene.root)
    for b in scene.beside:
        w.item(1, b)
    ids = {it.id: _id(it) for it in scene.items()}
    styles = []
    for i, e in enumerate(scene.edges):
        link = _LINKS.get(e.kind, "-->")
        show = e.label and e.kind not in ("data", "io", "owns", "init")
        label = f'|"{mm_text(e.label)}"|' if show else ""
        w.emit(1, f"{ids[e.src]} {link}{label} {ids[e.dst]}")
        st = FLOW_STYLES.get(e.kind, IO_STYLE)
        dash = f",stroke-dasharray:{st.dash}" if st.dash else ""
        styles.append(f"linkStyle {i} stroke:{st.color},stroke-width:{st.width:g}px{dash}")
    for line in styles + w.styles:
        w.emit(1, line)
    for kind, nodes in w.classes.items():
        if kind == "io":
            fill, stroke = CONTAINER_STYLES["io"]
        else:
            fill, stroke = KIND_STYLES[kind].fill, KIND_STYLES[kind].stroke
        w.emit(1, f"classDef {kind.replace('_', '')} fill:{fill},stroke:{stroke},color:#0f172a,text-align:left")
        w.emit(1, f"class {','.join(nodes)} {kind.replace('_', '')}")
    return "\n".join(w.lines) + "\n"

