"""The ``nlc`` command line.

Exit codes (a contract other tools rely on): 0 success; 1 a spec has errors, each printed as
``file:line:col: NL123 message`` with the source line, a caret and a hint; 2 usage errors (bad
flags: NL901) and, for ``train``/``eval``, unusable data (NL902) or checkpoints (NL903).

Commands load their heavy dependencies (torch) only when they need them, so ``nlc check`` and
``nlc fmt`` start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from .diagnostics import Diagnostic, SettingError, render, to_json

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: code NL901, exit 2, no traceback
        self.print_usage(sys.stderr)
        print(f"nlc: error: NL901 {message}", file=sys.stderr)
        print(f"  hint: see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def _print_diags(diags, sources, fmt: str, stream) -> None:
    if fmt == "json":
        return
    text = render(diags, sources)
    if text:
        print(text, file=stream)


# ---- check ---------------------------------------------------------------------------------------


def cmd_check(args) -> int:
    from .pipeline import check_file

    all_diags: list[Diagnostic] = []
    sources = {}
    failed = 0
    for path in args.files:
        result = check_file(path)
        if result.source is not None:
            sources[result.source.name] = result.source
        all_diags.extend(result.diagnostics)
        if not result.ok:
            failed += 1
    if args.format == "json":
        print(to_json(all_diags))
    else:
        _print_diags(all_diags, sources, "text", sys.stdout)
        n_err = sum(d.is_error for d in all_diags)
        n_warn = len(all_diags) - n_err
        if not args.quiet:
            status = "ok" if not failed else f"{failed} of {len(args.files)} spec(s) invalid"
            extra = f", {n_err} error(s)" if n_err else ""
            extra += f", {n_warn} warning(s)" if n_warn else ""
            print(f"nlc check: {len(args.files)} spec(s), {status}{extra}", file=sys.stderr)
    return 1 if failed else 0


# ---- fmt -----------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cmd_fmt(args) -> int:
    from .diagnostics import SpecError
    from .parser import parse_source
    from .pipeline import load_source
    from .printer import print_spec

    status = 0
    changed = []
    for path in args.files:
        source, problem = load_source(path)
        if problem is not None:
            _print_diags([problem], {}, "text", sys.stderr)
            status = 1
            continue
        try:
            spec = parse_source(source)
        except SpecError as e:
            _print_diags(e.diagnostics, {source.name: source}, "text", sys.stderr)
            status = 1
            continue
        text = print_spec(spec)
        if text != source.text:
            changed.append(path)
        if args.write:
            if text != source.text:
                _atomic_write(Path(path), text)
        elif not args.check:
            sys.stdout.write(text)
    if args.check and changed:
        for p in changed:
            print(f"would reformat {p}", file=sys.stderr)
        return 1
    return status


# ---- compile -------------------------------------------------------------------------------------


def cmd_compile(args) -> int:
    from .pipeline import check_file

    result = check_file(args.file)
    sources = {result.source.name: result.source} if result.source else {}
    if not result.ok:
        _print_diags(result.diagnostics, sources, "text", sys.stderr)
        return 1
    warnings = [d for d in result.diagnostics if not d.is_error]
    if warnings:
        _print_diags(warnings, sources, "text", sys.stderr)
    if args.emit in ("ast", "ir") and args.output:
        print(f"nlc: error: NL901 --emit {args.emit} prints to stdout; -o DIR writes model.py and train.py "
              "(hint: drop one of them)", file=sys.stderr)
        return 2
    if args.emit == "ast":
        from .dump import dump_ast

        sys.stdout.write(dump_ast(result.ast))
        return 0
    if args.emit == "ir":
        from .dump import dump_ir

        sys.stdout.write(dump_ir(result.program))
        return 0
    from .codegen import compile_program, write_package
    from .diagnostics import CodegenError

    try:
        if args.emit == "py" and not args.output:
            sys.stdout.write(compile_program(result.program).model_source)
            return 0
        out = Path(args.output or ".")
        paths = write_package(result.program, out)
    except CodegenError as e:
        _print_diags(e.diagnostics, sources, "text", sys.stderr)
        return 1
    except OSError as e:
        print(f"nlc: error: NL901 cannot write {args.output or '.'}: {e.strerror or e}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)
    return 0


# ---- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nlc", description="The Nested Learning compiler.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"nlc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    c = sub.add_parser("check", help="check specs and print their diagnostics")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("--format", choices=("text", "json"), default="text")
    c.add_argument("-q", "--quiet", action="store_true", help="print only diagnostics")
    c.set_defaults(func=cmd_check)

    f = sub.add_parser("fmt", help="print specs in canonical form")
    f.add_argument("files", nargs="+", metavar="FILE")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 1 if a file is not canonical")
    g.add_argument("--write", action="store_true", help="rewrite files in place")
    f.set_defaults(func=cmd_fmt)

    k = sub.add_parser("compile", help="compile a spec (or dump its AST/IR)")
    k.add_argument("file", metavar="FILE")
    k.add_argument("--emit", choices=("ast", "ir", "py", "package"), default="package",
                   help="ast, ir or py print to stdout; package (default) writes model.py and train.py")
    k.add_argument("-o", "--output", metavar="DIR", help="folder for model.py and train.py")
    k.set_defaults(func=cmd_compile)

    for extra in _extra_commands():
        extra(sub)
    return p


def _extra_commands():
    """Subcommands defined in their own modules: train and eval, viz, bench."""
    from . import bench, train_cli
    from .viz import cli as viz_cli

    return [train_cli.add_parser, viz_cli.add_parser, bench.add_parser]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("nlc: interrupted", file=sys.stderr)
        return 130
    except SettingError as e:  # an NLC_* environment variable, read where it is used
        print(f"nlc: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
