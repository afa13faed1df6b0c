"""nlc.runtime.tasks: LM, MQAR and continual task properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nlc.runtime.data import generator, load_corpus
from nlc.runtime.tasks import IGNORE_INDEX, ContinualTask, MQARTask, TaskError, make_task, mqar_batch


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_lm_targets_are_inputs_shifted(corpus):
    task = make_task("lm", model_vocab=256, seq_len=16, batch_size=4, seed=0, eval_batches=2, steps=10, corpus=corpus)
    x, y = task.train_batch(3)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert len(task.eval_batches()) == 2 and task.eval_batches() is task.eval_batches()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 40), st.sampled_from([16, 64, 256]), st.integers(0, 2**31))
def test_mqar_answers_are_recoverable_from_the_context(pairs, extra, vocab, seed):
    T = 4 * pairs + extra
    if pairs > vocab // 2 - 1:
        return
    x, y = mqar_batch(generator(seed), 3, T, pairs, vocab)
    assert x.shape == y.shape == (3, T)
    assert int(x.min()) >= 0 and int(x.max()) < vocab
    for b in range(3):
        keys, values = x[b, 0 : 2 * pairs : 2].tolist(), x[b, 1 : 2 * pairs : 2].tolist()
        assert len(set(keys)) == pairs and all(1 <= k < vocab // 2 for k in keys)
        assert all(vocab // 2 <= v < vocab for v in values)
        binding = dict(zip(keys, values))
        answers = (y[b] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(answers) == pairs  # each key is queried exactly once
        assert sorted(x[b, answers].tolist()) == sorted(keys)
        for p in answers:
            assert p >= 2 * pairs and (p - 2 * pairs) % 2 == 0
            assert binding[int(x[b, p])] == int(y[b, p])  # the answer is the value bound in the context


def test_mqar_determinism_and_fixed_eval_set():
    def task(seed):
        return MQARTask(vocab_size=64, num_pairs=4, seq_len=32, batch_size=4, seed=seed, eval_batches=2)

    a, b = task(1), task(1)
    assert all(torch.equal(u, v) for u, v in zip(a.train_batch(5), b.train_batch(5)))
    assert not torch.equal(a.train_batch(5)[0], a.train_batch(6)[0])
    assert not torch.equal(a.train_batch(5)[0], task(2).train_batch(5)[0])
    # The evaluation set does not depend on the training seed.
    assert all(torch.equal(u[0], v[0]) for u, v in zip(a.eval_batches(), task(2).eval_batches()))


def test_mqar_rejects_impossible_parameters():
    with pytest.raises(TaskError, match="too short") as e:
        MQARTask(vocab_size=64, num_pairs=8, seq_len=31, batch_size=2, seed=0, eval_batches=1)
    assert "--seq-len 32" in e.value.hint
    with pytest.raises(TaskError, match="distinct keys"):
        MQARTask(vocab_size=16, num_pairs=8, seq_len=64, batch_size=2, seed=0, eval_batches=1)
    with pytest.raises(TaskError, match="exceeds the model's vocabulary"):
        make_task("mqar", model_vocab=64, mqar_vocab=128, seq_len=64, batch_size=2, seed=0, eval_batches=1, steps=1)
    with pytest.raises(TaskError, match="vocabulary of 256"):
        make_task("lm", model_vocab=128, seq_len=64, batch_size=2, seed=0, eval_batches=1, steps=1, corpus=None)


def test_continual_perm_tasks_differ_and_follow_the_schedule(corpus):
    task = make_task("continual", model_vocab=256, seq_len=16, batch_size=4, seed=0, eval_batches=1, steps=30,
                     corpus=corpus, num_tasks=3)
    assert isinstance(task, ContinualTask) and task.steps_per_task == 10
    assert [task.task_at(s) for s in (0, 9, 10, 19, 20, 29, 45)] == [0, 0, 1, 1, 2, 2, 2]
    assert [task.phase_end(i) for i in range(3)] == [10, 20, 30]
    perms = [t.perm for t in task.tasks]
    assert torch.equal(perms[0], torch.arange(256))  # task 0 is the corpus itself
    assert all(sorted(p.tolist()) == list(range(256)) for p in perms)
    assert not torch.equal(perms[1], perms[2])
    evals = [task.eval_batches(j)[0][0] for j in range(3)]
    assert torch.equal(perms[1][evals[0]], evals[1])  # the same text in another "language"
    assert not torch.equal(evals[0], evals[1]) and not torch.equal(evals[1], evals[2])
    # Training batches come from the task of the current phase.
    x, _ = task.train_batch(12)
    assert torch.equal(x, task.tasks[1].train_batch(12)[0])


def test_continual_mqar_uses_disjoint_keys():
    task = make_task("continual", model_vocab=256, seq_len=64, batch_size=8, seed=0, eval_batches=1, steps=9,
                     continual_kind="mqar", num_tasks=3, mqar_pairs=8)
    key_sets = []
    for sub in task.tasks:
        x, _ = sub.train_batch(0)
        keys = set(x[:, 0:16:2].flatten().tolist())
        lo, hi = sub.key_range
        assert all(lo <= k < hi for k in keys)
        key_sets.append(set(range(lo, hi)))
    assert not (key_sets[0] & key_sets[1]) and not (key_sets[1] & key_sets[2])
    with pytest.raises(TaskError, match="distinct keys") as e:
        make_task("continual", model_vocab=64, seq_len=256, batch_size=2, seed=0, eval_batches=1, steps=9,
                  continual_kind="mqar", num_tasks=4, mqar_pairs=16)
    assert "fewer --num-tasks" in e.value.hint
