"""What the `mailrec` commands share: loading the state, the target's journal, the
backend, the clock the gates are judged by, observing and planning, and writing output.
Only click and light modules at module level (see cli.py)."""

from __future__ import annotations

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
    from reconciler.load import StateError, load_state

    lab = LabLayout(lab_dir.resolve()) if lab_dir else None
    try:
        loaded = load_state(resolve_state_path(state_path, lab))
    except StateError as exc:
        fail("invalid state:\n" + "\n".join(f"  {p}" for p in exc.problems))
    return loaded, lab


def journal_dir(loaded: LoadedState, lab: LabLayout | None) -> Path:
    return lab.journal_dir if lab else loaded.directory / ".mailrec"


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
             costs: list[Any] | None = None) -> Any:
    """Observe and plan; with `costs`, what reading each system took is appended to it."""
    from reconciler.apply import observe_and_plan
    from reconciler.journal import Journal

    now = run_clock_for(lab)()
    backend = make_backend(loaded, lab)
    journal = Journal.existing(journal_dir(loaded, lab))  # a dry run writes nothing
    try:
        return observe_and_plan(loaded, backend, journal, now, allow_bulk=allow_bulk)
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
