"""A first look at nlc on a GPU: ceilings, compile time and tokens/s of a few generated models.

    python benchmarks/gpu_probe.py [--sections ceil,tpp,titans,hope,cms] [--quick]

Prints one line per measurement and a JSON file under $OUT (when set). Each section is
independent; a failure is recorded and the next section runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nlc  # noqa: E402

RESULTS: list[dict] = []


def record(**kw):
    kw["card"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


def with_dims(text: str, **dims) -> str:
    for k, v in dims.items():
        text, n = re.subn(rf"(?m)^(\s*){k} = .*$", rf"\g<1>{k} = {v}", text, count=1)
        assert n == 1, k
    return text


def timed(fn, steps: int, warmup: int):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: a @ b, 10, 3)
    record(what="gemm 8192^3 bf16", tflops=2 * 8192**3 / t / 1e12)
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), 10, 3)
    record(what="d2d copy 1 GiB", tb_per_s=2 * 2**30 / t / 1e12)


def train_step_bench(name: str, text: str, B: int, T: int, steps: int, compile_: bool = True):
    Model = nlc.load(text)
    torch.manual_seed(0)
    model = Model().cuda()
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model, fullgraph=True) if compile_ else model
    idx = torch.randint(0, 256, (B, T + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    step()
    torch.cuda.synchronize()
    first = time.time() - t0
    t = timed(step, steps, 2)
    tok = B * T / t
    record(what=f"{name} train step", params=n, B=B, T=T, compile=compile_, first_step_s=round(first, 1),
           step_ms=round(t * 1e3, 2), tokens_per_s=round(tok), mfu_6n=round(6 * n * tok / 989.4e12, 4),
           peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))


def level_bench(name: str, text: str, level: str, B: int, T: int, steps: int, compile_: bool = True):
    Model = nlc.load(text)
    module = sys.modules[Model.__module__]
    cls = next(getattr(module, n) for n in dir(module) if getattr(getattr(module, n), "level", None) == level)
    torch.manual_seed(0)
    m = cls().cuda()
    d = int(nlc.check(text).d_model)
    x = torch.randn(B, T, d, device="cuda", requires_grad=True)
    f = torch.compile(m, fullgraph=True) if compile_ else m

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = f(x)
        y.float().square().mean().backward()

    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    step()
    torch.cuda.synchronize()
    first = time.time() - t0
    t = timed(step, steps, 2)
    record(what=f"{name} level {level} fwd+bwd", B=B, T=T, compile=compile_, first_step_s=round(first, 1),
           step_ms=round(t * 1e3, 2), tokens_per_s=round(B * T / t),
           peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="ceil,tpp,titans,cms,hope")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    ex = ROOT / "examples"
    steps = 5 if args.quick else 10
    big = dict(d=768, heads=12, vocab=32000, layers=12, seq=2048)
    sections = {
        "ceil": ceilings,
        "tpp": lambda: train_step_bench("transformer_pp 125M", with_dims((ex / "transformer_pp.nl").read_text(), **big),
                                        8, 2048, steps),
        "titans": lambda: [level_bench(f"titans_lmm dim512 8x64 chunk{c}",
                                       with_dims((ex / "titans_lmm.nl").read_text().replace("every 16 tokens", f"every {c} tokens"),
                                                 d=512, heads=8, seq=2048), "memory", 8, 2048, steps) for c in (64, 16)],
        "cms": lambda: level_bench("cms level C=512 d768", with_dims(
            (ex / "cms_sequential.nl").read_text().replace("every 64 tokens", "every 512 tokens")
            .replace("hidden = 2 * d", "hidden = 4 * d"), d=768, heads=12, seq=2048), "mid", 8, 2048, steps),
        "hope": lambda: train_step_bench("hope ~125M", with_dims((ex / "hope.nl").read_text(), **big), 8, 2048, steps),
    }
    print(f"torch {torch.__version__} | {torch.cuda.get_device_name()}", flush=True)
    for name in args.sections.split(","):
        try:
            sections[name]()
        except Exception as e:  # noqa: BLE001 - record and go on
            record(what=name, error=f"{type(e).__name__}: {str(e)[:500]}")
            traceback.print_exc(limit=4)
        torch.cuda.empty_cache()
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_probe.json").write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
