"""Deterministic work assignment: which sequences each peer trains in a round, so no peer picks its own data.

The work pool is the dataset's trainable sequences, cut into work units of `sequences_per_unit` sequences
(`gpunite.records.WorkUnit`: shard hash, first sequence, count). Each epoch visits the units in an order
drawn from (run seed, epoch) alone. A round's units go, in that order, to the round's roster sorted by peer
id, in proportion to each peer's measured speed; units whose trainer's contribution was not accepted go back
to the pool and are handed out first next round. A unit counts as trained once it was accepted, so
`coverage()` is the share of the epoch's sequences trained, and each sequence is trained once per epoch.

Everything is a pure function of (run seed, dataset units, the history of assign/settle calls with their
rosters and accepted sets): every honest peer that saw the same rounds derives the same plan, and a late
joiner continues from `state_dict()` (plain JSON) fetched from any peer.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpunite.errors import GpuniteError
from gpunite.records import WorkUnit

if TYPE_CHECKING:
    from gpunite.data.shards import ShardIndex

# A peer may claim at most this many times the median speed (and no less than its inverse), so no one grabs
# a round's work (and with it the round's merge) by reporting an absurd speed.
MAX_SPEED_RATIO = 4.0


class AssignmentError(GpuniteError, ValueError):
    """A work plan that cannot be built or restored (empty dataset, mismatched or malformed state)."""


def split_units(ranges: Sequence[WorkUnit], sequences_per_unit: int) -> list[WorkUnit]:
    """The dataset's sequence ranges cut into units of at most sequences_per_unit, in (shard, first) order."""
    if sequences_per_unit <= 0:
        raise AssignmentError(f"sequences_per_unit must be > 0, got {sequences_per_unit}")
    units: list[WorkUnit] = []
    previous: WorkUnit | None = None
    for piece in sorted(ranges, key=lambda r: (r.shard, r.first)):
        same_shard = previous is not None and previous.shard == piece.shard
        if same_shard and previous.first + previous.count > piece.first:
            raise AssignmentError(
                f"dataset ranges overlap in shard {piece.shard[:12]} at sequence {piece.first}"
            )
        previous = piece
        for first in range(piece.first, piece.first + piece.count, sequences_per_unit):
            count = min(sequences_per_unit, piece.first + piece.count - first)
            units.append(WorkUnit(shard=piece.shard, first=first, count=count))
    return units


def units_hash(units: Sequence[WorkUnit]) -> str:
    """sha256 of the unit list: a late joiner checks that its dataset cuts into the same units."""
    listing = [[u.shard, u.first, u.count] for u in units]
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


def epoch_order(n_units: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n_units) from (seed, epoch) alone: indices sorted by a hash of all three."""
    def key(index: int) -> bytes:
        return hashlib.sha256(f"gpunite-work:{seed}:{epoch}:{index}".encode()).digest()

    return sorted(range(n_units), key=key)


def _lower_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def effective_speeds(roster: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Speeds used to share work: unknown ones (non-finite, <= 0) become the median; all capped around it."""
    known = [s for _, s in roster if math.isfinite(s) and s > 0]
    if not known:
        return {peer: 1.0 for peer, _ in roster}
    median = _lower_median(known)
    low, high = median / MAX_SPEED_RATIO, median * MAX_SPEED_RATIO
    return {peer: min(max(s, low), high) if math.isfinite(s) and s > 0 else median for peer, s in roster}


def apportion(total: int, roster: Sequence[tuple[str, float]]) -> dict[str, int]:
    """Split total units among peers in proportion to speed (largest remainder, ties by peer id).

    Every peer gets at least one unit when there are enough to go round, taken from the biggest shares.
    """
    peers = sorted({peer for peer, _ in roster})
    if len(peers) != len(roster):
        raise AssignmentError("the roster lists a peer more than once")
    if not peers:
        return {}
    speeds = effective_speeds(roster)
    speed_sum = sum(speeds[p] for p in peers)
    quotas = {p: total * speeds[p] / speed_sum for p in peers}
    counts = {p: math.floor(quotas[p]) for p in peers}
    by_remainder = sorted(peers, key=lambda p: (-(quotas[p] - counts[p]), p))
    for p in by_remainder[: total - sum(counts.values())]:
        counts[p] += 1
    if total >= len(peers):
        for p in peers:
            if counts[p] == 0:
                donor = min(peers, key=lambda q: (-counts[q], q))
                counts[donor] -= 1
                counts[p] = 1
    return counts


class _PlanState(BaseModel):
    """The JSON shape of a plan's state, checked when it comes from another peer."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(1, ge=1, le=1)
    seed: int = Field(ge=0)
    sequences_per_unit: int = Field(gt=0)
    units_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    epoch: int = Field(ge=0)
    cursor: int = Field(ge=0)
    returned: list[int]
    trained: list[int]
    # round -> peer id -> [[epoch, unit index], ...]
    outstanding: dict[int, dict[str, list[tuple[int, int]]]]


class WorkPlan:
    """Who trains which units, round by round, for one run and one dataset."""

    def __init__(self, ranges: Sequence[WorkUnit], seed: int, sequences_per_unit: int = 8) -> None:
        self.units = split_units(ranges, sequences_per_unit)
        if not self.units:
            raise AssignmentError("the dataset has no trainable sequences; add data or lower seq_len")
        self.seed = seed
        self.sequences_per_unit = sequences_per_unit
        self.total_sequences = sum(u.count for u in self.units)
        self.epoch = 0
        self.cursor = 0  # next position in this epoch's order
        self.returned: list[int] = []  # this epoch's units handed back, handed out again first
        self.trained: set[int] = set()  # this epoch's units whose contributions were accepted
        self.outstanding: dict[int, dict[str, list[tuple[int, int]]]] = {}
        self._order = epoch_order(len(self.units), seed, 0)

    @classmethod
    def from_index(cls, index: ShardIndex, seq_len: int, seed: int, sequences_per_unit: int = 8) -> WorkPlan:
        """The plan over a prepared dataset's trainable sequences (its held-out tails excluded)."""
        from gpunite.data.batches import training_units

        ranges = training_units(index, seq_len)
        units = [WorkUnit(shard=r.shard_sha256, first=r.first, count=r.count) for r in ranges]
        return cls(units, seed, sequences_per_unit)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.cursor = epoch, 0
        self.returned, self.trained = [], set()
        self._order = epoch_order(len(self.units), self.seed, epoch)

    def _next_unit(self) -> tuple[int, int]:
        if self.returned:
            return self.epoch, self.returned.pop(0)
        index = self._order[self.cursor]
        self.cursor += 1
        return self.epoch, index

    def assign(
        self, round: int, roster: Sequence[tuple[str, float]], units_per_peer: int
    ) -> dict[str, list[WorkUnit]]:
        """Units for each peer of the roster (peer id, measured speed) in this round.

        A peer of median speed gets about units_per_peer units. A round never spans two epochs: the last
        round of an epoch shares out what is left (a peer may get none if fewer units than peers remain),
        and the next epoch starts once nothing of the current one is left to hand out. Calling it again
        for the same round gives the same answer.
        """
        if round not in self.outstanding:
            if units_per_peer <= 0:
                raise AssignmentError(f"units_per_peer must be > 0, got {units_per_peer}")
            if not self.returned and self.cursor == len(self._order):
                self._start_epoch(self.epoch + 1)
            available = len(self.returned) + len(self._order) - self.cursor
            counts = apportion(min(units_per_peer * len(roster), available), roster)
            self.outstanding[round] = {
                peer: [self._next_unit() for _ in range(counts[peer])] for peer in sorted(counts)
            }
        return {peer: [self.units[i] for _, i in pairs] for peer, pairs in self.outstanding[round].items()}

    def settle(self, round: int, accepted_peer_ids: Sequence[str]) -> list[WorkUnit]:
        """Close a round: accepted peers' units count as trained, the others go back to the pool (returned).

        Units of an earlier epoch (the next epoch began while they were out) neither count nor come back:
        the current epoch's order covers them again.
        """
        if round not in self.outstanding:
            raise AssignmentError(f"round {round} has no open assignment to settle; re-sync the work plan")
        accepted = set(accepted_peer_ids)
        returned: list[WorkUnit] = []
        for peer, pairs in self.outstanding.pop(round).items():
            for epoch, index in pairs:
                if epoch != self.epoch:
                    continue
                if peer in accepted:
                    self.trained.add(index)
                elif index not in self.trained and index not in self.returned:
                    self.returned.append(index)
                    returned.append(self.units[index])
        return returned

    def coverage(self) -> float:
        """Share of this epoch's sequences trained in accepted contributions."""
        return sum(self.units[i].count for i in self.trained) / self.total_sequences

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state; with the same dataset, `from_state_dict` rebuilds the same plan."""
        return {
            "version": 1,
            "seed": self.seed,
            "sequences_per_unit": self.sequences_per_unit,
            "units_hash": units_hash(self.units),
            "epoch": self.epoch,
            "cursor": self.cursor,
            "returned": list(self.returned),
            "trained": sorted(self.trained),
            "outstanding": {
                str(r): {peer: [list(pair) for pair in pairs] for peer, pairs in assigned.items()}
                for r, assigned in sorted(self.outstanding.items())
            },
        }

    @classmethod
    def from_state_dict(cls, ranges: Sequence[WorkUnit], state: dict[str, Any]) -> WorkPlan:
        """The plan another peer sent (untrusted JSON), checked against this peer's own dataset."""
        try:
            parsed = _PlanState.model_validate(state)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            message = f"work plan state does not fit its schema: {where}: {err.get('msg')}"
            raise AssignmentError(message) from None
        plan = cls(ranges, parsed.seed, parsed.sequences_per_unit)
        if units_hash(plan.units) != parsed.units_hash:
            raise AssignmentError("work plan state is for a different dataset; check the run's dataset hash")
        n = len(plan.units)
        indices = parsed.returned + parsed.trained
        out_pairs = [pair for assigned in parsed.outstanding.values()
                     for pairs in assigned.values() for pair in pairs]
        indices += [i for _, i in out_pairs]
        bad_epoch = any(not 0 <= e <= parsed.epoch for e, _ in out_pairs)
        if parsed.cursor > n or any(not 0 <= i < n for i in indices) or bad_epoch:
            raise AssignmentError("work plan state names units or epochs that do not exist; re-sync it")
        if len(set(parsed.returned) | set(parsed.trained)) != len(parsed.returned) + len(parsed.trained):
            raise AssignmentError("work plan state lists a unit twice; re-sync from another peer")
        plan._start_epoch(parsed.epoch)
        plan.cursor = parsed.cursor
        plan.returned = list(parsed.returned)
        plan.trained = set(parsed.trained)
        plan.outstanding = {
            r: {peer: [(e, i) for e, i in pairs] for peer, pairs in assigned.items()}
            for r, assigned in parsed.outstanding.items()
        }
        return plan
