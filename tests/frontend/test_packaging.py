"""An installed nlc finds its grammar and templates (package data, one resolver).

Builds a wheel of the project without network (``pip wheel --no-deps --no-build-isolation``),
checks what it carries, installs it into a temporary ``--target`` and runs ``python -m nlc check``
from there, with the source tree nowhere on ``sys.path``. The build runs on a copy of the
project's packaging inputs, so the checkout gets no ``build/`` or ``*.egg-info``. About 5 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ..conftest import ROOT

_INPUTS = ("pyproject.toml", "README.md", "nlc", "grammar", "codegen_templates")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("pip") is None and subprocess.run([sys.executable, "-m", "pip", "--version"],
                                                      capture_output=True).returncode != 0:
        pytest.skip("pip is not available")
    work = tmp_path_factory.mktemp("pkg")
    src = work / "src"
    src.mkdir()
    for name in _INPUTS:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    out = work / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(out)],
        capture_output=True, text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("nlc-*.whl")
    return whl


def test_wheel_carries_grammar_templates_and_every_package(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "nlc/_grammar/nl.lark" in names
    assert "nlc/_templates/README.md" in names
    templates = {p.name for p in (ROOT / "codegen_templates").glob("*.j2")}
    assert templates and {f"nlc/_templates/{t}" for t in templates} <= names
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "nlc").rglob("__init__.py")}
    missing = {p for p in packages if f"{p}/__init__.py" not in names}
    assert not missing, f"packages missing from the wheel (pyproject.toml [tool.setuptools] packages): {missing}"


def test_installed_wheel_checks_a_spec_without_the_source_tree(wheel: Path, tmp_path: Path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spec = tmp_path / "spec.nl"
    shutil.copy2(ROOT / "examples" / "hope.nl", spec)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    run = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True,  # noqa: E731
                                    env=env, cwd=tmp_path)
    where = run("-c", "import nlc, nlc._resources as r; print(nlc.__file__); print(r.grammar_path()); "
                      "print(r.templates_dir())")
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert line.startswith(str(target)), f"{line} is not from the installed wheel"
        assert not line.startswith(str(ROOT))
    check = run("-m", "nlc", "check", str(spec))
    assert check.returncode == 0, check.stdout + check.stderr
    bad = tmp_path / "bad.nl"
    bad.write_text("nl 1\nmodel m {\n")
    check = run("-m", "nlc", "check", str(bad))
    assert check.returncode == 1 and "NL102" in check.stdout
