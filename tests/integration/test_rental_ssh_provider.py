"""The `ssh` rental provider against a real VPS on 127.0.0.8: sshd, Postfix, Dovecot.

Each test uses its own user names, so the session-wide VPS can be shared; tests that change
shared state (the whitelist, the mailbox map) put it back.
"""

from __future__ import annotations

import imaplib
import ipaddress
import logging
import smtplib
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from email.message import EmailMessage
from pathlib import Path

import pytest

from reconciler.drivers.rental.base import Capability, ProviderContext, ProviderError
from reconciler.drivers.rental.registry import load_provider
from reconciler.drivers.rental.ssh import SshProvider, verify_sha512_crypt
from reconciler.transport import CommandResult, Transport, TransportError

from .conftest import (
    DOMAIN,
    RENTAL_ADDRESS,
    RENTAL_IMAP_PORT,
    RENTAL_SMTP_PORT,
    VMAIL_GID,
    VMAIL_UID,
    RentalVps,
    rental_config,
)

pytestmark = pytest.mark.integration

OUTSIDER = "127.0.0.9"  # a loopback address not in the VPS's base mynetworks


def send(user: str, subject: str, *, source: str | None = None) -> None:
    message = EmailMessage()
    message["From"] = "sender@example.net"
    message["To"] = f"{user}@{DOMAIN}"
    message["Subject"] = subject
    message.set_content(f"body of {subject}\n")
    source_address = (source, 0) if source else None
    with smtplib.SMTP(
        RENTAL_ADDRESS, RENTAL_SMTP_PORT, timeout=10, source_address=source_address
    ) as smtp:
        smtp.send_message(message)


def wait_for_messages(maildir: Path, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list((maildir / "new").glob("*"))) + len(list((maildir / "cur").glob("*"))) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{maildir}: {count} message(s) not delivered within {timeout}s")


def relay_reply(source: str) -> int:
    """SMTP code for RCPT to a foreign domain from `source` (250: relaying allowed)."""
    with smtplib.SMTP(
        RENTAL_ADDRESS, RENTAL_SMTP_PORT, timeout=10, source_address=(source, 0)
    ) as smtp:
        smtp.ehlo("office.example.co.jp")
        smtp.mail("suga@example.co.jp")
        code, _ = smtp.rcpt("someone@elsewhere.example.net")
        smtp.rset()  # never queue anything
        return code


def postconf(vps: RentalVps, name: str) -> str:
    return subprocess.run(
        ["postconf", "-c", str(vps.postfix.config_dir), "-h", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def restore_vmailbox(rental_vps: RentalVps) -> Iterator[None]:
    saved = rental_vps.vmailbox.read_bytes()
    yield
    rental_vps.vmailbox.write_bytes(saved)
    subprocess.run(
        ["postmap", "-c", str(rental_vps.postfix.config_dir), f"hash:{rental_vps.vmailbox}"],
        check=True,
    )


def fail_command(
    monkeypatch: pytest.MonkeyPatch, transport: Transport, match: Sequence[str]
) -> list[tuple[str, ...]]:
    """Make commands starting with `match` fail on this transport; returns those refused."""
    real_run = transport.run
    refused: list[tuple[str, ...]] = []

    def run(argv: Sequence[str], **kwargs: object) -> CommandResult:
        args = tuple(argv)
        if args[: len(match)] == tuple(match) and args[-1] in ("check", "reload"):
            refused.append(args)
            result = CommandResult(args, 1, b"", b"postfix: fatal: injected failure\n")
            if kwargs.get("check", True):
                raise TransportError(
                    f"{transport.host}: injected failure", host=transport.host, result=result
                )
            return result
        return real_run(argv, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(transport, "run", run)
    return refused


def record_argv(monkeypatch: pytest.MonkeyPatch, transport: Transport) -> list[tuple[str, ...]]:
    """Every argv this transport runs from now on, unmasked (as `ps` on the VPS shows it)."""
    real_run = transport.run
    seen: list[tuple[str, ...]] = []

    def run(argv: Sequence[str], **kwargs: object) -> CommandResult:
        seen.append(tuple(argv))
        return real_run(argv, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(transport, "run", run)
    return seen


# --- construction ------------------------------------------------------------------------


def test_registry_builds_it_with_full_capabilities(rental_vps: RentalVps) -> None:
    provider = load_provider(rental_config(rental_vps.options()), ProviderContext(domain=DOMAIN))
    assert isinstance(provider, SshProvider)
    assert provider.capabilities == frozenset(Capability)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "connect is required"),
        ({"connect": "ssh://root@vps.example.net:22", "colour": "blue"}, "unknown option"),
        ({"connect": "ssh://root@vps.example.net:22", "postfix_dir": "etc/postfix"}, "absolute"),
        ({"connect": "ssh://root@vps.example.net:22", "mail_root": "/var/mail/../x"}, "normalised"),
        ({"connect": "ssh://root@vps.example.net:22", "password": "hunter2"}, "env:NAME"),
        ({"connect": "ssh://root@vps.example.net:22", "mail_owner": "vmail"}, "UID:GID"),
        ({"connect": "telnet://vps"}, "not a connection"),
    ],
)
def test_bad_options_are_refused_before_connecting(options: dict[str, str], message: str) -> None:
    with pytest.raises(ProviderError, match=message):
        SshProvider(rental_config(options), ProviderContext(domain=DOMAIN))


def test_user_names_are_validated(ssh_provider: SshProvider) -> None:
    for bad in ("a b; rm -rf /", "../root", "Suga", "-rf", "x@y"):
        with pytest.raises(ProviderError, match="not a valid user name"):
            ssh_provider.create_mailbox(bad)


# --- observe -----------------------------------------------------------------------------


def test_observe_reads_the_vps(ssh_provider: SshProvider) -> None:
    snapshot = ssh_provider.observe()
    assert snapshot.domain_accepted
    assert snapshot.notes == ()


def test_observe_costs_the_same_commands_for_1_or_40_mailboxes(
    ssh_provider: SshProvider, rental_vps: RentalVps, restore_vmailbox: None
) -> None:
    ssh_provider.create_mailbox("count0")
    transport = ssh_provider.transport
    before = transport.round_trips
    small = ssh_provider.observe()
    cost_small = transport.round_trips - before
    assert small.mailboxes["count0"] == 0

    # Forty more mailboxes, with messages, written straight into the VPS files.
    lines = []
    for i in range(1, 41):
        user = f"count{i}"
        lines.append(f"{user}@{DOMAIN}\t{DOMAIN}/{user}/\n")
        maildir = rental_vps.mail_root / DOMAIN / user
        for sub in ("new", "cur", "tmp"):
            (maildir / sub).mkdir(parents=True)
        for n in range(i % 4):
            (maildir / ("new" if n % 2 else "cur") / f"{n}.msg").write_text("x")
        (maildir / "tmp" / "partial").write_text("being delivered")  # not a message yet
        if i == 1:  # a Maildir++ subfolder counts too
            (maildir / ".Sent" / "cur").mkdir(parents=True)
            (maildir / ".Sent" / "cur" / "s.msg").write_text("x")
    with rental_vps.vmailbox.open("a") as handle:
        handle.writelines(lines)

    before = transport.round_trips
    big = ssh_provider.observe()
    cost_big = transport.round_trips - before
    assert cost_big == cost_small <= 6
    assert len([u for u in big.mailboxes if u.startswith("count")]) == 41
    assert big.mailboxes["count1"] == 1 + 1
    assert all(big.mailboxes[f"count{i}"] == i % 4 for i in range(2, 41))


# --- mailboxes ---------------------------------------------------------------------------


def test_create_deliver_read_and_refuse_delete(
    ssh_provider: SshProvider,
    rental_vps: RentalVps,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    argvs = record_argv(monkeypatch, ssh_provider.transport)
    with caplog.at_level(logging.DEBUG):
        ssh_provider.create_mailbox("suga")

    # Postfix: the map and its compiled db know the mailbox; the previous map is kept.
    assert f"suga@{DOMAIN}\t{DOMAIN}/suga/" in rental_vps.vmailbox.read_text()
    assert Path(f"{rental_vps.vmailbox}.bak").exists()
    # The Maildir belongs to the virtual mail user.
    maildir = rental_vps.mail_root / DOMAIN / "suga"
    for sub in ("", "new", "cur", "tmp"):
        info = (maildir / sub).stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (
            VMAIL_UID,
            VMAIL_GID,
            0o700,
        )
    # Dovecot: a hashed login, and the initial password only in a root-only file.
    secret_file = Path(ssh_provider.initial_password_files["suga"])
    assert secret_file.parent == rental_vps.password_dir
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700
    password = secret_file.read_text().strip()
    assert len(password) >= 20
    passwd_line = next(
        line for line in rental_vps.passwd.read_text().splitlines() if line.startswith("suga@")
    )
    assert "{SHA512-CRYPT}$6$" in passwd_line and password not in passwd_line
    # Neither the password nor its hash in any command line (`ps`) or log line.
    hashed = passwd_line.split(":")[1]
    assert verify_sha512_crypt(password, hashed)
    ran = " ".join(" ".join(argv) for argv in argvs)
    assert any(argv[:1] == ("doveadm",) for argv in argvs)
    for secret in (password, hashed, hashed.rsplit("$", 1)[1]):
        assert secret not in ran
        assert secret not in " ".join(" ".join(a) for a in ssh_provider.transport.history)
        assert secret not in caplog.text

    snapshot = ssh_provider.observe()
    assert snapshot.mailboxes["suga"] == 0

    # Creating again changes nothing (resuming a half-done apply must not reset the password).
    ssh_provider.create_mailbox("suga")
    assert secret_file.read_text().strip() == password
    assert rental_vps.vmailbox.read_text().count(f"suga@{DOMAIN}") == 1

    # Real mail: SMTP in, IMAP out with the generated password.
    send("suga", "first message")
    wait_for_messages(maildir, 1)
    assert ssh_provider.observe().mailboxes["suga"] == 1
    with imaplib.IMAP4(RENTAL_ADDRESS, RENTAL_IMAP_PORT, timeout=10) as imap:
        imap.login(f"suga@{DOMAIN}", password)
        status, data = imap.select("INBOX")
        assert status == "OK" and data[0] == b"1"
        status, fetched = imap.fetch("1", "(BODY[HEADER.FIELDS (SUBJECT)])")
        assert status == "OK"
        part = fetched[0]
        assert isinstance(part, tuple) and b"first message" in part[1]
        imap.logout()
    with (
        imaplib.IMAP4(RENTAL_ADDRESS, RENTAL_IMAP_PORT, timeout=10) as imap,
        pytest.raises(imaplib.IMAP4.error),
    ):
        imap.login(f"suga@{DOMAIN}", "not-the-password")

    # MR008: never delete a mailbox that holds mail.
    with pytest.raises(ProviderError, match="MR008") as err:
        ssh_provider.delete_mailbox("suga")
    assert "1 messages" in str(err.value)
    assert f"suga@{DOMAIN}" in rental_vps.vmailbox.read_text()
    assert ssh_provider.observe().mailboxes["suga"] == 1


def test_delete_an_empty_mailbox(ssh_provider: SshProvider, rental_vps: RentalVps) -> None:
    ssh_provider.create_mailbox("tanaka")
    assert "tanaka" in ssh_provider.observe().mailboxes
    ssh_provider.delete_mailbox("tanaka")
    assert "tanaka" not in ssh_provider.observe().mailboxes
    assert f"tanaka@{DOMAIN}" not in rental_vps.passwd.read_text()
    assert not (rental_vps.password_dir / f"tanaka@{DOMAIN}").exists()
    assert not (rental_vps.mail_root / DOMAIN / "tanaka").exists()
    assert list((rental_vps.mail_root / DOMAIN).glob("tanaka.removed-*"))  # kept aside
    # Postfix now rejects mail for it.
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send("tanaka", "too late")
    ssh_provider.delete_mailbox("tanaka")  # already gone: nothing to do


def test_failed_check_restores_the_map(
    ssh_provider: SshProvider, rental_vps: RentalVps, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = rental_vps.vmailbox.read_text()
    refused = fail_command(monkeypatch, ssh_provider.transport, ["postfix"])
    with pytest.raises(ProviderError, match="restored the previous"):
        ssh_provider.create_mailbox("sato")
    assert refused
    assert rental_vps.vmailbox.read_text() == before
    lookup = subprocess.run(
        [
            "postmap",
            "-c",
            str(rental_vps.postfix.config_dir),
            "-q",
            f"sato@{DOMAIN}",
            f"hash:{rental_vps.vmailbox}",
        ],
        capture_output=True,
        check=False,
    )
    assert lookup.returncode == 1  # the compiled map was rebuilt from the restored source
    monkeypatch.undo()
    ssh_provider.create_mailbox("sato")  # the next run completes it
    assert "sato" in ssh_provider.observe().mailboxes


# --- whitelist ---------------------------------------------------------------------------


def test_whitelist_change_reaches_postfix(ssh_provider: SshProvider, rental_vps: RentalVps) -> None:
    office = ipaddress.ip_network(f"{OUTSIDER}/32")
    v6 = ipaddress.ip_network("2001:db8:1::/48")
    extra = ipaddress.ip_network("203.0.113.8/29")
    assert relay_reply(OUTSIDER) != 250

    ssh_provider.set_whitelist(frozenset({office, v6, extra}), frozenset())
    assert ssh_provider.observe().whitelist == {office, v6, extra}
    assert str(rental_vps.mynetworks) in postconf(rental_vps, "mynetworks").split()
    content = rental_vps.mynetworks.read_text()
    assert "[2001:db8:1::]/48" in content and "203.0.113.8/29" in content
    assert relay_reply(OUTSIDER) == 250  # Postfix reloaded and now relays for the office

    ssh_provider.set_whitelist(frozenset(), frozenset({office, v6}))
    assert ssh_provider.observe().whitelist == {extra}
    assert relay_reply(OUTSIDER) != 250

    ssh_provider.set_whitelist(frozenset(), frozenset({extra}))
    assert ssh_provider.observe().whitelist == frozenset()


def test_whitelist_refuses_open_relay(ssh_provider: SshProvider) -> None:
    with pytest.raises(ProviderError, match="refusing"):
        ssh_provider.set_whitelist(frozenset({ipaddress.ip_network("0.0.0.0/0")}), frozenset())


def test_failed_reload_restores_the_whitelist(
    ssh_provider: SshProvider, rental_vps: RentalVps, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = rental_vps.mynetworks.read_bytes()
    fail_command(monkeypatch, ssh_provider.transport, ["postfix"])
    with pytest.raises(ProviderError, match="restored the previous"):
        ssh_provider.set_whitelist(
            frozenset({ipaddress.ip_network("198.51.100.0/24")}), frozenset()
        )
    assert rental_vps.mynetworks.read_bytes() == before
    assert ipaddress.ip_network("198.51.100.0/24") not in ssh_provider.observe().whitelist


# --- aliases -----------------------------------------------------------------------------


@pytest.fixture
def restore_aliases(rental_vps: RentalVps) -> Iterator[None]:
    saved = rental_vps.virtual_aliases.read_bytes()
    yield
    rental_vps.virtual_aliases.write_bytes(saved)
    subprocess.run(
        ["postmap", "-c", str(rental_vps.postfix.config_dir), f"hash:{rental_vps.virtual_aliases}"],
        check=True,
    )
    subprocess.run(["postfix", "-c", str(rental_vps.postfix.config_dir), "reload"], check=True)


def test_alias_delivers_real_mail_to_its_members(
    ssh_provider: SshProvider, rental_vps: RentalVps, restore_aliases: None
) -> None:
    assert ssh_provider.supports(Capability.CREATE_ALIAS)
    for user in ("aliasa", "aliasb"):
        ssh_provider.create_mailbox(user)
    # Unknown before: Postfix refuses the RCPT.
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send("team", "too early")

    ssh_provider.create_alias("team", (f"aliasb@{DOMAIN}", f"aliasa@{DOMAIN}"))
    assert f"team@{DOMAIN}\taliasa@{DOMAIN}, aliasb@{DOMAIN}" in (
        rental_vps.virtual_aliases.read_text()
    )
    assert Path(f"{rental_vps.virtual_aliases}.bak").exists()
    snapshot = ssh_provider.observe()
    assert snapshot.aliases["team"] == (f"aliasa@{DOMAIN}", f"aliasb@{DOMAIN}")
    assert snapshot.notes == ()

    send("team", "to the whole team")
    for user in ("aliasa", "aliasb"):
        maildir = rental_vps.mail_root / DOMAIN / user
        wait_for_messages(maildir, 1)
        [path] = list((maildir / "new").glob("*")) + list((maildir / "cur").glob("*"))
        text = path.read_text()
        assert "Subject: to the whole team" in text
        assert f"X-Original-To: team@{DOMAIN}" in text  # it came through the alias
    # recipient_delimiter = +: an extension reaches the same mailbox (and the alias).
    send("aliasa+news", "with an extension")
    send("team+all", "alias with an extension")
    wait_for_messages(rental_vps.mail_root / DOMAIN / "aliasa", 3)
    wait_for_messages(rental_vps.mail_root / DOMAIN / "aliasb", 2)


def test_alias_over_a_mailbox_is_refused(
    ssh_provider: SshProvider, rental_vps: RentalVps, restore_aliases: None
) -> None:
    ssh_provider.create_mailbox("aliasc")
    before = rental_vps.virtual_aliases.read_text()
    with pytest.raises(ProviderError, match="a mailbox of that name exists"):
        ssh_provider.create_alias("aliasc", (f"suga@{DOMAIN}",))
    assert rental_vps.virtual_aliases.read_text() == before
    assert "aliasc" not in ssh_provider.observe().aliases


def test_failed_reload_restores_the_alias_map(
    ssh_provider: SshProvider,
    rental_vps: RentalVps,
    monkeypatch: pytest.MonkeyPatch,
    restore_aliases: None,
) -> None:
    before = rental_vps.virtual_aliases.read_text()
    fail_command(monkeypatch, ssh_provider.transport, ["postfix"])
    with pytest.raises(ProviderError, match="restored the previous"):
        ssh_provider.create_alias("broken", (f"suga@{DOMAIN}",))
    assert rental_vps.virtual_aliases.read_text() == before
    lookup = subprocess.run(
        ["postmap", "-c", str(rental_vps.postfix.config_dir), "-q", f"broken@{DOMAIN}",
         f"hash:{rental_vps.virtual_aliases}"],
        capture_output=True,
        check=False,
    )
    assert lookup.returncode == 1  # the compiled map was rebuilt from the restored source
