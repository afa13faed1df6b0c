"""The generated source: golden files, determinism, validity, hostile names, `nlc compile`."""

from __future__ import annotations

import ast
import os
import re

import pytest
import torch

import nlc

from ..conftest import EXAMPLES, ROOT

GOLDEN = ROOT / "tests" / "codegen" / "golden"
GOLDEN_EXAMPLES = ["transformer_pp", "titans_lmm", "hope", "cms_nested"]


@pytest.mark.parametrize("name", GOLDEN_EXAMPLES)
def test_golden_model_source(name):
    """NLC_UPDATE_GOLDEN=1 regenerates tests/codegen/golden/*.py."""
    source = nlc.compile(ROOT / "examples" / f"{name}.nl").model_source
    path = GOLDEN / f"{name}.py"
    if os.environ.get("NLC_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(source)
        pytest.skip("golden file rewritten (NLC_UPDATE_GOLDEN=1): nothing compared")
    assert path.exists(), f"missing golden file {path}: run with NLC_UPDATE_GOLDEN=1"
    assert source == path.read_text(), f"generated source of {name} changed (NLC_UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_source_is_deterministic_valid_and_traced_to_the_spec(path):
    a = nlc.compile(path)
    b = nlc.compile(path)
    assert a.model_source == b.model_source and a.train_source == b.train_source
    tree = ast.parse(a.model_source)
    assert any(isinstance(n, ast.ClassDef) and n.name == "Model" for n in tree.body)
    assert re.search(rf"# {re.escape(path.name)}:\d+", a.model_source)
    imports = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    imports |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imports <= {"torch", "nlc", "dataclasses", "__future__"}, imports
    long_lines = [line for line in a.model_source.splitlines() if len(line) > 100]
    assert len(long_lines) <= 3 and all(len(line) <= 130 for line in long_lines), long_lines


HOSTILE = """nl 1
# a comment with "quotes", ''' and \"\"\" and a {{ jinja }} {% block %} that must stay a comment
model torch {
  dims {
    F = 8
    nn = 2
    self = 4
    vocab = 16
  }
  embed vocab -> F
  block super x nn {
    level exec per head(nn) : mlp(self -> self, hidden = 6, depth = 2) {
      let key = input | linear(F -> self) | l2norm
      let value = input | linear(F -> self)
      let print = input | linear(F -> self) | tanh
      let eval = input | linear(F -> 1) | sigmoid
      reads exec(print)
      output linear(nn * self -> F)
      objective l2
      rule gd(lr = eval)
      every 2 tokens
    }
    level globals : mlp(F -> F, hidden = 8) {
      never
    }
  }
  head tied
  level object {
    objective next_token
    rule adamw(lr = 1e-3)
    every 1 steps
  }
}
"""

BENIGN = {"torch": "m", "F": "d", "nn": "h", "self": "w", "super": "blk", "exec": "mem",
          "print": "query", "eval": "rate", "globals": "ffn", "object": "outer"}


def _rename(text):
    body = text.split("\n", 2)[2]  # leave the comment line alone
    for a, b in BENIGN.items():
        body = re.sub(rf"\b{a}\b", b, body)
    return "nl 1\n# a comment\n" + body


def test_hostile_names_cannot_change_the_program():
    hostile = nlc.compile(HOSTILE).model_source
    tree = ast.parse(hostile)
    # nothing the generated code relies on is ever rebound
    protected = {"torch", "nn", "F", "nl_chunk", "nl_flows", "nl_mem", "nl_ops", "nl_optim", "print",
                 "open", "eval", "exec", "super", "globals", "object", "self"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            assert node.id not in protected, node.id
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            assert node.name not in protected, node.name
        if isinstance(node, ast.arg):
            assert node.arg == "self" or node.arg not in protected, node.arg
    # the comment (quotes, jinja syntax) stays inert: the program equals the one with plain names
    torch.manual_seed(0)
    a = nlc.load(HOSTILE)()
    torch.manual_seed(0)
    b = nlc.load(_rename(HOSTILE))()
    idx = torch.randint(0, 16, (2, 6))
    la, lb = a(idx, idx)[1], b(idx, idx)[1]
    assert torch.equal(la, lb)


def test_compile_cli_writes_a_package(tmp_path, run_cli):
    code, out, err = run_cli("compile", ROOT / "examples" / "titans_lmm.nl", "-o", tmp_path / "pkg")
    assert code == 0, err
    assert (tmp_path / "pkg" / "model.py").exists() and (tmp_path / "pkg" / "train.py").exists()
    code, out, err = run_cli("compile", ROOT / "examples" / "titans_lmm.nl", "--emit", "py")
    assert code == 0 and out == nlc.compile(ROOT / "examples" / "titans_lmm.nl").model_source


def test_generated_tracebacks_show_generated_lines():
    Model = nlc.load(ROOT / "examples" / "linear_attention.nl")
    model = Model()
    try:
        model(torch.randint(0, 256, (2, 8, 3)))  # wrong rank
    except Exception as e:  # noqa: BLE001 - any runtime error will do
        import traceback

        text = "".join(traceback.format_exception(e))
        assert "<nlc:linear_attention.nl:model.py>" in text
        assert "x = self.embed(idx)" in text or "B, T, _ = x.shape" in text
    else:
        pytest.fail("a 3-d index tensor should fail")
