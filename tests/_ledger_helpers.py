"""Builds real signed records of a run (contributions, verdicts, blocks, host and usage records) for tests."""

from __future__ import annotations

import hashlib

from gpunite.identity import Identity
from gpunite.records import (
    GENESIS,
    Block,
    Contribution,
    HostRecord,
    Rejection,
    Usage,
    Verdict,
    WorkUnit,
    sign_record,
)

T0 = 1_750_000_000.0
DAY = 86400.0


def peer(name: str) -> Identity:
    return Identity.from_seed(name.encode())


def weights_hash(run_id: str, round_: int) -> str:
    return hashlib.sha256(f"{run_id}:{round_}".encode()).hexdigest()


class RunBuilder:
    """Signs the records of one run, round by round, and keeps them all in `records`."""

    def __init__(self, name: str = "run", start: float = T0):
        self.run_id = hashlib.sha256(name.encode()).hexdigest()
        self.records: list = []
        self.round = 0
        self.prev = GENESIS
        self.time = start

    @property
    def base(self) -> str:
        return weights_hash(self.run_id, self.round - 1) if self.round else weights_hash(self.run_id, -1)

    def contribution(
        self,
        who: Identity,
        flops: float = 1e12,
        tokens: int = 1000,
        round_: int | None = None,
        base: str | None = None,
        time: float | None = None,
    ) -> Contribution:
        record = sign_record(
            who,
            Contribution(
                run_id=self.run_id,
                round=self.round if round_ is None else round_,
                base_hash=base or self.base,
                work_units=[WorkUnit(shard="c" * 64, first=0, count=4)],
                inner_steps=20,
                tokens=tokens,
                trail_interval=10,
                trail=["d" * 64] * 3,
                delta_hash=hashlib.sha256(who.peer_id.encode()).hexdigest(),
                delta_norm=1.0,
                claimed_flops=flops,
                time=self.time if time is None else time,
            ),
        )
        self.records.append(record)
        return record

    def verdict(
        self, who: Identity, contribution: Contribution, replay_flops: float = 1e10, accept: bool = True
    ) -> Verdict:
        record = sign_record(
            who,
            Verdict(
                run_id=self.run_id,
                round=contribution.round,
                contribution=contribution.record_id,
                trainer=contribution.peer_id,
                accept=accept,
                reason="replay within tolerance" if accept else "far",
                segment=0,
                distance=0.0,
                replay_flops=replay_flops,
                time=self.time,
            ),
        )
        self.records.append(record)
        return record

    def block(
        self,
        signers: list[Identity],
        accepted: list[Contribution],
        verdicts: list[Verdict] = (),
        cheats: list[Contribution] = (),
        advance_s: float = 3600.0,
        prev: str | None = None,
        weights: str | None = None,
    ) -> list[Block]:
        """Every signer signs the round's block; the run moves to the next round, advance_s later."""
        self.time += advance_s
        body = dict(
            run_id=self.run_id,
            round=self.round,
            prev=prev or self.prev,
            accepted=[c.record_id for c in accepted],
            verdicts=[v.record_id for v in verdicts],
            rejected=[
                Rejection(contribution=c.record_id, trainer=c.peer_id, reason="replay far", cheat=True)
                for c in cheats
            ],
            weights_hash=weights or weights_hash(self.run_id, self.round),
            tokens=sum(c.tokens for c in accepted),
        )
        copies = [sign_record(who, Block(time=self.time + i, **body)) for i, who in enumerate(signers)]
        self.records.extend(copies)
        self.prev = copies[0].block_hash
        self.round += 1
        return copies

    def host(
        self,
        who: Identity,
        user_name: str = "",
        team: str = "",
        host_name: str = "box",
        time: float | None = None,
    ) -> HostRecord:
        record = sign_record(
            who,
            HostRecord(
                host_name=host_name,
                user_name=user_name,
                team=team,
                device="cpu",
                memory_gb=8.0,
                tflops=0.1,
                time=self.time if time is None else time,
            ),
        )
        self.records.append(record)
        return record

    def usage(
        self,
        host: Identity,
        caller: str,
        tokens: int = 1000,
        request_id: str = "r1",
        time: float | None = None,
    ) -> Usage:
        import datetime as dt

        when = self.time if time is None else time
        record = sign_record(
            host,
            Usage(
                run_id=self.run_id,
                caller=caller,
                request_id=request_id,
                prompt_tokens=tokens // 2,
                completion_tokens=tokens - tokens // 2,
                flops=2e9 * tokens,
                day=dt.datetime.fromtimestamp(when, dt.timezone.utc).strftime("%Y-%m-%d"),
                time=when,
            ),
        )
        self.records.append(record)
        return record


def small_run(name: str = "run", rounds: int = 4) -> tuple[RunBuilder, dict[str, Identity]]:
    """Three trainers, one verifier, one host; each round audited once; teams 'blue' and 'red'."""
    run = RunBuilder(name)
    peers = {n: peer(f"{name}-{n}") for n in ("alice", "bob", "carol", "vera", "hank")}
    run.host(peers["alice"], user_name="alice", team="blue")
    run.host(peers["bob"], user_name="bob", team="blue")
    run.host(peers["carol"], user_name="carol", team="red")
    run.host(peers["vera"], user_name="vera")
    for _ in range(rounds):
        contributions = [
            run.contribution(peers[n], flops=1e12 * (i + 1), tokens=1000 * (i + 1))
            for i, n in enumerate(("alice", "bob", "carol"))
        ]
        verdict = run.verdict(peers["vera"], contributions[run.round % 3])
        run.block([peers["alice"], peers["bob"], peers["vera"]], contributions, [verdict])
    run.usage(peers["hank"], peers["alice"].peer_id, tokens=5000, request_id="q1")
    return run, peers
