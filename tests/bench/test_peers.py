"""benchmarks/peers.py on the CPU (tiny sizes): it runs, checks nlc before timing, writes JSON and
markdown, and records a missing peer as skipped instead of crashing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ..conftest import ROOT

PEERS = ROOT / "benchmarks" / "peers.py"
# run the script with these peers unimportable, whatever this machine has installed
BLOCK = (
    "import runpy, sys\n"
    "for m in ('titans_pytorch', 'fla', 'nested_learning'):\n"
    "    sys.modules[m] = None\n"
    f"sys.argv = [{str(PEERS)!r}] + sys.argv[1:]\n"
    f"runpy.run_path({str(PEERS)!r}, run_name='__main__')\n"
)


def run_peers(tmp_path, *args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", BLOCK, "--device", "cpu", "--quick", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )
    elapsed = time.perf_counter() - t
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((tmp_path / "peers.json").read_text())
    return doc, p.stdout, elapsed


def rows(doc, **match):
    return [r for r in doc["rows"] if all(r.get(k) == v for k, v in match.items())]


def test_transformer_section_on_cpu(tmp_path):
    doc, out, elapsed = run_peers(tmp_path, "--sections", "transformer")
    check = rows(doc, section="transformer", variant="check")
    assert check and check[0]["status"] == "passed" and check[0]["check"]["out_rel"] < 1e-3
    timed = {r["impl"]: r for r in rows(doc, section="transformer", status="ok") if r["variant"] != "ratio"}
    assert set(timed) == {"control", "nlc"}
    for r in timed.values():
        assert r["tokens_per_s"]["median"] > 0 and r["step_ms"]["p10"] <= r["step_ms"]["p90"]
        assert r["tflops"]["model"] > 0
    assert rows(doc, impl="nlc / control")[0]["ratio"] > 0
    assert set(doc["ceilings"]) == {"start", "end"}
    assert doc["env"]["torch"] and doc["env"]["date"] and "--sections transformer" in doc["command"]
    md = (tmp_path / "peers.md").read_text()
    assert "| transformer |" in md and doc["env"]["date"] in md
    assert "| transformer | tiny" in out  # the final table is printed


def test_missing_peer_is_recorded_as_skipped(tmp_path):
    doc, out, _ = run_peers(tmp_path, "--sections", "titans", "--steps", "2", "--warmup", "1")
    skipped = rows(doc, section="titans", impl="titans-pytorch", status="skipped")
    assert skipped and "not installed" in skipped[0]["reason"]
    assert rows(doc, section="titans", impl="nlc", status="ok")  # nlc still timed
    assert not rows(doc, status="error")


def test_a_failing_section_does_not_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import peers

    def boom(run):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(peers.SECTION_FUNCS, "cms", boom)
    monkeypatch.delenv("OUT", raising=False)
    assert (
        peers.main(
            [
                "--device",
                "cpu",
                "--quick",
                "--sections",
                "cms,transformer",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "peers.json").read_text())
    err = rows(doc, section="cms", status="error")
    assert err and "planted failure" in err[0]["reason"]
    assert rows(doc, section="transformer", impl="nlc", status="ok")


@pytest.mark.parametrize("bad", ["--sections=nope"])
def test_bad_section_is_a_usage_error(tmp_path, bad):
    p = subprocess.run(
        [sys.executable, str(PEERS), bad],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert p.returncode == 2 and "unknown section" in p.stderr


@pytest.mark.slow
def test_every_section_runs_on_cpu(tmp_path):
    """All six sections at tiny sizes: every nlc check passes and nothing errors (peers absent)."""
    doc, _, _ = run_peers(tmp_path, "--steps", "2", "--warmup", "1", timeout=600)
    assert not rows(doc, status="error") and not rows(doc, status="refused")
    checks = rows(doc, variant="check")
    assert len(checks) >= 9 and all(r["status"] == "passed" for r in checks)
    for section in ("transformer", "titans", "delta", "hope", "cms", "mac"):
        assert rows(doc, section=section, impl="nlc", status="ok") or rows(
            doc, section=section, impl="nlc cms level", status="ok"
        ), section


@pytest.mark.parametrize("scan,probe_fails,want", [
    ("plain", False, [False]),  # no probe of the accelerated scan at all
    ("accelerated", False, [True]),
    ("auto", False, [True]),
    ("auto", True, [True, False]),  # the probe raised: the plain scan, noted
])
def test_mac_peer_follows_titans_scan(monkeypatch, scan, probe_fails, want):
    """The MAC section builds titans-pytorch's MAC with the scan ``--titans-scan`` names; only
    ``auto`` probes the accelerated one (whose failure can leave the CUDA context unusable)."""
    import types

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import peers

    built = []

    def fake(run, tp, B, T, variant, tiny, accelerated):
        built.append(accelerated)
        c = peers.Candidate("titans-pytorch MAC", variant, lambda: None, B * T)

        def probe():
            if probe_fails:
                raise RuntimeError("planted scan failure")

        c.probe = probe
        return c

    monkeypatch.setattr(peers, "_mac_candidate", fake)
    monkeypatch.setattr(peers, "free_memory", lambda: None)
    run = types.SimpleNamespace(cuda=True, args=types.SimpleNamespace(titans_scan=scan))
    c = peers.mac_candidate(run, None, 2, 8, "eager", True)
    assert built == want
    if scan != "auto":
        assert f"--titans-scan {scan}" in c.notes[0]
    elif probe_fails:
        assert "planted scan failure" in c.notes[0]


def test_isolated_sections_run_in_their_own_processes(tmp_path):
    """``--isolate``: each section runs in a child process; the parent measures the ceilings and
    merges the children's rows (tagged ``process: own``)."""
    doc, out, _ = run_peers(tmp_path, "--sections", "transformer,mac", "--isolate", "--steps", "2",
                            "--warmup", "1", timeout=240)  # fmt: skip
    assert set(doc["ceilings"]) == {"start", "end"}
    for section in ("transformer", "mac"):
        mine = rows(doc, section=section)
        assert mine and all(r["process"] == "own" for r in mine), section
        assert rows(doc, section=section, impl="nlc", status="ok"), section
    assert not rows(doc, status="error")
    assert "(its own process)" in out


def test_a_section_process_that_dies_keeps_its_rows(tmp_path, monkeypatch):
    """A child that ended badly (a CUDA error kills the process): the rows it saved are kept and
    an error row says how it ended."""
    import types

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import peers

    saved = {"rows": [{"section": "mac", "case": "c", "impl": "nlc", "variant": "eager", "status": "ok"}]}
    (tmp_path / "peers.json").write_text(json.dumps(saved))
    run = types.SimpleNamespace(rows=[], save=lambda: None)
    run.record = lambda *a, **f: run.rows.append(dict(zip(("section", "case", "impl", "variant", "status"), a), **f))
    peers.merge_child(run, "mac", tmp_path / "peers.json", -6)
    assert run.rows[0] == {**saved["rows"][0], "process": "own"}
    assert run.rows[1]["status"] == "error" and "status -6 after 1 rows" in run.rows[1]["reason"]
    run.rows.clear()
    peers.merge_child(run, "cms", tmp_path / "missing.json", "timeout")  # nothing saved at all
    assert len(run.rows) == 1 and "status timeout after 0 rows" in run.rows[0]["reason"]


def test_child_arguments_drop_what_the_parent_sets(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import peers

    argv = ["--sections", "mac,cms", "--isolate", "--out=/x", "--time-budget", "500", "--case", "T=4096",
            "--titans-scan", "plain", "--quick"]  # fmt: skip
    assert peers.child_argv(argv) == ["--case", "T=4096", "--titans-scan", "plain", "--quick"]
