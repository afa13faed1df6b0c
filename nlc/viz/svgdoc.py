"""A few helpers to write SVG by hand: escaping, elements, text widths, arrow markers.

NOTE: text widths. nlc lays text out without font metrics: every picture uses one monospace
family (:data:`~nlc.viz.style.MONO`), whose faces advance 0.6 em per character, and budgets
:data:`CHAR_EM` = 0.61 em so that a line measured to fit always fits.
"""

from __future__ import annotations

from xml.sax.saxutils import escape as _xml_escape

from .style import FLOW_STYLES, IO_STYLE, MONO, FlowStyle

__all__ = ["CHAR_EM", "attr", "el", "esc", "fmt", "markers", "svg_open", "text_width"]

CHAR_EM = 0.61


def esc(text) -> str:
    """Escape text for an XML text node."""
    return _xml_escape(str(text))


def attr(text) -> str:
    """Escape text for a double-quoted XML attribute."""
    return _xml_escape(str(text), {'"': "&quot;", "\n": "&#10;"})


def fmt(v: float) -> str:
    """A coordinate with at most one decimal, no trailing zeros (stable, compact output)."""
    s = f"{v:.1f}"
    return s.removesuffix(".0")


def el(tag: str, body: str | None = None, **attrs) -> str:
    """``<tag a="..."/>`` or ``<tag ...>body</tag>``; ``class_`` → ``class``, ``_`` → ``-``."""
    parts = [tag]
    for k, v in attrs.items():
        if v is None:
            continue
        name = k.rstrip("_").replace("_", "-")
        if isinstance(v, float):
            v = fmt(v)
        parts.append(f'{name}="{attr(v)}"')
    head = " ".join(parts)
    return f"<{head}/>" if body is None else f"<{head}>{body}</{tag}>"


def text_width(text: str, size: float) -> float:
    """Width in px of ``text`` set in the monospace family at ``size`` px."""
    return len(text) * size * CHAR_EM


def svg_open(width: float, height: float, *, title: str, id_prefix: str, klass: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="{klass}" id="{id_prefix}svg" '
            f'width="{fmt(width)}" height="{fmt(height)}" viewBox="0 0 {fmt(width)} {fmt(height)}" '
            f'font-family="{attr(MONO)}" role="img" aria-label="{attr(title)}">'
            f"<title>{esc(title)}</title>")


def _marker(prefix: str, style: FlowStyle) -> str:
    mid = f"{prefix}m-{style.kind}"
    c = style.color
    if style.head == "open":
        shape = f'<path d="M1,1 L9,5 L1,9" fill="none" stroke="{c}" stroke-width="1.3"/>'
    elif style.head == "diamond":
        shape = f'<path d="M0,5 L5,1 L10,5 L5,9 Z" fill="{c}"/>'
    elif style.head == "dot":
        shape = f'<circle cx="5" cy="5" r="3.6" fill="{c}"/>'
    else:
        shape = f'<path d="M0,1 L10,5 L0,9 Z" fill="{c}"/>'
    # markerUnits=userSpaceOnUse: the same head size whatever the line width
    return (f'<marker id="{mid}" viewBox="0 0 10 10" refX="9.5" refY="5" markerWidth="10" '
            f'markerHeight="10" markerUnits="userSpaceOnUse" orient="auto">{shape}</marker>')


def markers(prefix: str) -> str:
    """``<defs>`` with one arrowhead marker per flow kind (ids ``{prefix}m-{kind}``)."""
    body = "".join(_marker(prefix, s) for s in [*FLOW_STYLES.values(), IO_STYLE])
    return f"<defs>{body}</defs>"
