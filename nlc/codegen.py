"""Code generation: the lowered plan printed through jinja2 templates into Python source.

* Templates live in ``codegen_templates/`` (found by :mod:`nlc._resources`) and are rendered with
  ``StrictUndefined``: a missing plan field is an error, never an empty string.
* The output is deterministic (same spec → same bytes), parsed with :func:`ast.parse` before it
  is returned, wrapped to 100 columns where a statement can be split, and carries
  ``# <spec>.nl:LINE`` comments.
* :func:`load_program` executes the generated module under a synthetic file name registered in
  :mod:`linecache`, so tracebacks and ``inspect`` show the generated lines.
"""

from __future__ import annotations

import ast as pyast
import functools
import linecache
import os
import re
import sys
import tempfile
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import jinja2

from . import ir
from ._resources import templates_dir
from .lower import ModelPlan, lower

__all__ = ["CompiledSpec", "compile_program", "write_package", "load_program", "render_train"]

WIDTH = 100


@dataclass(frozen=True)
class CompiledSpec:
    """The generated sources of one spec."""

    program: ir.Program
    plan: ModelPlan
    model_source: str
    train_source: str

    @property
    def module_name(self) -> str:
        return f"nlc_generated_{self.plan.name}"


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["py"] = _py_literal
    return env


def _py_literal(v) -> str:
    """A Python literal for template values (strings are escaped by repr: no injection)."""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (str, int, list, tuple, dict, bool)) or v is None:
        return repr(v)
    raise TypeError(f"not a template literal: {v!r}")


# ---- line wrapping ----------------------------------------------------------------------------------


def _split_top(args: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in args:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    tail = "".join(cur).strip()
    if tail:
        parts.append(tail)
    return parts


def wrap(indent: str, code: str, comment: str = "") -> list[str]:
    """One statement as lines of at most WIDTH columns where possible (black-like call split)."""
    one = f"{indent}{code}" + (f"  # {comment}" if comment else "")
    if len(one) <= WIDTH:
        return [one]
    lines = [f"{indent}# {comment}"] if comment else []
    if len(indent) + len(code) <= WIDTH:
        return lines + [indent + code]
    # split the first bracket (a call, a grouping or a dict) whose contents run to the end
    m = re.search(r"[({]", code)
    closing = {"(": ")", "{": "}"}
    if not m or not code.rstrip().endswith(closing[m.group(0)]):
        return lines + [indent + code]
    head, inner = code[: m.end()], code[m.end():-1]
    depth = 0
    for ch in inner:  # the opening paren must close at the very end
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth < 0:
            return lines + [indent + code]
    is_call = m.group(0) == "{" or (m.start() > 0 and (code[m.start() - 1].isalnum() or code[m.start() - 1] in "_.])"))
    parts = _split_top(inner)
    if not is_call and len(parts) < 2:  # a grouping paren: no trailing comma (it would make a tuple)
        return lines + [indent + head] + wrap(indent + "    ", inner) + [indent + ")"]
    out = [indent + head]
    for a in parts:
        out.extend(wrap(indent + "    ", a + ","))
    out.append(indent + closing[m.group(0)])
    return lines + out


# ---- rendering --------------------------------------------------------------------------------------


def _prepare(plan: ModelPlan) -> None:
    """Attach printable lines to each class plan (indentation is added by the template)."""
    plan.const_lines = [ln for name, code, comment in plan.consts for ln in wrap("", f"{name} = {code}", comment)]
    for opt in plan.optimizers:
        opt.lines = wrap("    ", f"optimizer = {opt.code}", opt.comment)
    for cls in plan.classes:
        cls.uses_generators = any("generators[" in a.code for a in cls.attrs)
        for a in cls.attrs:
            a.lines = wrap(" " * 8, f"self.{a.name} = {a.code}", a.comment)
        cls.lines = [w for ln in cls.body for w in wrap(" " * (8 + 4 * ln.depth), ln.code, ln.comment)]
        cls.method_lines = [
            (name, args, doc, [w for ln in body for w in wrap(" " * (8 + 4 * ln.depth), ln.code, ln.comment)])
            for name, args, doc, body in cls.methods
        ]
        cls.doc = [w for d in cls.doc for w in textwrap.wrap(d, WIDTH - 8, subsequent_indent="    ")] or [""]
        if cls.is_level and cls.kind == "in_context":
            persist = next((a.code for a in cls.attrs if a.name == "persist"), "False")
            cls.class_consts = list(cls.class_consts) + [("reset_never", persist)]
        cls.const_lines = [w for k, v in cls.class_consts for w in wrap("    ", f"{k} = {v}")]


def _finish(source: str, what: str) -> str:
    source = re.sub(r"\n{4,}", "\n\n\n", source).rstrip() + "\n"
    source = "\n".join(line.rstrip() for line in source.splitlines()) + "\n"
    try:
        pyast.parse(source)
    except SyntaxError as e:  # a bug in nlc, not in the spec
        raise RuntimeError(f"nlc generated invalid Python for {what} (line {e.lineno}: {e.msg})") from e
    return source


_RUNTIME = (("chunk", "nl_chunk"), ("chunks", "nl_chunks"), ("flows", "nl_flows"), ("memories", "nl_mem"),
            ("model", "nl_model"), ("ops", "nl_ops"), ("optim", "nl_optim"))


def render_model(plan: ModelPlan) -> str:
    _prepare(plan)
    source = _env().get_template("model.py.j2").render(plan=plan)
    used = [f"from nlc.runtime import {mod} as {alias}" for mod, alias in _RUNTIME
            if re.search(rf"\b{alias}\.", source)]  # import only the runtime modules the model uses
    return _finish(source.replace("@@RUNTIME_IMPORTS@@", "\n".join(used)), "model.py")


def render_train(plan: ModelPlan) -> str:
    """The standalone training script next to model.py (template from codegen_templates/)."""
    tmpl = _env().get_template("train.py.j2")
    return _finish(
        tmpl.render(
            spec_name=plan.name,
            spec_path=plan.spec_file,
            defaults={"lr": plan.defaults["lr"], "seq_len": plan.seq_len, "batch_size": 8, "steps": 200},
        ),
        "train.py",
    )


def compile_program(program: ir.Program) -> CompiledSpec:
    """Lower and render a verified program. Raises CodegenError (NL904) for unlowered constructs."""
    plan = lower(program)
    return CompiledSpec(program, plan, render_model(plan), render_train(plan))


def write_package(program: ir.Program, out_dir: str | Path, compiled: CompiledSpec | None = None) -> list[Path]:
    """Write model.py and train.py (and the spec) into ``out_dir``; returns the paths written.

    Each file is written atomically (a temporary file in the folder, then renamed), readable by all.
    """
    compiled = compiled or compile_program(program)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    files = {"model.py": compiled.model_source, "train.py": compiled.train_source}
    if program.source is not None:
        files[compiled.plan.spec_file] = program.source.text
    for name, text in files.items():
        path = out / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=str(out))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        written.append(path)
    return written


def load_program(program: ir.Program) -> type:
    """Generate and import the model module; returns its ``Model`` class.

    The module (with ``ModelConfig``, ``build_optimizers``, ``SPEC`` …) is ``Model.__module__``
    in ``sys.modules``; its source is registered in linecache under ``<nlc:SPEC.nl>``.
    """
    compiled = compile_program(program)
    return load_source(compiled.model_source, compiled.module_name, compiled.plan.spec_file).Model


def load_source(source: str, module_name: str, spec_file: str) -> types.ModuleType:
    filename = f"<nlc:{spec_file}:model.py>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType(module_name)
    module.__file__ = filename
    sys.modules[module_name] = module
    code = compile(source, filename, "exec")
    exec(code, module.__dict__)
    return module
