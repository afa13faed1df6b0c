"""The level diagram as a standalone SVG (pure Python): boxes within boxes, flows as arrows.

Structure of the output, which tests and the HTML report rely on:

* every level is a ``<g class="level level-KIND" data-level="NAME">`` holding its box and text;
  containers are ``<g class="box box-outer|box-block|box-cms">``;
* every flow edge of the level graph is exactly one ``<path class="flow flow-KIND">`` with
  ``data-src``/``data-dst`` level names and a ``<title>`` tooltip; the token stream in and out
  of the model is drawn with ``class="io-flow"``;
* all ids start with ``id_prefix`` so that two pictures can share one HTML page.

Routing (see :mod:`nlc.viz.layout` for why it never crosses text): data arrows run down the
lanes with one horizontal jog in the gap above the box they enter; arrows between a level and
the level nested in it run straight down from its text; generators and optimizers, drawn
beside the level they serve, get horizontal arrows; the outer level's ``owns`` and ``init``
flows run down two buses in its left gutter and branch into each level from the left (or from
above, when another box is in the way).
"""

from __future__ import annotations

from collections import defaultdict

from .layout import (
    CARD_PAD_T,
    CARD_PAD_X,
    CW,
    FS,
    KEY_CHARS,
    LH,
    SHADOW,
    SMALL,
    TFS,
    TITLE_TOP,
    TLH,
    Box,
    layout,
)
from .scene import Scene, SceneEdge, build_scene
from .style import CONTAINER_STYLES, FLOW_ORDER, FLOW_STYLES, IO_STYLE, KIND_STYLES
from .svgdoc import el, esc, fmt, markers, svg_open, text_width

__all__ = ["route", "to_svg"]

INK = "#0f172a"
MUTED = "#64748b"
BUS = {"owns": 16.0, "init": 30.0}  # x of the outer level's buses, from its left border
BRANCH = {"owns": 13.0, "init": 25.0}  # y of a branch below a level box's top


def _text(x, y, s, *, size=FS, weight=None, fill=INK, anchor=None, klass=None) -> str:
    return el("text", esc(s), x=float(x), y=float(y), font_size=fmt(size), font_weight=weight,
              fill=fill, text_anchor=anchor, class_=klass)


# ---- boxes -----------------------------------------------------------------------------------


def _level_svg(b: Box, p: str) -> str:
    lv = b.item.level
    ks = KIND_STYLES[lv.kind.value]
    out = [el("title", esc(f"level {lv.name} · {ks.tag}"))]
    out.append(el("rect", x=b.x, y=b.y, width=b.w, height=b.h, rx=8, fill=ks.fill, stroke=ks.stroke,
                  stroke_width="1.3"))
    x0 = b.x + CARD_PAD_X
    y = b.y + CARD_PAD_T + 13
    out.append(_text(x0, y, lv.name, size=TFS, weight="bold"))
    if b.tag_inline:
        out.append(_text(b.right - CARD_PAD_X, y, ks.tag, size=SMALL, fill=ks.ink, anchor="end", klass="tag"))
    else:
        y += LH
        out.append(_text(x0, y, ks.tag, size=SMALL, fill=ks.ink, klass="tag"))
    y += TLH + 2 - 13 + 11
    for key, line in b.lines:
        if key:
            out.append(_text(x0, y, key, fill=MUTED))
        out.append(_text(x0 + KEY_CHARS * CW, y, line))
        y += LH
    return el("g", "".join(out), class_=f"level level-{lv.kind.value}", id=f"{p}{b.item.id}", data_level=lv.name)


def _container_svg(b: Box, p: str) -> str:
    it = b.item
    if it.kind == "outer":
        fill, stroke = KIND_STYLES["outer"].fill, KIND_STYLES["outer"].stroke
    else:
        fill, stroke = CONTAINER_STYLES[it.kind]
    out = [el("title", esc(" · ".join([it.title, *it.notes, it.badge]).strip(" ·")))]
    for k in range(b.shadows, 0, -1):  # copies behind a repeated block
        out.append(el("rect", x=b.x + SHADOW * k, y=b.y + SHADOW * k, width=b.body_w, height=b.body_h, rx=10,
                      fill="#ffffff", stroke=stroke, stroke_width="1", class_="repeat-copy"))
    dash = "5 3" if it.kind == "cms" else None
    out.append(el("rect", x=b.x, y=b.y, width=b.body_w, height=b.body_h, rx=10, fill=fill, stroke=stroke,
                  stroke_width="1.6" if it.kind == "outer" else "1.3", stroke_dasharray=dash))
    y = b.y + TITLE_TOP + 13
    x0 = b.x + 12
    for i, line in enumerate(b.header):
        bold = i == 0 or (it.kind == "outer" and line == it.title)
        out.append(_text(x0, y, line, size=TFS if bold else FS, weight="bold" if bold else None,
                         fill=INK if bold else MUTED))
        y += TLH if i == 0 else LH
    if b.notes:
        xr = b.x + b.body_w - 12
        yr = b.y + TITLE_TOP + 13
        for line in b.notes:
            badge = bool(it.badge) and line == it.badge
            out.append(_text(xr, yr, line, size=TFS if badge else FS, weight="bold" if badge else None,
                             anchor="end", fill=INK if badge else MUTED, klass="badge" if badge else None))
            yr += TLH if badge else LH
    data = {"data_level": it.level.name} if it.level is not None else {}
    return el("g", "".join(out), class_=f"box box-{it.kind}", id=f"{p}{it.id}", **data)


def _io_svg(b: Box, p: str) -> str:
    fill, stroke = CONTAINER_STYLES["io"]
    body = (el("rect", x=b.x, y=b.y, width=b.w, height=b.h, rx=b.h / 2, fill=fill, stroke=stroke)
            + _text(b.x + b.w / 2, b.y + b.h / 2 + 4, b.item.title, anchor="middle"))
    return el("g", body, class_="io", id=f"{p}{b.item.id}")


# ---- edges -----------------------------------------------------------------------------------


def _d(points: list[tuple[float, float]]) -> str:
    (x, y), rest = points[0], points[1:]
    parts = [f"M{fmt(x)},{fmt(y)}"]
    for nx, ny in rest:
        if nx == x:
            parts.append(f"V{fmt(ny)}")
        elif ny == y:
            parts.append(f"H{fmt(nx)}")
        else:
            parts.append(f"L{fmt(nx)},{fmt(ny)}")
        x, y = nx, ny
    return "".join(parts)


def _hits(b: Box, x1: float, x2: float, y: float) -> bool:
    lo, hi = min(x1, x2), max(x1, x2)
    return b.y <= y <= b.y + b.h and lo < b.right and hi > b.x


def _blocked(lay, target: Box, x1: float, x2: float, y: float) -> bool:
    """Would a horizontal segment cross another box's text (a level, a pill, a title band)?"""
    skip = {id(a) for a in target.ancestors()} | {id(target)}
    for b in lay.all():
        if id(b) in skip:
            continue
        if b.item.kind in ("level", "io"):
            if _hits(b, x1, x2, y):
                return True
        else:
            band = Box(b.item, x=b.x, y=b.y, w=b.w, h=b.text_h)
            if _hits(band, x1, x2, y):
                return True
    return False


def route(lay, e: SceneEdge, index: int, count: int) -> list[tuple[float, float]]:
    """The polyline of one edge; ``index``/``count`` separate parallel edges of one pair."""
    s, d = lay.boxes[e.src], lay.boxes[e.dst]
    off = (index - (count - 1) / 2) * 16
    if e.kind in BUS and s is lay.root and lay.root in d.ancestors():
        bx = s.x + BUS[e.kind]
        top = s.y + s.text_h + 4
        y = d.y + BRANCH[e.kind]
        if not _blocked(lay, d, bx, d.x, y):
            return [(bx, top), (bx, y), (d.x, y)]
        y = d.y - (5 if e.kind == "owns" else 10)
        x = d.x + (14 if e.kind == "owns" else 26)
        return [(bx, top), (bx, y), (x, y), (x, d.y)]
    if s in d.ancestors():  # a level and the level nested in it
        x = d.lane + off
        return [(x, s.y + s.text_h), (x, d.y)]
    beside = d in s.sides or s in d.sides or (s is lay.root and d in lay.beside) \
        or (d is lay.root and s in lay.beside)
    if beside:
        top, bottom = max(s.y, d.y), min(s.bottom, d.bottom)
        y = top + min(26 + 18 * index, max(bottom - top - 8, 8))
        if s.right <= d.x:
            return [(s.right, y), (d.x, y)]
        return [(s.x, y), (d.right, y)]
    host = next((h for h in lay.all() if s in h.sides), None)
    if host is not None and d is not host and s.x > d.right and s.bottom + 12 <= d.y + 26:
        # a generator beside one level that also serves a level below: down its left side, then in
        x, y = s.x + 20 + 14 * index, d.y + 26 + 16 * index
        return [(x, s.bottom), (x, y), (d.right, y)]
    if s.bottom <= d.y:  # downwards: the usual stream
        x1, x2 = s.lane + off, d.lane + off
        sa, da = s.ancestors(), d.ancestors()
        y_lo = max([s.bottom] + [a.bottom for a in sa if a not in da])
        y_hi = min([d.y] + [a.y for a in da if a not in sa])
        if x1 == x2:
            return [(x1, s.bottom), (x2, d.y)]
        ym = (y_lo + y_hi) / 2
        return [(x1, s.bottom), (x1, ym), (x2, ym), (x2, d.y)]
    # anything else: out to the right of both, then back in
    xc = max(s.right, d.right) + 18 + 10 * index
    y1, y2 = s.y + 20, d.y + 20
    return [(s.right, y1), (xc, y1), (xc, y2), (d.right, y2)]


def _edges_svg(lay, scene: Scene, p: str) -> str:
    pairs: dict[frozenset, list[SceneEdge]] = defaultdict(list)
    for e in scene.edges:
        if e.kind not in BUS or lay.boxes[e.src] is not lay.root:
            pairs[frozenset((e.src, e.dst))].append(e)
    order = {k: i for i, k in enumerate(FLOW_ORDER)}
    out = []
    for e in sorted(scene.edges, key=lambda e: order.get(e.kind, len(order))):
        group = pairs.get(frozenset((e.src, e.dst)), [e])
        idx = group.index(e) if e in group else 0
        pts = route(lay, e, idx, len(group))
        st = FLOW_STYLES.get(e.kind, IO_STYLE)
        klass = f"flow flow-{e.kind}" if e.is_flow else "io-flow"
        out.append(el("path", el("title", esc(e.describe()), ), d=_d(pts), fill="none", stroke=st.color,
                      stroke_width=f"{st.width:g}", stroke_dasharray=st.dash or None,
                      stroke_linecap="round" if e.kind == "init" else None,
                      marker_end=f"url(#{p}m-{st.kind})", class_=klass, id=f"{p}{e.id}",
                      data_kind=e.kind, data_src=e.src_level, data_dst=e.dst_level))
        out.append(_edge_label(e, pts, st.color))
    return "".join(out)


def _edge_label(e: SceneEdge, pts, color: str) -> str:
    """A short label over the last, horizontal, stretch of an arrow between neighbours, if it fits."""
    (x1, y), (x2, y2) = pts[-2], pts[-1]
    if y != y2 or not e.label or e.kind not in ("generates", "grads", "optimizes"):
        return ""
    if text_width(e.label, SMALL) > abs(x2 - x1) - 14:
        return ""
    return _text((x1 + x2) / 2, y - 5, e.label, size=SMALL, fill=color, anchor="middle", klass="flow-label")


# ---- legend ----------------------------------------------------------------------------------


def _legend(scene: Scene, p: str, x0: float, y0: float, width: float) -> tuple[str, float, float]:
    """The legend at (x0, y0) in ``width`` px: its SVG, width and height."""
    used = {e.kind for e in scene.flows}
    kinds_used = {it.level.kind.value for it in scene.items() if it.level is not None}
    items = [("flow", FLOW_STYLES[k], FLOW_STYLES[k].legend) for k in reversed(FLOW_ORDER) if k in used]
    if any(not e.is_flow for e in scene.edges):
        items.append(("flow", IO_STYLE, IO_STYLE.legend))
    for k, ks in KIND_STYLES.items():
        if k in kinds_used and k != "outer":
            items.append(("kind", ks, ks.legend))
    out = [_text(x0, y0 + 13, "legend", size=TFS, weight="bold")]
    col_w = max(text_width(t, FS) for _, _, t in items) + 62
    cols = max(1, int((width - x0 - 20 + 20) // col_w))
    y = y0 + 26
    for i, (what, st, text) in enumerate(items):
        cx = x0 + (i % cols) * col_w
        cy = y + (i // cols) * 20
        if what == "flow":
            out.append(el("path", d=f"M{fmt(cx)},{fmt(cy)}H{fmt(cx + 40)}", stroke=st.color,
                          stroke_width=f"{st.width:g}", stroke_dasharray=st.dash or None, fill="none",
                          stroke_linecap="round" if st.kind == "init" else None,
                          marker_end=f"url(#{p}m-{st.kind})", class_="legend-sample"))
        else:
            out.append(el("rect", x=cx + 8, y=cy - 7, width=24, height=14, rx=4, fill=st.fill, stroke=st.stroke))
        out.append(_text(cx + 50, cy + 4, text))
    rows = (len(items) + cols - 1) // cols
    return el("g", "".join(out), class_="legend"), cols * col_w, 26 + rows * 20 + 8


# ---- the picture -----------------------------------------------------------------------------


def to_svg(program_or_scene, *, id_prefix: str = "", legend: bool = True) -> str:
    """The level diagram of a program as an SVG document (a string)."""
    scene = program_or_scene if isinstance(program_or_scene, Scene) else build_scene(program_or_scene)
    p = id_prefix
    lay = layout(scene)
    width = max(lay.width, 760)
    boxes, levels, pills = [], [], []
    for b in lay.all():
        if b.item.kind == "level":
            levels.append(_level_svg(b, p))
        elif b.item.kind == "io":
            pills.append(_io_svg(b, p))
        else:
            boxes.append(_container_svg(b, p))
    prog = scene.program
    title = f"{prog.name} · level diagram"
    head = (_text(20, 26, title, size=16, weight="bold")
            + _text(20, 44, "levels nested by update frequency · blocks drawn once with their multiplicity",
                    fill=MUTED))
    height = lay.height + 12
    leg = ""
    if legend:
        # a tall picture takes its legend on the right, a wide one underneath
        leg, leg_w, leg_h = _legend(scene, p, lay.width + 10, 60, lay.width + 10 + 480)
        if lay.height > 3 * leg_h and leg_w <= 480:
            width = max(width, lay.width + 10 + leg_w)
        else:
            leg, leg_w, leg_h = _legend(scene, p, 20, lay.height + 18, width)
            height = lay.height + 18 + leg_h + 12
    body = [svg_open(width, height, title=title, id_prefix=p, klass="nlc-levels"), markers(p),
            el("rect", x=0, y=0, width=width, height=height, fill="#ffffff"), head,
            el("g", "".join(boxes), class_="boxes"), el("g", "".join(levels), class_="levels"),
            el("g", "".join(pills), class_="ios"), el("g", _edges_svg(lay, scene, p), class_="flows"), leg, "</svg>"]
    return "".join(body) + "\n"
