"""`data prepare`: tokenizer, content-addressed shards, index checks, manifest hashes, the CLI end to end."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

from gpunite.data.errors import DataError
from gpunite.data.prepare import prepare_dataset
from gpunite.data.shards import (
    ShardIndex,
    ShardWriter,
    read_shard,
    shard_path,
    token_dtype,
    verify_shards,
)
from gpunite.data.tokenizer import EOS_TOKEN, load_tokenizer_file
from gpunite.manifest import load_manifest, parse_manifest
from gpunite.util import sha256_bytes, sha256_file

WORDS = "the model learns from data shared by peers who verify every step and earn credit for work".split()


def corpus_texts(count: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + f" #{i}\n" for i in range(count)
    ]


def write_pile(folder: Path, texts: list[str]) -> None:
    lines = b"".join(
        json.dumps({"text": t, "meta": {"pile_set_name": "Pile-CC"}}).encode() + b"\n" for t in texts
    )
    (folder / "00.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))


def write_run(folder: Path, texts: list[str], **data) -> Path:
    """A Pile-format corpus and a manifest for it in `folder`; returns the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    write_pile(folder, texts)
    manifest = parse_manifest("")
    manifest.data.sources = ["00.jsonl.zst"]
    manifest.data.vocab_size = 300
    manifest.data.shard_tokens = 1024
    manifest.data.seq_len = 16
    for key, value in data.items():
        setattr(manifest.data, key, value)
    manifest.save(folder / "run.toml")
    return folder / "run.toml"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One prepared run shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("run")
    texts = corpus_texts(150)
    manifest_path = write_run(folder, texts)
    result = prepare_dataset(load_manifest(manifest_path))
    return manifest_path, texts, result


def test_prepare_writes_hashed_shards_index_and_manifest_hashes(prepared):
    manifest_path, texts, result = prepared
    manifest = load_manifest(manifest_path)
    prepared_dir = manifest.prepared_path
    index = ShardIndex.load(prepared_dir)
    assert result.documents == len(texts) and result.shards == len(index.shards) > 1
    assert index.dtype == "uint16" and index.vocab_size == 300 and index.eos_id == 0
    assert all(entry.n_tokens == 1024 for entry in index.shards[:-1])
    assert index.total_tokens == result.tokens == sum(entry.n_tokens for entry in index.shards)
    for entry in index.shards:
        assert sha256_file(shard_path(prepared_dir, entry.sha256)) == entry.sha256
    assert (
        manifest.data.tokenizer_hash == sha256_file(prepared_dir / "tokenizer.json") == index.tokenizer_hash
    )
    assert manifest.data.dataset_hash == sha256_file(prepared_dir / "index.json") == index.dataset_hash


def test_shards_decode_back_to_the_documents_separated_by_eos(prepared):
    manifest_path, texts, _ = prepared
    prepared_dir = load_manifest(manifest_path).prepared_path
    index = ShardIndex.load(prepared_dir)
    tokens = np.concatenate([read_shard(prepared_dir, entry.sha256) for entry in index.shards])
    run_tokenizer = load_tokenizer_file(prepared_dir / "tokenizer.json")
    assert run_tokenizer.tokenizer.token_to_id(EOS_TOKEN) == 0
    assert tokens[-1] == 0 and int(tokens.max()) < 300
    documents = np.split(tokens, np.flatnonzero(tokens == 0) + 1)[:-1]
    decoded = [run_tokenizer.tokenizer.decode(doc[:-1].tolist()) for doc in documents]
    assert decoded == texts


def test_prepare_is_deterministic_and_reuses_an_existing_tokenizer(prepared, tmp_path):
    manifest_path, texts, first = prepared
    again = prepare_dataset(load_manifest(write_run(tmp_path / "again", texts)))
    assert (again.tokenizer_hash, again.dataset_hash) == (first.tokenizer_hash, first.dataset_hash)

    tokenizer_file = load_manifest(manifest_path).prepared_path / "tokenizer.json"
    reused = prepare_dataset(
        load_manifest(write_run(tmp_path / "reused", texts, tokenizer=str(tokenizer_file)))
    )
    assert (reused.tokenizer_hash, reused.dataset_hash) == (first.tokenizer_hash, first.dataset_hash)


def test_tokenizer_larger_than_vocab_size_is_refused(prepared, tmp_path):
    manifest_path, texts, _ = prepared
    tokenizer_file = load_manifest(manifest_path).prepared_path / "tokenizer.json"
    small = write_run(tmp_path / "small", texts[:5], tokenizer=str(tokenizer_file), vocab_size=260)
    with pytest.raises(DataError, match="set data.vocab_size = 300"):
        prepare_dataset(load_manifest(small))


def test_corrupt_shard_is_detected_by_its_hash(prepared, tmp_path):
    manifest_path, _, _ = prepared
    source_dir = load_manifest(manifest_path).prepared_path
    index = ShardIndex.load(source_dir)
    copy = tmp_path / "copy"
    (copy / "shards").mkdir(parents=True)
    (copy / "index.json").write_bytes((source_dir / "index.json").read_bytes())
    victim = index.shards[1].sha256
    data = bytearray(shard_path(source_dir, victim).read_bytes())
    data[10] ^= 0xFF
    shard_path(copy, victim).write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{victim}\.bin: shard is corrupt"):
        read_shard(copy, victim)
    assert len(read_shard(copy, victim, verify=False)) == index.shards[1].n_tokens
    with pytest.raises(DataError, match="shard missing"):
        read_shard(copy, index.shards[0].sha256)
    n = len(index.shards)
    with pytest.raises(
        DataError, match=rf"{n} of {n} shards are missing or corrupt \(first: .*shard missing\)"
    ):
        verify_shards(copy, index)
    verify_shards(source_dir, index)


def test_missing_truncated_or_edited_index_says_run_prepare(prepared, tmp_path):
    with pytest.raises(DataError, match="no shard index.*gpunite data prepare"):
        ShardIndex.load(tmp_path)
    good = (load_manifest(prepared[0]).prepared_path / "index.json").read_bytes()
    (tmp_path / "index.json").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="corrupt or truncated.*gpunite data prepare"):
        ShardIndex.load(tmp_path)
    edited = json.loads(good)
    edited["total_tokens"] += 1
    (tmp_path / "index.json").write_text(json.dumps(edited, sort_keys=True, indent=1) + "\n")
    with pytest.raises(DataError, match="invalid.*total_tokens is not the sum"):
        ShardIndex.load(tmp_path)


def test_failed_prepare_keeps_the_previous_dataset_and_a_new_one_drops_stale_shards(tmp_path):
    texts = corpus_texts(40, seed=5)
    manifest_path = write_run(tmp_path, texts)
    first = prepare_dataset(load_manifest(manifest_path))
    prepared_dir = load_manifest(manifest_path).prepared_path

    (tmp_path / "00.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "ok"}\n{oops\n'))
    with pytest.raises(DataError, match=r"00\.jsonl\.zst:2: bad JSON"):
        prepare_dataset(load_manifest(manifest_path))
    assert ShardIndex.load(prepared_dir).dataset_hash == first.dataset_hash

    write_pile(tmp_path, corpus_texts(40, seed=6))
    second = prepare_dataset(load_manifest(manifest_path))
    assert second.dataset_hash != first.dataset_hash and second.removed_stale_shards > 0
    assert second.previous_dataset_hash == first.dataset_hash
    listed = {entry.sha256 for entry in ShardIndex.load(prepared_dir).shards}
    assert {path.stem for path in (prepared_dir / "shards").iterdir()} == listed


def test_skip_bad_lines_prepares_the_good_lines(tmp_path):
    manifest_path = write_run(tmp_path, [])
    lines = b'{"text": "good one"}\n{"text": 5}\nnot json\n{"text": "good two"}\n'
    (tmp_path / "00.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    result = prepare_dataset(load_manifest(manifest_path), skip_bad_lines=True)
    assert result.documents == 2 and result.skipped_lines == 2


def test_no_documents_left_is_an_error(tmp_path):
    manifest_path = write_run(tmp_path, corpus_texts(3), pile_subsets=["Github"])
    with pytest.raises(DataError, match="no documents.*3 filtered out"):
        prepare_dataset(load_manifest(manifest_path))


def test_uint32_shards_for_large_vocabularies(tmp_path):
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    writer = ShardWriter(tmp_path, 1024, "uint32")
    writer.add(np.arange(70_000, 71_500, dtype=np.int64))
    shards = writer.finish()
    assert [entry.n_tokens for entry in shards] == [1024, 476]
    tokens = read_shard(tmp_path, shards[1].sha256, dtype="uint32")
    assert tokens[0] == 71_024 and tokens.dtype == np.dtype("<u4")
    assert shards[0].sha256 == sha256_bytes(np.arange(70_000, 71_024, dtype="<u4").tobytes())


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpunite", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_prepare_and_info_end_to_end(prepared, tmp_path):
    _, texts, in_process = prepared
    manifest_path = write_run(tmp_path, texts)
    done = run_cli("data", "prepare", str(manifest_path), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["dataset_hash"] == in_process.dataset_hash  # same hashes in another process
    assert result["documents"] == len(texts) and result["text_mb_per_s"] > 0
    info = run_cli("data", "info", str(manifest_path), "--verify", "--json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["manifest_matches"] is True and summary["total_tokens"] == result["tokens"]
    assert summary["shards_verified"] is True
    assert summary["trainable_sequences"] > 0 and summary["heldout_sequences"] > 0


def test_cli_bad_data_is_a_one_line_error(tmp_path):
    manifest_path = write_run(tmp_path, corpus_texts(5))
    (tmp_path / "00.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b'{"text": "ok"}\n{"txt": 1}\n')
    )
    done = run_cli("data", "prepare", str(manifest_path), cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    message = done.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert "00.jsonl.zst:2: no 'text' field" in message and "--skip-bad-lines" in message
    skipped = run_cli("data", "prepare", str(manifest_path), "--skip-bad-lines", "--json", cwd=tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    assert json.loads(skipped.stdout)["skipped_lines"] == 1


def test_prepare_again_repairs_a_corrupt_shard(tmp_path):
    manifest_path = write_run(tmp_path, corpus_texts(30, seed=8))
    first = prepare_dataset(load_manifest(manifest_path))
    prepared_dir = Path(first.prepared_dir)
    victim = shard_path(prepared_dir, ShardIndex.load(prepared_dir).shards[0].sha256)
    victim.write_bytes(bytes(victim.stat().st_size))  # same size, wrong bytes
    again = prepare_dataset(load_manifest(manifest_path))
    assert again.dataset_hash == first.dataset_hash
    assert sha256_file(victim) == victim.stem
