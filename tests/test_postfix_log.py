"""The onprem mail log read by time (reconciler/drivers/postfix_log.py): `read_last_mail` runs
its one script over a `LocalTransport` on log files written to a temp directory (the current
log, `LOG.1`, `LOG.2.gz`..., dateext names), and the lab's reader (`read_local_logs`) must
give the same answer on the same files. No service needed; tests/integration/
test_onprem_postfix.py runs the same script over the real SSH transport."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from reconciler.drivers.postfix import PostfixError
from reconciler.drivers.postfix_log import (
    MAIL_ERE,
    LogFile,
    ProbeOutcome,
    is_mail_event,
    log_time,
    newest_mail,
    probe_log_argv,
    probe_outcome,
    read_last_mail,
    read_local_logs,
    rotations,
)
from reconciler.transport import LocalTransport, UnsafePathError

FIXTURES = Path(__file__).parent / "fixtures" / "postfix"
NOW = datetime(2026, 12, 2, 6, 0, tzinfo=UTC)
QUIET = timedelta(hours=48)
SINCE = NOW - QUIET
TOKYO = ZoneInfo("Asia/Tokyo")


def stamp(when: datetime, tz: tzinfo = UTC) -> str:
    return when.astimezone(tz).strftime("%b %e %H:%M:%S")


def delivery(when: datetime, tz: tzinfo = UTC, status: str = "sent") -> str:
    return (f"{stamp(when, tz)} mail postfix/smtp[2201]: 1A2B3C4D: to=<a@example.org>, "
            f"relay=mx.example.org[203.0.113.5]:25, delay=0.5, dsn=2.0.0, status={status} "
            "(250 ok)\n")


def accepted(when: datetime, tz: tzinfo = UTC) -> str:
    return (f"{stamp(when, tz)} mail postfix/smtpd[2101]: 5E6F7A8B: "
            "client=x.example.net[192.0.2.25]\n")


def noise(start: datetime, count: int, tz: tzinfo = UTC, step: timedelta = timedelta(seconds=1)
          ) -> str:
    """Rejects, connects and anvil lines: none of them is mail."""
    kinds = [
        "postfix/smtpd[3001]: NOQUEUE: reject: RCPT from unknown[198.51.100.77]: 550 5.1.1 "
        "<nobody@example.co.jp>: Recipient address rejected: User unknown in local recipient "
        "table; from=<spam@example.biz> to=<nobody@example.co.jp> proto=ESMTP helo=<x>",
        "postfix/smtpd[3001]: connect from unknown[198.51.100.77]",
        "postfix/smtpd[3001]: 4A1B2C3D4E: reject: RCPT from unknown[198.51.100.77]: 554 5.7.1 "
        "blocked; from=<a@example.biz> to=<b@example.co.jp> proto=ESMTP helo=<x>",
        "postfix/anvil[3002]: statistics: max connection rate 1/60s for (smtp:198.51.100.77)",
    ]
    return "".join(f"{stamp(start + i * step, tz)} mail {kinds[i % len(kinds)]}\n"
                   for i in range(count))


def damaged_gzip(text: str) -> bytes:
    """A gzip file cut short (a disk filled up while logrotate compressed it)."""
    packed = gzip.compress(text.encode() * 50)
    return packed[: len(packed) // 2]


class Logs:
    """A log directory: files written with the mtime of their last line (as syslog leaves
    them), read by the host script and by the lab's reader."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.log = directory / "mail.log"

    def write(self, name: str, text: str | bytes, last: datetime, *, packed: bool = False
              ) -> Path:
        path = self.dir / name
        data = text.encode() if isinstance(text, str) else text
        path.write_bytes(gzip.compress(data) if packed else data)
        os.utime(path, (last.timestamp(), last.timestamp()))
        return path

    def read(self, since: datetime = SINCE, tz: tzinfo = UTC) -> datetime | None:
        transport = LocalTransport()
        seen = read_last_mail(transport, str(self.log), now=NOW, since=since, tz=tz)
        # One command, whatever the number of files read; the path is a parameter of a
        # constant script, never part of it.
        assert transport.round_trips == 1
        (argv,) = transport.history
        assert argv[:2] == ("sh", "-c") and str(self.log) not in argv[2]
        assert argv[4] == str(self.log)
        # The lab reads the same files with the same decision.
        assert read_local_logs(rotations(self.log), now=NOW, since=since, tz=tz) == seen
        return seen


@pytest.fixture
def logs(tmp_path: Path) -> Logs:
    return Logs(tmp_path)


# --- the case: noise after the last delivery -----------------------------------------


def test_10000_rejects_after_the_last_delivery_do_not_hide_it(logs: Logs) -> None:
    last = NOW - timedelta(hours=30)
    logs.write("mail.log", delivery(last) + noise(last + timedelta(seconds=1), 10_000),
               NOW - timedelta(minutes=1))
    # Three weeks older: what reading only the last 5000 lines fell back to.
    logs.write("mail.log.1", delivery(NOW - timedelta(days=21)), NOW - timedelta(days=21))
    assert logs.read() == last


def test_a_message_accepted_or_deferred_is_mail_too(logs: Logs) -> None:
    t = NOW - timedelta(hours=2)
    logs.write("mail.log", accepted(t) + noise(t + timedelta(seconds=1), 50), NOW)
    assert logs.read() == t
    logs.write("mail.log", delivery(t, status="deferred") + noise(t, 3), NOW)
    assert logs.read() == t


def test_a_last_line_still_being_written_is_read(logs: Logs) -> None:
    t = NOW - timedelta(minutes=5)
    logs.write("mail.log", noise(NOW - timedelta(hours=60), 3) + delivery(t).rstrip("\n"), NOW)
    assert logs.read() == t


# --- back through the rotations ----------------------------------------------------------------


def test_mail_only_in_a_gzipped_rotation(logs: Logs) -> None:
    logs.write("mail.log", noise(NOW - timedelta(hours=10), 100, step=timedelta(minutes=5)),
               NOW)
    logs.write("mail.log.1", noise(NOW - timedelta(hours=34), 100, step=timedelta(minutes=10)),
               NOW - timedelta(hours=10))
    mail_at = NOW - timedelta(hours=40)
    logs.write("mail.log.2.gz", delivery(mail_at) + noise(mail_at, 20), NOW - timedelta(hours=34),
               packed=True)
    logs.write("mail.log.3.gz", delivery(NOW - timedelta(hours=70)), NOW - timedelta(hours=60),
               packed=True)
    assert logs.read() == mail_at


def test_dateext_rotations_are_read_newest_first(logs: Logs) -> None:
    logs.write("mail.log", noise(NOW - timedelta(hours=6), 10), NOW)
    logs.write("mail.log-20261202", noise(NOW - timedelta(hours=30), 10),
               NOW - timedelta(hours=6))
    mail_at = NOW - timedelta(hours=36)
    logs.write("mail.log-20261201.gz", delivery(NOW - timedelta(hours=50)) + delivery(mail_at),
               NOW - timedelta(hours=30), packed=True)
    logs.write("mail.log-20261130.gz", delivery(NOW - timedelta(hours=40)),
               NOW - timedelta(hours=54), packed=True)
    assert logs.read() == mail_at


def test_reading_stops_at_the_start_of_the_quiet_period(logs: Logs) -> None:
    logs.write("mail.log", noise(NOW - timedelta(hours=20), 10), NOW)
    logs.write("mail.log.1", noise(NOW - timedelta(hours=60), 10, step=timedelta(hours=1)),
               NOW - timedelta(hours=51))  # last written before `since`
    # Never read: were it read, a file that cannot be unpacked would fail closed (not None).
    logs.write("mail.log.2.gz", damaged_gzip(delivery(NOW - timedelta(hours=61))),
               NOW - timedelta(hours=60))
    assert logs.read() is None


def test_an_unreadable_rotation_fails_closed(logs: Logs) -> None:
    start = NOW - timedelta(hours=20)
    logs.write("mail.log", noise(start, 10), NOW)
    logs.write("mail.log.1.gz", damaged_gzip(noise(NOW - timedelta(days=2), 100)), start)
    logs.write("mail.log.2.gz", delivery(NOW - timedelta(days=9)), NOW - timedelta(days=9),
               packed=True)
    # Any of its lines may have been mail, up to where the current log starts.
    assert logs.read() == start


# --- what the logs cover ---------------------------------------------------------------------


def test_logs_that_do_not_reach_back_to_since_give_the_oldest_time_they_cover(logs: Logs
                                                                             ) -> None:
    start = NOW - timedelta(hours=5)
    logs.write("mail.log", noise(start, 500), NOW)
    assert logs.read() == start  # the worst case: mail came just before the log starts
    # A gap in the chain (LOG.1 rotated away): what lies beyond it does not count.
    logs.write("mail.log.2.gz", noise(NOW - timedelta(hours=80), 10), NOW - timedelta(hours=30),
               packed=True)
    assert logs.read() == start
    logs.write("mail.log.1", noise(NOW - timedelta(hours=30), 10), start)
    assert logs.read() is None  # the chain is whole again: back to 80 h ago
    (logs.dir / "mail.log.2.gz").unlink()
    assert logs.read() == NOW - timedelta(hours=30)
    # An empty current log covers from its last write; nothing older: that is the answer.
    (logs.dir / "mail.log.1").unlink()
    logs.write("mail.log", "", NOW - timedelta(hours=1))
    assert logs.read() == NOW - timedelta(hours=1)


def test_no_mail_in_a_fully_covered_window_is_none(logs: Logs) -> None:
    logs.write("mail.log", noise(NOW - timedelta(hours=20), 10), NOW)
    logs.write("mail.log.1", noise(NOW - timedelta(hours=50), 10), NOW - timedelta(hours=20))
    assert logs.read() is None
    # An empty log not written to since before `since`: nothing came in the window.
    (logs.dir / "mail.log.1").unlink()
    logs.write("mail.log", "", NOW - timedelta(hours=49))
    assert logs.read() is None


def test_a_missing_current_log_is_an_error(logs: Logs) -> None:
    logs.write("mail.log.1", delivery(NOW - timedelta(hours=1)), NOW)
    with pytest.raises(PostfixError, match="cannot read the mail log"):
        read_last_mail(LocalTransport(), str(logs.log), now=NOW, since=SINCE, tz=UTC)


def test_classic_stamps_are_local_time_of_the_log_zone(logs: Logs) -> None:
    mail_at = NOW - timedelta(hours=30)
    logs.write("mail.log", noise(NOW - timedelta(hours=47), 3, TOKYO) + delivery(mail_at, TOKYO)
               + noise(mail_at, 3, TOKYO), NOW)
    assert logs.read(tz=TOKYO) == mail_at
    # Read as UTC, the Tokyo stamp would be 9 hours later than the mail really was.
    assert logs.read(tz=UTC) == mail_at + timedelta(hours=9)
    # Coverage too: a Tokyo log starting 47 h ago does not reach back 48 h.
    logs.write("mail.log", noise(NOW - timedelta(hours=47), 3, TOKYO), NOW)
    assert logs.read(tz=TOKYO) == NOW - timedelta(hours=47)


def test_iso_stamps_carry_their_zone(logs: Logs) -> None:
    text = (
        "2026-12-01T10:00:00.123456+09:00 mail postfix/smtpd[1]: 1A2B3C: "
        "client=a.example.net[192.0.2.1]\n"
        "2026-12-01T10:00:05.000001+09:00 mail postfix/smtpd[1]: NOQUEUE: reject: RCPT from x\n"
    )
    logs.write("mail.log", text, NOW)
    assert logs.read(tz=TOKYO) == datetime(2026, 12, 1, 1, 0, 0, 123456, tzinfo=UTC)


# --- the pure parts ----------------------------------------------------------------------------


def test_newest_mail_decides_from_the_files_newest_first() -> None:
    def file(first: datetime | None, mail: datetime | None = None, mtime: datetime | None = None,
             complete: bool = True) -> LogFile:
        return LogFile("f", mtime, accepted(first) if first else None,
                       delivery(mail) if mail else None, complete)

    def decide(*files: LogFile) -> datetime | None:
        return newest_mail(files, now=NOW, since=SINCE)

    h: Callable[[int], datetime] = lambda hours: NOW - timedelta(hours=hours)  # noqa: E731
    assert decide(file(h(10), h(2))) == h(2)
    assert decide(file(h(10)), file(h(30), h(29))) == h(29)
    assert decide(file(h(10)), file(h(49))) is None
    assert decide(file(h(10)), file(h(30))) == h(30)  # the logs end there
    assert decide(file(h(10)), file(None, complete=False)) == h(10)
    assert decide(file(None, mtime=h(3))) == h(3)
    assert decide(file(None)) == NOW  # what it covers is unknown: mail may be just now
    # A mail line whose stamp cannot be read: the newest time that file may hold.
    assert newest_mail([LogFile("f", None, None, "Feb 30 10:00:00 x postfix/smtpd[1]: A: "
                                "client=x")], now=NOW, since=SINCE) == NOW


def test_the_host_pattern_selects_what_the_python_parser_does() -> None:
    """`grep -E MAIL_ERE` on the host must pick the lines `is_mail_event` and `log_time`
    accept: a line the host drops is mail mailrec never sees."""
    grep = shutil.which("grep")
    if grep is None:
        pytest.skip("grep not installed")
    lines = (FIXTURES / "mail.log.syslog").read_text().splitlines()
    lines += (FIXTURES / "mail.log.iso").read_text().splitlines()
    lines += [
        *noise(NOW, 8).splitlines(),
        delivery(NOW).rstrip(), accepted(NOW).rstrip(), delivery(NOW, status="bounced").rstrip(),
        delivery(NOW, status="deferred").rstrip(),
        "2025-06-30T10:00:00+09:00 mail postfix-out/smtp[99]: 1A2B3C4D5E: to=<a@example.org>, "
        "relay=x, status=sent (250 ok)",
        "2025-06-30T10:00:00 mail postfix/smtpd[1]: 1A2B3C: client=a.example.net[192.0.2.1]",
        "garbage postfix/smtpd[1]: 1A2B3C: client=a.example.net[192.0.2.1]",
        "Dec  2 06:00:00 mail postfix/smtp[1]: 1A2B: to=<a@x>, relay=x, status=expired",
    ]
    picked = subprocess.run([grep, "-a", "-E", "-e", MAIL_ERE], input="\n".join(lines) + "\n",
                            capture_output=True, text=True, env={"LC_ALL": "C"}, check=False
                            ).stdout.splitlines()
    expected = [line for line in lines
                if is_mail_event(line) and log_time(line, NOW) is not None]
    assert picked == expected
    assert len(expected) >= 10


# --- the forward-path probe: its outcome in the log (postfix_log.probe_outcome) -------------------

PROBE_ID = "mailrec-probe.20261202T100000Z.0a1b2c3d4e5f@example.co.jp"
PROBE_TO = "mailrec-probe@example.co.jp"


def probe_log(*delivery: str, qid: str = "818E624A12C") -> str:
    """A real Postfix 3.7 log around one probe: pickup, cleanup's message-id, qmgr, then the
    given smtp(8) delivery texts (after `to=<...>, `), amid other mail."""
    return "".join([
        # An older probe whose queue id the new one reuses: its line comes before.
        f"Dec  2 09:00:00 mail postfix/smtp[100]: {qid}: to=<{PROBE_TO}>, relay=none, "
        "delay=1, dsn=4.4.1, status=deferred (an older probe)\n",
        f"Dec  2 10:00:00 mail postfix/pickup[31638]: {qid}: uid=0 from=<>\n",
        f"Dec  2 10:00:00 mail postfix/cleanup[31642]: {qid}: message-id=<{PROBE_ID}>\n",
        f"Dec  2 10:00:00 mail postfix/qmgr[31639]: {qid}: from=<>, size=293, nrcpt=1 "
        "(queue active)\n",
        "Dec  2 10:00:00 mail postfix/smtp[31647]: 99AA: to=<mailrec-probe@example.co.jp>, "
        "relay=other[192.0.2.9]:25, dsn=2.0.0, status=sent (another message)\n",
        "Dec  2 10:00:00 mail postfix/local[31650]: 77BB: to=<suga@example.co.jp>, "
        "relay=local, status=sent (delivered to maildir)\n",
        *(f"Dec  2 10:00:01 mail postfix/smtp[31647]: {qid}: to=<{PROBE_TO}>, {text}\n"
          for text in delivery),
    ])


BOUNCED_550 = ("relay=127.0.0.3[127.0.0.3]:41343, delay=0.06, delays=0.03/0.01/0/0.01, "
               "dsn=5.1.1, status=bounced (host 127.0.0.3[127.0.0.3] said: 550 5.1.1 "
               "<mailrec-probe@example.co.jp>: Recipient address rejected: User unknown in "
               "virtual mailbox table (in reply to RCPT TO command))")
SENT = ("relay=127.0.0.3[127.0.0.3]:41343, delay=0.2, delays=0.1/0/0/0.1, dsn=2.0.0, "
        "status=sent (250 2.0.0 Ok: queued as 4Rz8Xk1ZPzz9sV)")
REFUSED = ("relay=none, delay=0.04, delays=0.02/0.02/0/0, dsn=4.4.1, status=deferred "
           "(connect to 127.0.0.3[127.0.0.3]:34257: Connection refused)")


def test_probe_outcome_sent() -> None:
    outcome = probe_outcome(probe_log(SENT), PROBE_ID, PROBE_TO)
    assert (outcome.queue_id, outcome.status) == ("818E624A12C", "sent")
    assert outcome.relay == "127.0.0.3[127.0.0.3]:41343"
    assert outcome.reason == "250 2.0.0 Ok: queued as 4Rz8Xk1ZPzz9sV"
    assert outcome.proves_path(41343)
    assert not outcome.proves_path(25)  # another port than the rental's: proves nothing


def test_probe_outcome_bounced_by_the_rentals_5xx_proves_the_path() -> None:
    outcome = probe_outcome(probe_log(BOUNCED_550), PROBE_ID, PROBE_TO)
    assert outcome.status == "bounced" and outcome.proves_path(41343)
    assert outcome.reason.startswith("host 127.0.0.3[127.0.0.3] said: 550 5.1.1 ")
    assert outcome.reason.endswith("(in reply to RCPT TO command)")


def test_probe_outcome_bounced_without_an_answer_proves_nothing() -> None:
    for text in (
        "relay=none, delay=0.1, dsn=5.4.4, status=bounced (Host or domain name not found. "
        "Name service error for name=rental.example type=A: Host not found)",
        "relay=local, delay=0.1, dsn=5.1.1, status=bounced (unknown user: \"mailrec-probe\")",
        "relay=127.0.0.3[127.0.0.3]:41343, dsn=5.4.6, status=bounced (mail for 127.0.0.3 "
        "loops back to myself)",
    ):
        outcome = probe_outcome(probe_log(text), PROBE_ID, PROBE_TO)
        assert outcome.status == "bounced" and not outcome.proves_path(41343), text


def test_probe_outcome_deferred_connect_refused_or_4xx() -> None:
    outcome = probe_outcome(probe_log(REFUSED), PROBE_ID, PROBE_TO)
    assert (outcome.queue_id, outcome.status, outcome.relay) == ("818E624A12C", "deferred", "none")
    assert outcome.reason == "connect to 127.0.0.3[127.0.0.3]:34257: Connection refused"
    assert not outcome.proves_path(34257)
    greylisted = ("relay=127.0.0.3[127.0.0.3]:41343, dsn=4.7.1, status=deferred (host "
                  "127.0.0.3[127.0.0.3] said: 451 4.7.1 try again later (in reply to RCPT TO "
                  "command))")
    outcome = probe_outcome(probe_log(greylisted), PROBE_ID, PROBE_TO)
    assert outcome.status == "deferred" and not outcome.proves_path(41343)
    # Retried: a final status wins over the deferral; of deferrals the newest tells why.
    assert probe_outcome(probe_log(REFUSED, SENT), PROBE_ID, PROBE_TO).status == "sent"
    later = REFUSED.replace("Connection refused", "Connection timed out")
    assert "timed out" in probe_outcome(probe_log(REFUSED, later), PROBE_ID, PROBE_TO).reason


def test_probe_outcome_missing() -> None:
    # Queued but no delivery line yet (the older probe's line with that queue id is not read).
    outcome = probe_outcome(probe_log(), PROBE_ID, PROBE_TO)
    assert outcome == ProbeOutcome("818E624A12C")
    assert not outcome.proves_path(41343)
    # Not even queued: another message id only.
    other = probe_log(SENT).replace(PROBE_ID, PROBE_ID.replace("0a1b", "ffff"))
    assert probe_outcome(other, PROBE_ID, PROBE_TO) == ProbeOutcome()
    assert probe_outcome("", PROBE_ID, PROBE_TO) == ProbeOutcome()
    # The delivery line of another recipient under the probe's queue id is not the probe's.
    wrong = probe_log(SENT).replace(f"818E624A12C: to=<{PROBE_TO}>", "818E624A12C: to=<x@y>")
    assert probe_outcome(wrong, PROBE_ID, PROBE_TO).status is None


def test_probe_outcome_reads_iso_stamps_long_queue_ids_and_other_syslog_names() -> None:
    log = probe_log(BOUNCED_550, qid="4Rz8Xk1ZPzz9sV").replace(
        "Dec  2 10:00:01 mail postfix/smtp", "2026-12-02T10:00:01.123+09:00 mail postfix-out/smtp")
    outcome = probe_outcome(log, PROBE_ID, PROBE_TO.upper())
    assert outcome.queue_id == "4Rz8Xk1ZPzz9sV" and outcome.proves_path(41343)


def test_the_probe_grep_selects_every_line_the_parser_reads(tmp_path: Path) -> None:
    """The one command per look sends back only the probe's lines; the parser gives the same
    outcome on them as on the whole log."""
    log = tmp_path / "maillog"
    text = noise(NOW, 50) + probe_log(REFUSED, BOUNCED_550) + delivery(NOW)
    log.write_text(text)
    argv = probe_log_argv(str(log), PROBE_ID, PROBE_TO)
    assert argv[-2:] == ["--", str(log)]
    result = LocalTransport().run(argv, check=False)
    assert result.exit_status == 0
    assert len(result.text.splitlines()) == 5  # the message-id line and four to= lines
    assert probe_outcome(result.text, PROBE_ID, PROBE_TO) == probe_outcome(text, PROBE_ID,
                                                                            PROBE_TO)
    assert probe_outcome(result.text, PROBE_ID, PROBE_TO).status == "bounced"
    log.write_text(noise(NOW, 5))
    assert LocalTransport().run(argv, check=False).exit_status == 1  # nothing yet
    with pytest.raises(UnsafePathError):
        probe_log_argv("maillog", PROBE_ID, PROBE_TO)
