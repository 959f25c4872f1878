"""The journal (`reconciler/journal.py`): events and acks round-trip through SQLite, a step
that started and never finished survives a SIGKILL of the applying process, and the apply lock
keeps a second process out until the holder ends, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.journal import Event, Journal, LockedError

T0 = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    opened = Journal(tmp_path / ".mailrec")
    yield opened
    opened.close()


# --- events, acks, unfinished ------------------------------------------------------------------


def test_events_round_trip(tmp_path: Path) -> None:
    directory = tmp_path / "state" / ".mailrec"
    journal = Journal(directory)  # creates the directory
    jst = timezone(timedelta(hours=9))
    journal.record(T0, "apply", "dns/mx-ttl", "started", source="abc123",
                   detail={"before": 3600, "after": 300, "lowering": True})
    journal.record(T0 + timedelta(seconds=2), "apply", "dns/mx-ttl", "ok", source="abc123",
                   detail={"at": datetime(2026, 11, 29, 18, 0, tzinfo=jst)})
    journal.record(T0 + timedelta(minutes=1), "run", None, "noted")
    journal.close()

    reopened = Journal(directory)  # a new process would see the same
    try:
        events = reopened.events()
        assert [(e.kind, e.step, e.result) for e in events] == [
            ("apply", "dns/mx-ttl", "started"),
            ("apply", "dns/mx-ttl", "ok"),
            ("run", None, "noted"),
        ]
        first = events[0]
        assert first == Event(T0, "apply", "dns/mx-ttl", "started", "abc123",
                              {"before": 3600, "after": 300, "lowering": True})
        assert first.at.utcoffset() == timedelta(0)
        # values JSON cannot hold are stored as text, not lost
        assert events[1].detail == {"at": "2026-11-29 18:00:00+09:00"}
        assert events[2].source == "" and events[2].detail == {}
        assert (directory / "journal.db").is_file()
    finally:
        reopened.close()


def test_events_filter_and_last(journal: Journal) -> None:
    journal.record(T0, "apply", "inbound/suga", "started")
    journal.record(T0 + timedelta(seconds=1), "apply", "inbound/suga", "ok", detail={"n": 1})
    journal.record(T0 + timedelta(seconds=2), "apply", "inbound/tanaka", "failed")
    journal.record(T0 + timedelta(hours=1), "apply", "inbound/suga", "ok", detail={"n": 2})
    journal.record(T0 + timedelta(hours=2), "observe", "inbound/suga", "ok")

    assert [e.result for e in journal.events(step="inbound/suga")] == [
        "started", "ok", "ok", "ok"
    ]
    assert [e.step for e in journal.events(kind="apply", step="inbound/tanaka")] == [
        "inbound/tanaka"
    ]
    assert [e.kind for e in journal.events(kind="observe")] == ["observe"]

    last = journal.last("inbound/suga")
    assert last is not None
    assert last.at == T0 + timedelta(hours=1) and last.detail == {"n": 2}
    assert journal.last("inbound/tanaka") is None  # only failed
    failed = journal.last("inbound/tanaka", result="failed")
    assert failed is not None and failed.at == T0 + timedelta(seconds=2)
    assert journal.last("never/applied") is None


def test_acks_latest_per_step(journal: Journal) -> None:
    journal.record(T0, "ack", "outbound/suga", "noted", detail={"note": "client changed"})
    journal.record(T0 + timedelta(hours=1), "ack", "outbound/tanaka", "noted")
    journal.record(T0 + timedelta(hours=2), "ack", "outbound/suga", "noted",
                   detail={"note": "checked again"})
    journal.record(T0 + timedelta(hours=3), "apply", "outbound/sato", "ok")  # not an ack

    acks = journal.acks()
    assert set(acks) == {"outbound/suga", "outbound/tanaka"}
    assert acks["outbound/suga"].detail == {"note": "checked again"}
    assert acks["outbound/suga"].at == T0 + timedelta(hours=2)


def test_unfinished(journal: Journal) -> None:
    journal.record(T0, "apply", "mailbox/suga", "started")
    journal.record(T0, "apply", "mailbox/suga", "ok")
    journal.record(T0, "apply", "inbound/suga", "started")
    journal.record(T0, "apply", "inbound/suga", "failed")
    journal.record(T0, "apply", "dns/spf", "started")  # crashed here
    journal.record(T0, "apply", "inbound/tanaka", "ok")
    journal.record(T0, "apply", "inbound/tanaka", "started")  # a retry that never finished
    journal.record(T0, "ack", "outbound/suga", "started")  # not an apply

    assert sorted(e.step or "" for e in journal.unfinished()) == ["dns/spf", "inbound/tanaka"]

    journal.record(T0 + timedelta(minutes=5), "apply", "dns/spf", "ok")  # resumed next run
    assert [e.step for e in journal.unfinished()] == ["inbound/tanaka"]


# --- crash and lock across processes -----------------------------------------------------------

CHILD = """
import sys
from datetime import datetime, timezone
from pathlib import Path
from reconciler.journal import Journal

journal = Journal(Path(sys.argv[1]))
with journal.lock():
    journal.record(datetime.now(timezone.utc), "apply", "mailbox/suga", "started")
    journal.record(datetime.now(timezone.utc), "apply", "mailbox/suga", "ok")
    journal.record(datetime.now(timezone.utc), "apply", "dns/mx", "started",
                   source="deadbeef", detail={"host": "example.sakura.ne.jp."})
    print("applying", flush=True)
    sys.stdin.read()  # "the DNS update": blocks until killed
    journal.record(datetime.now(timezone.utc), "apply", "dns/mx", "ok")
"""


@contextmanager
def child_mid_apply(directory: Path) -> Iterator[subprocess.Popen[str]]:
    """A process that holds the lock and is in the middle of applying dns/mx."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(directory)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # returns once the child is mid-apply (or died)
        if line.strip() != "applying":
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"child did not reach the apply: {line!r}\n{err}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def sigkill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL


def test_sigkill_mid_apply_leaves_a_readable_journal_listing_the_step(tmp_path: Path) -> None:
    directory = tmp_path / ".mailrec"
    with child_mid_apply(directory) as proc:
        sigkill(proc)

    journal = Journal(directory)
    try:
        unfinished = journal.unfinished()
        assert [(e.step, e.result, e.source) for e in unfinished] == [
            ("dns/mx", "started", "deadbeef")
        ]
        assert unfinished[0].detail == {"host": "example.sakura.ne.jp."}
        # everything the killed process recorded before is there, nothing after
        assert [(e.step, e.result) for e in journal.events()] == [
            ("mailbox/suga", "started"), ("mailbox/suga", "ok"), ("dns/mx", "started")
        ]
        # and the journal still takes new records (no stale lock, no broken WAL)
        with journal.lock():
            journal.record(T0, "apply", "dns/mx", "ok")
        assert journal.unfinished() == []
    finally:
        journal.close()


def test_lock_refuses_a_second_process_and_names_the_holder(tmp_path: Path) -> None:
    directory = tmp_path / ".mailrec"
    journal = Journal(directory)
    try:
        with child_mid_apply(directory) as proc:
            with pytest.raises(LockedError, match=rf"pid {proc.pid}\b") as raised, \
                    journal.lock():
                pytest.fail("took a lock another process holds")
            assert str(directory / "apply.lock") in str(raised.value)
            # reading while another process applies works (WAL)
            assert [e.step for e in journal.unfinished()] == ["dns/mx"]
            sigkill(proc)

        # the kernel dropped the dead holder's lock: free again, and ours now
        with journal.lock():
            assert (directory / "apply.lock").read_text() == str(os.getpid())
            # held: a second lock, even in this process, is refused
            with pytest.raises(LockedError, match=rf"pid {os.getpid()}\b"), journal.lock():
                pass
        with journal.lock():  # released on exit
            pass
    finally:
        journal.close()


def test_lock_is_released_when_the_block_raises(journal: Journal) -> None:
    with pytest.raises(RuntimeError, match="boom"), journal.lock():
        raise RuntimeError("boom")
    with journal.lock():
        pass


def test_a_forward_probe_is_remembered_only_when_it_succeeded(journal: Journal) -> None:
    from reconciler.observe import JournalView

    journal.record(T0, "apply", "onprem/forward-probe", "failed",
                   detail={"target": "smtp:[rental.example.net]:25"})
    assert JournalView.read(journal).forward_probed == frozenset()
    journal.record(T0, "apply", "onprem/forward-probe", "ok",
                   detail={"target": "smtp:[rental.example.net]:25"})
    assert JournalView.read(journal).forward_probed == {"smtp:[rental.example.net]:25"}


def test_the_view_reads_the_same_without_the_per_user_applies(tmp_path: Path) -> None:
    """JournalView.read skips apply records it never looks at (the bulk of a long journal)
    and still sees exactly what reading every event sees."""
    from reconciler import observe
    from reconciler.observe import JournalView

    journal = Journal(tmp_path / "j")
    at = datetime(2026, 11, 1, tzinfo=UTC)
    tick = iter(range(10_000))

    def record(kind: str, step: str, result: str, **detail: object) -> None:
        journal.record(at + timedelta(minutes=next(tick)), kind, step, result, detail=detail)

    record("observe", observe.BASELINE, "noted")
    for user in ("suga", "sato", "kato_x"):
        for step in (f"mailbox/{user}", f"inbound/{user}", f"onprem-mailbox/{user}"):
            record("apply", step, "started")
            record("apply", step, "ok")
        record("ack", f"outbound/{user}", "noted", to="relay")
    record("apply", "onprem/forward-probe", "ok", target="smtp:[mx.example]:25")
    record("apply", "router/filter/10", "ok", filter=10, present=True)
    record("apply", "router/filter/11", "failed", filter=11, present=True)
    record("apply", "router_filter_x", "ok", filter=12, present=True)  # LIKE's _ is literal
    record("apply", "dns/mx-ttl", "ok", lowering=True, before=3600)
    record("apply", "dns/mx", "ok", to="rental")
    record("apply", "router/route/default", "ok",
           egress={"gateway": "tunnel 2", "address": "203.0.113.9"})
    record("observe", "mailbox/suga", "noted", ack_spent=True)

    class Everything:
        """The journal as JournalView read it before: every event."""

        def events_except_applies(self, **_: object) -> list[Event]:
            return journal.events()

    full = JournalView.read(Everything())  # type: ignore[arg-type]
    filtered = JournalView.read(journal)
    assert filtered == full
    assert filtered.router_filters == frozenset({10})
    assert filtered.forward_probed == frozenset({"smtp:[mx.example]:25"})
    kept = journal.events_except_applies(applied=("dns/mx",), applied_prefixes=("router_f",))
    assert [e.step for e in kept if e.kind == "apply"] == ["router_filter_x", "dns/mx"]
    journal.close()


def test_an_ack_is_withdrawn_only_while_its_step_has_not_run(tmp_path: Path) -> None:
    from reconciler.observe import JournalView
    from reconciler.world import Outbound

    journal = Journal(tmp_path / "j", actor="alice@host")
    at = datetime(2026, 11, 1, tzinfo=UTC)
    assert journal.withdraw_ack(at, "mailbox/suga") == "mailbox/suga has no ack to withdraw"

    journal.record(at, "ack", "mailbox/suga", "noted", detail={"note": "made in the panel"})
    assert "mailbox/suga" in JournalView.read(journal).acked
    assert journal.withdraw_ack(at + timedelta(minutes=1), "mailbox/suga", "wrong user") is None
    assert "mailbox/suga" not in JournalView.read(journal).acked
    assert "mailbox/suga" not in journal.acks()
    assert journal.withdraw_ack(at, "mailbox/suga") == "mailbox/suga has no ack to withdraw"
    withdrawn = journal.events(kind="ack")[-1]
    assert (withdrawn.result, withdrawn.actor, withdrawn.detail["note"]) == (
        "withdrawn", "alice@host", "wrong user")

    # Once the step ran (or its change was seen), the ack is history: refused.
    journal.record(at, "ack", "mailbox/sato", "noted")
    journal.record(at, "apply", "mailbox/sato", "ok")
    refused = journal.withdraw_ack(at, "mailbox/sato")
    assert refused is not None and "already used" in refused
    journal.record(at, "ack", "alias/info", "noted")
    journal.record(at, "observe", "alias/info", "noted", detail={"ack_spent": True})
    assert "already used" in (journal.withdraw_ack(at, "alias/info") or "")

    # An outbound ack withdrawn: the client setting the ack before it recorded comes back.
    journal.record(at, "ack", "outbound/kato", "noted", detail={"to": "relay"})
    journal.record(at, "ack", "outbound/kato", "noted", detail={"to": "onprem"})
    assert JournalView.read(journal).outbound["kato"] is Outbound.ONPREM
    assert journal.withdraw_ack(at, "outbound/kato") is None
    assert JournalView.read(journal).outbound["kato"] is Outbound.RELAY
    journal.record(at, "ack", "outbound/ito", "noted", detail={"to": "relay"})
    assert journal.withdraw_ack(at, "outbound/ito") is None
    assert "ito" not in JournalView.read(journal).outbound  # unknown again: fails closed
    journal.close()


def test_a_journal_without_the_actor_column_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    directory = tmp_path / "old"
    directory.mkdir()
    db = sqlite3.connect(directory / "journal.db")
    db.executescript(
        "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, "
        "kind TEXT NOT NULL, step TEXT, result TEXT NOT NULL, source TEXT NOT NULL DEFAULT '', "
        "detail TEXT NOT NULL DEFAULT '{}');"
        "INSERT INTO events(at, kind, step, result) "
        "VALUES ('2026-11-01T00:00:00+00:00', 'apply', 'dns/spf', 'ok');")
    db.commit()
    db.close()
    journal = Journal(directory, actor="bob@host")
    journal.record(datetime(2026, 11, 2, tzinfo=UTC), "ack", "mailbox/suga", "noted")
    old, new = journal.events()
    assert (old.step, old.actor) == ("dns/spf", "")
    assert (new.step, new.actor) == ("mailbox/suga", "bob@host")
    journal.close()
