"""benchmarks/hope_vs_tpp.py on the CPU at a tiny size: both models train through `nlc train` on
the same budget, at matched parameter counts, and the report says so."""

from __future__ import annotations

import json
import subprocess
import sys

from ..conftest import ROOT


def test_hope_vs_tpp_trains_both_at_matched_parameters(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "hope_vs_tpp.py"), "--device", "cpu", "--steps", "4",
           "--batch-size", "2", "--seq-len", "64", "--dims", "d=32,heads=2,layers=1", "--log-every", "2",
           "--eval-batches", "1", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((tmp_path / "hope_vs_tpp.json").read_text())
    rows = {row["model"]: row for row in doc["rows"]}
    assert set(rows) == {"hope", "transformer_pp"}
    hope, tpp = rows["hope"], rows["transformer_pp"]
    assert abs(hope["params"] - tpp["params"]) / hope["params"] < 0.10
    assert hope["dims"]["d"] == 32 and tpp["dims"]["d"] != 32  # the Transformer++ width was matched
    for row in rows.values():  # the same token budget, finished, with finite results
        assert row["steps"] == 4 and row["tokens"] == 4 * 2 * 64 and row["stop_reason"] == "done"
        assert row["val_loss"] > 0 and row["tokens_per_s"] > 0
    assert "| hope | " in (tmp_path / "hope_vs_tpp.md").read_text()


def test_hope_vs_tpp_refuses_unmatched_pairs(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "hope_vs_tpp.py"), "--device", "cpu", "--dims",
           "d=32,heads=2,layers=1", "--tpp-d", "8", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 2 and "differ by" in r.stderr
