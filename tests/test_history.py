"""`mailrec history`: what was applied and acknowledged, when, from which commit or state
digest, by whom; read from the target's journal."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from reconciler.journal import Journal, local_actor
from reconciler.lab.layout import LabLayout
from tests.conftest import run_cli


def test_history_lists_what_apply_did_with_its_source_and_who(lab: LabLayout) -> None:
    assert run_cli("history", "--lab", str(lab.root)).output.startswith(
        "the journal records nothing yet")
    applied = run_cli("apply", "--lab", str(lab.root), "--yes")
    assert applied.exit_code in (0, 2), applied.output
    journal = Journal(lab.journal_dir)
    try:
        digest = journal.events(kind="apply")[-1].source
        journal.record(datetime(2026, 11, 29, 10, tzinfo=UTC), "ack", "outbound/suga", "noted",
                       detail={"to": "relay", "note": "Outlook changed by the helpdesk"},
                       actor="helpdesk@pc")
    finally:
        journal.close()

    shown = run_cli("history", "--lab", str(lab.root))
    assert shown.exit_code == 0
    lines = shown.output.splitlines()
    applied_lines = [line for line in lines if " applied " in line]
    assert {line.split()[2] for line in applied_lines} == {
        "dns/spf", "router/filter/10", "router/route/default"}
    assert all(digest[:12] in line and local_actor() in line for line in applied_lines)
    assert "started" not in shown.output  # the marks are there with --all only
    assert "outbound/suga" in lines[-1] and "helpdesk@pc" in lines[-1]
    assert "Outlook changed by the helpdesk" in lines[-1]

    only = run_cli("history", "--lab", str(lab.root), "--step", "router/", "--format", "json")
    entries = json.loads(only.output)
    assert [e["step"] for e in entries] == ["router/filter/10", "router/route/default"]
    assert {e["what"] for e in entries} == {"applied"} and entries[0]["source"] == digest

    everything = run_cli("history", "--lab", str(lab.root), "--all", "--limit", "0")
    assert "started" in everything.output
    last_two = run_cli("history", "--lab", str(lab.root), "--all", "--limit", "2")
    assert len(last_two.output.splitlines()) == 2
