"""Faults for the e2e story, each its own run: armed at a named stage of the story
(tests/e2e/story.py calls `at(stage)` right after the commit that starts the stage).

Each fault records what it did and when; after the run, `hit(story)` says whether mailrec
really met it (a failed step or round in the daemon's log), so a fault that missed its moment
is reported as such instead of passing silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.e2e.story import Story


class Fault:
    name = "none"
    stage = ""  # the stage it strikes at
    what = "no fault"

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self.done = threading.Event()
        self.window: tuple[float, float] | None = None  # wall-clock seconds it was on

    def arm(self, story: Story) -> None:
        pass

    def at(self, stage: str, story: Story) -> None:
        if stage == self.stage:
            story.fault_log.append(f"{time.monotonic() - story.timeline.started:.1f}s "
                                   f"{self.name} at {stage}")
            thread = threading.Thread(target=self._strike, args=(story,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _strike(self, story: Story) -> None:
        start = time.time()
        try:
            self.strike(story)
        finally:
            self.window = (start, time.time())
            self.done.set()

    def strike(self, story: Story) -> None:
        pass

    def disarm(self, story: Story) -> None:
        for thread in self._threads:
            thread.join(timeout=120)

    def hit(self, story: Story) -> str:
        """Whether mailrec met the fault: the daemon logged a failed step or round while
        the fault was on (or within 90 s after)."""
        if self.name == "none":
            return "-"
        if self.window is None:
            return "no (never struck)"
        start, end = self.window
        failures = [line for line in daemon_log(story)
                    if (line.get("level") == "error" or line.get("status") == "failed")
                    # 90 s: an SSH command that never hears back times out after 60 s.
                    and start <= _epoch(line.get("ts")) <= end + 90]
        if not failures:
            return "no (nothing failed while it was on)"
        first = str(failures[0].get("message", ""))[:120]
        return f"yes ({len(failures)} failed step/round line(s), first: {first})"


def _epoch(ts: object) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def daemon_log(story: Story) -> list[dict[str, object]]:
    path = story.dir / "daemon.log"
    lines = []
    for raw in path.read_text(errors="replace").splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            lines.append(json.loads(raw))
    return lines


class SshDrop(Fault):
    name, stage = "ssh-drop", "inbound-2"
    what = "every SSH session to onprem killed for 8 s in the middle of applying a batch"

    def strike(self, story: Story) -> None:
        master = story.t.onprem_sshd.process.pid
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            # The listening sshd forks per connection (a privileged monitor, then the session
            # and the command): killing every descendant closes the TCP connection at once,
            # wherever mailrec is (a command half run, a file half written).
            for pid in _descendants(master):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            time.sleep(0.2)


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found: list[int] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found


class DaemonKill(Fault):
    name, stage = "daemon-kill", "outbound-1"
    what = "the daemon killed with SIGKILL while it applies a batch, then restarted"

    def strike(self, story: Story) -> None:
        journal = next((story.dir / "home").glob("*/journal.db"), None)
        deadline = time.monotonic() + 30
        # Strike while a step is started and not finished: mid-step.
        while time.monotonic() < deadline and journal is not None:
            if _step_in_flight(journal):
                break
            time.sleep(0.05)
        self.mid_step = journal is not None and _step_in_flight(journal)
        story.kill_daemon()
        story.fault_log.append("daemon killed (SIGKILL)")
        time.sleep(2)
        story.start_daemon()

    mid_step: bool | None = None

    def hit(self, story: Story) -> str:
        if self.window is None:
            return "no (never struck)"
        return ("yes (killed with a step started and not finished)" if self.mid_step
                else "yes (killed between steps: no step was in flight)")


def _step_in_flight(journal: Path) -> bool:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True,
                                                timeout=0.2)) as db:
            row = db.execute("SELECT result FROM events WHERE kind = 'apply' "
                             "ORDER BY rowid DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        return False
    return bool(row) and row[0] == "started"


class JournalLost(Fault):
    name, stage = "journal-lost", "inbound-2"
    what = "the journal deleted between two rounds"

    def strike(self, story: Story) -> None:
        time.sleep(3)  # after the batch's first round
        for path in (story.dir / "home").glob("*/journal.db*"):
            path.unlink(missing_ok=True)
        story.fault_log.append("journal deleted")

    def hit(self, story: Story) -> str:
        return "yes (journal deleted)" if "journal deleted" in story.fault_log else "no"


class ReloadFails(Fault):
    name, stage = "reload-fails", "inbound-1"
    what = ("`postfix reload` on onprem fails for 6 s (master.pid moved aside) while mailrec "
            "changes its maps")

    def strike(self, story: Story) -> None:
        # `postfix reload` asks `master -t` whether the master runs, by its lock on
        # master.pid: moved aside, the master keeps running (mail flows) but reload fails.
        # Moved back (the same file, so the same lock), reload works again.
        pid = story.t.onprem_postfix.queue_dir / "pid" / "master.pid"
        aside = pid.with_name("master.pid.aside")
        pid.rename(aside)
        try:
            time.sleep(6)
        finally:
            aside.rename(pid)


class RentalDown(Fault):
    name, stage = "rental-down", "outbound-1"
    what = "the rental's SMTP server (Postfix) stopped for a minute"

    def strike(self, story: Story) -> None:
        postfix = story.t.rental.postfix
        postfix.run("postfix", "stop", check=False)
        try:
            time.sleep(60)
        finally:
            postfix.run("postfix", "start", check=False)

    def hit(self, story: Story) -> str:
        records = [*story.sender.records(), *story.client_records()]
        deferred = sum(1 for r in records if r.deferrals)
        return (f"yes ({deferred} messages deferred while it was down, then delivered)"
                if deferred else "no (nothing was sent to it while it was down)")


class DnsRefused(Fault):
    name, stage = "dns-refused", "mx"
    what = ("the DNS update refused once (mailrec's TSIG key rejected for 6 s), and a hand "
            "edit of the zone at the same time")

    def strike(self, story: Story) -> None:
        secret = story.state / "tsig.secret"
        saved = secret.read_text()
        secret.write_text("c29tZXRoaW5nIGVsc2UgZW50aXJlbHkgc29tZXRoaW5nIGVsc2U=\n")
        try:
            _hand_edit(story)
            time.sleep(6)
        finally:
            secret.write_text(saved)


def _hand_edit(story: Story) -> None:
    """The admin's own change while mailrec works: a record mailrec does not manage (the
    SOA serial moves under mailrec's feet)."""
    import dns.query
    import dns.update

    server = story.t.dns
    update = dns.update.UpdateMessage(server.origin, keyring=server.keyring(),
                                      keyalgorithm=server.algorithm)
    update.replace("handedit", 10, "TXT", '"an admin was here during the migration"')
    dns.query.tcp(update, server.address, port=server.port, timeout=5)


class Together(Fault):
    """Several faults in one run, each at its own stage (the smaller run in `make test`)."""

    def __init__(self, faults: list[Fault]) -> None:
        super().__init__()
        self.faults = faults
        self.name = "+".join(f.name for f in faults)
        self.what = "; ".join(f"{f.name}: {f.what} (at {f.stage})" for f in faults)

    def arm(self, story: Story) -> None:
        for fault in self.faults:
            fault.arm(story)

    def at(self, stage: str, story: Story) -> None:
        for fault in self.faults:
            fault.at(stage, story)

    def disarm(self, story: Story) -> None:
        for fault in self.faults:
            fault.disarm(story)

    def hit(self, story: Story) -> str:
        return "; ".join(f"{f.name}: {f.hit(story)}" for f in self.faults)


FAULTS: dict[str, type[Fault]] = {f.name: f for f in (
    Fault, SshDrop, DaemonKill, JournalLost, ReloadFails, RentalDown, DnsRefused)}
