"""The package `nlc compile -o DIR` writes for a real spec: standalone train.py, bit-exact resume
with in-context levels, and optimizer levels equal to their torch counterparts."""

from __future__ import annotations

import subprocess
import sys

import torch

import nlc
from nlc.codegen import write_package

from ..codegen.helpers import shrink
from ..conftest import ROOT

FAST = ["--batch-size", "2", "--seq-len", "32", "--no-progress", "--eval-every", "0", "--eval-batches", "2",
        "--log-every", "1"]


def _package(tmp_path, name="hope"):
    spec = tmp_path / f"{name}.nl"
    spec.write_text(shrink((ROOT / "examples" / f"{name}.nl").read_text(), d=32, heads=2, layers=1))
    write_package(nlc.check(spec), tmp_path / "pkg")
    return tmp_path / "pkg"


def test_standalone_train_script_runs(tmp_path):
    pkg = _package(tmp_path)
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "train.py", "--steps", "3", "--out", "run", *FAST], cwd=pkg, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (pkg / "run" / "ckpt.pt").exists() and (pkg / "run" / "metrics.jsonl").exists()


def test_resume_is_bit_exact_with_in_context_levels(tmp_path):
    import importlib.util

    pkg = _package(tmp_path)
    spec = importlib.util.spec_from_file_location("_nlc_train_resume", pkg / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    assert train.main(["--steps", "6", "--out", str(tmp_path / "whole"), *FAST]) == 0
    assert train.main(["--steps", "6", "--stop-at", "3", "--out", str(tmp_path / "split"), *FAST]) == 0
    assert train.main(["--resume", "--out", str(tmp_path / "split"), "--no-progress"]) == 0
    a = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


MOMENTUM = (ROOT / "examples" / "momentum_sgd.nl").read_text()


def _sgd_pair(text, reference):
    Model = nlc.load(text)
    module = sys.modules[Model.__module__]
    torch.manual_seed(0)
    a = Model().double()
    b = Model().double()
    b.load_state_dict(a.state_dict())
    (opt_a,) = module.build_optimizers(a)
    opt_b = reference(b)
    idx = torch.randint(0, 256, (2, 17))
    for _ in range(8):
        for m, o in ((a, opt_a), (b, opt_b)):
            _, loss = m(idx[:, :-1], idx[:, 1:])
            loss.backward()
            o.step()
            o.zero_grad()
    return a, b


def _params_equal(a, b, tol=0.0):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert (p - q).abs().max().item() <= tol, n


def test_momentum_level_is_sgd_with_momentum():
    text = MOMENTUM

    def sgd(m):
        decay = [p for p in m.parameters() if p.ndim >= 2]
        rest = [p for p in m.parameters() if p.ndim < 2]
        return torch.optim.SGD([{"params": decay}, {"params": rest}], lr=0.05, momentum=0.9)

    a, b = _sgd_pair(text, sgd)
    _params_equal(a, b, tol=1e-12)


def test_adam_level_is_adamw():
    text = MOMENTUM.replace("""    state m : elementwise
    objective dot
    rule gd(lr = 0.05, decay = 0.9)""", """    state m, v : elementwise
    objective l2
    rule adam(lr = 0.01, beta1 = 0.9, beta2 = 0.99, eps = 1e-8, wd = 0.1)""")

    def adamw(m):
        decay = [p for p in m.parameters() if p.ndim >= 2]
        rest = [p for p in m.parameters() if p.ndim < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                 lr=0.01, betas=(0.9, 0.99), eps=1e-8)

    a, b = _sgd_pair(text, adamw)
    _params_equal(a, b, tol=1e-10)
