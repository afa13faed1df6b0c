"""Legibility checks on an SVG written by nlc.viz, from the SVG text alone.

Text boxes are estimated the way the layout budgets them (monospace, 0.6 em per character,
ascent 0.8 em, descent 0.25 em); paths are parsed from their ``M``/``H``/``V``/``L`` commands.
The checks: no two texts overlap; no flow arrow crosses a text; every text of a level box
stays inside the box; level boxes are either disjoint or nested; everything lies inside the
picture.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

NS = "{http://www.w3.org/2000/svg}"


@dataclass(frozen=True)
class Rect:
    x0: float
    y0: float
    x1: float
    y1: float
    what: str = ""

    def overlaps(self, o: Rect, tol: float = 0.5) -> bool:
        return self.x0 < o.x1 - tol and o.x0 < self.x1 - tol and self.y0 < o.y1 - tol and o.y0 < self.y1 - tol

    def contains(self, o: Rect, tol: float = 0.5) -> bool:
        return (self.x0 - tol <= o.x0 and o.x1 <= self.x1 + tol and self.y0 - tol <= o.y0
                and o.y1 <= self.y1 + tol)


def text_rect(el) -> Rect:
    fs = float(el.get("font-size", "12"))
    x, y = float(el.get("x")), float(el.get("y"))
    w = len(el.text or "") * fs * 0.6
    anchor = el.get("text-anchor")
    x0 = x - w if anchor == "end" else x - w / 2 if anchor == "middle" else x
    return Rect(x0, y - 0.8 * fs, x0 + w, y + 0.25 * fs, el.text or "")


def rect_of(el) -> Rect:
    x, y = float(el.get("x")), float(el.get("y"))
    return Rect(x, y, x + float(el.get("width")), y + float(el.get("height")))


def path_segments(d: str) -> list[tuple[float, float, float, float]]:
    segs, x, y = [], 0.0, 0.0
    for cmd, args in re.findall(r"([MHVL])([^MHVL]*)", d):
        nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", args)]
        if cmd == "M":
            x, y = nums[0], nums[1]
            continue
        nx, ny = (nums[0], y) if cmd == "H" else (x, nums[0]) if cmd == "V" else (nums[0], nums[1])
        segs.append((x, y, nx, ny))
        x, y = nx, ny
    return segs


def _seg_hits(seg, r: Rect, shrink: float = 1.0) -> bool:
    x0, y0, x1, y1 = seg
    rx0, ry0, rx1, ry1 = r.x0 + shrink, r.y0 + shrink, r.x1 - shrink, r.y1 - shrink
    for i in range(41):  # sample the segment densely (segments are axis-aligned or short)
        t = i / 40
        px, py = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
        if rx0 < px < rx1 and ry0 < py < ry1:
            return True
    return False


def problems(svg_text: str) -> list[str]:
    root = ET.fromstring(svg_text)
    W, H = float(root.get("width")), float(root.get("height"))
    texts = [(el, text_rect(el)) for el in root.iter(f"{NS}text") if (el.text or "").strip()]
    out = []
    for i, (_, a) in enumerate(texts):
        if a.x0 < 0 or a.y0 < 0 or a.x1 > W or a.y1 > H:
            out.append(f"text outside the picture: {a.what!r}")
        for _, b in texts[i + 1:]:
            if a.overlaps(b):
                out.append(f"texts overlap: {a.what!r} / {b.what!r}")
    for p in root.iter(f"{NS}path"):
        klass = p.get("class", "")
        if not ("flow" in klass.split() or "io-flow" in klass.split()):
            continue
        for seg in path_segments(p.get("d")):
            for el, r in texts:
                if "flow-label" in el.get("class", ""):
                    continue
                if _seg_hits(seg, r):
                    out.append(f"arrow {p.get('id')} crosses text {r.what!r}")
    levels = []
    for g in root.iter(f"{NS}g"):
        if "level" not in g.get("class", "").split():
            continue
        box = rect_of(g.find(f"{NS}rect"))
        levels.append((g.get("data-level"), box))
        for t in g.iter(f"{NS}text"):
            if not box.contains(text_rect(t), tol=0.0):
                out.append(f"text {t.text!r} leaves the box of level {g.get('data-level')}")
    for i, (na, a) in enumerate(levels):
        for nb, b in levels[i + 1:]:
            if a.overlaps(b) and not (a.contains(b) or b.contains(a)):
                out.append(f"level boxes overlap: {na} / {nb}")
    return out
