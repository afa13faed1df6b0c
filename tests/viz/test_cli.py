"""``nlc viz``: formats by extension, stdout, exit codes, PNG only with a renderer."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import pytest

from nlc import viz

from .conftest import load, spec_path

HOPE = spec_path("hope")


def test_default_prints_dot(run_cli):
    code, out, _ = run_cli("viz", HOPE)
    assert code == 0 and out == viz.to_dot(load("hope"))


@pytest.mark.parametrize("ext", ["svg", "dot", "mmd", "html", "md"])
def test_extension_picks_the_format(run_cli, tmp_path, ext):
    out = tmp_path / f"picture.{ext}"
    code, _, err = run_cli("viz", HOPE, "-o", out, "--no-code")
    assert code == 0, err
    assert f"wrote {out}" in err
    assert out.read_text(encoding="utf-8") == viz.render(load("hope"), ext, code=False)


def test_format_flag_and_schedule(run_cli, tmp_path):
    code, out, _ = run_cli("viz", HOPE, "--format", "mermaid")
    assert code == 0 and out.startswith("%% hope")
    target = tmp_path / "sched.svg"
    code, _, _ = run_cli("viz", HOPE, "--schedule", "--seq", "128", "-o", target)
    assert code == 0
    root = ET.fromstring(target.read_text())
    assert "nlc-schedule" in root.get("class")
    assert "128-token sequence" in target.read_text()


@pytest.mark.parametrize("args, needle", [
    (["-o", "x.jpeg"], "cannot tell the format"),
    (["--schedule", "-o", "x.dot"], "the schedule is drawn as svg"),
    (["--format", "png"], "PNG is binary"),
    (["--seq", "0"], "at least 1"),
])
def test_usage_errors_exit_2(run_cli, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("viz", HOPE, *args)
    assert code == 2 and needle in err
    assert not list(tmp_path.iterdir())


def test_spec_errors_exit_1(run_cli, tmp_path):
    bad = tmp_path / "bad.nl"
    bad.write_text(HOPE.read_text().replace("every 64 tokens", "every 64"), encoding="utf-8")
    code, out, err = run_cli("viz", bad, "-o", tmp_path / "x.svg")
    assert code == 1 and "NL401" in err and out == ""
    assert not (tmp_path / "x.svg").exists()


def test_png_without_a_renderer_is_a_clear_error(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr("nlc.viz.png._cairosvg", lambda: None)
    monkeypatch.setattr("nlc.viz.png.shutil.which", lambda name: None)
    assert viz.png_renderers() == []
    code, _, err = run_cli("viz", HOPE, "-o", tmp_path / "x.png")
    assert code == 2
    assert "cairosvg" in err and "graphviz" in err.lower() and ".svg" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(not shutil.which("dot"), reason="Graphviz `dot` is not installed")
def test_png_through_dot(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr("nlc.viz.png._cairosvg", lambda: None)
    code, _, err = run_cli("viz", HOPE, "-o", tmp_path / "x.png")
    assert code == 0, err
    assert (tmp_path / "x.png").read_bytes().startswith(b"\x89PNG")
    code, _, err = run_cli("viz", HOPE, "--schedule", "-o", tmp_path / "s.png")
    assert code == 2 and "cairosvg" in err


def test_api_errors():
    with pytest.raises(viz.VizError, match="unknown format"):
        viz.render(load("hope"), "pdf")
    with pytest.raises(viz.VizError, match="extension"):
        viz.format_for("diagram")
    assert viz.format_for("a/b.GV") == "dot" and viz.format_for("x.mermaid") == "mmd"


def test_warnings_go_to_stderr_and_into_the_report(run_cli, tmp_path):
    spec = tmp_path / "warn.nl"
    text = spec_path("cms_sequential").read_text(encoding="utf-8")
    spec.write_text(text.replace("        every 16 tokens\n", "        every 16 tokens\n        reset every 512 tokens\n", 1),
                    encoding="utf-8")  # beyond seq = 256: a warning (NL403), not an error
    code, _, err = run_cli("viz", spec, "-o", tmp_path / "r.html", "--no-code")
    assert code == 0 and "NL403" in err
    assert "warning NL403" in (tmp_path / "r.html").read_text(encoding="utf-8")
