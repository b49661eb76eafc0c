"""Benchmark: `data prepare` throughput (MB/s of raw text) vs the tokenizers library's own batch encoding.

One run, side by side, each measurement in its own child process (so each has its own peak memory):
- gpunite: prepare_dataset on a Pile-format .jsonl.zst (streamed zstd + JSON parsing, batch encoding, the
  end-of-document ids, shard hashing and atomic writes), with the same, already trained tokenizer.
- baseline: the same texts already in memory, encoded by the library's batch encoder (the call gpunite uses,
  encode_batch_fast where the library has it) both in one call over all texts and over the same ~1 MB batches
  gpunite encodes; the faster of the two is the baseline. Plain encode_batch in one call is reported too.
The corpus is the built-in offline one (Python docs and stdlib sources), written as a Pile file first.
`ratio` compares wall-clock MB/s; `cpu_ratio` compares CPU seconds (all threads) for the same text, which
other jobs on a shared machine disturb less; the 1-minute load average is reported alongside.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_corpus(folder: Path, megabytes: float) -> tuple[Path, int]:
    import zstandard

    from gpunite.data.readers import ReadStats, iter_documents

    stats = ReadStats()
    path = folder / "corpus.jsonl.zst"
    with open(path, "wb") as handle, zstandard.ZstdCompressor(level=3).stream_writer(handle) as writer:
        for text in iter_documents("builtin:python-docs", stats=stats, max_builtin_mb=megabytes):
            record = {"text": text, "meta": {"pile_set_name": "python-docs"}}
            writer.write(json.dumps(record).encode() + b"\n")
    return path, stats.text_bytes


def train_tokenizer(corpus: Path, out: Path, vocab_size: int) -> float:
    from gpunite.data.tokenizer import TOKENIZER_SAMPLE_BYTES, sample_documents, train_bpe

    started = time.perf_counter()
    run_tokenizer = train_bpe(sample_documents([str(corpus)], TOKENIZER_SAMPLE_BYTES), vocab_size)
    seconds = time.perf_counter() - started
    out.write_bytes(run_tokenizer.json_bytes)
    return seconds


def child_gpunite(folder: Path, vocab_size: int) -> dict:
    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import parse_manifest

    manifest = parse_manifest("")
    manifest.data.sources = [str(folder / "corpus.jsonl.zst")]
    manifest.data.tokenizer = str(folder / "tokenizer.json")
    manifest.data.vocab_size = vocab_size
    manifest.data.prepared_dir = str(folder / "prepared")
    started, cpu_started = time.perf_counter(), time.process_time()
    result = prepare_dataset(manifest, update_manifest=False)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "text_bytes": result.text_bytes,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "tokens": result.tokens,
        "peak_rss_mb": peak_rss_mb(),
    }


def child_baseline(folder: Path) -> dict:
    from tokenizers import Tokenizer

    from gpunite.data.prepare import ENCODE_BATCH_BYTES, _text_batches
    from gpunite.data.readers import iter_documents

    texts = list(iter_documents(folder / "corpus.jsonl.zst"))
    batches = list(_text_batches(iter(texts), ENCODE_BATCH_BYTES))
    text_bytes = sum(len(text.encode()) for text in texts)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    fast = "encode_batch_fast" if hasattr(tokenizer, "encode_batch_fast") else "encode_batch"
    timings, cpu_timings = {}, {}
    for name, method, groups in (
        ("one_call", fast, [texts]),
        ("batched", fast, batches),
        ("encode_batch", "encode_batch", [texts]),
    ):
        started, cpu_started = time.perf_counter(), time.process_time()
        encode = getattr(tokenizer, method)
        tokens = 0
        for group in groups:
            tokens += sum(len(encoding.ids) for encoding in encode(group, add_special_tokens=False))
        timings[name] = time.perf_counter() - started
        cpu_timings[name] = time.process_time() - cpu_started
    return {
        "text_bytes": text_bytes,
        "seconds": timings,
        "cpu_seconds": cpu_timings,
        "tokens": tokens + len(texts),
        "method": fast,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_child(kind: str, folder: Path, vocab_size: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--folder", str(folder), "--vocab-size", str(vocab_size)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{kind} child failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=12.0, help="MB of text to prepare (built-in corpus).")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1, help="Alternating runs of each side; best is kept.")
    parser.add_argument("--child", choices=("gpunite", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "gpunite":
        print(json.dumps(child_gpunite(args.folder, args.vocab_size)))
        return
    if args.child == "baseline":
        print(json.dumps(child_baseline(args.folder)))
        return

    with tempfile.TemporaryDirectory(prefix="gpunite-bench-data-") as tmp:
        folder = Path(tmp)
        _, text_bytes = write_corpus(folder, args.mb)
        tokenizer_seconds = train_tokenizer(
            folder / "corpus.jsonl.zst", folder / "tokenizer.json", args.vocab_size
        )
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(run_child("gpunite", folder, args.vocab_size))
            theirs.append(run_child("baseline", folder, args.vocab_size))

    best_ours = min(ours, key=lambda r: r["seconds"])
    if best_ours["tokens"] != theirs[0]["tokens"]:
        raise SystemExit(
            f"token counts differ: gpunite {best_ours['tokens']}, baseline {theirs[0]['tokens']}"
        )
    mb = text_bytes / 1e6
    mb_per_s = mb / best_ours["seconds"]
    one_call_seconds = min(r["seconds"]["one_call"] for r in theirs)
    batched_seconds = min(r["seconds"]["batched"] for r in theirs)
    plain_seconds = min(r["seconds"]["encode_batch"] for r in theirs)
    baseline_mb_per_s = mb / min(one_call_seconds, batched_seconds)
    # CPU seconds (all threads) of the same work: a figure the other jobs on a shared machine disturb less.
    cpu_seconds = min(r["cpu_seconds"] for r in ours)
    baseline_cpu_seconds = min(min(r["cpu_seconds"]["one_call"], r["cpu_seconds"]["batched"]) for r in theirs)
    print(
        json.dumps(
            {
                "name": "data_prepare",
                "value": round(mb_per_s, 3),
                "unit": "MB/s",
                "mb_per_s": round(mb_per_s, 3),
                "baseline_mb_per_s": round(baseline_mb_per_s, 3),
                "baseline_method": theirs[0]["method"],
                "baseline_one_call_mb_per_s": round(mb / one_call_seconds, 3),
                "baseline_batched_mb_per_s": round(mb / batched_seconds, 3),
                "encode_batch_one_call_mb_per_s": round(mb / plain_seconds, 3),
                "ratio": round(mb_per_s / baseline_mb_per_s, 3),
                "cpu_s": round(cpu_seconds, 2),
                "baseline_cpu_s": round(baseline_cpu_seconds, 2),
                "cpu_ratio": round(baseline_cpu_seconds / cpu_seconds, 3),
                "peak_rss_mb": round(best_ours["peak_rss_mb"], 1),
                "baseline_peak_rss_mb": round(max(r["peak_rss_mb"] for r in theirs), 1),
                "text_mb": round(mb, 2),
                "tokens": best_ours["tokens"],
                "tokenizer_train_s": round(tokenizer_seconds, 2),
                "vocab_size": args.vocab_size,
                "repeats": args.repeats,
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
