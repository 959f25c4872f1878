"""reconciler.spf: RFC 7208 term syntax, the open-relay bounds (MR016) and the SPF record
checks (MR017), as pure functions."""

from __future__ import annotations

import ipaddress

import pytest

from reconciler.spf import (
    SpfSyntaxError,
    bad_character,
    dns_lookup_terms,
    effective_prefix,
    is_too_wide,
    parse_term,
    spf_problems,
    term_problems,
    too_wide,
    txt_problems,
)

BOUNDS = {"min_prefix_v4": 24, "min_prefix_v6": 48}


def nets(*texts: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(t) for t in texts]


# --- the relay whitelist (MR016) ----------------------------------------------------------


def test_too_wide_keeps_order_and_uses_the_bounds() -> None:
    whitelist = nets("203.0.113.8/29", "10.0.0.0/8", "198.51.100.0/24", "2001:db8::/32",
                     "2001:db8:1::/48", "192.0.2.0/23")
    assert too_wide(whitelist, **BOUNDS) == nets("10.0.0.0/8", "2001:db8::/32", "192.0.2.0/23")
    assert too_wide(whitelist, min_prefix_v4=8, min_prefix_v6=32) == []


@pytest.mark.parametrize("text", ["0.0.0.0/0", "::/0", "::ffff:0:0/96", "64:ff9b::/96", "::/64"])
def test_a_default_route_is_too_wide_whatever_the_bounds(text: str) -> None:
    """Also the IPv6 forms that hold every IPv4 address (mapped, NAT64, or a network
    containing ::ffff:0:0/96): a dual-stack rental sees IPv4 clients that way."""
    network = ipaddress.ip_network(text)
    assert is_too_wide(network, min_prefix_v4=1, min_prefix_v6=1)
    assert too_wide([network], min_prefix_v4=1, min_prefix_v6=1) == [network]


def test_ipv4_mapped_networks_are_judged_as_ipv4() -> None:
    assert effective_prefix(ipaddress.ip_network("::ffff:203.0.113.8/125")) == (4, 29)
    assert not is_too_wide(ipaddress.ip_network("::ffff:203.0.113.8/125"), **BOUNDS)
    assert is_too_wide(ipaddress.ip_network("::ffff:10.0.0.0/104"), **BOUNDS)  # a /8


# --- one term ---------------------------------------------------------------------------


@pytest.mark.parametrize("term", [
    "include:_spf.example.sakura.ne.jp", "a", "a:mail.example.net", "a/29",
    "a:x.example.net/28//64",
    "mx", "mx:example.net", "ptr", "ptr:example.net", "ip4:203.0.113.8/29", "ip4:192.0.2.1",
    "ip6:2001:db8::/48", "ip6:2001:db8::1", "exists:%{i}._spf.%{d}", "a:%{i/}.example.com",
    "-all", "~all", "?all", "redirect=_spf.example.net", "exp=explain.%{d2}", "custom=value",
    "INCLUDE:EXAMPLE.NET", "?ip4:0.0.0.0/0", "-ip4:10.0.0.0/8",
])
def test_well_formed_terms_have_no_problem(term: str) -> None:
    assert term_problems(term, **BOUNDS) == []


@pytest.mark.parametrize(("term", "why"), [
    ("include:", "empty domain"),
    ("include:localhost", "not a domain name"),
    ("include", "needs a domain"),
    ("ip4:1.2.3.04", "not an IPv4 address"),
    ("ip4:256.1.1.1", "not an IPv4 address"),
    ("ip4:1.2.3.4/33", "prefix length"),
    ("ip4:1.2.3.4/08", "prefix length"),
    ("ip6:fe80::1%eth0", "not an IPv6 address"),
    ("ip6:2001:db8::/129", "prefix length"),
    ("all:x", "takes no argument"),
    ("ptr/24", "no CIDR"),
    ("foo:bar", "unknown mechanism"),
    ("a:exa mple.com", "U+0020 (space)"),
    ("-redirect=x.example", "no qualifier"),
    ("include:bad%x.example", "macro"),
])
def test_malformed_terms_say_why(term: str, why: str) -> None:
    problems = term_problems(term, **BOUNDS)
    assert len(problems) == 1 and "not RFC 7208 syntax" in problems[0], problems
    assert why in problems[0]
    with pytest.raises(SpfSyntaxError):
        parse_term(term)


@pytest.mark.parametrize(("term", "why"), [
    ("+all", "every host"),
    ("all", "every host"),
    ("ip4:0.0.0.0/0", "default route"),
    ("+ip4:10.0.0.0/8", "wider than /24"),
    ("ip6:::/0", "default route"),
    ("ip6:2001:db8::/32", "wider than /48"),
    ("ip6:::ffff:0:0/96", "every IPv4 address"),
    ("a/0", "/0 around each IPv4"),
    ("mx:example.net/24//16", "/16 around each IPv6"),
])
def test_terms_that_authorise_too_much(term: str, why: str) -> None:
    problems = term_problems(term, **BOUNDS)
    assert problems and why in " ".join(problems), problems


def test_bad_character_names_the_character() -> None:
    assert bad_character("include:_spf.example.sakura.ne.jp") is None
    assert bad_character("exists:%{i}._spf.%{d}") is None
    assert bad_character("include:a\\b.jp") == "U+005C (backslash)"
    assert bad_character('include:"x".jp') == "U+0022 (double quote)"
    assert bad_character("include:a b.jp") == "U+0020 (space)"
    assert bad_character("include:a\x01.jp") == "U+0001 (a control character)"
    assert bad_character("include:さくら.jp") == "'さ' (U+3055, not ASCII)"
    assert bad_character("ip4:\u0661.2.3.4") == "'\u0661' (U+0661, not ASCII)"


# --- a whole record -----------------------------------------------------------------------


def test_a_good_record() -> None:
    record = ["v=spf1", "ip4:198.51.100.10", "include:_spf.example.sakura.ne.jp", "~all"]
    assert spf_problems(record, **BOUNDS) == []
    assert dns_lookup_terms(record) == 1
    assert spf_problems([], **BOUNDS) == [], "no record: nothing to check here"


def test_ten_lookups_pass_eleven_fail() -> None:
    ten = ["v=spf1", *(f"include:s{i}.example.net" for i in range(7)), "a", "mx", "ptr", "-all"]
    assert dns_lookup_terms(ten) == 10
    assert spf_problems(ten, **BOUNDS) == []
    eleven = [*ten[:-1], "redirect=x.example.net"]
    assert dns_lookup_terms(eleven) == 11
    assert any("11 terms need DNS lookups" in p for p in spf_problems(eleven, **BOUNDS))
    # ip4/ip6/all and exp= make no lookup during evaluation.
    assert dns_lookup_terms(["v=spf1", "ip4:192.0.2.1", "ip6:2001:db8::1", "exp=x.example",
                             "-all"]) == 0


def test_version_must_be_first_and_once() -> None:
    assert "does not start with v=spf1" in spf_problems(["include:x.example", "-all"],
                                                         **BOUNDS)[0]
    assert any("2 times" in p for p in spf_problems(["v=spf1", "v=spf1", "-all"], **BOUNDS))
    assert spf_problems(["V=SPF1", "-all"], **BOUNDS) == []  # case-insensitive (RFC 7208 4.5)


def test_modifiers_at_most_once() -> None:
    record = ["v=spf1", "redirect=a.example", "redirect=b.example"]
    assert any("redirect= appears 2 times" in p for p in spf_problems(record, **BOUNDS))


def test_plus_all_and_wide_ranges_in_a_record() -> None:
    problems = spf_problems(["v=spf1", "ip4:0.0.0.0/0", "include:x.example", "+all"], **BOUNDS)
    assert len(problems) == 2
    assert spf_problems(["v=spf1", "ip4:198.51.100.10", "?all"], **BOUNDS) == []


def test_exactly_one_spf_txt_record() -> None:
    other = "google-site-verification=abc"
    assert txt_problems(["v=spf1 -all", other], **BOUNDS) == []
    assert txt_problems([other], **BOUNDS) == ["no v=spf1 record"]
    two = txt_problems(["v=spf1 -all", "v=spf1 ip4:192.0.2.1 -all"], **BOUNDS)
    assert any("2 v=spf1 records" in p for p in two)
    assert txt_problems(["v=spf1x -all"], **BOUNDS) == ["no v=spf1 record"]
