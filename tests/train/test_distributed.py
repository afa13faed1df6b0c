"""Distributed training on the CPU: 2 ranks over gloo, launched through torchrun's module.

A shrunken HOPE (d=32, 2 heads, 1 layer, seq 64) trained on 2 ranks with DDP and with FSDP2
matches the single-process run with the same global batch (losses, validation and
test-time-learning metrics, parameters, optimizer states within float tolerance). Checkpoints
move between world sizes: FSDP on 2 ranks -> one plain process -> DDP on 2 ranks continues
the uninterrupted run, and `reset never` memory is gathered by rows and split again. nlc's
optimizer levels (momentum, Adam, delta momentum, DMGD, M3, Muon) step on FSDP shards as on
whole tensors; DDP's no_sync accumulation across optimizer periods is exact. Launch mistakes
fail in one line with exit status 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nlc.runtime import distributed as nd
from nlc.runtime.checkpoint import DCP_NAME, FILE_NAME, find_checkpoint, load_checkpoint
from nlc.runtime.data import DataError, shard_rows

from ..codegen.helpers import shrink
from ..conftest import EXAMPLES
from .conftest import REPO, load_train

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

RTOL = 1e-5
STEPS = ["--steps", "4", "--batch-size", "4", "--seq-len", "64", "--eval-batches", "1", "--log-every", "1",
         "--eval-every", "0", "--no-progress", "--ttl"]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def torchrun(cwd: Path, *args: str, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def nlc_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``nlc ARGS`` in this process (``nlc train --nproc`` makes this process torchrun's agent)."""
    from nlc.cli import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def in_process(run_dir: Path, *args: str) -> int:
    """train.py's main() in this process, on one thread (as each torchrun rank runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_train(run_dir).main(list(args))
    finally:
        torch.set_num_threads(threads)


def losses(out: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["loss"] is not None]


def assert_close_losses(a, b):
    assert [s for s, _ in a] == [s for s, _ in b], (a, b)
    for (s, x), (_, y) in zip(a, b):
        assert abs(x - y) <= RTOL * abs(y), (s, x, y)


def assert_close_params(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, x in a.items():
        scale = b[k].abs().max().item() + 1e-12
        assert (x - b[k]).abs().max().item() <= RTOL * scale, k


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory) -> Path:
    """hope.nl shrunk, compiled once; each test copies model.py/train.py into its own run folders."""
    from nlc.codegen import write_package
    from nlc.pipeline import check_file

    where = tmp_path_factory.mktemp("hope")
    spec = where / "hope_tiny.nl"
    spec.write_text(shrink((EXAMPLES[0].parent / "hope.nl").read_text(), d=32, heads=2, layers=1, seq=64))
    result = check_file(str(spec))
    assert result.ok, result.diagnostics
    write_package(result.program, where / "pkg")
    return where


@pytest.fixture(scope="module")
def single(spec_dir) -> Path:
    """The reference: one process, 4 steps of the global batch 4."""
    pkg = spec_dir / "pkg"
    assert in_process(pkg, "--out", str(spec_dir / "single"), *STEPS) == 0
    return spec_dir / "single"


# ---- DDP and FSDP against one process ------------------------------------------------------------


def test_ddp_through_nlc_train_nproc_matches_one_process(spec_dir, single, capsys, monkeypatch):
    out = spec_dir / "ddp"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code, stdout, err = nlc_cli(capsys, "train", str(spec_dir / "hope_tiny.nl"), "--nproc", "2", "--out", str(out), *STEPS)
    assert code == 0, err[-3000:]
    assert_close_losses(losses(out), losses(single))
    final, ref = json.loads((out / "final.json").read_text()), json.loads((single / "final.json").read_text())
    assert abs(final["val"]["loss"] - ref["val"]["loss"]) <= RTOL * ref["val"]["loss"]  # sharded eval, all-reduced
    for key in ("ttl_loss", "reset_loss"):  # test-time learning: the streams (rows) split over the ranks
        assert abs(final["ttl"][0][key] - ref["ttl"][0][key]) <= RTOL * ref["ttl"][0][key]
    assert find_checkpoint(out) == out / DCP_NAME and not (out / FILE_NAME).exists()
    assert_close_params(load_checkpoint(out / DCP_NAME)["model"], load_checkpoint(single / FILE_NAME)["model"])
    config = json.loads((out / "config.json").read_text())
    assert config["distributed"] == {"parallel": "ddp", "world_size": 2, "backend": "gloo", "batch_per_rank": 2}
    # nlc eval reads the sharded checkpoint whole, in one process
    code, stdout, err = nlc_cli(capsys, "eval", str(out), "--format", "json")
    assert code == 0, err
    assert abs(json.loads(stdout)["validation"]["loss"] - final["val"]["loss"]) <= RTOL * final["val"]["loss"]


def test_fsdp_then_one_process_then_ddp_continues_the_one_process_run(spec_dir, single):
    """Steps 1-2 with FSDP2 on 2 ranks (torchrun, sharded checkpoint), step 3 in one plain
    process (reads the sharded checkpoint whole, writes ckpt.pt), step 4 with DDP on 2 ranks
    (slices ckpt.pt): the same losses, parameters and optimizer states as the uninterrupted
    single-process run."""
    pkg = spec_dir / "pkg"
    out = spec_dir / "fsdp"
    r = torchrun(pkg, "train.py", "--parallel", "fsdp", "--out", str(out), "--stop-at", "2", *STEPS)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = losses(single)
    assert_close_losses(losses(out), ref[:2])
    meta = torch.load(out / DCP_NAME / "meta.pt", weights_only=True)
    assert (meta["version"], meta["world_size"], meta["parallel"], meta["step"]) == (2, 2, "fsdp", 2)

    assert in_process(pkg, "--resume", "--out", str(out), "--stop-at", "3", "--no-progress") == 0
    assert_close_losses(losses(out), ref[:3])
    assert find_checkpoint(out) == out / FILE_NAME and not (out / DCP_NAME).exists()

    r = torchrun(pkg, "train.py", "--resume", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "start afresh" in r.stderr  # 1 process -> 2 ranks: new random streams (this model draws none)
    assert_close_losses(losses(out), ref)
    got, want = load_checkpoint(out / DCP_NAME), load_checkpoint(single / FILE_NAME)
    assert got["step"] == 4
    assert_close_params(got["model"], want["model"])
    for a, b in zip(got["optimizers"][0]["state"].values(), want["optimizers"][0]["state"].values()):
        assert_close_params(a, b)
    final, ref_final = json.loads((out / "final.json").read_text()), json.loads((single / "final.json").read_text())
    assert abs(final["val"]["loss"] - ref_final["val"]["loss"]) <= RTOL * ref_final["val"]["loss"]


# ---- optimizer levels on FSDP shards, DDP accumulation across periods -----------------------------

WORKER = textwrap.dedent('''
    import contextlib, sys, torch, torch.nn as nn
    from nlc.runtime import optim as O
    from nlc.runtime.distributed import (Context, GradSync, adapt_optimizers, gather_memory, init, launch_env, plan,
                                         split_memory, wrap_model, _full)

    class Net(nn.Module):  # odd sizes: uneven shards; a conv weight: an N-D matrix for Newton-Schulz
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList([nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 16)) for _ in range(2)])
            self.conv = nn.Conv1d(16, 6, 3, padding=1)
            self.head = nn.Linear(6, 5)
        def forward(self, x):
            for b in self.layer:
                x = x + b(x)
            return self.head(self.conv(x.transpose(1, 2)).transpose(1, 2))

    CASES = {
        "momentum": lambda ps: O.MomentumMemory(ps, lr=0.05, decay=0.9, nesterov=True, weight_decay=0.01),
        "muon": lambda ps: O.Muon(ps, lr=0.02),
        "adam_ns": lambda ps: O.AdamMemory(ps, lr=0.01, weight_decay=0.1, output="newton_schulz", nonmatrix="polar"),
        "delta": lambda ps: O.DeltaMomentum(ps, lr=0.02, form="nips"),
        "dmgd": lambda ps: O.DeepMomentum(ps, lr=0.02, hidden=4, inner_lr=0.1),
        "m3": lambda ps: O.M3(ps, lr=0.01, slow_period=2, eps=1e-3),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01),
    }

    def batch(step, rows=slice(None)):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 7, 16, generator=g, dtype=torch.float64), torch.randn(4, 7, 5, generator=g, dtype=torch.float64)
        return x[rows], y[rows]

    def train(ctx, make, parallel, periods, steps=6):
        torch.manual_seed(0)
        model = Net().double()
        fwd = wrap_model(model, ctx, compile=False)[0] if parallel else model
        params = list(model.parameters())
        groups = [params[:4], params[4:]] if len(periods) == 2 else [params]
        opts = [make(g) for g in groups]
        if parallel:
            adapt_optimizers(opts, ctx)
        sync = GradSync(ctx, fwd, periods)
        for step in range(steps):
            x, y = batch(step, ctx.rows(4) if parallel else slice(None))
            with sync.context(step) if parallel else contextlib.nullcontext():
                ((fwd(x) - y) ** 2).mean().backward()
            if parallel and step == 3:
                sync.settle(model)  # what a checkpoint does mid-period (after a no_sync step)
            for opt, period in zip(opts, periods):
                if (step + 1) % period == 0:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        return {n: _full(p).detach().clone() for n, p in model.named_parameters()}

    fsdp = init(plan("fsdp", "cpu", env=launch_env()))
    ddp = Context(plan("ddp", "cpu", env=launch_env()))  # the same process group

    # persisted memory: rows gathered in rank order, split back
    mine = {"0.n": torch.tensor(1), "0.0.0": torch.full((2, 3), float(ddp.rank))}
    whole = gather_memory(mine, ddp)
    assert whole["0.0.0"].tolist() == [[0.0] * 3] * 2 + [[1.0] * 3] * 2 and int(whole["0.n"]) == 1
    assert torch.equal(split_memory(whole, ddp)["0.0.0"], mine["0.0.0"])

    checks = [(fsdp, n, [1]) for n in CASES if n != "momentum"]
    checks += [(ddp, "momentum", [3]), (ddp, "adamw", [1, 2]), (ddp, "m3", [2, 3])]
    for ctx, name, periods in checks:
        ref = train(ctx, CASES[name], False, periods)
        got = train(ctx, CASES[name], True, periods)
        err = max(((ref[k] - got[k]).abs().max() / (ref[k].abs().max() + 1e-30)).item() for k in ref)
        if ctx.rank == 0:
            print(f"{ctx.parallel} {name} {periods} {err:.3e}", flush=True)
        assert err < 1e-10, (ctx.parallel, name, err)
    fsdp.close()
''')


def test_optimizer_levels_and_periods_match_unsharded(tmp_path):
    """FSDP: every optimizer level on DTensor shards (Newton-Schulz on the gathered matrix);
    DDP: gradient accumulation over optimizer periods with no_sync steps and a mid-period settle."""
    (tmp_path / "worker.py").write_text(WORKER)
    r = torchrun(tmp_path, "worker.py")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert (r.stdout.count("fsdp "), r.stdout.count("ddp ")) == (6, 3), r.stdout


# ---- launch mistakes: one line, exit 2 ----------------------------------------------------------


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("env, args, message", [
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, ["--batch-size", "3"], "does not split over 2 ranks"),
    ({}, ["--parallel", "fsdp"], "needs a process group"),
    ({}, ["--parallel", "ddp"], "not launched by torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, ["--backend", "nccl", "--device", "cpu"], "nccl backend needs CUDA"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, [], "bad world size"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, [], "bad world size"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, ["--parallel", "none"], "--parallel is none"),
])
def test_launch_errors(spec_dir, monkeypatch, capsys, env, args, message):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code = load_train(spec_dir / "pkg").main(["--out", str(spec_dir / "never"), *args])
    assert code == 2
    assert message in one_line(capsys.readouterr().err)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("args, message", [
    (["--nproc", "2", "--batch-size", "3"], "does not split over 2 ranks"),
    (["--nproc", "0"], "bad world size"),
    (["--nproc", "x"], "bad world size"),
    (["--nproc", "2", "--device", "cuda"], "CUDA"),
    (["--nproc", "2", "--backend", "nccl", "--device", "cpu"], "nccl"),
])
def test_nlc_train_nproc_errors_once_before_launch(spec_dir, capsys, args, message):
    code, _, err = nlc_cli(capsys, "train", str(spec_dir / "hope_tiny.nl"), "--out", str(spec_dir / "never"), *args)
    assert code == 2, (args, err)
    assert message in one_line(err), args


def test_more_ranks_than_gpus_is_an_error():
    with pytest.raises(nd.DistributedError, match="only 1 CUDA device"):
        nd.preflight("auto", "cuda", "auto", 2, 8, cuda_count=1)
    with pytest.raises(nd.DistributedError, match="names one GPU"):
        nd.plan("ddp", "cuda:1", env=nd.LaunchEnv(2, 0, 0, 2), cuda_count=2)
    p = nd.plan("auto", "auto", "gloo", env=nd.LaunchEnv(2, 1, 1, 2), cuda_count=2)
    assert (p.parallel, str(p.device), p.backend) == ("ddp", "cuda:1", "gloo")


# ---- sharding of batches ------------------------------------------------------------------------


def test_rows_cover_the_global_batch_without_overlap():
    rows = [shard_rows(12, r, 3) for r in range(3)]
    assert [list(range(12))[s] for s in rows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(DataError, match="does not split"):
        shard_rows(10, 0, 4)


def test_uneven_target_counts_weight_the_local_mean():
    """The mean over each rank's targets, weighted, averages to the global mean."""
    x = torch.zeros(4, 3, dtype=torch.long)
    y = torch.tensor([[1, 1, 1], [1, -100, -100], [1, 1, -100], [-100, -100, 1]])
    per_row = torch.tensor([[1.0, 2, 3], [4, 0, 0], [5, 6, 0], [0, 0, 7]])
    want = per_row.sum() / (y != -100).sum()
    got = 0.0
    for rank in range(2):
        ctx = nd.Context(nd.Plan("ddp", 2, rank, rank, torch.device("cpu"), "gloo"))
        _, ys, w = nd.shard_batch(x, y, ctx)
        rows = per_row[ctx.rows(4)]
        got += w * rows.sum() / (ys != -100).sum() / 2
    assert torch.allclose(got, want)


def test_find_checkpoint_recovers_from_a_crash_between_renames(tmp_path):
    assert find_checkpoint(tmp_path) is None
    old = tmp_path / f".{DCP_NAME}.old"
    old.mkdir()
    assert find_checkpoint(tmp_path) is None  # incomplete: no meta.pt / .metadata
    (old / "meta.pt").write_bytes(b"x")
    (old / ".metadata").write_bytes(b"x")
    assert find_checkpoint(tmp_path) == old
    (tmp_path / DCP_NAME).mkdir()
    assert find_checkpoint(tmp_path) == tmp_path / DCP_NAME


def test_benchmark_worker_runs_in_process(tmp_path):
    """benchmarks/distributed.py's worker on one CPU process (its torchrun launches are the same
    code as the tests above); the full CPU check is `python3 benchmarks/distributed.py --smoke`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_nlc_bench_distributed", REPO / "benchmarks" / "distributed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.fill_layers(4096, 80 * 2**30) * 16 * 16 * 4096**2 > 80 * 2**30  # does not fit one GPU
    for name, case in bench.SMOKE_CASES.items():
        out = tmp_path / name
        out.mkdir()
        threads = torch.get_num_threads()
        try:
            assert bench.worker({**case, "parallel": "none", "device": "cpu", "compile": False, "steps": 1}, out) == 0
        finally:
            torch.set_num_threads(threads)
        result = json.loads((out / "rank0.json").read_text())
        assert result["stage"] == "done" and result["tokens_per_s"] > 0, result


# ---- persisted memory (reset never): rows gathered into the checkpoint, split on resume ----------

# A tensor-only flattening of a level's carry, whatever its nesting (the model.py contract for
# persisted memory). Installed into the generated model.py below because the template's own
# memory_state_dict flattens two levels only and fails on the nested carries of `reset never`.
def test_reset_never_memory_survives_fsdp_checkpoint_and_resume_on_one_process(spec_dir):
    """HOPE with its `fast` CMS level at `reset never`: the memory of every batch row persists
    across training steps on the rank that owns the row, is gathered into the sharded checkpoint
    and split again on resume; the run equals the single-process one (losses, memory)."""
    from nlc.codegen import write_package
    from nlc.pipeline import check_file

    text = (spec_dir / "hope_tiny.nl").read_text()
    at = text.index("every 16 tokens\n", text.index("level fast")) + len("every 16 tokens\n")
    spec = spec_dir / "hope_never.nl"
    spec.write_text(text[:at] + "        reset never\n" + text[at:])
    result = check_file(str(spec))
    assert result.ok, result.diagnostics
    pkg = spec_dir / "never_pkg"
    write_package(result.program, pkg)

    args = [a for a in STEPS if a != "--ttl"]
    assert in_process(pkg, "--out", str(spec_dir / "never_single"), *args) == 0
    out = spec_dir / "never_split"
    r = torchrun(pkg, "train.py", "--parallel", "fsdp", "--out", str(out), "--stop-at", "2", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = load_checkpoint(out / DCP_NAME)["memory"]
    assert saved and all(v.shape[0] == 4 for v in saved.values() if v.ndim)  # the global batch's rows
    assert in_process(pkg, "--resume", "--out", str(out), "--no-progress") == 0
    assert_close_losses(losses(out), losses(spec_dir / "never_single"))
    got, want = load_checkpoint(out / FILE_NAME)["memory"], load_checkpoint(spec_dir / "never_single" / FILE_NAME)["memory"]
    assert_close_params(got, want)
