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
  residual adds, the level's projections and its chunk loop).

A model with no in-context level at all is compiled whole: that is already one region.

Compiled code is keyed by the code object, so all layers of one level class share one compiled
step; shapes that differ (the last partial chunk, an evaluation batch) compile once more each,
which is why :func:`compile_regions` raises dynamo's recompile limit to ``RECOMPILE_LIMIT``.
Modules defined by torch itself (``nn.LayerNorm``, ``nn.Linear``) are left uncompiled: alone they
are one kernel, and dynamo does not trace their forward as a frame of its own.
Values and gradients equal the eager model's (tested).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["compile_regions", "has_in_context", "in_context_levels"]

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
