"""The command-line contract of ``nlc check``, ``nlc fmt`` and ``nlc compile --emit ast|ir``.

Exit codes: 0 success, 1 a spec has errors, 2 usage (code NL901). Golden dumps live in
``golden/``; ``NLC_UPDATE_GOLDEN=1 pytest tests/frontend/test_cli.py`` rewrites them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import ROOT

HERE = Path(__file__).resolve().parent
EX = ROOT / "examples"
GOLDEN = HERE / "golden"
GOLDEN_EXAMPLES = ("transformer_pp", "hope", "momentum_sgd")

VALID = EX / "transformer_pp.nl"
BAD = """nl 1

model m {
  dims {
    d = 64
    vocab = 256
  }

  embed vocab -> d

  block layer {
    level ffn : mlp(d) {
      never
    }
  }

  head tide

  level pretrain {
    objective next_token
    rule adamw(lr = 1e-3)
    every 1
  }
}
"""
_DIAG_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<code>NL\d{3}) (?P<msg>.+)$")


@pytest.fixture
def bad_spec(tmp_path: Path) -> Path:
    p = tmp_path / "bad.nl"
    p.write_text(BAD)
    return p


# ---- nlc check -----------------------------------------------------------------------------------


def test_check_valid_exits_0(run_cli):
    code, out, err = run_cli("check", *sorted(EX.glob("*.nl")))
    assert code == 0
    assert out == ""
    assert f"{len(list(EX.glob('*.nl')))} spec(s), ok" in err


def test_check_errors_exit_1_and_print_file_line_col_code_caret_hint(run_cli, bad_spec):
    code, out, err = run_cli("check", bad_spec)
    assert code == 1
    lines = out.splitlines()
    heads = [(i, _DIAG_LINE.match(ln)) for i, ln in enumerate(lines) if _DIAG_LINE.match(ln)]
    assert [(m["code"], int(m["line"]), int(m["col"])) for _, m in heads] == [("NL204", 17, 8), ("NL401", 22, 5)]
    for i, m in heads:
        assert m["file"] == str(bad_spec)
        src_line = BAD.splitlines()[int(m["line"]) - 1]
        assert lines[i + 1].endswith(src_line)  # the source line, with a gutter
        caret = lines[i + 2]
        assert caret.index("^") == lines[i + 1].index(src_line) + int(m["col"]) - 1
        assert lines[i + 3].startswith("  hint: ")
    assert "1 of 1 spec(s) invalid, 2 error(s)" in err


def test_check_quiet_prints_only_diagnostics(run_cli, bad_spec):
    code, out, err = run_cli("check", "-q", bad_spec)
    assert code == 1 and err == "" and "NL204" in out


def test_check_json(run_cli, bad_spec):
    code, out, err = run_cli("check", "--format", "json", bad_spec, VALID)
    assert code == 1
    data = json.loads(out)  # stdout is only the JSON document
    assert isinstance(data, list) and [d["code"] for d in data] == ["NL204", "NL401"]
    for d in data:
        assert {"code", "line", "col", "message", "hint", "file", "severity"} <= set(d)
        assert d["file"] == str(bad_spec) and d["severity"] == "error"
    assert data[0]["line"] == 17 and data[0]["col"] == 8 and "tide" in data[0]["message"]
    code, out, _ = run_cli("check", "--format", "json", VALID)
    assert code == 0 and json.loads(out) == []


def test_check_several_files(run_cli, bad_spec, tmp_path):
    other = tmp_path / "other.nl"
    other.write_text(BAD.replace("head tide", "head tied"))
    code, out, err = run_cli("check", VALID, bad_spec, other)
    assert code == 1
    files = {m["file"] for m in map(_DIAG_LINE.match, out.splitlines()) if m}
    assert files == {str(bad_spec), str(other)}
    assert "3 spec(s), 2 of 3 spec(s) invalid, 3 error(s)" in err


def test_check_missing_file_is_nl001(run_cli, tmp_path):
    missing = tmp_path / "missing.nl"
    code, out, _ = run_cli("check", missing, VALID)
    assert code == 1
    assert out.startswith(f"{missing}:1:1: NL001 ")
    assert "hint:" in out


def test_check_non_utf8_is_nl002(run_cli, tmp_path):
    p = tmp_path / "latin1.nl"
    p.write_bytes(b"nl 1\n# caf\xe9\nmodel m {}\n")
    code, out, _ = run_cli("check", p)
    assert code == 1
    assert out.startswith(f"{p}:2:6: NL002 ")


@pytest.mark.parametrize("argv", [
    ("check",),  # no file
    ("check", "--bogus", "x.nl"),  # unknown flag
    ("check", "--format", "xml", "x.nl"),  # bad choice
    (),  # no command
    ("frobnicate",),  # unknown command
    ("fmt", "--check", "--write", "x.nl"),  # exclusive flags
    ("compile", "--emit", "exe", "x.nl"),
])
def test_usage_errors_exit_2_with_nl901(run_cli, argv):
    code, out, err = run_cli(*argv)
    assert code == 2
    assert "NL901" in err and "usage:" in err and "hint:" in err
    assert "Traceback" not in err


def test_help_exits_0(run_cli):
    code, out, _ = run_cli("check", "--help")
    assert code == 0 and "--format" in out


# ---- nlc fmt -------------------------------------------------------------------------------------

UGLY = """# leading comment
nl 1   # version
model m { dims { d = 64; vocab = 256 }   # sizes
  embed vocab->d
  block layer { level ffn : mlp(d) never }  # one block
  head tied
  level pretrain { objective next_token   rule adamw(lr = 1e-3)
    every 1 steps }
}
# trailing comment
"""


def _comments(text: str) -> list[str]:
    return [c.rstrip() for c in re.findall(r"#[^\n]*", text)]


def test_fmt_prints_canonical_text(run_cli, tmp_path):
    p = tmp_path / "ugly.nl"
    p.write_text(UGLY)
    code, out, err = run_cli("fmt", p)
    assert code == 0 and err == ""
    assert out != UGLY and sorted(_comments(out)) == sorted(_comments(UGLY))  # every comment kept
    assert p.read_text() == UGLY  # stdout mode never writes
    q = tmp_path / "canon.nl"
    q.write_text(out)
    assert run_cli("fmt", q)[1] == out  # idempotent


def test_fmt_check(run_cli, tmp_path):
    p = tmp_path / "ugly.nl"
    p.write_text(UGLY)
    code, out, err = run_cli("fmt", "--check", p, VALID)
    assert code == 1 and out == ""
    assert f"would reformat {p}" in err and str(VALID) not in err
    code, out, err = run_cli("fmt", "--check", *sorted(EX.glob("*.nl")))
    assert (code, out, err) == (0, "", "")


def test_fmt_write_is_atomic_and_idempotent(run_cli, tmp_path):
    p = tmp_path / "ugly.nl"
    p.write_text(UGLY)
    code, out, err = run_cli("fmt", "--write", p)
    assert (code, out) == (0, "")
    first = p.read_text()
    assert first != UGLY and sorted(_comments(first)) == sorted(_comments(UGLY))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ugly.nl"]  # no temporary file left
    stat = p.stat()
    assert run_cli("fmt", "--write", p)[0] == 0
    assert p.read_text() == first and p.stat().st_mtime_ns == stat.st_mtime_ns  # unchanged: not rewritten
    assert run_cli("fmt", "--check", p)[0] == 0


def test_fmt_write_failure_leaves_the_file_intact(run_cli, tmp_path, monkeypatch):
    p = tmp_path / "ugly.nl"
    p.write_text(UGLY)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        run_cli("fmt", "--write", p)
    assert p.read_text() == UGLY
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ugly.nl"]


def test_fmt_refuses_invalid_syntax(run_cli, tmp_path):
    p = tmp_path / "broken.nl"
    p.write_text("nl 1\nmodel m {\n")
    code, out, err = run_cli("fmt", "--write", p)
    assert code == 1 and out == "" and "NL102" in err
    assert p.read_text() == "nl 1\nmodel m {\n"
    code, _, err = run_cli("fmt", tmp_path / "none.nl")
    assert code == 1 and "NL001" in err


# ---- nlc compile --emit ast|ir (golden) ----------------------------------------------------------


@pytest.mark.parametrize("name", GOLDEN_EXAMPLES)
@pytest.mark.parametrize("emit", ["ast", "ir"])
def test_compile_emit_is_stable(run_cli, name, emit):
    """The dumps of a snapshot of the example (``golden/NAME.nl``, so that editing an example's
    comments does not move the golden line numbers) equal ``golden/NAME.ast|ir``.
    ``NLC_UPDATE_GOLDEN=1`` refreshes the snapshot from ``examples/`` and rewrites the dumps."""
    spec = GOLDEN / f"{name}.nl"
    golden = GOLDEN / f"{name}.{emit}"
    if os.environ.get("NLC_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        spec.write_text((EX / f"{name}.nl").read_text())
    code, out, err = run_cli("compile", spec, "--emit", emit)
    assert code == 0, err
    if os.environ.get("NLC_UPDATE_GOLDEN") == "1":
        golden.write_text(out)
    assert golden.exists(), f"missing {golden}; run with NLC_UPDATE_GOLDEN=1"
    assert out == golden.read_text(), f"{golden} differs; if intended, rerun with NLC_UPDATE_GOLDEN=1"
    assert run_cli("compile", spec, "--emit", emit)[1] == out  # same bytes every time
    assert "0x" not in out  # no object addresses


def test_compile_emit_on_invalid_spec_exits_1(run_cli, bad_spec):
    code, out, err = run_cli("compile", bad_spec, "--emit", "ir")
    assert code == 1 and out == "" and "NL204" in err


# ---- python -m nlc -------------------------------------------------------------------------------


def test_python_dash_m_nlc():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "nlc", "check", str(VALID)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "nlc", "check"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "NL901" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "nlc", "--version"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("nlc ")
