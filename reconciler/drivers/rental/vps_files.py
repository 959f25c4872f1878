"""The VPS's files and command output as the `ssh` rental provider reads and writes them:
pure parsing and rendering, no I/O.

Sits under `ssh.py`: the provider fetches text over the transport (`postconf -x` output, the
virtual mailbox and virtual alias map sources, the Dovecot passwd-file, the mynetworks file, a
`find` listing of the Maildirs) and hands it to the parsers here; the changes it writes back are
rendered here (a map source or passwd-file with one entry added or removed, the whole
mynetworks file).
Tested against samples of real output (tests/integration/test_rental_ssh_parse.py).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Final

from reconciler.drivers.rental.base import IpNetwork

_MYNETWORKS_HEADER: Final = (
    "# Managed by mailrec (rental.whitelist in the state repository): hosts allowed to\n"
    "# relay through this server on port 25 without authentication. Edits are overwritten.\n"
)


def parse_postconf(text: str) -> dict[str, str]:
    """`postconf` output (`name = value` lines) as a dict."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            values[name.strip()] = value.strip()
    return values


def split_list(value: str) -> list[str]:
    """A Postfix list parameter: items separated by commas and/or whitespace."""
    return [item for item in re.split(r"[\s,]+", value) if item]


def _logical_lines(text: str) -> list[list[str]]:
    """Postfix table-source lines: a line starting with whitespace continues the previous one."""
    entries: list[list[str]] = []
    for line in text.splitlines():
        if line[:1].isspace() and line.strip() and entries and not entries[-1][0].startswith("#"):
            entries[-1].append(line)
        else:
            entries.append([line])
    return entries


def parse_map_source(text: str) -> dict[str, str]:
    """A `postmap` source file (`key value` lines, `#` comments) as a dict."""
    result: dict[str, str] = {}
    for entry in _logical_lines(text):
        joined = " ".join(part.strip() for part in entry).strip()
        if not joined or joined.startswith("#"):
            continue
        fields = joined.split(None, 1)
        result[fields[0].lower()] = fields[1].strip() if len(fields) > 1 else ""
    return result


def parse_alias_map(text: str) -> dict[str, tuple[str, ...]]:
    """A virtual alias map source (`info@domain  a@domain, b@other`): address -> members,
    lower-case and sorted (Postfix separates them by commas and/or blanks)."""
    return {
        key: tuple(sorted({member.lower() for member in split_list(value)}))
        for key, value in parse_map_source(text).items()
    }


def map_source_with(text: str, key: str, value: str) -> str:
    """The map source with `key` set to `value` (added at the end, other lines kept as is)."""
    kept = map_source_without(text, key)
    if kept and not kept.endswith("\n"):
        kept += "\n"
    return f"{kept}{key}\t{value}\n"


def map_source_without(text: str, key: str) -> str:
    out: list[str] = []
    for entry in _logical_lines(text):
        first = entry[0].strip()
        if first and not first.startswith("#") and first.split()[0].lower() == key.lower():
            continue
        out.extend(entry)
    return "\n".join(out) + ("\n" if out else "")


def parse_passwd_users(text: str) -> set[str]:
    """User names (first field) of a Dovecot passwd-file; never keeps the hashes."""
    users: set[str] = set()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            users.add(line.split(":", 1)[0].lower())
    return users


def passwd_without(text: str, user: str) -> str:
    lines = [
        line
        for line in text.splitlines()
        if line.split(":", 1)[0].strip().lower() != user.lower() or line.lstrip().startswith("#")
    ]
    return "\n".join(lines) + ("\n" if lines else "")


def passwd_with(text: str, line: str) -> str:
    if text and not text.endswith("\n"):
        text += "\n"
    return text + line + "\n"


def parse_network(token: str) -> IpNetwork:
    """A Postfix network pattern (`192.0.2.0/24`, `[2001:db8::]/32`, `192.0.2.1`)."""
    address, sep, prefix = token.partition("/")
    address = address.strip("[]")
    return ipaddress.ip_network(f"{address}{sep}{prefix}", strict=True)


def parse_mynetworks(text: str) -> tuple[frozenset[IpNetwork], tuple[str, ...]]:
    """The networks in a mynetworks file, and the tokens that are not networks."""
    networks: set[IpNetwork] = set()
    other: list[str] = []
    for line in text.splitlines():
        for token in split_list(line.split("#", 1)[0]):
            try:
                networks.add(parse_network(token))
            except ValueError:
                other.append(token)
    return frozenset(networks), tuple(other)


def postfix_network(network: IpNetwork) -> str:
    # Postfix wants IPv6 networks in brackets in mynetworks.
    if network.version == 6:
        return f"[{network.network_address}]/{network.prefixlen}"
    return str(network)


def render_mynetworks(networks: Iterable[IpNetwork]) -> str:
    ordered = sorted(networks, key=lambda n: (n.version, n.network_address, n.prefixlen))
    return _MYNETWORKS_HEADER + "".join(f"{postfix_network(n)}\n" for n in ordered)


def count_messages(find_output: bytes, maildirs: Mapping[str, str]) -> dict[str, int]:
    """Messages per mailbox from `find DIR -type f (-path */new/* -o -path */cur/*) -printf %P\\0`.

    `maildirs` maps an address to its Maildir relative to DIR. A file belongs to the
    Maildir that is a prefix of its path, so Maildir++ subfolders (`.Sent/cur/...`) count too.
    """
    by_dir = {rel.strip("/"): address for address, rel in maildirs.items()}
    counts = dict.fromkeys(maildirs, 0)
    for raw in find_output.split(b"\0"):
        if not raw:
            continue
        parts = raw.decode("utf-8", "replace").split("/")
        if len(parts) < 2 or parts[-2] not in ("new", "cur"):
            continue
        for depth in range(1, len(parts) - 1):
            address = by_dir.get("/".join(parts[:depth]))
            if address is not None:
                counts[address] += 1
                break
    return counts
