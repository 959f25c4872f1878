"""The daemon: reconcile continuously, level-triggered, from a git repo or a state directory.

Each round: fetch the branch (gitpython) or read the directory, then the same `reconcile`
as `mailrec apply --yes`. It runs on every change of the state (watchfiles or a new commit)
and at least every `interval` seconds, so drift is repaired and time gates open without
anyone running a command. Failures are outcomes, not crashes: they are logged, counted in
the metrics and retried with backoff.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from reconciler import clock
from reconciler.apply import reconcile
from reconciler.journal import Journal, LockedError
from reconciler.lab.layout import LabLayout
from reconciler.load import LoadedState, StateError, load_from_git, load_state, state_files
from reconciler.plan import Status

log = logging.getLogger("mailrec.daemon")

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.rounds = Counter("mailrec_reconcile_total", "Reconcile rounds", ["result"],
                              registry=self.registry)
        self.steps = Gauge("mailrec_plan_steps", "Steps in the latest plan", ["status"],
                           registry=self.registry)
        self.applied = Counter("mailrec_steps_applied_total", "Steps applied", ["result"],
                               registry=self.registry)
        self.in_sync = Gauge("mailrec_in_sync", "1 when the world equals the desired state",
                             registry=self.registry)
        self.last = Gauge("mailrec_last_reconcile_timestamp_seconds",
                          "When the last round finished", registry=self.registry)


class Daemon:
    def __init__(self, *, repo: str | None, branch: str, subpath: str, interval: float,
                 lab: LabLayout | None, metrics_port: int | None, allow_bulk: bool,
                 clock_override: bool = False) -> None:
        self.repo, self.branch, self.subpath = repo, branch, subpath
        self.interval = interval
        self.lab = lab
        self.metrics = Metrics()
        self.metrics_port = metrics_port
        self.allow_bulk = allow_bulk
        # MAILREC_NOW moves the time gates' clock only in a lab or when asked explicitly.
        self.clock = clock.for_run(lab is not None or clock_override)
        self.stop = threading.Event()
        self.failures = 0
        self._loaded_fingerprint: str | None = None
        # The parsed and validated state of the last round, by what it was read from (the
        # commit, or the files' digest): an unchanged state is not parsed again.
        self._loaded: tuple[str, LoadedState] | None = None

    # --- source of the desired state ------------------------------------------------------

    def _checkout(self) -> Path:
        import git

        assert self.repo is not None
        base = self.lab.journal_dir if self.lab else Path(".mailrec")
        target = base / "repo"
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
            if key is not None and self._loaded is not None and self._loaded[0] == key:
                return self._loaded[1]
            loaded = load_state(self._state_path())
            if loaded.digest != key:
                return loaded  # edited while being read: not cached
        else:
            import git

            target = self._checkout()
            ref = git.Repo(target).remotes.origin.refs[self.branch].commit.hexsha
            key = f"{ref}:{self.subpath}"
            if self._loaded is not None and self._loaded[0] == key:
                return self._loaded[1]
            loaded = load_from_git(target, ref, self.subpath)
        if key is not None:
            self._loaded = (key, loaded)
        return loaded

    # --- one round ---------------------------------------------------------------------------

    def round(self) -> int:
        from reconciler.drivers.backend import SystemBackend

        if self.repo is None:
            # Taken before reading: an edit made while the round runs starts the next one.
            self._loaded_fingerprint = self._fingerprint()
        try:
            loaded = self.load()
        except StateError as exc:
            log.error("invalid state, nothing applied:\n%s", exc)
            self.metrics.rounds.labels("invalid").inc()
            return 1
        except Exception as exc:  # the repo unreachable, a broken clone: retried next round
            log.error("cannot read the desired state, nothing applied: %s", exc)
            self.metrics.rounds.labels("error").inc()
            return 1
        journal = Journal(self.lab.journal_dir if self.lab else loaded.directory / ".mailrec")
        backend: SystemBackend | None = None
        try:
            backend = SystemBackend(loaded.state, lab=self.lab, state_dir=loaded.directory)
            report = reconcile(loaded, backend, journal, self.clock, allow_bulk=self.allow_bulk)
        except LockedError as exc:
            log.info("skipped: %s", exc)
            self.metrics.rounds.labels("locked").inc()
            return 0
        except Exception as exc:  # a round's failure is an outcome: log, count, retry later
            log.error("reconcile failed: %s", exc)
            self.metrics.rounds.labels("error").inc()
            return 1
        finally:
            if backend is not None:
                backend.close()  # one SSH connection per host per round, not left open
            journal.close()
        for outcome in report.outcomes:
            self.metrics.applied.labels(outcome.result).inc()
            log.info("%s %s %s", outcome.step, outcome.result, outcome.message)
        final = report.final
        assert final is not None
        for status in Status:
            self.metrics.steps.labels(str(status)).set(len(final.by_status(status)))
        self.metrics.in_sync.set(1 if final.in_sync else 0)
        self.metrics.last.set(clock.wall().timestamp())
        result = "failed" if report.failed else "ok"
        self.metrics.rounds.labels(result).inc()
        for planned in final.steps:
            if planned.status is not Status.READY:
                log.info("%s %s: %s", planned.id, planned.status, "; ".join(planned.reasons()))
        return 1 if report.failed else 0

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

    def run(self, *, once: bool = False) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        if self.metrics_port is not None:
            start_http_server(self.metrics_port, addr="127.0.0.1", registry=self.metrics.registry)

        def _stop(signum: int, frame: FrameType | None) -> None:
            self.stop.set()

        # Signal handlers can only be set in the main thread; a daemon run in another thread
        # (an embedding service, the tests) is stopped with `stop.set()` instead. The previous
        # handlers come back when run() returns.
        previous: list[tuple[signal.Signals, _Handler]] = []
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous.append((signum, signal.signal(signum, _stop)))
        try:
            while True:
                code = self.round()
                self.failures = self.failures + 1 if code else 0
                if once or self.stop.is_set():
                    return code
                self._wait()
                if self.stop.is_set():
                    return 0
        finally:
            for signum, handler in previous:
                if handler is not None:  # None: a handler not set from Python
                    signal.signal(signum, handler)
