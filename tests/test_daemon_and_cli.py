"""The daemon and the command line on the same target (issue 10, finding 1): one journal,
one lock; commands use the daemon's state by default and say so; applying another state is
refused unless overridden (and the override is recorded); acks reach the daemon."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest

from reconciler.daemon import Daemon
from reconciler.drivers.postfix import TRANSPORT_MAP
from reconciler.journal import Journal, LockedError
from reconciler.lab.layout import LabLayout
from reconciler.target import running_daemon
from tests.conftest import run_cli, set_users
from tests.test_daemon import (  # noqa: F401 (fixtures)
    ConfigRepo,
    config_repo,
    daemon_lab,
    make_daemon,
    managed_map,
    wait_until,
)


@pytest.fixture
def running(config_repo: ConfigRepo, daemon_lab: LabLayout  # noqa: F811
            ) -> Iterator[tuple[Daemon, ConfigRepo, LabLayout]]:
    """The daemon following the bare repo in the background, suga moved by a commit."""
    set_users(config_repo.state_dir, suga=("rental", "onprem"))
    config_repo.push("Move suga's inbound mail to the rental")
    # One round, then a long wait: the commands below never race a round for the lock.
    daemon = make_daemon(config_repo, daemon_lab, interval=3600)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: "suga@example.co.jp" in managed_map(daemon_lab, TRANSPORT_MAP),
                   "the daemon to forward suga")
        wait_until(lambda: running_daemon(daemon_lab.journal_dir) is not None,
                   "the daemon's record")
        yield daemon, config_repo, daemon_lab
    finally:
        daemon.stop.set()
        thread.join(timeout=30)
    assert running_daemon(daemon_lab.journal_dir) is None  # released when it stopped


def test_plan_uses_the_daemons_commit_and_never_proposes_to_undo_it(
        running: tuple[Daemon, ConfigRepo, LabLayout]) -> None:
    _, repo, lab = running
    # The lab's own state/ still says suga is onprem: that is not what the daemon applies.
    planned = run_cli("plan", "--lab", str(lab.root))
    assert "using the state of the daemon" in planned.stderr
    assert "inbound/suga" not in planned.output  # no revert proposed
    record = running_daemon(lab.journal_dir)
    assert record is not None and record.commit == repo.work.head.commit.hexsha


def test_applying_another_state_is_refused(
        running: tuple[Daemon, ConfigRepo, LabLayout]) -> None:
    _, _, lab = running
    own_state = lab.root / "state"  # suga onprem: would undo the daemon's move
    refused = run_cli("apply", "--lab", str(lab.root), "--state", str(own_state), "--yes")
    assert refused.exit_code == 3, refused.output + refused.stderr
    assert "differs from the one the daemon" in refused.stderr
    assert "suga@example.co.jp" in managed_map(lab, TRANSPORT_MAP)
    journal = Journal(lab.journal_dir)
    try:
        assert not journal.events(kind="override")
    finally:
        journal.close()

    # Without --state, apply works with the daemon's commit: nothing it did is undone.
    same = run_cli("apply", "--lab", str(lab.root), "--yes")
    assert same.exit_code in (0, 2), same.output + same.stderr
    assert "suga@example.co.jp" in managed_map(lab, TRANSPORT_MAP)


def test_an_override_is_recorded_with_who_and_why(
        running: tuple[Daemon, ConfigRepo, LabLayout]) -> None:
    _, _, lab = running
    forced = run_cli("apply", "--lab", str(lab.root), "--state", str(lab.root / "state"),
                     "--yes", "--override", "rental outage: suga back onprem until it ends")
    assert forced.exit_code in (0, 2), forced.output + forced.stderr
    assert "override recorded" in forced.stderr
    journal = Journal(lab.journal_dir)
    try:
        [override] = journal.events(kind="override")
    finally:
        journal.close()
    assert override.detail["note"] == "rental outage: suga back onprem until it ends"
    assert override.actor and "(daemon)" not in override.actor
    shown = run_cli("history", "--lab", str(lab.root), "--step", "")
    assert "override" in shown.output and "rental outage" in shown.output


def test_acks_and_the_lock_are_the_daemons(
        running: tuple[Daemon, ConfigRepo, LabLayout]) -> None:
    daemon, _, lab = running
    assert daemon._registered == lab.journal_dir
    journal = Journal(lab.journal_dir)
    try:
        with contextlib.ExitStack() as held:
            # Taken between two of the daemon's rounds (each holds it while it runs), then
            # held as by an apply: the command line meets the same lock.
            def take() -> bool:
                try:
                    held.enter_context(journal.lock())
                except LockedError:
                    return False
                return True

            wait_until(take, "a moment between the daemon's rounds")
            locked = run_cli("apply", "--lab", str(lab.root), "--yes")
            assert locked.exit_code == 1
            assert "another mailrec apply is running" in (locked.output + locked.stderr)
        acked = run_cli("ack", "outbound/nobody", "--lab", str(lab.root))
        assert acked.exit_code == 1  # not a step: nothing recorded, in the daemon's journal
        withdrawn = run_cli("ack", "mailbox/suga", "--withdraw", "--lab", str(lab.root))
        assert withdrawn.exit_code == 3 and "no ack to withdraw" in withdrawn.stderr
    finally:
        journal.close()
