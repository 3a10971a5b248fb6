"""The rollout controller's state in SQLite: one file, WAL, written before anything is acted on.

Tables: ``releases`` (the exact signed bytes of each release used, and the folder its bundles are
in), ``rollouts`` (the spec and the state machine's own fields as JSON), ``targets`` (one row per
device per rollout), ``commands`` (pause / resume / abort written by ``edgepack rollout``, applied
by the controller in order), ``keyrings`` (each fleet's desired root-signed keyrings, the exact
file bytes, written by ``edgepack fleet keyring push``), ``keyring_targets`` (one row per device
per keyring version: what it reports and how the push went) and ``meta`` (schema version).

Why SQLite, and how it stays whole: it is the embedded default (nothing to run beside the
controller); WAL lets ``rollout status`` read while the controller writes; every batch of
transitions is one transaction with ``synchronous=FULL``, so a kill -9 (or a power cut) leaves
the last committed batch, never half of one. One controller per database: an exclusive ``flock``
on ``DB.lock``, released by the kernel when the process dies however it dies.

Readers (the CLI, a console) open it with ``writer=False`` and never take the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from agent.errors import EdgepackError
from fleet.keyring_push import DesiredKeyring, KeyringTarget
from fleet.rollout import ACTIVE, NEW, Rollout, RolloutError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (
    release_id TEXT PRIMARY KEY, data BLOB NOT NULL, sig BLOB NOT NULL, directory TEXT NOT NULL,
    added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, release_id TEXT NOT NULL, fleet TEXT NOT NULL, status TEXT NOT NULL,
    state TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, base_url TEXT);
CREATE TABLE IF NOT EXISTS targets (
    rollout_id TEXT NOT NULL, device TEXT NOT NULL, state TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (rollout_id, device));
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rollout_id TEXT NOT NULL, command TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '', ts REAL NOT NULL, applied REAL, outcome TEXT);
CREATE INDEX IF NOT EXISTS commands_pending ON commands (applied);
CREATE TABLE IF NOT EXISTS keyrings (
    fleet TEXT NOT NULL, version INTEGER NOT NULL, document BLOB NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (fleet, version));
CREATE TABLE IF NOT EXISTS keyring_targets (
    fleet TEXT NOT NULL, version INTEGER NOT NULL, device TEXT NOT NULL, outcome TEXT NOT NULL,
    data TEXT NOT NULL, PRIMARY KEY (fleet, version, device));
"""


class StoreError(EdgepackError):
    """The controller's database cannot be opened, is locked by another controller, or is damaged."""


def default_db_path() -> Path:
    """``$EDGEPACK_FLEET_DB``, else the XDG state folder's ``edgepack/fleet.db``."""
    env = os.environ.get("EDGEPACK_FLEET_DB")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "edgepack" / "fleet.db"


class FleetStore:
    """The controller's SQLite database.

    Args:
        path: the database file (created with its folder if missing).
        writer: take the one-controller lock (the controller); False for readers (the CLI).

    Raises:
        StoreError: another controller holds the lock, or the file is not a usable database.
    """

    def __init__(self, path: Path, *, writer: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None
        if writer:
            self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                self._lock_fd = None
                raise StoreError(f"another controller is running on {self.path}",
                                 hint="One controller owns a database; stop the other one, or "
                                      "give this one its own --db.") from None
        try:
            self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=30000")
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema {row[0]}; this edgepack reads {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            self.close()
            raise StoreError(f"cannot use {self.path} as the fleet database: {e}",
                             hint="Is it an edgepack fleet database? Point --db at another file.") from e

    def close(self) -> None:
        with contextlib.suppress(AttributeError, sqlite3.Error):
            self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def __enter__(self) -> FleetStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic batch of writes (``BEGIN IMMEDIATE`` ... ``COMMIT``)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StoreError(f"cannot write {self.path}: {e}") from e
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"cannot commit to {self.path}: {e}",
                             hint="Is the disk full? Nothing of this batch was acted on.") from e

    # --- releases and new rollouts (written by the CLI) -------------------------------------------

    def add_rollout(self, rollout: Rollout, *, data: bytes, sig: bytes, directory: Path,
                    base_url: str | None = None) -> None:
        """Record a new rollout (status ``new``) and its release's signed bytes.

        Raises:
            RolloutError: the id exists, or another rollout is active on the same fleet.
        """
        spec = rollout.spec
        with self.transaction() as db:
            active = db.execute(
                f"SELECT id, status FROM rollouts WHERE fleet=? AND status IN ({_marks(ACTIVE)})",
                (spec.fleet, *sorted(ACTIVE))).fetchone()
            if active:
                raise RolloutError(f"rollout {active[0]} is {active[1]} on fleet {spec.fleet}",
                                   hint=f"One rollout at a time per fleet: edgepack rollout abort "
                                        f"{active[0]} (a --dynamic rollout stays open until aborted).")
            if db.execute("SELECT 1 FROM rollouts WHERE id=?", (spec.rollout_id,)).fetchone():
                raise RolloutError(f"rollout {spec.rollout_id} exists")
            db.execute("INSERT OR REPLACE INTO releases VALUES (?, ?, ?, ?, ?)",
                       (spec.release_id, data, sig, str(directory), time.time()))
            db.execute("INSERT INTO rollouts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (spec.rollout_id, spec.release_id, spec.fleet, NEW, json.dumps(rollout.to_dict()),
                        rollout.created, rollout.updated, base_url))

    def release(self, release_id: str) -> tuple[bytes, bytes, Path]:
        """The signed bytes and bundle folder of a release used by a rollout.

        Raises:
            RolloutError: unknown release.
        """
        row = self.db.execute("SELECT data, sig, directory FROM releases WHERE release_id=?",
                              (release_id,)).fetchone()
        if row is None:
            raise RolloutError(f"release {release_id} is not in {self.path}")
        return bytes(row[0]), bytes(row[1]), Path(row[2])

    def add_command(self, rollout_id: str, command: str, reason: str = "") -> int:
        """Queue an operator command for the controller.

        Raises:
            RolloutError: no such rollout.
        """
        with self.transaction() as db:
            if not db.execute("SELECT 1 FROM rollouts WHERE id=?", (rollout_id,)).fetchone():
                raise RolloutError(f"no rollout {rollout_id!r}", hint="edgepack rollout list")
            cur = db.execute("INSERT INTO commands (rollout_id, command, reason, ts) VALUES (?, ?, ?, ?)",
                             (rollout_id, command, reason, time.time()))
            return int(cur.lastrowid or 0)

    def command_outcome(self, command_id: int) -> tuple[float | None, str | None]:
        row = self.db.execute("SELECT applied, outcome FROM commands WHERE id=?", (command_id,)).fetchone()
        return (row[0], row[1]) if row else (None, None)

    # --- the controller's side ----------------------------------------------------------------------

    def pending_commands(self) -> list[tuple[int, str, str, str]]:
        return [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in self.db.execute(
            "SELECT id, rollout_id, command, reason FROM commands WHERE applied IS NULL ORDER BY id")]

    def mark_command(self, db: sqlite3.Connection, command_id: int, outcome: str) -> None:
        db.execute("UPDATE commands SET applied=?, outcome=? WHERE id=?", (time.time(), outcome, command_id))

    def rollout_ids(self, statuses: Iterable[str] | None = None, fleet: str | None = None) -> list[str]:
        q, args = "SELECT id FROM rollouts WHERE 1=1", []
        if statuses is not None:
            st = sorted(statuses)
            q += f" AND status IN ({_marks(st)})"
            args += st
        if fleet is not None:
            q += " AND fleet=?"
            args.append(fleet)
        return [r[0] for r in self.db.execute(q + " ORDER BY created", args)]

    def load(self, rollout_id: str) -> Rollout:
        """The rollout as last persisted.

        Raises:
            RolloutError: no such rollout, or its stored state is unreadable.
        """
        row = self.db.execute("SELECT state FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
        if row is None:
            raise RolloutError(f"no rollout {rollout_id!r}", hint="edgepack rollout list")
        targets = [json.loads(r[0]) for r in self.db.execute(
            "SELECT data FROM targets WHERE rollout_id=?", (rollout_id,))]
        try:
            return Rollout.from_dict(json.loads(row[0]), targets)
        except (ValueError, KeyError, TypeError) as e:
            raise RolloutError(f"rollout {rollout_id} is stored in a form this edgepack cannot "
                               f"read: {e}") from e

    def save(self, db: sqlite3.Connection, rollout: Rollout) -> None:
        """Write the rollout's changed fields and dirty targets (inside a :meth:`transaction`)."""
        rid = rollout.spec.rollout_id
        if rollout.changed:
            db.execute("UPDATE rollouts SET status=?, state=?, updated=? WHERE id=?",
                       (rollout.status, json.dumps(rollout.to_dict()), rollout.updated, rid))
        rows = rollout.target_rows()
        if rows:
            db.executemany("INSERT OR REPLACE INTO targets VALUES (?, ?, ?, ?)",
                           [(rid, t["device"], t["state"], json.dumps(t)) for t in rows])

    def base_url(self, rollout_id: str) -> str | None:
        row = self.db.execute("SELECT base_url FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
        return row[0] if row else None

    # --- the fleet's desired keyring ------------------------------------------------------------------

    def add_keyring(self, db: sqlite3.Connection, desired: DesiredKeyring) -> None:
        """Record a fleet's new desired keyring (inside a :meth:`transaction`, after checking it
        against :meth:`desired_keyring` read in the same one)."""
        db.execute("INSERT INTO keyrings VALUES (?, ?, ?, ?)",
                   (desired.fleet, desired.version, desired.document, desired.created))

    def desired_keyring(self, fleet: str) -> DesiredKeyring | None:
        """The fleet's desired keyring (its highest recorded version), or None."""
        row = self.db.execute("SELECT version, document, created FROM keyrings WHERE fleet=? "
                              "ORDER BY version DESC LIMIT 1", (fleet,)).fetchone()
        return DesiredKeyring(fleet, int(row[0]), bytes(row[1]), float(row[2])) if row else None

    def keyring_fleets(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT fleet FROM keyrings ORDER BY fleet")]

    def keyring_targets(self, fleet: str, version: int) -> list[KeyringTarget]:
        return [KeyringTarget.from_dict(json.loads(r[0])) for r in self.db.execute(
            "SELECT data FROM keyring_targets WHERE fleet=? AND version=? ORDER BY device",
            (fleet, version))]

    def save_keyring_targets(self, db: sqlite3.Connection, fleet: str,
                             targets: Iterable[KeyringTarget]) -> None:
        """Write pushes (inside a :meth:`transaction`)."""
        db.executemany("INSERT OR REPLACE INTO keyring_targets VALUES (?, ?, ?, ?, ?)",
                       [(fleet, t.version, t.device, t.outcome, json.dumps(t.to_dict())) for t in targets])

    # --- reading for status ---------------------------------------------------------------------------

    def summaries(self, fleet: str | None = None) -> list[dict[str, Any]]:
        """One line per rollout for ``rollout list``: id, release, fleet, status, reason, times."""
        out = []
        for rid in self.rollout_ids(fleet=fleet):
            row = self.db.execute("SELECT release_id, fleet, status, state, created, updated FROM rollouts "
                                  "WHERE id=?", (rid,)).fetchone()
            state = json.loads(row[3])
            out.append({"rollout": rid, "release": row[0], "fleet": row[1], "status": row[2],
                        "reason": state.get("reason", ""), "created": row[4], "updated": row[5],
                        "wave": state.get("wave", 0) + 1 if state.get("plan") else 0,
                        "waves": len(state.get("plan") or [])})
        return out


def _marks(items: Iterable[object]) -> str:
    return ",".join("?" for _ in items)


__all__ = ["FleetStore", "StoreError", "default_db_path"]
