"""The field types of the desired state and their validators: host names, domains, CIDRs,
IP addresses, durations, secret references, ASCII-only numbers, RTX gateways and filter
numbers, and the `Connect` string (`ssh://user@host:port`, `local:/`).

Sits under `model.py` in the first stage of the flow (load -> guard -> pydantic): the section
models there are built from these `Annotated` types, so every value is checked (and its
message written) once, here. Nothing here knows a section; `field_error` lets a section's own
check blame one of its keys.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

# Every pattern here is ASCII-only (re.ASCII: \d, \w, \s and IGNORECASE never match other
# scripts' digits or letters, e.g. '٢' or the Kelvin sign) and ends in \Z, never $ (which
# also matches before a trailing newline: "suga\n" would pass).
# A user name reaches Postfix maps, SMTP commands and remote shells: allow only what is
# safe as a mail local part *and* as an unquoted shell word.
USER_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_-]|\.(?=[a-z0-9_-])){0,63}\Z", re.ASCII)
HOST_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)\Z", re.IGNORECASE | re.ASCII)
SECRET_RE = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:/[^\0\n]+)\Z", re.ASCII)
DURATION_RE = re.compile(r"^([0-9]{1,12}) *(s|m|h|d|w)\Z", re.ASCII)
# RTX gateway forms mailrec will write: an IPv4 address or a named interface (the same set
# as the RTX driver accepts: reconciler.drivers.rtx.policy).
GATEWAY_IFACE_RE = re.compile(
    r"^(?:pp [1-9][0-9]{0,2}|tunnel [1-9][0-9]{0,3}|dhcp lan[0-9]|lan[0-9](?:/[0-9]{1,3})?"
    r"|pp anonymous|null|loopback)\Z",
    re.ASCII,
)
# Static filter numbers of the RTX routers mailrec drives (RTX1200/1210/830).
FILTER_MIN, FILTER_MAX = 1, 21474836


# Error type of `field_error`: `load.py` adds ctx["field"] to the error's location, so a check
# made on a whole section still points at the line of the field it blames.
FIELD_ERROR = "field_error"


def field_error(field: str | tuple[str, ...], message: str) -> PydanticCustomError:
    """A validation error of a section that blames one of its keys (by name), or a key
    further down (a path of names, e.g. ("rental", "smtp_host"))."""
    return PydanticCustomError(FIELD_ERROR, "{message}", {"message": message, "field": field})


def _non_ascii(text: str) -> str | None:
    """The first non-ASCII character of text, described (`'٢' (U+0662)`), or None."""
    for char in text:
        if not char.isascii():
            return f"{char!r} (U+{ord(char):04X})"
    return None


def _strict_int(value: Any) -> Any:
    """Before pydantic's int parsing: true/false is not a number, and a number given as text
    is written with ASCII digits only (Python's int() also reads other scripts' digits, e.g.
    U+0661 U+0660 as 10; the router and servers mailrec writes to do not)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is true/false, not a number")
    if isinstance(value, str):
        bad = _non_ascii(value)
        if bad:
            raise ValueError(f"{value!r} is not a number: {bad} is not an ASCII digit (use 0-9)")
    return value


class Side(StrEnum):
    """Where a user's mail is handled: the in-house Postfix or the rental service."""

    ONPREM = "onprem"
    RENTAL = "rental"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def _hostname(value: str, *, trailing_dot: bool | None = None) -> str:
    name = value.lower()
    if trailing_dot is True and not name.endswith("."):
        raise ValueError(f"{value!r} must be a fully qualified name ending in '.'")
    bare = name[:-1] if name.endswith(".") else name
    if trailing_dot is False and name.endswith("."):
        raise ValueError(f"{value!r} must not end in '.'")
    labels = bare.split(".")
    if len(bare) > 253 or len(labels) < 2 or not all(HOST_LABEL_RE.match(x) for x in labels):
        raise ValueError(f"{value!r} is not a valid host name")
    return name


def _domain(value: str) -> str:
    return _hostname(value, trailing_dot=False)


def _fqdn(value: str) -> str:
    return _hostname(value, trailing_dot=True)


def check_host(value: str) -> str:
    """A host to connect to: a name or an address (not necessarily fully qualified)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if value == "localhost":
        return value
    return _hostname(value.rstrip("."), trailing_dot=False)


def _secret(value: str) -> str:
    # The messages never repeat the value: it may be the secret itself, written inline.
    if SECRET_RE.match(value):
        return value
    if value.startswith("env:"):
        raise ValueError(
            "env: needs an environment variable name (letters, digits and '_', not starting "
            "with a digit), e.g. env:RTX_ADMIN"
        )
    if value.startswith("file:"):
        raise ValueError("file: needs an absolute path, e.g. file:/etc/mailrec/tsig")
    raise ValueError(
        "secrets are never written inline: give env:NAME (an environment variable) "
        "or file:/absolute/path (a file readable only by mailrec)"
    )


def _cidr(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    text = str(value)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        hint = ""
        try:
            fixed = ipaddress.ip_network(text, strict=False)
            hint = f" (host bits are set: did you mean {fixed}?)"
        except ValueError:
            hint = " (expected a CIDR such as 203.0.113.8/29)"
        raise ValueError(f"{text!r} is not a network{hint}") from exc


def _ip(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address") from exc


MAX_DURATION = timedelta(days=3650)


def parse_duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= MAX_DURATION.total_seconds():
            raise ValueError(f"{value!r} seconds is not a duration between 0 and 10 years")
        duration = timedelta(seconds=value)
    else:
        match = DURATION_RE.match(str(value).strip())
        if not match:
            raise ValueError(f"{value!r} is not a duration (use e.g. 30m, 48h, 2d)")
        amount, unit = int(match.group(1)), match.group(2)
        seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
        if amount * seconds > MAX_DURATION.total_seconds():
            raise ValueError(f"{value!r} is longer than 10 years")
        duration = timedelta(seconds=amount * seconds)
    if duration < timedelta(0) or duration > MAX_DURATION:
        raise ValueError(f"{value!r} is not a duration between 0 and 10 years")
    return duration


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _gateway(value: str) -> str:
    bad = _non_ascii(value)
    if bad:
        raise ValueError(
            f"{value!r} is not a gateway: {bad} is not ASCII (RTX interface numbers are "
            "written with 0-9, e.g. 'tunnel 2')"
        )
    text = " ".join(value.split())
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        if GATEWAY_IFACE_RE.match(text):
            return text
        raise ValueError(
            f"{value!r} is not a gateway: give an IPv4 address or an RTX interface "
            "such as 'tunnel 2', 'pp 1' or 'dhcp lan2'"
        ) from None
    if address.version != 4:
        raise ValueError(f"{value!r}: RTX 'ip route' gateways are IPv4 addresses")
    return text


# An RTX `ip route` gateway: an IPv4 address or a named interface (GATEWAY_IFACE_RE).
Gateway = Annotated[str, AfterValidator(_gateway)]


Domain = Annotated[str, AfterValidator(_domain)]
Fqdn = Annotated[str, AfterValidator(_fqdn)]
SecretRef = Annotated[str, AfterValidator(_secret)]
Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    BeforeValidator(_cidr),
    PlainSerializer(str, return_type=str),
]
IpAddress = Annotated[
    ipaddress.IPv4Address | ipaddress.IPv6Address,
    BeforeValidator(_ip),
    PlainSerializer(str, return_type=str),
]
# The JSON schema of a Duration is what a state file may write (validation mode), not the
# timedelta it becomes: a number with a unit (30m, 48h, 2d) or whole seconds.
DURATION_INPUT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "pattern": r"^\s*[0-9]{1,12} *[smhdw]\s*$",
         "description": "a number and a unit: s, m, h, d or w (e.g. 30m, 48h, 2d)"},
        {"type": "integer", "minimum": 0, "maximum": int(MAX_DURATION.total_seconds()),
         "description": "seconds"},
    ],
}
Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(DURATION_INPUT_SCHEMA, mode="validation"),
]
# The bounds first (so the JSON schema has minimum/maximum), then the ASCII check that runs
# before pydantic parses the number.
Port = Annotated[int, Field(ge=1, le=65535), BeforeValidator(_strict_int)]
Ttl = Annotated[int, Field(ge=1, le=2_147_483_647), BeforeValidator(_strict_int)]
Percent = Annotated[int, Field(ge=1, le=100), BeforeValidator(_strict_int)]
PrefixV4 = Annotated[int, Field(ge=1, le=32), BeforeValidator(_strict_int)]
PrefixV6 = Annotated[int, Field(ge=1, le=128), BeforeValidator(_strict_int)]


def _filter_number(value: int) -> int:
    if not FILTER_MIN <= value <= FILTER_MAX:
        raise ValueError(
            f"filter {value} is outside the router's static filter range "
            f"{FILTER_MIN}..{FILTER_MAX} (RTX 'ip filter' numbers)"
        )
    return value


FilterNumber = Annotated[
    int,
    BeforeValidator(_strict_int),
    AfterValidator(_filter_number),
    Field(json_schema_extra={"minimum": FILTER_MIN, "maximum": FILTER_MAX}),
]


class Connect(StrictModel):
    """Parsed form of `ssh://user@host:port` or `local:/`."""

    scheme: Literal["ssh", "local"]
    user: str | None = None
    host: str | None = None
    port: int = 22

    @classmethod
    def parse(cls, text: str) -> Connect:
        if text in ("local:/", "local:", "local"):
            return cls(scheme="local")
        match = re.match(
            r"^ssh://(?:(?P<user>[a-z_][a-z0-9_.-]{0,31})@)?(?P<host>[A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\])"
            r"(?::(?P<port>[0-9]{1,5}))?/?\Z",
            text,
            re.ASCII,
        )
        if not match:
            # Never echo a password someone put into the URL (ssh://user:PASSWORD@host).
            shown = re.sub(r"(://[^/@:]*):.*@", r"\1:***@", text)
            hint = (" (no password in the URL: use router.password / admin_password with "
                    "env:NAME or file:PATH)" if shown != text else "")
            raise ValueError(
                f"{shown!r} is not a connection: use ssh://user@host:port or local:/{hint}"
            )
        host = match.group("host").strip("[]")
        port = int(match.group("port") or 22)
        if not 1 <= port <= 65535:
            raise ValueError(f"{text!r}: port {port} out of range")
        return cls(
            scheme="ssh", user=match.group("user") or "root", host=check_host(host), port=port
        )

    def __str__(self) -> str:
        if self.scheme == "local":
            return "local:/"
        return f"ssh://{self.user}@{self.host}:{self.port}"


def _connect(value: Any) -> Connect:
    if isinstance(value, Connect):
        return value
    return Connect.parse(str(value))


# The state file writes a connection as one string; the JSON schema says so (validation mode),
# not the `Connect` object it is parsed into. The pattern is looser than `Connect.parse`, which
# words the exact error.
CONNECT_INPUT_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": r"^(?:local(?::/?)?|ssh://\S+)$",
    "description": "ssh://user@host:port (user default root, port default 22) or local:/",
    "examples": ["ssh://root@mail.example.co.jp:22", "local:/"],
}
ConnectStr = Annotated[
    Connect,
    BeforeValidator(_connect),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(CONNECT_INPUT_SCHEMA, mode="validation"),
]
