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
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import torch

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "build_checkpoint",
    "capture_rng",
    "load_checkpoint",
    "restore_rng",
    "restore_training_state",
    "save_checkpoint",
]

FORMAT = "nlc-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; ``hint`` says what to do about it."""

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
        "version": VERSION,
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
