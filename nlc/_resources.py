"""One resolver for the files nlc ships outside its Python package.

``grammar/`` and ``codegen_templates/`` sit at the top of the source tree. An installed wheel
carries them as the data packages ``nlc._grammar`` and ``nlc._templates`` (see
``pyproject.toml``); a source checkout or an editable install finds them beside ``nlc/``.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = ["grammar_path", "templates_dir", "read_grammar"]

_ROOT = Path(__file__).resolve().parent.parent


def _find(package: str, folder: str, probe: str) -> Path:
    try:
        base = importlib.resources.files(package)
        candidate = Path(str(base))
        if (candidate / probe).is_file():
            return candidate
    except (ModuleNotFoundError, TypeError):
        pass
    candidate = _ROOT / folder
    if (candidate / probe).is_file():
        return candidate
    raise FileNotFoundError(
        f"nlc cannot find its {folder}/ folder (looked in package {package} and {candidate}); "
        "reinstall nlc"
    )


def grammar_path() -> Path:
    """Path of ``nl.lark``."""
    return _find("nlc._grammar", "grammar", "nl.lark") / "nl.lark"


def read_grammar() -> str:
    return grammar_path().read_text(encoding="utf-8")


def templates_dir() -> Path:
    """Folder holding the jinja2 templates of generated code."""
    return _find("nlc._templates", "codegen_templates", "README.md")
