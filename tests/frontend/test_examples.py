"""Every example checks cleanly, round-trips through the printer, and formats idempotently."""

from __future__ import annotations

import re

import pytest

import nlc
from nlc.parser import parse_source
from nlc.pipeline import check_file, load_source
from nlc.printer import print_spec

from ..conftest import EXAMPLES, example_ids

# every construct of the paper has an example (README, `examples/`)
REQUIRED = {
    "transformer_pp", "linear_attention", "delta_rule", "titans_lmm", "titans_mal",
    "self_modifying_titans", "cms_sequential", "cms_nested", "cms_independent", "hope",
    "hope_attention", "momentum_sgd", "delta_momentum", "dmgd", "m3",
}


def test_every_construct_has_an_example():
    assert REQUIRED <= set(example_ids())


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_example_checks(path):
    result = check_file(path)
    assert result.ok, "\n".join(f"{d.code} {d.message}" for d in result.diagnostics)
    assert not result.diagnostics, [d.message for d in result.diagnostics]


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_example_cites_the_paper(path):
    head = path.read_text().split("nl 1")[0]
    assert head.strip().startswith("#") and re.search(r"\beqs? ?\(?\d+|§\s?\d", head), "header must cite equations"


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_roundtrip_and_idempotent(path):
    source, _ = load_source(path)
    spec = parse_source(source)
    printed = print_spec(spec)
    again = nlc.parse(printed)
    assert again == spec  # structural equality (spans are not compared)
    assert print_spec(again) == printed


@pytest.mark.parametrize("path", EXAMPLES, ids=example_ids())
def test_examples_are_canonical(path):
    source, _ = load_source(path)
    assert print_spec(parse_source(source)) == source.text
