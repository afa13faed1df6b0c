"""The delta-rule op on the CPU: every chunk at once (``nlc.runtime.linear_chunks``) against the
chunk loop (``NLC_LINEAR_CHUNKS=0``), same process, same inputs.

    python benchmarks/cpu_delta.py [--B 2] [--H 4] [--T 1024] [--D 64] [--chunk 64] [--repeats 5]

Forward + backward of ``nlc.runtime.chunk.scan`` on a linear memory, ``dgd`` on ``dot``, causal
read, per-token rates and decay, float32, one thread (the op of ``peers.py --sections delta``
at CPU sizes). Checks that both paths agree, then prints the median tokens/s of each (not a test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nlc.runtime import chunk as nl_chunk
from nlc.runtime import memories as nl_mem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    B, H, T, D = args.B, args.H, args.T, args.D
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(B, H, T, D, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, H, T, D, generator=g), dim=-1)
    v = torch.randn(B, H, T, D, generator=g)
    beta = torch.rand(B, H, T, generator=g)
    alpha = torch.sigmoid(3 + torch.randn(B, H, T, generator=g))
    inputs = [t.requires_grad_() for t in (q, k, v, beta, alpha)]
    spec = nl_mem.MemorySpec("linear", din=D, dout=D)
    rule = nl_chunk.RuleSpec("dgd")
    W0 = torch.zeros(B, H, D, D)

    def step():
        y, _, _ = nl_chunk.scan(spec, "dot", rule, [W0], None, k, v, q, beta, alpha, None,
                                chunk=args.chunk, read="causal")  # fmt: skip
        y.square().mean().backward()
        out = [y.detach()] + [t.grad.clone() for t in inputs]
        for t in inputs:
            t.grad = None
        return out

    results, outs = {}, {}
    for name, env in (("chunk loop", "0"), ("all chunks at once", "1")):
        os.environ["NLC_LINEAR_CHUNKS"] = env
        outs[name] = step()  # warm-up, and the values to compare
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        results[name] = round(B * T / statistics.median(times))
    rel = max(((a - b).abs().max() / b.abs().max()).item()
              for a, b in zip(outs["all chunks at once"], outs["chunk loop"]))  # fmt: skip
    print(json.dumps({"B": B, "H": H, "T": T, "D": D, "chunk": args.chunk, "tokens_per_s": results,
                      "speedup": round(results["all chunks at once"] / results["chunk loop"], 2),
                      "max_rel_diff": float(f"{rel:.1e}")}))  # fmt: skip


if __name__ == "__main__":
    main()
