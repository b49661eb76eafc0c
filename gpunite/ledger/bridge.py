"""Wire a swarm peer to its ledger: store the records it verifies, serve and run anti-entropy sync, log credit.

`attach_ledger(peer, ledger)` hooks the peer's `on_record` (contributions and blocks it verified) to
`ledger.add`, registers the ledger's sync handler on the peer's libp2p daemon, and starts a background
thread that every few seconds syncs with one random live peer of the run, copies the run's host records
from the DHT (they name users in the credit table) and logs the credit this peer earned since the last
tick. Nothing here may stop training: every failure is logged and the loop goes on.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from gpunite.errors import GpuniteError
from gpunite.identity import RecordError
from gpunite.ledger.credits import credit_table
from gpunite.ledger.store import Ledger
from gpunite.ledger.sync import SyncError, serve_sync, sync_with
from gpunite.records import KINDS

log = logging.getLogger("gpunite.ledger.bridge")
SYNC_TIMEOUT_S = 30.0
FINAL_SYNC_TIMEOUT_S = 10.0
FINAL_SYNC_PEERS = 8


class LedgerBridge:
    """The link between one running peer and its ledger; `close()` does a last sync and stops the thread."""

    def __init__(self, peer: Any, ledger: Ledger, sync_every_s: float = 3.0) -> None:
        from gpunite.model import flops_per_token

        self.peer = peer
        self.ledger = ledger
        self.sync_every_s = sync_every_s
        self.flops_per_token = {peer.run_id: float(flops_per_token(peer.model_config, peer.manifest.data.seq_len))}
        self.host_credit_per_1k_tokens = {peer.run_id: peer.manifest.credit.host_credit_per_1k_tokens}
        self.stored = 0
        self.synced_in = 0
        self.synced_out = 0
        self.credit = 0.0
        self._credited: set[str] = set()  # record ids whose grant to this peer was already logged
        self._blocks_seen = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpunite-ledger", daemon=True)
        self._chained: Callable[[Any], None] | None = None

    def start(self) -> LedgerBridge:
        self._chained = self.peer.on_record
        self.peer.on_record = self.on_record
        # the ledger's own stream protocol runs on the peer's daemon, beside the swarm's request handlers
        try:
            self.peer.node.run(serve_sync(self.peer.node._p2p, self.ledger), timeout=30)
        except Exception as exc:  # the peer still trains and syncs outwards; others just cannot pull from it
            log.warning("ledger sync is not served to other peers: %s", exc)
        self._thread.start()
        return self

    def on_record(self, record: Any) -> None:
        """Store a record the peer verified (only ledger kinds); a bad one is logged, never raised."""
        if self._chained is not None:
            self._chained(record)
        if getattr(record, "kind", None) not in KINDS:
            return
        try:
            if self.ledger.add(record):
                self.stored += 1
        except (RecordError, GpuniteError) as exc:
            log.warning("ledger refused a %s record: %s", record.kind, exc)
            return
        if record.kind == "block":
            self._blocks_seen.set()

    # ----- background: sync, host records, credit -----
    def _loop(self) -> None:
        while not self._stop.wait(self.sync_every_s):
            self.tick()

    def tick(self) -> None:
        """One round of background work; each part fails alone."""
        for part in (self._sync_random_peer, self._store_host_records, self._log_new_credit):
            try:
                part()
            except Exception as exc:  # a hostile peer or a full disk must not kill the peer
                log.warning("ledger %s: %s", part.__name__.strip("_").replace("_", " "), exc)

    def _live_peers(self) -> list[Any]:
        """Other peers with a fresh heartbeat (read here, not through Membership.alive(), which logs arrivals)."""
        import time

        from gpunite.swarm.membership import parse_heartbeat
        from gpunite.swarm.protocol import run_key

        beats = self.peer.node.get_records(run_key(self.peer.run_id, "heartbeat"), parse_heartbeat)
        fresh_after = time.time() - self.peer.membership.ttl_s
        return [beat for pid, beat in sorted(beats.items())
                if pid != self.peer.peer_id and beat.run_id == self.peer.run_id and beat.time >= fresh_after
                and beat.p2p_id]

    def _sync_random_peer(self) -> None:
        beats = self._live_peers()
        if beats:
            self.sync_with_peer(random.choice(beats))

    def sync_with_peer(self, beat: Any, timeout_s: float = SYNC_TIMEOUT_S) -> tuple[int, int]:
        """One anti-entropy exchange with a live peer (its heartbeat says where it is)."""
        from hivemind.p2p import PeerID

        try:
            p2p_id = PeerID.from_base58(beat.p2p_id)
        except ValueError:
            raise SyncError(f"peer {beat.peer_id[:12]} announced {beat.p2p_id[:16]!r}, not a libp2p peer id") from None
        received, sent = self.peer.node.run(
            sync_with(self.peer.node._p2p, p2p_id, self.ledger, timeout=timeout_s),
            timeout=timeout_s * 4)
        self.synced_in += received
        self.synced_out += sent
        if received or sent:
            log.info("ledger sync with %s: got %d records, gave %d", beat.peer_id[:12], received, sent)
            self._blocks_seen.set()
        return received, sent

    def _store_host_records(self) -> None:
        from gpunite.swarm.membership import parse_host
        from gpunite.swarm.protocol import run_key

        hosts = self.peer.node.get_records(run_key(self.peer.run_id, "host"), parse_host)
        self.ledger.add_many(list(hosts.values()))

    def _log_new_credit(self) -> None:
        import time

        if not self._blocks_seen.is_set():
            return
        self._blocks_seen.clear()
        records = self.ledger.records_by_id(run_id=self.peer.run_id)
        table = credit_table(records, time.time(), flops_per_token=self.flops_per_token,
                             host_credit_per_1k_tokens=self.host_credit_per_1k_tokens)
        by_round: dict[int, float] = {}
        for grant in table.grants:
            if grant.peer != self.peer.peer_id or grant.source in self._credited:
                continue
            self._credited.add(grant.source)
            source = records.get(grant.source)
            round_index = getattr(source, "round", -1)
            by_round[round_index] = by_round.get(round_index, 0.0) + grant.credit
        for round_index, credit in sorted(by_round.items()):
            self.credit += credit
            log.info("credit +%.4g for round %d (total %.4g)", credit, round_index, self.credit)

    # ----- shutdown -----
    def close(self, final_sync: bool = True) -> None:
        """Stop the thread; with final_sync, exchange records once with each live peer first (bounded)."""
        self._stop.set()
        self._thread.join(timeout=SYNC_TIMEOUT_S * 4 + 5)
        try:  # the run's host records (names for the credit table), even where no tick reached them: short runs
            self._store_host_records()
        except Exception as exc:
            log.warning("ledger host records: %s", exc)
        if final_sync:
            try:
                beats = self._live_peers()
            except Exception as exc:
                log.warning("ledger final sync: no peer list: %s", exc)
                beats = []
            for beat in beats[:FINAL_SYNC_PEERS]:
                try:
                    self.sync_with_peer(beat, FINAL_SYNC_TIMEOUT_S)
                except (SyncError, GpuniteError) as exc:
                    log.info("ledger final sync with %s: %s", beat.peer_id[:12], exc)
        try:
            self._log_new_credit()
        except Exception as exc:
            log.warning("ledger credit: %s", exc)


def attach_ledger(peer: Any, ledger: Ledger, sync_every_s: float = 3.0) -> LedgerBridge:
    """Connect a swarm peer to a ledger and start syncing it; call `.close()` before the peer's node closes."""
    return LedgerBridge(peer, ledger, sync_every_s=sync_every_s).start()
