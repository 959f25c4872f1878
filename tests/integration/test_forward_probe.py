"""`PostfixHost.probe_forward` against a real Postfix on 127.0.0.2 over real sshd: the probe
message really goes through onprem's Postfix by the transport entry `smtp:[rental]:port`, to
the lab rental SMTP server on 127.0.0.3 (which answers 550 for the unknown probe address: the
path works), or to a port where nothing listens (the path does not work). Either way nothing
stays in onprem's queue and mailrec's transport map keeps no probe entry. Fixtures:
tests/integration/onprem.py; the fake-host version (every command, -C/-c DIR) is in
tests/test_postfix_commands.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reconciler.drivers.postfix import PostfixError
from reconciler.drivers.postfix_host import PROBE_WAITS, PostfixHost
from reconciler.lab.rental_smtp import read_log
from reconciler.transport import Transport

from .onprem import (
    DOMAIN,
    RENTAL_ADDRESS,
    OnpremStack,
    free_port,
    local_maildir,
    send,
    start_onprem_stack,
    wait_for,
)
from .services import ServiceStack, make_base_dir, start_or_unavailable

pytestmark = pytest.mark.integration

PROBE = f"mailrec-probe@{DOMAIN}"


@pytest.fixture(scope="module")
def onprem() -> Iterator[OnpremStack]:
    stack = ServiceStack()
    base = stack.add_dir(make_base_dir("mailrec-probe-"))
    try:
        yield start_or_unavailable(lambda: start_onprem_stack(stack, base))
    finally:
        stack.stop_all()


def assert_nothing_left(onprem: OnpremStack) -> None:
    """No probe in the queue, no probe entry in the map's source or its compiled table."""
    assert onprem.queue_empty(), onprem.postfix.run("postqueue", "-p").stdout
    transport = onprem.config_dir / "mailrec_transport"
    assert PROBE not in transport.read_text()
    dump = onprem.postfix.run("postmap", "-s", f"hash:{transport}").stdout
    assert PROBE not in dump
    assert onprem.postfix.run("postmap", "-q", PROBE, f"hash:{transport}",
                              check=False).returncode == 1  # not found


def probe_rcpts(onprem: OnpremStack) -> list[dict[str, object]]:
    """The lab rental's RCPT entries for the probe address."""
    return [entry for entry in read_log(onprem.rental_lab.root)
            if entry["event"] == "rcpt" and entry["rcpt"] == PROBE]


def test_the_probe_reaches_the_lab_rental_and_leaves_nothing(
    onprem: OnpremStack, host: PostfixHost, ssh: Transport
) -> None:
    port = onprem.rental.relay_port
    assert onprem.postfix.postconf("transport_maps") == ""  # a fresh host: the probe names it
    mark = onprem.log_mark()
    before = ssh.round_trips

    said = host.probe_forward(RENTAL_ADDRESS, port)

    # The lab rental answers 550 for the unknown probe address: its SMTP answered.
    assert f"smtp:[{RENTAL_ADDRESS}]:{port}" in said
    assert "status=bounced" in said and "said: 550" in said, said
    assert "\n" not in said
    (rcpt,) = probe_rcpts(onprem)
    assert rcpt["code"] == 550 and rcpt["mail_from"] == ""  # the null sender
    # It went through onprem's own Postfix: queued by cleanup, handed over by smtp(8).
    log = onprem.log_since(mark)
    assert "from=<>" in log and "message-id=<mailrec-probe." in log
    assert f"to=<{PROBE}>, relay={RENTAL_ADDRESS}[{RENTAL_ADDRESS}]:{port}" in log
    # The null-sender bounce is discarded: no notice to anyone.
    assert "sender non-delivery notification" not in log
    assert_nothing_left(onprem)
    assert (onprem.postfix.postconf("transport_maps")
            == f"hash:{onprem.config_dir / 'mailrec_transport'}")
    # Bounded: the entry (6 with main.cf), sendmail, the looks, its removal (3).
    assert ssh.round_trips - before <= 6 + 1 + len(PROBE_WAITS) + 3


def test_a_port_where_nothing_listens_fails_and_leaves_nothing(
    onprem: OnpremStack, host: PostfixHost
) -> None:
    dead = free_port(RENTAL_ADDRESS)
    mark = onprem.log_mark()
    with pytest.raises(PostfixError) as failed:
        host.probe_forward(RENTAL_ADDRESS, dead)
    text = str(failed.value)
    assert "the path onprem -> rental does not work" in text
    assert f"{RENTAL_ADDRESS}]:{dead}: Connection refused" in text
    assert "relayhost" in text and "postsuper -d" in text
    log = onprem.log_since(mark)
    assert "status=deferred" in log and "postsuper" in log  # tried, then deleted
    assert_nothing_left(onprem)


def test_users_forwarded_before_keep_their_entries_and_mail_flows(
    onprem: OnpremStack, host: PostfixHost
) -> None:
    port = onprem.rental.relay_port
    moving, staying = onprem.users.create(2)
    onprem.add_rental_mailbox(moving)
    host.route_to_rental(moving, RENTAL_ADDRESS, port)
    host.probe_forward(RENTAL_ADDRESS, port)
    with pytest.raises(PostfixError, match="does not work"):
        host.probe_forward(RENTAL_ADDRESS, free_port(RENTAL_ADDRESS))
    assert_nothing_left(onprem)
    dump = onprem.postfix.run(
        "postmap", "-s", f"hash:{onprem.config_dir / 'mailrec_transport'}").stdout
    assert f"{moving}@{DOMAIN}\tsmtp:[{RENTAL_ADDRESS}]:{port}" in dump
    assert send(onprem, f"{moving}@{DOMAIN}", "after-probe")[0] == 250
    wait_for([onprem.rental_maildir(moving)], "after-probe")
    assert send(onprem, f"{staying}@{DOMAIN}", "stays-after-probe")[0] == 250
    wait_for([local_maildir(staying)], "stays-after-probe")
    onprem.wait_for_empty_queue()
