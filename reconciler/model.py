"""Desired state: the pydantic schema of the YAML an admin commits (DESIGN.md section 1).

First stage of the flow: `load.py` turns files into a `DesiredState`; everything after it
(diff, safety, plan) reads only these validated, immutable models.
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
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from reconciler.spf import (
    DEFAULT_MIN_PREFIX_V4,
    DEFAULT_MIN_PREFIX_V6,
    PASS_QUALIFIERS,
    SpfSyntaxError,
    bad_character,
    parse_term,
)

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


def _host(value: str) -> str:
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
Duration = Annotated[
    timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
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
        return cls(scheme="ssh", user=match.group("user") or "root", host=_host(host), port=port)

    def __str__(self) -> str:
        if self.scheme == "local":
            return "local:/"
        return f"ssh://{self.user}@{self.host}:{self.port}"


def _connect(value: Any) -> Connect:
    if isinstance(value, Connect):
        return value
    return Connect.parse(str(value))


ConnectStr = Annotated[Connect, BeforeValidator(_connect), PlainSerializer(str, return_type=str)]


class Onprem(StrictModel):
    connect: ConnectStr
    config_dir: str = "/etc/postfix"
    mx_host: Fqdn
    public_ip: IpAddress
    mailbox: str = "maildir:~/Maildir"
    state: Literal["active", "retired"] = "active"
    log_file: str = "/var/log/mail.log"

    @field_validator("config_dir", "log_file")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or "\0" in value or "\n" in value:
            raise ValueError(f"{value!r} must be an absolute path")
        return value

    @field_validator("mailbox")
    @classmethod
    def _mailbox(cls, value: str) -> str:
        kind, _, path = value.partition(":")
        if kind not in ("maildir", "mbox") or not path:
            raise ValueError(f"{value!r}: use maildir:~/Maildir or mbox:/var/mail/{{user}}")
        if kind == "mbox" and "{user}" not in path:
            raise ValueError(f"{value!r}: an mbox path must contain {{user}}")
        return value


class Rental(StrictModel):
    provider: str = "manual"
    mx_host: Fqdn
    smtp_host: str
    relay_port: Port = 25
    submission_port: Port = 587
    spf: str
    whitelist: list[Network] = Field(default_factory=list)
    # Provider-specific settings (e.g. the ssh provider's connect string), checked by the provider.
    options: dict[str, str] = Field(default_factory=dict)

    @field_validator("provider")
    @classmethod
    def _provider(cls, value: str) -> str:
        if value in ("manual", "ssh", "lab"):
            return value
        if re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z", value, re.ASCII):
            return value
        raise ValueError(
            f"{value!r} is not a provider: use manual, ssh, lab or python.module:Class"
        )

    @field_validator("smtp_host")
    @classmethod
    def _smtp_host(cls, value: str) -> str:
        return _host(value)

    @field_validator("spf")
    @classmethod
    def _spf(cls, value: str) -> str:
        """One RFC 7208 mechanism that names the rental's senders by a domain or an address,
        in a strict character set (it is written into a quoted TXT record and compared with
        what DNS returns). `+all` passes here and is refused by the static rule MR017."""
        head = f"{value!r} is not one SPF term (e.g. include:_spf.example.sakura.ne.jp)"
        bad = bad_character(value)
        if bad:
            raise ValueError(
                f"{head}: character {bad} is not allowed (ASCII letters, digits and "
                ". _ - : / % { } + = , only; no spaces, quotes or backslashes)"
            )
        try:
            term = parse_term(value)
        except SpfSyntaxError as exc:
            raise ValueError(f"{head}: {exc}") from None
        if term.modifier:
            raise ValueError(f"{head}: {term.name}= is a modifier, not a mechanism")
        if term.qualifier not in PASS_QUALIFIERS:
            raise ValueError(
                f"{head}: the qualifier {term.qualifier!r} does not authorise the rental "
                "(only '+' or no qualifier passes)"
            )
        if term.name != "all" and term.argument is None:
            raise ValueError(
                f"{head}: {term.name} needs the rental's domain or address "
                f"({term.name}:mail.example.net); a bare {term.name} names this domain's own "
                "hosts"
            )
        if term.name == "ptr":
            raise ValueError(f"{head}: ptr is slow and unreliable (RFC 7208 section 5.5: "
                             "do not use it); use include:, a:, mx:, ip4: or ip6:")
        return value


class Tsig(StrictModel):
    name: str
    algorithm: Literal[
        "hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1", "hmac-md5"
    ] = "hmac-sha256"
    secret: SecretRef

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9_.-]+\.?\Z", value, re.ASCII):
            raise ValueError(f"{value!r} is not a TSIG key name")
        return value


class Dns(StrictModel):
    provider: str = "rfc2136"
    server: str | None = None
    tsig: Tsig | None = None
    mx: Side = Side.ONPREM
    ttl: Ttl = 3600
    cutover_ttl: Ttl = 300

    @field_validator("provider")
    @classmethod
    def _provider(cls, value: str) -> str:
        if value not in ("rfc2136", "lab"):
            raise ValueError(f"{value!r} is not a DNS provider: use rfc2136 or lab")
        return value

    @field_validator("server")
    @classmethod
    def _server(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep:
            host, port = value, "53"
        if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            raise ValueError(f"{value!r}: expected host:port")
        return f"{_host(host.strip('[]'))}:{port}"

    @model_validator(mode="after")
    def _ttls(self) -> Dns:
        if self.cutover_ttl > self.ttl:
            raise field_error(
                "cutover_ttl",
                f"cutover_ttl ({self.cutover_ttl}) must not exceed ttl ({self.ttl}): it is the "
                "TTL the MX is lowered to before it moves",
            )
        if self.provider == "rfc2136" and self.server is None:
            raise field_error(
                "server", "required with provider rfc2136 (host:port of the primary DNS server)"
            )
        if self.provider == "rfc2136" and self.tsig is None:
            raise field_error(
                "tsig", "required with provider rfc2136 ({name, algorithm, secret: env:NAME})"
            )
        return self


class SmtpRoute(StrictModel):
    filter: FilterNumber
    gateway: Annotated[str, AfterValidator(_gateway)]
    otherwise: Annotated[str, AfterValidator(_gateway)]
    egress_ip: IpAddress

    @model_validator(mode="after")
    def _distinct(self) -> SmtpRoute:
        if self.gateway == self.otherwise:
            raise field_error(
                "otherwise",
                f"gateway and otherwise are both {self.gateway!r}: the policy route would do "
                "nothing (otherwise is the gateway for everything but tcp/25)",
            )
        return self


class Router(StrictModel):
    provider: Literal["rtx", "lab"] = "rtx"
    connect: ConnectStr
    password: SecretRef | None = None
    admin_password: SecretRef
    smtp_route: SmtpRoute | None = None


class User(StrictModel):
    inbound: Side = Side.ONPREM
    outbound: Side = Side.ONPREM


class Policy(StrictModel):
    max_change_pct: Percent = 30
    quiet_period: Duration = timedelta(hours=48)
    # Relay whitelist entries (and SPF ip4/ip6 terms) must be at least this narrow (MR016,
    # MR017); a default route (0.0.0.0/0, ::/0) is refused whatever these say.
    whitelist_min_prefix_v4: PrefixV4 = DEFAULT_MIN_PREFIX_V4
    whitelist_min_prefix_v6: PrefixV6 = DEFAULT_MIN_PREFIX_V6


def _bad_user_name(name: Any) -> PydanticCustomError:
    return field_error(
        str(name),
        f"user name {name!r} is not allowed: lower-case letters, digits, '.', '_' "
        "and '-', starting with a letter or digit (safe as a mail local part "
        "and a shell word)",
    )


class DesiredState(StrictModel):
    version: Literal[1]
    domain: Domain
    onprem: Onprem
    rental: Rental
    dns: Dns
    router: Router | None = None
    users: dict[str, User] = Field(default_factory=dict)
    policy: Policy = Field(default_factory=Policy)

    @field_validator("users", mode="before")
    @classmethod
    def _user_entries(cls, value: Any) -> Any:
        # `suga:` with nothing after it means "all defaults"; YAML gives None for that.
        if isinstance(value, dict):
            for name in value:
                # Checked before pydantic strips the keys: "suga\n" must not become suga (and
                # silently replace the entry of the real suga).
                if isinstance(name, str) and name != name.strip():
                    raise _bad_user_name(name)
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _no_mail_loop(self) -> DesiredState:
        """The rental must not be onprem itself: onprem would forward migrated users' mail to
        itself (a mail loop), and the rental probe would count onprem's accounts as rental
        mailboxes."""
        onprem = self.onprem
        names = {onprem.mx_host.rstrip(".").lower(): "onprem.mx_host",
                 str(onprem.public_ip): "onprem.public_ip"}
        if onprem.connect.host:
            names.setdefault(onprem.connect.host.rstrip(".").lower(), "onprem.connect")
        for field in ("smtp_host", "mx_host"):
            value = str(getattr(self.rental, field))
            blamed = names.get(value.rstrip(".").lower())
            if blamed:
                raise field_error(
                    ("rental", field),
                    f"rental.{field} {value!r} is the onprem host ({blamed}): onprem would "
                    "forward the rental's mail to itself (a mail loop), and the rental probe "
                    "would count onprem's accounts as rental mailboxes; give the rental "
                    "service's own host",
                )
        return self

    @field_validator("users")
    @classmethod
    def _user_names(cls, value: dict[str, User]) -> dict[str, User]:
        for name in value:
            if not isinstance(name, str) or not USER_NAME_RE.match(name):
                raise _bad_user_name(name)
        return value

    def user_names(self) -> list[str]:
        return sorted(self.users)
