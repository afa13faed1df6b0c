"""What each level kind requires and allows, and which rules fit which memories.

* in-context levels (``every N tokens``): states of a trainable memory, an in-context
  objective (dot/l2/huber) and an in-context rule (gd/momentum/dgd), all stated;
* attention levels: no objective, rule or states of their own (non-parametric);
* ``never``/``frozen`` levels: one memory, no objective or rule;
* steps groups (in a block, ``every N steps``): ``objective next_token`` stated;
* the outer level: ``objective next_token`` and a rule (built-in optimizer or optimizer level);
* optimizer levels (``context grads(L)``): ``elementwise`` states, an optimizer rule whose
  objective matches the stated one.

Also: gates (lr/decay/momentum) fed by learnable flows must be able to learn, and
``init learned`` must be able to learn (NL604).
"""

from __future__ import annotations

from .. import ir, options
from ..diagnostics import Diagnostics

__all__ = ["check"]

_TRAINABLE = ("linear", "mlp", "residual_mlp", "swiglu")
_IN_CONTEXT_ONLY = ("state", "reads", "objective", "rule", "reset", "init", "grad", "read", "target")


def _stated(level: ir.Level, clause: str) -> bool:
    return clause in dict(level.clause_spans)


def _missing_at(level: ir.Level, clause: str):
    """Where to report a clause: the clause when stated, else the level's name."""
    return level.clause_span(clause) if _stated(level, clause) else level.name_span


def _learnable(flow: ir.Flow | None) -> bool:
    """Does this flow contain parameters the outer loss trains (projections, memories)?"""
    if flow is None:
        return False
    return any(f.kind in ("read", "call") or (f.kind == "op" and f.name in ("linear", "conv"))
               for f in flow.walk())


def refs_closure(level: ir.Level, flow: ir.Flow | None) -> set[str]:
    """Names of the let-bindings ``flow`` depends on, directly or through other bindings."""
    out: set[str] = set()
    todo = [flow] if flow is not None else []
    while todo:
        for f in todo.pop().walk():
            if f.kind == "ref" and f.name not in out:
                out.add(f.name)
                b = level.binding(f.name)
                if b is not None:
                    todo.append(b.flow)
    return out


def _binding_flow(level: ir.Level, name: str) -> ir.Flow | None:
    b = level.binding(name)
    return b.flow if b else None


def check(program: ir.Program, diags: Diagnostics) -> None:
    for lv in program.levels:
        k = lv.kind
        name = lv.name
        if k is ir.LevelKind.IN_CONTEXT:
            if not lv.states and not _stated(lv, "state"):
                diags.error("NL206", f"in-context level `{name}` has no state", lv.name_span,
                            "give it a memory (`level x : mlp(d)`) or `state m : linear(d -> d)`")
            for clause, what in (("objective", "objective l2"), ("rule", "rule gd(lr = 0.1)")):
                if not _stated(lv, clause):
                    diags.error("NL206", f"in-context level `{name}` does not state its {clause}", lv.name_span,
                                f"add e.g. `{what}`: an in-context {clause} is never implied")
            for s in lv.states:
                if s.memory.kind not in _TRAINABLE:
                    article = "an" if s.memory.kind[0] in "aeiou" else "a"
                    diags.error("NL601", f"state `{s.name}` of in-context level `{name}` is {article} "
                                f"`{s.memory.kind}` memory, which has no in-context update",
                                s.memory.span, f"in-context memories are {', '.join(_TRAINABLE)}")
            if lv.objective in options.OUTER_OBJECTIVES:
                diags.error("NL602", f"`objective {lv.objective}` is an outer objective; in-context level "
                            f"`{name}` needs dot, l2 or huber", lv.clause_span("objective"),
                            "to train a block level by the outer loss every N steps, write `every N steps`")
            _check_learning(lv, diags)
        elif k is ir.LevelKind.ATTENTION:
            for clause in ("objective", "rule", "init", "grad", "target", "read", "reset"):
                if _stated(lv, clause) and not _causal(lv, clause):
                    diags.error("NL207", f"attention level `{name}` is non-parametric; `{clause}` does not apply",
                                lv.clause_span(clause), "its update is the closed-form solution (paper eq 62)")
            if len(lv.states) > 1:
                diags.error("NL207", f"attention level `{name}` has no other states", lv.name_span,
                            "remove the `state` statements: attention keeps no parameters of its own")
        elif k in (ir.LevelKind.STATIC, ir.LevelKind.FROZEN):
            for clause in ("objective", "rule", "reset", "init", "grad", "read", "target"):
                if _stated(lv, clause) and not _causal(lv, clause):
                    diags.error("NL207", f"level `{name}` is `{lv.period.unit.value}`: `{clause}` does not "
                                "apply (it has no update of its own)", lv.clause_span(clause),
                                "remove it, or give the level a period (`every 64 tokens`)")
            _one_memory(lv, diags)
        elif k is ir.LevelKind.STEPS_GROUP:
            if lv.objective != "next_token":
                diags.error("NL206" if lv.objective is None else "NL602",
                            f"level `{name}` updates every {lv.period.every} steps, so it is trained by the outer "
                            "loss: state `objective next_token`", _missing_at(lv, "objective"),
                            "add `objective next_token`" if lv.objective is None else "write `objective next_token`")
            for clause in ("reset", "init", "grad", "read", "target"):
                if _stated(lv, clause) and not _causal(lv, clause):
                    diags.error("NL207", f"`{clause}` applies to in-context levels, not to steps level `{name}`",
                                lv.clause_span(clause))
            _one_memory(lv, diags)
        elif k is ir.LevelKind.OUTER:
            if lv.objective != "next_token":
                diags.error("NL206" if lv.objective is None else "NL602",
                            f"outer level `{name}` must state `objective next_token`",
                            _missing_at(lv, "objective"), "the outer level minimises the next-token loss: "
                            "write `objective next_token`")
            if lv.rule is None and not _stated(lv, "rule"):
                diags.error("NL206", f"outer level `{name}` does not state its rule", lv.name_span,
                            "add e.g. `rule adamw(lr = 3e-4, wd = 0.1)` or name an optimizer level")
            for clause in ("reads", "reset", "init", "grad", "read", "target", "output"):
                if _stated(lv, clause) and not _causal(lv, clause):
                    diags.error("NL207", f"`{clause}` does not apply to outer level `{name}`",
                                lv.clause_span(clause))
            if lv.states:
                diags.error("NL207", f"outer level `{name}` owns the model's parameters; it declares no states",
                            lv.states[0].span)
        elif k is ir.LevelKind.OPTIMIZER:
            for clause in ("reads", "reset", "init", "grad", "target"):
                if _stated(lv, clause):
                    diags.error("NL207", f"`{clause}` does not apply to optimizer level `{name}`", lv.clause_span(clause),
                                "an optimizer level keeps one buffer per parameter, starts it at zero and "
                                "steps it once per outer step; remove the clause")
            if not lv.states and not _stated(lv, "state"):
                diags.error("NL206", f"optimizer level `{name}` has no state", lv.name_span,
                            "add `state m : elementwise` (one buffer per parameter)")
            for s in lv.states:
                if s.memory.kind != "elementwise":
                    diags.error("NL601", f"optimizer level `{name}` keeps per-parameter buffers: state "
                                f"`{s.name}` must be `elementwise`, not `{s.memory.kind}`", s.memory.span,
                                f"write `state {s.name} : elementwise`")
            if lv.rule is None and not _stated(lv, "rule"):
                diags.error("NL206", f"optimizer level `{name}` does not state its rule", lv.name_span,
                            f"optimizer rules are {', '.join(options.OPTIMIZER_RULES)}")
            if lv.rule in options.OPTIMIZER_RULE_OBJECTIVE and lv.objective is not None:
                want = options.OPTIMIZER_RULE_OBJECTIVE[lv.rule]
                if lv.objective != want:
                    diags.error("NL602", f"rule `{lv.rule}` is the optimal memory of the `{want}` objective, "
                                f"but level `{name}` states `objective {lv.objective}`",
                                lv.clause_span("objective"), f"write `objective {want}`")
            if lv.objective in options.OUTER_OBJECTIVES:
                diags.error("NL602", f"optimizer level `{name}` compresses gradients; `next_token` is not its objective",
                            lv.clause_span("objective"))
            if lv.rule == "adam" and len(lv.states) != 2:
                diags.error("NL601", f"Adam as a memory keeps two buffers (first and second moments); level "
                            f"`{name}` declares {len(lv.states)}", lv.name_span, "write `state m, v : elementwise`")
            if lv.output is not None:
                for f in lv.output.walk():
                    if f.kind == "op" and f.name not in options.OUTPUT_OPS:
                        diags.error("NL207", f"optimizer output stage `{f.name}` is not available",
                                    f.span, "optimizer levels take `output newton_schulz`")
        if k is not ir.LevelKind.OPTIMIZER:
            for flow in [b.flow for b in lv.bindings] + [lv.reads, lv.output]:
                for f in (flow.walk() if flow is not None else ()):
                    if f.kind == "op" and f.name == "newton_schulz":
                        diags.error("NL207", "`newton_schulz` orthogonalizes an optimizer level's update; it is "
                                    f"not a stage of level `{name}`", f.span)
        if _stated(lv, "read") and lv.read_mode == "causal" and k is not ir.LevelKind.IN_CONTEXT:
            diags.error("NL603", f"`read causal` has no meaning for level `{name}`, which is not updated in context",
                        lv.clause_span("read"))
        if _stated(lv, "context") and lv.context == "grads" and k is not ir.LevelKind.OPTIMIZER:
            diags.error("NL207", f"`context grads(...)` makes an optimizer level; `{name}` is not one",
                        lv.clause_span("context"))


def _causal(lv: ir.Level, clause: str) -> bool:
    """`read causal` outside an in-context level is NL603's case, not a generic NL207."""
    return clause == "read" and lv.read_mode == "causal"


def _one_memory(lv: ir.Level, diags: Diagnostics) -> None:
    if not lv.states and not _stated(lv, "state"):
        diags.error("NL206", f"level `{lv.name}` has no memory", lv.name_span, "write `level name : mlp(d) { ... }`")
    for s in lv.states:
        if s.memory.kind == "elementwise":
            diags.error("NL601", f"`elementwise` states belong to optimizer levels, not `{lv.name}`",
                        s.memory.span, "use `linear`, `mlp`, `residual_mlp` or `swiglu`")


def _check_learning(lv: ir.Level, diags: Diagnostics) -> None:
    """NL604: learnable parts whose only gradient path is through stopped writes."""
    stop = lv.grad_writes.mode == "stop"
    if not stop:
        return
    for gate in options.GATE_ARGS:
        h = lv.rule_arg(gate)
        if h is not None and h.ref and _learnable(_binding_flow(lv, h.value)):
            diags.error("NL604", f"the `{gate}` of level `{lv.name}` is produced by learnable parameters, but "
                        "`grad through writes stop` cuts their only gradient path", h.span,
                        "use `grad through writes full` or `truncate N chunks`, or make the gate a constant")
    read_refs = refs_closure(lv, lv.reads) | refs_closure(lv, lv.output)
    for role in ("key", "value"):
        f = _binding_flow(lv, role)
        if f is not None and _learnable(f) and role not in read_refs:
            diags.error("NL604", f"the `{role}` projection of level `{lv.name}` only shapes its writes, and "
                        "`grad through writes stop` cuts their gradient", lv.binding(role).span,
                        "use `grad through writes full` or `truncate N chunks`")
    if lv.init.mode == "learned" and lv.reset.mode == "never":
        diags.error("NL604", f"`init learned` of level `{lv.name}` can never learn: with `reset never` the initial "
                    "state is used once, and `grad through writes stop` cuts every later path",
                    lv.init.span if lv.init.span.start else lv.name_span,
                    "use `init zeros`, `reset per sequence`, or let gradients through writes")
    elif lv.init.mode == "learned":
        diags.warning("NL604", f"`init learned` of level `{lv.name}` learns only through the reads of each "
                      "sequence's first chunk (`grad through writes stop`)",
                      lv.init.span if lv.init.span.start else lv.name_span,
                      "use `grad through writes full` or `truncate N chunks` to meta-learn it fully")
