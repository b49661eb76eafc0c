"""Streaming corpus readers: Pile .jsonl.zst, .jsonl, .txt, folders, the built-in corpus, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import zstandard

from gpunite.data import readers
from gpunite.data.errors import DataError
from gpunite.data.readers import ReadStats, iter_documents, iter_sources
from gpunite.errors import GpuniteError


def pile_lines(records: list[tuple[str, str]]) -> bytes:
    return b"".join(
        json.dumps({"text": text, "meta": {"pile_set_name": subset}}).encode() + b"\n"
        for text, subset in records
    )


def write_pile(path: Path, records: list[tuple[str, str]], frames: int = 1) -> Path:
    """A Pile-format .jsonl.zst; with frames > 1 the records are split over several zstd frames."""
    per_frame = -(-len(records) // frames)
    compressor = zstandard.ZstdCompressor(level=3)
    blob = b"".join(
        compressor.compress(pile_lines(records[i : i + per_frame])) for i in range(0, len(records), per_frame)
    )
    path.write_bytes(blob)
    return path


RECORDS = [(f"document {i} " + "word " * i, "Pile-CC" if i % 2 else "Github") for i in range(1, 41)]


def test_pile_zst_reads_every_record_across_frames(tmp_path):
    path = write_pile(tmp_path / "00.jsonl.zst", RECORDS, frames=3)
    stats = ReadStats()
    documents = list(iter_documents(path, stats=stats))
    assert documents == [text for text, _ in RECORDS]
    assert stats.documents == 40 and stats.files == 1
    assert stats.input_bytes == path.stat().st_size
    assert stats.text_bytes == sum(len(text.encode()) for text, _ in RECORDS)


def test_pile_subset_filter_keeps_only_listed_subsets(tmp_path):
    path = write_pile(tmp_path / "00.jsonl.zst", RECORDS)
    stats = ReadStats()
    documents = list(iter_documents(path, pile_subsets=["Github"], stats=stats))
    assert documents == [text for text, subset in RECORDS if subset == "Github"]
    assert stats.filtered_documents == 20


def test_jsonl_with_custom_text_field_and_blank_lines(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"body": "first"}\n\n{"body": "second \\u00e9", "other": 1}\n{"body": "third"}')
    assert list(iter_documents(path, text_field="body")) == ["first", "second \u00e9", "third"]


def test_txt_is_one_document_per_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("line one\n\nline two\n", encoding="utf-8")
    assert list(iter_documents(path)) == ["line one\n\nline two\n"]


def test_large_txt_splits_at_blank_lines_then_hard_cuts(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "TXT_SOFT_SPLIT_BYTES", 32)
    monkeypatch.setattr(readers, "TXT_HARD_SPLIT_BYTES", 64)
    path = tmp_path / "big.txt"
    paragraph = "a" * 20 + "\n" + "b" * 20 + "\n\n"
    path.write_text(paragraph * 3 + "c" * 200)
    pieces = list(iter_documents(path))
    assert "".join(pieces) == path.read_text()  # nothing lost, nothing reordered
    assert pieces[:3] == [paragraph] * 3
    assert all(len(piece.encode()) <= 64 for piece in pieces)


def test_folder_is_read_in_sorted_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("from b/2")
    (tmp_path / "a.jsonl").write_text('{"text": "from a"}\n')
    write_pile(tmp_path / "c.jsonl.zst", [("from c", "X")])
    (tmp_path / "notes.md").write_text("ignored: not a corpus file")
    (tmp_path / ".hidden.txt").write_text("ignored: hidden")
    stats = ReadStats()
    assert list(iter_documents(tmp_path, stats=stats)) == ["from a", "from b/2", "from c"]
    assert stats.files == 3


def test_builtin_corpus_is_capped_and_deterministic():
    stats = ReadStats()
    first = list(iter_documents("builtin:python-docs", stats=stats, max_builtin_mb=0.3))
    second = list(iter_documents("builtin:python-docs", max_builtin_mb=0.3))
    assert first == second and len(first) > 3
    assert 0 < stats.text_bytes <= 300_000
    assert any("def " in text for text in first) or any("statement" in text for text in first)


def test_several_sources_chain_in_order(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    (tmp_path / "y.txt").write_text("y")
    assert list(iter_sources([tmp_path / "y.txt", tmp_path / "x.txt"])) == ["y", "x"]


@pytest.mark.parametrize(
    "line, problem",
    [
        (b'{"text": "ok"', "bad JSON"),
        (b'{"content": "no text here"}', "no 'text' field"),
        (b'{"text": 42}', "must be a string, got int"),
        (b'["text"]', "expected a JSON object"),
        (b'{"text": "caf\xe9"}', "not valid UTF-8"),
        (b'{"text": "\\ud800"}', "lone surrogate"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n' + line + b'\n{"text": "after"}\n')
    with pytest.raises(DataError) as caught:
        list(iter_documents(path))
    message = str(caught.value)
    assert f"{path}:3:" in message and problem in message
    assert message.endswith("fix the line or pass --skip-bad-lines")
    assert isinstance(caught.value, GpuniteError) and "\n" not in message


def test_skip_bad_lines_counts_and_goes_on(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "one"}\nnot json\n{"x": 1}\n{"text": "two"}\n')
    stats = ReadStats()
    assert list(iter_documents(path, skip_bad_lines=True, stats=stats)) == ["one", "two"]
    assert stats.skipped_lines == 2
    assert stats.first_skip.startswith(f"{path}:2:")


def test_bad_line_inside_pile_zst_names_the_line(tmp_path):
    path = tmp_path / "00.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(pile_lines(RECORDS[:5]) + b"{broken\n"))
    with pytest.raises(DataError, match=rf"{path}:6: bad JSON"):
        list(iter_documents(path))


def test_truncated_zst_is_an_error_saying_where_it_stopped(tmp_path):
    rng = random.Random(7)  # varied text, so the frame holds several zstd blocks and half of it decodes
    records = [(" ".join(str(rng.random()) for _ in range(50)), "X") for _ in range(2000)]
    path = write_pile(tmp_path / "00.jsonl.zst", records)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"truncated \.zst: the stream stops after line \d+ \(\d+ bytes\)"):
        list(iter_documents(path))
    stats = ReadStats()
    kept = list(iter_documents(path, skip_bad_lines=True, stats=stats))
    assert 0 < len(kept) < len(records)
    assert kept == [text for text, _ in records[: len(kept)]]
    assert stats.truncated_files == 1 and stats.skipped_lines == 1


def test_corrupt_zst_is_a_data_error(tmp_path):
    path = tmp_path / "00.jsonl.zst"
    path.write_bytes(b"this is not zstd at all" * 10)
    with pytest.raises(DataError, match="not a valid zstandard stream"):
        list(iter_documents(path))


def test_bad_utf8_in_txt_names_the_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"good\nbad \xff\xfe here\nmore\n")
    with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8"):
        list(iter_documents(path))
    stats = ReadStats()
    assert list(iter_documents(path, skip_bad_lines=True, stats=stats)) == ["good\nmore\n"]
    assert stats.skipped_lines == 1


def test_missing_unsupported_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        list(iter_documents(tmp_path / "absent.jsonl"))
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        list(iter_documents(tmp_path / "data.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl.zst"):
        list(iter_documents(tmp_path / "empty"))
    with pytest.raises(DataError, match="unknown built-in corpus"):
        list(iter_documents("builtin:nope"))
