"""Data-parallel (DDP) and sharded (FSDP2) training for the generated ``train.py``.

A distributed run is launched by ``torchrun`` (``python -m torch.distributed.run``), never by
a launcher of our own::

    torchrun --standalone --nproc-per-node 2 runs/hope/train.py --parallel ddp
    nlc train examples/hope.nl --nproc 2 --parallel fsdp      # compiles once, then torchrun

This module holds what ``train.py`` needs for it: reading the launch environment and failing
clearly (:func:`plan` / :func:`preflight`, :class:`DistributedError`), the process group and
device (:func:`init`, :class:`Context`), wrapping the model (:func:`wrap_model`), making the
optimizer levels of :mod:`nlc.runtime.optim` work on sharded parameters
(:func:`adapt_optimizers`), gradient synchronisation across optimizer periods
(:class:`GradSync`), the rows of the global batch each rank owns (:func:`shard_batch`),
sharded evaluation with all-reduced metrics, and the gathering/splitting of persisted
in-context memory for checkpoints. The user-facing description is ``docs/distributed.md``.

Semantics (why data parallelism is natural here)
-------------------------------------------------
Every in-context state is per sequence (batch element ``b`` never sees ``b'``), so a rank
that owns rows ``[r·B/W, (r+1)·B/W)`` of the global batch runs exactly the in-context
computation those rows get in a single process. What crosses ranks is only the outer level:
the gradients of the learnable parameters (all-reduced by DDP, reduce-scattered by FSDP)
and the loss and metrics (all-reduced). Nothing about a level's semantics depends on the
number of ranks: the same global batch gives the same gradients up to reduction order.

* The global batch of step ``s`` is a pure function of ``(seed, s)``; rank ``r`` takes a
  contiguous block of its rows (:func:`nlc.runtime.data.shard_rows`). Persisted memory
  (``reset never``) of row ``b`` therefore always lives on the same rank.
* The model's loss is a mean over target positions. When the ranks' slices hold different
  numbers of targets (positions other than ``-100``), each rank's loss is weighted by
  ``W·n_r/n`` before ``backward`` (:func:`shard_batch`), so that the averaged gradient is the
  gradient of the global mean. With equal counts (every built-in task) the weight is 1.
* Dropout and other random ops draw from per-rank streams: such models are equivalent in
  distribution, not number for number.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .data import DataError, mix_seed, shard_rows

__all__ = [
    "BACKEND_CHOICES",
    "PARALLEL_CHOICES",
    "Context",
    "DistributedError",
    "GradSync",
    "LaunchEnv",
    "Plan",
    "adapt_optimizers",
    "check_batch",
    "evaluate_task_sharded",
    "evaluate_ttl_sharded",
    "fsdp_units",
    "gather_memory",
    "init",
    "launch_env",
    "place_state",
    "plan",
    "preflight",
    "resolve_scope",
    "seed_rank_streams",
    "shard_batch",
    "shard_like",
    "split_memory",
    "use_graphs",
    "wrap_model",
]

PARALLEL_CHOICES = ("auto", "none", "ddp", "fsdp")
BACKEND_CHOICES = ("auto", "nccl", "gloo")
IGNORE_INDEX = -100

_LAUNCH_HINT = ("launch it with torchrun, e.g. `torchrun --standalone --nproc-per-node 2 train.py --parallel ddp`, "
                "or `nlc train SPEC --nproc 2`")


class DistributedError(ValueError):
    """A launch that cannot work (bad world size, missing backend, ...); ``hint`` says what to do.

    ``everywhere``: the error may be met by some ranks only, so each rank reports it (errors every
    rank meets alike are reported by rank 0 alone)."""

    def __init__(self, message: str, hint: str = "", *, everywhere: bool = False):
        super().__init__(message)
        self.hint = hint
        self.everywhere = everywhere


# --------------------------------------------------------------------------------------------
# Launch environment and plan


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun told this process (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``)."""

    world: int
    rank: int
    local_rank: int
    local_world: int


def launch_env(environ: dict | None = None) -> LaunchEnv | None:
    """The torchrun environment, or None when the process was not launched by torchrun.

    Raises :class:`DistributedError` for values that cannot be a valid launch.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None
    values = {}
    for key, default in (("WORLD_SIZE", None), ("RANK", None), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", None)):
        raw = env.get(key, default)
        if raw is None and key == "LOCAL_WORLD_SIZE":
            raw = env.get("WORLD_SIZE")
        try:
            values[key] = int(raw)
        except (TypeError, ValueError):
            raise DistributedError(f"bad world size: {key}={raw!r} in the environment is not an integer", _LAUNCH_HINT,
                                   everywhere=True) from None
    world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if world < 1:
        raise DistributedError(f"bad world size: WORLD_SIZE={world} (must be at least 1)", _LAUNCH_HINT, everywhere=True)
    if not 0 <= rank < world or not 0 <= local < max(values["LOCAL_WORLD_SIZE"], 1):
        raise DistributedError(f"bad world size: RANK={rank}, LOCAL_RANK={local} do not fit WORLD_SIZE={world}", _LAUNCH_HINT,
                               everywhere=True)
    return LaunchEnv(world, rank, local, max(values["LOCAL_WORLD_SIZE"], 1))


@dataclass(frozen=True)
class Plan:
    """The resolved launch: how to parallelise, on which device, over which backend."""

    parallel: str  # none | ddp | fsdp
    world: int
    rank: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when no process group is needed

    @property
    def distributed(self) -> bool:
        return self.parallel != "none"


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan(parallel: str, device: str, backend: str = "auto", *, env: LaunchEnv | None = None, world: int | None = None,
         cuda_count: int | None = None) -> Plan:
    """Resolve ``--parallel``, ``--device`` and ``--backend`` against the launch environment.

    ``world`` (with ``env=None``) checks a launch of that many processes before it happens (the
    parent of ``nlc train --nproc``). Raises :class:`DistributedError` (one line, exit 2).
    """
    if parallel not in PARALLEL_CHOICES:
        raise DistributedError(f"unknown --parallel {parallel!r}", "use auto, none, ddp or fsdp")
    if backend not in BACKEND_CHOICES:
        raise DistributedError(f"unknown --backend {backend!r}", "use auto, nccl or gloo")
    cuda_count = _cuda_count() if cuda_count is None else cuda_count
    launched = env is not None or world is not None
    size = env.world if env is not None else (world if world is not None else 1)
    rank = env.rank if env is not None else 0
    local = env.local_rank if env is not None else 0
    local_world = env.local_world if env is not None else size
    if size < 1:
        raise DistributedError(f"bad world size {size}: need at least 1 process", "use --nproc 1 or more")
    if parallel == "auto":
        parallel = "ddp" if launched and size > 1 else "none"
    if parallel == "none" and size > 1:
        raise DistributedError(f"{size} processes were launched but --parallel is none: they would train {size} copies "
                               "into one folder", "use --parallel ddp or fsdp (or auto)")
    if parallel != "none" and not launched:
        raise DistributedError(f"--parallel {parallel} needs a process group, and this process was not launched by torchrun "
                               "(WORLD_SIZE is not set)", _LAUNCH_HINT)

    # device
    if device == "auto":
        device = "cuda" if cuda_count > 0 else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DistributedError(f"unknown --device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise DistributedError(f"unsupported --device {device!r}", "use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if cuda_count == 0:
            raise DistributedError("--device cuda, but no CUDA device is available", "use --device cpu")
        if parallel != "none":
            if dev.index is not None and size > 1:
                raise DistributedError(f"--device {device} names one GPU, but each of the {size} ranks needs its own",
                                       "pass --device cuda: rank r uses cuda:LOCAL_RANK (choose GPUs with CUDA_VISIBLE_DEVICES)")
            if local_world > cuda_count:
                raise DistributedError(f"{local_world} processes per node but only {cuda_count} CUDA device(s) are visible",
                                       f"use --nproc {cuda_count} or fewer (one GPU per process), or --device cpu")
            dev = torch.device("cuda", local if dev.index is None else dev.index)
        elif dev.index is not None and dev.index >= cuda_count:
            raise DistributedError(f"--device {device}, but only {cuda_count} CUDA device(s) are visible", "use cuda:0 .. "
                                   f"cuda:{cuda_count - 1}")

    # backend
    chosen = None
    if parallel != "none":
        if not torch.distributed.is_available():
            raise DistributedError("this torch build has no torch.distributed", "install a torch with distributed support")
        chosen = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        if chosen == "nccl" and dev.type != "cuda":
            raise DistributedError("the nccl backend needs CUDA devices, and this run is on the CPU",
                                   "use --backend gloo (or auto) on the CPU, or --device cuda")
        if chosen == "nccl" and not torch.distributed.is_nccl_available():
            raise DistributedError("the nccl backend is not available in this torch build", "use --backend gloo")
        if chosen == "gloo" and not torch.distributed.is_gloo_available():
            raise DistributedError("the gloo backend is not available in this torch build", "use --backend nccl with --device cuda")
    return Plan(parallel=parallel, world=size, rank=rank, local_rank=local, device=dev, backend=chosen)


def preflight(parallel: str, device: str, backend: str, nproc: int, batch_size: int, *, cuda_count: int | None = None) -> Plan:
    """Check a launch of ``nproc`` processes before starting it (the parent of ``nlc train --nproc``)."""
    if nproc < 1:
        raise DistributedError(f"bad world size: --nproc {nproc}", "use --nproc 1 or more")
    p = plan(parallel, device, backend, world=nproc, cuda_count=cuda_count)
    check_batch(batch_size, nproc)
    return p


def check_batch(batch_size: int, world: int) -> None:
    """``--batch-size`` is the global batch: it must split evenly over the ranks."""
    try:
        shard_rows(batch_size, 0, world)
    except DataError as e:
        raise DistributedError(str(e), e.hint) from None


# --------------------------------------------------------------------------------------------
# Process group and collectives


@dataclass
class Context:
    """One process's view of the run: rank, world, device, and small collectives.

    With ``parallel == "none"`` it is a world of one, and every collective is the identity,
    so ``train.py`` calls them unconditionally.
    """

    plan: Plan
    mesh: object | None = None
    owns_group: bool = False

    @property
    def parallel(self) -> str:
        return self.plan.parallel

    @property
    def rank(self) -> int:
        return self.plan.rank

    @property
    def world(self) -> int:
        return self.plan.world

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def distributed(self) -> bool:
        return self.plan.distributed

    @property
    def is_main(self) -> bool:
        return self.plan.rank == 0

    def rows(self, batch_size: int) -> slice:
        return shard_rows(batch_size, self.rank, self.world)

    # -- collectives (identity without a process group) --------------------------------------
    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on a device the backend can reduce (NCCL: the rank's GPU)."""
        return t.to(self.device) if self.plan.backend == "nccl" else t.cpu()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``t`` reduced over the ranks (``sum``, ``max``, ``min``); a new tensor on ``t``'s device."""
        if not self.distributed:
            return t.clone()
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
               "min": torch.distributed.ReduceOp.MIN}
        buf = self._comm(t.detach().clone())
        torch.distributed.all_reduce(buf, op=ops[op])
        return buf.to(t.device)

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation along dim 0 of every rank's ``t`` (same shape on all ranks), in rank order."""
        if not self.distributed:
            return t.clone()
        buf = self._comm(t.detach().contiguous())
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        torch.distributed.all_gather(parts, buf)
        return torch.cat(parts).to(t.device)

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            if self.plan.backend == "nccl":
                torch.distributed.barrier(device_ids=[self.device.index])
            else:
                torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank."""
        if not self.distributed:
            return bool(flag)
        return bool(self.all_reduce(torch.tensor([1.0 if flag else 0.0]), "max").item())

    def params_finite(self, model: torch.nn.Module) -> bool:
        """Are all parameters finite on every rank (local shards under FSDP, then agreed)?"""
        flags = [torch.isfinite(_local(p)).all() for p in model.parameters()]
        ok = bool(torch.stack(flags).all()) if flags else True
        return not self.any(not ok)

    def close(self, wait: bool = True) -> None:
        """Destroy the process group this context created. ``wait``: first wait until every rank got
        here (a rank that tears its connections down while a peer still reads from them makes the
        peer abort); pass False on an error path, where the other ranks may never arrive."""
        if self.owns_group and torch.distributed.is_initialized():
            try:
                if wait:
                    self.barrier()
            finally:
                torch.distributed.destroy_process_group()
        self.owns_group = False


def init(p: Plan) -> Context:
    """Create the process group (and the FSDP device mesh) for a distributed plan."""
    if not p.distributed:
        return Context(p)
    dist = torch.distributed
    if p.device.type == "cuda":
        torch.cuda.set_device(p.device)
    owns = False
    if not dist.is_initialized():
        kwargs = {"device_id": p.device} if p.device.type == "cuda" else {}
        try:
            dist.init_process_group(backend=p.backend, **kwargs)
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(f"cannot create the {p.backend} process group: {first[:200]}", _LAUNCH_HINT,
                                   everywhere=True) from None
        owns = True
    elif dist.get_world_size() != p.world:
        raise DistributedError(f"a process group of {dist.get_world_size()} ranks exists, WORLD_SIZE says {p.world}")
    mesh = None
    if p.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(p.device.type, (p.world,))
    return Context(p, mesh=mesh, owns_group=owns)


def seed_rank_streams(ctx: Context, seed: int, step: int) -> None:
    """Give every rank its own random stream (dropout ...) once the model is initialised.

    A world of one keeps the single-process stream untouched (so ``--parallel none`` and a
    one-process launch train identically)."""
    if ctx.world > 1:
        s = mix_seed(seed, 0x52414E4B, ctx.rank, step)
        torch.manual_seed(s)
        random.seed(s)


# --------------------------------------------------------------------------------------------
# Batches


def shard_batch(x: torch.Tensor, y: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This rank's rows of a global batch, and the weight of its mean loss.

    The model's loss is the mean over this rank's target positions (``y != -100``). DDP and
    FSDP average gradients over ranks, which is the global mean only when every rank holds
    as many targets; the weight ``W·n_r/n`` makes the average exact otherwise (1.0 when the
    counts agree, e.g. every built-in task)."""
    if ctx.world == 1:
        return x, y, 1.0
    rows = ctx.rows(x.shape[0])
    counts = (y != IGNORE_INDEX).reshape(ctx.world, -1).sum(1)
    total = int(counts.sum())
    n_r = int(counts[ctx.rank])
    weight = 1.0 if bool((counts == counts[0]).all()) or total == 0 else ctx.world * n_r / total
    return x[rows], y[rows], weight


# --------------------------------------------------------------------------------------------
# Wrapping the model


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules ``fully_shard`` wraps before the root: ``model.fsdp_units()`` when the model
    defines it, else every element of the model's ``nn.ModuleList`` attributes (a generated
    model's repeated blocks)."""
    units = getattr(model, "fsdp_units", None)
    if callable(units):
        return list(units())
    out = []
    for child in model.children():
        if isinstance(child, torch.nn.ModuleList):
            out.extend(child)
    return out


def resolve_scope(model: torch.nn.Module, scope: str) -> str:
    """``full`` or ``regional`` for ``--compile-scope``: ``auto`` is regional when the model has
    in-context levels (the chunk loop stays eager around a compiled chunk step:
    :mod:`nlc.runtime.regional`), else full."""
    if scope not in ("auto", "full", "regional"):
        raise DistributedError(f"unknown compile scope {scope!r}", "use auto, full or regional")
    if scope != "auto":
        return scope
    from .regional import has_in_context

    return "regional" if has_in_context(model) else "full"


def use_graphs(flag: bool | None, model: torch.nn.Module, device: torch.device, scope: str, parallel: str) -> bool:
    """Whether to replay in-context levels from CUDA graphs (``--cuda-graphs``).

    ``None`` (the default): on for a single CUDA process with regional compile when the model
    has in-context levels. Under DDP graphs are used only when asked for (``True``; not tested
    on GPUs yet); never under FSDP, whose sharded parameters and unit hooks a captured graph
    cannot follow. An explicit ``True`` where graphs cannot work is an error."""
    from .regional import has_in_context

    possible = device.type == "cuda" and parallel != "fsdp" and has_in_context(model)
    if flag is None:
        return possible and scope == "regional" and parallel == "none"
    if flag and not possible:
        why = ("it needs a CUDA device" if device.type != "cuda" else "not under --parallel fsdp"
               if parallel == "fsdp" else "the model has no in-context level")
        raise DistributedError(f"--cuda-graphs: {why}", "drop --cuda-graphs")
    if flag and scope == "full":
        raise DistributedError("--cuda-graphs does not combine with a whole-model compile",
                               "use --compile-scope regional (or --no-compile) with --cuda-graphs")
    return bool(flag)


def wrap_model(model: torch.nn.Module, ctx: Context, *, compile: bool | str) -> tuple[Callable, Callable]:
    """``(train_forward, eval_forward)`` for the plan; the model is moved to the device.

    ``compile``: ``"full"`` (or ``True``): ``torch.compile(model, fullgraph=True)``;
    ``"regional"``: :func:`nlc.runtime.regional.compile_regions`; ``"off"`` (or ``False``): eager.

    * none: the (compiled) model.
    * ddp: ``DistributedDataParallel`` around the (compiled) model, ``broadcast_buffers=False``
      (the generated models' buffers are per-rank diagnostics) and ``static_graph=True``: the
      set of parameters that get a gradient is fixed for a run (it depends on the spec and the
      sequence length only, e.g. a level whose single chunk's update is never read), so DDP
      learns it in the first step instead of searching the graph every step; a parameter no
      rank uses keeps ``grad = None``, as in one process. Evaluation runs the inner module.
    * fsdp: FSDP2 ``fully_shard`` on every unit of :func:`fsdp_units` (each unit's ``forward``
      compiled first when ``full``; the regions compiled first when ``regional``), then on the
      root. Parameters become ``DTensor`` shards on ``ctx.device``.
    """
    scope = {True: "full", False: "off"}.get(compile, compile)
    if scope not in ("full", "regional", "off"):
        raise DistributedError(f"unknown compile scope {compile!r}", "use full, regional or off")
    if scope == "regional":
        from .regional import compile_regions

        compile_regions(model)
    if ctx.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        scalars = [n for n, p in model.named_parameters() if p.ndim == 0]
        if scalars:
            raise DistributedError(f"--parallel fsdp cannot shard 0-dim parameters ({', '.join(scalars[:3])})",
                                   "use --parallel ddp for this model")
        for unit in fsdp_units(model):
            if scope == "full":
                unit.forward = torch.compile(unit.forward, fullgraph=True)
            fully_shard(unit, mesh=ctx.mesh)
        fully_shard(model, mesh=ctx.mesh, reshard_after_forward=False)  # moves every parameter and buffer to the device
        return model, model
    model.to(ctx.device)
    inner = torch.compile(model, fullgraph=True) if scope == "full" else model
    if ctx.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        with warnings.catch_warnings():  # newer torch renames broadcast_buffers but asks to keep it for rank-local buffers
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            ddp = DistributedDataParallel(inner, device_ids=ids, output_device=ctx.device.index if ids else None,
                                          broadcast_buffers=False, static_graph=True)
        return ddp, inner
    return inner, inner


class GradSync:
    """When DDP all-reduces gradients, across optimizer periods.

    Optimizer ``i`` steps after step ``s`` when ``(s + 1) % period_i == 0``; in between its
    gradients accumulate as a sum. DDP's reducer all-reduces a parameter's ``.grad`` as it
    stands after accumulation, so a synced backward turns ``g_old + g_new(r)`` (``g_old``
    already equal on every rank) into ``g_old + mean_r g_new(r)``: exact. A step after which
    no optimizer steps runs under ``no_sync`` (no communication): the rank-local sums are
    averaged by the next synced backward, ``mean_r(common + local_r) = common + mean_r local_r``.
    So communication happens only on steps after which something steps (every step whenever
    some level has period 1), and on the first step of a run (DDP records its static graph
    there). Before a checkpoint, unsynced gradients are averaged (:meth:`settle`), so a
    checkpoint never holds rank-local gradients.

    FSDP reduce-scatters every step: skipping it would keep full-size unsharded gradients
    alive, which defeats sharding; the sharded gradients accumulate in place.
    """

    def __init__(self, ctx: Context, train_forward, periods: Iterable[int]):
        self.ctx, self.forward, self.periods = ctx, train_forward, [int(p) for p in periods]
        self.unsynced = False
        self.first = True

    def context(self, at_step: int):
        """Context for the forward + backward of step ``at_step``."""
        if self.ctx.parallel != "ddp":
            return contextlib.nullcontext()
        if self.first or any((at_step + 1) % p == 0 for p in self.periods):
            # DDP's static graph is recorded on the first backward, which must sync
            self.first = self.unsynced = False
            return contextlib.nullcontext()
        self.unsynced = True
        return self.forward.no_sync()

    def settle(self, model: torch.nn.Module) -> None:
        """Average rank-local accumulated gradients (DDP after ``no_sync`` steps)."""
        if not self.unsynced:
            return
        for p in model.parameters():
            if p.grad is not None:
                p.grad.copy_(self.ctx.all_reduce(p.grad, "sum").div_(self.ctx.world))
        self.unsynced = False


# --------------------------------------------------------------------------------------------
# Sharded tensors


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.detach().full_tensor() if _is_dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every rank) as a DTensor sharded like ``like``; ``full`` itself when
    ``like`` is a plain tensor. No communication: each rank keeps its own slice (copied, so
    the full tensor can be freed)."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    full = full.detach().to(device=like.to_local().device)
    rep = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    local = rep.redistribute(mesh, like.placements).to_local().clone()
    return DTensor.from_local(local, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())


def place_state(value, param):
    """An optimizer-state value for ``param`` from its full (unsharded) form: tensors of the
    parameter's shape are sharded like it, anything else stays as it is (replicated)."""
    if isinstance(value, torch.Tensor) and _is_dtensor(param) and tuple(value.shape) == tuple(param.shape):
        return shard_like(value, param)
    return value


# --------------------------------------------------------------------------------------------
# Optimizer levels on sharded parameters


def adapt_optimizers(optimizers: list, ctx: Context) -> None:
    """Make the optimizer levels of :mod:`nlc.runtime.optim` correct on FSDP's DTensor shards.

    ``torch.optim`` optimizers (AdamW, SGD, ...) support DTensors themselves. nlc's levels:

    * element-wise work (momentum buffers, Adam's moments, M3's ``M1``, ``M2``, ``V``) runs
      on the local shards through DTensor, so the state stays sharded with the parameter;
    * the Newton–Schulz output map (``output="newton_schulz"``, Muon) and M3's ``NS(M1)`` /
      ``NS(M2)`` need the whole matrix: the matrix is all-gathered, orthogonalised on every
      rank, and each rank keeps its slice (cost per matrix and step: one all-gather of the
      matrix, ``W``-fold redundant Newton–Schulz flops, one full-size temporary);
    * :class:`~nlc.runtime.optim.DeltaMomentum` (its erase term ``b ĜᵀĜ`` and norm) and
      :class:`~nlc.runtime.optim.DeepMomentum` (norms, and an MLP trained on sums over the
      whole tensor), and any other level nlc does not know, update on gathered full tensors
      (parameter, gradient and state all-gathered, the update computed on every rank, each
      rank keeping its slice; the state is stored sharded again).

    Every variant computes on exactly the numbers a single process would, so the result
    matches an unsharded run. DDP needs nothing (replicated parameters and gradients).
    """
    if ctx.parallel != "fsdp":
        return
    from . import optim as nl_optim

    for opt in optimizers:
        if not isinstance(opt, nl_optim._GradientLevel):
            continue  # torch.optim handles DTensor parameters itself
        if isinstance(opt, (nl_optim.MomentumMemory, nl_optim.AdamMemory)):
            _gather_output(opt)
        elif isinstance(opt, nl_optim.M3):
            _gather_output(opt)
            _gather_orth(opt)
        else:
            _gather_update(opt)


def _gather_output(opt) -> None:
    cls_output = type(opt)._output

    def _output(d, group):
        if group.get("output", "identity") == "identity" or not _is_dtensor(d):
            return cls_output(d, group)
        return shard_like(cls_output(_full(d), group), d)

    opt._output = _output


def _gather_orth(opt) -> None:
    cls_orth = type(opt)._orth

    def _orth(M, group):
        if not _is_dtensor(M):
            return cls_orth(opt, M, group)
        return shard_like(cls_orth(opt, _full(M), group), M)

    opt._orth = _orth


def _gather_update(opt) -> None:
    cls_update = type(opt)._update

    def _update(p, g, state, group):
        if not _is_dtensor(p):
            return cls_update(opt, p, g, state, group)
        full_p = _full(p).clone()
        full_state = {k: (_full(v).clone() if _is_dtensor(v) else v) for k, v in state.items()}
        cls_update(opt, full_p, _full(g), full_state, group)
        p.to_local().copy_(shard_like(full_p, p).to_local())
        state.clear()
        state.update({k: place_state(v, p) for k, v in full_state.items()})

    opt._update = _update


# --------------------------------------------------------------------------------------------
# Persisted in-context memory (per sequence: dim 0 is the batch row)


def gather_memory(memory: dict | None, ctx: Context) -> dict | None:
    """The global persisted memory: every tensor with ``ndim >= 1`` is per batch row (dim 0),
    so the ranks' blocks are concatenated in rank order; 0-dim entries are bookkeeping."""
    if memory is None or ctx.world == 1:
        return memory
    return {k: (ctx.all_gather_rows(v) if v.ndim >= 1 else v) for k, v in memory.items()}


def split_memory(memory: dict | None, ctx: Context) -> dict | None:
    """This rank's rows of a global persisted memory (the inverse of :func:`gather_memory`).
    A tensor whose rows do not split evenly (another --batch-size) is kept whole: the model
    then starts that memory afresh, as it does on one process."""
    if memory is None or ctx.world == 1:
        return memory
    out = {}
    for k, v in memory.items():
        if v.ndim >= 1 and v.shape[0] % ctx.world == 0:
            out[k] = v[ctx.rows(v.shape[0])].clone()
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# Sharded evaluation (metrics all-reduced)


def _shard_pairs(batches, ctx: Context):
    for x, y in batches:
        rows = ctx.rows(x.shape[0])
        yield x[rows], y[rows]


def evaluate_task_sharded(model, task, ctx: Context, *, task_id: int = 0, forward=None, autocast=contextlib.nullcontext) -> dict:
    """:func:`nlc.runtime.evaluate.evaluate_task` with each rank reading its rows of every
    evaluation batch; the sums (loss, correct, count) are all-reduced, so every rank gets the
    single-process metrics (up to summation order)."""
    from .evaluate import _batch_stats, _summary, evaluate_task, preserved_state

    if ctx.world == 1:
        return evaluate_task(model, task, ctx.device, task_id=task_id, forward=forward, autocast=autocast)
    forward = model if forward is None else forward
    total = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    with preserved_state(model, ctx.device):
        for x, y in _shard_pairs(task.eval_batches(task_id), ctx):
            total += _batch_stats(forward, x, y, ctx.device, autocast).double()
    return _summary(ctx.all_reduce(total, "sum"), task.metric)


def evaluate_ttl_sharded(model, task, ctx: Context, *, task_id: int = 0, forward=None, autocast=contextlib.nullcontext) -> dict:
    """:func:`nlc.runtime.evaluate.evaluate_ttl` with the streams (rows) split over the ranks:
    row ``b`` of every segment stays on one rank, so its memory persists exactly as in one
    process; per-segment sums are all-reduced."""
    from .evaluate import _batch_stats, _summary, evaluate_ttl, preserved_state

    if ctx.world == 1:
        return evaluate_ttl(model, task, ctx.device, task_id=task_id, forward=forward, autocast=autocast)
    forward = model if forward is None else forward
    batches = list(_shard_pairs(task.stream_batches(task_id), ctx))
    can_persist = hasattr(model, "persist_memory")
    results = {}
    with preserved_state(model, ctx.device):
        for mode in ("reset", "ttl"):
            if can_persist:
                model.persist_memory = mode == "ttl"
            if hasattr(model, "reset_memory"):
                model.reset_memory()
            per_segment = torch.stack([_batch_stats(forward, x, y, ctx.device, autocast).double() for x, y in batches])
            per_segment = ctx.all_reduce(per_segment, "sum")
            summary = _summary(per_segment.sum(0), task.metric)
            results[f"{mode}_loss"] = summary["loss"]
            if task.metric in summary:
                results[f"{mode}_{task.metric}"] = summary[task.metric]
            results[f"{mode}_by_segment"] = [s / n if n else math.nan for s, _, n in per_segment.tolist()]
        if hasattr(model, "reset_memory"):
            model.reset_memory()
    results["ttl_gain"] = results["reset_loss"] - results["ttl_loss"]
    results["segments"] = len(batches)
    results["persisted"] = can_persist
    return results
