"""``nlc train`` and ``nlc eval``: the researcher's main job from the command line.

``nlc train SPEC [flags]`` compiles the spec into the run folder (``--out``, default
``runs/<model name>``) — ``model.py``, ``train.py`` and a copy of the spec — and runs that very
``train.py`` in-process, so a run folder is self-contained: ``python runs/<name>/train.py
--resume`` continues it without nlc's front end. Every flag after SPEC is train.py's
(``nlc train SPEC --help`` lists them), except ``--nproc N``: then the run folder is written
once, here, the flags are checked for N processes, and ``train.py`` is launched on N ranks
through torchrun's own module (``torch.distributed.run``, ``--standalone``), as
``torchrun --standalone --nproc-per-node N DIR/train.py [flags]`` would (docs/distributed.md).

``nlc eval CKPT`` loads a checkpoint (a run folder or its ``ckpt.pt``) with the ``model.py``
beside it and reports validation loss and bits per byte (text), accuracy (MQAR), the
after-task-i-on-task-j matrix (continual), and with ``--ttl`` the same with in-context memories
that keep learning across sequences.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

__all__ = ["add_parser", "cmd_eval", "cmd_train"]


def _error(msg: str, code: str = "NL901", status: int = 2) -> int:
    print(f"nlc: error: {code} {msg}", file=sys.stderr)
    return status


def _import(path: Path, prefix: str):
    name = prefix + hashlib.sha256(str(path.resolve()).encode() + path.read_bytes()).hexdigest()[:16]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _pop_nproc(rest: list[str]) -> tuple[str | None, list[str]]:
    """``--nproc N`` / ``--nproc=N`` taken out of train.py's flags (the value as given, or None)."""
    value, kept, i = None, [], 0
    while i < len(rest):
        a = rest[i]
        if a == "--":
            kept += rest[i:]
            break
        if a == "--nproc":
            value = rest[i + 1] if i + 1 < len(rest) else ""
            i += 2
            continue
        if a.startswith("--nproc="):
            value = a.split("=", 1)[1]
        else:
            kept.append(a)
        i += 1
    return value, kept


def _torchrun(script: Path, argv: list[str], nproc: int) -> int:
    """Run ``script`` on ``nproc`` local ranks through ``torch.distributed.run`` (torchrun's module,
    in-process: this process is its agent); the exit status of the first failed rank, else 0."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, parse_args, run

    env_before = dict(os.environ)  # restored afterwards (the agent sets variables of its own too)
    root = str(Path(__file__).resolve().parents[1])  # the ranks import nlc from where this nlc lives
    os.environ["PYTHONPATH"] = os.pathsep.join([root] + ([env_before["PYTHONPATH"]] if env_before.get("PYTHONPATH") else []))
    if "OMP_NUM_THREADS" not in env_before:  # torchrun would set 1: share the cores instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    # The agent's own log lines (banners, "failed (exitcode: 2)" reports) would bury the ranks'
    # one-line errors: quiet them; the ranks' own output is untouched.
    quieted = [(lg, lg.level) for name, lg in list(logging.root.manager.loggerDict.items())
               if name.startswith("torch.distributed") and isinstance(lg, logging.Logger)]
    for lg, _ in quieted:
        lg.setLevel(logging.CRITICAL)
    flags = ["--standalone", "--nproc-per-node", str(nproc)]
    if "--shutdown-timeout" in get_args_parser()._option_string_actions:
        # on Ctrl-C the agent gives the ranks this long to agree, save a checkpoint and exit (default 30 s)
        flags += ["--shutdown-timeout", "300"]
    signals = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n)]
    handlers = {s: signal.getsignal(s) for s in signals}  # the agent installs its own
    try:
        run(parse_args([*flags, str(script), *argv]))
        return 0
    except ChildFailedError as e:
        failures = e.failures
        first = failures[min(failures)]
        code = int(first.exitcode)
        if code < 0:  # killed by a signal
            return 130 if -code in (signal.SIGINT, signal.SIGTERM) else 128 - code
        if code not in (1, 2, 130):
            print(f"nlc: error: rank {min(failures)} exited with status {code}", file=sys.stderr)
        return code
    except SignalException as e:
        return 128 + int(e.sigval)
    finally:
        for s, h in handlers.items():
            if h is not None:
                try:
                    signal.signal(s, h)
                except ValueError:  # not the main thread (then the agent could not install its own either)
                    pass
        for lg, level in quieted:
            lg.setLevel(level)
        os.environ.clear()
        os.environ.update(env_before)


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _device(name: str):
    """``auto | cpu | cuda | cuda:N`` as a torch device; ValueError with the allowed forms."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r} (hint: auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here (hint: --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r} (hint: auto, cpu, cuda or cuda:N)")
    return dev


def _out_dir(rest: list[str], default: str) -> str:
    for i, a in enumerate(rest):
        if a == "--out" and i + 1 < len(rest):
            return rest[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return default


# ---- train ---------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    from .codegen import compile_program, write_package
    from .diagnostics import CodegenError, render
    from .pipeline import check_file
    from .runtime.checkpoint import find_checkpoint

    result = check_file(args.file)
    sources = {result.source.name: result.source} if result.source else {}
    if not result.ok:
        print(render(result.diagnostics, sources), file=sys.stderr)
        return 1
    program = result.program
    nproc_text, rest = _pop_nproc(list(args.rest))
    nproc = None
    if nproc_text is not None:
        try:
            nproc = int(nproc_text)
        except ValueError:
            return _error(f"bad world size: --nproc {nproc_text!r} is not an integer (hint: e.g. --nproc 2)")
        if nproc < 1:
            return _error(f"bad world size: --nproc {nproc} (hint: use --nproc 1 or more)")
        if "WORLD_SIZE" in os.environ:
            return _error("--nproc starts torchrun itself, and this process already runs under torchrun "
                          "(hint: drop --nproc, or run nlc train outside torchrun)")
    try:
        compiled = compile_program(program)
    except CodegenError as e:
        print(render(e.diagnostics, sources), file=sys.stderr)
        return 1
    if any(a in ("-h", "--help") for a in rest):  # the flags of train.py, without touching any run folder
        with tempfile.TemporaryDirectory() as tmp:
            write_package(program, tmp, compiled)
            return int(_import(Path(tmp) / "train.py", "_nlc_train_").main(["--help"]) or 0)
    out = _out_dir(rest, f"runs/{program.name}")
    if not any(a == "--out" or a.startswith("--out=") for a in rest):
        rest = ["--out", out] + rest
    previous = Path(out) / "model.py"
    if (previous.is_file() and previous.read_text(encoding="utf-8") != compiled.model_source
            and find_checkpoint(out) is not None and "--overwrite" not in rest):
        return _error(f"{out} holds a run of another spec (or of another nlc version); its model.py is kept "
                      "(hint: choose another --out, or --overwrite to start that folder over)", "NL903")
    try:
        write_package(program, out, compiled)
    except OSError as e:
        return _error(f"cannot write the run folder {out}: {e.strerror or e}")
    train = _import(Path(out) / "train.py", "_nlc_train_")
    if nproc is None:
        return int(train.main(rest) or 0)
    status = train.check_launch(rest, nproc)  # errors once, here, rather than once per rank
    if status:
        return int(status)
    return _torchrun(Path(out) / "train.py", rest, nproc)


# ---- eval ----------------------------------------------------------------------------------------


def cmd_eval(args) -> int:
    import torch

    from .runtime.checkpoint import (
        FILE_NAME,
        META_NAME,
        CheckpointError,
        find_checkpoint,
        load_checkpoint,
    )
    from .runtime.data import DataError, load_corpus
    from .runtime.evaluate import continual_summary, evaluate_task, evaluate_ttl
    from .runtime.tasks import TaskError, make_task

    path = Path(args.checkpoint)
    if path.is_dir() and not (path / META_NAME).exists():  # a run folder (else a sharded ckpt.dcp/ itself)
        path = find_checkpoint(path) or path / FILE_NAME
    if not path.exists():
        return _error(f"no checkpoint at {path} (give a run folder of `nlc train`, or its ckpt.pt or ckpt.dcp)",
                      "NL903")
    model_py = path.parent / "model.py"
    if not model_py.exists():
        return _error(f"no model.py beside {path}: evaluate a run folder written by `nlc train` "
                      "(or `nlc compile SPEC -o` that folder)", "NL903")
    try:
        module = _import(model_py, "_nlc_model_")
        ckpt = load_checkpoint(path, spec_hash=module.SPEC.get("hash"))
    except CheckpointError as e:
        return _error(f"{e}" + (f" (hint: {e.hint})" if e.hint else ""), "NL903")
    except Exception as e:  # noqa: BLE001 - a broken model.py is the user's file
        return _error(f"cannot load {model_py}: {type(e).__name__}: {e}", "NL903")
    tc = dict(ckpt.get("train_config") or {})
    try:
        device = _device(args.device)
    except ValueError as e:
        return _error(str(e))
    try:
        cfg = module.ModelConfig(**{k: v for k, v in (ckpt.get("model_config") or {}).items()
                                    if k in module.ModelConfig.__dataclass_fields__})
        model = module.Model(cfg)
        model.load_state_dict(ckpt["model"])
        if ckpt.get("memory") and hasattr(model, "load_memory_state_dict"):
            model.load_memory_state_dict(ckpt["memory"])
    except Exception as e:  # noqa: BLE001 - a checkpoint that does not fit its model.py
        return _error(f"the checkpoint does not fit {model_py}: {type(e).__name__}: {str(e)[:300]}", "NL903")
    model.to(device).eval()
    data = args.data if args.data is not None else tc.get("data")
    kind = tc.get("task", "lm")
    seq_len = args.seq_len if args.seq_len is not None else tc.get("seq_len", cfg.seq_len)
    try:
        text = kind == "lm" or (kind == "continual" and tc.get("continual_kind", "perm") == "perm")
        corpus = load_corpus(data, min_split_bytes=seq_len + 1) if text else None
        task = make_task(kind, model_vocab=cfg.vocab_size, seq_len=seq_len, batch_size=tc.get("batch_size", 8),
                         seed=tc.get("seed", 1337),
                         eval_batches=args.eval_batches if args.eval_batches is not None else tc.get("eval_batches", 20),
                         steps=tc.get("steps", 1), corpus=corpus, mqar_pairs=tc.get("mqar_pairs", 8),
                         mqar_vocab=tc.get("mqar_vocab"), continual_kind=tc.get("continual_kind", "perm"),
                         num_tasks=tc.get("num_tasks", 3), task_steps=tc.get("task_steps"))
    except (DataError, TaskError) as e:
        hint = getattr(e, "hint", "")
        return _error(f"{e}" + (f" (hint: {hint})" if hint else ""), getattr(e, "code", "NL902"))
    report: dict = {"checkpoint": str(path), "spec": ckpt.get("spec", {}).get("name"), "step": ckpt.get("step"),
                    "task": kind, "metric": task.metric}
    with torch.no_grad():
        if kind == "continual":
            rows = list((ckpt.get("extra") or {}).get("continual_matrix") or [])
            now = [evaluate_task(model, task, device, task_id=j) for j in range(task.num_tasks)]
            report["now"] = now
            report["matrix"] = rows
            filled = [r for r in rows if r is not None]
            report["summary"] = continual_summary(filled + [now] if filled and filled[-1] != now else filled or [now],
                                                  task.metric)
        else:
            report["validation"] = evaluate_task(model, task, device)
        if args.ttl:
            report["ttl"] = evaluate_ttl(model, task, device)
    if args.format == "json":
        print(json.dumps(report, indent=2, default=float))
        return 0
    _print_report(report)
    return 0


def _fmt(m: dict | None, metric: str) -> str:
    if not m:
        return "      -      "
    extra = m.get(metric)
    return f"{m['loss']:.4f}" + (f" / {extra:.4f}" if isinstance(extra, (int, float)) else "")


def _print_report(r: dict) -> None:
    print(f"nlc eval: {r['spec']} at step {r['step']} ({r['checkpoint']})")
    metric = r["metric"] or "bpb"
    if "validation" in r:
        v = r["validation"]
        line = f"  validation loss {v['loss']:.4f} nats/token"
        if "bpb" in v:
            line += f" | {v['bpb']:.4f} bits per byte"
        if "acc" in v:
            line += f" | accuracy {v['acc']:.4f}"
        print(line + f" | {int(v['tokens'])} tokens")
    if "now" in r:
        n = len(r["now"])
        print(f"  continual matrix: loss / {metric} on task j (columns) after training task i (rows)")
        print("          " + "".join(f"{'task ' + str(j):>20}" for j in range(n)))
        for i, row in enumerate(r["matrix"]):
            if row is not None:
                print(f"  after {i} " + "".join(f"{_fmt(c, metric):>20}" for c in row))
        print("  now     " + "".join(f"{_fmt(c, metric):>20}" for c in r["now"]))
        s = r["summary"]
        if "forgetting_loss" in s:
            print("  forgetting (loss increase on earlier tasks): "
                  + ", ".join(f"task {j}: {f:+.4f}" for j, f in enumerate(s["forgetting_loss"])))
    if "ttl" in r:
        t = r["ttl"]
        print(f"  test-time learning: loss {t['ttl_loss']:.4f} with memories kept across sequences vs "
              f"{t['reset_loss']:.4f} reset (gain {t['ttl_gain']:+.4f}) over {t['segments']} segments")


# ---- parsers -------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    t = sub.add_parser(
        "train", help="compile a spec and train it (flags after SPEC go to train.py; try SPEC --help; "
                      "--nproc N: N ranks through torchrun)",
        add_help=False)
    t.add_argument("file", metavar="SPEC")
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint: loss, bits per byte, MQAR accuracy, continual matrix")
    e.add_argument("checkpoint", metavar="CKPT", help="a run folder of `nlc train`, or its ckpt.pt / ckpt.dcp")
    e.add_argument("--data", metavar="PATH", help="evaluate on this text instead of the run's data")
    e.add_argument("--seq-len", type=_positive, help="sequence length (default: the run's)")
    e.add_argument("--eval-batches", type=_positive, help="batches to evaluate (default: the run's)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.add_argument("--ttl", action="store_true", help="also evaluate with test-time learning (memories persist)")
    e.add_argument("--format", choices=("text", "json"), default="text")
    e.set_defaults(func=cmd_eval)
