"""Churn on a local swarm: a seeded schedule of crashes and link cuts, its driver, and what the records say.

The figures (rounds completed, verified work lost, hash agreement, recovery times) come from what the peers
themselves wrote, not from the driver's view.

Events (one peer at a time is out, its restart and rejoin included, so a majority holds the run's state):
- kill: SIGKILL of a peer's process group (the peer and its libp2p daemon: a crash), then, after `down_s`,
  a restart with the same home through `gpunite join` (the first peer too: after start-up it is a peer like
  any other). Its identity, chain and ledger stay on disk; it syncs the latest global state and trains on.
- cut: SIGSTOP of the peer's process group for `down_s`, then SIGCONT. On loopback this stands in for a link
  cut: the peer sends and answers nothing (no heartbeats, no slices, no verdicts) while its connections stay
  open, and when it comes back its round is stale. (A cut of the veth in the namespace test bed,
  gpunite.sim.netbed, is the closer emulation; the soak does not need root this way.)

Definitions, from the records each peer keeps in its home (runs/<run>/chain.jsonl) and from its log:
- canonical chain: for each round, the block content (`Block.block_hash`) held by most surviving peers.
- rounds attempted: every round that opened during the soak (round 0, and r + 1 for every round r some peer
  closed), except the round still open at the stop if it had been open for less than one round deadline
  (it was not yet due). A round that stalled past its deadline counts as attempted.
- round completed: it has a canonical block that merged at least one contribution.
- verified work lost: (round, contribution) pairs that a followed round close accepted (they passed the cheap
  checks and, when audited, their audits) but whose pseudo-gradient did not fully reach the weights every
  surviving peer holds: (a) accepted in some peer's block of the round but not in the canonical block
  (a fork), (b) a slice of it was missing from an aggregation that went into the canonical weights (its
  slices could not be fetched or were dropped), or (c) a round that was in a peer's chain before it was
  killed and is missing from that chain afterwards (verified rounds vanishing on restart).
- hash agreement: every surviving peer holds the final round (the last round all of them closed) with the
  same block, and no round of the soak has two different blocks among the surviving peers' chains.
- recovery time of an event: from the peer coming back (restart spawned, or SIGCONT) until it has merged a
  round after the swarm's round at that moment (it is back in step, training and agreeing).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from gpunite.swarm.demo import DemoError, LocalSwarm, PeerProcess

KINDS = ("kill", "cut")


@dataclass(frozen=True)
class ChurnEvent:
    at_s: float  # seconds after the soak's start (round 1 reached by every peer)
    kind: str  # "kill" (SIGKILL, then restart) or "cut" (SIGSTOP, then SIGCONT)
    peer: str
    down_s: float


def churn_schedule(seed: int, peers: list[str], duration_s: float, *, first_peer: str = "peer1",
                   gap_s: tuple[float, float] = (25.0, 45.0), down_s: tuple[float, float] = (4.0, 15.0),
                   quiet_tail_s: float = 90.0, max_events: int = 200) -> list[ChurnEvent]:
    """A seeded schedule of kills and cuts, one peer at a time, over duration_s; the first kills first_peer.

    An event's peer is out for down_s, then the swarm gets gap_s before the next one; nothing happens in the
    last quiet_tail_s, so every peer can be back in step before the soak ends.
    """
    if len(peers) < 2:
        raise ValueError("churn needs at least two peers: one is out while the others go on")
    rng = random.Random(seed)
    events: list[ChurnEvent] = []
    at = rng.uniform(*gap_s) / 2
    while len(events) < max_events:
        down = round(rng.uniform(*down_s), 1)
        if at + down + gap_s[0] > duration_s - quiet_tail_s:
            break
        kind = "kill" if not events else rng.choice(KINDS)
        peer = first_peer if not events else rng.choice(peers)
        events.append(ChurnEvent(round(at, 1), kind, peer, down))
        at += down + rng.uniform(*gap_s)
    return events


@dataclass
class EventOutcome:
    event: ChurnEvent
    started: float  # wall clock
    back: float | None = None  # restart spawned / SIGCONT sent
    skipped: bool = False  # the peer was already out when the event came due: nothing was done
    swarm_round_at_back: int | None = None
    rounds_done_at_back: int = 0
    recovered: float | None = None
    chain_before: dict[int, str] = field(default_factory=dict)  # its chain (round -> block hash) at the kill

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered is None or self.back is None else round(self.recovered - self.back, 1)


class ChurnDriver:
    """Carries out a schedule on a LocalSwarm, measures recoveries, and always resumes what it stopped."""

    def __init__(self, swarm: LocalSwarm, schedule: list[ChurnEvent], peer_extra: list[str] | None = None
                 ) -> None:
        self.swarm = swarm
        self.schedule = sorted(schedule, key=lambda e: e.at_s)
        self.peer_extra = list(peer_extra or [])
        self.outcomes: list[EventOutcome] = []
        self.crashes: list[dict[str, Any]] = []  # peers that died without being killed (bugs), restarted
        self._stopped: set[str] = set()

    # ----- what the swarm looks like now -----
    def swarm_round(self) -> int:
        statuses = self.swarm.statuses()
        rounds = [s.get("round", 0) for name, s in statuses.items() if name not in self._stopped]
        return max(rounds, default=0)

    def _status(self, name: str) -> dict[str, Any]:
        peer = self.swarm.peers.get(name)
        return (peer.status() or {}) if peer is not None else {}

    # ----- the events -----
    def run(self, duration_s: float, started: float | None = None, poll_s: float = 0.5,
            recovery_wait_s: float = 300.0, until_done: bool = False) -> None:
        """Run the schedule until duration_s after `started`; every stopped peer is resumed on the way out.

        An event's at_s is the earliest it starts: it also waits until the peer of the event before has
        recovered (at most recovery_wait_s), so that one peer at a time is out, restarts and rejoins
        included, however slow a restart is on a loaded machine. until_done: return once every event ran
        and recovered (tests), instead of at the end of duration_s (the soak).
        """
        started = time.time() if started is None else started
        pending = list(self.schedule)
        active: EventOutcome | None = None
        try:
            while time.time() - started < duration_s:
                now = time.time() - started
                if until_done and not pending and active is None and self._previous_recovered(0.0):
                    return
                if (active is None and pending and now >= pending[0].at_s
                        and self._previous_recovered(recovery_wait_s)):
                    active = self._begin(pending.pop(0))
                if (active is not None and active.back is None
                        and time.time() - active.started >= active.event.down_s):
                    self._end(active)
                self._watch_recoveries()
                if active is not None and active.back is not None:
                    active = None
                self._restart_crashed()
                time.sleep(poll_s)
        finally:
            for name in list(self._stopped):
                self._signal(name, signal.SIGCONT)
            self._stopped.clear()

    def _previous_recovered(self, wait_s: float) -> bool:
        """The last event's peer is back in step, or has had wait_s since it came back (then we go on)."""
        if not self.outcomes:
            return True
        last = self.outcomes[-1]
        if last.skipped or last.recovered is not None:
            return True
        return last.back is not None and wait_s > 0 and time.time() - last.back >= wait_s

    def _begin(self, event: ChurnEvent) -> EventOutcome:
        outcome = EventOutcome(event, time.time())
        peer = self.swarm.peers.get(event.peer)
        self.outcomes.append(outcome)
        if peer is None or not peer.alive:
            outcome.skipped, outcome.back = True, outcome.started
            return outcome
        if event.kind == "kill":
            outcome.chain_before = chain_blocks(peer.home)
            self.swarm.kill(event.peer)
        else:
            self._signal(event.peer, signal.SIGSTOP)
            self._stopped.add(event.peer)
        return outcome

    def _end(self, outcome: EventOutcome) -> None:
        name = outcome.event.peer
        outcome.swarm_round_at_back = self.swarm_round()
        if outcome.event.kind == "kill":
            self._restart_crashed()
            self.swarm.join(name, self._entry_address(name), extra=self.peer_extra)
            outcome.rounds_done_at_back = 0
        else:
            self._signal(name, signal.SIGCONT)
            self._stopped.discard(name)
            outcome.rounds_done_at_back = self._status(name).get("rounds_done", 0)
        outcome.back = time.time()

    def _watch_recoveries(self) -> None:
        for outcome in self.outcomes:
            if outcome.skipped or outcome.back is None or outcome.recovered is not None:
                continue
            status = self._status(outcome.event.peer)
            if (status.get("rounds_done", 0) > outcome.rounds_done_at_back
                    and status.get("round", 0) > outcome.swarm_round_at_back):
                outcome.recovered = time.time()

    def _restart_crashed(self) -> None:
        crashed = [name for name, peer in self.swarm.peers.items()
                   if peer.process.poll() is not None and name not in self._stopped]
        for name in crashed:  # out of the swarm's list first: address() refuses to look past a dead peer
            peer = self.swarm.kill(name)
            tail = peer.log_path.read_text(errors="replace")[-1200:]
            self.crashes.append({"peer": name, "code": peer.process.returncode, "time": time.time(),
                                 "log_tail": tail})
        for name in crashed:
            self.swarm.join(name, self._entry_address(name), extra=self.peer_extra)

    def _entry_address(self, name: str, timeout_s: float = 300.0) -> str:
        """The address of a running, unfrozen peer that is in step (not itself rejoining), to join through."""
        rejoining = {o.event.peer for o in self.outcomes if o.recovered is None and not o.skipped}
        give_up = time.time() + timeout_s
        while time.time() < give_up:
            candidates = [peer for peer in self.swarm.peers.values()
                          if peer.name != name and peer.name not in self._stopped and peer.alive]
            for peer in sorted(candidates, key=lambda p: p.name in rejoining):
                status = peer.status()
                if status and status.get("maddrs"):
                    return status["maddrs"][0]
            time.sleep(0.5)
        raise DemoError(f"no running peer to rejoin {name} through within {timeout_s:.0f} s; "
                        f"see the logs in {self.swarm.workdir}")

    def _signal(self, name: str, signum: int) -> None:
        peer: PeerProcess | None = self.swarm.peers.get(name)
        if peer is None:
            return
        try:
            os.killpg(peer.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def wait_all_in_step(self, timeout_s: float, poll_s: float = 0.5) -> bool:
        """Wait until every peer is past the swarm's current round and every event has recovered."""
        target = self.swarm_round() + 1
        give_up = time.time() + timeout_s
        while time.time() < give_up:
            self._watch_recoveries()
            self._restart_crashed()
            statuses = self.swarm.statuses()
            if (all(s.get("round", 0) >= target for s in statuses.values())
                    and len(statuses) == len(self.swarm.peers)
                    and all(o.recovered is not None or o.skipped for o in self.outcomes)):
                return True
            time.sleep(poll_s)
        return False


# ----- the records -----
def chain_entries(home: Path) -> list[dict[str, Any]]:
    """A peer's signed blocks in the order it wrote them (runs/<run>/chain.jsonl), with their block hash."""
    from gpunite.records import Block

    entries = []
    for path in sorted(home.glob("runs/*/chain.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            block = Block.model_validate(json.loads(line))
            entries.append({"round": block.round, "block_hash": block.block_hash,
                            "accepted": list(block.accepted), "weights_hash": block.weights_hash,
                            "time": block.time})
    return entries


def chain_blocks(home: Path) -> dict[int, str]:
    """Round -> block hash of the last block the peer wrote for that round."""
    return {entry["round"]: entry["block_hash"] for entry in chain_entries(home)}


_AGGREGATED = re.compile(r"aggregated slice (\d+) of round (\d+) from (\d+) contributions")


def aggregation_counts(log_text: str) -> list[tuple[int, int, int]]:
    """(round, slice, contributions merged) for every slice aggregation a peer logged."""
    return [(int(m.group(2)), int(m.group(1)), int(m.group(3))) for m in _AGGREGATED.finditer(log_text)]


def analyze(homes: dict[str, Path], logs: dict[str, str], outcomes: list[EventOutcome],
            round_deadline_s: float, stopped_at: float) -> dict[str, Any]:
    """The soak's figures from the surviving peers' records (see the module docstring for the definitions)."""
    chains = {name: chain_entries(home) for name, home in homes.items()}
    last_block = {name: {e["round"]: e for e in entries} for name, entries in chains.items()}
    all_rounds = sorted({r for blocks in last_block.values() for r in blocks})
    canonical: dict[int, dict[str, Any]] = {}
    disagreeing_rounds = []
    for r in all_rounds:
        votes = Counter(blocks[r]["block_hash"] for blocks in last_block.values() if r in blocks)
        best, _ = max(votes.items(), key=lambda item: (item[1], item[0]))
        canonical[r] = next(blocks[r] for blocks in last_block.values()
                            if r in blocks and blocks[r]["block_hash"] == best)
        if len(votes) > 1:
            disagreeing_rounds.append(r)

    # Rounds attempted: every round that opened, the one open at the stop only once it was due.
    last_closed = all_rounds[-1] if all_rounds else -1
    attempted = list(range(last_closed + 1))
    open_since = canonical[last_closed]["time"] if all_rounds else None
    if open_since is not None and stopped_at - open_since > round_deadline_s:
        attempted.append(last_closed + 1)
    completed = [r for r in attempted if r in canonical and canonical[r]["accepted"]]

    # Verified work lost.
    forked_out = set()
    for entries in chains.values():
        for entry in entries:
            keep = canonical.get(entry["round"])
            for cid in entry["accepted"]:
                if keep is None or cid not in keep["accepted"]:
                    forked_out.add((entry["round"], cid))
    short_slices = []  # (round, slice, merged, accepted) of aggregations that went into agreeing weights
    for name, text in logs.items():
        agreeing = {r for r, e in last_block.get(name, {}).items() if canonical.get(r, {}).get("block_hash")
                    == e["block_hash"]}
        for r, index, merged in aggregation_counts(text):
            accepted = len(canonical[r]["accepted"]) if r in canonical else 0
            if r in agreeing and merged < accepted:
                short_slices.append((r, index, merged, accepted))
    # Per round, the largest shortfall of any slice: at least that many accepted contributions did not merge.
    slices_missing = sum(max(a - m for rr, _, m, a in short_slices if rr == r)
                         for r in {s[0] for s in short_slices})
    vanished = []
    for outcome in outcomes:
        after = chain_blocks(homes[outcome.event.peer]) if outcome.event.peer in homes else {}
        vanished += [(outcome.event.peer, r) for r in outcome.chain_before if r not in after]

    # Hash agreement at the end.
    final_round = min((max(blocks) for blocks in last_block.values() if blocks), default=-1)
    final_hashes = {name: blocks.get(final_round, {}).get("block_hash")
                    for name, blocks in last_block.items()}
    distinct_final = set(final_hashes.values())
    final_agree = final_round >= 0 and None not in distinct_final and len(distinct_final) == 1

    block_times = [canonical[r]["time"] for r in all_rounds]
    gaps = [b - a for a, b in pairwise(block_times)]
    ends = block_times[1:]
    recoveries = [o.recovery_s for o in outcomes if o.recovery_s is not None]
    windows = [(o.started, o.recovered or stopped_at) for o in outcomes if not o.skipped]
    return {
        "rounds_attempted": len(attempted),
        "rounds_completed": len(completed),
        "rounds_completed_ratio": round(len(completed) / len(attempted), 4) if attempted else 0.0,
        "rounds_not_completed": [r for r in attempted if r not in completed],
        "verified_work_lost": len(forked_out) + slices_missing + len(vanished),
        "verified_work_lost_detail": {"forked_out": sorted(forked_out)[:20], "slices_missing": slices_missing,
                                      "short_aggregations": sorted(set(short_slices))[:20],
                                      "vanished_rounds": vanished[:20]},
        "hash_agreement": final_agree and not disagreeing_rounds,
        "final_round": final_round,
        "final_block_hashes": {name: (h or "")[:12] for name, h in final_hashes.items()},
        "rounds_with_disagreeing_blocks": disagreeing_rounds,
        "recovery_times_s": recoveries,
        "recovery_p50_s": round(statistics.median(recoveries), 1) if recoveries else None,
        "recovery_max_s": max(recoveries) if recoveries else None,
        "unrecovered_events": sum(1 for o in outcomes if o.recovered is None and not o.skipped),
        # Round times (between consecutive canonical blocks) with no event in progress, and with one.
        "round_time_calm_p50_s": _p50([g for g, t in zip(gaps, ends) if not _in_event(t, windows)]),
        "round_time_churn_p50_s": _p50([g for g, t in zip(gaps, ends) if _in_event(t, windows)]),
        "round_time_max_s": round(max(gaps), 1) if gaps else None,
    }


def _p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def _in_event(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(start <= t <= end for start, end in windows)


def outcome_rows(outcomes: list[EventOutcome]) -> list[dict[str, Any]]:
    return [{**asdict(o.event), "recovery_s": o.recovery_s} for o in outcomes]
