"""Onprem Postfix: facts parsed from Postfix's own formats, and the changes mailrec makes.

Facts (pure `parse_*` functions, tested on samples of real files): `main.cf` and `postconf`
output, map sources (`postmap -s` output has the same `key value` shape), aliases(5) (and
`postalias -s` output), Postfix lists (mydestination...), `getent passwd`, /etc/login.defs,
Maildir message counts, and the mail log. mailrec manages exactly three maps and three main.cf
parameters:
  mailrec_transport   user@NAME -> smtp:[rental]:25   (forward migrated users)
  mailrec_recipients  user@NAME -> OK                 (keep accepting them: MR007)
  mailrec_virtual     user@NAME -> user@domain        (NAME other than the domain: the
                                                       rental only accepts user@domain)
  for every NAME local(8) delivers for (mydestination expanded) and the state's domain;
  local_recipient_maps, transport_maps and virtual_alias_maps gain hash:<dir>/<map>.
Everything else in the configuration is left as it is (docs/onprem-postfix.md).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from reconciler.model import USER_NAME_RE

TRANSPORT_MAP = "mailrec_transport"
RECIPIENT_MAP = "mailrec_recipients"
VIRTUAL_MAP = "mailrec_virtual"
# People's uids when neither the state (onprem.uid_range) nor /etc/login.defs says: Debian's
# range; system accounts stay out.
MIN_UID, MAX_UID = 1000, 59999
DEFAULT_UID_RANGE: tuple[int, int] = (MIN_UID, MAX_UID)

class PostfixError(RuntimeError):
    """A Postfix file mailrec cannot read or a change it cannot make safely."""


def parse_main_cf(text: str) -> dict[str, str]:
    """main.cf: `name = value`, continuation lines start with whitespace, # comments."""
    params: dict[str, str] = {}
    current: str | None = None
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0] in " \t" and current is not None:
            # `name =` alone on its line, the value below: no leading space (as postconf).
            params[current] = f"{params[current]} {raw.strip()}".lstrip()
            continue
        name, sep, value = raw.partition("=")
        if not sep:
            raise PostfixError(f"main.cf: cannot parse line {raw!r}")
        current = name.strip()
        params[current] = value.strip()
    return params


def set_main_cf(text: str, name: str, value: str) -> str:
    """Replace (or append) one parameter, keeping comments and every other line."""
    lines = text.splitlines()
    out: list[str] = []
    skipping = False
    replaced = False
    for line in lines:
        if skipping:
            if line[:1] in (" ", "\t") and line.strip() and not line.lstrip().startswith("#"):
                continue  # a continuation line of the value being replaced
            if not line.strip() or line.lstrip().startswith("#"):
                # Postfix skips blank and comment lines inside a multi-line value: keep
                # them, and keep dropping the old value's continuation lines after them.
                out.append(line)
                continue
        skipping = False
        if re.match(rf"^{re.escape(name)}\s*=", line):
            out.append(f"{name} = {value}")
            skipping = replaced = True
            continue
        out.append(line)
    if not replaced:
        out.append(f"{name} = {value}")
    return "\n".join(out) + "\n"


def parse_map(text: str) -> dict[str, str]:
    """A map source (or `postmap -s` output): `key<whitespace>value`, # comments.

    One pass, one split per line (linear: a 100,000-line map is read in well under a
    second)."""
    entries: dict[str, str] = {}
    # Keys and values are interned: the three managed maps name the same user@NAME keys, and
    # their values repeat ("OK", the relay target): at 100,000 users that is ~50 MB less.
    intern = sys.intern
    for raw in text.splitlines():
        # Key and value are separated by the first run of whitespace (`postmap -s` prints a
        # tab); the value may itself hold spaces ("a@x, b@y"). split() skips the line's
        # leading whitespace, as strip() would; the value loses its trailing whitespace.
        parts = raw.split(None, 1)
        if not parts or parts[0][0] == "#":
            continue  # a blank line or a comment (also an indented one)
        entries[intern(parts[0].lower())] = intern(parts[1].rstrip()) if len(parts) == 2 else ""
    return entries


def edit_map(text: str, changes: Mapping[str, str | None], header: str) -> str:
    """A managed map source with `changes` applied (None drops a key): the one edit both the
    lab and the real-host driver make."""
    entries = parse_map(text)
    for key, value in changes.items():
        if value is None:
            entries.pop(key, None)
        else:
            entries[key] = value
    return format_map(entries, header)


def format_map(entries: Mapping[str, str], header: str) -> str:
    """A managed map's source: the header, then `key value` lines sorted by key (stable
    output: no diff when nothing changed)."""
    body = "".join([f"{key} {entries[key]}\n" for key in sorted(entries)])
    return f"# {header}\n# Managed by mailrec: edits are overwritten.\n{body}"


def parse_passwd(text: str, uid_range: tuple[int, int] = DEFAULT_UID_RANGE) -> dict[str, Path]:
    """`getent passwd` / /etc/passwd: mail users (uids in `uid_range`, names mailrec accepts
    as users) -> home."""
    first, last = uid_range
    return {
        name: Path(account.home) for name, account in parse_accounts(text).items()
        if first <= account.uid <= last and USER_NAME_RE.match(name)
    }


class Account(NamedTuple):
    home: str
    uid: int


# An account name local(8) could deliver to and a path may hold: no '$' (Samba machine
# accounts), no '/', no leading '-' or '.'.
_ACCOUNT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\Z", re.ASCII)


def parse_accounts(text: str) -> dict[str, Account]:
    """Every account of `getent passwd` (system accounts too) -> (home, uid); the first line
    of a name wins, as getpwnam() answers."""
    accounts: dict[str, Account] = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) < 7 or not parts[2].isdigit() or not _ACCOUNT_RE.match(parts[0]):
            continue
        accounts.setdefault(parts[0], Account(parts[5], int(parts[2])))
    return accounts


def passwd_homes(text: str, uid_range: tuple[int, int] = DEFAULT_UID_RANGE
                 ) -> tuple[dict[str, str], dict[str, str]]:
    """In one pass over `getent passwd` / /etc/passwd: the people of `parse_passwd`, and
    every other account (any line with 7 fields and a numeric uid, whatever its name; the
    last line of a name wins), each -> its home as passwd writes it (text, not a Path: the
    lab counts 100,000 homes with string paths)."""
    first, last = uid_range
    account_name = _ACCOUNT_RE.match
    accounts: dict[str, Account] = {}  # as parse_accounts: the first line of a name wins
    every: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) < 7 or not parts[2].isdigit():
            continue
        name = parts[0]
        if name:
            every[name] = parts[5]
        if name not in accounts and account_name(name):
            accounts[name] = Account(parts[5], int(parts[2]))
    user_name = USER_NAME_RE.match
    people = {name: account.home for name, account in accounts.items()
              if first <= account.uid <= last and user_name(name)}
    return people, {name: home for name, home in every.items() if name not in people}


def parse_login_defs(text: str) -> tuple[int, int] | None:
    """UID_MIN and UID_MAX of /etc/login.defs (`NAME VALUE`, # comments): the uids useradd
    gives people (Debian 1000, CentOS 6 500). None when it names neither; a missing one of
    the two takes mailrec's default."""
    values: dict[str, int] = {}
    for raw in text.splitlines():
        parts = raw.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] in ("UID_MIN", "UID_MAX") and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    if not values:
        return None
    first, last = values.get("UID_MIN", MIN_UID), values.get("UID_MAX", MAX_UID)
    return (first, last) if first <= last else None


def users_in_map(entries: dict[str, str], domain: str) -> dict[str, str]:
    """The map's `user@domain` entries as user -> value (mailrec compares the value with
    what the state would write: a changed one is drift, MR018)."""
    suffix = "@" + domain.lower()
    return {k[: -len(suffix)]: v for k, v in entries.items() if k.endswith(suffix)}


@dataclass(frozen=True)
class AddressSpace:
    """Every name the onprem Postfix receives for besides its users' `user@domain`, read from
    main.cf and its tables in a constant number of commands (docs/onprem-postfix.md)."""

    # mydestination expanded ($myhostname, $mydomain, localhost...), lower-case, no dot at
    # the end: every name local(8) delivers for. A user's forward must cover each.
    local_domains: tuple[str, ...] = ()
    # mydestination entries mailrec cannot expand (a lookup table, an unknown $parameter):
    # names it cannot see, so the forward of a user is "not verified" while any remain.
    unresolved: tuple[str, ...] = ()
    myorigin: str = ""  # the domain appended to a bare local name (an alias's members)
    recipient_delimiter: str = ""  # "+": user+tag@domain reaches user
    # aliases(5) from alias_maps: local name -> members as written (user, user@x, |cmd,
    # /file, :include:/path). Applies to every local domain.
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # virtual_alias_maps entries whose key is at the domain or a local domain (or the
    # domain's catch-all `@domain`): local part ("" for the catch-all) -> members.
    virtual_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    virtual_alias_domains: tuple[str, ...] = ()
    luser_relay: str = ""  # where local(8) sends names with no account ($user@other...)
    fallback_transport: str = ""  # where local(8) sends names with no account
    # As main.cf says (""; smtpd accepts every name); None: not read (no address space seen).
    local_recipient_maps: str | None = None
    uid_range: tuple[int, int] = (MIN_UID, MAX_UID)  # people, from login.defs or the state
    # Accounts outside the uid range (root, system users, an old uid-500 user): name ->
    # messages in their mailbox (0 too). They receive onprem; nobody migrates them unless the
    # state lists them as users.
    other_accounts: dict[str, int] = field(default_factory=dict)
    # Users whose onprem mailbox mailrec archived, but a mailbox holds mail again: name ->
    # messages. Something still delivers there locally (a finding, never a drain wait).
    stray_mail: dict[str, int] = field(default_factory=dict)
    # Tables mailrec could not read (ldap:, mysql:, a missing file): names it cannot see.
    unreadable: tuple[str, ...] = ()


@dataclass(frozen=True)
class PostfixFacts:
    accounts: dict[str, int]  # user -> messages in the onprem mailbox
    transport: dict[str, str]  # users with an entry in mailrec's transport map -> its value
    recipients: dict[str, str]  # users in mailrec's recipient map -> its value ("OK")
    recipient_validation: bool
    last_mail_at: datetime | None
    retired: bool
    space: AddressSpace = AddressSpace()
    # Users with a `user@domain` transport entry that lacks the same entry for another
    # local domain name (or, where the name is not the domain, the address rewrite that
    # makes the rental accept it): mail to that name stays onprem. Repaired by inbound/USER.
    partial_forward: frozenset[str] = frozenset()


def recipient_map_ref(config_dir: str) -> str:
    return f"hash:{config_dir.rstrip('/')}/{RECIPIENT_MAP}"


def transport_map_ref(config_dir: str) -> str:
    return f"hash:{config_dir.rstrip('/')}/{TRANSPORT_MAP}"


def virtual_map_ref(config_dir: str) -> str:
    return f"hash:{config_dir.rstrip('/')}/{VIRTUAL_MAP}"


def with_map(value: str, ref: str) -> str:
    parts = value.replace(",", " ").split()
    return value if ref in parts else (f"{value} {ref}".strip())


def relay_target(smtp_host: str, port: int) -> str:
    return f"smtp:[{smtp_host}]:{port}"


# --- forwarding a migrated user under every name ---------------------------------------------


def forward_keys(user: str, domain: str, names: Iterable[str]) -> list[str]:
    """The addresses a migrated user is forwarded under: user@domain first, then user@NAME
    for every other name local(8) delivers for."""
    keys = [f"{user}@{domain}"]
    keys.extend(f"{user}@{name}" for name in names if f"{user}@{name}" not in keys)
    return keys


def partial_forwards(
    forwarded: Mapping[str, str], *, domain: str, names: Iterable[str],
    transport: Mapping[str, str], recipients: Mapping[str, str], virtual: Mapping[str, str],
    rewriting: bool,
) -> frozenset[str]:
    """Users forwarded as user@domain (`forwarded`: user -> transport value) for whom another
    name lacks the same transport entry, its recipient entry, or the rewrite to user@domain
    (`rewriting`: main.cf's virtual_alias_maps names mailrec_virtual): mail to that name
    stays onprem, or reaches a rental that refuses it."""
    others = tuple(names)
    partial: set[str] = set()
    for user, value in forwarded.items():
        for key in forward_keys(user, domain, others)[1:]:
            if (transport.get(key) != value or key not in recipients or not rewriting
                    or virtual.get(key) != f"{user}@{domain}"):
                partial.add(user)
                break
    return frozenset(partial)


def nexthop(value: str) -> tuple[str, int] | None:
    """Host and port of a `transport:nexthop` value (fallback_transport = smtp:[h]:2525);
    None without a nexthop. Port 25 when none is given."""
    _, sep, hop = value.strip().partition(":")
    if not sep or not hop:
        return None
    if hop.startswith("["):
        host, close, rest = hop[1:].partition("]")
        if not close:
            return None
        port = rest[1:] if rest.startswith(":") else rest
    else:
        host, _, port = hop.partition(":")
    if port and not port.isdigit():
        return None
    return host.lower().rstrip("."), int(port) if port else 25


def points_at_rental(name: str, value: str, rental_hosts: str | Iterable[str]) -> bool:
    """fallback_transport (a transport:nexthop) or luser_relay (an address) sends to one of
    the rental's hosts (its smtp_host or MX host), on whatever port."""
    listed = (rental_hosts,) if isinstance(rental_hosts, str) else rental_hosts
    hosts = {host.lower().strip("[]").rstrip(".") for host in listed}
    if name == "luser_relay":
        domain = value.strip().rpartition("@")[2].lower().strip("[]").rstrip(".")
        return bool(domain) and domain in hosts
    hop = nexthop(value)
    return hop is not None and hop[0] in hosts
