"""The non-lab backend end to end: `mailrec plan` and `mailrec apply` through the CLI against a
real Postfix over real sshd on 127.0.0.2 (tests/integration/onprem.py), a real BIND 9 on
127.0.0.4 (tests/dns_server.py) and the lab rental SMTP server on 127.0.0.3, probed by the
`manual` rental provider at `rental.smtp_host:relay_port`. One user's inbound moves, after a
probe message has gone from onprem's Postfix to the rental by the transport mailrec writes
(`onprem/forward-probe`, recorded in the journal); the other systems must stay untouched.
Under CI=true a missing service fails these tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.journal import Journal
from reconciler.lab.rental_smtp import read_log
from reconciler.load import load_state
from reconciler.target import target_dir
from tests.conftest import run_cli
from tests.dns_server import NamedServer, named_or_unavailable
from tests.integration.onprem import (
    DOMAIN,
    RENTAL_ADDRESS,
    OnpremStack,
    send,
    start_onprem_stack,
    wait_for,
)
from tests.integration.services import ServiceStack, make_base_dir, start_or_unavailable

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def onprem() -> Iterator[OnpremStack]:
    stack = ServiceStack()
    base = stack.add_dir(make_base_dir("mailrec-backend-"))
    try:
        yield start_or_unavailable(lambda: start_onprem_stack(stack, base))
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def named() -> Iterator[NamedServer]:
    with named_or_unavailable() as server:
        yield server


def write_state(directory: Path, onprem: OnpremStack, named: NamedServer,
                users: dict[str, str], *, dns_provider: str = "rfc2136") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    secret = directory / "tsig.secret"
    secret.write_text(named.secret + "\n")
    secret.chmod(0o600)
    lines = "".join(f"  {name}: {{inbound: {side}, outbound: onprem}}\n"
                    for name, side in users.items()) or "  {}\n"
    (directory / "mailrec.yaml").write_text(f"""\
version: 1
domain: {DOMAIN}
onprem:
  connect: {onprem.sshd.connect("root")}
  config_dir: {onprem.config_dir}
  mx_host: mail.example.co.jp.
  public_ip: 198.51.100.10
  mailbox: maildir:~/Maildir
  log_file: {onprem.postfix.maillog}
rental:
  provider: manual
  mx_host: example.sakura.ne.jp.
  smtp_host: {RENTAL_ADDRESS}
  relay_port: {onprem.rental.relay_port}
  spf: "include:_spf.example.sakura.ne.jp"
  whitelist: []
dns:
  provider: {dns_provider}
  server: {named.address}:{named.port}
  tsig: {{name: {named.key_name}, algorithm: {named.algorithm}, secret: "file:{secret}"}}
  mx: onprem
  ttl: 3600
  cutover_ttl: 300
users:
{lines}policy:
  max_change_pct: 50
  quiet_period: 48h
""")
    return directory


def ssh_env(onprem: OnpremStack, known_hosts: Path | None = None) -> dict[str, str]:
    return {
        "MAILREC_KNOWN_HOSTS": str(known_hosts or onprem.sshd.known_hosts),
        "MAILREC_SSH_KEY": str(onprem.sshd.client_key),
        "MAILREC_LAB": "",
        "MAILREC_NOW": "",
    }


def probes_at_rental(onprem: OnpremStack) -> list[dict[str, object]]:
    """The RCPTs of forward probes the lab rental SMTP server answered (it knows no such
    mailbox: 550, which proves the path as well as a delivery)."""
    return [entry for entry in read_log(onprem.rental_lab.root)
            if entry["event"] == "rcpt" and entry["rcpt"] == f"mailrec-probe@{DOMAIN}"]


def assert_probed(onprem: OnpremStack, state: Path, output: str, before: int,
                  first_move: str) -> None:
    """The forward probe really ran, before the first inbound move: the rental's SMTP
    answered a new probe, the journal records the target the transport entries use, and no
    probe entry or message is left onprem."""
    target = f"smtp:[{RENTAL_ADDRESS}]:{onprem.rental.relay_port}"
    lines = output.splitlines()
    applied = [i for i, line in enumerate(lines) if "applied onprem/forward-probe" in line]
    moved = [i for i, line in enumerate(lines) if f"applied {first_move}" in line]
    assert applied and moved and applied[0] < moved[0], output
    answered = probes_at_rental(onprem)[before:]
    assert len(answered) == 1 and answered[0]["mail_from"] == "", answered
    journal = Journal.existing(target_dir(load_state(state).state, None))
    assert journal is not None
    try:
        event = journal.last("onprem/forward-probe")
        assert event is not None and event.detail.get("target") == target, event
        moved_at = journal.last(first_move)
        assert moved_at is not None and event.at <= moved_at.at
    finally:
        journal.close()
    transport = onprem.config_dir / "mailrec_transport"
    assert "mailrec-probe@" not in transport.read_text()
    assert "mailrec-probe@" not in onprem.postfix.run("postmap", "-s", f"hash:{transport}").stdout


def zone_snapshot(named: NamedServer) -> tuple[tuple[str, ...], ...]:
    """The apex's SOA (serial included), MX and TXT records, order-free with their TTLs."""
    snapshot = []
    for kind in ("SOA", "MX", "TXT"):
        rrset = named.query(kind)
        assert rrset is not None
        snapshot.append((str(rrset.ttl), *sorted(r.to_text() for r in rrset)))
    return tuple(snapshot)


def test_one_inbound_move_end_to_end(
    onprem: OnpremStack, named: NamedServer, tmp_path: Path
) -> None:
    moving, *staying = onprem.users.create(4)
    onprem.add_rental_mailbox(moving)
    users = {moving: "rental", **dict.fromkeys(staying, "onprem")}
    state = write_state(tmp_path / "state", onprem, named, users)
    env = ssh_env(onprem)
    zone = zone_snapshot(named)

    planned = run_cli("plan", "--state", str(state), "--format", "json", env=env)
    assert planned.exit_code == 2, planned.stderr
    plan = json.loads(planned.output)["steps"]
    steps = {s["id"]: s["status"] for s in plan}
    assert steps == {
        "onprem/recipient-maps": "ready",
        "onprem/forward-probe": "ready",
        f"inbound/{moving}": "ready",
        f"onprem-mailbox/{moving}": "ready",
    }
    order = [s["id"] for s in plan]
    assert order.index("onprem/forward-probe") < order.index(f"inbound/{moving}")

    before = len(probes_at_rental(onprem))
    applied = run_cli("apply", "--state", str(state), "--yes", env=env)
    assert applied.exit_code in (0, 2), applied.output + applied.stderr
    for step in steps:
        assert f"applied {step}" in applied.output
    assert_probed(onprem, state, applied.output, before, f"inbound/{moving}")
    dump = onprem.postfix.run(
        "postmap", "-s", f"hash:{onprem.config_dir / 'mailrec_transport'}"
    ).stdout
    assert f"{moving}@{DOMAIN}\tsmtp:[{RENTAL_ADDRESS}]:{onprem.rental.relay_port}" in dump
    assert all(user not in dump for user in staying)
    assert zone_snapshot(named) == zone  # nothing to change in DNS: not even the serial

    again = run_cli("plan", "--state", str(state), env=env)
    assert again.exit_code == 0, again.output + again.stderr
    assert "forward-probe" not in again.output  # recorded: not probed again
    onprem.wait_for_empty_queue()  # the probe left nothing behind
    # What the plan promised, mail shows: accepted onprem, delivered at the rental.
    assert send(onprem, f"{moving}@{DOMAIN}", "cli-moved")[0] == 250
    wait_for([onprem.rental_maildir(moving)], "cli-moved")


def test_unknown_host_key_is_an_error_naming_the_host(
    onprem: OnpremStack, named: NamedServer, tmp_path: Path
) -> None:
    state = write_state(tmp_path / "state", onprem, named, {})
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    result = run_cli("plan", "--state", str(state), env=ssh_env(onprem, empty))
    assert result.exit_code == 1
    assert f"onprem host {onprem.sshd.connect('root')}" in result.stderr
    assert "not in" in result.stderr and "ssh-keyscan" in result.stderr


def test_lab_dns_outside_a_lab_is_an_error(
    onprem: OnpremStack, named: NamedServer, tmp_path: Path
) -> None:
    state = write_state(tmp_path / "state", onprem, named, {}, dns_provider="lab")
    result = run_cli("plan", "--state", str(state), env=ssh_env(onprem))
    assert result.exit_code == 1
    assert "dns.provider lab" in result.stderr and "--lab" in result.stderr


def test_drift_in_mailrecs_own_map_is_seen_and_repaired_on_real_postfix(
    onprem: OnpremStack, named: NamedServer, tmp_path: Path
) -> None:
    """A hand edit turns a forwarded user's transport entry into `error:` (mail would bounce):
    drift (MR018), planned as the repair of `inbound/<user>`, and after apply real mail
    reaches the rental again. (A changed rental host or port is the same drift: see
    tests/test_fail_closed.py on the lab.)"""
    moving, staying = onprem.users.create(2)
    onprem.add_rental_mailbox(moving)
    state = write_state(tmp_path / "state", onprem, named, {moving: "rental", staying: "onprem"})
    env = ssh_env(onprem)
    # Other tests on this host moved users before, without this state's journal: outbound
    # settings no ack records are unknown, so plans say exit 3 (MR002) while still applying
    # what makes nothing worse. What matters here is what is applied and what mail does.
    before = len(probes_at_rental(onprem))
    applied = run_cli("apply", "--state", str(state), "--yes", env=env)
    assert f"applied inbound/{moving}" in applied.output, applied.output + applied.stderr
    assert_probed(onprem, state, applied.output, before, f"inbound/{moving}")
    target = f"smtp:[{RENTAL_ADDRESS}]:{onprem.rental.relay_port}"
    transport = onprem.config_dir / "mailrec_transport"
    transport.write_text(transport.read_text().replace(target, "error:5.1.1 gone by hand"))
    onprem.postfix.run("postmap", f"hash:{transport}")

    planned = run_cli("plan", "--state", str(state), "--format", "json", env=env)
    assert planned.exit_code == 3, planned.output + planned.stderr
    plan = json.loads(planned.output)
    assert {s["id"]: s["status"] for s in plan["steps"]}[f"inbound/{moving}"] == "ready"
    assert any(f["code"] == "MR018" and moving in f["message"] for f in plan["findings"])

    applied = run_cli("apply", "--state", str(state), "--yes", env=env)
    assert f"applied inbound/{moving}" in applied.output, applied.output + applied.stderr
    dump = onprem.postfix.run("postmap", "-s", f"hash:{transport}").stdout
    assert f"{moving}@{DOMAIN}\t{target}" in dump
    assert send(onprem, f"{moving}@{DOMAIN}", "drift-repaired")[0] == 250
    wait_for([onprem.rental_maildir(moving)], "drift-repaired")


def test_plan_timings_show_round_trips_per_host_that_do_not_grow_with_users(
    onprem: OnpremStack, named: NamedServer, tmp_path: Path
) -> None:
    import re

    few = onprem.users.create(2)
    more = [*few, *onprem.users.create(6)]
    counts = []
    for users in (few, more):
        state = write_state(tmp_path / f"state-{len(users)}", onprem, named,
                            dict.fromkeys(users, "onprem"))
        planned = run_cli("plan", "--state", str(state), "--timings", env=ssh_env(onprem))
        # (Users other tests moved are not in this state: the plan may refuse; the timings
        # are what is looked at here.)
        assert planned.exit_code in (0, 2, 3), planned.stderr
        assert "timings:" not in planned.output  # stdout is the plan alone
        line = next(line for line in planned.stderr.splitlines()
                    if line.strip().startswith("onprem"))
        found = re.search(r"(\d+) round trip", line)
        assert found is not None, planned.stderr
        counts.append(int(found.group(1)))
    assert counts[0] == counts[1] > 0, counts


def test_a_world_snapshot_of_real_systems_holds_no_secret_and_plans_the_same_offline(
    onprem: OnpremStack, named: NamedServer, tmp_path: Path
) -> None:
    """status --format json over real sshd + Postfix and BIND with TSIG: its snapshot holds
    neither the TSIG secret nor the SSH key, and planned offline (the TSIG file and the SSH
    settings gone, as on a PR's CI runner) it gives the live plan, checksum included."""
    moving, *staying = onprem.users.create(3)
    onprem.add_rental_mailbox(moving)
    users = {moving: "rental", **dict.fromkeys(staying, "onprem")}
    state = write_state(tmp_path / "state", onprem, named, users)
    env = ssh_env(onprem)
    status = run_cli("status", "--state", str(state), "--format", "json", env=env)
    # 3 too: the module's earlier tests leave accounts this state does not list (MR015).
    assert status.exit_code in (2, 3), status.stderr
    assert named.secret not in status.output
    key = Path(env["MAILREC_SSH_KEY"]).read_text()
    assert key.strip().splitlines()[1] not in status.output
    live_run = run_cli("plan", "--state", str(state), "--format", "json", env=env)
    live = json.loads(live_run.output)
    world = tmp_path / "world.json"
    world.write_text(status.output)
    (state / "tsig.secret").unlink()
    offline_env = {"MAILREC_KNOWN_HOSTS": "/nonexistent", "MAILREC_SSH_KEY": "/nonexistent",
                   "MAILREC_LAB": "", "MAILREC_NOW": ""}
    offline = run_cli("plan", "--state", str(state), "--format", "json", "--world",
                      str(world), env=offline_env)
    assert offline.exit_code == live_run.exit_code, offline.stderr
    planned = json.loads(offline.output)
    assert f"inbound/{moving}" in {step["id"] for step in planned["steps"]}
    assert planned["steps"] == live["steps"]
    assert planned["findings"] == live["findings"]
    assert planned["checksum"] == live["checksum"]
    assert "Postfix over SSH" in " ".join(planned["systems"])
