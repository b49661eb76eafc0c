"""Benchmark: bytes each peer sends per round in a LoRA fine-tuning run vs full fine-tuning of the same base,
and the held-out fine-tuning loss of the base vs the LoRA-tuned model.

The base is the tiny preset pretrained briefly (`--base-steps` local steps on the built-in corpus) and saved
as a gpunite checkpoint. The fine-tuning task is synthetic and deterministic prompt/completion jsonl (a word,
then the word twice); held-out records use other words. Two real local swarms (peer processes on 127.0.0.1,
audits on as in the default manifest) fine-tune that base with the same data and settings: one with LoRA
(rank `--rank` on q, k, v, o), one with lora.rank = 0 (every weight trains and travels). Bytes are those
each peer writes to libp2p streams (rounds.jsonl `bytes_sent`, the ByteCounter of gpunite.swarm.protocol),
steady state: from the end of round `--warmup-rounds` to the end of the last round (the joiner's one-time
state sync is left out). Losses: mean next-token cross-entropy over every held-out sequence, for the base and
for each run's final weights. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "su", "bo", "da")


def task_records(count: int, seed: int) -> list[dict]:
    """Prompt/completion records of the synthetic task; different seeds give (mostly) different words."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))
        records.append({"prompt": f"word: {word}\ntwice:", "completion": f" {word} {word}"})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def pretrain_base(workdir: Path, steps: int) -> Path:
    """The tiny preset trained `steps` steps on the built-in corpus; returns its checkpoint."""
    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest
    from gpunite.train.local import train_local

    path = workdir / "base.toml"
    path.write_text('[run]\nname = "bench-finetune-base"\n[model]\npreset = "tiny"\n'
                    '[data]\nsources = ["builtin:python-docs"]\nmax_builtin_mb = 1.0\nseq_len = 64\n'
                    f'vocab_size = 2048\n[train]\ntotal_steps = {steps}\nwarmup_steps = 10\n')
    prepare_dataset(load_manifest(path))
    result = train_local(load_manifest(path), out_dir=workdir / "base", device="cpu")
    return Path(result.checkpoint)


def finetune_manifest(workdir: Path, name: str, base: Path, data: Path, rank: int, lr: float, args) -> Path:
    """What `gpunite run init --kind finetune --base` writes, with this benchmark's round settings."""
    from typer.testing import CliRunner

    from gpunite.cli import app
    from gpunite.manifest import load_manifest

    path = workdir / f"{name}.toml"
    result = CliRunner().invoke(app, ["run", "init", "--kind", "finetune", "--base", str(base), "--data",
                                      str(data), "-o", str(path), "--lora-rank", str(rank), "--json"])
    if result.exit_code != 0:
        raise SystemExit(f"run init failed: {result.output}")
    manifest = load_manifest(path)
    manifest.run.name = f"bench-finetune-{name}"
    manifest.data.seq_len = 64
    manifest.data.shard_tokens = 1 << 16
    manifest.data.prepared_dir = f"prepared-{name}"
    manifest.train.inner_steps = args.inner_steps
    manifest.train.batch_size = 8
    manifest.train.warmup_steps = 2
    manifest.train.total_steps = args.inner_steps * (args.warmup_rounds + args.rounds)
    manifest.train.lr = lr
    manifest.train.round_deadline_s = 1800.0
    if args.overlap is not None:
        manifest.train.overlap = args.overlap == "on"
    manifest.save(path)
    return path


def swarm_run(workdir: Path, manifest_path: Path, peers: int, rounds: int) -> list[Path]:
    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest
    from gpunite.swarm.demo import LocalSwarm

    prepare_dataset(load_manifest(manifest_path))
    run_dir = workdir / manifest_path.stem
    run_dir.mkdir()
    names = [f"peer{i}" for i in range(1, peers + 1)]
    with LocalSwarm(run_dir, manifest_path) as swarm:
        swarm.start_first("peer1", wait_peers=peers, rounds=rounds, extra=["--speed", "1", "--save-final"])
        address = swarm.address()
        for name in names[1:]:
            swarm.join(name, address, rounds=rounds, extra=["--speed", "1", "--save-final"])
        swarm.wait_exit(7200)
        return [swarm.peers[name].home for name in names]


def bytes_per_round(homes: list[Path], warmup_rounds: int, rounds: int) -> float:
    from gpunite.swarm.demo import round_log

    first, last = warmup_rounds - 1, warmup_rounds + rounds - 1
    logs = [round_log(home) for home in homes]
    sent = [log[last]["bytes_sent"] - log[first]["bytes_sent"] for log in logs]
    return sum(sent) / len(homes) / rounds


def heldout_batches(workdir: Path, lora_manifest: Path, records: list[dict]):
    """Every sequence of the held-out records, tokenized by the same pipeline (the base's tokenizer)."""
    import torch

    from gpunite.data.batches import heldout_units, load_sequences, training_units
    from gpunite.data.prepare import prepare_dataset
    from gpunite.data.shards import ShardIndex
    from gpunite.manifest import load_manifest

    manifest = load_manifest(lora_manifest)
    manifest.data.sources = [str(write_jsonl(workdir / "heldout.jsonl", records))]
    manifest.data.prepared_dir = "prepared-heldout"
    prepare_dataset(manifest, update_manifest=False)
    index = ShardIndex.load(manifest.prepared_path)
    seq_len = manifest.data.seq_len
    units = training_units(index, seq_len) + heldout_units(index, seq_len)
    sequences = torch.cat([
        load_sequences(manifest.prepared_path, index, unit.shard_sha256, unit.first, unit.count, seq_len)
        for unit in units if unit.count])
    return manifest, sequences.split(8)


def loss_of(checkpoint: Path, manifest, batches) -> float:
    from gpunite.train.checkpoint import load_checkpoint, model_from_checkpoint
    from gpunite.train.trainer import InnerTrainer

    model = model_from_checkpoint(load_checkpoint(checkpoint))
    return InnerTrainer(model, manifest.train, device="cpu").evaluate(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds after the warm-up")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="rounds left out of the window (>= 1)")
    parser.add_argument("--inner-steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=1e-2, help="LoRA's usual lr is a few x full's")
    parser.add_argument("--full-lr", type=float, default=3e-3)
    parser.add_argument("--overlap", choices=["on", "off"], default=None,
                        help="set train.overlap (default: the manifest's default, off)")
    parser.add_argument("--base-steps", type=int, default=60, help="local pretraining steps of the base")
    parser.add_argument("--train-records", type=int, default=2000)
    parser.add_argument("--heldout-records", type=int, default=200)
    args = parser.parse_args()

    import torch

    from gpunite.model import config_from_manifest, trainable_param_count

    torch.set_num_threads(1)  # as the peers run (LocalSwarm: one thread each); the losses do not depend on it
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gpunite-bench-finetune-") as tmp:
        workdir = Path(tmp)
        base = pretrain_base(workdir, args.base_steps)
        data = write_jsonl(workdir / "train.jsonl", task_records(args.train_records, seed=1))
        heldout = task_records(args.heldout_records, seed=2)
        total_rounds = args.warmup_rounds + args.rounds
        results = {}
        for name, rank, lr in (("lora", args.rank, args.lora_lr), ("full", 0, args.full_lr)):
            manifest_path = finetune_manifest(workdir, name, base, data, rank, lr, args)
            from gpunite.manifest import load_manifest

            overlap = load_manifest(manifest_path).train.overlap
            params = trainable_param_count(config_from_manifest(load_manifest(manifest_path)))
            homes = swarm_run(workdir, manifest_path, args.peers, total_rounds)
            final = next(homes[0].glob("runs/*/final.safetensors"))
            sent = bytes_per_round(homes, args.warmup_rounds, args.rounds)
            results[name] = (manifest_path, params, sent, final)
        eval_manifest, batches = heldout_batches(workdir, results["lora"][0], heldout)
        base_loss = loss_of(base, eval_manifest, batches)
        lora_loss = loss_of(results["lora"][3], eval_manifest, batches)
        full_loss = loss_of(results["full"][3], eval_manifest, batches)
    lora_bytes, full_bytes = results["lora"][2], results["full"][2]
    reduction = full_bytes / lora_bytes
    result = {
        "name": "finetune",
        "value": round(reduction, 1),
        "unit": "x fewer bytes sent per peer per round with LoRA than with full fine-tuning",
        "lora_bytes_per_round": round(lora_bytes),
        "full_bytes_per_round": round(full_bytes),
        "reduction": round(reduction, 1),
        "base_loss": round(base_loss, 4),
        "finetuned_loss": round(lora_loss, 4),
        "full_finetuned_loss": round(full_loss, 4),
        "lora_trainable_params": results["lora"][1],
        "full_trainable_params": results["full"][1],
        "lora_rank": args.rank,
        "lora_lr": args.lora_lr,
        "full_lr": args.full_lr,
        "peers": args.peers,
        "rounds": args.rounds,
        "inner_steps": args.inner_steps,
        "overlap": overlap,
        "base_pretrain_steps": args.base_steps,
        "heldout_sequences": sum(batch.size(0) for batch in batches),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "wall_s": round(time.time() - started, 1),
        "measured": "frames written to libp2p streams by each peer (ByteCounter), steady-state rounds; "
                    "losses "
                    "on held-out task records",
    }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
