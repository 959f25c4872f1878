"""The lab rental's SMTP server: an aiosmtpd stand-in for a hosted mail service.

Where it sits: one of the lab's network services (`mailrec lab up` starts it; its address
goes to services.json as `rental_smtp`). The onprem Postfix forwards migrated users' mail to
its relay port, the `manual` provider probes it with RCPT, and tests send mail through it.

It answers like a hosted Postfix would (virtual mailboxes and virtual aliases, with
`recipient_delimiter = +`):
- relay port: RCPT for a hosted domain is 250 if an alias or a mailbox has that name, else
  550 5.1.1 (user unknown); RCPT for any other domain is relayed only for a whitelisted peer or
  after AUTH, else 554 5.7.1 (relay access denied). STARTTLS is offered; AUTH only after it.
- hosted addresses are looked up as Postfix does: case-insensitively, the whole local part
  first, then without its `+extension` (`suga+news@` reaches suga), aliases before mailboxes.
- submission port: STARTTLS, then AUTH PLAIN/LOGIN against rental/passwd; nothing but
  EHLO/STARTTLS/AUTH before that; authenticated users may relay anywhere.
Mail for hosted mailboxes is delivered into rental/maildirs/<local>/new (Maildir, written in
tmp/ and renamed); mail for other domains is "relayed" into rental/outgoing/, since nothing
leaves the machine. An alias is expanded at delivery (aliases of aliases too, loops cut): each
member that is a mailbox here gets the message once, a member at another domain is forwarded,
i.e. joins the envelope of the rental/outgoing/ spool file, as a hosted service forwards it
without asking for a whitelist or AUTH (the alias is the rental's own). A member at a hosted
domain that is neither a mailbox nor an alias is logged as `bounced` (Postfix would bounce it
after accepting the RCPT). Domains, mailboxes, aliases, whitelist and passwords are re-read on
every transaction, with the lab provider's own parsers, so the files and the SMTP behaviour
agree.
Every transaction, RCPT and AUTH is one JSON line in rental/smtp.log (`read_log`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hmac
import ipaddress
import itertools
import json
import logging
import os
import re
import secrets
import signal
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from reconciler.drivers.rental.base import IpAddress, IpNetwork, ProviderError
from reconciler.drivers.rental.lab import (
    Address,
    parse_address,
    read_aliases,
    read_domains,
    read_mailboxes,
    read_passwd,
    read_whitelist,
)
from reconciler.lab.layout import LabLayout
from reconciler.lab.office import OFFICE_ADDRESS, office_seen_as

OUTGOING_DIR = "outgoing"  # under rental/: the spool of "relayed" (external) messages
SERVER_NAME = "smtp.rental.lab"
RELAY = "relay"
SUBMISSION = "submission"
RECIPIENT_DELIMITER = "+"  # as main.cf recipient_delimiter: user+tag@ reaches user@
# Addresses one recipient may expand to through aliases (Postfix's
# virtual_alias_expansion_limit is 1000); beyond it the rest is dropped, not looped over.
ALIAS_EXPANSION_LIMIT = 1000

# A conservative RFC 5321 dot-atom address: anything else never reaches a file or the log as
# an address. (Local parts at hosted domains are further held to USER_NAME_RE.)
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_EXTERNAL_RE = re.compile(
    rf"^{_ATOM}(?:\.{_ATOM})*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?\.)+"
    r"[A-Za-z0-9-]{2,63}$"
)

REPLY_OK_MAIL = "250 2.1.0 Ok"
REPLY_OK_RCPT = "250 2.1.5 Ok"
REPLY_AUTH_FAILED = "535 5.7.8 Error: authentication failed"
REPLY_CONFIG_ERROR = "451 4.3.5 Server configuration error"


def _user_unknown(address: str) -> str:
    return (
        f"550 5.1.1 <{address}>: Recipient address rejected: "
        "User unknown in virtual mailbox table"
    )


def _relay_denied(address: str) -> str:
    return f"554 5.7.1 <{address}>: Relay access denied"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def read_log(lab_dir: Path) -> list[dict[str, Any]]:
    """Every entry of the lab rental's SMTP log, oldest first.

    Each entry has `time`, `session` (one id per connection), `event` (`rcpt`, `message`,
    `auth` or `session`), `peer`, `port`, `service` (`relay`/`submission`), `auth_user`,
    `mail_from`, `rcpt` and `code`; `message` entries add `delivered` (mailbox addresses
    that got the message), `relayed` (addresses at other domains: the outgoing spool's
    envelope, alias members included) and `bounced` (alias members that exist nowhere).
    """
    path = LabLayout(lab_dir).rental_log
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line still being written when we read
    return entries


@dataclass(frozen=True)
class _Routes:
    """Where one accepted recipient's copy goes."""

    mailboxes: tuple[Address, ...] = ()  # delivered into these Maildirs
    external: tuple[str, ...] = ()  # forwarded/relayed: the outgoing spool
    bounced: tuple[str, ...] = ()  # alias members at a hosted domain that exist nowhere


@dataclass(frozen=True)
class _RentalView:
    """The lab rental's configuration as one transaction sees it."""

    domains: frozenset[str]
    mailboxes: frozenset[Address]
    whitelist: frozenset[IpNetwork]
    office: IpAddress | None = None  # what the lab office's traffic is seen as (NAT)
    aliases: Mapping[Address, tuple[str, ...]] = field(default_factory=dict)

    @staticmethod
    def load(layout: LabLayout) -> _RentalView:
        return _RentalView(
            read_domains(layout.rental_domains),
            read_mailboxes(layout.rental_mailboxes),
            read_whitelist(layout.rental_whitelist),
            office_seen_as(layout) if layout.router_config.exists() else None,
            read_aliases(layout.rental_aliases),
        )

    def hosted_target(self, address: str) -> Address | None:
        """The alias or mailbox `address` (at a hosted domain) reaches, None if neither.

        Postfix's lookup order with recipient_delimiter = +: the whole local part, then the
        part before the first '+'; case does not matter (the files hold lower case).
        """
        local, _, domain = address.lower().rpartition("@")
        candidates = [local]
        base, delimiter, _ = local.partition(RECIPIENT_DELIMITER)
        if delimiter and base:
            candidates.append(base)
        for candidate in candidates:
            found = parse_address(f"{candidate}@{domain}")
            if found is not None and (found in self.aliases or found in self.mailboxes):
                return found
        return None

    def routes(self, rcpt: str) -> _Routes:
        """Expand one envelope recipient: aliases (before mailboxes, as Postfix's
        virtual_alias_maps), aliases of aliases, each address once so that loops end."""
        mailboxes: list[Address] = []
        external: list[str] = []
        bounced: list[str] = []
        pending = [rcpt.lower()]
        seen: set[str] = set()
        while pending and len(seen) < ALIAS_EXPANSION_LIMIT:
            address = pending.pop(0)
            if address in seen:
                continue
            seen.add(address)
            if address.rpartition("@")[2] not in self.domains:
                external.append(address)
                continue
            target = self.hosted_target(address)
            if target is None:
                bounced.append(address)
            elif target in self.aliases:
                pending.extend(self.aliases[target])
            elif target not in mailboxes:
                mailboxes.append(target)
        return _Routes(tuple(mailboxes), tuple(external), tuple(bounced))

    def seen_as(self, peer_ip: str) -> IpAddress | None:
        """The client's address as the Internet sees it: the lab office leaves through the
        router's line (None: more than one line is possible, so no whitelist entry applies)."""
        if peer_ip == OFFICE_ADDRESS:
            return self.office
        try:
            return ipaddress.ip_address(peer_ip)
        except ValueError:
            return None

    def whitelisted(self, peer_ip: str) -> bool:
        address = self.seen_as(peer_ip)
        return address is not None and any(address in network for network in self.whitelist)


class _Store:
    """Writes what the server accepts: Maildir files, the outgoing spool and the log."""

    def __init__(self, layout: LabLayout) -> None:
        self.layout = layout
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._host = SERVER_NAME

    def unique_name(self) -> str:
        # Maildir's unique name: time, microseconds, pid and a per-process counter.
        now = time.time()
        with self._lock:
            number = next(self._counter)
        return f"{int(now)}.M{int(now % 1 * 1_000_000)}P{os.getpid()}Q{number}.{self._host}"

    def deliver(self, local: str, content: bytes) -> str:
        maildir = self.layout.rental_maildirs / local
        for sub in ("tmp", "new", "cur"):
            # Like Postfix virtual delivery: a listed mailbox gets its Maildir on first mail.
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        name = f"{self.unique_name()},S={len(content)}"
        self._write_then_rename(maildir / "tmp" / name, maildir / "new" / name, content)
        return name

    def spool(self, content: bytes) -> str:
        outgoing = self.layout.rental / OUTGOING_DIR
        (outgoing / "tmp").mkdir(parents=True, exist_ok=True)
        name = f"{self.unique_name()}.eml"
        self._write_then_rename(outgoing / "tmp" / name, outgoing / name, content)
        return name

    @staticmethod
    def _write_then_rename(tmp: Path, final: Path, content: bytes) -> None:
        # Readers (a POP/IMAP server, the lab provider counting messages) only ever see
        # complete files: the name appears in new/ by rename, after the data is on disk.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)

    def log(self, entry: dict[str, Any]) -> None:
        line = json.dumps({"time": _now(), **entry}, sort_keys=True) + "\n"
        self.layout.rental.mkdir(parents=True, exist_ok=True)
        # One write() on an O_APPEND descriptor: lines never interleave, even across processes.
        fd = os.open(self.layout.rental_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)


class _Connection(SMTP):
    """One client connection; carries what must survive STARTTLS (which renews `session`)."""

    def __init__(self, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.handler = handler
        self.session_id = secrets.token_hex(6)
        self.view: _RentalView | None = None
        self.auth_user: str | None = None
        self.peer_ip = ""
        self.rcpts = 0
        self.messages = 0
        self._logged = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.peer_ip:
            peer = transport.get_extra_info("peername")
            self.peer_ip = str(peer[0]) if peer else ""
        self.handler.connections.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.handler.connections.discard(self)
        self.log_end(None)

    def log_end(self, code: int | None) -> None:
        """One `session` entry per connection: at QUIT (before the client sees 221, so a
        test reading the log right after QUIT finds it), else when the connection drops."""
        if not self._logged:  # after STARTTLS both the TLS and the TCP layer report the loss
            self._logged = True
            self.handler.log(self, "session", code=code, mail_from=None, rcpt_count=self.rcpts,
                             message_count=self.messages)


class _Handler:
    """aiosmtpd hooks for one listening port (relay or submission)."""

    def __init__(self, layout: LabLayout, store: _Store, service: str) -> None:
        self.layout = layout
        self.store = store
        self.service = service
        self.port = 0  # known once bound
        self.connections: set[_Connection] = set()

    def log(self, conn: _Connection, event: str, **fields: Any) -> None:
        envelope = conn.envelope
        mail_from = envelope.mail_from if envelope is not None else None
        entry: dict[str, Any] = {
            "session": conn.session_id,
            "event": event,
            "peer": conn.peer_ip,
            "port": self.port,
            "service": self.service,
            "auth_user": conn.auth_user,
            "mail_from": "" if mail_from == "<>" else mail_from,
            "rcpt": None,
        }
        entry.update(fields)
        self.store.log(entry)

    async def handle_EHLO(
        self, server: _Connection, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        # With the 5-argument hook aiosmtpd leaves recording the HELO name to us.
        session.host_name = hostname
        # Advertise PIPELINING and ENHANCEDSTATUSCODES like Postfix: clients (the manual
        # provider's probe) then send all RCPTs of a transaction in one round trip.
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_QUIT(self, server: _Connection, session: Session, envelope: Envelope) -> str:
        server.log_end(221)
        return "221 2.0.0 Bye"

    async def handle_MAIL(
        self, server: _Connection, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        if address != "<>" and not _EXTERNAL_RE.match(address):
            return "501 5.1.7 Bad sender address syntax"
        try:
            # Re-read per transaction: the lab provider may have changed the files since.
            server.view = _RentalView.load(self.layout)
        except ProviderError:
            server.view = None
            return REPLY_CONFIG_ERROR
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return REPLY_OK_MAIL

    async def handle_RCPT(
        self, server: _Connection, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self._check_rcpt(server, address)
        server.rcpts += 1
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address.lower())
            envelope.rcpt_options.extend(rcpt_options)
        safe = address if _EXTERNAL_RE.match(address) else repr(address)
        self.log(server, "rcpt", rcpt=safe, code=int(reply[:3]))
        return reply

    def _check_rcpt(self, server: _Connection, address: str) -> str:
        view = server.view
        if view is None:
            return REPLY_CONFIG_ERROR
        if not _EXTERNAL_RE.match(address):
            return "501 5.1.3 Bad recipient address syntax"
        domain = address.lower().rpartition("@")[2]
        if domain in view.domains:
            # Hosted domains are checked against the alias and mailbox tables whoever asks
            # (Postfix's reject_unlisted_recipient): being whitelisted does not make a user exist.
            if view.hosted_target(address) is not None:
                return REPLY_OK_RCPT
            return _user_unknown(address)
        if server.auth_user is not None or view.whitelisted(server.peer_ip):
            return REPLY_OK_RCPT
        return _relay_denied(address)

    async def handle_DATA(self, server: _Connection, session: Session, envelope: Envelope) -> str:
        view = server.view
        content = envelope.original_content or b""
        body = content.replace(b"\r\n", b"\n")  # Maildir files use the local line ending
        queue_id = secrets.token_hex(5).upper()
        sender = "" if envelope.mail_from == "<>" else str(envelope.mail_from)
        delivered: list[str] = []
        relayed: list[str] = []
        bounced: list[str] = []
        # Without a view (MAIL failed) no RCPT was accepted; keep the types simple anyway.
        view = view if view is not None else _RentalView(frozenset(), frozenset(), frozenset())
        try:
            external: list[str] = []
            for rcpt in envelope.rcpt_tos:
                routes = view.routes(rcpt)
                for box in routes.mailboxes:
                    if str(box) in delivered:
                        continue  # one copy per mailbox, however many RCPTs lead there
                    # X-Original-To, as Postfix's virtual(8) writes it, shows which alias or
                    # +extension the copy came through.
                    original = f"X-Original-To: {rcpt}\n" if rcpt != str(box) else ""
                    head = (
                        f"Return-Path: <{sender}>\nDelivered-To: {box}\n{original}"
                        + self._received(server, session, queue_id, rcpt)
                    )
                    self.store.deliver(box.local, head.encode() + body)
                    delivered.append(str(box))
                external.extend(a for a in routes.external if a not in external)
                bounced.extend(a for a in routes.bounced if a not in bounced)
            if external:
                # The spool file carries its envelope in headers: there is no queue manager.
                head = (
                    f"Return-Path: <{sender}>\nX-Mailrec-Envelope-To: {', '.join(external)}\n"
                    + self._received(server, session, queue_id, ", ".join(external))
                )
                self.store.spool(head.encode() + body)
                relayed.extend(external)
        except OSError:
            reply = "451 4.3.0 Error: queue file write error"
        else:
            reply = f"250 2.0.0 Ok: queued as {queue_id}"
            server.messages += 1
        self.log(server, "message", rcpt=list(envelope.rcpt_tos), code=int(reply[:3]),
                 delivered=delivered, relayed=relayed, bounced=bounced, queue_id=queue_id)
        return reply

    def _received(self, server: _Connection, session: Session, queue_id: str, rcpt: str) -> str:
        helo = session.host_name or "unknown"
        proto = "ESMTP" + ("S" if session.ssl is not None else "") + (
            "A" if server.auth_user is not None else ""
        )
        date = dt.datetime.now(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
        return (
            f"Received: from {helo} ([{server.peer_ip}])\n"
            f"\tby {SERVER_NAME} (mailrec lab rental) with {proto} id {queue_id}\n"
            f"\tfor <{rcpt}>; {date}\n"
        )

    def authenticate(
        self, server: _Connection, session: Session, envelope: Envelope, mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        login = ""
        ok = False
        if isinstance(auth_data, LoginPassword):
            login = auth_data.login.decode("utf-8", "replace").strip().lower()
            password = auth_data.password.decode("utf-8", "replace")
            try:
                expected = read_passwd(self.layout.rental_passwd).get(login)
            except ProviderError:
                expected = None
            # Constant-time comparison, and the same work whether or not the login exists.
            ok = hmac.compare_digest(
                (expected or "\0").encode(), password.encode()
            ) and expected is not None
        safe_login = login if parse_address(login) else repr(login[:64])
        self.log(server, "auth", code=235 if ok else 535, mechanism=mechanism,
                 login=safe_login)
        if not ok:
            return AuthResult(success=False, handled=False, message=REPLY_AUTH_FAILED)
        server.auth_user = login
        return AuthResult(success=True, auth_data=login)


def _self_signed(host: str) -> tuple[bytes, bytes]:
    """A throw-away certificate for STARTTLS (PEM cert, PEM key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    alt: list[x509.GeneralName] = [x509.DNSName(SERVER_NAME), x509.DNSName("localhost")]
    try:
        alt.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        alt.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _tls_context(host: str, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if cert is not None:
        context.load_cert_chain(cert, key)
        return context
    cert_pem, key_pem = _self_signed(host)
    # ssl only loads certificates from files: keep them just long enough to load.
    with tempfile.TemporaryDirectory(prefix="mailrec-tls-") as tmp:
        cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_file.write_bytes(cert_pem)
        key_file.touch(mode=0o600)
        key_file.write_bytes(key_pem)
        context.load_cert_chain(cert_file, key_file)
    return context


class RentalSmtpServer:
    """The lab rental's relay and submission ports, served from a background thread."""

    def __init__(
        self,
        lab_dir: Path,
        host: str,
        relay_port: int,
        submission_port: int,
        *,
        tls_cert: Path | None,
        tls_key: Path | None,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        self.layout = LabLayout(Path(lab_dir))
        self.host = host
        self.relay_port = relay_port
        self.submission_port = submission_port
        self._tls_files = (tls_cert, tls_key)
        self._store = _Store(self.layout)
        self._handlers = {
            RELAY: _Handler(self.layout, self._store, RELAY),
            SUBMISSION: _Handler(self.layout, self._store, SUBMISSION),
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.Server] = []

    @property
    def relay_address(self) -> str:
        """`host:port` of the relay port, as written to services.json (`rental_smtp`)."""
        return f"{self.host}:{self.relay_port}"

    @property
    def submission_address(self) -> str:
        return f"{self.host}:{self.submission_port}"

    def start(self) -> None:
        """Bind both ports (0 = a free port) and serve; raises OSError if a bind fails."""
        if self._thread is not None:
            raise RuntimeError("the lab rental SMTP server is already running")
        self.layout.rental.mkdir(parents=True, exist_ok=True)
        tls = _tls_context(self.host, *self._tls_files)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="lab-rental-smtp", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self._open(tls), loop).result(timeout=30)
        except BaseException:
            self.stop()
            raise

    async def _open(self, tls: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        ports = {RELAY: self.relay_port, SUBMISSION: self.submission_port}
        for service, port in ports.items():
            handler = self._handlers[service]

            def factory(handler: _Handler = handler, service: str = service) -> _Connection:
                return _Connection(
                    handler,
                    hostname=SERVER_NAME,
                    ident="ESMTP (mailrec lab rental)",
                    tls_context=tls,
                    auth_required=service == SUBMISSION,
                    auth_require_tls=True,
                    authenticator=handler.authenticate,
                    timeout=300,
                    loop=loop,
                )

            server = await loop.create_server(factory, self.host, port, reuse_address=True)
            self._servers.append(server)
            handler.port = int(server.sockets[0].getsockname()[1])
        self.relay_port = self._handlers[RELAY].port
        self.submission_port = self._handlers[SUBMISSION].port

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        for handler in self._handlers.values():
            for conn in list(handler.connections):
                if conn.transport is not None:
                    conn.transport.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Close both ports and every open session; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> RentalSmtpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the lab rental SMTP server in the foreground until SIGTERM or SIGINT.

    Prints one JSON line once listening, e.g.
    {"rental_smtp": "127.0.0.3:2525", "rental_submission": "127.0.0.3:2587"}.
    """
    parser = argparse.ArgumentParser(
        prog="python -m reconciler.lab.rental_smtp",
        description="The mailrec lab's rental SMTP server (relay + submission ports).",
    )
    parser.add_argument("--lab", type=Path, required=True, help="the lab directory")
    parser.add_argument("--host", default="127.0.0.3", help="address to listen on")
    parser.add_argument("--relay-port", type=int, default=2525, help="0 = any free port")
    parser.add_argument("--submission-port", type=int, default=2587, help="0 = any free port")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate (default: self-signed)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("give both --tls-cert and --tls-key, or neither")

    # aiosmtpd logs every command at INFO and deprecation notices at WARNING; the JSON
    # transaction log is this server's record, so keep stderr for real errors.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = RentalSmtpServer(
        args.lab, args.host, args.relay_port, args.submission_port,
        tls_cert=args.tls_cert, tls_key=args.tls_key,
    )
    try:
        server.start()
    except (OSError, ssl.SSLError) as exc:
        print(f"rental_smtp: cannot listen on {args.host}: {exc}", file=sys.stderr)
        return 1
    try:
        addresses = {
            "rental_smtp": server.relay_address,
            "rental_submission": server.submission_address,
        }
        print(json.dumps(addresses), flush=True)
        # Event.wait() without a timeout cannot be interrupted by signals on all Pythons.
        while not stop.wait(timeout=1.0):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
