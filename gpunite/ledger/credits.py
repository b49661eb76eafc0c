"""Credits: BOINC cobblestones for verified work, and RAC, computed alike by every peer from its records.

Pure functions: the same set of records and the same `now` give the same table on every peer,
whatever order the records arrived in (everything is sorted by content, never by arrival).

What earns credit (1 credit = 4.32e11 FLOP: 200 credits per day of a 1 GFLOPS machine, as BOINC):
- training: a contribution listed in `accepted` of its run's canonical block for its own round earns
  its signer `claimed_flops`, capped at `flops_per_token[run] * tokens` when the run's model is known
  (from its manifest), else at the run's median claimed FLOPs per token, so a minority of trainers
  cannot inflate their claims. One contribution per signer per round at most (a second one is
  equivocation, kept as evidence).
- audits: a verdict listed in `verdicts` of a canonical block earns its signer `replay_flops`, capped at
  the audited contribution's own (capped) FLOPs: a replay of part of the work never costs more than
  the work. The audited contribution must be in the set and not signed by the verifier.
- hosting: a usage record earns its host `host_credit_per_1k_tokens` per 1000 served tokens (the
  manifest's `credit.host_credit_per_1k_tokens`). Usage records are signed only by the host, so they
  cannot be verified; that is why hosting earns a small fixed share measured in tokens, not FLOPs,
  and only for callers whose identity already earned verified (training or audit) credit, counted
  from their first such grant: a host can neither bill itself nor invent callers. Anonymous service
  is a public good that earns no credit.
A peer rejected with `cheat=True` in any canonical block of a run is banned from that run: it gets no
credit from that run at all, earlier rounds included.

Grants happen at the canonical block's time (training, audits) or the usage record's time (hosting).
RAC follows BOINC's `update_average`: at each grant the average decays by exp(-dt ln2 / half_life) and
gains (1 - weight) * credit / dt_days (ln2 * credit * 86400 / half_life when dt is tiny); the first
grant sets credit / (days since the work started). Displayed RAC is decayed from the last grant to now.

Users are identities (peer ids) named by their latest host record; a peer is also its own host (the
host table shows the host name and device); teams are the team names peers set in host records.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from gpunite.ledger.chain import ChainLink, canonical_chain, index_records
from gpunite.records import Block, Contribution, HostRecord, Usage, Verdict, _Record

FLOPS_PER_CREDIT = 4.32e11  # 1 GFLOPS for a day = 8.64e13 FLOP = 200 credits
SECONDS_PER_DAY = 86400.0
RAC_HALF_LIFE_S = 7 * SECONDS_PER_DAY
DEFAULT_HOST_CREDIT_PER_1K_TOKENS = 0.01  # matches CreditSection.host_credit_per_1k_tokens


@dataclass(frozen=True)
class Grant:
    """Credit granted to one peer for one verified record."""

    peer: str
    run_id: str
    credit: float
    time: float  # when it was granted (validated)
    work_start: float  # when the work began (for the first RAC update)
    source: str  # record id that earned it
    what: str  # "training", "audit" or "hosting"


def update_average(
    avg: float,
    avg_time: float,
    credit: float,
    now: float,
    work_start: float,
    half_life_s: float = RAC_HALF_LIFE_S,
) -> tuple[float, float]:
    """BOINC's RAC update: the new (average credit per day, time of the average) after a grant at now."""
    if avg_time > 0:
        dt = max(0.0, now - avg_time)
        weight = math.exp(-dt * math.log(2) / half_life_s)
        avg *= weight
        if 1.0 - weight > 1e-6:
            avg += (1.0 - weight) * credit / (dt / SECONDS_PER_DAY)
        else:
            avg += math.log(2) * credit * SECONDS_PER_DAY / half_life_s
    elif credit > 0:
        work_days = (now - work_start) / SECONDS_PER_DAY
        if work_days > 0:
            avg = credit / work_days
        else:
            avg = math.log(2) * credit * SECONDS_PER_DAY / half_life_s
    return avg, now


def decay_average(avg: float, avg_time: float, now: float, half_life_s: float = RAC_HALF_LIFE_S) -> float:
    """The average as it stands at now, with no credit granted since avg_time."""
    if avg_time <= 0 or now <= avg_time:
        return avg
    return avg * math.exp(-(now - avg_time) * math.log(2) / half_life_s)


def grants(
    records: Iterable[_Record] | Mapping[str, _Record],
    flops_per_token: Mapping[str, float] | None = None,
    host_credit_per_1k_tokens: float | Mapping[str, float] = DEFAULT_HOST_CREDIT_PER_1K_TOKENS,
) -> list[Grant]:
    """Every credit grant the records justify, sorted by (time, source, peer)."""
    return _grants(index_records(records), flops_per_token, host_credit_per_1k_tokens)[0]


def _grants(
    by_id: dict[str, _Record],
    flops_per_token: Mapping[str, float] | None,
    host_credit_per_1k_tokens: float | Mapping[str, float],
) -> tuple[list[Grant], dict[str, set[str]]]:
    """(the grants, sorted; per run, the peers banned from it)."""
    out: list[Grant] = []
    banned: dict[str, set[str]] = {}
    for run_id, chain in run_chains(by_id).items():
        banned[run_id] = {rej.trainer for link in chain for rej in link.block.rejected if rej.cheat}
        merged = _merged_contributions(chain, by_id, run_id)
        cap = (flops_per_token or {}).get(run_id)
        if cap is None:
            cap = median_flops_per_token([c for _, _, c in merged])
        for link, contribution_id, contribution in merged:
            out.append(
                Grant(
                    contribution.peer_id,
                    run_id,
                    capped_flops(contribution, cap) / FLOPS_PER_CREDIT,
                    link.time,
                    _work_start(chain, link),
                    contribution_id,
                    "training",
                )
            )
        audits_credited: set[tuple[str, str]] = set()  # (verifier, contribution): one audit each
        for link in chain:
            for verdict_id in sorted(set(link.block.verdicts)):
                verdict = by_id.get(verdict_id)
                if not isinstance(verdict, Verdict) or verdict.run_id != run_id:
                    continue
                audited = by_id.get(verdict.contribution)
                if not isinstance(audited, Contribution) or audited.run_id != run_id:
                    continue
                audit = (verdict.peer_id, verdict.contribution)
                if audited.peer_id == verdict.peer_id or audit in audits_credited:
                    continue
                audits_credited.add(audit)
                flops = min(verdict.replay_flops, capped_flops(audited, cap))
                out.append(
                    Grant(
                        verdict.peer_id,
                        run_id,
                        flops / FLOPS_PER_CREDIT,
                        link.time,
                        _work_start(chain, link),
                        verdict_id,
                        "audit",
                    )
                )
    out = [g for g in out if g.peer not in banned.get(g.run_id, ()) and g.credit > 0]

    # Hosting: only service to callers whose identity is backed by verified work counts, from the time
    # of their first verified grant, so a host cannot invent callers (Sybils) to bill.
    verified_since: dict[str, float] = {}
    for grant in out:
        verified_since[grant.peer] = min(grant.time, verified_since.get(grant.peer, grant.time))
    served: set[tuple[str, str, str, str]] = set()
    for record_id, record in sorted(by_id.items()):
        if not isinstance(record, Usage) or record.caller == record.peer_id:
            continue
        if record.time < verified_since.get(record.caller, float("inf")):
            continue
        request = (record.peer_id, record.run_id, record.caller, record.request_id)
        if request in served:
            continue  # one usage record per request; a second one is a conflict, not more credit
        served.add(request)
        rate = (
            host_credit_per_1k_tokens.get(record.run_id, DEFAULT_HOST_CREDIT_PER_1K_TOKENS)
            if isinstance(host_credit_per_1k_tokens, Mapping)
            else host_credit_per_1k_tokens
        )
        tokens = record.prompt_tokens + record.completion_tokens
        if record.peer_id not in banned.get(record.run_id, ()) and rate * tokens > 0:
            out.append(
                Grant(
                    record.peer_id,
                    record.run_id,
                    rate * tokens / 1000.0,
                    record.time,
                    record.time,
                    record_id,
                    "hosting",
                )
            )
    return sorted(out, key=lambda g: (g.time, g.source, g.peer)), banned


def _merged_contributions(chain: list[ChainLink], by_id: dict[str, _Record], run_id: str):
    """(link, id, contribution) for each contribution merged by the canonical chain in its own run and round,
    at most one per signer and round, each once."""
    merged = []
    seen_ids: set[str] = set()
    seen_slots: set[tuple[str, int]] = set()
    for link in chain:
        for contribution_id in sorted(set(link.block.accepted)):
            contribution = by_id.get(contribution_id)
            if not isinstance(contribution, Contribution) or contribution_id in seen_ids:
                continue
            if contribution.run_id != run_id or contribution.round != link.round:
                continue
            if (contribution.peer_id, contribution.round) in seen_slots:
                continue
            seen_ids.add(contribution_id)
            seen_slots.add((contribution.peer_id, contribution.round))
            merged.append((link, contribution_id, contribution))
    return merged


def _work_start(chain: list[ChainLink], link: ChainLink) -> float:
    """A round's work starts when the previous round's block is agreed (round 0: unknown, so its own time)."""
    return chain[link.round - 1].time if link.round else link.time


def median_flops_per_token(contributions: list[Contribution]) -> float | None:
    """The lower median of claimed FLOPs per token: without the run's manifest, a claim above what most
    trainers of the run claim per token is capped there, so a minority cannot inflate its credit."""
    ratios = sorted(c.claimed_flops / c.tokens for c in contributions if c.tokens > 0)
    return ratios[(len(ratios) - 1) // 2] if ratios else None


def capped_flops(contribution: Contribution, flops_per_token: float | None) -> float:
    """The contribution's claimed FLOPs, at most flops_per_token * tokens when a per-token cost is known."""
    if flops_per_token is None:
        return contribution.claimed_flops
    return min(contribution.claimed_flops, flops_per_token * contribution.tokens)


def run_chains(records: Iterable[_Record] | Mapping[str, _Record]) -> dict[str, list[ChainLink]]:
    """The canonical chain of every run that has blocks among the records."""
    by_run: dict[str, dict[str, _Record]] = defaultdict(dict)
    for record_id, record in index_records(records).items():
        if isinstance(record, (Block, Contribution, Verdict)):
            by_run[record.run_id][record_id] = record
    return {
        run_id: canonical_chain(run_records)
        for run_id, run_records in by_run.items()
        if any(isinstance(record, Block) for record in run_records.values())
    }


@dataclass
class CreditRow:
    """One user, host or team: BOINC's fields plus what the credit was earned for."""

    id: str  # peer id (users, hosts) or team name (teams)
    name: str
    team: str = ""
    total_credit: float = 0.0
    expavg_credit: float = 0.0  # RAC as of expavg_time (what BOINC stores and exports)
    expavg_time: float = 0.0
    rac: float = 0.0  # RAC decayed to the table's `now`
    credit_24h: float = 0.0
    create_time: float = 0.0  # first grant
    training_credit: float = 0.0
    audit_credit: float = 0.0
    hosting_credit: float = 0.0
    public_key: str = ""  # users and hosts: the signer key (cpid is derived from it)
    device: str = ""  # hosts: from the latest host record
    members: int = 0  # teams: number of users

    def add(self, grant: Grant, now: float, half_life_s: float) -> None:
        self.expavg_credit, self.expavg_time = update_average(
            self.expavg_credit, self.expavg_time, grant.credit, grant.time, grant.work_start, half_life_s
        )
        self.total_credit += grant.credit
        if grant.time > now - SECONDS_PER_DAY:
            self.credit_24h += grant.credit
        if not self.create_time:
            self.create_time = grant.time
        setattr(self, f"{grant.what}_credit", getattr(self, f"{grant.what}_credit") + grant.credit)


@dataclass
class CreditTable:
    """Everything `gpunite stats` and the BOINC export show, computed at `now`."""

    now: float
    users: list[CreditRow] = field(default_factory=list)
    hosts: list[CreditRow] = field(default_factory=list)
    teams: list[CreditRow] = field(default_factory=list)
    banned: dict[str, list[str]] = field(default_factory=dict)
    grants: list[Grant] = field(default_factory=list)

    @property
    def total_credit(self) -> float:
        return sum(row.total_credit for row in self.users)

    def user(self, peer_id: str) -> CreditRow | None:
        return next((row for row in self.users if row.id == peer_id), None)

    def team(self, name: str) -> CreditRow | None:
        return next((row for row in self.teams if row.id == name), None)


def credit_table(
    records: Iterable[_Record] | Mapping[str, _Record],
    now: float,
    flops_per_token: Mapping[str, float] | None = None,
    host_credit_per_1k_tokens: float | Mapping[str, float] = DEFAULT_HOST_CREDIT_PER_1K_TOKENS,
    half_life_s: float = RAC_HALF_LIFE_S,
) -> CreditTable:
    """Users, hosts and teams with total credit and RAC from the grants up to now, largest total first."""
    by_id = index_records(records)
    profiles = latest_host_records(by_id)
    public_keys = {record.peer_id: record.signer for record in by_id.values() if record.signer}
    every_grant, banned = _grants(by_id, flops_per_token, host_credit_per_1k_tokens)
    all_grants = [g for g in every_grant if g.time <= now]

    users: dict[str, CreditRow] = {}
    hosts: dict[str, CreditRow] = {}
    teams: dict[str, CreditRow] = {}
    team_members: dict[str, set[str]] = defaultdict(set)
    for grant in all_grants:
        profile = profiles.get(grant.peer)
        user_name = (profile.user_name or profile.host_name) if profile else ""
        team_name = profile.team if profile else ""
        if grant.peer not in users:
            users[grant.peer] = CreditRow(
                grant.peer,
                user_name or grant.peer[:12],
                team_name,
                public_key=public_keys.get(grant.peer, ""),
            )
            hosts[grant.peer] = CreditRow(
                grant.peer,
                (profile.host_name if profile else "") or grant.peer[:12],
                team_name,
                public_key=public_keys.get(grant.peer, ""),
                device=profile.device if profile else "",
            )
        users[grant.peer].add(grant, now, half_life_s)
        hosts[grant.peer].add(grant, now, half_life_s)
        if team_name:
            teams.setdefault(team_name, CreditRow(team_name, team_name)).add(grant, now, half_life_s)
            team_members[team_name].add(grant.peer)
    for name, row in teams.items():
        row.members = len(team_members[name])
    table = CreditTable(
        now=now, banned={run: sorted(peers) for run, peers in banned.items() if peers}, grants=all_grants
    )
    for rows, target in ((users, table.users), (hosts, table.hosts), (teams, table.teams)):
        for row in rows.values():
            row.rac = decay_average(row.expavg_credit, row.expavg_time, now, half_life_s)
        target.extend(sorted(rows.values(), key=lambda row: (-row.total_credit, row.id)))
    return table


def latest_host_records(records: Iterable[_Record] | Mapping[str, _Record]) -> dict[str, HostRecord]:
    """Each peer's newest host record (by its time, ties by record id)."""
    latest: dict[str, tuple[float, str, HostRecord]] = {}
    for record_id, record in index_records(records).items():
        if isinstance(record, HostRecord):
            key = (record.time, record_id, record)
            current = latest.get(record.peer_id)
            if current is None or key[:2] > current[:2]:
                latest[record.peer_id] = key
    return {peer: entry[2] for peer, entry in latest.items()}
