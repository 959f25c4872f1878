"""What the planner learns from a router configuration: each filter's verdict on the office's
SMTP traffic, the tcp/25 egress by first match, and every line that uses a filter number."""

from __future__ import annotations

import ipaddress

import pytest

from reconciler.drivers.router import world_facts
from reconciler.drivers.rtx.config import RtxConfig, parse_node
from reconciler.drivers.rtx.driver import router_facts
from reconciler.drivers.rtx.policy import RtxPolicyError, SmtpRoute, plan_commands
from reconciler.drivers.rtx.queries import (
    filter_references,
    filter_verdict,
    lan_networks,
    line_filter_numbers,
)
from reconciler.world import Coverage, FilterVerdict, tcp25_egress

from .conftest import corpus_config

ALL, SOME, NONE = Coverage.ALL, Coverage.SOME, Coverage.NONE
LAN = (ipaddress.IPv4Network("192.168.0.0/24"),)


def _verdict(rest: str, lans: tuple[ipaddress.IPv4Network, ...] = LAN) -> FilterVerdict:
    node = parse_node(f"ip filter 1 {rest}")
    assert node is not None and node.__class__.__name__ == "IpFilter", rest
    return filter_verdict(node, lans)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rest", "passes", "coverage"),
    [
        # mailrec's own rule and its other spellings
        ("pass * * tcp * smtp", True, ALL),
        ("pass-log * * 6 * 25", True, ALL),
        ("pass-nolog * * tcp,udp * smtp,submission", True, ALL),
        ("pass * * tcp * 20-30", True, ALL),
        ("pass * *", True, ALL),  # protocol and ports left out: everything
        ("pass * * * * *", True, ALL),
        ("restrict * * tcp * smtp", True, ALL),  # restrict counts as pass (fail closed)
        ("reject * * * * *", False, ALL),
        ("reject-log * * tcp * 1-1023", False, ALL),
        # the source: the LAN (192.168.0.0/24) covered, partly covered, or missed
        ("pass 192.168.0.0/24 * * * *", True, ALL),
        ("pass 192.168.0.0/255.255.255.0 * tcp * smtp", True, ALL),
        ("pass 192.168.0.0/25,192.168.0.128/25 * tcp * smtp", True, ALL),
        ("pass 192.168.0.0-192.168.0.255 * tcp * smtp", True, ALL),
        ("pass 192.168.0.* * tcp * smtp", True, ALL),
        ("pass 192.168.0.0/16 * tcp * smtp", True, ALL),
        ("pass 192.168.0.0/25 * tcp * smtp", True, SOME),
        ("pass 192.168.0.25 * tcp * smtp", True, SOME),
        ("pass 192.168.0.10-192.168.0.20 * tcp * smtp", True, SOME),
        ("pass 10.0.0.0/8 * tcp * smtp", True, NONE),
        ("reject 172.16.0.1,10.1.1.1 * * * *", False, NONE),
        ("pass mail.example.co.jp * tcp * smtp", True, SOME),  # a name: cannot tell
        ("pass 192.*.0.1 * tcp * smtp", True, SOME),  # an inner wildcard: cannot tell
        # the destination: the rental's address is an unknown Internet address
        ("pass * 198.51.100.10 tcp * smtp", True, SOME),
        ("pass * 203.0.113.0/24 tcp * smtp", True, SOME),
        ("pass * www.example.com tcp * smtp", True, SOME),
        ("pass * 10.0.0.0/8 tcp * smtp", True, NONE),  # not on the Internet
        ("reject * 192.168.0.0/16,172.16.0.0/12 * * *", False, NONE),
        # the protocol
        ("pass * * udp * 25", True, NONE),
        ("pass * * 17 * 25", True, NONE),
        ("pass * * icmp", True, NONE),
        ("pass * * gre", True, NONE),
        ("pass * * established", True, SOME),
        ("reject-nolog * * established * *", False, SOME),
        ("pass * * tcpsyn * smtp", True, SOME),
        ("pass * * udp,tcpfin * 25", True, SOME),
        ("pass * * tcpflag=0x0002/0x0017 * smtp", True, SOME),
        ("pass * * tcpflag!=0x0002/0x0017 * *", True, SOME),
        # the destination port
        ("pass * * tcp * www,https", True, NONE),
        ("reject * * tcp * 26-", False, NONE),
        ("pass * * tcp * 1024-", True, NONE),
        ("pass * * tcp * netbios_ns-netbios_ssn", True, NONE),
        # the source port (the client's is ephemeral, 1024-65535)
        ("pass * * tcp 1024-65535 smtp", True, ALL),
        ("pass * * tcp 1024- smtp", True, ALL),
        ("pass * * tcp 49152-65535 smtp", True, SOME),
        ("pass * * tcp smtp *", True, NONE),
        ("restrict-log * * tcp -1023 *", True, NONE),
        ("pass * * tcp ftpdata,ftp,telnet,smtp,domain,www,pop3,ident,nntp,ntp *", True, NONE),
    ],
)
def test_verdict_on_the_office_smtp_traffic(rest: str, passes: bool, coverage: Coverage) -> None:
    assert _verdict(rest) == FilterVerdict(passes, coverage)


def test_without_a_known_lan_a_source_restriction_decides_nothing() -> None:
    assert _verdict("pass 10.0.0.0/8 * tcp * smtp", lans=()) == FilterVerdict(True, SOME)
    assert _verdict("pass 192.168.0.0/24 * tcp * smtp", lans=()) == FilterVerdict(True, SOME)
    assert _verdict("pass * * tcp * smtp", lans=()) == FilterVerdict(True, ALL)


def test_every_known_lan_must_be_covered() -> None:
    lans = (ipaddress.IPv4Network("192.168.0.0/24"), ipaddress.IPv4Network("10.1.0.0/16"))
    assert _verdict("pass 192.168.0.0/24 * tcp * smtp", lans) == FilterVerdict(True, SOME)
    both = "pass 192.168.0.0/24,10.1.0.0/16 * tcp * smtp"
    assert _verdict(both, lans) == FilterVerdict(True, ALL)


def test_lan_networks_come_from_the_lan_address_lines() -> None:
    config = corpus_config("rtx1220_filter_forms.conf")
    assert [str(n) for n in lan_networks(config)] == [
        "10.10.0.0/16", "192.0.2.0/24", "10.99.0.0/30"
    ]
    assert [str(n) for n in lan_networks(corpus_config("rtx830_dhcp_wan_crlf.conf"))] == [
        "192.168.20.0/24"  # `ip lan2 address dhcp` names no network
    ]


def test_verdicts_of_the_filter_forms_corpus() -> None:
    facts = world_facts(corpus_config("rtx1220_filter_forms.conf"))
    got = {n: (v.passes, v.coverage) for n, v in facts.verdicts.items()}
    assert got == {
        1: (True, SOME),  # 10.10.0.0/16 only: the other LANs are not covered
        2: (False, ALL),
        3: (True, NONE), 4: (True, NONE), 5: (False, NONE), 6: (False, NONE),
        7: (True, NONE), 8: (True, NONE), 9: (True, NONE), 11: (True, NONE),
        12: (True, NONE), 13: (True, NONE),
        14: (True, SOME),  # established
        15: (True, NONE), 16: (True, NONE), 17: (True, NONE),
        18: (True, SOME),
        19: (True, NONE), 20: (True, NONE),
        21: (True, ALL), 22: (True, ALL),
        23: (True, NONE), 24: (True, NONE),
        25: (True, ALL),
    }
    assert facts.filters == frozenset({21, 22})
    assert facts.other_filters == frozenset(facts.verdicts) - {21, 22}
    assert facts.filter_lines[7] == "ip filter 7 restrict * * tcp * 1024-"


# --- egress ---------------------------------------------------------------------------------

ISSUE_5 = (
    "ip route default gateway 192.0.2.1 filter 1 2 gateway 192.168.0.254 filter 10 "
    "gateway tunnel 2\n"
    "ip lan1 address 192.168.0.1/24\n"
    "ip filter 1 pass 192.168.0.0/24 * * * *\n"
    "ip filter 10 pass * * tcp * smtp\n"
)


def test_issue_5_tcp25_leaves_through_the_first_gateway() -> None:
    config = RtxConfig.parse(ISSUE_5)
    facts = world_facts(config)
    assert facts.verdicts[1] == FilterVerdict(True, ALL)
    assert "192.0.2.1" in facts.smtp_egress()
    assert facts.smtp_egress() == ("192.0.2.1",)
    assert tcp25_egress(facts.default_route, facts.verdicts) == ("192.0.2.1",)
    # The driver's own facts ask the same function.
    assert router_facts(config).smtp_egress == ("192.0.2.1",)
    assert router_facts(config).smtp_gateway == "192.0.2.1"
    # ... and the policy planner refuses, naming the admin entry that catches it first.
    with pytest.raises(RtxPolicyError) as caught:
        plan_commands(config, SmtpRoute(10, "192.168.0.254", "tunnel 2"))
    message = str(caught.value)
    assert "'gateway 192.0.2.1 filter 1 2' comes first" in message
    assert "'ip filter 1 pass 192.168.0.0/24 * * * *'" in message and "passes all" in message


def test_a_partial_filter_follows_both_outcomes() -> None:
    config = RtxConfig.parse(ISSUE_5.replace("192.168.0.0/24 * * * *", "192.168.0.0/25 * * * *"))
    assert world_facts(config).smtp_egress() == ("192.0.2.1", "192.168.0.254")
    assert router_facts(config).smtp_gateway is None
    assert router_facts(config).smtp_egress == ("192.0.2.1", "192.168.0.254")


def test_a_filter_that_cannot_match_smtp_lets_it_through() -> None:
    config = RtxConfig.parse(ISSUE_5.replace("192.168.0.0/24 * * * *", "192.168.0.0/24 * udp"))
    assert world_facts(config).smtp_egress() == ("192.168.0.254",)
    assert plan_commands(config, SmtpRoute(10, "192.168.0.254", "tunnel 2")) == []


# --- references -----------------------------------------------------------------------------

REFERENCES = corpus_config("rtx1220_filter_references.conf")

# number -> the lines that use it, one reference kind per number.
EXPECTED_REFERENCES: dict[int, tuple[str, ...]] = {
    11: ("ip lan1 secure filter in 11 1100 dynamic 12",),
    12: ("ip lan1 secure filter in 11 1100 dynamic 12",),
    13: ("ip lan1 rip filter in 13",),
    14: ("ip lan2 secure filter name office", "ip filter set office in 14 1100"),
    15: ("ip lan2 secure filter name office", "ip filter set office out 15 1101 dynamic 16"),
    16: ("ip lan2 secure filter name office", "ip filter set office out 15 1101 dynamic 16"),
    17: ("ip forward filter lan1 17 gateway tunnel 2 filter 18 1100",),
    18: ("ip forward filter lan1 17 gateway tunnel 2 filter 18 1100",),
    19: ("rip filter out 19",),
    21: ("ip filter directed-broadcast filter 21 22",),
    22: ("ip filter directed-broadcast filter 21 22",),
    23: ("ip pp secure filter in 23 1100",),
    24: ("ip pp secure filter out 1101 dynamic 24",),
    25: ("ip pp rip filter in 25",),
    26: ("ip tunnel secure filter in 26",),
    27: ("ipv6 tunnel secure filter in 27",),
    28: ("ip filter dynamic 28 * * ftp",),
    29: ("ip filter dynamic 29 * * filter 30 in 1100 out 1101",),
    30: ("ip filter dynamic 29 * * filter 30 in 1100 out 1101",),
    31: ("ip route 10.20.0.0/16 gateway 192.168.0.253 filter 31 metric 2",),
    32: ("ipv6 lan2 secure filter in 32 dynamic 33",),
    33: ("ipv6 lan2 secure filter in 32 dynamic 33", "ipv6 filter dynamic 33 * * www"),
    34: ("ipv6 filter 34 pass * * icmp6 * *",),
    35: ("schedule at 1 */* 12:00 * ip lan1 secure filter in 35 1100",),
    36: ("ethernet lan1 filter in 36",),
}


def test_every_kind_of_reference_is_found() -> None:
    found = filter_references(REFERENCES)
    for number, lines in EXPECTED_REFERENCES.items():
        assert found[number] == lines, number
    # The default route, numbers that are not filter numbers, and descriptions are not uses.
    assert 500 not in found and 1 not in found and 2 not in found and 37 not in found
    assert 40 not in found
    assert set(found) == set(EXPECTED_REFERENCES) | {1100, 1101}
    assert len(found[1100]) == 7
    assert world_facts(REFERENCES).references == found


def test_the_yamaha_default_filter_1010_is_referenced() -> None:
    facts = world_facts(corpus_config("rtx1210_story_unmanaged.conf"))
    assert facts.filter_lines[1010] == "ip filter 1010 reject * * udp,tcp 135 *"
    assert facts.references[1010] == (
        "ip lan1 secure filter out 1010 1011 1012 1013 1014 1015 3000 dynamic 100 101 102 103 "
        "104 105 106",
        "ip lan2 secure filter out 1010 1011 1012 1013 1014 1015 3000 dynamic 100 101 102 103 "
        "104 105 106",
        "ip tunnel secure filter out 1010 1011 1012 1013 1014 1015 3000 dynamic 100 101 102 103 "
        "104 105 106",
    )
    assert 10 not in facts.references


@pytest.mark.parametrize(
    ("line", "numbers"),
    [
        ("ip filter 10 pass", [10]),  # a static definition the parser did not understand
        ("ip lan1 secure filter in 1 2 dynamic 3 4", [1, 2, 3, 4]),
        ("ip filter directed-broadcast on", []),
        ("ip filter source-route on", []),
        ("nat descriptor address outer 1 dynamic 5", []),  # `dynamic` outside a filter list
        ("ip route 10.0.0.0/8 gateway tunnel 1 filter 5 6 metric 2", [5, 6]),
        ("ip keepalive 1 icmp-echo 10 5 192.168.0.254", []),
        ("# ip lan1 secure filter in 9", []),
    ],
)
def test_line_filter_numbers(line: str, numbers: list[int]) -> None:
    assert line_filter_numbers(line.split())[0] == numbers


def test_a_filter_set_name_that_is_not_defined_references_nothing() -> None:
    config = RtxConfig.parse(
        "ip route default gateway tunnel 1\nip lan2 secure filter name missing\n"
    )
    assert filter_references(config) == {}
