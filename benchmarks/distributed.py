"""Multi-GPU training with nlc (not a test): DDP scaling and an FSDP model too big for one GPU.

    PYTHONPATH=/path/to/nlc python3 benchmarks/distributed.py          # 2 GPUs, NCCL (about 5 minutes)
    PYTHONPATH=/path/to/nlc python3 benchmarks/distributed.py --smoke  # tiny sizes on the CPU, gloo

Cases, each run in fresh processes launched through torchrun's module
(``python3 -m torch.distributed.run --standalone --nproc-per-node N``), with the very code the
generated ``train.py`` uses (``nlc.runtime.distributed``: ``wrap_model``, ``adapt_optimizers``,
``GradSync``; the optimizers of the spec's ``build_optimizers``; bf16 autocast; gradient
clipping at 1.0 per optimizer):

* ``tpp``:  ``examples/transformer_pp.nl`` at d=1024, 16 heads, 16 layers (268M parameters),
  8 x 1024 tokens per GPU: tokens/s on 1 GPU (no wrapper) and on N GPUs (DDP);
* ``hope``: ``examples/hope.nl`` at d=512, 8 heads, 4 layers (19M parameters, but per-sequence
  MLP memories: about 1.6 GiB of fp32 activations per layer and sequence), 4 x 1024 tokens
  per GPU: the same;
* ``fsdp``: Transformer++ at d=4096, 32 heads and as many layers as make parameters, gradients
  and AdamW moments (16 bytes per parameter) 1.05x one GPU's memory (21 layers, 5.6B parameters
  on an 80 GB card), 1 x 1024 tokens per GPU: on 1 GPU (expected: out of memory) and on N GPUs
  with FSDP2 (about 0.53x the card's memory in sharded state per GPU with N = 2, plus
  activations and one unsharded block).

The DDP cases keep the batch per GPU fixed (weak scaling), so the global batch grows with N;
scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1 GPU). Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps, the largest over the ranks. The
model is built on the CPU from a fixed seed and the batches are random tokens (throughput does
not depend on the text). ``torch.compile`` is off unless ``--compile`` (its cost would dominate
this run). Prints a table with the card's name and writes the same as JSON to
``$OUT/distributed.json`` when ``OUT`` is set (and to ``--json PATH``).

Needs only torch (2.4 or later) and nlc importable (``PYTHONPATH``); no network, no pip install.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> spec, dims, batch per GPU, sequence, steps (timed), warm-up steps, parallel for N > 1
GPU_CASES = {
    "tpp": {"spec": "transformer_pp.nl", "dims": {"d": 1024, "heads": 16, "layers": 16}, "batch": 8, "seq": 1024,
            "steps": 10, "warmup": 3, "parallel": "ddp"},
    "hope": {"spec": "hope.nl", "dims": {"d": 512, "heads": 8, "layers": 4}, "batch": 4, "seq": 1024,
             "steps": 5, "warmup": 2, "parallel": "ddp"},
    "fsdp": {"spec": "transformer_pp.nl", "dims": {"d": 4096, "heads": 32, "layers": "fill"}, "batch": 1, "seq": 1024,
             "steps": 5, "warmup": 2, "parallel": "fsdp"},
}
SMOKE_CASES = {
    "tpp": {"spec": "transformer_pp.nl", "dims": {"d": 32, "heads": 2, "layers": 2}, "batch": 2, "seq": 64,
            "steps": 2, "warmup": 1, "parallel": "ddp"},
    "hope": {"spec": "hope.nl", "dims": {"d": 32, "heads": 2, "layers": 1}, "batch": 2, "seq": 64,
             "steps": 2, "warmup": 1, "parallel": "ddp"},
    "fsdp": {"spec": "transformer_pp.nl", "dims": {"d": 32, "heads": 2, "layers": 3}, "batch": 2, "seq": 64,
             "steps": 2, "warmup": 1, "parallel": "fsdp"},
}
FILL = 1.05  # the fsdp model's parameters + gradients + AdamW moments, in GPU memories


def set_dims(text: str, dims: dict) -> str:
    """The spec with ``name = value`` lines of its dims block replaced."""
    for name, value in dims.items():
        text, n = re.subn(rf"(?m)^(\s*){name} = \d+$", rf"\g<1>{name} = {value}", text)
        if n != 1:
            raise SystemExit(f"distributed.py: cannot set dims {name} in the spec")
    return text


def fill_layers(d: int, memory_bytes: int) -> int:
    """Transformer++ layers (16 d^2 parameters each: attention 4 d^2, SwiGLU 12 d^2) whose 16 bytes
    per parameter (fp32 weights, gradients, two AdamW moments) are FILL x one GPU's memory."""
    return max(1, math.ceil(FILL * memory_bytes / 16 / (16 * d * d)))


# ---------------------------------------------------------------------------------------------
# worker: one rank of one case


def worker(case: dict, result_dir: Path) -> int:
    import torch

    import nlc
    from nlc.runtime.distributed import (
        GradSync,
        adapt_optimizers,
        init,
        launch_env,
        plan,
        wrap_model,
    )

    ctx = init(plan(case["parallel"], case["device"], env=launch_env()))
    dev = ctx.device
    cuda = dev.type == "cuda"
    result = {"rank": ctx.rank, "world": ctx.world, "stage": "build"}

    def write():
        (result_dir / f"rank{ctx.rank}.json").write_text(json.dumps(result))

    try:
        text = set_dims((ROOT / "examples" / case["spec"]).read_text(), {**case["dims"], "seq": case["seq"]})
        model_cls = nlc.load(text)
        module = sys.modules[model_cls.__module__]
        cfg = dataclasses.replace(module.ModelConfig(), seq_len=case["seq"])
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = model_cls(cfg)
        result["params"] = sum(p.numel() for p in model.parameters())
        if not ctx.distributed:
            result["stage"] = "to(device)"
            model.to(dev)
        result["stage"] = "wrap"
        train_forward, _ = wrap_model(model, ctx, compile=case["compile"])
        optimizers = module.build_optimizers(model, {})
        adapt_optimizers(optimizers, ctx)
        periods = list(module.optimizer_periods()) if hasattr(module, "optimizer_periods") else [1] * len(optimizers)
        sync = GradSync(ctx, train_forward, periods)
        result["setup_s"] = time.perf_counter() - t0
        if cuda:
            torch.set_float32_matmul_precision("high")
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda)
        b, T = case["batch"], case["seq"]
        gen = torch.Generator(device=dev).manual_seed(1 + ctx.rank)

        def step(i):
            x = torch.randint(0, cfg.vocab_size, (b, T + 1), device=dev, generator=gen)
            with sync.context(i):
                with autocast:
                    _, loss = train_forward(x[:, :-1], x[:, 1:])
                loss.backward()
            for opt, period in zip(optimizers, periods):
                if (i + 1) % period == 0:
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            return loss.detach()

        def wait():
            if cuda:
                torch.cuda.synchronize(dev)
            ctx.barrier()

        result["stage"] = "warm-up"
        for i in range(case["warmup"]):
            loss = step(i)
        wait()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        result["stage"] = "timed steps"
        t0 = time.perf_counter()
        for i in range(case["steps"]):
            loss = step(case["warmup"] + i)
        wait()
        elapsed = time.perf_counter() - t0
        result.update(stage="done", step_s=elapsed / case["steps"], loss=float(loss),
                      tokens_per_s=case["steps"] * b * T * ctx.world / elapsed,
                      peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None)
        peak = torch.tensor([result["peak_gib"] or 0.0])
        result["peak_gib_max"] = float(ctx.all_reduce(peak, "max")) if cuda else None
        write()
        ctx.close()
        return 0
    except torch.OutOfMemoryError:
        result["oom"] = True
        write()
        os._exit(3)  # the other ranks may wait in a collective: torchrun stops them when this one exits


# ---------------------------------------------------------------------------------------------
# parent: launch every case, print the table


def launch(name: str, case: dict, nproc: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="nlc-dist-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), __file__,
               "--worker", json.dumps(case), "--result-dir", tmp]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
            tail = (proc.stdout + proc.stderr)[-2000:]
            code = proc.returncode
        except subprocess.TimeoutExpired as e:
            tail, code = f"timed out after {timeout:.0f} s: {str(e.stderr or '')[-1500:]}", None
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    out = {"case": name, "gpus": nproc, "parallel": case["parallel"] if nproc > 1 else "none",
           "spec": case["spec"], "dims": case["dims"], "batch_per_gpu": case["batch"], "seq": case["seq"],
           "wall_s": time.perf_counter() - t0, "exit": code}
    main = next((r for r in ranks if r["rank"] == 0), ranks[0] if ranks else None)
    if main is not None:
        out.update({k: main.get(k) for k in ("params", "setup_s", "step_s", "tokens_per_s", "loss", "stage")})
        out["peak_gib"] = main.get("peak_gib_max") or main.get("peak_gib")
    if any(r.get("oom") for r in ranks):
        out["oom"] = True
        out["stage"] = next(r["stage"] for r in ranks if r.get("oom"))
    elif code != 0 or main is None or main.get("stage") != "done":
        out["error"] = tail
    return out


def _fmt_params(n):
    return "-" if n is None else f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def table(rows: list[dict], header: str) -> str:
    columns = (f"{'case':6} {'spec':18} {'params':>8} {'batch/GPU x seq':>16} {'GPUs':>4} {'parallel':8} "
               f"{'tokens/s':>11} {'step s':>8} {'peak GiB/GPU':>12} {'scaling':>8}")
    lines = [header, columns]
    for r in rows:
        if r.get("oom"):
            result = f"out of memory (at {r.get('stage')})"
        elif r.get("error"):
            result = "failed (see JSON)"
        else:
            peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
            eff = "" if r.get("efficiency") is None else f"{100 * r['efficiency']:.0f}%"
            result = f"{r['tokens_per_s']:>11,.0f} {r['step_s']:>8.3f} {peak:>12} {eff:>8}"
        lines.append(f"{r['case']:6} {r['spec']:18} {_fmt_params(r.get('params')):>8} "
                     f"{str(r['batch_per_gpu']) + ' x ' + str(r['seq']):>16} {r['gpus']:>4} {r['parallel']:8} {result}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU over gloo (checks the script, not speed)")
    p.add_argument("--nproc", type=int, default=2, help="GPUs (ranks) of the multi-GPU runs (default: 2)")
    p.add_argument("--cases", default="tpp,hope,fsdp", help="comma-separated subset of tpp, hope, fsdp")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (per block under FSDP)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per launch (default: 300)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker), Path(args.result_dir))

    import torch

    cases = SMOKE_CASES if args.smoke else GPU_CASES
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(names) - set(cases))
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(cases)}")
    if args.smoke:
        device, card, memory = "cpu", "CPU (gloo)", None
    else:
        if not torch.cuda.is_available() or torch.cuda.device_count() < args.nproc:
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            print(f"distributed.py: error: needs {args.nproc} CUDA devices, found {n} (try --smoke)", file=sys.stderr)
            return 2
        device, card = "cuda", torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory
    header = (f"card: {card} | GPUs: {args.nproc} | torch {torch.__version__} | "
              f"compile {'on' if args.compile else 'off'} | {'smoke sizes' if args.smoke else 'benchmark sizes'}")
    print(header, flush=True)
    rows = []
    for name in names:
        case = {**cases[name], "device": device, "compile": args.compile}
        if case["dims"].get("layers") == "fill":
            case["dims"] = {**case["dims"], "layers": fill_layers(case["dims"]["d"], memory)}
        one = launch(name, {**case, "parallel": "none"}, 1, args.timeout)
        many = launch(name, case, args.nproc, args.timeout)
        if one.get("tokens_per_s") and many.get("tokens_per_s") and case["parallel"] == "ddp":
            many["efficiency"] = many["tokens_per_s"] / (args.nproc * one["tokens_per_s"])
        rows += [one, many]
        for r in (one, many):
            status = "OOM" if r.get("oom") else "failed" if r.get("error") else f"{r['tokens_per_s']:,.0f} tokens/s"
            print(f"  {name} on {r['gpus']} ({r['parallel']}): {status} [{r['wall_s']:.0f} s]", flush=True)
            if r.get("error"):
                print("    " + r["error"].strip().replace("\n", "\n    ")[-1200:], flush=True)
    print(table(rows, header))
    report = {"card": card, "gpus": args.nproc, "torch": torch.__version__, "compile": args.compile, "smoke": args.smoke,
              "gpu_memory_bytes": memory, "results": rows}
    targets = [Path(args.json)] if args.json else []
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "distributed.json")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {target}")
    failed = [r for r in rows if r.get("error") and not (r["gpus"] == 1 and r["case"] == "fsdp")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
