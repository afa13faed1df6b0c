"""Shared helpers: render train.py.j2 next to the fixture model.py and run it."""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "codegen_templates"
FIXTURE_MODEL = Path(__file__).resolve().parent / "fixtures" / "model.py"
DEFAULTS = {"lr": 3e-3, "batch_size": 8, "seq_len": 32, "steps": 30}
# Small and fast: every run of the fixture uses these unless a test says otherwise.
FAST = ["--eval-batches", "2", "--log-every", "5", "--no-progress"]
_counter = itertools.count()


def render_train(spec_name: str = "fixture", spec_path: str = "tests/train/fixtures/fixture.nl", defaults: dict | None = None) -> str:
    return template_env().get_template("train.py.j2").render(spec_name=spec_name, spec_path=spec_path,
                                                              defaults=defaults or DEFAULTS)


def template_env() -> jinja2.Environment:
    """The environment options nlc's code generator renders templates with."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def make_run_dir(where: Path, model_source: Path = FIXTURE_MODEL) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "train.py").write_text(render_train())
    shutil.copy(model_source, where / "model.py")
    return where


def load_train(where: Path):
    """Import a rendered train.py by path (as ``nlc train`` does)."""
    name = f"_nlc_test_train_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, where / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_script(where: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "train.py", *args], cwd=where, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run_dir(tmp_path / "spec")


@pytest.fixture
def train_module(run_dir):
    return load_train(run_dir)
