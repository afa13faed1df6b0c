"""Batch isolation and reset policies of generated in-context levels."""

from __future__ import annotations

import torch

from nlc import ir

from .helpers import level_classes, shrink
from ..conftest import ROOT

HOPE = shrink((ROOT / "examples" / "hope.nl").read_text())

# a conv-free level, so that a later call depends on an earlier one only through the state
PLAIN = """nl 1
model m {
  dims {
    d = 8
    heads = 2
    w = 4
    vocab = 16
  }
  embed vocab -> d
  block b {
    level mem per head : mlp(w -> w, hidden = 6, depth = 2) {
      let key = input | linear(d -> w) | l2norm
      let value = input | linear(d -> w)
      let lr = input | linear(d -> 1) | sigmoid
      reads mem(key)
      output linear(heads * w -> d)
      objective l2
      rule momentum(lr = lr, momentum = 0.5, decay = 0.9)
      every 4 tokens
      RESET
    }
  }
  head tied
  level pretrain {
    objective next_token
    rule adamw(lr = 1e-3)
    every 1 steps
  }
}
"""


def _level(text, name):
    program, classes, _ = level_classes(text)
    torch.manual_seed(0)
    return program, classes[name]().double()


def test_batch_isolation_every_in_context_level():
    program, classes, _ = level_classes(HOPE)
    for lv in program.levels:
        if lv.kind is not ir.LevelKind.IN_CONTEXT:
            continue
        torch.manual_seed(1)
        m = classes[lv.name]().double()
        x = torch.randn(3, 20, int(program.d_model), dtype=torch.float64)
        y = m(x)
        x2 = x.clone()
        x2[1] = torch.randn_like(x2[1]) * 3  # change sequence 1 only
        y2 = m(x2)
        assert torch.equal(y[0], y2[0]) and torch.equal(y[2], y2[2]), lv.name
        assert not torch.allclose(y[1], y2[1]), lv.name


def test_reset_per_sequence_forgets_between_calls():
    _, m = _level(PLAIN.replace("RESET", "reset per sequence"), "mem")
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    assert torch.equal(m(x), m(x))


def test_reset_never_continues_the_sequence():
    _, m = _level(PLAIN.replace("RESET", "reset never"), "mem")
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    whole = m(x)  # one call over 16 tokens
    m.carry = None
    first, second = m(x[:, :8]), m(x[:, 8:])  # two calls of 8 tokens, state carried over
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-10, atol=1e-12)
    m.carry = None  # what Model.reset_memory() does to every level (test_model_level_controls)
    assert torch.equal(m(x[:, :8]), first)  # dropping the carried state restarts from the initial one


def test_test_time_learning_flag_persists_a_per_sequence_level():
    _, m = _level(PLAIN.replace("RESET", "reset per sequence"), "mem")
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    whole = m(x)
    m.persist = True
    first, second = m(x[:, :8]), m(x[:, 8:])
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-10, atol=1e-12)


def test_reset_every_n_tokens_restarts_the_state():
    _, m = _level(PLAIN.replace("RESET", "reset every 8 tokens"), "mem")
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    y = m(x)
    torch.testing.assert_close(y[:, 8:], m(x[:, 8:]), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(y[:, 8:], m(torch.cat([x[:, :4], x[:, 8:]], 1))[:, 4:])


def test_model_level_controls():
    program, classes, module = level_classes(HOPE)
    model = module.Model()
    assert model.persist_memory is False
    model.persist_memory = True
    assert model.persist_memory is True
    idx = torch.randint(0, 256, (2, 16))
    model(idx)
    assert all(m.carry is not None for m in model.level_modules() if hasattr(m, "carry"))
    model.reset_memory()
    assert all(m.carry is None for m in model.level_modules() if hasattr(m, "carry"))
    assert model.nonfinite_levels() == []
    with torch.no_grad():
        model.level_modules("fast")[0].fast0.weights[0].fill_(float("nan"))
    assert model.nonfinite_levels() == ["fast"]
    report = {r["name"]: r for r in model.level_report()}
    assert report["titans"]["kind"] == "in_context" and report["titans"]["params"] > 0
