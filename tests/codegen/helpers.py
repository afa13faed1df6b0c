"""Helpers for code generation tests: shrink example specs, load levels, compare to the reference."""

from __future__ import annotations

import re
import sys

import torch

import nlc
from nlc import ir
from nlc.reference_level import level_forward

from ..conftest import EXAMPLES


def shrink(text: str, d: int = 32, heads: int = 2, seq: int | None = None, layers: int = 1) -> str:
    """The same spec with smaller dims (the structure is unchanged)."""
    text = re.sub(r"(?m)^(\s*)d = \d+$", rf"\g<1>d = {d}", text)
    text = re.sub(r"(?m)^(\s*)heads = \d+$", rf"\g<1>heads = {heads}", text)
    text = re.sub(r"(?m)^(\s*)layers = \d+$", rf"\g<1>layers = {layers}", text)
    if seq is not None:
        text = re.sub(r"(?m)^(\s*)seq = \d+$", rf"\g<1>seq = {seq}", text)
    return text


def in_context_examples():
    out = []
    for p in EXAMPLES:
        prog = nlc.check(p)
        if any(lv.kind is ir.LevelKind.IN_CONTEXT for lv in prog.levels):
            out.append(p)
    return out


def level_classes(text: str):
    """(program, {level name: generated class}) for a spec text."""
    program = nlc.check(text)
    Model = nlc.load(text)
    module = sys.modules[Model.__module__]
    classes = {}
    for name in dir(module):
        obj = getattr(module, name)
        if isinstance(obj, type) and getattr(obj, "level", None) in ir_names(program):
            classes[obj.level] = obj
    return program, classes, module


def ir_names(program):
    return {lv.name for lv in program.levels}


def compare_level(program, lv, cls, T: int, B: int = 2, seed: int = 0, check_grads: bool = True,
                  parent=None):
    """Relative max errors (output, gradients) of the generated level against the literal reference.

    ``parent``: for a level nested in another (``init from``), the parent's generated class; the
    child starts (and restarts) from the parent's chunk-start states on the same input.
    """
    torch.manual_seed(seed)
    m = cls().double()
    d = int(program.d_model)
    x = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    if parent is not None:
        _, start = parent().double()(x, keep_chunk_states=True)
        y = m(x, start_states=start)
        yr = level_forward(lv, m, x, start_states=start)
    else:
        y = m(x)
        yr = level_forward(lv, m, x)
    out_err = (y - yr).abs().max().item()
    scale = yr.abs().max().item() + 1e-12
    if not check_grads:
        return out_err / scale, 0.0
    w = torch.randn_like(y)
    params = [x] + [p for p in m.parameters()]
    g = torch.autograd.grad((y * w).sum(), params, allow_unused=True, retain_graph=True)
    gr = torch.autograd.grad((yr * w).sum(), params, allow_unused=True)
    grad_err = 0.0
    for a, b in zip(g, gr):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        grad_err = max(grad_err, (a - b).abs().max().item() / (b.abs().max().item() + 1e-12))
    return out_err / scale, grad_err
