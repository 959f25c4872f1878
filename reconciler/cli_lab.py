"""`mailrec lab init|up|down`: the local lab, whose files and services stand in for the
onprem Postfix, the rental, DNS and the router (see docs/providers/lab.md). Part of the
command line (`cli.py` adds this group); it builds labs, it never plans or applies."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import click

from reconciler.lab.layout import LabLayout


class LabFailure(click.ClickException):
    exit_code = 1


def fail(message: str) -> NoReturn:
    raise LabFailure(message)


# Below each command's options in `--help` (plain literals; "\b": printed as written).
LAB_EXIT_CODES = """\b
Exit codes:
  0  done
  1  error (with the reason)"""


@click.group(epilog=LAB_EXIT_CODES + """

\b
Example:
  mailrec lab init lab && mailrec lab up lab && mailrec plan --lab lab""")
def lab() -> None:
    """A local lab whose systems stand in for onprem, rental, DNS and router."""


@lab.command("init", epilog=LAB_EXIT_CODES + """

\b
Example:
  mailrec lab init lab --state state""")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--from", "from_state", type=click.Path(path_type=Path), default=None,
              help="Make the lab's actual state equal this state (default: before migration).")
@click.option("--state", "state_path", type=click.Path(path_type=Path), default=None,
              help="The company to build (default: ./state).")
@click.option("--force", is_flag=True,
              help="Replace an existing lab (only a directory `lab init` made; never "
                   "deletes anything else).")
def lab_init(directory: Path, from_state: Path | None, state_path: Path | None,
             force: bool) -> None:
    """Create a lab in DIRECTORY."""
    from reconciler.lab.init import LabInitError, init_lab
    from reconciler.load import StateError, load_state

    source = from_state or state_path or Path("state")
    try:
        loaded = load_state(source)
    except StateError as exc:
        fail("invalid state:\n" + "\n".join(f"  {p}" for p in exc.problems))
    try:
        init_lab(directory, loaded, migrated=from_state is not None, force=force)
    except LabInitError as exc:
        fail(str(exc))
    click.echo(f"lab created in {directory} ({len(loaded.state.users)} users, "
               f"{'as in ' + str(from_state) if from_state else 'before migration'})")


@lab.command("up", epilog=LAB_EXIT_CODES + """

\b
Example:
  mailrec lab up lab""")
@click.argument("directory", type=click.Path(path_type=Path, exists=True))
def lab_up(directory: Path) -> None:
    """Start the lab's network services (rental SMTP, RTX emulator) in the background."""
    from reconciler.lab.services import LabServiceError, start_services

    try:
        services = start_services(LabLayout(directory.resolve()))
    except LabServiceError as exc:
        fail(str(exc))
    for name, address in services.items():
        click.echo(f"{name}: {address}")


@lab.command("down", epilog=LAB_EXIT_CODES + """

\b
Example:
  mailrec lab down lab""")
@click.argument("directory", type=click.Path(path_type=Path, exists=True))
def lab_down(directory: Path) -> None:
    """Stop the lab's network services."""
    from reconciler.lab.services import stop_services

    stopped = stop_services(LabLayout(directory.resolve()))
    click.echo(f"stopped {stopped} service(s)")
