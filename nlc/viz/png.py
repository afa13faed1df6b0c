"""PNG output, only where a renderer exists (nlc itself needs no system binary).

Renderers, in order of preference:

1. ``cairosvg`` (a Python package, if importable) rasterizes nlc's own SVG, so the PNG is the
   same picture as ``-o diagram.svg``;
2. the Graphviz ``dot`` binary, if on ``PATH``, lays out and renders the DOT text: the same
   levels, nesting and flows, in Graphviz's layout (schedules need cairosvg).

With neither, :func:`to_png` raises :class:`PngUnavailable`, whose message names the
alternatives; ``nlc viz`` turns it into exit code 2.
"""

from __future__ import annotations

import shutil
import subprocess

from ..diagnostics import NLCError

__all__ = ["PngUnavailable", "dot_to_png", "renderers", "svg_to_png"]

_HELP = ("install one of: the Python package cairosvg (`pip install cairosvg`), or Graphviz "
         "(`apt-get install graphviz`, for `dot`); or write .svg, .html, .dot or .mmd instead")


class PngUnavailable(NLCError):
    """No PNG renderer is available (or the available one failed)."""


def _cairosvg():
    try:
        import cairosvg  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - a broken cairo install is "not available" too
        return None
    return cairosvg


def renderers() -> list[str]:
    """The PNG renderers available here: a subset of ``["cairosvg", "dot"]``."""
    out = []
    if _cairosvg() is not None:
        out.append("cairosvg")
    if shutil.which("dot"):
        out.append("dot")
    return out


def svg_to_png(svg: str, scale: float = 2.0) -> bytes:
    mod = _cairosvg()
    if mod is None:
        raise PngUnavailable(f"cannot write PNG: cairosvg is not installed; {_HELP}")
    return mod.svg2png(bytestring=svg.encode("utf-8"), scale=scale)


def dot_to_png(dot_text: str, dpi: int = 144, timeout: float = 60.0) -> bytes:
    exe = shutil.which("dot")
    if exe is None:
        raise PngUnavailable(f"cannot write PNG: no renderer found; {_HELP}")
    try:
        res = subprocess.run([exe, "-Tpng", f"-Gdpi={dpi}"], input=dot_text.encode("utf-8"),
                             capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PngUnavailable(f"cannot write PNG: `dot` failed ({e}); {_HELP}") from e
    if res.returncode != 0 or not res.stdout.startswith(b"\x89PNG"):
        msg = res.stderr.decode("utf-8", "replace").strip().splitlines()
        raise PngUnavailable(f"cannot write PNG: `dot` failed ({msg[-1] if msg else res.returncode}); {_HELP}")
    return res.stdout
