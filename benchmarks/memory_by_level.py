"""Where a generated model's training memory goes on a GPU: what each level's forward leaves
allocated for the backward, summed over the layers, next to the step's peak.

    python benchmarks/memory_by_level.py [--spec examples/hope.nl] [--dims d=768,heads=12,layers=9,vocab=32768]
                                         [--B 4] [--T 2048]

The model is built as ``benchmarks/peers.py`` builds it (the default: HOPE at ~110M, its ``hope``
section) and runs one eager training step under bf16 autocast (the memory an eager step keeps is
what the compiled and graphed steps keep too, give or take inductor's fusions). A forward hook on
every module measures ``torch.cuda.memory_allocated`` before and after its forward; a level's row is
the growth over its forward (its saved tensors and its output), summed over its instances. Also:
the parameters, the memory after the whole forward (everything kept for the backward), and the
peak of the step. Prints a table and writes ``memory_by_level.json`` under ``$OUT`` if set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nlc import bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default=str(ROOT / "examples" / "hope.nl"))
    ap.add_argument("--dims", default="d=768,heads=12,layers=9,vocab=32768")
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=2048)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("memory_by_level.py needs a CUDA GPU")
    dims = bench.parse_dims(args.dims)
    loaded = bench.load_spec(args.spec, {**dims, "seq": args.T})
    cfg = loaded.module.ModelConfig()
    if "seq_len" in {f.name for f in dataclasses.fields(cfg)}:
        cfg = dataclasses.replace(cfg, seq_len=args.T)
    torch.manual_seed(0)
    model = loaded.Model(cfg).cuda().train()
    params = torch.cuda.memory_allocated()
    x = torch.randint(0, int(cfg.vocab_size), (args.B, args.T), device="cuda")
    y = torch.randint(0, int(cfg.vocab_size), (args.B, args.T), device="cuda")

    grown: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    start: dict[int, int] = {}
    levels = [m for m in model.modules() if type(m).__name__.endswith("Level")]

    def pre(mod, _inp):
        start[id(mod)] = torch.cuda.memory_allocated()

    def post(mod, _inp, _out):
        name = type(mod).__name__
        grown[name] += torch.cuda.memory_allocated() - start.pop(id(mod))
        count[name] += 1

    for m in levels:
        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, y)
    after_forward = torch.cuda.memory_allocated()
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    gib = 2**30
    rows = [{"part": "parameters", "GiB": params / gib}]
    rows += [{"part": f"{name} ({count[name]}x)", "GiB": b / gib} for name, b in sorted(grown.items(), key=lambda kv: -kv[1])]
    rows.append({"part": "levels together", "GiB": sum(grown.values()) / gib})
    rows.append({"part": "kept after the forward (parameters included)", "GiB": after_forward / gib})
    rows.append({"part": "peak of the step", "GiB": peak / gib})
    print(f"{torch.cuda.get_device_name()}, {args.spec} {args.dims}, B {args.B} x T {args.T}, eager, bf16 autocast")
    for r in rows:
        print(f"{r['part']:<52} {r['GiB']:8.2f} GiB")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "memory_by_level.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
