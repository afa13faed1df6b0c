"""The scene: what a level diagram contains, before any format decides how to draw it.

A :class:`Scene` is a tree of :class:`Item` boxes nested by update frequency, plus the flow
edges between levels:

* the outer (pre-training) level is the outermost box; it holds the token embedding, the
  blocks and the head, in data order;
* a block holds its residual sublayers in order and is drawn once, with its multiplicity
  (``× 12``) written on it;
* a CMS group holds its levels: a column for ``sequential``, a row for ``independent``, and for
  ``nested`` each level inside the previous (slower) one;
* levels that only generate values for another level (η/α generators) sit beside that level;
* optimizer levels sit beside the level whose gradients they read (usually the outer box).

Flow edges are the level graph's edges (:func:`nlc.verify.graph.build_graph`), one per
``(source, target, kind)``; the scene adds ``io`` edges for the token stream entering from the
embedding and leaving through the head. Ids are derived from level names and positions in the
program, never from dictionary or set order, so every output is byte-stable.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .. import ir
from ..verify.graph import build_graph
from . import labels
from .style import FLOW_ORDER

__all__ = ["Item", "Scene", "SceneEdge", "build_scene"]


@dataclass
class Item:
    """One box of the picture.

    ``kind``: ``outer`` (the pre-training level, a container), ``block``, ``cms``, ``level``
    (a level box; it contains the next level of a nested CMS), or ``io`` (embedding / head).
    ``arrange`` lays out ``children``: ``column`` (top to bottom) or ``row`` (side by side).
    ``sides`` are items drawn to the right of this one (generators, optimizers).
    """

    id: str
    kind: str
    title: str
    tag: str = ""
    level: ir.Level | None = None
    rows: list[tuple[str, str]] = field(default_factory=list)  # level boxes: (key, value)
    notes: list[str] = field(default_factory=list)  # containers: detail lines
    badge: str = ""  # containers: multiplicity, variant
    children: list[Item] = field(default_factory=list)
    arrange: str = "column"
    sides: list[Item] = field(default_factory=list)
    repeat: int = 1

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()
        for s in self.sides:
            yield from s.walk()


@dataclass(frozen=True)
class SceneEdge:
    """A drawn flow: ``kind`` is an :class:`~nlc.ir.EdgeKind` value, or ``io``."""

    id: str
    src: str  # item id
    dst: str  # item id
    kind: str
    label: str = ""
    src_level: str = ""
    dst_level: str = ""

    @property
    def is_flow(self) -> bool:
        return self.kind != "io"

    def describe(self) -> str:
        a, b = self.src_level or self.src, self.dst_level or self.dst
        return f"{self.kind}: {a} → {b}" + (f" ({self.label})" if self.label else "")


@dataclass
class Scene:
    program: ir.Program
    root: Item
    beside: list[Item]  # top-level items to the right of the root (optimizers of the outer level)
    edges: list[SceneEdge]

    def items(self):
        yield from self.root.walk()
        for b in self.beside:
            yield from b.walk()

    @property
    def flows(self) -> list[SceneEdge]:
        return [e for e in self.edges if e.is_flow]


def level_id(name: str) -> str:
    return f"lv-{name}"


def _level_item(program: ir.Program, lv: ir.Level) -> Item:
    from .style import kind_style

    tag = kind_style(lv).tag
    return Item(level_id(lv.name), "level", lv.name, tag=tag, level=lv, rows=labels.card_rows(program, lv))


def _generated(level: ir.Level, generator: str) -> list[str]:
    """The bindings of ``level`` whose flow calls ``generator`` (what it generates)."""
    out = []
    for b in level.bindings:
        if any(f.kind == "call" and f.name == generator for f in b.flow.walk()):
            out.append(b.name)
    return out


def build_scene(program: ir.Program) -> Scene:
    """Arrange a program's levels into nested boxes and collect its flows."""
    placed: dict[str, Item] = {}

    def level_item(name: str) -> Item | None:
        lv = program.level(name)
        if lv is None or name in placed:
            return None
        item = _level_item(program, lv)
        placed[name] = item
        return item

    outer_lv = program.level(program.outer) if program.outer else None
    if outer_lv is not None:
        root = Item(level_id(outer_lv.name), "outer", outer_lv.name, tag="outer level", level=outer_lv,
                    notes=labels.outer_rows(program, outer_lv))
        placed[outer_lv.name] = root
    else:
        root = Item("model", "outer", program.name, tag="model")

    first_heads: list[str] = []
    last_tails: list[str] = []
    blocks: list[Item] = []
    for bi, blk in enumerate(program.blocks):
        box = Item(f"block-{bi}", "block", f"block {blk.name}", notes=[f"norm {blk.norm}"],
                   badge=f"× {blk.repeat}" if blk.repeat > 1 else "", repeat=blk.repeat)
        for si, sub in enumerate(blk.sublayers):
            if sub.kind == "level":
                item = level_item(sub.name)
                if item is None:
                    continue
                box.children.append(item)
                heads = tails = [sub.name]
            else:
                grp = program.cms_group(sub.name)
                if grp is None:
                    continue
                cbox = Item(f"cms-{bi}-{si}", "cms", f"cms {grp.name}", notes=[grp.variant]
                            + ([f"agg {grp.agg}"] if grp.variant == "independent" else []))
                items = [it for it in (level_item(n) for n in grp.levels) if it is not None]
                if not items:
                    continue
                if grp.variant == "nested":
                    for parent, child in itertools.pairwise(items):
                        parent.children.append(child)
                    cbox.children.append(items[0])
                    heads, tails = [items[0].title], [items[-1].title]
                elif grp.variant == "independent":
                    cbox.arrange = "row"
                    cbox.children.extend(items)
                    heads = tails = [it.title for it in items]
                else:
                    cbox.children.extend(items)
                    heads, tails = [items[0].title], [items[-1].title]
                box.children.append(cbox)
            if not first_heads:
                first_heads = heads
            last_tails = tails
        blocks.append(box)

    # generators beside the first level they generate for; optimizers beside their gradient source
    for blk, box in zip(program.blocks, blocks):
        for gen in blk.generators:
            item = level_item(gen)
            if item is None:
                continue
            users = [e.dst for e in program.edges if e.kind is ir.EdgeKind.GENERATES and e.src == gen]
            host = next((placed[u] for u in users if u in placed and u != gen), None)
            (host.sides if host is not None else box.children).append(item)
    beside: list[Item] = []
    for lv in program.levels:
        if lv.kind is ir.LevelKind.OPTIMIZER:
            item = level_item(lv.name)
            if item is None:
                continue
            host = placed.get(lv.context_of or "")
            if host is None or host is root:
                beside.append(item)
            else:
                host.sides.append(item)

    embed = Item("io-embed", "io", f"tokens → embed {program.vocab}→{program.d_model}")
    head = Item("io-head", "io", f"norm {program.final_norm} · head {program.head} → "
                f"{(outer_lv.objective if outer_lv and outer_lv.objective else 'logits')}")
    root.children = [embed, *blocks, head]
    # any other level (a model-scope level that is neither outer nor optimizer) after the head
    for lv in program.levels:
        item = level_item(lv.name)
        if item is not None:
            root.children.append(item)

    edges = [SceneEdge(f"io-embed-{h}", "io-embed", level_id(h), "io", "tokens", "embed", h) for h in first_heads]
    edges += [SceneEdge(f"io-{t}-head", level_id(t), "io-head", "io", "stream", t, "head") for t in last_tails]
    g = build_graph(program)
    order = {lv.name: i for i, lv in enumerate(program.levels)}
    flows = sorted(g.edges(keys=True, data=True),
                   key=lambda e: (FLOW_ORDER.index(e[2]) if e[2] in FLOW_ORDER else 99,
                                  order.get(e[0], 0), order.get(e[1], 0)))
    for u, v, key, data in flows:
        if u not in placed or v not in placed:
            continue
        label = data.get("label") or ""
        if key == "generates":
            label = ", ".join(_generated(program.level(v), u)) or label
        edges.append(SceneEdge(f"flow-{key}-{u}-{v}", placed[u].id, placed[v].id, key, label, u, v))
    return Scene(program, root, beside, edges)
