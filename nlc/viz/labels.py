"""The words of every picture: how a level's period, memory, objective, rule and flows read.

Each function takes IR nodes and returns plain text (no markup); the renderers escape it for
their format. The same texts appear on the diagram's level boxes, in the DOT and Mermaid
labels and in the HTML level table, so a level reads the same everywhere.

Conventions: an argument that names a per-token ``let`` binding is written ``@name`` (as in
``nlc compile --emit ir``); ``->`` in shapes is written ``→``.
"""

from __future__ import annotations

from .. import ir

__all__ = [
    "card_rows",
    "context_text",
    "grad_text",
    "hyper_text",
    "init_text",
    "memory_text",
    "objective_text",
    "ordered_levels",
    "outer_memory_text",
    "outer_rows",
    "period_text",
    "rate_key",
    "read_text",
    "reset_text",
    "rule_text",
    "scope_text",
    "wrap",
]

K = ir.LevelKind


def _arrow(text: str) -> str:
    return text.replace(" -> ", "→")


def hyper_text(args) -> str:
    return ", ".join(f"{k}={'@' if h.ref else ''}{h.value}" for k, h in args)


def _every(n: int | None, unit: str) -> str:
    if n == 1:
        return f"every {unit[:-1]}"
    return f"every {n} {unit}"


def period_text(level: ir.Level, seq: int | None = None) -> str:
    """``every 16 tokens``; attention ``every token (frequency ∞)``; ``never``; ``frozen``."""
    p = level.period
    if level.kind is K.ATTENTION:
        return "every token (frequency ∞)"
    if level.kind is K.STATIC:
        return "never (outer level only)"
    if level.kind is K.FROZEN:
        return "frozen"
    if p.every is None:
        return str(p)
    text = _every(p.every, p.unit.value)
    if p.unit is ir.Unit.TOKENS and seq:
        n, rest = divmod(seq, p.every)
        text += f" · {n}{'+1' if rest else ''} per sequence"
    if level.kind is K.STEPS_GROUP:
        text += " · outer loss"
    return text


def _describe(memory: ir.MemoryType) -> str:
    if memory.kind == "attention":  # unset options (window=None) say nothing
        opts = ", ".join(f"{k}={v}" for k, v in memory.options if v is not None)
        return f"attention({opts})"
    return _arrow(memory.describe())


def outer_memory_text(program: ir.Program) -> str:
    """What the outer level owns: every parameter not owned elsewhere, and learned initial states."""
    learned = [lv.name for lv in program.levels if lv.kind is K.IN_CONTEXT and lv.init.mode == "learned"]
    text = "embeddings, head, norms, projections, never/steps-level weights"
    return text + (f"; initial states of {', '.join(learned)}" if learned else "")


def memory_text(level: ir.Level) -> str:
    """The states and what they parameterize, states with one memory type grouped."""
    if not level.states:
        return "—"
    groups: dict[str, list[str]] = {}
    for s in level.states:
        groups.setdefault(_describe(s.memory), []).append(s.name)
    parts = []
    for desc, names in groups.items():
        if names == [level.name]:
            parts.append(desc)
        else:
            parts.append(f"{', '.join(names)}: {desc}")
    return "; ".join(parts)


def objective_text(level: ir.Level) -> str:
    if not level.objective:
        return "—"
    text = level.objective
    if level.objective_args:
        text += f"({hyper_text(level.objective_args)})"
    if level.target == "self":
        text += " · target self (trains on M(v))"
    return text


def rule_text(program: ir.Program, level: ir.Level) -> str:
    """The update rule; for levels the outer level trains, who trains them."""
    outer = program.level(program.outer) if program.outer else None
    by = ""
    if outer is not None:
        by = f"{outer.name}'s {outer.rule}" if outer.rule else outer.name
    if level.kind is K.STATIC:
        return f"by {by}" if by else "by the outer level"
    if level.kind is K.STEPS_GROUP and not level.rule:
        return f"by {by} · grads summed over {level.period.every} steps" if by else "outer optimizer"
    if level.kind is K.FROZEN:
        return "none"
    if level.kind is K.ATTENTION:
        return "append (k, v) to the cache"
    if not level.rule:
        return "—"
    opt = program.level(level.rule)
    if opt is not None and opt.kind is K.OPTIMIZER:
        return f"{level.rule} (optimizer level)"
    return f"{level.rule}({hyper_text(level.rule_args)})" if level.rule_args else level.rule


def init_text(level: ir.Level, program: ir.Program | None = None) -> str:
    if level.kind is not K.IN_CONTEXT:
        return "—"
    if level.init.mode == "learned":
        outer = program.outer if program is not None else None
        return f"learned (meta-learned by {outer})" if outer else "learned"
    return str(level.init)


def reset_text(level: ir.Level) -> str:
    if level.kind is K.ATTENTION:
        return "per sequence (cache)"
    if level.kind is not K.IN_CONTEXT:
        return "never" if level.kind in (K.OUTER, K.OPTIMIZER) else "—"
    return str(level.reset)


def grad_text(level: ir.Level) -> str:
    return str(level.grad_writes) if level.kind is K.IN_CONTEXT else "—"


def read_text(level: ir.Level) -> str:
    if level.kind is K.ATTENTION:
        return "causal"
    return level.read_mode if level.kind is K.IN_CONTEXT else "—"


def context_text(program: ir.Program, level: ir.Level) -> str:
    """What the level is trained on (its context flow)."""
    if level.kind is K.OPTIMIZER:
        return f"grads({level.context_of})" if level.context_of else "gradients"
    if level.kind is K.OUTER:
        return f"the training corpus ({level.objective or 'next_token'})"
    if level.kind is K.ATTENTION:
        return "keys/values of every earlier token of the sequence"
    if level.kind is K.STATIC:
        return "block input; trained by the outer loss"
    if level.kind is K.FROZEN:
        return "—"
    if level.kind is K.STEPS_GROUP:
        return f"outer-loss gradients, accumulated over {level.period.every} steps"
    parts = []
    names = [b.name for b in level.bindings]
    for role, short in (("key", "k"), ("value", "v")):
        b = level.binding(role)
        parts.append(f"{short} = {_arrow(b.flow.describe())}" if b else f"{short} = input")
    for _, h in level.rule_args:  # per-token gates (η_t, α_t) computed from the tokens
        if h.ref and h.value in names:
            parts.append(f"{h.value} = {_arrow(level.binding(h.value).flow.describe())}")
    return "tokens: " + "; ".join(parts)


def scope_text(program: ir.Program, level: ir.Level) -> str:
    """Where the level lives: ``layer × 12 · cms ffn (sequential)``."""
    if level.block is None:
        return "model"
    blk = next((b for b in program.blocks if b.name == level.block), None)
    text = f"block {level.block}" + (f" × {blk.repeat}" if blk and blk.repeat > 1 else "")
    if level.cms:
        grp = program.cms_group(level.cms)
        text += f" · cms {level.cms}" + (f" ({grp.variant})" if grp else "")
    if blk and level.name in blk.generators:
        text += " · generator"
    return text


def card_rows(program: ir.Program, level: ir.Level) -> list[tuple[str, str]]:
    """The ``(key, value)`` rows of a level's box, most important first."""
    seq = program.seq
    rows = [("period", period_text(level, seq))]
    if level.per_head:
        rows.append(("heads", f"{level.heads} (one memory per head)"))
    rows.append(("memory", memory_text(level)))
    if level.kind is K.OPTIMIZER:
        rows.append(("context", context_text(program, level)))
    if level.kind in (K.IN_CONTEXT, K.OPTIMIZER, K.OUTER) or level.objective:
        rows.append(("objective", objective_text(level)))
    rows.append(("rule", rule_text(program, level)))
    if level.kind is K.ATTENTION:
        rows.append(("reset", reset_text(level)))
    if level.kind is K.IN_CONTEXT:
        rows.append(("reset", reset_text(level)))
        rows.append(("init", init_text(level)))
        extra = []
        if level.read_mode != "chunk":
            extra.append(f"read {level.read_mode}")
        if level.grad_writes.mode != "full":
            extra.append(f"grad through writes {level.grad_writes}")
        if extra:
            rows.append(("mode", " · ".join(extra)))
    return rows


def outer_rows(program: ir.Program, level: ir.Level) -> list[str]:
    """The detail lines of the outer level's box."""
    lines = [period_text(level), f"objective {objective_text(level)}", f"rule {rule_text(program, level)}"]
    return lines


def rate_key(program: ir.Program, level: ir.Level) -> tuple:
    """Sort key, fastest level first: tokens by period, then steps by period, then the rest."""
    p = level.period
    if level.kind is K.ATTENTION:
        return (0, 1, 0)
    if p.unit is ir.Unit.TOKENS:
        return (0, p.every or 0, 1)
    if level.kind is K.STATIC:
        return (1, 1, 2)  # trained each outer step, with the outer level
    if p.unit is ir.Unit.STEPS:
        rank = {K.OUTER: 1, K.OPTIMIZER: 3, K.STEPS_GROUP: 0}.get(level.kind, 4)
        return (1, p.every or 0, rank)
    return (2, 0, 0)


def ordered_levels(program: ir.Program) -> list[ir.Level]:
    """Levels from the fastest to the slowest (the order of the paper's level table)."""
    index = {lv.name: i for i, lv in enumerate(program.levels)}
    return sorted(program.levels, key=lambda lv: (rate_key(program, lv), index[lv.name]))


def wrap(text: str, width: int) -> list[str]:
    """Greedy wrap at spaces (or after commas and ``|`` when a word is too long)."""
    width = max(width, 4)
    out: list[str] = []
    line = ""
    for word in text.split(" "):
        while len(word) > width:  # break a long word after a comma or at the width
            cut = max(word.rfind(",", 0, width), word.rfind("|", 0, width))
            cut = cut + 1 if cut > 0 else width
            head, word = word[:cut], word[cut:]
            if line:
                out.append(line)
                line = ""
            out.append(head)
        candidate = f"{line} {word}" if line else word
        if len(candidate) <= width:
            line = candidate
        else:
            out.append(line)
            line = word
    if line or not out:
        out.append(line)
    return out
