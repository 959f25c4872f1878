"""The lab rental SMTP server over real SMTP (smtplib on loopback)."""

from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import ssl
import subprocess
import sys
from ipaddress import ip_network
from pathlib import Path

import pytest

import reconciler
from reconciler.drivers.rental.base import ProviderContext
from reconciler.drivers.rental.lab import LabProvider
from reconciler.lab.layout import LabLayout
from reconciler.lab.rental_smtp import (
    OUTGOING_DIR,
    RentalSmtpServer,
    _self_signed,
    read_log,
)

from .conftest import (
    DOMAIN,
    EXTERNAL,
    OUTSIDER,
    PASSWORD,
    RENTAL_HOST,
    WHITELISTED,
    connect,
    rental_config,
)

MESSAGE = b"From: a@example.net\r\nSubject: hello\r\n\r\nline one\r\n.dot line\r\n"


def maildir_files(layout: LabLayout, user: str) -> list[Path]:
    return sorted((layout.rental_maildirs / user / "new").iterdir())


def outgoing_files(layout: LabLayout) -> list[Path]:
    spool = layout.rental / OUTGOING_DIR
    return sorted(p for p in spool.iterdir() if p.is_file()) if spool.exists() else []


def events(lab_dir: Path, event: str) -> list[dict[str, object]]:
    return [e for e in read_log(lab_dir) if e["event"] == event]


def test_accepts_and_delivers_into_the_maildir(rental: RentalSmtpServer, layout: LabLayout) -> None:
    with connect(rental) as client:
        refused = client.sendmail("a@example.net", [f"suga@{DOMAIN}"], MESSAGE)
    assert refused == {}
    [path] = maildir_files(layout, "suga")
    assert not any((layout.rental_maildirs / "suga" / "tmp").iterdir())  # written via tmp/
    text = path.read_text()
    assert text.startswith("Return-Path: <a@example.net>\nDelivered-To: suga@example.co.jp\n")
    assert "Subject: hello\n\nline one\n.dot line\n" in text  # LF endings, dot-unstuffed
    assert ",S=" in path.name
    [message] = events(layout.root, "message")
    assert message["code"] == 250
    assert message["delivered"] == [f"suga@{DOMAIN}"]
    assert message["peer"] == OUTSIDER
    assert message["port"] == rental.relay_port


def test_maildir_names_are_unique(rental: RentalSmtpServer, layout: LabLayout) -> None:
    with connect(rental) as client:
        for _ in range(5):
            client.sendmail("", [f"tanaka@{DOMAIN}"], MESSAGE)
    assert len(maildir_files(layout, "tanaka")) == 5


def test_unknown_user_is_refused_with_550(rental: RentalSmtpServer, layout: LabLayout) -> None:
    address = f"nobody@{DOMAIN}"
    with connect(rental) as client:
        client.mail("a@example.net")
        code, text = client.rcpt(address)
        client.rset()
    assert (code, text.decode()) == (
        550,
        f"5.1.1 <{address}>: Recipient address rejected: User unknown in virtual mailbox table",
    )
    [entry] = events(layout.root, "rcpt")
    assert (entry["rcpt"], entry["code"], entry["mail_from"]) == (address, 550, "a@example.net")
    assert events(layout.root, "message") == []


def test_relay_denied_from_a_source_not_whitelisted(
    rental: RentalSmtpServer, layout: LabLayout
) -> None:
    with connect(rental, source=OUTSIDER) as client:
        client.mail(f"suga@{DOMAIN}")
        code, text = client.rcpt(EXTERNAL)
    assert (code, text.decode()) == (554, f"5.7.1 <{EXTERNAL}>: Relay access denied")
    [entry] = events(layout.root, "rcpt")
    assert (entry["peer"], entry["code"]) == (OUTSIDER, 554)
    assert outgoing_files(layout) == []


def test_relay_allowed_from_a_whitelisted_source(
    rental: RentalSmtpServer, layout: LabLayout
) -> None:
    with connect(rental, source=WHITELISTED) as client:
        refused = client.sendmail(f"suga@{DOMAIN}", [EXTERNAL], MESSAGE)
    assert refused == {}
    [spooled] = outgoing_files(layout)
    assert f"X-Mailrec-Envelope-To: {EXTERNAL}\n" in spooled.read_text()
    [message] = events(layout.root, "message")
    assert (message["relayed"], message["peer"]) == ([EXTERNAL], WHITELISTED)


def test_whitelisted_source_still_gets_550_for_unknown_users(rental: RentalSmtpServer) -> None:
    with connect(rental, source=WHITELISTED) as client:
        client.mail("")
        code, _ = client.rcpt(f"nobody@{DOMAIN}")
    assert code == 550


def test_auth_is_refused_before_starttls(rental: RentalSmtpServer, layout: LabLayout) -> None:
    with connect(rental, submission=True) as client:
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        credentials = base64.b64encode(f"\0suga@{DOMAIN}\0{PASSWORD}".encode()).decode()
        code, _ = client.docmd("AUTH", f"PLAIN {credentials}")
        assert code == 538
        code, _ = client.docmd("MAIL", "FROM:<suga@example.co.jp>")
        assert code == 530  # the submission port takes nothing before AUTH
    assert events(layout.root, "auth") == []


def test_starttls_then_auth_relays_anywhere(rental: RentalSmtpServer, layout: LabLayout) -> None:
    with connect(rental, submission=True) as client:
        client.starttls()
        client.ehlo()
        assert "PLAIN" in client.esmtp_features["auth"]
        assert "LOGIN" in client.esmtp_features["auth"]
        client.login(f"suga@{DOMAIN}", PASSWORD)
        refused = client.sendmail(f"suga@{DOMAIN}", [EXTERNAL, f"tanaka@{DOMAIN}"], MESSAGE)
    assert refused == {}
    assert len(outgoing_files(layout)) == 1
    assert len(maildir_files(layout, "tanaka")) == 1
    [message] = events(layout.root, "message")
    assert message["auth_user"] == f"suga@{DOMAIN}"
    assert message["service"] == "submission"
    assert "ESMTPSA" in maildir_files(layout, "tanaka")[0].read_text()


@pytest.mark.parametrize("login", [f"suga@{DOMAIN}", f"nobody@{DOMAIN}"])
def test_bad_credentials_get_535(
    rental: RentalSmtpServer, layout: LabLayout, login: str
) -> None:
    with connect(rental, submission=True) as client:
        client.starttls()
        client.ehlo()
        credentials = base64.b64encode(f"\0{login}\0wrong".encode()).decode()
        code, text = client.docmd("AUTH", f"PLAIN {credentials}")
    assert (code, text.decode()) == (535, "5.7.8 Error: authentication failed")
    [entry] = events(layout.root, "auth")
    assert (entry["code"], entry["auth_user"]) == (535, None)


def test_auth_login_mechanism(rental: RentalSmtpServer) -> None:
    with connect(rental, submission=True) as client:
        client.starttls()
        client.ehlo()
        client.user, client.password = f"suga@{DOMAIN}", PASSWORD
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
    assert code == 235


def test_auth_on_the_relay_port_allows_relaying(rental: RentalSmtpServer) -> None:
    with connect(rental, source=OUTSIDER) as client:
        client.starttls()
        client.ehlo()
        client.login(f"suga@{DOMAIN}", PASSWORD)
        client.mail(f"suga@{DOMAIN}")
        code, _ = client.rcpt(EXTERNAL)
    assert code == 250


def test_files_are_reread_on_every_transaction(
    rental: RentalSmtpServer, layout: LabLayout
) -> None:
    provider = LabProvider(rental_config("lab"), ProviderContext(DOMAIN, lab_dir=layout.root))
    with connect(rental, source=OUTSIDER) as client:
        client.mail("")
        assert client.rcpt(f"bob@{DOMAIN}")[0] == 550
        assert client.rcpt(EXTERNAL)[0] == 554
        client.rset()
        provider.create_mailbox("bob")
        provider.set_whitelist(frozenset([ip_network(f"{OUTSIDER}/32")]), frozenset())
        client.mail("")
        assert client.rcpt(f"bob@{DOMAIN}")[0] == 250
        assert client.rcpt(EXTERNAL)[0] == 250


def test_malformed_addresses_never_reach_a_file(
    rental: RentalSmtpServer, layout: LabLayout
) -> None:
    with connect(rental) as client:
        assert client.docmd("MAIL", "FROM:<bad..dots@example.net>")[0] == 501
        client.mail("")
        assert client.docmd("RCPT", 'TO:<"a b"@example.co.jp>')[0] == 501
        assert client.docmd("RCPT", "TO:<Suga@Example.CO.JP>")[0] == 250  # case-insensitive
    rcpts = events(layout.root, "rcpt")
    assert [e["code"] for e in rcpts] == [501, 250]


def test_every_session_is_logged_once(rental: RentalSmtpServer, layout: LabLayout) -> None:
    for _ in range(3):
        with connect(rental, submission=True) as client:
            client.starttls()  # the TLS layer and the TCP layer both report the close
            client.ehlo()
    sessions = events(layout.root, "session")
    assert len(sessions) == 3
    assert len({s["session"] for s in sessions}) == 3


def test_given_certificate_is_used_and_verifies(tmp_path: Path, layout: LabLayout) -> None:
    cert_pem, key_pem = _self_signed(RENTAL_HOST)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    server = RentalSmtpServer(layout.root, RENTAL_HOST, 0, 0, tls_cert=cert, tls_key=key)
    with server, connect(server, submission=True) as client:
        # Full verification against the given certificate, host name included (IP SAN).
        client.starttls(context=ssl.create_default_context(cafile=str(cert)))
        client.ehlo()
        assert client.has_extn("auth")


def test_read_log_of_an_empty_lab(tmp_path: Path) -> None:
    assert read_log(tmp_path) == []


def test_stop_is_idempotent_and_frees_the_ports(layout: LabLayout) -> None:
    server = RentalSmtpServer(layout.root, RENTAL_HOST, 0, 0, tls_cert=None, tls_key=None)
    server.start()
    port = server.relay_port
    server.stop()
    server.stop()
    again = RentalSmtpServer(layout.root, RENTAL_HOST, port, 0, tls_cert=None, tls_key=None)
    with again:
        assert again.relay_port == port


def test_a_port_in_use_fails_start(rental: RentalSmtpServer, layout: LabLayout) -> None:
    clash = RentalSmtpServer(
        layout.root, RENTAL_HOST, rental.relay_port, 0, tls_cert=None, tls_key=None
    )
    with pytest.raises(OSError):
        clash.start()
    clash.stop()  # nothing left running; harmless


def test_main_serves_until_sigterm(layout: LabLayout) -> None:
    repo = Path(reconciler.__file__).resolve().parent.parent
    path = os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    args = [
        sys.executable, "-m", "reconciler.lab.rental_smtp", "--lab", str(layout.root),
        "--host", RENTAL_HOST, "--relay-port", "0", "--submission-port", "0",
    ]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        try:
            assert proc.stdout is not None
            addresses = json.loads(proc.stdout.readline())
            host, _, port = addresses["rental_smtp"].rpartition(":")
            assert host == RENTAL_HOST
            with smtplib.SMTP(host, int(port), local_hostname="client.test", timeout=10) as c:
                c.ehlo()
                c.mail("")
                assert c.rcpt(f"suga@{DOMAIN}")[0] == 250
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert addresses["rental_submission"].startswith(f"{RENTAL_HOST}:")


# --- aliases, extensions, case ------------------------------------------------------------


def test_an_alias_delivers_to_each_member(rental: RentalSmtpServer, layout: LabLayout) -> None:
    provider = LabProvider(rental_config("lab"), ProviderContext(DOMAIN, lab_dir=layout.root))
    provider.create_alias("info", (f"suga@{DOMAIN}", f"tanaka@{DOMAIN}", EXTERNAL))
    # From a host that may not relay: the alias is the rental's own, its forwarding too.
    with connect(rental, source=OUTSIDER) as client:
        client.mail("a@example.net")
        code, _ = client.rcpt(f"info@{DOMAIN}")
        assert code == 250
        client.rset()
        refused = client.sendmail("a@example.net", [f"info@{DOMAIN}"], MESSAGE)
    assert refused == {}
    for user in ("suga", "tanaka"):
        [path] = maildir_files(layout, user)
        text = path.read_text()
        assert text.startswith(
            f"Return-Path: <a@example.net>\nDelivered-To: {user}@{DOMAIN}\n"
            f"X-Original-To: info@{DOMAIN}\n"
        )
        assert "Subject: hello\n\nline one\n" in text
    [spooled] = outgoing_files(layout)  # the external member: forwarded
    assert f"X-Mailrec-Envelope-To: {EXTERNAL}\n" in spooled.read_text()
    [message] = events(layout.root, "message")
    assert message["rcpt"] == [f"info@{DOMAIN}"]
    assert message["delivered"] == [f"suga@{DOMAIN}", f"tanaka@{DOMAIN}"]
    assert message["relayed"] == [EXTERNAL]
    assert message["bounced"] == []


def test_aliases_of_aliases_loops_and_duplicates(
    rental: RentalSmtpServer, layout: LabLayout
) -> None:
    layout.rental_aliases.write_text(
        f"info@{DOMAIN}: sales@{DOMAIN}, suga@{DOMAIN}\n"
        f"sales@{DOMAIN}: info@{DOMAIN}, SUGA@{DOMAIN}, tanaka@{DOMAIN}, gone@{DOMAIN}\n"
    )
    with connect(rental) as client:
        # suga is reached four ways (directly, info, sales, +tag) and gets one copy.
        refused = client.sendmail(
            "", [f"info@{DOMAIN}", f"suga@{DOMAIN}", f"suga+x@{DOMAIN}"], MESSAGE
        )
    assert refused == {}
    assert len(maildir_files(layout, "suga")) == 1
    assert len(maildir_files(layout, "tanaka")) == 1
    assert outgoing_files(layout) == []
    [message] = events(layout.root, "message")
    assert message["delivered"] == [f"suga@{DOMAIN}", f"tanaka@{DOMAIN}"]  # RCPT order
    assert message["bounced"] == [f"gone@{DOMAIN}"]  # a member that exists nowhere


@pytest.mark.parametrize(
    "rcpt", [f"suga+news@{DOMAIN}", f"SUGA@{DOMAIN}", "Suga+News@Example.Co.JP", f"suga+@{DOMAIN}"]
)
def test_extensions_and_case_reach_the_mailbox(
    rental: RentalSmtpServer, layout: LabLayout, rcpt: str
) -> None:
    with connect(rental) as client:
        client.mail("a@example.net")
        assert client.rcpt(rcpt)[0] == 250
        client.rset()
        assert client.sendmail("a@example.net", [rcpt], MESSAGE) == {}
    [path] = maildir_files(layout, "suga")
    text = path.read_text()
    if rcpt.lower() == f"suga@{DOMAIN}":  # only the case differed: no X-Original-To
        assert f"Delivered-To: suga@{DOMAIN}\nReceived: " in text
    else:
        assert f"Delivered-To: suga@{DOMAIN}\nX-Original-To: {rcpt.lower()}\n" in text
    assert not (layout.rental_maildirs / "suga+news").exists()
    assert maildir_files(layout, "tanaka") == []


@pytest.mark.parametrize(
    "rcpt",
    [f"nobody@{DOMAIN}", f"nobody+suga@{DOMAIN}", f"+suga@{DOMAIN}", f"NOBODY@{DOMAIN}",
     f"sugar@{DOMAIN}", f"info@{DOMAIN}"],
)
def test_unknown_addresses_stay_550(rental: RentalSmtpServer, rcpt: str) -> None:
    with connect(rental, source=WHITELISTED) as client:  # whitelisting makes no user exist
        client.mail("a@example.net")
        code, text = client.rcpt(rcpt)
    assert code == 550
    assert b"User unknown" in text
