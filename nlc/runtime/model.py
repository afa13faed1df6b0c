"""The parts of a generated model that do not depend on its spec.

Generated ``model.py`` files define ``class Model(NestedModel)`` with their own ``__init__`` and
``forward`` and a class attribute ``levels`` (spec name -> (kind, period)); every level module
they contain has a class attribute ``level`` with its spec name. This class adds the control of
in-context memories, called outside the compiled step by ``train.py``, ``nlc eval`` and the
distributed runtime:

* ``level_modules(name)`` / ``level_parameters(name)``: the modules and parameters of a level;
* ``persist_memory``: in-context states kept across calls (test-time learning), off by default;
* ``reset_memory()``, ``memory_state_dict()`` / ``load_memory_state_dict()``: the kept states;
* ``nonfinite_levels()``: the levels whose parameters or last states are not finite (a level's
  last state: at the end of its sequence, or at the start of its last chunk where nothing reads
  the end, ``run_chunks(..., final_state=False)``);
* ``level_report()``: one row per level for the run's banner.

and the two helpers ``build_optimizers`` uses: :func:`param_groups` and :func:`on_cuda`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import flows as nl_flows

__all__ = ["NestedModel", "param_groups", "on_cuda"]


class NestedModel(nn.Module):
    """Base of generated models: the control of in-context memories (see the module docstring)."""

    levels: dict = {}

    def level_modules(self, name=None):
        """Every module implementing a level (one per layer), or those of level `name`."""
        return [m for m in self.modules() if getattr(m, "level", None) in self.levels
                and (name is None or m.level == name)]

    def level_parameters(self, name):
        seen, out = set(), []
        for m in self.level_modules(name):
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    @property
    def persist_memory(self):
        return any(getattr(m, "persist", False) for m in self.level_modules())

    @persist_memory.setter
    def persist_memory(self, value):
        for m in self.level_modules():
            if hasattr(m, "persist"):
                m.persist = bool(value) or getattr(m, "reset_never", False)

    def reset_memory(self):
        for m in self.level_modules():
            if hasattr(m, "carry"):
                m.carry = None

    def memory_state_dict(self):
        """In-context states kept across calls (reset never / test-time learning), for checkpoints.

        Flat {key: tensor}: tensors with a batch axis are per sequence row (ranks split them);
        "<key>.n" entries (0-dim) give the length of each nested tuple of the state.
        """
        out = {}

        def walk(node, key):
            if torch.is_tensor(node):
                out[key] = node.detach().cpu()
            elif node is not None:
                out[f"{key}.n"] = torch.tensor(len(node))
                for j, child in enumerate(node):
                    walk(child, f"{key}.{j}")

        for i, m in enumerate(self.level_modules()):
            if getattr(m, "carry", None) is not None:
                walk(m.carry, str(i))
        return out

    def load_memory_state_dict(self, state_dict):
        modules = self.level_modules()

        def build(key, device):
            if key in state_dict:
                return state_dict[key].to(device)
            if f"{key}.n" not in state_dict:
                return None
            items = [build(f"{key}.{j}", device) for j in range(int(state_dict[f"{key}.n"]))]
            # weights of one state are a list; the nesting above them, tuples (as the chunk step makes)
            return items if items and all(torch.is_tensor(t) for t in items) else tuple(items)

        for m in modules:
            if hasattr(m, "carry"):
                m.carry = None
        for key in state_dict:
            if key.count(".") == 1 and key.endswith(".n"):
                i = int(key.split(".")[0])
                modules[i].carry = build(str(i), next(modules[i].parameters()).device)

    def nonfinite_levels(self):
        bad = []
        for m in self.level_modules():
            if not nl_flows.all_finite(m) and m.level not in bad:
                bad.append(m.level)
        return bad

    def level_report(self):
        out = []
        for name, (kind, period) in self.levels.items():
            out.append({"name": name, "kind": kind, "period": period,
                        "params": sum(p.numel() for p in self.level_parameters(name))})
        return out


def param_groups(params, weight_decay: float) -> list[dict]:
    """Decay matrices (ndim >= 2); not gains, scales or mixing weights. Frozen parameters are left out."""
    params = [p for p in params if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def on_cuda(params) -> bool:
    """Use the fused CUDA kernels of torch's Adam/AdamW when every parameter is on a GPU."""
    params = list(params)
    return bool(params) and all(p.is_cuda for p in params)
