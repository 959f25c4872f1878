"""The onprem mail log on a real host: when Postfix last handled a message (MR010's quiet
period), read over a `Transport` with the pure parser `postfix.last_mail_seen`.

Used by `postfix_host.PostfixHost.observe`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, tzinfo

from reconciler.drivers.postfix import PostfixError
from reconciler.transport import Transport, TransportError, safe_path

LOG_LINES = 5000
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


def read_last_mail(transport: Transport, log_file: str, *, now: datetime, since: datetime,
                   tz: tzinfo, lines: int = LOG_LINES) -> datetime | None:
    """The newest message the log shows, or None when it shows none back to `since` (the
    quiet period's start). `tz` is the zone of classic syslog stamps."""
    try:
        current = transport.run(["tail", "-n", str(lines), log_file])
    except TransportError as exc:
        # Without the log, "no mail seen" would open the retire gate (MR010): an error.
        raise PostfixError(
            f"cannot read the mail log {log_file} (set onprem.log_file to where this "
            f"host logs Postfix): {exc}"
        ) from exc
    seen = last_mail_seen(current.text, now)
    if seen is not None:
        return seen
    # Just after a rotation the current log may not show mail yet: the last mail is then
    # in LOG.1 (logrotate's delaycompress keeps it uncompressed). Missing is fine.
    older = transport.run(["tail", "-n", str(lines), safe_path(log_file + ".1")], check=False)
    return last_mail_seen(older.text, now) if older.ok else None
