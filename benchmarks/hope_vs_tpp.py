#!/usr/bin/env python3
"""HOPE and Transformer++ trained side by side: equal parameters, same data, same token budget.

    python benchmarks/hope_vs_tpp.py [--dims d=512,heads=8,layers=4] [--steps 300]
        [--batch-size 8] [--seq-len 1024] [--device cuda] [--out DIR]

Both models come from the examples (``examples/hope.nl``, ``examples/transformer_pp.nl``) at the
same depth, heads and vocabulary. HOPE takes ``--dims``; the Transformer++ width is then chosen
(a multiple of ``2 * heads``, for the rotary halves) to bring its parameter count closest to
HOPE's (a HOPE block: Titans projections about 2d², three CMS MLPs of 4d² and two value maps of
d², plus the memories' learned initial states; a Transformer++ block: attention 4d² and a SwiGLU
of 12d²), unless ``--tpp-d`` sets it. The script prints both counts and refuses a pair more than
``--max-param-gap`` apart. Each is trained by ``nlc train`` (the command
users run) on the embedded corpus with the same seed, steps, batch and sequence length, so both
see the same batches in the same order, and evaluated on the same validation split at the end.

Reported per model: parameters, training loss (mean of the last logged windows), validation loss
and bits per byte, the steady tokens/s (median of the logged windows after the first, so the
compile is left out) and the wall time, with the card's name. Results go to ``OUT/hope_vs_tpp.json``
and ``.md`` (``OUT``: ``--out``, else ``$OUT``, else ``runs/hope_vs_tpp``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nlc import bench  # noqa: E402

MODELS = {"hope": ROOT / "examples" / "hope.nl", "transformer_pp": ROOT / "examples" / "transformer_pp.nl"}


def params_of(path: Path, dims: dict) -> int:
    loaded = bench.load_spec(path, dims)
    return sum(p.numel() for p in loaded.Model().parameters())


def train(name: str, spec_text: str, out: Path, args) -> dict:
    run_dir = out / name
    spec_file = out / "specs" / f"{name}.nl"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(spec_text)
    cmd = [sys.executable, "-m", "nlc", "train", str(spec_file), "--out", str(run_dir), "--overwrite",
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--device", args.device, "--seed", str(args.seed), "--eval-every", "0",
           "--eval-batches", str(args.eval_batches), "--log-every", str(args.log_every), "--no-progress"]
    if args.time_budget:
        cmd += ["--time-budget", str(args.time_budget)]
    cmd += args.train_flag
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    sys.stdout.write(proc.stdout[-3000:])
    sys.stderr.write(proc.stderr[-3000:])
    row = {"model": name, "returncode": proc.returncode, "wall_s": wall}
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return row
    final = json.loads((run_dir / "final.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_logs = [r for r in logs if r.get("loss") is not None]
    rates = [r["tokens_per_s"] for r in train_logs[1:] if r.get("tokens_per_s")]
    tail = train_logs[-3:]
    row.update(
        steps=final["step"],
        tokens=final["tokens"],
        stop_reason=final.get("stop_reason"),
        train_elapsed_s=final.get("elapsed"),
        first_loss=train_logs[0]["loss"] if train_logs else None,
        train_loss_end=statistics.mean(r["loss"] for r in tail) if tail else None,
        val_loss=final["val"]["loss"],
        val_bpb=final["val"].get("bpb"),
        tokens_per_s=statistics.median(rates) if rates else None,
        compile=config.get("compile"),
        cuda_graphs=config.get("cuda_graphs"),
        device=config.get("device"),
    )
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="d=512,heads=8,layers=4,vocab=256", help="dims of both specs")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--time-budget", type=float, default=None, help="seconds per model (a safety stop; reported)")
    ap.add_argument("--tpp-d", type=int, default=None, help="Transformer++ width (default: matched to HOPE's count)")
    ap.add_argument("--max-param-gap", type=float, default=0.10, help="refuse a pair whose counts differ more")
    ap.add_argument("--train-flag", action="append", default=[], help="one more flag for both `nlc train` runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "hope_vs_tpp")
    out.mkdir(parents=True, exist_ok=True)
    dims = bench.parse_dims(args.dims)
    dims["seq"] = args.seq_len
    hope_n = params_of(MODELS["hope"], dims)
    step = 2 * int(dims.get("heads", 1))
    if args.tpp_d:
        tpp_d = args.tpp_d
    else:  # the width whose count is closest to HOPE's
        d0 = int(dims["d"])
        widths = range(max(step, d0 - d0 // 4) // step * step, d0 + d0 // 4 + 1, step)
        tpp_d = min(widths, key=lambda w: abs(params_of(MODELS["transformer_pp"], {**dims, "d": w}) - hope_n))
    per_model = {"hope": dims, "transformer_pp": {**dims, "d": tpp_d}}
    counts = {"hope": hope_n, "transformer_pp": params_of(MODELS["transformer_pp"], per_model["transformer_pp"])}
    gap = abs(counts["hope"] - counts["transformer_pp"]) / max(counts.values())
    print(f"parameters: {counts} (gap {gap:.1%})", flush=True)
    if gap > args.max_param_gap:
        print(f"error: the parameter counts differ by {gap:.1%} > --max-param-gap {args.max_param_gap:.0%}",
              file=sys.stderr)
        return 2
    env = bench.environment(bench._pick_device(args.device))
    rows = []
    for name, path in MODELS.items():
        text = bench.apply_dims(path.read_text(), per_model[name], path.name)
        row = train(name, text, out, args)
        row["params"] = counts[name]
        row["dims"] = per_model[name]
        rows.append(row)
    doc = {"tool": "benchmarks/hope_vs_tpp.py", "command": "python benchmarks/hope_vs_tpp.py " + " ".join(argv or sys.argv[1:]),
           "env": env, "dims": per_model, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
           "tokens_budget": args.steps * args.batch_size * args.seq_len, "rows": rows}
    (out / "hope_vs_tpp.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    title = (f"card {env['device_name']} | torch {env['torch']} | {env['date']} | HOPE dims {args.dims}, "
             f"Transformer++ d={tpp_d} | {args.steps} steps x {args.batch_size} x {args.seq_len} tokens")
    header = ("| model | params | steps | train loss (first → end) | val loss | val bits/byte | tokens/s (steady) | "
              "wall s | compile |")
    lines = [title, "", header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["returncode"] != 0:
            lines.append(f"| {r['model']} | {r['params']:,} | failed: {r.get('error')} | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['params']:,} | {r['steps']} ({r['stop_reason']}) | "
                     f"{r['first_loss']:.3f} → {r['train_loss_end']:.3f} | {r['val_loss']:.4f} | {r['val_bpb']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} | {r['compile']}{' + cuda graphs' if r.get('cuda_graphs') else ''} |")
    (out / "hope_vs_tpp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
