"""Training tasks: byte-level language modelling, MQAR, and continual task sequences.

A task hands the training loop ``(x, y)`` pairs of int64 CPU tensors ``[B, T]``: ``x`` is the
model input and ``y`` the next-token targets. Positions that carry no target hold
:data:`IGNORE_INDEX` (-100, ``torch.nn.functional.cross_entropy``'s default ``ignore_index``),
so a model's mean cross-entropy over ``y`` is the loss over answer positions only.

Every batch is a pure function of ``(seed, step)``, and every evaluation set is fixed (it
does not depend on the training seed), so runs with different seeds are scored on the same
examples and a resumed run is bit-exact.

``lm``         bytes of a :class:`~nlc.runtime.data.Corpus` (vocabulary 256); metric: bits per byte.
``mqar``       multi-query associative recall (Zoology, Arora et al. 2023); metric: accuracy.
``continual``  a sequence of distinct tasks trained one after the other (``steps_per_task``
               each); the evaluation matrix ``M[i][j]`` (after task ``i``, on task ``j``)
               measures forgetting. Two kinds: ``perm`` (byte "languages": the corpus under
               fixed byte permutations; task 0 is the corpus itself) and ``mqar`` (MQAR with
               disjoint key sets).

MQAR layout (one sequence of ``T`` tokens, ``N`` pairs, vocabulary ``V``)::

    k1 v1 k2 v2 ... kN vN | f f k3 f f f k1 f ... f
    \\____ 2N tokens ____/   \\____ T - 2N tokens: queries among filler ____/

* keys: ``N`` distinct tokens from the key range (``[1, V//2)`` by default); values: ``N``
  distinct tokens from ``[V//2, V)``;
* each key is queried exactly once, at an even offset ``2g`` of the query region; the gap
  slots ``g`` are drawn without replacement with probability ∝ ``g**(power_a - 1)``
  (``power_a = 0.01`` favours short gaps, as in Zoology);
* every other position of the query region is filler drawn uniformly from ``[0, V)``
  (Zoology's ``random_non_queries``), so there is no marker announcing a query;
* the target at a query position is the key's value; every other target is ``IGNORE_INDEX``.
  Accuracy is argmax accuracy over the query positions.
"""

from __future__ import annotations

import torch

from .data import Corpus, DataError, generator, sample_windows, spread_windows, stream_windows

__all__ = [
    "IGNORE_INDEX",
    "ContinualTask",
    "LMTask",
    "MQARTask",
    "Task",
    "TaskError",
    "make_task",
    "mqar_batch",
]

IGNORE_INDEX = -100

# Streams of the seed mixer (data.mix_seed): keep training, evaluation and task identities apart.
_TRAIN, _EVAL, _PERM = 1, 2, 3
#: Fixed seed of evaluation sets and task identities (independent of the training seed).
EVAL_SEED = 0x5EED


class TaskError(ValueError):
    """Task parameters that cannot work together; ``hint`` says what to change."""

    code = "NL901"  # nlc's stable diagnostic code (docs/errors.md)

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class Task:
    """Interface of a training task (see the module docstring)."""

    name: str
    vocab_size: int  # tokens lie in [0, vocab_size)
    seq_len: int
    batch_size: int
    metric: str  # "bpb" (bits per byte) or "acc" (accuracy on target positions)
    num_tasks: int = 1

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def eval_batches(self, task: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed evaluation set (of sub-task ``task`` for continual), in batches of ``batch_size``."""
        raise NotImplementedError

    def stream_batches(self, task: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Batches for test-time learning: row ``b`` of batch ``s + 1`` continues row ``b`` of batch ``s``
        where the task has long streams (text); otherwise the evaluation set."""
        return self.eval_batches(task)

    def task_at(self, step: int) -> int:
        """Index of the sub-task trained at ``step`` (0 unless continual)."""
        return 0

    def describe(self) -> dict:
        raise NotImplementedError

    def summary(self) -> str:
        """One line for the training banner."""
        raise NotImplementedError


def _pairs(windows: torch.Tensor, perm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if perm is not None:
        windows = perm[windows]
    return windows[:, :-1], windows[:, 1:]


class LMTask(Task):
    """Next-byte prediction on a corpus, optionally under a fixed byte permutation (a "language")."""

    metric = "bpb"

    def __init__(self, corpus: Corpus, *, seq_len: int, batch_size: int, seed: int, eval_batches: int,
                 perm: torch.Tensor | None = None, name: str = "lm"):
        for split, data in (("train", corpus.train), ("validation", corpus.val)):
            if data.numel() < seq_len + 1:
                raise TaskError(
                    f"the {split} split has {data.numel()} bytes, fewer than one window of --seq-len {seq_len} + 1",
                    "use more text, or a smaller --seq-len",
                )
        self.name, self.corpus, self.perm = name, corpus, perm
        self.vocab_size, self.seq_len, self.batch_size = 256, seq_len, batch_size
        self.seed, self.num_eval = seed, eval_batches
        self._eval: list | None = None
        self._stream: list | None = None

    def train_batch(self, step):
        return _pairs(sample_windows(self.corpus.train, self.batch_size, self.seq_len, self.seed, step, _TRAIN), self.perm)

    def eval_batches(self, task=0):
        if self._eval is None:
            w = spread_windows(self.corpus.val, self.num_eval * self.batch_size, self.seq_len)
            self._eval = [_pairs(b, self.perm) for b in w.split(self.batch_size)]
        return self._eval

    def stream_batches(self, task=0):
        if self._stream is None:
            try:
                w = stream_windows(self.corpus.val, self.batch_size, self.seq_len, self.num_eval)
            except DataError as e:
                raise TaskError(str(e), e.hint) from None
            self._stream = [_pairs(b, self.perm) for b in w]
        return self._stream

    def describe(self):
        return {"task": self.name, "metric": self.metric, "seq_len": self.seq_len, "data": self.corpus.describe()}

    def summary(self):
        c = self.corpus
        return (f"{self.name}: next byte of {c.source} text, {c.nbytes / 1e6:.2f} MB ({c.train.numel() / 1e6:.2f} train / "
                f"{c.val.numel() / 1e6:.2f} validation, {len(c.documents)} documents, sha256 {c.fingerprint[:12]})")


def _distinct(gen: torch.Generator, rows: int, n: int, k: int) -> torch.Tensor:
    """``[rows, n]`` draws from ``range(k)``, distinct within a row, uniformly random in value and order."""
    if n * n > k:  # dense: top-n of i.i.d. uniforms, O(rows * k)
        return torch.rand(rows, k, generator=gen).topk(n, dim=1).indices
    # sparse (the usual MQAR case, e.g. 16 of 4096): redraw the rows with a repeat, O(rows * n)
    out = torch.randint(0, k, (rows, n), generator=gen)
    while True:
        ordered = out.sort(dim=1).values
        repeat = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if not repeat.any():
            return out
        out[repeat] = torch.randint(0, k, (int(repeat.sum()), n), generator=gen)


def mqar_batch(gen: torch.Generator, batch_size: int, seq_len: int, num_pairs: int, vocab_size: int,
               key_range: tuple[int, int] | None = None, power_a: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """One MQAR batch ``(x, y)`` drawn from ``gen`` (layout in the module docstring)."""
    B, T, N, V = batch_size, seq_len, num_pairs, vocab_size
    lo, hi = key_range or (1, V // 2)
    keys = _distinct(gen, B, N, hi - lo) + lo
    values = _distinct(gen, B, N, V - V // 2) + V // 2
    x = torch.randint(0, V, (B, T), generator=gen)
    x[:, 0 : 2 * N : 2] = keys
    x[:, 1 : 2 * N : 2] = values
    # N distinct gap slots drawn without replacement with p(g) ∝ g**(power_a - 1), in draw order:
    # the top N of p / E with E ~ Exp(1) (the Gumbel-top-k trick), exact and vectorised.
    space = (T - 2 * N) // 2
    p = torch.arange(1, space + 1, dtype=torch.float32) ** (power_a - 1)
    gaps = (p / torch.empty(B, space).exponential_(generator=gen)).topk(N, dim=1).indices
    where = 2 * N + 2 * gaps
    x.scatter_(1, where, keys)
    y = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    y.scatter_(1, where, values)
    return x, y


class MQARTask(Task):
    """Multi-query associative recall (Zoology-style), generated on the fly."""

    metric = "acc"

    def __init__(self, *, vocab_size: int, num_pairs: int, seq_len: int, batch_size: int, seed: int,
                 eval_batches: int, key_range: tuple[int, int] | None = None, power_a: float = 0.01,
                 name: str = "mqar", eval_stream: int = 0):
        lo, hi = key_range or (1, vocab_size // 2)
        if vocab_size < 4:
            raise TaskError(f"MQAR needs a vocabulary of at least 4 tokens, got {vocab_size}", "raise --mqar-vocab")
        if num_pairs < 1:
            raise TaskError(f"--mqar-pairs must be at least 1, got {num_pairs}")
        if num_pairs > min(hi - lo, vocab_size - vocab_size // 2):
            raise TaskError(
                f"{num_pairs} key-value pairs need {num_pairs} distinct keys and values, but the key range "
                f"[{lo}, {hi}) holds {hi - lo} and the value range [{vocab_size // 2}, {vocab_size}) holds {vocab_size - vocab_size // 2}",
                "use fewer --mqar-pairs (or fewer --num-tasks), or a larger --mqar-vocab",
            )
        if seq_len < 4 * num_pairs:
            raise TaskError(
                f"--seq-len {seq_len} is too short for {num_pairs} MQAR pairs: the pairs take {2 * num_pairs} tokens "
                f"and the queries at least as many again",
                f"use --seq-len {4 * num_pairs} or more, or --mqar-pairs {seq_len // 4} or fewer",
            )
        if not power_a > 0:
            raise TaskError(f"MQAR power_a must be positive, got {power_a}")
        self.name, self.vocab_size, self.num_pairs = name, vocab_size, num_pairs
        self.seq_len, self.batch_size, self.seed, self.num_eval = seq_len, batch_size, seed, eval_batches
        self.key_range, self.power_a, self.eval_stream = (lo, hi), power_a, eval_stream
        self._eval: list | None = None

    def _batch(self, gen):
        return mqar_batch(gen, self.batch_size, self.seq_len, self.num_pairs, self.vocab_size, self.key_range, self.power_a)

    def train_batch(self, step):
        return self._batch(generator(self.seed, _TRAIN, self.key_range[0], step))

    def eval_batches(self, task=0):
        if self._eval is None:
            self._eval = [self._batch(generator(EVAL_SEED, _EVAL, self.key_range[0], self.eval_stream, i))
                          for i in range(self.num_eval)]
        return self._eval

    def describe(self):
        return {"task": self.name, "metric": self.metric, "seq_len": self.seq_len, "vocab_size": self.vocab_size,
                "num_pairs": self.num_pairs, "key_range": list(self.key_range), "power_a": self.power_a}

    def summary(self):
        lo, hi = self.key_range
        return (f"{self.name}: {self.num_pairs} key-value pairs per sequence of {self.seq_len}, vocabulary {self.vocab_size}, "
                f"keys in [{lo}, {hi}), accuracy on the {self.num_pairs} query positions")


class ContinualTask(Task):
    """Sub-tasks trained in sequence: sub-task ``i`` for steps ``[i*S, (i+1)*S)``, the last one after that."""

    def __init__(self, tasks: list[Task], steps_per_task: int, kind: str):
        if len(tasks) < 2:
            raise TaskError(f"a continual run needs at least 2 tasks, got {len(tasks)}", "use --num-tasks 2 or more")
        if steps_per_task < 1:
            raise TaskError(f"steps per task must be at least 1, got {steps_per_task}", "raise --steps or --task-steps")
        first = tasks[0]
        self.tasks, self.steps_per_task, self.kind = tasks, steps_per_task, kind
        self.name, self.metric, self.num_tasks = "continual", first.metric, len(tasks)
        self.vocab_size = max(t.vocab_size for t in tasks)
        self.seq_len, self.batch_size = first.seq_len, first.batch_size

    def task_at(self, step):
        return min(step // self.steps_per_task, self.num_tasks - 1)

    def phase_end(self, task: int) -> int:
        """Number of completed steps at which sub-task ``task``'s phase ends."""
        return (task + 1) * self.steps_per_task

    def train_batch(self, step):
        return self.tasks[self.task_at(step)].train_batch(step)

    def eval_batches(self, task=0):
        return self.tasks[task].eval_batches()

    def stream_batches(self, task=0):
        return self.tasks[task].stream_batches()

    def describe(self):
        return {"task": "continual", "kind": self.kind, "metric": self.metric, "num_tasks": self.num_tasks,
                "steps_per_task": self.steps_per_task, "tasks": [t.describe() for t in self.tasks]}

    def summary(self):
        return (f"continual ({self.kind}): {self.num_tasks} tasks x {self.steps_per_task} steps, "
                f"evaluated on every task after each; task 0 = {self.tasks[0].summary()}")


def byte_permutations(num: int) -> list[torch.Tensor]:
    """``num`` fixed byte permutations: the identity, then random ones (seeded by :data:`EVAL_SEED`)."""
    perms = [torch.arange(256)]
    perms += [torch.randperm(256, generator=generator(EVAL_SEED, _PERM, j)) for j in range(1, num)]
    return perms


def make_task(kind: str, *, model_vocab: int, seq_len: int, batch_size: int, seed: int, eval_batches: int,
              steps: int, corpus: Corpus | None = None, mqar_pairs: int = 8, mqar_vocab: int | None = None,
              continual_kind: str = "perm", num_tasks: int = 3, task_steps: int | None = None) -> Task:
    """Build the task named by ``--task`` (``corpus`` is needed for ``lm`` and ``continual`` ``perm``)."""

    vocab = model_vocab if mqar_vocab is None else mqar_vocab  # of MQAR tasks

    def lm(perm=None, name="lm"):
        if model_vocab < 256:
            raise TaskError(f"byte-level text needs a vocabulary of 256, the model has {model_vocab}",
                            "use --task mqar, or a spec with vocab = 256")
        assert corpus is not None, "make_task: corpus needed for text tasks"
        return LMTask(corpus, seq_len=seq_len, batch_size=batch_size, seed=seed, eval_batches=eval_batches, perm=perm, name=name)

    def mqar(key_range=None, name="mqar", stream=0):
        if vocab > model_vocab:
            raise TaskError(f"--mqar-vocab {vocab} exceeds the model's vocabulary of {model_vocab}",
                            f"use --mqar-vocab {model_vocab} or less")
        return MQARTask(vocab_size=vocab, num_pairs=mqar_pairs, seq_len=seq_len, batch_size=batch_size, seed=seed,
                        eval_batches=eval_batches, key_range=key_range, name=name, eval_stream=stream)

    if kind == "lm":
        return lm()
    if kind == "mqar":
        return mqar()
    if kind == "continual":
        if num_tasks < 2:
            raise TaskError(f"--num-tasks must be at least 2 for continual, got {num_tasks}")
        per_task = task_steps if task_steps is not None else steps // num_tasks
        if per_task < 1:
            raise TaskError(f"--steps {steps} leaves no step for each of {num_tasks} tasks",
                            f"use --steps {num_tasks} or more, or --task-steps")
        if continual_kind == "perm":
            tasks = [lm(p, f"lang{j}") for j, p in enumerate(byte_permutations(num_tasks))]
        elif continual_kind == "mqar":
            width = (vocab // 2 - 1) // num_tasks
            tasks = [mqar((1 + j * width, 1 + (j + 1) * width), f"keys{j}", j) for j in range(num_tasks)]
        else:
            raise TaskError(f"unknown continual kind {continual_kind!r}", "use perm or mqar")
        return ContinualTask(tasks, per_task, continual_kind)
    raise TaskError(f"unknown task {kind!r}", "use lm, mqar or continual")
