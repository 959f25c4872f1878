"""`--help` of every command says what it returns and how it is used (issue 10): its exit
codes, an example line that runs it, help text for every option, and the default of every
option that has a meaningful one; the exit-code table is printed as written (one code a line),
not rewrapped by click."""

from __future__ import annotations

import re

import click
import pytest

from reconciler.cli import cli
from tests.conftest import run_cli


def commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of every command and group under `group` (the root is `()`)."""
    found = [path]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += commands(command, (*path, name))
        else:
            found.append((*path, name))
    return found


ALL = commands(cli)


def command_at(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


def help_of(path: tuple[str, ...]) -> str:
    result = run_cli(*path, "--help")
    assert result.exit_code == 0, result.stderr
    return result.output


def exit_codes(text: str) -> set[int]:
    """The codes of the exit-code table: lines "  N  meaning" after "Exit codes"."""
    table = text.split("Exit codes", 1)[1].split("\n\n", 1)[0]
    return {int(m.group(1)) for m in re.finditer(r"^\s+([0-3])\s\s+\S", table, re.MULTILINE)}


def test_every_command_is_covered() -> None:
    names = {" ".join(path) for path in ALL}
    assert {"", "validate", "plan", "apply", "status", "ack", "schema", "rules", "daemon",
            "lab", "lab init", "lab up", "lab down"} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: " ".join(p) or "mailrec")
def test_help_shows_exit_codes_and_an_example(path: tuple[str, ...]) -> None:
    text = help_of(path)
    assert "Exit codes" in text
    assert "Example" in text
    example = text.split("Example", 1)[1]
    # An example runs mailrec, and a command's example runs that command.
    lines = [line.strip() for line in example.splitlines()[1:] if line.strip()]
    assert any(line.startswith("mailrec") for line in lines), example
    if not isinstance(command_at(path), click.Group):
        runs = " ".join(("mailrec", *path))
        assert any(runs in line for line in lines), f"no example of {runs!r}:\n{example}"


@pytest.mark.parametrize(
    ("path", "codes"),
    [
        ((), {0, 1, 2, 3}),
        (("plan",), {0, 1, 2, 3}),
        (("status",), {0, 1, 2, 3}),
        (("apply",), {0, 1, 2, 3}),
        (("validate",), {0, 1, 3}),
        (("ack",), {0, 1, 3}),
        (("daemon",), {0, 1}),
        (("lab", "init"), {0, 1}),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else None,
)
def test_each_exit_code_is_one_line_of_its_own(path: tuple[str, ...], codes: set[int]) -> None:
    assert exit_codes(help_of(path)) == codes


@pytest.mark.parametrize("path", ALL, ids=lambda p: " ".join(p) or "mailrec")
def test_every_option_has_help_text(path: tuple[str, ...]) -> None:
    command = command_at(path)
    missing = [param.name for param in command.params
               if isinstance(param, click.Option) and not (param.help or "").strip()]
    assert missing == [], f"options without help: {missing}"


@pytest.mark.parametrize("path", ALL, ids=lambda p: " ".join(p) or "mailrec")
def test_meaningful_defaults_are_shown(path: tuple[str, ...]) -> None:
    """An option with a default value (not a flag, not empty) shows it, or its help says
    what the default is."""
    command = command_at(path)
    text = help_of(path)
    for param in command.params:
        if not isinstance(param, click.Option) or param.is_flag or param.hidden:
            continue
        if not isinstance(param.default, str | int | float) or param.default == "":
            continue  # no default (None, or click's "unset"), or an empty one
        assert param.show_default or "default" in (param.help or ""), param.name
        if param.show_default:
            assert f"[default: {param.default}]" in " ".join(text.split()), param.name
