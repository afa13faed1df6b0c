"""What ``nlc bench`` records around its timings: the run's environment (card, versions, commit
or tree fingerprint), the card's ceilings that day (an 8192³ GEMM and a 1 GiB copy), step-time
statistics and MFU against the dense peak and the measured GEMM.

``benchmarks/peers.py`` reuses :func:`environment`, :func:`measure_ceilings` and
:func:`time_calls`; ``docs/benchmarks.md`` defines each figure.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "PEAK_NOTE",
    "PEAK_TFLOPS",
    "environment",
    "measure_ceilings",
    "mfu_block",
    "step_stats",
    "time_calls",
    "tree_hash",
]

#: Dense (no sparsity) tensor-core peaks of an H100 SXM in TFLOP/s, by the dtype of the run; an
#: H200 has the same (the same chip and clocks, with more and faster memory).
#: ``fp32`` runs use TF32 tensor cores (``torch.set_float32_matmul_precision("high")``, as the
#: generated train.py does), so their peak is TF32's.
PEAK_TFLOPS = {"bf16": 989.4, "fp32": 494.7}
PEAK_NOTE = "H100/H200 SXM dense peak (bf16 989.4, TF32 494.7 TFLOP/s)"


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
