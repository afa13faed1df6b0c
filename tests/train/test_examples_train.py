"""Every example spec compiles to a model that trains: a few CPU steps with a falling loss,
through `nlc train` (the generated train.py run in-process) and `nlc eval` on its checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import nlc

from ..codegen.helpers import shrink
from ..conftest import EXAMPLES, ROOT


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_trains_with_falling_loss(path):
    text = shrink(path.read_text(), d=32, heads=2, layers=1)
    Model = nlc.load(text)
    module = __import__("sys").modules[Model.__module__]
    torch.manual_seed(0)
    model = Model()
    optimizers = module.build_optimizers(model)
    periods = module.optimizer_periods()
    gen = torch.Generator().manual_seed(0)
    # a learnable stream: a fixed random byte sequence, seen in random windows
    stream = torch.randint(0, 256, (4096,), generator=gen) % 48
    losses = []
    for step in range(30):
        starts = torch.randint(0, 4096 - 33, (8,), generator=gen)
        batch = torch.stack([stream[s:s + 33] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        for opt, period in zip(optimizers, periods):
            if (step + 1) % period == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses


def test_nlc_train_and_eval_end_to_end(tmp_path, run_cli):
    spec = tmp_path / "hope_tiny.nl"
    spec.write_text(shrink((ROOT / "examples" / "hope.nl").read_text(), d=32, heads=2, layers=1))
    out = tmp_path / "run"
    code, _, err = run_cli("train", spec, "--steps", "6", "--batch-size", "2", "--seq-len", "32",
                           "--out", out, "--no-progress", "--eval-every", "0", "--eval-batches", "2")
    assert code == 0, err
    for name in ("model.py", "train.py", "hope_tiny.nl", "ckpt.pt", "metrics.jsonl", "loss.svg"):
        assert (out / name).exists(), name
    code, text, err = run_cli("eval", out, "--format", "json", "--eval-batches", "2", "--ttl")
    assert code == 0, err
    report = json.loads(text)
    assert report["step"] == 6 and report["validation"]["bpb"] > 0 and "ttl_gain" in report["ttl"]


def test_nlc_train_rejects_an_invalid_spec(tmp_path, run_cli):
    spec = tmp_path / "bad.nl"
    spec.write_text("nl 1\nmodel m { dims { d = 4 } }\n")
    code, _, err = run_cli("train", spec, "--steps", "1", "--out", tmp_path / "run")
    assert code == 1 and "NL505" in err
    assert not (tmp_path / "run").exists()


def test_nlc_eval_errors_are_clear(tmp_path, run_cli):
    code, _, err = run_cli("eval", tmp_path / "nothing")
    assert code == 2 and "no checkpoint" in err and "Traceback" not in err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"not a checkpoint")
    code, _, err = run_cli("eval", tmp_path / "run")
    assert code == 2 and "model.py" in err


def test_data_and_checkpoint_errors_carry_their_codes(tmp_path, run_cli, capsys):
    spec = tmp_path / "hope_tiny.nl"
    spec.write_text(shrink((ROOT / "examples" / "hope.nl").read_text(), d=32, heads=2, layers=1))
    code, _, err = run_cli("train", spec, "--data", tmp_path / "missing.txt", "--out", tmp_path / "run")
    assert code == 2 and "NL902" in err + capsys.readouterr().err
    code, _, err = run_cli("eval", tmp_path / "nowhere")
    assert code == 2 and "NL903" in err
