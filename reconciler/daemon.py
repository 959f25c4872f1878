"""The daemon: reconcile continuously, level-triggered, from a git repo or a state directory.

Each round: fetch the branch (gitpython) or read the directory, then the same `reconcile`
as `mailrec apply --yes`. It runs on every change of the state (watchfiles or a new commit)
and at least every `interval` seconds, so drift is repaired and time gates open without
anyone running a command. Failures are outcomes, not crashes: they are logged, counted in
the metrics and retried with backoff. One port serves the metrics and the read-only migration
board of the last finished round (`board_server.py`, docs/board.md).

Logs (`mailrec.daemon`, text or one JSON object per line): a start and a stop line, then one
line per change or error only -- a new commit, each applied step (ok/failed), a gated or
refused step whose status or reason changed since the previous round, the world coming in or
out of sync, an invalid state, a failed round -- each with the short commit id (in directory
mode: the state files' digest). Library chatter (paramiko's "Connected", the drivers' per-write
lines) is held at WARNING while the daemon runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from reconciler import __version__, clock
from reconciler.apply import reconcile
from reconciler.board_server import DEFAULT_ADDRESS, BoardFeed, BoardServer, Metrics, RoundOutcome
from reconciler.daemon_log import (  # noqa: F401 (JSON_KEYS, QUIET_LOGGERS: the tests')
    JSON_KEYS,
    LOG_FORMATS,
    QUIET_LOGGERS,
    SHORT,
    configure_logging,
    log,
    redact,
)
from reconciler.journal import Journal, LockedError, local_actor
from reconciler.lab.layout import LabLayout
from reconciler.load import LoadedState, StateError, load_from_git, load_state, state_files
from reconciler.plan import Plan, Status

if TYPE_CHECKING:
    from reconciler.drivers.backend import SystemBackend
    from reconciler.world import World
from reconciler.target import (
    DaemonRecord,
    TargetError,
    check_legacy_journal,
    daemon_registration,
    target_dir,
    write_record,
)

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

def short(source: str | None) -> str | None:
    return source[:SHORT] if source else None


class Daemon:
    def __init__(self, *, repo: str | None, branch: str, subpath: str, interval: float,
                 lab: LabLayout | None, metrics_port: int | None, allow_bulk: bool,
                 clock_override: bool = False, log_format: str = "text",
                 log_stream: IO[str] | None = None,
                 metrics_address: str = DEFAULT_ADDRESS) -> None:
        if log_format not in LOG_FORMATS:
            raise ValueError(f"log format {log_format!r}: one of {', '.join(LOG_FORMATS)}")
        self.repo, self.branch, self.subpath = repo, branch, subpath
        self.interval = interval
        self.lab = lab
        self.metrics = Metrics()
        self.metrics_port, self.metrics_address = metrics_port, metrics_address
        # One port for /metrics and the board, which shows what the last round left behind.
        self.board = BoardServer(self.metrics.registry)
        self.feed = BoardFeed(__version__, f"branch {branch}" if repo else "a state directory")
        self._result: str = "error"  # how this round ended, as counted in the metrics
        self._outcome: RoundOutcome | None = None  # what it leaves for the board
        self.allow_bulk = allow_bulk
        # MAILREC_NOW moves the time gates' clock only in a lab or when asked explicitly.
        self.clock = clock.for_run(lab is not None or clock_override)
        self.stop = threading.Event()
        self.failures = 0
        self._loaded_fingerprint: str | None = None
        # The parsed and validated state of the last round, by what it was read from (the
        # commit, or the files' digest): an unchanged state is not parsed again.
        self._loaded: tuple[str, LoadedState] | None = None
        self.log_format = log_format
        self.log_stream = log_stream  # None: stderr
        # The target this daemon manages (its flock held until run() ends); see target.py.
        self._registration = contextlib.ExitStack()
        self._registered: Path | None = None
        self._started_at = datetime.now(UTC).isoformat(timespec="seconds")
        # What this round reads the state from (the commit, or the files' digest), when known,
        # and the last one logged as new.
        self._source: str | None = None
        self._seen: str | None = None
        # The previous round's gated and refused steps, {step: (status, reasons)}: a step is
        # logged again only when its status or reason changed, not every interval.
        self._held: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._in_sync: bool | None = None
        self._stop_reason: str | None = None

    # --- logging ----------------------------------------------------------------------------

    def _emit(self, level: int, event: str, message: str, *, commit: str | None = None,
              step: str | None = None, status: str | None = None,
              detail: dict[str, object] | None = None) -> None:
        if level >= logging.ERROR:
            self.feed.error(redact(message), clock.wall())
        if not log.isEnabledFor(level):
            return
        log.log(level, "%s", redact(message), extra={
            "event": event, "commit": commit, "step": step, "status": status, "detail": detail})

    def _source_seen(self) -> None:
        """A line when the state is read from a commit (or files) not seen before."""
        source = self._source
        if source is None or source == self._seen:
            return
        first, self._seen = self._seen is None, source
        if self.repo is None:
            self._emit(logging.INFO, "commit", f"state {'read' if first else 'changed'} in "
                       f"{self._state_path()}", commit=short(source))
            return
        try:
            import git

            commit = git.Repo(self._checkout_dir()).commit(source)
            title = commit.summary
            if isinstance(title, bytes):
                title = title.decode("utf-8", "replace")
            summary = f": {title} ({commit.author.name})"
        except Exception:  # the summary is a nicety; the id is what counts
            summary = ""
        self._emit(logging.INFO, "commit",
                   f"{'state from commit' if first else 'new commit'} on {self.branch}{summary}",
                   commit=short(source))

    # --- source of the desired state ------------------------------------------------------

    def _checkout_dir(self) -> Path:
        base = self.lab.journal_dir if self.lab else Path(".mailrec")
        return base / "repo"

    def _checkout(self) -> Path:
        import git

        assert self.repo is not None
        target = self._checkout_dir()
        if not (target / ".git").exists():
            git.Repo.clone_from(self.repo, target, branch=self.branch)
        else:
            repo = git.Repo(target)
            repo.remotes.origin.fetch(self.branch)
        return target

    def _state_path(self) -> Path:
        path = Path(self.subpath)
        if self.lab is not None and not path.exists():
            path = self.lab.root / "state"
        return path

    def _fingerprint(self) -> str | None:
        """The state directory's *.yaml bytes (directory mode): did it change since loaded?"""
        path = self._state_path()
        digest = hashlib.sha256()
        try:
            # The files and the digest exactly as `load_state` reads them: equal to the
            # loaded state's digest when the bytes read are these.
            for file in state_files(path):
                digest.update(str(file).encode() + b"\0" + file.read_bytes() + b"\0")
        except (OSError, StateError):
            return None
        return digest.hexdigest()

    def load(self) -> LoadedState:
        if self.repo is None:
            key = self._fingerprint()
            self._source = key
            if key is not None and self._loaded is not None and self._loaded[0] == key:
                return self._loaded[1]
            loaded = load_state(self._state_path())
            self._source = loaded.digest
            if loaded.digest != key:
                return loaded  # edited while being read: not cached
        else:
            import git

            target = self._checkout()
            ref = git.Repo(target).remotes.origin.refs[self.branch].commit.hexsha
            key = f"{ref}:{self.subpath}"
            self._source = ref
            if self._loaded is not None and self._loaded[0] == key:
                return self._loaded[1]
            loaded = load_from_git(target, ref, self.subpath)
        if key is not None:
            self._loaded = (key, loaded)
        return loaded

    # --- one round ---------------------------------------------------------------------------

    def _register(self, loaded: LoadedState) -> Path:
        """The target's directory (the journal and lock every command shares), held as this
        daemon's for as long as it runs, with the record commands read the commit from."""
        directory = target_dir(loaded.state, self.lab)
        if self.lab is None:
            check_legacy_journal(directory, loaded.directory)
        if self._registered != directory:
            self._registration.close()
            self._registered = None
            self._registration.enter_context(daemon_registration(directory))
            self._registered = directory
        checkout = (str(self._checkout_dir().resolve()) if self.repo is not None
                    else str(self._state_path().resolve()))
        write_record(directory, DaemonRecord(
            os.getpid(), self.repo, self.branch, self.subpath, checkout, loaded.digest,
            self._started_at))
        return directory

    def _publish_world(self, loaded: LoadedState, backend: SystemBackend, journal: Journal,
                       directory: Path, world: World | None) -> None:
        """The round's last observation as an offline snapshot (for `plan --world` in a PR
        job): `world.json` in the target directory, and /world.json on the board's port."""
        from reconciler.cli_output import write_atomically
        from reconciler.observe import JournalView
        from reconciler.snapshot import from_backend, snapshot_json

        if backend.last_parts is None or world is None:
            return
        try:
            text = snapshot_json(from_backend(loaded, backend, JournalView.read(journal),
                                              world.now, "mailrec daemon"))
            write_atomically(directory / "world.json", text)
            self.board.publish_world(text)
        except Exception as exc:  # a view for reviewers: it never fails a round
            self._emit(logging.ERROR, "world", f"world.json not written: {exc}")

    def _counted(self, result: str) -> None:
        self.metrics.rounds.labels(result).inc()
        self._result = result

    def round(self) -> int:
        """One round, then the board: this round's plan, or (none made) the last one with
        how this round ended."""
        self._result, self._outcome = "error", None
        code = self._round()
        try:
            outcome = self._outcome if self.board.serving else None  # built only when shown
            self.board.publish(self.feed.finished(self._result, clock.wall(), outcome))
        except Exception as exc:  # the board is a view: it never fails a round
            self._emit(logging.ERROR, "board", f"board not updated: {exc}")
        return code

    def _round(self) -> int:
        from reconciler.drivers.backend import SystemBackend

        if self.repo is None:
            # Taken before reading: an edit made while the round runs starts the next one.
            self._loaded_fingerprint = self._fingerprint()
        self._source = None
        try:
            loaded = self.load()
        except StateError as exc:
            self._source_seen()
            self._emit(logging.ERROR, "invalid", f"invalid state, nothing applied: {exc}",
                       commit=short(self._source), status="invalid")
            self._counted("invalid")
            return 1
        except Exception as exc:  # the repo unreachable, a broken clone: retried next round
            self._emit(logging.ERROR, "error",
                       f"cannot read the desired state, nothing applied: {exc}",
                       commit=short(self._source), status="error")
            self._counted("error")
            return 1
        self._source = loaded.digest
        self._source_seen()
        commit = short(loaded.digest)
        try:
            directory = self._register(loaded)
        except TargetError as exc:  # another daemon, or an old journal to move first
            self._emit(logging.ERROR, "error", f"nothing applied: {exc}", commit=commit,
                       status="error")
            self._counted("error")
            return 1
        actor = f"{loaded.author} (daemon)" if loaded.author else f"{local_actor()} (daemon)"
        journal = Journal(directory, actor=actor)
        backend: SystemBackend | None = None
        try:
            backend = SystemBackend(loaded.state, lab=self.lab, state_dir=loaded.directory)
            report = reconcile(loaded, backend, journal, self.clock, allow_bulk=self.allow_bulk)
            systems = backend.describe()
            self._publish_world(loaded, backend, journal, directory, report.world)
        except LockedError as exc:
            self._emit(logging.INFO, "skipped", f"round skipped: {exc}", commit=commit,
                       status="locked")
            self._counted("locked")
            return 0
        except Exception as exc:  # a round's failure is an outcome: log, count, retry later
            # Some failures say nothing (a dropped SSH connection's EOFError): name the kind.
            reason = str(exc) or type(exc).__name__
            self._emit(logging.ERROR, "error", f"reconcile failed: {reason}", commit=commit,
                       status="error")
            self._counted("error")
            return 1
        finally:
            if backend is not None:
                backend.close()  # one SSH connection per host per round, not left open
            journal.close()
        for outcome in report.outcomes:
            self.metrics.applied.labels(outcome.result).inc()
            ok = outcome.result == "ok"
            self._emit(logging.INFO if ok else logging.ERROR, "apply",
                       f"{outcome.step} {outcome.result}"
                       + (f": {outcome.message}" if outcome.message else ""),
                       commit=commit, step=outcome.step, status=outcome.result)
        final = report.final
        assert final is not None
        for status in Status:
            self.metrics.steps.labels(str(status)).set(len(final.by_status(status)))
        self.metrics.in_sync.set(1 if final.in_sync else 0)
        self.metrics.last.set(clock.wall().timestamp())
        self._counted("failed" if report.failed else "ok")
        if report.world is not None:
            self._outcome = RoundOutcome(dataclasses.replace(final, systems=systems),
                                         report.world, loaded.state, commit, loaded.author)
        self._log_held(final, {o.step for o in report.outcomes}, commit)
        if final.in_sync != self._in_sync:
            self._in_sync = final.in_sync
            counts = ", ".join(f"{len(final.by_status(s))} {s}" for s in Status)
            self._emit(logging.INFO, "sync",
                       "in sync" if final.in_sync else f"not in sync: {counts}",
                       commit=commit, status="in-sync" if final.in_sync else "pending")
        return 1 if report.failed else 0

    def _log_held(self, final: Plan, applied: set[str], commit: str | None) -> None:
        """Gated and refused steps, only when their status or reason changed since the last
        round (and a step no longer held, unless this round applied it)."""
        held = {planned.id: (str(planned.status), tuple(planned.reasons()))
                for planned in final.steps if planned.status is not Status.READY}
        previous = self._held
        for step_id, (status, reasons) in held.items():
            if previous.get(step_id) != (status, reasons):
                self._emit(logging.INFO, "held", f"{step_id} {status}: {'; '.join(reasons)}",
                           commit=commit, step=step_id, status=status)
        for step_id, (status, _) in previous.items():
            if step_id not in held and step_id not in applied:
                self._emit(logging.INFO, "held", f"{step_id} no longer {status}",
                           commit=commit, step=step_id, status="released")
        self._held = held

    def _wait(self) -> None:
        # Back off after failures (up to 8x), so a broken host is not hammered.
        delay = self.interval * min(2 ** self.failures, 8)
        if self.repo is None:
            if self._fingerprint() != self._loaded_fingerprint:
                return  # edited during the round (before the watch below could see it)
            try:
                from watchfiles import watch

                deadline = time.monotonic() + delay
                # Wake at least every second to compare the fingerprint: an edit that lands
                # before the watcher is set up is not lost until the interval.
                step = max(1, int(min(delay, 1.0) * 1000))
                for changes in watch(self._state_path(), stop_event=self.stop,
                                     rust_timeout=step, yield_on_timeout=True):
                    if (changes or time.monotonic() >= deadline
                            or self._fingerprint() != self._loaded_fingerprint):
                        return
            except (ImportError, OSError):
                pass
        self.stop.wait(delay)

    def _started(self) -> tuple[str, dict[str, object]]:
        """The start line: what the daemon reconciles from, how often, where, and its pid."""
        detail: dict[str, object] = {
            "version": __version__, "repo": redact(self.repo) if self.repo else None,
            "branch": self.branch if self.repo else None,
            "path": self.subpath if self.repo else str(self._state_path()),
            "interval": self.interval, "lab": str(self.lab.root) if self.lab else None,
            "metrics_port": self.metrics_port, "metrics_address": self.metrics_address,
            "allow_bulk": self.allow_bulk,
            "pid": os.getpid(),
        }
        source = (f"repo {detail['repo']} branch {self.branch} path {self.subpath}"
                  if self.repo else f"state dir {detail['path']}")
        where = f"lab {detail['lab']}" if self.lab else "no lab"
        extra = (f", metrics and board {self.metrics_address}:{self.metrics_port}"
                 if self.metrics_port is not None else "")
        extra += ", allow-bulk" if self.allow_bulk else ""
        message = (f"mailrec {__version__} daemon started: {source}, interval "
                   f"{self.interval:g}s, {where}{extra}, pid {detail['pid']}")
        return message, detail

    def run(self, *, once: bool = False) -> int:
        restore_logging = configure_logging(self.log_format, self.log_stream)
        message, detail = self._started()
        self._emit(logging.INFO, "start", message, status="started", detail=detail)
        self._stop_reason = None
        code = 1
        reason: str | None = None
        previous: list[tuple[signal.Signals, _Handler]] = []

        def _stop(signum: int, frame: FrameType | None) -> None:
            self._stop_reason = f"signal {signal.Signals(signum).name}"
            self.stop.set()

        try:
            if self.metrics_port is not None:
                self.board.start(self.metrics_port, self.metrics_address)
            # Signal handlers can only be set in the main thread; a daemon run in another
            # thread (an embedding service, the tests) is stopped with `stop.set()` instead.
            # The previous handlers come back when run() returns.
            if threading.current_thread() is threading.main_thread():
                for signum in (signal.SIGTERM, signal.SIGINT):
                    previous.append((signum, signal.signal(signum, _stop)))
            while True:
                code = self.round()
                self.failures = self.failures + 1 if code else 0
                if once:
                    reason = "--once"
                    return code
                if self.stop.is_set():
                    return code
                self._wait()
                if self.stop.is_set():
                    code = 0
                    return 0
        except BaseException as exc:
            reason = f"crashed: {type(exc).__name__}: {exc}"
            raise
        finally:
            self.board.stop()
            self._registration.close()  # the target is no longer managed: commands see it
            self._registered = None
            for signum, handler in previous:
                if handler is not None:  # None: a handler not set from Python
                    signal.signal(signum, handler)
            crashed = reason is not None and reason.startswith("crashed")
            reason = reason or self._stop_reason or "stop requested"
            self._emit(logging.ERROR if crashed else logging.INFO, "stop",
                       f"daemon stopped ({reason}), exit {code}", commit=short(self._seen),
                       status="crashed" if crashed else "stopped",
                       detail={"reason": reason, "exit": code})
            restore_logging()
