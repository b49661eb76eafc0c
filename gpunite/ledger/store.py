"""The ledger: every signed record a peer has seen, in SQLite (WAL, crash-safe), deduplicated, with evidence.

A record is stored as the exact canonical JSON bytes that were signed, under its id (sha256 of those
bytes), so any peer can re-verify and re-send it. The store only grows: a record is never changed or
deleted. Two records from one signer that claim the same slot (two contributions for one run and round,
two different blocks for one round, two opposite verdicts on one contribution, two usage records for one
request) are both kept and listed by `conflicts()` as evidence against that signer.

Durability: WAL journal with synchronous=FULL. WAL alone makes a kill -9 at any moment harmless (a
half-written transaction is discarded at the next open); FULL also fsyncs the WAL at every commit, so a
power loss cannot forget a record this peer has signed and published. Forgetting one would let the peer
sign a second, different record for the same slot and so produce evidence of equivocation against
itself. The cost is one fsync per commit; `add_many` (used by sync) commits a whole batch at once.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydantic import TypeAdapter, ValidationError

from gpunite.errors import GpuniteError
from gpunite.identity import RecordError, canonical_json
from gpunite.records import AnyRecord, Block, _Record, parse_record, record_bytes
from gpunite.util import sha256_bytes

SCHEMA_VERSION = 1
# Records read back were verified when they were stored, so reads only parse them (ten times faster);
# `gpunite chain verify` re-verifies what is on disk, in case the file was edited.
_STORED = TypeAdapter(AnyRecord)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,        -- sha256 of body: the record id every peer agrees on
    kind TEXT NOT NULL,
    signer TEXT NOT NULL,       -- peer id of the signer
    run_id TEXT,
    round INTEGER,
    time REAL NOT NULL,         -- the record's own (signed) time
    slot TEXT,                  -- what the record claims, per signer; two claims on one slot are evidence
    content TEXT,               -- what it claims there; same slot and different content is a conflict
    body BLOB NOT NULL          -- canonical JSON, exactly as signed
);
CREATE INDEX IF NOT EXISTS records_kind_run_round ON records (kind, run_id, round);
CREATE INDEX IF NOT EXISTS records_signer ON records (signer, kind);
CREATE INDEX IF NOT EXISTS records_slot ON records (kind, slot, signer);
CREATE TABLE IF NOT EXISTS conflicts (
    first TEXT NOT NULL,        -- the two record ids, first < second
    second TEXT NOT NULL,
    kind TEXT NOT NULL,
    signer TEXT NOT NULL,
    slot TEXT NOT NULL,
    PRIMARY KEY (first, second)
);
"""


class LedgerError(GpuniteError):
    """A ledger file that cannot be opened or read."""


LEDGER_FILE = "ledger.sqlite"


def default_ledger_path(home: str | Path | None = None) -> Path:
    """Where a peer keeps its ledger: HOME/ledger.sqlite (HOME defaults to $GPUNITE_HOME or ~/.gpunite)."""
    from gpunite.identity import default_home

    return Path(home) / LEDGER_FILE if home else default_home() / LEDGER_FILE


@dataclass(frozen=True)
class Conflict:
    """Two records from one signer claiming the same slot: evidence of equivocation."""

    kind: str
    signer: str
    slot: str
    first: str
    second: str


def _slot_and_content(record: _Record, record_id: str) -> tuple[str | None, str | None]:
    """The slot a record claims for its signer, and what it claims there (None: claims no slot)."""
    kind = record.kind  # type: ignore[attr-defined]
    if kind == "contribution":
        return f"{record.run_id}:{record.round}", record_id  # type: ignore[attr-defined]
    if kind == "block":
        return f"{record.run_id}:{record.round}", record.block_hash  # type: ignore[attr-defined]
    if kind == "verdict":
        return record.contribution, "accept" if record.accept else "reject"  # type: ignore[attr-defined]
    if kind == "usage":
        return f"{record.run_id}:{record.caller}:{record.request_id}", record_id  # type: ignore[attr-defined]
    return None, None


def normalize(item: _Record | dict[str, Any] | bytes) -> tuple[_Record, bytes]:
    """A verified record and its canonical bytes; RecordError if it is invalid or not in canonical form.

    The canonical form is what `records.sign_record` produces: the signature covers exactly these bytes
    and their hash is the id blocks refer to. A record whose fields parse but re-serialize differently
    (an integer where a float belongs, a default left out) would get two ids, so it is refused.
    """
    if isinstance(item, (bytes, bytearray)):
        record = parse_record(bytes(item))  # checks size, JSON and signature
        raw: Any = json.loads(item)
    else:
        raw = item.model_dump(mode="json") if isinstance(item, _Record) else item
        record = parse_record(raw)
    data = record_bytes(record)
    if data != canonical_json(raw):
        raise RecordError("record is not in canonical form (sign it with gpunite.records.sign_record)")
    return record, data


class Ledger:
    """A peer's SQLite store of signed records; safe to share between threads of one process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(self.path), timeout=30, check_same_thread=False, isolation_level=None
            )
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(
                f"cannot open ledger {self.path}: {exc}; check the path and its permissions"
            ) from None
        try:
            with self._guard() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise LedgerError(
                        f"ledger {self.path} has schema version {version}, newer than this gpunite "
                        f"({SCHEMA_VERSION}); upgrade gpunite"
                    )
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except LedgerError:
            self._db.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[sqlite3.Connection]:
        """The connection, held by this thread; SQLite errors become one-line LedgerErrors."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.OperationalError as exc:
                raise LedgerError(
                    f"ledger {self.path}: {exc}; check free disk space and that no other process keeps it "
                    "locked, then try again"
                ) from None
            except sqlite3.DatabaseError as exc:
                raise LedgerError(
                    f"ledger {self.path} is damaged or not a gpunite ledger ({exc}); move it aside and run "
                    "`gpunite ledger sync` to fetch the records again from peers"
                ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def journal_mode(self) -> str:
        with self._guard() as db:
            return db.execute("PRAGMA journal_mode").fetchone()[0]

    # -- writing ----------------------------------------------------------------------------------

    def add(self, item: _Record | dict[str, Any] | bytes) -> bool:
        """Verify and store one record; False if it was already there; RecordError (nothing stored) if bad."""
        record, data = normalize(item)
        with self._guard() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                added = self._insert(db, record, data)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return added

    def add_many(self, items: Iterable[_Record | dict[str, Any] | bytes]) -> tuple[int, list[str]]:
        """Verify and store records in one transaction: (number newly added, reasons for refused ones)."""
        checked: list[tuple[_Record, bytes]] = []
        refused: list[str] = []
        for item in items:
            try:
                checked.append(normalize(item))
            except RecordError as exc:
                refused.append(str(exc))
        added = 0
        if checked:
            with self._guard() as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    for record, data in checked:
                        added += self._insert(db, record, data)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
        return added, refused

    @staticmethod
    def _insert(db: sqlite3.Connection, record: _Record, data: bytes) -> bool:
        record_id = sha256_bytes(data)
        slot, content = _slot_and_content(record, record_id)
        kind, signer = record.kind, record.peer_id  # type: ignore[attr-defined]
        cursor = db.execute(
            "INSERT OR IGNORE INTO records (id, kind, signer, run_id, round, time, slot, content, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record_id,
                kind,
                signer,
                getattr(record, "run_id", None),
                getattr(record, "round", None),
                float(record.time),
                slot,
                content,
                data,
            ),  # type: ignore[attr-defined]
        )
        if cursor.rowcount == 0:
            return False
        if slot is not None:
            rivals = db.execute(
                "SELECT id FROM records "
                "WHERE kind = ? AND signer = ? AND slot = ? AND content != ? AND id != ?",
                (kind, signer, slot, content, record_id),
            ).fetchall()
            for (other,) in rivals:
                first, second = sorted((record_id, other))
                db.execute(
                    "INSERT OR IGNORE INTO conflicts (first, second, kind, signer, slot) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (first, second, kind, signer, slot),
                )
        return True

    # -- reading ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._guard() as db:
            return db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def __contains__(self, record_id: object) -> bool:
        with self._guard() as db:
            return db.execute("SELECT 1 FROM records WHERE id = ?", (record_id,)).fetchone() is not None

    def ids(self, kind: str | None = None, prefix: str = "") -> list[str]:
        """Sorted record ids, optionally of one kind and starting with a hex prefix."""
        where, args = ["id >= ? AND id < ?"], [prefix, _prefix_end(prefix)]
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        with self._guard() as db:
            rows = db.execute(
                f"SELECT id FROM records WHERE {' AND '.join(where)} ORDER BY id", args
            ).fetchall()
        return [row[0] for row in rows]

    def get(self, ids: Iterable[str]) -> dict[str, bytes]:
        """The canonical bytes of the given records that are present, by id."""
        wanted = list(dict.fromkeys(ids))
        found: dict[str, bytes] = {}
        with self._guard() as db:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for record_id, body in db.execute(
                    f"SELECT id, body FROM records WHERE id IN ({marks})", chunk
                ):
                    found[record_id] = bytes(body)
        return found

    def records(
        self,
        kind: str | None = None,
        run_id: str | None = None,
        round: int | None = None,
        signer: str | None = None,
    ) -> list[_Record]:
        """Stored records matching every given filter, ordered by (time, id)."""
        return [self._load(body) for _, body in self._select(kind, run_id, round, signer)]

    def records_by_id(self, kind: str | None = None, run_id: str | None = None) -> dict[str, _Record]:
        """Matching records by their stored id (no re-hashing: what credits and chains are computed from)."""
        return {record_id: self._load(body) for record_id, body in self._select(kind, run_id, None, None)}

    def _load(self, body: bytes) -> _Record:
        try:
            return _STORED.validate_json(body)
        except ValidationError:
            raise LedgerError(
                f"ledger {self.path} holds a record that no longer parses (was the file edited?); "
                "run `gpunite chain verify` to find it, or move the file aside and sync again"
            ) from None

    def raw(self, kind: str | None = None, run_id: str | None = None) -> list[tuple[str, bytes]]:
        """(id, stored bytes) of matching records, unparsed: for checks that must survive a tampered row."""
        return list(self._select(kind, run_id, None, None))

    def _select(self, kind, run_id, round, signer) -> Iterator[tuple[str, bytes]]:
        where, args = [], []
        for column, value in (("kind", kind), ("run_id", run_id), ("round", round), ("signer", signer)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._guard() as db:
            rows = db.execute(f"SELECT id, body FROM records {clause} ORDER BY time, id", args).fetchall()
        return ((record_id, bytes(body)) for record_id, body in rows)

    def usage_of(self, caller: str, run_id: str | None = None, since: float = 0.0) -> list[_Record]:
        """Usage records of one caller (in one run, or in all) with time >= since."""
        if run_id is None:
            query = "SELECT body FROM records WHERE kind = 'usage' AND time >= ? ORDER BY time, id"
            args: tuple = (since,)
        else:
            start = f"{run_id}:{caller}:"  # the slot index finds one run's caller directly
            query = (
                "SELECT body FROM records WHERE kind = 'usage' AND slot >= ? AND slot < ? AND time >= ? "
                "ORDER BY time, id"
            )
            args = (start, start[:-1] + ";", since)  # ';' is the character after ':'
        with self._guard() as db:
            rows = db.execute(query, args).fetchall()
        records = [self._load(bytes(body)) for (body,) in rows]
        return [record for record in records if record.caller == caller]  # type: ignore[attr-defined]

    def blocks(self, run_id: str) -> list[Block]:
        """Every stored block of a run (all signers' copies), ordered by round."""
        blocks = self.records(kind="block", run_id=run_id)
        return sorted(blocks, key=lambda block: (block.round, block.record_id))  # type: ignore[attr-defined]

    def run_ids(self) -> list[str]:
        with self._guard() as db:
            rows = db.execute(
                "SELECT DISTINCT run_id FROM records WHERE kind = 'block' ORDER BY run_id"
            ).fetchall()
        return [row[0] for row in rows]

    def count_by_kind(self) -> dict[str, int]:
        with self._guard() as db:
            rows = db.execute("SELECT kind, COUNT(*) FROM records GROUP BY kind ORDER BY kind").fetchall()
        return dict(rows)

    def conflicts(self) -> list[Conflict]:
        with self._guard() as db:
            rows = db.execute(
                "SELECT kind, signer, slot, first, second FROM conflicts ORDER BY kind, signer, slot"
            )
            return [Conflict(*row) for row in rows.fetchall()]

    def prefix_counts(self, prefix: str) -> dict[str, tuple[int, str]]:
        """For each one-hex-digit extension of prefix: (number of ids, sha256 of the sorted ids joined)."""
        children: dict[str, tuple[int, str]] = {}
        for digit in "0123456789abcdef":
            child = prefix + digit
            digest = hashlib.sha256()
            count = 0
            for record_id in self.ids(prefix=child):
                digest.update(record_id.encode())
                count += 1
            if count:
                children[child] = (count, digest.hexdigest()[:32])
        return children

    def count_prefix(self, prefix: str) -> int:
        with self._guard() as db:
            return db.execute(
                "SELECT COUNT(*) FROM records WHERE id >= ? AND id < ?", (prefix, _prefix_end(prefix))
            ).fetchone()[0]


def _prefix_end(prefix: str) -> str:
    """The smallest string greater than every hex string starting with prefix ('g' sorts after 'f')."""
    return prefix + "g"
