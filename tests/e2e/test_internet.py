"""The e2e Internet (tests/e2e/internet.py) against a real BIND and real SMTP servers on the
e2e loopback addresses: the resolver caches for the TTL, senders retry a 4xx and bounce on a
5xx and follow an MX change once the TTL has passed, the receiver checks SPF in the company's
zone, refuses relay and records DSNs, and a mail client leaves from the address it is given.

Fake MXs listen on free ports (never net.SMTP_PORT), so a concurrent e2e run is not disturbed.
Under CI=true a BIND that cannot start or a missing pyspf fails these tests, elsewhere skips.
"""

from __future__ import annotations

import email
import functools
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from tests.dns_server import NamedServer, NamedUnavailable, start_named
from tests.dns_server import unavailable as bind_unavailable
from tests.e2e import net
from tests.e2e.internet import (
    ACCEPTED,
    BOUNCED,
    DEFERRED_THEN_ACCEPTED,
    GAVE_UP,
    PARTIALLY_BOUNCED,
    QUEUED,
    CachingResolver,
    InternetReceiver,
    InternetSender,
    MailClient,
    MxHost,
    ResolveError,
    peer_ip,
)
from tests.integration.services import (
    ensure_loopback_address,
    start_or_unavailable,
    unavailable,
)

pytestmark = pytest.mark.integration

# Fake MX hosts of the company in this test's zone (addresses no part of the e2e run uses).
MX1 = "127.0.0.54"
MX2 = "127.0.0.55"
DEAD = "127.0.0.56"  # an MX name whose address has no server
TTL = 2
NEGATIVE_TTL = 3
SPF_PASS_IP = net.ONPREM  # 127.0.0.52, the only ip4: of the record
COMPANY_USER = f"taro@{net.DOMAIN}"

ZONE_TEXT = f"""\
$ORIGIN {net.DOMAIN}.
$TTL 60
@   IN SOA ns1 hostmaster ( 1 60 30 600 {NEGATIVE_TTL} )
@   IN NS  ns1
@   {TTL} IN MX 10 mx1
@   {TTL} IN TXT "v=spf1 ip4:{SPF_PASS_IP} -all"
ns1 IN A   {net.DNS}
mx1 {TTL} IN A {MX1}
mx2 {TTL} IN A {MX2}
dead {TTL} IN A {DEAD}
"""
DEFAULT_MX = "10 mx1.example.co.jp."
DEFAULT_SPF = f'"v=spf1 ip4:{SPF_PASS_IP} -all"'


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bind_server() -> Iterator[NamedServer]:
    try:
        server = start_named(address=net.DNS, zone_text=ZONE_TEXT)
    except NamedUnavailable as exc:
        bind_unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bind(bind_server: NamedServer) -> NamedServer:
    """The module's BIND with the apex MX and SPF as in ZONE_TEXT (tests change them)."""
    bind_server.replace("MX", TTL, DEFAULT_MX)
    bind_server.replace("TXT", TTL, DEFAULT_SPF)
    return bind_server


@pytest.fixture(scope="module")
def addresses() -> None:
    for address in (MX1, MX2, DEAD, net.INTERNET_MX, net.ONPREM, net.OFFICE_LINE_A,
                    net.OFFICE_LINE_B, net.OUTSIDE_SENDERS):
        start_or_unavailable(functools.partial(ensure_loopback_address, address))


@pytest.fixture(scope="module")
def spf_available() -> None:
    try:
        import spf  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        unavailable("pyspf is not installed (pip install -e '.[dev]')")


def free_port(*addresses: str) -> int:
    """A TCP port free on every address (the sender uses one port for all MXs)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for address in addresses:
                with socket.socket() as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no common free port on {addresses}")


@dataclass
class Got:
    e2e_id: str | None
    peer: str
    mail_from: str
    rcpt_tos: tuple[str, ...]


@dataclass
class ScriptedHandler:
    """A fake MX: RCPT answers come from `rcpt_script` (then 250, or `rcpt_reply(n)`)."""

    rcpt_script: list[str] = field(default_factory=list)
    rcpt_reply: Callable[[int], str | None] | None = None
    got: list[Got] = field(default_factory=list)
    rcpt_count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: SMTPServer, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        with self.lock:
            self.rcpt_count += 1
            count = self.rcpt_count
            scripted = self.rcpt_script.pop(0) if self.rcpt_script else None
        if scripted is None and self.rcpt_reply is not None:
            scripted = self.rcpt_reply(count)
        if scripted is not None and not scripted.startswith("2"):
            return scripted
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        message = email.message_from_bytes(envelope.original_content or b"")
        with self.lock:
            self.got.append(Got(message[net.E2E_ID_HEADER], peer_ip(session),
                                envelope.mail_from or "", tuple(envelope.rcpt_tos)))
        return "250 OK"

    def ids(self) -> list[str | None]:
        with self.lock:
            return [got.e2e_id for got in self.got]


@pytest.fixture
def smtp_port(addresses: None) -> int:
    return free_port(MX1, MX2, DEAD)


@pytest.fixture
def fake_mx(smtp_port: int) -> Iterator[Callable[..., ScriptedHandler]]:
    """Start a fake MX on an address at smtp_port; stopped after the test."""
    started: list[Controller] = []

    def start(address: str, handler: ScriptedHandler | None = None) -> ScriptedHandler:
        handler = handler or ScriptedHandler()
        controller = Controller(handler, hostname=address, port=smtp_port)
        controller.start()
        started.append(controller)
        return handler

    yield start
    for controller in started:
        controller.stop()


@pytest.fixture
def receiver(bind: NamedServer, addresses: None, spf_available: None) -> Iterator[
        InternetReceiver]:
    server = InternetReceiver(bind.address, bind.port, port=free_port(net.INTERNET_MX))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sender_for(
    bind: NamedServer, port: int, *, retry_initial: float = 0.2, give_up_after: float = 30.0
) -> InternetSender:
    return InternetSender(
        CachingResolver(bind.address, bind.port),
        port=port,
        workers=2,
        timeout=5.0,
        retry_initial=retry_initial,
        retry_max=1.0,
        give_up_after=give_up_after,
    )


# --- the caching resolver -------------------------------------------------------------------


def test_resolver_serves_the_cached_mx_until_its_ttl_passes_then_the_new_one(
    bind: NamedServer,
) -> None:
    clock = FakeClock()
    resolver = CachingResolver(bind.address, bind.port, clock=clock)
    assert resolver.mx(net.DOMAIN) == [MxHost(10, "mx1.example.co.jp.")]

    bind.replace("MX", TTL, "10 mx2.example.co.jp.")
    changed = bind.query("MX")
    assert changed is not None and "mx2" in changed.to_text()  # BIND has the new MX

    clock.now += TTL - 0.01
    assert resolver.mx(net.DOMAIN) == [MxHost(10, "mx1.example.co.jp.")], resolver.describe()
    assert resolver.query(net.DOMAIN, "MX").from_cache
    assert resolver.misses == 1

    clock.now += 0.02
    assert resolver.mx(net.DOMAIN) == [MxHost(10, "mx2.example.co.jp.")], resolver.describe()
    assert resolver.misses == 2
    assert resolver.addresses("mx2.example.co.jp.") == [MX2]


def test_resolver_caches_a_negative_answer_for_the_soa_minimum_and_shows_its_cache(
    bind: NamedServer,
) -> None:
    clock = FakeClock()
    resolver = CachingResolver(bind.address, bind.port, clock=clock)
    assert resolver.addresses("nothing-here.example.co.jp") == []
    assert resolver.addresses("mx1.example.co.jp") == [MX1]

    entries = {(e.name, e.rdtype): e for e in resolver.cached()}
    negative = entries[("nothing-here.example.co.jp.", "A")]
    assert negative.negative and negative.rcode == "NXDOMAIN"
    assert negative.ttl == NEGATIVE_TTL
    assert entries[("mx1.example.co.jp.", "A")].values == (MX1,)
    assert entries[("mx1.example.co.jp.", "A")].ttl == TTL

    clock.now += NEGATIVE_TTL - 0.5
    assert resolver.query("nothing-here.example.co.jp", "A").from_cache
    # the A record (TTL 2) has expired, the negative answer (SOA minimum 3) has not
    assert {(e.name, e.rdtype) for e in resolver.cached()} == {
        ("nothing-here.example.co.jp.", "A")
    }
    clock.now += 1
    assert not resolver.query("nothing-here.example.co.jp", "A").from_cache


def test_resolver_answers_names_outside_the_zone_from_its_hosts_map_only(
    bind: NamedServer,
) -> None:
    mapped = CachingResolver(bind.address, bind.port, hosts={net.RENTAL_MX_NAME: net.RENTAL})
    assert mapped.addresses("MX.rental.test") == [net.RENTAL]
    assert mapped.misses == 0  # BIND was not asked
    assert any(e.source == "hosts" and e.name == net.RENTAL_MX_NAME for e in mapped.cached())

    bare = CachingResolver(bind.address, bind.port)
    with pytest.raises(ResolveError, match="REFUSED"):  # BIND is authoritative, not recursive
        bare.addresses(net.RENTAL_MX_NAME)


# --- outside senders --------------------------------------------------------------------------


def test_sender_retries_after_451_and_records_deferred_then_accepted(
    bind: NamedServer, smtp_port: int, fake_mx: Callable[..., ScriptedHandler]
) -> None:
    mx = fake_mx(MX1, ScriptedHandler(rcpt_script=["451 4.7.1 greylisted"] * 2))
    with sender_for(bind, smtp_port) as sender:
        first = sender.send(COMPANY_USER)
        assert first.status == QUEUED and first.attempts == 1
        assert first.last_reply is not None and first.last_reply.code == 451
        assert sender.flush(15), sender.records()
        record = sender.record(first.id)

    assert record.status == DEFERRED_THEN_ACCEPTED
    assert record.attempts == 3 and record.deferrals == 2 and record.acceptances == 1
    assert (record.mx_host, record.mx_address) == ("mx1.example.co.jp.", MX1)
    assert record.delivered == (COMPANY_USER,) and record.pending == ()
    assert mx.ids() == [record.id]  # exactly once
    assert mx.got[0].peer == net.OUTSIDE_SENDERS
    # backoff: 0.2 s, then 0.4 s
    times = [attempt.at for attempt in record.history]
    assert times[1] - times[0] >= 0.19 and times[2] - times[1] >= 0.39


def test_sender_records_a_550_as_a_bounce_with_its_code(
    bind: NamedServer, smtp_port: int, fake_mx: Callable[..., ScriptedHandler]
) -> None:
    mx = fake_mx(MX1, ScriptedHandler(rcpt_script=["550 5.1.1 no such user"]))
    with sender_for(bind, smtp_port) as sender:
        record = sender.send(f"nobody@{net.DOMAIN}")
        assert sender.flush(5)
        assert sender.record(record.id) == record  # nothing more happened

    assert record.status == BOUNCED
    assert record.bounce_code == 550
    assert "no such user" in record.bounced[0][1].text
    assert record.attempts == 1 and record.delivered == ()
    assert mx.ids() == []


def test_sender_tries_the_lowest_preference_first_and_falls_back_to_the_next(
    bind: NamedServer, smtp_port: int, fake_mx: Callable[..., ScriptedHandler]
) -> None:
    bind.replace("MX", TTL, "30 mx2.example.co.jp.", "10 dead.example.co.jp.",
                 "20 mx1.example.co.jp.")
    mx1, mx2 = fake_mx(MX1), fake_mx(MX2)
    with sender_for(bind, smtp_port) as sender:
        record = sender.send(COMPANY_USER)

    assert record.status == ACCEPTED and record.attempts == 1
    assert [a.address for a in record.history] == [DEAD, MX1]
    assert record.history[0].reply.code is None  # connection refused
    assert mx1.ids() == [record.id] and mx2.ids() == []


def test_sender_follows_an_mx_change_once_the_ttl_has_passed(
    bind: NamedServer, smtp_port: int, fake_mx: Callable[..., ScriptedHandler]
) -> None:
    mx1, mx2 = fake_mx(MX1), fake_mx(MX2)
    with sender_for(bind, smtp_port) as sender:  # the real monotonic clock
        fetched = time.monotonic()
        before = sender.send(COMPANY_USER)
        bind.replace("MX", TTL, "10 mx2.example.co.jp.")
        cached = sender.send(COMPANY_USER)
        assert time.monotonic() - fetched < TTL, "too slow to observe the cached MX"
        time.sleep(max(0.0, fetched + TTL + 0.2 - time.monotonic()))
        after = sender.send(COMPANY_USER)

    assert before.mx_address == MX1
    assert cached.mx_address == MX1  # BIND already said mx2: the cache was used
    assert after.mx_address == MX2 and after.mx_host == "mx2.example.co.jp."
    assert mx1.ids() == [before.id, cached.id]
    assert mx2.ids() == [after.id]


def test_sender_gives_up_when_no_mx_answers_before_its_deadline(
    bind: NamedServer, smtp_port: int
) -> None:
    bind.replace("MX", TTL, "10 dead.example.co.jp.")
    with sender_for(bind, smtp_port, retry_initial=0.1, give_up_after=0.6) as sender:
        record = sender.send(COMPANY_USER)
        assert sender.flush(10)
        record = sender.record(record.id)

    assert record.status == GAVE_UP
    assert record.attempts >= 3 and record.deferrals == record.attempts
    assert record.pending == (COMPANY_USER,)
    assert record.last_reply is not None and record.last_reply.stage == "connect"


def test_sender_accounts_for_every_message_when_used_from_many_threads(
    bind: NamedServer, smtp_port: int, fake_mx: Callable[..., ScriptedHandler]
) -> None:
    mx = fake_mx(MX1, ScriptedHandler(
        rcpt_reply=lambda n: "451 4.3.0 busy" if n % 7 == 0 else None))
    with sender_for(bind, smtp_port, retry_initial=0.05) as sender, \
            ThreadPoolExecutor(max_workers=8) as pool:
        sent = list(pool.map(lambda n: sender.send(f"user{n % 10}@{net.DOMAIN}").id,
                             range(200)))
        assert sender.flush(30), sender.statuses()
        records = sender.records()

    assert len(set(sent)) == 200
    assert {r.id for r in records} == set(sent)
    statuses = {r.status for r in records}
    assert statuses <= {ACCEPTED, DEFERRED_THEN_ACCEPTED}
    assert DEFERRED_THEN_ACCEPTED in statuses
    assert sorted(i for i in mx.ids() if i) == sorted(sent)  # each exactly once


# --- the receiver -------------------------------------------------------------------------------


def client(receiver: InternetReceiver, source: str) -> MailClient:
    return MailClient(receiver.address, receiver.port, source_address=source, retry_delay=0.05)


def test_receiver_spf_pass_from_the_records_address_and_fail_from_another(
    receiver: InternetReceiver,
) -> None:
    inside = client(receiver, SPF_PASS_IP).send(COMPANY_USER, "friend@example.net")
    outside = client(receiver, net.OFFICE_LINE_A).send(COMPANY_USER, "friend@example.net")
    assert inside.status == ACCEPTED and outside.status == ACCEPTED  # counted, not refused

    got = {m.e2e_id: m for m in receiver.messages()}
    assert got[inside.id].spf == "pass"
    assert got[outside.id].spf == "fail"
    assert got[outside.id].peer == net.OFFICE_LINE_A
    counts = receiver.spf_counts()
    assert counts["pass"] == 1 and counts["fail"] == 1 and counts["softfail"] == 0


def test_receiver_spf_softfail_when_the_record_ends_in_tilde_all(
    bind: NamedServer, receiver: InternetReceiver
) -> None:
    bind.replace("TXT", TTL, f'"v=spf1 ip4:{SPF_PASS_IP} ~all"')
    record = client(receiver, net.OFFICE_LINE_A).send(COMPANY_USER, "friend@example.net")
    assert [m.spf for m in receiver.messages() if m.e2e_id == record.id] == ["softfail"]


def test_receiver_rejects_spf_fail_only_when_told_to(
    bind: NamedServer, addresses: None, spf_available: None
) -> None:
    with InternetReceiver(bind.address, bind.port, port=free_port(net.INTERNET_MX),
                          reject_spf_fail=True) as strict:
        record = client(strict, net.OFFICE_LINE_B).send(COMPANY_USER, "friend@example.net")
        assert record.status == BOUNCED and record.bounce_code == 550
        assert strict.messages() == []
        assert "SPF fail" in strict.refusals()[0].reply


def test_receiver_refuses_relay_for_other_domains(receiver: InternetReceiver) -> None:
    sender = client(receiver, net.OUTSIDER)
    relay = sender.send(COMPANY_USER, "victim@example.org")
    assert relay.status == BOUNCED and relay.bounce_code == 550
    mixed = sender.send(COMPANY_USER, ["friend@example.net", "victim@example.org"])
    assert mixed.status == PARTIALLY_BOUNCED and mixed.delivered == ("friend@example.net",)

    assert [m.rcpt_tos for m in receiver.messages()] == [("friend@example.net",)]
    refused = receiver.refusals()
    assert [(r.rcpt, r.peer) for r in refused] == [("victim@example.org", net.OUTSIDER)] * 2
    assert all(r.reply.startswith("550") for r in refused)


DSN = """\
From: MAILER-DAEMON@mail.example.co.jp (Mail Delivery System)
To: friend@example.net
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B0"

--B0
Content-Type: text/plain

I'm sorry to have to inform you that your message could not be delivered.

--B0
Content-Type: message/delivery-status

Reporting-MTA: dns; mail.example.co.jp

Final-Recipient: rfc822; gone@example.co.jp
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <gone@example.co.jp>: User unknown

--B0
Content-Type: message/rfc822

From: friend@example.net
To: gone@example.co.jp
Subject: hello [in-original-1]
Message-ID: <in-original-1@example.net>
X-E2E-Id: in-original-1

hello
--B0--
"""

PLAIN_BOUNCE = """\
From: MAILER-DAEMON@mail.example.co.jp
To: friend@example.net
Subject: failure notice

Your message could not be delivered. Its headers:

X-E2E-Id: in-original-2
Subject: hi
"""


def test_receiver_records_dsns_with_the_id_of_the_bounced_message(
    receiver: InternetReceiver,
) -> None:
    with smtplib.SMTP(receiver.address, receiver.port,
                      source_address=(net.ONPREM, 0), local_hostname="mail.example.co.jp") as s:
        s.sendmail("", ["friend@example.net"], DSN.replace("\n", "\r\n").encode())
        s.sendmail("", ["friend@example.net"], PLAIN_BOUNCE.replace("\n", "\r\n").encode())
    normal = client(receiver, SPF_PASS_IP).send(COMPANY_USER, "friend@example.net")

    dsns = receiver.dsns()
    assert [d.dsn.reason for d in dsns if d.dsn] == ["multipart-report", "empty-sender"]
    report = dsns[0].dsn
    assert report is not None and report.original_id == "in-original-1"
    assert report.original_message_id == "<in-original-1@example.net>"
    assert [(r.final_recipient, r.action, r.status) for r in report.recipients] == [
        ("rfc822; gone@example.co.jp", "failed", "5.1.1")
    ]
    assert report.summary.startswith("failed 5.1.1 rfc822; gone@example.co.jp (smtp; 550")
    assert dsns[0].mail_from == "" and dsns[0].e2e_id is None
    assert dsns[1].dsn is not None and dsns[1].dsn.original_id == "in-original-2"
    assert [m.dsn for m in receiver.messages() if m.e2e_id == normal.id] == [None]


# --- the mail client ---------------------------------------------------------------------------


def test_client_binds_the_source_address_it_is_given(receiver: InternetReceiver) -> None:
    a = client(receiver, net.OFFICE_LINE_A).send(COMPANY_USER, "friend@example.net")
    b = client(receiver, net.OFFICE_LINE_B).send(COMPANY_USER, "friend@example.net")
    peers = {m.e2e_id: m.peer for m in receiver.messages()}
    assert peers == {a.id: net.OFFICE_LINE_A, b.id: net.OFFICE_LINE_B}
    assert a.mx_address == receiver.address


def test_client_retries_a_4xx_a_few_times_then_gives_up(
    smtp_port: int, fake_mx: Callable[..., ScriptedHandler]
) -> None:
    mx = fake_mx(MX1, ScriptedHandler(
        rcpt_script=["421 4.3.2 try again", "250 OK"] + ["450 4.2.0 full"] * 3))
    user = MailClient(MX1, smtp_port, source_address=net.OFFICE_LINE_A, retries=2,
                      retry_delay=0.05)
    recovered = user.send(COMPANY_USER, f"hanako@{net.DOMAIN}")
    assert recovered.status == DEFERRED_THEN_ACCEPTED and recovered.attempts == 2
    stuck = user.send(COMPANY_USER, f"hanako@{net.DOMAIN}")
    assert stuck.status == GAVE_UP and stuck.attempts == 3
    assert stuck.last_reply is not None and stuck.last_reply.code == 450
    assert mx.ids() == [recovered.id]
    assert {r.id for r in user.records()} == {recovered.id, stuck.id}


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_client_submits_with_auth_plain(smtp_port: int, addresses: None) -> None:
    logins: list[str] = []

    def authenticator(server: SMTPServer, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: object) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and auth_data.password == b"secret"
        if ok and isinstance(auth_data, LoginPassword):
            logins.append(auth_data.login.decode())
        return AuthResult(success=ok, handled=False)  # aiosmtpd then answers 535

    handler = ScriptedHandler()
    controller = Controller(handler, hostname=MX2, port=smtp_port, authenticator=authenticator,
                            auth_require_tls=False, auth_required=True)
    controller.start()
    try:
        good = MailClient(MX2, smtp_port, source_address=net.OFFICE_LINE_A, user=COMPANY_USER,
                          password="secret", retries=0).send(COMPANY_USER, "friend@example.net")
        bad = MailClient(MX2, smtp_port, source_address=net.OFFICE_LINE_A, user=COMPANY_USER,
                         password="wrong", retries=0).send(COMPANY_USER, "friend@example.net")
        anonymous = MailClient(MX2, smtp_port, source_address=net.OFFICE_LINE_A,
                               retries=0).send(COMPANY_USER, "friend@example.net")
    finally:
        controller.stop()

    assert good.status == ACCEPTED and logins == [COMPANY_USER]
    assert bad.status == BOUNCED and bad.bounce_code == 535
    assert bad.bounced[0][1].stage == "auth"
    assert anonymous.status == BOUNCED  # 530 authentication required
    assert handler.ids() == [good.id]
