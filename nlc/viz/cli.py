"""``nlc viz FILE [-o OUT]``: draw a spec's levels, its schedule, or a report page.

The output's extension picks the format (``.svg``, ``.dot``/``.gv``, ``.mmd``, ``.html``,
``.png``, ``.md``); ``--format`` overrides it, and without ``-o`` a text format is printed to
standard output (DOT by default). ``--schedule`` draws the schedule instead of the level
diagram (svg or png; the html report holds both). Exit codes follow ``nlc``: 0 done, 1 the
spec has errors (printed as diagnostics), 2 usage errors, including a PNG asked for where no
renderer exists (the message names the alternatives).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "cmd_viz"]


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens, got `{text}`") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"the sequence length must be at least 1, got {v}")
    return v


def add_parser(subparsers) -> argparse.ArgumentParser:
    from . import FORMATS

    p = subparsers.add_parser(
        "viz", help="draw the level diagram, the schedule or an HTML report of a spec",
        description="Draw a spec's levels nested by update frequency (svg, dot, mmd, png), its schedule "
                    "(--schedule), the level table (md), or one self-contained HTML report with all of them.")
    p.add_argument("file", metavar="FILE", help="the .nl spec")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="output file; its extension picks the format (.svg .dot .mmd .png .html .md)")
    p.add_argument("--format", choices=FORMATS + ("mermaid",), help="format, overriding the extension")
    p.add_argument("--schedule", action="store_true",
                   help="draw the schedule (when each level reads, updates, resets) instead of the diagram")
    p.add_argument("--seq", type=_positive, metavar="N",
                   help="sequence length in tokens for the schedule (default: the spec's `seq` dim)")
    p.add_argument("--no-code", action="store_true", help="html: leave out the generated code")
    p.set_defaults(func=cmd_viz)
    return p


def _print_diags(diags, result) -> None:
    from ..diagnostics import render

    sources = {result.source.name: result.source} if result.source else {}
    text = render(list(diags), sources)
    if text:
        print(text, file=sys.stderr)


def cmd_viz(args) -> int:
    from ..pipeline import check_file
    from . import PngUnavailable, VizError, format_for, render, write

    try:
        fmt = args.format or (format_for(args.output) if args.output else "dot")
    except VizError as e:
        print(f"nlc viz: {e}", file=sys.stderr)
        return 2
    if fmt == "png" and not args.output:
        print("nlc viz: PNG is binary: write it to a file with -o OUT.png", file=sys.stderr)
        return 2
    result = check_file(args.file)
    if not result.ok:
        _print_diags(result.diagnostics, result)
        return 1
    warnings = [d for d in result.diagnostics if not d.is_error]
    if warnings:
        _print_diags(warnings, result)
    code = not args.no_code
    try:
        if args.output:
            path = write(result.program, args.output, fmt=fmt, schedule=args.schedule, seq=args.seq, code=code,
                         diagnostics=warnings)
            print(f"wrote {path}", file=sys.stderr)
        else:
            sys.stdout.write(render(result.program, fmt, schedule=args.schedule, seq=args.seq, code=code))
    except (VizError, PngUnavailable) as e:
        print(f"nlc viz: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"nlc viz: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0
