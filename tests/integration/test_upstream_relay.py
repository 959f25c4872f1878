"""A DMZ relay in front of onprem, for real: a second Postfix on 127.0.0.4 relays
example.co.jp (`relay_domains`) by `transport_maps` to the onprem Postfix of
`start_onprem_stack` (127.0.0.2), and mailrec's `RelayReader` reads it over real SSH (the onprem
stack's sshd: the same machine, so the relay's config directory is reachable there). Mail
really flows through it; then onprem stops and the relay queues; then the relay is detached.
Each stage is fed to `observe.build_world` and the planner: onprem's retirement is refused
(MR010) while the relay routes or queues for onprem, and allowed once it is detached. Under
CI=true a missing service fails these tests.
"""

from __future__ import annotations

import json
import secrets
import smtplib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest

from reconciler.drivers.backend import SystemBackend
from reconciler.drivers.upstream import HopNames, RelayReader, UpstreamFacts, probe_relay
from reconciler.model import DesiredState
from reconciler.observe import JournalView, build_world, upstream_pending
from reconciler.world import Outbound, World
from tests.test_address_rules import FORWARD, facts, records, snapshot
from tests.test_properties import RENTAL_MX, START
from tests.test_safety_rules import codes, plan, state, world

from .onprem import (
    DOMAIN,
    ONPREM_ADDRESS,
    OnpremStack,
    free_port,
    local_maildir,
    start_onprem_stack,
    wait_for,
)
from .services import (
    Postfix,
    ServiceStack,
    ensure_loopback_address,
    make_base_dir,
    start_or_unavailable,
    start_postfix,
)

pytestmark = pytest.mark.integration

RELAY_ADDRESS = "127.0.0.4"
RELAY_HOST = "relay.example.co.jp."
CLIENT = "127.0.0.1"  # an Internet sender: outside the relay's mynetworks
RENTAL_SMTP = "example.sakura.ne.jp"


@dataclass
class Lab:
    onprem: OnpremStack
    relay: Postfix

    def reader(self) -> RelayReader:
        onprem = self.onprem.onprem()
        names = HopNames.of((onprem.mx_host, onprem.connect.host, str(onprem.public_ip)),
                            (RENTAL_SMTP, RENTAL_MX))
        return RelayReader(self.onprem.ssh(), RELAY_HOST, str(self.relay.config_dir), DOMAIN,
                           names=names)

    def probe(self) -> tuple[bool | None, str]:
        return probe_relay(RELAY_ADDRESS, self.relay.smtp_port, DOMAIN, source=CLIENT,
                           timeout=10)

    def queue(self) -> list[dict[str, object]]:
        out = self.relay.run("postqueue", "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def start_relay(base: Path, onprem: OnpremStack) -> Postfix:
    ensure_loopback_address(RELAY_ADDRESS)
    directory = base / "relay"
    config_dir = directory / "etc"  # start_postfix's layout
    return start_postfix(
        directory,
        address=RELAY_ADDRESS,
        smtp_port=free_port(RELAY_ADDRESS),
        myhostname=RELAY_HOST.rstrip("."),
        main_cf={
            "relay_domains": DOMAIN,
            "transport_maps": f"hash:{config_dir}/transport",
            "mynetworks": f"{RELAY_ADDRESS}/32",
            # A production relay: relay access denied (5xx) for a domain it does not relay.
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "queue_run_delay": "1s",
        },
        files={"transport": f"{DOMAIN} smtp:[{ONPREM_ADDRESS}]:{onprem.postfix.smtp_port}\n"},
        postmap=("transport",),
    )


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    stack = ServiceStack()
    base = stack.add_dir(make_base_dir("mailrec-upstream-"))
    try:
        onprem = start_or_unavailable(lambda: start_onprem_stack(stack, base))
        relay = stack.add(start_or_unavailable(lambda: start_relay(base, onprem)))
        yield Lab(onprem, relay)
    finally:
        stack.stop_all()


def send_through_relay(lab: Lab, rcpt: str, token: str) -> None:
    with smtplib.SMTP(RELAY_ADDRESS, lab.relay.smtp_port, timeout=15,
                      source_address=(CLIENT, 0)) as smtp:
        smtp.ehlo("client.example.net")
        smtp.sendmail("sender@example.net", [rcpt],
                      f"Subject: {token}\r\nTo: <{rcpt}>\r\n\r\n{token}\r\n".encode())


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# --- the planner's view of each stage ---------------------------------------------------------


def desired(lab: Lab) -> DesiredState:
    return state({"suga": ("rental", "rental")}, dns__mx="rental", onprem__state="retired",
                 onprem__connect=lab.onprem.sshd.connect("root"),
                 onprem__upstream=[{"host": RELAY_HOST,
                                    "connect": lab.onprem.sshd.connect("root"),
                                    "config_dir": str(lab.relay.config_dir),
                                    "smtp": f"{RELAY_ADDRESS}:{lab.relay.smtp_port}"}])


def world_with(desired_state: DesiredState, seen: UpstreamFacts) -> World:
    """Onprem and the rental ready for onprem to retire (every user moved, the MX at the
    rental for 9 days); only the relay decides."""
    view = JournalView({}, None, None, frozenset(), baseline=True)
    built = build_world(desired_state, postfix=facts(transport={"suga": FORWARD}),
                        rental=snapshot({"suga": 0}), dns=records(RENTAL_MX),
                        router=world({}).router, journal=view, now=START, upstream=[seen])
    built = replace(built, history=replace(built.history, mx_moved_at=START - timedelta(days=9)))
    return built.update_user("suga", outbound=Outbound.RELAY)


def retirement_blocked(desired_state: DesiredState, seen: UpstreamFacts) -> bool:
    observed = world_with(desired_state, seen)
    pending = upstream_pending(desired_state, JournalView({}, None, None, frozenset()), [seen])
    assert pending == observed.onprem.upstream_pending
    blocked = "MR010" in codes(plan(desired_state, observed), "onprem/retire")
    assert blocked == bool(pending), (pending, blocked)
    return blocked


def unread(desired_state: DesiredState, lab: Lab) -> tuple[bool, bool]:
    """The same relay declared without `connect`: probed, never read. Whether onprem's
    retirement waits (without an ack, with a person's ack)."""
    manual = desired_state.model_copy(deep=True)
    manual.onprem.upstream[0] = manual.onprem.upstream[0].model_copy(
        update={"connect": None, "smtp": f"{RELAY_ADDRESS}:{lab.relay.smtp_port}"})
    accepts, said = lab.probe()
    seen = UpstreamFacts(RELAY_HOST, False, None, None, accepts, said)
    acked = JournalView({}, None, None, frozenset({f"upstream/{RELAY_HOST}"}))
    return (bool(upstream_pending(manual, JournalView({}, None, None, frozenset()), [seen])),
            bool(upstream_pending(manual, acked, [seen])))


# --- the relay, stage by stage ----------------------------------------------------------------


def test_the_relay_routes_queues_then_is_detached(lab: Lab) -> None:
    desired_state = desired(lab)
    reader = lab.reader()
    try:
        # 1. Relaying to onprem: mail really flows relay -> onprem -> a local Maildir.
        user = lab.onprem.users.create(1)[0]
        token = f"via-relay-{secrets.token_hex(4)}"
        send_through_relay(lab, f"{user}@{DOMAIN}", token)
        wait_for([local_maildir(user)], token)
        seen = reader.read()
        assert (seen.observed, seen.routes_to_onprem, seen.queued) == (True, True, 0), seen
        assert f"next hop [{ONPREM_ADDRESS}]:{lab.onprem.postfix.smtp_port} is onprem" in (
            seen.detail)
        assert lab.probe()[0] is True  # it accepts the domain from the Internet
        assert retirement_blocked(desired_state, seen)
        # Unread, a person's ack is contradicted by the probe: still waiting.
        assert unread(desired_state, lab) == (True, True)

        # 2. Onprem stops: the relay defers the next message and holds it.
        lab.onprem.postfix.stop()
        token = f"queued-{secrets.token_hex(4)}"
        send_through_relay(lab, f"{user}@{DOMAIN}", token)
        wait_until("the message to be deferred",
                   lambda: [m["queue_name"] for m in lab.queue()] == ["deferred"])
        seen = reader.read()
        assert (seen.observed, seen.routes_to_onprem, seen.queued) == (True, True, 1), seen
        assert "(deferred 1)" in seen.detail
        assert retirement_blocked(desired_state, seen)

        # 3. Detached: the domain leaves relay_domains (the transport entry stays, as an
        # admin may leave it), the queue is flushed.
        lab.relay.run("postconf", "-e", "relay_domains=")
        lab.relay.run("postfix", "reload")
        lab.relay.run("postsuper", "-d", "ALL")
        seen = reader.read()
        assert (seen.observed, seen.routes_to_onprem, seen.queued) == (True, False, 0), seen
        assert "no longer relays example.co.jp" in seen.detail
        assert "remove that entry too" in seen.detail  # the stale transport entry is named
        wait_until("smtpd to refuse the domain", lambda: lab.probe()[0] is False)
        accepts, said = lab.probe()
        assert accepts is False and "554" in said and "Relay access denied" in said
        assert not retirement_blocked(desired_state, seen)
        # Unread, it waits for a person's ack, which the probe now confirms.
        assert unread(desired_state, lab) == (True, False)

        # Queued but no longer routed: still blocked (the queue would bounce).
        still = replace(seen, queued=1)
        assert retirement_blocked(desired_state, still)
    finally:
        reader.transport.close()


def test_an_unreadable_relay_directory_is_unknown_not_detached(lab: Lab) -> None:
    reader = lab.reader()
    try:
        wrong = RelayReader(reader.transport, RELAY_HOST, "/nonexistent/postfix", DOMAIN,
                            names=reader.names)
        seen = wrong.read()
        assert (seen.observed, seen.routes_to_onprem, seen.queued) == (False, None, None), seen
        assert "/nonexistent/postfix" in seen.detail
    finally:
        reader.transport.close()


def test_the_backend_opens_the_relay_over_ssh_and_reads_it(
        lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """`SystemBackend` opens each relay with `connect` as it opens onprem (pinned host key,
    MAILREC_SSH_KEY) and `read_upstream` reads it; a relay whose host key is unknown is
    left unread (and then probed), not fatal."""
    monkeypatch.setenv("MAILREC_SSH_KEY", str(lab.onprem.sshd.client_key))
    desired_state = desired(lab)
    relays = SystemBackend._open_relays(desired_state, lab.onprem.sshd.known_hosts)
    backend = object.__new__(SystemBackend)  # only what read_upstream uses
    backend.state, backend.lab, backend.relays = desired_state, None, relays
    try:
        assert relays[0].reader is not None, relays[0].unreadable
        (seen,) = backend.read_upstream()
        assert seen.host == RELAY_HOST and seen.observed and seen.accepts_domain is None
        assert seen.queued is not None and seen.routes_to_onprem is not None
    finally:
        for relay in relays:
            if relay.transport is not None:
                relay.transport.close()

    empty = lab.onprem.sshd.dir / "empty_known_hosts"
    empty.write_text("")
    relays = SystemBackend._open_relays(desired_state, empty)
    backend.relays = relays
    assert relays[0].reader is None and "not in" in relays[0].unreadable
    (seen,) = backend.read_upstream()
    assert (seen.observed, seen.routes_to_onprem, seen.queued) == (False, None, None)
    # Probed instead, at onprem.upstream[].smtp.
    assert f"probe: {RELAY_ADDRESS}:{lab.relay.smtp_port}" in seen.detail
