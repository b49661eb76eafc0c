"""Benchmark: bytes each peer actually sends per trained token, vs data-parallel fp32 all-reduce every step.

A real local swarm (peer processes on 127.0.0.1) trains the tiny preset with the manifest's default
training settings (H = train.inner_steps, int8 compression, chunk 4096, audits as proof.audit_fraction says);
`--inner-steps` lowers H for a quick run, `--compression` and `--audit-fraction` try other settings
(`--audit-fraction 0` measures the DiLoCo exchange alone). Bytes are counted on the wire by each peer: every
frame it writes to a libp2p stream (headers and payloads, as `gpunite.swarm.protocol.ByteCounter` counts
them; the DHT's own small records are not included), so audit traffic counts: a trainer serves each verifier
the start states of two trail segments (the weights' fp16 change in the round, AdamW's bf16 first and fp32
second moment: 8 bytes per parameter each; the end states only when a replay is not bit-exact) and its final
weights in fp32, ~20 x params bytes (28 before the trail states were stored compact), packed on the wire
(`gpunite.swarm.protocol.pack_floats`: ~0.8 of that), where its share of the DiLoCo exchange is
~2 (N-1)/N x params x bytes per value. The window is steady state: from
the end of round `--warmup-rounds` to the end of the last round, so the one-time state sync of joiners is
excluded.

Baseline (computed, same run): data-parallel training all-reduces fp32 gradients every step, 2 x 4 bytes
x params per step per peer, for batch_size x seq_len tokens per step per peer.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def manifest_text(inner_steps: int | None, compression: str | None, audit_fraction: float | None) -> str:
    # 6 MB of text is ~1.3M tokens: enough for 3 peers x 100 steps x 8 sequences x 128 tokens in each of the
    # 3 rounds (with 2.5 MB the last round ran out of data after ~15 steps, which inflated bytes per token).
    lines = ['[run]', 'name = "bench-communication"', '[model]', 'preset = "tiny"', '[data]',
             'sources = ["builtin:python-docs"]', 'max_builtin_mb = 6.0', '[train]', 'round_deadline_s = 1800']
    if inner_steps is not None:
        lines.append(f"inner_steps = {inner_steps}")
    if compression is not None:
        lines.append(f'compression = "{compression}"')
    if audit_fraction is not None:
        lines += ["[proof]", f"audit_fraction = {audit_fraction}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds after the warm-up")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="rounds left out of the window (>= 1)")
    parser.add_argument("--inner-steps", type=int, default=None, help="default: the manifest default (100)")
    parser.add_argument("--compression", choices=("int8", "int4", "none"), default=None,
                        help="default: the manifest default")
    parser.add_argument("--audit-fraction", type=float, default=None,
                        help="default: the manifest's; 0 measures the DiLoCo exchange alone (no audits)")
    args = parser.parse_args()

    from gpunite.data.prepare import prepare_dataset
    from gpunite.manifest import load_manifest
    from gpunite.model import config_from_manifest, param_count
    from gpunite.swarm.demo import LocalSwarm, round_log

    with tempfile.TemporaryDirectory(prefix="gpunite-bench-comm-") as tmp:
        workdir = Path(tmp)
        manifest_path = workdir / "run.toml"
        manifest_path.write_text(manifest_text(args.inner_steps, args.compression, args.audit_fraction))
        prepare_dataset(load_manifest(manifest_path))
        manifest = load_manifest(manifest_path)
        params = param_count(config_from_manifest(manifest))
        train = manifest.train
        names = [f"peer{i}" for i in range(1, args.peers + 1)]
        total_rounds = args.warmup_rounds + args.rounds
        started = time.time()
        with LocalSwarm(workdir, manifest_path) as swarm:
            swarm.start_first("peer1", wait_peers=args.peers, rounds=total_rounds, extra=["--speed", "1"])
            address = swarm.address()
            for name in names[1:]:
                swarm.join(name, address, rounds=total_rounds, extra=["--speed", "1"])
            swarm.wait_exit(7200)
            logs = {name: round_log(swarm.peers[name].home) for name in names}
        first_round, last_round = args.warmup_rounds - 1, total_rounds - 1
        sent = [logs[n][last_round]["bytes_sent"] - logs[n][first_round]["bytes_sent"] for n in names]
        received = [logs[n][last_round]["bytes_received"] - logs[n][first_round]["bytes_received"] for n in names]
        # Every peer merges the same rounds; tokens per peer is the merged tokens shared by the peers.
        measured_rounds = range(first_round + 1, last_round + 1)
        tokens_global = sum(logs["peer1"][r]["tokens"] for r in measured_rounds)
        tokens_per_peer = tokens_global / args.peers
        bytes_per_token = (sum(sent) / args.peers) / tokens_per_peer
        ddp_bytes_per_token = 2 * 4 * params / (train.batch_size * manifest.data.seq_len)
        result = {
            "name": "communication",
            "value": round(ddp_bytes_per_token / bytes_per_token, 1),
            "unit": "x fewer bytes per token than fp32 all-reduce",
            "bytes_per_token": round(bytes_per_token, 3),
            "ddp_bytes_per_token": round(ddp_bytes_per_token, 1),
            "reduction": round(ddp_bytes_per_token / bytes_per_token, 1),
            "bytes_sent_per_peer_per_round": round(sum(sent) / args.peers / args.rounds),
            "bytes_received_per_peer_per_round": round(sum(received) / args.peers / args.rounds),
            "model_bytes_fp32": 4 * params,
            "params": params,
            "peers": args.peers,
            "rounds": args.rounds,
            "inner_steps": train.inner_steps,
            "batch_size": train.batch_size,
            "seq_len": manifest.data.seq_len,
            "compression": train.compression,
            "audit_fraction": manifest.proof.audit_fraction,
            "tokens_per_peer": tokens_per_peer,
            "contributions_merged": [logs["peer1"][r]["merged"] for r in measured_rounds],
            "wall_s": round(time.time() - started, 1),
            "measured": "frames written to libp2p streams by each peer (ByteCounter), steady-state rounds",
        }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
