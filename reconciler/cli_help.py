"""What `mailrec --help` shows below each command's options: its exit codes and an
example, applied by the command class the `mailrec` group uses."""

from __future__ import annotations

from typing import Any

import click

# What `--help` shows below a command's options: its exit codes and an example. Plain
# literals (help imports nothing); each "\b" paragraph is printed as written, not rewrapped.
PLAN_EXIT_CODES = """\b
Exit codes:
  0  in sync: nothing to change
  2  changes pending (ready, or gated until a time, a drain or a person)
  3  something refused as unsafe (or the world as observed breaks a rule)
  1  error (nothing changed)"""
EPILOGS: dict[str, str] = {
    "mailrec": """\b
Exit codes (plan, apply, status; each command's --help gives its own):
  0  in sync: nothing to change
  2  changes pending
  3  something refused as unsafe
  1  error (nothing changed)

\b
Example:
  mailrec lab init lab && mailrec plan --lab lab""",
    "validate": """\b
Exit codes:
  0  the state is valid
  3  valid, but a static finding refuses it as unsafe (e.g. an open relay)
  1  error: the state does not load (YAML or schema; file, line and field)

\b
Example:
  mailrec validate --state state""",
    "plan": PLAN_EXIT_CODES + """

\b
With --git-base (PR review), the exit code is the head's doing:
  0  the head changes nothing mailrec would do
  2  the head changes the plan (steps added, removed or held differently)
  3  the head introduces a refusal
  1  error

\b
Examples:
  mailrec plan
  mailrec status --format json > world.json      # a snapshot without secrets
  mailrec plan --git-base origin/main --git-head HEAD --world world.json --format markdown""",
    "apply": """\b
Exit codes (of the plan after applying):
  0  in sync: everything applied
  2  steps still pending (gated until a time, a drain or a person)
  3  something refused as unsafe
  1  error: a step failed, PLAN_FILE is stale, or not confirmed (no --yes)

\b
Example:
  mailrec plan --format json --out plan.json
  mailrec apply plan.json""",
    "status": PLAN_EXIT_CODES + """

\b
Example:
  mailrec status --format json     # includes "world": the snapshot plan --world reads""",
    "ack": """\b
Exit codes:
  0  acknowledged (or the change is already visible)
  3  refused: not safe yet (apply the ready steps first)
  1  error: not a step of the plan, or it does not wait for a person

\b
Example:
  mailrec ack outbound/suga --note 'Thunderbird now submits to the rental'""",
    "schema": """\b
Exit codes:
  0  printed

\b
Example:
  mailrec schema > mailrec.schema.json""",
    "rules": """\b
Exit codes:
  0  printed

\b
Example:
  mailrec rules | grep MR002""",
    "daemon": """\b
Exit codes (a round's pending, gated or refused steps are not errors):
  0  stopped by SIGTERM/SIGINT; with --once: the round ran
  1  error; with --once: the state did not load, or a step failed

\b
Example:
  mailrec daemon --repo git@git.example.co.jp:mail.git --metrics-port 9100

\b
With --metrics-port, the same port serves /metrics (Prometheus), / and /board
(the read-only migration board, HTML) and /board.json (its data), bound to
--metrics-address (default 127.0.0.1). See docs/board.md.""",
}


class MailrecCommand(click.Command):
    """A `mailrec` command: its epilog (exit codes, an example) from EPILOGS, unless the
    command gives its own."""

    def __init__(self, name: str | None, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EPILOGS.get(name or ""))
        super().__init__(name, **kwargs)


class MailrecGroup(click.Group):
    command_class = MailrecCommand
