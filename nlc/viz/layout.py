"""Box-in-box layout of a :class:`~nlc.viz.scene.Scene` (pure Python, no Graphviz).

Every item becomes a :class:`Box` with a position, a size and a *lane*: the x of the vertical
line along which the residual stream enters and leaves it. Items stacked in a column are
aligned on their lanes, so the data arrows of a block run straight down.

NOTE: arrows never cross text. Data arrows cross a container's border only at the lanes of
its first children, so a container's title is wrapped into the space left of those lanes,
and its right-hand notes (the ``× 12`` multiplicity, the outer level's rule) go right of them.
Level boxes hold all their text in a block at the top; a nested level sits below that block,
with room for the arrows from its parent. The outer box keeps a gutter on its left for the
"owns" and "init" buses that fan out to every level it trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import labels
from .scene import Item, Scene
from .svgdoc import CHAR_EM

__all__ = ["CW", "FS", "LH", "SMALL", "TCW", "TFS", "TLH", "Box", "Layout", "layout"]

FS = 12.0  # detail text
TFS = 13.0  # names and titles (bold)
SMALL = 11.0  # tags
LH = 16.0  # detail line height
TLH = 18.0  # title line height
CW = FS * CHAR_EM
TCW = TFS * CHAR_EM

CARD_PAD_X = 10.0
CARD_PAD_T = 6.0
CARD_PAD_B = 8.0
KEY_CHARS = 10  # "objective " — the key column of a level box
NEST_PAD = 12.0  # around a nested level inside its parent's box
NEST_GAP = 30.0  # between a parent's text and the nested level (room for its arrows)
PAD = 12.0  # container padding
GUTTER = 46.0  # the outer box's left gutter (owns / init buses)
TITLE_TOP = 6.0
CHILD_TOP = 18.0  # between a title band and the first child
PAD_B = 14.0
GAP_V = 36.0  # between stacked items (arrows run here)
GAP_ROW = 30.0  # between items side by side
SIDE_GAP = 56.0  # between an item and the items beside it
SHADOW = 6.0  # offset of each copy behind a repeated block
PILL_H = 28.0
MIN_CHARS, MAX_CHARS = 34, 50


@dataclass
class Box:
    """An item placed on the canvas. Coordinates are absolute once :func:`layout` returns."""

    item: Item
    x: float = 0.0
    y: float = 0.0
    w: float = 0.0
    h: float = 0.0
    lane: float = 0.0
    text_h: float = 0.0  # level: height of its text block; container: of its title band
    header: list[str] = field(default_factory=list)  # level: name line(s); container: left title
    lines: list[tuple[str, str]] = field(default_factory=list)  # level: (key, text) rows
    notes: list[str] = field(default_factory=list)  # container: the notes right of the lanes
    tag_inline: bool = True
    shadows: int = 0
    children: list[Box] = field(default_factory=list)
    sides: list[Box] = field(default_factory=list)
    parent: Box | None = None

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def bottom(self) -> float:
        return self.y + self.h

    @property
    def body_w(self) -> float:  # without the copies drawn behind a repeated block
        return self.w - SHADOW * self.shadows

    @property
    def body_h(self) -> float:
        return self.h - SHADOW * self.shadows

    def shift(self, dx: float, dy: float) -> None:
        self.x += dx
        self.y += dy
        self.lane += dx
        for b in self.children + self.sides:
            b.shift(dx, dy)

    def ancestors(self) -> list[Box]:
        out, p = [], self.parent
        while p is not None:
            out.append(p)
            p = p.parent
        return out

    def walk(self):
        yield self
        for b in self.children + self.sides:
            yield from b.walk()


@dataclass
class Layout:
    root: Box
    beside: list[Box]
    width: float
    height: float
    chars: int  # characters per level-box line
    boxes: dict[str, Box]

    def all(self):
        yield from self.root.walk()  # the items beside the root are its sides


def _card_chars(scene: Scene) -> int:
    need = MIN_CHARS
    for it in scene.items():
        if it.kind == "level":
            need = max(need, len(it.title) + len(it.tag) + 3)
            for _, v in it.rows:
                need = max(need, KEY_CHARS + len(v))
    return min(need, MAX_CHARS)


class _Measurer:
    def __init__(self, chars: int) -> None:
        self.chars = chars
        self.card_w = 2 * CARD_PAD_X + chars * CW

    def measure(self, item: Item) -> Box:
        if item.kind == "io":
            w = len(item.title) * CW + 28
            return Box(item, w=w, h=PILL_H, lane=w / 2)
        if item.kind == "level":
            return self._level(item)
        return self._container(item)

    def _level(self, item: Item) -> Box:
        box = Box(item)
        inner = self.chars * CW
        if len(item.title) * TCW + len(item.tag) * SMALL * CHAR_EM + 14 <= inner:
            header_h = TLH + 2
        else:
            box.tag_inline = False
            header_h = TLH + LH
        for key, value in item.rows:
            for i, line in enumerate(labels.wrap(value, self.chars - KEY_CHARS)):
                box.lines.append((key if i == 0 else "", line))
        box.text_h = CARD_PAD_T + header_h + LH * len(box.lines) + CARD_PAD_B
        box.w, box.h, box.lane = self.card_w, box.text_h, self.card_w / 2
        if item.children:
            cw, ch, clane, placed = self._column(item.children, box)
            box.w = max(box.w, cw + 2 * NEST_PAD)
            dx = (box.w - cw) / 2
            for b in placed:
                b.shift(dx, box.text_h + NEST_GAP)
            box.lane = dx + clane
            box.h = box.text_h + NEST_GAP + ch + NEST_PAD
        return box

    def _unit(self, item: Item, parent: Box) -> tuple[Box, list[Box], float, float]:
        """An item and the items beside it; returns (main, sides, width, height)."""
        main = self.measure(item)
        main.parent = parent
        sides = []
        y = 0.0
        for s in item.sides:
            b = self.measure(s)
            b.parent = parent
            b.shift(main.w + SIDE_GAP, y)
            y += b.h + 16
            sides.append(b)
        main.sides = sides
        w = main.w + (SIDE_GAP + max(b.w for b in sides) if sides else 0.0)
        h = max(main.h, y - 16 if sides else 0.0)
        return main, sides, w, h

    def _column(self, items: list[Item], parent: Box) -> tuple[float, float, float, list[Box]]:
        units = [self._unit(it, parent) for it in items]
        lane = max((u[0].lane for u in units), default=0.0)
        y, w, placed = 0.0, 0.0, []
        for main, _sides, uw, uh in units:
            dx = lane - main.lane
            main.shift(dx, y)  # moves the items beside it too
            placed.append(main)
            parent.children.append(main)
            w = max(w, dx + uw)
            y += uh + GAP_V
        return w, max(y - GAP_V, 0.0), lane, placed

    def _row(self, items: list[Item], parent: Box) -> tuple[float, float, list[float]]:
        x, h, lanes = 0.0, 0.0, []
        for it in items:
            main, _sides, uw, uh = self._unit(it, parent)
            main.shift(x, 0)
            parent.children.append(main)
            lanes.append(main.lane)
            x += uw + GAP_ROW
            h = max(h, uh)
        return max(x - GAP_ROW, 0.0), h, lanes

    def _container(self, item: Item) -> Box:
        box = Box(item)
        box.shadows = 2 if item.repeat > 1 else 0
        if item.arrange == "row":
            cw, ch, lanes = self._row(item.children, box)
            lane = (lanes[0] + lanes[-1]) / 2 if lanes else cw / 2
        else:
            cw, ch, lane, _ = self._column(item.children, box)
            lanes = [lane]
        pad_l = GUTTER if item.kind == "outer" else PAD
        lanes = [pad_l + v for v in lanes]
        # title left of the first lane, notes right of the last one
        if item.kind == "outer":
            left = [item.title, item.tag]
            right = list(item.notes)
        else:
            left = [item.title, *item.notes]
            right = [item.badge] if item.badge else []
        room = max(8, int((min(lanes) - 12 - PAD) / CW)) if lanes else 30
        box.header = [w for i, t in enumerate(left) for w in labels.wrap(t, room if i else int(room / 1.09))]
        note_chars = max((len(t) for t in right), default=0)
        box.notes = right
        right_w = (max(lanes) + 14 + note_chars * (TCW if item.badge else CW) + PAD) if right else 0.0
        left_h = TLH + LH * (len(box.header) - 1)
        box.text_h = TITLE_TOP + max(left_h, (TLH if item.badge else LH) * len(right)) + 4
        top = box.text_h + CHILD_TOP
        for b in box.children:
            b.shift(pad_l, top)
        body_w = max(pad_l + cw + PAD, right_w, 2 * PAD + len(item.title) * TCW)
        box.w = body_w + SHADOW * box.shadows
        box.h = top + ch + PAD_B + SHADOW * box.shadows
        box.lane = pad_l + lane
        return box


def layout(scene: Scene, *, margin: float = 20.0, top: float = 60.0) -> Layout:
    """Place every item of ``scene``; the root's top-left corner is at (margin, top)."""
    chars = _card_chars(scene)
    m = _Measurer(chars)
    root = m.measure(scene.root)
    root.shift(margin, top)
    beside = []
    y = root.y + root.text_h + CHILD_TOP
    for it in scene.beside:
        b = m.measure(it)
        b.shift(root.right + SIDE_GAP + 24, y)
        y += b.h + 16
        beside.append(b)
    root.sides = beside
    for b in beside:
        b.parent = None
    boxes = {}
    for b in root.walk():
        boxes[b.item.id] = b
    width = max([root.right] + [b.right for b in beside]) + margin
    height = max([root.bottom] + [b.bottom for b in beside])
    return Layout(root, beside, math.ceil(width), math.ceil(height), chars, boxes)
