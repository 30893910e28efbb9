"""Durable state under state_dir: each drop's stage, each instance's outcome per destination,
every attempt, destinations' health, pending retry requests, reads of a drop that cost a
scan worker (or the daemon) its life, the drops settling now, destinations paused and drops
cancelled by an operator, and a summary of each finished drop for `history` (SQLite, WAL,
one writer).

The work area on disk is the truth about which drops exist; this database only remembers how
far each got. A corrupt or missing database is set aside and started afresh: drops are then
re-sent whole, never lost.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..logs import get_logger

DB_NAME = "state.db"
SCHEMA_VERSION = 4  # 2: reads; 3: settling; 4: pauses, cancels, finished drops' summaries
SCHEMA = """
CREATE TABLE IF NOT EXISTS drops (
    id TEXT PRIMARY KEY, inbox TEXT NOT NULL, origin TEXT NOT NULL, name TEXT NOT NULL,
    destination TEXT, stage TEXT NOT NULL, outcome TEXT, target TEXT,
    instances_total INTEGER DEFAULT 0, skip_studies TEXT, claimed_at TEXT NOT NULL,
    updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    drop_id TEXT NOT NULL, destination TEXT NOT NULL, sop_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL, stored INTEGER NOT NULL, status INTEGER, note TEXT,
    at REAL NOT NULL, PRIMARY KEY (drop_id, destination, sop_uid));
CREATE TABLE IF NOT EXISTS attempts (
    drop_id TEXT NOT NULL, number INTEGER NOT NULL, destination TEXT, started REAL NOT NULL,
    ended REAL, outcome TEXT, reason TEXT, PRIMARY KEY (drop_id, number));
CREATE TABLE IF NOT EXISTS destinations (
    name TEXT PRIMARY KEY, up INTEGER NOT NULL, since REAL NOT NULL, error TEXT,
    next_try REAL);
CREATE TABLE IF NOT EXISTS memos (
    scope TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (scope, key));
CREATE TABLE IF NOT EXISTS retry_requests (
    origin TEXT PRIMARY KEY, skip_studies TEXT NOT NULL, requested_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS progress (
    drop_id TEXT NOT NULL, destination TEXT NOT NULL, study_uid TEXT NOT NULL,
    files INTEGER NOT NULL, bytes INTEGER NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (drop_id, destination, study_uid));
CREATE TABLE IF NOT EXISTS deid_map (
    kind TEXT NOT NULL, original TEXT NOT NULL, replacement TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (kind, original));
CREATE INDEX IF NOT EXISTS deid_map_replacement ON deid_map (replacement);
CREATE TABLE IF NOT EXISTS reads (
    drop_id TEXT PRIMARY KEY, reading INTEGER NOT NULL DEFAULT 0,
    failures TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS own_folders (
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (dev, ino));
CREATE TABLE IF NOT EXISTS settling (
    inbox TEXT NOT NULL, drop_path TEXT NOT NULL, seen REAL NOT NULL,
    PRIMARY KEY (inbox, drop_path));
CREATE TABLE IF NOT EXISTS pauses (
    destination TEXT PRIMARY KEY, reason TEXT, until REAL, by TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS cancels (drop_id TEXT PRIMARY KEY, by TEXT NOT NULL, at REAL NOT NULL);
"""
#: columns added to `drops` by version 4: what `history` lists of a finished drop
SUMMARY = {"studies": "INTEGER", "instances": "INTEGER", "bytes": "INTEGER", "seconds": "REAL",
           "first_reason": "TEXT"}
#: why a read that began was never seen to end: the daemon itself died reading the drop
DIED_READING = "the daemon stopped while reading it"

log = get_logger(step="state")


@dataclass(frozen=True)
class Attempt:
    number: int
    destination: str | None
    started: float
    ended: float | None
    outcome: str | None
    reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"attempt": self.number, "destination": self.destination,
                "started": _iso(self.started), "ended": _iso(self.ended) if self.ended else None,
                "outcome": self.outcome, "reason": self.reason}


class State:
    """One connection shared by the daemon's threads behind a lock: SQLite's single writer."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / DB_NAME
        self.lock = threading.RLock()
        self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{DB_NAME}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    source.rename(Path(f"{aside}{suffix}"))
            log.warning("state database unreadable; set aside and started afresh: drops in the "
                        "work areas will be re-sent whole", error=str(exc), set_aside=str(aside))
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                             timeout=30)
        try:
            # WAL + NORMAL: a commit survives a killed process; only power loss may drop the
            # last few, which costs a re-send, never a file
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            if db.execute("PRAGMA user_version").fetchone()[0] < 4:
                _add_summary_columns(db)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("SELECT count(*) FROM drops").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _read(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    # --- drops --------------------------------------------------------------------------
    def drop_stage(self, drop_id: str, stage: str, *, inbox: str = "", origin: str = "",
                   name: str = "", claimed_at: str = "", destination: str | None = None,
                   total: int | None = None, outcome: str | None = None,
                   target: str | None = None) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO drops (id, inbox, origin, name, stage, claimed_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET stage=excluded.stage,"
                " updated_at=excluded.updated_at",
                (drop_id, inbox, origin, name, stage, claimed_at, time.time()))
            for column, value in (("destination", destination), ("instances_total", total),
                                  ("outcome", outcome), ("target", target)):
                if value is not None:
                    db.execute(f"UPDATE drops SET {column}=? WHERE id=?", (value, drop_id))
            if stage == "finished":  # a cancel asked for too late is moot
                db.execute("DELETE FROM cancels WHERE drop_id=?", (drop_id,))

    def drop_destination(self, drop_id: str, destination: str) -> None:
        with self._write() as db:
            db.execute("UPDATE drops SET destination=? WHERE id=?", (destination, drop_id))

    def record_summary(self, drop_id: str, studies: int, instances: int, sent_bytes: int,
                       seconds: float, first_reason: str | None) -> None:
        """What `history` shows of the drop, recorded as its outcome is decided."""
        with self._write() as db:
            db.execute("UPDATE drops SET studies=?, instances=?, bytes=?, seconds=?, "
                       "first_reason=? WHERE id=?",
                       (studies, instances, sent_bytes, seconds, first_reason, drop_id))

    # --- instances ----------------------------------------------------------------------
    def record_instance(self, drop_id: str, destination: str, study_uid: str, sop_uid: str,
                        stored: bool, status: int | None, note: str | None) -> None:
        # one statement is its own transaction (autocommit): as durable as BEGIN/COMMIT around
        # it, but one call into SQLite instead of three, each of which hands the GIL to a
        # scanning lane and waits to get it back (measured: the other lane's C-STOREs slow down)
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (drop_id, destination, sop_uid, study_uid, int(stored), status, note,
                             time.time()))

    def acknowledged(self, drop_id: str,
                     destination: str) -> dict[str, tuple[int | None, str | None]]:
        """SOP Instance UIDs the destination already stored for this drop, with status, note."""
        rows = self._read("SELECT sop_uid, status, note FROM instances WHERE drop_id=? AND "
                          "destination=? AND stored=1", drop_id, destination)
        return {sop: (status, note) for sop, status, note in rows}

    def record_progress(self, drop_id: str, destination: str, study_uid: str, files: int,
                        sent_bytes: int) -> None:
        """Files and bytes sent so far of a study not yet acknowledged (REST uploads)."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO progress VALUES (?, ?, ?, ?, ?, ?)",
                       (drop_id, destination, study_uid, files, sent_bytes, time.time()))

    def stored_count(self, drop_id: str) -> int:
        return int(self._read("SELECT count(*) FROM instances WHERE drop_id=? AND stored=1",
                              drop_id)[0][0])

    # --- attempts -----------------------------------------------------------------------
    def start_attempt(self, drop_id: str, destination: str | None) -> int:
        with self._write() as db:
            row = db.execute("SELECT coalesce(max(number), 0) FROM attempts WHERE drop_id=?",
                             (drop_id,)).fetchone()
            number = int(row[0]) + 1
            db.execute("INSERT INTO attempts (drop_id, number, destination, started) "
                       "VALUES (?, ?, ?, ?)", (drop_id, number, destination, time.time()))
        return number

    def end_attempt(self, drop_id: str, number: int, outcome: str, reason: str | None) -> None:
        with self._write() as db:
            db.execute("UPDATE attempts SET ended=?, outcome=?, reason=? WHERE drop_id=? AND "
                       "number=?", (time.time(), outcome, reason, drop_id, number))

    def attempts(self, drop_id: str) -> list[Attempt]:
        rows = self._read("SELECT number, destination, started, ended, outcome, reason FROM "
                          "attempts WHERE drop_id=? ORDER BY number", drop_id)
        return [Attempt(*row) for row in rows]

    # --- reads: a drop whose reading kills a worker, or the daemon, again and again ----------
    def start_reading(self, drop_id: str) -> list[str]:
        """A read of the drop begins; the reasons of every read of it that failed so far,
        one that began and never ended (the daemon died in it) counted now."""
        with self._write() as db:
            row = db.execute("SELECT reading FROM reads WHERE drop_id=?", (drop_id,)).fetchone()
            if row is not None and row[0]:
                self._add_read_failure(db, drop_id, DIED_READING)
            db.execute("INSERT INTO reads (drop_id, reading) VALUES (?, 1) ON CONFLICT(drop_id) "
                       "DO UPDATE SET reading=1", (drop_id,))
        return self.read_failures(drop_id)

    def read_failed(self, drop_id: str, reason: str) -> list[str]:
        """The worker reading the drop was lost; every failure's reason so far."""
        with self._write() as db:
            self._add_read_failure(db, drop_id, reason)
        return self.read_failures(drop_id)

    def end_reading(self, drop_id: str) -> None:
        """The read ended in a way the daemon saw: a scan, a reason, a stop."""
        with self._write() as db:
            db.execute("UPDATE reads SET reading=0 WHERE drop_id=?", (drop_id,))

    def read_failures(self, drop_id: str) -> list[str]:
        rows = self._read("SELECT failures FROM reads WHERE drop_id=?", drop_id)
        return list(json.loads(rows[0][0])) if rows else []

    @staticmethod
    def _add_read_failure(db: sqlite3.Connection, drop_id: str, reason: str) -> None:
        row = db.execute("SELECT failures FROM reads WHERE drop_id=?", (drop_id,)).fetchone()
        failures = json.dumps([*json.loads(row[0] if row else "[]"), reason])
        db.execute("INSERT INTO reads (drop_id, failures) VALUES (?, ?) ON CONFLICT(drop_id) "
                   "DO UPDATE SET failures=excluded.failures", (drop_id, failures))

    # --- destinations -------------------------------------------------------------------
    def destination_health(self, name: str, up: bool, error: str | None = None,
                           next_try: float | None = None) -> bool:
        """Record health; True when it changed (so the log says it once, not every retry)."""
        with self._write() as db:
            row = db.execute("SELECT up FROM destinations WHERE name=?", (name,)).fetchone()
            changed = row is None or bool(row[0]) != up
            since = time.time() if changed else None
            db.execute(
                "INSERT INTO destinations (name, up, since, error, next_try) VALUES (?,?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET up=excluded.up, error=excluded.error, "
                "next_try=excluded.next_try, since=coalesce(?, since)",
                (name, int(up), time.time(), error, next_try, since))
        return changed and not (row is None and up)

    def finished_drop(self, target: str) -> dict[str, str] | None:
        """The drop this daemon moved to `target` (done/ or failed/), as recorded then."""
        rows = self._read("SELECT inbox, origin, outcome FROM drops WHERE target=? AND "
                          "stage='finished' ORDER BY updated_at DESC LIMIT 1", target)
        return {"inbox": rows[0][0], "origin": rows[0][1], "outcome": rows[0][2]} if rows \
            else None

    # --- the daemon's own folders in the inboxes (never drops, even renamed) --------------
    def record_own_folders(self, found: set[tuple[int, int]]) -> None:
        with self._write() as db:
            db.executemany("INSERT OR IGNORE INTO own_folders VALUES (?, ?, ?)",
                           [(dev, ino, time.time()) for dev, ino in found])

    def own_folders(self) -> set[tuple[int, int]]:
        return {(r[0], r[1]) for r in self._read("SELECT dev, ino FROM own_folders")}

    # --- retry requests (written by `xnat-inbox retry`, read by the daemon) ---------------
    def request_retry(self, origin: str, skip_studies: list[str]) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO retry_requests VALUES (?, ?, ?)",
                       (origin, json.dumps(skip_studies), time.time()))

    def adopt_retry_request(self, drop_id: str, origin: str) -> list[str] | None:
        """A claimed drop that `retry` put back takes over its request (studies to skip)."""
        with self._write() as db:
            row = db.execute("SELECT skip_studies FROM retry_requests WHERE origin=?",
                             (origin,)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM retry_requests WHERE origin=?", (origin,))
            db.execute("UPDATE drops SET skip_studies=? WHERE id=?", (row[0], drop_id))
        return list(json.loads(row[0]))

    def skip_studies(self, drop_id: str) -> list[str]:
        rows = self._read("SELECT skip_studies FROM drops WHERE id=?", drop_id)
        return list(json.loads(rows[0][0])) if rows and rows[0][0] else []

    # --- de-identification map (PHI: read only by `xnat-inbox lookup`) ----------------------
    def record_deid_map(self, rows: list[tuple[str, str, str]]) -> None:
        """(kind, original, replacement) rows; the first time a value was seen is kept."""
        with self._write() as db:
            db.executemany("INSERT OR IGNORE INTO deid_map VALUES (?, ?, ?, ?)",
                           [(*row, time.time()) for row in rows])

    def deid_lookup(self, value: str) -> list[tuple[str, str, str]]:
        """Rows whose original or replacement is `value`: (kind, original, replacement)."""
        return [(r[0], r[1], r[2]) for r in self._read(
            "SELECT kind, original, replacement FROM deid_map WHERE original=? OR "
            "replacement=? ORDER BY kind", value, value)]

    # --- status: what the daemon is doing, for `xnat-inbox status` ---------------------------
    def record_settling(self, drops: list[tuple[str, str, float]]) -> None:
        """The drops the daemon settles now, the whole set: (inbox, drop in it, first seen)."""
        with self._write() as db:
            db.execute("DELETE FROM settling")
            db.executemany("INSERT INTO settling VALUES (?, ?, ?)", drops)

    def settling(self) -> list[tuple[str, str, float]]:
        return [(r[0], r[1], r[2]) for r in self._read(
            "SELECT inbox, drop_path, seen FROM settling ORDER BY seen, drop_path")]

    def unfinished(self) -> list[dict[str, Any]]:
        """Claimed drops not finished, in claim order, with their files stored so far."""
        rows = self._read(
            "SELECT d.id, d.inbox, d.origin, d.stage, d.destination, d.instances_total, "
            "(SELECT count(*) FROM instances i WHERE i.drop_id=d.id AND i.stored=1), "
            "(SELECT coalesce(sum(p.files), 0) FROM progress p WHERE p.drop_id=d.id), "
            "(SELECT coalesce(sum(p.bytes), 0) FROM progress p WHERE p.drop_id=d.id), "
            "d.updated_at FROM drops d WHERE d.stage != 'finished' ORDER BY d.claimed_at")
        keys = ("id", "inbox", "origin", "stage", "destination", "total", "stored",
                "sent_files", "sent_bytes", "updated_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def finished_since(self, since: float) -> list[dict[str, Any]]:
        """Drops finished since `since` (epoch), the latest first."""
        rows = self._read("SELECT inbox, origin, outcome, target, updated_at FROM drops WHERE "
                          "stage='finished' AND updated_at >= ? ORDER BY updated_at DESC", since)
        keys = ("inbox", "origin", "outcome", "target", "at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def history(self, since: float) -> list[dict[str, Any]]:
        """Drops finished since `since` (epoch), the oldest first, with their summaries."""
        keys = ("id", "inbox", "origin", "outcome", "destination", "target", "at", *SUMMARY)
        # a drop refused before sending has no destination of its own: its route's, if any
        rows = self._read(
            "SELECT d.id, d.inbox, d.origin, d.outcome, coalesce(d.destination, (SELECT "
            "a.destination FROM attempts a WHERE a.drop_id=d.id ORDER BY a.number DESC LIMIT 1)), "
            f"d.target, d.updated_at, {', '.join('d.' + c for c in SUMMARY)} FROM drops d "
            "WHERE d.stage='finished' AND d.updated_at >= ? ORDER BY d.updated_at", since)
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def health(self) -> dict[str, dict[str, Any]]:
        """Each destination's health as last recorded, with its last delivery (epoch)."""
        delivered = dict(self._read("SELECT destination, max(updated_at) FROM drops WHERE "
                                    "stage='finished' AND outcome='done' GROUP BY destination"))
        rows = self._read("SELECT name, up, since, error, next_try FROM destinations")
        found = {r[0]: {"up": bool(r[1]), "since": r[2], "error": r[3], "next_try": r[4]}
                 for r in rows}
        for name, at in delivered.items():
            if name is not None:
                found.setdefault(name, {"up": None, "since": None, "error": None,
                                        "next_try": None})["last_delivery"] = at
        return found


def _add_summary_columns(db: sqlite3.Connection) -> None:
    """Version 4: a finished drop's summary in `drops` (older rows keep NULLs)."""
    have = {row[1] for row in db.execute("PRAGMA table_info(drops)")}
    for column, kind in SUMMARY.items():
        if column not in have:
            db.execute(f"ALTER TABLE drops ADD COLUMN {column} {kind}")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")
