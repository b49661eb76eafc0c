"""Daily inference quotas: queries an identity may make per UTC day, from its RAC and the run's policy.

Hosts enforce quotas from their own ledger: a caller's RAC comes from the credit table of the verified
records the host has, and what the caller used today from the signed usage records of this run (one
per request, from any host). Anonymous callers share one allowance per host, counted from the usage
records that host signed, since nothing tells anonymous callers apart.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from typing import Mapping, NamedTuple

from gpunite.ledger.credits import credit_table
from gpunite.manifest import CreditSection
from gpunite.records import Usage

ANONYMOUS = "anonymous"


def daily_quota(rac: float, policy: CreditSection) -> int:
    """Queries per day for an identity with this RAC: the anonymous allowance when it has no credit,
    else base_daily_queries + queries_per_rac * RAC, never below the anonymous allowance nor above the cap."""
    if not rac > 0:
        return min(policy.anonymous_daily_queries, policy.max_daily_queries)
    earned = policy.base_daily_queries + math.floor(policy.queries_per_rac * rac)
    return min(policy.max_daily_queries, max(policy.anonymous_daily_queries, earned))


def utc_day(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime("%Y-%m-%d")


def day_bounds(day: str) -> tuple[float, float]:
    """Unix times of the start of a UTC day and of the next one."""
    start = dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp()
    return start, start + 86400.0


def used_today(ledger, caller: str, day: str, run_id: str | None = None, host: str | None = None) -> int:
    """Requests the caller made on this UTC day (in one run, or in all), counted once per request id.

    host limits the count to usage records signed by that host (how anonymous callers are counted).
    """
    start, _ = day_bounds(day)
    requests = {
        (record.run_id, record.request_id)
        for record in ledger.usage_of(
            caller, run_id, since=start - 86400.0
        )  # a record's time may lag its day
        if isinstance(record, Usage) and record.day == day and (host is None or record.peer_id == host)
    }
    return len(requests)


class QuotaDecision(NamedTuple):
    allowed: bool
    remaining: int  # queries left today after this one, if allowed
    reset_time: float  # unix time of the next UTC midnight


class QuotaCheck:
    """A host's quota gate for one run: `check(caller, now)` says whether one more query is allowed.

    RAC comes from the full credit table, which is recomputed at most every `rac_cache_s` seconds.
    """

    def __init__(
        self,
        ledger,
        run_id: str,
        policy: CreditSection,
        host: str | None = None,
        flops_per_token: Mapping[str, float] | None = None,
        rac_cache_s: float = 60.0,
    ):
        self.ledger = ledger
        self.run_id = run_id
        self.policy = policy
        self.host = host
        self.flops_per_token = flops_per_token
        self.rac_cache_s = rac_cache_s
        self._lock = threading.Lock()
        self._rac: dict[str, float] = {}
        self._rac_time = -math.inf

    def rac_of(self, caller: str, now: float) -> float:
        with self._lock:
            if now - self._rac_time > self.rac_cache_s or now < self._rac_time:
                table = credit_table(
                    self.ledger.records_by_id(),
                    now,
                    self.flops_per_token,
                    self.policy.host_credit_per_1k_tokens,
                )
                self._rac = {row.id: row.rac for row in table.users}
                self._rac_time = now
            return self._rac.get(caller, 0.0)

    def quota_and_used(self, caller: str, now: float) -> tuple[int, int]:
        """(queries allowed today, queries already used today) for the caller."""
        day = utc_day(now)
        if caller == ANONYMOUS:
            return daily_quota(0.0, self.policy), used_today(self.ledger, caller, day, self.run_id, self.host)
        return daily_quota(self.rac_of(caller, now), self.policy), used_today(
            self.ledger, caller, day, self.run_id
        )

    def check(self, caller: str, now: float) -> QuotaDecision:
        """Whether the caller may query once more now, how many remain after that, when the count resets."""
        quota, used = self.quota_and_used(caller, now)
        _, reset_time = day_bounds(utc_day(now))
        allowed = used < quota
        return QuotaDecision(allowed, quota - used - 1 if allowed else 0, reset_time)
