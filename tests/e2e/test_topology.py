"""The e2e topology on real daemons (tests/e2e/topology.py): it starts, mailrec validates and
plans against every part of it, outside mail reaches every address form, a POP client drains a
mailbox, the router answers which office line SMTP leaves by, and stop() leaves nothing behind.

Under CI=true a service that cannot run fails these tests (tests/integration/services.py).
"""

from __future__ import annotations

import json
import os
import pwd
import smtplib
import subprocess
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session

from reconciler.drivers.rental.base import ProviderContext
from reconciler.drivers.rental.ssh import SshProvider
from reconciler.load import load_state
from tests.conftest import run_cli
from tests.e2e import net
from tests.e2e.topology import (
    FIXED_PORTS,
    SMTP_FILTER,
    Topology,
    office_source_address,
    start_topology,
    write_state,
)
from tests.integration.services import (
    ensure_loopback_address,
    port_open,
    start_or_unavailable,
)

pytestmark = pytest.mark.integration

USERS = 4


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    directory = tmp_path_factory.mktemp("e2e-topology")
    topo = start_or_unavailable(lambda: start_topology(directory, users=USERS))
    try:
        yield topo
    finally:
        topo.stop()


@pytest.fixture(scope="module")
def state(topology: Topology, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_state(topology, tmp_path_factory.mktemp("e2e-state"))


def send(to: str, e2e_id: str, *, host: str = net.ONPREM) -> None:
    """One message from the Internet's senders to host's SMTP; raises unless accepted."""
    ensure_loopback_address(net.OUTSIDE_SENDERS)
    message = EmailMessage()
    message["From"] = f"customer@{net.INTERNET_DOMAIN}"
    message["To"] = to
    message["Subject"] = e2e_id
    message[net.E2E_ID_HEADER] = e2e_id
    message.set_content(f"{e2e_id}\n")
    with smtplib.SMTP(host, net.SMTP_PORT, timeout=15,
                      source_address=(net.OUTSIDE_SENDERS, 0)) as smtp:
        smtp.send_message(message, from_addr=f"customer@{net.INTERNET_DOMAIN}", to_addrs=[to])


def holders(directories: dict[str, Path], e2e_id: str) -> set[str]:
    """Which of the named Maildirs (new/ and cur/) hold a message with `e2e_id`."""
    header = f"{net.E2E_ID_HEADER}: {e2e_id}".encode()
    found = set()
    for name, maildir in directories.items():
        for sub in ("new", "cur"):
            folder = maildir / sub
            if folder.is_dir() and any(header in p.read_bytes() for p in folder.iterdir()):
                found.add(name)
    return found


def wait_for_holders(directories: dict[str, Path], e2e_id: str, want: set[str],
                     timeout: float = 20) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = holders(directories, e2e_id)
        if got >= want:
            time.sleep(0.3)  # a stray copy elsewhere would show now
            return holders(directories, e2e_id)
        time.sleep(0.1)
    return holders(directories, e2e_id)


def test_topology_starts_every_part(topology: Topology) -> None:
    assert len(topology.users) == USERS
    for address, port in [*FIXED_PORTS, (topology.dns.address, topology.dns.port)]:
        assert port_open(address, port), f"{address}:{port}"
    for user in topology.users:
        assert len(topology.seeded[user]) >= 1
        assert holders({user: topology.maildir(user)}, topology.seeded[user][0]) == {user}
    assert topology.started_in < 60


def test_mailrec_validate_passes(topology: Topology, state: Path) -> None:
    result = run_cli("validate", "--state", str(state), env=topology.mailrec_env())
    assert result.exit_code == 0, result.output + result.stderr
    loaded = load_state(state).state
    assert loaded.rental.provider == "ssh" and loaded.router is not None
    assert sorted(loaded.aliases) == sorted(topology.aliases())


def test_mailrec_plan_reads_every_real_part(topology: Topology, state: Path) -> None:
    """exit 2: the policy route and the SPF for line A are wanted, and the aliases at the
    rental; every system was read (no error, no refusal)."""
    result = run_cli("plan", "--state", str(state), "--format", "json",
                     env=topology.mailrec_env())
    assert result.exit_code == 2, result.output + result.stderr
    plan = json.loads(result.output)
    steps = {s["id"]: s["status"] for s in plan["steps"]}
    assert steps == {
        "dns/spf": "ready", f"router/filter/{SMTP_FILTER}": "ready",
        "router/route/default": "ready", "alias/info": "ready", "alias/sales": "ready",
        "alias/team": "ready",
    }, steps
    codes = {f["code"] for f in plan["findings"]}
    assert codes <= {"MR019"}, plan["findings"]
    systems = " ".join(plan["systems"])
    for part in ("Postfix over SSH", "ssh provider", "RFC 2136", "RTX over SSH"):
        assert part in systems, systems
    assert "error" not in result.stderr.lower(), result.stderr


def test_outside_mail_reaches_every_address_form(topology: Topology) -> None:
    maildirs = {user: topology.maildir(user) for user in topology.users}
    expansions = topology.alias_expansions()
    assert {"info", "team", "sales"} <= {a.split("@")[0] for a in expansions}
    assert any("+" in address for address in expansions)
    for number, (address, users) in enumerate(sorted(expansions.items())):
        e2e_id = f"topology-form-{number}"
        send(address, e2e_id)
        assert wait_for_holders(maildirs, e2e_id, set(users)) == set(users), address
    assert topology.onprem_postfix.run("postqueue", "-j").stdout == ""  # nothing queued


def test_rental_mailbox_made_by_mailrec_receives_and_reads_over_imap(
    topology: Topology, state: Path
) -> None:
    """The rental as mailrec's ssh provider manages it: a mailbox it creates receives over
    SMTP and reads over IMAP with the password it left."""
    user = topology.users[-1]
    loaded = load_state(state).state
    provider = SshProvider(loaded.rental, ProviderContext(domain=net.DOMAIN))
    try:
        provider.create_mailbox(user)
    finally:
        provider.close()
    send(f"{user}@{net.DOMAIN}", "topology-rental-1", host=net.RENTAL)
    directories = {user: topology.rental_maildir(user)}
    assert wait_for_holders(directories, "topology-rental-1", {user}) == {user}
    messages = topology.imap_read(user)
    assert any(b"topology-rental-1" in m for m in messages)


class Collector:
    """An aiosmtpd handler keeping (peer address, rcpts, data) of every message."""

    def __init__(self) -> None:
        self.got: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: object, session: Session, envelope: Envelope) -> str:
        peer: object = session.peer
        address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        self.got.append((address, list(envelope.rcpt_tos),
                         bytes(envelope.original_content or b"")))
        return "250 OK"


def test_outbound_mail_leaves_for_the_internet_mx_from_each_servers_address(
    topology: Topology,
) -> None:
    """Onprem and the rental send example.net's mail to [INTERNET_MX]:SMTP_PORT from their own
    address (SPF sees them so); the rental relays for a whitelisted office line only."""
    handler = Collector()
    controller = Controller(handler, hostname=net.INTERNET_MX, port=net.SMTP_PORT)
    controller.start()
    try:
        with smtplib.SMTP(net.ONPREM, net.SMTP_PORT, timeout=15,
                          source_address=(net.OFFICE_LINE_B, 0)) as smtp:  # mynetworks
            smtp.sendmail(f"{topology.users[0]}@{net.DOMAIN}", [f"a@{net.INTERNET_DOMAIN}"],
                          f"{net.E2E_ID_HEADER}: topology-out-onprem\r\n\r\nhi\r\n")
        with smtplib.SMTP(net.RENTAL, net.SMTP_PORT, timeout=15,
                          source_address=(net.OFFICE_LINE_A, 0)) as smtp:
            smtp.ehlo()
            smtp.mail(f"{topology.users[0]}@{net.DOMAIN}")
            code, _ = smtp.rcpt(f"a@{net.INTERNET_DOMAIN}")
            assert code == 554  # not whitelisted yet: refused for good
        whitelist = topology.rental.config_dir / "mynetworks"
        whitelist.write_text(f"{net.OFFICE_LINE_A}/32\n")
        topology.rental.postfix.run("postfix", "reload")
        try:
            with smtplib.SMTP(net.RENTAL, net.SMTP_PORT, timeout=15,
                              source_address=(net.OFFICE_LINE_A, 0)) as smtp:
                smtp.sendmail(f"{topology.users[0]}@{net.DOMAIN}", [f"b@{net.INTERNET_DOMAIN}"],
                              f"{net.E2E_ID_HEADER}: topology-out-rental\r\n\r\nhi\r\n")
        finally:
            whitelist.write_text("")
            topology.rental.postfix.run("postfix", "reload")
        deadline = time.monotonic() + 20
        while len(handler.got) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        controller.stop()
    by_id = {next((i for i in ("topology-out-onprem", "topology-out-rental")
                   if i.encode() in data), "?"): peer for peer, _, data in handler.got}
    assert by_id == {"topology-out-onprem": net.ONPREM, "topology-out-rental": net.RENTAL}, (
        handler.got)


def test_pop_drain_empties_the_onprem_mailbox(topology: Topology, tmp_path: Path) -> None:
    user = topology.users[-1]
    send(f"{user}@{net.DOMAIN}", "topology-pop-1")
    maildir = topology.maildir(user)
    assert wait_for_holders({user: maildir}, "topology-pop-1", {user}) == {user}
    saved = topology.pop_drain(user, tmp_path / "store")
    text = b"".join(path.read_bytes() for path in saved)
    for e2e_id in [*topology.seeded[user], "topology-pop-1"]:
        assert f"{net.E2E_ID_HEADER}: {e2e_id}".encode() in text
    assert not [p for sub in ("new", "cur") for p in (maildir / sub).iterdir()]
    assert topology.pop_drain(user, tmp_path / "again") == []


def test_office_source_address_follows_the_routers_running_config(topology: Topology) -> None:
    assert office_source_address(topology) == net.OFFICE_LINE_B
    driver = topology.router_driver()
    driver.apply([f"ip filter {SMTP_FILTER} pass * * tcp * smtp",
                  f"ip route default gateway 192.168.0.254 filter {SMTP_FILTER} "
                  "gateway tunnel 2"])
    try:
        assert office_source_address(topology) == net.OFFICE_LINE_A
    finally:
        driver.apply(["ip route default gateway tunnel 2", f"no ip filter {SMTP_FILTER}"])
    assert office_source_address(topology) == net.OFFICE_LINE_B


def test_stop_leaves_no_process_and_no_user(topology: Topology) -> None:
    """Runs last: stops the module's topology (the fixture's stop is then a no-op)."""
    users = list(topology.users)
    pids = [topology.router.process.pid, topology.dns.process.pid,
            topology.onprem_dovecot.process.pid, topology.rental.dovecot.process.pid,
            topology.onprem_sshd.process.pid, topology.rental_sshd.process.pid]
    masters = [p.master_pid() for p in topology.postfixes.values()]
    assert None not in masters
    started = time.monotonic()
    topology.stop()
    took = time.monotonic() - started
    topology.stop()  # idempotent
    for pid in [*pids, *(m for m in masters if m is not None)]:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), pid
    for user in users:
        with pytest.raises(KeyError):
            pwd.getpwnam(user)
        assert not Path(f"/home/{user}").exists()
    leftovers = subprocess.run(["pgrep", "-f", str(topology.dir)], capture_output=True,
                               text=True, check=False).stdout.split()
    assert [pid for pid in leftovers if int(pid) != os.getpid()] == []
    for address, port in [*FIXED_PORTS, (topology.dns.address, topology.dns.port)]:
        assert not port_open(address, port), f"{address}:{port}"
    assert not topology.dir.exists()
    assert took < 30


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True
