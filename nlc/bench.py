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

Python API: :func:`run_bench` returns the JSON dict; :func:`count_flops`, :func:`level_flops`,
:func:`measure_ceilings`, :func:`load_spec` and :func:`environment` are reused by
``benchmarks/peers.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "PEAK_TFLOPS",
    "add_parser",
    "apply_dims",
    "cmd_bench",
    "count_flops",
    "environment",
    "format_table",
    "level_flops",
    "load_spec",
    "measure_ceilings",
    "memory_flops",
    "chunk_step_flops",
    "parse_dims",
    "run_bench",
    "step_stats",
]

#: Dense (no sparsity) tensor-core peaks of an H100 SXM in TFLOP/s, by the dtype of the run; an
#: H200 has the same (the same chip and clocks, with more and faster memory).
#: ``fp32`` runs use TF32 tensor cores (``torch.set_float32_matmul_precision("high")``, as the
#: generated train.py does), so their peak is TF32's.
PEAK_TFLOPS = {"bf16": 989.4, "fp32": 494.7}
PEAK_NOTE = "H100/H200 SXM dense peak (bf16 989.4, TF32 494.7 TFLOP/s)"


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


# ---- FLOP counting -------------------------------------------------------------------------------


def memory_flops(spec) -> int:
    """Forward matmul FLOPs of one memory on one token: ``sum_l 2 * out_l * in_l``."""
    return sum(2 * o * i for o, i in spec.weight_shapes())


def chunk_step_flops(spec, rule, read: str, C: int, with_query: bool, update: bool = True,
                     reads_keys: bool = False) -> tuple[int, int]:
    """Forward FLOPs of one ``nlc.runtime.chunk.chunk_step`` call for one (sequence, head).

    Returns ``(matmul, solve)``: the matrix-product FLOPs (2 per multiply-add; exactly what
    ``torch.utils.flop_counter.FlopCounterMode`` counts for the call) and the FLOPs of the DGD
    unit-triangular solves (``C (C - 1)`` per right-hand side), which FlopCounterMode does not see.
    Follows the runtime term by term (``docs/benchmarks.md`` lists the terms). ``update=False``:
    a chunk whose end state nothing reads (the read alone, or the causal read's algebra without
    the end state); ``reads_keys``: the queries are the keys, and a chunk read is the keys'
    forward, counted once.
    """
    shapes = spec.weight_shapes()
    if not update and (not with_query or read == "chunk"):
        return (2 * C * sum(o * i for o, i in shapes) if with_query else 0), 0
    n = len(shapes)
    mom = rule.uses_momentum
    if rule.is_dgd:
        pre = [True] * n if rule.dgd_layers == "all" else list(spec.input_side())
    else:
        pre = [False] * n
    full = read == "causal" or any(pre)
    P = [o * i for o, i in shapes]
    f = 0
    solve = 0
    # the memory's forward on the keys and its closed-form backward (one product per weight but
    # the input-side one; for a SwiGLU only the output weight is back-propagated through)
    f += 2 * C * sum(P)
    f += 2 * C * (P[2] if spec.kind == "swiglu" else sum(P[1:]))
    # chunk coefficients: G = A @ Bm (C x C x C) and d = A @ b with momentum
    if mom:
        f += (2 * C**3 + 2 * C**2) if full else 2 * C**2
    for (o, i), p in zip(shapes, pre):
        if full and p:  # DGD: a a^T, W0 a (and S0 a), the masked gradient term, the solve
            f += 2 * C * C * i + 2 * C * i * o + (2 * C * i * o if mom else 0) + 2 * C * C * i + 2 * C * C * o
            solve += C * (C - 1) * o
        if update:
            f += 2 * C * o * i + (2 * C * o * i if p else 0)  # chunk-end weight
        if mom and update:
            f += 2 * C * o * i  # chunk-end momentum
        if with_query and read == "causal":  # token t reads W_t, layer by layer
            f += 2 * C * o * i + (2 * C * o * i if mom else 0) + 2 * C * C * (i + o)
            if p:
                f += 2 * C * C * (i + o)
    if with_query and read == "chunk" and not reads_keys:
        f += 2 * C * sum(P)  # every token reads the chunk-start memory
    return f, solve


def _read_nodes(flow) -> list:
    """The state reads in a flow expression (not following ``ref``s to other bindings)."""
    out = []
    stack = [flow]
    while stack:
        f = stack.pop()
        if f is None:
            continue
        if f.kind == "read":
            out.append(f)
        stack.append(f.arg)
    return out


def _depends_on_state(lv, flow, memo: dict) -> bool:
    for f in flow.walk():
        if f.kind == "read":
            return True
        if f.kind == "ref":
            if f.name not in memo:
                memo[f.name] = False  # no cycles in a verified program; guard anyway
                b = lv.binding(f.name)
                memo[f.name] = b is not None and _depends_on_state(lv, b.flow, memo)
            if memo[f.name]:
                return True
    return False


def level_flops(lv, T: int, persist: bool | None = None) -> dict:
    """Forward inner-loop FLOPs of one in-context level over one sequence of ``T`` tokens.

    Counted from the IR the way the generated code computes the level (``nlc.lower.levels``):
    per chunk of C tokens (a last partial chunk is counted at its size) and per head,

    * every flow that reads a chunk-start state (``mk(x)``): one memory forward per token;
    * ``target self``: each memory's forward on the values;
    * each state: one ``chunk_step`` (:func:`chunk_step_flops`): the memory's forward on the
      keys, its closed-form backward, the rule's chunk algebra, the chunk-end state, and for the
      state the level reads, the read of the queries (none apart where the queries are the keys,
      ``Level.reads_at_keys``);
    * a chunk whose end state nothing reads (the last one, and the last one before each reset, of
      a level that does not keep its state: ``persist``, by default the level's ``reset never``):
      its reads only, as ``run_chunks(..., final_state=False)`` runs it. Where the fused or the
      linear whole-sequence op runs the level (``nlc.runtime.chunks.sequence_step``) it updates
      that chunk too (the wide MLP op does not), and the count is the level's need, below what
      runs.

    Returns ``{"matmul": int, "solve": int}`` for the whole sequence and one sequence (multiply
    by the batch). The level's projections, convolutions and output (ordinary parameters) are not
    included: :func:`count_flops` counts them with the dense parameters.
    """
    from .reference_level import memory_spec, rule_spec
    from .runtime.chunks import boundaries

    H = int(lv.heads)
    C = int(lv.period.every)
    rule = rule_spec(lv)
    specs = {st.name: memory_spec(st.memory) for st in lv.states}
    node = lv.reads
    while node is not None and node.kind == "op":
        node = node.arg
    read_state = node.name if node is not None and node.kind == "read" else (lv.states[0].name if lv.states else None)
    read_arg = node.arg if node is not None and node.kind == "read" else None
    memo: dict = {}
    per_token_reads = 0
    for b in lv.bindings:
        if _depends_on_state(lv, b.flow, memo):
            per_token_reads += sum(memory_flops(specs[r.name]) for r in _read_nodes(b.flow) if r.name in specs)
    if read_arg is not None:
        per_token_reads += sum(memory_flops(specs[r.name]) for r in _read_nodes(read_arg) if r.name in specs)
    if lv.target == "self":
        per_token_reads += sum(memory_flops(s) for s in specs.values())

    reads_keys = lv.reads_at_keys()

    def one_chunk(c: int, update: bool) -> tuple[int, int]:
        m, s = per_token_reads * c, 0
        for st in lv.states:
            is_read = st.name == read_state
            fm, fs = chunk_step_flops(specs[st.name], rule, lv.read_mode if is_read else "chunk", c, is_read,
                                      update, reads_keys and is_read)
            m, s = m + fm, s + fs
        return m, s

    # the chunks as nlc.runtime.chunks.run_chunks's loop runs them: a level that does not keep
    # its state across calls skips the update of each chunk whose end state nothing reads (the
    # last one, and the last one before each reset)
    if persist is None:
        persist = lv.reset.mode == "never"
    reset_every = int(lv.reset.every) if lv.reset.mode == "every" else None
    segments = boundaries(T, C, reset_every, None)
    matmul = solve = 0
    for i, (s0, s1, _, _) in enumerate(segments):
        dead_end = not persist and (i + 1 == len(segments) or segments[i + 1][2])
        starts = list(range(s0, s1, C))
        for j, c0 in enumerate(starts):
            m, s = one_chunk(min(C, s1 - c0), not (dead_end and j == len(starts) - 1))
            matmul, solve = matmul + m, solve + s
    return {"matmul": matmul * H, "solve": solve * H}


def attention_flops(lv, T: int, width: int) -> int:
    """Forward FLOPs of one attention level over one sequence: ``sum_t 4 * width * ctx(t)``.

    ``ctx(t) = min(t + 1, window)``: causal attention does half the work of the full T x T
    products (QK^T and PV, 2 FLOPs per multiply-add each).
    """
    window = lv.primary.memory.option("window") if lv.primary is not None else None
    window = int(window) if window else None
    if window is None or window >= T:
        ctx = T * (T + 1) // 2
    else:
        ctx = window * (window + 1) // 2 + (T - window) * window
    return 4 * width * ctx


def _level_repeats(program) -> dict[str, int]:
    """How many times each level is instantiated (its block's repeat count)."""
    out: dict[str, int] = {}
    for lv in program.levels:
        block = program.block(lv.block) if lv.block else None
        out[lv.name] = int(block.repeat) if block is not None else 1
    return out


def chunk_steps_per_forward(program, seq_len: int) -> int:
    """Chunk steps one forward runs: per in-context level, chunks x states x the block's repeats.

    Eagerly each is a handful of kernel launches, so this sizes the launch overhead of an eager
    step. (Under ``torch.compile`` the chunks run through ``scan``: the graph holds the step once.)
    """
    from . import ir

    reps = _level_repeats(program)
    n = 0
    for lv in program.levels:
        if lv.kind is ir.LevelKind.IN_CONTEXT:
            n += reps.get(lv.name, 1) * math.ceil(seq_len / int(lv.period.every)) * max(1, len(lv.states))
    return n


def count_flops(program, model, seq_len: int) -> dict:
    """FLOPs per token of one training step (forward + backward) of ``model`` at ``seq_len``.

    * ``6n``: ``6 * N``, N = every trainable parameter, the token embedding excluded unless it
      is the tied output head.
    * ``dense``: ``6 * N_dense``, N_dense = the parameters applied to every token by a matrix
      product or a convolution (matrices and convolution kernels; not norm gains, not an untied
      embedding table, not the learned initial states of in-context levels, whose products are
      part of the inner loop).
    * ``attention``: 3 x the forward of every attention level (causal, windowed if so).
    * ``inner``: 3 x the forward inner-loop FLOPs of every in-context level (:func:`level_flops`),
      ``inner_solve`` the DGD triangular solves among them.
    * ``model`` = dense + attention + inner. Backward is taken as 2 x forward throughout.
    """
    from . import ir
    from .runtime.flows import MemoryInit

    init_ids = {id(p) for m in model.modules() if isinstance(m, MemoryInit) for p in m.parameters()}
    embed = getattr(model, "embed", None)
    embed_ids = {id(embed.weight)} if embed is not None and program.head != "tied" else set()
    n_total = n_6n = n_dense = n_init = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        n_total += p.numel()
        if id(p) in embed_ids:
            continue
        n_6n += p.numel()
        if id(p) in init_ids:
            n_init += p.numel()
        elif p.dim() >= 2:
            n_dense += p.numel()
    repeats = _level_repeats(program)
    T = int(seq_len)
    width = int(program.d_model)
    levels = []
    attn = inner = solve = 0
    for lv in program.levels:
        r = repeats.get(lv.name, 1)
        if lv.kind is ir.LevelKind.ATTENTION:
            f = attention_flops(lv, T, width)
            attn += r * f
            levels.append({"name": lv.name, "kind": "attention", "repeat": r, "fwd_per_token": f / T})
        elif lv.kind is ir.LevelKind.IN_CONTEXT:
            f = level_flops(lv, T)
            inner += r * f["matmul"]
            solve += r * f["solve"]
            levels.append(
                {
                    "name": lv.name,
                    "kind": "in_context",
                    "repeat": r,
                    "period": int(lv.period.every),
                    "heads": int(lv.heads),
                    "read": lv.read_mode,
                    "rule": lv.rule,
                    "fwd_per_token": f["matmul"] / T,
                    "fwd_solve_per_token": f["solve"] / T,
                }
            )
    dense = 6 * n_dense
    out = {
        "6n": 6 * n_6n,
        "dense": dense,
        "attention": 3 * attn / T,
        "inner": 3 * (inner + solve) / T,
        "inner_solve": 3 * solve / T,
        "levels": levels,
        "params": {
            "total": n_total,
            "n_6n": n_6n,
            "n_dense": n_dense,
            "in_context_init": n_init,
            "embedding_excluded": n_total - n_6n,
        },
    }
    out["model"] = out["dense"] + out["attention"] + out["inner"]
    return out


# ---- environment and ceilings --------------------------------------------------------------------


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def tree_hash() -> str | None:
    """A fingerprint of the code that ran: nlc, its grammar and templates, and benchmarks/.

    The device machine gets the working tree without ``.git``, so the commit may be unknown there;
    this hash, computed the same way on any checkout, identifies the version.
    """
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    n = 0
    for pattern in ("nlc/**/*.py", "grammar/*", "codegen_templates/*", "benchmarks/*.py", "benchmarks/specs/*.nl"):
        for f in sorted(root.glob(pattern)):
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
                n += 1
    return h.hexdigest()[:12] if n else None


def environment(device=None) -> dict:
    """Card, versions and date of a run (what every published number must carry)."""
    import torch

    from . import __version__

    try:
        import triton  # noqa: PLC0415

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken: say so, do not fail
        triton_version = None
    dev = torch.device(device) if device is not None else None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(dev) if dev is not None else None,
        "device_name": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "nlc": __version__,
        "commit": _git_commit(),
        "tree": tree_hash(),
    }
    if dev is not None and dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info["device_name"] = torch.cuda.get_device_name(idx)
        info["sm_count"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device, repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` calls (CUDA events on a GPU, a host clock on the CPU)."""
    import torch

    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
        for a, b in events:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) / 1e3 for a, b in events]
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def measure_ceilings(device, dtype: str = "bf16", n: int | None = None) -> dict:
    """The card's ceilings in this process: an ``n``³ GEMM (random data) and a device-to-device copy.

    On CUDA: 8192³ in bf16 (fp32 runs: TF32), a 1 GiB copy counted as bytes read plus written;
    medians of 10 after 3 warm-ups. On the CPU: 1024³ fp32 and 64 MiB, for scale only.
    """
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    dt = torch.bfloat16 if (dtype == "bf16" and cuda) else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dt, generator=g)
    b = torch.randn(n, n, device=device, dtype=dt, generator=g)
    c = torch.empty(n, n, device=device, dtype=dt)
    for _ in range(3):
        torch.mm(a, b, out=c)
    _sync(device)
    t = statistics.median(time_calls(lambda: torch.mm(a, b, out=c), device, 10))
    gemm = 2 * n**3 / t / 1e12
    a = b = c = None  # free before the copy test
    nbytes = (1 << 30) if cuda else (64 << 20)
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).normal_(generator=g)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    tc = statistics.median(time_calls(lambda: dst.copy_(src), device, 10))
    src = dst = None
    if cuda:
        torch.cuda.empty_cache()
    return {
        "gemm_tflops": float(f"{gemm:.4g}"),
        "gemm": f"{n}x{n}x{n} {str(dt).replace('torch.', '')}",
        "copy_tbs": float(f"{2 * nbytes / tc / 1e12:.4g}"),
        "copy_bytes": nbytes,
    }


def step_stats(times: list[float], tokens: int) -> dict:
    """Median, p10 and p90 of step times (ms) and the tokens/s they give."""
    xs = sorted(times)

    def pct(q):
        if len(xs) == 1:
            return xs[0]
        k = (len(xs) - 1) * q
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    med, p10, p90 = statistics.median(xs), pct(0.1), pct(0.9)
    return {
        "steps": len(xs),
        "step_ms": {"median": med * 1e3, "p10": p10 * 1e3, "p90": p90 * 1e3, "mean": statistics.fmean(xs) * 1e3},
        # a slow step (p90 time) gives the low tokens/s, so p10 of tokens/s is tokens / p90 time
        "tokens_per_s": {"median": tokens / med, "p10": tokens / p90, "p90": tokens / p10},
    }


def mfu_block(flops: dict, tokens_per_s: float, dtype: str, device, gemm_tflops: float | None) -> dict:
    """Achieved TFLOP/s and MFU (6N and model counts) against the spec peak and the measured GEMM."""
    cuda = getattr(device, "type", str(device)) == "cuda"
    peak = PEAK_TFLOPS.get(dtype) if cuda else None
    out = {
        "peak_tflops": peak,
        "peak_note": PEAK_NOTE if cuda else "no spec peak for the CPU",
        "gemm_tflops": gemm_tflops,
        "achieved_tflops": {},
        "vs_peak": {},
        "vs_gemm": {},
    }
    for key in ("6n", "model"):
        tf = flops[key] * tokens_per_s / 1e12
        out["achieved_tflops"][key] = tf
        out["vs_peak"][key] = tf / peak if peak else None
        out["vs_gemm"][key] = tf / gemm_tflops if gemm_tflops else None
    return out


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
