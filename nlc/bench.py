"""``nlc bench``: training throughput, MFU, peak memory and compile cost of a spec.

``nlc bench SPEC [--dims d=768,layers=12] [--batch-size 8] [--seq-len 2048] ...`` compiles the
spec (with its ``dims`` block overridden), builds the generated model and its optimizers exactly
as the generated ``train.py`` does (``torch.compile(model, fullgraph=True)`` on CUDA, bf16
autocast, the optimizers of ``build_optimizers``), and times full training steps — forward,
backward and every optimizer step — on random tokens. It prints a table (card, torch and triton
versions, date) and writes the same numbers as JSON with ``--json PATH``.

What it measures (``docs/benchmarks.md`` has the definitions and formulas):

* step time: CUDA events around each step after the warm-up (a host clock on the CPU), median,
  p10 and p90; tokens/s = batch × sequence / step time;
* peak memory (``torch.cuda.max_memory_allocated``) over the timed steps;
* FLOPs per token, two ways: ``6N`` (N = trainable parameters, the token embedding counted only
  as a tied head), and the model count ``6·N_dense + attention + in-context inner loops``, the
  inner loops counted analytically from the IR (:func:`level_flops`);
* MFU against the dense bf16 peak of an H100 (989.4 TFLOP/s; 494.7 for fp32, which runs on TF32
  tensor cores) and against an 8192³ GEMM measured in the same process;
* compile cost: the cold compile (an empty inductor cache in a fresh temporary folder), the warm
  compile (``torch._dynamo.reset()`` then the same compile with that cache), whether
  ``fullgraph=True`` holds (else the graph breaks of a ``fullgraph=False`` compile) and the
  recompiles during the timed steps.

Python API: :func:`run_bench` returns the JSON dict. The FLOP counts live in ``nlc.flops``
(:func:`count_flops`, :func:`level_flops`), the environment, ceilings and step statistics in
``nlc.measure`` (:func:`environment`, :func:`measure_ceilings`, :func:`time_calls`); this module
re-exports them, and ``benchmarks/peers.py`` reuses them with :func:`load_spec`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .flops import (
    attention_flops,
    chunk_step_flops,
    chunk_steps_per_forward,
    count_flops,
    level_flops,
    memory_flops,
)
from .measure import (
    PEAK_TFLOPS,
    _sync,
    environment,
    measure_ceilings,
    mfu_block,
    step_stats,
    time_calls,
)

__all__ = [
    "PEAK_TFLOPS",
    "add_parser",
    "apply_dims",
    "attention_flops",
    "chunk_step_flops",
    "chunk_steps_per_forward",
    "cmd_bench",
    "count_flops",
    "environment",
    "format_table",
    "level_flops",
    "load_spec",
    "measure_ceilings",
    "memory_flops",
    "parse_dims",
    "run_bench",
    "step_stats",
    "time_calls",
]

class BenchError(Exception):
    """A problem with the bench's arguments (exit status 2), not with the spec."""


# ---- dims overrides ------------------------------------------------------------------------------


def parse_dims(text: str | None) -> dict[str, int]:
    """``"d=768,layers=12"`` -> ``{"d": 768, "layers": 12}`` (positive integers only)."""
    out: dict[str, int] = {}
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise BenchError(f"--dims: expected NAME=INT pairs separated by commas, got {part!r}")
        if not name.isidentifier():
            raise BenchError(f"--dims: {name!r} is not a dim name")
        try:
            v = int(value)
        except ValueError:
            raise BenchError(f"--dims: {name}={value!r} is not an integer") from None
        if v < 1:
            raise BenchError(f"--dims: {name}={v} must be a positive integer")
        if name in out:
            raise BenchError(f"--dims: {name} is given twice")
        out[name] = v
    return out


def apply_dims(text: str, overrides: dict[str, int], name: str = "<string>") -> str:
    """The spec text with the values of the given dims replaced (everything else unchanged).

    Dims computed from others (``dh = d / heads``) follow. The replacement is textual, at the
    span of each value, so diagnostics still point at the right lines. Raises :class:`BenchError`
    for a dim the spec does not define (with the closest name), and SpecError for a spec that
    does not parse.
    """
    if not overrides:
        return text
    from . import ast as nast
    from .parser import parse_source
    from .source import SourceFile

    spec = parse_source(SourceFile(name, text))
    dims = [item for item in spec.model.items if isinstance(item, nast.Dims)]
    defs = {d.name.text: d for block in dims for d in block.defs}
    edits = []
    for key, value in overrides.items():
        if key not in defs:
            close = difflib.get_close_matches(key, list(defs), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BenchError(f"--dims: the spec has no dim {key!r} (it has {', '.join(defs) or 'none'}){hint}")
        span = defs[key].value.span
        edits.append((span.start, span.end, str(value)))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


# ---- loading -------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedSpec:
    """A checked spec, its generated module and model class (see :func:`load_spec`)."""

    program: Any
    module: Any
    Model: type
    name: str  # the file name, or <string>
    text: str
    dims: dict[str, int]

    def level_classes(self) -> dict[str, type]:
        """{level name: generated class} for every level implemented by a class of its own."""
        names = {lv.name for lv in self.program.levels}
        out = {}
        for attr in dir(self.module):
            obj = getattr(self.module, attr)
            if isinstance(obj, type) and getattr(obj, "level", None) in names:
                out[obj.level] = obj
        return out


def _spec_text(spec: str | os.PathLike) -> tuple[str, str]:
    """(name, text) of a spec given as a path (``*.nl``) or as text."""
    from .diagnostics import SpecError
    from .pipeline import load_source as read_source

    is_path = isinstance(spec, os.PathLike) or (isinstance(spec, str) and "\n" not in spec and spec.endswith(".nl"))
    if not is_path:
        return "<string>", str(spec)
    source, problem = read_source(spec)
    if problem is not None:
        raise SpecError([problem])
    return source.name, source.text


def load_spec(spec: str | os.PathLike, dims: dict[str, int] | None = None, seq_len: int | None = None) -> LoadedSpec:
    """Check a spec (a path or text) with ``dims`` overridden, generate and import its module.

    ``seq_len``: also set the dim ``seq`` (when the spec has one and ``dims`` does not set it),
    so that the verifier checks periods against the run's sequence length. Each distinct text
    gets a module name of its own (``nlc_bench_<model>_<hash>``), so one process can hold several
    sizes of the same spec. Raises SpecError or BenchError.
    """
    from .codegen import compile_program, load_source
    from .diagnostics import SpecError
    from .pipeline import check_source
    from .source import SourceFile

    name, text = _spec_text(spec)
    dims = dict(dims or {})
    if seq_len is not None and "seq" not in dims and _has_dim(text, "seq"):
        dims["seq"] = int(seq_len)  # the verifier checks token periods against `seq`
    text = apply_dims(text, dims, name)
    result = check_source(SourceFile(name, text))
    if not result.ok:
        raise SpecError(result.errors, result.source)
    compiled = compile_program(result.program)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    module = load_source(compiled.model_source, f"nlc_bench_{compiled.plan.name}_{digest}", compiled.plan.spec_file)
    return LoadedSpec(result.program, module, module.Model, name, text, dims)


# ---- the benchmark -------------------------------------------------------------------------------


def _pick_device(name: str):
    from .train_cli import _device

    try:
        return _device(name or "auto")
    except ValueError as e:
        raise BenchError(str(e)) from None


@contextlib.contextmanager
def fresh_compile_cache():
    """Point inductor and Triton at an empty temporary cache for the duration (a cold compile)."""
    keys = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {k: os.environ.get(k) for k in keys}
    with tempfile.TemporaryDirectory(prefix="nlc-bench-inductor-") as d:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = d
        os.environ["TRITON_CACHE_DIR"] = os.path.join(d, "triton")
        try:
            yield d
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _counter_total(name: str) -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters[name].values()))


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _short(e: BaseException, limit: int = 600) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_bench(
    spec: str | os.PathLike,
    *,
    dims: dict[str, int] | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    steps: int = 20,
    warmup: int = 10,
    compile: bool | None = None,  # noqa: A002 - mirrors the flag
    compile_scope: str = "auto",
    cuda_graphs: bool | None = None,
    graph_scope: str = "model",
    fullgraph: bool = True,
    dtype: str | None = None,
    device: str = "auto",
    compile_times: bool = True,
    ceilings: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Benchmark training steps of a spec; returns the result as a JSON-ready dict.

    ``compile=None``: on for CUDA, off for the CPU (as the generated train.py). ``dtype=None``:
    bf16 autocast on CUDA, fp32 on the CPU. ``compile_scope``: ``full`` (the whole model),
    ``regional`` (:mod:`nlc.runtime.regional`) or ``auto`` (regional when the model has in-context
    levels, as train.py). ``cuda_graphs``: replay from CUDA graphs (:mod:`nlc.runtime.graphs`;
    ``None``: as train.py, on for CUDA with regional compile) the whole model's forward and
    backward (``graph_scope="model"``) or each in-context level (``"levels"``).
    ``compile_times``: measure the cold compile in an empty temporary
    inductor cache and the warm compile after ``torch._dynamo.reset()``.
    """
    import torch

    log = log or (lambda s: None)
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise BenchError("--batch-size and --steps must be >= 1, --warmup >= 0")
    dev = _pick_device(device)
    dtype = dtype or ("bf16" if dev.type == "cuda" else "fp32")
    if dtype not in PEAK_TFLOPS:
        raise BenchError(f"--dtype must be one of {', '.join(PEAK_TFLOPS)}, got {dtype!r}")
    use_compile = compile if compile is not None else dev.type == "cuda"
    if compile_scope not in ("auto", "full", "regional"):
        raise BenchError(f"--compile-scope must be auto, full or regional, got {compile_scope!r}")
    loaded = load_spec(spec, dims, seq_len)
    program = loaded.program
    T = int(seq_len or program.seq or 256)
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as train.py
    env = environment(dev)
    result: dict[str, Any] = {
        "schema": 1,
        "tool": "nlc bench",
        "spec": {
            "file": loaded.name,
            "model": program.name,
            "dims_overridden": loaded.dims,
            "dims": {k: (int(v) if getattr(v, "is_integer", False) else str(v)) for k, v in program.dims},
        },
        "env": env,
        "config": {
            "batch_size": batch_size,
            "seq_len": T,
            "tokens_per_step": batch_size * T,
            "steps": steps,
            "warmup": warmup,
            "dtype": dtype,
            "compile": use_compile,
            "compile_scope": None,
            "fullgraph": fullgraph if use_compile else None,
            "seed": seed,
        },
    }
    ceil = None
    if ceilings:
        log("measuring the GEMM and copy ceilings")
        ceil = measure_ceilings(dev, dtype)
    result["ceilings"] = ceil

    torch.manual_seed(seed)
    module = loaded.module
    cfg = module.ModelConfig()
    if "seq_len" in {f.name for f in dataclasses.fields(cfg)}:
        cfg = dataclasses.replace(cfg, seq_len=T)
    model = loaded.Model(cfg).to(dev)
    model.train()
    if use_compile:
        from .runtime.regional import has_in_context

        if compile_scope == "auto":
            compile_scope = "regional" if has_in_context(model) else "full"
        result["config"]["compile_scope"] = compile_scope
        if compile_scope == "regional":
            result["config"]["fullgraph"] = True  # every region is compiled with fullgraph=True
    from .runtime.distributed import DistributedError, use_graphs

    try:
        graphs = use_graphs(cuda_graphs, model, dev, compile_scope if use_compile else "off", "none")
    except DistributedError as e:
        raise BenchError(str(e)) from None
    result["config"]["cuda_graphs"] = graphs
    optimizers = module.build_optimizers(model)
    periods = (
        [int(p) for p in module.optimizer_periods()] if hasattr(module, "optimizer_periods") else [1] * len(optimizers)
    )
    flops = count_flops(program, model, T)
    result["params"] = flops.pop("params")
    result["flops_per_token"] = {k: v for k, v in flops.items() if k != "levels"}
    result["levels"] = flops["levels"]
    result["optimizers"] = [_describe_optimizer(o, p) for o, p in zip(optimizers, periods)]
    vocab = int(cfg.vocab_size)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch_size, T), generator=g).to(dev)
    y = torch.randint(0, vocab, (batch_size, T), generator=g).to(dev)
    amp = dtype == "bf16"
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    state = {"fwd": model, "i": 0}

    def step():
        with autocast():
            _, loss = state["fwd"](x, y)
        loss.backward()
        i = state["i"]
        for opt, period in zip(optimizers, periods):
            if (i + 1) % period == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
        state["i"] = i + 1

    comp: dict[str, Any] = {"enabled": use_compile}
    result["chunk_steps_per_forward"] = chunk_steps_per_forward(program, T)
    if graphs and not (use_compile and compile_scope == "regional"):
        from .runtime.graphs import capture

        graphs = result["config"]["cuda_graphs"] = capture(model, graph_scope)  # eager model in graphs
    cache_ctx = fresh_compile_cache() if (use_compile and compile_times) else contextlib.nullcontext()
    with cache_ctx:
        first_s = warm_s = None
        if use_compile and compile_scope == "regional":
            import torch._dynamo

            from .runtime.regional import compile_regions, region_failures

            breaks0 = _counter_total("graph_break")
            regions = compile_regions(model)
            comp["regions"] = len(regions)
            if graphs:
                from .runtime.graphs import capture

                graphs = result["config"]["cuda_graphs"] = capture(model, graph_scope)
            # a level's whole-forward region compiles on its second call (the first, eager, finds
            # whether its chunks all take the whole-sequence step); in CUDA graphs both happen in
            # the capture of the first step
            comp["compile_steps"] = 2 if not graphs and any(r.endswith(".forward") for r in regions) else 1
            log(f"compiling {len(regions)} regions{' (empty inductor cache)' if compile_times else ''}")
            t0 = time.perf_counter()
            try:
                for _ in range(comp["compile_steps"]):
                    step()
                _sync(dev)
            except Exception as e:  # noqa: BLE001 - every region is fullgraph: a break is an error here
                if type(e).__name__ == "OutOfMemoryError":
                    raise
                raise BenchError(f"regional compile failed: {_short(e)} (try --compile-scope full)") from None
            first_s = time.perf_counter() - t0
            failed = region_failures(model)
            comp["fullgraph_ok"] = not failed
            if failed:  # a level's forward region did not compile: it ran eagerly around its chunk step
                comp["fullgraph_error"] = failed[0]
            comp["graph_breaks"] = _counter_total("graph_break") - breaks0
            if compile_times and not graphs:  # (captured levels replay without dynamo: nothing to time)
                log("warm compile (same cache, after torch._dynamo.reset())")
                torch._dynamo.reset()
                t0 = time.perf_counter()
                step()
                _sync(dev)
                warm_s = time.perf_counter() - t0
        elif use_compile:
            import torch._dynamo

            breaks0 = _counter_total("graph_break")
            log(f"compiling (fullgraph={fullgraph}{', empty inductor cache' if compile_times else ''})")
            state["fwd"] = torch.compile(model, fullgraph=fullgraph)
            t0 = time.perf_counter()
            try:
                step()
                _sync(dev)
                comp["fullgraph_ok"] = True if fullgraph else None
            except Exception as e:  # noqa: BLE001 - a graph break under fullgraph: record, fall back
                if not fullgraph:
                    raise
                comp["fullgraph_ok"] = False
                comp["fullgraph_error"] = _short(e)
                log(f"fullgraph compile failed: {comp['fullgraph_error']}; compiling with fullgraph=False")
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                torch._dynamo.reset()
                breaks0 = _counter_total("graph_break")
                state["fwd"] = torch.compile(model, fullgraph=False)
                t0 = time.perf_counter()
                step()
                _sync(dev)
            first_s = time.perf_counter() - t0
            comp["graph_breaks"] = _counter_total("graph_break") - breaks0
            if compile_times:
                log("warm compile (same cache, after torch._dynamo.reset())")
                torch._dynamo.reset()
                state["fwd"] = torch.compile(model, fullgraph=bool(comp.get("fullgraph_ok")) and fullgraph)
                t0 = time.perf_counter()
                step()
                _sync(dev)
                warm_s = time.perf_counter() - t0
        log(f"warm-up: {warmup} steps")
        for _ in range(warmup):
            step()
        _sync(dev)
        graphs0 = _unique_graphs() if use_compile else 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        log(f"timing {steps} steps")
        times = time_calls(step, dev, steps)
        if use_compile:
            comp["recompiles_after_warmup"] = _unique_graphs() - graphs0
    stats = step_stats(times, batch_size * T)
    result["timing"] = stats
    med_s = stats["step_ms"]["median"] / 1e3
    if use_compile:
        comp["first_step_s"] = first_s
        n_first = comp.get("compile_steps", 1)
        comp["cold_s"] = max(first_s - n_first * med_s, 0.0) if first_s is not None else None
        comp["cold_cache"] = "empty temporary inductor/Triton cache" if compile_times else "the process's usual cache"
        comp["warm_s"] = max(warm_s - med_s, 0.0) if warm_s is not None else None
    result["compile"] = comp
    if dev.type == "cuda":
        result["memory"] = {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(dev) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / 2**30,
        }
    else:
        result["memory"] = {"peak_allocated_gib": None, "note": "peak memory is measured on CUDA only"}
    result["mfu"] = mfu_block(
        result["flops_per_token"], stats["tokens_per_s"]["median"], dtype, dev, ceil["gemm_tflops"] if ceil else None
    )
    return result


def _has_dim(text: str, name: str) -> bool:
    from . import ast as nast
    from .diagnostics import SpecError
    from .parser import parse_source
    from .source import SourceFile

    try:
        spec = parse_source(SourceFile("<string>", text))
    except SpecError:
        return False
    return any(d.name.text == name for item in spec.model.items if isinstance(item, nast.Dims) for d in item.defs)


def _describe_optimizer(opt, period: int) -> dict:
    d = {
        "class": type(opt).__name__,
        "period_steps": period,
        "params": sum(p.numel() for g in opt.param_groups for p in g["params"]),
    }
    defaults = getattr(opt, "defaults", {})
    for k in ("lr", "fused", "foreach"):
        if k in defaults:
            d[k] = defaults[k]
    return d


# ---- output --------------------------------------------------------------------------------------


def _fmt_num(x: float | None, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.{digits}g}{suffix}{unit}"
    return f"{x:.{digits}g}{unit}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(r: dict) -> str:
    """The human-readable report of :func:`run_bench`'s result."""
    env, cfg, t, m = r["env"], r["config"], r["timing"], r["mfu"]
    dims = ",".join(f"{k}={v}" for k, v in r["spec"]["dims_overridden"].items()) or "as written"
    lines = [
        f"nlc bench: {r['spec']['model']} ({r['spec']['file']}), dims {dims}",
        f"card {env['device_name']} | torch {env['torch']} | triton {env['triton'] or '-'} | {env['date']}"
        + f" | nlc {env.get('commit') or '-'} (tree {env.get('tree') or '-'})",
        f"batch {cfg['batch_size']} x seq {cfg['seq_len']} = {cfg['tokens_per_step']:,} tokens/step | {cfg['dtype']}"
        f"{' autocast' if cfg['dtype'] == 'bf16' else ''} | compile {(cfg.get('compile_scope') or 'full') if cfg['compile'] else 'off'}"
        f"{' + cuda graphs (' + str(cfg['cuda_graphs']) + ')' if cfg.get('cuda_graphs') else ''}"
        f" | {t['steps']} steps after {cfg['warmup']} warm-up",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    p = r["params"]
    rows = [
        ("parameters (N for 6N / dense)", f"{_fmt_num(p['total'])} ({_fmt_num(p['n_6n'])} / {_fmt_num(p['n_dense'])})"),
        (
            "tokens/s (median; p10-p90)",
            f"{_fmt_num(t['tokens_per_s']['median'])} "
            f"({_fmt_num(t['tokens_per_s']['p10'])}-{_fmt_num(t['tokens_per_s']['p90'])})",
        ),
        (
            "step time ms (median; p10-p90)",
            f"{t['step_ms']['median']:.2f} ({t['step_ms']['p10']:.2f}-{t['step_ms']['p90']:.2f})",
        ),
        (
            "peak memory GiB",
            "-" if r["memory"].get("peak_allocated_gib") is None else f"{r['memory']['peak_allocated_gib']:.2f}",
        ),
    ]
    f = r["flops_per_token"]
    rows += [
        ("FLOPs/token 6N", _fmt_num(f["6n"])),
        (
            "FLOPs/token model (dense + attention + inner)",
            f"{_fmt_num(f['model'])} = {_fmt_num(f['dense'])} + {_fmt_num(f['attention'])} + {_fmt_num(f['inner'])}",
        ),
        ("achieved TFLOP/s (6N / model)", f"{m['achieved_tflops']['6n']:.4g} / {m['achieved_tflops']['model']:.4g}"),
        (
            f"MFU vs peak {m['peak_tflops'] or '-'} TFLOP/s (6N / model)",
            f"{_pct(m['vs_peak']['6n'])} / {_pct(m['vs_peak']['model'])}",
        ),
        (
            f"MFU vs measured GEMM {m['gemm_tflops'] or '-'} TFLOP/s (6N / model)",
            f"{_pct(m['vs_gemm']['6n'])} / {_pct(m['vs_gemm']['model'])}",
        ),
    ]
    if r.get("ceilings"):
        c = r["ceilings"]
        rows.append(("ceilings: GEMM / copy", f"{c['gemm_tflops']} TFLOP/s ({c['gemm']}) / {c['copy_tbs']} TB/s"))
    comp = r["compile"]
    if comp.get("enabled"):
        fg = {True: "yes", False: "no", None: "not asked"}[comp.get("fullgraph_ok")]
        rows += [
            ("compile cold / warm s", f"{_fmt_s(comp.get('cold_s'))} / {_fmt_s(comp.get('warm_s'))}"),
            (
                "fullgraph / graph breaks / recompiles after warm-up",
                f"{fg} / {comp.get('graph_breaks', '-')} / {comp.get('recompiles_after_warmup', '-')}",
            ),
        ]
        if comp.get("fullgraph_error"):
            rows.append(("fullgraph error", comp["fullgraph_error"][:200]))
    for lv in r["levels"]:
        if lv["kind"] == "in_context":
            rows.append(
                (
                    f"inner FLOPs/token fwd: {lv['name']} (every {lv['period']}, x{lv['repeat']})",
                    _fmt_num(lv["fwd_per_token"] + lv["fwd_solve_per_token"]),
                )
            )
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def _fmt_s(x):
    return "-" if x is None else f"{x:.1f}"


# ---- command line --------------------------------------------------------------------------------


def add_parser(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="time training steps of a spec: tokens/s, MFU, memory, compile cost",
        description="Time full training steps (forward, backward, optimizer) of a spec on random tokens "
        "and report tokens/s, step time, peak memory, MFU (6N and model FLOPs with the in-context "
        "inner loops) and compile cost. See docs/benchmarks.md.",
    )
    b.add_argument("file", metavar="FILE")
    b.add_argument("--dims", metavar="NAME=INT,...", help="override dims of the spec, e.g. d=768,heads=12,layers=12")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the spec's seq, else 256)")
    b.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    b.add_argument("--warmup", type=int, default=10, help="steps after compile, before timing (default 10)")
    b.add_argument(
        "--compile",
        action=argparse_bool(),
        default=None,
        help="torch.compile the model with fullgraph=True (default: on for CUDA, off for the CPU)",
    )
    b.add_argument(
        "--compile-scope",
        choices=("auto", "full", "regional"),
        default="auto",
        help="full: the whole model; regional: each chunk step and each block without in-context levels "
        "(default auto: regional when the model has in-context levels, as train.py)",
    )
    b.add_argument(
        "--cuda-graphs",
        action=argparse_bool(),
        default=None,
        help="replay in-context levels from CUDA graphs (default: on for CUDA with regional compile, as train.py)",
    )
    b.add_argument(
        "--graph-scope",
        choices=("model", "levels"),
        default="model",
        help="what --cuda-graphs captures: the whole model's forward and backward, or each in-context level "
        "(default: model, as train.py)",
    )
    b.add_argument(
        "--compile-times",
        action=argparse_bool(),
        default=True,
        help="measure cold (empty temporary cache) and warm compile (default on)",
    )
    b.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="bf16 autocast or fp32 (default: bf16 on CUDA, fp32 on the CPU)",
    )
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    b.add_argument(
        "--ceilings",
        action=argparse_bool(),
        default=True,
        help="measure an 8192^3 GEMM and a 1 GiB copy first (default on)",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", metavar="PATH", help="write the result as JSON")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    b.set_defaults(func=cmd_bench)


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def cmd_bench(args) -> int:
    from .diagnostics import SpecError, render

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"nlc bench: {msg}", file=sys.stderr, flush=True)

    try:
        dims = parse_dims(args.dims)
        result = run_bench(
            args.file,
            dims=dims,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            steps=args.steps,
            warmup=args.warmup,
            compile=args.compile,
            compile_scope=args.compile_scope,
            cuda_graphs=args.cuda_graphs,
            graph_scope=args.graph_scope,
            dtype=args.dtype,
            device=args.device,
            compile_times=args.compile_times,
            ceilings=args.ceilings,
            seed=args.seed,
            log=log,
        )
    except BenchError as e:
        print(f"nlc: error: NL901 {e}", file=sys.stderr)
        return 2
    except SpecError as e:
        sources = {e.source.name: e.source} if getattr(e, "source", None) is not None else {}
        print(render(e.diagnostics, sources), file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - out of memory is the user's sizing, said in one line
        if type(e).__name__ != "OutOfMemoryError":
            raise
        print(
            f"nlc: error: out of device memory at batch {args.batch_size} (try a smaller --batch-size or "
            f"--seq-len): {str(e).splitlines()[0]}",
            file=sys.stderr,
        )
        return 1
    result["command"] = _command_line(args)
    print(format_table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(f"wrote {path}")
    return 0


def _command_line(args) -> str:
    """The command that reproduces this run (from the parsed flags)."""
    import shlex

    parts = ["nlc", "bench", args.file]
    for flag, value, default in (
        ("--dims", args.dims, None),
        ("--batch-size", args.batch_size, 8),
        ("--seq-len", args.seq_len, None),
        ("--steps", args.steps, 20),
        ("--warmup", args.warmup, 10),
        ("--dtype", args.dtype, None),
        ("--device", args.device, "auto"),
        ("--seed", args.seed, 0),
    ):
        if value != default:
            parts += [flag, str(value)]
    for flag, value, default in (
        ("compile", args.compile, None),
        ("compile-times", args.compile_times, True),
        ("ceilings", args.ceilings, True),
    ):
        if value != default and value is not None:
            parts.append(f"--{'' if value else 'no-'}{flag}")
    return " ".join(shlex.quote(p) for p in parts)
