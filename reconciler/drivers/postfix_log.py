"""The onprem mail log: when Postfix last handled a message (MR010's quiet period).

`read_last_mail` reads it on a real host over a `Transport`, in one command that walks back
from the current log through its rotations (`LOG.1`, `LOG.2.gz`... or logrotate's dateext
`LOG-20261201.gz`...) and sends back only a few lines per file; `newest_mail` decides from
those lines, and `LogFile.read` gives the lab the same facts from local files. The pure
parser `last_mail_seen` reads a log text.

Used by `postfix_host.PostfixHost.observe` and `lab_onprem.LabOnprem.observe`.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Final

from reconciler.drivers.postfix import PostfixError
from reconciler.transport import Transport, TransportError, UnsafePathError, safe_path

# Rotated files read at most (a daily rotation and a quiet period of weeks stay far below).
MAX_ROTATIONS: Final = 400
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
# The same two patterns as POSIX EREs for `grep -E` on the host (LC_ALL=C): a line with a
# stamp mailrec reads, and a mail event on such a line. tests/test_postfix_log.py holds them
# to the Python patterns above on the sample logs.
STAMP_ERE: Final = (
    r"^([A-Z][a-z]{2} +[0-9]{1,2} [0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}([.][0-9]+)?"
    r"(Z|[+-][0-9]{2}:?[0-9]{2})?) "
)
MAIL_ERE: Final = (
    STAMP_ERE + r".*postfix[^/[:space:]]*/[^[:space:]]+\[[0-9]+\]: [0-9A-Za-z]+: "
    r"(to=<[^>]*>.*status=(sent|deferred|bounced)|client=)"
)
_ZCAT_TAG: Final = "mailrec-zcat-status"
# The log read, run as `sh -c SCRIPT mailrec-log LOG SINCE STAMP_ERE MAIL_ERE MAX`. The script
# is a constant; the log's path, the start of the quiet period (epoch seconds) and the
# patterns arrive as positional parameters, and the names of rotated files come from a glob:
# nothing a host returns is parsed by a shell. For each file, newest first, it prints
#   F MTIME NAME        the file (MTIME: epoch seconds of its last write, empty if unknown)
#   H LINE              its first line with a time stamp: where its coverage starts
#   M LINE              its last mail event (grep on the host: only that line travels)
#   Z STATUS            zcat's exit status (zcat -f reads plain and gzip files alike)
# and stops after a file with a mail event, or a file last written before SINCE (everything
# newer is then read). `E` ends a complete answer; `U NAME`: a file it could not read.
LOG_SCRIPT: Final = f"""\
export LC_ALL=C
log=$1; since=$2; stamp=$3; mail=$4; most=$5
if [ ! -f "$log" ] || [ ! -r "$log" ]; then
  echo "mailrec-log: cannot read $log" >&2; exit 3
fi
one() {{
  [ -r "$1" ] || {{ printf 'U %s\\n' "$1"; echo E; exit 0; }}
  m=$(stat -L -c %Y -- "$1" 2>/dev/null) || m=
  printf 'F %s %s\\n' "$m" "$1"
  h=$(zcat -f -- "$1" 2>/dev/null | grep -a -m 1 -E -e "$stamp")
  [ -n "$h" ] && printf 'H %s\\n' "$h"
  r=$({{ zcat -f -- "$1" 2>/dev/null; s=$?; echo; echo "{_ZCAT_TAG} $s"; }} \\
      | grep -a -E -e "$mail" -e '^{_ZCAT_TAG} [0-9]+$' | tail -n 2)
  printf 'Z %s\\n' "${{r##*{_ZCAT_TAG} }}"
  l=$(printf '%s\\n' "$r" | sed '$d')
  [ -n "$l" ] && {{ printf 'M %s\\n' "$l"; return 1; }}
  [ -n "$m" ] && [ "$m" -lt "$since" ] && return 1
  return 0
}}
one "$log" || {{ echo E; exit 0; }}
i=1
while [ "$i" -le "$most" ]; do
  if [ -f "$log.$i" ]; then f=$log.$i
  elif [ -f "$log.$i.gz" ]; then f=$log.$i.gz
  else break
  fi
  one "$f" || {{ echo E; exit 0; }}
  i=$((i + 1))
done
if [ "$i" = 1 ]; then
  set --
  for f in "$log"-[0-9]*; do
    case $f in *.gz | *[0-9]) [ -f "$f" ] && set -- "$f" "$@" ;; esac
  done
  for f in "$@"; do
    one "$f" || break
  done
fi
echo E
"""


def _local_stamp(year: int, month: int, day: int, clock: tuple[int, int, int], tz: tzinfo,
                 *, latest: bool) -> datetime:
    """A wall-clock time of the log's zone in UTC. A time the zone passes twice (the hour
    summer time ends) is read as the later one for a mail event (`latest`: the quiet period
    starts later), as the earlier one for where a log's coverage starts."""
    hour, minute, second = clock
    naive = datetime(year, month, day, hour, minute, second)
    times = [naive.replace(tzinfo=tz, fold=fold).astimezone(UTC) for fold in (0, 1)]
    return max(times) if latest else min(times)


def log_time(line: str, now: datetime, tz: tzinfo = UTC, *, latest: bool = True
             ) -> datetime | None:
    """The time stamp at the start of a log line: ISO 8601 (with its own offset; none: UTC)
    or classic syslog (`Dec  2 15:04:05`, local time of `tz`, no year), else None."""
    iso = _ISO_TS.match(line)
    if iso:
        try:
            stamp = datetime.fromisoformat(iso.group("iso").replace("Z", "+00:00"))
        except ValueError:
            return None
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    match = _SYSLOG_TS.match(line)
    if not match or match.group("mon") not in _MONTHS:
        return None
    hour, minute, second = map(int, match.group("time").split(":"))
    # Classic syslog has no year: take the latest year that puts the stamp no more than a
    # day after `now` (slack for clocks and for a zone set wrong: a line logged an hour ago in
    # Tokyo, read as UTC, is 8 h "ahead" and must not land a year back).
    for year in (now.year + 1, now.year, now.year - 1):
        try:
            stamp = _local_stamp(year, _MONTHS[match.group("mon")], int(match.group("day")),
                                 (hour, minute, second), tz, latest=latest)
        except ValueError:
            continue
        if stamp <= now + _SYSLOG_SLACK:
            return stamp
    return None


def is_mail_event(line: str) -> bool:
    return _MAIL_EVENT.search(line) is not None


def last_mail_seen(log_text: str, now: datetime, tz: tzinfo = UTC) -> datetime | None:
    """The newest message Postfix accepted, delivered, relayed or still retries (MR010), in
    UTC for classic syslog stamps (local time of `tz`), with their offset for ISO ones.
    Rejects and other noise are skipped, however many follow the last mail."""
    for line in reversed(log_text.splitlines()):
        if is_mail_event(line):
            stamp = log_time(line, now, tz)
            if stamp is not None:
                return stamp
    return None


# --- a log and its rotations ------------------------------------------------------------------


@dataclass(frozen=True)
class LogFile:
    """What one log file tells about mail: its newest mail event, and from when it covers
    (its first stamped line; its last write for a file with none)."""

    name: str
    mtime: datetime | None = None
    first: str | None = None  # the first line with a time stamp
    mail: str | None = None  # the last mail event
    complete: bool = True  # False: a file that could not be read (whole)

    @staticmethod
    def read(path: Path) -> LogFile:
        """A local file (plain or gzip), as the host script reports one: for the lab."""
        try:
            mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            raw = path.read_bytes()
            # As `zcat -f`: gzip data is unpacked (a damaged file is incomplete), anything
            # else is read as it is, whatever the name.
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            return LogFile(str(path), complete=False)
        lines = raw.decode("utf-8", "replace").splitlines()
        first = next((line for line in lines if _ISO_TS.match(line) or _SYSLOG_TS.match(line)),
                     None)
        mail = next((line for line in reversed(lines)
                     if (_ISO_TS.match(line) or _SYSLOG_TS.match(line)) and is_mail_event(line)),
                    None)
        return LogFile(str(path), mtime, first, mail)


def rotations(log: Path) -> list[Path]:
    """The current log and its rotations that exist, newest first, as the host script walks
    them: LOG, LOG.1 (or LOG.1.gz), LOG.2.gz... while they exist; else LOG-DATE(.gz)."""
    found = [log]
    for index in range(1, MAX_ROTATIONS + 1):
        plain, packed = log.with_name(f"{log.name}.{index}"), log.with_name(
            f"{log.name}.{index}.gz")
        if plain.is_file():
            found.append(plain)
        elif packed.is_file():
            found.append(packed)
        else:
            break
    if len(found) == 1:
        dated = sorted(
            p for p in log.parent.glob(f"{glob_escape(log.name)}-[0-9]*")
            if p.is_file() and (p.name.endswith(".gz") or p.name[-1].isdigit())
        )
        found += reversed(dated)
    return found


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def newest_mail(files: Sequence[LogFile], *, now: datetime, since: datetime,
                tz: tzinfo = UTC) -> datetime | None:
    """The newest mail event in `files` (the current log first, then older ones), failing
    closed: when none shows mail and they do not reach back to `since`, the oldest time they
    cover (mail may have come just before it); None only when they cover all of [since, now]
    and show no mail."""
    upper = now  # the newest time the file at hand may hold a line of
    for file in files:
        if not file.complete:
            return upper  # unreadable: any of its lines may be mail, up to its newest
        if file.mail is not None:
            seen = log_time(file.mail, now, tz, latest=True)
            return seen if seen is not None else upper
        start = log_time(file.first, now, tz, latest=False) if file.first else None
        if start is None:
            start = file.mtime  # nothing stamped in it: nothing logged since its last write
        if start is None:
            return upper  # what it covers is unknown
        if start <= since:
            return None
        upper = min(upper, start)  # the older files cover what lies before this one
    return upper


def parse_log_scan(output: str) -> tuple[list[LogFile], bool]:
    """The script's lines as files (newest first), and whether the answer is complete."""
    files: list[LogFile] = []
    complete = False
    for raw in output.splitlines():
        tag, _, rest = raw.partition(" ")
        if tag == "E" and not rest:
            complete = True
        elif tag == "F":
            stamp, _, name = rest.partition(" ")
            mtime = datetime.fromtimestamp(int(stamp), UTC) if stamp.isdigit() else None
            files.append(LogFile(name, mtime))
        elif tag == "U":
            files.append(LogFile(rest, complete=False))
        elif files and tag == "H":
            files[-1] = LogFile(files[-1].name, files[-1].mtime, rest, files[-1].mail)
        elif files and tag == "M":
            files[-1] = LogFile(files[-1].name, files[-1].mtime, files[-1].first, rest)
        elif files and tag == "Z" and rest.strip() != "0":
            last = files[-1]
            files[-1] = LogFile(last.name, last.mtime, last.first, last.mail, complete=False)
    return files, complete


def log_argv(log_file: str, since: datetime) -> list[str]:
    """The one command that reads the log back to `since`."""
    return ["sh", "-c", LOG_SCRIPT, "mailrec-log", safe_path(log_file),
            str(max(0, int(since.timestamp()))), STAMP_ERE, MAIL_ERE, str(MAX_ROTATIONS)]


def read_last_mail(transport: Transport, log_file: str, *, now: datetime, since: datetime,
                   tz: tzinfo) -> datetime | None:
    """The newest mail event the log shows (see `newest_mail`), read in one command. `since`
    is the start of the quiet period, `tz` the zone of classic syslog stamps. A current log
    that does not exist or cannot be read is an error: "no mail seen" would open the retire
    gate (MR010)."""
    try:
        argv = log_argv(log_file, since)
    except UnsafePathError as exc:
        raise PostfixError(f"onprem.log_file: {exc}") from None
    try:
        result = transport.run(argv)
    except TransportError as exc:
        raise PostfixError(
            f"cannot read the mail log {log_file} (set onprem.log_file to where this "
            f"host logs Postfix): {exc}"
        ) from exc
    files, complete = parse_log_scan(result.text)
    if not complete or not files:
        detail = transport.mask(result.stderr.decode("utf-8", "replace").strip())
        raise PostfixError(
            f"{transport.host}: reading the mail log {log_file} ended early (output "
            f"incomplete): {detail[-400:]}"
        )
    return newest_mail(files, now=now, since=since, tz=tz)


def read_local_logs(paths: Iterable[Path], *, now: datetime, since: datetime,
                    tz: tzinfo = UTC) -> datetime | None:
    """`newest_mail` over local files (the lab): read newest first, stopping as the host
    script does."""
    files: list[LogFile] = []
    for path in paths:
        file = LogFile.read(path)
        files.append(file)
        if not file.complete or file.mail is not None or (
            file.mtime is not None and file.mtime < since
        ):
            break
    return newest_mail(files, now=now, since=since, tz=tz)


# --- the forward-path probe (postfix_host.PostfixHost.probe_forward) ----------------------------

# cleanup's line that gives a message its queue id, and a delivery attempt of one recipient.
_PROBE_QUEUED = re.compile(r"\S\[\d+\]: (?P<qid>[0-9A-Za-z]+): message-id=<(?P<mid>[^>\s]*)>")
_PROBE_DELIVERY = re.compile(
    r"\S\[\d+\]: (?P<qid>[0-9A-Za-z]+): to=<(?P<to>[^>\s]*)>, (?P<rest>.*)$")
_PROBE_RELAY = re.compile(r"(?:^|, )relay=(?P<relay>[^,\s]+)")
_PROBE_STATUS = re.compile(r", status=(?P<status>[a-z]+)(?: \((?P<reason>.*)\))?\s*$")
_REMOTE_REFUSAL = re.compile(r"\bsaid: 5\d\d\b")


@dataclass(frozen=True)
class ProbeOutcome:
    """What the mail log says about one probe message: its queue id (None: cleanup's
    `message-id=` line is not in the log yet) and its delivery attempt (status None: none
    logged yet)."""

    queue_id: str | None = None
    status: str | None = None  # sent, bounced, deferred (expired...)
    relay: str = ""  # name[address]:port, or none / local
    reason: str = ""  # the text in parentheses after status=

    def proves_path(self, port: int) -> bool:
        """The rental's SMTP server on `port` answered: it accepted the probe (sent), or
        refused it with its own 5xx (`host ... said: 550 ...`; the probe address need not
        exist there). A bounce without `said:` (no such host, a mail loop) and a deferral
        (no connection, a 4xx) prove nothing."""
        if not self.relay.endswith(f"]:{port}"):
            return False  # not handed to an SMTP server on the rental's port
        return self.status == "sent" or (
            self.status == "bounced" and _REMOTE_REFUSAL.search(self.reason) is not None)


def probe_outcome(log_text: str, message_id: str, recipient: str) -> ProbeOutcome:
    """The probe's fate in `log_text`: the queue id from the first `message-id=<message_id>`
    line, then that queue id's delivery lines to `recipient` after it (an old line of a
    reused queue id is never read). A final status (sent, bounced...) wins over a deferral;
    of several deferrals the newest tells the reason."""
    queue_id: str | None = None
    deferred: ProbeOutcome | None = None
    rcpt = recipient.lower()
    for line in log_text.splitlines():
        if queue_id is None:
            queued = _PROBE_QUEUED.search(line)
            if queued and queued.group("mid") == message_id:
                queue_id = queued.group("qid")
            continue
        match = _PROBE_DELIVERY.search(line)
        if not match or match.group("qid") != queue_id or match.group("to").lower() != rcpt:
            continue
        rest = match.group("rest")
        status = _PROBE_STATUS.search(rest)
        if status is None:
            continue
        relay = _PROBE_RELAY.search(rest)
        outcome = ProbeOutcome(queue_id, status.group("status"),
                               relay.group("relay") if relay else "",
                               (status.group("reason") or "").strip())
        if outcome.status != "deferred":
            return outcome
        deferred = outcome
    return deferred or ProbeOutcome(queue_id)


def probe_log_argv(log_file: str, message_id: str, recipient: str) -> list[str]:
    """One look at the mail log for the probe: only the lines that can name it (its
    message-id, and delivery lines to the probe address) travel. grep exits 1 when none."""
    return ["grep", "-a", "-i", "-F", "-e", f"message-id=<{message_id}>",
            "-e", f"to=<{recipient}>", "--", safe_path(log_file)]
