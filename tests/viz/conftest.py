"""Fixtures of the viz tests: programs by name (examples/ or tests/viz/specs/), golden files."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SPECS = HERE / "specs"
GOLDEN = HERE / "golden"


def spec_path(name: str) -> Path:
    p = SPECS / f"{name}.nl"
    return p if p.exists() else ROOT / "examples" / f"{name}.nl"


@functools.cache
def load(name: str):
    """The checked program of a spec, by stem (cached: programs are immutable)."""
    from nlc.pipeline import check_file

    result = check_file(spec_path(name))
    assert result.ok, [str(d) for d in result.diagnostics]
    return result.program


@pytest.fixture
def program():
    return load


@pytest.fixture
def golden():
    """``golden(name, text)``: compare with tests/viz/golden/NAME (NLC_UPDATE_GOLDEN=1 rewrites)."""

    def check(name: str, text: str) -> None:
        path = GOLDEN / name
        if os.environ.get("NLC_UPDATE_GOLDEN") == "1":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return
        assert path.exists(), f"no golden file {path}; run with NLC_UPDATE_GOLDEN=1 to create it"
        expected = path.read_text(encoding="utf-8")
        assert text == expected, f"{name} differs from its golden file; NLC_UPDATE_GOLDEN=1 to accept"

    return check
