"""The e2e ledger: what was sent, where every message ended up, and the verdict per run.

Pure accounting, no servers. The e2e's senders report into a `Ledger` (`sent`, then the
outcomes they saw); at the end the mail stores are scanned for the id every message carries
in `E2E_ID_HEADER` (`scan_stores`), the Postfix queues are read (`queued_ids`), and
`Ledger.result` turns it all into one `LedgerRow`: every column except `sent`, `deliveries`,
`delivered`, `deferred_then_delivered` and `foreign` must be zero (`LedgerRow.must_be_zero`).
`render_table` / `render_markdown` print one row per run; `details` lists the ids behind a
failing column and where they were found.

Units: `deliveries`, `delivered`, `duplicated`, `misdelivered` and `missing` count
(message, owner) pairs, so for a run where nothing went wrong `delivered == deliveries`.
Every other column counts messages (or relay probes, or unattributed DSNs).

Owners are mailbox owners: a user's local part ("suga"), or "internet" for the Internet's
receiving MTA. Owners are compared case-insensitively (they are stored lower-case).
"""

from __future__ import annotations

import functools
import io
import ipaddress
import json
import mailbox
import re
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser
from pathlib import Path
from typing import Literal, NamedTuple

from rich.console import Console
from rich.table import Table

from tests.e2e.net import E2E_ID_HEADER

Kind = Literal["inbound", "internal", "outbound"]
KINDS: tuple[Kind, ...] = ("inbound", "internal", "outbound")
INTERNET = "internet"  # the owner of every external recipient's copy

# --- what was sent --------------------------------------------------------------------------


@dataclass
class Sent:
    """One message as its sender reported it, and every outcome reported for it since."""

    message_id: str
    sender: str
    recipients: tuple[str, ...]  # envelope recipients
    expected: tuple[str, ...]  # owners who must end up with it (deduplicated, lower-case)
    kind: Kind
    accepted: int = 0  # how many times an MTA answered 250 to the end of DATA
    bounces: list[tuple[int, str]] = field(default_factory=list)  # 5xx answers to the sender
    deferrals: int = 0  # 4xx answers (retried later)
    gave_up: bool = False  # the sender stopped retrying
    dsns: list[str] = field(default_factory=list)  # DSNs the Internet receiver got for it
    spf: list[str] = field(default_factory=list)  # the receiver's verdicts (lower-case)


@dataclass(frozen=True)
class RelayAttempt:
    probe_id: str
    accepted: bool
    source_ip: str


class Location(NamedTuple):
    """Where a message file was found: the store's name, the owner, and the file (if any)."""

    store: str
    owner: str
    path: str = ""


@dataclass(frozen=True)
class StoreDsn:
    """A delivery status notification found in a mail store (it has no id of its own)."""

    location: Location
    original_id: str | None  # the e2e id of the message it reports on, if it quotes one
    actions: tuple[str, ...]  # the DSN's Action: fields (failed, delayed, delivered, ...)
    text: str

    @property
    def is_bounce(self) -> bool:
        """A failure notice; a DSN without any Action field counts as one (worst case)."""
        return not self.actions or "failed" in self.actions


@dataclass(frozen=True)
class Finding:
    """One id behind a non-zero column, with what was seen of it."""

    message_id: str
    note: str


# The table's columns: LedgerRow field -> header.
COLUMNS: dict[str, str] = {
    "sent": "sent",
    "deliveries": "deliveries",
    "delivered": "delivered",
    "bounced": "bounced",
    "deferred_then_delivered": "deferred→delivered",
    "still_queued": "still queued",
    "duplicated": "duplicated",
    "misdelivered": "misdelivered",
    "missing": "missing (lost)",
    "gave_up": "gave up",
    "relayed_from_outside": "relayed from outside",
    "spf_fail": "SPF fail",
    "spf_softfail": "SPF softfail",
    "spf_other": "SPF other",
    "unknown": "unknown ids",
    "foreign": "foreign",
}
# Informative columns: everything else must be zero.
INFORMATIVE: frozenset[str] = frozenset(
    {"sent", "deliveries", "delivered", "deferred_then_delivered", "foreign"}
)


@dataclass(frozen=True)
class LedgerRow:
    """The verdict of one run. See the module docstring for the units."""

    sent: int = 0  # messages
    deliveries: int = 0  # (message, expected owner) pairs
    delivered: int = 0  # pairs found exactly once at the expected owner
    bounced: int = 0  # messages answered 5xx or reported by a DSN, + unattributed DSNs
    deferred_then_delivered: int = 0  # messages answered 4xx at least once, then delivered
    still_queued: int = 0  # messages still in a Postfix queue
    duplicated: int = 0  # pairs found more than once for an expected owner
    misdelivered: int = 0  # (message, owner) pairs at an owner not expected
    missing: int = 0  # pairs neither found nor queued nor bounced/given up: LOST
    gave_up: int = 0  # messages the sender gave up on
    relayed_from_outside: int = 0  # relay probes from outside the whitelist that got through
    spf_fail: int = 0  # messages the receiver judged SPF fail
    spf_softfail: int = 0  # ... softfail
    spf_other: int = 0  # ... neither pass nor (soft)fail: none, neutral, temperror, permerror
    unknown: int = 0  # ids found, queued or reported that nobody reported sending
    foreign: int = 0  # message files without the e2e id header (diagnostics only)
    findings: Mapping[str, tuple[Finding, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def must_be_zero(self) -> list[str]:
        """Names of the columns that must be zero and are not, in table order."""
        return [name for name in COLUMNS
                if name not in INFORMATIVE and getattr(self, name) != 0]

    @property
    def passed(self) -> bool:
        return not self.must_be_zero()

    def counts(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in COLUMNS}


def _owner(name: str) -> str:
    owner = name.strip().lower()
    if not owner:
        raise ValueError("an owner is an empty string")
    return owner


class Ledger:
    """Thread-safe registry of what the e2e's senders sent and saw.

    `relay_whitelist`: the networks (or addresses) allowed to relay; a relay attempt from any
    other source must be refused. Outcomes for an id nobody reported through `sent` are kept
    and counted as `unknown` (a bookkeeping bug of the e2e, never silently dropped).
    """

    def __init__(self, relay_whitelist: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._sent: dict[str, Sent] = {}
        self._orphans: dict[str, list[str]] = {}  # outcomes for ids never sent
        self._relay: list[RelayAttempt] = []
        self._unattributed_dsns: list[str] = []
        self._whitelist = tuple(
            ipaddress.ip_network(net, strict=False) for net in relay_whitelist
        )

    # -- reports from the senders and the Internet receiver --

    def sent(
        self,
        message_id: str,
        *,
        sender: str,
        recipients: Sequence[str],
        expected: Sequence[str],
        kind: Kind,
    ) -> None:
        """A message about to be sent. Its id must be unique in the run."""
        if not message_id.strip():
            raise ValueError("a message id is empty")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        owners = tuple(dict.fromkeys(_owner(o) for o in expected))
        if not owners:
            raise ValueError(f"{message_id}: no expected owner (every message must land)")
        if not recipients:
            raise ValueError(f"{message_id}: no envelope recipient")
        record = Sent(message_id, sender, tuple(recipients), owners, kind)
        with self._lock:
            if message_id in self._sent:
                raise ValueError(f"{message_id} was already sent: ids must be unique")
            self._sent[message_id] = record

    def accepted(self, message_id: str) -> None:
        self._update(message_id, "accepted", lambda r: setattr(r, "accepted", r.accepted + 1))

    def bounced(self, message_id: str, code: int, text: str) -> None:
        """The sender got a 5xx answer."""
        if not 500 <= code <= 599:
            raise ValueError(f"{message_id}: a bounce is a 5xx answer, not {code}")
        self._update(message_id, f"bounced {code} {text}", lambda r: r.bounces.append((code, text)))

    def deferred(self, message_id: str) -> None:
        """The sender got a 4xx answer and will retry."""
        self._update(message_id, "deferred", lambda r: setattr(r, "deferrals", r.deferrals + 1))

    def gave_up(self, message_id: str) -> None:
        self._update(message_id, "gave up", lambda r: setattr(r, "gave_up", True))

    def spf(self, message_id: str, result: str) -> None:
        """The Internet receiver's SPF verdict for a message it received."""
        verdict = result.strip().lower()
        self._update(message_id, f"spf {verdict}", lambda r: r.spf.append(verdict))

    def dsn(self, original_id: str | None, text: str) -> None:
        """A DSN the Internet receiver got; `original_id` when it quotes an e2e id."""
        if original_id is None:
            with self._lock:
                self._unattributed_dsns.append(text)
            return
        self._update(original_id, f"dsn {text}", lambda r: r.dsns.append(text))

    def relay_attempt(self, probe_id: str, accepted: bool, source_ip: str) -> None:
        """An outsider's attempt to relay through a company server (with its own id)."""
        ipaddress.ip_address(source_ip)  # a typo must not pass as "outside"
        with self._lock:
            self._relay.append(RelayAttempt(probe_id, accepted, source_ip))

    def _update(self, message_id: str, what: str, change: Callable[[Sent], None]) -> None:
        with self._lock:
            record = self._sent.get(message_id)
            if record is None:
                self._orphans.setdefault(message_id, []).append(what)
            else:
                change(record)

    # -- reading --

    def records(self) -> list[Sent]:
        """A snapshot of every sent message (copies)."""
        with self._lock:
            return [_copy(r) for r in self._sent.values()]

    def whitelisted(self, source_ip: str) -> bool:
        address = ipaddress.ip_address(source_ip)
        return any(address in net for net in self._whitelist)

    def result(
        self,
        found: Mapping[str, Iterable[Location | tuple[str, str]]] | Scan,
        queued: Iterable[str] = (),
        *,
        foreign: int | None = None,
        store_dsns: Iterable[StoreDsn] | None = None,
    ) -> LedgerRow:
        """The verdict. `found`: id -> every (store, owner) it was found at (or a `Scan`,
        which also brings its foreign count and the DSNs found in stores); `queued`: the ids
        still in a queue (`queued_ids`)."""
        if isinstance(found, Scan):
            foreign = len(found.foreign) if foreign is None else foreign
            store_dsns = found.dsns if store_dsns is None else store_dsns
            found = found.found
        where: dict[str, list[Location]] = {
            mid: [Location(loc[0], _owner(loc[1]), *loc[2:]) for loc in locs]
            for mid, locs in found.items()
        }
        in_queue = set(queued)
        with self._lock:
            records = [_copy(r) for r in self._sent.values()]
            orphans = {k: list(v) for k, v in self._orphans.items()}
            relay = list(self._relay)
            unattributed = list(self._unattributed_dsns)
        return _verdict(self, records, where, in_queue, orphans, relay, unattributed,
                        list(store_dsns or ()), foreign or 0)


def _copy(r: Sent) -> Sent:
    return Sent(r.message_id, r.sender, r.recipients, r.expected, r.kind, r.accepted,
                list(r.bounces), r.deferrals, r.gave_up, list(r.dsns), list(r.spf))


def _places(locs: Iterable[Location]) -> str:
    return ", ".join(f"{loc.store}:{loc.owner}" + (f" ({loc.path})" if loc.path else "")
                     for loc in locs) or "nowhere"


def _story(r: Sent) -> str:
    parts = [f"{r.kind} {r.sender} -> {', '.join(r.recipients)}",
             f"accepted {r.accepted}x" if r.accepted else "never accepted"]
    if r.deferrals:
        parts.append(f"deferred {r.deferrals}x")
    parts += [f"bounced {code} {text}" for code, text in r.bounces]
    parts += [f"DSN {text}" for text in r.dsns]
    if r.gave_up:
        parts.append("sender gave up")
    return "; ".join(parts)


def _verdict(
    ledger: Ledger,
    records: list[Sent],
    where: dict[str, list[Location]],
    queued: set[str],
    orphans: dict[str, list[str]],
    relay: list[RelayAttempt],
    unattributed: list[str],
    store_dsns: list[StoreDsn],
    foreign: int,
) -> LedgerRow:
    counts: Counter[str] = Counter()
    found_by: dict[str, list[Finding]] = {}

    def note(column: str, message_id: str, text: str, n: int = 1) -> None:
        counts[column] += n
        found_by.setdefault(column, []).append(Finding(message_id, text))

    store_dsn_ids: dict[str, list[StoreDsn]] = {}
    for d in store_dsns:
        if not d.is_bounce:
            continue
        if d.original_id is None:
            note("bounced", "-", f"DSN without an e2e id at {_places([d.location])}: {d.text}")
        else:
            store_dsn_ids.setdefault(d.original_id, []).append(d)
    for text in unattributed:
        note("bounced", "-", f"DSN without an e2e id at the Internet receiver: {text}")

    sent_ids = {r.message_id for r in records}
    for r in records:
        locs = where.get(r.message_id, [])
        by_owner = Counter(loc.owner for loc in locs)
        counts["sent"] += 1
        counts["deliveries"] += len(r.expected)
        dsns_here = [f"DSN at {_places([d.location])}: {d.text}"
                     for d in store_dsn_ids.get(r.message_id, [])]
        bounced = bool(r.bounces or r.dsns or dsns_here)
        is_queued = r.message_id in queued
        all_delivered = True
        for owner in r.expected:
            n = by_owner.get(owner, 0)
            if n == 1:
                counts["delivered"] += 1
                continue
            all_delivered = False
            if n > 1:
                mine = [loc for loc in locs if loc.owner == owner]
                note("duplicated", r.message_id, f"{owner} has it {n}x: {_places(mine)}")
            elif not (is_queued or bounced or r.gave_up):
                note("missing", r.message_id, f"not at {owner} (found: {_places(locs)}); "
                     f"{_story(r)}")
        for owner in by_owner:
            if owner not in r.expected:
                mine = [loc for loc in locs if loc.owner == owner]
                note("misdelivered", r.message_id, f"at {owner}, expected only "
                     f"{', '.join(r.expected)}: {_places(mine)}")
        if is_queued:
            note("still_queued", r.message_id, f"in a queue; found: {_places(locs)}; "
                 f"{_story(r)}")
        if bounced:
            note("bounced", r.message_id, "; ".join(
                [f"{code} {text}" for code, text in r.bounces]
                + [f"DSN {text}" for text in r.dsns] + dsns_here))
        if r.gave_up:
            note("gave_up", r.message_id, _story(r))
        if r.deferrals and all_delivered:
            counts["deferred_then_delivered"] += 1
        if "fail" in r.spf:
            note("spf_fail", r.message_id, f"verdicts {r.spf}; {_story(r)}")
        elif "softfail" in r.spf:
            note("spf_softfail", r.message_id, f"verdicts {r.spf}; {_story(r)}")
        elif any(v != "pass" for v in r.spf):
            note("spf_other", r.message_id, f"verdicts {r.spf}; {_story(r)}")

    # Relay probes: accepted from outside, or found anywhere (a queue included) although
    # the answer said no, means the server relayed.
    probes: dict[str, list[RelayAttempt]] = {}
    for attempt in relay:
        probes.setdefault(attempt.probe_id, []).append(attempt)
    for probe_id, attempts in probes.items():
        outside = [a for a in attempts if not ledger.whitelisted(a.source_ip)]
        if not outside:
            continue
        taken = [a for a in outside if a.accepted]
        arrived = probe_id in where or probe_id in queued
        if taken or arrived:
            note("relayed_from_outside", probe_id,
                 f"from {', '.join(sorted({a.source_ip for a in outside}))}: "
                 f"accepted {len(taken)} of {len(outside)} attempts; "
                 f"found: {_places(where.get(probe_id, []))}"
                 + ("; queued" if probe_id in queued else ""))

    known = sent_ids | set(probes)
    strangers = sorted((set(where) | queued | set(orphans)) - known)
    for mid in strangers:
        seen = [*orphans.get(mid, []), *(["queued"] if mid in queued else [])]
        note("unknown", mid, f"never reported sent; found: {_places(where.get(mid, []))}"
             + (f"; {'; '.join(seen)}" if seen else ""))

    return LedgerRow(
        **{name: counts[name] for name in COLUMNS if name != "foreign"},
        foreign=foreign,
        findings={k: tuple(v) for k, v in found_by.items()},
    )


# --- where mail is --------------------------------------------------------------------------


@dataclass(frozen=True)
class MailStore:
    """Message files under `root`, each owned by `owner_of(path)` (None: not counted).

    A message file is any regular file in a directory named `new` or `cur` (Maildir and its
    Maildir++ subfolders `.Name/new|cur`; several users' Maildirs under one root work too)
    or named `*.eml` (a mail client's download store). `tmp/` is never read: a file there is
    a delivery in progress, not a delivered message. A `root` that is a file is read as an
    mbox (an mbox mailbox, or its archive `<mbox>.mailrec-removed-<time>`).
    """

    name: str
    owner_of: Callable[[Path], str | None]
    root: Path

    @classmethod
    def of(cls, name: str, owner: str, root: Path | str) -> MailStore:
        """A store whose every message belongs to one owner (a user's Maildir, an archived
        Maildir, a client's download folder)."""
        fixed = _owner(owner)
        return cls(name, lambda _path: fixed, Path(root))


@dataclass(frozen=True)
class MemoryStore:
    """Messages held in memory (the Internet receiver): raw bytes, text or parsed messages,
    each optionally paired with its owner as `(owner, message)`. The sequence is copied
    when scanned, so a receiver may keep appending to it."""

    name: str
    messages: Sequence[bytes | str | Message | tuple[str, bytes | str | Message]]
    owner: str = INTERNET


Store = MailStore | MemoryStore


@dataclass
class Scan:
    """What `scan_stores` found: id -> locations, files without an id, and DSNs."""

    found: dict[str, list[Location]] = field(default_factory=dict)
    foreign: list[Location] = field(default_factory=list)
    dsns: list[StoreDsn] = field(default_factory=list)

    def add(self, location: Location, message_id: str | None) -> None:
        if message_id is None:
            self.foreign.append(location)
        else:
            self.found.setdefault(message_id, []).append(location)


_HEADER_END = (b"\n", b"\r\n")


def read_header_block(fp: Iterable[bytes]) -> bytes:
    """The header section of a message file: the lines up to the first empty one."""
    lines: list[bytes] = []
    for line in fp:
        if line in _HEADER_END:
            break
        lines.append(line)
    return b"".join(lines)


def e2e_id(headers: Message) -> str | None:
    """The message's e2e id, or None when it has none (non-e2e mail)."""
    value = headers.get(E2E_ID_HEADER)
    if value is None:
        return None
    text = re.sub(r"\s+", " ", str(value)).strip()
    return text or None


def _is_report(headers: Message) -> bool:
    return headers.get_content_type() == "multipart/report"


def parse_dsn(raw: bytes, location: Location) -> StoreDsn:
    """A DSN (multipart/report): the e2e id of the message it quotes, its actions, a text."""
    message = BytesParser().parsebytes(raw)
    original: str | None = None
    actions: list[str] = []
    diagnostics: list[str] = []
    for part in message.walk():
        ctype = part.get_content_type()
        payload = part.get_payload()
        if ctype in ("message/delivery-status", "message/global-delivery-status"):
            blocks = payload if isinstance(payload, list) else []
            for block in blocks:
                if isinstance(block, Message):
                    if block.get("Action"):
                        actions.append(str(block["Action"]).strip().lower())
                    if block.get("Diagnostic-Code"):
                        diagnostics.append(" ".join(str(block["Diagnostic-Code"]).split()))
            if isinstance(payload, str):
                actions += [a.lower() for a in re.findall(r"(?im)^Action:\s*(\S+)", payload)]
        elif ctype == "message/rfc822" and isinstance(payload, list) and payload:
            inner = payload[0]
            if original is None and isinstance(inner, Message):
                original = e2e_id(inner)
        elif ctype in ("text/rfc822-headers", "message/global-headers", "message/global"):
            body = part.get_payload(decode=True)
            if original is None and isinstance(body, bytes):
                original = e2e_id(BytesHeaderParser().parsebytes(body))
    subject = " ".join(str(message.get("Subject", "")).split())
    text = subject + (f": {'; '.join(diagnostics)}" if diagnostics else "")
    return StoreDsn(location, original, tuple(actions), text)


def _message_files(root: Path) -> Iterator[Path]:
    """Message files under root, `new/` before `cur/` in each Maildir (a file moved from new
    to cur while the scan runs is then seen in cur)."""
    try:
        entries = sorted(root.iterdir(), key=lambda p: (p.name != "new", p.name))
    except FileNotFoundError:
        return
    for path in entries:
        if path.is_symlink():
            continue
        if path.is_dir():
            if path.name == "tmp":
                continue
            if path.name in ("new", "cur"):
                yield from (p for p in sorted(path.iterdir())
                            if p.is_file() and not p.is_symlink())
            else:
                yield from _message_files(path)
        elif path.is_file() and path.suffix.lower() == ".eml":
            yield path


def _scan_file(
    scan: Scan, location: Location, fp: Iterable[bytes], reread: Callable[[], bytes]
) -> None:
    headers = BytesHeaderParser().parsebytes(read_header_block(fp))
    message_id = e2e_id(headers)
    if message_id is None and _is_report(headers):
        scan.dsns.append(parse_dsn(reread(), location))
        return
    scan.add(location, message_id)


def _scan_mail_store(store: MailStore, scan: Scan, seen: set[Path]) -> None:
    root = store.root
    if root.is_file():
        _scan_mbox(store, scan)
        return
    if not root.exists():
        raise FileNotFoundError(f"mail store {store.name}: {root} does not exist")
    for path in _message_files(root):
        real = path.resolve()
        if real in seen:  # two stores overlap: one file is one message
            continue
        seen.add(real)
        owner = store.owner_of(path)
        if owner is None:
            continue
        location = Location(store.name, _owner(owner), str(path))
        try:
            with path.open("rb") as fp:
                _scan_file(scan, location, fp, path.read_bytes)
        except FileNotFoundError:
            continue  # moved (new -> cur: seen later) or expunged while scanning


def _scan_mbox(store: MailStore, scan: Scan) -> None:
    owner = store.owner_of(store.root)
    if owner is None:
        return
    box = mailbox.mbox(store.root, create=False)
    try:
        for key in box.iterkeys():
            location = Location(store.name, _owner(owner), f"{store.root}#{key}")
            with box.get_file(key) as fp:
                _scan_file(scan, location, fp, functools.partial(box.get_bytes, key))
    finally:
        box.close()


def _scan_memory(store: MemoryStore, scan: Scan) -> None:
    for index, item in enumerate(list(store.messages)):
        owner, message = item if isinstance(item, tuple) else (store.owner, item)
        location = Location(store.name, _owner(owner), f"#{index}")
        if isinstance(message, Message):
            raw = message.as_bytes()
        else:
            raw = message.encode() if isinstance(message, str) else message
        _scan_file(scan, location, io.BytesIO(raw), functools.partial(bytes, raw))


def scan_stores(stores: Iterable[Store]) -> Scan:
    """Every message in the stores, by e2e id. A file reached through two stores (overlapping
    roots) counts once; a store root that does not exist is an error (a typo would otherwise
    pass as "the message is not there")."""
    scan = Scan()
    seen: set[Path] = set()
    for store in stores:
        if isinstance(store, MemoryStore):
            _scan_memory(store, scan)
        else:
            _scan_mail_store(store, scan, seen)
    return scan


# --- queues ---------------------------------------------------------------------------------


class QueueError(RuntimeError):
    """A queue could not be read completely (a partial read would pass for a short queue)."""


@dataclass(frozen=True)
class QueuedRecipient:
    address: str
    delay_reason: str | None


@dataclass(frozen=True)
class QueueEntry:
    """One queue file as `postqueue -j` lists it."""

    queue_name: str  # incoming, active, deferred, hold, maildrop
    queue_id: str
    arrival_time: int
    message_size: int
    sender: str
    recipients: tuple[QueuedRecipient, ...]
    forced_expire: bool = False


@dataclass(frozen=True)
class QueuedMessage:
    entry: QueueEntry
    message_id: str | None  # the e2e id in its headers (None: not e2e mail, e.g. a DSN)
    config_dir: str


def parse_postqueue_json(text: str) -> list[QueueEntry]:
    """`postqueue -j` output: one JSON object per line (empty output: an empty queue).
    Unknown members are ignored, as postqueue(1) asks; a line that is not a queue entry
    raises `QueueError`."""
    entries: list[QueueEntry] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise QueueError(f"postqueue -j line {number} is not JSON: {exc}") from None
        try:
            recipients = tuple(
                QueuedRecipient(str(r["address"]), r.get("delay_reason"))
                for r in obj["recipients"]
            )
            entries.append(QueueEntry(
                queue_name=str(obj["queue_name"]),
                queue_id=str(obj["queue_id"]),
                arrival_time=int(obj["arrival_time"]),
                message_size=int(obj["message_size"]),
                sender=str(obj["sender"]),
                recipients=recipients,
                forced_expire=bool(obj.get("forced_expire", False)),
            ))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise QueueError(f"postqueue -j line {number} is not a queue entry: {exc!r}") \
                from None
    return entries


_POSTCAT_MARKER = re.compile(r"^\*\*\* .* \*\*\*$")


def parse_postcat_headers(text: str) -> str | None:
    """The e2e id in `postcat -h` output (the message's header section; `*** ... ***`
    record markers, printed with other options, are skipped)."""
    lines = [line for line in text.splitlines() if not _POSTCAT_MARKER.match(line)]
    headers = BytesHeaderParser().parsebytes("\n".join(lines).encode("utf-8", "replace"))
    return e2e_id(headers)


Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=False)


def postfix_tool(name: str) -> str:
    """The path of a Postfix tool (they live in /usr/sbin, often not on a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or name


def read_queue(config_dir: Path | str, *, runner: Runner = run_command) -> list[QueuedMessage]:
    """Every message in the queue of the Postfix instance configured in `config_dir`, with
    its e2e id: `postqueue -c DIR -j`, then `postcat -c DIR -h -q QUEUE_ID` per message
    (options before the queue id: postcat stops reading options at the first file name).
    A message that leaves the queue between the two is skipped: it is delivered or bounced,
    and the stores or the bounce records show it. postqueue reads the queue directly (with a
    warning on stderr) when the mail system is down, so a stopped instance is read too."""
    directory = str(config_dir)
    listing = runner([postfix_tool("postqueue"), "-c", directory, "-j"])
    if listing.returncode != 0:
        raise QueueError(f"postqueue -c {directory} -j exited {listing.returncode}: "
                         f"{listing.stderr.strip()}")
    queued: list[QueuedMessage] = []
    for entry in parse_postqueue_json(listing.stdout):
        shown = runner([postfix_tool("postcat"), "-c", directory, "-h", "-q", entry.queue_id])
        if shown.returncode != 0:
            if "No such file or directory" in shown.stderr:
                continue
            raise QueueError(f"postcat -c {directory} -h -q {entry.queue_id} exited "
                             f"{shown.returncode}: {shown.stderr.strip()}")
        queued.append(QueuedMessage(entry, parse_postcat_headers(shown.stdout), directory))
    return queued


def queued_ids(*config_dirs: Path | str, runner: Runner = run_command) -> set[str]:
    """The e2e ids still queued in any of the Postfix instances."""
    return {
        message.message_id
        for directory in config_dirs
        for message in read_queue(directory, runner=runner)
        if message.message_id is not None
    }


# --- the table ------------------------------------------------------------------------------


def _verdict_text(row: LedgerRow) -> str:
    return "pass" if row.passed else "FAIL"


def render_table(rows: Mapping[str, LedgerRow], *, width: int = 250) -> str:
    """The rich table (plain text, no colour codes): one row per run, every column."""
    table = Table(title="e2e ledger", show_lines=False)
    table.add_column("run", no_wrap=True)
    for header in COLUMNS.values():
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("result", no_wrap=True)
    for run, row in rows.items():
        cells = []
        for name in COLUMNS:
            value = getattr(row, name)
            bad = name not in INFORMATIVE and value != 0
            cells.append(f"[bold red]{value}[/]" if bad else str(value))
        table.add_row(run, *cells, "[green]pass[/]" if row.passed else "[bold red]FAIL[/]")
    console = Console(file=io.StringIO(), width=width, color_system=None,
                      force_terminal=False, record=True)
    console.print(table)
    return console.export_text()


def render_markdown(rows: Mapping[str, LedgerRow]) -> str:
    """The same table in Markdown (docs/guarantees.md)."""
    headers = ["run", *COLUMNS.values(), "result"]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---", *["---:"] * len(COLUMNS), "---"]) + "|",
    ]
    for run, row in rows.items():
        cells = [run.replace("|", "\\|"), *(str(getattr(row, n)) for n in COLUMNS),
                 _verdict_text(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def details(row: LedgerRow, limit: int = 20) -> str:
    """For each column that must be zero and is not: its first `limit` ids and what was
    seen of them (where they were found, what the sender was told)."""
    out: list[str] = []
    for name in row.must_be_zero():
        findings = row.findings.get(name, ())
        out.append(f"{COLUMNS[name]}: {getattr(row, name)}")
        out += [f"  {f.message_id}: {f.note}" for f in findings[:limit]]
        if len(findings) > limit:
            out.append(f"  ... and {len(findings) - limit} more")
    return "\n".join(out)


__all__ = [
    "COLUMNS", "INFORMATIVE", "INTERNET", "Finding", "Ledger", "LedgerRow", "Location",
    "MailStore", "MemoryStore", "QueueEntry", "QueueError", "QueuedMessage", "QueuedRecipient",
    "RelayAttempt", "Scan", "Sent", "Store", "StoreDsn", "details", "e2e_id",
    "parse_dsn", "parse_postcat_headers", "parse_postqueue_json", "queued_ids", "read_queue",
    "render_markdown", "render_table", "scan_stores",
]
