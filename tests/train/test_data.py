"""nlc.runtime.data: the embedded corpus, --data sources, the split, deterministic sampling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nlc.runtime.data import (
    DEFAULT_MODULES,
    DataError,
    default_corpus_documents,
    load_corpus,
    read_text_documents,
    sample_windows,
    split_spans,
    spread_windows,
    stream_windows,
)


def test_embedded_corpus_is_fixed_and_sizeable():
    a, b = load_corpus(), load_corpus()
    assert a.fingerprint == b.fingerprint and torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.source == "embedded" and a.skipped == []
    assert 2_000_000 < a.nbytes < 8_000_000
    assert a.documents == ["pydoc_data.topics", *(f"{m}.py" for m in DEFAULT_MODULES)]
    assert list(DEFAULT_MODULES) == sorted(DEFAULT_MODULES)
    docs, _ = default_corpus_documents()
    assert docs[0][1].decode("utf-8").startswith(min(__import__("pydoc_data.topics").topics.topics))


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=3_000_000))
def test_split_covers_everything_once_and_interleaves(n):
    spans = split_spans(n)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    val = sum(e - s for s, e, v in spans if v)
    if len(spans) >= 20:
        assert 0.05 < val / n < 0.15
        first_val = next(i for i, (_, _, v) in enumerate(spans) if v)
        assert first_val < len(spans) // 2  # held-out text is spread out, not the tail


def test_train_and_val_are_disjoint_parts_of_the_corpus(tmp_path):
    text = "".join(f"line {i:05d} of the test corpus\n" for i in range(2000)).encode()
    (tmp_path / "a.txt").write_bytes(text)
    c = load_corpus(tmp_path / "a.txt")
    spans = split_spans(len(text))
    train = b"".join(text[s:e] for s, e, v in spans if not v)
    val = b"".join(text[s:e] for s, e, v in spans if v)
    assert bytes(c.train.tolist()) == train and bytes(c.val.tolist()) == val
    assert len(train) + len(val) == len(text)
    # Every line lies in one split only (unless cut by a shard boundary).
    train_lines = set(train.decode().splitlines()[1:-1])
    val_lines = set(val.decode().splitlines())
    assert not (train_lines & {v for v in val_lines if len(v) == len("line 00000 of the test corpus")})


def test_batches_are_a_function_of_seed_and_step():
    c = load_corpus()
    a = sample_windows(c.train, 4, 16, seed=1, step=7)
    assert a.shape == (4, 17) and a.dtype == torch.long
    assert torch.equal(a, sample_windows(c.train, 4, 16, seed=1, step=7))
    assert not torch.equal(a, sample_windows(c.train, 4, 16, seed=1, step=8))
    assert not torch.equal(a, sample_windows(c.train, 4, 16, seed=2, step=7))
    blob = bytes(c.train.tolist())
    for row in a.tolist():
        assert bytes(row) in blob


def test_spread_and_stream_windows():
    data = torch.arange(1000) % 256
    data = data.to(torch.uint8)
    w = spread_windows(data, 10, 15)
    assert w.shape == (10, 16) and w[0, 0] == 0 and int(w[-1, -1]) == int(data[-1])
    batches = stream_windows(data, 4, 20, segments=100)
    assert len(batches) == (1000 // 4 - 1) // 20
    for s in range(len(batches) - 1):  # row b of batch s + 1 continues row b of batch s
        assert torch.equal(batches[s][:, -1], batches[s + 1][:, 0])


def test_data_folder_sorted_hidden_and_binary_skipped(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zzz")
    (tmp_path / "a.md").write_text("aaa\n")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git" / "config").write_text("git")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    docs, skipped = read_text_documents(tmp_path)
    assert [name for name, _ in docs] == ["a.md", "b/z.txt"]
    assert skipped == ["img.png", "latin1.txt"]


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder") as e:
        load_corpus(tmp_path / "missing")
    assert e.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\x00\xff")
    with pytest.raises(DataError, match="none of them UTF-8 text"):
        load_corpus(tmp_path / "bin")
    (tmp_path / "one.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_corpus(tmp_path / "one.bin")
    (tmp_path / "tiny.txt").write_text("hello world\n")
    with pytest.raises(DataError, match="too small"):
        load_corpus(tmp_path / "tiny.txt", min_split_bytes=65)
