"""The relay in front of onprem (reconciler/drivers/upstream.py) without services: the
`postqueue -j` parser, the routing decision (table-driven, as trivial-rewrite decides), the
reader's commands over a fake host (constant in number, `-c DIR` on each), the SMTP probe
against a scripted SMTP server on loopback, and the backend's handling of a relay that does
not open. The real relay is tests/integration/test_upstream_relay.py.
"""

from __future__ import annotations

import json
import posixpath
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers import upstream as upstream_module
from reconciler.drivers.backend import SystemBackend
from reconciler.drivers.upstream import (
    RELAY_PARAMS,
    HopNames,
    RelayReader,
    TableAnswer,
    UpstreamError,
    UpstreamFacts,
    count_queued,
    decide_route,
    parse_hops,
    parse_query,
    probe_endpoint,
    probe_relay,
    relay_facts,
    tables_to_query,
)
from reconciler.model import Upstream
from reconciler.transport import CommandResult, TransportError
from tests.fakes import POSTFIX_SUITE, FakeHost, fail, ok

from .test_safety_rules import state

DOMAIN = "example.co.jp"
CONFIG_DIR = "/srv/postfix-dmz/etc"  # not /etc/postfix: every command must say -c DIR
ONPREM_LAN = "10.0.0.5"  # onprem's address as the relay reaches it (onprem.connect)
NAMES = HopNames.of(("mail.example.co.jp.", ONPREM_LAN, "198.51.100.10"),
                    ("example.sakura.ne.jp", "example.sakura.ne.jp."))
TRANSPORT = f"hash:{CONFIG_DIR}/transport"


# --- postqueue -j ---------------------------------------------------------------------------


def queue_line(queue: str, *recipients: str, queue_id: str = "4ABC") -> str:
    return json.dumps({
        "queue_name": queue, "queue_id": queue_id, "arrival_time": 1767225600,
        "message_size": 512, "forced_expire": False, "sender": "someone@example.net",
        "recipients": [{"address": r, "delay_reason": "connect to 10.0.0.5[10.0.0.5]:25: "
                        "Connection refused"} for r in recipients],
    })


def test_postqueue_json_counts_messages_with_a_recipient_at_the_domain() -> None:
    text = "\n".join([
        queue_line("deferred", f"suga@{DOMAIN}", f"sato@{DOMAIN}"),  # one message, not two
        queue_line("active", "someone@example.net"),
        queue_line("hold", "SATO@Example.Co.JP"),  # case does not matter
        queue_line("incoming", "root@mail.example.co.jp"),  # a name under the domain
        queue_line("deferred", "x@notexample.co.jp", "y@example.net"),  # not the domain
        "",
    ])
    assert count_queued(text, DOMAIN) == (3, {"deferred": 1, "hold": 1, "incoming": 1})
    assert count_queued("", DOMAIN) == (0, {})  # an empty queue prints nothing


@pytest.mark.parametrize("text", [
    "Mail queue is empty",  # `postqueue -p` output, or an old Postfix
    '{"queue_name": "deferred", "queue_id": "4AB"}',  # no recipient list
    '{"queue_name": "deferred", "recipients": [{"delay_reason": "x"}]}',
    '["not", "an", "entry"]',
    queue_line("deferred", f"suga@{DOMAIN}") + "\n" + '{"queue_name": "deferred", "rec',
])
def test_postqueue_json_that_cannot_be_read_is_an_error_never_a_count(text: str) -> None:
    with pytest.raises(UpstreamError):
        count_queued(text, DOMAIN)


# --- the routing decision -------------------------------------------------------------------


def params(**values: str) -> dict[str, str]:
    """`postconf -x` of a stock Postfix 3.6+ relay, with `values` set."""
    stock = {name: "" for name in RELAY_PARAMS}
    stock.update({
        "relay_transport": "relay", "local_transport": "local:relay.example.co.jp",
        "virtual_transport": "virtual", "default_transport": "smtp",
        "mydestination": "relay.example.co.jp, localhost",
        "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, "
                                    "defer_unauth_destination",
    })
    stock.update(values)
    return stock


def transport(**entries: str) -> dict[str, TableAnswer]:
    return {TRANSPORT: TableAnswer(entries)}


ROUTES: list[tuple[str, dict[str, str], dict[str, TableAnswer], bool | None, str]] = [
    ("relay_domains + transport_maps to onprem",
     params(relay_domains=DOMAIN, transport_maps=TRANSPORT),
     transport(**{DOMAIN: f"smtp:[{ONPREM_LAN}]:25"}), True, "is onprem (10.0.0.5)"),
    ("relay_domains + relayhost onprem",
     params(relay_domains=DOMAIN, relayhost="[mail.example.co.jp]"), {}, True,
     "is onprem (mail.example.co.jp)"),
    ("relay_transport with a next hop onprem",
     params(relay_domains=DOMAIN, relay_transport=f"relay:[{ONPREM_LAN}]:2525"), {}, True,
     "relay_transport"),
    ("transport entry `:[host]` keeps relay, changes the next hop",
     params(relay_domains=DOMAIN, transport_maps=TRANSPORT),
     transport(**{DOMAIN: f":[{ONPREM_LAN}]"}), True, "is onprem"),
    ("the wildcard entry", params(relay_domains=DOMAIN, transport_maps=TRANSPORT),
     transport(**{"*": "smtp:[198.51.100.10]"}), True, "(*)"),
    ("an unbracketed onprem name (its MX, then its address)",
     params(relay_domains=DOMAIN, transport_maps=TRANSPORT),
     transport(**{DOMAIN: "relay:mail.example.co.jp"}), True, "is onprem"),
    ("smtp_fallback_relay is onprem",
     params(relay_domains=DOMAIN, transport_maps=TRANSPORT,
            smtp_fallback_relay=f"[{ONPREM_LAN}]"),
     transport(**{DOMAIN: "smtp:[example.sakura.ne.jp]:25"}), True, "smtp_fallback_relay"),
    ("transport_maps to the rental",
     params(relay_domains=DOMAIN, transport_maps=TRANSPORT, relayhost="[smtp.isp.example]"),
     transport(**{DOMAIN: "smtp:[example.sakura.ne.jp]:25"}), False, "is the rental"),
    ("the domain removed from relay_domains",
     params(relay_domains="other.example", transport_maps=TRANSPORT),
     transport(), False, "no longer relays example.co.jp"),
    ("removed from relay_domains, a stale transport entry noted",
     params(relay_domains="", transport_maps=TRANSPORT),
     transport(**{DOMAIN: f"smtp:[{ONPREM_LAN}]"}), False, "remove that entry too"),
    ("excluded by !domain before a parent entry",
     params(relay_domains=f"!{DOMAIN}, .co.jp", relayhost=f"[{ONPREM_LAN}]"), {}, False,
     "excludes"),
    ("delivered on the relay (mydestination)",
     params(mydestination=f"relay.example.co.jp, {DOMAIN}", relayhost=f"[{ONPREM_LAN}]"), {},
     False, "delivered on the relay itself"),
    ("error transport", params(relay_domains=DOMAIN, transport_maps=TRANSPORT),
     transport(**{DOMAIN: "error:moved to the rental"}), False, "not delivered"),
    ("transport table unreadable",
     params(relay_domains=DOMAIN, transport_maps=TRANSPORT),
     {TRANSPORT: TableAnswer(error="postmap: fatal: open database transport.db")}, None,
     "could not be read"),
    ("relay_domains table unreadable",
     params(relay_domains=f"hash:{CONFIG_DIR}/relay_domains"),
     {f"hash:{CONFIG_DIR}/relay_domains": TableAnswer(error="lookup failed")}, None,
     "cannot tell whether the relay accepts"),
    ("relay_domains from a table, to onprem",
     params(relay_domains=f"proxy:hash:{CONFIG_DIR}/relay_domains",
            relayhost=f"[{ONPREM_LAN}]:25"),
     {f"hash:{CONFIG_DIR}/relay_domains": TableAnswer({DOMAIN: "OK"})}, True, "is onprem"),
    ("next hop by the domain's MX", params(relay_domains=DOMAIN), {}, None,
     "by its MX records"),
    ("a next hop mailrec does not know",
     params(relay_domains=DOMAIN, transport_maps=TRANSPORT),
     transport(**{DOMAIN: "smtp:[mailsv01.corp]"}), None, "neither onprem"),
    ("a transport of the relay's master.cf",
     params(relay_domains=DOMAIN, transport_maps=TRANSPORT),
     transport(**{DOMAIN: "filter:[127.0.0.1]:10025"}), None, "master.cf"),
    ("a virtual alias domain", params(virtual_alias_domains=DOMAIN), {}, None,
     "virtual_alias_domains"),
    ("a $parameter postconf could not expand", params(relay_domains="$unknown_domains"), {},
     None, "not evaluated"),
    ("the relayhost depends on the sender",
     params(relay_domains=DOMAIN, relayhost="[example.sakura.ne.jp]",
            sender_dependent_relayhost_maps=f"hash:{CONFIG_DIR}/sender_relay"), {}, None,
     "per sender"),
    ("a backup MX by permit_mx_backup",
     params(smtpd_recipient_restrictions="permit_mynetworks, permit_mx_backup, "
                                         "reject_unauth_destination",
            relayhost=f"[{ONPREM_LAN}]"), {}, True, "permit_mx_backup"),
]


@pytest.mark.parametrize(("what", "values", "tables", "expected", "said"), ROUTES,
                         ids=[r[0] for r in ROUTES])
def test_route(what: str, values: dict[str, str], tables: dict[str, TableAnswer],
               expected: bool | None, said: str) -> None:
    routes, detail = decide_route(DOMAIN, values, tables, NAMES)
    assert routes is expected, detail
    assert said in detail


def test_pattern_tables_answer_full_addresses_only() -> None:
    pcre = f"pcre:{CONFIG_DIR}/transport.pcre"
    values = params(relay_domains=DOMAIN, transport_maps=f"{TRANSPORT} {pcre}")
    queries = tables_to_query(DOMAIN, values)
    assert queries[TRANSPORT] == [DOMAIN, ".co.jp", ".jp", "*"]
    assert queries[pcre] == [f"postmaster@{DOMAIN}", "*"]
    # The full address goes first, whatever the table order; a pattern table's answer to
    # the bare domain is not asked (trivial-rewrite does not ask it).
    tables = {TRANSPORT: TableAnswer({DOMAIN: "smtp:[example.sakura.ne.jp]"}),
              pcre: TableAnswer({f"postmaster@{DOMAIN}": f"smtp:[{ONPREM_LAN}]"})}
    assert decide_route(DOMAIN, values, tables, NAMES)[0] is True
    tables[pcre] = TableAnswer({})
    assert decide_route(DOMAIN, values, tables, NAMES)[0] is False


def test_parent_domain_style_changes_the_keys() -> None:
    values = params(relay_domains=f"hash:{CONFIG_DIR}/relays", relayhost=f"[{ONPREM_LAN}]",
                    parent_domain_matches_subdomains="relay_domains")
    assert tables_to_query(DOMAIN, values)[f"hash:{CONFIG_DIR}/relays"] == [DOMAIN, "co.jp",
                                                                            "jp"]
    found = {f"hash:{CONFIG_DIR}/relays": TableAnswer({"co.jp": "OK"})}
    assert decide_route(DOMAIN, values, found, NAMES)[0] is True
    assert decide_route(DOMAIN, params(relay_domains="co.jp", relayhost=f"[{ONPREM_LAN}]"),
                        {}, NAMES)[0] is False  # no parent matching: co.jp is not the domain


def test_next_hops() -> None:
    hops = parse_hops("[10.0.0.5]:25, mail.example.co.jp:587 [2001:db8::1]", mx_lookup=True)
    assert hops is not None
    assert [(h.host, h.port, h.mx) for h in hops] == [
        ("10.0.0.5", 25, False), ("mail.example.co.jp", 587, True), ("2001:db8::1", None, False)]
    assert parse_hops("unix:/var/run/dovecot/lmtp", mx_lookup=False) is None
    assert NAMES.side("[MAIL.example.co.jp.]") == "onprem"
    assert NAMES.side("example.sakura.ne.jp") == "rental"


def test_postmap_query_output() -> None:
    text = f"{DOMAIN}\tsmtp:[10.0.0.5]:25\n*\terror:no route\nother\tx\n"
    assert parse_query(text, [DOMAIN, "*"]) == {DOMAIN: "smtp:[10.0.0.5]:25",
                                                "*": "error:no route"}


# --- the reader over a fake host ------------------------------------------------------------


class FakeRelay(FakeHost):
    """A DMZ relay whose only Postfix instance lives in CONFIG_DIR."""

    def __init__(self) -> None:
        super().__init__("fake-relay", CONFIG_DIR, {})
        self.params = params(relay_domains=DOMAIN, transport_maps=TRANSPORT)
        self.tables: dict[str, dict[str, str]] = {
            TRANSPORT: {DOMAIN: f"smtp:[{ONPREM_LAN}]:25"}}
        self.queue: list[str] = []
        self.queue_fails = False
        self.down = False

    def _run(self, argv: tuple[str, ...], input: bytes | None, timeout: float) -> CommandResult:
        if self.down:
            raise TransportError("ssh://root@relay:22: cannot connect: timed out",
                                 host=self.host, argv=argv)
        return super()._run(argv, input, timeout)

    def answer(self, program: str, argv: tuple[str, ...], input: bytes | None) -> CommandResult:
        args = argv[3:]
        if program == "postconf" and args[0] == "-x":
            return ok(argv, "".join(f"{n} = {self.params.get(n, '')}\n" for n in args[1:]))
        if program == "postmap" and args[:2] == ("-q", "-"):
            table = self.tables.get(args[2])
            if table is None:
                return fail(argv, 1, f"postmap: fatal: open database {args[2]}.db\n".encode())
            keys = (input or b"").decode().split()
            found = [f"{k}\t{table[k]}\n" for k in keys if k in table]
            return ok(argv, "".join(found)) if found else fail(argv, 1)
        if program == "postqueue" and args == ("-j",):
            if self.queue_fails:
                return fail(argv, 69, b"postqueue: fatal: Connect to the Postfix showq "
                                      b"service: No such file or directory\n")
            return ok(argv, "".join(f"{line}\n" for line in self.queue))
        raise AssertionError(f"unexpected command {argv}")


def reader(fake: FakeRelay) -> RelayReader:
    return RelayReader(fake, "relay.example.co.jp.", CONFIG_DIR + "/", DOMAIN, names=NAMES)


def test_the_reader_reads_route_and_queue_with_c_dir_on_every_command() -> None:
    fake = FakeRelay()
    fake.queue = [queue_line("deferred", f"suga@{DOMAIN}")]
    facts = reader(fake).read()
    assert facts == UpstreamFacts("relay.example.co.jp.", True, True, 1, None, facts.detail)
    assert "relay_domains lists example.co.jp" in facts.detail
    assert "1 message(s) queued for example.co.jp (deferred 1)" in facts.detail
    fake.assert_every_postfix_command_names_the_instance()
    assert [posixpath.basename(a[0]) for a in fake.argvs] == ["postconf", "postmap",
                                                             "postqueue"]
    assert fake.argvs[1] == ("postmap", "-c", CONFIG_DIR, "-q", "-", TRANSPORT)
    assert fake.stdin == [f"{DOMAIN}\n.co.jp\n.jp\n*\n".encode()]
    assert not any("/etc/postfix" in part for argv in fake.argvs for part in argv)

    # Detached: relay_domains no longer lists it, the queue is empty.
    fake.params["relay_domains"] = ""
    fake.queue = []
    facts = reader(fake).read()
    assert (facts.observed, facts.routes_to_onprem, facts.queued) == (True, False, 0)


def queue_of(size: int) -> list[str]:
    return [queue_line("deferred" if n % 3 else "active", f"user{n:05d}@{DOMAIN}",
                       queue_id=f"Q{n:05d}") for n in range(size)]


def test_the_number_of_commands_does_not_grow_with_the_queue() -> None:
    costs = {}
    for size in (0, 1, 5000):
        fake = FakeRelay()
        fake.queue = queue_of(size)
        facts = reader(fake).read()
        assert facts.queued == size
        costs[size] = fake.round_trips
        for argv in fake.argvs:
            assert not any("user0" in part for part in argv), argv  # no user in a command
            if posixpath.basename(argv[0]) in POSTFIX_SUITE:
                assert argv[1:3] == ("-c", CONFIG_DIR), argv
    assert set(costs.values()) == {3}, costs  # postconf, one postmap, postqueue


def test_one_query_per_table() -> None:
    fake = FakeRelay()
    relays = f"hash:{CONFIG_DIR}/relay_domains"
    second = f"hash:{CONFIG_DIR}/transport2"
    fake.params.update(relay_domains=relays, transport_maps=f"{TRANSPORT}, {second}")
    fake.tables.update({relays: {DOMAIN: "OK"}, second: {}})
    facts = reader(fake).read()
    assert facts.routes_to_onprem is True
    assert fake.round_trips == 5  # postconf, 3 tables, postqueue


def test_a_failed_queue_read_is_unknown_never_zero() -> None:
    fake = FakeRelay()
    fake.queue_fails = True
    facts = reader(fake).read()
    assert (facts.observed, facts.routes_to_onprem, facts.queued) == (True, True, None)
    assert "showq" in facts.detail and "Postfix 3.1" in facts.detail


def test_a_missing_table_is_an_unknown_route() -> None:
    fake = FakeRelay()
    del fake.tables[TRANSPORT]
    facts = reader(fake).read()
    assert (facts.routes_to_onprem, facts.queued) == (None, 0)
    assert "transport.db" in facts.detail


def test_without_main_cf_nothing_is_observed() -> None:
    """postconf -c DIR of a wrong config_dir fails like this; so does a dead connection."""
    fake = FakeRelay()
    fake.down = True
    facts = reader(fake).read()
    assert (facts.observed, facts.routes_to_onprem, facts.queued) == (False, None, None)
    assert "cannot connect" in facts.detail


@pytest.mark.parametrize("bad", ["relative/dir", "/etc/../postfix", "/etc/post\nfix"])
def test_unsafe_config_dirs_are_refused(bad: str) -> None:
    with pytest.raises(UpstreamError, match=r"relay relay\.example\.co\.jp\."):
        RelayReader(FakeRelay(), "relay.example.co.jp.", bad, DOMAIN, names=NAMES)


def test_a_domain_that_is_no_name_is_refused() -> None:
    with pytest.raises(UpstreamError, match="not a domain name"):
        RelayReader(FakeRelay(), "relay.example.co.jp.", CONFIG_DIR, "x;id", names=NAMES)


# --- the SMTP probe -------------------------------------------------------------------------


class ScriptedSmtp(socketserver.ThreadingTCPServer):
    """An SMTP server on loopback answering RCPT from `replies` (address -> reply line);
    it records every command and the client's address."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, replies: Mapping[str, str]) -> None:
        self.replies = dict(replies)
        self.commands: list[str] = []
        self.peers: list[str] = []
        super().__init__(("127.0.0.1", 0), _SmtpHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _SmtpHandler(socketserver.StreamRequestHandler):
    server: ScriptedSmtp

    def handle(self) -> None:
        self.server.peers.append(self.client_address[0])
        self.wfile.write(b"220 relay.example.co.jp ESMTP\r\n")
        while line := self.rfile.readline():
            command = line.decode().strip()
            self.server.commands.append(command)
            verb = command.split(" ")[0].upper()
            if verb == "EHLO":
                reply = "250-relay.example.co.jp\r\n250 PIPELINING"
            elif verb == "RCPT":
                address = command.partition("<")[2].rstrip(">")
                reply = self.server.replies.get(address, "550 5.1.1 unknown")
            elif verb == "QUIT":
                self.wfile.write(b"221 2.0.0 Bye\r\n")
                return
            else:
                reply = "250 2.0.0 Ok"
            self.wfile.write(f"{reply}\r\n".encode())


@pytest.fixture
def smtp_server() -> Iterator[Callable[[Mapping[str, str]], ScriptedSmtp]]:
    servers: list[ScriptedSmtp] = []

    def start(replies: Mapping[str, str]) -> ScriptedSmtp:
        server = ScriptedSmtp(replies)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


POSTMASTER = f"postmaster@{DOMAIN}"
DENIED = "554 5.7.1 <x>: Relay access denied"


@pytest.mark.parametrize(("replies", "expected", "said"), [
    ({POSTMASTER: "250 2.1.5 Ok"}, True, "still accepts"),
    ({POSTMASTER: DENIED}, False, "refuses"),
    ({POSTMASTER: "450 4.7.1 try later"}, None, "450"),
    ({POSTMASTER: "250 2.1.5 Ok", "postmaster@example.net": "250 2.1.5 Ok"}, None,
     "proves nothing"),
])
def test_the_probe(smtp_server: Callable[[Mapping[str, str]], ScriptedSmtp],
                   replies: dict[str, str], expected: bool | None, said: str) -> None:
    server = smtp_server({"postmaster@example.net": DENIED, **replies})
    accepts, detail = probe_relay("127.0.0.1", server.port, DOMAIN, source="127.0.0.1")
    assert accepts is expected, detail
    assert said in detail
    verbs = [c.split(" ")[0].upper() for c in server.commands]
    assert "DATA" not in verbs  # nothing is ever sent
    assert verbs[:3] == ["EHLO", "MAIL", "RCPT"] and verbs[-2:] == ["RSET", "QUIT"]
    assert server.commands[1].upper() == "MAIL FROM:<>"
    assert server.peers == ["127.0.0.1"]


def test_an_unreachable_relay_is_unknown() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        accepts, detail = probe_relay("127.0.0.1", port, DOMAIN, timeout=2)
    assert accepts is None and "cannot reach 127.0.0.1" in detail


def test_probe_endpoint() -> None:
    assert probe_endpoint(Upstream(host="relay.example.co.jp.")) == ("relay.example.co.jp", 25)
    assert probe_endpoint(Upstream(host="relay.example.co.jp.", smtp="192.0.2.7:2525")) == (
        "192.0.2.7", 2525)


# --- one relay as the backend sees it -------------------------------------------------------


def test_a_readable_relay_is_not_probed_an_unreadable_one_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []

    def fake_probe(host: str, port: int, domain: str, **_: Any) -> tuple[bool | None, str]:
        calls.append((host, port))
        return True, "probe: still accepts"

    monkeypatch.setattr(upstream_module, "probe_relay", fake_probe)
    relay = Upstream(host="relay.example.co.jp.", connect="ssh://root@relay.example.co.jp",
                     config_dir=CONFIG_DIR)
    facts = relay_facts(relay, DOMAIN, reader(FakeRelay()))
    assert facts.observed and facts.accepts_domain is None and calls == []

    down = FakeRelay()
    down.down = True
    facts = relay_facts(relay, DOMAIN, reader(down))
    assert (facts.observed, facts.accepts_domain) == (False, True)
    assert calls == [("relay.example.co.jp", 25)]

    manual = Upstream(host="relay.example.co.jp.", smtp="192.0.2.7:2525")
    facts = relay_facts(manual, DOMAIN, None)
    assert facts == UpstreamFacts("relay.example.co.jp.", False, None, None, True, facts.detail)
    assert "a person confirms" in facts.detail and calls[-1] == ("192.0.2.7", 2525)


def test_the_backend_keeps_going_when_a_relay_does_not_open(tmp_path: Path) -> None:
    desired = state({}, onprem__upstream=[
        {"host": "relay.example.co.jp.", "connect": "ssh://root@127.0.0.1:9"},
        {"host": "relay2.example.co.jp."},
    ])
    relays = SystemBackend._open_relays(desired, tmp_path / "missing_known_hosts")
    assert [r.config.host for r in relays] == ["relay.example.co.jp.", "relay2.example.co.jp."]
    assert relays[0].reader is None and "known_hosts" in relays[0].unreadable
    assert "relay relay.example.co.jp." in relays[0].unreadable
    assert relays[1].reader is None and relays[1].unreadable == ""
