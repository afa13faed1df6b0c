"""nlc.runtime.evaluate: losses, bpb, MQAR accuracy, TTL, continual summaries."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from nlc.runtime.data import load_corpus
from nlc.runtime.evaluate import continual_summary, evaluate_batches, evaluate_task, evaluate_ttl
from nlc.runtime.tasks import IGNORE_INDEX, MQARTask, make_task

from .conftest import FIXTURE_MODEL

CPU = torch.device("cpu")


def fixture_module():
    spec = importlib.util.spec_from_file_location("_nlc_eval_fixture_model", FIXTURE_MODEL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Uniform(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx, targets=None):
        return torch.zeros(*idx.shape, self.vocab), None


class MQAROracle(torch.nn.Module):
    """Answers each query by looking the key up in the context (first occurrence + 1)."""

    def __init__(self, vocab, pairs):
        super().__init__()
        self.vocab, self.pairs = vocab, pairs

    def forward(self, idx, targets=None):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            table = {int(idx[b, 2 * i]): int(idx[b, 2 * i + 1]) for i in range(self.pairs)}
            for t in range(T):
                logits[b, t, table.get(int(idx[b, t]), 0)] = 1.0
        return logits, None


def test_uniform_model_scores_log_vocab():
    x = torch.randint(0, 256, (2, 8))
    y = torch.randint(0, 256, (2, 8))
    y[0, :4] = IGNORE_INDEX
    r = evaluate_batches(Uniform(256), [(x, y)], CPU, metric="bpb")
    assert r["tokens"] == 12
    assert r["loss"] == pytest.approx(math.log(256)) and r["bpb"] == pytest.approx(8.0)


def test_loss_matches_cross_entropy_over_targets():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 16))

    def wrapped(idx):
        return model(idx), None

    batches = [(torch.randint(0, 16, (3, 5)), torch.randint(0, 16, (3, 5))) for _ in range(2)]
    r = evaluate_batches(model, batches, CPU, forward=wrapped, metric="acc")
    logits = torch.cat([model(x) for x, _ in batches]).reshape(-1, 16)
    targets = torch.cat([y for _, y in batches]).reshape(-1)
    assert r["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert r["acc"] == pytest.approx((logits.argmax(-1) == targets).float().mean().item())


def test_mqar_oracle_is_perfect_and_uniform_is_not():
    task = MQARTask(vocab_size=64, num_pairs=4, seq_len=32, batch_size=4, seed=0, eval_batches=2)
    assert evaluate_task(MQAROracle(64, 4), task, CPU)["acc"] == 1.0
    assert evaluate_task(Uniform(64), task, CPU)["acc"] < 0.2


@pytest.fixture(scope="module")
def fixture_model():
    m = fixture_module()
    torch.manual_seed(0)
    return m.Model(m.ModelConfig())


def test_evaluation_leaves_training_state_alone(fixture_model):
    model = fixture_model
    model.train()
    model.persist_memory = True
    model(torch.randint(0, 256, (2, 32)))
    memory = model.memory_state_dict()["memo.state"].clone()
    task = make_task("lm", model_vocab=256, seq_len=32, batch_size=2, seed=0, eval_batches=2, steps=1, corpus=load_corpus())
    rng = torch.get_rng_state()
    evaluate_task(model, task, CPU)
    evaluate_ttl(model, task, CPU)
    assert model.training and model.persist_memory
    assert torch.equal(model.memory_state_dict()["memo.state"], memory)
    assert torch.equal(torch.get_rng_state(), rng)
    model.persist_memory = False
    model.reset_memory()


def test_ttl_persists_memory_across_batches(fixture_model):
    task = make_task("lm", model_vocab=256, seq_len=32, batch_size=2, seed=0, eval_batches=3, steps=1, corpus=load_corpus())
    r = evaluate_ttl(fixture_model, task, CPU)
    assert r["segments"] == 3 and r["persisted"]
    assert r["ttl_by_segment"][0] == pytest.approx(r["reset_by_segment"][0])
    assert r["ttl_by_segment"][1] != pytest.approx(r["reset_by_segment"][1])
    assert r["ttl_gain"] == pytest.approx(r["reset_loss"] - r["ttl_loss"])
    assert {"ttl_bpb", "reset_bpb"} <= set(r)


def test_continual_summary():
    m = [[{"loss": 1.0, "acc": 0.9}, {"loss": 3.0, "acc": 0.1}],
         [{"loss": 2.0, "acc": 0.5}, {"loss": 1.5, "acc": 0.8}]]
    s = continual_summary(m, "acc")
    assert s["after_task"] == 1 and s["final_loss"] == pytest.approx(1.75) and s["final_acc"] == pytest.approx(0.65)
    assert s["forgetting_loss"] == {"0": pytest.approx(1.0)}
    assert s["backward_transfer"] == pytest.approx(-0.4)
    assert continual_summary([None, None], "acc") == {}
    partial = continual_summary([m[0], None], "acc")
    assert partial["after_task"] == 0 and "forgetting_loss" not in partial
