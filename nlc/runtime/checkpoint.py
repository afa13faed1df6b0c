"""Atomic training checkpoints that resume bit-exactly.

A checkpoint is one ``torch.save`` file (a plain dict, loadable with
``torch.load(path, weights_only=True)``)::

    format            "nlc-checkpoint"
    version           1
    spec              {"name", "path", "hash"} of the spec model.py was compiled from
    step              number of completed training steps
    model             model.state_dict()
    memory            model.memory_state_dict() (persisted in-context state) or None
    optimizers        [optimizer.state_dict(), ...] in build_optimizers order
    optimizer_periods [int, ...]: optimizer i steps when (step + 1) % period_i == 0
    grads             {parameter name: .grad} gradients accumulated for optimizers whose
                      period has not completed yet (empty when every period is 1)
    rng               {"torch", "cuda", "python"} generator states
    train_config      the TrainConfig as a dict
    model_config      the ModelConfig as a dict
    extra             loop bookkeeping (tokens seen, elapsed time, data fingerprint, ...)
    torch_version     the torch that wrote it

Writes are atomic: the file is written to a temporary name in the same folder, flushed and
fsynced, then moved over the old one with ``os.replace`` (and the folder fsynced). A crash or
a full disk mid-write leaves the previous checkpoint intact and no partial file behind.

Sharded checkpoints (distributed runs)
--------------------------------------
A run under ``torchrun`` (``--parallel ddp|fsdp``) writes ``ckpt.dcp/``, a folder in the
``torch.distributed.checkpoint`` (DCP) format plus one small file, version 2::

    ckpt.dcp/.metadata, __<rank>_<n>.distcp    DCP: every tensor, each rank writing its shards
        model/<name>             model.state_dict() (FSDP: DTensor shards; DDP: written once)
        optim/<i>/<k>/<name>     tensor state of parameter k of optimizer i (sharded like it)
        grad/<name>              accumulated gradients (period not complete)
        memory/<key>             persisted in-context memory of the whole global batch
    ckpt.dcp/meta.pt            torch.save dict (weights_only): format, version 2, layout "dcp",
                                 spec, step, optimizer_periods, train_config, model_config, extra,
                                 world_size, parallel, rng (one state per rank), and per optimizer
                                 its param_groups, non-tensor state (step counts) and tensor names

Keys name parameters by ``model.state_dict()`` name and optimizer state by position in
``build_optimizers`` order, never by rank, so DCP reshards on load: a checkpoint written on
N ranks resumes on M ranks, or in one process without torchrun (:func:`load_checkpoint`
reads it whole, as the dict above, which is also what ``nlc eval`` uses). The folder is
written as ``.ckpt.dcp.tmp`` (DCP data first, ``meta.pt`` last, all fsynced) and then
renamed: the previous folder is moved to ``.ckpt.dcp.old``, the new one into place, and the
old one deleted. :func:`find_checkpoint` falls back to the complete temporary or old folder
if a crash hit between the two renames. A run folder holds one format at a time: after a
checkpoint of one format is written, the other is deleted.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = [
    "DCP_NAME",
    "FILE_NAME",
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "build_checkpoint",
    "capture_rng",
    "find_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "remove_other_format",
    "restore_rng",
    "restore_sharded",
    "restore_training_state",
    "save_checkpoint",
    "save_sharded",
]

FORMAT = "nlc-checkpoint"
#: Newest format version this module reads: 1 is the single file, 2 the DCP folder.
VERSION = 2
FILE_VERSION = 1
DCP_VERSION = 2
FILE_NAME = "ckpt.pt"
DCP_NAME = "ckpt.dcp"
META_NAME = "meta.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; ``hint`` says what to do about it."""

    code = "NL903"  # nlc's stable diagnostic code (docs/errors.md)

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


def capture_rng() -> dict:
    """Generator states of torch (CPU and every initialised CUDA device) and of ``random``."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if state.get("python") is not None:
        random.setstate(state["python"])


def build_checkpoint(*, model: torch.nn.Module, optimizers: list, periods: list[int], step: int, spec: dict,
                     train_config: dict, model_config: dict, extra: dict | None = None) -> dict:
    """The checkpoint dict of the current training state (tensors are referenced, not copied)."""
    memory = getattr(model, "memory_state_dict", None)
    return {
        "format": FORMAT,
        "version": FILE_VERSION,
        "spec": dict(spec),
        "step": int(step),
        "model": model.state_dict(),
        "memory": memory() if memory is not None else None,
        "optimizers": [opt.state_dict() for opt in optimizers],
        "optimizer_periods": [int(p) for p in periods],
        "grads": {name: p.grad for name, p in model.named_parameters() if p.grad is not None},
        "rng": capture_rng(),
        "train_config": dict(train_config),
        "model_config": dict(model_config),
        "extra": dict(extra or {}),
        "torch_version": str(torch.__version__),
    }


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    """Write ``checkpoint`` to ``path`` atomically (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, *, spec_hash: str | None = None) -> dict:
    """Read and validate a checkpoint (tensors on the CPU).

    Raises :class:`CheckpointError` for a missing, unreadable, corrupt or truncated file, a
    file that is not an nlc checkpoint or is of a newer format, and (when ``spec_hash`` is
    given) a checkpoint written for another spec.
    """
    path = Path(path)
    if path.is_dir():
        return _load_dcp_whole(path, spec_hash)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}", "train without --resume first, or pass the --out of the run to resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        unsafe = [line for line in lines if line.startswith("WeightsUnpickler error:")]
        if unsafe:
            raise CheckpointError(
                f"checkpoint {path} holds objects that cannot be loaded safely ({unsafe[0][:200]})",
                "it was not written by an nlc train.py; load it yourself with torch.load(weights_only=False) if you trust it",
            ) from None
        reason = lines[0] if lines else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({reason[:160]})",
            "delete it to start over, or resume from a copy",
        ) from None
    return _validate(ckpt, path, spec_hash)


def _validate(ckpt, path: Path, spec_hash: str | None) -> dict:
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an nlc checkpoint", "pass the --out folder of an nlc training run")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {ckpt.get('version')}; this nlc reads up to {VERSION}",
            "upgrade nlc",
        )
    spec = ckpt.get("spec") or {}
    if spec_hash is not None and spec.get("hash") != spec_hash:
        raise CheckpointError(
            f"checkpoint {path} was written for spec {spec.get('name')!r} (hash {str(spec.get('hash'))[:12]}), "
            f"not for this model.py (hash {spec_hash[:12]})",
            "resume with the model.py compiled from the same spec, or train into a fresh --out",
        )
    return ckpt


def restore_training_state(ckpt: dict, *, model: torch.nn.Module, optimizers: list, periods: list[int]) -> None:
    """Put a loaded checkpoint back into ``model`` and ``optimizers`` (and the RNGs).

    Raises :class:`CheckpointError` when the checkpoint does not fit the model.
    """
    hint = "the checkpoint was written for another model configuration; train into a fresh --out"
    if len(ckpt["optimizers"]) != len(optimizers) or list(ckpt["optimizer_periods"]) != list(periods):
        raise CheckpointError(
            f"checkpoint has {len(ckpt['optimizers'])} optimizer(s) with periods {ckpt['optimizer_periods']}, "
            f"the model builds {len(optimizers)} with periods {list(periods)}",
            hint,
        )
    try:
        model.load_state_dict(ckpt["model"])
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint does not fit this model: {' '.join(first[:2])[:300]}", hint) from None
    params = dict(model.named_parameters())
    unknown = sorted(set(ckpt["grads"]) - set(params))
    if unknown:
        raise CheckpointError(f"checkpoint holds gradients of unknown parameters: {', '.join(unknown[:3])}", hint)
    for name, p in params.items():
        g = ckpt["grads"].get(name)
        p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)
    if ckpt.get("memory") is not None:
        load_memory = getattr(model, "load_memory_state_dict", None)
        if load_memory is None:
            raise CheckpointError("checkpoint holds persisted memory but the model cannot load it", hint)
        load_memory(ckpt["memory"])
    restore_rng(ckpt["rng"])


# --------------------------------------------------------------------------------------------
# Where a run's checkpoint is


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _complete_dcp(folder: Path) -> bool:
    return (folder / META_NAME).is_file() and (folder / ".metadata").is_file()


def find_checkpoint(out: str | os.PathLike) -> Path | None:
    """The checkpoint of run folder ``out``: ``ckpt.pt`` or ``ckpt.dcp/`` (the newer one if a crash
    left both), else a complete ``.ckpt.dcp.tmp`` / ``.ckpt.dcp.old`` that a crash between the
    two renames of a sharded save left behind; None when there is none."""
    out = Path(out)
    found = []
    single = out / FILE_NAME
    if single.is_file():
        found.append((single.stat().st_mtime, 1, single))
    sharded = out / DCP_NAME
    if sharded.is_dir():
        stamp = sharded / META_NAME if (sharded / META_NAME).exists() else sharded
        found.append((stamp.stat().st_mtime, 0, sharded))
    else:
        for name in (f".{DCP_NAME}.tmp", f".{DCP_NAME}.old"):
            candidate = out / name
            if _complete_dcp(candidate):
                found.append(((candidate / META_NAME).stat().st_mtime, 0, candidate))
                break
    return max(found)[2] if found else None


def remove_other_format(path: str | os.PathLike) -> None:
    """After ``path`` (``ckpt.pt`` or ``ckpt.dcp``) was written, delete the other format's checkpoint
    in the same folder, so that a run folder has one checkpoint."""
    path = Path(path)
    if path.name == FILE_NAME:  # also what a crash mid-rename of a sharded save may have left
        for name in (DCP_NAME, f".{DCP_NAME}.tmp", f".{DCP_NAME}.old"):
            shutil.rmtree(path.with_name(name), ignore_errors=True)
    else:
        path.with_name(FILE_NAME).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Sharded (DCP) checkpoints


def _read_meta(path: Path, spec_hash: str | None) -> dict:
    meta_path = path / META_NAME
    if not meta_path.is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {META_NAME} or .metadata)",
                              "delete it to start over, or resume from a copy")
    try:
        meta = torch.load(meta_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - damaged file
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({(lines[0] if lines else type(e).__name__)[:160]})",
                              "delete it to start over, or resume from a copy") from None
    return _validate(meta, path, spec_hash)


def read_checkpoint_meta(path: str | os.PathLike, *, spec_hash: str | None = None) -> dict:
    """Everything but the tensors of a sharded checkpoint (cheap); a single-file checkpoint is
    read whole (:func:`load_checkpoint`)."""
    path = Path(path)
    if path.is_dir():
        return _read_meta(path, spec_hash)
    return load_checkpoint(path, spec_hash=spec_hash)


def _dcp_metadata(path: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return dict(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except Exception as e:  # noqa: BLE001 - damaged folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({first[:160]})",
                              "delete it to start over, or resume from a copy") from None


def _dcp_load(template: dict, path: Path, *, no_dist: bool) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process reads it all, on purpose
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(template, checkpoint_id=str(path), no_dist=no_dist)
    except Exception as e:  # noqa: BLE001 - missing or damaged shard files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({first[:200]})",
                              "delete it to start over, or resume from a copy") from None


def _assemble(meta: dict, tensors: dict) -> dict:
    """The single-file layout (see the module docstring) of a sharded checkpoint's parts."""
    ckpt = {k: v for k, v in meta.items() if k not in ("optimizers", "grads", "memory", "rng", "model")}
    ckpt["model"] = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    optimizers = []
    for i, om in enumerate(meta["optimizers"]):
        state: dict = {}
        for idx, names in om["tensors"].items():
            state[int(idx)] = {n: tensors[f"optim/{i}/{idx}/{n}"] for n in names}
        for idx, other in om["state"].items():
            state.setdefault(int(idx), {}).update(other)
        optimizers.append({"state": state, "param_groups": om["param_groups"]})
    ckpt["optimizers"] = optimizers
    ckpt["grads"] = {n: tensors[f"grad/{n}"] for n in meta["grads"]}
    ckpt["memory"] = None if meta.get("memory") is None else {k: tensors[f"memory/{k}"] for k in meta["memory"]}
    ckpt["rng"] = meta["rng"][0]
    ckpt["rng_all"] = meta["rng"]
    return ckpt


def _load_dcp_whole(path: Path, spec_hash: str | None) -> dict:
    """A sharded checkpoint read whole into CPU tensors, in the single-file layout (one process,
    no process group: ``nlc eval``, resuming on one process)."""
    meta = _read_meta(path, spec_hash)
    md = _dcp_metadata(path)
    template = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.items() if hasattr(m, "size")}
    _dcp_load(template, path, no_dist=True)
    try:
        return _assemble(meta, template)
    except KeyError as e:
        raise CheckpointError(f"checkpoint {path} is missing tensor {e}", "delete it to start over, or resume from a copy") from None


def save_sharded(path: str | os.PathLike, *, ctx, model: torch.nn.Module, optimizers: list, periods: list[int], step: int,
                 spec: dict, train_config: dict, model_config: dict, extra: dict | None = None, memory: dict | None = None) -> None:
    """Write a sharded checkpoint (collective: every rank calls it). ``model`` is the unwrapped
    model (FSDP: DTensor parameters), ``memory`` the global persisted memory
    (:func:`nlc.runtime.distributed.gather_memory`). Atomic; see the module docstring."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    rng_all = ctx.gather_objects(capture_rng())
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()

    tensors: dict = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt_meta = []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        other: dict = {}
        names: dict = {}
        for idx, st in sd["state"].items():
            for n, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim/{i}/{idx}/{n}"] = v
                    names.setdefault(int(idx), []).append(n)
                else:
                    other.setdefault(int(idx), {})[n] = v
        opt_meta.append({"param_groups": sd["param_groups"], "state": other, "tensors": names})
    grads = []
    for n, p in model.named_parameters():
        if p.grad is not None:
            tensors[f"grad/{n}"] = p.grad
            grads.append(n)
    if memory is not None:
        tensors.update({f"memory/{k}": v for k, v in memory.items()})
    dcp.save(tensors, checkpoint_id=str(tmp))

    if ctx.is_main:
        meta = {
            "format": FORMAT, "version": DCP_VERSION, "layout": "dcp", "spec": dict(spec), "step": int(step),
            "optimizer_periods": [int(p) for p in periods], "train_config": dict(train_config),
            "model_config": dict(model_config), "extra": dict(extra or {}), "torch_version": str(torch.__version__),
            "world_size": ctx.world, "parallel": ctx.parallel, "rng": rng_all, "optimizers": opt_meta, "grads": grads,
            "memory": None if memory is None else list(memory), "model": [k[len("model/"):] for k in tensors if k.startswith("model/")],
        }
        save_checkpoint(tmp / META_NAME, meta)  # last: a folder with meta.pt is complete
        _fsync_dir(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()


def _check_fit(ckpt: dict, optimizers: list, periods: list[int]) -> None:
    n = len(ckpt["optimizers"])
    if n != len(optimizers) or list(ckpt["optimizer_periods"]) != list(periods):
        raise CheckpointError(
            f"checkpoint has {n} optimizer(s) with periods {ckpt['optimizer_periods']}, "
            f"the model builds {len(optimizers)} with periods {list(periods)}",
            "the checkpoint was written for another model configuration; train into a fresh --out",
        )


def restore_sharded(source, *, ctx, model: torch.nn.Module, optimizers: list, periods: list[int]) -> bool:
    """Put a checkpoint into a (possibly sharded) model and its optimizers (collective).

    ``source`` is a sharded checkpoint folder, read shard by shard through DCP (resharded to
    this run's world), or a checkpoint dict read whole (:func:`load_checkpoint`), whose tensors
    are sliced to this rank's shards. Persisted memory is split by batch rows. Returns True
    when the RNG states were restored (same world size), False when the caller must seed
    fresh per-rank streams. Raises :class:`CheckpointError` when the checkpoint does not fit.
    """
    from .distributed import _is_dtensor, shard_like, split_memory

    hint = "the checkpoint was written for another model configuration; train into a fresh --out"
    params_of = [[p for g in opt.param_groups for p in g["params"]] for opt in optimizers]
    named = dict(model.named_parameters())

    def place(value, like):
        if _is_dtensor(value) or not isinstance(value, torch.Tensor):
            return value
        if _is_dtensor(like) and tuple(value.shape) == tuple(like.shape):
            return shard_like(value, like)
        return value

    if isinstance(source, dict):
        ckpt = source
        _check_fit(ckpt, optimizers, periods)
        live = model.state_dict()
        model_sd = {k: place(v, live[k]) if k in live else v for k, v in ckpt["model"].items()}
        opt_states = []
        for params, sd in zip(params_of, ckpt["optimizers"]):
            state = {}
            for idx, st in sd["state"].items():
                p = params[int(idx)] if int(idx) < len(params) else None
                state[idx] = {n: place(v, p) if p is not None else v for n, v in st.items()}
            opt_states.append({"state": state, "param_groups": sd["param_groups"]})
        grads = {n: place(g, named[n]) if n in named else g for n, g in ckpt["grads"].items()}
        memory, rngs = ckpt.get("memory"), ckpt.get("rng_all") or [ckpt["rng"]]
    else:
        path = Path(source)
        meta = _read_meta(path, None)
        _check_fit(meta, optimizers, periods)
        md = _dcp_metadata(path)
        live = model.state_dict()
        template = {}
        for k, v in live.items():
            m = md.get(f"model/{k}")
            if m is None or tuple(m.size) != tuple(v.shape):
                what = "lacks" if m is None else f"has shape {tuple(m.size)} for"
                raise CheckpointError(f"checkpoint does not fit this model: it {what} {k} {tuple(v.shape)}", hint)
            template[f"model/{k}"] = v
        extra_keys = sorted(k[len("model/"):] for k in md if k.startswith("model/") and k[len("model/"):] not in live)
        if extra_keys:
            raise CheckpointError(f"checkpoint does not fit this model: unexpected {', '.join(extra_keys[:3])}", hint)

        def alloc(m, like):
            size, dtype = tuple(m.size), m.properties.dtype
            if like is not None and size == tuple(like.shape):
                return torch.zeros_like(like, dtype=dtype)
            return torch.zeros(size, dtype=dtype)

        for key, m in md.items():
            if key.startswith("optim/"):
                _, i, idx, _n = key.split("/", 3)
                params = params_of[int(i)] if int(i) < len(params_of) else []
                template[key] = alloc(m, params[int(idx)] if int(idx) < len(params) else None)
            elif key.startswith("grad/"):
                name = key[len("grad/"):]
                if name not in named:
                    raise CheckpointError(f"checkpoint holds gradients of unknown parameters: {name}", hint)
                template[key] = alloc(m, named[name])
            elif key.startswith("memory/"):
                template[key] = torch.zeros(tuple(m.size), dtype=m.properties.dtype)
        _dcp_load(template, path, no_dist=not (torch.distributed.is_available() and torch.distributed.is_initialized()))
        whole = _assemble(meta, template)
        model_sd, grads, memory, rngs = whole["model"], whole["grads"], whole["memory"], whole["rng_all"]
        opt_states = whole["optimizers"]

    try:
        model.load_state_dict(model_sd)
        for opt, st in zip(optimizers, opt_states):
            opt.load_state_dict(st)
    except (RuntimeError, ValueError, KeyError, IndexError) as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint does not fit this model: {' '.join(first[:2])[:300]}", hint) from None
    unknown = sorted(set(grads) - set(named))
    if unknown:
        raise CheckpointError(f"checkpoint holds gradients of unknown parameters: {', '.join(unknown[:3])}", hint)
    for name, p in named.items():
        g = grads.get(name)
        if g is None:
            p.grad = None
        elif _is_dtensor(g):
            p.grad = g.to(dtype=p.dtype)
        else:
            p.grad = g.to(device=p.device, dtype=p.dtype)
    if memory is not None:
        load_memory = getattr(model, "load_memory_state_dict", None)
        if load_memory is None:
            raise CheckpointError("checkpoint holds persisted memory but the model cannot load it", hint)
        load_memory(split_memory(memory, ctx))
    if len(rngs) == ctx.world:
        restore_rng(rngs[ctx.rank])
        return True
    return False
