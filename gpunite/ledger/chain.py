"""A run's chain of blocks: which copy of each round is canonical, and a check of the chain from genesis.

Every honest peer signs the same block content for a round, so copies of one round differ only in
signer and time. The canonical block of round r is chosen among the blocks of round r whose `prev`
is the canonical block hash of round r - 1 (GENESIS for round 0): the content signed by the most
peers with standing in the run, then by the most peers, then the smallest block hash. A peer has
standing from round r on if the canonical chain before r merged one of its contributions or relied
on one of its verdicts, and keeps it unless a canonical block rejects it as a cheat. So identities
made up for the occasion (Sybils) cannot outvote the peers that did verified work; with no standing
anywhere (round 0) the rule is simply "signed by the most peers".
The canonical time of a block is the lower median of its signers' times (each signer's earliest
copy), so one signer with a wrong clock cannot move it. Every peer derives the same chain from the
same set of records, whatever order they arrived in.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping

from gpunite.identity import RecordError, record_hash
from gpunite.records import GENESIS, Block, Contribution, Verdict, _Record, parse_record


@dataclass(frozen=True)
class ChainLink:
    """The canonical block of one round: its content, its agreed hash and time, and who signed it."""

    round: int
    block_hash: str
    block: Block  # the copy with the smallest record id (content is the same in every copy)
    signers: tuple[str, ...]  # distinct peer ids that signed this content
    time: float


def index_records(records: Iterable[_Record] | Mapping[str, _Record]) -> dict[str, _Record]:
    """Records by id. A mapping (such as `Ledger.records_by_id()`) is taken as is, sparing the hashing."""
    if isinstance(records, Mapping):
        return dict(records)
    by_id: dict[str, _Record] = {}
    for record in records:
        by_id.setdefault(record.record_id, record)
    return by_id


def canonical_chain(records: Iterable[_Record] | Mapping[str, _Record]) -> list[ChainLink]:
    """The canonical chain of one run from its blocks, contributions and verdicts (other records are
    ignored), from round 0 up to the first round with no linking block."""
    by_round: dict[int, dict[str, list[tuple[str, Block]]]] = defaultdict(lambda: defaultdict(list))
    authors: dict[str, str] = {}  # contribution / verdict id -> signer peer id
    for record_id, record in index_records(records).items():
        if isinstance(record, Block):
            by_round[record.round][record.block_hash].append((record_id, record))
        elif isinstance(record, (Contribution, Verdict)):
            authors[record_id] = record.peer_id
    chain: list[ChainLink] = []
    standing: set[str] = set()
    prev = GENESIS
    round_ = 0
    while round_ in by_round:
        candidates = {h: copies for h, copies in by_round[round_].items() if copies[0][1].prev == prev}
        if not candidates:
            break
        link = _pick(round_, candidates, standing)
        chain.append(link)
        block = link.block
        standing |= {authors[i] for i in list(block.accepted) + list(block.verdicts) if i in authors}
        standing -= {rejection.trainer for rejection in block.rejected if rejection.cheat}
        prev = link.block_hash
        round_ += 1
    return chain


def _pick(round_: int, candidates: dict[str, list[tuple[str, Block]]], standing: set[str]) -> ChainLink:
    signer_times: dict[str, dict[str, float]] = {}
    for block_hash, copies in candidates.items():
        earliest: dict[str, float] = {}
        for _, copy in copies:
            earliest[copy.peer_id] = min(copy.time, earliest.get(copy.peer_id, copy.time))
        signer_times[block_hash] = earliest

    def rank(block_hash: str) -> tuple[int, int, str]:
        signers = signer_times[block_hash]
        return (-len(standing.intersection(signers)), -len(signers), block_hash)

    block_hash = min(candidates, key=rank)
    times = sorted(signer_times[block_hash].values())
    return ChainLink(
        round=round_,
        block_hash=block_hash,
        block=min(candidates[block_hash], key=lambda item: item[0])[1],
        signers=tuple(sorted(signer_times[block_hash])),
        time=times[(len(times) - 1) // 2],
    )


@dataclass
class ChainReport:
    """The result of `verify_chain`: how far the chain holds, and the first broken link if any."""

    run_id: str
    rounds: int = 0  # number of verified rounds (0 .. rounds - 1)
    head: str = GENESIS  # block hash of the last verified round
    weights_hash: str | None = None  # global weights after the last verified round
    ok: bool = True
    problem: str | None = None
    broken_round: int | None = None
    accepted: int = 0  # contributions merged across the verified rounds

    def as_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "ok": self.ok,
            "rounds": self.rounds,
            "head": self.head,
            "weights_hash": self.weights_hash,
            "accepted": self.accepted,
            "problem": self.problem,
            "broken_round": self.broken_round,
        }


def verify_chain(ledger, run_id: str, initial_weights_hash: str | None = None) -> ChainReport:
    """Check a run's chain from genesis against the records in `ledger` (a gpunite.ledger.store.Ledger).

    Every stored block and referenced record is re-verified from its stored bytes (the database could
    have been edited on disk). Checks, round by round: a block of this round links to the previous
    canonical block; every accepted contribution is present, validly signed, of this run and round, and
    built on the previous round's weights (round 0: on initial_weights_hash if given, else all on one
    hash); every verdict the block relied on is present and of this run.
    """
    report = ChainReport(run_id=run_id)
    checked: dict[str, _Record] = {}
    for record_id, body in ledger.raw(kind="block", run_id=run_id):
        block = _checked(body, record_id)
        if isinstance(block, str):
            return _broken(report, None, f"a stored block ({record_id[:16]}) {block}")
        checked[record_id] = block
    blocks = list(checked.values())
    if not blocks:
        return _broken(report, None, f"no blocks of run {run_id[:16]} in this ledger")
    # standing comes from contributions and verdicts; one that does not verify is reported below if used
    for kind in ("contribution", "verdict"):
        for record_id, body in ledger.raw(kind=kind, run_id=run_id):
            if not isinstance(record := _checked(body, record_id), str):
                checked[record_id] = record
    chain = canonical_chain(checked)
    rounds_present = sorted({block.round for block in blocks})
    base = initial_weights_hash
    for link in chain:
        problem = _check_link(ledger, run_id, link, base)
        if problem:
            return _broken(
                report, link.round, f"round {link.round} (block {link.block_hash[:16]}): {problem}"
            )
        base = link.block.weights_hash
        report.rounds = link.round + 1
        report.head = link.block_hash
        report.weights_hash = base
        report.accepted += len(link.block.accepted)
    last = rounds_present[-1]
    if report.rounds <= last:
        missing = report.rounds
        if missing not in rounds_present:
            return _broken(
                report, missing, f"round {missing} has no block, but blocks up to round {last} exist"
            )
        prevs = sorted({block.prev[:16] for block in blocks if block.round == missing})
        return _broken(
            report,
            missing,
            f"round {missing}: no block links to round {missing - 1}'s block {report.head[:16]} "
            f"(its blocks point to {', '.join(prevs)})",
        )
    return report


def _check_link(ledger, run_id: str, link: ChainLink, base: str | None) -> str | None:
    block = link.block
    if len(set(block.accepted)) != len(block.accepted):
        return "lists a contribution twice"
    bodies = ledger.get(list(block.accepted) + list(block.verdicts))
    round_bases: set[str] = set()
    for contribution_id in block.accepted:
        if contribution_id not in bodies:
            return (
                f"accepted contribution {contribution_id[:16]} is not in the ledger (`gpunite ledger sync`)"
            )
        contribution = _checked(bodies[contribution_id], contribution_id)
        if isinstance(contribution, str):
            return f"accepted contribution {contribution_id[:16]} {contribution}"
        if not isinstance(contribution, Contribution):
            return f"accepted record {contribution_id[:16]} is a {contribution.kind}, not a contribution"
        if contribution.run_id != run_id or contribution.round != block.round:
            return (
                f"accepted contribution {contribution_id[:16]} is for run {contribution.run_id[:16]} "
                f"round {contribution.round}"
            )
        if base is not None and contribution.base_hash != base:
            return (
                f"accepted contribution {contribution_id[:16]} starts from weights "
                f"{contribution.base_hash[:16]}, "
                f"not the previous round's {base[:16]}"
            )
        round_bases.add(contribution.base_hash)
    if base is None and len(round_bases) > 1:
        return "accepted contributions start from different weights"
    for verdict_id in block.verdicts:
        if verdict_id not in bodies:
            return f"verdict {verdict_id[:16]} is not in the ledger (run `gpunite ledger sync`)"
        verdict = _checked(bodies[verdict_id], verdict_id)
        if isinstance(verdict, str):
            return f"verdict {verdict_id[:16]} {verdict}"
        if not isinstance(verdict, Verdict) or verdict.run_id != run_id:
            return f"verdict {verdict_id[:16]} is not a verdict of this run"
    return None


def _checked(body: bytes, record_id: str):
    """The parsed record, or a string saying why the stored bytes are not a valid record with this id."""
    try:
        record = parse_record(body)
    except RecordError as exc:
        return f"does not verify: {exc}"
    if record_hash(record.model_dump(mode="json")) != record_id:
        return "is stored under an id that is not its hash"
    return record


def _broken(report: ChainReport, round_: int | None, problem: str) -> ChainReport:
    report.ok = False
    report.problem = problem
    report.broken_round = round_
    return report
