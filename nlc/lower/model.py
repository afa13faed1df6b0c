"""Lowering of the whole model: level classes, blocks, CMS groups, the model and its optimizers."""

from __future__ import annotations

import hashlib

from .. import ir, options
from .levels import lower_attention, lower_in_context, lower_static
from .plan import Attr, ClassPlan, Line, ModelPlan, Namespace, OptimizerPlan, camel, fail, line_comment, num

__all__ = ["lower"]

_NORMS = {"rms": "nl_ops.RMSNorm({d})", "layer": "nn.LayerNorm({d}, bias=False)", "none": "nn.Identity()"}


def _hyper(lv: ir.Level, name: str, default=None):
    """A rule argument as stated, else its default from the one table of nlc.options."""
    h = lv.rule_arg(name)
    if h is not None:
        return h.value
    for table in (options.OPTIMIZER_RULES, options.OUTER_RULES) if lv.kind is ir.LevelKind.OPTIMIZER \
            else (options.OUTER_RULES, options.OPTIMIZER_RULES):
        spec = table.get(lv.rule)
        if spec is not None and name in spec.kwargs and spec.kwargs[name][1] is not None:
            return spec.kwargs[name][1]
    return default


def _yes(v) -> bool:
    return str(v) in ("yes", "true", "True", "1")


def _optimizer_code(program: ir.Program, owner: ir.Level, rule_level: ir.Level) -> str:
    """Constructor expression (taking `groups`) for the rule of ``owner``."""
    lv = rule_level
    r = lv.rule
    lr = num(_hyper(lv, "lr", 1e-3))
    wd = num(_hyper(lv, "wd", 0.0))
    if lv.kind is ir.LevelKind.OPTIMIZER:
        out = ""
        if lv.output is not None:
            ns = [f for f in lv.output.walk() if f.kind == "op" and f.name == "newton_schulz"]
            if ns:
                out = f", output='newton_schulz', ns_steps={int(ns[0].param('_'))}"
        if r == "gd":
            return (f"nl_optim.MomentumMemory(groups, lr={lr}, decay={num(_hyper(lv, 'decay', 0.9))}, "
                    f"weight_decay={wd}, nesterov={_yes(_hyper(lv, 'nesterov', 'no'))}{out})")
        if r == "delta":
            return (f"nl_optim.DeltaMomentum(groups, lr={lr}, decay={num(_hyper(lv, 'decay', 0.9))}, "
                    f"form={str(_hyper(lv, 'form', 'nl'))!r}, weight_decay={wd}{out})")
        if r == "dmgd":
            return (f"nl_optim.DeepMomentum(groups, lr={lr}, decay={num(_hyper(lv, 'decay', 0.9))}, "
                    f"hidden={int(_hyper(lv, 'hidden', 8))}, inner_lr={num(_hyper(lv, 'inner_lr', 0.01))}, "
                    f"weight_decay={wd}{out})")
        if r == "adam":
            return (f"nl_optim.AdamMemory(groups, lr={lr}, betas=({num(_hyper(lv, 'beta1', 0.9))}, "
                    f"{num(_hyper(lv, 'beta2', 0.999))}), eps={num(_hyper(lv, 'eps', 1e-8))}, weight_decay={wd}{out})")
        if r == "m3":
            return _m3(lv, lr, wd, out)
        fail(lv.clause_span("rule"), f"optimizer rule `{r}` is not lowered")
    if r in ("adamw", "adam"):
        cls = "AdamW" if r == "adamw" else "Adam"
        return (f"torch.optim.{cls}(groups, lr={lr}, betas=({num(_hyper(lv, 'beta1', 0.9))}, "
                f"{num(_hyper(lv, 'beta2', 0.999))}), eps={num(_hyper(lv, 'eps', 1e-8))}, weight_decay={wd}, "
                f"fused=nl_model.on_cuda(params))")
    if r == "sgd":
        return (f"torch.optim.SGD(groups, lr={lr}, momentum={num(_hyper(lv, 'momentum', 0.0))}, "
                f"nesterov={_yes(_hyper(lv, 'nesterov', 'no'))}, weight_decay={wd})")
    if r == "muon":
        return (f"nl_optim.Muon(groups, lr={lr}, decay={num(_hyper(lv, 'momentum', 0.95))}, "
                f"weight_decay={wd}, ns_steps={int(_hyper(lv, 'ns_steps', 5))})")
    if r == "m3":
        return _m3(lv, lr, wd, "")
    fail(lv.clause_span("rule"), f"rule `{r}` of level `{owner.name}` is not lowered")


_M3_NAMED = ("accumulate", "precondition", "slow_sign", "slow_beta", "slow_timing", "eps_placement")


def _m3(lv, lr, wd, out) -> str:
    named = "".join(f", {k}={str(lv.rule_arg(k).value)!r}" for k in _M3_NAMED if lv.rule_arg(k) is not None)
    return (f"nl_optim.M3(groups, lr={lr}, betas=({num(_hyper(lv, 'beta1', 0.9))}, {num(_hyper(lv, 'beta2', 0.999))}, "
            f"{num(_hyper(lv, 'beta3', 0.9))}), alpha={num(_hyper(lv, 'alpha', 1.0))}, eps={num(_hyper(lv, 'eps', 1e-8))}, "
            f"ns_steps={int(_hyper(lv, 'ns_steps', 5))}, slow_period={int(_hyper(lv, 'slow', 100))}, "
            f"weight_decay={wd}{named}{out})")


def _block_plan(program, block: ir.Block, level_cls: dict, group_cls: dict, cns) -> ClassPlan:
    d = int(program.d_model)
    cls = ClassPlan(name=cns(camel(block.name) + "Block"), level=block.name, kind="block",
                    doc=[f"Block `{block.name}` ({line_comment(program, block.span).split('  ')[0]}), "
                         f"repeated {block.repeat} times: pre-norm residual sublayers x = x + f(norm(x))."],
                    is_level=False)
    attrs = Namespace()
    norm = _NORMS[block.norm].format(d=d)
    body = cls.body
    if block.generators:
        cls.attrs.append(Attr("generators", "nn.ModuleDict({" + ", ".join(
            f"{g!r}: {level_cls[g]}()" for g in block.generators) + "})",
            "levels called by other levels (knowledge transfer by generation)"))
        attrs.used.add("generators")
    for sub in block.sublayers:
        if sub.kind == "level":
            lv = program.level(sub.name)
            a = attrs(sub.name)
            n = attrs(f"{sub.name}_norm")
            gen = "self.generators" if _calls(lv) else ""
            cls.attrs.append(Attr(n, norm))
            cls.attrs.append(Attr(a, f"{level_cls[sub.name]}({gen})", line_comment(program, lv.name_span)))
            body.append(Line(f"x = x + self.{a}(self.{n}(x))"))
            continue
        g = program.cms_group(sub.name)
        if g.variant == "independent":
            a = attrs(g.name)
            n = attrs(f"{g.name}_norm")
            cls.attrs.append(Attr(n, norm))
            cls.attrs.append(Attr(a, f"{group_cls[g.name]}()", line_comment(program, g.span)))
            body.append(Line(f"x = x + self.{a}(self.{n}(x))  # CMS {g.name}: independent"))
            continue
        prev_states = None
        for i, name in enumerate(g.levels):
            lv = program.level(name)
            a = attrs(name)
            n = attrs(f"{name}_norm")
            cls.attrs.append(Attr(n, norm))
            cls.attrs.append(Attr(a, f"{level_cls[name]}()", line_comment(program, lv.name_span)))
            nested = g.variant == "nested"
            has_child = nested and i + 1 < len(g.levels) and program.level(g.levels[i + 1]).kind is ir.LevelKind.IN_CONTEXT
            comment = f"CMS {g.name}: {g.variant}" if i == 0 else ""
            call_args = f"self.{n}(x)"
            if nested and prev_states is not None and lv.kind is ir.LevelKind.IN_CONTEXT:
                call_args += f", start_states={prev_states}"
            if has_child and lv.kind is ir.LevelKind.IN_CONTEXT:
                states = f"{name}_states"
                body.append(Line(f"h, {states} = self.{a}({call_args}, keep_chunk_states=True)", 0, comment))
                body.append(Line("x = x + h"))
                prev_states = states
            else:
                body.append(Line(f"x = x + self.{a}({call_args})", 0, comment))
                prev_states = None
    body.append(Line("return x"))
    return cls


def _calls(lv: ir.Level) -> bool:
    flows = [b.flow for b in lv.bindings] + [lv.reads, lv.output]
    return any(f.kind == "call" for fl in flows if fl is not None for f in fl.walk())


def _group_plan(program, g: ir.CmsGroup, level_cls: dict, cns) -> ClassPlan:
    cls = ClassPlan(name=cns(camel(g.name) + "Group"), level=g.name, kind="cms",
                    doc=[f"CMS `{g.name}` (independent, paper eq 74): levels {', '.join(g.levels)} run on the "
                         f"same input; outputs aggregated by {g.agg}."], is_level=False)
    k = len(g.levels)
    for name in g.levels:
        cls.attrs.append(Attr(name, f"{level_cls[name]}()", line_comment(program, program.level(name).name_span)))
    if g.agg == "learned":
        cls.attrs.append(Attr("agg", f"nn.Parameter(torch.full(({k},), {1.0 / k!r}))", "learned weights of the sum"))
        terms = [f"self.agg[{i}] * self.{n}(x)" for i, n in enumerate(g.levels)]
        cls.body.append(Line("return " + " + ".join(terms)))
    elif g.agg == "mean":
        cls.body.append(Line("return (" + " + ".join(f"self.{n}(x)" for n in g.levels) + f") / {k}"))
    else:
        cls.body.append(Line("return " + " + ".join(f"self.{n}(x)" for n in g.levels)))
    return cls


def lower(program: ir.Program) -> ModelPlan:
    """Lower a verified program to the plan the model template prints."""
    cns = Namespace({"Model", "ModelConfig", "SPEC", "LEVELS", "build_optimizers", "optimizer_periods"})
    consts: list[tuple[str, str, str]] = []
    classes: list[ClassPlan] = []
    level_cls: dict[str, str] = {}
    d = int(program.d_model)
    parents: dict[str, ir.Level] = {}
    for g in program.cms:
        if g.variant == "nested":
            for a, b in zip(g.levels, g.levels[1:]):
                parents[b] = program.level(a)
    for lv in program.levels:
        if lv.block is None:
            continue
        if lv.init.mode == "from" and lv.name not in parents:
            fail(lv.init.span, f"`init from {lv.init.source}` is lowered inside a nested CMS group only")
        if lv.kind is ir.LevelKind.IN_CONTEXT:
            plan = lower_in_context(program, lv, consts, cns, parents.get(lv.name))
        elif lv.kind is ir.LevelKind.ATTENTION:
            plan = lower_attention(program, lv, d, cns)
        else:
            plan = lower_static(program, lv, consts, cns)
        if _calls(lv):
            plan.doc.append("Called levels (generators) are shared with the block.")
        classes.append(plan)
        level_cls[lv.name] = plan.name
    group_cls = {}
    for g in program.cms:
        if g.variant == "independent":
            plan = _group_plan(program, g, level_cls, cns)
            classes.append(plan)
            group_cls[g.name] = plan.name
    blocks = []
    for b in program.blocks:
        plan = _block_plan(program, b, level_cls, group_cls, cns)
        classes.append(plan)
        blocks.append((b.name, plan.name, b.repeat, line_comment(program, b.span)))

    outer = program.level(program.outer)
    optimizers = []
    rule_level = program.level(outer.rule) if program.level(outer.rule) is not None else outer
    optimizers.append(OptimizerPlan(outer.name, _optimizer_code(program, outer, rule_level), outer.period.every,
                                    "outer", line_comment(program, rule_level.clause_span("rule")),
                                    num(_hyper(rule_level, "wd", 0.0))))
    steps_groups = [lv.name for lv in program.levels if lv.kind is ir.LevelKind.STEPS_GROUP]
    for name in steps_groups:
        lv = program.level(name)
        rl = lv if lv.rule else rule_level
        if rl is lv and program.level(lv.rule) is not None:
            rl = program.level(lv.rule)
        optimizers.append(OptimizerPlan(name, _optimizer_code(program, lv, rl), lv.period.every, name,
                                        line_comment(program, lv.period.span), num(_hyper(rl, "wd", 0.0))))
    frozen = [lv.name for lv in program.levels if lv.kind is ir.LevelKind.FROZEN]
    src = program.source.text if program.source is not None else ""
    spec_file = (program.source.name if program.source else "spec.nl").replace("\\", "/").rsplit("/", 1)[-1]
    seq = program.seq or 256
    table = []
    for lv in program.levels:
        mem = lv.primary.memory.describe() if lv.primary is not None else "-"
        rule = lv.rule or "-"
        table.append(f"{lv.name:<12} {lv.kind.value:<12} {str(lv.period):<18} {mem[:40]:<40} {rule}")
    return ModelPlan(
        name=program.name,
        spec_file=spec_file,
        spec_hash=hashlib.sha256(src.encode("utf-8")).hexdigest(),
        doc_table=table,
        consts=consts,
        classes=classes,
        blocks=blocks,
        config=[],
        dims=[(k, num(v)) for k, v in program.dims],
        head=program.head,
        final_norm=_NORMS[program.final_norm].format(d=d),
        vocab=int(program.vocab),
        d_model=d,
        seq_len=seq,
        optimizers=optimizers,
        level_kinds=[(lv.name, lv.kind.value, str(lv.period), "") for lv in program.levels],
        defaults={"lr": float(_hyper(rule_level, "lr", 1e-3)), "seq_len": seq},
        steps_groups=steps_groups,
        frozen=frozen,
        embed_comment=line_comment(program, program.embed_span),
    )
