"""SPF (RFC 7208) and relay-whitelist sanity: pure functions on terms and networks.

Used by the schema (one rental term), the static rules (MR016, MR017) and the safety checks
on observed or simulated SPF records. Nothing here does I/O or DNS.

Decisions (documented in RULES["MR017"]):
- `+all` and bare `all` authorise every host on the internet: always a problem.
- `?all` is *neutral* (RFC 7208 section 2.6.2: no statement about the sender), so it
  authorises nobody and is allowed, like `~all` and `-all`.
- An `ip4:`/`ip6:` mechanism, or the CIDR suffix of `a`/`mx` (`a/8` authorises the /8 around
  each address), that *passes* (qualifier `+` or none) must not be wider than the same bounds
  as the relay whitelist. A non-passing one (`-ip4:10.0.0.0/8`) denies or is neutral and is
  not a problem.
- The DNS lookup limit (10, RFC 7208 section 4.6.4) is counted on the record itself (include,
  a, mx, ptr, exists, redirect); lookups inside included records are not visible here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_MIN_PREFIX_V4 = 24
DEFAULT_MIN_PREFIX_V6 = 48
MAX_DNS_LOOKUPS = 10  # RFC 7208 section 4.6.4

MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
DNS_MECHANISMS = frozenset({"include", "a", "mx", "ptr", "exists"})
QUALIFIERS = "+-~?"
PASS_QUALIFIERS = ("", "+")

# IPv6 prefixes that embed the whole IPv4 space in their last 32 bits: ::ffff:0:0/96
# (IPv4-mapped, how a dual-stack server sees IPv4 clients) and 64:ff9b::/96 (NAT64).
_V4_EMBEDDING = (
    ipaddress.IPv6Network("::ffff:0:0/96"),
    ipaddress.IPv6Network("64:ff9b::/96"),
)

# RFC 7208 section 7.1: macro-string, domain-end and toplabel.
_MACRO_EXPAND = r"%\{[slodiphcrtvSLODIPHCRTV][0-9]*[rR]?[.\-+,/_=]*\}|%%|%_|%-"
_MACRO_LITERAL = r"[\x21-\x24\x26-\x7e]"
_MACRO_STRING_RE = re.compile(rf"(?:{_MACRO_EXPAND}|{_MACRO_LITERAL})*", re.ASCII)
_MACRO_EXPAND_END_RE = re.compile(rf"(?:{_MACRO_EXPAND})\Z", re.ASCII)
_TOPLABEL_RE = re.compile(
    r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])\Z", re.ASCII
)
_CIDR4_RE = re.compile(r"(?:0|[1-9][0-9]?)\Z", re.ASCII)
_CIDR6_RE = re.compile(r"(?:0|[1-9][0-9]{0,2})\Z", re.ASCII)
_IP6_CHARS_RE = re.compile(r"[0-9A-Fa-f:.]+\Z", re.ASCII)
_MODIFIER_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9\-_.]*\Z", re.ASCII)

# What the state file may contain in an SPF term: stricter than RFC 7208's macro-literal
# (which allows quotes and backslashes; those break the TXT record's quoting and never match
# on verification). Qualifier characters are checked by the grammar afterwards.
_STRICT_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:/%{}+=,~?"
)


@dataclass(frozen=True)
class Term:
    """One parsed SPF term: a mechanism (`qualifier`, `name`, `argument`) or a modifier
    (`name=argument`, `modifier` True)."""

    text: str
    name: str  # lower case
    qualifier: str = ""
    argument: str | None = None  # domain-spec / ip / modifier value; None when absent
    cidr4: int | None = None  # a, mx: dual-cidr-length; ip4: prefix
    cidr6: int | None = None  # a, mx: dual-cidr-length; ip6: prefix
    network: IPNetwork | None = None  # ip4, ip6
    modifier: bool = False

    @property
    def passes(self) -> bool:
        """A mechanism whose match authorises the sender (qualifier `+` or none)."""
        return not self.modifier and self.qualifier in PASS_QUALIFIERS


class SpfSyntaxError(ValueError):
    """A term that is not RFC 7208 syntax; the message says why (never the whole record)."""


def describe_char(char: str) -> str:
    """`'\\\\' (U+005C, backslash)`: a character named so that a reader can see it."""
    names = {" ": "space", "\\": "backslash", '"': "double quote", "'": "single quote",
             "\t": "tab", "\n": "newline", "\r": "carriage return", ";": "semicolon",
             "`": "backquote"}
    code = f"U+{ord(char):04X}"
    if char in names:
        return f"{code} ({names[char]})"
    if not char.isprintable():
        return f"{code} (a control character)"
    if not char.isascii():
        return f"{char!r} ({code}, not ASCII)"
    return f"{char!r} ({code})"


def bad_character(term: str) -> str | None:
    """The first character the state file does not allow in an SPF term, described, or None.

    Allowed: ASCII letters and digits and `. _ - : / % { } + = , ~ ?` - no space, quote,
    backslash, control character or non-ASCII character."""
    for char in term:
        if char not in _STRICT_CHARS:
            return describe_char(char)
    return None


def _domain_spec_problem(spec: str) -> str | None:
    if not spec:
        return "an empty domain"
    if not _MACRO_STRING_RE.fullmatch(spec):
        return f"{spec!r} is not a domain-spec (a '%' starts a macro such as %{{d}})"
    if _MACRO_EXPAND_END_RE.search(spec):
        return None
    bare = spec[:-1] if spec.endswith(".") else spec
    head, dot, top = bare.rpartition(".")
    if not dot or not head or not _TOPLABEL_RE.match(top):
        return f"{spec!r} is not a domain name (it must end in a label such as .jp)"
    if any(not label for label in head.split(".") if "%" not in label):
        return f"{spec!r} has an empty label"
    return None


def _split_cidr(argument: str, *, dual: bool) -> tuple[str, str | None, str | None]:
    """`domain/24//64` -> (domain, "24", "64"); ip4/ip6 arguments use `dual=False`. A slash
    followed by something other than digits belongs to the domain (a macro delimiter)."""
    base, v4, v6 = argument, None, None
    if dual:
        head, sep, tail = base.rpartition("//")
        if sep and tail.isascii() and tail.isdigit():
            base, v6 = head, tail
    head, sep, tail = base.rpartition("/")
    if sep and (not dual or (tail.isascii() and tail.isdigit())):
        base, v4 = head, tail
    return base, v4, v6


def _prefix(text: str | None, pattern: re.Pattern[str], limit: int, what: str) -> int | None:
    if text is None:
        return None
    if not pattern.match(text) or int(text) > limit:
        raise SpfSyntaxError(f"/{text} is not an {what} prefix length (0..{limit})")
    return int(text)


def parse_term(text: str) -> Term:
    """Parse one SPF term (not `v=spf1`). Raises SpfSyntaxError naming the problem."""
    if not text:
        raise SpfSyntaxError("an empty term")
    for char in text:
        if not ("\x21" <= char <= "\x7e"):
            raise SpfSyntaxError(f"character {describe_char(char)} is not allowed in SPF")
    qualifier = text[0] if text[0] in QUALIFIERS else ""
    body = text[len(qualifier):]
    match = re.match(r"([A-Za-z][A-Za-z0-9\-_.]*)([:=/]?)", body, re.ASCII)
    if not match:
        raise SpfSyntaxError(f"{text!r} does not start with a mechanism or modifier name")
    name, separator = match.group(1).lower(), match.group(2)
    rest = body[match.end():]
    if separator == "=":
        if qualifier:
            raise SpfSyntaxError(f"{text!r}: a modifier takes no qualifier")
        if not _MODIFIER_NAME_RE.match(match.group(1)):
            raise SpfSyntaxError(f"{text!r} is not a modifier name")
        if name in ("redirect", "exp"):
            problem = _domain_spec_problem(rest)
            if problem:
                raise SpfSyntaxError(f"{name}= needs a domain: {problem}")
        elif not _MACRO_STRING_RE.fullmatch(rest):
            raise SpfSyntaxError(f"{text!r}: the modifier's value is not a macro-string")
        return Term(text, name, argument=rest, modifier=True)
    if name not in MECHANISMS:
        raise SpfSyntaxError(
            f"unknown mechanism {match.group(1)!r} (RFC 7208 knows {', '.join(MECHANISMS)})"
        )
    argument = (rest if separator == ":" else separator + rest) if separator else rest
    if name == "all":
        if separator or rest:
            raise SpfSyntaxError(f"{text!r}: 'all' takes no argument")
        return Term(text, name, qualifier)
    if name in ("include", "exists"):
        if separator != ":":
            raise SpfSyntaxError(f"{name} needs a domain ({name}:example.net)")
        problem = _domain_spec_problem(rest)
        if problem:
            raise SpfSyntaxError(f"{name}: {problem}")
        return Term(text, name, qualifier, rest)
    if name == "ptr":
        if separator == "/" or (separator == "" and rest):
            raise SpfSyntaxError(f"{text!r}: ptr takes no CIDR length")
        if separator == ":":
            problem = _domain_spec_problem(rest)
            if problem:
                raise SpfSyntaxError(f"ptr: {problem}")
            return Term(text, name, qualifier, rest)
        return Term(text, name, qualifier)
    if name in ("a", "mx"):
        if separator == "" and rest:
            raise SpfSyntaxError(f"{text!r} is not a mechanism")
        if separator == ":":
            domain, cidr4, cidr6 = _split_cidr(rest, dual=True)
            problem = _domain_spec_problem(domain)
            if problem:
                raise SpfSyntaxError(f"{name}: {problem}")
        else:  # "a", "a/24", "a//64", "a/24//64"
            domain = None
            _, cidr4, cidr6 = _split_cidr(argument, dual=True)
        v4 = _prefix(cidr4, _CIDR4_RE, 32, "IPv4")
        v6 = _prefix(cidr6, _CIDR6_RE, 128, "IPv6")
        return Term(text, name, qualifier, domain, v4, v6)
    # ip4 / ip6
    if separator != ":":
        raise SpfSyntaxError(f"{name} needs an address ({name}:192.0.2.0/24)")
    address, cidr, _ = _split_cidr(rest, dual=False)
    if name == "ip4":
        v4 = _prefix(cidr, _CIDR4_RE, 32, "IPv4")
        if not re.fullmatch(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}", address,
                            re.ASCII):
            raise SpfSyntaxError(f"ip4: {address!r} is not an IPv4 address")
        try:
            network: IPNetwork = ipaddress.IPv4Network(f"{address}/{32 if v4 is None else v4}",
                                                       strict=False)
        except ValueError:
            raise SpfSyntaxError(f"ip4: {address!r} is not an IPv4 address") from None
        return Term(text, name, qualifier, rest, cidr4=network.prefixlen, network=network)
    v6 = _prefix(cidr, _CIDR6_RE, 128, "IPv6")
    if not _IP6_CHARS_RE.match(address):
        raise SpfSyntaxError(f"ip6: {address!r} is not an IPv6 address")
    try:
        network = ipaddress.IPv6Network(f"{address}/{128 if v6 is None else v6}", strict=False)
    except ValueError:
        raise SpfSyntaxError(f"ip6: {address!r} is not an IPv6 address") from None
    return Term(text, name, qualifier, rest, cidr6=network.prefixlen, network=network)


def effective_prefix(network: IPNetwork) -> tuple[int, int]:
    """(IP version, prefix length) of the addresses a network really covers. An IPv6 network
    inside ::ffff:0:0/96 (IPv4-mapped: how a dual-stack server sees IPv4 clients) or
    64:ff9b::/96 (NAT64) covers IPv4 addresses, so it counts as IPv4; one that contains such
    a prefix whole (e.g. ::/64) covers every IPv4 address: (4, 0)."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen:
        for embedding in _V4_EMBEDDING:
            if network.prefixlen >= embedding.prefixlen and network.subnet_of(embedding):
                return 4, network.prefixlen - embedding.prefixlen
            if network.prefixlen < embedding.prefixlen and embedding.subnet_of(network):
                return 4, 0
    return network.version, network.prefixlen


def is_too_wide(network: IPNetwork, *, min_prefix_v4: int, min_prefix_v6: int) -> bool:
    """True if `network` is wider than /min_prefix_v4 (IPv4) or /min_prefix_v6 (IPv6), and
    always for a default route (0.0.0.0/0, ::/0, ::ffff:0:0/96), whatever the bounds."""
    version, prefix = effective_prefix(network)
    if prefix == 0:
        return True
    return prefix < (min_prefix_v4 if version == 4 else min_prefix_v6)


def too_wide(
    networks: Iterable[IPNetwork], *, min_prefix_v4: int, min_prefix_v6: int
) -> list[IPNetwork]:
    """The networks (in the given order) that are wider than the bounds: see is_too_wide."""
    return [n for n in networks
            if is_too_wide(n, min_prefix_v4=min_prefix_v4, min_prefix_v6=min_prefix_v6)]


def width_text(network: IPNetwork) -> str:
    """`10.0.0.0/8 (2^24 addresses)`, `::/0 (every address: a default route)` for findings."""
    version, prefix = effective_prefix(network)
    if network.prefixlen == 0:
        return f"{network} (every address: a default route)"
    if prefix == 0:
        return f"{network} (every IPv4 address, mapped into IPv6)"
    bits = (32 if version == 4 else 128) - prefix
    return f"{network} (2^{bits} addresses)" if bits > 16 else f"{network} ({2 ** bits} addresses)"


def term_problems(term: str, *, min_prefix_v4: int, min_prefix_v6: int) -> list[str]:
    """What is wrong with one SPF term on its own: syntax, `+all`/`all`, a passing
    ip4/ip6/a/mx wider than the bounds. [] when it is fine."""
    try:
        parsed = parse_term(term)
    except SpfSyntaxError as exc:
        return [f"{term!r} is not RFC 7208 syntax: {exc}"]
    problems: list[str] = []
    if parsed.name == "all" and parsed.passes:
        problems.append(
            f"{term!r} authorises every host on the internet to send as the domain "
            "(use ~all or -all; ?all is neutral)"
        )
    if parsed.passes and parsed.network is not None and is_too_wide(
        parsed.network, min_prefix_v4=min_prefix_v4, min_prefix_v6=min_prefix_v6
    ):
        version, _ = effective_prefix(parsed.network)
        bound = min_prefix_v4 if version == 4 else min_prefix_v6
        problems.append(
            f"{term!r} authorises {width_text(parsed.network)}: wider than /{bound}"
        )
    if parsed.passes and parsed.name in ("a", "mx"):
        if parsed.cidr4 is not None and (parsed.cidr4 == 0 or parsed.cidr4 < min_prefix_v4):
            problems.append(f"{term!r} authorises a /{parsed.cidr4} around each IPv4 address "
                            f"{parsed.name} names: wider than /{min_prefix_v4}")
        if parsed.cidr6 is not None and (parsed.cidr6 == 0 or parsed.cidr6 < min_prefix_v6):
            problems.append(f"{term!r} authorises a /{parsed.cidr6} around each IPv6 address "
                            f"{parsed.name} names: wider than /{min_prefix_v6}")
    return problems


def dns_lookup_terms(terms: Sequence[str]) -> int:
    """How many terms of the record make a DNS query (include, a, mx, ptr, exists and the
    redirect modifier; RFC 7208 section 4.6.4 allows 10). Unparseable terms do not count."""
    count = 0
    for term in terms:
        if term.lower() == "v=spf1":
            continue
        try:
            parsed = parse_term(term)
        except SpfSyntaxError:
            continue
        queries = parsed.name == "redirect" if parsed.modifier else parsed.name in DNS_MECHANISMS
        if queries:
            count += 1
    return count


def spf_problems(terms: Sequence[str], *, min_prefix_v4: int, min_prefix_v6: int) -> list[str]:
    """Everything RFC 7208 and the relay policy say is wrong with one SPF record, given as its
    terms (the record split on whitespace, "v=spf1" included). [] when it is fine.

    Checks: "v=spf1" first and exactly once; every term well-formed; no `+all`/`all`; no
    passing ip4/ip6 (or a/mx CIDR) wider than the bounds; at most 10 DNS-querying terms;
    redirect= and exp= at most once each. No terms at all (the domain has no SPF record) is
    not checked here: txt_problems says whether a record exists."""
    if not terms:
        return []
    problems: list[str] = []
    versions = [i for i, t in enumerate(terms) if t.lower() == "v=spf1"]
    if not terms or terms[0].lower() != "v=spf1":
        problems.append("the record does not start with v=spf1")
    if len(versions) > 1:
        problems.append(f"v=spf1 appears {len(versions)} times in one record")
    modifiers: dict[str, int] = {}
    for term in terms:
        if term.lower() == "v=spf1":
            continue
        problems.extend(term_problems(term, min_prefix_v4=min_prefix_v4,
                                      min_prefix_v6=min_prefix_v6))
        try:
            parsed = parse_term(term)
        except SpfSyntaxError:
            continue
        if parsed.modifier:
            modifiers[parsed.name] = modifiers.get(parsed.name, 0) + 1
    for name in ("redirect", "exp"):
        if modifiers.get(name, 0) > 1:
            problems.append(f"{name}= appears {modifiers[name]} times (at most once)")
    lookups = dns_lookup_terms(terms)
    if lookups > MAX_DNS_LOOKUPS:
        problems.append(
            f"{lookups} terms need DNS lookups (include, a, mx, ptr, exists, redirect): "
            f"receivers fail the record (permerror) above {MAX_DNS_LOOKUPS}"
        )
    return problems


def spf_records(txt_records: Iterable[str]) -> list[str]:
    """The SPF records among a name's TXT records (each the joined text of one record):
    those whose first term is v=spf1 (RFC 7208 section 4.5)."""
    return [r for r in txt_records if r.split(maxsplit=1)[:1] and
            r.split(maxsplit=1)[0].lower() == "v=spf1"]


def txt_problems(
    txt_records: Iterable[str], *, min_prefix_v4: int, min_prefix_v6: int
) -> list[str]:
    """spf_problems for a name's TXT records, plus: exactly one of them is an SPF record
    (none means no policy; two or more make every receiver answer permerror)."""
    records = spf_records(txt_records)
    if not records:
        return ["no v=spf1 record"]
    problems: list[str] = []
    if len(records) > 1:
        problems.append(f"{len(records)} v=spf1 records (exactly one is allowed: receivers "
                        "answer permerror)")
    for record in records:
        problems.extend(spf_problems(record.split(), min_prefix_v4=min_prefix_v4,
                                     min_prefix_v6=min_prefix_v6))
    return problems


def authorises_address(terms: Sequence[str], address: IPAddress) -> bool:
    """Whether a passing ip4/ip6 term of the record names `address` (a, mx and include are
    not resolved here: they do not count, so the answer errs towards "not authorised")."""
    for text in terms:
        try:
            term = parse_term(text)
        except SpfSyntaxError:
            continue
        if term.passes and term.network is not None and address in term.network:
            return True
    return False
