"""Proof-of-training benchmark: every adversary mode against honest trainers, through the real proof code.

One process plays a small swarm: honest trainers (one training in bf16 autocast, as a GPU peer would) and
one cheater per adversary mode train a real model with InnerTrainer for several DiLoCo rounds, recording real
trails; an aggregator runs the cheap checks, the round coordinator signs the audit beacon, the drawn
verifiers fetch segments and replay them, sign verdicts, and the merge policy decides (and bans).

Printed: one JSON line with detection_rate (min over modes of the share of cheating rounds in which no cheat
merged under the run's policy: the round's own checks and audits, the bans, and the suspects, whose
contributions merge only when audited and accepted), per_mode, detection_on_merits (the same, each round
judged on its own merits with bans and suspicion aside: the measure before the suspect rule), never_merged_unverified, false_reject_rate over >= 200
honest audits (fp32 and bf16 trainers, verifiers on 1 or 2 threads, fp32 or bf16), verification_overhead
(verifier FLOPs / training FLOPs on honest contributions at the default policy), the honest and cheat
replay distances (the tolerance's calibration), and p_caught_5_rounds for a persistent half-faker
(analytic from the policy, with the per-audit detection measured here).

Usage: python benchmarks/proof_of_training.py [--rounds N] [--honest-audits N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpunite.identity import Identity, RecordError
from gpunite.manifest import ProofSection, TrainSection
from gpunite.model import ModelConfig, build_model, flops_per_token, param_count
from gpunite.proof.adversary import CHEAT_MODES, MODES, RoundWork, Submission, honest
from gpunite.proof.audit import AuditBounds, held_out_loss, make_verdict, verify_contribution
from gpunite.proof.checks import RoundContext, check_contribution, check_delta, check_round
from gpunite.proof.policy import (
    BanList,
    MergePolicy,
    SuspectList,
    apply_decision,
    assign_audit,
    audit_outcome,
    merge_decision,
    note_audit,
)
from gpunite.proof.selection import beacon_from_signature, p_caught_within, p_segments_catch, sign_beacon
from gpunite.proof.trail import (
    TrailRecorder,
    batches_for_steps,
    optimizer_hash,
    segment_from_bytes,
    trail_steps,
)
from gpunite.records import GENESIS, Contribution, Verdict, WorkUnit, parse_record
from gpunite.swarm.aggregation import slice_bounds
from gpunite.train.compression import decompress, payload_from_bytes
from gpunite.train.diloco import OuterOptimizer
from gpunite.train.weights import flatten, trainable_state, unflatten_into, weights_hash

MODEL = ModelConfig(vocab_size=256, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=172,
                    max_seq_len=64, tie_embeddings=True)
SEQ_LEN, BATCH, INNER_STEPS = 16, 4, 100
TRAIL_K = ProofSection().trail_interval  # the run default, as the policy below
N_HONEST, N_SYBILS = 3, 2
POLICY = MergePolicy(audit_fraction=0.85, segments_per_audit=2, verifiers_per_audit=1, accepts_required=1,
                     bounds=AuditBounds())
RUN_ID = hashlib.sha256(b"gpunite proof-of-training benchmark").hexdigest()


def markov_corpus(n_sequences: int, seed: int) -> torch.Tensor:
    """Token sequences from a fixed sparse Markov chain: learnable structure, so honest loss falls."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, MODEL.vocab_size, (MODEL.vocab_size, 4), generator=torch.Generator().manual_seed(7))
    tokens = torch.empty(n_sequences, SEQ_LEN + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, MODEL.vocab_size, (n_sequences,), generator=generator)
    for position in range(1, SEQ_LEN + 1):
        choice = torch.randint(0, 4, (n_sequences,), generator=generator)
        tokens[:, position] = successors[tokens[:, position - 1], choice]
    return tokens


class Swarm:
    """The benchmark's peers, data, assignment and global weights trajectory."""

    def __init__(self, rounds: int, workdir: Path) -> None:
        self.rounds = rounds
        self.workdir = workdir
        self.train_cfg = TrainSection(batch_size=BATCH, inner_steps=INNER_STEPS, lr=3e-3, warmup_steps=10,
                                      compression="int8", compression_chunk=1024)
        self.total_steps = rounds * INNER_STEPS
        per_round = (N_HONEST + 1 + N_SYBILS + 1) * INNER_STEPS * BATCH
        self.corpus = markov_corpus(per_round * rounds, seed=1)
        self.shard = hashlib.sha256(self.corpus.numpy().tobytes()).hexdigest()
        self.held_out_batch = markov_corpus(BATCH, seed=2)
        self.honest_ids = [Identity.from_seed(f"honest-{i}".encode()) for i in range(N_HONEST)]
        self.cheater = Identity.from_seed(b"cheater")
        self.sybils = [Identity.from_seed(f"sybil-{i}".encode()) for i in range(N_SYBILS)]
        self.flops_per_token = flops_per_token(MODEL, SEQ_LEN)
        model = build_model(MODEL, seed=0)
        self.bases = [{name: t.clone() for name, t in trainable_state(model).items()}]
        self.numel = sum(t.numel() for t in self.bases[0].values())
        self.slices = slice_bounds(self.numel, 4, self.train_cfg.compression_chunk)
        self.honest_subs: list[list[Submission]] = []
        self.recorders = {i.peer_id: TrailRecorder(TRAIL_K, workdir / f"peer-{i.peer_id[:8]}")
                          for i in self.honest_ids}

    def loader(self, shard: str, first: int, count: int) -> torch.Tensor:
        if shard != self.shard:
            raise KeyError(f"unknown shard {shard[:12]}")
        return self.corpus[first : first + count]

    def units(self, round_index: int, slot: int) -> list[WorkUnit]:
        size = INNER_STEPS * BATCH
        first = (round_index * (N_HONEST + 1 + N_SYBILS + 1) + slot) * size
        return [WorkUnit(shard=self.shard, first=first, count=size // 2),
                WorkUnit(shard=self.shard, first=first + size // 2, count=size - size // 2)]

    def assigned(self, round_index: int) -> dict[str, list[WorkUnit]]:
        peers = [*self.honest_ids, self.cheater, *self.sybils]
        return {p.peer_id: self.units(round_index, slot) for slot, p in enumerate(peers)}

    def work(self, round_index: int, identity: Identity, recorder: TrailRecorder, **extra) -> RoundWork:
        return RoundWork(
            run_id=RUN_ID, round=round_index, base=self.bases[round_index],
            units=self.assigned(round_index)[identity.peer_id], model_config=MODEL, train_cfg=self.train_cfg,
            seq_len=SEQ_LEN, trail_interval=TRAIL_K, first_step=round_index * INNER_STEPS,
            total_steps=self.total_steps, loader=self.loader, identity=identity, recorder=recorder,
            slice_bounds=self.slices, time=1_700_000_000.0 + round_index, **extra,
        )

    def train_honest_rounds(self) -> float:
        """Honest trainers for every round (shared by all modes); the global weights follow their mean delta."""
        outer = OuterOptimizer(self.train_cfg.outer_lr, self.train_cfg.outer_momentum, nesterov=True)
        seconds = 0.0
        names = list(self.bases[0])
        for round_index in range(self.rounds):
            started = time.perf_counter()
            subs = []
            for slot, identity in enumerate(self.honest_ids):
                # Peer 1 trains in bf16 autocast, as a GPU peer would; the CPU verifiers replay in fp32.
                autocast = torch.bfloat16 if slot == 1 else None
                subs += honest(self.work(round_index, identity, self.recorders[identity.peer_id],
                                         autocast_dtype=autocast))
            seconds += time.perf_counter() - started
            self.honest_subs.append(subs)
            deltas = [decompress(payload_from_bytes(s.delta_bytes, self.numel, self.train_cfg.compression_chunk))
                      for s in subs]
            base = flatten(self.bases[round_index][n] for n in names)
            new = outer.step(base, torch.stack(deltas).mean(dim=0))
            weights = {n: t.clone() for n, t in self.bases[round_index].items()}
            unflatten_into(new, list(weights.values()))
            self.bases.append(weights)
        return seconds


class Tally:
    def __init__(self) -> None:
        self.verifier_flops_honest = 0.0
        self.training_flops_honest = 0.0
        self.honest_audits = 0
        self.honest_rejected = 0
        self.honest_distances: list[float] = []
        self.cheat_distances: dict[str, list[float]] = {}
        self.merged_unverified = 0
        self.half_faked_audits = 0
        self.half_faked_caught = 0
        self.held_out_rise: dict[str, list[float]] = {}
        self.faked_segments = 0
        self.faked_segments_rejected = 0
        self.honest_rejected_as_suspects = 0


def judge_round(swarm: Swarm, round_index: int, subs: list[Submission], bans: BanList, suspects: SuspectList,
                tally: Tally, mode: str, earlier_deltas: frozenset[str]) -> dict[int, tuple[bool, bool, str, bool]]:
    """The aggregator's and verifiers' whole job for one round, per submission: (merged on its own merits,
    proven cheat, reason, merged under the run's bans and suspects). Bans and suspects are then updated."""
    suspected = suspects.as_of(round_index)
    base = swarm.bases[round_index]
    ctx = RoundContext(run_id=RUN_ID, round=round_index, base_hash=weights_hash(base), batch_size=BATCH,
                       seq_len=SEQ_LEN, trail_interval=TRAIL_K, flops_per_token=swarm.flops_per_token,
                       norm_bound=3.0, assigned=swarm.assigned(round_index), earlier_deltas=earlier_deltas)
    outcome: dict[int, tuple[bool, bool, str]] = {}
    parsed: dict[int, Contribution] = {}
    delta_findings, vectors = {}, {}
    for i, sub in enumerate(subs):
        try:
            record = parse_record(sub.record)
        except RecordError as exc:
            outcome[i] = (False, False, str(exc), False)
            continue
        if not isinstance(record, Contribution):
            outcome[i] = (False, False, f"not a contribution: {record.kind}", False)
            continue
        parsed[i] = record
        delta_findings[i], vectors[i] = check_delta(record, sub.delta_bytes, swarm.numel,
                                                    swarm.train_cfg.compression_chunk, "int8", swarm.slices)
    round_findings = check_round(list(parsed.values()), ctx)
    coordinator = swarm.honest_ids[round_index % N_HONEST]
    ids = [c.record_id for c in parsed.values()]
    signature = sign_beacon(coordinator, RUN_ID, round_index, GENESIS, ids)
    beacon = beacon_from_signature(coordinator.public_key_hex, signature, RUN_ID, round_index, GENESIS, ids)
    by_peer = {p.peer_id: p for p in swarm.honest_ids}
    base_loss, base_loss_flops = held_out_loss(MODEL, swarm.train_cfg, base, swarm.held_out_batch)
    for i, contribution in parsed.items():
        sub = subs[i]
        findings = check_contribution(contribution, ctx) + round_findings[contribution.record_id] + delta_findings[i]
        verdicts: list[Verdict] = []
        assignment = assign_audit(beacon, contribution, POLICY, list(by_peer), coordinator.peer_id,
                                  forced=any(not f.blocking for f in findings))
        audit_flops = 0.0
        if assignment.audited and not any(f.blocking for f in findings) and vectors[i] is not None:
            for verifier_id in assignment.verifiers:
                result = verify_contribution(
                    contribution, assignment.segments,
                    lambda s, part, sub=sub: sub.recorder.segment_part(round_index, s, part),
                    lambda sub=sub: sub.recorder.final_payload(round_index),
                    base, vectors[i], swarm.loader, BATCH, MODEL, swarm.train_cfg,
                    total_steps=swarm.total_steps, bounds=POLICY.bounds, held_out=(swarm.held_out_batch, base_loss),
                    expected_first_step=round_index * INNER_STEPS, expected_first_optimizer_hash=optimizer_hash({}),
                )
                audit_flops += result.replay_flops + base_loss_flops / len(parsed)
                verdict = make_verdict(by_peer[verifier_id], contribution, result, time=1_700_000_000.0)
                verdicts.append(parse_record(verdict.model_dump(mode="json")))
                if "held_out_final[-1]" in result.details:
                    rise = result.details["held_out_final[-1]"] / result.details["held_out_base[-1]"] - 1
                    tally.held_out_rise.setdefault(mode if sub.cheating else "honest", []).append(rise)
                if result.distance is not None:
                    if sub.cheating:
                        tally.cheat_distances.setdefault(mode, []).append(result.distance)
                    else:
                        tally.honest_distances.append(result.distance)
        decision = merge_decision(contribution, findings, verdicts, POLICY, assignment)
        with_bans = merge_decision(contribution, findings, verdicts, POLICY, assignment, bans, suspected)
        apply_decision(bans, contribution, with_bans)
        note_audit(suspects, audit_outcome(contribution, verdicts, assignment, with_bans))
        if not sub.cheating and decision.merge and not with_bans.merge:
            tally.honest_rejected_as_suspects += 1
            print(f"{mode} round {round_index}: honest rejected under policy: {with_bans.reason}", file=sys.stderr)
        if decision.merge and not _verified(contribution, findings, verdicts, assignment):
            tally.merged_unverified += 1
        if not sub.cheating and assignment.audited and verdicts:
            tally.honest_audits += 1
            tally.honest_rejected += int(not decision.merge)
        if not sub.cheating:
            tally.verifier_flops_honest += audit_flops
            tally.training_flops_honest += contribution.claimed_flops
        if mode == "half_faked" and sub.cheating and assignment.audited and verdicts:
            tally.half_faked_audits += 1
            tally.half_faked_caught += int(not decision.merge)
        outcome[i] = (decision.merge, decision.cheat, decision.reason, with_bans.merge)
    return outcome


def _verified(contribution: Contribution, findings, verdicts: list[Verdict], assignment) -> bool:
    """Independent re-check of a merge: no blocking finding; if audited, enough signed accepts from drawn
    verifiers on this very contribution and no rejection."""
    if any(f.blocking for f in findings):
        return False
    if not assignment.audited:
        return True
    mine = [v for v in verdicts if v.contribution == contribution.record_id and v.peer_id in assignment.verifiers]
    return all(v.accept for v in mine) and len({v.peer_id for v in mine}) >= POLICY.accepts_required


def run_mode(swarm: Swarm, mode: str, tally: Tally) -> dict:
    recorder = TrailRecorder(TRAIL_K, swarm.workdir / f"cheater-{mode}")
    bans = BanList()
    suspects = SuspectList()
    history: list[Submission] = []
    earlier: set[str] = set()
    cheating_rounds = caught_rounds = caught_on_merits = proven_rounds = 0
    first_ban = None
    merged_cheats = 0
    for round_index in range(swarm.rounds):
        sybils = [(s, swarm.assigned(round_index)[s.peer_id]) for s in swarm.sybils]
        work = swarm.work(round_index, swarm.cheater, recorder, published=list(swarm.honest_subs[round_index]),
                          history=history, sybils=sybils,
                          foreign_units=swarm.units(round_index, N_HONEST + 1 + N_SYBILS))
        cheater_subs = MODES[mode](work)
        history.extend(s for s in cheater_subs if s.record.get("signer") == swarm.cheater.public_key_hex)
        subs = swarm.honest_subs[round_index] + cheater_subs
        # A round is caught when no cheat merged under the run's policy (bans and suspects included); the
        # merits figure judges each round alone, as if nothing had been learnt in earlier rounds.
        merit = judge_round(swarm, round_index, subs, bans, suspects, tally, mode, frozenset(earlier))
        merged_cheats += sum(merit[i][3] for i, s in enumerate(subs) if s.cheating)
        for i, sub in enumerate(subs):
            if sub.record.get("delta_hash"):
                earlier.add(sub.record["delta_hash"])
        cheats = [i for i, s in enumerate(subs) if s.cheating]
        if cheats:
            cheating_rounds += 1
            caught_rounds += all(not merit[i][3] for i in cheats)
            caught_on_merits += all(not merit[i][0] for i in cheats)
            proven_rounds += any(merit[i][1] for i in cheats)
        if mode == "half_faked":
            for sub in (s for s in subs if s.cheating):
                _replay_faked_segments(swarm, round_index, sub, tally)
        if first_ban is None and bans.bans:
            first_ban = round_index
        honest_rejects = [merit[i][2] for i, s in enumerate(subs) if not s.cheating and not merit[i][0]]
        if honest_rejects:
            print(f"{mode} round {round_index}: honest rejected: {honest_rejects}", file=sys.stderr)
    return {"cheating_rounds": cheating_rounds, "caught": caught_rounds, "proven": proven_rounds,
            "detection": caught_rounds / cheating_rounds if cheating_rounds else None,
            "caught_on_merits": caught_on_merits,
            "detection_on_merits": caught_on_merits / cheating_rounds if cheating_rounds else None,
            "failed_audit_rounds": _failed_audit_rounds(suspects),
            "banned_in_round": first_ban, "cheats_merged_under_bans": merged_cheats}


def _failed_audit_rounds(suspects: SuspectList) -> list[int]:
    """The rounds in which a drawn verifier rejected a contribution, with proof or without (a suspect next round)."""
    return sorted({r for rounds in suspects.outcomes.values() for r, outcome in rounds.items() if not outcome.passed})


def _replay_faked_segments(swarm: Swarm, round_index: int, sub: Submission, tally: Tally) -> None:
    """Replay every segment the half-faker faked: the share rejected is the per-segment detection."""
    from gpunite.proof.audit import audit_segment

    contribution = parse_record(sub.record)
    base = swarm.bases[round_index]
    steps = trail_steps(contribution.inner_steps, contribution.trail_interval)
    n_segments = len(steps) - 1
    for index in range((n_segments + 1) // 2, n_segments):
        segment = segment_from_bytes(sub.recorder.segment_payload(round_index, index), base)
        batches = batches_for_steps(contribution.work_units, range(steps[index], steps[index + 1]), BATCH,
                                    swarm.loader)
        result = audit_segment(contribution, segment, batches, MODEL, swarm.train_cfg,
                               total_steps=swarm.total_steps, bounds=POLICY.bounds, base=base)
        tally.faked_segments += 1
        tally.faked_segments_rejected += int(not result.accept)


def honest_audit_sweep(swarm: Swarm, n_audits: int, tally: Tally) -> dict:
    """Replay n honest segments under mixed verifier settings; every one must accept."""
    settings = [(1, None), (1, torch.bfloat16), (2, None)]
    counts = {f"{threads}t-{'bf16' if dtype else 'fp32'}": 0 for threads, dtype in settings}
    rejected = 0
    distances: dict[str, list[float]] = {k: [] for k in counts}
    jobs = []
    for round_index, subs in enumerate(swarm.honest_subs):
        for sub in subs:
            contribution = parse_record(sub.record)
            for segment in range(len(contribution.trail) - 1):
                jobs.append((round_index, sub, contribution, segment))
    step = max(1, len(jobs) // n_audits)
    chosen = jobs[::step][:n_audits]
    from gpunite.proof.audit import audit_segment

    previous_threads = torch.get_num_threads()
    for n, (round_index, sub, contribution, index) in enumerate(chosen):
        # Two threads are slow on a shared 2-core machine; one audit in six uses them.
        threads, dtype = settings[n % 3] if n % 6 != 2 else settings[0]
        if n % 6 == 5:
            threads, dtype = settings[2]
        torch.set_num_threads(threads)
        segment = segment_from_bytes(sub.recorder.segment_payload(round_index, index), swarm.bases[round_index])
        steps = trail_steps(contribution.inner_steps, contribution.trail_interval)
        batches = batches_for_steps(contribution.work_units, range(steps[index], steps[index + 1]), BATCH,
                                    swarm.loader)
        result = audit_segment(contribution, segment, batches, MODEL, swarm.train_cfg,
                               total_steps=swarm.total_steps, bounds=POLICY.bounds,
                               expected_first_step=round_index * INNER_STEPS,
                               expected_first_optimizer_hash=optimizer_hash({}), autocast_dtype=dtype,
                               base=swarm.bases[round_index])
        key = f"{threads}t-{'bf16' if dtype else 'fp32'}"
        counts[key] += 1
        distances[key].append(result.distance or 0.0)
        if not result.accept:
            rejected += 1
            print(f"honest sweep reject: {result.reason}", file=sys.stderr)
    torch.set_num_threads(previous_threads)
    tally.honest_audits += len(chosen)
    tally.honest_rejected += rejected
    return {"audits": len(chosen), "rejected": rejected, "by_setting": counts,
            "max_distance_by_setting": {k: max(v) if v else None for k, v in distances.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--honest-audits", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpunite-proof-") as tmp:
        swarm = Swarm(args.rounds, Path(tmp))
        honest_seconds = swarm.train_honest_rounds()
        tally = Tally()
        per_mode = {}
        for mode in CHEAT_MODES:
            per_mode[mode] = run_mode(swarm, mode, tally)
            print(f"{mode}: {per_mode[mode]}", file=sys.stderr)
        sweep = honest_audit_sweep(swarm, args.honest_audits, tally)

    n_segments = len(trail_steps(INNER_STEPS, TRAIL_K)) - 1
    p_segment = p_segments_catch(n_segments, n_segments // 2, POLICY.segments_per_audit)
    measured = tally.half_faked_caught / tally.half_faked_audits if tally.half_faked_audits else 0.0
    # The chance that a replay of a faked segment rejects, measured on every segment the half-faker faked.
    p_detect_segment = tally.faked_segments_rejected / tally.faked_segments if tally.faked_segments else 0.0
    p5 = p_caught_within(5, audit_fraction=POLICY.audit_fraction, n_segments=n_segments,
                         segments_per_audit=POLICY.segments_per_audit, faked_fraction=0.5,
                         p_detect_segment=p_detect_segment)
    # The same chance (analytic) under a default manifest's [proof] and [train] sections.
    defaults, default_h = ProofSection(), TrainSection().inner_steps
    p5_manifest_default = p_caught_within(
        5, audit_fraction=defaults.audit_fraction,
        n_segments=len(trail_steps(default_h, defaults.trail_interval)) - 1,
        segments_per_audit=defaults.segments_per_audit, faked_fraction=0.5)
    detections = {mode: r["detection"] for mode, r in per_mode.items() if r["detection"] is not None}
    on_merits = {mode: r["detection_on_merits"] for mode, r in per_mode.items() if r["detection"] is not None}
    honest_distances = tally.honest_distances
    cheat_min = {m: round(min(v), 4) for m, v in tally.cheat_distances.items()}
    result = {
        "name": "proof_of_training",
        "value": min(detections.values()),
        "unit": "share of cheating rounds caught (min over modes)",
        "detection_rate": min(detections.values()),
        "per_mode": detections,
        "detection_on_merits": min(on_merits.values()),
        "per_mode_on_merits": on_merits,
        "honest_rejected_as_suspects": tally.honest_rejected_as_suspects,
        "per_mode_detail": per_mode,
        "never_merged_unverified": tally.merged_unverified == 0,
        "false_reject_rate": tally.honest_rejected / tally.honest_audits if tally.honest_audits else None,
        "honest_audits": tally.honest_audits,
        "honest_sweep": sweep,
        "verification_overhead": tally.verifier_flops_honest / tally.training_flops_honest,
        "p_caught_5_rounds": p5,
        "p_caught_5_rounds_analytic": p_caught_within(5, audit_fraction=POLICY.audit_fraction,
                                                      n_segments=n_segments,
                                                      segments_per_audit=POLICY.segments_per_audit,
                                                      faked_fraction=0.5),
        "p_caught_5_rounds_manifest_default": p5_manifest_default,
        "half_faked_per_audit_detection": measured,
        "half_faked_per_audit_analytic": p_segment,
        "faked_segment_replay_detection": p_detect_segment,
        "faked_segments_replayed": tally.faked_segments,
        "tolerance": POLICY.bounds.tolerance,
        "honest_distance_max": max(honest_distances) if honest_distances else None,
        "honest_distance_median": statistics.median(honest_distances) if honest_distances else None,
        "cheat_distance_min_by_mode": cheat_min,
        "held_out_rise_max": {k: round(max(v), 4) for k, v in tally.held_out_rise.items()},
        "fresh_tolerance": POLICY.bounds.fresh_tolerance,
        "policy": {"audit_fraction": POLICY.audit_fraction, "segments_per_audit": POLICY.segments_per_audit,
                   "verifiers_per_audit": POLICY.verifiers_per_audit, "accepts_required": POLICY.accepts_required,
                   "trail_interval": TRAIL_K, "inner_steps": INNER_STEPS, "segments": n_segments},
        "setup": {"params": param_count(MODEL), "seq_len": SEQ_LEN, "batch": BATCH, "rounds": swarm.rounds,
                  "honest_trainers": N_HONEST, "sybils": N_SYBILS, "torch": torch.__version__},
        "baseline_honest_training_s": round(honest_seconds, 2),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
