"""Where the memory of a target lives: one journal, one apply lock and the daemon's record per
target (the mail system being migrated), shared by the daemon and every command.

A target is the lab (its `.mailrec/`), or the domain and onprem host of a state: its
directory is `$MAILREC_HOME/<domain>@<onprem host>/` (MAILREC_HOME defaults to
/var/lib/mailrec for root, else ~/.local/state/mailrec). So `mailrec ack` run from any
checkout reaches the daemon, and a command and the daemon can never apply at once.

A daemon that manages a target holds `daemon.lock` (flock, released by the kernel when it
dies) for its whole life and keeps `daemon.json` up to date: where its state comes from and
the commit it last read. Commands use that commit by default (see `cli.py`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from reconciler.lab.layout import LabLayout
from reconciler.model import DesiredState

DAEMON_LOCK = "daemon.lock"
DAEMON_RECORD = "daemon.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]")


class TargetError(RuntimeError):
    """The target's memory cannot be used as it is (an old journal elsewhere, a second
    daemon): nothing was changed."""


def default_home() -> Path:
    configured = os.environ.get("MAILREC_HOME", "").strip()
    if configured:
        return Path(configured).expanduser()
    if os.geteuid() == 0:
        return Path("/var/lib/mailrec")
    state_home = os.environ.get("XDG_STATE_HOME", "").strip()
    return (Path(state_home) if state_home else Path.home() / ".local" / "state") / "mailrec"


def target_id(state: DesiredState) -> str:
    host = state.onprem.connect.host or "local"
    return _UNSAFE.sub("_", f"{state.domain.lower()}@{host.lower()}")


def target_dir(state: DesiredState, lab: LabLayout | None) -> Path:
    return lab.journal_dir if lab is not None else default_home() / target_id(state)


def check_legacy_journal(directory: Path, state_dir: Path) -> None:
    """An earlier mailrec kept the journal beside the state (`<state>/.mailrec`). Starting an
    empty journal for the target instead would forget every ack, the MX TTL's history and
    the forward probe: refuse, and say how to move it."""
    old = state_dir / ".mailrec" / "journal.db"
    if (directory / "journal.db").exists() or not old.exists():
        return
    if old.resolve() == (directory / "journal.db").resolve():
        return
    raise TargetError(
        f"the journal of this target is now kept in {directory}, but the one at {old} holds "
        f"its history: move it there first (mkdir -p {directory} && mv {old.parent}/* "
        f"{directory}/), then run the command again; nothing was changed")


@dataclass(frozen=True)
class DaemonRecord:
    """What a running daemon manages the target from (`daemon.json`)."""

    pid: int
    repo: str | None  # the git repo it follows, or None: a state directory
    branch: str
    subpath: str
    checkout: str  # its clone (git) or the state directory it reads
    commit: str  # the commit (git) or the files' digest of the state it last read
    started: str

    def describe(self) -> str:
        if self.repo is None:
            return f"the daemon (pid {self.pid}) reading {self.checkout}"
        return f"the daemon (pid {self.pid}) following {self.repo} branch {self.branch}"


@contextlib.contextmanager
def daemon_registration(directory: Path) -> Iterator[None]:
    """Hold the target's daemon lock while the body runs; refuse if another daemon holds
    it. The record is removed at the end (a crash leaves it, but no lock holder)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / DAEMON_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = running_daemon(directory)
            who = f" (pid {holder.pid})" if holder else ""
            raise TargetError(f"another daemon{who} already manages {directory}") from None
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            (directory / DAEMON_RECORD).unlink()
        os.close(fd)


def write_record(directory: Path, record: DaemonRecord) -> None:
    tmp = directory / f".{DAEMON_RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
    os.replace(tmp, directory / DAEMON_RECORD)


def running_daemon(directory: Path) -> DaemonRecord | None:
    """The record of the daemon managing this target now, or None (no daemon holds the
    lock: a record left by a crashed daemon is ignored)."""
    lock = directory / DAEMON_LOCK
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None  # nobody holds it
    finally:
        os.close(fd)
    try:
        data = json.loads((directory / DAEMON_RECORD).read_text())
        return DaemonRecord(**data)
    except (OSError, ValueError, TypeError):
        return None  # starting up: no record yet
