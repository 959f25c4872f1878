"""The Internet around the company for the e2e run: a caching resolver, outside senders, the
mail client of a company user, and example.net's receiving MTA that checks SPF.

Every part talks to real servers on loopback (tests/e2e/net.py):

- `CachingResolver` asks the company's real BIND and caches every answer for its TTL, as a
  recursive resolver does (negative answers for the SOA minimum, RFC 2308). Names outside the
  company's zone (the rental's MX) come from a static hosts map given to the constructor.
- `InternetSender` delivers like an MTA: MX lookup through the resolver, lowest preference
  first, from `net.OUTSIDE_SENDERS` to the MX's address on `net.SMTP_PORT`; a 4xx or a failed
  connection defers the message to an in-memory retry queue (backoff 1 s, 2 s, 4 s ... capped,
  until a give-up deadline), a 5xx is a bounce recorded with its code and text.
- `MailClient` submits like a user's mail program: to one server, from a given source address,
  optionally with AUTH PLAIN; it retries a 4xx a few times, a 5xx is a bounce to the user.
- `InternetReceiver` is example.net's MX (aiosmtpd): mail for @example.net only (550 otherwise),
  each message stored with its id, envelope, peer IP and the SPF result of the envelope sender
  for the peer IP, looked up in the company's BIND with pyspf; DSNs (empty envelope sender or
  multipart/report) are recorded with the id of the message they report on.

Every record is a frozen dataclass; the `records()`/`messages()` readers return snapshots and
may be called from any thread while mail flows (the ledger reads them).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import email.parser
import email.policy
import email.utils
import heapq
import ipaddress
import itertools
import re
import secrets
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Self

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from . import net

Clock = Callable[[], float]

INTERNET_SENDER = f"someone@{net.INTERNET_DOMAIN}"
SENDER_HELO = f"out.{net.INTERNET_DOMAIN}"
CLIENT_HELO = f"pc.{net.DOMAIN}"
RECEIVER_HOSTNAME = f"mx.{net.INTERNET_DOMAIN}"
DEFAULT_NEGATIVE_TTL = 5.0  # a negative answer without an SOA in it
SPF_RESULTS = ("pass", "softfail", "fail", "neutral", "none", "temperror", "permerror")

# Final statuses of a DeliveryRecord.
QUEUED = "queued"  # still waiting for a (re)try when read
ACCEPTED = "accepted"  # every recipient accepted at the first attempt
DEFERRED_THEN_ACCEPTED = "deferred-then-accepted"  # accepted after at least one deferral
BOUNCED = "bounced"  # every recipient refused with a 5xx
PARTIALLY_BOUNCED = "partially-bounced"  # some recipients accepted, the others 5xx
GAVE_UP = "gave-up"  # still deferred when the give-up deadline passed


# --- the caching resolver ----------------------------------------------------------------


class ResolveError(RuntimeError):
    """The lookup failed for now (timeout, SERVFAIL, REFUSED): an MTA defers on it."""


class NoSuchDomain(RuntimeError):
    """NXDOMAIN for a mail domain: an MTA bounces on it."""


def _key_name(name: str) -> str:
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


@dataclass(frozen=True)
class CachedAnswer:
    """One cached answer; `values` are the rdatas as text ("10 mail.example.co.jp.", an IP)."""

    name: str  # absolute, lower case: "example.co.jp."
    rdtype: str  # "MX", "A", "TXT" ...
    values: tuple[str, ...]
    ttl: float  # the TTL it was cached for (SOA minimum for a negative one)
    stored_at: float  # resolver clock
    expires_at: float  # resolver clock
    negative: bool = False
    rcode: str = "NOERROR"  # "NXDOMAIN" for a negative answer on a name that does not exist
    source: str = "dns"  # "dns" or "hosts" (the static map, never expires)
    from_cache: bool = False  # set on what query() returns: served without asking BIND

    def remaining(self, now: float) -> float:
        return max(0.0, self.expires_at - now)


@dataclass(frozen=True)
class MxHost:
    preference: int
    name: str  # absolute: "mail.example.co.jp."


class CachingResolver:
    """A recursive resolver's cache in front of the company's authoritative BIND.

    Answers are cached under (name, type) until their TTL passes on `clock` (a CNAME chain
    counts with its smallest TTL); NXDOMAIN/NODATA for min(SOA TTL, SOA minimum) of the SOA
    in the answer, else `negative_ttl`. Failures (timeout, SERVFAIL, REFUSED) raise
    `ResolveError` and are not cached. `hosts` answers A lookups for names outside the zone
    ({"mx.rental.test": "127.0.0.58"}) without asking BIND, like /etc/hosts. Thread-safe.
    """

    def __init__(
        self,
        nameserver: str,
        port: int = 53,
        *,
        hosts: Mapping[str, str | Sequence[str]] | None = None,
        clock: Clock = time.monotonic,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        timeout: float = 3.0,
    ) -> None:
        self.nameserver = nameserver
        self.port = port
        self.clock = clock
        self.negative_ttl = negative_ttl
        self.timeout = timeout
        self._hosts: dict[str, tuple[str, ...]] = {
            _key_name(name): (addrs,) if isinstance(addrs, str) else tuple(addrs)
            for name, addrs in (hosts or {}).items()
        }
        self._cache: dict[tuple[str, str], CachedAnswer] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0  # questions sent to BIND

    # -- public ----------------------------------------------------------------------------

    def query(self, name: str, rdtype: str) -> CachedAnswer:
        """The answer for (name, rdtype): from the cache while its TTL lasts, else from BIND."""
        key = (_key_name(name), rdtype.upper())
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and self.clock() < entry.expires_at:
                self.hits += 1
                return replace(entry, from_cache=True)
            self.misses += 1
        fresh = self._ask(*key)
        with self._lock:
            if fresh.ttl > 0:
                self._cache[key] = fresh
            else:
                self._cache.pop(key, None)
        return fresh

    def mx(self, domain: str) -> list[MxHost]:
        """The domain's MX hosts, lowest preference first (ties in a random order, as MTAs
        do); no MX record means the domain itself (RFC 5321 implicit MX); NXDOMAIN raises
        `NoSuchDomain`, a failed lookup `ResolveError`."""
        answer = self.query(domain, "MX")
        if answer.negative:
            if answer.rcode == "NXDOMAIN":
                raise NoSuchDomain(f"{domain}: NXDOMAIN")
            return [MxHost(0, _key_name(domain))]
        hosts = []
        for value in answer.values:
            preference, _, exchange = value.partition(" ")
            hosts.append(MxHost(int(preference), _key_name(exchange)))
        shuffled = sorted(hosts, key=lambda _: secrets.randbits(16))
        return sorted(shuffled, key=lambda host: host.preference)

    def addresses(self, name: str) -> list[str]:
        """IPv4 addresses of a host name: the static hosts map first, else BIND's A records
        (cached); [] when it has none. A failed lookup raises `ResolveError`."""
        key = _key_name(name)
        static = self._hosts.get(key)
        if static is not None:
            return list(static)
        answer = self.query(key, "A")
        return [] if answer.negative else list(answer.values)

    def cached(self) -> list[CachedAnswer]:
        """What the cache holds now and has not expired, hosts-map entries included."""
        now = self.clock()
        with self._lock:
            live = [entry for entry in self._cache.values() if now < entry.expires_at]
        statics = [
            CachedAnswer(name, "A", addrs, float("inf"), 0.0, float("inf"), source="hosts")
            for name, addrs in self._hosts.items()
        ]
        return sorted(live, key=lambda e: (e.name, e.rdtype)) + statics

    def describe(self) -> str:
        """The cache as text lines, for a failing test's message."""
        now = self.clock()
        lines = [
            f"{e.name} {e.rdtype} "
            f"{'NEGATIVE ' + e.rcode if e.negative else ' '.join(e.values)} "
            f"({e.source}, {e.remaining(now):.1f}s left)"
            for e in self.cached()
        ]
        return "\n".join(lines) or "(cache empty)"

    def forget(self) -> None:
        """Empty the cache (the hosts map stays)."""
        with self._lock:
            self._cache.clear()

    # -- one question to BIND --------------------------------------------------------------

    def _ask(self, name: str, rdtype: str) -> CachedAnswer:
        qname = dns.name.from_text(name)
        kind = dns.rdatatype.from_text(rdtype)
        request = dns.message.make_query(qname, kind)
        try:
            response, _ = dns.query.udp_with_fallback(
                request, self.nameserver, port=self.port, timeout=self.timeout
            )
        except (OSError, dns.exception.DNSException) as exc:
            raise ResolveError(
                f"{name} {rdtype}: no answer from {self.nameserver}:{self.port}: "
                f"{exc or type(exc).__name__}"
            ) from exc
        rcode = response.rcode()
        now = self.clock()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise ResolveError(f"{name} {rdtype}: {dns.rcode.to_text(rcode)}")
        ttl = float("inf")
        current = qname
        for _ in range(8):  # follow a CNAME chain inside the answer
            rrset = response.get_rrset(response.answer, current, dns.rdataclass.IN, kind)
            if rrset is not None:
                ttl = min(ttl, float(rrset.ttl))
                values = tuple(sorted(rdata.to_text() for rdata in rrset))
                return CachedAnswer(name, rdtype, values, ttl, now, now + ttl)
            cname = response.get_rrset(
                response.answer, current, dns.rdataclass.IN, dns.rdatatype.CNAME
            )
            if cname is None:
                break
            ttl = min(ttl, float(cname.ttl))
            current = cname[0].target
        negative = self.negative_ttl
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                negative = float(min(rrset.ttl, rrset[0].minimum))
        return CachedAnswer(
            name, rdtype, (), negative, now, now + negative, negative=True,
            rcode=dns.rcode.to_text(rcode),
        )


# --- messages and one SMTP session ---------------------------------------------------------

_ids = itertools.count(1)
_ids_lock = threading.Lock()


def new_id(prefix: str) -> str:
    """A run-unique message id: prefix, a counter and a random tag ("in-000042-3fa9c1")."""
    with _ids_lock:
        number = next(_ids)
    return f"{prefix}-{number:06d}-{secrets.token_hex(3)}"


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def build_message(
    e2e_id: str,
    sender: str,
    recipients: Sequence[str],
    *,
    subject: str | None = None,
    body: str | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> email.message.EmailMessage:
    """The message every part of the e2e sends: id in `net.E2E_ID_HEADER` and the Subject."""
    message = email.message.EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = f"{subject or 'e2e message'} [{e2e_id}]"
    message["Date"] = email.utils.formatdate(localtime=False)
    message["Message-ID"] = f"<{e2e_id}@{domain_of(sender) or 'e2e.invalid'}>"
    message[net.E2E_ID_HEADER] = e2e_id
    for name, value in (extra_headers or {}).items():
        message[name] = value
    message.set_content(body or f"e2e message {e2e_id} from {sender}\n")
    return message


@dataclass(frozen=True)
class Reply:
    """An SMTP server's reply, or a failure before one (code None)."""

    code: int | None
    text: str
    stage: str  # connect, greeting, helo, auth, mail, rcpt, data

    @property
    def permanent(self) -> bool:
        return self.code is not None and 500 <= self.code < 600

    def __str__(self) -> str:
        return f"{self.code or '---'} {self.text} (at {self.stage})"


@dataclass(frozen=True)
class Attempt:
    """One SMTP session (or a failure to open one) of a delivery."""

    at: float  # time.time()
    host: str  # the MX name or the server given
    address: str
    reply: Reply  # the reply that decided the session (the last one)
    accepted: tuple[str, ...] = ()
    deferred: tuple[str, ...] = ()
    bounced: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeliveryRecord:
    """Everything known about one message an outside sender or a mail client sent."""

    id: str  # the e2e id (header net.E2E_ID_HEADER and in the Subject)
    message_id: str
    sender: str  # envelope sender
    recipients: tuple[str, ...]
    submitted_at: float  # time.time() when handed to the sender/client
    first_attempt_at: float | None  # time.time() of the first connection attempt
    finished_at: float | None  # time.time() when the status became final
    status: str  # QUEUED, ACCEPTED, DEFERRED_THEN_ACCEPTED, BOUNCED, PARTIALLY_BOUNCED, GAVE_UP
    attempts: int  # delivery attempts (queue runs); MX fallback inside one run is one attempt
    delivered: tuple[str, ...]  # recipients accepted
    bounced: tuple[tuple[str, Reply], ...]  # recipients refused with a 5xx, and the reply
    pending: tuple[str, ...]  # recipients not yet accepted nor refused
    mx_host: str | None  # the server that finally took (or refused) the message
    mx_address: str | None
    last_reply: Reply | None
    history: tuple[Attempt, ...] = field(default=(), repr=False)

    @property
    def final(self) -> bool:
        return self.status != QUEUED

    @property
    def bounce_code(self) -> int | None:
        return self.bounced[0][1].code if self.bounced else None

    @property
    def deferrals(self) -> int:
        """Attempts that left a recipient for later (4xx, no answer, failed lookup)."""
        settled = not self.pending and self.status != GAVE_UP
        return max(0, self.attempts - 1) if settled else self.attempts

    @property
    def acceptances(self) -> int:
        """Sessions whose end of DATA was answered 2xx (2 would be a duplicate delivery)."""
        return sum(1 for attempt in self.history if attempt.accepted)




def _new_tracked(recipients: str | Sequence[str], sender: str, subject: str | None,
                 body: str | None, ident: str) -> _Tracked:
    """A message built and tracked from its first attempt (the sender's and the client's)."""
    rcpts = (recipients,) if isinstance(recipients, str) else tuple(recipients)
    if not rcpts:
        raise ValueError("a message needs at least one recipient")
    message = build_message(ident, sender, rcpts, subject=subject, body=body)
    return _Tracked(
        id=ident,
        message_id=str(message["Message-ID"]),
        sender=sender,
        recipients=rcpts,
        payload=message.as_bytes(policy=email.policy.SMTP),
        submitted_at=time.time(),
        pending=list(rcpts),
    )


@dataclass
class _Tracked:
    """The mutable state behind a DeliveryRecord (guarded by its owner's lock)."""

    id: str
    message_id: str
    sender: str
    recipients: tuple[str, ...]
    payload: bytes
    submitted_at: float
    first_attempt_at: float | None = None
    first_attempt_mono: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    delivered: list[str] = field(default_factory=list)
    bounced: dict[str, Reply] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    mx_host: str | None = None
    mx_address: str | None = None
    last_reply: Reply | None = None
    history: list[Attempt] = field(default_factory=list)
    gave_up: bool = False

    def status(self) -> str:
        if self.gave_up:
            return GAVE_UP
        if self.pending:
            return QUEUED
        if self.bounced:
            return PARTIALLY_BOUNCED if self.delivered else BOUNCED
        return ACCEPTED if self.attempts <= 1 else DEFERRED_THEN_ACCEPTED

    def snapshot(self) -> DeliveryRecord:
        return DeliveryRecord(
            id=self.id,
            message_id=self.message_id,
            sender=self.sender,
            recipients=self.recipients,
            submitted_at=self.submitted_at,
            first_attempt_at=self.first_attempt_at,
            finished_at=self.finished_at,
            status=self.status(),
            attempts=self.attempts,
            delivered=tuple(self.delivered),
            bounced=tuple(self.bounced.items()),
            pending=tuple(self.pending),
            mx_host=self.mx_host,
            mx_address=self.mx_address,
            last_reply=self.last_reply,
            history=tuple(self.history),
        )


@dataclass
class _Session:
    accepted: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)
    bounced: dict[str, Reply] = field(default_factory=dict)
    reply: Reply = Reply(None, "not tried", "connect")
    try_next: bool = False  # failed before a transaction: the next MX may do better


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def smtp_session(
    address: str,
    port: int,
    *,
    sender: str,
    recipients: Sequence[str],
    payload: bytes,
    source_address: str | None = None,
    helo: str = SENDER_HELO,
    auth: tuple[str, str] | None = None,
    timeout: float = 10.0,
) -> _Session:
    """One SMTP session delivering `payload`; each recipient ends accepted, deferred (4xx or
    a failure) or bounced (5xx). `try_next` when it failed before MAIL was accepted."""
    result = _Session()
    remaining = list(recipients)

    def defer_all(reply: Reply, try_next: bool = False) -> _Session:
        result.deferred.extend(remaining)
        result.reply = reply
        result.try_next = try_next
        return result

    def bounce_all(reply: Reply) -> _Session:
        for rcpt in remaining:
            result.bounced[rcpt] = reply
        result.reply = reply
        return result

    client = smtplib.SMTP(
        local_hostname=helo,
        timeout=timeout,
        source_address=(source_address, 0) if source_address else None,
    )
    stage = "connect"
    try:
        code, text = client.connect(address, port)
        if code != 220:
            return defer_all(Reply(code, _text(text), "greeting"), try_next=True)
        stage = "helo"
        code, text = client.ehlo()
        if not 200 <= code < 300:
            code, text = client.helo()
            if not 200 <= code < 300:
                return defer_all(Reply(code, _text(text), stage), try_next=True)
        if auth is not None:
            stage = "auth"
            client.user, client.password = auth
            try:
                code, text = client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPAuthenticationError as exc:
                reply = Reply(exc.smtp_code, _text(exc.smtp_error), stage)
                return bounce_all(reply) if reply.permanent else defer_all(reply)
        stage = "mail"
        code, text = client.mail(sender)
        if not 200 <= code < 300:
            reply = Reply(code, _text(text), stage)
            return bounce_all(reply) if reply.permanent else defer_all(reply, try_next=True)
        stage = "rcpt"
        taken: list[str] = []
        for rcpt in list(remaining):
            code, text = client.rcpt(rcpt)
            reply = Reply(code, _text(text), stage)
            result.reply = reply
            if 200 <= code < 300:
                taken.append(rcpt)
            elif reply.permanent:
                result.bounced[rcpt] = reply
                remaining.remove(rcpt)
            else:
                result.deferred.append(rcpt)
                remaining.remove(rcpt)
        remaining = taken
        if not taken:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.rset()
            return result
        stage = "data"
        final: bytes | str
        try:
            code, final = client.data(payload)
        except smtplib.SMTPDataError as exc:
            code, final = exc.smtp_code, exc.smtp_error
        reply = Reply(code, _text(final), stage)
        if 200 <= code < 300:
            result.accepted.extend(taken)
            result.reply = reply
            return result
        return bounce_all(reply) if reply.permanent else defer_all(reply)
    except (smtplib.SMTPException, OSError) as exc:
        # A lost connection: whatever was not settled is deferred (it may arrive twice,
        # exactly as with a real MTA whose session breaks after the final dot).
        return defer_all(
            Reply(None, f"{type(exc).__name__}: {exc}", stage), try_next=stage == "connect"
        )
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        client.close()


def _settle(tracked: _Tracked, host: str, address: str, session: _Session) -> None:
    """Fold one session's outcome into the tracked message (caller holds the lock)."""
    tracked.history.append(
        Attempt(
            time.time(), host, address, session.reply,
            tuple(session.accepted), tuple(session.deferred), tuple(session.bounced),
        )
    )
    tracked.last_reply = session.reply
    settled = set(session.accepted) | set(session.bounced)
    if settled:
        tracked.mx_host, tracked.mx_address = host, address
    tracked.delivered.extend(r for r in session.accepted if r not in tracked.delivered)
    tracked.bounced.update(session.bounced)
    tracked.pending = [r for r in tracked.pending if r not in settled]


# --- outside senders -----------------------------------------------------------------------


class InternetSender:
    """Senders on the Internet delivering to the company like an MTA (see the module doc).

    `send()` makes the first attempt in the calling thread (call it from many threads at
    once); `submit()` leaves it to the worker threads. Deferred messages wait in a shared
    in-memory queue that the workers retry with backoff `retry_initial` * 2**n capped at
    `retry_max`, until `give_up_after` seconds after the first attempt. `flush(timeout)` waits
    for the queue to drain; `records()` is a snapshot of every message.
    """

    def __init__(
        self,
        resolver: CachingResolver,
        *,
        source_address: str | None = net.OUTSIDE_SENDERS,
        port: int = net.SMTP_PORT,
        workers: int = 4,
        retry_initial: float = 1.0,
        retry_max: float = 30.0,
        give_up_after: float = 600.0,
        timeout: float = 10.0,
        helo: str = SENDER_HELO,
        id_prefix: str = "in",
    ) -> None:
        self.resolver = resolver
        self.source_address = source_address
        self.port = port
        self.workers = workers
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.give_up_after = give_up_after
        self.timeout = timeout
        self.helo = helo
        self.id_prefix = id_prefix
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._messages: dict[str, _Tracked] = {}
        self._queue: list[tuple[float, int, str]] = []  # (due on monotonic clock, seq, id)
        self._seq = itertools.count()
        self._busy = 0  # attempts running now (send() callers and workers)
        self._threads: list[threading.Thread] = []
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._stopping = False
            self._threads = [
                threading.Thread(target=self._work, name=f"internet-sender-{n}", daemon=True)
                for n in range(self.workers)
            ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the workers (after their current attempt); queued messages stay `queued`."""
        with self._lock:
            self._stopping = True
            threads, self._threads = self._threads, []
            self._changed.notify_all()
        for thread in threads:
            thread.join(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- sending ---------------------------------------------------------------------------

    def send(
        self,
        recipients: str | Sequence[str],
        *,
        sender: str = INTERNET_SENDER,
        subject: str | None = None,
        body: str | None = None,
        e2e_id: str | None = None,
    ) -> DeliveryRecord:
        """Deliver now in this thread; a deferral goes to the retry queue. The record as it
        stands after the first attempt."""
        tracked = self._track(recipients, sender, subject, body, e2e_id)
        self.start()  # the workers retry what this attempt defers
        with self._lock:
            self._busy += 1
        try:
            self._attempt(tracked)
        finally:
            with self._lock:
                self._busy -= 1
                self._after_attempt(tracked)
        with self._lock:
            return tracked.snapshot()

    def submit(
        self,
        recipients: str | Sequence[str],
        *,
        sender: str = INTERNET_SENDER,
        subject: str | None = None,
        body: str | None = None,
        e2e_id: str | None = None,
    ) -> DeliveryRecord:
        """Queue the message for the workers (first attempt as soon as one is free)."""
        tracked = self._track(recipients, sender, subject, body, e2e_id)
        self.start()
        with self._lock:
            heapq.heappush(self._queue, (time.monotonic(), next(self._seq), tracked.id))
            self._changed.notify_all()
            return tracked.snapshot()

    def flush(self, timeout: float) -> bool:
        """Wait until no message is queued or being tried; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.5))
            return True

    # -- reading ---------------------------------------------------------------------------

    def records(self) -> list[DeliveryRecord]:
        with self._lock:
            return [tracked.snapshot() for tracked in self._messages.values()]

    def record(self, e2e_id: str) -> DeliveryRecord:
        with self._lock:
            return self._messages[e2e_id].snapshot()

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def statuses(self) -> Counter[str]:
        with self._lock:
            return Counter(tracked.status() for tracked in self._messages.values())

    # -- inside ----------------------------------------------------------------------------

    def _track(
        self,
        recipients: str | Sequence[str],
        sender: str,
        subject: str | None,
        body: str | None,
        e2e_id: str | None,
    ) -> _Tracked:
        tracked = _new_tracked(recipients, sender, subject, body, e2e_id or new_id(self.id_prefix))
        with self._lock:
            if tracked.id in self._messages:
                raise ValueError(f"e2e id {tracked.id} used twice")
            self._messages[tracked.id] = tracked
        return tracked

    def _work(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    if self._queue and self._queue[0][0] <= now:
                        _, _, ident = heapq.heappop(self._queue)
                        tracked = self._messages[ident]
                        self._busy += 1
                        break
                    wait = self._queue[0][0] - now if self._queue else 1.0
                    self._changed.wait(min(wait, 1.0))
            try:
                self._attempt(tracked)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._after_attempt(tracked)

    def _after_attempt(self, tracked: _Tracked) -> None:
        """Requeue or finish `tracked` after an attempt (caller holds the lock)."""
        if tracked.pending:
            started = tracked.first_attempt_mono or time.monotonic()
            if time.monotonic() - started >= self.give_up_after:
                tracked.gave_up = True
                tracked.finished_at = time.time()
            else:
                delay = min(self.retry_max, self.retry_initial * 2 ** (tracked.attempts - 1))
                heapq.heappush(
                    self._queue, (time.monotonic() + delay, next(self._seq), tracked.id)
                )
        elif tracked.finished_at is None:
            tracked.finished_at = time.time()
        self._changed.notify_all()

    def _attempt(self, tracked: _Tracked) -> None:
        """One delivery attempt for the pending recipients: per domain, MX by MX."""
        with self._lock:
            tracked.attempts += 1
            if tracked.first_attempt_at is None:
                tracked.first_attempt_at = time.time()
                tracked.first_attempt_mono = time.monotonic()
            pending = list(tracked.pending)
        by_domain: dict[str, list[str]] = {}
        for rcpt in pending:
            by_domain.setdefault(domain_of(rcpt), []).append(rcpt)
        for domain, rcpts in by_domain.items():
            self._deliver_domain(tracked, domain, rcpts)

    def _deliver_domain(self, tracked: _Tracked, domain: str, rcpts: list[str]) -> None:
        try:
            mx_hosts = self.resolver.mx(domain)
        except NoSuchDomain as exc:
            reply = Reply(550, f"5.1.2 {exc}", "dns")
            with self._lock:
                _settle(tracked, domain, "", _Session(bounced=dict.fromkeys(rcpts, reply),
                                                       reply=reply))
            return
        except ResolveError as exc:
            with self._lock:
                tracked.last_reply = Reply(None, f"MX lookup: {exc}", "dns")
            return
        last = Reply(None, f"no address for any MX of {domain}", "dns")
        for mx in mx_hosts:
            try:
                addresses = self.resolver.addresses(mx.name)
            except ResolveError as exc:
                last = Reply(None, f"A lookup: {exc}", "dns")
                continue
            for address in addresses:
                session = smtp_session(
                    address,
                    self.port,
                    sender=tracked.sender,
                    recipients=rcpts,
                    payload=tracked.payload,
                    source_address=self.source_address,
                    helo=self.helo,
                    timeout=self.timeout,
                )
                with self._lock:
                    _settle(tracked, mx.name, address, session)
                if not session.try_next:
                    return
                last = session.reply
        with self._lock:
            tracked.last_reply = last


# --- a company user's mail client ----------------------------------------------------------


class MailClient:
    """A company user's mail program: submits to one server from `source_address` (the
    office line), without AUTH (port-25 relay by IP) or with AUTH PLAIN (`user`, `password`).

    `host` is an address, or a name resolved through `resolver`. A 4xx (or a failed
    connection) is retried `retries` times, `retry_delay` * 2**n apart; then the record is
    `gave-up`. A 5xx is a bounce to the user. Thread-safe; `records()` as for the sender.
    """

    def __init__(
        self,
        host: str,
        port: int = net.SMTP_PORT,
        *,
        source_address: str | None,
        user: str | None = None,
        password: str | None = None,
        resolver: CachingResolver | None = None,
        retries: int = 3,
        retry_delay: float = 1.0,
        timeout: float = 10.0,
        helo: str = CLIENT_HELO,
        id_prefix: str = "out",
    ) -> None:
        if (user is None) != (password is None):
            raise ValueError("AUTH needs both user and password")
        self.host = host
        self.port = port
        self.source_address = source_address
        self.auth = (user, password) if user is not None and password is not None else None
        self.resolver = resolver
        self.retries = retries
        self.retry_delay = retry_delay
        self.timeout = timeout
        self.helo = helo
        self.id_prefix = id_prefix
        self._lock = threading.Lock()
        self._messages: dict[str, _Tracked] = {}

    def _address(self) -> str:
        try:
            ipaddress.ip_address(self.host)
            return self.host
        except ValueError:
            pass
        if self.resolver is None:
            raise ResolveError(f"{self.host} is a name and the client has no resolver")
        found = self.resolver.addresses(self.host)
        if not found:
            raise ResolveError(f"{self.host} has no address")
        return found[0]

    def send(
        self,
        sender: str,
        recipients: str | Sequence[str],
        *,
        subject: str | None = None,
        body: str | None = None,
        e2e_id: str | None = None,
    ) -> DeliveryRecord:
        """Submit one message (retrying 4xx); returns its final record."""
        tracked = _new_tracked(recipients, sender, subject, body, e2e_id or new_id(self.id_prefix))
        with self._lock:
            if tracked.id in self._messages:
                raise ValueError(f"e2e id {tracked.id} used twice")
            self._messages[tracked.id] = tracked
        for attempt in range(self.retries + 1):
            if attempt:
                # An outbox retries, but not ever more slowly: at most every 30 s.
                time.sleep(min(self.retry_delay * 2 ** (attempt - 1), 30.0))
            with self._lock:
                tracked.attempts += 1
                if tracked.first_attempt_at is None:
                    tracked.first_attempt_at = time.time()
                pending = list(tracked.pending)
            try:
                address = self._address()
            except ResolveError as exc:
                with self._lock:
                    tracked.last_reply = Reply(None, str(exc), "dns")
                continue
            session = smtp_session(
                address,
                self.port,
                sender=sender,
                recipients=pending,
                payload=tracked.payload,
                source_address=self.source_address,
                helo=self.helo,
                auth=self.auth,
                timeout=self.timeout,
            )
            with self._lock:
                _settle(tracked, self.host, address, session)
                if not tracked.pending:
                    break
        with self._lock:
            tracked.gave_up = bool(tracked.pending)
            tracked.finished_at = time.time()
            return tracked.snapshot()

    def records(self) -> list[DeliveryRecord]:
        with self._lock:
            return [tracked.snapshot() for tracked in self._messages.values()]

    def record(self, e2e_id: str) -> DeliveryRecord:
        with self._lock:
            return self._messages[e2e_id].snapshot()


# --- SPF with pyspf, its DNS pointed at the company's BIND -----------------------------------

_spf_local = threading.local()
_spf_install_lock = threading.Lock()


def _spf_module() -> Any:
    """pyspf's `spf` module with its `DNSLookup` hook routed per thread (installed once).

    pyspf looks every name up through the module-level function `spf.DNSLookup(name, qtype,
    strict, timeout)` (its own tests replace it the same way). The replacement sends a
    lookup to the resolver that the calling thread's `SpfChecker.check()` set, and to
    pyspf's original (the system resolver) otherwise.
    """
    import spf  # type: ignore[import-untyped]  # PyPI pyspf, a dev dependency

    with _spf_install_lock:
        if not getattr(spf.DNSLookup, "_mailrec_routed", False):
            original = spf.DNSLookup

            def routed(
                name: str, qtype: str, strict: object = True, timeout: float = 20
            ) -> list[tuple[tuple[str, str], object]]:
                lookup = getattr(_spf_local, "lookup", None)
                if lookup is None:
                    return list(original(name, qtype, strict, timeout))
                return list(lookup(name, qtype, timeout))

            routed._mailrec_routed = True  # type: ignore[attr-defined]
            spf.DNSLookup = routed
    return spf


class SpfChecker:
    """SPF (RFC 7208) of a sender for a client IP, every DNS lookup to nameserver:port."""

    def __init__(self, nameserver: str, port: int = 53, *, timeout: float = 5.0) -> None:
        self.spf = _spf_module()
        self.timeout = timeout
        self.resolver = dns.resolver.Resolver(configure=False)
        self.resolver.nameservers = [nameserver]
        self.resolver.port = port
        self.resolver.lifetime = timeout
        self.resolver.timeout = timeout

    def _lookup(
        self, name: str, qtype: str, timeout: float
    ) -> list[tuple[tuple[str, str], object]]:
        """What pyspf's dnspython lookup returns, asked of our nameserver."""
        spf = self.spf
        try:
            answer = self.resolver.resolve(
                name, qtype, raise_on_no_answer=False, lifetime=min(timeout, self.timeout)
            )
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        found: list[tuple[tuple[str, str], object]] = []
        for rdata in answer.rrset or ():
            value: object
            if qtype in ("A", "AAAA"):
                value = rdata.address
            elif qtype == "MX":
                value = (rdata.preference, rdata.exchange)
            elif qtype == "PTR":
                value = rdata.target.to_text(True)
            elif qtype in ("TXT", "SPF"):
                value = rdata.strings
            else:
                continue
            found.append(((name, qtype), value))
        return found

    def check(self, ip: str, sender: str, helo: str) -> tuple[str, str]:
        """(result, explanation); result is one of SPF_RESULTS. An empty sender (a DSN) is
        checked as postmaster@helo, as RFC 7208 says."""
        if not sender and not helo:
            return "none", "no sender and no HELO name"
        _spf_local.lookup = self._lookup
        try:
            result, explanation = self.spf.check2(
                i=ip, s=sender, h=helo, timeout=self.timeout, querytime=self.timeout
            )
        finally:
            _spf_local.lookup = None
        return str(result), str(explanation)


# --- example.net's receiving MTA -------------------------------------------------------------

_ID_IN_TEXT = re.compile(rf"^{re.escape(net.E2E_ID_HEADER)}:\s*(\S+)", re.IGNORECASE | re.M)


@dataclass(frozen=True)
class DsnRecipient:
    final_recipient: str
    action: str  # failed, delayed, delivered, relayed, expanded
    status: str  # 5.1.1 ...
    diagnostic: str


@dataclass(frozen=True)
class Dsn:
    """A bounce report the company's servers sent to an example.net sender."""

    reason: str  # "multipart-report" or "empty-sender"
    original_id: str | None  # the e2e id of the message it reports on, when it quotes it
    original_message_id: str | None
    recipients: tuple[DsnRecipient, ...]

    @property
    def summary(self) -> str:
        """One line: "failed 5.1.1 rfc822; gone@example.co.jp (smtp; 550 ...)"."""
        parts = [
            f"{r.action} {r.status} {r.final_recipient}"
            + (f" ({r.diagnostic})" if r.diagnostic else "")
            for r in self.recipients
        ]
        return "; ".join(parts) or self.reason


@dataclass(frozen=True)
class ReceivedMessage:
    e2e_id: str | None  # header net.E2E_ID_HEADER of the message itself (None for a DSN)
    message_id: str | None
    subject: str
    mail_from: str  # envelope sender, "" for <>
    rcpt_tos: tuple[str, ...]
    peer: str  # the connecting IP
    helo: str
    spf: str  # one of SPF_RESULTS
    spf_explanation: str
    received_at: float  # time.time()
    dsn: Dsn | None = None
    raw: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class Refusal:
    """A recipient (or a message) the receiver refused."""

    at: float
    peer: str
    mail_from: str
    rcpt: str
    reply: str  # "550 5.7.1 ..."


def _parse_dsn(message: email.message.Message, mail_from: str) -> Dsn | None:
    is_report = message.get_content_type() == "multipart/report"
    if not is_report and mail_from:
        return None
    original: email.message.Message | None = None
    reported: list[DsnRecipient] = []
    for part in message.walk():
        kind = part.get_content_type()
        if kind == "message/delivery-status":
            blocks = part.get_payload()
            for block in blocks if isinstance(blocks, list) else []:
                if not isinstance(block, email.message.Message):
                    continue
                if block.get("Final-Recipient") is None:
                    continue
                reported.append(
                    DsnRecipient(
                        final_recipient=str(block.get("Final-Recipient", "")),
                        action=str(block.get("Action", "")).strip().lower(),
                        status=str(block.get("Status", "")).strip(),
                        diagnostic=str(block.get("Diagnostic-Code", "")),
                    )
                )
        elif kind == "message/rfc822" and original is None:
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], email.message.Message):
                original = inner[0]
        elif kind == "text/rfc822-headers" and original is None:
            raw = part.get_payload(decode=True)
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
            original = email.parser.HeaderParser().parsestr(text)
    original_id = original.get(net.E2E_ID_HEADER) if original is not None else None
    if original_id is None:  # a plain-text bounce that quotes the original
        found = _ID_IN_TEXT.search(message.as_string())
        original_id = found.group(1) if found else None
    return Dsn(
        reason="multipart-report" if is_report else "empty-sender",
        original_id=str(original_id).strip() if original_id else None,
        original_message_id=str(original.get("Message-ID")) if original is not None
        and original.get("Message-ID") else None,
        recipients=tuple(reported),
    )


def peer_ip(session: Session) -> str:
    """The connecting client's IP (aiosmtpd's session.peer is a (host, port) tuple)."""
    peer: Any = session.peer
    return str(peer[0]) if peer else ""


def _envelope_sender(envelope: Envelope) -> str:
    """MAIL FROM as an address; "" for the null sender (aiosmtpd keeps it as "<>")."""
    sender = (envelope.mail_from or "").strip()
    return "" if sender == "<>" else sender


class _ReceiverHandler:
    def __init__(self, owner: InternetReceiver) -> None:
        self.owner = owner

    async def handle_RCPT(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if domain_of(address) == self.owner.domain:
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 OK"
        reply = "550 5.7.1 relaying denied: not a local domain"
        self.owner._refuse(session, envelope, address, reply)
        return reply

    async def handle_DATA(
        self, server: SMTPServer, session: Session, envelope: Envelope
    ) -> str:
        raw = envelope.original_content or b""
        if not raw and isinstance(envelope.content, bytes):
            raw = envelope.content
        peer = peer_ip(session)
        helo = session.host_name or ""
        mail_from = _envelope_sender(envelope)
        loop = asyncio.get_running_loop()
        result, explanation = await loop.run_in_executor(
            None, self.owner.check_spf, peer, mail_from, helo
        )
        message = email.message_from_bytes(raw)
        if self.owner.reject_spf_fail and result == "fail":
            reply = f"550 5.7.23 SPF fail for {domain_of(mail_from)} from {peer}"
            for rcpt in envelope.rcpt_tos:
                self.owner._refuse(session, envelope, rcpt, reply)
            return reply
        stored = ReceivedMessage(
            e2e_id=str(message[net.E2E_ID_HEADER]).strip()
            if message[net.E2E_ID_HEADER] else None,
            message_id=str(message["Message-ID"]) if message["Message-ID"] else None,
            subject=str(message["Subject"] or ""),
            mail_from=mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            peer=peer,
            helo=helo,
            spf=result,
            spf_explanation=explanation,
            received_at=time.time(),
            dsn=_parse_dsn(message, mail_from),
            raw=raw,
        )
        self.owner._store(stored)
        return "250 2.0.0 OK"


class InternetReceiver:
    """example.net's MX: aiosmtpd on address:port, mail for @`domain` only, SPF checked.

    SPF is evaluated (pyspf) for the envelope sender and the peer IP with every lookup sent
    to the company's BIND at dns_address:dns_port. By default a `fail` is still accepted and
    counted (the ledger judges); `reject_spf_fail=True` refuses it with 550 like a strict
    receiver, recorded in `refusals()`.
    """

    def __init__(
        self,
        dns_address: str,
        dns_port: int,
        *,
        address: str = net.INTERNET_MX,
        port: int = net.SMTP_PORT,
        domain: str = net.INTERNET_DOMAIN,
        hostname: str = RECEIVER_HOSTNAME,
        reject_spf_fail: bool = False,
        spf_timeout: float = 5.0,
    ) -> None:
        self.address = address
        self.port = port
        self.domain = domain.lower()
        self.hostname = hostname
        self.reject_spf_fail = reject_spf_fail
        self.spf = SpfChecker(dns_address, dns_port, timeout=spf_timeout)
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._messages: list[ReceivedMessage] = []
        self._refusals: list[Refusal] = []
        self._controller: Controller | None = None

    def start(self) -> None:
        if self._controller is not None:
            return
        controller = Controller(
            _ReceiverHandler(self),
            hostname=self.address,
            port=self.port,
            server_hostname=self.hostname,
            ident="example.net test MX",
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def check_spf(self, ip: str, mail_from: str, helo: str) -> tuple[str, str]:
        try:
            return self.spf.check(ip, mail_from, helo)
        except Exception as exc:  # a receiver answers temperror rather than crash
            return "temperror", f"{type(exc).__name__}: {exc}"

    # -- records ---------------------------------------------------------------------------

    def _store(self, message: ReceivedMessage) -> None:
        with self._lock:
            self._messages.append(message)
            self._arrived.notify_all()

    def _refuse(self, session: Session, envelope: Envelope, rcpt: str, reply: str) -> None:
        peer = peer_ip(session)
        with self._lock:
            self._refusals.append(
                Refusal(time.time(), peer, _envelope_sender(envelope), rcpt, reply)
            )
            self._arrived.notify_all()

    def messages(self) -> list[ReceivedMessage]:
        """Every accepted message, DSNs included, in arrival order."""
        with self._lock:
            return list(self._messages)

    def dsns(self) -> list[ReceivedMessage]:
        with self._lock:
            return [m for m in self._messages if m.dsn is not None]

    def refusals(self) -> list[Refusal]:
        with self._lock:
            return list(self._refusals)

    def by_id(self) -> dict[str, list[ReceivedMessage]]:
        """Messages by e2e id (a list: a duplicate delivery shows as two)."""
        found: dict[str, list[ReceivedMessage]] = {}
        for message in self.messages():
            if message.e2e_id is not None:
                found.setdefault(message.e2e_id, []).append(message)
        return found

    def spf_counts(self) -> dict[str, int]:
        """SPF results over the accepted messages, every result named (zeros included)."""
        counts = Counter(m.spf for m in self.messages())
        return {result: counts.get(result, 0) for result in SPF_RESULTS} | dict(counts)

    def wait_for(
        self, predicate: Callable[[list[ReceivedMessage]], bool], timeout: float
    ) -> bool:
        """Wait until predicate(messages) holds; False when `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(list(self._messages)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._arrived.wait(min(left, 0.5))
            return True


def ids_of(records: Iterable[DeliveryRecord | ReceivedMessage]) -> set[str]:
    """The e2e ids of records (sender, client or receiver)."""
    found: set[str] = set()
    for record in records:
        ident = record.id if isinstance(record, DeliveryRecord) else record.e2e_id
        if ident is not None:
            found.add(ident)
    return found
