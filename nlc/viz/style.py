"""The visual vocabulary shared by every output format: flow styles, level colours, fonts.

One table per concept, so that the SVG picture, the DOT and Mermaid texts, the schedule and the
legends can never disagree about what a dashed line means.

NOTE: flow styles. The level graph's edge kinds (:class:`~nlc.ir.EdgeKind`) map to line styles
the way the Nested Learning paper talks about them: the residual stream is plain data (solid);
a gradient stream is dashed; knowledge transfer by initialization is dotted; generation (one
memory producing another's keys, values or learning rates) is bold and green; an optimizer's
update is red with a diamond head; the outer level's ownership of parameters is thin and grey;
nesting (a nested CMS level inside its parent) is blue with a round head.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import ir

__all__ = [
    "FLOW_ORDER",
    "FLOW_STYLES",
    "IO_STYLE",
    "KIND_STYLES",
    "MONO",
    "FlowStyle",
    "KindStyle",
    "kind_style",
]


@dataclass(frozen=True)
class FlowStyle:
    """How one edge kind is drawn.

    ``dash`` is an SVG ``stroke-dasharray`` ("" for solid); ``dot_style`` the Graphviz
    ``style``; ``head`` the arrowhead shape (``arrow``, ``open``, ``diamond``, ``dot``).
    """

    kind: str
    legend: str
    color: str
    width: float
    dash: str
    dot_style: str
    head: str


FLOW_STYLES: dict[str, FlowStyle] = {
    s.kind: s
    for s in (
        FlowStyle("data", "data: the residual stream", "#334155", 1.6, "", "solid", "arrow"),
        FlowStyle("grads", "gradient stream grads(L)", "#d97706", 1.6, "7 4", "dashed", "arrow"),
        FlowStyle("init", "initial state (meta-learned / init from)", "#7c3aed", 1.6, "1.5 3.5", "dotted", "arrow"),
        FlowStyle("generates", "generates values (keys, values, η, α)", "#059669", 3.0, "", "bold", "arrow"),
        FlowStyle("optimizes", "optimizer update", "#dc2626", 1.8, "10 3 2 3", "solid", "diamond"),
        FlowStyle("owns", "parameters updated by the outer level", "#94a3b8", 1.0, "", "solid", "open"),
        FlowStyle("nests", "nested in (re-initialized by) its parent", "#0284c7", 1.6, "", "solid", "dot"),
    )
}
# Drawing and listing order: the least important first, so that data arrows end up on top.
FLOW_ORDER = ("owns", "init", "nests", "grads", "optimizes", "generates", "data")

IO_STYLE = FlowStyle("io", "token stream in and out of the model", "#64748b", 1.4, "", "solid", "arrow")


@dataclass(frozen=True)
class KindStyle:
    """The colours and tag of a level kind."""

    tag: str
    legend: str
    fill: str
    stroke: str
    ink: str  # the tag's text colour


KIND_STYLES: dict[str, KindStyle] = {
    ir.LevelKind.IN_CONTEXT.value: KindStyle("in-context", "in-context memory (updated every C tokens)",
                                             "#e0f2fe", "#0369a1", "#075985"),
    ir.LevelKind.ATTENTION.value: KindStyle("attention", "attention (every token, frequency ∞)",
                                            "#fef3c7", "#b45309", "#92400e"),
    ir.LevelKind.STATIC.value: KindStyle("never", "never: trained by the outer level only",
                                         "#f1f5f9", "#64748b", "#475569"),
    ir.LevelKind.FROZEN.value: KindStyle("frozen", "frozen: never updated",
                                         "#e5e7eb", "#6b7280", "#374151"),
    ir.LevelKind.STEPS_GROUP.value: KindStyle("steps group", "steps group: outer loss every N steps",
                                              "#dcfce7", "#15803d", "#166534"),
    ir.LevelKind.OUTER.value: KindStyle("outer level", "outer (pre-training) level",
                                        "#fcfcfd", "#475569", "#334155"),
    ir.LevelKind.OPTIMIZER.value: KindStyle("optimizer", "optimizer level: a memory of gradients",
                                            "#ffe4e6", "#be123c", "#9f1239"),
}

CONTAINER_STYLES = {
    "block": ("#ffffff", "#475569"),
    "cms": ("#f8fafc", "#64748b"),
    "io": ("#f1f5f9", "#64748b"),
}

# Every picture uses one monospace family, so that text widths are known without font metrics:
# these faces all advance 0.6 em per character (Consolas 0.55), and the layout budgets 0.61 em.
MONO = "'DejaVu Sans Mono', Menlo, Consolas, 'Liberation Mono', monospace"


def kind_style(level: ir.Level) -> KindStyle:
    return KIND_STYLES[level.kind.value]
