"""Questions the planner asks about a parsed RTX configuration: what each static filter does
to the office's SMTP traffic, and which lines use a filter number.

Where it sits: `config.py` parses and prints the configuration; this module reads it.
`drivers/router.py` turns the answers into `reconciler.world.RouterFacts`, `policy.py`
refuses with them, and `driver.py` computes the tcp/25 egress from the same verdicts with
`reconciler.world.tcp25_egress` (the one function safety uses too).

The office's SMTP traffic is: tcp packets to destination port 25, from a LAN host (an
address of a network of an `ip lanN address` line), from an ephemeral source port
(1024-65535), to an Internet address that cannot be known in advance. A filter is
classified against that traffic as a whole:

- NONE: it cannot match such a packet (the protocol excludes tcp, the destination port list
  excludes 25, the source lies outside every LAN network, the source port list excludes the
  ephemeral range, the destination lies in address space that is not the Internet);
- ALL: it matches every such packet;
- SOME: anything in between, or what cannot be decided here (address lists that cover part
  of the LAN, names, `established`/`tcpsyn`/`tcpflag=` forms, unknown words). When in
  doubt, SOME: the planner then follows both outcomes.

`pass*` and `restrict*` select the gateway (restrict counts as pass: fail closed); `reject*`
skips it.

References: every line other than the default route that uses a filter number, or defines
that number in another namespace, is found by scanning its words (so an unmodelled line,
or a modelled one with a word a newer firmware added, is still seen): interface secure
filter lists (by number, and by name through `ip filter set`), dynamic filters and the
static filters they name, `ip forward filter`, RIP filters, `ip filter directed-broadcast
filter`, IPv6 filters and secure filter lists, non-default routes, and any other line that
lists numbers after a `filter` keyword (ethernet and URL filters, `schedule` lines that
run such a command). mailrec never takes such a number.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from reconciler.drivers.rtx.config import (
    FILTER_ACTIONS,
    PORT_NAMES,
    IpFilter,
    IpRoute,
    LanAddress,
    RtxConfig,
    address_is_any,
    is_ipv4,
    port_number,
)
from reconciler.world import Coverage, FilterVerdict, RouteEntries, tcp25_egress

SMTP_PORT = 25
EPHEMERAL = (1024, 65535)  # the widest ephemeral source port range any client uses
_IPV4_MAX = (1 << 32) - 1
_INT_RE = re.compile(r"^[0-9]{1,10}$")

# Address space that is not the Internet: a destination entirely inside it is never the
# rental's address. (The documentation ranges 192.0.2/24, 198.51.100/24, 203.0.113/24 are
# NOT here: tests and examples use them as public addresses.)
_NOT_INTERNET = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)

# Protocol words that select all of tcp, part of tcp (flags, connection state) or no tcp.
_ALL_TCP = frozenset({"*", "tcp", "6"})
_PART_TCP = frozenset({"tcpsyn", "tcpfin", "tcprst", "established"})

Range = tuple[int, int]


# --- LAN networks ---------------------------------------------------------------------------


def lan_networks(config: RtxConfig) -> tuple[ipaddress.IPv4Network, ...]:
    """The networks of the `ip lanN address A.B.C.D/LEN` lines (`dhcp` and other forms that
    name no network are left out)."""
    found: list[ipaddress.IPv4Network] = []
    for _, node in config.nodes():
        if not isinstance(node, LanAddress):
            continue
        word = node.address.split()[0] if node.address.split() else ""
        try:
            network = ipaddress.IPv4Interface(word).network
        except ValueError:
            continue
        if "/" in word and network not in found:
            found.append(network)
    return tuple(found)


# --- classification -------------------------------------------------------------------------


def _address_ranges(element: str) -> list[Range] | None:
    """The address ranges one `ip filter` address element stands for, or None when that
    cannot be known here (an FQDN, a wildcard with a `*` before the last octet...)."""
    if element == "*":
        return [(0, _IPV4_MAX)]
    if "/" in element:
        try:
            network = ipaddress.IPv4Network(element, strict=False)
        except ValueError:
            return None
        return [(int(network.network_address), int(network.broadcast_address))]
    if "-" in element:
        low, _, high = element.partition("-")
        if (low and not is_ipv4(low)) or (high and not is_ipv4(high)) or not (low or high):
            return None
        lo = int(ipaddress.IPv4Address(low)) if low else 0
        hi = int(ipaddress.IPv4Address(high)) if high else _IPV4_MAX
        return [(lo, hi)] if lo <= hi else []
    if is_ipv4(element):
        value = int(ipaddress.IPv4Address(element))
        return [(value, value)]
    octets = element.split(".")
    if len(octets) == 4 and "*" in octets:
        # `192.168.0.*`: a prefix when every `*` is at the end.
        first = octets.index("*")
        if all(o == "*" for o in octets[first:]) and all(is_ipv4_octet(o) for o in octets[:first]):
            bits = 8 * first
            prefix = ".".join([*octets[:first], *(["0"] * (4 - first))])
            network = ipaddress.IPv4Network(f"{prefix}/{bits}")
            return [(int(network.network_address), int(network.broadcast_address))]
    return None


def is_ipv4_octet(word: str) -> bool:
    return word.isdigit() and len(word) <= 3 and int(word) <= 255 and str(int(word)) == word


def _address_field(word: str | None) -> list[Range] | None:
    """All ranges of a comma list; None when some element cannot be known."""
    if address_is_any(word):
        return [(0, _IPV4_MAX)]
    assert word is not None
    ranges: list[Range] = []
    for element in word.split(","):
        found = _address_ranges(element)
        if found is None:
            return None
        ranges.extend(found)
    return ranges


def _merged(ranges: Iterable[Range]) -> list[Range]:
    out: list[Range] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _covers(ranges: list[Range], lo: int, hi: int) -> bool:
    return any(a <= lo and hi <= b for a, b in _merged(ranges))


def _overlaps(ranges: list[Range], lo: int, hi: int) -> bool:
    return any(a <= hi and lo <= b for a, b in ranges)


def _source_coverage(word: str | None, lans: tuple[ipaddress.IPv4Network, ...]) -> Coverage:
    if address_is_any(word):
        return Coverage.ALL
    ranges = _address_field(word)
    if ranges is None or not lans:
        return Coverage.SOME
    bounds = [(int(n.network_address), int(n.broadcast_address)) for n in lans]
    if all(_covers(ranges, lo, hi) for lo, hi in bounds):
        return Coverage.ALL
    if not any(_overlaps(ranges, lo, hi) for lo, hi in bounds):
        return Coverage.NONE
    return Coverage.SOME


def _destination_coverage(word: str | None) -> Coverage:
    if address_is_any(word):
        return Coverage.ALL
    ranges = _address_field(word)
    if ranges is None:
        return Coverage.SOME
    outside = [(int(n.network_address), int(n.broadcast_address)) for n in _NOT_INTERNET]
    if all(_covers(outside, lo, hi) for lo, hi in ranges):
        return Coverage.NONE  # only addresses that are not on the Internet
    return Coverage.SOME


def _protocol_coverage(word: str | None) -> Coverage:
    if word is None or word == "*":
        return Coverage.ALL
    best = Coverage.NONE
    for element in word.split(","):
        if element in _ALL_TCP:
            return Coverage.ALL
        if element in _PART_TCP or element.startswith("tcpflag"):
            best = Coverage.SOME
        elif element in ("udp", "icmp", "icmp-error", "icmp-info", "igmp", "gre", "esp", "ah"):
            continue
        elif element.isdigit() and len(element) <= 3:
            continue  # another protocol number (6 was handled above)
        elif element not in ("ipip", "ipv6", "icmp6", "ospf", "pim", "l2tp"):
            best = Coverage.SOME  # a word this module does not know
    return best


def _port_ranges(word: str) -> list[Range] | None:
    ranges: list[Range] = []
    for element in word.split(","):
        if element in PORT_NAMES:
            ranges.append((PORT_NAMES[element], PORT_NAMES[element]))
            continue
        if element.count("-") == 1:
            low, _, high = element.partition("-")
            lo = 0 if low == "" else port_number(low)
            hi = 65535 if high == "" else port_number(high)
            if lo is None or hi is None or (low == "" and high == ""):
                return None
            ranges.append((lo, hi))
            continue
        number = port_number(element)
        if number is None:
            return None
        ranges.append((number, number))
    return ranges


def _destination_port_coverage(word: str | None) -> Coverage:
    if word is None or word == "*":
        return Coverage.ALL
    ranges = _port_ranges(word)
    if ranges is None:
        return Coverage.SOME
    return Coverage.ALL if _overlaps(ranges, SMTP_PORT, SMTP_PORT) else Coverage.NONE


def _source_port_coverage(word: str | None) -> Coverage:
    if word is None or word == "*":
        return Coverage.ALL
    ranges = _port_ranges(word)
    if ranges is None:
        return Coverage.SOME
    if _covers(ranges, *EPHEMERAL):
        return Coverage.ALL
    if not _overlaps(ranges, *EPHEMERAL):
        return Coverage.NONE
    return Coverage.SOME


def filter_verdict(
    rule: IpFilter, lans: tuple[ipaddress.IPv4Network, ...] = ()
) -> FilterVerdict:
    """What static filter `rule` does to the office's SMTP traffic (see the module doc)."""
    passes = not rule.action.startswith("reject")  # restrict and unknown actions: pass
    parts = [
        _protocol_coverage(rule.protocol),
        _source_coverage(rule.src, lans),
        _destination_coverage(rule.dst),
        _source_port_coverage(rule.src_port),
        _destination_port_coverage(rule.dst_port),
    ]
    if rule.extra or rule.action not in FILTER_ACTIONS:
        parts.append(Coverage.SOME)
    return FilterVerdict(passes, min(parts))


def filter_verdicts(config: RtxConfig) -> dict[int, FilterVerdict]:
    """A verdict for every defined static filter."""
    lans = lan_networks(config)
    return {n: filter_verdict(f, lans) for n, f in config.static_filters().items()}


def default_route_entries(config: RtxConfig) -> RouteEntries | None:
    route = config.default_route()
    if route is None:
        return None
    return tuple((g.gateway, g.filters) for g in route.gateways)


def smtp_egress(config: RtxConfig) -> tuple[str, ...]:
    """Every gateway the office's tcp/25 may leave through (`world.tcp25_egress`)."""
    return tcp25_egress(default_route_entries(config), filter_verdicts(config))


@dataclass(frozen=True)
class Catch:
    """An entry of the default route that takes (some of) the office's SMTP traffic."""

    index: int  # position in the route
    gateway: str
    filters: tuple[int, ...]
    number: int | None  # the filter that passes it; None for an unfiltered gateway
    coverage: Coverage  # how much of it


def smtp_catchers(
    route: RouteEntries, verdicts: Mapping[int, FilterVerdict], before: int
) -> list[Catch]:
    """The entries before position `before` that take some of the office's SMTP traffic, in
    the router's first-match order (what reaches `before` is what none of them takes)."""
    found: list[Catch] = []
    for index, (gateway, filters) in enumerate(route[:before]):
        if not filters:
            found.append(Catch(index, gateway, filters, None, Coverage.ALL))
            return found
        for number in filters:
            verdict = verdicts.get(number)
            if verdict is None or verdict.coverage is Coverage.NONE:
                continue
            if verdict.passes:
                found.append(Catch(index, gateway, filters, number, verdict.coverage))
                if verdict.coverage is Coverage.ALL:
                    return found
            elif verdict.coverage is Coverage.ALL:
                break
    return found


# --- references -------------------------------------------------------------------------------


def _ints(words: Iterable[str]) -> list[int]:
    return [int(w) for w in words if _INT_RE.match(w)]


def _listed_after_filter(words: list[str]) -> list[int]:
    """Numbers in the lists that follow a `filter` keyword (and a `dynamic` one after it):
    direction words `in`/`out` inside a list are skipped, any other word ends it."""
    numbers: list[int] = []
    listing = seen_filter = False
    for word in words:
        if word == "filter" or (word == "dynamic" and seen_filter):
            listing = seen_filter = True
        elif listing and word in ("in", "out"):
            continue
        elif listing and _INT_RE.match(word):
            numbers.append(int(word))
        else:
            listing = False
    return numbers


def _family(word: str) -> str | None:
    return word if word in ("ip", "ipv6") else None


def line_filter_numbers(words: list[str]) -> tuple[list[int], tuple[str, str] | None]:
    """The filter numbers one configuration line uses or defines (other than an IPv4 static
    filter definition), and the filter set it applies by name, as (family, name)."""
    if not words or words[0].startswith("#") or words[0] == "description":
        return [], None
    family = _family(words[0])
    if family is not None and len(words) >= 3 and words[1] == "filter":
        if words[2] == "set" and len(words) >= 4:
            return _ints(words[4:]), None  # `ip filter set NAME in|out N...`
        if family == "ipv6" and _INT_RE.match(words[2]):
            return [int(words[2]), *_listed_after_filter(words[3:])], None
    if family is not None and words[1:3] == ["forward", "filter"] and len(words) > 4:
        # `ip forward filter IF ID gateway GW filter N...`: the id, then the filter list.
        return _ints(words[4:5]) + _listed_after_filter(words[5:]), None
    if (
        family is not None
        and len(words) >= 6
        and words[2:5] == ["secure", "filter", "name"]
    ):
        return [], (family, words[5])
    return _listed_after_filter(words), None


def filter_references(config: RtxConfig) -> dict[int, tuple[str, ...]]:
    """Per filter number: every line (stripped, in file order) other than the default route
    that uses the number, or defines it in another namespace. A line that starts like a
    static filter definition but is not one the parser understood counts as a use."""
    sets: dict[tuple[str, str], list[int]] = {}
    uses: list[tuple[str, list[int], tuple[str, str] | None]] = []
    for line in config.lines:
        node = line.node
        if isinstance(node, IpFilter):
            continue
        if isinstance(node, IpRoute) and node.is_default:
            continue
        words = line.text.split()
        numbers, by_name = line_filter_numbers(words)
        if len(words) >= 4 and words[1:3] == ["filter", "set"] and _family(words[0]):
            sets.setdefault((words[0], words[3]), []).extend(numbers)
        if numbers or by_name:
            uses.append((line.text.strip(), numbers, by_name))
    found: dict[int, list[str]] = {}
    for text, numbers, by_name in uses:
        if by_name is not None:
            numbers = numbers + sets.get(by_name, [])
        for number in dict.fromkeys(numbers):
            found.setdefault(number, []).append(text)
    return {n: tuple(lines) for n, lines in found.items()}


def references_to(config: RtxConfig, number: int) -> tuple[str, ...]:
    """The lines other than the default route that use filter `number` (see above)."""
    return filter_references(config).get(number, ())


def default_route_uses(config: RtxConfig, number: int) -> str | None:
    """The default route's line when it names filter `number`, else None."""
    for line in reversed(config.lines):
        node = line.node
        if isinstance(node, IpRoute) and node.is_default:
            return line.text.strip() if number in node.referenced_filters else None
    return None
