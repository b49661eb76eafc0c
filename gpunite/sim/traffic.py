"""Bytes that each kind of swarm message puts on the wire, from the formats the protocol really sends.

Every P2P request in gpunite is one frame each way (gpunite.swarm.protocol.write_frame: a 4-byte header
length, the JSON header, an 8-byte body length, the body), and the byte counters every peer logs count
exactly those frames. The bodies are safetensors: a JSON header naming the tensors, then the raw data, so
their size is (bytes per parameter of the dtypes) x parameters + a header that depends only on the tensor
names. Per round (gpunite.swarm.peer, gpunite.swarm.audits):

- a slice owner pulls its slice of every other accepted contribution: int8 values + one fp32 absmax scale
  per chunk (1 + 4 / chunk bytes per parameter);
- every peer fetches every other owner's merged slice: the same format;
- a verifier fetches the whole delta from the trainer (one request per slice), the start state of each
  drawn trail segment (the weights' fp16 change from the round's base, AdamW's first moment in bf16 and its
  second in fp32: 8 bytes per parameter, `gpunite.proof.trail`), the state at its end too (another 8, one more
  request) only when its replay is not bit-exact (`end_state_share`: 0 among peers of one device class, up to
  1 when verifiers replay on other devices than the trainers), and the trail's final weights (fp32, 4 bytes
  per parameter); those trail replies travel packed (gpunite.swarm.protocol.pack_floats: `packed_share` of
  their bytes, measured by packing a real trail state); an overlapped round carried onto its base
  (`rebased`) also costs its verifier the trainer's delta of the round before (where its steps started);
- a joiner (or a peer that re-syncs) downloads the global state: fp32 weights, the outer momentum and the
  serving peer's AdamW moments (16 bytes per parameter).

DHT traffic (heartbeats, records) goes through hivemind, not these frames, and is not in the counters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

FRAME_PREFIX_BYTES = 12  # 4-byte header length + 8-byte body length
INT8_BYTES, FP16_BYTES, FP32_BYTES = 1, 2, 4
ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, fp32 like the weights in a state sync
# A stored trail state (gpunite.proof.trail.STATE_BYTES_PER_PARAM, without importing torch here): the weights'
# fp16 change, the bf16 first moment, the fp32 second moment. The final weights travel in fp32.
TRAIL_CHANGE_BYTES = FP16_BYTES  # the weights' part of a state
TRAIL_STATE_BYTES = TRAIL_CHANGE_BYTES + FP16_BYTES + FP32_BYTES
TRAIL_FINAL_BYTES = FP32_BYTES
RUN_ID_CHARS = 64  # a run id is a sha256 in hex; every request header carries it


@dataclass(frozen=True)
class WireSizes:
    """Per-message wire bytes: a per-parameter part fixed by the dtypes, and a fixed part per message."""

    chunk: int = 4096
    request_bytes: float = 250.0  # one request and its reply: frame prefixes, both JSON headers, body header
    segment_header_bytes: float = 0.0  # safetensors header of one trail segment (grows with tensor count)
    final_header_bytes: float = 0.0
    end_state_share: float = 0.0  # share of segment replays that are not bit-exact, so fetch the end state
    packed_share: float = 1.0  # trail states and final weights on the wire / their bytes (pack_floats)

    @property
    def slice_bytes_per_param(self) -> float:
        return INT8_BYTES + FP32_BYTES / self.chunk

    @property
    def segment_bytes_per_param(self) -> float:
        return TRAIL_STATE_BYTES  # the state at the segment's start

    @property
    def end_state_bytes_per_param(self) -> float:
        return TRAIL_STATE_BYTES  # the state at its end, when the replay is not bit-exact

    @property
    def final_bytes_per_param(self) -> float:
        return TRAIL_FINAL_BYTES

    @property
    def state_bytes_per_param(self) -> float:
        return FP32_BYTES * (2 + ADAM_MOMENTS)  # weights, outer momentum, the server's AdamW moments

    def audit_bytes(self, params: int, n_slices: int, segments: int, rebased: bool = False,
                    trail_segments: int | None = None) -> float:
        """One audit's download: the delta in `n_slices` requests (twice when `rebased`: the trainer's delta of
        the round before too), `segments` segments' start states (and end states, for the share of replays
        that are not bit-exact) and the final weights, packed.

        trail_segments: the trail's segment count, of which `segments` are drawn uniformly. The first segment
        starts where the round did, so its stored weight change is all zeros and packs away: drawn with
        probability segments / trail_segments, it saves that part in expectation (none when not given)."""
        ends = segments * self.end_state_share
        deltas = 2 if rebased else 1
        first_drawn = segments / trail_segments if trail_segments else 0.0
        trail = (
            params * (segments * self.segment_bytes_per_param - first_drawn * TRAIL_CHANGE_BYTES
                      + ends * self.end_state_bytes_per_param + self.final_bytes_per_param)
            + (segments + ends) * self.segment_header_bytes
            + self.final_header_bytes
        )
        return (
            deltas * params * self.slice_bytes_per_param
            + trail * self.packed_share
            + (deltas * n_slices + segments + ends + 1) * self.request_bytes
        )


def frame_bytes(header: dict, body_bytes: int = 0) -> int:
    """Bytes of one frame as write_frame sends it (compact, sorted JSON header)."""
    return FRAME_PREFIX_BYTES + len(json.dumps(header, sort_keys=True, separators=(",", ":"))) + body_bytes


def request_overhead_bytes(kind: str = "slice", round_index: int = 100, index: int = 10) -> int:
    """Framing of one slice/aggregate/trail request and its reply, without the body's own bytes."""
    run = "0" * RUN_ID_CHARS
    key = "segment" if kind == "trail" else "slice"
    request = frame_bytes({"run": run, "round": round_index, key: index})
    reply = frame_bytes({"round": round_index, key: index})
    return request + reply


def measure_wire_sizes(model_config=None, chunk: int = 4096) -> tuple[WireSizes, dict[str, int]]:
    """WireSizes with the fixed parts measured by serializing real payloads of `model_config` (default: the
    tiny preset), and the real sizes themselves ({"slice": ..., "segment": ..., "final": ..., "params": ...,
    "packed": ...}) so a caller can check the per-parameter model against them. The packing share is measured
    on trail states after real AdamW steps past the warm-up (on random tokens): what packs is the spread of
    the values' exponents, which constant or untrained tensors would overstate."""
    import torch

    from gpunite.manifest import TrainSection
    from gpunite.model import PRESETS, build_model, param_count
    from gpunite.proof.trail import Segment, capture_state, final_to_bytes, segment_to_bytes
    from gpunite.swarm.protocol import pack_floats
    from gpunite.train.compression import compress, payload_to_bytes
    from gpunite.train.trainer import InnerTrainer
    from gpunite.train.weights import trainable_state

    config = model_config or PRESETS["tiny"]
    params = param_count(config)
    model = build_model(config, seed=0)
    train_cfg = TrainSection()
    trainer = InnerTrainer(model, train_cfg, device="cpu", step=train_cfg.warmup_steps)
    tokens = torch.Generator().manual_seed(0)
    seq_len = min(config.max_seq_len, 32)

    def step() -> None:
        trainer.train_step(torch.randint(0, config.vocab_size, (2, seq_len + 1), generator=tokens))

    # AdamW's real state (names, shapes, dtypes) after a few steps; the values only change the packed sizes
    step()
    base = {name: t.clone() for name, t in trainable_state(model).items()}
    step()
    start = capture_state(model, trainer)
    step()
    end = capture_state(model, trainer)
    segment_data = segment_to_bytes(  # a segment as a verifier first asks for it: its start state only
        Segment(0, start, None, first_optimizer_hash=start.optimizer_hash, first_step=1), base)
    final_data = final_to_bytes(end)
    segment, final = len(segment_data), len(final_data)
    packed = len(pack_floats(segment_data)) + len(pack_floats(final_data))
    vector = torch.randn(params, generator=torch.Generator().manual_seed(1))
    whole = len(payload_to_bytes(compress(vector, "int8", chunk)))
    body_header = whole - (params * INT8_BYTES + FP32_BYTES * -(-params // chunk))
    sizes_per_param = WireSizes(chunk=chunk)
    sizes = WireSizes(
        chunk=chunk,
        request_bytes=float(request_overhead_bytes() + body_header),
        segment_header_bytes=float(segment - params * sizes_per_param.segment_bytes_per_param),
        final_header_bytes=float(final - params * sizes_per_param.final_bytes_per_param),
        packed_share=packed / (segment + final),
    )
    return sizes, {"params": params, "slice": whole, "segment": segment, "final": final, "packed": packed}
