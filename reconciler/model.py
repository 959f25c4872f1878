"""Desired state: the pydantic schema of the YAML an admin commits (DESIGN.md section 1).

First stage of the flow: `load.py` turns files into a `DesiredState`; everything after it
(diff, safety, plan) reads only these validated, immutable models.

This module holds the sections (`Onprem`, `Rental`, `Dns`, `Router`, `User`, `Policy`) and
the checks that span their fields; the field types and their validators are in
`model_types`, re-exported here so `from reconciler.model import ...` keeps working.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from reconciler.model_types import (
    DURATION_RE,
    FIELD_ERROR,
    FILTER_MAX,
    FILTER_MIN,
    GATEWAY_IFACE_RE,
    HOST_LABEL_RE,
    MAX_DURATION,
    SECRET_RE,
    USER_NAME_RE,
    Connect,
    ConnectStr,
    Domain,
    Duration,
    FilterNumber,
    Fqdn,
    Gateway,
    IpAddress,
    Network,
    Percent,
    Port,
    PrefixV4,
    PrefixV6,
    SecretRef,
    Side,
    StrictModel,
    Ttl,
    check_host,
    field_error,
    format_duration,
    parse_duration,
)
from reconciler.spf import (
    DEFAULT_MIN_PREFIX_V4,
    DEFAULT_MIN_PREFIX_V6,
    PASS_QUALIFIERS,
    SpfSyntaxError,
    bad_character,
    parse_term,
)

# The sections defined here and the field types re-exported from model_types.
__all__ = [
    "DURATION_RE",
    "FIELD_ERROR",
    "FILTER_MAX",
    "FILTER_MIN",
    "GATEWAY_IFACE_RE",
    "HOST_LABEL_RE",
    "MAX_DURATION",
    "SECRET_RE",
    "USER_NAME_RE",
    "Connect",
    "ConnectStr",
    "DesiredState",
    "Dns",
    "Domain",
    "Duration",
    "FilterNumber",
    "Fqdn",
    "Gateway",
    "IpAddress",
    "Network",
    "Onprem",
    "Percent",
    "Policy",
    "Port",
    "PrefixV4",
    "PrefixV6",
    "Rental",
    "Router",
    "SecretRef",
    "Side",
    "SmtpRoute",
    "StrictModel",
    "Tsig",
    "Ttl",
    "Upstream",
    "User",
    "check_host",
    "field_error",
    "format_duration",
    "parse_duration",
]


class Upstream(StrictModel):
    """A relay in front of onprem (the DMZ host the MX names): it queues the domain's mail
    and hands it to onprem, so onprem may retire only once it no longer does."""

    host: Fqdn  # its name, as the MX (or a secondary MX) names it
    # ssh://root@relay:22 to read its routing and queue; without it a person confirms
    # (a manual step), and mailrec probes the relay by SMTP.
    connect: ConnectStr | None = None
    config_dir: str = "/etc/postfix"
    # Where the relay's SMTP server answers, for the RCPT probe that checks it no longer
    # accepts the domain (host or host:port; default: host, port 25).
    smtp: str | None = None

    @field_validator("smtp")
    @classmethod
    def _smtp(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or "]" in port:
            host, port = value, "25"
        if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            raise ValueError(f"{value!r}: expected host or host:port")
        return f"{check_host(host.strip('[]'))}:{port}"

    @field_validator("config_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or "\0" in value or "\n" in value:
            raise ValueError(f"{value!r} must be an absolute path")
        return value


class Onprem(StrictModel):
    connect: ConnectStr
    config_dir: str = "/etc/postfix"
    mx_host: Fqdn
    public_ip: IpAddress
    mailbox: str = "maildir:~/Maildir"
    state: Literal["active", "retired"] = "active"
    log_file: str = "/var/log/mail.log"
    # The zone of the log's classic syslog stamps ("Dec  2 15:04:05" carries none); ISO 8601
    # stamps carry their own offset.
    log_timezone: str = "UTC"
    # The uids of people's accounts, [first, last]; default: UID_MIN/UID_MAX of the host's
    # /etc/login.defs (CentOS 6: 500, Debian: 1000), else 1000-59999.
    uid_range: tuple[int, int] | None = None
    upstream: list[Upstream] = Field(default_factory=list)

    @field_validator("log_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone (e.g. UTC, Asia/Tokyo)") from None
        return value

    @field_validator("uid_range")
    @classmethod
    def _uids(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 0 <= value[0] <= value[1] <= 2**32 - 2:
            raise ValueError(f"{list(value)}: give [first, last] uids, first <= last")
        return value

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
    # The POP/IMAP server users read their rental mailbox from (mail-client instructions);
    # default: smtp_host.
    incoming_host: str | None = None
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
        return check_host(value)

    @field_validator("incoming_host")
    @classmethod
    def _incoming_host(cls, value: str | None) -> str | None:
        return None if value is None else check_host(value)

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
        return f"{check_host(host.strip('[]'))}:{port}"

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
    gateway: Gateway
    otherwise: Gateway
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


ALIAS_KEEPS = ("rental", "onprem", "drop")


def _alias_target(value: Any) -> Any:
    """An alias is its members (a list), or one of: rental (the rental already delivers
    this name itself), onprem (still served by onprem only: the MX cannot move), drop (the
    name is given up: after the MX move it bounces, by decision)."""
    if isinstance(value, str) and value not in ALIAS_KEEPS:
        return [value]  # `info: suga` is one member
    return value


# In the JSON schema (validation mode): what a state file may write, one member as a bare
# string included.
AliasTarget = Annotated[Literal["rental", "onprem", "drop"] | list[str],
                        BeforeValidator(_alias_target,
                                        json_schema_input_type=Literal["rental", "onprem", "drop"]
                                        | str | list[str])]
_MEMBER_RE = re.compile(r"^[A-Za-z0-9._+-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\Z",
                        re.ASCII)


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
    # Names onprem receives for that are not users (aliases, lists, virtual aliases), and
    # where each goes at the rental. The MX moves only when every name onprem accepts has a
    # destination at the rental or is declared drop (MR019).
    aliases: dict[str, AliasTarget] = Field(default_factory=dict)
    policy: Policy = Field(default_factory=Policy)

    @model_validator(mode="after")
    def _aliases(self) -> DesiredState:
        for name, target in self.aliases.items():
            if name != "*" and not USER_NAME_RE.match(name):
                raise field_error(("aliases", name), f"alias name {name!r} is not allowed: "
                                  "lower-case letters, digits, '.', '_' and '-' (or * for "
                                  "onprem's catch-all)")
            if name in self.users:
                raise field_error(("aliases", name), f"{name} is a user and an alias: a name "
                                  "is one or the other")
            if isinstance(target, list):
                if not target:
                    raise field_error(("aliases", name), "an alias needs at least one member "
                                      "(or rental, onprem, drop)")
                for member in target:
                    if member not in self.users and not _MEMBER_RE.match(member):
                        raise field_error(("aliases", name), f"member {member!r} is neither "
                                          "a user of the state nor an address (name@domain)")
        return self

    def alias_members(self, name: str) -> tuple[str, ...] | None:
        """The alias's members as full addresses (users at the domain), or None when the
        state does not give members."""
        target = self.aliases.get(name)
        if not isinstance(target, list):
            return None
        return tuple(sorted(m if "@" in m else f"{m}@{self.domain}" for m in target))

    # `suga:` (null) is all defaults: the JSON schema (validation mode) allows it too.
    @field_validator("users", mode="before", json_schema_input_type=dict[str, User | None])
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
