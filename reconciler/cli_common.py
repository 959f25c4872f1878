"""What the `mailrec` commands share: loading the state, the target's journal, the
backend, the clock the gates are judged by, observing and planning, and writing output.
Only click and light modules at module level (see cli.py)."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from reconciler import clock
from reconciler.lab.layout import LabLayout

if TYPE_CHECKING:
    from reconciler.journal import Journal
    from reconciler.load import LoadedState

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_ERROR, EXIT_PENDING, EXIT_REFUSED = 0, 1, 2, 3
DEFAULT_STATE = "state"


class UsageFailure(click.ClickException):
    exit_code = EXIT_ERROR


def fail(message: str) -> NoReturn:
    raise UsageFailure(message)


def state_option(func: F) -> F:
    func = click.option(
        "--state", "state_path", type=click.Path(path_type=Path), default=None,
        help="State file or directory (default: the lab's state with --lab, else ./state).",
    )(func)
    return click.option(
        "--lab", "lab_dir", type=click.Path(path_type=Path), envvar="MAILREC_LAB", default=None,
        help="Use the local lab at DIR for every host (env MAILREC_LAB).",
    )(func)


def resolve_state_path(state_path: Path | None, lab: LabLayout | None) -> Path:
    if state_path is not None:
        return state_path
    if lab is not None and (lab.root / "state").exists():
        return lab.root / "state"  # `lab init` copied the state there: the lab's own repo
    return Path(DEFAULT_STATE)


def load_or_fail(state_path: Path | None, lab_dir: Path | None
                 ) -> tuple[LoadedState, LabLayout | None]:
    """The state a command works with. When a daemon manages the target, that is the
    daemon's (the commit it last read), unless --state names one; a --state that differs
    from the daemon's is marked (`differs_from_daemon`) for apply and ack to refuse."""
    from reconciler.load import StateError, load_state

    lab = LabLayout(lab_dir.resolve()) if lab_dir else None
    path = resolve_state_path(state_path, lab)
    try:
        loaded = load_state(path)
    except StateError as exc:
        fail("invalid state:\n" + "\n".join(f"  {p}" for p in exc.problems))
    daemon, daemons = daemon_state(loaded, lab)
    if daemon is None or daemons is None:
        return loaded, lab
    if state_path is None:
        same = "the same as" if daemons.state == loaded.state else "not"
        click.echo(f"note: using the state of {daemon.describe()}, as it last read it "
                   f"({daemon.commit[:12]}; {same} {path})", err=True)
        return daemons, lab
    if daemons.state != loaded.state:
        click.echo(f"note: {path} differs from the state of {daemon.describe()} "
                   f"({daemon.commit[:12]}): apply and ack would be refused", err=True)
        DIFFERS_FROM_DAEMON[id(loaded)] = daemon.describe()
    return loaded, lab


# id(LoadedState) -> the daemon whose state it differs from: set by load_or_fail, read by
# the same command (a process runs one command).
DIFFERS_FROM_DAEMON: dict[int, str] = {}


def daemon_state(loaded: LoadedState, lab: LabLayout | None) -> tuple[Any, LoadedState | None]:
    """The daemon managing the target of `loaded`, and the state it last read."""
    from reconciler.load import StateError, load_from_git, load_state
    from reconciler.target import running_daemon, target_dir

    daemon = running_daemon(target_dir(loaded.state, lab))
    if daemon is None:
        return None, None
    try:
        if daemon.repo is None:
            return daemon, load_state(Path(daemon.checkout))
        return daemon, load_from_git(Path(daemon.checkout), daemon.commit, daemon.subpath)
    except StateError as exc:
        fail(f"{daemon.describe()} manages this target, but its state ({daemon.commit[:12]}) "
             f"cannot be read here: {exc}")


def refuse_if_not_the_daemons(loaded: LoadedState, override: str | None, what: str) -> None:
    """Changing the target with a state other than the daemon's: the two would undo each
    other's changes every round. Refused (exit 3) unless --override says why."""
    daemon = DIFFERS_FROM_DAEMON.get(id(loaded))
    if daemon is None or override:
        return
    click.echo(f"refused: this state differs from the one {daemon} applies; {what} it would "
               "be undone by the daemon's next round (and the daemon's by yours). Commit the "
               "change to the daemon's branch instead, or give --override 'WHY' (recorded "
               "in the journal with your name)", err=True)
    sys.exit(EXIT_REFUSED)


def record_override(loaded: LoadedState, journal: Journal, now: Any, why: str) -> None:
    daemon = DIFFERS_FROM_DAEMON.get(id(loaded))
    if daemon is not None:
        journal.record(now, "override", None, "noted", source=loaded.digest,
                       detail={"note": why, "daemon": daemon})
        click.echo(f"override recorded: {why} (the daemon applies its own state again on "
                   "its next round unless its branch changes)", err=True)


def journal_dir(loaded: LoadedState, lab: LabLayout | None) -> Path:
    """The target's journal directory (`target.py`), shared with the daemon."""
    from reconciler.target import TargetError, check_legacy_journal, target_dir

    directory = target_dir(loaded.state, lab)
    if lab is None:
        try:
            check_legacy_journal(directory, loaded.directory)
        except TargetError as exc:
            fail(str(exc))
    return directory


def open_journal(loaded: LoadedState, lab: LabLayout | None) -> Journal:
    from reconciler.journal import Journal, local_actor

    return Journal(journal_dir(loaded, lab), actor=local_actor())


def make_backend(loaded: LoadedState, lab: LabLayout | None) -> Any:
    from reconciler.drivers.backend import BackendError, SystemBackend

    try:
        return SystemBackend(loaded.state, lab=lab, state_dir=loaded.directory)
    except (BackendError, RuntimeError, ValueError) as exc:
        fail(str(exc))


def clock_override_asked() -> bool:
    return bool(click.get_current_context().find_root().meta.get("clock_override"))


def run_clock_for(lab: LabLayout | None) -> clock.Clock:
    """The clock time gates are judged by: MAILREC_NOW only in a lab or with the explicit
    --clock-override (which says so on stderr), else the real time."""
    override = lab is not None or clock_override_asked()
    fixed = clock.overridden()
    if fixed and override and lab is None:
        click.echo(f"warning: --clock-override: time gates are judged at MAILREC_NOW={fixed}, "
                   "not the real time", err=True)
    try:
        clock.now(override=override)  # fail now, before anything is observed or changed
    except clock.ClockError as exc:
        fail(str(exc))
    return clock.for_run(override)


@contextmanager
def connected(loaded: LoadedState, lab: LabLayout | None) -> Iterator[tuple[Any, Journal]]:
    """The backend and the journal of a command that changes something (apply, ack): both
    closed at the end, and their failures turned into exit 1 with the reason."""
    from reconciler.apply import StalePlanError
    from reconciler.journal import LockedError

    backend = make_backend(loaded, lab)
    journal = open_journal(loaded, lab)
    try:
        yield backend, journal
    except (StalePlanError, LockedError) as exc:
        fail(str(exc))
    except (OSError, RuntimeError, ValueError) as exc:
        fail(f"cannot observe: {exc}")
    finally:
        backend.close()
        journal.close()


def observe_or_fail(loaded: LoadedState, lab: LabLayout | None, *, allow_bulk: bool = False,
                    costs: list[Any] | None = None, snapshots: list[Any] | None = None) -> Any:
    """Observe and plan; with `costs`, what reading each system took is appended to it; with
    `snapshots`, the observation as an offline snapshot (reconciler/snapshot.py)."""
    from reconciler.apply import build_plan
    from reconciler.journal import Journal
    from reconciler.observe import JournalView

    now = run_clock_for(lab)()
    backend = make_backend(loaded, lab)
    journal = Journal.existing(journal_dir(loaded, lab))  # a dry run writes nothing
    try:
        view = JournalView.read(journal)
        world = backend.observe(now, view)
        plan = build_plan(loaded, world, view, backend.instructor(), allow_bulk=allow_bulk)
        if snapshots is not None:
            from reconciler.snapshot import from_backend

            snapshots.append(from_backend(loaded, backend, view, now, "mailrec status"))
        return world, dataclasses.replace(plan, systems=backend.describe())
    except (OSError, RuntimeError, ValueError) as exc:
        fail(f"cannot observe: {exc}")
    finally:
        if costs is not None:
            costs.extend(backend.last_costs)
        backend.close()
        if journal is not None:
            journal.close()


def emit(text: str, out: Path | None) -> None:
    """Print, or write `out` atomically (see `cli_output.write_atomically`)."""
    if out is None:
        click.echo(text, nl=False)
        return
    from reconciler.cli_output import write_atomically

    try:
        write_atomically(out, text)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")


def use_color() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def lab_accepted(func: F) -> F:
    """Every command takes --lab (DESIGN section 4), even where no host is involved."""
    return click.option("--lab", "lab_dir", type=click.Path(path_type=Path),
                        envvar="MAILREC_LAB", default=None, hidden=True,
                        help="Accepted and ignored: this command needs no host.")(func)
