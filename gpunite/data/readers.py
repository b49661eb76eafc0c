"""Streaming corpus readers: document texts from Pile .jsonl.zst, .jsonl and .txt files, folders and builtins.

Every reader streams: memory holds one compressed chunk, one line (or one .txt piece) at a time, never a
whole file. Order is deterministic (folders are walked in sorted path order), so the same sources always
give the same documents in the same order.

Formats:
- ``.jsonl.zst`` (The Pile): zstandard-compressed lines of ``{"text": ..., "meta": {"pile_set_name": ...}}``.
  Multi-frame files are read across frames; a file that ends inside a frame is reported as truncated.
- ``.jsonl``: one JSON object per line; the text lives in ``text_field``. Blank lines are ignored.
- ``.txt``: one document per file. A file piece that has grown past ``TXT_SOFT_SPLIT_BYTES`` ends at the next
  blank line, and no piece exceeds ``TXT_HARD_SPLIT_BYTES`` (cut at a line end, or inside a longer line), so a
  multi-GB text file streams in bounded memory; pieces are separated like documents.
- a folder: every ``.jsonl.zst``, ``.jsonl`` and ``.txt`` file below it (hidden ones skipped), sorted by path.
- ``builtin:python-docs``: see :mod:`gpunite.data.builtin`.

With ``finetune`` (a run of kind finetune), a JSON line may also be a prompt/completion or chat record; see
:mod:`gpunite.data.finetune` for how it becomes a document.

The pile subset filter applies to every JSON record: with ``pile_subsets`` set, only records whose
``meta.pile_set_name`` is listed are kept (others are counted as filtered).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gpunite.data.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl.zst", ".jsonl", ".txt")
TXT_SOFT_SPLIT_BYTES = 1 << 20
TXT_HARD_SPLIT_BYTES = 8 << 20
# Compressed bytes fed to zstd per call: small, so even a very compressible frame inflates to a bounded chunk.
ZSTD_INPUT_CHUNK_BYTES = 32 << 10
PLAIN_READ_CHUNK_BYTES = 1 << 20
SKIP_HINT = "fix the line or pass --skip-bad-lines"


@dataclass
class ReadStats:
    """What a read pass saw; readers add to it as they go (a progress display may read it meanwhile)."""

    files: int = 0
    documents: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the yielded texts
    input_bytes: int = 0  # bytes consumed from the sources (compressed bytes for .zst)
    skipped_lines: int = 0
    filtered_documents: int = 0  # records dropped by the pile subset filter
    truncated_files: int = 0
    first_skip: str | None = None  # the first problem skipped, to show the user what was dropped

    def note_skip(self, problem: str) -> None:
        self.skipped_lines += 1
        if self.first_skip is None:
            self.first_skip = problem


def source_kind(path: Path) -> str | None:
    """The format of a corpus file by its name (one of SUPPORTED_SUFFIXES), or None if it is not one."""
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def corpus_files(folder: Path) -> list[Path]:
    """Corpus files below a folder, in a deterministic order (sorted relative POSIX paths)."""
    found = [
        path
        for path in folder.rglob("*")
        if path.is_file()
        and source_kind(path) is not None
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def source_input_bytes(source: str | Path, max_builtin_mb: float = 8.0) -> int:
    """Bytes a read of this source will consume (compressed size for .zst): the total for a progress bar."""
    text = str(source)
    if text.startswith("builtin:"):
        return int(max_builtin_mb * 1_000_000)
    path = Path(source)
    if path.is_dir():
        return sum(file.stat().st_size for file in corpus_files(path))
    return path.stat().st_size if path.exists() else 0


def iter_sources(
    sources: Iterable[str | Path],
    text_field: str = "text",
    pile_subsets: Iterable[str] = (),
    skip_bad_lines: bool = False,
    stats: ReadStats | None = None,
    max_builtin_mb: float = 8.0,
    finetune: bool = False,
) -> Iterator[str]:
    """Documents of several sources, one source after the other."""
    for source in sources:
        yield from iter_documents(
            source, text_field, pile_subsets, skip_bad_lines, stats, max_builtin_mb, finetune
        )


def iter_documents(
    source: str | Path,
    text_field: str = "text",
    pile_subsets: Iterable[str] = (),
    skip_bad_lines: bool = False,
    stats: ReadStats | None = None,
    max_builtin_mb: float = 8.0,
    finetune: bool = False,
) -> Iterator[str]:
    """Yield the non-empty document texts of one source: a corpus file, a folder of them, or a builtin corpus.

    Bad input raises DataError naming the file and line; with skip_bad_lines the line is counted in
    ``stats.skipped_lines`` and reading goes on (a truncated .zst then keeps what was read and counts the file
    in ``stats.truncated_files``).
    """
    stats = stats if stats is not None else ReadStats()
    subsets = frozenset(pile_subsets)
    text = str(source)
    if text.startswith("builtin:"):
        from gpunite.data.builtin import iter_builtin

        yield from iter_builtin(text, max_builtin_mb, stats)
        return
    path = Path(source)
    if path.is_dir():
        files = corpus_files(path)
        if not files:
            raise DataError(
                f"{path}: folder holds no .jsonl.zst, .jsonl or .txt files; add some or fix data.sources"
            )
    elif path.is_file():
        if source_kind(path) is None:
            raise DataError(f"{path}: unsupported file type; use .jsonl.zst (Pile), .jsonl or .txt files")
        files = [path]
    else:
        raise DataError(f"{path}: no such file or folder; fix data.sources in the manifest")
    for file in files:
        stats.files += 1
        yield from _iter_file(file, text_field, subsets, skip_bad_lines, stats, finetune)


def _iter_file(
    path: Path,
    text_field: str,
    subsets: frozenset[str],
    skip_bad_lines: bool,
    stats: ReadStats,
    finetune: bool = False,
) -> Iterator[str]:
    kind = source_kind(path)
    if kind == ".txt":
        yield from _iter_txt(path, skip_bad_lines, stats)
        return
    chunks = _zstd_chunks(path, stats) if kind == ".jsonl.zst" else _plain_chunks(path, stats)
    lines = _LineSplitter(chunks)
    try:
        for line_number, line in lines:
            text = _record_text(
                path, line_number, line, text_field, subsets, skip_bad_lines, stats, finetune
            )
            if text:
                stats.documents += 1
                yield text
    except _TruncatedZstd as exc:
        where = (
            f"{path}: truncated .zst: the stream stops after line {lines.line_number} ({exc.offset} bytes)"
        )
        if not skip_bad_lines:
            raise DataError(
                f"{where}; re-download the file, or pass --skip-bad-lines to keep the lines before it"
            ) from None
        stats.truncated_files += 1
        stats.note_skip(where)


def _plain_chunks(path: Path, stats: ReadStats) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(PLAIN_READ_CHUNK_BYTES):
            stats.input_bytes += len(chunk)
            yield chunk


class _TruncatedZstd(Exception):
    """The zstd stream ended inside a frame; carries the compressed byte offset where the file stopped."""

    def __init__(self, offset: int):
        super().__init__(offset)
        self.offset = offset


def _zstd_chunks(path: Path, stats: ReadStats) -> Iterator[bytes]:
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    frame_started = False
    offset = 0
    with open(path, "rb") as handle:
        while compressed := handle.read(ZSTD_INPUT_CHUNK_BYTES):
            stats.input_bytes += len(compressed)
            offset += len(compressed)
            pending = compressed
            while pending:
                frame_started = True
                try:
                    out = frame.decompress(pending)
                except zstandard.ZstdError as exc:
                    raise DataError(
                        f"{path}: not a valid zstandard stream near compressed byte {offset} ({exc}); "
                        "re-download or recompress the file"
                    ) from None
                if out:
                    yield out
                if frame.eof:
                    # A Pile file may hold several frames; go on with the bytes after this one.
                    pending = frame.unused_data
                    frame = decompressor.decompressobj()
                    frame_started = False
                else:
                    pending = b""
    if frame_started:
        raise _TruncatedZstd(offset)


class _LineSplitter:
    """Iterate (line number, line bytes without the newline) over byte chunks; a huge line stays one line."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks = chunks
        self.line_number = 0  # lines yielded so far: where a broken stream stopped

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        partial: list[bytes] = []  # pieces of a line longer than a chunk, joined once (no quadratic copying)
        for chunk in self.chunks:
            lines = chunk.split(b"\n")
            if len(lines) == 1:
                partial.append(chunk)
                continue
            if partial:
                partial.append(lines[0])
                lines[0] = b"".join(partial)
                partial = []
            tail = lines.pop()
            if tail:
                partial.append(tail)
            for line in lines:
                self.line_number += 1
                yield self.line_number, line
        if partial:
            self.line_number += 1
            yield self.line_number, b"".join(partial)


class _BadLine(Exception):
    """What is wrong with one line, e.g. "bad JSON (...)"; _record_text adds the file and line number."""


def _record_text(
    path: Path,
    line_number: int,
    line: bytes,
    text_field: str,
    subsets: frozenset[str],
    skip_bad_lines: bool,
    stats: ReadStats,
    finetune: bool = False,
) -> str | None:
    """The text of one JSON line, None for a blank, filtered or skipped line; DataError for a bad one."""
    if not line.strip():
        return None
    try:
        record, text, n_bytes = _parse_record(line, text_field, finetune)
    except _BadLine as bad:
        where = f"{path}:{line_number}"
        if skip_bad_lines:
            stats.note_skip(f"{where}: {bad}")
            return None
        raise DataError(f"{where}: {bad}; {SKIP_HINT}") from None
    if subsets:
        meta = record.get("meta")
        subset = meta.get("pile_set_name") if isinstance(meta, dict) else None
        if subset not in subsets:
            stats.filtered_documents += 1
            return None
    stats.text_bytes += n_bytes
    return text


def _parse_record(line: bytes, text_field: str, finetune: bool = False) -> tuple[dict, str, int]:
    """(record, its text, the text's UTF-8 size) of a JSON line; _BadLine says what is wrong with it."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadLine(f"not valid UTF-8 (byte {exc.start} of the line)") from None
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as exc:
        raise _BadLine(f"bad JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _BadLine(f"expected a JSON object, got {type(record).__name__}")
    if finetune:
        from gpunite.data.finetune import FinetuneRecordError, finetune_text

        try:
            text = finetune_text(record, text_field)
        except FinetuneRecordError as exc:
            raise _BadLine(str(exc)) from None
    elif text_field not in record:
        raise _BadLine(f"no {text_field!r} field")
    else:
        text = record[text_field]
        if not isinstance(text, str):
            raise _BadLine(f"field {text_field!r} must be a string, got {type(text).__name__}")
    try:
        n_bytes = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise _BadLine(f"field {text_field!r} holds an invalid Unicode escape (a lone surrogate)") from None
    return record, text, n_bytes


def _iter_txt(path: Path, skip_bad_lines: bool, stats: ReadStats) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
    piece: list[str] = []
    piece_bytes = 0
    line_number = 0
    with open(path, "rb") as handle:
        # readline's limit bounds memory even for a file that is one endless line.
        while raw := handle.readline(TXT_SOFT_SPLIT_BYTES):
            stats.input_bytes += len(raw)
            complete_line = raw.endswith(b"\n")
            if complete_line:
                line_number += 1
            try:
                text = decoder.decode(raw)
            except UnicodeDecodeError as exc:
                decoder.reset()
                where = f"{path}:{line_number if complete_line else line_number + 1}"
                problem = f"not valid UTF-8 (byte {exc.start} of the line)"
                if skip_bad_lines:
                    stats.note_skip(f"{where}: {problem}")
                    continue
                raise DataError(f"{where}: {problem}; {SKIP_HINT}") from None
            piece.append(text)
            piece_bytes += len(raw)
            blank_line = complete_line and not raw.strip()
            if (piece_bytes >= TXT_SOFT_SPLIT_BYTES and blank_line) or piece_bytes >= TXT_HARD_SPLIT_BYTES:
                yield from _emit_piece(piece, stats)
                piece, piece_bytes = [], 0
        yield from _emit_piece(piece, stats)


def _emit_piece(piece: list[str], stats: ReadStats) -> Iterator[str]:
    text = "".join(piece)
    if text.strip():
        stats.documents += 1
        stats.text_bytes += len(text.encode("utf-8"))
        yield text
