"""Swarm statistics as a BOINC server status page shows them, computed from a credit table.

Active means granted credit in the 24 hours before `now`. The TeraFLOPS estimate is BOINC's rule:
RAC is credits per day and 200 credits per day is one GFLOPS, so sum of RAC / 200,000 is TeraFLOPS.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from gpunite.ledger.credits import DEFAULT_HOST_CREDIT_PER_1K_TOKENS, CreditRow, CreditTable, credit_table

RAC_PER_TERAFLOPS = 200_000.0


@dataclass
class Stats:
    now: float
    users_total: int
    users_active: int
    hosts_total: int
    hosts_active: int
    teams_total: int
    credit_24h: float
    total_credit: float
    teraflops: float
    banned: dict[str, list[str]]
    top_users: list[dict[str, Any]] = field(default_factory=list)
    top_hosts: list[dict[str, Any]] = field(default_factory=list)
    top_teams: list[dict[str, Any]] = field(default_factory=list)
    records: int | None = None  # ledger size, when computed from a ledger
    conflicts: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _row(row: CreditRow, kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "total_credit": row.total_credit,
        "rac": row.rac,
        "credit_24h": row.credit_24h,
        "training_credit": row.training_credit,
        "audit_credit": row.audit_credit,
        "hosting_credit": row.hosting_credit,
    }
    if kind != "team":
        out["team"] = row.team
    if kind == "host":
        out["device"] = row.device
    if kind == "team":
        out["members"] = row.members
    return out


def stats_from_table(table: CreditTable, top: int = 10) -> Stats:
    """The status-page numbers of a credit table; top lists ordered by RAC, then total credit."""

    def ranked(rows: list[CreditRow]) -> list[CreditRow]:
        return sorted(rows, key=lambda row: (-row.rac, -row.total_credit, row.id))[:top]

    return Stats(
        now=table.now,
        users_total=len(table.users),
        users_active=sum(1 for row in table.users if row.credit_24h > 0),
        hosts_total=len(table.hosts),
        hosts_active=sum(1 for row in table.hosts if row.credit_24h > 0),
        teams_total=len(table.teams),
        credit_24h=sum(row.credit_24h for row in table.users),
        total_credit=table.total_credit,
        teraflops=sum(row.rac for row in table.users) / RAC_PER_TERAFLOPS,
        banned=table.banned,
        top_users=[_row(row, "user") for row in ranked(table.users)],
        top_hosts=[_row(row, "host") for row in ranked(table.hosts)],
        top_teams=[_row(row, "team") for row in ranked(table.teams)],
    )


def stats_from_ledger(
    ledger,
    now: float,
    top: int = 10,
    flops_per_token: Mapping[str, float] | None = None,
    host_credit_per_1k_tokens: float | Mapping[str, float] = DEFAULT_HOST_CREDIT_PER_1K_TOKENS,
) -> tuple[Stats, CreditTable]:
    table = credit_table(ledger.records_by_id(), now, flops_per_token, host_credit_per_1k_tokens)
    stats = stats_from_table(table, top)
    stats.records = len(ledger)
    stats.conflicts = len(ledger.conflicts())
    return stats, table


def run_policies(manifest_paths: list[Path]) -> tuple[dict[str, float], dict[str, float]]:
    """Per run id, from manifests: training FLOPs per token (caps claims) and hosting credit per 1k tokens."""
    from gpunite.manifest import load_manifest
    from gpunite.model import config_from_manifest, flops_per_token

    caps: dict[str, float] = {}
    rates: dict[str, float] = {}
    for path in manifest_paths:
        manifest = load_manifest(path, check_data=False)
        caps[manifest.run_id] = float(flops_per_token(config_from_manifest(manifest), manifest.data.seq_len))
        rates[manifest.run_id] = manifest.credit.host_credit_per_1k_tokens
    return caps, rates
