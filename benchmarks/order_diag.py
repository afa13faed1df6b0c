"""Does titans-pytorch's NeuralMemory run after nlc's Titans level in one process? A diagnostic.

    python benchmarks/order_diag.py [--chunk 64] [--order peer,nlc,peer] [--peer-scan plain] [--sanitize]

``benchmarks/peers.py --sections titans`` at period 64 lost titans-pytorch to an illegal memory
access after nlc's variants had run in the same process. This script runs the two in the order
given (``peer``: titans-pytorch eager with its accelerated scan, as peers.py builds it; ``nlc``:
the generated level of ``specs/titans_memory.nl``, regional compile in CUDA graphs, as
``level_diag.py --modes regional_graphs``), a few timed steps each, under bf16 autocast, and
prints tokens/s per stage, so a crash shows which stage it follows. ``--sanitize`` shrinks the
sizes for a run under ``compute-sanitizer``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nlc import bench  # noqa: E402
from nlc.runtime.regional import compile_regions  # noqa: E402


def timed(step, B, T, steps):
    step()
    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return round(B * T * steps / (time.perf_counter() - t0))


def peer_step(C, d, H, B, T, accelerated=True):
    import titans_pytorch as tp

    torch.manual_seed(0)
    mem = tp.NeuralMemory(dim=d, chunk_size=C, heads=H, dim_head=d // H, use_accelerated_scan=accelerated,
                          default_model_kwargs={"depth": 2, "expansion_factor": 4.0}).cuda()
    x = torch.randn(B, T, d, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = mem(x)
        y.float().square().mean().backward()

    return step


def nlc_step(C, d, H, B, T, accelerated=None):
    loaded = bench.load_spec(ROOT / "benchmarks" / "specs" / "titans_memory.nl",
                             {"d": d, "heads": H, "chunk": C, "seq": T})
    torch.manual_seed(0)
    m = loaded.level_classes()["memory"]().cuda()
    x = torch.randn(B, T, d, device="cuda", requires_grad=True)
    compile_regions(m)
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        f = torch.cuda.make_graphed_callables(m, (x,), num_warmup_iters=3)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = f(x)
        y.float().square().mean().backward()

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--order", default="peer,nlc,peer")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peer-scan", choices=("accelerated", "plain"), default="accelerated")
    ap.add_argument("--sanitize", action="store_true", help="small sizes (B=1, T=4 chunks) for compute-sanitizer")
    args = ap.parse_args()
    d, H = 512, 8
    B, T = (1, 4 * args.chunk) if args.sanitize else (8, 2048)
    for i, who in enumerate(args.order.split(",")):
        step = (peer_step if who == "peer" else nlc_step)(args.chunk, d, H, B, T,
                                                          args.peer_scan == "accelerated")
        r = {"stage": i, "impl": who, "chunk": args.chunk, "B": B, "T": T, "peer_scan": args.peer_scan,
             "tokens_per_s": timed(step, B, T, 1 if args.sanitize else args.steps),
             "card": torch.cuda.get_device_name()}
        print(json.dumps(r), flush=True)
        del step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
