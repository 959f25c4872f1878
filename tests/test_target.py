"""One memory per target: the journal's directory comes from the target (the lab, or the
domain and onprem host), a second daemon for the same target is refused, a dead daemon's
record is not believed, and an old journal beside the state is never silently forgotten."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from reconciler.lab.layout import LabLayout
from reconciler.load import load_state
from reconciler.target import (
    DaemonRecord,
    TargetError,
    check_legacy_journal,
    daemon_registration,
    running_daemon,
    target_dir,
    write_record,
)
from tests.conftest import STATE


def record(directory: Path) -> DaemonRecord:
    return DaemonRecord(os.getpid(), "file:///srv/config.git", "main", "state",
                        str(directory / "repo"), "0" * 40, "2026-11-29T09:00:00+00:00")


def test_the_target_directory_is_the_labs_or_one_per_domain_and_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = load_state(STATE).state
    lab = LabLayout(tmp_path / "lab")
    assert target_dir(state, lab) == lab.journal_dir
    monkeypatch.setenv("MAILREC_HOME", str(tmp_path / "home"))
    assert target_dir(state, None) == tmp_path / "home" / "example.co.jp@mail.example.co.jp"


def test_one_daemon_per_target_and_a_dead_ones_record_is_ignored(tmp_path: Path) -> None:
    directory = tmp_path / "target"
    assert running_daemon(directory) is None
    with daemon_registration(directory):
        write_record(directory, record(directory))
        assert running_daemon(directory) == record(directory)
        with pytest.raises(TargetError, match="another daemon"), \
                daemon_registration(directory):
            pass
    assert running_daemon(directory) is None and not (directory / "daemon.json").exists()

    # A daemon killed with SIGKILL leaves its record; the kernel drops its lock.
    def hold_and_die() -> None:
        with daemon_registration(directory):
            write_record(directory, record(directory))
            os._exit(9)

    child = multiprocessing.get_context("fork").Process(target=hold_and_die)
    child.start()
    child.join()
    assert (directory / "daemon.json").exists()
    assert running_daemon(directory) is None


def test_an_old_journal_beside_the_state_is_moved_by_hand_not_forgotten(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    (state_dir / ".mailrec").mkdir(parents=True)
    (state_dir / ".mailrec" / "journal.db").write_bytes(b"")
    target = tmp_path / "home" / "example.co.jp@mail.example.co.jp"
    with pytest.raises(TargetError, match=r"mv .*/state/\.mailrec/\*"):
        check_legacy_journal(target, state_dir)
    target.mkdir(parents=True)
    (target / "journal.db").write_bytes(b"")
    check_legacy_journal(target, state_dir)  # the target has its own: the old one is history
    check_legacy_journal(tmp_path / "other", tmp_path / "nowhere")  # nothing old: fine
