"""Spans: every AST node covers exactly its text; diagnostics and carets point at the token."""

from __future__ import annotations

import re

import pytest

from nlc import ast
from nlc.diagnostics import render
from nlc.parser import parse_source
from nlc.pipeline import check_source
from nlc.printer import _simple, print_expr
from nlc.source import SourceFile, Span, render_caret

from ..conftest import EXAMPLES, example_ids

_CONTAINER_KEYWORD = {ast.Model: "model", ast.Dims: "dims", ast.Block: "block", ast.Cms: "cms", ast.Level: "level"}


def _expected_text(node) -> str | None:
    """What the canonical source of ``node`` is, when it fits on one line."""
    if isinstance(node, ast.Ident):
        return node.text
    if isinstance(node, (ast.Num, ast.Name, ast.Call, ast.BinOp, ast.Neg, ast.Pipe, ast.Kwarg, ast.Shape)):
        return print_expr(node)
    if isinstance(node, ast.Stmt) and type(node) not in _CONTAINER_KEYWORD:
        return _simple(node)
    return None


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_every_node_span_covers_exactly_its_text(path):
    source = SourceFile(str(path), path.read_text(encoding="utf-8"))
    spec = parse_source(source)
    count = 0
    for node in ast.walk(spec):
        text = source.text[node.span.start:node.span.end]
        assert (node.span.line, node.span.col) == source.offset_to_linecol(node.span.start)
        assert (node.span.end_line, node.span.end_col) == source.offset_to_linecol(node.span.end)
        want = _expected_text(node)
        if want is not None:
            assert text == want, (type(node).__name__, text, want)
        elif isinstance(node, ast.Spec):
            assert text.startswith("nl ") and text.endswith("}")
        else:
            kw = _CONTAINER_KEYWORD[type(node)]
            assert text.startswith(kw + " ") or text == kw or text.startswith(kw + "{"), text[:30]
            if not (isinstance(node, ast.Level) and not text.rstrip().endswith("}")):
                assert text.endswith("}"), text[-30:]
        count += 1
    assert count > 50


NONCANONICAL = """\
nl 1
model m {
  dims { d = 64; heads = 4
         dh = (d) / heads ; vocab = 2 * (128) ; seq = 128 }
  embed vocab->d
  block layer x 2 {
    level attn : attention(heads=heads)
    level mem per head : linear( dh -> dh ) {
      let key = input   # comment inside a pipeline
        | linear(d -> dh)
        | l2norm
      let value = input | linear(d->dh)
      let query = -(1) | scale(2)
      objective dot ; rule gd(lr = 1) ; every 16 tokens
      output linear(heads * dh -> d)
    }
    level ffn : mlp(d -> d, hidden = 4*d) never
  }
  head tied
  level pretrain { objective next_token rule adamw(lr = 1e-3) every 1 steps }
}
"""


def _node(spec, kind, pred=lambda n: True):
    return next(n for n in ast.walk(spec) if isinstance(n, kind) and pred(n))


def test_spans_in_non_canonical_text():
    source = SourceFile("nc.nl", NONCANONICAL)
    spec = parse_source(source)
    sl = lambda n: source.text[n.span.start:n.span.end]  # noqa: E731
    # a parenthesised operand: the BinOp covers the parentheses, the Name inside does not
    div = _node(spec, ast.BinOp, lambda n: n.op == "/")
    assert sl(div) == "(d) / heads" and sl(div.left) == "d"
    assert sl(_node(spec, ast.Shape, lambda n: sl(n).startswith("d->"))) == "d->dh"
    # a pipeline over three lines with a comment inside: first stage to last
    key = _node(spec, ast.Let, lambda n: n.name.text == "key")
    assert sl(key.value).startswith("input") and sl(key.value).endswith("l2norm")
    assert key.value.span.line == 9 and key.value.span.end_line == 11
    assert key.comments == ("# comment inside a pipeline",)
    # statements separated by ';' on one line each get their own span
    rule = _node(spec, ast.Rule)
    assert sl(rule) == "rule gd(lr = 1)" and (rule.span.line, rule.span.col) == (14, 23)
    # an inline level ends at its last clause
    ffn = _node(spec, ast.Level, lambda n: n.name.text == "ffn")
    assert sl(ffn) == "level ffn : mlp(d -> d, hidden = 4*d) never"
    neg = _node(spec, ast.Neg)
    assert sl(neg) == "-(1)" and sl(neg.operand) == "1"
    # the model-level one-liner
    outer = _node(spec, ast.Level, lambda n: n.name.text == "pretrain")
    assert sl(outer).startswith("level pretrain {") and sl(outer).endswith("}") and outer.span.line == 20


def _diag(text: str, code: str):
    source = SourceFile("t.nl", text)
    result = check_source(source)
    found = [d for d in result.diagnostics if d.code == code]
    assert found, [(d.code, d.message) for d in result.diagnostics]
    return source, found[0]


BASE = """nl 1

model m {
  dims {
    d = 64
    heads = 4
    vocab = 256
  }

  embed vocab -> d

  block layer {
    level attn : attention(heads = heads)
    level ffn : mlp(d) {
      never
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


@pytest.mark.parametrize("code, old, new, token", [
    ("NL100", "head tied", "head tied tied", "tied"),  # the second `tied`
    ("NL101", "embed vocab -> d", "embed vocab -> d $", "$"),
    ("NL104", "nl 1", "nl 7", "7"),
    ("NL105", "lr = 1e-3", "lr = 1.0.3", "1.0.3"),
    ("NL201", "mlp(d) {\n      never", "mlp(d) {\n      let value = inptu\n      never", "inptu"),
    ("NL203", "rule adamw(lr = 1e-3)", "rule adamw(lr = 1e-3, betas = 0.9)", "betas"),
    ("NL204", "head tied", "head tide", "tide"),
    ("NL304", "embed vocab -> d", "embed vocab -> width", "width"),
    ("NL406", "every 1 steps", "every 1 tokens", "every 1 tokens"),
    ("NL208", "level ffn", "level _ffn", "_ffn"),
])
def test_diagnostic_points_at_the_token(code, old, new, token):
    text = BASE.replace(old, new, 1)
    source, d = _diag(text, code)
    # the token's occurrence on the diagnostic's line
    line = source.line(d.span.line)
    starts = [m.start() for m in re.finditer(re.escape(token), line)]
    assert d.span.col - 1 in starts, (d.span, line)
    assert source.text[d.span.start:d.span.end] == token
    caret = render_caret(source, d.span).splitlines()
    assert caret[0].endswith(line)
    gutter = caret[0].index("|") + 2
    assert caret[1][gutter:].index("^") == d.span.col - 1
    assert caret[1].rstrip().endswith("^" + "~" * (len(token) - 1))


def test_end_of_file_points_at_the_last_character():
    text = BASE.rstrip()[:-1]  # drop the model's closing brace
    source, d = _diag(text, "NL102")
    assert d.span.line == text.rstrip().count("\n") + 1
    assert source.text[d.span.start] == "}"


def test_missing_header_points_at_the_first_token_after_comments():
    text = "# a comment\n\n   # another\n  model m {}\n"
    source, d = _diag(text, "NL103")
    assert (d.span.line, d.span.col) == (4, 3)


def test_header_inside_a_comment_is_not_a_header():
    source, d = _diag("# see nl 1 for the syntax\nmodel m {}\n", "NL103")
    assert d.span.line == 2


def test_tabs_keep_the_caret_under_the_token():
    text = BASE.replace("  head tied", "\t\thead tide")
    source, d = _diag(text, "NL204")
    assert d.span.col == 8  # two tabs count one column each
    first, second = render_caret(source, d.span).splitlines()
    gutter = first.index("|") + 2
    assert "\t" not in first  # tabs render as one space each, like the caret's column count
    assert first[gutter:][d.span.col - 1:].startswith("tide")
    assert second[gutter:].index("^") == d.span.col - 1


def test_crlf_lines():
    text = BASE.replace("head tied", "head tide").replace("\n", "\r\n")
    source, d = _diag(text, "NL204")
    assert source.line(d.span.line) == "  head tide"  # no '\r'
    assert d.span.col == 8
    assert "\r" not in render_caret(source, d.span)


def test_form_feed_is_white_space_not_a_line_break():
    text = BASE.replace("  head tied", "\f  head tide")
    source, d = _diag(text, "NL204")
    assert source.line(d.span.line).endswith("head tide")
    assert d.span.line == BASE.split("\n").index("  head tied") + 1


def test_multi_line_span_is_underlined_to_the_end_of_its_first_line():
    source = SourceFile("t.nl", "level a {\n  never\n}\n")
    span = source.span(0, len(source.text) - 1)
    _, caret = render_caret(source, span).splitlines()
    assert caret.strip().strip("|").strip() == "^" + "~" * (len("level a {") - 1)


def test_empty_span_still_draws_one_caret():
    source = SourceFile("t.nl", "abc\n")
    _, caret = render_caret(source, source.span(3, 3)).splitlines()
    assert caret.rstrip().endswith("^") and caret.count("^") == 1


def test_rendered_diagnostic_shape():
    text = BASE.replace("head tied", "head tide")
    source, d = _diag(text, "NL204")
    lines = render([d], {source.name: source}).splitlines()
    assert lines[0].startswith(f"t.nl:{d.span.line}:{d.span.col}: NL204 ")
    assert lines[1].lstrip().startswith(f"{d.span.line} |")
    assert "^" in lines[2]
    assert lines[-1].startswith("  hint: ")


def test_unknown_span_renders_without_a_caret():
    d_span = Span.unknown("x.nl")
    assert render_caret(None, d_span) == ""
