"""A swarm peer playing one of the proof layer's cheats (`gpunite join --adversary MODE`, demos and tests only).

The strategy (`gpunite.proof.adversary.MODES`) gets the same round an honest peer trains and writes its
trail into the peer's own TrailRecorder, so the peer serves the cheater's trail segments to verifiers
exactly as an honest peer serves its own; the peer publishes the contribution and serves its delta slices.
What a strategy needs beyond the peer's own round comes from the live swarm:

- copy_delta: waits for another trainer's contribution of this round, fetches its slices and every trail
  segment over P2P and serves them as its own, under its own identity and work units.
- replay_old: keeps its own last submission (delta and trail) and resubmits it in later rounds.
- substituted_data: trains on another trainer's units of this round instead of its own.
- sybil: a second identity (derived from the peer's key) heartbeats as a trainer on the same libp2p node,
  mirroring its host's round and weights, so closes put it in the roster and it is assigned units; the peer
  then claims its one trained delta and trail again under that identity (the node serves both from the same
  slices and trail). It never verifies: audits it is drawn for time out until its claim is proven.
- forged_signature: publishes a record whose signature no longer verifies; every peer drops it on parsing.

Each cheating record's id is appended to HOME/adversary.jsonl, so demos and tests can check that none merged.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from gpunite.identity import Identity, RecordError, canonical_json, peer_id_of, record_hash
from gpunite.records import Contribution, WorkUnit, parse_record
from gpunite.swarm.protocol import HANDLE_TRAIL, ProtocolError, run_key

if TYPE_CHECKING:  # importing them here would load torch for the CLI's option checks
    from gpunite.proof.adversary import Submission
    from gpunite.swarm.checks import RoundContext
    from gpunite.swarm.membership import Membership
    from gpunite.swarm.peer import Peer

log = logging.getLogger("gpunite.swarm.adversary")

# Every proof adversary mode (gpunite.proof.adversary.CHEAT_MODES, checked by a test): kept literal here so
# the CLI can validate --adversary without importing torch.
SWARM_ADVERSARIES = ("random_delta", "scaled_delta", "fewer_steps", "half_faked", "skipped_data",
                     "substituted_data", "copy_delta", "replay_old", "fabricated_trail", "forged_signature",
                     "sybil", "poisoned_delta")
ADVERSARY_LOG = "adversary.jsonl"
SYBIL_IDENTITIES = 1


def sybil_identity(identity: Identity, index: int = 0) -> Identity:
    """The index-th extra identity a Sybil peer claims its work under (secret: derived from its private key;
    Ed25519 signatures are deterministic, so the same peer always gets the same Sybils)."""
    return Identity.from_seed(identity.sign_bytes(f"gpunite sybil identity {index}".encode()).encode())


@dataclass
class _Memory:
    """What an adversary peer keeps between rounds."""

    history: list[Submission] = field(default_factory=list)  # its own last submission
    sybils: dict[str, Membership] = field(default_factory=dict)  # sybil peer id -> its heartbeat publisher
    sybil_identities: dict[str, Identity] = field(default_factory=dict)


_MEMORY: dict[str, _Memory] = {}


def adversary_contribution(peer: Peer, mode: str, ctx: RoundContext, units: list[WorkUnit],
                           bounds: list[tuple[int, int]]) -> tuple[Contribution, list[bytes]]:
    """Run the cheat on the peer's round: its contribution as published (the signature may be forged) and
    the compressed delta's slices. Extra identities' claims (sybil) are published here."""
    from gpunite.proof.adversary import MODES, RoundWork
    from gpunite.train.compression import payload_from_bytes, payload_to_bytes, slice_payload
    from gpunite.train.weights import flatten

    cfg = peer.train_cfg
    memory = _MEMORY.setdefault(peer.peer_id, _Memory())
    # The peer loaded the round's base weights into its model before training: start from those.
    base = {name: t.clone() for name, t in peer.layout.named(flatten(peer.params)).items()}
    work = RoundWork(
        run_id=peer.run_id, round=ctx.round, base=base, units=units,
        model_config=peer.model_config, train_cfg=cfg, seq_len=ctx.seq_len, trail_interval=ctx.trail_interval,
        first_step=peer.trainer.step, total_steps=peer.trainer.total_steps, loader=peer._load_sequences,
        identity=peer.identity, recorder=peer.recorder, slice_bounds=bounds, time=time.time(),
        optimizer_state=peer.trainer.optimizer_state_tensors())
    copied_slices: list[bytes] | None = None
    if mode == "copy_delta":
        copied = _copy_victim(peer, ctx, bounds, memory)
        if copied is not None:
            work.published, copied_slices = [copied[0]], copied[1]
    elif mode == "replay_old":
        work.history = _replayable(peer, ctx, memory)
    elif mode == "substituted_data":
        work.foreign_units = _foreign_units(ctx, peer.peer_id, units, memory)
    elif mode == "sybil":
        work.sybils = _sybils(peer, ctx, memory)

    submissions = MODES[mode](work)
    if mode == "substituted_data" and not work.foreign_units:  # nobody else's data: it trained its own
        submissions = [replace(s, cheating=False) for s in submissions]
    own = next(s for s in submissions if s.record.get("signer") == peer.identity.public_key_hex)
    for extra in submissions:
        if extra is not own:
            _publish_foreign(peer, ctx, extra)
    memory.history = [own]
    _log_submissions(peer, mode, ctx.round, submissions)

    record = _as_published(own.record)
    if copied_slices is not None:
        return record, copied_slices
    payload = payload_from_bytes(own.delta_bytes, peer.numel, cfg.compression_chunk, method=cfg.compression)
    return record, [payload_to_bytes(slice_payload(payload, start, end)) for start, end in bounds]


def _as_published(raw: dict) -> Contribution:
    """The record object whose bytes go into the DHT: verified if its signature holds, as-is if forged."""
    try:
        record = parse_record(raw)
    except RecordError as exc:
        log.info("publishing a contribution whose signature does not verify (%s)", exc)
        return Contribution.model_validate(raw)
    if not isinstance(record, Contribution):
        raise TypeError(f"adversary produced a {record.kind} record")
    return record


def _publish_foreign(peer: Peer, ctx: RoundContext, submission: Submission) -> None:
    """Store another identity's claim under that identity's own subkey (as its own peer would)."""
    record = parse_record(submission.record)
    peer.node.store(run_key(peer.run_id, "contrib", ctx.round), record.peer_id, canonical_json(submission.record),
                    ttl_s=max(600.0, 4 * peer.train_cfg.round_deadline_s))
    log.info("round %d: claimed the same work again as %s", ctx.round, record.peer_id[:12])


def _log_submissions(peer: Peer, mode: str, round_index: int, submissions: list[Submission]) -> None:
    with open(peer.config.home / ADVERSARY_LOG, "a", encoding="utf-8") as handle:
        for s in submissions:
            signer = s.record.get("signer") or ""
            handle.write(json.dumps({
                "mode": mode, "round": round_index, "record_id": record_hash(s.record), "cheating": s.cheating,
                "peer_id": peer_id_of(signer) if signer else None}) + "\n")


def read_adversary_log(home) -> list[dict]:
    """The submissions an adversary peer logged in its home (empty if it never cheated)."""
    path = home / ADVERSARY_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----- what the strategies need from the live swarm -----
def _copy_victim(peer: Peer, ctx: RoundContext, bounds: list[tuple[int, int]], memory: _Memory
                 ) -> tuple[Submission, list[bytes]] | None:
    """Another trainer's contribution of this round, with its slices, its trail copied into our recorder.

    Waits for one to be published (at most half the round's deadline); None: nobody to copy from.
    """
    from gpunite.proof.adversary import Submission
    from gpunite.swarm.peer import parse_contribution

    give_up = time.time() + peer.train_cfg.round_deadline_s / 2
    tried: set[str] = set()
    while time.time() < give_up and not peer.stopping.is_set():
        found = peer.node.get_records(run_key(peer.run_id, "contrib", ctx.round), parse_contribution)
        for pid, victim in sorted(found.items()):
            if (pid == peer.peer_id or pid in memory.sybils or pid in tried or pid not in ctx.assigned
                    or victim.round != ctx.round or victim.base_hash != ctx.base_hash):
                continue
            tried.add(pid)
            slices = _fetch_copy(peer, ctx, victim, bounds)
            if slices is not None:
                log.info("round %d: copying %s's contribution", ctx.round, pid[:12])
                return Submission(victim.model_dump(mode="json"), b"", peer.recorder, ctx.round, False), slices
        time.sleep(peer.config.poll_s)
    log.info("round %d: no contribution to copy; training honestly", ctx.round)
    return None


def _fetch_copy(peer: Peer, ctx: RoundContext, victim: Contribution, bounds: list[tuple[int, int]]
                ) -> list[bytes] | None:
    """The victim's slices, and its trail states recorded as ours (hash-identical entries); None on failure."""
    from gpunite.errors import GpuniteError
    from gpunite.proof.trail import segment_from_bytes
    from gpunite.swarm.audits import trail_reply_max_bytes
    from gpunite.swarm.node import SwarmError
    from gpunite.train.weights import trainable_state

    slices = []
    for index in range(len(bounds)):
        data = peer.fetch_slice(ctx.round, index, victim.peer_id)
        if data is None:
            return None
        slices.append(data)
    # The model holds the round's base weights here (train_and_commit loaded them before asking us).
    base = {name: t.to("cpu", copy=True) for name, t in trainable_state(peer.model).items()}
    max_bytes = trail_reply_max_bytes(peer.numel)
    try:
        segments = []
        for index in range(len(victim.trail) - 1):
            header = {"round": ctx.round, "segment": index}
            data = peer._request(victim.peer_id, HANDLE_TRAIL, header, max_bytes)[1]
            segments.append(segment_from_bytes(data, base, max_bytes))
    except (SwarmError, ProtocolError, GpuniteError) as exc:
        log.info("could not copy %s's trail: %s", victim.peer_id[:12], exc)
        return None
    peer.recorder.start_round(ctx.round, victim.inner_steps)
    peer.recorder.record_state(segments[0].start)
    for segment in segments:
        peer.recorder.record_state(segment.end)
    if peer.recorder.trail != list(victim.trail):
        log.info("the copied trail of %s does not hash to its commitment", victim.peer_id[:12])
        return None
    return slices


def _replayable(peer: Peer, ctx: RoundContext, memory: _Memory) -> list[Submission]:
    """Our last submission, with its trail copied into this round's store so the peer serves it now."""
    from gpunite.proof.trail import TrailError

    earlier = [s for s in memory.history if s.round < ctx.round]
    if not earlier:
        return []
    old = earlier[-1]
    entries = len(old.record["trail"])
    try:
        states = [peer.recorder.load_state(old.round, index) for index in range(entries)]
    except TrailError as exc:  # pruned: nothing to replay, train honestly
        log.info("round %d: round %d's trail is gone (%s)", ctx.round, old.round, exc)
        return []
    peer.recorder.start_round(ctx.round, old.record["inner_steps"])
    for state in states:
        peer.recorder.record_state(state)
    return [old]


def _foreign_units(ctx: RoundContext, own_id: str, units: list[WorkUnit], memory: _Memory) -> list[WorkUnit]:
    """Another trainer's units of this round holding at least as many sequences as ours (data we prefer)."""
    needed = sum(u.count for u in units)
    for pid in sorted(ctx.assigned):
        theirs = list(ctx.assigned[pid])
        if pid != own_id and pid not in memory.sybils and theirs != list(units) \
                and sum(u.count for u in theirs) >= needed:
            return theirs
    return []


def _sybils(peer: Peer, ctx: RoundContext, memory: _Memory) -> list[tuple[Identity, list[WorkUnit]]]:
    """Start the Sybil identities heartbeating as trainers (once); those the roster gave units this round."""
    if not memory.sybils:
        membership_type = _mirror_membership_type()
        for index in range(SYBIL_IDENTITIES):
            identity = sybil_identity(peer.identity, index)
            membership = membership_type(peer.node, identity, peer.run_id, ["trainer"], peer.config.heartbeat_s,
                                          host=peer.membership)
            membership.start()
            memory.sybils[identity.peer_id] = membership
            memory.sybil_identities[identity.peer_id] = identity
            log.info("sybil identity %s heartbeats on this peer's node", identity.peer_id[:12])
    return [(memory.sybil_identities[pid], list(ctx.assigned[pid])) for pid in sorted(memory.sybils)
            if ctx.assigned.get(pid)]


def _mirror_membership_type() -> type[Membership]:
    """Membership whose heartbeat copies its host peer's round and weights (imported late: it loads hivemind)."""
    from gpunite.swarm.membership import Membership

    @dataclass
    class MirrorMembership(Membership):
        """A Sybil's heartbeat: its host peer's round, weights and node, so closes put it in the roster too."""

        host: Membership | None = None

        def heartbeat(self):
            if self.host is not None:
                self.round, self.weights_hash = self.host.round, self.host.weights_hash
            return super().heartbeat()

    return MirrorMembership
