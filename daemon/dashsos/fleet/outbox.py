"""The durable outbox: messages for the fleet broker, stored before they are published.

A message is committed to SQLite (WAL journal, synchronous=FULL) before add() returns, and
removed only when the broker acknowledged it (PUBACK). After a restart the rest go out in id
order. So a broker outage, a power cut, or both, lose nothing.

Bound policy: at most `max_messages` pending. When an add would exceed it, the oldest
`location` messages are deleted first to make room. `incident` messages are never dropped:
with no location message left to drop, an incident is stored anyway (over the bound) and a
warning is logged. A `location` message added when full, with no older location message to
drop, is itself not stored: add() returns -1. Every location message dropped either way is
counted in `Outbox.dropped`.

A storage that cannot be written (full, read-only, failing) does not lose a message:
add() keeps it in memory under the next id and stores it, in order, as soon as a write
works again (every add tries, and `flush()`); pending() and remove() see both. The
storage's state says why (evidence.diskstate). A database that cannot even be opened
(read-only storage at start) means an outbox in memory only.

A file that is not a database, or a corrupt one, is moved aside to `<name>.corrupt-<unix
time>` (its -wal and -shm files with it, so it can still be opened by hand) and the outbox
starts empty: the daemon must keep running.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import NamedTuple

from dashsos.evidence.diskstate import STATE
from dashsos.evidence.files import fsync_dir

log = logging.getLogger(__name__)

KINDS = ("incident", "location")

# AUTOINCREMENT: ids never go back, not even after the newest message was removed, so a
# publisher paging with pending(after_id) never skips a message added later.
_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    kind TEXT NOT NULL,
    created REAL NOT NULL
)
"""
_CREATE_INDEX = "CREATE INDEX IF NOT EXISTS outbox_kind ON outbox (kind, id)"

# Only these mean the file itself is bad. "Locked", "cannot open" or "disk I/O error" say
# nothing against the file, and moving a good one aside would lose the messages in it.
_CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class OutboxMessage(NamedTuple):
    id: int  # SQLite rowid, increasing: the order of delivery
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str  # "incident" (never dropped) or "location" (may be dropped when full)
    created: float  # time.time() when added


class Outbox:
    """Messages waiting for the broker's acknowledgement, oldest first. Thread-safe."""

    def __init__(self, path: Path, max_messages: int = 10_000) -> None:
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, not {max_messages}")
        self.path = path
        self.max_messages = max_messages
        self.dropped = 0
        self._lock = threading.Lock()
        self._memory: list[OutboxMessage] = []  # not stored yet: the storage failed
        self._next_id = 1
        self.durable = True  # False: the database itself is in memory (unopenable file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            STATE.failed(exc, f"outbox {path}")
        try:
            self._db = _open(path)
        except sqlite3.OperationalError as err:
            if path.is_dir():  # not a storage fault: a wrong path
                raise
            STATE.failed(err, f"outbox {path}")
            log.error("outbox %s cannot be opened (%s): keeping messages in memory", path, err)
            self._db = _connect(Path(":memory:"), durable=False)
            self.durable = False
        (last,) = self._db.execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),"
            " coalesce((SELECT max(id) FROM outbox), 0))").fetchone()
        self._next_id = int(last) + 1

    def add(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
            kind: str = "incident") -> int:
        """Store a message durably; its id, or -1 for a location message refused when full."""
        if kind not in KINDS:
            raise ValueError(f"unknown message kind {kind!r}, expected one of {KINDS}")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
        with self._lock:
            self._flush_memory()
            if self._memory:  # still failing: in memory, after the others, in order
                over = self._count() + 1 - self.max_messages
                dropped = 0
                message_id = -1
                if over <= 0 or kind == "incident":
                    message_id = self._next_id
                    self._next_id += 1
                    self._memory.append(OutboxMessage(message_id, topic, bytes(payload), qos,
                                                      bool(retain), kind, time.time()))
                self.dropped += 1 if message_id == -1 else 0
            else:
                message = OutboxMessage(self._next_id, topic, bytes(payload), qos,
                                        bool(retain), kind, time.time())
                try:
                    over, dropped, message_id = self._store(message)
                except sqlite3.Error as err:
                    STATE.failed(err, "outbox")
                    over, dropped, message_id = 0, 0, message.id
                    self._memory.append(message)
                self._next_id = max(self._next_id, message_id + 1)
                # Counted only once committed: a failed transaction dropped nothing.
                self.dropped += dropped + (1 if message_id == -1 else 0)
        if over - dropped > 0 and kind == "incident":
            log.warning("outbox over its bound of %d with no location message to drop: "
                        "incident message %d stored anyway", self.max_messages, message_id)
        return message_id

    def _store(self, message: OutboxMessage) -> tuple[int, int, int]:
        """(over the bound by, locations dropped, id or -1), committed durably."""
        # One transaction: making room and storing commit together or not at all.
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            over = self._count() + 1 - self.max_messages
            dropped = self._drop_oldest_locations(over) if over > 0 else 0
            message_id = -1
            if over - dropped <= 0 or message.kind == "incident":
                self._db.execute(
                    "INSERT INTO outbox (id, topic, payload, qos, retain, kind, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)", message)
                message_id = message.id
        if self.durable:
            STATE.worked(f"stored in {self.path.name}")
        return over, dropped, message_id

    def _flush_memory(self) -> None:
        """Store what a failing storage kept in memory, oldest first, while it works."""
        while self._memory:
            try:
                self._store(self._memory[0])
            except sqlite3.Error as err:
                STATE.failed(err, "outbox")
                return
            self._memory.pop(0)

    def flush(self) -> int:
        """Try to store the messages kept in memory; how many are still only there."""
        with self._lock:
            self._flush_memory()
            return len(self._memory)

    def pending(self, after_id: int = 0, limit: int = 100) -> list[OutboxMessage]:
        """Up to `limit` messages with an id above `after_id`, in order of delivery."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, kind, created FROM outbox"
                " WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
            memory = [m for m in self._memory if m.id > after_id][:limit]
        stored = [OutboxMessage(int(id_), str(topic), bytes(payload), int(qos), bool(retain),
                                str(kind), float(created))
                  for id_, topic, payload, qos, retain, kind, created in rows]
        return sorted(stored + memory)[:limit]

    def remove(self, message_id: int) -> None:
        """Forget a message the broker acknowledged; removing it twice is harmless."""
        with self._lock:
            self._memory = [m for m in self._memory if m.id != message_id]
            try:
                self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
            except sqlite3.Error as err:  # sent anyway; at worst sent again after a restart
                STATE.failed(err, "outbox")

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    def counts(self) -> dict[str, int]:
        """Messages pending by kind, every kind present even at zero."""
        counts = dict.fromkeys(KINDS, 0)
        with self._lock:
            for kind, n in self._db.execute("SELECT kind, count(*) FROM outbox GROUP BY kind"):
                counts[str(kind)] += int(n)
            for m in self._memory:
                counts[m.kind] += 1
        return counts

    @property
    def in_memory(self) -> int:
        return len(self._memory)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _count(self) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM outbox").fetchone()
        return int(n) + len(self._memory)

    def _drop_oldest_locations(self, n: int) -> int:
        cursor = self._db.execute(
            "DELETE FROM outbox WHERE id IN"
            " (SELECT id FROM outbox WHERE kind = 'location' ORDER BY id LIMIT ?)", (n,))
        return cursor.rowcount


def _open(path: Path) -> sqlite3.Connection:
    try:
        db = _connect(path)
    except sqlite3.DatabaseError as err:
        if (getattr(err, "sqlite_errorcode", 0) & 0xFF) not in _CORRUPT:
            raise
        aside = _move_aside(path)
        log.error("outbox database %s is unusable (%s): moved aside to %s, starting empty",
                  path, err, aside.name)
        db = _connect(path)
    # A new database file's name must survive a power cut too, not only its contents.
    fsync_dir(path.parent)
    return db


def _connect(path: Path, durable: bool = True) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions, add() opens its own; a single
    # statement commits on its own.
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        (mode,) = db.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode != "wal" and durable:
            log.warning("outbox database %s: journal mode %s, not wal", path, mode)
        # FULL: the WAL is fsynced at every commit, so an add() that returned survives a
        # power cut (NORMAL would only keep the database consistent, not the last commits).
        db.execute("PRAGMA synchronous=FULL")
        db.execute(_CREATE_TABLE)
        db.execute(_CREATE_INDEX)
        db.execute("SELECT count(*) FROM outbox").fetchone()
    except BaseException:
        db.close()
        raise
    return db


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    # The journal files go with it, under names SQLite finds when the copy is opened; left
    # behind, a new database could replay a journal that is not its own.
    for suffix in ("-wal", "-shm", ""):
        source = path.with_name(path.name + suffix)
        if source.exists():
            os.replace(source, aside.with_name(aside.name + suffix))
    fsync_dir(path.parent)
    return aside
