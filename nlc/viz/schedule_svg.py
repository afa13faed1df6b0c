"""The schedule as an SVG: levels as rows over time, like the paper's "brain waves" (Fig. 5).

Two panels share the row layout: the token axis of one sequence (attention, in-context,
``never`` and ``frozen`` levels) and the outer-step axis (steps groups, the outer level,
optimizers). In each row:

* shaded chunks alternate with each state version (one chunk = one period of the level);
* a faint wave has one half-period per chunk (its frequency is the level's frequency);
* ticks along the bottom mark reads (grey: the chunk-start state; blue: causal reads);
* a bar marks each update (``class="update"``; a hollow bar the end-of-sequence partial
  chunk, ``class="update partial"``); when bars would be closer than 3 px they merge into one
  ``class="update-band"`` element whose ``data-count`` says how many updates it stands for;
* a red triangle marks each reset (``class="reset"``); a ``»`` at the start marks a state
  carried over from the previous sequence (``reset never``).

Every row is a ``<g class="row" data-level=NAME data-axis=tokens|steps data-updates=N>``.
"""

from __future__ import annotations

from .schedule import Row, Timeline, timeline
from .style import KIND_STYLES
from .svgdoc import CHAR_EM, el, esc, fmt, svg_open, text_width

__all__ = ["schedule_svg"]

LABEL_W = 270.0
TRACK_W = 880.0
ROW_H = 46.0
AXIS_H = 40.0
M = 20.0
INK, MUTED = "#0f172a", "#64748b"
READ_CHUNK, READ_CAUSAL = "#94a3b8", "#0284c7"
RESET = "#dc2626"


def _text(x, y, s, *, size=12, weight=None, fill=INK, anchor=None, klass=None) -> str:
    return el("text", esc(s), x=float(x), y=float(y), font_size=fmt(size), font_weight=weight, fill=fill,
              text_anchor=anchor, class_=klass)


def _nice_step(n: int, most: int = 16) -> int:
    """A tick spacing giving at most ``most`` intervals: a power of two when it divides ``n``
    (periods usually are), else 1, 2 or 5 times a power of ten."""
    twos = [2 ** k for k in range(20)]
    tens = [m * 10 ** k for k in range(7) for m in (1, 2, 5)]
    for cands in ([c for c in twos if n % c == 0], sorted(tens)):
        ok = [c for c in cands if n / c <= most]
        if ok:
            return min(ok)
    return max(1, n // most)


def _axis(x0: float, y0: float, n: int, unit: str, scale: float, rows_h: float) -> str:
    step = _nice_step(n)
    out = [el("path", d=f"M{fmt(x0)},{fmt(y0 + AXIS_H - 8)}H{fmt(x0 + n * scale)}", stroke=MUTED, fill="none")]
    for t in range(0, n + 1, step):
        x = x0 + t * scale
        out.append(el("path", d=f"M{fmt(x)},{fmt(y0 + AXIS_H - 13)}V{fmt(y0 + AXIS_H - 8)}", stroke=MUTED))
        out.append(el("path", d=f"M{fmt(x)},{fmt(y0 + AXIS_H)}V{fmt(y0 + AXIS_H + rows_h)}", stroke="#e2e8f0",
                      stroke_width="1", class_="grid"))
        out.append(_text(x, y0 + AXIS_H - 17, str(t), size=10.5, fill=MUTED, anchor="middle"))
    return el("g", "".join(out), class_=f"axis axis-{unit}")


def _wave(x0: float, yc: float, amp: float, period: int, n: int, scale: float) -> str:
    """One half-wave per period: crests in the middle of chunks, zeros at the updates."""
    parts = [f"M{fmt(x0)},{fmt(yc)}"]
    sign = -1
    for k in range(0, n, period):
        xa, xb = x0 + k * scale, x0 + min(k + period, n) * scale
        parts.append(f"Q{fmt((xa + xb) / 2)},{fmt(yc + sign * 2 * amp)} {fmt(xb)},{fmt(yc)}")
        sign = -sign
    return "".join(parts)


def _row(r: Row, n: int, x0: float, y0: float, scale: float, index: int) -> str:
    ks = KIND_STYLES[r.kind]
    top, bot = y0 + 4, y0 + ROW_H - 4
    yc = (top + bot) / 2
    out = [el("title", esc(f"{r.level}: {r.summary} — {r.note}"))]
    out.append(el("rect", x=M, y=y0, width=LABEL_W + TRACK_W + 10, height=ROW_H,
                  fill="#f8fafc" if index % 2 else "#ffffff", class_="row-bg"))
    room = LABEL_W - 16
    name = r.level if text_width(r.level, 13) <= room else r.level[:int(room / (13 * CHAR_EM)) - 1] + "…"
    out.append(_text(M + 8, y0 + 19, name, size=13, weight="bold"))
    count = f"{r.update_count} update{'s' if r.update_count != 1 else ''}" if r.period else "flat"
    sub = f"{r.summary} · {count}"
    if text_width(name, 13) + 10 + text_width(ks.tag, 11) <= room:
        out.append(_text(M + 8 + text_width(name, 13) + 10, y0 + 19, ks.tag, size=11, fill=ks.ink))
    else:
        sub = f"{ks.tag} · {sub}"
    most = int(room / (11 * CHAR_EM))
    out.append(_text(M + 8, y0 + 36, sub if len(sub) <= most else sub[:most - 1] + "…", size=11, fill=MUTED))
    # chunks (state versions)
    if r.period and r.period > 1 and n // r.period <= 512:
        for i, k in enumerate(range(0, n, r.period)):
            w = min(r.period, n - k) * scale
            out.append(el("rect", x=x0 + k * scale, y=top, width=w, height=bot - top,
                          fill=ks.fill if i % 2 == 0 else "#ffffff", stroke=ks.stroke, stroke_opacity="0.25",
                          class_="chunk"))
    else:
        out.append(el("rect", x=x0, y=top, width=n * scale, height=bot - top, fill=ks.fill, stroke=ks.stroke,
                      stroke_opacity="0.25", class_="chunk"))
    # the wave
    if r.period and r.period * scale >= 3:
        out.append(el("path", d=_wave(x0, yc, 5.5, r.period, n, scale), fill="none", stroke=ks.stroke,
                      stroke_opacity="0.55", stroke_width="1.4", class_="wave"))
    elif r.period:
        out.append(el("rect", x=x0, y=yc - 5, width=n * scale, height=10, fill=ks.stroke, fill_opacity="0.25",
                      class_="wave"))
    else:
        out.append(el("path", d=f"M{fmt(x0)},{fmt(yc)}H{fmt(x0 + n * scale)}", stroke=ks.stroke,
                      stroke_opacity="0.55", stroke_width="1.4", class_="wave flat"))
    # reads
    if r.reads != "none" and r.axis == "tokens":
        color = READ_CAUSAL if r.reads in ("causal", "every") else READ_CHUNK
        if scale >= 2.5:
            d = "".join(f"M{fmt(x0 + (t + 0.5) * scale)},{fmt(bot - 5)}v4" for t in range(n))
            out.append(el("path", d=d, stroke=color, stroke_width="1", class_=f"reads reads-{r.reads}"))
        else:
            out.append(el("path", d=f"M{fmt(x0)},{fmt(bot - 3)}H{fmt(x0 + n * scale)}", stroke=color,
                          stroke_width="3", class_=f"reads reads-{r.reads}"))
    # updates
    if r.updates:
        gap = (r.updates[1] - r.updates[0]) * scale if len(r.updates) > 1 else scale * r.updates[0]
        if gap < 3:
            out.append(el("rect", x=x0 + r.updates[0] * scale - 1, y=top + 6, width=(r.updates[-1] - r.updates[0]) * scale + 2,
                          height=bot - top - 12, fill=ks.stroke, fill_opacity="0.6", class_="update-band",
                          data_count=str(len(r.updates))))
        else:
            w = min(3.0, gap * 0.45)
            for c in r.updates:
                out.append(el("rect", x=x0 + c * scale - w / 2, y=top + 3, width=w, height=bot - top - 6,
                              fill=ks.stroke, class_="update", data_at=str(c)))
    for c in r.partial:
        out.append(el("rect", x=x0 + c * scale - 1.5, y=top + 3, width=3, height=bot - top - 6, fill="#ffffff",
                      stroke=ks.stroke, stroke_dasharray="2 2", class_="update partial", data_at=str(c)))
    for c in r.resets:
        x = x0 + c * scale
        out.append(el("path", d=f"M{fmt(x - 5)},{fmt(top - 3)}h10l-5,8z", fill=RESET, class_="reset",
                      data_at=str(c)))
    if r.carry and r.axis == "tokens":
        out.append(_text(x0 - 4, yc + 4, "»", size=14, weight="bold", fill=RESET, anchor="end", klass="carry"))
    return el("g", "".join(out), class_="row", data_level=r.level, data_axis=r.axis,
              data_updates=str(r.update_count))


def _panel(title: str, rows: list[Row], n: int, unit: str, y0: float) -> tuple[str, float]:
    x0 = M + LABEL_W
    scale = TRACK_W / n
    out = [_text(M, y0 + 14, title, size=13, weight="bold")]
    rows_h = ROW_H * len(rows)
    out.append(_axis(x0, y0 + 8, n, unit, scale, rows_h))
    y = y0 + 8 + AXIS_H
    for i, r in enumerate(rows):
        out.append(_row(r, n, x0, y, scale, i))
        y += ROW_H
    return el("g", "".join(out), class_=f"panel panel-{unit}"), y - y0


def _legend(x0: float, y0: float) -> tuple[str, float]:
    ticks = "v4m4,-4v4m4,-4v4"
    items = [
        (lambda x, y: el("rect", x=x, y=y - 9, width=3, height=14, fill="#0369a1"), "update (end of a chunk)"),
        (lambda x, y: el("rect", x=x, y=y - 9, width=3, height=14, fill="#ffffff", stroke="#0369a1",
                         stroke_dasharray="2 2"), "partial chunk applied at the end of the sequence"),
        (lambda x, y: el("path", d=f"M{fmt(x - 4)},{fmt(y - 9)}h10l-5,8z", fill=RESET), "reset to the initial state"),
        (lambda x, y: _text(x + 6, y + 4, "»", size=14, weight="bold", fill=RESET, anchor="end"),
         "state carried over from the previous sequence"),
        (lambda x, y: el("path", d=f"M{fmt(x)},{fmt(y - 2)}{ticks}", stroke=READ_CHUNK),
         "reads the chunk-start state"),
        (lambda x, y: el("path", d=f"M{fmt(x)},{fmt(y - 2)}{ticks}", stroke=READ_CAUSAL),
         "reads causally (its own chunk's updates too)"),
        (lambda x, y: el("rect", x=x - 2, y=y - 9, width=16, height=14, fill="#e0f2fe", stroke="#0369a1",
                         stroke_opacity="0.3"), "one shade = one state version (chunk)"),
    ]
    col_w = 440.0
    out = [_text(M, y0 - 14, "legend", size=13, weight="bold")]
    for i, (mark, text) in enumerate(items):
        cx, cy = x0 + (i % 2) * col_w, y0 + 8 + (i // 2) * 20
        out.append(mark(cx, cy))
        out.append(_text(cx + 22, cy + 3, text, size=12))
    return el("g", "".join(out), class_="legend"), 8 + ((len(items) + 1) // 2) * 20


def schedule_svg(program_or_timeline, seq: int | None = None, *, id_prefix: str = "") -> str:
    """The schedule picture of a program (or of a :class:`Timeline`) as an SVG document."""
    tl = program_or_timeline if isinstance(program_or_timeline, Timeline) else timeline(program_or_timeline, seq)
    width = M * 2 + LABEL_W + TRACK_W + 10
    parts = []
    y = 60.0
    token_rows, step_rows = tl.axis_rows("tokens"), tl.axis_rows("steps")
    if token_rows:
        of = f" of a {tl.seq}-token sequence" if tl.seq else ""
        why = f"lcm of the token periods = {tl.token_lcm}" if tl.token_lcm > 1 else "every token"
        title = f"token position t, {tl.tokens} tokens{of} ({why})"
        g, h = _panel(title, token_rows, tl.tokens, "tokens", y)
        parts.append(g)
        y += h + 24
    if step_rows:
        title = f"outer optimizer step, {tl.steps} steps (lcm of the step periods = {tl.step_lcm}); " \
                "each step trains on a batch of whole sequences"
        g, h = _panel(title, step_rows, tl.steps, "steps", y)
        parts.append(g)
        y += h + 24
    leg, lh = _legend(M + 14, y + 26)
    height = y + 26 + lh + 16
    name = f"{tl.program} · schedule"
    head = (_text(M, 26, name, size=16, weight="bold")
            + _text(M, 44, "when each level reads, updates and resets; rows from the fastest level to the slowest",
                    fill=MUTED))
    return (svg_open(width, height, title=name, id_prefix=id_prefix, klass="nlc-schedule")
            + el("rect", x=0, y=0, width=width, height=height, fill="#ffffff") + head + "".join(parts) + leg
            + "</svg>\n")

