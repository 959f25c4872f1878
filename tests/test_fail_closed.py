"""Regression tests for the "fail closed" findings, each reproduced on the lab through the
command line as an admin would meet it: where the world already breaks a rule, where the
journal is missing, where a fact was declared rather than observed, mailrec waits, refuses
or says "not verified", and changes nothing it must not.

The numbers are those of the findings in the issue (and docs/guarantees.md)."""

from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.postfix import parse_map
from reconciler.journal import Journal
from reconciler.lab.init import init_lab
from reconciler.lab.layout import LabLayout
from reconciler.lab.services import start_services, stop_services
from reconciler.load import load_state

from .conftest import STATE, run_cli, set_users, tree_digest

NOW = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
USERS = ("suga", "tanaka", "sato", "suzuki", "takahashi", "watanabe", "ito", "yamamoto")
ZONE = "db.example.co.jp"


@pytest.fixture(autouse=True)
def lab_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """`lab init` stamps the lab's files (the last mail in onprem's log) with this time."""
    monkeypatch.setenv("MAILREC_NOW", NOW.isoformat())
    monkeypatch.delenv("MAILREC_LAB", raising=False)


def at(moment: datetime) -> dict[str, str]:
    return {"MAILREC_NOW": moment.isoformat(), "MAILREC_LAB": ""}


def edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


def make_lab(tmp_path: Path, *, inbound: str = "rental", outbound: str = "onprem",
             migrated: bool = True, onprem: tuple[str, ...] = (),
             **replacements: str) -> LabLayout:
    """A lab whose actual state equals the example state with every user at
    `inbound`/`outbound` (those in `onprem` entirely onprem) and the given text
    replacements in mailrec.yaml."""
    source = tmp_path / "state"
    shutil.copytree(STATE, source)
    set_users(source, **{name: ("onprem", "onprem") if name in onprem else (inbound, outbound)
                         for name in USERS})
    for old, new in replacements.items():
        edit(source / "mailrec.yaml", old.replace("__", " "), new)
    return init_lab(tmp_path / "lab", load_state(source), migrated=migrated, force=False)


def plan_json(lab: LabLayout, when: datetime = NOW) -> tuple[int, dict[str, Any]]:
    result = run_cli("plan", "--lab", str(lab.root), "--format", "json", env=at(when))
    assert result.stdout if hasattr(result, "stdout") else True
    return result.exit_code, json.loads(result.output)


def step(plan: dict[str, Any], step_id: str) -> dict[str, Any]:
    found = [s for s in plan["steps"] if s["id"] == step_id]
    assert found, f"{step_id} not planned: {[s['id'] for s in plan['steps']]}"
    return found[0]


def codes(entry: dict[str, Any]) -> set[str]:
    return {f["code"] for f in entry["findings"]}


def apply(lab: LabLayout, when: datetime = NOW, *extra: str) -> int:
    return run_cli("apply", "--lab", str(lab.root), "--yes", *extra, env=at(when)).exit_code


def zone(lab: LabLayout) -> str:
    return (lab.root / "dns" / ZONE).read_text()


def lab_state(lab: LabLayout) -> Path:
    return lab.root / "state" / "mailrec.yaml"


def record_lowering(lab: LabLayout, when: datetime, before: int) -> None:
    journal = Journal(lab.journal_dir)
    journal.record(when, "apply", "dns/mx-ttl", "ok",
                   detail={"before": before, "after": 300, "lowering": True})
    journal.close()


def lower_zone_ttl(lab: LabLayout, ttl: int = 300, *, spf: int | None = None) -> None:
    text = zone(lab)
    text = re.sub(r"^@   \d+ IN MX", f"@   {ttl} IN MX", text, flags=re.M)
    if spf is not None:
        text = re.sub(r'^@   \d+ IN TXT "v=spf1', f'@   {spf} IN TXT "v=spf1', text, flags=re.M)
    (lab.root / "dns" / ZONE).write_text(text)


# --- 1. a violation already present stops every step that would make it worse -------------


def test_1_mx_never_moves_to_a_rental_that_lacks_a_mailbox(tmp_path: Path) -> None:
    """A `manual` rental (the lab's SMTP server, probed by RCPT) has lost suga's mailbox;
    the TTL gate is long open. The MX waits for the person to create it, however long."""
    lab = make_lab(tmp_path)
    edit(lab.rental_mailboxes, "suga@example.co.jp\n", "")
    lower_zone_ttl(lab)
    record_lowering(lab, NOW - timedelta(days=2), 3600)
    edit(lab_state(lab), "  mx: onprem", "  mx: rental")
    start_services(lab)
    try:
        code, plan = plan_json(lab)
        assert code == 3
        mx = step(plan, "dns/mx")
        assert mx["status"] != "ready"
        assert "MR003" in codes(mx) and "suga" in json.dumps(mx["findings"])
        assert any(f["code"] == "MR001" and "suga" in f["message"] for f in plan["findings"])
        assert step(plan, "mailbox/suga")["gate"]["kind"] == "ack"
        assert apply(lab, NOW + timedelta(days=3)) == 3
    finally:
        stop_services(lab)
    assert "IN MX 10 mail.example.co.jp." in zone(lab)  # the MX did not move


def test_1_a_step_that_does_not_make_it_worse_still_runs(tmp_path: Path) -> None:
    """The world breaks MR001 for suga; moving tanaka back onprem is refused only if it
    made something worse, and creating suga's mailbox (the repair) is ready."""
    lab = make_lab(tmp_path)
    edit(lab.rental_mailboxes, "suga@example.co.jp\n", "")
    code, plan = plan_json(lab)
    assert code == 3  # the world is unsafe: said loudly
    assert step(plan, "mailbox/suga")["status"] == "ready"
    assert apply(lab) == 0
    assert "suga@example.co.jp" in lab.rental_mailboxes.read_text()


# --- 2. no open relay, no SPF that authorises everyone ----------------------------------


def test_2_an_open_relay_whitelist_is_refused_and_never_applied(tmp_path: Path) -> None:
    lab = make_lab(tmp_path)
    edit(lab_state(lab), "whitelist: []", 'whitelist: [0.0.0.0/0, "::/0"]')
    result = run_cli("validate", "--lab", str(lab.root), env=at(NOW))
    assert result.exit_code == 3 and "MR016" in result.stderr
    code, plan = plan_json(lab)
    assert code == 3
    for network in ("0.0.0.0/0", "::/0"):
        assert step(plan, f"whitelist/{network}")["status"] == "refused"
        assert "MR016" in codes(step(plan, f"whitelist/{network}"))
    before = lab.rental_whitelist.read_text()
    apply(lab)
    assert lab.rental_whitelist.read_text() == before


def test_2_an_spf_term_for_everyone_is_refused_and_never_written(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, **{'spf: "include:_spf.example.sakura.ne.jp"':
                                'spf: "ip4:0.0.0.0/0"'})
    set_users(lab.root / "state", suga=("rental", "rental"))
    result = run_cli("validate", "--lab", str(lab.root), env=at(NOW))
    assert result.exit_code == 3 and "MR017" in result.stderr
    code, plan = plan_json(lab)
    assert code == 3
    assert step(plan, "dns/spf")["status"] == "refused"
    assert "MR017" in codes(step(plan, "dns/spf"))
    apply(lab)
    assert "0.0.0.0/0" not in zone(lab)


# --- 3. retire waits from what was observed when the journal has no record --------------


def test_3_retire_without_a_record_of_the_mx_move_waits_from_the_first_sight(
        tmp_path: Path) -> None:
    lab = make_lab(tmp_path, outbound="rental", **{"whitelist: []": "whitelist: [203.0.113.8/29]",
                                                   "  mx: onprem": "  mx: rental"})
    assert "IN MX 10 example.sakura.ne.jp." in zone(lab)  # moved, but no journal says when
    edit(lab_state(lab), "  state: active", "  state: retired")

    _code, plan = plan_json(lab, NOW + timedelta(minutes=1))
    retire = step(plan, "onprem/retire")
    assert retire["status"] == "gated"
    assert retire["gate"]["kind"] == "observation"
    until = datetime.fromisoformat(retire["gate"]["until"])
    assert until >= NOW + timedelta(minutes=1) + timedelta(hours=48)

    assert apply(lab, NOW + timedelta(minutes=1)) == 2  # records the first sight, retires nothing
    assert not lab.onprem_retired.exists()
    # A day later the old TTL has passed, but the quiet period runs from the first sight.
    assert apply(lab, NOW + timedelta(days=1, minutes=2)) == 2
    assert not lab.onprem_retired.exists()
    assert apply(lab, NOW + timedelta(hours=48, minutes=2)) == 0
    assert lab.onprem_retired.exists()


def test_3_a_lost_journal_makes_outbound_unknown_and_retire_is_refused(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, outbound="rental", **{"whitelist: []": "whitelist: [203.0.113.8/29]",
                                                   "  mx: onprem": "  mx: rental"})
    edit(lab_state(lab), "  state: active", "  state: retired")
    shutil.rmtree(lab.journal_dir)  # the journal is gone
    _code, plan = plan_json(lab, NOW + timedelta(days=30))
    retire = step(plan, "onprem/retire")
    assert retire["status"] != "ready"
    assert "MR010" in codes(retire) and "unknown" in json.dumps(retire["findings"])
    assert any("unknown" in fact for fact in plan["not_verified"])
    assert step(plan, "outbound/suga")["gate"]["kind"] == "ack"  # a person confirms
    apply(lab, NOW + timedelta(days=30))
    assert not lab.onprem_retired.exists()


# --- 4. MR005 in both directions ---------------------------------------------------------


def _relaying_lab(tmp_path: Path) -> LabLayout:
    """Everyone receives at the rental and submits on port 25 through the whitelisted line,
    and the journal knows mailrec created filter 10."""
    lab = make_lab(tmp_path, outbound="rental",
                   **{"whitelist: []": "whitelist: [203.0.113.8/29]"})
    journal = Journal(lab.journal_dir)
    journal.record(NOW - timedelta(days=9), "apply", "router/filter/10", "ok",
                   detail={"filter": 10, "present": True})
    journal.close()
    code, _ = plan_json(lab)
    assert code == 0
    return lab


def test_4_removing_the_route_while_clients_relay_is_not_applied(tmp_path: Path) -> None:
    lab = _relaying_lab(tmp_path)
    text = lab_state(lab).read_text()
    start = text.index("  smtp_route:")
    end = text.index("policy:")
    lab_state(lab).write_text(text[:start] + "\n" + text[end:])
    _code, plan = plan_json(lab)
    route = step(plan, "router/route/default")
    assert route["status"] != "ready"
    assert "MR005" in codes(route)
    # Everyone must first move to submission with AUTH (a person changes each client).
    assert step(plan, "outbound/suga")["data"]["to"] == "submission"
    before = lab.router_config.read_text()
    apply(lab)
    assert lab.router_config.read_text() == before


def test_4_emptying_the_whitelist_while_clients_relay_is_refused(tmp_path: Path) -> None:
    lab = _relaying_lab(tmp_path)
    edit(lab_state(lab), "whitelist: [203.0.113.8/29]", "whitelist: []")
    code, plan = plan_json(lab)
    assert code == 3
    removal = step(plan, "whitelist/203.0.113.8/29")
    assert removal["status"] == "refused" and "MR005" in codes(removal)
    before = lab.rental_whitelist.read_text()
    apply(lab)
    assert lab.rental_whitelist.read_text() == before


# --- 5, 6, 7. the router: the gateway tcp/25 really takes, the admin's lines, MR014 -------


def test_5_mr005_judges_the_gateway_tcp25_really_leaves_through(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, **{"whitelist: []": "whitelist: [203.0.113.8/29]"})
    edit(lab.router_config,
         "ip route default gateway 192.168.0.254 filter 10 gateway tunnel 2\n",
         "ip route default gateway 192.0.2.1 filter 1 2 gateway 192.168.0.254 filter 10 "
         "gateway tunnel 2\n")
    edit(lab.router_config, "ip filter 10 pass",
         "ip filter 1 pass 192.168.0.0/24 * * * *\nip filter 2 reject * * udp * *\n"
         "ip filter 10 pass")
    set_users(lab.root / "state", suga=("rental", "rental"))
    _code, plan = plan_json(lab)
    outbound = step(plan, "outbound/suga")
    assert outbound["status"] == "refused"
    assert "MR005" in codes(outbound) and "192.0.2.1" in json.dumps(outbound["findings"])
    result = run_cli("ack", "outbound/suga", "--lab", str(lab.root), env=at(NOW))
    assert result.exit_code == 3


def _pre_migration_lab_with_route(tmp_path: Path, route: str, *filters: str) -> LabLayout:
    lab = make_lab(tmp_path, inbound="onprem", migrated=False)
    edit(lab.router_config, "ip route default gateway tunnel 2\n", route + "\n")
    edit(lab.router_config, "ip filter 1010 ", "".join(f + "\n" for f in filters)
         + "ip filter 1010 ")
    return lab


def test_6_the_route_step_keeps_the_admins_gateways(tmp_path: Path) -> None:
    lab = _pre_migration_lab_with_route(
        tmp_path, "ip route default gateway pp 1 filter 500 keepalive 1 gateway tunnel 2",
        "ip filter 500 pass * * udp * domain")
    before = lab.router_config.read_text().splitlines()
    _code, plan = plan_json(lab)
    assert step(plan, "router/route/default")["status"] == "ready"
    assert apply(lab) == 0
    after = lab.router_config.read_text().splitlines()
    assert ("ip route default gateway pp 1 filter 500 keepalive 1 gateway 192.168.0.254 "
            "filter 10 gateway tunnel 2") in after
    # Every other line is still there, in order.
    mine = {"ip filter 10 pass * * tcp * smtp"}
    kept = [line for line in after if line not in mine and not line.startswith("ip route default")]
    assert kept == [line for line in before if not line.startswith("ip route default")]


def test_6_an_admin_entry_that_catches_tcp25_first_refuses_the_route(tmp_path: Path) -> None:
    lab = _pre_migration_lab_with_route(
        tmp_path, "ip route default gateway pp 1 filter 500 gateway tunnel 2",
        "ip filter 500 pass * * tcp * *")
    before = lab.router_config.read_text()
    _code, plan = plan_json(lab)
    route = step(plan, "router/route/default")
    assert route["status"] == "refused"
    message = json.dumps(route["findings"])
    assert "MR005" in codes(route) and "pp 1 filter 500" in message
    apply(lab)
    assert "ip route default gateway pp 1 filter 500 gateway tunnel 2" in lab.router_config \
        .read_text()
    assert lab.router_config.read_text().count("ip filter 10 ") <= before.count("ip filter 10 ") \
        + 1


def test_7_an_admins_filter_with_the_same_number_is_never_overwritten(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, inbound="onprem", migrated=False)
    edit(lab.router_config, "ip filter 1010 ", "ip filter 10 reject * * tcp * telnet\n"
         "ip filter 1010 ")
    before = tree_digest(lab.root / "router")
    code, plan = plan_json(lab)
    assert code == 3
    refused = step(plan, "router/filter/10")
    assert refused["status"] == "refused"
    assert "MR014" in codes(refused)
    assert "ip filter 10 reject * * tcp * telnet" in json.dumps(refused["findings"])
    apply(lab)
    assert tree_digest(lab.root / "router") == before


def test_7_a_filter_number_an_interface_uses_is_refused_naming_the_line(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, inbound="onprem", migrated=False,
                   **{"filter: 10": "filter: 1010"})
    before = tree_digest(lab.root / "router")
    code, plan = plan_json(lab)
    assert code == 3
    findings = json.dumps(step(plan, "router/filter/1010")["findings"])
    assert "MR014" in findings and "secure filter" in findings
    apply(lab)
    assert tree_digest(lab.root / "router") == before


# --- 8. MR004 remembers the TTL it lowered from, and assumes the worst without it ----------


def test_8_the_mx_waits_for_the_ttl_it_was_lowered_from(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, **{"  ttl: 3600": "  ttl: 86400"})
    edit(lab_state(lab), "  mx: onprem", "  mx: rental")
    assert "86400 IN MX" in zone(lab)
    assert apply(lab) == 2  # lowers the TTL to 300 and records the 86400 it had
    assert "300 IN MX 10 mail.example.co.jp." in zone(lab)
    _code, plan = plan_json(lab, NOW + timedelta(hours=1, minutes=1))
    mx = step(plan, "dns/mx")
    assert mx["status"] == "gated"
    assert datetime.fromisoformat(mx["gate"]["until"]) >= NOW + timedelta(seconds=86400)
    assert apply(lab, NOW + timedelta(hours=1, minutes=1)) == 2
    assert "IN MX 10 mail.example.co.jp." in zone(lab)
    assert apply(lab, NOW + timedelta(days=1, minutes=1)) == 0
    assert "IN MX 10 example.sakura.ne.jp." in zone(lab)


def test_8_a_ttl_lowered_by_hand_waits_the_worst_case(tmp_path: Path) -> None:
    lab = make_lab(tmp_path)
    edit(lab_state(lab), "  mx: onprem", "  mx: rental")
    lower_zone_ttl(lab, 300, spf=300)  # by hand: nothing says what it was before
    _code, plan = plan_json(lab)
    mx = step(plan, "dns/mx")
    assert mx["status"] == "gated" and mx["gate"]["kind"] == "observation"
    assert apply(lab) == 2  # records when it first saw the lowered TTL
    assert apply(lab, NOW + timedelta(hours=2)) == 2
    assert "IN MX 10 mail.example.co.jp." in zone(lab)
    _code, plan = plan_json(lab, NOW + timedelta(hours=2))
    until = datetime.fromisoformat(step(plan, "dns/mx")["gate"]["until"])
    assert until >= NOW + timedelta(days=1)
    assert apply(lab, NOW + timedelta(days=1, minutes=1)) == 0
    assert "IN MX 10 example.sakura.ne.jp." in zone(lab)


# --- 9. drift in mailrec's own maps is seen and repaired ---------------------------------


def test_9_a_changed_rental_host_plans_the_repair_of_every_route(tmp_path: Path) -> None:
    lab = make_lab(tmp_path)
    assert plan_json(lab)[0] == 0
    edit(lab_state(lab), "smtp_host: example.sakura.ne.jp", "smtp_host: smtp2.sakura.ne.jp")
    code, plan = plan_json(lab)
    assert code == 3  # the world breaks MR018 until repaired: said loudly
    assert sum(f["code"] == "MR018" for f in plan["findings"]) == len(USERS)
    assert {s["id"] for s in plan["steps"]} >= {f"inbound/{n}" for n in USERS}
    assert apply(lab, NOW, "--allow-bulk") == 0
    transport = parse_map((lab.postfix_dir / "mailrec_transport").read_text())
    # Every user under every local name, all to the new host; nothing left on the old one.
    assert {k.split("@")[0] for k, v in transport.items()
            if v == "smtp:[smtp2.sakura.ne.jp]:25"} == set(USERS)
    assert set(transport.values()) == {"smtp:[smtp2.sakura.ne.jp]:25"}


def test_9_a_hand_edited_error_entry_is_drift_and_repaired(tmp_path: Path) -> None:
    lab = make_lab(tmp_path)
    transport = lab.postfix_dir / "mailrec_transport"
    edit(transport, "suga@example.co.jp smtp:[example.sakura.ne.jp]:25",
         "suga@example.co.jp error:5.1.1 gone")
    code, plan = plan_json(lab)
    assert code == 3
    assert step(plan, "inbound/suga")["status"] == "ready"
    assert any(f["code"] == "MR018" and "suga" in f["message"] for f in plan["findings"])
    assert apply(lab) == 0
    assert "suga@example.co.jp smtp:[example.sakura.ne.jp]:25" in transport.read_text()


# --- 11. smaller holes ----------------------------------------------------------------------


def test_11_ack_waits_for_no_one_it_takes_the_lock(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, **{"whitelist: []": "whitelist: [203.0.113.8/29]"})
    set_users(lab.root / "state", suga=("rental", "rental"))
    assert apply(lab) == 2  # SPF first: then only the person's change is left
    journal = Journal(lab.journal_dir)
    with journal.lock():
        result = run_cli("ack", "outbound/suga", "--lab", str(lab.root), env=at(NOW))
    journal.close()
    assert result.exit_code == 1 and "another mailrec apply is running" in result.stderr
    assert run_cli("ack", "outbound/suga", "--lab", str(lab.root), env=at(NOW)).exit_code == 0


def test_11_a_lost_journal_mid_migration_leaves_outbound_unknown(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, onprem=USERS[4:])
    shutil.rmtree(lab.journal_dir)
    code, plan = plan_json(lab)
    assert code == 3
    assert any(f["code"] == "MR002" for f in plan["findings"])
    assert step(plan, "outbound/suga")["data"]["to"] == "onprem"
    # Confirming moves nobody: it is never a bulk move, and it repairs MR002.
    assert "MR011" not in codes(step(plan, "outbound/suga"))
    result = run_cli("ack", "outbound/suga", "--lab", str(lab.root), "--note", "still onprem",
                     env=at(NOW))
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("command", [("plan",), ("status",), ("apply", "--yes")])
def test_mailrec_now_needs_a_lab_or_the_explicit_override(command: tuple[str, ...],
                                                         tmp_path: Path) -> None:
    result = run_cli(*command, "--state", str(STATE),
                     env={"MAILREC_NOW": NOW.isoformat(), "MAILREC_LAB": ""})
    assert result.exit_code == 1
    assert "--clock-override" in result.stderr


def test_clock_override_is_explicit_and_says_so() -> None:
    result = run_cli("--clock-override", "plan", "--state", str(STATE),
                     env={"MAILREC_NOW": NOW.isoformat(), "MAILREC_LAB": ""})
    assert "warning: --clock-override" in result.stderr
    assert NOW.isoformat() in result.stderr
    # It only moves the clock: the rest is as without it (here: no TSIG secret on this host).
    assert result.exit_code == 1 and "--clock-override" not in result.stderr.split("\n", 1)[1]
