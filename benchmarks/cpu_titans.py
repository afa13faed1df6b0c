"""The generated Titans-MLP level on the CPU against a per-token loop of the same equations.

    python benchmarks/cpu_titans.py [--T 256] [--chunk 16] [--repeats 3]

Both compute forward + backward of the level `memory` of examples/titans_lmm.nl (MLP memory,
momentum and decay, per-token gates) at d=128, 4 heads of 32, B=2: the generated module (closed-form
inner gradients, exact chunk-parallel updates, eager PyTorch) and nlc.reference_level.level_forward
(a Python loop over tokens, autograd for every inner gradient). Prints tokens/s (not a test).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nlc  # noqa: E402
from nlc.reference_level import level_forward  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    text = (ROOT / "examples" / "titans_lmm.nl").read_text().replace("every 16 tokens", f"every {args.chunk} tokens")
    text = re.sub(r"(?m)^(\s*)seq = .*$", rf"\g<1>seq = {args.T}", text)
    program = nlc.check(text)
    Model = nlc.load(text)
    level = sys.modules[Model.__module__].MemoryLevel()
    lv = program.level("memory")
    x = torch.randn(args.B, args.T, int(program.d_model), requires_grad=True)

    def generated():
        level(x).square().mean().backward()

    def loop():
        level_forward(lv, level, x).square().mean().backward()

    out = {"T": args.T, "chunk": args.chunk, "B": args.B, "threads": 1, "cpu": "this machine"}
    for name, fn in (("generated", generated), ("per-token loop", loop)):
        fn()
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        t = sorted(ts)[len(ts) // 2]
        out[name] = {"seconds": round(t, 4), "tokens_per_s": round(args.B * args.T / t, 1)}
        print(f"{name:>15}: {t * 1e3:9.1f} ms fwd+bwd  {args.B * args.T / t:10.1f} tokens/s", flush=True)
    out["speedup"] = round(out["per-token loop"]["seconds"] / out["generated"]["seconds"], 1)
    print(f"speed-up of the generated level: {out['speedup']}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
