"""The rendered train.py, run next to the hand-written fixture model.py."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time

import jinja2
import pytest
import torch

from nlc.runtime.checkpoint import load_checkpoint

from .conftest import FAST, REPO, render_train, run_script, template_env


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---- the template ------------------------------------------------------------------------------


def test_template_needs_its_variables():
    template = template_env().get_template("train.py.j2")
    with pytest.raises(jinja2.UndefinedError):
        template.render(spec_name="x", spec_path="x.nl")
    with pytest.raises(jinja2.UndefinedError):
        template.render(spec_path="x.nl", defaults={"lr": 1e-3, "batch_size": 8, "seq_len": 64, "steps": 10})
    with pytest.raises(jinja2.UndefinedError):
        template.render(spec_name="x", spec_path="x.nl", defaults={"lr": 1e-3, "batch_size": 8, "seq_len": 64})


def test_spec_names_cannot_inject_code():
    nasty = 'x"\nimport os; os.system("echo pwned") #\'"""'
    source = render_train(spec_name=nasty, spec_path=nasty)
    tree = ast.parse(source)
    consts = {t.targets[0].id: t.value.value for t in tree.body
              if isinstance(t, ast.Assign) and isinstance(t.targets[0], ast.Name) and isinstance(t.value, ast.Constant)}
    assert consts["SPEC_NAME"] == nasty and consts["SPEC_PATH"] == nasty
    assert not any(isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "system" for n in ast.walk(tree))


def test_train_imports_only_torch_stdlib_and_nlc_runtime():
    tree = ast.parse(render_train())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.module == "nlc.runtime" or node.module.startswith("nlc.runtime.") or node.module.split(".")[0] != "nlc"
            roots.add(node.module.split(".")[0])
    stdlib = set(sys.stdlib_module_names)
    assert roots - stdlib <= {"torch", "nlc"}


# ---- standalone and in-process ---------------------------------------------------------------


def test_standalone_run_learns(run_dir):
    r = run_script(run_dir, "--steps", "30", "--out", "out", *FAST)
    assert r.returncode == 0, r.stderr
    out = run_dir / "out"
    recs = read_metrics(out)
    losses = [r["loss"] for r in recs if r["loss"] is not None]
    assert losses[-1] < losses[0] - 0.5, losses
    assert recs[-1]["step"] == 30 and recs[-1]["val_loss"] is not None and recs[-1]["tokens"] == 30 * 8 * 32
    assert set(recs[0]) >= {"step", "loss", "val_loss", "tokens", "tokens_per_s", "lr", "elapsed"}
    for name in ("ckpt.pt", "config.json", "final.json", "loss.svg"):
        assert (out / name).is_file(), name
    assert "val_loss" in r.stdout and "nlc train: spec fixture" in r.stderr
    assert load_checkpoint(out / "ckpt.pt")["step"] == 30


def test_in_process_main(run_dir, train_module, capsys):
    out = run_dir / "inproc"
    assert train_module.main(["--steps", "10", "--out", str(out), *FAST]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["step"] == 10 and final["stop_reason"] == "done" and "bpb" in final["val"]
    assert "val_loss" in capsys.readouterr().out


def test_help_exits_zero(train_module, capsys):
    assert train_module.main(["--help"]) == 0
    assert "--time-budget" in capsys.readouterr().out


# ---- resume --------------------------------------------------------------------------------------


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for oa, ob in zip(a["optimizers"], b["optimizers"]):
        for pid, sa in oa["state"].items():
            for key, va in sa.items():
                assert torch.equal(torch.as_tensor(va), torch.as_tensor(ob["state"][pid][key])), (pid, key)
    assert a["grads"].keys() == b["grads"].keys()
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_resume_is_bit_exact(run_dir, train_module):
    main = train_module.main
    args = ["--steps", "12", "--eval-every", "4", "--ckpt-every", "4", *FAST]
    assert main([*args, "--out", str(run_dir / "whole")]) == 0
    # Stop at an odd step: the period-2 optimizer has gradients pending in the checkpoint.
    assert main([*args, "--out", str(run_dir / "split"), "--stop-at", "5"]) == 0
    mid = load_checkpoint(run_dir / "split" / "ckpt.pt")
    assert mid["step"] == 5 and mid["grads"], "the period-2 level's accumulated gradients must be checkpointed"
    assert main(["--resume", "--out", str(run_dir / "split"), "--no-progress"]) == 0
    assert_same_state(load_checkpoint(run_dir / "whole" / "ckpt.pt"), load_checkpoint(run_dir / "split" / "ckpt.pt"))
    whole, split = read_metrics(run_dir / "whole"), read_metrics(run_dir / "split")
    assert [r["step"] for r in split] == [r["step"] for r in whole]  # no duplicated or lost records
    assert [r["loss"] for r in split] == [r["loss"] for r in whole]


def test_resume_warns_about_changed_trajectory_flags(run_dir, train_module, capsys):
    out = str(run_dir / "w")
    assert train_module.main(["--steps", "4", "--stop-at", "2", "--out", out, *FAST]) == 0
    capsys.readouterr()
    assert train_module.main(["--resume", "--lr", "0.01", "--out", out, *FAST]) == 0
    err = capsys.readouterr().err
    assert "warning: --resume with changed lr" in err
    assert json.loads((run_dir / "w" / "final.json").read_text())["step"] == 4  # --stop-at is not inherited


def test_existing_checkpoint_needs_resume_or_overwrite(run_dir, train_module, capsys):
    out = str(run_dir / "o")
    assert train_module.main(["--steps", "2", "--out", out, *FAST]) == 0
    capsys.readouterr()
    assert train_module.main(["--steps", "2", "--out", out, *FAST]) == 2
    assert "--resume" in one_line_error(capsys.readouterr().err)
    assert train_module.main(["--steps", "2", "--out", out, "--overwrite", *FAST]) == 0


# ---- errors: exit 2, one line, previous checkpoint intact -------------------------------------


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "many"], "invalid int value"),
    (["--bogus"], "unrecognized arguments"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--task", "poetry"], "invalid choice"),
    (["--time-budget", "soon"], "invalid duration"),
    (["--data", "/no/such/place"], "no such file or folder"),
    (["--task", "mqar", "--mqar-pairs", "20"], "too short"),
    (["--device", "tpu"], "--device"),
    (["--compile-scope", "everything"], "invalid choice"),
    (["--graph-scope", "layers"], "invalid choice"),
    (["--device", "cpu", "--cuda-graphs"], "needs a CUDA device"),
])
def test_bad_flags_exit_2_with_one_line(train_module, run_dir, capsys, argv, needle):
    assert train_module.main([*argv, "--out", str(run_dir / "bad"), *FAST]) == 2
    assert needle in one_line_error(capsys.readouterr().err)
    assert not (run_dir / "bad" / "ckpt.pt").exists()


def test_empty_data_folder_and_binary_file(train_module, run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train_module.main(["--data", str(tmp_path / "empty"), "--out", str(run_dir / "e"), *FAST]) == 2
    assert "no files" in one_line_error(capsys.readouterr().err)
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 10)
    assert train_module.main(["--data", str(tmp_path / "blob.bin"), "--out", str(run_dir / "b"), *FAST]) == 2
    assert "not UTF-8 text" in one_line_error(capsys.readouterr().err)


def test_ttl_needs_enough_validation_text_before_training(train_module, run_dir, tmp_path, capsys):
    (tmp_path / "small.txt").write_text("".join(f"sentence number {i} of a small file.\n" for i in range(500)))
    out = run_dir / "small"
    argv = ["--data", str(tmp_path / "small.txt"), "--ttl", "--batch-size", "64", "--seq-len", "32", "--out", str(out), *FAST]
    assert train_module.main(argv) == 2
    assert "validation bytes cannot hold 64 streams" in one_line_error(capsys.readouterr().err)
    assert not (out / "ckpt.pt").exists()


def test_corrupt_checkpoint_exit_2_and_left_alone(train_module, run_dir, capsys):
    out = run_dir / "c"
    assert train_module.main(["--steps", "3", "--out", str(out), *FAST]) == 0
    ckpt = out / "ckpt.pt"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])
    damaged = ckpt.read_bytes()
    capsys.readouterr()
    assert train_module.main(["--resume", "--out", str(out), "--steps", "6", *FAST]) == 2
    assert "corrupt or truncated" in one_line_error(capsys.readouterr().err)
    assert ckpt.read_bytes() == damaged


def test_missing_checkpoint_on_resume(train_module, run_dir, capsys):
    assert train_module.main(["--resume", "--out", str(run_dir / "nothing"), *FAST]) == 2
    assert "no checkpoint" in one_line_error(capsys.readouterr().err)


def test_resume_refuses_another_spec(run_dir, train_module, capsys):
    out = run_dir / "s"
    assert train_module.main(["--steps", "2", "--out", str(out), *FAST]) == 0
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    ck["spec"]["hash"] = "another-spec"
    torch.save(ck, out / "ckpt.pt")
    capsys.readouterr()
    assert train_module.main(["--resume", "--steps", "4", "--out", str(out), *FAST]) == 2
    assert "written for spec" in one_line_error(capsys.readouterr().err)


# ---- non-finite loss -----------------------------------------------------------------------------


def test_nonfinite_loss_names_the_level_and_keeps_the_checkpoint(run_dir, train_module, monkeypatch, capsys):
    # memo's state turns NaN in the forward of step 8 (0-based 7); the loss is read at step 10,
    # when the optimizers have already spread NaNs into every level: the replay must name memo only.
    monkeypatch.setenv("NLC_FIXTURE_NAN_AT", "7")
    out = run_dir / "nan"
    assert train_module.main(["--steps", "20", "--ckpt-every", "5", "--out", str(out), *FAST]) == 1
    message = one_line_error(capsys.readouterr().err.split("out " + str(out))[-1])
    assert "loss became non-finite at step 8" in message
    assert "levels with non-finite state: memo;" in message
    assert "(step 5)" in message
    ck = load_checkpoint(out / "ckpt.pt")
    assert ck["step"] == 5
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


# ---- tasks, time budget, test-time learning ------------------------------------------------------


def test_mqar_run_reports_accuracy(run_dir, train_module):
    out = run_dir / "mqar"
    assert train_module.main(["--task", "mqar", "--mqar-pairs", "4", "--steps", "6", "--out", str(out), *FAST]) == 0
    final = json.loads((out / "final.json").read_text())
    assert 0.0 <= final["val"]["acc"] <= 1.0
    assert "val_acc" in read_metrics(out)[-1]


def test_continual_run_fills_the_matrix(run_dir, train_module):
    out = run_dir / "cont"
    argv = ["--task", "continual", "--num-tasks", "3", "--steps", "9", "--out", str(out), *FAST]
    assert train_module.main(argv) == 0
    cont = json.loads((out / "continual.json").read_text())
    assert cont["steps_per_task"] == 3
    assert [len(row) for row in cont["matrix"]] == [3, 3, 3]
    assert set(cont["summary"]) >= {"final_loss", "final_bpb", "forgetting_loss", "backward_transfer"}
    assert [r.get("task") for r in read_metrics(out) if r["step"] in (3, 6, 9)] == [0, 1, 2]


def test_time_budget_stops_early_and_saves(run_dir, train_module):
    out = run_dir / "tb"
    assert train_module.main(["--steps", "100000", "--time-budget", "1.5s", "--out", str(out), *FAST]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["stop_reason"].startswith("time budget") and 0 < final["step"] < 100000
    assert load_checkpoint(out / "ckpt.pt")["step"] == final["step"]


def test_ttl_evaluation(run_dir, train_module):
    out = run_dir / "ttl"
    assert train_module.main(["--steps", "4", "--ttl", "--out", str(out), *FAST]) == 0
    (ttl,) = json.loads((out / "final.json").read_text())["ttl"]
    assert ttl["persisted"] and ttl["segments"] == 2
    # Segment 0 starts from a fresh memory in both modes; later segments differ when memory persists.
    assert ttl["ttl_by_segment"][0] == pytest.approx(ttl["reset_by_segment"][0])
    assert ttl["ttl_by_segment"][1] != ttl["reset_by_segment"][1]


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["full", "regional"])
def test_compiled_run(run_dir, scope):
    r = run_script(run_dir, "--steps", "6", "--compile", "--compile-scope", scope, "--out", f"compiled_{scope}", *FAST,
                   timeout=900)
    assert r.returncode == 0, r.stderr
    assert json.loads((run_dir / f"compiled_{scope}" / "config.json").read_text())["compile"] == scope


def test_ctrl_c_saves_a_checkpoint_and_exits_130(run_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "train.py", "--steps", "100000", "--out", "int", "--log-every", "1", "--eval-batches", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "int" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    step = load_checkpoint(run_dir / "int" / "ckpt.pt")["step"]
    assert 2 <= step < 100000 and read_metrics(run_dir / "int")[-1]["step"] == step
