"""The level graph (networkx) and its checks: dangling references, cycles, unread levels.

Nodes are levels. Edges (kind in :class:`~nlc.ir.EdgeKind`):

* ``data`` — the residual stream from one sublayer to the next (and inside CMS chains);
* ``generates`` — a level called inside another level's flow produces its values;
* ``init`` — ``init from L`` (L → level), and the outer level's meta-learned initial states;
* ``owns`` — the outer level updates the parameters of block levels;
* ``grads`` — L → optimizer level whose context is ``grads(L)``;
* ``optimizes`` — optimizer level → the level whose rule names it;
* ``nests`` — a nested CMS level inside the previous one.

Cycles are errors only when they do not pass through a state update: ``grads``/``optimizes``
loops (an optimizer and the level it optimizes) and ``owns`` edges are updates by
construction; ``data``, ``generates`` and ``init`` edges are not.
"""

from __future__ import annotations

import networkx as nx

from .. import ir
from ..diagnostics import Diagnostics, did_you_mean

__all__ = ["check", "build_graph"]

_NON_UPDATE = (ir.EdgeKind.DATA, ir.EdgeKind.GENERATES, ir.EdgeKind.INIT)
# levels another level can start from (`init from`); others are reported as NL504
_INIT_SOURCES = (ir.LevelKind.IN_CONTEXT, ir.LevelKind.STATIC, ir.LevelKind.FROZEN, ir.LevelKind.STEPS_GROUP)


def _sublayer_levels(program: ir.Program, sub: ir.Sublayer) -> list[str]:
    if sub.kind == "level":
        return [sub.name]
    g = program.cms_group(sub.name)
    return list(g.levels) if g else []


def build_graph(program: ir.Program) -> nx.MultiDiGraph:
    g = nx.MultiDiGraph(name=program.name)
    for lv in program.levels:
        g.add_node(lv.name, level=lv, kind=lv.kind.value)

    def edge(src, dst, kind: ir.EdgeKind, label="", span=None):
        if src in g and dst in g:
            g.add_edge(src, dst, key=kind.value, kind=kind, label=label, span=span)

    prev_tail: list[str] = []
    for b in program.blocks:
        for sub in b.sublayers:
            names = _sublayer_levels(program, sub)
            if not names:
                continue
            grp = program.cms_group(sub.name) if sub.kind == "cms" else None
            heads = names if (grp and grp.variant == "independent") else names[:1]
            for t in prev_tail:
                for h in heads:
                    edge(t, h, ir.EdgeKind.DATA, "stream")
            if grp and grp.variant != "independent":
                for a, c in zip(names, names[1:]):
                    edge(a, c, ir.EdgeKind.DATA, "stream")
                    if grp.variant == "nested":
                        edge(a, c, ir.EdgeKind.NESTS, "nests")
            prev_tail = names if (grp and grp.variant == "independent") else names[-1:]
    for e in program.edges:
        edge(e.src, e.dst, e.kind, e.label, e.span)
    outer = program.outer
    for lv in program.levels:
        if lv.block is not None and outer and lv.kind is not ir.LevelKind.FROZEN:
            label = f"every {lv.period.every} steps" if lv.kind is ir.LevelKind.STEPS_GROUP else "params"
            edge(outer, lv.name, ir.EdgeKind.OWNS, label)
        if lv.kind is ir.LevelKind.IN_CONTEXT:
            src = program.level(lv.init.source) if lv.init.mode == "from" and lv.init.source else None
            if src is not None:
                if src.states and src.kind in _INIT_SOURCES:  # else NL504, and no edge to cycle on
                    edge(src.name, lv.name, ir.EdgeKind.INIT, "init from", lv.init.span)
            elif lv.init.mode == "learned" and outer:
                edge(outer, lv.name, ir.EdgeKind.INIT, "meta-learned init")
        if lv.kind is ir.LevelKind.OPTIMIZER and lv.context_of:
            edge(lv.context_of, lv.name, ir.EdgeKind.GRADS, "grads")
        if lv.rule and program.level(lv.rule) is not None:
            edge(lv.rule, lv.name, ir.EdgeKind.OPTIMIZES, "update")
    return g


def _grad_source(program: ir.Program, name: str) -> bool:
    """Does level ``name`` exist and have an outer gradient stream (else NL201/NL504 says so)?"""
    src = program.level(name)
    return src is not None and src.kind in (ir.LevelKind.OUTER, ir.LevelKind.STEPS_GROUP)


def check(program: ir.Program, diags: Diagnostics) -> None:
    names = [lv.name for lv in program.levels]
    used_optimizers: set[str] = set()
    for lv in program.levels:
        # optimizer levels named as rules
        if lv.rule and lv.kind in (ir.LevelKind.OUTER, ir.LevelKind.STEPS_GROUP):
            opt = program.level(lv.rule)
            if opt is not None:
                used_optimizers.add(opt.name)
                if opt.kind is not ir.LevelKind.OPTIMIZER:
                    diags.error("NL504", f"level `{lv.name}` is updated by `{opt.name}`, which is not an optimizer "
                                "level (it has no `context grads(...)`)", lv.clause_span("rule"),
                                f"name an optimizer level (one with `context grads({lv.name})`), or a built-in "
                                "optimizer such as `rule adamw(lr = 3e-4)`")
                elif opt.context_of and opt.context_of != lv.name and _grad_source(program, opt.context_of):
                    diags.error("NL504", f"optimizer level `{opt.name}` reads the gradients of `{opt.context_of}` "
                                f"but is used to update `{lv.name}`", lv.clause_span("rule"),
                                f"write `context grads({lv.name})` in `{opt.name}`")
        # context grads(L)
        if lv.kind is ir.LevelKind.OPTIMIZER and lv.context_of:
            src = program.level(lv.context_of)
            if src is None:
                diags.error("NL201", f"`grads({lv.context_of})`: no level named `{lv.context_of}`"
                            f"{did_you_mean(lv.context_of, names)}", lv.clause_span("context"))
            elif src.kind not in (ir.LevelKind.OUTER, ir.LevelKind.STEPS_GROUP):
                diags.error("NL504", f"`grads({src.name})`: `{src.name}` is {src.kind.a_label} "
                            "level, which has no outer gradient stream for an optimizer to read",
                            lv.clause_span("context"), "optimizer levels read the gradients of the outer level")
        # init from L
        if lv.init.mode == "from" and lv.init.source:
            src = program.level(lv.init.source)
            if src is None:
                diags.error("NL201", f"`init from {lv.init.source}`: no level named `{lv.init.source}`"
                            f"{did_you_mean(lv.init.source, names)}", lv.init.span)
            elif src is lv:
                diags.error("NL501", f"level `{lv.name}` is initialised from itself", lv.init.span,
                            "start from another (slower) level, or write `init learned`")
            elif not src.states or src.kind in (ir.LevelKind.ATTENTION, ir.LevelKind.OPTIMIZER,
                                                ir.LevelKind.OUTER):
                diags.error("NL504", f"`init from {src.name}`: `{src.name}` has no memory state to start from",
                            lv.init.span, "start from an in-context, `never` or steps level with the same memory, "
                            "or write `init learned`")
            elif lv.kind is not ir.LevelKind.IN_CONTEXT:
                diags.error("NL207", f"`init from` applies to in-context levels; `{lv.name}` is "
                            f"{lv.kind.a_label} level", lv.init.span)
    for lv in program.levels:
        if lv.kind is ir.LevelKind.OPTIMIZER and lv.name not in used_optimizers:
            diags.error("NL503", f"optimizer level `{lv.name}` updates nothing: no level names it as its rule",
                        lv.name_span, f"write `rule {lv.name}` in the level whose gradients it reads")

    g = build_graph(program)
    sub = nx.DiGraph()
    sub.add_nodes_from(g.nodes)
    for u, v, data in g.edges(data=True):
        if data["kind"] in _NON_UPDATE:
            sub.add_edge(u, v)
    order = {lv.name: i for i, lv in enumerate(program.levels)}
    for cycle in nx.simple_cycles(sub):
        if len(cycle) == 1:
            continue  # self-loops (init from itself) are reported above
        first = min(range(len(cycle)), key=lambda i: order.get(cycle[i], 0))
        cycle = cycle[first:] + cycle[:first]  # start at the level written first: stable and readable
        lv = program.level(cycle[0])
        diags.error("NL501", f"levels feed each other without a state update in between: "
                    f"{' -> '.join(cycle + [cycle[0]])}", lv.name_span if lv else program.span)
