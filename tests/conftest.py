"""Shared fixtures: example paths, a seeded RNG, a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.nl"))


def example_ids():
    return [p.stem for p in EXAMPLES]


@pytest.fixture
def run_cli(capsys):
    """Run `nlc ARGS` in-process; returns (exit code, stdout, stderr)."""
    from nlc.cli import main

    def run(*args):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def pytest_configure(config):
    # Tiny models on 2 cores: one intra-op thread avoids oversubscription (10x faster backward).
    import torch

    torch.set_num_threads(1)
