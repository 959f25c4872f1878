"""The daemon (`reconciler/daemon.py`) on a lab, its desired state in a bare git repo: every
round fetches the branch and reconciles; a new commit is applied on the next round, an invalid
one changes nothing; the metrics say how far the world is from the state; and a daemon running
in the background ends promptly when asked to."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import git
import pytest

from reconciler.daemon import Daemon
from reconciler.drivers.postfix import RECIPIENT_MAP, TRANSPORT_MAP, parse_map
from reconciler.journal import Journal
from reconciler.lab.init import init_lab
from reconciler.lab.layout import LabLayout
from reconciler.load import load_state
from tests.conftest import STATE, set_users, tree_digest

NOW = "2026-11-29T09:00:00+00:00"
AUTHOR = git.Actor("Config Admin", "admin@example.co.jp")
SMTP_FILTER = "ip filter 10 pass * * tcp * smtp"
SMTP_ROUTE = "ip route default gateway 192.168.0.254 filter 10 gateway tunnel 2"
RELAY = "smtp:[example.sakura.ne.jp]:25"


@dataclass
class ConfigRepo:
    """The company's config repo: a bare repo (what the daemon fetches) and a clone to edit."""

    bare: Path
    work: git.Repo

    @property
    def state_dir(self) -> Path:
        return Path(self.work.working_tree_dir or ".") / "state"

    @property
    def head(self) -> str:
        return git.Repo(self.bare).commit("main").hexsha

    def push(self, message: str) -> str:
        self.work.git.add("--all", "state")
        commit = self.work.index.commit(message, author=AUTHOR, committer=AUTHOR)
        self.work.git.push("origin", "main")
        return commit.hexsha


@pytest.fixture
def config_repo(tmp_path: Path) -> ConfigRepo:
    source = tmp_path / "seed"
    shutil.copytree(STATE, source / "state")
    seed = git.Repo.init(source, initial_branch="main")
    seed.git.add("--all", "state")
    seed.index.commit("Initial desired state", author=AUTHOR, committer=AUTHOR)
    bare = tmp_path / "config.git"
    git.Repo.clone_from(source, bare, bare=True)
    work = git.Repo.clone_from(bare, tmp_path / "work", branch="main")
    return ConfigRepo(bare, work)


@pytest.fixture
def daemon_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LabLayout:
    monkeypatch.delenv("MAILREC_LAB", raising=False)
    monkeypatch.setenv("MAILREC_NOW", NOW)
    init_lab(tmp_path / "lab", load_state(STATE), migrated=False, force=False)
    return LabLayout(tmp_path / "lab")


def make_daemon(repo: ConfigRepo | None, lab: LabLayout, interval: float = 0.1) -> Daemon:
    return Daemon(
        repo=str(repo.bare) if repo else None,
        branch="main",
        subpath="state" if repo else str(lab.root / "state"),
        interval=interval,
        lab=lab,
        metrics_port=None,
        allow_bulk=False,
    )


def metric(daemon: Daemon, name: str, **labels: str) -> float | None:
    return daemon.metrics.registry.get_sample_value(name, labels)


def managed_map(lab: LabLayout, name: str) -> dict[str, str]:
    return parse_map((lab.postfix_dir / name).read_text())


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Poll for something another thread does; the timeout only bounds a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_first_round_applies_the_router_steps(
    config_repo: ConfigRepo, daemon_lab: LabLayout
) -> None:
    assert SMTP_FILTER not in daemon_lab.router_config.read_text()
    daemon = make_daemon(config_repo, daemon_lab)

    assert daemon.run(once=True) == 0

    config = daemon_lab.router_config.read_text().splitlines()
    assert SMTP_FILTER in config
    assert SMTP_ROUTE in config
    assert "ip route default gateway tunnel 2" not in config  # replaced, not added beside
    assert metric(daemon, "mailrec_in_sync") == 1
    for status in ("ready", "gated", "refused"):
        assert metric(daemon, "mailrec_plan_steps", status=status) == 0
    assert metric(daemon, "mailrec_reconcile_total", result="ok") == 1
    assert metric(daemon, "mailrec_steps_applied_total", result="ok") == 3
    last = metric(daemon, "mailrec_last_reconcile_timestamp_seconds")
    assert last is not None and last > 0

    # the journal says which commit each step came from
    head = git.Repo(config_repo.bare).commit("main").hexsha
    journal = Journal(daemon_lab.journal_dir)
    try:
        applied = journal.events(kind="apply")
        assert {e.step for e in applied if e.result == "ok"} == {
            "dns/spf", "router/filter/10", "router/route/default"
        }
        assert {e.source for e in applied} == {head}
    finally:
        journal.close()

    # level-triggered: a second round with nothing new changes nothing
    before = tree_digest(daemon_lab.root)
    assert daemon.run(once=True) == 0
    assert tree_digest(daemon_lab.root) == before
    assert metric(daemon, "mailrec_steps_applied_total", result="ok") == 3


def test_a_new_commit_is_applied_on_the_next_round(
    config_repo: ConfigRepo, daemon_lab: LabLayout
) -> None:
    daemon = make_daemon(config_repo, daemon_lab)
    assert daemon.run(once=True) == 0
    assert "suga@example.co.jp" not in managed_map(daemon_lab, TRANSPORT_MAP)

    set_users(config_repo.state_dir, suga=("rental", "onprem"))
    sha = config_repo.push("Move suga's inbound mail to the rental")
    assert daemon.run(once=True) == 0

    # Every local name of suga's (mydestination), as mailrec forwards a migrated user.
    names = ("example.co.jp", "mail.example.co.jp", "localhost.example.co.jp", "localhost")
    assert managed_map(daemon_lab, TRANSPORT_MAP) == {f"suga@{n}": RELAY for n in names}
    assert managed_map(daemon_lab, RECIPIENT_MAP) == {f"suga@{n}": "OK" for n in names}
    assert "suga@example.co.jp" in daemon_lab.rental_mailboxes.read_text().split()
    # suga's old mailbox still holds mail: removing it waits (MR008), so not in sync yet
    assert metric(daemon, "mailrec_in_sync") == 0
    gated = metric(daemon, "mailrec_plan_steps", status="gated")
    assert gated is not None and gated >= 1
    assert metric(daemon, "mailrec_plan_steps", status="refused") == 0
    journal = Journal(daemon_lab.journal_dir)
    try:
        moved = journal.last("inbound/suga")
        assert moved is not None and moved.source == sha
    finally:
        journal.close()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda text: text.replace("suga: {inbound: rental", "suga: {inbound: cloud"),
         "users.suga.inbound"),
        (lambda text: text + "  kato: {inbound: rental, outbond: onprem}\n", "outbond"),
        (lambda text: text.replace("users:", "users: [", 1), "users.yaml"),
    ],
    ids=["bad-value", "unknown-key", "yaml-syntax"],
)
def test_an_invalid_commit_fails_the_round_and_changes_nothing(
    config_repo: ConfigRepo,
    daemon_lab: LabLayout,
    caplog: pytest.LogCaptureFixture,
    edit: Callable[[str], str],
    expected: str,
) -> None:
    daemon = make_daemon(config_repo, daemon_lab)
    assert daemon.run(once=True) == 0
    before = tree_digest(daemon_lab.root)
    journal = Journal(daemon_lab.journal_dir)
    try:
        events_before = len(journal.events())
    finally:
        journal.close()

    # valid-looking intent (suga to the rental) in the same commit as the error
    set_users(config_repo.state_dir, suga=("rental", "onprem"))
    users = config_repo.state_dir / "users.yaml"
    users.write_text(edit(users.read_text()))
    config_repo.push("A broken edit")

    assert daemon.run(once=True) == 1
    assert tree_digest(daemon_lab.root) == before
    journal = Journal(daemon_lab.journal_dir)
    try:
        assert len(journal.events()) == events_before
    finally:
        journal.close()
    assert metric(daemon, "mailrec_reconcile_total", result="invalid") == 1
    assert "invalid state" in caplog.text and expected in caplog.text


def run_in_background(daemon: Daemon) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(daemon.run()), daemon=True)
    thread.start()
    return thread, result


def stop(daemon: Daemon, thread: threading.Thread) -> None:
    daemon.stop.set()
    # The interval is 30 s: returning well within it proves the wait was interrupted.
    thread.join(timeout=10)
    assert not thread.is_alive(), "the daemon did not stop on stop.set()"


@pytest.fixture
def cleanup_daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop.set()


def test_background_daemon_stops_promptly(
    config_repo: ConfigRepo, daemon_lab: LabLayout, cleanup_daemons: list[Daemon]
) -> None:
    daemon = make_daemon(config_repo, daemon_lab, interval=30)
    cleanup_daemons.append(daemon)
    thread, result = run_in_background(daemon)
    wait_until(lambda: metric(daemon, "mailrec_reconcile_total", result="ok") == 1,
               "the first round")
    assert SMTP_FILTER in daemon_lab.router_config.read_text()

    stop(daemon, thread)
    assert result == [0]
    assert metric(daemon, "mailrec_reconcile_total", result="ok") == 1  # no extra round


def test_background_daemon_on_a_directory_reacts_to_a_change(
    daemon_lab: LabLayout, cleanup_daemons: list[Daemon]
) -> None:
    daemon = make_daemon(None, daemon_lab, interval=30)
    cleanup_daemons.append(daemon)
    thread, result = run_in_background(daemon)
    wait_until(lambda: metric(daemon, "mailrec_in_sync") == 1, "the first round")

    # no commit here: editing the state directory starts a round long before the interval
    set_users(daemon_lab.root / "state", suga=("rental", "onprem"))
    wait_until(lambda: "suga@example.co.jp" in managed_map(daemon_lab, TRANSPORT_MAP),
               "the round after the edit")

    stop(daemon, thread)
    assert result == [0]


def test_an_unreachable_repo_is_an_error_outcome_not_a_crash(
    tmp_path: Path, daemon_lab: LabLayout
) -> None:
    before = tree_digest(daemon_lab.root)
    daemon = Daemon(repo=str(tmp_path / "no-such-repo.git"), branch="main", subpath="state",
                    interval=0.1, lab=daemon_lab, metrics_port=None, allow_bulk=False)
    assert daemon.run(once=True) == 1
    assert daemon.failures == 1  # the next wait backs off
    assert metric(daemon, "mailrec_reconcile_total", result="error") == 1
    assert tree_digest(daemon_lab.root) == before


def test_an_unchanged_commit_is_not_parsed_again_and_a_new_one_is(
    config_repo: ConfigRepo, daemon_lab: LabLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    import reconciler.daemon as daemon_module

    parsed: list[str] = []
    real = daemon_module.load_from_git

    def counting(repo: Path, ref: str, subpath: str = "state") -> object:
        parsed.append(ref)
        return real(repo, ref, subpath)

    monkeypatch.setattr(daemon_module, "load_from_git", counting)
    daemon = make_daemon(config_repo, daemon_lab)
    assert daemon.run(once=True) == 0
    assert daemon.run(once=True) == 0
    assert len(parsed) == 1  # the second round reused the first round's state

    set_users(config_repo.state_dir, suga=("rental", "onprem"))
    sha = config_repo.push("Move suga's inbound mail to the rental")
    assert daemon.run(once=True) == 0
    assert parsed[-1] == sha and len(parsed) == 2
    assert "suga@example.co.jp" in managed_map(daemon_lab, TRANSPORT_MAP)


def test_a_state_directory_is_parsed_again_only_when_its_bytes_change(
    daemon_lab: LabLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    import reconciler.daemon as daemon_module

    parsed: list[Path] = []
    real = daemon_module.load_state

    def counting(path: Path) -> object:
        parsed.append(path)
        return real(path)

    monkeypatch.setattr(daemon_module, "load_state", counting)
    daemon = make_daemon(None, daemon_lab)
    assert daemon.run(once=True) == 0
    assert daemon.run(once=True) == 0
    assert len(parsed) == 1

    set_users(daemon_lab.root / "state", suga=("rental", "onprem"))
    assert daemon.run(once=True) == 0
    assert len(parsed) == 2
    assert "suga@example.co.jp" in managed_map(daemon_lab, TRANSPORT_MAP)
    # moved back: a different state again, read again
    set_users(daemon_lab.root / "state", suga=("onprem", "onprem"))
    assert daemon.run(once=True) in (0, 1)
    assert len(parsed) == 3


def test_a_round_with_nothing_to_apply_observes_the_world_once(
    config_repo: ConfigRepo, daemon_lab: LabLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reconciler.drivers.backend import SystemBackend

    daemon = make_daemon(config_repo, daemon_lab)
    assert daemon.run(once=True) == 0  # applies the router steps: in sync afterwards
    observed: list[object] = []
    real = SystemBackend.observe

    def counting(self: SystemBackend, *args: object, **kwargs: object) -> object:
        observed.append(args)
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SystemBackend, "observe", counting)
    assert daemon.run(once=True) == 0
    assert len(observed) == 1
    assert metric(daemon, "mailrec_in_sync") == 1
