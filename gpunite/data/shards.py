"""Content-addressed token shards: writing them, the index.json listing them, and reading them back checked.

A prepared dataset is a folder::

    <prepared_dir>/tokenizer.json          the tokenizer the tokens come from
    <prepared_dir>/index.json              ShardIndex: format, tokenizer hash, dtype, shards in order, totals
    <prepared_dir>/shards/<sha256>.bin     flat little-endian token ids (uint16 if the vocab fits, or uint32)

A shard's name is the sha256 of its bytes, so a shard fetched from any peer is checked by its name; the
dataset hash is the sha256 of the index.json bytes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gpunite.data.errors import DataError
from gpunite.util import atomic_write_bytes, sha256_bytes, sha256_file

INDEX_FORMAT = "gpunite-shards"
INDEX_VERSION = 1
INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
SHARDS_DIR = "shards"
PREPARE_HINT = "run `gpunite data prepare RUN.toml`"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def token_dtype(vocab_size: int) -> Literal["uint16", "uint32"]:
    """The smallest dtype that holds every token id of a vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def shard_path(prepared_dir: str | Path, sha256: str) -> Path:
    return Path(prepared_dir) / SHARDS_DIR / f"{sha256}.bin"


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=_SHA256_HEX.pattern)
    n_tokens: int = Field(gt=0)


class ShardIndex(BaseModel):
    """index.json: what a prepared dataset holds. Load it with ShardIndex.load(prepared_dir)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["gpunite-shards"] = INDEX_FORMAT
    version: Literal[1] = INDEX_VERSION
    tokenizer_hash: str = Field(pattern=_SHA256_HEX.pattern)
    vocab_size: int = Field(gt=0, description="The model's vocabulary (data.vocab_size); ids are below it.")
    eos_id: int = Field(ge=0)
    dtype: Literal["uint16", "uint32"]
    seq_len: int = Field(gt=0, description="The manifest's seq_len when prepared (batches may use another).")
    shard_tokens: int = Field(gt=0)
    documents: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    shards: list[ShardEntry]

    @model_validator(mode="after")
    def _check_totals(self) -> ShardIndex:
        if sum(entry.n_tokens for entry in self.shards) != self.total_tokens:
            raise ValueError("total_tokens is not the sum of the shards' n_tokens")
        if self.eos_id >= self.vocab_size:
            raise ValueError("eos_id is outside the vocabulary")
        if self.dtype != token_dtype(self.vocab_size):
            raise ValueError(f"dtype {self.dtype} does not match vocab_size {self.vocab_size}")
        return self

    def to_bytes(self) -> bytes:
        """The canonical index.json bytes (sorted keys, fixed layout); the dataset hash is their sha256."""
        return (json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1) + "\n").encode("utf-8")

    @property
    def dataset_hash(self) -> str:
        return sha256_bytes(self.to_bytes())

    @classmethod
    def load(cls, prepared_dir: str | Path) -> ShardIndex:
        """Read and validate <prepared_dir>/index.json; DataError if it is missing, truncated or malformed."""
        path = Path(prepared_dir) / INDEX_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: no shard index (the data is not prepared); {PREPARE_HINT}") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read the shard index ({exc.strerror}); {PREPARE_HINT}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DataError(
                f"{path}: the shard index is corrupt or truncated (not JSON); {PREPARE_HINT}"
            ) from None
        try:
            index = cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(part) for part in err.get("loc", ())) or "(top level)"
            raise DataError(
                f"{path}: the shard index is invalid ({where}: {err.get('msg', 'bad value')}); {PREPARE_HINT}"
            ) from None
        if index.to_bytes() != raw:
            raise DataError(
                f"{path}: the shard index was edited by hand (not in canonical form); {PREPARE_HINT}"
            )
        return index

    def save(self, prepared_dir: str | Path) -> Path:
        path = Path(prepared_dir) / INDEX_NAME
        atomic_write_bytes(path, self.to_bytes())
        return path


class ShardWriter:
    """Cut a stream of token ids into shards of shard_tokens tokens, writing each as soon as it is full.

    Memory holds one shard's buffer, whatever the dataset's size.
    """

    def __init__(self, prepared_dir: str | Path, shard_tokens: int, dtype: str):
        self.prepared_dir = Path(prepared_dir)
        self.shard_tokens = shard_tokens
        self.dtype = numpy_dtype(dtype)
        self.buffer = np.empty(shard_tokens, dtype=self.dtype)
        self.filled = 0
        self.shards: list[ShardEntry] = []
        (self.prepared_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)

    @property
    def total_tokens(self) -> int:
        return sum(entry.n_tokens for entry in self.shards) + self.filled

    def add(self, token_ids: np.ndarray) -> None:
        """Append token ids (any integer array whose values fit the dtype)."""
        start = 0
        while start < len(token_ids):
            take = min(self.shard_tokens - self.filled, len(token_ids) - start)
            self.buffer[self.filled : self.filled + take] = token_ids[start : start + take]
            self.filled += take
            start += take
            if self.filled == self.shard_tokens:
                self._flush()

    def finish(self) -> list[ShardEntry]:
        """Write the last, partial shard; return every shard in order."""
        if self.filled:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        data = self.buffer[: self.filled].tobytes()
        sha256 = sha256_bytes(data)
        path = shard_path(self.prepared_dir, sha256)
        # Content-addressed: an intact file of this name already holds exactly these bytes.
        if not (path.exists() and sha256_file(path) == sha256):
            atomic_write_bytes(path, data)
        self.shards.append(ShardEntry(sha256=sha256, n_tokens=self.filled))
        self.filled = 0


def remove_unlisted_shards(prepared_dir: str | Path, index: ShardIndex) -> int:
    """Delete shard files the index does not list (left by an earlier or failed prepare); return how many."""
    listed = {entry.sha256 for entry in index.shards}
    removed = 0
    folder = Path(prepared_dir) / SHARDS_DIR
    if not folder.is_dir():
        return 0
    for path in folder.iterdir():
        if path.suffix == ".bin" and _SHA256_HEX.match(path.stem) and path.stem not in listed:
            path.unlink()
            removed += 1
    return removed


def verify_shards(prepared_dir: str | Path, index: ShardIndex) -> None:
    """Check every shard of the index (present, hash, length); one DataError summing up what is wrong."""
    problems = []
    for entry in index.shards:
        try:
            tokens = read_shard(prepared_dir, entry.sha256, verify=True, dtype=index.dtype)
            if len(tokens) != entry.n_tokens:
                problems.append(f"{entry.sha256[:16]}... holds {len(tokens)} tokens, not {entry.n_tokens}")
        except DataError as exc:
            problems.append(str(exc).split(";")[0])
    if problems:
        raise DataError(
            f"{len(problems)} of {len(index.shards)} shards are missing or corrupt (first: {problems[0]}); "
            f"{PREPARE_HINT} again or fetch them from a peer"
        )


# Shards whose hash was checked in this process, keyed by (path, size, mtime): checked once, not per batch.
_verified_shards: set[tuple[str, int, int]] = set()


def read_shard(
    prepared_dir: str | Path, sha256: str, verify: bool = True, dtype: str | None = None
) -> np.ndarray:
    """A shard's tokens as a read-only memory map; with verify, its bytes must hash to its name.

    dtype defaults to the one in the prepared dir's index.json.
    """
    if not _SHA256_HEX.match(sha256):
        raise DataError(f"{sha256!r} is not a shard hash (64 lowercase hex digits)")
    if dtype is None:
        dtype = ShardIndex.load(prepared_dir).dtype
    path = shard_path(prepared_dir, sha256)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise DataError(
            f"{path}: shard missing; {PREPARE_HINT} again or fetch the shard from a peer"
        ) from None
    item_bytes = numpy_dtype(dtype).itemsize
    if stat.st_size == 0 or stat.st_size % item_bytes:
        raise DataError(
            f"{path}: shard size {stat.st_size} is not a whole number of {dtype} tokens; {PREPARE_HINT}"
        )
    if verify:
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _verified_shards:
            actual = sha256_file(path)
            if actual != sha256:
                raise DataError(
                    f"{path}: shard is corrupt (its sha256 is {actual[:16]}..., not its name); "
                    f"delete it and {PREPARE_HINT} again or fetch it from a peer"
                )
            _verified_shards.add(key)
    return np.memmap(path, dtype=numpy_dtype(dtype), mode="r")
