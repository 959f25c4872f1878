"""The onprem host of the integration tests: a real Postfix and sshd on 127.0.0.2, local Unix
users to receive mail, and the lab rental SMTP server on 127.0.0.3 to forward mail to.

Used by tests/integration/test_onprem_postfix.py (the driver) and tests/test_backend_real.py
(the CLI end to end). Everything runs on free ports, so it never meets the fixed ports of the
rental VPS on 127.0.0.8. Users are created with `useradd -m` under per-run names (`mr<hex>..`)
and removed with `userdel -r` when the stack stops; `start_onprem_stack` raises
`ServiceUnavailable` (turned into a failure under CI=true, a skip elsewhere) when a piece is
missing.
"""

from __future__ import annotations

import pwd
import secrets
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.lab.layout import LabLayout
from reconciler.lab.rental_smtp import RentalSmtpServer
from reconciler.model import Connect, Onprem
from reconciler.transport import Transport, open_transport

from .services import (
    Postfix,
    ServiceStack,
    ServiceUnavailable,
    Sshd,
    ensure_loopback_address,
    require_binary,
    require_root,
    start_postfix,
    start_sshd,
)

ONPREM_ADDRESS = "127.0.0.2"
RENTAL_ADDRESS = "127.0.0.3"
DOMAIN = "example.co.jp"
MYHOSTNAME = "mail.example.co.jp"


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


@dataclass
class UnixUsers:
    """Local accounts made for one test run; `stop()` removes them with their homes."""

    prefix: str = field(default_factory=lambda: "mr" + secrets.token_hex(3))
    names: list[str] = field(default_factory=list)

    def create(self, count: int = 1) -> list[str]:
        useradd = require_binary("useradd")
        made = []
        for _ in range(count):
            name = f"{self.prefix}{len(self.names):02d}"
            proc = subprocess.run(
                [useradd, "-m", "-s", "/usr/sbin/nologin", name],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                raise AssertionError(f"useradd {name}: {proc.stderr.strip()}")
            self.names.append(name)
            made.append(name)
        return made

    def unused(self, tag: str) -> str:
        """A name in this run's namespace that has no account (and never gets one)."""
        return f"{self.prefix}{tag}"

    def stop(self) -> None:
        userdel = require_binary("userdel")
        while self.names:
            # -r removes the home (archived Maildirs included); a mail spool may be absent.
            subprocess.run([userdel, "-r", self.names.pop()], capture_output=True, check=False)


@dataclass
class OnpremStack:
    sshd: Sshd
    postfix: Postfix
    rental: RentalSmtpServer
    rental_lab: LabLayout
    users: UnixUsers

    @property
    def config_dir(self) -> Path:
        return self.postfix.config_dir

    def onprem(self, *, mailbox: str = "maildir:~/Maildir") -> Onprem:
        return Onprem(
            connect=Connect.parse(self.sshd.connect("root")),
            config_dir=str(self.config_dir),
            mx_host=f"{MYHOSTNAME}.",
            public_ip="198.51.100.10",
            mailbox=mailbox,
            log_file=str(self.postfix.maillog),
        )

    def ssh(self) -> Transport:
        return open_transport(
            Connect.parse(self.sshd.connect("root")),
            known_hosts=self.sshd.known_hosts,
            key_filename=str(self.sshd.client_key),
        )

    def add_rental_mailbox(self, *users: str) -> None:
        path = self.rental_lab.rental_mailboxes
        lines = path.read_text() if path.exists() else ""
        path.write_text(lines + "".join(f"{u}@{DOMAIN}\n" for u in users))

    def rental_maildir(self, user: str) -> Path:
        return self.rental_lab.rental_maildirs / user / "new"

    def stop(self) -> None:
        self.rental.stop()


def start_onprem_stack(stack: ServiceStack, base: Path) -> OnpremStack:
    """sshd + Postfix on 127.0.0.2, the lab rental SMTP server on 127.0.0.3 (free ports)."""
    require_root()
    for tool in ("postconf", "postmap", "useradd", "userdel", "getent", "find", "uniq"):
        require_binary(tool)
    ensure_loopback_address(ONPREM_ADDRESS)
    ensure_loopback_address(RENTAL_ADDRESS)
    sshd = stack.add(
        start_sshd(base / "sshd", address=ONPREM_ADDRESS, port=free_port(ONPREM_ADDRESS))
    )
    postfix = stack.add(
        start_postfix(
            base / "postfix",
            address=ONPREM_ADDRESS,
            smtp_port=free_port(ONPREM_ADDRESS),
            myhostname=MYHOSTNAME,
            main_cf={
                "mydestination": DOMAIN,
                "home_mailbox": "Maildir/",
                # A deferred message is retried within seconds, not minutes.
                "queue_run_delay": "1s",
                "minimal_backoff_time": "1s",
                "maximal_backoff_time": "2s",
            },
        )
    )
    rental_lab = LabLayout(base / "rental-lab")
    rental_lab.rental.mkdir(parents=True)
    rental_lab.rental_domains.write_text(f"{DOMAIN}\n")
    rental_lab.rental_mailboxes.write_text("")
    rental_lab.rental_whitelist.write_text("")
    server = RentalSmtpServer(rental_lab.root, RENTAL_ADDRESS, 0, 0, tls_cert=None, tls_key=None)
    try:
        server.start()
    except OSError as exc:
        raise ServiceUnavailable(f"lab rental SMTP on {RENTAL_ADDRESS}: {exc}") from exc
    users = stack.add(UnixUsers())
    return stack.add(OnpremStack(sshd, postfix, server, rental_lab, users))


# --- mail ---------------------------------------------------------------------------------------


def send(stack: OnpremStack, rcpt: str, token: str) -> tuple[int, bytes]:
    """One message to onprem's smtpd; returns the RCPT reply (DATA only after a 250)."""
    with smtplib.SMTP(ONPREM_ADDRESS, stack.postfix.smtp_port, timeout=15) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("sender@example.net")
        code, text = smtp.rcpt(rcpt)
        if code == 250:
            message = f"Subject: {token}\r\nTo: <{rcpt}>\r\n\r\n{token}\r\n"
            smtp.data(message.encode())
        else:
            smtp.rset()
        return code, text


def wait_for(directories: Iterable[Path], token: str, timeout: float = 20) -> Path:
    """The message file carrying `token` in one of `directories`, once it arrives."""
    where = list(directories)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for directory in where:
            if directory.is_dir():
                for path in directory.iterdir():
                    if token.encode() in path.read_bytes():
                        return path
        time.sleep(0.1)
    raise AssertionError(f"no message with {token} in {', '.join(map(str, where))}")


def local_maildir(user: str) -> Path:
    return Path(pwd.getpwnam(user).pw_dir) / "Maildir" / "new"
