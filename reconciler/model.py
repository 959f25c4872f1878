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

# A user name reaches Postfix maps, SMTP commands and remote shells: allow only what is
# safe as a mail local part *and* as an unquoted shell word.
USER_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_-]|\.(?=[a-z0-9_-])){0,63}$")
HOST_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$", re.IGNORECASE)
SECRET_RE = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:/[^\0\n]+)$")
DURATION_RE = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
# RTX gateway forms mailrec will write: an IPv4 address or a named interface.
GATEWAY_IFACE_RE = re.compile(
    r"^(?:pp \d{1,3}|tunnel \d{1,4}|dhcp lan\d|lan\d(?:/\d+)?|pp anonymous|null|loopback)$"
)


# Error type of `field_error`: `load.py` adds ctx["field"] to the error's location, so a check
# made on a whole section still points at the line of the field it blames.
FIELD_ERROR = "field_error"


def field_error(field: str, message: str) -> PydanticCustomError:
    """A validation error of a section that blames one of its keys (by name)."""
    return PydanticCustomError(FIELD_ERROR, "{message}", {"message": message, "field": field})


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


def parse_duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return timedelta(seconds=value)
    match = DURATION_RE.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a duration (use e.g. 30m, 48h, 2d)")
    amount, unit = int(match.group(1)), match.group(2)
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    return timedelta(seconds=amount * seconds)


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _gateway(value: str) -> str:
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
Port = Annotated[int, Field(ge=1, le=65535)]
Ttl = Annotated[int, Field(ge=1, le=2_147_483_647)]


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
            r"(?::(?P<port>\d{1,5}))?/?$",
            text,
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
        if re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", value):
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
        if not re.match(r"^(?:[+?~-]?)(?:include|a|mx|ip4|ip6|exists):\S+$", value):
            raise ValueError(
                f"{value!r} is not one SPF term (e.g. include:_spf.example.sakura.ne.jp)"
            )
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
        if not re.match(r"^[A-Za-z0-9_.-]+\.?$", value):
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
        if not port.isdigit() or not 1 <= int(port) <= 65535:
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
    filter: Annotated[int, Field(ge=1, le=2_147_483_647)]
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
    max_change_pct: Annotated[int, Field(ge=1, le=100)] = 30
    quiet_period: Duration = timedelta(hours=48)


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
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @field_validator("users")
    @classmethod
    def _user_names(cls, value: dict[str, User]) -> dict[str, User]:
        for name in value:
            if not isinstance(name, str) or not USER_NAME_RE.match(name):
                raise field_error(
                    str(name),
                    f"user name {name!r} is not allowed: lower-case letters, digits, '.', '_' "
                    "and '-', starting with a letter or digit (safe as a mail local part "
                    "and a shell word)",
                )
        return value

    def user_names(self) -> list[str]:
        return sorted(self.users)
