"""The journal: a SQLite file beside the state (`.mailrec/journal.db`) that outlives crashes.

It records every applied step (time, result, the commit or file digest it came from), every
ack by a person, and observations only the journal can keep (when the MX TTL was lowered).
Time gates read their start from here. A lock file (`flock`) keeps two applies apart; the
kernel drops it when the holder dies, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,          -- apply | ack | observe | run
    step TEXT,
    result TEXT NOT NULL,        -- started | ok | failed | noted
    source TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_step ON events(step, kind);
"""


def local_actor() -> str:
    """Who runs this command here, for the journal: the login (and who sudo'ed to it) at
    this host."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    sudo = os.environ.get("SUDO_USER")
    who = f"{sudo} (sudo {user})" if sudo and sudo != user else user
    return f"{who}@{socket.gethostname()}"


class LockedError(RuntimeError):
    """Another mailrec apply holds the lock."""


@dataclass(frozen=True)
class Event:
    at: datetime
    kind: str
    step: str | None
    result: str
    source: str
    detail: dict[str, object]
    actor: str = ""  # who: the git author of the commit applied, or the local user


def _event(row: tuple[str, str, str | None, str, str, str, str]) -> Event:
    return Event(datetime.fromisoformat(row[0]), row[1], row[2], row[3], row[4],
                 json.loads(row[5]), row[6])


class Journal:
    def __init__(self, directory: Path, *, actor: str = "") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.actor = actor  # recorded with every event this instance writes
        self.path = directory / "journal.db"
        self._db = sqlite3.connect(self.path, isolation_level=None)
        # WAL + synchronous=FULL: an event that was recorded survives a crash or power loss.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(events)")}
        if "actor" not in columns:  # a journal written before `actor` was recorded
            self._db.execute("ALTER TABLE events ADD COLUMN actor TEXT NOT NULL DEFAULT ''")

    @classmethod
    def existing(cls, directory: Path) -> Journal | None:
        """The journal if one was ever written: read-only commands create nothing."""
        return cls(directory) if (directory / "journal.db").exists() else None

    def close(self) -> None:
        self._db.close()

    def record(
        self,
        at: datetime,
        kind: str,
        step: str | None,
        result: str,
        *,
        source: str = "",
        detail: dict[str, object] | None = None,
        actor: str | None = None,
    ) -> None:
        self._db.execute(
            "INSERT INTO events(at, kind, step, result, source, detail, actor) "
            "VALUES (?,?,?,?,?,?,?)",
            (at.isoformat(), kind, step, result, source, json.dumps(detail or {}, default=str),
             self.actor if actor is None else actor),
        )

    def events(self, *, step: str | None = None, kind: str | None = None) -> list[Event]:
        query = "SELECT at, kind, step, result, source, detail, actor FROM events WHERE 1=1"
        args: list[str] = []
        if step is not None:
            query += " AND step = ?"
            args.append(step)
        if kind is not None:
            query += " AND kind = ?"
            args.append(kind)
        rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [_event(r) for r in rows]

    def events_except_applies(self, *, applied: tuple[str, ...],
                              applied_prefixes: tuple[str, ...] = ()) -> list[Event]:
        """Every event but the apply records of other steps: acks and observations, and the
        `ok` applies of the steps named (exactly, or by prefix). What the gates read, without
        the per-user apply records that are most of a long migration's journal."""
        names = ",".join("?" * len(applied)) or "NULL"
        prefixes = "".join(" OR step LIKE ? ESCAPE '\\'" for _ in applied_prefixes)
        like = [p.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                for p in applied_prefixes]
        # Only "?" placeholders are formatted in; every value is bound.
        rows = self._db.execute(
            "SELECT at, kind, step, result, source, detail, actor FROM events "  # noqa: S608
            "WHERE kind != 'apply' "
            f"OR (result = 'ok' AND (step IN ({names}){prefixes})) ORDER BY id",
            [*applied, *like],
        ).fetchall()
        return [_event(r) for r in rows]

    def last(self, step: str, kind: str = "apply", result: str = "ok") -> Event | None:
        row = self._db.execute(
            "SELECT at, kind, step, result, source, detail, actor FROM events "
            "WHERE step = ? AND kind = ? AND result = ? ORDER BY id DESC LIMIT 1",
            (step, kind, result),
        ).fetchone()
        if row is None:
            return None
        return _event(row)

    def withdraw_ack(self, at: datetime, step: str, note: str = "") -> str | None:
        """Take back the live ack of `step`: None when recorded, else why not (no ack, or its
        step already ran or its change was already observed: then a withdrawal would rewrite
        history, not correct it)."""
        last = self._db.execute(
            "SELECT id, result, at FROM events WHERE kind = 'ack' AND step = ? "
            "ORDER BY id DESC LIMIT 1", (step,)).fetchone()
        if last is None or last[1] == "withdrawn":
            return f"{step} has no ack to withdraw"
        used = self._db.execute(
            "SELECT kind, at FROM events WHERE step = ? AND id > ? AND ("
            " (kind = 'apply' AND result = 'ok')"
            " OR (kind = 'observe' AND json_extract(detail, '$.ack_spent')))"
            " ORDER BY id LIMIT 1", (step, last[0])).fetchone()
        if used is not None:
            what = "applied" if used[0] == "apply" else "seen done"
            return (f"the ack of {step} (at {last[2]}) was already used: the step was {what} "
                    f"at {used[1]}; it can no longer be withdrawn")
        self.record(at, "ack", step, "withdrawn", detail={"note": note, "acked_at": last[2]})
        return None

    def acks(self) -> dict[str, Event]:
        """The latest live ack per step id (a withdrawn one is not)."""
        latest = {e.step: e for e in self.events(kind="ack") if e.step}
        return {step: e for step, e in latest.items() if e.result != "withdrawn"}

    def unfinished(self) -> list[Event]:
        """Steps that started but have no outcome: a crash mid-apply (resumed next run)."""
        rows = self._db.execute(
            "SELECT s.at, s.kind, s.step, s.result, s.source, s.detail, s.actor FROM events s "
            "WHERE s.kind='apply' AND s.result='started' AND NOT EXISTS ("
            " SELECT 1 FROM events e WHERE e.step = s.step AND e.kind='apply' AND e.id > s.id"
            " AND e.result IN ('ok','failed'))"
        ).fetchall()
        return [_event(r) for r in rows]

    @contextmanager
    def lock(self) -> Iterator[None]:
        path = self.directory / "apply.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise LockedError(
                    f"another mailrec apply is running (pid {holder}, lock {path})"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)
