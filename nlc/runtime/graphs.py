"""CUDA graphs for in-context levels: one replay per forward and per backward instead of thousands
of kernel launches.

An in-context level runs ``T / C`` chunk steps one after the other (the chunk recurrence is
sequential), each a few dozen small kernels. Even with the chunk step compiled
(:mod:`nlc.runtime.regional`) the CPU cannot launch them as fast as the GPU runs them: on an H200
the Titans level of ``benchmarks/specs/titans_memory.nl`` spends 496 ms of CPU per training step
for 50 ms of GPU work at period 16. Captured in a CUDA graph, the step costs what the GPU needs.

:func:`graph_levels` installs a wrapper as each in-context level's ``forward``. On a call in
training mode with gradients on, it captures the level for that input signature (shape, dtype,
``requires_grad``, autocast state) with ``torch.cuda.make_graphed_callables`` the first time, and
replays it afterwards. It runs the level's own forward instead when:

* the level is not training, gradients are off, or its memory persists across calls (``reset
  never`` / test-time learning: a Python-side state the graph cannot carry);
* the caller asks for the chunk states or passes start states (a nested CMS group);
* the previous replay's backward has not run yet (a replay reuses fixed buffers for its saved
  activations, so a second one before the backward would overwrite them; a replay whose output
  never gets a gradient leaves the level uncaptured from then on, which :func:`graph_report`
  shows as ``pending_backward``);
* the signature is new and ``max_graphs`` are captured already, or capturing failed (noted once).

Gradients: parameters get copies of the graph's gradient buffers (a hook on each parameter),
never the buffers themselves, so gradients accumulated across steps (optimizer periods) stay
exact. Values and gradients equal the uncaptured level's (tested on CUDA).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .regional import forward_of, in_context_levels

__all__ = ["GRAPH_SCOPES", "GraphedLevel", "GraphedModel", "capture", "graph_levels", "graph_model", "graph_report"]

GRAPH_SCOPES = ("model", "levels")


class _Call(nn.Module):
    """The level's own forward as a module of its own (what ``make_graphed_callables`` captures)."""

    def __init__(self, level: nn.Module):
        super().__init__()
        self.level = level

    def forward(self, x):
        return forward_of(self.level)(x)


class GraphedLevel:
    """The ``forward`` of one in-context level, replayed from CUDA graphs where it can be."""

    def __init__(self, level: nn.Module, max_graphs: int = 4):
        self.level = level
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, nn.Module] = {}
        self.pending = False
        self.failed: str | None = None
        self.replays = 0
        for p in level.parameters():
            if p.requires_grad:
                p.register_hook(_copy)

    def _key(self, x):
        return (tuple(x.shape), x.dtype, x.device, x.requires_grad, torch.is_autocast_enabled("cuda"),
                torch.get_autocast_dtype("cuda"))

    def _eager(self, x, *args, **kwargs):
        return forward_of(self.level)(x, *args, **kwargs)

    def __call__(self, x, *args, **kwargs):
        lv = self.level
        if args or any(v not in (None, False) for v in kwargs.values()):  # chunk states asked or given
            return self._eager(x, *args, **kwargs)
        if (not lv.training or not torch.is_grad_enabled() or getattr(lv, "persist", False)
                or not x.is_cuda or self.pending or self.failed or torch.cuda.is_current_stream_capturing()):
            return self._eager(x)
        key = self._key(x)
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= self.max_graphs:
                return self._eager(x)
            graphed = self._capture(x, key)
            if graphed is None:
                return self._eager(x)
        with torch.cuda.device(x.device):  # replay where it was captured (the current device may differ)
            y = graphed(x)
        self.replays += 1
        if y.requires_grad:
            self.pending = True
            y.register_hook(self._backward_started)
        return y

    def _backward_started(self, grad):
        self.pending = False
        return grad

    def _capture(self, x, key):
        sample = x.detach().clone().requires_grad_(x.requires_grad)
        # autocast as it stands, without its weight cache, which make_graphed_callables refuses
        # (the casts are the same)
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        try:
            # capture on the input's device: a graph captures the current device's stream
            with torch.cuda.device(x.device), autocast:
                graphed = torch.cuda.make_graphed_callables(_Call(self.level), (sample,), num_warmup_iters=3,
                                                            allow_unused_input=True)
        except Exception as e:  # noqa: BLE001 - the level runs uncaptured; the reason is said once
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            warnings.warn(f"level {getattr(self.level, 'level', '?')}: CUDA graph capture failed ({self.failed}); "
                          "it runs without graphs", stacklevel=3)
            return None
        self.graphs[key] = graphed
        return graphed


def _copy(grad):
    # the gradient arrives in a buffer of the graph that the next replay overwrites: hand a copy
    # to the parameter's .grad, so that accumulation across steps adds what it should
    return grad.clone()


def graph_levels(model: nn.Module, max_graphs: int = 4) -> list[str]:
    """Replay ``model``'s in-context levels from CUDA graphs (see the module docstring).

    Call after moving the model to its CUDA device and before the first step; combine with
    :func:`nlc.runtime.regional.compile_regions` (call that first), whose fused chunk steps make
    the captured graph shorter. Returns the names of the levels wrapped; a second call wraps
    nothing more.
    """
    done = []
    for lv in in_context_levels(model):
        if isinstance(lv.__dict__.get("forward"), GraphedLevel):
            continue
        lv.forward = GraphedLevel(lv, max_graphs=max_graphs)
        done.append(getattr(lv, "level", type(lv).__name__))
    return done


class _WholeCall(nn.Module):
    """The model's own (class) forward on ``(idx, targets)`` as a module to capture."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        return type(self.model).forward(self.model, idx, targets)


class GraphedModel:
    """The ``forward`` of a whole model, its training call (``model(idx, targets)``) replayed from
    one CUDA graph forward and one backward.

    It runs the model's own forward instead when the model is not training, gradients are off,
    ``targets`` is not given, more arguments are, an in-context memory persists across calls,
    the input is not on a CUDA device, the previous replay's backward has not run, or the
    signature is new and ``max_graphs`` are captured already. A capture that fails (an operation
    a graph cannot hold) is said once, and the model falls back to :func:`graph_levels`.

    A replay's outputs (logits, loss) are the graph's own buffers: the next replay overwrites
    them. Use them (or ``.clone()`` them) before the next training call, as a training loop does
    (``loss.backward()``, ``loss_sum += loss.detach()``: stream-ordered, so safe).
    """

    def __init__(self, model: nn.Module, max_graphs: int = 2):
        self.model = model
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, nn.Module] = {}
        self.pending = False
        self.failed: str | None = None
        self.replays = 0
        self.levels = in_context_levels(model)
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(_copy)

    def _eager(self, *args, **kwargs):
        return type(self.model).forward(self.model, *args, **kwargs)

    def _key(self, idx, targets):
        return (tuple(idx.shape), idx.dtype, tuple(targets.shape), targets.dtype, idx.device,
                torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))

    def __call__(self, idx, targets=None, *args, **kwargs):
        m = self.model
        if (args or kwargs or targets is None or not m.training or not torch.is_grad_enabled()
                or not isinstance(idx, torch.Tensor) or not idx.is_cuda or self.pending or self.failed
                or any(getattr(lv, "persist", False) for lv in self.levels)
                or torch.cuda.is_current_stream_capturing()):
            return self._eager(idx, targets, *args, **kwargs)
        key = self._key(idx, targets)
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= self.max_graphs:
                return self._eager(idx, targets)
            graphed = self._capture(idx, targets, key)
            if graphed is None:
                return self._eager(idx, targets)
        with torch.cuda.device(idx.device):
            out = graphed(idx, targets)
        self.replays += 1
        loss = out[-1] if isinstance(out, tuple) else out
        if loss.requires_grad:
            self.pending = True
            loss.register_hook(self._backward_started)
        return out

    def _backward_started(self, grad):
        self.pending = False
        return grad

    def _capture(self, idx, targets, key):
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        try:
            with torch.cuda.device(idx.device), autocast:
                graphed = torch.cuda.make_graphed_callables(
                    _WholeCall(self.model), (idx.clone(), targets.clone()), num_warmup_iters=3,
                    allow_unused_input=True)
        except Exception as e:  # noqa: BLE001 - the model runs with its levels graphed; said once
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            warnings.warn(f"CUDA graph capture of the whole training step failed ({self.failed}); "
                          "its in-context levels are captured one by one instead", stacklevel=3)
            torch.cuda.synchronize()
            graph_levels(self.model)
            return None
        self.graphs[key] = graphed
        return graphed


def graph_model(model: nn.Module, max_graphs: int = 2) -> bool:
    """Replay ``model``'s whole training call (``model(idx, targets)``: forward and backward)
    from CUDA graphs (see :class:`GraphedModel`); ``False`` if it is wrapped already.

    For a model whose step the CPU cannot launch as fast as the GPU runs it: small models, many
    layers, in-context levels at large periods. Call after moving the model to its CUDA device
    and after :func:`nlc.runtime.regional.compile_regions`, instead of :func:`graph_levels`.
    """
    if isinstance(model.__dict__.get("forward"), GraphedModel):
        return False
    if any(isinstance(lv.__dict__.get("forward"), GraphedLevel) for lv in in_context_levels(model)):
        raise ValueError("graph_model: the model's levels are captured one by one already (graph_levels)")
    model.forward = GraphedModel(model, max_graphs=max_graphs)
    return True


def capture(model: nn.Module, scope: str = "model", parallel: str = "none") -> str:
    """Install CUDA graphs of ``scope`` on ``model``; returns the scope installed.

    ``model``: the whole model's training call (:func:`graph_model`), in one process only;
    under DDP (``parallel != "none"``), whose gradient hooks a captured backward would skip, the
    levels alone. ``levels``: each in-context level (:func:`graph_levels`).
    """
    if scope not in GRAPH_SCOPES:
        raise ValueError(f"graph scope must be one of {GRAPH_SCOPES}, got {scope!r}")
    if scope == "model" and parallel == "none":
        graph_model(model)
        return "model"
    graph_levels(model)
    return "levels"


def graph_report(model: nn.Module) -> list[dict]:
    """Per wrapped level: graphs captured, replays so far, and why capture failed (if it did)."""
    out = []
    for lv in in_context_levels(model):
        g = lv.__dict__.get("forward")
        if isinstance(g, GraphedLevel):
            out.append({"level": getattr(lv, "level", "?"), "graphs": len(g.graphs), "replays": g.replays,
                        "failed": g.failed, "pending_backward": g.pending})
    return out
