"""What a training run shows and writes: a progress bar, a metrics file and a loss plot.

* :class:`Progress` draws one status line on stderr (step/total, loss, tokens/s, ETA),
  redrawn in place on a terminal; when stderr is not a terminal (a log file, CI) it prints a
  plain line at every log step instead.
* :class:`MetricsWriter` appends one JSON object per log step to ``metrics.jsonl``:
  ``step, loss, val_loss, tokens, tokens_per_s, lr, elapsed`` (+ task-specific keys such as
  ``val_bpb``, ``val_acc``, ``task``). ``val_loss`` is null at steps without an evaluation.
* :func:`write_loss_plot` renders train and validation loss against steps as a standalone SVG
  (no plotting library needed).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from xml.sax.saxutils import escape

__all__ = ["MetricsWriter", "Progress", "format_duration", "level_table", "nice_ticks", "write_loss_plot"]


def format_duration(seconds: float) -> str:
    """``75 -> '1:15'``, ``3725 -> '1:02:05'``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def level_table(levels: list[dict]) -> list[str]:
    """Banner lines for ``Model.level_report()``: name, kind, period with its unit, parameters."""
    rows = [("level", "kind", "period", "params")]
    for lv in levels:
        period = lv.get("period")
        unit = lv.get("unit", "")
        every = unit if unit in ("never", "frozen") or period is None else f"{period} {unit}".strip()
        rows.append((str(lv.get("name", "?")), str(lv.get("kind", "")), every, f"{lv.get('params', 0):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  " + "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]


class Progress:
    """Status line on ``stream`` (stderr by default)."""

    def __init__(self, total: int, *, start: int = 0, time_budget: float | None = None, stream=None, enabled: bool = True):
        self.total, self.start, self.time_budget = total, start, time_budget
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.loss: float | None = None
        self.tokens_per_s: float | None = None
        self._sec_per_step: float | None = None
        self._last_draw = 0.0
        self._drawn = False

    def _line(self, step: int) -> str:
        elapsed = time.perf_counter() - self.t0
        width = 24
        frac = min(max(step / self.total, 0.0), 1.0) if self.total else 1.0
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        parts = [f"[{bar}] {step}/{self.total}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.tokens_per_s is not None:
            parts.append(f"{_si(self.tokens_per_s)} tok/s")
        eta = math.inf
        if self._sec_per_step is not None:
            eta = (self.total - step) * self._sec_per_step
        if self.time_budget:
            eta = min(eta, max(self.time_budget - elapsed, 0.0))
        parts.append(f"elapsed {format_duration(elapsed)}")
        parts.append(f"eta {format_duration(eta)}")
        return "  ".join(parts)

    def step(self, step: int) -> None:
        """Called every step; redraws the terminal line at most 10 times a second."""
        if not self.tty:
            return
        now = time.perf_counter()
        if now - self._last_draw >= 0.1 or step >= self.total:
            self._last_draw = now
            self._draw(step)

    def log(self, step: int, loss: float, tokens_per_s: float, extra: str = "") -> None:
        """Called at log steps with the freshly read loss."""
        self.loss, self.tokens_per_s = loss, tokens_per_s
        done = step - self.start
        if done > 0:
            self._sec_per_step = (time.perf_counter() - self.t0) / done
        if not self.enabled:
            return
        if self.tty:
            if extra:  # evaluation results stay in the terminal's history
                self.note(f"step {step}: loss {loss:.4f}  {extra}")
            self._draw(step)
        else:
            print(self._line(step) + (f"  {extra}" if extra else ""), file=self.stream, flush=True)

    def _draw(self, step: int) -> None:
        self.stream.write("\r" + self._line(step) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def note(self, message: str) -> None:
        """Print a message on its own line without breaking the status line."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
        print(message, file=self.stream, flush=True)
        self._drawn = False

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class MetricsWriter:
    """Append-only JSONL metrics that a resumed run continues cleanly.

    Opening with ``resume_step=k`` keeps the records of steps ``<= k`` already in the file and
    drops later ones (written after the checkpoint the run resumes from), so the file never
    holds two records of a step. Without ``resume_step`` the file is started afresh.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None):
        self.path = Path(path)
        self.records: list[dict] = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if isinstance(rec, dict) and rec.get("step", math.inf) <= resume_step:
                    self.records.append(rec)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)

    def write(self, record: dict) -> None:
        """Append ``record``; a record of the same step as the last one is merged into it instead
        (its non-null values win), so the file holds at most one record per step."""
        record = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        if self.records and self.records[-1].get("step") == record.get("step"):
            self.records[-1] = {**self.records[-1], **{k: v for k, v in record.items() if v is not None}}
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            return
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(target - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def _fmt_tick(v: float) -> str:
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.4g}"


def write_loss_plot(path: str | os.PathLike, records: list[dict], *, title: str = "loss") -> None:
    """Write train (``loss``) and validation (``val_loss``) curves of ``records`` as an SVG."""
    def series(key):
        return [(r["step"], r[key]) for r in records
                if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r]

    train, val = series("loss"), series("val_loss")
    W, H, left, right, top, bottom = 720, 420, 70, 20, 40, 50
    pw, ph = W - left - right, H - top - bottom
    points = train + val
    if points:
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        xt = nice_ticks(min(0, min(xs)), max(xs))
        yt = nice_ticks(min(ys), max(ys))
    else:
        xt, yt = [0, 1], [0, 1]
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def px(x):
        return left + (x - x0) / ((x1 - x0) or 1) * pw

    def py(y):
        return top + ph - (y - y0) / ((y1 - y0) or 1) * ph

    out = [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         'font-family="sans-serif" font-size="12">'),
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
    ]
    for t in xt:
        out.append(f'<line x1="{px(t):.1f}" y1="{top}" x2="{px(t):.1f}" y2="{top + ph}" stroke="#eee"/>')
        out.append(f'<text x="{px(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{_fmt_tick(t)}</text>')
    for t in yt:
        out.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{left + pw}" y2="{py(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt_tick(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    out.append(f'<text x="{left + pw / 2}" y="{H - 12}" text-anchor="middle">step</text>')
    out.append(f'<text x="16" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {top + ph / 2})">'
               "loss (nats/token)</text>")
    for pts, color, name in ((train, "#1f77b4", "train"), (val, "#ff7f0e", "validation")):
        if not pts:
            continue
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline class="{name}" points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if name == "validation":
            out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts)
    legend_y = top + 14
    for i, (color, name, pts) in enumerate((("#1f77b4", "train", train), ("#ff7f0e", "validation", val))):
        if pts:
            lx = left + pw - 110
            ly = legend_y + 16 * i
            out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 20}" y2="{ly - 4}" stroke="{color}" stroke-width="2"/>')
            out.append(f'<text x="{lx + 26}" y="{ly}">{name}</text>')
    out.append("</svg>")
    tmp = Path(path).with_suffix(".svg.tmp")
    tmp.write_text("\n".join(out) + "\n", encoding="utf-8")
    os.replace(tmp, path)
