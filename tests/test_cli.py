"""The CLI contract on the file-only lab (DESIGN section 4): exit codes, plan JSON, saved and
stale plans, confirmation, acks, schema, clock override, PR plans from git, `python -m`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import git
import pytest
from ruamel.yaml import YAML

from reconciler.journal import Journal
from reconciler.lab.layout import LabLayout
from tests.conftest import REPO, run_cli, set_users, tree_digest

EXIT_OK, EXIT_ERROR, EXIT_PENDING, EXIT_REFUSED = 0, 1, 2, 3
# The router policy, and SPF for the line it sends tcp/25 through (onprem's own mail: MR006).
ROUTER_STEPS = {"dns/spf", "router/filter/10", "router/route/default"}


def plan_json(lab: LabLayout, *args: str) -> tuple[int, dict[str, Any]]:
    result = run_cli("plan", "--lab", str(lab.root), "--format", "json", *args)
    assert result.exit_code in (EXIT_OK, EXIT_PENDING, EXIT_REFUSED), result.stderr
    return result.exit_code, json.loads(result.output)


def step_ids(plan: dict[str, Any], status: str | None = None) -> set[str]:
    return {s["id"] for s in plan["steps"] if status is None or s["status"] == status}


def ack_events(lab: LabLayout) -> list[Any]:
    journal = Journal(lab.journal_dir)
    try:
        return journal.events(kind="ack")
    finally:
        journal.close()


def refuse_outbound(lab: LabLayout) -> None:
    """suga sends via the rental while everyone else still receives onprem (MR002)."""
    set_users(lab.root / "state", suga=("rental", "rental"))


# --- exit codes -------------------------------------------------------------------------


def test_plan_on_fresh_lab_exits_2_with_router_steps_ready(lab: LabLayout) -> None:
    before = tree_digest(lab.root)
    result = run_cli("plan", "--lab", str(lab.root))
    assert result.exit_code == EXIT_PENDING, result.stderr
    assert "router/filter/10" in result.output
    code, plan = plan_json(lab)
    assert code == EXIT_PENDING
    assert step_ids(plan, "ready") == ROUTER_STEPS
    assert plan["in_sync"] is False
    assert tree_digest(lab.root) == before, "plan is a dry run"


def test_apply_yes_reaches_sync_and_plan_exits_0(lab: LabLayout) -> None:
    before = lab.router_config.read_text()
    result = run_cli("apply", "--lab", str(lab.root), "--yes")
    assert result.exit_code == EXIT_OK, result.output + result.stderr
    assert "applied router/filter/10" in result.output
    after = lab.router_config.read_text()
    assert after != before
    assert "ip filter 10 pass * * tcp * smtp" in after
    code, plan = plan_json(lab)
    assert code == EXIT_OK
    assert plan["in_sync"] is True and plan["steps"] == []
    # Idempotent: a second apply changes nothing and still exits 0.
    digest = tree_digest(lab.root)
    assert run_cli("apply", "--lab", str(lab.root), "--yes").exit_code == EXIT_OK
    assert tree_digest(lab.root) == digest


def test_outbound_before_everyone_is_inbound_rental_exits_3_mr002(lab: LabLayout) -> None:
    refuse_outbound(lab)
    code, plan = plan_json(lab)
    assert code == EXIT_REFUSED
    refused = {s["id"]: s for s in plan["steps"] if s["status"] == "refused"}
    assert "outbound/suga" in refused
    assert "MR002" in {f["code"] for f in refused["outbound/suga"]["findings"]}
    # The plan-level findings say it too (MR012: the state contradicts itself, citing MR002).
    assert any("MR002" in f["message"] for f in plan["findings"])
    # The safe prefix is still planned: suga's inbound move is ready.
    assert "inbound/suga" in step_ids(plan, "ready")
    assert run_cli("plan", "--lab", str(lab.root)).exit_code == EXIT_REFUSED
    assert run_cli("status", "--lab", str(lab.root)).exit_code == EXIT_REFUSED


def test_apply_applies_the_safe_prefix_and_exits_3_when_something_is_refused(
    lab: LabLayout,
) -> None:
    refuse_outbound(lab)
    result = run_cli("apply", "--lab", str(lab.root), "--yes")
    assert result.exit_code == EXIT_REFUSED, result.output + result.stderr
    assert "applied inbound/suga" in result.output
    code, plan = plan_json(lab)
    assert code == EXIT_REFUSED
    assert "inbound/suga" not in step_ids(plan)
    assert "outbound/suga" in step_ids(plan, "refused")


def test_validate_exit_codes(lab: LabLayout, tmp_path: Path) -> None:
    ok = run_cli("validate", "--lab", str(lab.root))
    assert ok.exit_code == EXIT_OK, ok.stderr
    assert ok.output.startswith("ok: ")
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\ndomain: example.co.jp\n")
    bad = run_cli("validate", "--state", str(broken))
    assert bad.exit_code == EXIT_ERROR
    assert f"{broken}:1:1: onprem: required field is missing" in bad.stderr
    refuse_outbound(lab)
    refused = run_cli("validate", "--lab", str(lab.root))
    assert refused.exit_code == EXIT_REFUSED
    assert "MR012" in refused.stderr and "MR002" in refused.stderr


# --- plan JSON ----------------------------------------------------------------------------


def _check_contract(plan: dict[str, Any]) -> None:
    contract = {"format_version", "in_sync", "steps", "findings", "checksum"}
    assert contract <= set(plan), f"missing {contract - set(plan)}"
    assert plan["format_version"] == 1
    assert isinstance(plan["in_sync"], bool)
    assert isinstance(plan["checksum"], str) and plan["checksum"]
    assert isinstance(plan["steps"], list) and isinstance(plan["findings"], list)
    for step in plan["steps"]:
        assert {"id", "action", "status", "findings"} <= set(step)
        assert isinstance(step["id"], str) and "/" in step["id"]
        assert step["action"] in ("create", "update", "delete")
        assert step["status"] in ("ready", "gated", "refused")
        for finding in step["findings"]:
            assert isinstance(finding["code"], str) and isinstance(finding["message"], str)
        if step["status"] == "refused":
            assert any(f["code"].startswith("MR") for f in step["findings"])
    for finding in plan["findings"]:
        assert isinstance(finding["code"], str) and isinstance(finding["message"], str)


def test_plan_json_has_the_contract_keys(lab: LabLayout) -> None:
    _, fresh = plan_json(lab)
    _check_contract(fresh)
    assert [s["id"] for s in fresh["steps"]] == [
        "dns/spf", "router/filter/10", "router/route/default"]
    assert [(s["action"], s["status"]) for s in fresh["steps"]] == [
        ("update", "ready"), ("create", "ready"), ("update", "ready")]
    refuse_outbound(lab)
    _, refused = plan_json(lab)
    _check_contract(refused)
    assert refused["in_sync"] is False
    assert refused["checksum"] != fresh["checksum"]


def test_plan_checksum_is_stable_for_the_same_world(lab: LabLayout) -> None:
    _, first = plan_json(lab)
    later = run_cli("plan", "--lab", str(lab.root), "--format", "json",
                    env={"MAILREC_NOW": "2026-12-01T00:00:00+00:00"})
    assert json.loads(later.output)["checksum"] == first["checksum"], (
        "the clock is not part of the observed world")


# --- saved plans ------------------------------------------------------------------------


def test_plan_out_then_apply_file(lab: LabLayout, tmp_path: Path) -> None:
    saved = tmp_path / "plan.json"
    result = run_cli("plan", "--lab", str(lab.root), "--format", "json", "--out", str(saved))
    assert result.exit_code == EXIT_PENDING
    assert result.output == "", "--out writes the plan to the file, not stdout"
    assert json.loads(saved.read_text())["format_version"] == 1
    applied = run_cli("apply", "--lab", str(lab.root), str(saved), "--yes")
    assert applied.exit_code == EXIT_OK, applied.output + applied.stderr
    assert {line.removeprefix("applied ") for line in applied.output.splitlines()
            if line.startswith("applied ")} == ROUTER_STEPS
    assert plan_json(lab)[0] == EXIT_OK


def _add_whitelist_entry(lab: LabLayout) -> None:
    with lab.rental_whitelist.open("a") as handle:
        handle.write("198.51.100.0/24\n")


def _bump_zone_serial(lab: LabLayout) -> None:
    zone = lab.zone_file("example.co.jp")
    zone.write_text(zone.read_text().replace("2024010101 ; serial", "2024010102 ; serial"))


@pytest.mark.parametrize("change", [_add_whitelist_entry, _bump_zone_serial],
                         ids=["rental-whitelist", "dns-zone"])
def test_apply_of_a_stale_plan_is_refused_and_changes_nothing(
    lab: LabLayout, tmp_path: Path, change: Any
) -> None:
    saved = tmp_path / "plan.json"
    run_cli("plan", "--lab", str(lab.root), "--format", "json", "--out", str(saved))
    change(lab)
    before = tree_digest(lab.root)
    result = run_cli("apply", "--lab", str(lab.root), str(saved), "--yes")
    assert result.exit_code == EXIT_ERROR, result.output
    assert "stale" in result.stderr
    assert tree_digest(lab.root) == before


def test_apply_of_a_file_that_is_not_a_plan_is_an_error(lab: LabLayout, tmp_path: Path) -> None:
    for text in ("not json", '{"format_version": 2}', "[1, 2]"):
        bogus = tmp_path / "bogus.json"
        bogus.write_text(text)
        before = tree_digest(lab.root)
        result = run_cli("apply", "--lab", str(lab.root), str(bogus), "--yes")
        assert result.exit_code == EXIT_ERROR
        assert "plan" in result.stderr
        assert tree_digest(lab.root) == before


def test_apply_without_yes_and_without_a_tty_refuses(lab: LabLayout) -> None:
    before = tree_digest(lab.root)
    result = run_cli("apply", "--lab", str(lab.root))
    assert result.exit_code == EXIT_ERROR
    assert "--yes" in result.stderr
    assert "router/filter/10" in result.output, "it shows what it would have done"
    assert tree_digest(lab.root) == before


# --- ack --------------------------------------------------------------------------------


def test_ack_of_a_refused_step_exits_3_and_records_nothing(lab: LabLayout) -> None:
    refuse_outbound(lab)
    before = tree_digest(lab.root)
    result = run_cli("ack", "outbound/suga", "--lab", str(lab.root), "--note", "changed it")
    assert result.exit_code == EXIT_REFUSED
    assert "MR002" in result.stderr
    assert ack_events(lab) == []
    assert tree_digest(lab.root) == before


def test_ack_of_an_unknown_step_exits_1(lab: LabLayout) -> None:
    result = run_cli("ack", "outbound/nobody", "--lab", str(lab.root))
    assert result.exit_code == EXIT_ERROR
    assert "not a step of the current plan" in result.stderr
    assert ack_events(lab) == []


def test_ack_of_an_automated_step_exits_1(lab: LabLayout) -> None:
    result = run_cli("ack", "router/filter/10", "--lab", str(lab.root))
    assert result.exit_code == EXIT_ERROR
    assert "does not wait for a person" in result.stderr
    assert ack_events(lab) == []


# --- schema, clock, lab, status -----------------------------------------------------------


def test_schema_covers_every_top_level_key_of_the_state(lab: LabLayout) -> None:
    result = run_cli("schema")
    assert result.exit_code == EXIT_OK
    schema = json.loads(result.output)
    assert schema["type"] == "object"
    keys: set[str] = set()
    for path in sorted((REPO / "state").glob("*.yaml")):
        keys |= {str(k) for k in YAML(typ="safe").load(path.read_text())}
    assert keys >= {"version", "domain", "onprem", "rental", "dns", "router", "users", "policy"}
    assert keys <= set(schema["properties"])
    assert {"version", "domain", "onprem", "rental", "dns"} <= set(schema.get("required", []))


def test_garbage_clock_is_an_error(lab: LabLayout) -> None:
    before = tree_digest(lab.root)
    for command in (("plan",), ("status",), ("apply", "--yes")):
        result = run_cli(*command, "--lab", str(lab.root), env={"MAILREC_NOW": "garbage"})
        assert result.exit_code == EXIT_ERROR, command
        assert "MAILREC_NOW" in result.stderr
    assert tree_digest(lab.root) == before


def test_clock_override_accepts_z_suffix(lab: LabLayout) -> None:
    result = run_cli("plan", "--lab", str(lab.root), env={"MAILREC_NOW": "2026-11-29T09:00:00Z"})
    assert result.exit_code == EXIT_PENDING, result.stderr


def test_lab_option_on_a_directory_that_is_not_a_lab(lab: LabLayout, tmp_path: Path) -> None:
    not_a_lab = tmp_path / "empty"
    not_a_lab.mkdir()
    result = run_cli("plan", "--lab", str(not_a_lab), "--state", str(lab.root / "state"))
    assert result.exit_code == EXIT_ERROR
    assert "not a mailrec lab" in result.stderr
    assert list(not_a_lab.iterdir()) == [], "nothing written into it"
    env_result = run_cli("status", "--state", str(lab.root / "state"),
                         env={"MAILREC_LAB": str(not_a_lab)})
    assert env_result.exit_code == EXIT_ERROR


def test_status_json(lab: LabLayout) -> None:
    result = run_cli("status", "--lab", str(lab.root), "--format", "json")
    assert result.exit_code == EXIT_PENDING
    status = json.loads(result.output)
    assert status["format_version"] == 1 and status["in_sync"] is False
    rows = {r["resource"]: r for r in status["resources"]}
    assert rows["router/filter/10"]["status"] == "pending"
    assert rows["user/suga"]["status"] == "in sync"
    assert {"resource", "status", "detail"} == set(rows["dns/mx"])
    assert run_cli("apply", "--lab", str(lab.root), "--yes").exit_code == EXIT_OK
    synced = run_cli("status", "--lab", str(lab.root), "--format", "json")
    assert synced.exit_code == EXIT_OK
    assert json.loads(synced.output)["in_sync"] is True


# --- a PR plan from git -----------------------------------------------------------------


def test_plan_git_base_head_shows_the_head_commit(lab: LabLayout, tmp_path: Path) -> None:
    work = tmp_path / "repo"
    shutil.copytree(lab.root / "state", work / "state")
    repo = git.Repo.init(work)
    author = git.Actor("mailrec test", "test@example.co.jp")
    repo.index.add(["state/mailrec.yaml", "state/users.yaml"])
    repo.index.commit("before", author=author, committer=author)
    users = work / "state" / "users.yaml"
    original = users.read_text()
    set_users(work / "state", suga=("rental", "onprem"))
    repo.index.add(["state/users.yaml"])
    repo.index.commit("move suga inbound", author=author, committer=author)
    users.write_text(original)  # the working tree is not what the PR plans

    args = ("plan", "--lab", str(lab.root), "--state", str(work / "state"))
    working = run_cli(*args, "--format", "json")
    assert "inbound/suga" not in step_ids(json.loads(working.output))
    pr = run_cli(*args, "--git-base", "HEAD~1", "--git-head", "HEAD", "--format", "json")
    assert pr.exit_code == EXIT_PENDING, pr.stderr
    review = json.loads(pr.output)
    # What the head adds compared with the base, both planned against the same lab.
    assert {"mailbox/suga", "inbound/suga"} <= {c["id"] for c in review["added"]}
    assert review["removed"] == [] and review["introduced"] == []
    assert review["head_plan"]["source"] == repo.head.commit.hexsha
    markdown = run_cli(*args, "--git-base", "HEAD~1", "--git-head", "HEAD",
                       "--format", "markdown")
    assert "(HEAD~1 → HEAD)" in markdown.output
    bad_ref = run_cli(*args, "--git-base", "HEAD", "--git-head", "no-such-ref")
    assert bad_ref.exit_code == EXIT_ERROR


# --- the real entry point ---------------------------------------------------------------


def test_python_m_reconciler_help() -> None:
    result = subprocess.run([sys.executable, "-m", "reconciler", "--help"],
                            capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    for command in ("validate", "plan", "apply", "status", "ack", "schema", "lab"):
        assert command in result.stdout


def test_rental_plugin_that_does_not_import_is_exit_1_before_connecting(tmp_path: Path) -> None:
    """Issue 3's bad input through the real CLI (no --lab): the plug-in's import error is
    named, exit 1, and no host is contacted (onprem points at a closed loopback port)."""
    state = tmp_path / "state"
    state.mkdir()
    text = (REPO / "state" / "mailrec.yaml").read_text()
    text = text.replace("provider: manual ", "provider: no_such_module_xyz:Provider ")
    text = text.replace("ssh://root@mail.example.co.jp:22", "ssh://root@127.0.0.9:1")
    (state / "mailrec.yaml").write_text(text)
    (state / "users.yaml").write_text((REPO / "state" / "users.yaml").read_text())
    result = run_cli("plan", "--state", str(state), env={"MAILREC_LAB": ""})
    assert result.exit_code == EXIT_ERROR
    assert "no_such_module_xyz" in result.stderr
    assert not (state / ".mailrec").exists()


# --- lab init --force only replaces a lab (issue "fail closed", finding 10) ------------------


def _lab_init(directory: Path, *extra: str) -> Any:
    return run_cli("lab", "init", str(directory), "--state", str(REPO / "state"), *extra,
                   env={"MAILREC_NOW": "2026-11-29T09:00:00+00:00"})


def test_lab_init_force_refuses_a_directory_that_is_not_a_lab(tmp_path: Path) -> None:
    precious = tmp_path / "home"
    (precious / "docs").mkdir(parents=True)
    (precious / "docs" / "thesis.txt").write_text("years of work\n")
    (precious / "lab.json").write_text("{}\n")  # looks like a lab, but `lab init` never made it
    before = tree_digest(precious)
    for extra in ((), ("--force",)):
        result = _lab_init(precious, *extra)
        assert result.exit_code == EXIT_ERROR, result.output
        assert tree_digest(precious) == before, "nothing deleted or written"
    assert "exists and is not a lab" in _lab_init(precious).stderr
    forced = _lab_init(precious, "--force")
    assert ".mailrec-lab marker" in forced.stderr and "nothing was deleted" in forced.stderr
    a_file = tmp_path / "file"
    a_file.write_text("x\n")
    result = _lab_init(a_file, "--force")
    assert result.exit_code == EXIT_ERROR and "not a directory" in result.stderr
    assert a_file.read_text() == "x\n"


def test_lab_init_force_replaces_a_lab_and_empty_dirs_need_no_force(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _lab_init(empty).exit_code == EXIT_OK
    layout = LabLayout(empty.resolve())
    assert layout.is_marked() and layout.exists()
    (empty / "scratch.txt").write_text("left over\n")
    again = _lab_init(empty)
    assert again.exit_code == EXIT_ERROR and "already a lab (use --force" in again.stderr
    assert (empty / "scratch.txt").exists()
    assert _lab_init(empty, "--force").exit_code == EXIT_OK
    assert not (empty / "scratch.txt").exists() and layout.is_marked()
    assert _lab_init(tmp_path / "new" / "lab").exit_code == EXIT_OK


# --- plan --out writes through a private temporary file (finding 11) --------------------------


def test_plan_out_never_follows_a_planted_symlink(lab: LabLayout, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("do not touch\n")
    saved = out_dir / "plan.json"
    (out_dir / ".plan.json.tmp").symlink_to(victim)  # the old predictable name
    result = run_cli("plan", "--lab", str(lab.root), "--format", "json", "--out", str(saved))
    assert result.exit_code == EXIT_PENDING, result.stderr
    assert victim.read_text() == "do not touch\n"
    assert not saved.is_symlink() and json.loads(saved.read_text())["format_version"] == 1
    # A symlink at the target itself is replaced by the plan, not written through.
    saved.unlink()
    saved.symlink_to(victim)
    result = run_cli("plan", "--lab", str(lab.root), "--format", "json", "--out", str(saved))
    assert result.exit_code == EXIT_PENDING, result.stderr
    assert victim.read_text() == "do not touch\n"
    assert not saved.is_symlink() and json.loads(saved.read_text())["format_version"] == 1
    assert sorted(p.name for p in out_dir.iterdir()) == [".plan.json.tmp", "plan.json"], (
        "no temporary file left behind")
    umask = os.umask(0)
    os.umask(umask)
    assert saved.stat().st_mode & 0o777 == 0o666 & ~umask


def test_plan_out_into_a_missing_directory_is_an_error(lab: LabLayout, tmp_path: Path) -> None:
    result = run_cli("plan", "--lab", str(lab.root), "--out", str(tmp_path / "no" / "plan.txt"))
    assert result.exit_code == EXIT_ERROR
    assert "cannot write" in result.stderr


def test_plan_timings_go_to_stderr_and_leave_the_plan_unchanged(lab: LabLayout) -> None:
    plain = run_cli("plan", "--lab", str(lab.root))
    timed = run_cli("plan", "--lab", str(lab.root), "--timings")
    assert timed.exit_code == plain.exit_code == 2
    assert timed.output == plain.output
    systems = [line.split()[0] for line in timed.stderr.splitlines()[1:]]
    assert systems[:1] == ["read"] and systems[-2:] == ["plan", "render"]
    assert {"onprem", "rental", "dns", "router"} <= set(systems)


def test_plan_and_status_say_how_each_system_was_read(lab: LabLayout) -> None:
    """The provider mode is never silent: without `lab up`, a `manual` rental is read from
    the lab's files, and the plan says so (and how to probe it instead)."""
    text = run_cli("plan", "--lab", str(lab.root))
    observed = [line for line in text.output.splitlines() if line.startswith("observed: ")]
    assert len(observed) == 1
    assert "onprem: lab files" in observed[0]
    assert "the state names the manual provider" in observed[0]
    assert "mailrec lab up" in observed[0]
    systems = json.loads(run_cli("plan", "--lab", str(lab.root), "--format", "json").output)[
        "systems"]
    assert [s.split(":")[0] for s in systems] == ["onprem", "rental", "dns", "router"]
    status = json.loads(run_cli("status", "--lab", str(lab.root), "--format", "json").output)
    assert status["systems"] == systems
    markdown = run_cli("plan", "--lab", str(lab.root), "--format", "markdown").output
    assert "<sub>observed: onprem: lab files" in markdown
