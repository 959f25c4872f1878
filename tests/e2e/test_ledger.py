"""Unit tests of the e2e ledger: fake reports, temp Maildirs, captured Postfix output."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.e2e.ledger import (
    COLUMNS,
    INFORMATIVE,
    Ledger,
    LedgerRow,
    Location,
    MailStore,
    MemoryStore,
    QueueError,
    details,
    parse_postcat_headers,
    parse_postqueue_json,
    queued_ids,
    read_queue,
    render_markdown,
    render_table,
    scan_stores,
)
from tests.e2e.net import E2E_ID_HEADER, OFFICE_LINE_A, OUTSIDER

# --- helpers --------------------------------------------------------------------------------


def message(message_id: str | None, *, to: str = "suga@example.co.jp") -> bytes:
    lines = [
        "Return-Path: <taro@example.net>",
        "Received: from mx.rental.test by mail.example.co.jp; Wed, 2 Dec 2026 14:00:00 +0000",
        "From: taro@example.net",
        f"To: {to}",
        "Subject: e2e mail",
        "Message-ID: <abc@example.net>",
    ]
    if message_id is not None:
        lines.append(f"{E2E_ID_HEADER}: {message_id}")
    return ("\r\n".join(lines) + f"\r\n\r\nbody\r\n{E2E_ID_HEADER}: not-a-header-{message_id}\r\n"
            ).encode()


def maildir(root: Path) -> Path:
    for sub in ("new", "cur", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


_counter = iter(range(1_000_000))


def deliver(root: Path, raw: bytes, *, folder: str = "", sub: str = "new") -> Path:
    """A message file in the Maildir at root (folder: a Maildir++ subfolder like ".Sent")."""
    box = maildir(root / folder) if folder else maildir(root)
    n = next(_counter)
    name = f"1796222351.M{n}P1.mail,S={len(raw)}" + (":2,S" if sub == "cur" else "")
    path = box / sub / name
    path.write_bytes(raw)
    return path


def send(ledger: Ledger, message_id: str, *expected: str, kind: str = "inbound") -> None:
    ledger.sent(message_id, sender="taro@example.net",
                recipients=[f"{o}@example.co.jp" for o in expected],
                expected=expected, kind=kind)  # type: ignore[arg-type]
    ledger.accepted(message_id)


DSN = b"""\
Return-Path: <>
From: MAILER-DAEMON@mail.example.co.jp (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: kim@example.co.jp
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="8A1B220C90A.1796222351/mail.example.co.jp"

--8A1B220C90A.1796222351/mail.example.co.jp
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

--8A1B220C90A.1796222351/mail.example.co.jp
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mail.example.co.jp
X-Postfix-Queue-ID: 8A1B220C90A

Final-Recipient: rfc822; nobody@example.co.jp
Original-Recipient: rfc822;nobody@example.co.jp
Action: ACTION
Status: 5.1.1
Diagnostic-Code: x-unix; user unknown

--8A1B220C90A.1796222351/mail.example.co.jp
Content-Description: Undelivered Message
Content-Type: message/rfc822

From: kim@example.co.jp
To: nobody@example.co.jp
Subject: lost?
X-E2E-Id: ORIGINAL

hello

--8A1B220C90A.1796222351/mail.example.co.jp--
"""


def dsn(original: str, action: str = "failed") -> bytes:
    return DSN.replace(b"ORIGINAL", original.encode()).replace(b"ACTION", action.encode())


# --- the verdict ----------------------------------------------------------------------------


def test_a_message_found_once_at_its_owner_is_delivered(tmp_path: Path) -> None:
    ledger = Ledger()
    send(ledger, "run-1", "suga")
    deliver(tmp_path / "rental" / "suga", message("run-1"))
    row = ledger.result(scan_stores([MailStore.of("rental", "suga", tmp_path / "rental/suga")]))
    assert (row.sent, row.deliveries, row.delivered) == (1, 1, 1)
    assert row.must_be_zero() == []
    assert row.passed


def test_one_id_in_the_onprem_and_the_rental_maildir_of_one_owner_is_duplicated(
    tmp_path: Path,
) -> None:
    ledger = Ledger()
    send(ledger, "run-2", "suga")
    deliver(tmp_path / "onprem", message("run-2"), sub="cur")
    deliver(tmp_path / "rental", message("run-2"))
    scan = scan_stores([MailStore.of("onprem", "suga", tmp_path / "onprem"),
                        MailStore.of("rental", "suga", tmp_path / "rental")])
    row = ledger.result(scan)
    assert (row.delivered, row.duplicated, row.missing) == (0, 1, 0)
    assert row.must_be_zero() == ["duplicated"]
    text = details(row)
    assert "run-2" in text and "onprem:suga" in text and "rental:suga" in text


def test_twice_in_one_client_store_is_duplicated(tmp_path: Path) -> None:
    ledger = Ledger()
    send(ledger, "run-3", "suga")
    store = tmp_path / "pop" / "suga"
    store.mkdir(parents=True)
    (store / "0001.eml").write_bytes(message("run-3"))
    (store / "0002.eml").write_bytes(message("run-3"))
    row = ledger.result(scan_stores([MailStore.of("pop", "suga", store)]))
    assert row.duplicated == 1 and row.delivered == 0


def test_an_id_only_in_a_queue_is_still_queued_not_missing() -> None:
    ledger = Ledger()
    send(ledger, "run-4", "suga")
    row = ledger.result({}, queued={"run-4"})
    assert (row.still_queued, row.missing, row.delivered) == (1, 0, 0)
    assert row.must_be_zero() == ["still_queued"]


def test_an_id_found_nowhere_is_missing_lost() -> None:
    ledger = Ledger()
    send(ledger, "run-5", "suga")
    row = ledger.result({}, queued=set())
    assert (row.missing, row.delivered) == (1, 0)
    assert row.must_be_zero() == ["missing"]
    assert "run-5" in details(row) and "accepted 1x" in details(row)


def test_a_group_alias_for_three_found_at_two_is_one_missing() -> None:
    ledger = Ledger()
    ledger.sent("run-6", sender="taro@example.net", recipients=["sales@example.co.jp"],
                expected=("suga", "kim", "lee"), kind="inbound")
    found = {"run-6": [("rental", "suga"), ("onprem", "kim")]}
    row = ledger.result(found)
    assert (row.sent, row.deliveries, row.delivered, row.missing) == (1, 3, 2, 1)
    assert "not at lee" in details(row)


def test_a_message_at_an_owner_not_expected_is_misdelivered() -> None:
    ledger = Ledger()
    send(ledger, "run-7", "suga")
    row = ledger.result({"run-7": [Location("rental", "suga"), Location("rental", "kim")]})
    assert (row.delivered, row.misdelivered) == (1, 1)


def test_a_5xx_and_a_dsn_count_as_bounced_not_missing() -> None:
    ledger = Ledger()
    send(ledger, "run-8", "suga")
    send(ledger, "run-9", "kim")
    ledger.bounced("run-8", 550, "5.1.1 <suga@example.co.jp>: Recipient address rejected")
    ledger.dsn("run-9", "Undelivered Mail Returned to Sender")
    ledger.dsn(None, "a DSN quoting no e2e id")
    row = ledger.result({})
    assert row.bounced == 3
    assert row.missing == 0
    assert row.must_be_zero() == ["bounced"]


def test_a_4xx_is_not_a_bounce() -> None:
    ledger = Ledger()
    send(ledger, "run-x", "suga")
    with pytest.raises(ValueError, match="5xx"):
        ledger.bounced("run-x", 450, "try later")


def test_a_failure_dsn_in_a_users_maildir_bounces_the_quoted_message(tmp_path: Path) -> None:
    ledger = Ledger()
    send(ledger, "run-10", "nobody", kind="internal")
    send(ledger, "run-11", "suga", kind="internal")
    deliver(tmp_path / "kim", dsn("run-10"))
    deliver(tmp_path / "kim", dsn("run-11", action="delayed"))  # a warning, not a bounce
    deliver(tmp_path / "suga", message("run-11"))
    scan = scan_stores([MailStore.of("rental", "kim", tmp_path / "kim"),
                        MailStore.of("rental", "suga", tmp_path / "suga")])
    assert [(d.original_id, d.actions) for d in scan.dsns] == [
        ("run-10", ("failed",)), ("run-11", ("delayed",))]
    assert "run-10" not in scan.found  # the quoted copy is not a delivery
    row = ledger.result(scan)
    assert (row.bounced, row.missing, row.delivered) == (1, 0, 1)
    assert "user unknown" in details(row)


def test_deferred_then_delivered_is_informative() -> None:
    ledger = Ledger()
    send(ledger, "run-12", "suga")
    ledger.deferred("run-12")
    row = ledger.result({"run-12": [("rental", "suga")]})
    assert row.deferred_then_delivered == 1
    assert row.passed


def test_a_sender_that_gave_up_is_counted_not_lost() -> None:
    ledger = Ledger()
    ledger.sent("run-13", sender="suga@example.co.jp", recipients=["x@example.net"],
                expected=("internet",), kind="outbound")
    ledger.deferred("run-13")
    ledger.gave_up("run-13")
    row = ledger.result({})
    assert (row.gave_up, row.missing, row.deferred_then_delivered) == (1, 0, 0)


def test_a_relay_attempt_accepted_from_outside_is_counted() -> None:
    ledger = Ledger(relay_whitelist=[f"{OFFICE_LINE_A}/32"])
    ledger.relay_attempt("probe-1", accepted=True, source_ip=OUTSIDER)
    ledger.relay_attempt("probe-2", accepted=False, source_ip=OUTSIDER)
    ledger.relay_attempt("probe-3", accepted=True, source_ip=OFFICE_LINE_A)  # allowed
    row = ledger.result({"probe-3": [("internet", "internet")]})
    assert row.relayed_from_outside == 1
    assert row.unknown == 0  # probes are not strangers
    assert row.must_be_zero() == ["relayed_from_outside"]
    assert "probe-1" in details(row)


def test_a_refused_relay_probe_that_arrives_anyway_is_counted() -> None:
    ledger = Ledger()
    ledger.relay_attempt("probe-4", accepted=False, source_ip=OUTSIDER)
    ledger.relay_attempt("probe-5", accepted=False, source_ip=OUTSIDER)
    row = ledger.result({"probe-4": [("internet", "internet")]}, queued={"probe-5"})
    assert row.relayed_from_outside == 2


def test_spf_verdicts_at_the_receiver() -> None:
    ledger = Ledger()
    for n, verdict in enumerate(["pass", "Fail", "softfail", "permerror"]):
        ledger.sent(f"out-{n}", sender="suga@example.co.jp", recipients=["x@example.net"],
                    expected=("internet",), kind="outbound")
        ledger.spf(f"out-{n}", verdict)
    row = ledger.result({f"out-{n}": [("internet", "internet")] for n in range(4)})
    assert (row.spf_fail, row.spf_softfail, row.spf_other, row.delivered) == (1, 1, 1, 4)


def test_ids_nobody_reported_sending_are_unknown() -> None:
    ledger = Ledger()
    ledger.accepted("ghost-1")  # an outcome for an id never sent
    row = ledger.result({"ghost-2": [("rental", "suga")]}, queued={"ghost-3"})
    assert row.unknown == 3
    assert row.sent == 0


def test_sent_refuses_a_reused_id_and_a_message_nobody_must_receive() -> None:
    ledger = Ledger()
    send(ledger, "run-14", "suga")
    with pytest.raises(ValueError, match="unique"):
        send(ledger, "run-14", "suga")
    with pytest.raises(ValueError, match="expected owner"):
        ledger.sent("run-15", sender="a@b", recipients=["c@d"], expected=(), kind="internal")


def test_the_ledger_takes_reports_from_many_threads() -> None:
    ledger = Ledger()

    def sender(n: int) -> None:
        for i in range(200):
            mid = f"t{n}-{i}"
            send(ledger, mid, "suga")
            ledger.deferred(mid)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = ledger.records()
    assert len(records) == 1600
    assert all(r.accepted == 1 and r.deferrals == 1 for r in records)


# --- scanning stores ------------------------------------------------------------------------


def test_maildir_plus_plus_subfolders_are_scanned_and_tmp_is_not(tmp_path: Path) -> None:
    root = tmp_path / "suga" / "Maildir"
    deliver(root, message("in-new"))
    deliver(root, message("in-cur"), sub="cur")
    deliver(root, message("in-sent"), folder=".Sent", sub="cur")
    deliver(root, message("in-archive"), folder=".Archive.2026")
    (root / "tmp" / "1796222351.partial").write_bytes(message("in-tmp"))
    (root / "dovecot-uidlist").write_text("3 V1796222351 N4\n")
    scan = scan_stores([MailStore.of("rental", "suga", root)])
    assert sorted(scan.found) == ["in-archive", "in-cur", "in-new", "in-sent"]
    assert all(locs[0].owner == "suga" for locs in scan.found.values())


def test_a_client_pop_store_of_eml_files_is_scanned(tmp_path: Path) -> None:
    store = tmp_path / "clients" / "kim"
    store.mkdir(parents=True)
    (store / "000001.eml").write_bytes(message("pop-1"))
    (store / "000002.eml").write_bytes(message(None))  # not e2e mail
    (store / "uidl.state").write_text("000001 pop-1\n")  # the client's state: not a message
    scan = scan_stores([MailStore.of("pop-client", "Kim", store)])
    assert scan.found == {"pop-1": [Location("pop-client", "kim", str(store / "000001.eml"))]}
    assert [loc.path for loc in scan.foreign] == [str(store / "000002.eml")]


def test_the_header_is_read_from_the_headers_only(tmp_path: Path) -> None:
    root = tmp_path / "Maildir"
    deliver(root, b"From: a@b\nSubject: no id\n\nX-E2E-Id: in-the-body\n")
    scan = scan_stores([MailStore.of("onprem", "suga", root)])
    assert scan.found == {} and len(scan.foreign) == 1


def test_an_archived_maildir_and_an_archived_mbox_are_scanned(tmp_path: Path) -> None:
    archived = tmp_path / "home" / "suga" / "Maildir.mailrec-removed-20261202T140000Z"
    deliver(archived, message("arch-1"), sub="cur")
    mbox = tmp_path / "mail" / "lee.mailrec-removed-20261202T140000Z"
    mbox.parent.mkdir()
    mbox.write_bytes(b"From taro@example.net Wed Dec  2 14:00:00 2026\n"
                     + message("arch-2").replace(b"\r\n", b"\n") + b"\n"
                     + b"From taro@example.net Wed Dec  2 14:00:01 2026\n"
                     + message("arch-3").replace(b"\r\n", b"\n") + b"\n")
    scan = scan_stores([MailStore.of("onprem-archive", "suga", archived),
                        MailStore.of("onprem-archive", "lee", mbox)])
    assert {mid: [loc.owner for loc in locs] for mid, locs in scan.found.items()} == {
        "arch-1": ["suga"], "arch-2": ["lee"], "arch-3": ["lee"]}


def test_one_root_with_many_users_maps_owners_by_path(tmp_path: Path) -> None:
    deliver(tmp_path / "suga" / "Maildir", message("multi-1"))
    deliver(tmp_path / "kim" / "Maildir", message("multi-2"))
    deliver(tmp_path / "postmaster" / "Maildir", message("multi-3"))

    def owner_of(path: Path) -> str | None:
        user = path.relative_to(tmp_path).parts[0]
        return None if user == "postmaster" else user

    scan = scan_stores([MailStore("onprem", owner_of, tmp_path)])
    assert {mid: locs[0].owner for mid, locs in scan.found.items()} == {
        "multi-1": "suga", "multi-2": "kim"}


def test_overlapping_store_roots_count_a_file_once(tmp_path: Path) -> None:
    deliver(tmp_path / "suga" / "Maildir", message("once"))
    scan = scan_stores([MailStore.of("a", "suga", tmp_path),
                        MailStore.of("b", "suga", tmp_path / "suga" / "Maildir")])
    assert len(scan.found["once"]) == 1


def test_the_internet_receivers_memory_store_is_scanned() -> None:
    received: list[bytes | str | tuple[str, bytes]] = [
        message("out-1", to="x@example.net"),
        message("out-2").decode(),
        ("internet", message("out-2")),
        dsn("in-9"),
    ]
    scan = scan_stores([MemoryStore("internet-mx", received)])
    assert {mid: len(locs) for mid, locs in scan.found.items()} == {"out-1": 1, "out-2": 2}
    assert [d.original_id for d in scan.dsns] == ["in-9"]
    assert scan.found["out-1"][0].owner == "internet"


def test_a_store_root_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="typo"):
        scan_stores([MailStore.of("rental", "suga", tmp_path / "typo")])


# --- queues ---------------------------------------------------------------------------------

# Captured from Postfix 3.7 (`postqueue -c DIR -j`, relayhost unreachable, one held DSN).
POSTQUEUE_J = """\
{"queue_name": "deferred", "queue_id": "D97C520C65C", "arrival_time": 1796222363, \
"message_size": 264, "forced_expire": false, "sender": "x@example.net", "recipients": \
[{"address": "suga@example.co.jp", "delay_reason": "connect to 127.0.0.124[127.0.0.124]:2598: \
Connection refused"}]}
{"queue_name": "active", "queue_id": "DC15520C65A", "arrival_time": 1796222363, \
"message_size": 274, "forced_expire": false, "sender": "x@example.net", "recipients": \
[{"address": "a@example.net", "delay_reason": "connect to 127.0.0.124[127.0.0.124]:2598: \
Connection refused"}, {"address": "b@example.net"}]}
{"queue_name": "hold", "queue_id": "D5DB120C871", "arrival_time": 1796222381, \
"message_size": 297, "forced_expire": false, "sender": "MAILER-DAEMON", "recipients": \
[{"address": "y@example.net", "delay_reason": "connect to 127.0.0.124[127.0.0.124]:2598: \
Connection refused"}]}
{"queue_name": "incoming", "queue_id": "4Fq3Lk0Yz1z9sQ", "arrival_time": 1796222390, \
"message_size": 512, "sender": "kim@example.co.jp", "recipients": \
[{"address": "lee@example.co.jp"}], "some_future_member": 1}
"""

POSTCAT_H = """\
Received: by mail.sample.test (Postfix, from userid 0)
\tid D97C520C65C; Wed,  2 Dec 2026 14:39:23 +0000 (UTC)
From: x@example.net
To: suga@example.co.jp
Subject: t0
X-E2E-Id: run1-0000
Message-ID: <m0@x>
Date: Wed,  2 Dec 2026 14:39:23 +0000 (UTC)
"""


def test_postqueue_j_sample_is_parsed() -> None:
    entries = parse_postqueue_json(POSTQUEUE_J)
    assert [(e.queue_name, e.queue_id) for e in entries] == [
        ("deferred", "D97C520C65C"), ("active", "DC15520C65A"), ("hold", "D5DB120C871"),
        ("incoming", "4Fq3Lk0Yz1z9sQ")]
    assert [r.address for r in entries[1].recipients] == ["a@example.net", "b@example.net"]
    assert entries[1].recipients[0].delay_reason is not None
    assert entries[1].recipients[1].delay_reason is None
    assert entries[0].arrival_time == 1796222363 and entries[0].message_size == 264
    assert entries[2].sender == "MAILER-DAEMON"
    assert entries[3].forced_expire is False
    assert parse_postqueue_json("") == []


@pytest.mark.parametrize("line", ['{"queue_name": "deferred"', '{"queue_name": "deferred"}'])
def test_a_postqueue_line_that_is_not_an_entry_fails_loudly(line: str) -> None:
    with pytest.raises(QueueError, match="line 2"):
        parse_postqueue_json(POSTQUEUE_J.splitlines()[0] + "\n" + line + "\n")


def test_postcat_headers_give_the_id() -> None:
    assert parse_postcat_headers(POSTCAT_H) == "run1-0000"
    marked = "*** MESSAGE CONTENTS deferred/D/D97C520C65C ***\n" + POSTCAT_H
    assert parse_postcat_headers(marked) == "run1-0000"
    assert parse_postcat_headers("From: MAILER-DAEMON\nSubject: bounce\n") is None


class FakePostfix:
    """Answers postqueue -j and postcat -h -q like a Postfix whose queue holds 4 files."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append(argv)
        tool = Path(argv[0]).name

        def done(out: str = "", err: str = "", rc: int = 0) -> subprocess.CompletedProcess[str]:
            return subprocess.CompletedProcess(argv, rc, out, err)

        if tool == "postqueue":
            return done(POSTQUEUE_J)
        queue_id = argv[-1]
        if queue_id == "D97C520C65C":
            return done(POSTCAT_H)
        if queue_id == "DC15520C65A":
            return done(POSTCAT_H.replace("run1-0000", "run1-0001"))
        if queue_id == "D5DB120C871":  # a DSN: no e2e id in its own headers
            return done("From: MAILER-DAEMON@mail.sample.test\nSubject: Undelivered Mail\n")
        return done(err=f"postcat: fatal: open queue file {queue_id}: No such file or directory",
                    rc=1)  # delivered between the listing and postcat


def test_read_queue_asks_postcat_per_queued_message_with_options_first() -> None:
    fake = FakePostfix()
    messages = read_queue("/e2e/onprem/etc", runner=fake)
    assert [m.message_id for m in messages] == ["run1-0000", "run1-0001", None]
    assert [Path(c[0]).name for c in fake.calls] == ["postqueue"] + ["postcat"] * 4
    assert fake.calls[0][1:] == ["-c", "/e2e/onprem/etc", "-j"]
    # postcat stops reading options at the first file name: the queue id comes last.
    assert fake.calls[1][1:] == ["-c", "/e2e/onprem/etc", "-h", "-q", "D97C520C65C"]
    assert queued_ids("/a", "/b", runner=FakePostfix()) == {"run1-0000", "run1-0001"}


def test_read_queue_fails_loudly_when_postqueue_fails() -> None:
    def broken(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(list(argv), 75, "", "postqueue: fatal: bad config")

    with pytest.raises(QueueError, match="bad config"):
        read_queue("/e2e/rental/etc", runner=broken)


# --- the table ------------------------------------------------------------------------------


def rows() -> dict[str, LedgerRow]:
    ok = Ledger()
    send(ok, "a-1", "suga")
    lost = Ledger()
    send(lost, "b-1", "suga")
    send(lost, "b-2", "kim")
    return {"none": ok.result({"a-1": [("rental", "suga")]}),
            "ssh-drop": lost.result({"b-2": [("rental", "kim"), ("onprem", "kim")]})}


def test_the_rendered_tables_have_every_column_and_row() -> None:
    runs = rows()
    for text in (render_table(runs), render_markdown(runs)):
        for header in COLUMNS.values():
            assert header in text, header
        for run in runs:
            assert run in text
        assert "pass" in text and "FAIL" in text
    markdown = render_markdown(runs).splitlines()
    assert len(markdown) == 2 + len(runs)
    assert all(line.count("|") == len(COLUMNS) + 3 for line in markdown)
    assert "| ssh-drop | 2 | 2 | 0 |" in render_markdown(runs)


def test_must_be_zero_names_the_columns() -> None:
    assert rows()["none"].must_be_zero() == []
    assert rows()["ssh-drop"].must_be_zero() == ["duplicated", "missing"]
    everything = LedgerRow(**dict.fromkeys(COLUMNS, 1))  # type: ignore[arg-type]
    assert everything.must_be_zero() == [c for c in COLUMNS if c not in INFORMATIVE]
    assert {"sent", "delivered", "deferred_then_delivered"} <= INFORMATIVE
    assert "bounced" not in INFORMATIVE and "missing" not in INFORMATIVE


def test_details_lists_the_first_ids_per_failing_column() -> None:
    ledger = Ledger()
    for n in range(30):
        send(ledger, f"lost-{n:02d}", "suga")
    text = details(ledger.result({}), limit=5)
    assert text.splitlines()[0] == "missing (lost): 30"
    assert "lost-04" in text and "lost-05" not in text
    assert "... and 25 more" in text
    assert details(rows()["none"]) == ""
