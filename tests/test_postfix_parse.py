"""The pure Postfix facts of `reconciler/drivers/postfix.py`, on samples of real output kept in
tests/fixtures/postfix: a Debian main.cf, `postconf -n` of a Debian 12 and a CentOS 6 default
install, their /etc/aliases and /etc/login.defs, `postmap -s` dumps, `getent passwd`, and mail
logs in classic syslog and in rsyslog's ISO-8601 (high precision) format. Where Postfix's own
tools are installed (`postconf`, `postmap`, `postalias`), the parser is also checked against
what they say."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from reconciler.drivers.postfix import (
    RECIPIENT_MAP,
    TRANSPORT_MAP,
    PostfixError,
    format_map,
    forward_keys,
    nexthop,
    parse_accounts,
    parse_login_defs,
    parse_main_cf,
    parse_map,
    parse_passwd,
    partial_forwards,
    points_at_rental,
    recipient_map_ref,
    relay_target,
    set_main_cf,
    transport_map_ref,
    users_in_map,
    with_map,
)
from reconciler.drivers.postfix_log import last_mail_seen
from reconciler.drivers.postfix_mailbox import MailboxSpec, count_mailboxes, count_maildir
from reconciler.drivers.postfix_names import (
    SPACE_PARAMS,
    expand_params,
    first_name,
    local_virtual_aliases,
    parse_aliases,
    parse_domain_list,
    regexp_literals,
    split_alias_members,
    split_list,
    table_ref,
    virtual_domain_keys,
)
from reconciler.transport import LocalTransport

FIXTURES = Path(__file__).parent / "fixtures" / "postfix"
JST = timezone(timedelta(hours=9))


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def postfix_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def own_config_dir(directory: Path) -> Path:
    """A config directory of its own for Postfix's tools: an empty main.cf (all defaults),
    backdated so the tools do not wait for it to settle. Every tool gets `-c` of it, so no
    test reads the system's /etc/postfix/main.cf (a fresh CI machine has none)."""
    directory.mkdir(parents=True, exist_ok=True)
    main_cf = directory / "main.cf"
    main_cf.touch()
    hour_ago = time.time() - 3600
    os.utime(main_cf, (hour_ago, hour_ago))
    return directory


def postconf_n(config_dir: Path) -> dict[str, str]:
    """What Postfix itself makes of a main.cf: `postconf -n -c DIR`."""
    tool = postfix_tool("postconf")
    if tool is None:
        pytest.skip("postconf not installed (apt-get install postfix)")
    # Postfix waits (up to ~2 s) for a main.cf modified just now to settle: backdate it.
    hour_ago = time.time() - 3600
    os.utime(config_dir / "main.cf", (hour_ago, hour_ago))
    out = subprocess.run(
        [tool, "-n", "-c", str(config_dir)], capture_output=True, text=True, check=True
    ).stdout
    params: dict[str, str] = {}
    for line in out.splitlines():
        name, _, value = line.partition(" =")
        params[name] = value.strip()
    params.pop("config_directory", None)
    return params


# --- main.cf ---------------------------------------------------------------------------------


def test_parse_main_cf_debian_sample() -> None:
    params = parse_main_cf(fixture("main.cf"))
    assert params["myhostname"] == "mail.example.co.jp"
    assert params["smtpd_tls_security_level"] == "may"  # `name=value` without spaces
    assert params["relayhost"] == ""
    # continuation lines (tab or spaces) join the value
    assert params["mydestination"] == (
        "$myhostname, example.co.jp, mail.example.co.jp, localhost.example.co.jp, localhost"
    )
    assert params["local_recipient_maps"] == "proxy:unix:passwd.byname $alias_maps"
    # a comment and a blank line inside a multi-line value do not end it
    assert params["smtpd_recipient_restrictions"] == (
        "permit_mynetworks, reject_unauth_destination, reject_unknown_recipient_domain, "
        "reject_rbl_client bl.spamcop.net"
    )
    # commented-out settings are not settings
    assert "delay_warning_time" not in params
    assert params["myorigin"] == "/etc/mailname"


def test_parse_main_cf_agrees_with_postconf(tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_text(fixture("main.cf"))
    (tmp_path / "master.cf").write_text("")
    assert parse_main_cf(fixture("main.cf")) == postconf_n(tmp_path)


def test_parse_main_cf_rejects_a_line_without_equals() -> None:
    with pytest.raises(PostfixError, match="cannot parse line"):
        parse_main_cf("myhostname = a\nthis is not a parameter\n")


def test_set_main_cf_replaces_a_multi_line_parameter_and_keeps_comments() -> None:
    original = fixture("main.cf")
    new_value = "permit_mynetworks, reject_unauth_destination"
    updated = set_main_cf(original, "smtpd_recipient_restrictions", new_value)

    params = parse_main_cf(updated)
    assert params["smtpd_recipient_restrictions"] == new_value
    # every other parameter is untouched
    before = parse_main_cf(original)
    del before["smtpd_recipient_restrictions"], params["smtpd_recipient_restrictions"]
    assert params == before
    # every comment line is kept, in order
    comments = [line for line in original.splitlines() if line.lstrip().startswith("#")]
    assert [line for line in updated.splitlines() if line.lstrip().startswith("#")] == comments
    # the old continuation lines are gone
    assert "reject_rbl_client" not in updated
    assert updated.count("smtpd_recipient_restrictions") == 1


def test_set_main_cf_result_reads_the_same_to_postconf(tmp_path: Path) -> None:
    updated = set_main_cf(
        fixture("main.cf"), "local_recipient_maps",
        with_map("proxy:unix:passwd.byname $alias_maps", recipient_map_ref("/etc/postfix")),
    )
    (tmp_path / "main.cf").write_text(updated)
    (tmp_path / "master.cf").write_text("")
    seen_by_postfix = postconf_n(tmp_path)
    assert seen_by_postfix["local_recipient_maps"] == (
        "proxy:unix:passwd.byname $alias_maps hash:/etc/postfix/mailrec_recipients"
    )
    assert seen_by_postfix == parse_main_cf(updated)


def test_set_main_cf_appends_a_new_parameter_once() -> None:
    original = fixture("main.cf")
    updated = set_main_cf(original, "relay_domains", "example.co.jp")
    assert updated.startswith(original.rstrip("\n"))
    assert updated.endswith("relay_domains = example.co.jp\n")
    again = set_main_cf(updated, "relay_domains", "example.co.jp")
    assert again == updated


def test_set_main_cf_matches_the_whole_name_only() -> None:
    text = "smtpd_tls_security_level = may\nsmtp_tls_security_level = may\n"
    updated = set_main_cf(text, "smtp_tls_security_level", "encrypt")
    assert parse_main_cf(updated) == {
        "smtpd_tls_security_level": "may",
        "smtp_tls_security_level": "encrypt",
    }


# --- maps --------------------------------------------------------------------------------------


def test_parse_map_postmap_s_output() -> None:
    entries = parse_map(fixture("transport.postmap-s.txt"))
    assert entries["suga@example.co.jp"] == "smtp:[example.sakura.ne.jp]:25"
    assert entries["example.net"] == "smtp:[relay.example.net]:587"
    # a value with spaces stays whole
    assert entries[".example.org"] == "error:mail for *.example.org is not accepted here"
    assert set(users_in_map(entries, "example.co.jp")) == {"suga", "tanaka", "sato"}


def test_parse_map_values_with_spaces_after_a_tab() -> None:
    entries = parse_map(fixture("virtual.postmap-s.txt"))
    assert entries == {
        "info@example.co.jp": "suga@example.co.jp, tanaka@example.co.jp",
        "sales@example.co.jp": "sato@example.co.jp",
        "postmaster@example.co.jp": "root",
    }


def test_parse_map_source_file_comments_case_and_key_only_lines() -> None:
    text = (
        "# transport map\n"
        "\n"
        "Suga@Example.CO.JP    smtp:[example.sakura.ne.jp]:25\n"
        "   # indented comment\n"
        "tanaka@example.co.jp\tsmtp:[example.sakura.ne.jp]:25   \n"
        "lonely@example.co.jp\n"
    )
    assert parse_map(text) == {
        "suga@example.co.jp": "smtp:[example.sakura.ne.jp]:25",
        "tanaka@example.co.jp": "smtp:[example.sakura.ne.jp]:25",
        "lonely@example.co.jp": "",
    }


def test_parse_map_reads_a_real_postmap_dump(tmp_path: Path) -> None:
    postmap = postfix_tool("postmap")
    if postmap is None:
        pytest.skip("postmap not installed (apt-get install postfix)")
    config = str(own_config_dir(tmp_path / "etc"))
    source = tmp_path / "virtual"
    source.write_text(fixture("virtual.postmap-s.txt").replace("\t", "   "))
    subprocess.run([postmap, "-c", config, f"hash:{source}"], check=True, capture_output=True)
    dumped = subprocess.run(
        [postmap, "-c", config, "-s", f"hash:{source}"],
        check=True, capture_output=True, text=True,
    ).stdout
    assert parse_map(dumped) == parse_map(fixture("virtual.postmap-s.txt"))


def test_format_map_round_trips_and_says_who_manages_it() -> None:
    entries = {
        "tanaka@example.co.jp": relay_target("example.sakura.ne.jp", 25),
        "suga@example.co.jp": relay_target("example.sakura.ne.jp", 25),
    }
    text = format_map(entries, TRANSPORT_MAP)
    assert text.splitlines()[0] == f"# {TRANSPORT_MAP}"
    assert "Managed by mailrec" in text
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert body == sorted(body)  # stable output: no diff when nothing changed
    assert parse_map(text) == entries
    assert parse_map(format_map({}, RECIPIENT_MAP)) == {}


def test_users_in_map_only_takes_the_domain() -> None:
    entries = {
        "suga@example.co.jp": "OK",
        "tanaka@EXAMPLE.co.jp".lower(): "OK",
        "sato@sub.example.co.jp": "OK",
        "ito@example.co.jp.evil.test": "OK",
        "example.co.jp": "OK",
    }
    assert set(users_in_map(entries, "Example.CO.JP")) == {"suga", "tanaka"}


def test_map_references_and_relay_target() -> None:
    assert recipient_map_ref("/etc/postfix/") == "hash:/etc/postfix/mailrec_recipients"
    assert transport_map_ref("/etc/postfix") == "hash:/etc/postfix/mailrec_transport"
    assert relay_target("example.sakura.ne.jp", 25) == "smtp:[example.sakura.ne.jp]:25"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "hash:/etc/postfix/mailrec_recipients"),
        (
            "proxy:unix:passwd.byname $alias_maps",
            "proxy:unix:passwd.byname $alias_maps hash:/etc/postfix/mailrec_recipients",
        ),
        # already there, whether separated by spaces or commas: unchanged (idempotent)
        (
            "proxy:unix:passwd.byname, hash:/etc/postfix/mailrec_recipients",
            "proxy:unix:passwd.byname, hash:/etc/postfix/mailrec_recipients",
        ),
        (
            "hash:/etc/postfix/mailrec_recipients,$alias_maps",
            "hash:/etc/postfix/mailrec_recipients,$alias_maps",
        ),
        # a map whose name merely starts the same is a different map
        (
            "hash:/etc/postfix/mailrec_recipients.old",
            "hash:/etc/postfix/mailrec_recipients.old hash:/etc/postfix/mailrec_recipients",
        ),
    ],
)
def test_with_map(value: str, expected: str) -> None:
    ref = recipient_map_ref("/etc/postfix")
    assert with_map(value, ref) == expected
    assert with_map(with_map(value, ref), ref) == with_map(value, ref)


# --- passwd ------------------------------------------------------------------------------------


def test_parse_passwd_keeps_people_only() -> None:
    users = parse_passwd(fixture("getent-passwd.txt"))
    assert users == {
        "suga": Path("/home/suga"),
        "tanaka": Path("/home/tanaka"),
        "sato": Path("/home/sato"),
        "suzuki": Path("/home/staff/suzuki"),
        "scanner": Path("/home/scanner"),
    }
    # system accounts (uid < 1000), nobody (65534) and names mailrec would not accept stay out
    for account in ("root", "mail", "postfix", "amavis", "nobody", "_apt", "pc01$"):
        assert account not in users


def test_parse_passwd_ignores_malformed_lines() -> None:
    text = "suga:x:1001:1001::/home/suga:/bin/bash\nbroken line\nx:x:abc:1::/h:/bin/sh\n\n"
    assert parse_passwd(text) == {"suga": Path("/home/suga")}


# --- Maildir -----------------------------------------------------------------------------------


def test_count_maildir(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    assert count_maildir(maildir) == 0  # no Maildir at all
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new" / "1700000000.M1P1.mail").write_text("a")
    (maildir / "cur" / "1700000001.M2P1.mail:2,S").write_text("b")
    (maildir / "cur" / "1700000002.M3P1.mail:2,RS").write_text("c")
    (maildir / "tmp" / "1700000003.M4P1.mail").write_text("being delivered")
    (maildir / "cur" / ".hidden").write_text("dovecot state")
    (maildir / "new" / "subdir").mkdir()
    assert count_maildir(maildir) == 3


# --- mail log ----------------------------------------------------------------------------------


def test_last_mail_seen_classic_syslog_across_new_year() -> None:
    now = datetime(2025, 1, 1, 1, 0, tzinfo=UTC)
    # The last mail (Jan 1 00:02:40, relayed) is followed by rejects, a disconnect and anvil
    # statistics: none of those is mail.
    assert last_mail_seen(fixture("mail.log.syslog"), now) == datetime(
        2025, 1, 1, 0, 2, 40, tzinfo=UTC
    )


def test_last_mail_seen_december_lines_are_last_year() -> None:
    december = "\n".join(
        line for line in fixture("mail.log.syslog").splitlines() if line.startswith("Dec")
    )
    now = datetime(2025, 1, 1, 1, 0, tzinfo=UTC)
    assert last_mail_seen(december, now) == datetime(2024, 12, 31, 23, 58, 13, tzinfo=UTC)


def test_last_mail_seen_local_time_ahead_of_utc_stays_this_year() -> None:
    # A host in Tokyo logs local time: a line written an hour ago reads 8 h "ahead" of UTC.
    # It must not be taken for the same day last year (that would open the MR010 gate).
    now = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)  # 18:00 in Tokyo
    line = (
        "Nov 29 17:00:01 mail postfix/smtp[2201]: 1A2B3C: to=<a@example.org>, "
        "relay=mx.example.org[203.0.113.5]:25, delay=0.5, dsn=2.0.0, status=sent (250 ok)\n"
    )
    assert last_mail_seen(line, now) == datetime(2026, 11, 29, 17, 0, 1, tzinfo=UTC)
    # ... and across the new year: Jan 1 05:00 in Tokyo is Dec 31 20:00 UTC.
    new_year = line.replace("Nov 29 17:00:01", "Jan  1 05:00:00")
    assert last_mail_seen(new_year, datetime(2026, 12, 31, 20, 0, tzinfo=UTC)) == datetime(
        2027, 1, 1, 5, 0, tzinfo=UTC
    )


def test_last_mail_seen_leap_day() -> None:
    line = "Feb 29 10:00:00 mail postfix/smtpd[1]: 1A2B3C: client=a.example.net[192.0.2.1]\n"
    assert last_mail_seen(line, datetime(2025, 3, 1, tzinfo=UTC)) == datetime(
        2024, 2, 29, 10, 0, tzinfo=UTC
    )


def test_last_mail_seen_iso8601_high_precision() -> None:
    seen = last_mail_seen(fixture("mail.log.iso"), datetime(2025, 7, 1, tzinfo=UTC))
    # The bounce notice delivered to the sender is the last message; the later reject is not.
    assert seen == datetime(2025, 6, 30, 18, 15, 21, 330912, tzinfo=JST)
    assert seen is not None and seen.utcoffset() == timedelta(hours=9)


def test_last_mail_seen_counts_accepted_bounced_and_deferred_mail() -> None:
    lines = fixture("mail.log.iso").splitlines()
    accepted = [line for line in lines if "client=" in line]
    assert last_mail_seen("\n".join(accepted), datetime(2025, 7, 1, tzinfo=UTC)) == datetime(
        2025, 6, 30, 17, 41, 2, 402871, tzinfo=JST
    )
    bounced = [line for line in lines if "status=bounced" in line]
    assert last_mail_seen("\n".join(bounced), datetime(2025, 7, 1, tzinfo=UTC)) == datetime(
        2025, 6, 30, 18, 15, 21, 220001, tzinfo=JST
    )
    # A deferred message is still in onprem's queue: onprem is not quiet yet.
    deferred = (
        "2025-07-02T03:00:00Z mail postfix/smtp[1]: 8D4E5F6A7B: to=<a@example.org>, "
        "relay=none, delay=3600, dsn=4.4.1, status=deferred (connect to mx.example.org: "
        "Connection timed out)"
    )
    log = fixture("mail.log.iso") + deferred + "\n"
    assert last_mail_seen(log, datetime(2025, 7, 3, tzinfo=UTC)) == datetime(
        2025, 7, 2, 3, 0, tzinfo=UTC
    )


def test_last_mail_seen_ignores_rejects_and_noise() -> None:
    rejects = [
        line for line in fixture("mail.log.syslog").splitlines()
        if "reject:" in line or "connect from" in line or "anvil" in line
    ]
    assert rejects  # the fixture has them
    assert last_mail_seen("\n".join(rejects), datetime(2025, 1, 1, 1, tzinfo=UTC)) is None
    # A queue-id reject (second RCPT refused after a first one was accepted) is no mail either.
    queued_reject = (
        "Jan  1 00:09:00 mail postfix/smtpd[7]: 4A1B2C3D4E: reject: RCPT from "
        "unknown[198.51.100.77]: 550 5.1.1 <x@example.co.jp>: Recipient address rejected; "
        "from=<a@example.biz> to=<x@example.co.jp> proto=ESMTP helo=<example.biz>"
    )
    assert last_mail_seen(queued_reject, datetime(2025, 1, 1, 1, tzinfo=UTC)) is None
    assert last_mail_seen("", datetime(2025, 1, 1, tzinfo=UTC)) is None


def test_last_mail_seen_multi_instance_syslog_name() -> None:
    line = (
        "2025-06-30T10:00:00+09:00 mail postfix-out/smtp[99]: 1A2B3C4D5E: to=<a@example.org>, "
        "relay=mx.example.org[203.0.113.5]:25, delay=0.5, dsn=2.0.0, status=sent (250 ok)"
    )
    assert last_mail_seen(line, datetime(2025, 7, 1, tzinfo=UTC)) == datetime(
        2025, 6, 30, 10, 0, tzinfo=JST
    )


def test_last_mail_seen_naive_iso_is_utc_and_unknown_lines_are_skipped() -> None:
    log = (
        "2025-06-30T10:00:00 mail postfix/smtpd[1]: 1A2B3C: client=a.example.net[192.0.2.1]\n"
        "garbage postfix/smtpd[1]: 1A2B3C: client=a.example.net[192.0.2.1]\n"
    )
    # the last matching line has no timestamp mailrec can read: the one before it counts
    assert last_mail_seen(log, datetime(2025, 7, 1, tzinfo=UTC)) == datetime(
        2025, 6, 30, 10, 0, tzinfo=UTC
    )


# --- Maildir++ folders and the log's zone (issue: mail counted wherever it is) ------------------


def _message(directory: Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("Subject: kept\n\nx\n")


def _maildir_plus_plus(maildir: Path) -> None:
    """Two messages only in `.Archive/cur` (the issue's case), then one in each of
    `.Sent.2024/new` and the nested folder `.a.b/cur`; and what is no message: tmp/, dot
    files, a folder's `maildirfolder`, a directory that is no Maildir++ folder."""
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    _message(maildir / ".Archive" / "cur", "1700000001.M1P1.mail:2,S")
    _message(maildir / ".Archive" / "cur", "1700000002.M2P1.mail:2,S")
    (maildir / ".Archive" / "maildirfolder").write_text("")
    _message(maildir / ".Archive" / "tmp", "1700000003.M3P1.mail")
    _message(maildir / ".Archive" / "cur", ".dovecot.state")
    _message(maildir / ".Sent.2024" / "new", "1700000004.M4P1.mail")
    _message(maildir / ".a.b" / "cur", "1700000005.M5P1.mail:2,S")
    _message(maildir / "notafolder" / "cur", "1700000006.M6P1.mail")
    _message(maildir / ".Archive" / "cur" / "subdir", "1700000007.M7P1.mail")
    (maildir / ".hidden-file").write_text("not a folder")


def test_count_maildir_counts_maildir_plus_plus_folders(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    _message(maildir / ".Archive" / "cur", "1700000001.M1P1.mail:2,S")
    _message(maildir / ".Archive" / "cur", "1700000002.M2P1.mail:2,S")
    assert count_maildir(maildir) == 2  # no new/ or cur/ at all: still mail
    _maildir_plus_plus(maildir)
    assert count_maildir(maildir) == 4


def test_the_scan_counts_maildir_plus_plus_folders_like_count_maildir(tmp_path: Path) -> None:
    """The host's scan (one `find`, run here on local directories) and the lab's count agree,
    folder by folder."""
    homes = {name: tmp_path / "home" / name for name in ("archive", "plain", "empty", "none")}
    _message(homes["archive"] / "Maildir" / ".Archive" / "cur", "1700000001.M1P1.mail:2,S")
    _message(homes["archive"] / "Maildir" / ".Archive" / "cur", "1700000002.M2P1.mail:2,S")
    _maildir_plus_plus(homes["plain"] / "Maildir")
    _message(homes["plain"] / "Maildir" / "new", "1700000008.M8P1.mail")
    for sub in ("new", "cur", "tmp"):
        (homes["empty"] / "Maildir" / sub).mkdir(parents=True)
    transport = LocalTransport()
    counts = count_mailboxes(transport, MailboxSpec.parse("maildir:~/Maildir"),
                             {name: str(home) for name, home in homes.items()})
    assert counts == {"archive": 2, "plain": 5, "empty": 0, "none": 0}
    assert counts == {name: count_maildir(home / "Maildir") for name, home in homes.items()}
    assert transport.round_trips == 1
    # A mailbox outside the homes ({user} in the path) has its folders counted too.
    spool = tmp_path / "vmail"
    _maildir_plus_plus(spool / "archive")
    assert count_mailboxes(LocalTransport(), MailboxSpec.parse(f"maildir:{spool}/{{user}}"),
                           {"archive": "/nonexistent", "nobody": "/nonexistent"}) == {
        "archive": 4, "nobody": 0}


def test_last_mail_seen_reads_classic_stamps_in_the_log_zone() -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    now = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)  # 18:00 in Tokyo
    line = (
        "Nov 29 17:00:01 mail postfix/smtp[2201]: 1A2B3C: to=<a@example.org>, "
        "relay=mx.example.org[203.0.113.5]:25, delay=0.5, dsn=2.0.0, status=sent (250 ok)\n"
    )
    # 17:00:01 in Tokyo is 08:00:01 UTC, an hour ago (as UTC it would be 8 h in the future).
    assert last_mail_seen(line, now, tokyo) == datetime(2026, 11, 29, 8, 0, 1, tzinfo=UTC)
    # New year: Jan 1 05:00 in Tokyo is Dec 31 20:00 UTC, this year, not next.
    new_year = line.replace("Nov 29 17:00:01", "Jan  1 05:00:00")
    assert last_mail_seen(new_year, datetime(2026, 12, 31, 20, 0, tzinfo=UTC), tokyo) == (
        datetime(2026, 12, 31, 20, 0, tzinfo=UTC))
    # ... and a line of Dec 31 late evening in Tokyo read on Jan 1 is last year's.
    december = line.replace("Nov 29 17:00:01", "Dec 31 23:30:00")
    assert last_mail_seen(december, datetime(2027, 1, 1, 0, 0, tzinfo=UTC), tokyo) == (
        datetime(2026, 12, 31, 14, 30, tzinfo=UTC))
    # A zone with summer time: 12:00 in New York is 16:00 UTC in July, 17:00 in January.
    york = ZoneInfo("America/New_York")
    july = line.replace("Nov 29 17:00:01", "Jul  1 12:00:00")
    assert last_mail_seen(july, datetime(2026, 7, 2, tzinfo=UTC), york) == datetime(
        2026, 7, 1, 16, 0, tzinfo=UTC)
    january = line.replace("Nov 29 17:00:01", "Jan  5 12:00:00")
    assert last_mail_seen(january, datetime(2026, 1, 6, tzinfo=UTC), york) == datetime(
        2026, 1, 5, 17, 0, tzinfo=UTC)
    # ISO stamps carry their own offset: the zone does not move them.
    iso = "2025-06-30T10:00:00+09:00 mail postfix/smtpd[1]: 1A2B3C: client=a.example.net[1.2.3.4]"
    assert last_mail_seen(iso, datetime(2025, 7, 1, tzinfo=UTC), york) == datetime(
        2025, 6, 30, 1, 0, tzinfo=UTC)


def test_last_mail_seen_finds_the_delivery_behind_10000_rejects_and_noise() -> None:
    noise = [
        line for line in fixture("mail.log.syslog").splitlines()
        if "reject:" in line or "connect from" in line or "anvil" in line
    ]
    log = fixture("mail.log.syslog") + "\n".join(noise[i % len(noise)] for i in range(10_000))
    assert last_mail_seen(log, datetime(2025, 1, 1, 1, 0, tzinfo=UTC)) == datetime(
        2025, 1, 1, 0, 2, 40, tzinfo=UTC)



# --- the address space: postconf -n of default installs, aliases(5), login.defs -----------------


def postconf_x(config_dir: Path, main_cf: str, *names: str) -> dict[str, str]:
    """What the driver reads: `postconf -c DIR -x NAME...` of a main.cf, by Postfix itself."""
    tool = postfix_tool("postconf")
    if tool is None:
        pytest.skip("postconf not installed (apt-get install postfix)")
    lines = [line for line in main_cf.splitlines() if not line.startswith("config_directory")]
    own_config_dir(config_dir)
    (config_dir / "main.cf").write_text("\n".join(lines) + "\n")
    hour_ago = time.time() - 3600
    os.utime(config_dir / "main.cf", (hour_ago, hour_ago))
    out = subprocess.run([tool, "-c", str(config_dir), "-x", *names],
                         capture_output=True, text=True, check=True).stdout
    return parse_main_cf(out)


def test_debian12_default_mydestination_and_myorigin(tmp_path: Path) -> None:
    params = parse_main_cf(fixture("postconf-n.debian12.txt"))
    # Unexpanded (postconf -n), $myhostname is a name mailrec cannot see; the empty entry
    # of Debian's ", ," is no name at all.
    assert parse_domain_list(params["mydestination"]) == (
        ("mail.example.co.jp", "localhost.example.co.jp", "localhost"), ("$myhostname",))
    # Expanded as the driver reads it (postconf -x): every name, once.
    expanded = postconf_x(tmp_path, fixture("postconf-n.debian12.txt"), "mydestination",
                          "myorigin", "alias_maps", "local_recipient_maps",
                          "recipient_delimiter")
    assert parse_domain_list(expanded["mydestination"]) == (
        ("mail.example.co.jp", "localhost.example.co.jp", "localhost"), ())
    # Debian: myorigin names a file whose first line is the name; postconf prints the path.
    assert expanded["myorigin"] == "/etc/mailname"
    assert first_name("example.co.jp\n") == "example.co.jp"
    assert first_name("\n  Mail.Example.co.jp.  \nother\n") == "mail.example.co.jp"
    assert first_name("not a name\n") == first_name("") == ""
    assert expanded["alias_maps"] == "hash:/etc/aliases"
    assert expanded["local_recipient_maps"] == "proxy:unix:passwd.byname hash:/etc/aliases"
    assert expanded["recipient_delimiter"] == "+"


def test_centos6_default_mydestination(tmp_path: Path) -> None:
    params = parse_main_cf(fixture("postconf-n.centos6.txt"))
    assert params["inet_interfaces"] == "localhost"
    assert params["alias_maps"] == "hash:/etc/aliases"
    assert parse_domain_list(params["mydestination"]) == (
        ("localhost",), ("$myhostname", "localhost.$mydomain"))
    expanded = postconf_x(tmp_path, fixture("postconf-n.centos6.txt"), "mydestination",
                          "myorigin", "mydomain", "virtual_alias_maps", "fallback_transport")
    assert parse_domain_list(expanded["mydestination"]) == (
        ("mail.example.co.jp", "localhost.example.co.jp", "localhost"), ())
    assert expanded["mydomain"] == "example.co.jp"  # myhostname minus its first label
    assert expanded["myorigin"] == "mail.example.co.jp"  # the Postfix default: $myhostname
    assert expanded["virtual_alias_maps"] == expanded["fallback_transport"] == ""


def test_parse_domain_list_keeps_what_it_cannot_expand_apart() -> None:
    names, unresolved = parse_domain_list(
        "Mail.Example.co.jp., example.co.jp,,localhost  hash:/etc/postfix/local_domains, "
        "$unknown_parameter /etc/postfix/more_names !old.example.co.jp .sub.example.co.jp "
        "example.co.jp")
    assert names == ("mail.example.co.jp", "example.co.jp", "localhost")
    assert unresolved == ("hash:/etc/postfix/local_domains", "$unknown_parameter",
                          "/etc/postfix/more_names", "!old.example.co.jp",
                          ".sub.example.co.jp")
    assert parse_domain_list("") == ((), ())


def test_split_list_and_table_refs() -> None:
    assert split_list("hash:/a, nis:mail.aliases\n\tproxy:hash:/b") == [
        "hash:/a", "nis:mail.aliases", "proxy:hash:/b"]
    assert split_list("inline:{ a=b, c=d } hash:/x") == ["inline:{ a=b, c=d }", "hash:/x"]
    assert table_ref("proxy:hash:/etc/aliases") == ("proxy", "hash:/etc/aliases")
    assert table_ref("ldap:/etc/postfix/ldap.cf") == ("ldap", "/etc/postfix/ldap.cf")
    for item in ("/etc/postfix/file", "$alias_maps", "example.co.jp", "Hash:/x"):
        assert table_ref(item) is None


def test_parse_aliases_debian12_default() -> None:
    assert parse_aliases(fixture("aliases.debian12")) == {"postmaster": ("root",)}


def test_parse_aliases_centos6_with_the_sites_own_names() -> None:
    aliases = parse_aliases(fixture("aliases.centos6"))
    assert len(aliases) == 83  # as postalias -s lists them (its own @ and YP_ keys aside)
    assert aliases["mailer-daemon"] == ("postmaster",)
    assert aliases["info"] == aliases["sales"] == ("postmaster",)  # the stock list has both
    assert aliases["decode"] == ("root",)
    assert aliases["root"] == ("suga",)  # uncommented by the admin
    assert aliases["eigyo"] == ("suga", "tanaka", "sato@example.co.jp")  # a quoted member
    assert aliases["soumu"] == ("tanaka", "sato", "Suzuki Aya")  # continuation lines
    assert aliases["all-staff"] == (":include:/etc/mail/all-staff.list",)
    assert aliases["ticket"] == ("|/usr/local/bin/ticket-intake --queue support",)
    assert aliases["fax-archive"] == ("/var/spool/fax-archive/mbox",)
    assert aliases["webmaster2"] == ("suga",)  # names are looked up in lower case
    assert "#root" not in aliases


def test_parse_aliases_reads_postalias_dump_as_it_reads_the_source(tmp_path: Path) -> None:
    """`postalias -s` (what the driver reads: the compiled table, which is what local(8)
    uses) gives the same aliases as the source; postalias's own `@` entry is left out."""
    tool = postfix_tool("postalias")
    if tool is None:
        pytest.skip("postalias not installed (apt-get install postfix)")
    config = own_config_dir(tmp_path / "etc")
    source = config / "aliases"
    source.write_text(fixture("aliases.centos6"))
    table = f"hash:{source}"
    subprocess.run([tool, "-c", str(config), table], check=True, capture_output=True)
    dumped = subprocess.run([tool, "-c", str(config), "-s", table], check=True,
                            capture_output=True, text=True).stdout
    assert dumped.startswith("@:") or "\n@:" in dumped  # postalias adds it
    assert parse_aliases(dumped) == parse_aliases(fixture("aliases.centos6"))


def test_split_alias_members_per_aliases5() -> None:
    assert split_alias_members(' suga, "Sato Taro" , tanaka@example.net,') == (
        "suga", "Sato Taro", "tanaka@example.net")
    assert split_alias_members('"|/usr/bin/procmail -a $EXTENSION, x", /var/mail/archive') == (
        "|/usr/bin/procmail -a $EXTENSION, x", "/var/mail/archive")
    assert split_alias_members("Suga Hiroshi <suga@example.co.jp>, :include:/etc/list") == (
        "suga@example.co.jp", ":include:/etc/list")
    assert split_alias_members('"a \\"quoted\\" name", suga, suga') == ('a "quoted" name', "suga")
    assert split_alias_members("") == ()


def test_local_virtual_aliases_and_domains() -> None:
    entries = parse_map(
        "sales@example.co.jp suga\nsales@mail.example.co.jp sato\n@example.co.jp catchall\n"
        "other@example.net suga\nroot suga, sato tanaka\nexample.org anything\n")
    found = local_virtual_aliases(entries, ("example.co.jp", "mail.example.co.jp"))
    assert found == {"sales": ("suga", "sato"), "": ("catchall",),
                     "root": ("suga", "sato", "tanaka")}
    assert virtual_domain_keys(entries) == ("example.org",)


def test_regexp_literals() -> None:
    assert regexp_literals("# literal rules only\n/^sales@example\\.co\\.jp$/ suga\n"
                           "/^Info@Example\\.co\\.jp$/i suga, sato\n") == {
        "sales@example.co.jp": "suga", "info@example.co.jp": "suga, sato"}
    for table in ("/^(.*)@example\\.co\\.jp$/ $1\n", "/sales/ suga\n",
                  "if /@example/\n/^a@example$/ b\nendif\n", "!/^a@b$/ c\n"):
        assert regexp_literals(table) is None, table


def test_parse_login_defs() -> None:
    assert parse_login_defs(fixture("login.defs.debian12")) == (1000, 60000)
    assert parse_login_defs(fixture("login.defs.centos6")) == (500, 60000)
    assert parse_login_defs("#UID_MIN 500\nSUB_UID_MIN 100000\n") is None
    assert parse_login_defs("UID_MIN 2000\n") == (2000, 59999)
    assert parse_login_defs("UID_MIN 5000\nUID_MAX 4000\n") is None


def test_parse_passwd_takes_the_uid_range() -> None:
    centos = fixture("getent-passwd.centos6.txt")
    assert set(parse_passwd(centos)) == set()  # the default range starts at 1000
    assert set(parse_passwd(centos, (500, 60000))) == {"suga", "tanaka", "sato", "scanner"}
    accounts = parse_accounts(centos)
    assert accounts["root"] == ("/root", 0)
    assert accounts["saslauth"].uid == 499
    assert accounts["suga"] == ("/home/suga", 500)
    assert "pc01$" not in parse_accounts(fixture("getent-passwd.txt"))


def test_forward_keys_and_partial_forwards() -> None:
    names = ("mail.example.co.jp", "example.co.jp", "localhost")
    keys = forward_keys("suga", "example.co.jp", names)
    assert keys == ["suga@example.co.jp", "suga@mail.example.co.jp", "suga@localhost"]
    relay = "smtp:[rental]:25"
    transport = dict.fromkeys(keys, relay)
    recipients = dict.fromkeys(keys, "OK")
    virtual = {k: "suga@example.co.jp" for k in keys[1:]}

    def partial(transport: dict[str, str] = transport,
                recipients: dict[str, str] = recipients,
                virtual: dict[str, str] = virtual, rewriting: bool = True) -> frozenset[str]:
        return partial_forwards({"suga": relay}, domain="example.co.jp", names=names,
                                transport=transport, recipients=recipients, virtual=virtual,
                                rewriting=rewriting)

    assert partial() == frozenset()
    assert partial(rewriting=False) == {"suga"}  # main.cf does not name mailrec_virtual
    assert partial(transport={**transport, "suga@localhost": "smtp:[old]:25"}) == {"suga"}
    assert partial(recipients={k: v for k, v in recipients.items() if "localhost" not in k}
                   ) == {"suga"}
    assert partial(virtual={}) == {"suga"}
    assert partial_forwards({"suga": relay}, domain="example.co.jp", names=("example.co.jp",),
                            transport={}, recipients={}, virtual={}, rewriting=False
                            ) == frozenset()  # nothing but the domain: nothing to miss


def test_fallback_points_at_the_rental() -> None:
    assert nexthop("smtp:[127.0.0.3]:2525") == ("127.0.0.3", 2525)
    assert nexthop("relay:Example.Sakura.ne.jp.") == ("example.sakura.ne.jp", 25)
    assert nexthop("smtp:[2001:db8::1]:25") == ("2001:db8::1", 25)
    assert nexthop("smtp") is None and nexthop("smtp:[x:25") is None
    rental = ("example.sakura.ne.jp", "mx.example.sakura.ne.jp.")
    assert points_at_rental("fallback_transport", "smtp:[example.sakura.ne.jp]", rental)
    assert points_at_rental("fallback_transport", "relay:[Example.Sakura.ne.jp]:587", rental)
    assert points_at_rental("fallback_transport", "smtp:mx.example.sakura.ne.jp", rental)
    assert not points_at_rental("fallback_transport", "smtp:[relay.example.net]", rental)
    assert not points_at_rental("fallback_transport", "smtp", rental)
    assert points_at_rental("luser_relay", "$user@example.sakura.ne.jp", rental)
    assert points_at_rental("luser_relay", "$local@[127.0.0.3]", "127.0.0.3")  # one host
    assert not points_at_rental("luser_relay", "admin", rental)
    assert not points_at_rental("luser_relay", "$user@example.sakura.ne.jp.evil", rental)


SEED_STYLE = (
    "luser_relay = $user@example.sakura.ne.jp\n"
    "fallback_transport = smtp:[example.sakura.ne.jp]:25\n"
    "virtual_alias_maps = hash:/etc/postfix/virtual, $alias_maps\n"
    "recipient_delimiter = ${undefined_param}+\n"
)


@pytest.mark.parametrize(("sample", "extra"), [
    ("postconf-n.debian12.txt", ""), ("postconf-n.centos6.txt", ""),
    ("postconf-n.centos6.txt", SEED_STYLE), ("main.cf", "")])
def test_expand_params_agrees_with_postconf_x(sample: str, extra: str, tmp_path: Path) -> None:
    """CentOS 6's Postfix 2.6 has no `postconf -x`: mailrec then expands the whole `postconf`
    output itself, and must get what -x gives."""
    expanded = postconf_x(tmp_path, fixture(sample) + extra, *SPACE_PARAMS)
    tool = postfix_tool("postconf")
    assert tool is not None
    every = subprocess.run([tool, "-c", str(tmp_path)], capture_output=True, text=True,
                           check=True).stdout
    assert expand_params(parse_main_cf(every), SPACE_PARAMS) == expanded


def test_expand_params_forms() -> None:
    params = {"a": "A", "b": "$a-${a}-$(a)", "empty": "", "loop": "$loop",
              "set": "${a?yes}${empty?no}", "unset": "${a:no}${empty:yes}"}
    assert expand_params(params, ["b", "set", "unset", "missing"]) == {
        "b": "A-A-A", "set": "yes", "unset": "yes", "missing": ""}
    assert expand_params({"x": "$unknown y"}, ["x"]) == {"x": " y"}  # as postconf -x
    # local(8) fills these in at delivery; postconf -x keeps them too.
    assert expand_params({"luser_relay": "$user@[127.0.0.3]"}, ["luser_relay"]) == {
        "luser_relay": "$user@[127.0.0.3]"}
    assert "$loop" in expand_params(params, ["loop"])["loop"]  # stops, does not hang
