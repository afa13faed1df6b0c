"""AST to IR: names, defaults, option validation, dimension evaluation, flow typing.

Resolution never stops at the first problem: it records a diagnostic, substitutes a neutral
value and goes on, so one run reports every independent error. Checks that need the whole
program (graph structure, frequency order, shapes across levels) are in :mod:`nlc.verify`.

Decisions written down here (the language reference repeats them):

* A level with a memory after ':' (``level fast : mlp(d)``) has one state named like the
  level; its ``key``, ``value`` and ``query`` default to the level's input.
* In a level with several states, ``reads`` names what the level outputs; with one state it
  defaults to ``state(query)``.
* ``let key``, ``let value``, ``let query`` are the level's training keys, training values and
  read queries; every state is trained on (key, value), or on (key, M(value)) with
  ``target self`` (paper eq 83-85).
* A bare stage (``linear(d -> dh)``, ``l2norm``) at the start of a flow applies to the implicit
  input: the level input in ``let``/``reads``, the merged read in ``output``.
"""

from __future__ import annotations

from dataclasses import replace

from .. import ast, ir, options
from ..diagnostics import Diagnostics, allowed, did_you_mean
from ..source import SourceFile, Span
from .levels import _check_ident, _level
from .values import _Ctx, _dims, _eval, _name_value, _split_args

__all__ = ["resolve"]


def _all_levels(model: ast.Model) -> dict[str, ast.Level]:
    out: dict[str, ast.Level] = {}
    for it in model.items:
        if isinstance(it, ast.Level):
            out.setdefault(it.name.text, it)
        elif isinstance(it, ast.Block):
            for b in it.items:
                if isinstance(b, ast.Level):
                    out.setdefault(b.name.text, b)
                elif isinstance(b, ast.Cms):
                    for lv in b.levels:
                        out.setdefault(lv.name.text, lv)
    return out


def _nest(ctx: _Ctx, levels: list[ir.Level], names: list[str]) -> None:
    """Nested CMS (eq 72): each level after the first starts from the previous one's state and is
    re-initialised whenever that level updates. Unstated, these are filled in; stated, they must
    agree."""
    index = {lv.name: i for i, lv in enumerate(levels)}
    for parent_name, child_name in zip(names, names[1:]):
        parent, child = levels[index[parent_name]], levels[index[child_name]]
        if child.kind is not ir.LevelKind.IN_CONTEXT:
            continue
        pe, ce = parent.period.every, child.period.every
        if parent.kind is ir.LevelKind.IN_CONTEXT and pe and ce and (ce > pe or pe % ce):
            continue  # listed out of order or periods not divisible: the schedule pass says so once
        stated = dict(child.clause_spans)
        init, reset = child.init, child.reset
        if "init" in stated:
            if not (init.mode == "from" and init.source == parent.name):
                ctx.err("NL207", f"in a nested CMS, `{child.name}` starts from `{parent.name}`'s state; "
                        f"its `init {init}` contradicts that", stated["init"],
                        f"write `init from {parent.name}` or use a sequential CMS")
        else:
            init = ir.Init("from", parent.name, span=child.name_span)
        if parent.kind is ir.LevelKind.IN_CONTEXT and parent.period.every:
            want = parent.period.every
            if "reset" in stated:
                if not (reset.mode == "every" and reset.every == want):
                    ctx.err("NL207", f"in a nested CMS, `{child.name}` is re-initialised whenever `{parent.name}` "
                            f"updates: its reset must be `every {want} tokens`", stated["reset"])
            else:
                reset = ir.Reset("every", want, span=child.name_span)
        levels[index[child_name]] = replace(child, init=init, reset=reset)


def resolve(spec: ast.Spec, source: SourceFile, diags: Diagnostics) -> ir.Program:
    """Resolve a parsed spec into a :class:`~nlc.ir.Program`, appending diagnostics."""
    ctx = _Ctx(source, diags)
    model = spec.model
    # first pass: dims and memory templates (usable from anywhere)
    dims_nodes = [it for it in model.items if isinstance(it, ast.Dims)]
    for extra in dims_nodes[1:]:
        ctx.err("NL209", "a model has one `dims` block", extra.span, "merge the dims blocks",
                notes=[(dims_nodes[0].span, "first dims block")])
    if dims_nodes:
        _dims(ctx, dims_nodes[0])
    for it in model.items:
        if isinstance(it, ast.MemoryDef):
            n = it.name.text
            if n in ctx.templates or n in options.MEMORY_KINDS:
                ctx.err("NL202", f"memory `{n}` is already defined", it.name.span,
                        "a built-in constructor" if n in options.MEMORY_KINDS else "rename one of the templates")
                continue
            ctx.templates[n] = it

    all_levels = _all_levels(model)
    seen_names: dict[str, Span] = {}

    def claim(ident: ast.Ident, what: str) -> bool:
        if ident.text in seen_names:
            ctx.err("NL202", f"{what} `{ident.text}` is already defined", ident.span,
                    notes=[(seen_names[ident.text], "first defined here")])
            return False
        _check_ident(ctx, ident, what)
        seen_names[ident.text] = ident.span
        return True

    vocab = d_model = None
    embed_span = model.span
    head = "tied"
    final_norm = "rms"
    singles: dict[type, ast.Stmt] = {}
    blocks: list[ir.Block] = []
    cms_groups: list[ir.CmsGroup] = []
    levels: list[ir.Level] = []
    edges: list[ir.Edge] = []
    calls: list[tuple[str, str, Span]] = []

    for it in model.items:
        if isinstance(it, (ast.Embed, ast.Head, ast.Norm)):
            if type(it) in singles:
                ctx.err("NL209", f"the model states `{type(it).__name__.lower()}` twice", it.span,
                        notes=[(singles[type(it)].span, "first stated here")])
                continue
            singles[type(it)] = it
        if isinstance(it, ast.Embed):
            vocab = _eval(ctx, it.vocab, {}, "dimension")
            d_model = _eval(ctx, it.dim, {}, "dimension")
            embed_span = it.span
        elif isinstance(it, ast.Head):
            if it.mode.text in options.HEADS:
                head = it.mode.text
            else:
                ctx.err("NL204", f"`head {it.mode.text}` is not a head mode{did_you_mean(it.mode.text, options.HEADS)}",
                        it.mode.span, "head is `tied` (shares the embedding) or `untied`")
        elif isinstance(it, ast.Norm):
            if it.kind.text in options.NORMS:
                final_norm = it.kind.text
            else:
                ctx.err("NL204", f"unknown norm `{it.kind.text}`{did_you_mean(it.kind.text, options.NORMS)}",
                        it.kind.span, f"norms are {allowed(options.NORMS)}")

    for it in model.items:
        if isinstance(it, ast.Block):
            if not claim(it.name, "block"):
                continue
            repeat = 1
            if it.repeat is not None:
                rv = _eval(ctx, it.repeat, {}, "dimension")
                if rv is not None:
                    if not rv.is_Integer:
                        ctx.err("NL301", f"block repeat count {rv} is not an integer", it.repeat.span,
                                "a block is repeated a whole number of times")
                    elif rv < 1:
                        ctx.err("NL302", f"block repeat count must be >= 1, got {rv}", it.repeat.span,
                                "a block is repeated at least once; to remove it, delete the block")
                    else:
                        repeat = int(rv)
            norm = "rms"
            sublayers: list[ir.Sublayer] = []
            block_seen: dict[str, ast.Level] = {}
            norm_seen = None
            for b in it.items:
                if isinstance(b, ast.Norm):
                    if norm_seen is not None:
                        ctx.err("NL209", f"block `{it.name.text}` states its norm twice", b.span)
                    norm_seen = b
                    if b.kind.text in options.NORMS:
                        norm = b.kind.text
                    else:
                        ctx.err("NL204", f"unknown norm `{b.kind.text}`{did_you_mean(b.kind.text, options.NORMS)}",
                                b.kind.span, f"norms are {allowed(options.NORMS)}")
                elif isinstance(b, ast.Level):
                    if not claim(b.name, "level"):
                        continue
                    res = _level(ctx, b, ("block", it.name.text), d_model, block_seen, all_levels)
                    block_seen[b.name.text] = b
                    if res is None:
                        continue
                    lvl, called = res
                    levels.append(lvl)
                    sublayers.append(ir.Sublayer("level", lvl.name, b.span))
                    for callee, span in called:
                        calls.append((callee, lvl.name, span))
                elif isinstance(b, ast.Cms):
                    if not claim(b.name, "CMS group"):
                        continue
                    variant = b.variant.text
                    if variant not in options.CMS_VARIANTS:
                        ctx.err("NL204", f"unknown CMS variant `{variant}`{did_you_mean(variant, options.CMS_VARIANTS)}",
                                b.variant.span, f"CMS variants are {allowed(options.CMS_VARIANTS)}")
                        variant = "sequential"
                    agg = "sum"
                    pos, kw = _split_args(b.args)
                    if pos:
                        ctx.err("NL205", "CMS options are keyword arguments, e.g. `independent(agg = sum)`",
                                pos[0].span)
                    for k, a in kw.items():
                        if k != "agg":
                            ctx.err("NL203", f"unknown CMS option `{k}`{did_you_mean(k, ['agg'])}", a.name.span)
                        elif variant != "independent":
                            ctx.err("NL207", f"`agg` applies to independent CMS groups, not {variant}", a.span,
                                    f"remove `agg`, or write `cms {b.name.text} independent(agg = ...)`")
                        else:
                            agg = _name_value(ctx, a.value, options.CMS_AGG, "CMS aggregation") or "sum"
                    names = []
                    for lv in b.levels:
                        if not claim(lv.name, "level"):
                            continue
                        res = _level(ctx, lv, ("block", it.name.text, "cms", b.name.text), d_model,
                                     block_seen, all_levels)
                        block_seen[lv.name.text] = lv
                        if res is None:
                            continue
                        lvl, called = res
                        levels.append(lvl)
                        names.append(lvl.name)
                        for callee, span in called:
                            calls.append((callee, lvl.name, span))
                    if not b.levels:
                        ctx.err("NL206", f"CMS group `{b.name.text}` has no levels", b.name.span,
                                "add its levels, e.g. `level fast : mlp(d) { ... every 16 tokens }`, or delete it")
                    if variant == "nested":
                        _nest(ctx, levels, names)
                    cms_groups.append(ir.CmsGroup(b.name.text, variant, tuple(names), agg, b.span))
                    sublayers.append(ir.Sublayer("cms", b.name.text, b.span))
            # levels that other levels call are generators, not residual sublayers
            generator_names = {c for c, _, _ in calls if c in block_seen}
            subl = tuple(s for s in sublayers if not (s.kind == "level" and s.name in generator_names))
            blocks.append(ir.Block(it.name.text, repeat, norm, subl, tuple(sorted(generator_names)), it.span))
        elif isinstance(it, ast.Level):
            if not claim(it.name, "level"):
                continue
            res = _level(ctx, it, ("model",), d_model, {}, all_levels)
            if res is not None:
                levels.append(res[0])

    for callee, caller, span in calls:
        edges.append(ir.Edge(callee, caller, ir.EdgeKind.GENERATES, "generates", span))

    outer = [lv.name for lv in levels if lv.kind is ir.LevelKind.OUTER]
    dims = tuple(ctx.dims.items())
    program = ir.Program(
        name=model.name.text, source=source, span=model.span, dims=dims,
        dim_spans=tuple(ctx.dim_spans.items()), vocab=vocab, d_model=d_model,
        embed_span=embed_span, head=head, final_norm=final_norm, blocks=tuple(blocks),
        cms=tuple(cms_groups), levels=tuple(levels), outer=outer[0] if outer else None,
        edges=tuple(edges),
    )
    # structural requirements
    missing = []
    if not dims_nodes:
        missing.append("`dims { ... }`")
    if ast.Embed not in singles:
        missing.append("`embed vocab -> d`")
    if not blocks:
        missing.append("a `block`")
    if ast.Head not in singles:
        missing.append("`head tied|untied`")
    if not outer:
        missing.append("an outer level (`level pretrain { objective next_token ... every 1 steps }`)")
    if missing:
        ctx.err("NL505", f"model `{model.name.text}` is missing {', '.join(missing)}", model.name.span)
    if len(outer) > 1:
        for name in outer[1:]:
            lv = program.level(name)
            ctx.err("NL202", f"model has more than one outer level (`{outer[0]}` and `{name}`)", lv.name_span,
                    "keep one pre-training level; other step-levels go in blocks or are optimizer levels")
    return program
