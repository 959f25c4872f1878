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
from collections.abc import Iterable, Mapping
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

    def create(self, count: int = 1, *, uid: int | None = None) -> list[str]:
        """`count` new accounts with homes; `uid` gives the (one) account that uid."""
        useradd = require_binary("useradd")
        made = []
        for _ in range(count):
            name = f"{self.prefix}{len(self.names):02d}"
            extra = ["-u", str(uid)] if uid is not None else []
            proc = subprocess.run(
                [useradd, "-m", "-s", "/usr/sbin/nologin", *extra, name],
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

    # --- the admin's configuration (tests/integration/test_onprem_addresses.py) ------------
    def configure(self, settings: Mapping[str, str]) -> None:
        """`postconf -e` the settings, then `postfix reload`."""
        self.postfix.run("postconf", "-e", *(f"{k}={v}" for k, v in settings.items()))
        self.postfix.run("postfix", "reload")

    def write_aliases(self, text: str, name: str = "aliases") -> str:
        """An aliases(5) table in the config directory, compiled by postalias; its ref."""
        (self.config_dir / name).write_text(text)
        ref = f"hash:{self.config_dir / name}"
        self.postfix.run("postalias", ref)
        return ref

    def write_virtual(self, text: str, name: str = "virtual") -> str:
        """A virtual(5) table in the config directory, compiled by postmap; its ref."""
        (self.config_dir / name).write_text(text)
        ref = f"hash:{self.config_dir / name}"
        self.postfix.run("postmap", ref)
        return ref

    def queue_empty(self) -> bool:
        out = self.postfix.run("postqueue", "-p").stdout
        return "Mail queue is empty" in out

    def wait_for_empty_queue(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queue_empty():
                return
            time.sleep(0.2)
        raise AssertionError(f"the onprem queue is not empty:\n"
                             f"{self.postfix.run('postqueue', '-p').stdout}")

    def log_mark(self) -> int:
        """Where the mail log ends now: `log_since(mark)` reads what comes after."""
        return self.postfix.maillog.stat().st_size if self.postfix.maillog.exists() else 0

    def log_since(self, mark: int) -> str:
        with self.postfix.maillog.open("rb") as log:
            log.seek(mark)
            return log.read().decode("utf-8", "replace")

    def stop(self) -> None:
        self.rental.stop()


def start_onprem_stack(
    stack: ServiceStack, base: Path, *, main_cf: Mapping[str, str] | None = None
) -> OnpremStack:
    """sshd + Postfix on 127.0.0.2, the lab rental SMTP server on 127.0.0.3 (free ports);
    `main_cf` adds or overrides main.cf settings."""
    require_root()
    for tool in ("postconf", "postmap", "postalias", "postqueue", "useradd", "userdel", "getent",
                 "find", "uniq"):
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
                **(main_cf or {}),
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
    return send_to(ONPREM_ADDRESS, stack.postfix.smtp_port, rcpt, token)


def send_to(host: str, port: int, rcpt: str, token: str) -> tuple[int, bytes]:
    """One message to the SMTP server at host:port (onprem, or the rental once the MX names
    it); returns the RCPT reply (DATA only after a 250)."""
    with smtplib.SMTP(host, port, timeout=15) as smtp:
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
