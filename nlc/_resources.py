"""One resolver for the files nlc ships outside its Python package.

``grammar/`` and ``codegen_templates/`` sit at the top of the source tree. An installed wheel
carries them as the data packages ``nlc._grammar`` and ``nlc._templates`` (see
``pyproject.toml``); a source checkout or an editable install finds them beside ``nlc/``.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = ["grammar_path", "templates_dir", "read_grammar"]

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent


def _find(package: str, folder: str, probe: str) -> Path:
    # 1. an installed wheel: the data package sits beside this module (nlc/_grammar, ...). It has
    #    no __init__.py, so importlib sees a namespace package; looking on disk first avoids
    #    importlib.resources' MultiplexedPath, whose str() is not a path.
    candidate = _HERE / package.rsplit(".", 1)[-1]
    if (candidate / probe).is_file():
        return candidate
    # 2. any other importable location of the data package (another sys.path entry)
    try:
        found = importlib.resources.files(package).joinpath(probe)
        if isinstance(found, Path) and found.is_file():
            return found.parent
    except (ModuleNotFoundError, TypeError, ValueError, FileNotFoundError):
        pass
    # 3. a source checkout or an editable install: the top-level folder beside nlc/
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
