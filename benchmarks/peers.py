#!/usr/bin/env python3
"""nlc side by side with its peers, in one process on one GPU.

Sections (``--sections``, default all; each independent: a failing peer is recorded, never fatal):

``transformer``  a hand-written Transformer++ (``benchmarks/control.py``) vs nlc's
                 ``transformer_pp`` at ~125M (d 768, 12 layers) and ~350M (d 1024, 24 layers),
                 T = 2048, full training steps.
``titans``       titans-pytorch's ``NeuralMemory`` vs nlc's Titans MLP-memory level
                 (``specs/titans_memory.nl``): dim 512, 8 heads x 64, B 8 x T 2048, fwd+bwd,
                 chunk 16 and 64.
``delta``        flash-linear-attention's chunked (gated) delta rule, op and layer, vs nlc's delta
                 rule (linear memory, dgd, dot, causal read, period 64), B 8, T 2048, H 16, D 128;
                 then causal SDPA, fla and nlc at T = 2048, 8192, 16384 (equal tokens) for the
                 crossover.
``hope``         nested-learning 0.2.0's HOPE vs nlc's HOPE at ~110M, T = 2048 and 4096, with the
                 Transformer++ control of the same width and depth.
``cms``          a CMS level with period >= 512 vs a static MLP of the same size; the fast-weight
                 update's achieved TFLOP/s.
``mac``          titans-pytorch's MAC transformer at its train_mac.py configuration vs nlc's
                 ``specs/titans_mal_mac.nl`` (memory as a layer at the same sizes).

Method (docs/benchmarks.md): the card's ceilings (an 8192³ bf16 GEMM and a 1 GiB
device-to-device copy) are measured at the start and at the end. Every nlc path is first
checked on the device in fp32 with TF32 off against the float64 reference (the literal level
reference ``nlc.reference_level.level_forward``, the per-token ``nlc.reference.memory_scan``, or
for the Transformer the control in float64 with nlc's weights); a path that fails is not timed.
Each implementation runs in its best configuration: ``torch.compile`` where it works (a compile
that breaks or exceeds ``--compile-timeout`` falls back to eager, and both are recorded; when
both run, the faster is timed). Timings are CUDA events in A-B-B-A order (candidates forward
then backward), median, p10 and p90. Results go to ``$OUT`` (or ``--out``) as ``peers.json``
and ``peers.md`` after every case, and a final table is printed.

Run ``python benchmarks/peers.py --help`` for the flags; ``docs/benchmarks.md`` for the commands
that fit the 10-minute limit of one call.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing nlc
    sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nlc import bench  # noqa: E402

SECTIONS = ("transformer", "titans", "delta", "hope", "cms", "mac")
SPECS = HERE / "specs"
EXAMPLES = ROOT / "examples"
PEER_PACKAGES = (
    "titans-pytorch",
    "flash-linear-attention",
    "fla-core",
    "nested-learning",
    "tensordict",
    "assoc-scan",
    "accelerated-scan",
    "x-transformers",
    "hyper-connections",
    "einops",
    "einx",
)
CHECK_TOL = 1e-3  # max |out - ref| / max |ref|, fp32 without TF32 against float64 (METHOD.md)


# ---- run state -----------------------------------------------------------------------------------


class CompileTimeout(BaseException):
    """A compile or a first step ran past its time limit.

    A BaseException, like KeyboardInterrupt, so that the broad ``except Exception`` blocks inside
    torch's compiler do not swallow it; the timer also re-fires every 2 s until it is cleared.
    """


FAILURES = (Exception, CompileTimeout)  # what a candidate's build or first call may raise


@contextlib.contextmanager
def alarm(seconds: float | None, what: str = "the compile"):
    """Raise CompileTimeout in the main thread after ``seconds`` (no-op where signals are unavailable)."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise CompileTimeout(f"{what} did not finish within {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds, 2.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclasses.dataclass
class Candidate:
    """One implementation, ready to be timed: ``step()`` does one unit of work of ``tokens`` tokens."""

    impl: str
    variant: str
    step: Callable[[], Any]
    tokens: int
    flops: dict[str, float] | None = None  # FLOPs per step: {"model": .., "6n": ..}
    resident: Callable[[], int] | None = None  # bytes of its own tensors (params, optimizer, inputs)
    first_call_s: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    meta: dict = dataclasses.field(default_factory=dict)


def tensor_bytes(*objs) -> int:
    """Bytes of the tensors in modules, optimizers, tensors and lists of them (each counted once)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    def walk(o):
        if isinstance(o, torch.nn.Module):
            for t in list(o.parameters()) + list(o.buffers()):
                add(t)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                for v in st.values():
                    add(v)
        elif isinstance(o, torch.Tensor):
            add(o)
        elif isinstance(o, (list, tuple)):
            for x in o:
                walk(x)
        elif isinstance(o, dict):
            for x in o.values():
                walk(x)

    for o in objs:
        walk(o)
    return total


def short_error(e: BaseException, limit: int = 500) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Run:
    def __init__(self, args):
        self.args = args
        self.device = bench._pick_device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = args.dtype or ("bf16" if self.cuda else "fp32")
        self.quick = args.quick
        self.tiny = not self.cuda  # CPU runs use tiny sizes (for tests and dry runs)
        self.compile = args.compile if args.compile is not None else self.cuda
        self.graphs = bool(args.graphs if args.graphs is not None else self.cuda) and self.cuda
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.ceilings: dict[str, Any] = {}
        self.env = bench.environment(self.device)
        self.env["peers"] = peer_versions()
        self.out = Path(args.out) if args.out else (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
        self.command = "python benchmarks/peers.py " + " ".join(shlex.quote(a) for a in (args.argv or []))
        self.warmup = args.warmup if args.warmup is not None else (2 if self.tiny else 5)
        self.steps = args.steps if args.steps is not None else (4 if self.tiny else 20)
        if self.cuda:
            torch.set_float32_matmul_precision("high")

    # -- bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return math.inf if not self.args.time_budget else self.args.time_budget - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", flush=True)

    def autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def record(self, section: str, case: str, impl: str, variant: str, status: str, **fields) -> dict:
        row = {"section": section, "case": case, "impl": impl, "variant": variant, "status": status, **fields}
        self.rows.append(row)
        if status in ("error", "skipped", "refused", "not timed"):
            self.log(f"{section}/{case}: {impl} [{variant}] {status}: {fields.get('reason', '')}")
        self.save()
        return row

    def has_time(self, section: str, case: str, need_s: float) -> bool:
        """Whether to run a case: it matches ``--case`` and fits the time budget (else recorded)."""
        if self.args.case and not any(c in case for c in self.args.case):
            return False
        left = self.remaining()
        if left < need_s + self.args.reserve:
            self.record(
                section,
                case,
                "-",
                "-",
                "skipped",
                reason=f"time budget: {left:.0f} s left, the case needs about {need_s:.0f} s",
            )
            return False
        return True

    # -- compile helpers
    def first_call(self, fn: Callable[[], Any], timeout: float | None, what: str = "the compile") -> float:
        """Seconds of the first call (compile included), under a timeout."""
        t = time.perf_counter()
        with alarm(timeout, what):
            fn()
            self.sync()
        return time.perf_counter() - t

    def compile_variants(
        self,
        section: str,
        case: str,
        impl: str,
        eager: Callable[[], Candidate] | None,
        compiled: Callable[[], Candidate] | None,
        skip_compile_reason: str | None = None,
        keep_both: bool = False,
        eager_as_fallback: bool = False,
        extra: dict[str, Callable[[], Candidate]] | None = None,
    ) -> list[Candidate]:
        """Build the eager and compiled variants of one implementation; return the one(s) to time.

        A compiled variant that fails or times out is recorded and dropped. When both build, both
        are warmed up and the faster (median of the warm-up steps) is kept, unless ``keep_both``.
        ``eager_as_fallback``: build the eager variant only when there is no compiled one (large
        models, where compiling is known to win and two copies cost memory and time). ``extra``:
        more variants by name (CUDA graphs), each built, recorded on failure, and always timed.
        """
        out = []
        if compiled is not None and self.compile and not skip_compile_reason:
            try:
                c = compiled()
                c.first_call_s = self.first_call(c.step, self.args.compile_timeout, "the compile (--compile-timeout)")
                out.append(c)
            except FAILURES as e:  # noqa: BLE001 - recorded; eager still runs
                c = None
                free_memory()
                self.record(section, case, impl, "compiled", "error", reason=short_error(e))
        elif compiled is not None and self.compile and skip_compile_reason:
            self.record(section, case, impl, "compiled", "skipped", reason=skip_compile_reason)
        if eager is not None and not (eager_as_fallback and out):
            try:
                c = eager()
                c.first_call_s = self.first_call(c.step, None)
                out.append(c)
            except FAILURES as e:  # noqa: BLE001
                free_memory()
                self.record(section, case, impl, "eager", "error", reason=short_error(e))
        if len(out) == 2 and not keep_both:
            est = {}
            for c in out:
                ts = bench.time_calls(c.step, self.device, max(2, self.warmup))
                est[c.variant] = statistics.median(ts)
            fast, slow = sorted(out, key=lambda c: est[c.variant])
            self.record(
                section,
                case,
                impl,
                slow.variant,
                "not timed",
                reason=f"slower than {fast.variant} in warm-up: {est[slow.variant] * 1e3:.2f} ms vs "
                f"{est[fast.variant] * 1e3:.2f} ms per step",
                step_ms_warmup=est[slow.variant] * 1e3,
                tokens_per_s_warmup=slow.tokens / est[slow.variant],
            )
            fast.notes.append(f"{slow.variant} was {est[slow.variant] / est[fast.variant]:.2f}x slower in warm-up")
            out = [fast]
            c = slow = None  # drop the slower one's model and inputs
            free_memory()
        for name, build in (extra or {}).items():
            try:
                c = build()
                c.first_call_s = self.first_call(c.step, self.args.compile_timeout, "the build (--compile-timeout)")
                out.append(c)
            except FAILURES as e:  # noqa: BLE001 - recorded; the other variants still run
                c = None
                free_memory()
                self.record(section, case, impl, name, "error", reason=short_error(e),
                            trace=traceback.format_exc(limit=6)[-1500:])
        return out

    # -- timing
    def compare(
        self,
        section: str,
        case: str,
        cands: list[Candidate],
        steps: int | None = None,
        warmup: int | None = None,
        extra: dict | None = None,
    ) -> dict[str, dict]:
        """Warm up, then time ``cands`` in A-B-B-A order; record one row per candidate."""
        steps = steps or self.steps
        warmup = self.warmup if warmup is None else warmup
        results: dict[str, dict] = {}
        if not cands:
            return results
        for c in cands:
            for _ in range(warmup):
                c.step()
        self.sync()
        times: dict[int, list[float]] = {id(c): [] for c in cands}
        peaks: dict[int, int] = {id(c): 0 for c in cands}
        if len(cands) == 1 and steps == 1:
            order, per_block = cands, 1
        else:
            order = cands + cands[::-1] if len(cands) > 1 else cands * 2
            per_block = max(1, steps // 2)
        for c in order:
            base = torch.cuda.memory_allocated(self.device) if self.cuda else 0
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            times[id(c)] += bench.time_calls(c.step, self.device, per_block)
            if self.cuda:
                peaks[id(c)] = max(peaks[id(c)], torch.cuda.max_memory_allocated(self.device) - base)
        gemm = self.ceilings.get("start", {}).get("gemm_tflops")
        for c in cands:
            st = bench.step_stats(times[id(c)], c.tokens)
            med = st["step_ms"]["median"] / 1e3
            row = {
                "tokens_per_s": st["tokens_per_s"],
                "step_ms": st["step_ms"],
                "steps": st["steps"],
                "tokens_per_step": c.tokens,
                "first_call_s": c.first_call_s,
                "compile_s": (
                    max(c.first_call_s - med, 0.0) if c.first_call_s is not None and c.variant != "eager" else None
                ),
                "notes": c.notes,
                **c.meta,
            }
            if self.cuda:
                resident = c.resident() if c.resident else 0
                row["peak_gib"] = (peaks[id(c)] + resident) / 2**30
            if c.flops:
                row["tflops"] = {k: v / med / 1e12 for k, v in c.flops.items()}
                peak = bench.PEAK_TFLOPS.get(self.dtype) if self.cuda else None
                row["mfu_vs_peak"] = {k: v / peak for k, v in row["tflops"].items()} if peak else None
                row["mfu_vs_gemm"] = {k: v / gemm for k, v in row["tflops"].items()} if gemm else None
            if extra:
                row.update(extra)
            self.record(section, case, c.impl, c.variant, "ok", **row)
            best = results.get(c.impl)
            if best is None or row["tokens_per_s"]["median"] > best["tokens_per_s"]["median"]:
                results[c.impl] = {**row, "variant": c.variant}  # the fastest variant of each implementation
            self.log(
                f"{section}/{case}: {c.impl} [{c.variant}] {st['tokens_per_s']['median']:,.0f} tokens/s, "
                f"{st['step_ms']['median']:.2f} ms/step" + (f", peak {row['peak_gib']:.2f} GiB" if self.cuda else "")
            )
        return results

    # -- correctness gate
    def check(self, section: str, case: str, impl: str, fn: Callable[[], dict]) -> bool:
        """Run a correctness check (fp32, TF32 off); record it; True when it passes."""
        prev = (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(),
        )
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        try:
            res = fn()
        except FAILURES as e:  # noqa: BLE001
            self.record(
                section,
                case,
                impl,
                "check",
                "refused",
                reason=f"the correctness check raised {short_error(e)}; not timed",
                trace=traceback.format_exc(limit=4)[-1500:],
            )
            return False
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev[0], prev[1]
            torch.set_float32_matmul_precision(prev[2])
        worst = max(v for k, v in res.items() if k.endswith("_rel"))
        ok = bool(worst <= CHECK_TOL) and all(math.isfinite(v) for k, v in res.items() if k.endswith("_rel"))
        self.record(
            section,
            case,
            impl,
            "check",
            "passed" if ok else "refused",
            check={**res, "tol": CHECK_TOL, "precision": "fp32, TF32 off, vs float64"},
            reason=None if ok else f"max relative error {worst:.3g} > {CHECK_TOL}: not timed",
        )
        self.log(
            f"{section}/{case}: check {impl}: {'passed' if ok else 'FAILED'} "
            + ", ".join(f"{k} {v:.2e}" for k, v in res.items() if k.endswith("_rel"))
        )
        return ok

    # -- output
    def save(self) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        doc = self.document()
        tmp = self.out / ".peers.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        os.replace(tmp, self.out / "peers.json")
        (self.out / "peers.md").write_text(markdown(doc) + "\n")

    def document(self) -> dict:
        return {
            "schema": 1,
            "tool": "benchmarks/peers.py",
            "command": self.command,
            "env": self.env,
            "config": {
                "device": str(self.device),
                "dtype": self.dtype,
                "quick": self.quick,
                "tiny": self.tiny,
                "compile": self.compile,
                "nlc_scope": self.args.nlc_scope,
                "graphs": self.graphs,
                "steps": self.steps,
                "warmup": self.warmup,
                "compile_timeout_s": self.args.compile_timeout,
                "max_unroll": self.args.max_unroll,
                "sections": self.args.sections,
            },
            "ceilings": self.ceilings,
            "elapsed_s": self.elapsed(),
            "rows": self.rows,
        }


def peer_versions() -> dict:
    from importlib import metadata

    out = {}
    for name in PEER_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def import_peer(name: str):
    """Import a peer module; raises ModuleNotFoundError with a useful message."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"{name} is not installed here ({e}); carry its wheels in .whl/ (docs/benchmarks.md)"
        ) from e


# ---- shared building blocks ------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / (b.abs().max() + 1e-30)).item()


def check_level(run: Run, spec, dims: dict, level: str, T: int, B: int = 2) -> dict:
    """A generated level in fp32 on the device against ``level_forward`` in float64 on the CPU.

    Same parameters for both; output and gradients (input and every parameter), relative to the
    reference's largest magnitude (as ``tests/codegen/helpers.compare_level``).
    """
    from nlc.reference_level import level_forward

    loaded = bench.load_spec(spec, dims)
    lv = loaded.program.level(level)
    cls = loaded.level_classes()[level]
    torch.manual_seed(0)
    ref_m = cls().double()
    dev_m = cls().to(run.device)
    dev_m.load_state_dict({k: v.float() for k, v in ref_m.state_dict().items()})
    d = int(loaded.program.d_model)
    x = torch.randn(B, T, d, dtype=torch.float64)
    w = torch.randn(B, T, d, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    yr = level_forward(lv, ref_m, xr)
    gr = torch.autograd.grad((yr * w).sum(), [xr, *ref_m.parameters()], allow_unused=True)
    xd = x.float().to(run.device).requires_grad_(True)
    yd = dev_m(xd)
    gd = torch.autograd.grad((yd * w.float().to(run.device)).sum(), [xd, *dev_m.parameters()], allow_unused=True)
    grad = 0.0
    for a, b in zip(gd, gr):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        grad = max(grad, rel_err(a, b))
    return {
        "out_rel": rel_err(yd, yr),
        "grad_rel": grad,
        "T": T,
        "B": B,
        "dims": ",".join(f"{k}={v}" for k, v in dims.items()),
    }


def graphed(run: Run, module: torch.nn.Module, x: torch.Tensor, allow_unused: bool = False):
    """``module`` captured in CUDA graphs, forward and backward (``make_graphed_callables``).

    A replay launches the whole captured forward (or backward) at once, so the CPU cost of
    launching its kernels one by one disappears. Autocast is captured as it stands now (bf16),
    with its weight cache off, as ``make_graphed_callables`` requires.
    """
    ctx = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if run.dtype == "bf16" else contextlib.nullcontext()
    sample = x.detach().clone().requires_grad_(x.requires_grad)  # a fresh leaf: x may carry older graphs
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    with ctx:
        out = torch.cuda.make_graphed_callables(module, (sample,), num_warmup_iters=3, allow_unused_input=allow_unused)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # what stays reserved is the graphs' private memory pool
    out._graph_pool_bytes = max(torch.cuda.memory_reserved() - before, 0)
    return out


def compile_nlc(run: Run, module: torch.nn.Module):
    """nlc's compiled variant: regional (``nlc.runtime.regional``; the module itself, compiled in
    place) or the whole module (``--nlc-scope full``)."""
    if run.args.nlc_scope == "full":
        return torch.compile(module, fullgraph=True)
    from nlc.runtime.regional import compile_regions

    compile_regions(module)
    return module


def level_candidate(run: Run, loaded, level: str, B: int, T: int, impl: str, variant: str) -> Candidate:
    """fwd+bwd of one generated level class on ``[B, T, d]`` (loss mean(out²)); bf16 autocast on CUDA.

    ``variant``: eager, compiled (:func:`compile_nlc`), graphs (eager in CUDA graphs) or
    compiled+graphs (regionally compiled, then captured).
    """
    cls = loaded.level_classes()[level]
    torch.manual_seed(0)
    m = cls().to(run.device)
    d = int(loaded.program.d_model)
    x = torch.randn(B, T, d, device=run.device, requires_grad=True)
    fwd = m
    if variant.startswith("compiled"):
        if variant.endswith("graphs"):  # captured: regional, whatever --nlc-scope says
            from nlc.runtime.regional import compile_regions

            compile_regions(m)
        else:
            fwd = compile_nlc(run, m)
    if variant.endswith("graphs"):
        fwd = graphed(run, m, x)
    params = [p for p in m.parameters() if p.requires_grad]

    def step():
        with run.autocast():
            y = fwd(x)
        y.float().square().mean().backward()
        x.grad = None
        for p in params:
            p.grad = None

    flops = level_step_flops(loaded.program, loaded.program.level(level), m, B, T)
    pool = getattr(fwd, "_graph_pool_bytes", 0)  # a captured variant's activations live in its graph pool
    return Candidate(
        impl,
        variant,
        step,
        B * T,
        flops=flops,
        resident=lambda: tensor_bytes(m, x) + pool,
        meta={"params": sum(p.numel() for p in params),
              "compile_scope": (run.args.nlc_scope if variant == "compiled" else
                                "regional" if variant.startswith("compiled") else None)},
    )


def level_step_flops(program, lv, module, B: int, T: int) -> dict:
    """FLOPs of fwd+bwd of one level over a batch: 6 x its dense parameters + 3 x its inner loop."""
    from nlc import ir
    from nlc.runtime.flows import MemoryInit

    init_ids = {id(p) for mm in module.modules() if isinstance(mm, MemoryInit) for p in mm.parameters()}
    dense = sum(p.numel() for p in module.parameters() if p.dim() >= 2 and id(p) not in init_ids)
    total = 6 * dense * B * T
    inner = 0
    if lv.kind is ir.LevelKind.IN_CONTEXT:
        f = bench.level_flops(lv, T)
        inner = 3 * (f["matmul"] + f["solve"]) * B
    return {"model": total + inner, "inner": inner, "dense": total}


def model_candidate(run: Run, loaded, B: int, T: int, variant: str, impl: str = "nlc") -> Candidate:
    """A full training step of a generated model (as the generated train.py and `nlc bench` do it)."""
    module = loaded.module
    cfg = module.ModelConfig()
    if "seq_len" in {f.name for f in dataclasses.fields(cfg)}:
        cfg = dataclasses.replace(cfg, seq_len=T)
    torch.manual_seed(0)
    model = loaded.Model(cfg).to(run.device)
    model.train()
    optimizers = module.build_optimizers(model)
    periods = [int(p) for p in module.optimizer_periods()]
    g = torch.Generator().manual_seed(0)
    vocab = int(cfg.vocab_size)
    x = torch.randint(0, vocab, (B, T), generator=g).to(run.device)
    y = torch.randint(0, vocab, (B, T), generator=g).to(run.device)
    fwd = compile_nlc(run, model) if variant == "compiled" else model
    graphs = None
    from nlc.runtime.regional import has_in_context

    if variant == "compiled" and run.graphs and run.args.nlc_scope == "regional" and has_in_context(model):
        from nlc.runtime.graphs import capture

        graphs = capture(model, run.args.graph_scope)  # replayed from CUDA graphs, as train.py does
    count = [0]
    pool = [0]  # the graphs' private memory pool (their activations), measured around the capture

    def step():
        first = graphs and count[0] == 0
        if first:  # the first step captures: what it leaves reserved, less the optimizer state it creates
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            before = (torch.cuda.memory_reserved(), tensor_bytes(model, optimizers))
        with run.autocast():
            _, loss = fwd(x, y)
        loss.backward()
        for opt, period in zip(optimizers, periods):
            if (count[0] + 1) % period == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
        count[0] += 1
        if first:
            del loss
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            grown = torch.cuda.memory_reserved() - before[0]
            pool[0] = max(grown - (tensor_bytes(model, optimizers) - before[1]), 0)

    fl = bench.count_flops(loaded.program, model, T)
    flops = {"model": fl["model"] * B * T, "6n": fl["6n"] * B * T}
    opt_desc = [bench._describe_optimizer(o, p) for o, p in zip(optimizers, periods)]
    return Candidate(
        impl,
        variant,
        step,
        B * T,
        flops=flops,
        resident=lambda: tensor_bytes(model, optimizers) + pool[0],
        meta={"params": fl["params"]["total"], "optimizer": opt_desc,
              "compile_scope": run.args.nlc_scope if variant == "compiled" else None,
              "cuda_graphs": graphs},
    )


def compile_skip_reason(run: Run, n: int) -> str | None:
    """Why not to compile an nlc path that runs ``n`` chunk steps per forward (``--max-unroll``).

    Off by default: generated levels run their chunks through ``torch``'s scan under compile, so
    compile time does not grow with the number of chunks. The flag is a guard for code that
    unrolls them.
    """
    if run.args.max_unroll and n > run.args.max_unroll:
        return f"{n} chunk steps per forward (> --max-unroll {run.args.max_unroll}); only eager is timed"
    return None


def control_candidate(run: Run, cfg, B: int, T: int, variant: str, impl: str = "control") -> Candidate:
    import control

    torch.manual_seed(0)
    model = control.Transformer(cfg).to(run.device)
    opt = control.build_optimizer(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab, (B, T), generator=g).to(run.device)
    y = torch.randint(0, cfg.vocab, (B, T), generator=g).to(run.device)
    fwd = torch.compile(model, fullgraph=True) if variant == "compiled" else model

    def step():
        with run.autocast():
            _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    n = sum(p.numel() for p in model.parameters())
    attn = cfg.layers * 3 * 4 * cfg.d * T * (T + 1) // 2 * B  # causal, fwd + bwd
    flops = {"model": 6 * n * B * T + attn, "6n": 6 * n * B * T}
    fused = opt.defaults.get("fused")
    return Candidate(
        impl,
        variant,
        step,
        B * T,
        flops=flops,
        resident=lambda: tensor_bytes(model, opt),
        meta={"params": n, "optimizer": [{"class": "AdamW", "fused": fused}]},
    )


# ---- (a) Transformer++ -----------------------------------------------------------------------------


def section_transformer(run: Run) -> None:
    import control

    sec = "transformer"
    spec = EXAMPLES / "transformer_pp.nl"
    small = {"d": 64, "heads": 4, "layers": 2, "vocab": 97}

    def check_tpp():
        loaded = bench.load_spec(spec, small)
        torch.manual_seed(0)
        nl = loaded.Model()
        ref = control.Transformer(control.ControlConfig(vocab=97, d=64, layers=2, heads=4, max_seq=128)).double()
        control.copy_from_nlc(ref, copy.deepcopy(nl).double())
        nl = nl.to(run.device)
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, 97, (2, 48), generator=g)
        y = torch.randint(0, 97, (2, 48), generator=g)
        lr, lossr = ref(x, y)
        lossr.backward()
        ld, lossd = nl(x.to(run.device), y.to(run.device))
        lossd.backward()
        # the control keeps W_g and W_u fused: compare the gradients of the fused matrix
        grad = 0.0
        for mine, theirs in zip(ref.blocks, nl.layer):
            pairs = [
                (theirs.attn.qkv.weight, mine.attn.qkv.weight),
                (theirs.attn.proj.weight, mine.attn.proj.weight),
                (theirs.attn_norm.weight, mine.attn_norm.weight),
                (theirs.ffn_norm.weight, mine.ffn_norm.weight),
                (theirs.ffn.ffn.w_out, mine.ffn.w_out.weight),
                (theirs.ffn.ffn.w_in, mine.ffn.w_in.weight),  # both keep W_g and W_u fused
            ]
            for a, b in pairs:
                grad = max(grad, rel_err(a.grad, b.grad))
        grad = max(grad, rel_err(nl.embed.weight.grad, ref.embed.weight.grad))
        return {
            "out_rel": rel_err(ld, lr),
            "loss_rel": rel_err(lossd, lossr),
            "grad_rel": grad,
            "reference": "control Transformer++ in float64 with nlc's weights",
        }

    ok = run.check(sec, "equivalence", "nlc", check_tpp)
    if run.tiny:
        sizes = [("tiny", dict(d=64, layers=2, heads=4, vocab=256), 2, 128)]
    else:
        sizes = [
            ("125M", dict(d=768, layers=12, heads=12, vocab=32768), 8, 2048),
            ("350M", dict(d=1024, layers=24, heads=16, vocab=32768), 8, 2048),
        ]
        if run.quick:
            sizes = sizes[:1]
    for name, dims, B, T in sizes:
        case = f"{name} T={T} B={B}"
        if not run.has_time(sec, case, 60 if run.tiny else 240):
            continue
        cands = []
        ccfg = control.ControlConfig(
            vocab=dims["vocab"], d=dims["d"], layers=dims["layers"], heads=dims["heads"], max_seq=max(T, 128)
        )
        cands += run.compile_variants(
            sec,
            case,
            "control",
            lambda: control_candidate(run, ccfg, B, T, "eager"),
            lambda: control_candidate(run, ccfg, B, T, "compiled"),
            eager_as_fallback=True,
        )
        if ok:
            loaded = bench.load_spec(spec, {**dims, "seq": T})
            cands += run.compile_variants(
                sec,
                case,
                "nlc",
                lambda: model_candidate(run, loaded, B, T, "eager"),
                lambda: model_candidate(run, loaded, B, T, "compiled"),
                eager_as_fallback=True,
            )
        else:
            run.record(sec, case, "nlc", "-", "refused", reason="the equivalence check failed; not timed")
        res = run.compare(sec, case, cands)
        if "nlc" in res and "control" in res:
            r = res["nlc"]["tokens_per_s"]["median"] / res["control"]["tokens_per_s"]["median"]
            run.record(
                sec, case, "nlc / control", "ratio", "ok", ratio=r, reason=f"nlc at {r:.3f}x the control's tokens/s"
            )
        del cands
        torch._dynamo.reset()
        free_memory()


# ---- (b) Titans memory --------------------------------------------------------------------------


def section_titans(run: Run) -> None:
    sec = "titans"
    spec = SPECS / "titans_memory.nl"
    if run.tiny:
        dims, B, T, chunks = dict(d=64, heads=2), 2, 128, (16,)
    else:
        dims, B, T, chunks = dict(d=512, heads=8), 8, 2048, (16, 64)
        if run.quick:
            chunks = (64,)
    for C in chunks:
        case = f"chunk {C} B={B} T={T} d={dims['d']} H={dims['heads']}"
        if not run.has_time(sec, case, 40 if run.tiny else 200):
            continue
        ok = run.check(
            sec,
            case,
            "nlc",
            lambda: check_level(run, spec, dict(d=32, heads=2, chunk=C, seq=2 * C + 5), "memory", 2 * C + 5),
        )
        cands = []
        loaded = bench.load_spec(spec, {**dims, "chunk": C, "seq": T})
        if ok:
            reason = compile_skip_reason(run, math.ceil(T / C))
            extra = {}
            if run.graphs:
                extra["compiled+graphs"] = lambda: level_candidate(run, loaded, "memory", B, T, "nlc", "compiled+graphs")
            cands += run.compile_variants(
                sec,
                case,
                "nlc",
                lambda: level_candidate(run, loaded, "memory", B, T, "nlc", "eager"),
                lambda: level_candidate(run, loaded, "memory", B, T, "nlc", "compiled"),
                skip_compile_reason=reason,
                extra=extra,
            )
        try:
            tp = import_peer("titans_pytorch")
            extra = ({"graphs": lambda: titans_candidate(run, tp, dims, C, B, T, "graphs")}
                     if run.graphs and run.args.peer_graphs else {})
            cands += run.compile_variants(
                sec,
                case,
                "titans-pytorch",
                lambda: titans_candidate(run, tp, dims, C, B, T, "eager"),
                None if run.args.skip_peer_compile else (lambda: titans_candidate(run, tp, dims, C, B, T, "compiled")),
                extra=extra,
            )
        except FAILURES as e:  # noqa: BLE001
            run.record(sec, case, "titans-pytorch", "-", "skipped", reason=short_error(e))
        res = run.compare(sec, case, cands)
        if "nlc" in res and "titans-pytorch" in res:
            r = res["nlc"]["tokens_per_s"]["median"] / res["titans-pytorch"]["tokens_per_s"]["median"]
            run.record(
                sec,
                case,
                "nlc / titans-pytorch",
                "ratio",
                "ok",
                ratio=r,
                peak_ratio=(res["nlc"].get("peak_gib") or 0) / res["titans-pytorch"]["peak_gib"]
                if res["titans-pytorch"].get("peak_gib") else None,
                reason=f"nlc [{res['nlc']['variant']}] at {r:.3f}x titans-pytorch [{res['titans-pytorch']['variant']}]'s "
                "tokens/s, each its fastest variant (different chunk semantics: docs/benchmarks.md)",
            )
        del cands
        torch._dynamo.reset()
        free_memory()


class _FirstOutput(torch.nn.Module):
    """A module returning only the first output of ``inner`` (CUDA graphs capture tensors only)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)[0]


def titans_candidate(run: Run, tp, dims: dict, C: int, B: int, T: int, variant: str) -> Candidate:
    """titans-pytorch's NeuralMemory: dim, heads x 64, its default 2-layer MLP memory (x4, GELU).

    On CUDA with the accelerated (Triton) scan that train_mac.py turns on; if that fails here,
    with the plain PyTorch scan (noted); at period 64 the plain one (``--titans-scan`` says why and
    picks another).
    """
    d, H = dims["d"], dims["heads"]
    notes = []
    # auto: its accelerated scan, except at period 64, where it fails on its own on the H200 with
    # a CUDA error that takes the process down (benchmarks/order_diag.py), so the plain scan
    scans = {"auto": (False,) if C == 64 else (True, False), "accelerated": (True,),
             "plain": (False,)}[run.args.titans_scan]  # fmt: skip
    for accelerated in scans if run.cuda else (False,):
        torch.manual_seed(0)
        mem = tp.NeuralMemory(
            dim=d,
            chunk_size=C,
            heads=H,
            dim_head=d // H,
            use_accelerated_scan=accelerated,
            default_model_kwargs=dict(depth=2, expansion_factor=4.0),
        ).to(run.device)
        x = torch.randn(B, T, d, device=run.device, requires_grad=True)
        params = [p for p in mem.parameters() if p.requires_grad]
        if accelerated:
            try:  # probe the accelerated scan once, eagerly
                with run.autocast():
                    y, _ = mem(x)
                y.float().square().mean().backward()
            except FAILURES as e:  # noqa: BLE001
                notes.append(f"accelerated scan failed ({short_error(e, 200)}); plain scan")
                continue
        break
    if variant == "compiled":
        fwd = torch.compile(mem)
    elif variant == "graphs":
        fwd = graphed(run, _FirstOutput(mem), x, allow_unused=True)  # some of its parameters are unused here
    else:
        fwd = mem

    def step():
        with run.autocast():
            y = fwd(x)
            y = y[0] if isinstance(y, tuple) else y
        y.float().square().mean().backward()
        x.grad = None
        for p in params:
            p.grad = None

    pool = getattr(fwd, "_graph_pool_bytes", 0)
    return Candidate(
        "titans-pytorch",
        variant,
        step,
        B * T,
        resident=lambda: tensor_bytes(mem, x) + pool,
        notes=notes,
        meta={
            "params": sum(p.numel() for p in params),
            "accelerated_scan": accelerated,
            "chunk_semantics": "all chunk gradients at the segment-start weights (one vmap(grad)), "
            "momentum/decay by scan",
        },
    )


# ---- (c) delta rule -------------------------------------------------------------------------------


def _delta_inputs(run: Run, B: int, T: int, H: int, D: int, layout: str, gated: bool, seed: int = 0):
    g = torch.Generator(device=run.device).manual_seed(seed)
    dt = torch.bfloat16 if run.dtype == "bf16" else torch.float32
    shape = (B, T, H, D) if layout == "bthd" else (B, H, T, D)
    q = F.normalize(torch.randn(shape, device=run.device, generator=g), dim=-1).to(dt).requires_grad_(True)
    k = F.normalize(torch.randn(shape, device=run.device, generator=g), dim=-1).to(dt).requires_grad_(True)
    v = torch.randn(shape, device=run.device, generator=g).to(dt).requires_grad_(True)
    gshape = shape[:-1]
    beta = torch.rand(gshape, device=run.device, generator=g).to(dt).requires_grad_(True)
    logdecay = None
    if gated:
        logdecay = F.logsigmoid(4.0 + torch.randn(gshape, device=run.device, generator=g)).float().requires_grad_(True)
    return q, k, v, beta, logdecay


def nlc_delta_op(run: Run, B, T, H, D, gated: bool, variant: str, C: int = 64, fwd_only: bool = False) -> Candidate:
    """nlc's delta rule as its runtime computes it: linear memory, dgd on dot, causal read, period C.

    ``variant``: eager, compiled (``fullgraph=True``) or compiled+graphs (``mode="reduce-overhead"``:
    the compiled op's kernels replayed from CUDA graphs; fwd+bwd only)."""
    from nlc.runtime import chunk as nl_chunk
    from nlc.runtime import memories as nl_mem

    spec = nl_mem.MemorySpec("linear", din=D, dout=D)
    rule = nl_chunk.RuleSpec("dgd")
    q, k, v, beta, logdecay = _delta_inputs(run, B, T, H, D, "bhtd", gated)
    W0 = torch.zeros(B, H, D, D, device=run.device)

    def op(q, k, v, beta, logdecay):
        alpha = logdecay.exp() if logdecay is not None else None
        y, _, _ = nl_chunk.scan(spec, "dot", rule, [W0], None, k, v, q, beta, alpha, None, chunk=C, read="causal")
        return y

    graphs = variant == "compiled+graphs"  # the compiled op replayed from CUDA graphs
    if variant.startswith("compiled"):
        fn = torch.compile(op, fullgraph=True, mode="reduce-overhead" if graphs else None)
    else:
        fn = op
    inputs = [t for t in (q, k, v, beta, logdecay) if t is not None]

    if fwd_only:

        def step():
            with torch.no_grad(), run.autocast():
                fn(q, k, v, beta, logdecay)
    else:

        def step():
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with run.autocast():
                y = fn(q, k, v, beta, logdecay)
            y.float().square().mean().backward()
            for t in inputs:
                t.grad = None

    # inner FLOPs (3 x forward with the backward), per sequence and head
    f = bench.chunk_step_flops(spec, rule, "causal", C, True)
    full, rest = divmod(T, C)
    fw = full * sum(f) + (sum(bench.chunk_step_flops(spec, rule, "causal", rest, True)) if rest else 0)
    flops = {"model": (1 if fwd_only else 3) * fw * B * H}
    return Candidate(
        "nlc",
        variant + (" fwd only" if fwd_only else ""),
        step,
        B * T,
        flops=flops,
        resident=lambda: tensor_bytes(inputs, W0),
        meta={"op": f"nlc.runtime.chunk.scan (linear, dgd, dot, causal, period {C}{', decay' if gated else ''})"},
    )


def delta_graphs(run: Run, B, T, H, D, gated: bool, skip_reason: str | None) -> dict:
    """The extra ``compiled+graphs`` variant of nlc's delta op, where graphs and compile are on."""
    if not (run.graphs and run.compile) or skip_reason:
        return {}
    return {"compiled+graphs": lambda: nlc_delta_op(run, B, T, H, D, gated, "compiled+graphs")}


def fla_delta_op(run: Run, B, T, H, D, gated: bool, fwd_only: bool = False) -> Candidate:
    if not run.cuda:
        raise RuntimeError("fla's Triton kernels need a CUDA device")
    if gated:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as op
    else:
        from fla.ops.delta_rule import chunk_delta_rule as op
    q, k, v, beta, logdecay = _delta_inputs(run, B, T, H, D, "bthd", gated)
    inputs = [t for t in (q, k, v, beta, logdecay) if t is not None]

    def call():
        if gated:
            return op(q, k, v, logdecay, beta)[0]
        return op(q, k, v, beta)[0]

    if fwd_only:

        def step():
            with torch.no_grad():
                call()
    else:

        def step():
            call().float().square().mean().backward()
            for t in inputs:
                t.grad = None

    name = "chunk_gated_delta_rule" if gated else "chunk_delta_rule"
    return Candidate(
        "fla",
        "fwd only" if fwd_only else "fwd+bwd",
        step,
        B * T,
        resident=lambda: tensor_bytes(inputs),
        meta={"op": f"fla.ops.{name}"},
    )


def sdpa_op(run: Run, B, T, H, D) -> Candidate:
    g = torch.Generator(device=run.device).manual_seed(0)
    dt = torch.bfloat16 if run.dtype == "bf16" else torch.float32
    q, k, v = (torch.randn(B, H, T, D, device=run.device, generator=g).to(dt).requires_grad_(True) for _ in range(3))

    def step():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).float().square().mean().backward()
        for t in (q, k, v):
            t.grad = None

    flops = {"model": 3 * 4 * H * D * T * (T + 1) // 2 * B}
    return Candidate(
        "sdpa",
        "fwd+bwd",
        step,
        B * T,
        flops=flops,
        resident=lambda: tensor_bytes([q, k, v]),
        meta={"op": "F.scaled_dot_product_attention(is_causal=True)"},
    )


def check_delta_op(run: Run, gated: bool) -> dict:
    """nlc's chunked delta rule (fp32, device) against the per-token reference (float64, CPU)."""
    from nlc.reference import memory_scan
    from nlc.runtime import chunk as nl_chunk
    from nlc.runtime import memories as nl_mem

    B, H, T, D, C = 2, 2, 2 * 64 + 7, 16, 64
    spec = nl_mem.MemorySpec("linear", din=D, dout=D)
    rule = nl_chunk.RuleSpec("dgd")
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(B, H, T, D, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, H, T, D, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    beta = torch.rand(B, H, T, generator=g, dtype=torch.float64)
    alpha = torch.sigmoid(3 + torch.randn(B, H, T, generator=g, dtype=torch.float64)) if gated else None
    W0 = torch.zeros(B, H, D, D, dtype=torch.float64)
    ins = [t.clone().requires_grad_(True) for t in (q, k, v, beta)] + (
        [alpha.clone().requires_grad_(True)] if gated else []
    )
    yr, _, _ = memory_scan(
        spec,
        "dot",
        rule,
        [W0],
        None,
        ins[1],
        ins[2],
        ins[0],
        ins[3],
        ins[4] if gated else None,
        None,
        chunk=C,
        read="causal",
    )
    w = torch.randn(yr.shape, generator=g, dtype=torch.float64)
    gr = torch.autograd.grad((yr * w).sum(), ins)
    dev = [t.detach().float().to(run.device).requires_grad_(True) for t in ins]
    yd, _, _ = nl_chunk.scan(
        spec,
        "dot",
        rule,
        [W0.float().to(run.device)],
        None,
        dev[1],
        dev[2],
        dev[0],
        dev[3],
        dev[4] if gated else None,
        None,
        chunk=C,
        read="causal",
    )
    gd = torch.autograd.grad((yd * w.float().to(run.device)).sum(), dev)
    return {
        "out_rel": rel_err(yd, yr),
        "grad_rel": max(rel_err(a, b) for a, b in zip(gd, gr)),
        "T": T,
        "D": D,
        "reference": "nlc.reference.memory_scan (per-token loop, float64)",
    }


def section_delta(run: Run) -> None:
    sec = "delta"
    if run.tiny:
        B, T, H, D = 2, 128, 2, 16
        crossover = [(2, 64), (1, 128)]
    else:
        B, T, H, D = 8, 2048, 16, 128
        crossover = [(8, 2048), (2, 8192), (1, 16384)]
        if run.quick:
            crossover = crossover[:2]
    n_chunks = math.ceil(T / 64)
    ok = {
        g: run.check(sec, f"op check{' gated' if g else ''}", "nlc", lambda g=g: check_delta_op(run, g))
        for g in (False, True)
    }
    fla_ok = True
    try:
        if not run.cuda:
            raise RuntimeError("fla's Triton kernels need a CUDA device")
        import_peer("fla")
    except FAILURES as e:  # noqa: BLE001
        fla_ok = False
        run.record(sec, "-", "fla", "-", "skipped", reason=short_error(e))
    # -- the op, gated and not
    for gated in (False, True):
        case = f"op {'gated ' if gated else ''}B={B} T={T} H={H} D={D}"
        if not run.has_time(sec, case, 30 if run.tiny else 150):
            continue
        cands = []
        fwd_only = False
        if fla_ok:
            try:
                c = fla_delta_op(run, B, T, H, D, gated)
                c.first_call_s = run.first_call(c.step, None)
                cands.append(c)
            except FAILURES as e:  # noqa: BLE001 - fla refuses backward on Hopper with triton < 3.7.1
                run.record(
                    sec,
                    case,
                    "fla",
                    "fwd+bwd",
                    "error",
                    reason=short_error(e, 800),
                    triton=run.env.get("triton"),
                    device_name=run.env.get("device_name"),
                )
                free_memory()
                try:
                    c = fla_delta_op(run, B, T, H, D, gated, fwd_only=True)
                    c.first_call_s = run.first_call(c.step, None)
                    cands.append(c)
                    fwd_only = True
                except FAILURES as e2:  # noqa: BLE001
                    run.record(sec, case, "fla", "fwd only", "error", reason=short_error(e2))
        if ok[gated]:
            reason = compile_skip_reason(run, n_chunks)
            cands += run.compile_variants(
                sec,
                case,
                "nlc",
                lambda: nlc_delta_op(run, B, T, H, D, gated, "eager"),
                lambda: nlc_delta_op(run, B, T, H, D, gated, "compiled"),
                skip_compile_reason=reason,
                extra=delta_graphs(run, B, T, H, D, gated, reason),
            )
            if fwd_only:  # fla could only run forward: compare forward passes too, in nlc's faster variant
                compiled = any(c.impl == "nlc" and c.variant == "compiled" for c in cands)
                cands += run.compile_variants(
                    sec,
                    case,
                    "nlc",
                    None if compiled else (lambda: nlc_delta_op(run, B, T, H, D, gated, "eager", fwd_only=True)),
                    (lambda: nlc_delta_op(run, B, T, H, D, gated, "compiled", fwd_only=True)) if compiled else None,
                )
        else:
            run.record(sec, case, "nlc", "-", "refused", reason="the op check failed; not timed")
        res = run.compare(sec, case, cands)
        if "nlc" in res and "fla" in res and not fwd_only:
            r = res["nlc"]["tokens_per_s"]["median"] / res["fla"]["tokens_per_s"]["median"]
            run.record(sec, case, "nlc / fla", "ratio", "ok", ratio=r, reason=f"nlc at {r:.3f}x fla's tokens/s")
        del cands
        torch._dynamo.reset()
        free_memory()
    # -- the layer
    case = f"layer d={H * D} B={B} T={T}"
    if run.has_time(sec, case, 30 if run.tiny else 150):
        cands = []
        spec = EXAMPLES / "delta_rule.nl"
        dims = {"d": H * D, "heads": H}
        okl = run.check(
            sec, case, "nlc", lambda: check_level(run, spec, dict(d=32, heads=2, seq=2 * 64 + 5), "delta", 2 * 64 + 5)
        )
        if okl:
            loaded = bench.load_spec(spec, {**dims, "seq": T})
            cands += run.compile_variants(
                sec,
                case,
                "nlc",
                lambda: level_candidate(run, loaded, "delta", B, T, "nlc", "eager"),
                lambda: level_candidate(run, loaded, "delta", B, T, "nlc", "compiled"),
                skip_compile_reason=compile_skip_reason(run, n_chunks),
            )
        if fla_ok:
            for layer in ("DeltaNet", "GatedDeltaNet"):
                try:
                    c = fla_layer(run, layer, H, D, B, T)
                    c.first_call_s = run.first_call(c.step, None)
                    cands.append(c)
                except FAILURES as e:  # noqa: BLE001
                    run.record(sec, case, f"fla {layer}", "fwd+bwd", "error", reason=short_error(e, 800))
                    free_memory()
        run.compare(sec, case, cands)
        del cands
        torch._dynamo.reset()
        free_memory()
    # -- crossover with attention, equal tokens per step
    for Bx, Tx in crossover:
        case = f"crossover T={Tx} B={Bx} H={H} D={D}"
        if not run.has_time(sec, case, 20 if run.tiny else 90):
            continue
        cands = [sdpa_op(run, Bx, Tx, H, D)]
        cands[0].first_call_s = run.first_call(cands[0].step, None)
        if ok[False]:
            n = math.ceil(Tx / 64)
            cands += run.compile_variants(
                sec,
                case,
                "nlc",
                lambda: nlc_delta_op(run, Bx, Tx, H, D, False, "eager"),
                lambda: nlc_delta_op(run, Bx, Tx, H, D, False, "compiled"),
                skip_compile_reason=compile_skip_reason(run, n),
                extra=delta_graphs(run, Bx, Tx, H, D, False, compile_skip_reason(run, n)),
            )
        if fla_ok:
            try:
                c = fla_delta_op(run, Bx, Tx, H, D, False)
                c.first_call_s = run.first_call(c.step, None)
                cands.append(c)
            except FAILURES as e:  # noqa: BLE001
                run.record(sec, case, "fla", "fwd+bwd", "error", reason=short_error(e))
        run.compare(sec, case, cands)
        del cands
        torch._dynamo.reset()
        free_memory()


def fla_layer(run: Run, name: str, H: int, D: int, B: int, T: int) -> Candidate:
    if not run.cuda:
        raise RuntimeError("fla's Triton kernels need a CUDA device")
    layers = import_peer("fla.layers")
    d = H * D
    torch.manual_seed(0)
    if name == "GatedDeltaNet":
        m = layers.GatedDeltaNet(hidden_size=d, head_dim=D, num_heads=H, expand_v=1.0)
    else:
        m = layers.DeltaNet(hidden_size=d, num_heads=H)
    m = m.to(run.device)
    x = torch.randn(B, T, d, device=run.device, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]

    def step():
        with run.autocast():
            y = m(x)[0]
        y.float().square().mean().backward()
        x.grad = None
        for p in params:
            p.grad = None

    return Candidate(
        f"fla {name}",
        "fwd+bwd",
        step,
        B * T,
        resident=lambda: tensor_bytes(m, x),
        meta={"params": sum(p.numel() for p in params)},
    )


# ---- (d) HOPE --------------------------------------------------------------------------------------


HOPE_DIMS = dict(d=768, heads=12, layers=9, vocab=32768)


def nested_learning_candidate(run: Run, dims: dict, B: int, T: int, mode: str) -> Candidate:
    """nested-learning 0.2.0's HOPE (``hope_selfmod``: self-modifying Titans + CMS), its training step.

    ``two-pass``: its default algorithm (train.online_updates false): forward, cross-entropy,
    backward, clip, optimizer step, then a no-grad update pass driven by the teach signal.
    ``online``: its paper-faithful streaming mode (online updates over chunks of its smallest
    CMS period, per-context fast state, batch 1), a step over one whole sequence.
    """
    model_mod = import_peer("nested_learning.model")
    levels = import_peer("nested_learning.levels")
    training = import_peer("nested_learning.training")
    LevelSpec = levels.LevelSpec
    cfg = model_mod.ModelConfig(
        vocab_size=dims["vocab"],
        dim=dims["d"],
        num_layers=dims["layers"],
        heads=dims["heads"],
        titan_level=LevelSpec("titan", 16),
        cms_levels=[LevelSpec("cms_fast", 16), LevelSpec("cms_mid", 64)],
        block_variant="hope_selfmod",
        self_mod_chunk_size=16,
        self_mod_chunk_size_memory=16,
    )
    torch.manual_seed(0)
    model = model_mod.HOPEModel(cfg).to(run.device)
    model.train()
    fused = run.cuda
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=fused)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, dims["vocab"], (B, T), generator=g).to(run.device)
    ce = torch.nn.functional.cross_entropy

    if mode == "two-pass":

        def step():
            with run.autocast():
                logits = model(tokens)
                loss = ce(logits[:, :-1].reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            opt.step()
            with torch.no_grad(), run.autocast():
                teach = training.compute_teach_signal(model, logits, tokens)
                model(tokens, teach_signal=teach)
    else:
        chunk = training._infer_online_chunk_size(model) or T

        def step():
            fast_state = model.init_fast_state()
            opt.zero_grad(set_to_none=True)
            for chunk_tokens, finalize in training._iter_online_token_chunks(tokens, chunk_size=chunk):
                if chunk_tokens.size(1) < 2:
                    continue
                with run.autocast():
                    logits, _pre, _outs = model.forward_with_block_outputs(chunk_tokens, fast_state=fast_state)
                    loss = ce(logits[:, :-1].reshape(-1, logits.size(-1)).float(), chunk_tokens[:, 1:].reshape(-1))
                teach = training.compute_teach_signal(model, logits, chunk_tokens)
                loss.backward()
                with torch.no_grad(), run.autocast():
                    model(chunk_tokens, teach_signal=teach, fast_state=fast_state, finalize_updates=finalize)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            opt.step()

    n = sum(p.numel() for p in model.parameters())
    return Candidate(
        "nested-learning",
        mode,
        step,
        B * T,
        resident=lambda: tensor_bytes(model, opt),
        meta={
            "params": n,
            "block_variant": "hope_selfmod",
            "semantics": (
                "fast weights shared by the batch, updated after the optimizer step by a teach-signal pass"
                if mode == "two-pass"
                else "online chunks of 16 tokens, per-context fast state, batch 1"
            ),
        },
    )


def section_hope(run: Run) -> None:
    import control

    sec = "hope"
    spec = EXAMPLES / "hope.nl"
    # each level over two chunks and a partial one (the titans level is the slow one to check)
    periods = {"titans": 16, "fast": 16, "mid": 64}
    checks = {
        lv: run.check(
            sec,
            "level checks",
            f"nlc {lv}",
            lambda lv=lv: check_level(
                run, spec, dict(d=32, heads=2, layers=1, seq=2 * 64 + 5), lv, 2 * periods[lv] + 5
            ),
        )
        for lv in periods
    }
    ok = all(checks.values())
    if run.tiny:
        dims = dict(d=64, heads=2, layers=1, vocab=256)
        cases = [(64, 2)]
    else:
        dims = dict(HOPE_DIMS)
        cases = [(2048, 4), (4096, 2)]
        if run.quick:
            cases = cases[:1]
    nl_ok = True
    slow: dict[str, float] = {}
    try:
        import_peer("nested_learning.model")
        import_peer("nested_learning.training")
    except FAILURES as e:  # noqa: BLE001
        nl_ok = False
        run.record(sec, "-", "nested-learning", "-", "skipped", reason=short_error(e))
    for T, B in cases:
        case = f"~110M T={T} B={B}"
        if not run.has_time(sec, case, 40 if run.tiny else 240):
            continue
        cands = []
        steps = 4 if run.tiny else 6
        if ok:
            loaded = bench.load_spec(spec, {**dims, "seq": T})
            reason = compile_skip_reason(run, bench.chunk_steps_per_forward(loaded.program, T))
            cands += run.compile_variants(
                sec,
                case,
                "nlc",
                lambda: model_candidate(run, loaded, B, T, "eager"),
                lambda: model_candidate(run, loaded, B, T, "compiled"),
                skip_compile_reason=reason,
                eager_as_fallback=True,  # eager HOPE is launch-bound: seconds per step at this size
            )
        else:
            run.record(sec, case, "nlc", "-", "refused", reason="a level check failed; not timed")
        ccfg = control.ControlConfig(
            vocab=dims["vocab"], d=dims["d"], layers=dims["layers"], heads=dims["heads"], max_seq=max(T, 128)
        )
        cands += run.compile_variants(
            sec,
            case,
            "control",
            lambda: control_candidate(run, ccfg, B, T, "eager"),
            lambda: control_candidate(run, ccfg, B, T, "compiled"),
            eager_as_fallback=True,
        )
        res = run.compare(sec, case, cands, steps=steps, warmup=1)
        del cands
        free_memory()
        if nl_ok:  # slow peers: alone, after the others, a step timeout on the first step
            for mode, bb in (("two-pass", B), ("online", 1)):
                key = f"nested-learning {mode}"
                if key in slow:
                    run.record(
                        sec,
                        case,
                        "nested-learning",
                        mode,
                        "skipped",
                        reason=f"its step at the shorter sequence took {slow[key]:.0f} s; this one would not fit",
                    )
                    continue
                if not run.has_time(sec, case + f" nested-learning {mode}", 60 if not run.tiny else 5):
                    continue
                try:
                    c = nested_learning_candidate(run, dims, bb, T, mode)
                    c.first_call_s = run.first_call(c.step, run.args.step_timeout, "its first step (--step-timeout)")
                except FAILURES as e:  # noqa: BLE001
                    run.record(
                        sec,
                        case,
                        "nested-learning",
                        mode,
                        "error",
                        reason=short_error(e),
                        trace=traceback.format_exc(limit=3)[-1200:],
                    )
                    if isinstance(e, CompileTimeout):
                        slow[key] = run.args.step_timeout
                    free_memory()
                    continue
                n = 1 if c.first_call_s > run.args.step_timeout / 4 else 2
                if c.first_call_s > run.args.step_timeout / 4:
                    slow[key] = c.first_call_s
                c.notes.append(f"timed alone ({n} step(s)) after a first step of {c.first_call_s:.1f} s")
                r = run.compare(sec, case, [c], steps=n, warmup=0)
                res[key] = r.get("nested-learning", {})
                del c
                free_memory()
        base = res.get("nlc", {}).get("tokens_per_s", {}).get("median")
        for other in ("control", "nested-learning two-pass", "nested-learning online"):
            o = res.get(other, {}).get("tokens_per_s", {}).get("median")
            if base and o:
                run.record(
                    sec,
                    case,
                    f"nlc / {other}",
                    "ratio",
                    "ok",
                    ratio=base / o,
                    reason=f"nlc HOPE at {base / o:.3f}x {other}'s tokens/s",
                )
        torch._dynamo.reset()
        free_memory()


# ---- (e) CMS level -------------------------------------------------------------------------------


def section_cms(run: Run) -> None:
    sec = "cms"
    spec = SPECS / "cms_level.nl"
    if run.tiny:
        d, B, T, periods = 64, 2, 128, (32,)
    else:
        d, B, T, periods = 1024, 8, 4096, (512, 2048)
        if run.quick:
            periods = (512,)
    ok = run.check(
        sec,
        "level check",
        "nlc fast",
        lambda: check_level(run, spec, dict(d=32, period=16, seq=2 * 16 + 5), "fast", 2 * 16 + 5),
    )
    for P in periods:
        case = f"period {P} d={d} hidden={4 * d} B={B} T={T}"
        if not run.has_time(sec, case, 30 if run.tiny else 150):
            continue
        loaded = bench.load_spec(spec, {"d": d, "period": P, "seq": T})
        cands = []
        if ok:
            cands += run.compile_variants(
                sec,
                case,
                "nlc cms level",
                lambda: _renamed(level_candidate(run, loaded, "fast", B, T, "nlc", "eager"), "nlc cms level"),
                lambda: _renamed(level_candidate(run, loaded, "fast", B, T, "nlc", "compiled"), "nlc cms level"),
                extra={"compiled+graphs": lambda: _renamed(
                    level_candidate(run, loaded, "fast", B, T, "nlc", "compiled+graphs"), "nlc cms level")}
                if run.graphs else None,
            )
        else:
            run.record(sec, case, "nlc cms level", "-", "refused", reason="the level check failed; not timed")
        cands += run.compile_variants(
            sec,
            case,
            "static mlp",
            lambda: _renamed(level_candidate(run, loaded, "static", B, T, "nlc", "eager"), "static mlp"),
            lambda: _renamed(level_candidate(run, loaded, "static", B, T, "nlc", "compiled"), "static mlp"),
        )
        res = run.compare(sec, case, cands)
        if "nlc cms level" in res and "static mlp" in res:
            a, b = res["nlc cms level"], res["static mlp"]
            ta, tb = a["step_ms"]["median"] / 1e3, b["step_ms"]["median"] / 1e3
            lv = loaded.program.level("fast")
            f = bench.level_flops(lv, T)
            from nlc.reference_level import memory_spec

            read = bench.memory_flops(memory_spec(lv.states[0].memory)) * T  # the read: the static MLP's forward
            update = 3 * (f["matmul"] + f["solve"] - read) * B
            run.record(
                sec,
                case,
                "nlc cms level / static mlp",
                "ratio",
                "ok",
                ratio=ta / tb,
                update_tflops_estimate=(update / (ta - tb) / 1e12) if ta > tb else None,
                reason=(
                    f"step time {ta / tb:.2f}x the static MLP's (target <= 3.3x); the in-context update "
                    f"runs at about {update / max(ta - tb, 1e-12) / 1e12:.1f} TFLOP/s (its FLOPs over the "
                    "time difference)"
                ),
            )
        del cands
        torch._dynamo.reset()
        free_memory()


def _renamed(c: Candidate, impl: str) -> Candidate:
    c.impl = impl
    return c


# ---- (f) MAC at train_mac.py's configuration ------------------------------------------------------


def mac_candidate(run: Run, tp, B: int, T: int, variant: str, tiny: bool) -> Candidate:
    """titans-pytorch's MemoryAsContextTransformer with train_mac.py's settings (enwik8, char level).

    With the accelerated scan and flex attention on CUDA (as train_mac.py); if the accelerated
    scan fails here, with the plain scan (noted). ``--titans-scan plain`` skips the accelerated
    scan's probe: a failed probe can leave the CUDA context unusable (an illegal memory access is
    sticky), which ended this section in two runs on the H200; ``accelerated`` allows no fallback.
    """
    scan = run.args.titans_scan
    if run.cuda and scan != "auto":
        c = _mac_candidate(run, tp, B, T, variant, tiny, accelerated=scan == "accelerated")
        c.notes.append(f"{scan} scan (--titans-scan {scan})")
        return c
    if run.cuda:
        try:
            c = _mac_candidate(run, tp, B, T, variant, tiny, accelerated=True)
            c.probe()  # one eager step: does the accelerated scan run here?
            return c
        except FAILURES as e:  # noqa: BLE001
            free_memory()
            c = _mac_candidate(run, tp, B, T, variant, tiny, accelerated=False)
            c.notes.append(f"accelerated scan failed ({short_error(e, 200)}); plain scan")
            return c
    return _mac_candidate(run, tp, B, T, variant, tiny, accelerated=run.cuda)


def _mac_candidate(run: Run, tp, B: int, T: int, variant: str, tiny: bool, accelerated: bool) -> Candidate:
    torch.manual_seed(0)
    dim, depth, heads_mem = (64, 2, 2) if tiny else (384, 8, 4)
    mem_layers = (2,) if tiny else (2, 4, 6)
    memory_model = tp.MemoryMLP(dim=32 if tiny else 64, depth=2)
    model = tp.MemoryAsContextTransformer(
        num_tokens=256,
        dim=dim,
        depth=depth,
        segment_len=32,
        num_persist_mem_tokens=4,
        num_longterm_mem_tokens=4,
        neural_memory_layers=mem_layers,
        neural_memory_segment_len=4,
        neural_memory_batch_size=128,
        neural_mem_gate_attn_output=False,
        neural_mem_weight_residual=True,
        neural_memory_qkv_receives_diff_views=True,
        use_flex_attn=run.cuda,
        sliding_window_attn=True,
        neural_memory_model=memory_model,
        neural_memory_kwargs=dict(
            dim_head=32 if tiny else 64,
            heads=heads_mem,
            attn_pool_chunks=True,
            qk_rmsnorm=True,
            momentum=True,
            momentum_order=1,
            default_step_transform_max_lr=1e-1,
            use_accelerated_scan=accelerated,
            per_parameter_lr_modulation=True,
            spectral_norm_surprises=True,
        ),
    ).to(run.device)
    # its per-head memory parameters are expanded views (stride 0 across heads): in-place optimizer
    # updates refuse them, so give each head its own copy (what per_head_learned_parameters means)
    expanded = 0
    for prm in model.parameters():
        if any(st == 0 and n > 1 for st, n in zip(prm.stride(), prm.shape)):
            prm.data = prm.data.contiguous()
            expanded += 1
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=run.cuda)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 256, (B, T + 1), generator=g).to(run.device)
    fwd = torch.compile(model) if variant == "compiled" else model

    def probe():
        with run.autocast():
            loss = model(seq, return_loss=True)
        loss.backward()
        opt.zero_grad(set_to_none=True)

    def step():
        with run.autocast():
            loss = fwd(seq, return_loss=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)

    c = Candidate(
        "titans-pytorch MAC",
        variant,
        step,
        B * T,
        resident=lambda: tensor_bytes(model, opt),
        meta={
            "params": sum(p.numel() for p in model.parameters()),
            "optimizer": "AdamW (train_mac.py uses AdoptAtan2, not carried)",
            "expanded_params_made_contiguous": expanded,
        },
    )
    c.probe = probe
    return c


def section_mac(run: Run) -> None:
    sec = "mac"
    spec = SPECS / "titans_mal_mac.nl"
    ok = run.check(
        sec,
        "level check",
        "nlc memory",
        lambda: check_level(
            run,
            spec,
            dict(d=48, heads=2, mheads=2, dh=16, hidden=64, window=8, chunk=16, seq=2 * 16 + 5),
            "memory",
            2 * 16 + 5,
        ),
    )
    if run.tiny:
        dims, B, T = dict(d=64, heads=2, mheads=2, dh=32, hidden=128), 2, 128
    else:
        dims, B, T = {}, 16, 512
    case = f"train_mac config B={B} T={T}"
    if not run.has_time(sec, case, 40 if run.tiny else 240):
        return
    cands = []
    if ok:
        loaded = bench.load_spec(spec, {**dims, "seq": T})
        reason = compile_skip_reason(run, bench.chunk_steps_per_forward(loaded.program, T))
        cands += run.compile_variants(
            sec,
            case,
            "nlc",
            lambda: model_candidate(run, loaded, B, T, "eager"),
            lambda: model_candidate(run, loaded, B, T, "compiled"),
            skip_compile_reason=reason,
        )
    else:
        run.record(sec, case, "nlc", "-", "refused", reason="the level check failed; not timed")
    try:
        tp = import_peer("titans_pytorch")
        cands += run.compile_variants(
            sec,
            case,
            "titans-pytorch MAC",
            lambda: mac_candidate(run, tp, B, T, "eager", run.tiny),
            None if run.args.skip_peer_compile else (lambda: mac_candidate(run, tp, B, T, "compiled", run.tiny)),
        )
    except FAILURES as e:  # noqa: BLE001
        run.record(sec, case, "titans-pytorch MAC", "-", "skipped", reason=short_error(e))
    res = run.compare(sec, case, cands)
    if "nlc" in res and "titans-pytorch MAC" in res:
        r = res["nlc"]["tokens_per_s"]["median"] / res["titans-pytorch MAC"]["tokens_per_s"]["median"]
        run.record(
            sec,
            case,
            "nlc / titans-pytorch MAC",
            "ratio",
            "ok",
            ratio=r,
            reason=f"nlc (MAL) at {r:.3f}x titans-pytorch MAC's tokens/s (different architectures: docs/benchmarks.md)",
        )
    del cands
    torch._dynamo.reset()
    free_memory()


SECTION_FUNCS = {
    "transformer": section_transformer,
    "titans": section_titans,
    "delta": section_delta,
    "hope": section_hope,
    "cms": section_cms,
    "mac": section_mac,
}


# ---- output -----------------------------------------------------------------------------------------


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1e6:
            return f"{x / 1e6:.{digits}g}M"
        if abs(x) >= 1e3:
            return f"{x / 1e3:.{digits}g}k"
        return f"{x:.{digits}g}"
    return str(x)


def markdown(doc: dict) -> str:
    env = doc["env"]
    c = doc["ceilings"]
    lines = [
        "# nlc vs peers",
        "",
        f"- card: {env.get('device_name')} ({doc['config']['device']}); torch {env.get('torch')}; "
        f"triton {env.get('triton') or '-'}; CUDA {env.get('cuda') or '-'}; nlc {env.get('commit') or '-'} "
        f"(tree {env.get('tree') or '-'})",
        f"- date: {env.get('date')}; command: `{doc['command']}`",
        "- peers: " + (", ".join(f"{k} {v}" for k, v in env.get("peers", {}).items() if v) or "none installed"),
    ]
    for when in ("start", "end"):
        if when in c:
            lines.append(
                f"- ceilings at the {when}: GEMM {c[when]['gemm_tflops']} TFLOP/s ({c[when]['gemm']}), "
                f"copy {c[when]['copy_tbs']} TB/s"
            )
    lines += [
        "",
        "| section | case | implementation | variant | status | tokens/s (median) | p10-p90 | step ms | "
        "peak GiB | TFLOP/s (model) | MFU vs peak / GEMM | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["rows"]:
        tps = r.get("tokens_per_s") or {}
        sm = r.get("step_ms") or {}
        tf = (r.get("tflops") or {}).get("model")
        mp = (r.get("mfu_vs_peak") or {}).get("model")
        mg = (r.get("mfu_vs_gemm") or {}).get("model")
        note = r.get("reason") or ""
        if r.get("ratio") is not None and not note:
            note = f"ratio {r['ratio']:.3f}"
        if r.get("check"):
            ch = r["check"]
            note = (note + " " if note else "") + ", ".join(f"{k} {v:.1e}" for k, v in ch.items() if k.endswith("_rel"))
        if r.get("notes"):
            note = (note + "; " if note else "") + "; ".join(r["notes"])
        note = note.replace("|", "/")
        mfu = "-" if mp is None and mg is None else f"{_pct(mp)} / {_pct(mg)}"
        lines.append(
            f"| {r['section']} | {r['case']} | {r['impl']} | {r['variant']} | {r['status']} | "
            f"{_fmt(tps.get('median'))} | {_range(tps)} | "
            f"{_fmt(sm.get('median'))} | {_fmt(r.get('peak_gib'))} | {_fmt(tf)} | {mfu} | {note[:300]} |"
        )
    return "\n".join(lines)


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _range(tps: dict) -> str:
    if tps.get("p10") is None:
        return "-"
    return f"{_fmt(tps['p10'])}-{_fmt(tps['p90'])}"


def print_table(doc: dict) -> None:
    print()
    print(markdown(doc))


# ---- main ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)} (default: all)"
    )
    p.add_argument("--quick", action="store_true", help="the smaller sizes of each section only")
    p.add_argument(
        "--case",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the cases whose name contains TEXT (repeatable), e.g. --case T=4096",
    )
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (cpu: tiny sizes, for tests)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="try torch.compile (default: on for CUDA, off for CPU)",
    )
    p.add_argument(
        "--compile-timeout",
        type=float,
        default=150.0,
        help="seconds a compile (its first call) may take before it is abandoned for eager (default 150)",
    )
    p.add_argument(
        "--step-timeout",
        type=float,
        default=120.0,
        help="seconds the first step of a slow peer (nested-learning) may take (default 120)",
    )
    p.add_argument(
        "--nlc-scope",
        choices=("regional", "full"),
        default="regional",
        help="how nlc's compiled variant compiles: regional (chunk steps and blocks; default) or full (the whole "
        "model, chunks through torch's scan)",
    )
    p.add_argument(
        "--graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the level sections (titans, cms) in CUDA graphs (torch.cuda.make_graphed_callables), "
        "nlc's and titans-pytorch's alike (default: on for CUDA)",
    )
    p.add_argument(
        "--graph-scope",
        choices=("model", "levels"),
        default="model",
        help="what nlc's regionally compiled models capture in CUDA graphs: the whole model's forward and backward "
        "(default, as train.py) or each in-context level",
    )
    p.add_argument(
        "--peer-graphs",
        action="store_true",
        help="also try titans-pytorch in CUDA graphs (off by default: its capture failed on torch 2.11, and a failed "
        "capture can leave the CUDA context unusable for the rest of the run)",
    )
    p.add_argument(
        "--titans-scan",
        choices=("auto", "accelerated", "plain"),
        default="auto",
        help="titans-pytorch's scan on CUDA (titans and mac sections): auto (its accelerated Triton scan, the "
        "plain one if that raises; the plain one at period 64, where the accelerated one hit a CUDA error on "
        "its own on the H200: benchmarks/order_diag.py), accelerated, or plain",
    )
    p.add_argument(
        "--skip-peer-compile",
        action="store_true",
        help="do not try torch.compile on titans-pytorch, its NeuralMemory or its MAC (its compile fails on "
        "torch 2.11: the issue's figures)",
    )
    p.add_argument(
        "--max-unroll",
        type=int,
        default=0,
        help="do not compile an nlc path that runs more chunk steps per forward than this (default 0: no limit)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per candidate (default 20; CPU 4)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per candidate (default 5; CPU 2)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for the whole run: cases that would not fit are skipped (recorded)",
    )
    p.add_argument("--reserve", type=float, default=20.0, help="seconds kept for the closing ceilings (default 20)")
    p.add_argument("--out", default=None, help="folder for peers.json and peers.md (default $OUT when set)")
    p.add_argument(
        "--isolate",
        action="store_true",
        help="run each section in its own process (this one measures the ceilings and merges the rows): a "
        "peer that leaves the CUDA context unusable then ends only its own section. Off by default: the "
        "sections then share one process",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one section for --isolate
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    secs = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in secs if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    args.sections = secs
    return args


# ---- sections in their own processes (--isolate) -------------------------------------------------

# options the parent sets itself for each child (each takes a value, but --isolate)
_PARENT_ONLY = {"--sections": True, "--out": True, "--time-budget": True, "--isolate": False}


def child_argv(argv: list[str]) -> list[str]:
    """The parent's arguments for a child, less those it sets per section (``_PARENT_ONLY``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _PARENT_ONLY:
            skip = _PARENT_ONLY[name] and "=" not in a
            continue
        out.append(a)
    return out


def merge_child(run: Run, section: str, doc_path: Path, status) -> None:
    """Add the rows a section's process saved (``peers.json`` is written after every row, so a
    process that died keeps what it recorded) and, if it did not end cleanly, an error row."""
    rows = []
    if doc_path.exists():
        try:
            rows = json.loads(doc_path.read_text())["rows"]
        except (ValueError, KeyError) as e:
            run.record(section, "-", "-", "-", "error", reason=f"unreadable {doc_path.name} of the section: {e}")
    for r in rows:
        run.rows.append({**r, "process": "own"})
    if status != 0:
        run.record(
            section,
            "-",
            "-",
            "-",
            "error",
            reason=f"the section's process ended with status {status} after {len(rows)} rows (kept above)",
        )
    run.save()


def run_isolated(run: Run, args) -> None:
    base = child_argv(args.argv)
    script = str(Path(__file__).resolve())
    for name in args.sections:
        left = run.remaining()
        if left <= args.reserve:
            run.record(name, "-", "-", "-", "skipped", reason=f"time budget: {left:.0f} s left")
            continue
        run.log(f"== section {name} (its own process)")
        with tempfile.TemporaryDirectory(prefix=f"peers_{name}_") as tmp:
            cmd = [sys.executable, script, *base, "--sections", name, "--out", tmp, "--child"]
            if args.time_budget:
                cmd += ["--time-budget", f"{left - args.reserve:.0f}", "--reserve", "0"]
            try:
                status = subprocess.run(cmd, check=False, timeout=None if not args.time_budget else left + 30).returncode
            except subprocess.TimeoutExpired:
                status = "timeout"
            merge_child(run, name, Path(tmp) / "peers.json", status)


def run_sections(run: Run, names: list[str]) -> None:
    """Run sections in this process; one that raises is recorded as an error, never ends the run."""
    for name in names:
        run.log(f"== section {name}")
        try:
            SECTION_FUNCS[name](run)
        except FAILURES as e:  # noqa: BLE001 - one section never kills the run
            run.record(
                name,
                "-",
                "-",
                "-",
                "error",
                reason=short_error(e, 800),
                trace=traceback.format_exc(limit=6)[-2000:],
            )
        torch._dynamo.reset()
        free_memory()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch._dynamo.config.automatic_dynamic_shapes = False  # static graphs: a new size recompiles, never goes dynamic
    if args.child:  # one section of an --isolate run (the parent's compile cache): rows only, no ceilings
        run = Run(args)
        run_sections(run, args.sections)
        run.save()
        return 0
    with bench.fresh_compile_cache():
        run = Run(args)
        run.log(
            f"nlc vs peers on {run.env['device_name']} ({run.device}), torch {run.env['torch']}, "
            f"triton {run.env['triton']}; sections {', '.join(args.sections)}; peers "
            + (", ".join(f"{k} {v}" for k, v in run.env["peers"].items() if v) or "none installed")
        )
        run.ceilings["start"] = bench.measure_ceilings(run.device, run.dtype)
        run.log(f"ceilings: {run.ceilings['start']}")
        run.save()
        free_memory()
        if args.isolate:
            run_isolated(run, args)
        else:
            run_sections(run, args.sections)
        run.ceilings["end"] = bench.measure_ceilings(run.device, run.dtype)
        run.log(f"ceilings at the end: {run.ceilings['end']}")
        run.save()
        print_table(run.document())
        if run.out:
            print(f"\nwrote {run.out / 'peers.json'} and {run.out / 'peers.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
