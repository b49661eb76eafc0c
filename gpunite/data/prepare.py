"""`data prepare`: stream a run's corpus through its tokenizer into content-addressed shards, bounded memory.

Pipeline: a reader thread parses documents into batches of about ENCODE_BATCH_BYTES of text; the calling
thread encodes each batch with the tokenizers library's batch encoder (Rust, all cores, GIL released, so
reading the next batch overlaps with encoding this one), appends the end-of-document id after every document
and feeds a ShardWriter that writes each shard as soon as it is full. The index is written last: until then
an earlier prepared dataset stays intact. Same sources and tokenizer => same shard hashes and dataset hash.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field

import numpy as np

from gpunite.data.errors import DataError
from gpunite.data.readers import ReadStats, iter_sources, source_input_bytes
from gpunite.data.shards import (
    TOKENIZER_NAME,
    ShardIndex,
    ShardWriter,
    remove_unlisted_shards,
    token_dtype,
)
from gpunite.data.tokenizer import (
    TOKENIZER_SAMPLE_BYTES,
    RunTokenizer,
    load_tokenizer_file,
    sample_documents,
    train_bpe,
)
from gpunite.manifest import Manifest, resolve_source
from gpunite.util import atomic_write_bytes

# Text per encode call: big enough to keep every core busy, small enough that encodings stay a few tens of MB.
ENCODE_BATCH_BYTES = 1 << 20
# Batches read ahead of the encoder: bounds memory to a few batches whatever the input size.
READ_AHEAD_BATCHES = 2


@dataclass
class PrepareProgress:
    """What a progress display shows while preparing."""

    stats: ReadStats
    total_input_bytes: int
    tokens: int = 0
    shards: int = 0
    phase: str = "tokenizer"  # "tokenizer" while training it, then "shards"


@dataclass
class PrepareResult:
    prepared_dir: str
    documents: int
    tokens: int
    shards: int
    text_bytes: int
    input_bytes: int
    skipped_lines: int
    filtered_documents: int
    truncated_files: int
    first_skip: str | None
    tokenizer_hash: str
    dataset_hash: str
    vocab_size: int
    dtype: str
    tokenizer_seconds: float
    shard_seconds: float
    removed_stale_shards: int = 0
    previous_dataset_hash: str | None = None  # the manifest's data.dataset_hash before this prepare
    sources: list[str] = field(default_factory=list)

    @property
    def text_mb_per_s(self) -> float:
        """Shard preparation throughput: MB (10**6 bytes) of raw text per second, tokenizer training aside."""
        return self.text_bytes / 1e6 / max(self.shard_seconds, 1e-9)

    def to_json(self) -> dict:
        return {**asdict(self), "text_mb_per_s": round(self.text_mb_per_s, 3)}


def build_tokenizer(manifest: Manifest, skip_bad_lines: bool = False) -> RunTokenizer:
    """The run's tokenizer: a finetune run's base's, else data.tokenizer if set, else a byte-level BPE trained
    on a sample of the data."""
    data = manifest.data
    if manifest.run.kind == "finetune" and manifest.model.base:
        from gpunite.data.finetune import base_path, base_tokenizer_bytes
        from gpunite.data.tokenizer import tokenizer_from_bytes

        base = base_path(manifest.model.base, manifest.base_dir)
        return tokenizer_from_bytes(base_tokenizer_bytes(base), f"the tokenizer of {base}")
    if data.tokenizer:
        return load_tokenizer_file(resolve_source(manifest, data.tokenizer))
    sources = [resolve_source(manifest, source) for source in data.sources]
    sample = sample_documents(
        sources,
        TOKENIZER_SAMPLE_BYTES,
        data.text_field,
        data.pile_subsets,
        skip_bad_lines,
        data.max_builtin_mb,
    )
    return train_bpe(sample, data.vocab_size)


def prepare_dataset(
    manifest: Manifest,
    skip_bad_lines: bool = False,
    progress: Callable[[PrepareProgress], None] | None = None,
    run_tokenizer: RunTokenizer | None = None,
    update_manifest: bool = True,
) -> PrepareResult:
    """Tokenize the manifest's sources into manifest.prepared_path; record the hashes in the manifest file."""
    data = manifest.data
    sources = [resolve_source(manifest, source) for source in data.sources]
    prepared_dir = manifest.prepared_path
    stats = ReadStats()
    state = PrepareProgress(stats, sum(source_input_bytes(s, data.max_builtin_mb) for s in sources))
    if progress:
        progress(state)

    started = time.perf_counter()
    if run_tokenizer is None:
        run_tokenizer = build_tokenizer(manifest, skip_bad_lines)
    tokenizer_seconds = time.perf_counter() - started
    if run_tokenizer.vocab_size > data.vocab_size:
        raise DataError(
            f"the tokenizer has {run_tokenizer.vocab_size} tokens but data.vocab_size is {data.vocab_size}; "
            f"set data.vocab_size = {run_tokenizer.vocab_size} in the manifest"
        )

    state.phase = "shards"
    started = time.perf_counter()
    dtype = token_dtype(data.vocab_size)
    writer = ShardWriter(prepared_dir, data.shard_tokens, dtype)
    documents = iter_sources(
        sources,
        data.text_field,
        data.pile_subsets,
        skip_bad_lines,
        stats,
        data.max_builtin_mb,
        finetune=manifest.run.kind == "finetune",
    )
    # closing(): on an error here the reader thread stops now, not when the traceback is collected.
    with closing(encode_documents(run_tokenizer, documents)) as encoded:
        for token_ids in encoded:
            writer.add(token_ids)
            state.tokens = writer.total_tokens
            state.shards = len(writer.shards)
            if progress:
                progress(state)
    shards = writer.finish()
    shard_seconds = time.perf_counter() - started
    if stats.documents == 0:
        raise DataError(
            f"no documents in {', '.join(data.sources)} ({stats.filtered_documents} filtered out by "
            f"data.pile_subsets, {stats.skipped_lines} bad lines skipped); "
            "check data.sources and data.pile_subsets"
        )

    index = ShardIndex(
        tokenizer_hash=run_tokenizer.sha256,
        vocab_size=data.vocab_size,
        eos_id=run_tokenizer.eos_id,
        dtype=dtype,
        seq_len=data.seq_len,
        shard_tokens=data.shard_tokens,
        documents=stats.documents,
        total_tokens=sum(entry.n_tokens for entry in shards),
        shards=shards,
    )
    atomic_write_bytes(prepared_dir / TOKENIZER_NAME, run_tokenizer.json_bytes)
    index.save(prepared_dir)  # written last: the commit point of the new dataset
    removed = remove_unlisted_shards(prepared_dir, index)
    if progress:
        progress(state)

    previous_dataset_hash = data.dataset_hash
    if update_manifest and manifest.path is not None:
        data.tokenizer_hash = run_tokenizer.sha256
        data.dataset_hash = index.dataset_hash
        manifest.save(manifest.path)

    return PrepareResult(
        prepared_dir=str(prepared_dir),
        documents=stats.documents,
        tokens=index.total_tokens,
        shards=len(shards),
        text_bytes=stats.text_bytes,
        input_bytes=stats.input_bytes,
        skipped_lines=stats.skipped_lines,
        filtered_documents=stats.filtered_documents,
        truncated_files=stats.truncated_files,
        first_skip=stats.first_skip,
        tokenizer_hash=run_tokenizer.sha256,
        dataset_hash=index.dataset_hash,
        vocab_size=index.vocab_size,
        dtype=dtype,
        tokenizer_seconds=tokenizer_seconds,
        shard_seconds=shard_seconds,
        removed_stale_shards=removed,
        previous_dataset_hash=previous_dataset_hash,
        sources=list(data.sources),
    )


def encode_documents(run_tokenizer: RunTokenizer, documents: Iterator[str]) -> Iterator[np.ndarray]:
    """Token ids of the documents, each followed by the end-of-document id, one array per encoded batch."""
    tokenizer = run_tokenizer.tokenizer
    # encode_batch_fast skips the character offsets we never use; older libraries only have encode_batch.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    eos = [run_tokenizer.eos_id]
    for batch in _read_ahead(_text_batches(documents, ENCODE_BATCH_BYTES), READ_AHEAD_BATCHES):
        flat: list[int] = []
        for encoding in encode(batch, add_special_tokens=False):
            flat += encoding.ids
            flat += eos
        yield np.array(flat, dtype=np.uint32)


def _text_batches(documents: Iterator[str], batch_bytes: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in documents:
        batch.append(text)
        size += len(text)  # characters: a cheap stand-in for bytes when sizing batches
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_DONE = object()


def _read_ahead(items: Iterator, depth: int) -> Iterator:
    """Iterate `items` in a background thread, at most `depth` items ahead; its errors re-raise here."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        handoff.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            handoff.put(("done", _DONE))
        except BaseException as exc:  # handed to the consumer, which raises it in the caller's thread
            handoff.put(("error", exc))

    thread = threading.Thread(target=produce, name="gpunite-data-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = handoff.get()
            if kind == "item":
                yield item
            elif kind == "error":
                raise item
            else:
                return
    finally:
        stop.set()
        while thread.is_alive():
            try:
                handoff.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)
        if hasattr(items, "close"):
            items.close()
