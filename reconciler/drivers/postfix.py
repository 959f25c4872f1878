"""Onprem Postfix: facts parsed from Postfix's own formats, and the changes mailrec makes.

Facts (pure `parse_*` functions, tested on samples of real files): `main.cf`, map sources
(`postmap -s` output has the same `key value` shape), `getent passwd`, Maildir message
counts, and the mail log. mailrec manages exactly two maps and one main.cf parameter:
  mailrec_transport   user@domain -> smtp:[rental]:25   (forward migrated users)
  mailrec_recipients  user@domain -> OK                 (keep accepting them: MR007)
  local_recipient_maps gains hash:<dir>/mailrec_recipients
Everything else in the configuration is left as it is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from reconciler.model import USER_NAME_RE

TRANSPORT_MAP = "mailrec_transport"
RECIPIENT_MAP = "mailrec_recipients"
MIN_UID, MAX_UID = 1000, 59999  # Debian's range for people; system accounts stay out

_SYSLOG_TS = re.compile(r"^(?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) (?P<time>\d\d:\d\d:\d\d) ")
_ISO_TS = re.compile(r"^(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?) ")
_SYSLOG_SLACK = timedelta(days=1)
_MONTHS = {
    m: i
    for i, m in enumerate(
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"],
        start=1,
    )
}
# A message accepted from a client, or a delivery attempt: handed on (sent), still queued for
# a retry (deferred: onprem still holds it) or returned (bounced). Not a rejected RCPT.
_MAIL_EVENT = re.compile(
    r"postfix[^/\s]*/\S+\[\d+\]: [0-9A-Za-z]+: "
    r"(?:to=<[^>]*>.*status=(?:sent|deferred|bounced)|client=)"
)


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
    """A map source (or `postmap -s` output): `key<whitespace>value`, # comments."""
    entries: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # Key and value are separated by the first run of whitespace (`postmap -s` prints a
        # tab); the value may itself hold spaces ("a@x, b@y").
        key, *value = line.split(None, 1)
        entries[key.lower()] = value[0].strip() if value else ""
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


def format_map(entries: dict[str, str], header: str) -> str:
    body = "".join(f"{k} {v}\n" for k, v in sorted(entries.items()))
    return f"# {header}\n# Managed by mailrec: edits are overwritten.\n{body}"


def parse_passwd(text: str) -> dict[str, Path]:
    """`getent passwd` / /etc/passwd: mail users (uid range of people) -> home."""
    users: dict[str, Path] = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) < 7 or not parts[2].isdigit():
            continue
        if MIN_UID <= int(parts[2]) <= MAX_UID and USER_NAME_RE.match(parts[0]):
            users[parts[0]] = Path(parts[5])
    return users


def users_in_map(entries: dict[str, str], domain: str) -> dict[str, str]:
    """The map's `user@domain` entries as user -> value (mailrec compares the value with
    what the state would write: a changed one is drift, MR018)."""
    suffix = "@" + domain.lower()
    return {k[: -len(suffix)]: v for k, v in entries.items() if k.endswith(suffix)}


def _log_time(line: str, now: datetime) -> datetime | None:
    iso = _ISO_TS.match(line)
    if iso:
        stamp = datetime.fromisoformat(iso.group("iso").replace("Z", "+00:00"))
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    match = _SYSLOG_TS.match(line)
    if not match or match.group("mon") not in _MONTHS:
        return None
    hour, minute, second = map(int, match.group("time").split(":"))
    # Classic syslog has neither year nor zone: the stamp is the host's local time, read here
    # as UTC. Take the latest year that puts it no more than a day after `now` (local time is
    # up to 14 h ahead of UTC: a line logged an hour ago in Tokyo must not land a year back).
    for year in (now.year + 1, now.year, now.year - 1):
        try:
            stamp = datetime(year, _MONTHS[match.group("mon")], int(match.group("day")),
                             hour, minute, second, tzinfo=UTC)
        except ValueError:
            continue
        if stamp <= now + _SYSLOG_SLACK:
            return stamp
    return None


def last_mail_seen(log_text: str, now: datetime) -> datetime | None:
    """The newest message Postfix accepted, delivered, relayed or still retries (MR010)."""
    for line in reversed(log_text.splitlines()):
        if _MAIL_EVENT.search(line):
            stamp = _log_time(line, now)
            if stamp is not None:
                return stamp
    return None


def count_maildir(path: Path) -> int:
    total = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(path / sub) as entries:
                total += sum(1 for e in entries if e.is_file() and not e.name.startswith("."))
        except FileNotFoundError:
            continue
    return total


@dataclass(frozen=True)
class PostfixFacts:
    accounts: dict[str, int]  # user -> messages in the onprem mailbox
    transport: dict[str, str]  # users with an entry in mailrec's transport map -> its value
    recipients: dict[str, str]  # users in mailrec's recipient map -> its value ("OK")
    recipient_validation: bool
    last_mail_at: datetime | None
    retired: bool


def recipient_map_ref(config_dir: str) -> str:
    return f"hash:{config_dir.rstrip('/')}/{RECIPIENT_MAP}"


def transport_map_ref(config_dir: str) -> str:
    return f"hash:{config_dir.rstrip('/')}/{TRANSPORT_MAP}"


def with_map(value: str, ref: str) -> str:
    parts = value.replace(",", " ").split()
    return value if ref in parts else (f"{value} {ref}".strip())


def relay_target(smtp_host: str, port: int) -> str:
    return f"smtp:[{smtp_host}]:{port}"
