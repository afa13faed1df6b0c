"""Evaluation: validation loss, bits per byte, MQAR accuracy, continual matrices, test-time learning.

All functions take the model (``model``: the ``nn.Module`` whose attributes are read and set)
and optionally ``forward``, the callable to run it with (the ``torch.compile``-d module during
training; the model itself by default). Evaluation leaves training untouched: it runs under
``torch.no_grad`` in eval mode, inside ``torch.random.fork_rng`` (the training RNG stream is
not consumed), and it snapshots and restores the model's persisted in-context memory and its
``persist_memory`` flag. Losses are computed here from the logits (sum of cross-entropy over
target positions / their count, ignoring :data:`~nlc.runtime.tasks.IGNORE_INDEX`), so the
model's own loss reduction does not matter; the device is synchronised once per call.

Metrics (``loss`` in nats per target token):

* ``bpb``: bits per byte, ``loss / ln 2`` (byte-level text: one token per byte);
* ``acc``: argmax accuracy over target positions (MQAR: the query positions).

Test-time learning (:func:`evaluate_ttl`): the model's in-context memories keep their state
from one call to the next (``persist_memory = True``: the spec's ``reset never``) while it
reads the task's stream batches in order (for text, row ``b`` of each batch continues row
``b`` of the previous one). It reports the loss with persistence and the loss on the very
same batches under the spec's own reset policy, per segment and overall; ``ttl_gain`` is
their difference (positive: the memory helped).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from .tasks import IGNORE_INDEX, Task

__all__ = ["continual_summary", "evaluate_batches", "evaluate_task", "evaluate_ttl", "preserved_state"]


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module, device: torch.device):
    """Eval mode + no_grad + forked RNG; on exit restore train mode, ``persist_memory`` and persisted memory."""
    was_training = model.training
    had_flag = hasattr(model, "persist_memory")
    persist = getattr(model, "persist_memory", False)
    get_memory = getattr(model, "memory_state_dict", None)
    memory = {k: v.detach().clone() for k, v in get_memory().items()} if get_memory is not None else None
    devices = [device] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        model.train(was_training)
        if had_flag and model.persist_memory != persist:
            model.persist_memory = persist
        if memory is not None:
            model.load_memory_state_dict(memory)


def _batch_stats(forward: Callable, x: torch.Tensor, y: torch.Tensor, device: torch.device, autocast):
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    with autocast():
        logits, _ = forward(x)
    logits = logits.float().reshape(-1, logits.size(-1))
    y = y.reshape(-1)
    loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
    mask = y != IGNORE_INDEX
    correct = (logits.argmax(-1) == y)[mask].sum()
    return torch.stack([loss, correct.to(loss.dtype), mask.sum().to(loss.dtype)])


def _summary(stats: torch.Tensor, metric: str | None) -> dict:
    loss_sum, correct, count = stats.tolist()
    out = {"loss": loss_sum / count if count else math.nan, "tokens": int(count)}
    if metric == "bpb":
        out["bpb"] = out["loss"] / math.log(2)
    elif metric == "acc":
        out["acc"] = correct / count if count else math.nan
    return out


def evaluate_batches(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                     *, forward: Callable | None = None, autocast=contextlib.nullcontext, metric: str | None = None) -> dict:
    """``{"loss", "tokens", "bpb" | "acc"}`` over ``batches`` of ``(x, y)``."""
    forward = model if forward is None else forward
    total = torch.zeros(3, dtype=torch.float64, device=device)
    with preserved_state(model, device):
        for x, y in batches:
            total += _batch_stats(forward, x, y, device, autocast).double()
    return _summary(total, metric)


def evaluate_task(model: torch.nn.Module, task: Task, device: torch.device, *, task_id: int = 0,
                  forward: Callable | None = None, autocast=contextlib.nullcontext) -> dict:
    """Metrics of ``task``'s fixed evaluation set (sub-task ``task_id`` of a continual task)."""
    return evaluate_batches(model, task.eval_batches(task_id), device, forward=forward, autocast=autocast, metric=task.metric)


def evaluate_ttl(model: torch.nn.Module, task: Task, device: torch.device, *, task_id: int = 0,
                 forward: Callable | None = None, autocast=contextlib.nullcontext) -> dict:
    """Test-time learning: the stream batches read with memory persisting across calls, vs. reset.

    Returns ``ttl_loss``, ``reset_loss``, ``ttl_gain`` (= reset - ttl), per-segment losses
    ``ttl_by_segment`` and ``reset_by_segment``, and ``ttl_<metric>`` / ``reset_<metric>``.
    """
    forward = model if forward is None else forward
    batches = task.stream_batches(task_id)
    can_persist = hasattr(model, "persist_memory")
    results = {}
    with preserved_state(model, device):
        for mode in ("reset", "ttl"):
            if can_persist:
                model.persist_memory = mode == "ttl"
            if hasattr(model, "reset_memory"):
                model.reset_memory()
            per_segment = torch.stack([_batch_stats(forward, x, y, device, autocast).double() for x, y in batches])
            summary = _summary(per_segment.sum(0), task.metric)
            rows = per_segment.tolist()
            results[f"{mode}_loss"] = summary["loss"]
            if task.metric in summary:
                results[f"{mode}_{task.metric}"] = summary[task.metric]
            results[f"{mode}_by_segment"] = [s / n if n else math.nan for s, _, n in rows]
        if hasattr(model, "reset_memory"):
            model.reset_memory()
    results["ttl_gain"] = results["reset_loss"] - results["ttl_loss"]
    results["segments"] = len(batches)
    results["persisted"] = can_persist
    return results


def continual_summary(matrix: list[list[dict | None]], metric: str) -> dict:
    """Forgetting figures of a continual evaluation matrix ``matrix[i][j]`` (after task i, on task j).

    ``final_loss`` / ``final_<metric>``: mean over tasks of the last row;
    ``forgetting_loss[j]``: loss on task j after the last task minus right after learning j
    (positive = forgotten), for j before the last; ``backward_transfer``: the mean over those j
    of ``M[last][j] - M[j][j]`` in the task metric (accuracy, or -bpb so that higher is better).
    """
    rows = [r for r in matrix if r is not None and all(c is not None for c in r)]
    if not rows:
        return {}
    last_i = max(i for i, r in enumerate(matrix) if r is not None and all(c is not None for c in r))
    last = matrix[last_i]
    k = len(last)
    out = {"after_task": last_i, "final_loss": sum(c["loss"] for c in last) / k}
    if all(metric in c for c in last):
        out[f"final_{metric}"] = sum(c[metric] for c in last) / k
    earlier = [j for j in range(min(last_i, k)) if matrix[j] is not None]
    if earlier:
        out["forgetting_loss"] = {str(j): last[j]["loss"] - matrix[j][j]["loss"] for j in earlier}
        sign = -1.0 if metric == "bpb" else 1.0
        if all(metric in last[j] and metric in matrix[j][j] for j in earlier):
            out["backward_transfer"] = sum(sign * (last[j][metric] - matrix[j][j][metric]) for j in earlier) / len(earlier)
    return out
