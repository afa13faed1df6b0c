#!/usr/bin/env python3
"""Training losses of one spec under each execution mode, side by side (a GPU diagnostic).

    python benchmarks/graphs_check.py [--spec examples/hope.nl] [--dims d=512,heads=8,layers=2]
        [--steps 4] [--modes eager,regional,regional+graphs] [--dtypes fp32,bf16]

Every mode starts from the same weights and sees the same batches (the embedded corpus, as
``nlc train``) with AdamW at the spec's learning rate and gradient clipping at 1 (``--tf32``: TF32
matmuls, as train.py on CUDA); a mode whose losses drift from eager's, or turn non-finite, names the
culprit: regional compilation (``nlc.runtime.regional``) or CUDA graphs (``nlc.runtime.graphs``),
in fp32 or under bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nlc import bench  # noqa: E402
from nlc.runtime.data import load_corpus  # noqa: E402
from nlc.runtime.graphs import graph_levels, graph_report  # noqa: E402
from nlc.runtime.tasks import make_task  # noqa: E402
from nlc.runtime.regional import compile_regions  # noqa: E402


def run(loaded, mode: str, dtype: str, steps: int, B: int, T: int, task, lr: float | None,
        device: str = "cuda") -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = loaded.Model(loaded.module.ModelConfig()).to(device)
    if mode.startswith("regional"):
        compile_regions(model)
    if mode.endswith("graphs"):
        graph_levels(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr or float(loaded.module.SPEC["lr"]), weight_decay=0.1)
    amp = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext
    losses, bad = [], []
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = (t.to(device) for t in task.train_batch(len(losses)))
        with amp():
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not bad:
            bad = model.nonfinite_levels()
        if bad or loss.item() != loss.item():
            break
    return {"mode": mode, "dtype": dtype, "losses": [round(v, 5) for v in losses], "nonfinite_levels": bad,
            "graphs": graph_report(model), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=str(ROOT / "examples" / "hope.nl"))
    ap.add_argument("--dims", default="d=512,heads=8,layers=2")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--modes", default="eager,regional,regional+graphs")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--lr", type=float, default=None, help="default: the spec's")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (eager and regional modes)")
    args = ap.parse_args()
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    task = make_task("lm", model_vocab=256, seq_len=args.seq_len, batch_size=args.batch_size, seed=0, eval_batches=1,
                     steps=args.steps, corpus=load_corpus(None, min_split_bytes=args.seq_len + 1))
    loaded = bench.load_spec(args.spec, bench.parse_dims(args.dims), args.seq_len)
    rows = []
    for dtype in args.dtypes.split(","):
        for mode in args.modes.split(","):
            try:
                r = run(loaded, mode, dtype, args.steps, args.batch_size, args.seq_len, task, args.lr, args.device)
            except Exception as e:  # noqa: BLE001 - reported, the other modes still run
                r = {"mode": mode, "dtype": dtype, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(json.dumps(r), flush=True)
            rows.append(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
