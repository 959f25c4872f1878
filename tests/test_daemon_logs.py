"""The daemon's log (`reconciler/daemon.py`), as an operator reads it: a start and a stop line,
then one line per change or error -- each applied step with its commit, a gated step only when
its reason changes, an invalid commit -- in text or one JSON object per line, and no library
chatter (paramiko's "Connected"/"Authentication successful" pairs, the drivers' per-write
lines). The daemon runs on a lab, its desired state in a bare git repo (as in test_daemon.py)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal

import git
import pytest

from reconciler import __version__
from reconciler.daemon import JSON_KEYS, QUIET_LOGGERS, Daemon, redact
from reconciler.lab.layout import LabLayout
from tests.conftest import run_cli, set_users
from tests.test_daemon import ConfigRepo, config_repo, daemon_lab  # noqa: F401 (fixtures)

NOW = "2026-11-29T09:00:00+00:00"
AUTHOR = git.Actor("Config Admin", "admin@example.co.jp")
ROUTER_STEPS = {"dns/spf", "router/filter/10", "router/route/default"}


Repo = ConfigRepo


@pytest.fixture
def repo(config_repo: ConfigRepo) -> ConfigRepo:  # noqa: F811
    return config_repo


@pytest.fixture
def lab(daemon_lab: LabLayout) -> LabLayout:  # noqa: F811
    return daemon_lab


class Logged:
    """A daemon whose log lines go to a string: `lines()` returns (and forgets) those so far."""

    def __init__(self, repo: Repo, lab: LabLayout, log_format: str = "text") -> None:
        self.stream = io.StringIO()
        self.daemon = Daemon(repo=str(repo.bare), branch="main", subpath="state", interval=0.1,
                             lab=lab, metrics_port=None, allow_bulk=False,
                             log_format=log_format, log_stream=self.stream)

    def run_once(self) -> list[str]:
        self.daemon.run(once=True)
        return self.lines()

    def lines(self) -> list[str]:
        text = self.stream.getvalue()
        self.stream.seek(0)
        self.stream.truncate()
        return text.splitlines()


def events(lines: list[str], event: str) -> list[str]:
    """Text lines of one event: `TS LEVEL EVENT [COMMIT] MESSAGE`."""
    return [line for line in lines if line.split(" ")[2] == event]


def test_start_and_stop_lines(repo: Repo, lab: LabLayout) -> None:
    logged = Logged(repo, lab)
    lines = logged.run_once()

    start, stop = lines[0], lines[-1]
    assert start.split(" ")[1:3] == ["INFO", "start"]
    for part in (f"mailrec {__version__}", f"repo {repo.bare}", "branch main", "interval 0.1s",
                 f"lab {lab.root}", f"pid {os.getpid()}"):
        assert part in start
    assert stop.split(" ")[1:3] == ["INFO", "stop"]
    assert "(--once)" in stop and "exit 0" in stop
    assert f"[{repo.head[:12]}]" in stop


def test_stop_line_names_the_signal(
    repo: Repo, lab: LabLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reconciler.drivers.backend import SystemBackend

    real = SystemBackend.observe

    def terminated(self: SystemBackend, *args: object, **kwargs: object) -> object:
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the daemon: it stops after the round
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SystemBackend, "observe", terminated)
    logged = Logged(repo, lab)
    assert logged.daemon.run() == 0  # not --once: only the signal ends it
    assert "daemon stopped (signal SIGTERM), exit 0" in events(logged.lines(), "stop")[0]


def test_each_applied_step_is_one_line_with_its_commit_and_an_unchanged_round_logs_none(
    repo: Repo, lab: LabLayout
) -> None:
    logged = Logged(repo, lab)
    lines = logged.run_once()
    head = repo.head[:12]

    applied = events(lines, "apply")
    assert len(applied) == len(ROUTER_STEPS)
    assert {line.split(" ")[4] for line in applied} == ROUTER_STEPS
    for line in applied:
        assert f"INFO apply [{head}] " in line and line.endswith(" ok")
    assert f"[{head}] state from commit on main: Initial desired state" in events(
        lines, "commit")[0]
    assert events(lines, "sync") and "in sync" in events(lines, "sync")[0]

    # the same commit, the same world: start and stop only
    again = logged.run_once()
    assert [line.split(" ")[2] for line in again] == ["start", "stop"]


def test_a_gated_step_is_logged_once_and_again_when_its_reason_changes(
    repo: Repo, lab: LabLayout
) -> None:
    logged = Logged(repo, lab)
    logged.run_once()
    set_users(repo.state_dir, suga=("rental", "onprem"))
    sha = repo.push("Move suga's inbound mail to the rental")

    lines = logged.run_once()
    assert f"[{sha[:12]}] new commit on main: Move suga's inbound mail" in events(
        lines, "commit")[0]
    applied = {line.split(" ")[4] for line in events(lines, "apply")}
    assert {"mailbox/suga", "inbound/suga"} <= applied
    held = events(lines, "held")
    assert len(held) == 1
    assert f"[{sha[:12]}] onprem-mailbox/suga gated: " in held[0]
    assert "holds 1 message(s)" in held[0]

    # nothing new: the gated step is not logged again every interval
    again = logged.run_once()
    assert [line.split(" ")[2] for line in again] == ["start", "stop"]

    # another message lands in the old mailbox: the gate's reason changed, so one line again
    new = lab.onprem_home / "suga" / "Maildir" / "new"
    (new / "1700000100.M1P1.lab").write_text("Subject: one more\n\nhello\n")
    changed = events(logged.run_once(), "held")
    assert len(changed) == 1
    assert "onprem-mailbox/suga gated: " in changed[0] and "holds 2 message(s)" in changed[0]


def test_an_invalid_commit_is_one_error_line_with_its_commit(repo: Repo, lab: LabLayout) -> None:
    logged = Logged(repo, lab)
    logged.run_once()
    users = repo.state_dir / "users.yaml"
    users.write_text(users.read_text().replace("suga:      {inbound: onprem",
                                               "suga:      {inbound: cloud"))
    sha = repo.push("A broken edit")

    lines = logged.run_once()
    invalid = events(lines, "invalid")
    assert len(invalid) == 1
    assert invalid[0].split(" ")[1] == "ERROR"
    assert f"[{sha[:12]}] invalid state, nothing applied: " in invalid[0]
    assert "users.suga.inbound" in invalid[0]
    assert "exit 1" in lines[-1]


def test_json_lines_parse_with_the_fixed_keys(repo: Repo, lab: LabLayout) -> None:
    logged = Logged(repo, lab, log_format="json")
    lines = logged.run_once()

    records = [json.loads(line) for line in lines]
    assert all(list(record) == list(JSON_KEYS) for record in records)
    assert records[0]["event"] == "start"
    assert records[0]["detail"]["pid"] == os.getpid()
    assert records[0]["detail"]["branch"] == "main"
    assert records[-1]["event"] == "stop" and records[-1]["detail"]["reason"] == "--once"
    applied = [r for r in records if r["event"] == "apply"]
    assert {r["step"] for r in applied} == ROUTER_STEPS
    assert {(r["commit"], r["status"], r["level"]) for r in applied} == {
        (repo.head[:12], "ok", "info")}


def test_library_chatter_is_off_while_the_daemon_runs(
    repo: Repo, lab: LabLayout, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from reconciler.drivers.backend import SystemBackend

    real = SystemBackend.observe
    levels: dict[str, int] = {}

    def chatty(self: SystemBackend, *args: object, **kwargs: object) -> object:
        # what paramiko says on every connection, and a driver on every write
        logging.getLogger("paramiko.transport").info("Connected (version 2.0, client OpenSSH_9.2)")
        logging.getLogger("paramiko.transport").info("Authentication (publickey) successful!")
        logging.getLogger("reconciler.transport").info("onprem: wrote /etc/postfix/transport")
        logging.getLogger("paramiko.transport").warning("Oops, unhandled type 3")
        levels.update({name: logging.getLogger(name).getEffectiveLevel()
                       for name in (*QUIET_LOGGERS, "urllib3.connectionpool")})
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SystemBackend, "observe", chatty)
    before = {name: logging.getLogger(name).level for name in ("paramiko", "reconciler")}
    caplog.set_level(logging.DEBUG, logger="tests")  # the capture handler takes everything
    logged = Logged(repo, lab)
    lines = logged.run_once()

    text = "\n".join(lines)
    for chatter in ("Connected", "Authentication", "wrote"):
        assert chatter not in text
        assert not any(chatter in record.getMessage() for record in caplog.records)
    assert all(level == logging.WARNING for level in levels.values())
    # a library's warning still gets through, in the daemon's format
    assert any(" WARNING paramiko.transport Oops, unhandled type 3" in line for line in lines)
    # and the levels are put back when the daemon returns
    assert {name: logging.getLogger(name).level for name in before} == before


def test_credentials_in_a_repo_url_never_reach_the_log() -> None:
    assert redact("repo https://deploy:s3cret@git.example.co.jp/infra/mail.git") == (
        "repo https://***@git.example.co.jp/infra/mail.git")
    assert redact("https://ghp_token123@github.com/x/y") == "https://***@github.com/x/y"
    assert redact("ssh://git:pw@git.example.co.jp/x") == "ssh://git:***@git.example.co.jp/x"
    assert redact("git@git.example.co.jp:infra/mail.git") == "git@git.example.co.jp:infra/mail.git"


def test_cli_daemon_log_format_json(repo: Repo, lab: LabLayout) -> None:
    result = run_cli("daemon", "--repo", str(repo.bare), "--lab", str(lab.root), "--once",
                     "--log-format", "json")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records[0]["event"] == "start"
    assert records[-1]["event"] == "stop"
    assert {r["step"] for r in records if r["event"] == "apply"} == ROUTER_STEPS

    assert run_cli("daemon", "--once", "--log-format", "xml").exit_code == 2
