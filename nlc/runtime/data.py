"""Byte-level text corpora for training: the embedded default and the user's ``--data``.

Everything here is deterministic, so a training run can be resumed bit-exactly:

* A corpus is a byte string (vocabulary 256: every byte is a token).
* The train/validation split is a pure function of the corpus bytes (:func:`split_spans`).
* Training batches are a pure function of ``(seed, step)`` (:func:`sample_windows`); nothing
  is carried from one step to the next, so nothing about the data needs checkpointing.
* Under data parallelism the batch of a step is still the *global* batch, the same for any
  number of ranks; rank ``r`` of ``W`` trains on the contiguous block of rows
  :func:`shard_rows` gives it, so the ranks' rows never overlap and together cover the batch.

The embedded default corpus
---------------------------
nlc trains out of the box with nothing to download. The default corpus is text that every
CPython installation ships (3.10 and later were checked):

1. ``pydoc_data.topics``: the Python language reference and library topics as plain English
   (~0.47 MB), topics in sorted order, each as ``name``, an underline and the text;
2. the source of a fixed, sorted list of pure-Python standard-library modules
   (:data:`DEFAULT_MODULES`, ~3.1 MB): code with its docstrings and comments.

About 3.6 MB in all (3x tiny Shakespeare). The exact bytes depend on the Python version (the
standard library changes between releases), so every run records the corpus's SHA-256
fingerprint; a resumed run warns when it differs. Pieces missing from a stripped-down
installation are skipped and listed; if less than :data:`MIN_DEFAULT_BYTES` remain, loading
fails and asks for ``--data``. Nothing is cached on disk.

``--data PATH``
---------------
A text file, or a folder searched recursively. Files are taken in sorted order of their
relative POSIX path; names starting with ``.`` (files and folders, e.g. ``.git``) are
skipped, and links to folders are not followed. Every file must be UTF-8 text without NUL
bytes: a single file that is not is an error; in a folder such files (and unreadable ones)
are skipped, counted and listed (``Corpus.skipped``), empty files are ignored, and a folder
with no text file at all is an error. The corpus is the files' raw bytes, each followed by a
newline if it does not end with one, held in memory.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_MODULES",
    "MIN_DEFAULT_BYTES",
    "VAL_FRACTION",
    "Corpus",
    "DataError",
    "default_corpus_documents",
    "generator",
    "load_corpus",
    "mix_seed",
    "read_text_documents",
    "sample_windows",
    "shard_rows",
    "split_spans",
    "spread_windows",
    "stream_windows",
]

#: Standard-library modules whose source forms the default corpus (single files present in
#: CPython 3.10-3.13; sorted; read from ``sysconfig.get_paths()["stdlib"]``).
DEFAULT_MODULES: tuple[str, ...] = tuple(sorted("""
    _pydecimal _pyio argparse ast bdb calendar cmd code configparser contextlib copy csv
    dataclasses difflib dis doctest enum fractions ftplib functools gettext glob gzip heapq
    hmac imaplib inspect ipaddress locale mailbox netrc numbers optparse pdb pickle pickletools
    platform poplib pprint pstats pydoc queue random sched secrets selectors shlex shutil
    smtplib socket socketserver ssl statistics string subprocess tarfile tempfile textwrap
    threading timeit tokenize traceback types typing uuid warnings weakref zipapp
""".split()))

#: Below this many bytes the embedded corpus is considered unusable (stripped installation).
MIN_DEFAULT_BYTES = 256 * 1024

#: Fraction of the corpus held out for validation.
VAL_FRACTION = 0.1

_MASK63 = (1 << 63) - 1


class DataError(ValueError):
    """A data source that cannot be used; ``hint`` says what to do about it."""

    code = "NL902"  # nlc's stable diagnostic code (docs/errors.md)

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


# --------------------------------------------------------------------------------------------
# Sources


def default_corpus_documents() -> tuple[list[tuple[str, bytes]], list[str]]:
    """The embedded default corpus as ``(name, bytes)`` documents, plus the names of missing pieces."""
    docs: list[tuple[str, bytes]] = []
    missing: list[str] = []
    try:
        from pydoc_data.topics import topics  # the language reference as plain text
    except ImportError:
        missing.append("pydoc_data.topics")
    else:
        text = "".join(f"{key}\n{'=' * len(key)}\n{topics[key].rstrip()}\n\n" for key in sorted(topics))
        docs.append(("pydoc_data.topics", text.encode("utf-8")))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for module in DEFAULT_MODULES:
        try:
            docs.append((f"{module}.py", (stdlib / f"{module}.py").read_bytes()))
        except OSError:
            missing.append(f"{module}.py")
    return docs, missing


def _read_text(path: Path) -> bytes | None:
    """The file's bytes if it is UTF-8 text without NUL bytes, else None (binaries are usually
    recognised from their first 8 KiB, without reading the rest)."""
    with open(path, "rb") as f:
        head = f.read(8192)
        if b"\x00" in head:
            return None
        raw = head + f.read()
    if b"\x00" in raw:
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return raw


def read_text_documents(path: str | os.PathLike) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Documents of a ``--data`` path (file or folder), plus the skipped non-text files.

    Raises :class:`DataError` for a missing path, an unreadable or non-text single file, and a
    folder without any text file.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"--data {path}: no such file or folder", "check the path, or omit --data to use the embedded corpus")
    if root.is_file():
        try:
            raw = _read_text(root)
        except OSError as e:
            raise DataError(f"--data {path}: cannot read: {e.strerror or e}", "check the file's permissions") from None
        if raw is None:
            raise DataError(
                f"--data {path}: not UTF-8 text (binary or another encoding)",
                "convert it to UTF-8 (e.g. iconv -t UTF-8), or pass a folder to skip such files",
            )
        if not raw:
            raise DataError(f"--data {path}: the file is empty", "pass a file with text in it")
        return [(root.name, raw)], []
    if not root.is_dir():
        raise DataError(f"--data {path}: neither a regular file nor a folder", "pass a text file or a folder of text files")

    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                full = Path(dirpath) / name
                files.append((full.relative_to(root).as_posix(), full))
    files.sort()
    docs: list[tuple[str, bytes]] = []
    skipped: list[str] = []
    for rel, full in files:
        try:
            raw = _read_text(full)
        except OSError:
            raw = None
        if raw is None:
            skipped.append(rel)
        elif raw:
            docs.append((rel, raw))
    if not docs:
        what = f"{len(files)} file(s), none of them UTF-8 text" if files else "no files"
        raise DataError(f"--data {path}: the folder has {what}", "pass a folder holding .txt/.md/source files in UTF-8")
    return docs, skipped


# --------------------------------------------------------------------------------------------
# Corpus and split


def split_spans(n: int, val_fraction: float = VAL_FRACTION) -> list[tuple[int, int, bool]]:
    """Cut ``n`` bytes into shards and mark which go to validation: ``[(start, end, is_val)]``.

    Shards are ``clamp(n // 200, 64, 65536)`` bytes, so even a small corpus has ~200 of them;
    shard ``i`` is validation iff ``floor((i+1)*f) > floor(i*f)`` (every 10th shard for
    f = 0.1), which spreads the held-out text evenly over the corpus instead of holding out its
    tail (a single document). The split depends only on ``n``.
    """
    shard = min(65536, max(64, n // 200))
    spans = []
    for i, start in enumerate(range(0, n, shard)):
        is_val = int((i + 1) * val_fraction) > int(i * val_fraction)
        spans.append((start, min(start + shard, n), is_val))
    return spans


@dataclass(frozen=True)
class Corpus:
    """A byte corpus split into train and validation bytes (uint8 CPU tensors)."""

    source: str  # "embedded" or the --data path
    train: torch.Tensor
    val: torch.Tensor
    documents: list[str]
    skipped: list[str] = field(default_factory=list)
    fingerprint: str = ""  # SHA-256 of the whole corpus (before the split)

    @property
    def nbytes(self) -> int:
        return int(self.train.numel() + self.val.numel())

    def describe(self) -> dict:
        return {
            "source": self.source,
            "bytes": self.nbytes,
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
            "documents": len(self.documents),
            "skipped": len(self.skipped),
            "sha256": self.fingerprint,
        }


def load_corpus(path: str | os.PathLike | None = None, *, min_split_bytes: int = 2) -> Corpus:
    """Load ``--data PATH`` (or the embedded default when ``path`` is None) and split it.

    ``min_split_bytes``: both splits must hold at least this many bytes (a training window is
    ``seq_len + 1`` bytes), else :class:`DataError`.
    """
    if path is None:
        docs, missing = default_corpus_documents()
        source = "embedded"
        if sum(len(raw) for _, raw in docs) < MIN_DEFAULT_BYTES:
            raise DataError(
                "the embedded corpus is unavailable: this Python installation lacks "
                f"{len(missing)} of its pieces (e.g. {', '.join(missing[:3])})",
                "pass --data PATH with a text file or a folder of text files",
            )
    else:
        docs, missing = read_text_documents(path)
        source = os.fspath(path)
    parts = []
    for _, raw in docs:
        parts.append(raw)
        if not raw.endswith(b"\n"):
            parts.append(b"\n")
    blob = b"".join(parts)
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    spans = split_spans(len(blob))
    train, val = (torch.cat([data[a:b] for a, b, v in spans if v == held_out] or [data[:0]]) for held_out in (False, True))
    if min(train.numel(), val.numel()) < min_split_bytes:
        raise DataError(
            f"{'the embedded corpus' if path is None else '--data ' + source} has {len(blob)} bytes: "
            f"too small for windows of {min_split_bytes} bytes in both the train and the validation split "
            f"(validation gets {VAL_FRACTION:.0%})",
            "use more text, or a smaller --seq-len",
        )
    return Corpus(
        source=source,
        train=train,
        val=val,
        documents=[name for name, _ in docs],
        skipped=missing,
        fingerprint=hashlib.sha256(blob).hexdigest(),
    )


# --------------------------------------------------------------------------------------------
# Sampling


def mix_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 chain): stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15
        h &= 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _MASK63


def generator(*values: int) -> torch.Generator:
    """A CPU generator seeded with :func:`mix_seed` of ``values``."""
    return torch.Generator().manual_seed(mix_seed(*values))


def sample_windows(data: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int, stream: int = 0) -> torch.Tensor:
    """``[batch_size, seq_len + 1]`` int64 windows at random offsets: a pure function of
    ``(data, seed, step, stream)``, so a resumed run draws exactly the batches it would have."""
    n = data.numel()
    if n < seq_len + 1:
        raise DataError(f"{n} bytes cannot hold a window of {seq_len + 1}", "use more text or a smaller --seq-len")
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=generator(seed, stream, step))
    return data[starts[:, None] + torch.arange(seq_len + 1)].long()


def spread_windows(data: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """``[count, seq_len + 1]`` windows at evenly spaced offsets covering ``data`` (no randomness).

    They do not overlap when ``data`` holds ``count * (seq_len + 1)`` bytes or more."""
    n = data.numel()
    if n < seq_len + 1:
        raise DataError(f"{n} bytes cannot hold a window of {seq_len + 1}", "use more text or a smaller --seq-len")
    last = n - seq_len - 1
    starts = torch.tensor([(i * last) // max(count - 1, 1) for i in range(count)], dtype=torch.long)
    return data[starts[:, None] + torch.arange(seq_len + 1)].long()


def stream_windows(data: torch.Tensor, batch_size: int, seq_len: int, segments: int) -> list[torch.Tensor]:
    """Consecutive windows for test-time learning: ``data`` is cut into ``batch_size`` contiguous
    streams; batch ``s`` holds segment ``s`` of every stream, so row ``b`` of batch ``s + 1``
    continues row ``b`` of batch ``s`` (each ``[batch_size, seq_len + 1]``, sharing one byte)."""
    per_row = data.numel() // batch_size
    segments = min(segments, (per_row - 1) // seq_len)
    if segments < 1:
        raise DataError(
            f"{data.numel()} validation bytes cannot hold {batch_size} streams of {seq_len + 1} bytes",
            "use more text, or a smaller --batch-size / --seq-len",
        )
    base = torch.arange(batch_size)[:, None] * per_row + torch.arange(seq_len + 1)
    return [data[base + s * seq_len].long() for s in range(segments)]


def shard_rows(batch_size: int, rank: int, world: int) -> slice:
    """Rows ``[rank·b, (rank+1)·b)`` with ``b = batch_size / world``: rank ``rank``'s block of a
    global batch (training, evaluation and test-time-learning streams alike).

    Contiguous blocks keep row ``i`` of every batch on the same rank, which is what persisted
    per-sequence memory (``reset never``, test-time learning streams) needs. Raises
    :class:`DataError` when the batch does not split evenly.
    """
    if world < 1 or not 0 <= rank < world:
        raise DataError(f"bad world size: rank {rank} of {world}", "launch with torchrun or nlc train --nproc")
    if batch_size % world:
        raise DataError(
            f"--batch-size {batch_size} (the global batch) does not split over {world} ranks",
            f"use a multiple of {world}, e.g. --batch-size {max(world, batch_size // world * world)}",
        )
    b = batch_size // world
    return slice(rank * b, (rank + 1) * b)
