"""Periods, units and their order (sympy for divisibility).

Frequencies are compared in a common unit where they are comparable: a level updated every C
tokens makes 1/C updates per token; one updated every N steps makes 1/(N·seq) per token when
``seq`` (the training sequence length) is a declared dimension, and is slower than any token
level that fits in a sequence otherwise; ``never`` and ``frozen`` levels are slowest.
"""

from __future__ import annotations

import sympy

from .. import ir
from ..diagnostics import Diagnostics

__all__ = ["check", "rate"]


# levels whose state another level can start from (the graph pass reports the others)
_INIT_SOURCES = (ir.LevelKind.IN_CONTEXT, ir.LevelKind.STATIC, ir.LevelKind.FROZEN, ir.LevelKind.STEPS_GROUP)


def rate(level: ir.Level, seq: int | None):
    """Updates per token (a sympy Rational), 0 for never/frozen, None if not comparable."""
    p = level.period
    if p.unit in (ir.Unit.NEVER, ir.Unit.FROZEN):
        return sympy.Integer(0)
    if p.every is None:
        return None
    if p.unit is ir.Unit.TOKENS:
        return sympy.Rational(1, p.every)
    if seq is None:
        return None
    return sympy.Rational(1, p.every * seq)


def _faster_or_equal(a: ir.Level, b: ir.Level, seq) -> bool | None:
    """Is ``a`` updated at least as often as ``b``? None when not comparable."""
    ra, rb = rate(a, seq), rate(b, seq)
    if ra is not None and rb is not None:
        return bool(ra >= rb)  # sympy relations are BooleanTrue/BooleanFalse, not bool
    ua, ub = a.period.unit, b.period.unit
    if ua is ir.Unit.TOKENS and ub is ir.Unit.STEPS:
        return True  # checked against seq elsewhere
    if ua is ir.Unit.STEPS and ub is ir.Unit.TOKENS:
        return False
    return None


def check(program: ir.Program, diags: Diagnostics) -> None:
    seq = program.seq
    outer = program.level(program.outer) if program.outer else None
    for lv in program.levels:
        p = lv.period
        if lv.kind is ir.LevelKind.IN_CONTEXT and p.every is not None:
            if seq is not None and p.every > seq and lv.reset.mode == "sequence":
                diags.error("NL403", f"level `{lv.name}` updates every {p.every} tokens but sequences have "
                            f"{seq} tokens, so it never updates before it is reset", p.span)
            if lv.reset.mode == "every" and lv.reset.every is not None:
                if lv.reset.every % p.every != 0:
                    diags.error("NL404", f"level `{lv.name}` resets every {lv.reset.every} tokens, which is not a "
                                f"multiple of its period {p.every}", lv.reset.span,
                                f"reset every {p.every * max(1, round(lv.reset.every / p.every))} tokens")
                if seq is not None and lv.reset.every > seq:
                    diags.warning("NL403", f"level `{lv.name}` resets every {lv.reset.every} tokens, beyond the "
                                  f"sequence length {seq}: it behaves as `reset per sequence`", lv.reset.span)
        if lv.grad_writes.mode == "truncate" and lv.grad_writes.chunks is not None and lv.grad_writes.chunks < 1:
            diags.error("NL302", f"level `{lv.name}` truncates after {lv.grad_writes.chunks} chunks; "
                        "it must be at least 1", lv.grad_writes.span)
        if lv.kind is ir.LevelKind.STEPS_GROUP and outer is not None and p.every and outer.period.every:
            if p.every < outer.period.every:
                diags.error("NL402", f"level `{lv.name}` updates every {p.every} steps, more often than the outer "
                            f"level `{outer.name}` ({outer.period}) that computes its gradients", p.span,
                            f"use `every {outer.period.every} steps` or a multiple of it")
            elif p.every % outer.period.every != 0:
                diags.error("NL405", f"level `{lv.name}` updates every {p.every} steps, not a multiple of the "
                            f"outer level's {outer.period.every}", p.span,
                            f"use a multiple of {outer.period.every}, e.g. `every "
                            f"{outer.period.every * max(1, round(p.every / outer.period.every))} steps`")
        if lv.kind is ir.LevelKind.OPTIMIZER and lv.context_of:
            src = program.level(lv.context_of)
            if src is not None and src.period.every is not None and p.every is not None \
                    and src.period.unit is ir.Unit.STEPS and p.every != src.period.every:
                diags.error("NL402", f"optimizer level `{lv.name}` updates every {p.every} steps but its gradient "
                            f"stream from `{src.name}` arrives every {src.period.every}", p.span,
                            "an optimizer level consumes each gradient once: use the same period")
        if lv.init.mode == "from" and lv.init.source:
            src = program.level(lv.init.source)
            if src is not None and src is not lv and src.states and src.kind in _INIT_SOURCES \
                    and _faster_or_equal(src, lv, seq) is True \
                    and rate(src, seq) != rate(lv, seq):
                diags.error("NL402", f"level `{lv.name}` starts from `{src.name}`, which updates more often "
                            f"({src.period}) than it does ({p}): knowledge flows from slower levels to faster ones",
                            lv.init.span, f"start `{lv.name}` from a level that updates at most as often, "
                            "or write `init learned`")

    for g in program.cms:
        if g.variant != "nested":
            continue
        chain = [program.level(n) for n in g.levels]
        for parent, child in zip(chain, chain[1:]):
            if parent is None or child is None:
                continue
            faster = _faster_or_equal(child, parent, seq)
            if faster is False:
                diags.error("NL402", f"in nested CMS `{g.name}`, `{child.name}` ({child.period}) is nested in "
                            f"`{parent.name}` ({parent.period}) but updates less often", child.period.span,
                            "list nested levels from the slowest to the fastest")
                continue
            cp, pp = child.period, parent.period
            if cp.unit is pp.unit is ir.Unit.TOKENS and cp.every and pp.every and pp.every % cp.every:
                diags.error("NL405", f"in nested CMS `{g.name}`, `{parent.name}`'s period {pp.every} is not a "
                            f"multiple of `{child.name}`'s {cp.every}, so the inner level cannot be re-initialised "
                            "at each outer update", child.period.span)
