"""The schedule of a program: when each level reads, updates and resets (data, no drawing).

Two time axes, because "every 16 tokens" and "every 16 steps" are different programs:

* **tokens** — positions ``t = 0 … H-1`` inside one training sequence. The horizon ``H`` is
  one common period of every token-level: the lcm of their periods and of their ``reset every
  N tokens``, at most the sequence length ``seq`` (``program.seq``, or the ``seq`` argument),
  and at most :data:`MAX_TOKENS`. When the lcm is tiny (attention alone has period 1) the
  horizon is stretched to a multiple of it of at least :data:`MIN_TOKENS` tokens.
* **steps** — outer optimizer steps ``0 … S-1``. ``S`` is the lcm of the periods of every
  ``steps`` level, stretched to at least :data:`MIN_STEPS` steps, at most :data:`MAX_STEPS`.

Positions of marks are *boundaries*: an update at ``c`` happens after token (or step)
``c - 1``, i.e. at the end of a chunk; a reset at ``c`` happens before token ``c`` (``0``:
the state starts the sequence at its initial value). Paper eq 90 (``docs/semantics.md``): the tokens of
chunk ``i`` read the state as it was at the end of chunk ``i - 1``; with ``read causal`` they
also see the updates of their own chunk. A last partial chunk is applied at the end of the
sequence; it is listed in ``partial`` when the horizon reaches the end of the sequence.

Rows: attention (every token), in-context levels (every C tokens), ``never`` and ``frozen``
levels (flat) on the token axis; steps groups, the outer level and optimizer levels on the
steps axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import ir
from . import labels

__all__ = ["MAX_STEPS", "MAX_TOKENS", "MIN_STEPS", "MIN_TOKENS", "Row", "Timeline", "timeline"]

MIN_TOKENS, MAX_TOKENS = 16, 4096
MIN_STEPS, MAX_STEPS = 8, 64

K = ir.LevelKind


@dataclass(frozen=True)
class Row:
    """One level's line of the schedule.

    ``reads``: ``every`` (attention: all earlier tokens), ``chunk`` (the state at the start of
    the chunk), ``causal`` (the chunk-start state plus this chunk's own updates), ``static``
    (parameters that do not change inside the sequence) or ``none``.
    ``carry``: the state is carried over from the previous sequence (``reset never``).
    """

    level: str
    kind: str
    axis: str  # "tokens" | "steps"
    period: int | None  # in units of the axis; None: no update of its own on this axis
    updates: tuple[int, ...]
    partial: tuple[int, ...]
    resets: tuple[int, ...]
    reads: str
    carry: bool
    summary: str  # "every 16 tokens"
    note: str  # one line on what the marks mean for this level

    @property
    def update_count(self) -> int:
        return len(self.updates) + len(self.partial)


@dataclass(frozen=True)
class Timeline:
    program: str
    tokens: int  # H
    steps: int  # S
    seq: int | None
    token_lcm: int
    step_lcm: int
    rows: tuple[Row, ...]

    def axis_rows(self, axis: str) -> list[Row]:
        return [r for r in self.rows if r.axis == axis]

    @property
    def sequence_end_shown(self) -> bool:
        return self.seq is not None and self.tokens == self.seq


def _lcm(values) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


def _stretch(lcm: int, least: int, most: int) -> int:
    if lcm >= least:
        return min(lcm, most)
    return min(lcm * math.ceil(least / lcm), most)


def _token_row(lv: ir.Level, H: int, seq: int | None) -> Row:
    end_shown = seq is not None and H == seq
    summary = labels.period_text(lv).split(" · ")[0]
    if lv.kind is K.ATTENTION:
        return Row(lv.name, lv.kind.value, "tokens", 1, tuple(range(1, H + 1)), (), (0,), "every", False,
                   "every token", "appends its key and value at every token; reads all earlier ones; cache cleared per sequence")
    if lv.kind in (K.STATIC, K.FROZEN):
        note = "frozen: never updated" if lv.kind is K.FROZEN else "no update inside a sequence: trained by the outer level"
        return Row(lv.name, lv.kind.value, "tokens", None, (), (), (), "static", False, summary, note)
    C = lv.period.every or 1
    updates = tuple(range(C, H + 1, C))
    partial = (H,) if end_shown and H % C else ()
    if lv.reset.mode == "every" and lv.reset.every:
        resets = tuple(range(0, H, lv.reset.every))
    elif lv.reset.mode == "sequence":
        resets = (0,)
    else:
        resets = ()
    note = (f"updated at the end of each {C}-token chunk; tokens read the state at the chunk start"
            if lv.read_mode == "chunk" else
            f"updated at the end of each {C}-token chunk; tokens also read their own chunk's updates")
    return Row(lv.name, lv.kind.value, "tokens", C, updates, partial, resets, lv.read_mode,
               lv.reset.mode == "never", summary, note)


def _step_row(lv: ir.Level, S: int) -> Row:
    N = lv.period.every or 1
    notes = {
        K.OUTER: "one optimizer step per batch of sequences",
        K.OPTIMIZER: f"reads the gradients of {lv.context_of} and updates it",
        K.STEPS_GROUP: f"accumulates the outer-loss gradients for {N} steps, then updates",
    }
    return Row(lv.name, lv.kind.value, "steps", N, tuple(range(N, S + 1, N)), (), (), "static", True,
               labels.period_text(lv).split(" · ")[0], notes.get(lv.kind, ""))


def timeline(program: ir.Program, seq: int | None = None) -> Timeline:
    """The schedule of ``program`` over one common period (see the module docstring).

    Arguments:
      program: a resolved program.
      seq: the sequence length in tokens; defaults to ``program.seq`` (None: unbounded).
    """
    seq = seq if seq is not None else program.seq
    token_levels, step_levels = [], []
    for lv in labels.ordered_levels(program):
        if lv.period.unit is ir.Unit.STEPS and lv.kind is not K.STATIC:
            step_levels.append(lv)
        else:
            token_levels.append(lv)
    periods = [lv.period.every for lv in token_levels
               if lv.kind is K.IN_CONTEXT and lv.period.every and lv.period.unit is ir.Unit.TOKENS]
    periods += [lv.reset.every for lv in token_levels if lv.kind is K.IN_CONTEXT and lv.reset.mode == "every"
                and lv.reset.every]
    token_lcm = _lcm(periods)
    H = _stretch(token_lcm, MIN_TOKENS, MAX_TOKENS)
    if seq is not None:
        H = min(H, seq)
    step_lcm = _lcm(lv.period.every for lv in step_levels if lv.period.every)
    S = _stretch(step_lcm, MIN_STEPS, MAX_STEPS)
    rows = [_token_row(lv, H, seq) for lv in token_levels] + [_step_row(lv, S) for lv in step_levels]
    return Timeline(program.name, H, S, seq, token_lcm, step_lcm, tuple(rows))
