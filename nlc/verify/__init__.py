"""Verification passes over the IR. Each pass appends diagnostics and changes nothing.

Passes (run in this order, all of them, so that independent errors are reported together):

* :mod:`.rules` — what each level kind requires and allows; rule/objective/memory fit.
* :mod:`.shapes` — dims are positive integers; every flow's width fits its consumer (sympy).
* :mod:`.schedule` — periods and units: nesting order, divisibility, fit to ``seq``, resets.
* :mod:`.graph` — the level graph (networkx): dangling references, cycles, unread levels.
"""

from __future__ import annotations

import networkx as nx

from .. import ir
from ..diagnostics import Diagnostics
from . import graph, rules, schedule, shapes

__all__ = ["verify", "level_graph", "PASSES"]

PASSES = (
    ("rules", rules.check),
    ("shapes", shapes.check),
    ("schedule", schedule.check),
    ("graph", graph.check),
)


def verify(program: ir.Program, diags: Diagnostics) -> None:
    """Run every pass over ``program``."""
    for _, run in PASSES:
        run(program, diags)


def level_graph(program: ir.Program) -> nx.MultiDiGraph:
    """The level graph: one node per level (with its IR as ``level``), one edge per flow."""
    return graph.build_graph(program)
