"""What the `manual` provider's SMTP probes and the admin's files say, judged and merged:
pure functions over replies and lists (no network), so each rule about a reply can be
tested alone. `manual.py` makes the probes and calls these."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from reconciler.drivers.rental.base import IpNetwork

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_ENHANCED_RE = re.compile(r"^[245]\.(\d{1,3}\.\d{1,3})\b")


class ReplyKind(StrEnum):
    OK = "ok"  # 2xx
    NO_USER = "no_user"  # 550 5.1.1 user unknown: the domain is hosted, the mailbox is not
    NOT_HOSTED = "not_hosted"  # relay access denied / unknown domain
    TEMPORARY = "temporary"  # 4xx: try again later
    OTHER = "other"  # any other refusal: cannot tell


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()

    @property
    def kind(self) -> ReplyKind:
        if 200 <= self.code < 300:
            return ReplyKind.OK
        if 400 <= self.code < 500:
            return ReplyKind.TEMPORARY
        text = self.text.lower()
        enhanced = _ENHANCED_RE.match(self.text)
        detail = enhanced.group(1) if enhanced else ""
        # Enhanced status codes (RFC 3463) first, the reply text only when there are none.
        if detail == "1.1" or (not detail and re.search(r"user unknown|unknown user|no such user"
                                                        r"|mailbox unavailable", text)):
            return ReplyKind.NO_USER
        if detail in ("1.2", "7.1") or "relay" in text or "domain" in text:
            return ReplyKind.NOT_HOSTED
        if self.code in (550, 551, 553):  # RFC 5321: mailbox unavailable / not local
            return ReplyKind.NO_USER
        return ReplyKind.OTHER


@dataclass(frozen=True)
class MailboxProbe:
    """What one probe session learned about the domain and its mailboxes."""

    domain_accepted: bool | None  # None: could not tell
    exists: dict[str, bool]  # users with a definite answer
    replies: dict[str, Reply]  # every user's reply, for notes
    accepts_anything: bool  # the canary got 250: a 250 proves nothing
    postmaster: Reply
    sessions: int
    relayed_here: bool = False  # the rental relays for this host (an external RCPT got 250)
    # The same for the alias names probed in the same session(s).
    alias_exists: dict[str, bool] = field(default_factory=dict)
    alias_replies: dict[str, Reply] = field(default_factory=dict)

    @property
    def undecided(self) -> list[str]:
        return sorted(set(self.replies) - set(self.exists))


def merge_mailboxes(
    listed: frozenset[str] | None, probe: MailboxProbe, domain: str
) -> tuple[dict[str, int | None], list[str]]:
    """The snapshot's mailboxes from the admin's file and the probe: the probe wins."""
    notes: list[str] = []
    if probe.domain_accepted is False:
        notes.append(
            f"the rental does not accept mail for {domain} (postmaster@{domain}: "
            f"{probe.postmaster}): no mailbox there is usable yet"
        )
        return {}, notes
    if probe.accepts_anything:
        why = (
            "it relays for this host, whose address is whitelisted"
            if probe.relayed_here
            else "a catch-all"
        )
        notes.append(
            f"the rental answered 250 for a made-up address at {domain} ({why}): mailbox "
            "probes prove nothing, so the mailboxes file is used"
        )
    present = _present(listed, probe.exists, probe.replies, probe.accepts_anything, domain,
                       "mailboxes file", "not verified", notes)
    return dict.fromkeys(present), notes  # a probe cannot count messages: None


def _present(listed: Collection[str] | None, exists_by_probe: Mapping[str, bool],
             replies: Mapping[str, Reply], accepts_anything: bool, domain: str, file: str,
             unverified: str, notes: list[str]) -> list[str]:
    """The names present at the rental, from the admin's file and the probe: a definite
    probe answer wins over the file (with a note when they disagree); without one the file
    is used, and a name the probe could not decide is noted as not verified."""
    present: list[str] = []
    for name in sorted(set(replies) | set(listed or ())):
        in_file = listed is not None and name in listed
        address = f"{name}@{domain}"
        if name in exists_by_probe:
            exists = exists_by_probe[name]
            if listed is not None and exists != in_file:
                said = "lists" if in_file else "does not list"
                notes.append(
                    f"{address}: the {file} {said} it, but the rental answered "
                    f"{replies[name]}: taken as {'present' if exists else 'missing'}"
                )
        else:
            exists = in_file
            if name in replies and not accepts_anything:
                notes.append(f"{address}: {unverified}, the rental answered {replies[name]}")
        if exists:
            present.append(name)
    return present


def merge_aliases(
    listed: Mapping[str, tuple[str, ...]] | None, probe: MailboxProbe, domain: str
) -> tuple[dict[str, tuple[str, ...] | None], list[str]]:
    """The snapshot's aliases from the admin's file and the probe: the probe decides whether
    an alias exists (as for mailboxes); only the file can say its members."""
    notes: list[str] = []
    if probe.domain_accepted is False:
        return {}, notes  # merge_mailboxes says why
    present = _present(listed, probe.alias_exists, probe.alias_replies, probe.accepts_anything,
                       domain, "aliases file", "alias not verified", notes)
    # A 250 proves the name is accepted, not where it forwards: members unknown.
    aliases: dict[str, tuple[str, ...] | None] = {
        name: listed.get(name) if listed is not None else None for name in present}
    return aliases, notes


def merge_whitelist(
    listed: frozenset[IpNetwork],
    declared: Iterable[IpNetwork],
    seen_as: IpAddress,
    relayed: bool,
) -> tuple[frozenset[IpNetwork], list[str]]:
    """The snapshot's whitelist from the listed one and a relay probe from `seen_as`."""
    covering = frozenset(n for n in listed if seen_as in n)
    if relayed and not covering:
        # The rental relays for us, so some entry covers us; prefer the declared network
        # (what the admin was asked to add) over a guess of a single host.
        guess = frozenset(n for n in declared if seen_as in n) or frozenset(
            [ipaddress.ip_network(seen_as)]
        )
        names = ", ".join(sorted(map(str, guess)))
        return listed | guess, [
            f"the whitelist does not cover {seen_as}, but the rental relays for it without "
            f"AUTH: assuming {names} is whitelisted"
        ]
    if not relayed and covering:
        names = ", ".join(sorted(map(str, covering)))
        return listed - covering, [
            f"the whitelist lists {names}, but the rental answered the relay probe from "
            f"{seen_as} with relay access denied: taken as not whitelisted"
        ]
    return listed, []


def judge_domain(postmaster: Reply, canary: Reply, outside: Reply) -> bool | None:
    """Whether the rental hosts the domain, from three RCPTs of one session: postmaster@,
    a made-up address at the domain, and an address at another domain. None: cannot tell."""
    if ReplyKind.NOT_HOSTED in (postmaster.kind, canary.kind):
        return False
    if canary.kind is ReplyKind.NO_USER and postmaster.kind in (ReplyKind.OK, ReplyKind.NO_USER):
        return True
    if canary.kind is ReplyKind.OK and outside.kind is ReplyKind.NOT_HOSTED:
        return True  # it does not relay for us, so the 250 came from a catch-all domain
    return None  # 250 to anything from a host it relays for, or temporary failures
