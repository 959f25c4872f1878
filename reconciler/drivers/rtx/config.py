"""Yamaha RTX `show config` text: parser, printer, and what the modelled commands do.

Where it sits: `session.py` fetches `show config`; this module turns the text into an
`RtxConfig` (`policy.py` plans against it, `driver.py` derives facts from it); the lab's RTX
emulator applies the same commands to its running config with `RtxConfig.apply`, so the
planner's simulation and the emulator share one definition of what a command does.

Round trip: every line keeps its exact text and line ending, and lines mailrec does not model
(most of a real config) are kept verbatim, so `RtxConfig.parse(text).render() == text` for any
text. Only lines created or replaced by a command are printed, in the router's canonical
single-space form.

Modelled lines (RTX command reference syntax):

    ip filter N ACTION SRC [DST [PROTOCOL [SRC_PORT [DST_PORT]]]]
    ip filter dynamic N SRC DST (PROTOCOL [OPTION...] | filter N... [in N...] [out N...])
    ip route NETWORK gateway GW [PARAM...] [gateway GW [PARAM...]]...
        PARAM: filter N..., metric M, hide, weight W, keepalive ID
    ip IF secure filter (in|out) N... [dynamic N...]
    ip lanN address ADDRESS
    pp select N|none   tunnel select N|none   (open and close a scope)
    # comment lines (the header), blank lines
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

# --- vocabularies of the RTX command reference --------------------------------------------

FILTER_ACTIONS = frozenset(
    {
        "pass",
        "pass-log",
        "pass-nolog",
        "reject",
        "reject-log",
        "reject-nolog",
        "restrict",
        "restrict-log",
        "restrict-nolog",
    }
)
PASS_ACTIONS = frozenset({"pass", "pass-log", "pass-nolog"})

# Protocol mnemonics accepted by `ip filter`, with the IP protocol they select.
PROTOCOL_NAMES: dict[str, int] = {
    "icmp": 1,
    "icmp-error": 1,
    "icmp-info": 1,
    "igmp": 2,
    "ipip": 4,
    "tcp": 6,
    "tcpsyn": 6,
    "tcpfin": 6,
    "tcprst": 6,
    "established": 6,
    "udp": 17,
    "ipv6": 41,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "icmp6": 58,
    "ospf": 89,
    "pim": 103,
    "l2tp": 115,
}

# Port mnemonics of the RTX command reference (`ip filter` port lists).
PORT_NAMES: dict[str, int] = {
    "ftpdata": 20,
    "ftp": 21,
    "ssh": 22,
    "telnet": 23,
    "smtp": 25,
    "domain": 53,
    "bootps": 67,
    "bootpc": 68,
    "tftp": 69,
    "gopher": 70,
    "finger": 79,
    "www": 80,
    "pop3": 110,
    "sunrpc": 111,
    "ident": 113,
    "nntp": 119,
    "ntp": 123,
    "netbios_ns": 137,
    "netbios_dgm": 138,
    "netbios_ssn": 139,
    "imap": 143,
    "snmp": 161,
    "snmptrap": 162,
    "bgp": 179,
    "imap3": 220,
    "ldap": 389,
    "https": 443,
    "ms-ds": 445,
    "ike": 500,
    "rlogin": 513,
    "rwho": 513,
    "rsh": 514,
    "syslog": 514,
    "printer": 515,
    "rip": 520,
    "uucp": 540,
    "submission": 587,
    "ipsec-nat-t": 4500,
    "sip": 5060,
}

SMTP_PORT = 25
TCP = 6
MAX_FILTER_NUMBER = 2147483647  # the CLI accepts up to 2^31-1 on every model
MAX_PORT_LIST = 10  # the command reference allows up to ten ports in one list

# An IPv4 address written the way the CLI does (no leading zeros, no spaces).
_IPV4_RE = re.compile(
    r"^(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$"
)
_WILDCARD_RE = re.compile(
    r"^(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d|\*)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d|\*)$"
)
_FQDN_RE = re.compile(
    r"^(?=.*[A-Za-z])[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))+$"
)
_TCPFLAG_RE = re.compile(r"^tcpflag(?:!=|=)0x[0-9a-fA-F]{1,4}(?:/0x[0-9a-fA-F]{1,4})?$")
_INT_RE = re.compile(r"^[0-9]{1,10}$")
_IFACE_RE = re.compile(r"^(?:lan\d{1,2}(?:/\d{1,3})?|pp|tunnel|bridge\d{1,2}|wan\d|loopback\d?)$")
# Gateway interface forms of `ip route ... gateway`: `pp N`, `tunnel N`, `dhcp IF` take a
# second word, the others are one word.
_ROUTE_GW_SINGLE_RE = re.compile(r"^(?:lan\d{1,2}(?:/\d{1,3})?|null|loopback\d?|bridge\d{1,2})$")

RouteParamName = str


class RtxSyntaxError(ValueError):
    """A command the router would refuse.

    `kind` selects the router's message: "command" for an unknown command name,
    "parameter" for a known command with a malformed argument.
    """

    def __init__(self, kind: Literal["command", "parameter"], detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


# --- field grammars ---------------------------------------------------------------------


def is_ipv4(word: str) -> bool:
    return bool(_IPV4_RE.match(word))


def _valid_mask(word: str) -> bool:
    if word.isdigit():
        return len(word) <= 2 and 0 <= int(word) <= 32
    if not is_ipv4(word):
        return False
    try:
        ipaddress.IPv4Network(f"0.0.0.0/{word}")
    except ValueError:
        return False
    return True


def _valid_address_element(word: str) -> bool:
    if word == "*":
        return True
    if "/" in word:
        address, _, mask = word.partition("/")
        return is_ipv4(address) and _valid_mask(mask)
    if "-" in word and not _FQDN_RE.match(word):
        low, _, high = word.partition("-")
        return (is_ipv4(low) or low == "") and (is_ipv4(high) or high == "") and (low or high) != ""
    return is_ipv4(word) or bool(_WILDCARD_RE.match(word)) or bool(_FQDN_RE.match(word))


def valid_address(word: str) -> bool:
    """`ip filter` address field: `*`, an address, address/mask, a range, a wildcard like
    `192.168.0.*`, an FQDN, or a comma list of those."""
    return all(_valid_address_element(part) for part in word.split(","))


def address_is_any(word: str | None) -> bool:
    return word is None or word in ("*", "0.0.0.0/0", "0.0.0.0/0.0.0.0")


def _protocol_number(element: str) -> int | None:
    if element in PROTOCOL_NAMES:
        return PROTOCOL_NAMES[element]
    if _INT_RE.match(element) and int(element) <= 255:
        return int(element)
    if _TCPFLAG_RE.match(element):
        return TCP
    return None


def valid_protocol(word: str) -> bool:
    if word == "*":
        return True
    return all(_protocol_number(part) is not None for part in word.split(","))


def protocol_is_exactly_tcp(word: str | None) -> bool:
    """True when the field selects all of TCP and nothing else (`tcp` or `6`)."""
    return word in ("tcp", "6")


def port_number(word: str) -> int | None:
    if word in PORT_NAMES:
        return PORT_NAMES[word]
    if _INT_RE.match(word) and int(word) <= 65535:
        return int(word)
    return None


def _port_range(element: str) -> tuple[int, int] | None:
    if element.count("-") == 1 and element not in PORT_NAMES:
        low, _, high = element.partition("-")
        lo = 0 if low == "" else port_number(low)
        hi = 65535 if high == "" else port_number(high)
        if lo is None or hi is None or (low == "" and high == "") or lo > hi:
            return None
        return lo, hi
    number = port_number(element)
    return None if number is None else (number, number)


def valid_ports(word: str) -> bool:
    if word == "*":
        return True
    parts = word.split(",")
    return len(parts) <= MAX_PORT_LIST and all(_port_range(p) is not None for p in parts)


def ports_are_exactly(word: str | None, port: int) -> bool:
    return word is not None and word != "*" and _port_range(word) == (port, port)


# --- modelled lines ---------------------------------------------------------------------


@dataclass(frozen=True)
class IpFilter:
    """`ip filter N ACTION SRC [DST [PROTOCOL [SRC_PORT [DST_PORT]]]]` (a static filter)."""

    number: int
    action: str
    src: str
    dst: str | None = None
    protocol: str | None = None
    src_port: str | None = None
    dst_port: str | None = None
    extra: tuple[str, ...] = ()  # tokens past the seven fields, kept in order

    @property
    def key(self) -> str:
        return f"ip filter {self.number}"

    def render(self) -> str:
        fields = [self.src, self.dst, self.protocol, self.src_port, self.dst_port]
        present = [f for f in fields if f is not None]
        return " ".join(["ip", "filter", str(self.number), self.action, *present, *self.extra])

    @property
    def is_smtp_pass(self) -> bool:
        """A pass (any log flavour) of all of tcp to destination port 25, from any source
        address and port to any destination address: the rule the SMTP policy route needs."""
        return (
            self.action in PASS_ACTIONS
            and address_is_any(self.src)
            and address_is_any(self.dst)
            and protocol_is_exactly_tcp(self.protocol)
            and self.src_port in (None, "*")
            and ports_are_exactly(self.dst_port, SMTP_PORT)
            and not self.extra
        )

    def validate(self) -> None:
        """Raise `RtxSyntaxError` for what the router's parser would refuse."""
        if not 1 <= self.number <= MAX_FILTER_NUMBER:
            raise RtxSyntaxError("parameter", f"filter number {self.number} is out of range")
        if self.action not in FILTER_ACTIONS:
            raise RtxSyntaxError("parameter", f"unknown filter action {self.action!r}")
        for name, value in (("source", self.src), ("destination", self.dst)):
            if value is not None and not valid_address(value):
                raise RtxSyntaxError("parameter", f"bad {name} address {value!r}")
        if self.protocol is not None and not valid_protocol(self.protocol):
            raise RtxSyntaxError("parameter", f"bad protocol {self.protocol!r}")
        for name, value in (("source", self.src_port), ("destination", self.dst_port)):
            if value is not None and not valid_ports(value):
                raise RtxSyntaxError("parameter", f"bad {name} port list {value!r}")
        if self.extra:
            raise RtxSyntaxError("parameter", f"too many parameters: {' '.join(self.extra)!r}")


@dataclass(frozen=True)
class IpFilterDynamic:
    """`ip filter dynamic N SRC DST REST...` (a stateful filter). REST is either a protocol
    or application name with options, or `filter N... [in N...] [out N...]` naming static
    filters; those numbers count as references."""

    number: int
    src: str
    dst: str
    rest: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"ip filter dynamic {self.number}"

    def render(self) -> str:
        return " ".join(
            ["ip", "filter", "dynamic", str(self.number), self.src, self.dst, *self.rest]
        )

    @property
    def referenced_filters(self) -> tuple[int, ...]:
        numbers: list[int] = []
        in_list = False
        for word in self.rest:
            if word in ("filter", "in", "out"):
                in_list = True
            elif in_list and _INT_RE.match(word):
                numbers.append(int(word))
            else:
                in_list = False
        return tuple(numbers)

    def validate(self) -> None:
        if not 1 <= self.number <= MAX_FILTER_NUMBER:
            raise RtxSyntaxError("parameter", f"filter number {self.number} is out of range")
        if not (valid_address(self.src) and valid_address(self.dst)):
            raise RtxSyntaxError("parameter", "bad address in dynamic filter")
        if not self.rest:
            raise RtxSyntaxError("parameter", "dynamic filter needs a protocol")
        if not all(re.match(r"^[A-Za-z0-9_.=,/:-]+$", t) for t in self.rest):
            raise RtxSyntaxError("parameter", "bad dynamic filter option")


@dataclass(frozen=True)
class RouteParam:
    """One parameter of a route gateway, e.g. `filter 10 20`, `metric 2`, `hide`."""

    name: RouteParamName
    args: tuple[str, ...] = ()

    def tokens(self) -> tuple[str, ...]:
        return (self.name, *self.args)


@dataclass(frozen=True)
class RouteGateway:
    """`gateway GW [PARAM...]` inside an `ip route` line; params keep their written order."""

    gateway: str
    params: tuple[RouteParam, ...] = ()

    @property
    def filters(self) -> tuple[int, ...]:
        numbers: list[int] = []
        for param in self.params:
            if param.name == "filter":
                numbers.extend(int(a) for a in param.args)
        return tuple(numbers)

    def _int_param(self, name: str) -> int | None:
        for param in self.params:
            if param.name == name and param.args:
                return int(param.args[0])
        return None

    @property
    def metric(self) -> int | None:
        return self._int_param("metric")

    @property
    def keepalive(self) -> int | None:
        return self._int_param("keepalive")

    @property
    def weight(self) -> int | None:
        return self._int_param("weight")

    @property
    def hide(self) -> bool:
        return any(p.name == "hide" for p in self.params)

    def tokens(self) -> list[str]:
        out = ["gateway", self.gateway]
        for param in self.params:
            out.extend(param.tokens())
        return out


@dataclass(frozen=True)
class IpRoute:
    """`ip route NETWORK gateway GW [PARAM...] [gateway GW [PARAM...]]...`"""

    network: str
    gateways: tuple[RouteGateway, ...]

    @property
    def key(self) -> str:
        return f"ip route {self.network}"

    @property
    def is_default(self) -> bool:
        return self.network in ("default", "0.0.0.0/0", "0.0.0.0/0.0.0.0")

    def render(self) -> str:
        tokens = ["ip", "route", self.network]
        for gateway in self.gateways:
            tokens.extend(gateway.tokens())
        return " ".join(tokens)

    @property
    def referenced_filters(self) -> tuple[int, ...]:
        return tuple(n for g in self.gateways for n in g.filters)

    def validate(self) -> None:
        if not _valid_network(self.network):
            raise RtxSyntaxError("parameter", f"bad route destination {self.network!r}")
        if not self.gateways:
            raise RtxSyntaxError("parameter", "a route needs at least one gateway")
        for gateway in self.gateways:
            if not valid_route_gateway(gateway.gateway):
                raise RtxSyntaxError("parameter", f"bad gateway {gateway.gateway!r}")
            for param in gateway.params:
                _validate_route_param(param)


@dataclass(frozen=True)
class SecureFilter:
    """`ip IF secure filter in|out N... [dynamic N...]`: the filters applied on an interface."""

    interface: str
    direction: str
    static: tuple[int, ...]
    dynamic: tuple[int, ...]


@dataclass(frozen=True)
class LanAddress:
    """`ip lanN address ADDRESS` (the address of a LAN port)."""

    interface: str
    address: str


@dataclass(frozen=True)
class Select:
    """`pp select N|none` or `tunnel select N|none`: the scope of the lines that follow."""

    kind: str
    target: str

    @property
    def scope(self) -> str:
        return "" if self.target == "none" else f"{self.kind} {self.target}"


@dataclass(frozen=True)
class Comment:
    text: str


@dataclass(frozen=True)
class Blank:
    pass


Node = IpFilter | IpFilterDynamic | IpRoute | SecureFilter | LanAddress | Select | Comment | Blank


@dataclass(frozen=True)
class ConfigLine:
    """One line of the configuration: its exact text and ending, what it means (None for
    lines mailrec does not model), and the `pp`/`tunnel` scope it was written in."""

    text: str
    eol: str
    node: Node | None
    scope: str = ""


# --- parsing ------------------------------------------------------------------------------


def _valid_network(word: str) -> bool:
    if word == "default":
        return True
    address, slash, mask = word.partition("/")
    return is_ipv4(address) and (not slash or _valid_mask(mask))


def valid_route_gateway(gateway: str) -> bool:
    """The gateway forms `ip route` accepts: an IPv4 address, `pp N`, `pp anonymous`,
    `tunnel N`, `dhcp IF`, a LAN interface, `null` or `loopback`."""
    parts = gateway.split(" ")
    if len(parts) == 1:
        return is_ipv4(parts[0]) or bool(_ROUTE_GW_SINGLE_RE.match(parts[0]))
    if len(parts) != 2:
        return False
    kind, arg = parts
    if kind == "pp":
        return arg == "anonymous" or (arg.isdigit() and len(arg) <= 4 and int(arg) >= 1)
    if kind == "tunnel":
        return arg.isdigit() and len(arg) <= 5 and int(arg) >= 1
    if kind == "dhcp":
        return bool(re.match(r"^(?:lan\d{1,2}|wan\d|bridge\d{1,2})$", arg))
    return False


def _validate_route_param(param: RouteParam) -> None:
    if param.name == "filter":
        if not param.args or not all(
            _INT_RE.match(a) and 1 <= int(a) <= MAX_FILTER_NUMBER for a in param.args
        ):
            raise RtxSyntaxError("parameter", "bad filter list in route")
    elif param.name in ("metric", "weight", "keepalive"):
        if len(param.args) != 1 or not _INT_RE.match(param.args[0]):
            raise RtxSyntaxError("parameter", f"bad value for {param.name}")
    elif param.name == "hide":
        if param.args:
            raise RtxSyntaxError("parameter", "hide takes no value")
    else:
        raise RtxSyntaxError("parameter", f"unknown route parameter {param.name!r}")


def _take_gateway(tokens: list[str], i: int) -> tuple[str, int]:
    if i >= len(tokens):
        raise ValueError("gateway keyword without a gateway")
    head = tokens[i]
    if head in ("pp", "tunnel", "dhcp"):
        if i + 1 >= len(tokens):
            raise ValueError(f"{head} without a number")
        return f"{head} {tokens[i + 1]}", i + 2
    return head, i + 1


def _parse_gateways(tokens: list[str]) -> tuple[RouteGateway, ...]:
    gateways: list[RouteGateway] = []
    i = 0
    while i < len(tokens):
        if tokens[i] != "gateway":
            raise ValueError(f"expected 'gateway', found {tokens[i]!r}")
        gateway, i = _take_gateway(tokens, i + 1)
        params: list[RouteParam] = []
        while i < len(tokens) and tokens[i] != "gateway":
            name = tokens[i]
            i += 1
            if name == "filter":
                start = i
                while i < len(tokens) and _INT_RE.match(tokens[i]):
                    i += 1
                params.append(RouteParam(name, tuple(tokens[start:i])))
            elif name in ("metric", "weight", "keepalive") and i < len(tokens):
                params.append(RouteParam(name, (tokens[i],)))
                i += 1
            else:
                # `hide`, or a keyword a newer firmware added: kept as a bare word.
                params.append(RouteParam(name))
        gateways.append(RouteGateway(gateway, tuple(params)))
    if not gateways:
        raise ValueError("no gateway")
    return tuple(gateways)


def parse_route(tokens: list[str]) -> IpRoute:
    """Parse the tokens of an `ip route` line (ValueError when it is another command, such
    as `ip route change log on`)."""
    if len(tokens) < 5 or tokens[:2] != ["ip", "route"] or not _valid_network(tokens[2]):
        raise ValueError("not an ip route definition")
    return IpRoute(tokens[2], _parse_gateways(tokens[3:]))


def parse_filter(tokens: list[str]) -> IpFilter:
    if len(tokens) < 5 or tokens[:2] != ["ip", "filter"] or not _INT_RE.match(tokens[2]):
        raise ValueError("not a static ip filter")
    fields: list[str | None] = [*tokens[4:9], None, None, None, None, None][:5]
    return IpFilter(
        number=int(tokens[2]),
        action=tokens[3],
        src=fields[0] or "*",
        dst=fields[1],
        protocol=fields[2],
        src_port=fields[3],
        dst_port=fields[4],
        extra=tuple(tokens[9:]),
    )


def parse_dynamic(tokens: list[str]) -> IpFilterDynamic:
    if len(tokens) < 7 or tokens[:3] != ["ip", "filter", "dynamic"] or not _INT_RE.match(tokens[3]):
        raise ValueError("not a dynamic ip filter")
    return IpFilterDynamic(int(tokens[3]), tokens[4], tokens[5], tuple(tokens[6:]))


def _parse_secure(tokens: list[str]) -> SecureFilter:
    # ip IF secure filter DIR N... [dynamic N...]
    if len(tokens) < 5 or tokens[0] != "ip" or tokens[2:4] != ["secure", "filter"]:
        raise ValueError("not a secure filter line")
    if tokens[4] not in ("in", "out"):
        raise ValueError("not a numbered secure filter list")
    static: list[int] = []
    dynamic: list[int] = []
    target = static
    for word in tokens[5:]:
        if word == "dynamic":
            target = dynamic
        elif _INT_RE.match(word):
            target.append(int(word))
        else:
            raise ValueError(f"unexpected {word!r} in secure filter list")
    return SecureFilter(tokens[1], tokens[4], tuple(static), tuple(dynamic))


def parse_node(text: str) -> Node | None:
    """What one line means, or None for a line mailrec does not model."""
    stripped = text.strip()
    if not stripped:
        return Blank()
    if stripped.startswith("#"):
        return Comment(stripped)
    tokens = stripped.split()
    try:
        if tokens[:2] == ["ip", "filter"]:
            if len(tokens) > 2 and tokens[2] == "dynamic":
                return parse_dynamic(tokens)
            return parse_filter(tokens)
        if tokens[:2] == ["ip", "route"]:
            return parse_route(tokens)
        if len(tokens) >= 4 and tokens[0] == "ip" and tokens[2:4] == ["secure", "filter"]:
            return _parse_secure(tokens)
        if (
            len(tokens) >= 4
            and tokens[0] == "ip"
            and re.match(r"^lan\d{1,2}(?:/\d{1,3})?$", tokens[1])
            and tokens[2] == "address"
        ):
            return LanAddress(tokens[1], " ".join(tokens[3:]))
        if len(tokens) == 3 and tokens[0] in ("pp", "tunnel") and tokens[1] == "select":
            return Select(tokens[0], tokens[2])
    except ValueError:
        return None
    return None


_LINE_RE = re.compile(r"([^\r\n]*)(\r\n|\n|\r|$)")


def _split_lines(text: str) -> Iterator[tuple[str, str]]:
    # Not str.splitlines(): that also splits on \x0b, \x1c, \u2028..., which a config line
    # may contain inside a quoted description, and it drops the ending we must keep.
    position = 0
    while position < len(text):
        match = _LINE_RE.match(text, position)
        assert match is not None  # the pattern matches the empty string
        body, eol = match.group(1), match.group(2)
        yield body, eol
        position = match.end()


def _canonical_scope(node: Node | None, line_scope: str) -> str:
    # `ip filter` and `ip route` are global commands even when typed inside a `pp select`.
    if isinstance(node, IpFilter | IpFilterDynamic | IpRoute):
        return ""
    return line_scope


# --- the configuration --------------------------------------------------------------------

Key = str  # "ip filter 10", "ip filter dynamic 100", "ip route default"


@dataclass(frozen=True)
class RtxConfig:
    """A parsed `show config`. Immutable: `apply` returns a new configuration."""

    lines: tuple[ConfigLine, ...]

    @classmethod
    def parse(cls, text: str) -> RtxConfig:
        lines: list[ConfigLine] = []
        scope = ""
        for body, eol in _split_lines(text):
            node = parse_node(body)
            if isinstance(node, Select):
                lines.append(ConfigLine(body, eol, node, ""))
                scope = node.scope
                continue
            lines.append(ConfigLine(body, eol, node, _canonical_scope(node, scope)))
        return cls(tuple(lines))

    def render(self) -> str:
        return "".join(line.text + line.eol for line in self.lines)

    # --- queries ------------------------------------------------------------------------

    def nodes(self) -> Iterator[tuple[ConfigLine, Node]]:
        for line in self.lines:
            if line.node is not None:
                yield line, line.node

    def static_filters(self) -> dict[int, IpFilter]:
        """Every `ip filter N` definition, by number (the router keeps one per number)."""
        return {n.number: n for _, n in self.nodes() if isinstance(n, IpFilter)}

    def static_filter_lines(self) -> dict[int, str]:
        return {n.number: line.text.strip() for line, n in self.nodes() if isinstance(n, IpFilter)}

    def dynamic_filters(self) -> dict[int, IpFilterDynamic]:
        return {n.number: n for _, n in self.nodes() if isinstance(n, IpFilterDynamic)}

    def filter(self, number: int) -> IpFilter | None:
        return self.static_filters().get(number)

    def routes(self) -> dict[str, IpRoute]:
        return {n.network: n for _, n in self.nodes() if isinstance(n, IpRoute)}

    def default_route(self) -> IpRoute | None:
        found = None
        for _, node in self.nodes():
            if isinstance(node, IpRoute) and node.is_default:
                found = node
        return found

    def filter_references(self, number: int) -> list[ConfigLine]:
        """Lines that use static filter `number`: routes, interface secure filter lists and
        dynamic filters naming static filters (every use, MR014's: queries.filter_references)."""
        users: list[ConfigLine] = []
        for line, node in self.nodes():
            if isinstance(node, IpRoute | IpFilterDynamic):
                uses = number in node.referenced_filters
            else:
                uses = isinstance(node, SecureFilter) and number in node.static
            if uses:
                users.append(line)
        return users

    def line_for(self, key: Key) -> ConfigLine | None:
        found = None
        for line, node in self.nodes():
            if isinstance(node, IpFilter | IpFilterDynamic | IpRoute) and node.key == key:
                found = line
        return found

    @property
    def eol(self) -> str:
        """The line ending this text uses (new lines get the same)."""
        for line in self.lines:
            if line.eol:
                return line.eol
        return "\n"

    # --- commands -----------------------------------------------------------------------

    def apply(self, command: str) -> RtxConfig:
        """The configuration after the router accepted `command` (one of the modelled
        configuration commands). Raises `RtxSyntaxError` as the router would refuse it."""
        parsed = parse_command(command)
        if isinstance(parsed, Delete):
            return self._delete(parsed.key)
        parsed.validate()
        return self._set(parsed)

    def _delete(self, key: Key) -> RtxConfig:
        # `no` of something that is not configured is accepted silently by the router.
        kept = tuple(
            line
            for line in self.lines
            if not (
                isinstance(line.node, IpFilter | IpFilterDynamic | IpRoute) and line.node.key == key
            )
        )
        return RtxConfig(kept)

    def _set(self, node: IpFilter | IpFilterDynamic | IpRoute) -> RtxConfig:
        new_line = ConfigLine(node.render(), self.eol, node, "")
        lines = list(self.lines)
        for index, line in enumerate(lines):
            if (
                isinstance(line.node, IpFilter | IpFilterDynamic | IpRoute)
                and line.node.key == node.key
            ):
                # Replacing a definition keeps its place: the router overwrites in place.
                lines[index] = replace(new_line, eol=line.eol)
                return RtxConfig(tuple(_drop_later_duplicates(lines, node.key, index)))
        index = self._insert_index(node)
        if index == len(lines) and lines and not lines[-1].eol:
            # The text ended without a newline: give the old last line one.
            lines[-1] = replace(lines[-1], eol=self.eol)
            new_line = replace(new_line, eol="")
        lines.insert(index, new_line)
        return RtxConfig(tuple(lines))

    def _insert_index(self, node: IpFilter | IpFilterDynamic | IpRoute) -> int:
        """Where `show config` would print a new definition: filters in number order among
        the other filters, routes after the other routes (before the LAN addresses when
        there is none), anything else at the end."""
        lines = self.lines
        if isinstance(node, IpFilter):
            after = [
                i
                for i, ln in enumerate(lines)
                if isinstance(ln.node, IpFilter) and ln.node.number < node.number
            ]
            if after:
                return after[-1] + 1
            before = [
                i for i, ln in enumerate(lines) if isinstance(ln.node, IpFilter | IpFilterDynamic)
            ]
            if before:
                return before[0]
        elif isinstance(node, IpFilterDynamic):
            after = [
                i for i, ln in enumerate(lines) if isinstance(ln.node, IpFilter | IpFilterDynamic)
            ]
            if after:
                return after[-1] + 1
        else:
            after = [i for i, ln in enumerate(lines) if isinstance(ln.node, IpRoute)]
            if after:
                return after[-1] + 1
            lan = [i for i, ln in enumerate(lines) if isinstance(ln.node, LanAddress)]
            if lan:
                return lan[0]
            header = 0
            while header < len(lines) and isinstance(lines[header].node, Comment):
                header += 1
            return header
        return len(lines)


def _drop_later_duplicates(lines: list[ConfigLine], key: Key, keep: int) -> list[ConfigLine]:
    # A hand-written file may define the same key twice; the router keeps one definition.
    return [
        line
        for i, line in enumerate(lines)
        if i == keep
        or not (
            isinstance(line.node, IpFilter | IpFilterDynamic | IpRoute) and line.node.key == key
        )
    ]


# --- commands -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delete:
    """`no ip filter N`, `no ip filter dynamic N`, `no ip route NETWORK` (trailing
    parameters are accepted and ignored, as the router does)."""

    key: Key


def parse_command(command: str) -> IpFilter | IpFilterDynamic | IpRoute | Delete:
    """Parse one modelled configuration command, strictly (RtxSyntaxError otherwise)."""
    tokens = command.split()
    negate = bool(tokens) and tokens[0] == "no"
    body = tokens[1:] if negate else tokens
    if body[:2] == ["ip", "filter"] and len(body) > 2 and body[2] == "dynamic":
        if negate:
            if len(body) < 4 or not _INT_RE.match(body[3]):
                raise RtxSyntaxError("parameter", "no ip filter dynamic needs a filter number")
            return Delete(f"ip filter dynamic {int(body[3])}")
        try:
            return parse_dynamic(body)
        except ValueError as exc:
            raise RtxSyntaxError("parameter", str(exc)) from None
    if body[:2] == ["ip", "filter"]:
        if negate:
            if len(body) < 3 or not _INT_RE.match(body[2]):
                raise RtxSyntaxError("parameter", "no ip filter needs a filter number")
            return Delete(f"ip filter {int(body[2])}")
        try:
            return parse_filter(body)
        except ValueError as exc:
            raise RtxSyntaxError("parameter", str(exc)) from None
    if body[:2] == ["ip", "route"]:
        if negate:
            if len(body) < 3 or not _valid_network(body[2]):
                raise RtxSyntaxError("parameter", "no ip route needs a destination")
            return Delete(f"ip route {body[2]}")
        try:
            return parse_route(body)
        except ValueError as exc:
            raise RtxSyntaxError("parameter", str(exc)) from None
    raise RtxSyntaxError("command", f"not a modelled configuration command: {command!r}")


def command_key(command: str) -> Key:
    """The definition a modelled command sets or removes (`ip filter 10`, `ip route default`)."""
    parsed = parse_command(command)
    return parsed.key
