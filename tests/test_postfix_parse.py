"""The pure Postfix facts of `reconciler/drivers/postfix.py`, on samples of real output kept in
tests/fixtures/postfix: a Debian main.cf, `postmap -s` dumps, `getent passwd`, and mail logs in
classic syslog and in rsyslog's ISO-8601 (high precision) format. Where Postfix's own tools are
installed (`postconf`, `postmap`), the parser is also checked against what they say."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.drivers.postfix import (
    RECIPIENT_MAP,
    TRANSPORT_MAP,
    PostfixError,
    format_map,
    parse_main_cf,
    parse_map,
    parse_passwd,
    recipient_map_ref,
    relay_target,
    set_main_cf,
    transport_map_ref,
    users_in_map,
    with_map,
)
from reconciler.drivers.postfix_log import last_mail_seen
from reconciler.drivers.postfix_mailbox import count_maildir

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
