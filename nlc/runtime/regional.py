"""Regional compilation: compile the regions of a model that repeat, not the model whole.

A whole-model ``torch.compile`` of a model with in-context levels has two poor choices for the
loop over chunks: unrolled (compile time grows with ``T / C``: minutes at T=2048, C=16) or
torch's ``scan`` operator (one traced step, but the compiled loop runs slowly). Regional
compilation takes a third way:

* every in-context level's ``chunk`` step (the body of the loop: read at the chunk-start state,
  then the closed-form update) is compiled on its own, with ``fullgraph=True`` and static
  shapes. The Python loop of :func:`nlc.runtime.chunks.run_chunks` stays eager and calls the
  compiled step once per chunk, so the step's dozens of small operations become a few fused
  kernels, and the compile covers one chunk, whatever ``T / C`` is;
* every module with no in-context level below it (a block of attention and MLP, a norm) is
  compiled whole (``module.compile(fullgraph=True)``), as in torch's regional compilation
  recipe: a repeated block class is traced once and its code reused by every layer;
* modules that contain an in-context level run eagerly around their compiled parts (the
  residual adds, the level's projections and its chunk loop);
* except a level whose whole sequence goes through its ``sequence`` step (one fused op for all
  chunks, ``nlc.runtime.chunks.sequence_step``): there is no loop left, so its ``forward`` is
  compiled whole (projections, norms, gates, the layout copies around the op and their
  backward fuse into a few kernels). Which calls qualify is found by running the first call of
  each input signature (shape, dtype, device, ``requires_grad``, grad mode, training, autocast)
  eagerly and recording (:class:`nlc.runtime.chunks.record_paths`) whether every chunk loop
  inside it took the whole-sequence step; a signature that did not, a call that asks for chunk
  states, passes start states or keeps its memory across calls, runs the forward eagerly with
  its compiled chunk step, as before. A compile that fails leaves the level eager (warned once).
  :func:`forward_of` gives the forward to call (``nlc.runtime.graphs`` captures it).
  ``NLC_WHOLE_FORWARD=0`` installs no such region (for comparisons).

A model with no in-context level at all is compiled whole: that is already one region.

Compiled code is keyed by the code object, so all layers of one level class share one compiled
step; shapes that differ (the last partial chunk, an evaluation batch) compile once more each,
which is why :func:`compile_regions` raises dynamo's recompile limit to ``RECOMPILE_LIMIT``.
Modules defined by torch itself (``nn.LayerNorm``, ``nn.Linear``) are left uncompiled: alone they
are one kernel, and dynamo does not trace their forward as a frame of its own.
Values and gradients equal the eager model's (tested).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn

from .chunks import record_paths

__all__ = ["compile_regions", "forward_of", "has_in_context", "in_context_levels", "region_failures"]

# each chunk step compiles once per distinct call (first chunk / later chunks / partial chunk,
# training / evaluation, batch size, ...): more than dynamo's default of 8 recompiles per code
# object, after which a fullgraph compile raises instead of running
RECOMPILE_LIMIT = 64


def _torch_module(m: nn.Module) -> bool:
    # modules defined by torch itself (nn.LayerNorm, nn.Linear, ...): dynamo does not trace their
    # own forward as a frame, so compiling one alone with fullgraph=True finds nothing to compile
    return type(m).__module__.split(".")[0] == "torch"


def _is_in_context(m: nn.Module) -> bool:
    return getattr(m, "kind", None) == "in_context" and callable(getattr(type(m), "chunk", None))


def in_context_levels(model: nn.Module) -> list[nn.Module]:
    """The modules of in-context levels (one per layer and level)."""
    return [m for m in model.modules() if _is_in_context(m)]


def has_in_context(model: nn.Module) -> bool:
    return bool(in_context_levels(model))


class _SequenceRegion:
    """The ``forward`` of one in-context level, compiled whole for the input signatures whose
    chunks all go through the level's ``sequence`` step (module docstring)."""

    def __init__(self, level: nn.Module, opts: dict):
        self.level = level
        self.eager = type(level).forward.__get__(level)
        self.compiled = torch.compile(self.eager, **opts)
        self.whole: dict[tuple, bool] = {}  # signature -> compiled whole?
        self.failed: str | None = None
        from torch._dynamo.exc import TorchDynamoException

        self._errors = TorchDynamoException  # compiling failed, not the level

    def _key(self, x) -> tuple:
        dev = x.device.type
        return (tuple(x.shape), x.dtype, x.device, x.requires_grad, torch.is_grad_enabled(),
                self.level.training, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))

    def __call__(self, x, *args, **kwargs):
        if (args or any(v not in (None, False) for v in kwargs.values())  # chunk states asked or given
                or getattr(self.level, "persist", False) or self.failed or torch.compiler.is_compiling()):
            return self.eager(x, *args, **kwargs)
        key = self._key(x)
        whole = self.whole.get(key)
        if whole is None:  # first call of this signature: eagerly, recording the chunk paths
            with record_paths() as paths:
                y = self.eager(x)
            self.whole[key] = bool(paths) and all(paths)
            return y
        if not whole:
            return self.eager(x)
        try:
            return self.compiled(x)
        except self._errors as e:
            self.failed = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            warnings.warn(f"level {getattr(self.level, 'level', '?')}: compiling its forward whole failed "
                          f"({self.failed}); it runs with its compiled chunk step", stacklevel=2)
            return self.eager(x)


def forward_of(level: nn.Module):
    """The forward to call for an in-context level: its whole-level region where
    :func:`compile_regions` installed one, else the class's own ``forward`` (bound)."""
    region = level.__dict__.get("_nlc_region")
    return region if region is not None else type(level).forward.__get__(level)


def region_failures(model: nn.Module) -> list[str]:
    """Why each whole-forward region of ``model`` that failed to compile did (its level then runs
    eagerly around its compiled chunk step); empty when none failed."""
    return [m._nlc_region.failed for m in model.modules()
            if m.__dict__.get("_nlc_region") is not None and m._nlc_region.failed]  # fmt: skip


def compile_regions(model: nn.Module, *, backend: str | None = None, mode: str | None = None) -> list[str]:
    """Compile ``model``'s regions in place (see the module docstring); returns what was compiled.

    ``backend`` / ``mode``: passed to ``torch.compile`` (default: inductor, default mode). The
    model's own ``forward`` keeps its Python: call the model itself afterwards. Calling this twice
    compiles nothing more.
    """
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    opts = {"fullgraph": True, "dynamic": False}
    if backend is not None:
        opts["backend"] = backend
    if mode is not None:
        opts["mode"] = mode
    done: list[str] = []

    def visit(name: str, m: nn.Module) -> None:
        if _is_in_context(m):
            if not getattr(m, "_nlc_regional", False):
                # an instance attribute shadows the method: run_chunks gets the compiled step
                m.chunk = torch.compile(type(m).chunk.__get__(m), **opts)
                m._nlc_regional = True
                done.append(f"{name or type(m).__name__}.chunk")
                if callable(getattr(type(m), "sequence", None)) and os.environ.get("NLC_WHOLE_FORWARD", "1") != "0":
                    m._nlc_region = _SequenceRegion(m, opts)
                    m.forward = m._nlc_region
                    done.append(f"{name or type(m).__name__}.forward")
            for sub_name, sub in m.named_modules():  # levels inside a level (a nested CMS group)
                if sub is not m and _is_in_context(sub):
                    visit(f"{name}.{sub_name}" if name else sub_name, sub)
            return
        if not has_in_context(m):
            if _torch_module(m):  # containers: their children; torch's own layers stay as they are
                for child_name, child in m.named_children():
                    visit(f"{name}.{child_name}" if name else child_name, child)
            elif any(True for _ in m.parameters()) and getattr(m, "_compiled_call_impl", None) is None:
                m.compile(**opts)
                done.append(name or type(m).__name__)
            return
        for child_name, child in m.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return done
