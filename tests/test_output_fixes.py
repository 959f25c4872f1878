"""Issue 10, "Output and docs": what a new admin met in the demo and the plans, each as a
test that failed before its fix.

1. every command mailrec (and the demo) shows can be pasted into a shell;
2. a user's name takes a singular verb ("suga sends");
3. a plan the bulk guard refuses names MR011 as the cause on the steps it holds back;
4. the text and Markdown plans show every finding code the JSON plan has;
5. a lowering (a move) the plan has yet to make is not told as done;
6. `ack` records the confirmation the plan asks for, also once the change is observed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from reconciler import demo
from reconciler.findings import subjects_verb
from reconciler.journal import Journal
from reconciler.lab.layout import LabLayout
from reconciler.lab.services import start_services, stop_services
from reconciler.model import Side
from reconciler.static import static_findings
from reconciler.steps import CreateAlias, DetachUpstream, MoveMx, RetireOnprem, SetMxTtl
from reconciler.world import History
from tests.test_cli import ack_events

from .conftest import STATE, run_cli, set_users
from .test_gates import CTX, LOWERED, MX, NOW, world
from .test_properties import ONPREM_MX
from .test_safety_rules import state

DOMAIN = "example.co.jp"
USERS = ("suga", "tanaka", "sato", "suzuki", "takahashi", "watanabe", "ito", "yamamoto")
CODE = re.compile(r"\bMR\d{3}\b")


def plan(lab: LabLayout, *args: str) -> tuple[int, str]:
    result = run_cli("plan", "--lab", str(lab.root), *args)
    return result.exit_code, result.output


def plan_json(lab: LabLayout) -> dict[str, Any]:
    return json.loads(plan(lab, "--format", "json")[1])


def steps(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in data["steps"]}


def codes(entry: dict[str, Any]) -> list[str]:
    return [f["code"] for f in entry["findings"]]


# --- 1. pasteable commands ---------------------------------------------------------------------


def _pasted(text: str) -> list[str]:
    """The command inside `...` of a gate message, as a shell would take it: every word
    quoted where the shell would change it (a glob, a space)."""
    match = re.search(r"`(mailrec ack [^`]*)`", text)
    assert match, text
    words = shlex.split(match.group(1))
    assert match.group(1) == shlex.join(words), match.group(1)
    return words


def test_the_ack_command_of_a_catch_all_alias_is_quoted_for_the_shell() -> None:
    ctx = replace(CTX, instructor=lambda kind, action, target: "do it in the panel")
    gate = CreateAlias("*", (f"suga@{DOMAIN}",)).gate(world(LOWERED, History()), ctx)
    assert gate is not None and gate.kind == "ack"
    assert _pasted(gate.message) == ["mailrec", "ack", "alias/*"]  # not a glob


def test_the_relay_ack_instruction_is_a_command_to_paste() -> None:
    moved = world(replace(LOWERED, mx=Side.RENTAL), History())
    gate = DetachUpstream("relay.example.co.jp.", ONPREM_MX).gate(moved, CTX)
    assert gate is not None
    last = gate.instructions[-1]
    assert last.startswith("Then run: ")
    assert shlex.split(last.removeprefix("Then run: ")) == [
        "mailrec", "ack", "upstream/relay.example.co.jp."]


def test_every_command_line_the_demo_prints_can_be_pasted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The `$` lines: the arguments as run (`--note 'created in the panel'`), and the
    environment they run with (MAILREC_LAB, MAILREC_NOW), so a pasted line does the same."""
    ran: list[tuple[list[str], dict[str, str]]] = []

    def fake_run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        ran.append((argv[3:], kwargs["env"]))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    walk = demo.Demo(tmp_path / "my lab", STATE, color=False)
    walk.export("MAILREC_LAB", str(walk.lab))
    walk.mailrec("ack", "mailbox/suga", "--note", "created in the panel")
    walk.later(timedelta(hours=1), "one old TTL later")
    walk.mailrec("apply", "--yes")
    shown = [line[2:] for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert shown[1] == "mailrec ack mailbox/suga --note 'created in the panel'"
    env: dict[str, str] = {}
    commands = []
    for line in shown:
        words = shlex.split(line)
        if words[0] == "export":
            env.update(word.split("=", 1) for word in words[1:])
        else:
            commands.append((words[1:], dict(env)))
    assert env["MAILREC_LAB"] == str(tmp_path / "my lab")
    for (args, pasted_env), (argv, run_env) in zip(commands, ran, strict=True):
        assert args == argv
        assert all(run_env[name] == value for name, value in pasted_env.items())
    assert commands[-1][1]["MAILREC_NOW"] == ran[-1][1]["MAILREC_NOW"]  # the new clock


# --- 2. grammar --------------------------------------------------------------------------------


def test_a_name_takes_a_singular_verb_and_a_list_a_plural_one() -> None:
    assert subjects_verb(["suga"], "sends", "send") == "suga sends"
    assert subjects_verb(["sato", "suga"], "is", "are") == "sato, suga are"
    many = [f"u{i}" for i in range(8)]
    assert subjects_verb(many, "is", "are") == "u0, u1, u2, u3, u4 and 3 more are"


def test_the_static_contradiction_says_suga_sends_and_suga_is() -> None:
    found = static_findings(state({"suga": ("rental", "rental"), "sato": ("onprem", "onprem")}))
    text = " ".join(f.message for f in found if f.code == "MR012")
    assert "suga sends via the rental" in text and "sato is inbound onprem" in text


# --- 3. the bulk guard is the cause ------------------------------------------------------------


def test_a_refused_bulk_plan_names_mr011_on_the_steps_it_holds_back(lab: LabLayout) -> None:
    """Everyone moves at once (more than max_change_pct): the moves are refused by MR011, and
    each old mailbox's removal names MR011 first (it waits for its user's move; MR013 says
    how). A move that would be refused with the moves allowed keeps that finding (MR005)."""
    set_users(lab.root / "state", **{n: ("rental", "onprem") for n in USERS})
    set_users(lab.root / "state", suga=("rental", "rental"))
    code, text = plan(lab)
    assert code == 3
    planned = steps(plan_json(lab))
    for name in USERS:
        assert planned[f"inbound/{name}"]["status"] == "refused"
        assert codes(planned[f"inbound/{name}"])[0] == "MR011"
        removal = planned[f"onprem-mailbox/{name}"]
        assert removal["status"] == "refused"
        assert codes(removal) == ["MR011", "MR013"], removal["findings"]
    outbound = planned["outbound/suga"]
    assert outbound["status"] == "refused"
    assert codes(outbound)[0] == "MR011" and "MR005" in codes(outbound)
    first = text.split("- onprem-mailbox/suga", 1)[1].splitlines()[1]
    assert first.strip().startswith("MR011: this plan moves 8 of 8 users")


def test_an_allowed_bulk_plan_is_unchanged(lab: LabLayout) -> None:
    set_users(lab.root / "state", **{n: ("rental", "onprem") for n in USERS})
    code, _ = plan(lab, "--allow-bulk")
    assert code == 2
    planned = steps(json.loads(plan(lab, "--allow-bulk", "--format", "json")[1]))
    assert all(s["status"] != "refused" for s in planned.values())


# --- 4. every code of the JSON plan in the text and Markdown plans ------------------------------


def _text_blocks(text: str) -> dict[str, str]:
    """Each step's line and the indented lines under it, by step id."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line[:2] in ("+ ", "~ ", "- "):
            current = blocks.setdefault(line[2:].split()[0], [])
        elif not line.startswith("  "):
            current = []
        current.append(line)
    return {step_id: "\n".join(lines) for step_id, lines in blocks.items()}


def _markdown_rows(text: str) -> dict[str, str]:
    return {m.group(1): line for line in text.splitlines()
            if (m := re.match(r"\| `.` \| `([^`]+)` \|", line))}


def test_text_and_markdown_show_every_code_the_json_has(lab: LabLayout) -> None:
    """suga's old mailbox still holds mail: its removal waits on MR008 (a gate), and MR013."""
    set_users(lab.root / "state", suga=("rental", "onprem"))
    data = plan_json(lab)
    removal = steps(data)["onprem-mailbox/suga"]
    assert "MR008" in codes(removal)
    text, markdown = _text_blocks(plan(lab)[1]), _markdown_rows(plan(lab, "--format",
                                                                      "markdown")[1])
    for entry in data["steps"]:
        wanted = {c for c in codes(entry) if CODE.fullmatch(c)}
        assert wanted <= set(CODE.findall(text[entry["id"]])), entry["id"]
        assert wanted <= set(CODE.findall(markdown[entry["id"]])), entry["id"]
    assert "MR008: the onprem mailbox of suga still holds" in text["onprem-mailbox/suga"]


# --- 5. a planned lowering is not told as done ------------------------------------------------


def test_the_mx_gate_says_the_ttl_will_be_lowered_while_the_lowering_is_planned() -> None:
    high = world(replace(LOWERED, mx_ttl=3600), History())
    after = SetMxTtl(3600, 300).simulate(high)
    gate = MX.gate(after, CTX)
    assert gate is not None and gate.code == "MR004"
    assert "will be lowered" in gate.message and "after it is lowered" in gate.message
    assert "was lowered" not in gate.message and "as recorded" not in gate.message
    assert gate.until == (NOW + timedelta(seconds=3600)).isoformat()


def test_the_mx_gate_says_was_lowered_when_the_journal_records_it() -> None:
    recorded = History(mx_ttl_lowered_at=NOW - timedelta(minutes=30), mx_old_ttl=3600)
    gate = MX.gate(world(LOWERED, recorded), CTX)
    assert gate is not None
    assert f"was lowered at {(NOW - timedelta(minutes=30)).isoformat()}" in gate.message


def test_the_retire_gate_says_the_mx_will_move_while_the_move_is_planned() -> None:
    lowered = History(mx_ttl_lowered_at=NOW - timedelta(days=2), mx_old_ttl=3600)
    before = world(LOWERED, lowered, last_mail=NOW - timedelta(days=3))
    after = MoveMx(Side.RENTAL, "example.sakura.ne.jp.", 3600).simulate(before)
    gate = RetireOnprem().gate(after, CTX)
    assert gate is not None and gate.code == "MR010"
    assert "will move" in gate.message and "moved at" not in gate.message
    done = replace(after, history=History(NOW - timedelta(days=2), NOW, 3600))
    told = RetireOnprem().gate(done, CTX)
    assert told is not None and f"the MX moved at {NOW.isoformat()}" in told.message


def test_plan_tells_a_lowering_it_has_yet_to_make_and_apply_the_one_it_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILREC_NOW", NOW.isoformat())
    monkeypatch.delenv("MAILREC_LAB", raising=False)
    source = tmp_path / "state"
    shutil.copytree(STATE, source)
    set_users(source, **{n: ("rental", "onprem") for n in USERS})
    assert run_cli("lab", "init", str(tmp_path / "lab"), "--from", str(source)).exit_code == 0
    lab = LabLayout(tmp_path / "lab")
    config = lab.root / "state" / "mailrec.yaml"
    config.write_text(config.read_text().replace("  mx: onprem", "  mx: rental", 1))
    code, text = plan(lab)
    assert code == 2 and "dns/mx-ttl                   ready" in text
    assert "MR004: the MX TTL will be lowered" in text and "was lowered" not in text
    applied = run_cli("apply", "--yes", "--lab", str(lab.root))
    assert "applied dns/mx-ttl" in applied.output
    assert f"MR004: the MX TTL was lowered at {NOW.isoformat()}" in applied.output


# --- 6. the mailbox ack -------------------------------------------------------------------------


def _panel_create(lab: LabLayout, name: str) -> None:
    """What the admin does in the rental's control panel (as the demo does)."""
    with lab.rental_mailboxes.open("a") as handle:
        handle.write(f"{name}@{DOMAIN}\n")
    for sub in ("new", "cur", "tmp"):
        (lab.rental_maildirs / name / sub).mkdir(parents=True, exist_ok=True)


def test_the_ack_the_plan_asks_for_is_recorded_after_the_person_did_it(lab: LabLayout) -> None:
    """The manual rental (lab services up): plan asks for `mailrec ack mailbox/suga`; the admin
    creates the mailbox as told, then acks: recorded, not "nothing to acknowledge"."""
    set_users(lab.root / "state", suga=("rental", "onprem"), tanaka=("rental", "onprem"))
    start_services(lab)
    try:
        planned = steps(plan_json(lab))
        for name in ("suga", "tanaka"):
            gate = planned[f"mailbox/{name}"]["gate"]
            assert gate["kind"] == "ack" and f"mailrec ack mailbox/{name}" in "".join(
                gate["instructions"])
        _panel_create(lab, "suga")
        done = run_cli("ack", "mailbox/suga", "--lab", str(lab.root), "--note", "created")
        assert done.exit_code == 0, done.stderr
        assert "acknowledged mailbox/suga" in done.output
        waiting = run_cli("ack", "mailbox/tanaka", "--lab", str(lab.root))  # not created yet
        assert waiting.exit_code == 0 and "acknowledged mailbox/tanaka" in waiting.output
        after = steps(plan_json(lab))
    finally:
        stop_services(lab)
    assert [(e.step, e.detail.get("note")) for e in ack_events(lab)] == [
        ("mailbox/suga", "created"), ("mailbox/tanaka", "")]
    assert "mailbox/suga" not in after  # done: the plan no longer asks
    assert after["mailbox/tanaka"]["gate"]["kind"] == "observation"  # acked, not seen yet


def test_an_ack_of_an_observed_mailbox_is_spent_at_once(lab: LabLayout) -> None:
    """The confirmation of a change already seen does not linger: if the mailbox were lost
    later, the plan asks a person again."""
    from reconciler.observe import JournalView

    set_users(lab.root / "state", suga=("rental", "onprem"))
    _panel_create(lab, "suga")
    start_services(lab)
    try:
        assert run_cli("ack", "mailbox/suga", "--lab", str(lab.root)).exit_code == 0
    finally:
        stop_services(lab)
    journal = Journal(lab.journal_dir)
    try:
        assert "mailbox/suga" not in JournalView.read(journal).acked
    finally:
        journal.close()


def test_an_ack_of_a_step_that_is_not_planned_still_fails(lab: LabLayout) -> None:
    result = run_cli("ack", "alias/nothing", "--lab", str(lab.root))
    assert result.exit_code == 1 and "not a step of the current plan" in result.stderr

