"""The small run manifest the real-process swarm tests share: a 2-layer model that trains in seconds."""

from __future__ import annotations

TINY_SWARM_MANIFEST = """
[run]
name = "{name}"
seed = {seed}
[model]
preset = "tiny"
hidden_size = 64
n_layers = 2
n_heads = 2
intermediate_size = 128
[data]
sources = ["builtin:python-docs"]
vocab_size = 512
seq_len = 32
shard_tokens = 16384
max_builtin_mb = 0.3
[train]
batch_size = 4
inner_steps = 4
warmup_steps = 2
total_steps = {total_steps}
round_deadline_s = {round_deadline_s}
compression_chunk = 256
{train_extra}[proof]
trail_interval = 2
"""


def tiny_swarm_manifest(name: str, seed: int = 11, total_steps: int = 400, round_deadline_s: float = 120,
                        overlap: bool = False, extra: str = "") -> str:
    """The manifest's TOML; `extra` appends more sections ([proof] keys go right after it)."""
    text = TINY_SWARM_MANIFEST.format(name=name, seed=seed, total_steps=total_steps,
                                      round_deadline_s=round_deadline_s,
                                      train_extra=f"overlap = {str(overlap).lower()}\n")
    return text + extra.lstrip("\n")
