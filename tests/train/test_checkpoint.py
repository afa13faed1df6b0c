"""nlc.runtime.checkpoint: atomic writes, validation, restoring the training state."""

from __future__ import annotations

import os
import random

import pytest
import torch

from nlc.runtime import checkpoint as ck
from nlc.runtime.checkpoint import CheckpointError, build_checkpoint, load_checkpoint, restore_training_state, save_checkpoint


def tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opts = [torch.optim.AdamW(model[0].parameters(), lr=1e-2), torch.optim.SGD(model[1].parameters(), lr=1e-2, momentum=0.9)]
    return model, opts


def trained(steps=3):
    model, opts = tiny()
    for s in range(steps):
        model(torch.randn(5, 3)).square().mean().backward()
        opts[0].step()
        opts[0].zero_grad()
        if s % 2:
            opts[1].step()
            opts[1].zero_grad()
    return model, opts


def snapshot(model, opts, step=3, spec_hash="h1"):
    return build_checkpoint(model=model, optimizers=opts, periods=[1, 2], step=step,
                            spec={"name": "t", "path": "t.nl", "hash": spec_hash}, train_config={"lr": 1e-2},
                            model_config={"d": 4}, extra={"tokens": 12})


def test_roundtrip_restores_everything(tmp_path):
    model, opts = trained()
    assert model[1].weight.grad is not None  # period-2 optimizer has gradients pending
    random.seed(5)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, snapshot(model, opts))
    expected_next = torch.rand(3)
    expected_py = random.random()

    fresh, fresh_opts = tiny()
    loaded = load_checkpoint(path, spec_hash="h1")
    assert loaded["step"] == 3 and loaded["extra"] == {"tokens": 12} and loaded["optimizer_periods"] == [1, 2]
    torch.rand(7)  # disturb the RNGs
    random.random()
    restore_training_state(loaded, model=fresh, optimizers=fresh_opts, periods=[1, 2])
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(fresh[1].weight.grad, model[1].weight.grad)
    assert torch.equal(fresh_opts[1].state_dict()["state"][0]["momentum_buffer"], opts[1].state_dict()["state"][0]["momentum_buffer"])
    assert torch.equal(torch.rand(3), expected_next) and random.random() == expected_py
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model, opts = trained()
    save_checkpoint(path, snapshot(model, opts, step=3))
    good = path.read_bytes()

    def half_then_crash(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", half_then_crash)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, snapshot(model, opts, step=4))
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 3


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "corrupt or truncated"),
    (lambda b: b[:100], "corrupt or truncated"),
    (lambda b: b"", "corrupt or truncated"),
    (lambda b: b"not a checkpoint at all", "corrupt or truncated"),
])
def test_damaged_files_raise_checkpoint_error(tmp_path, damage, message):
    path = tmp_path / "ckpt.pt"
    model, opts = trained()
    save_checkpoint(path, snapshot(model, opts))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(path)
    assert e.value.hint


def test_wrong_files_and_specs(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an nlc checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    model, opts = trained()
    save_checkpoint(tmp_path / "ckpt.pt", snapshot(model, opts, spec_hash="spec-a"))
    with pytest.raises(CheckpointError, match="written for spec 't'"):
        load_checkpoint(tmp_path / "ckpt.pt", spec_hash="spec-b")
    newer = snapshot(model, opts)
    newer["version"] = ck.VERSION + 1
    save_checkpoint(tmp_path / "new.pt", newer)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(tmp_path / "new.pt")


def test_restore_into_another_model_is_a_checkpoint_error(tmp_path):
    model, opts = trained()
    save_checkpoint(tmp_path / "ckpt.pt", snapshot(model, opts))
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    other_opts = [torch.optim.AdamW(other[0].parameters()), torch.optim.SGD(other[1].parameters(), lr=0.1)]
    with pytest.raises(CheckpointError, match="does not fit this model"):
        restore_training_state(loaded, model=other, optimizers=other_opts, periods=[1, 2])
    with pytest.raises(CheckpointError, match="periods"):
        restore_training_state(loaded, model=model, optimizers=opts, periods=[1, 1])
