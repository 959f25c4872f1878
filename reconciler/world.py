"""The observed world: one normalised, immutable snapshot of every system mailrec manages.

Drivers fill it (observe); steps transform it (`Step.simulate`); safety reads it. Users are
kept in a persistent map (`immutables.Map`) with running counts, so that simulating one step
costs O(log n) and the global invariants read O(1) aggregates instead of scanning all users.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from functools import lru_cache
from operator import itemgetter

import immutables

from reconciler.model import Side

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Outbound(StrEnum):
    """Which SMTP server a user's mail client submits to. A client setting mailrec cannot
    read: it is known only from a person's ack (the journal), else it is UNKNOWN."""

    ONPREM = "onprem"
    RELAY = "relay"  # the rental on port 25 without AUTH, allowed by the office's whitelist
    SUBMISSION = "submission"  # the rental's submission port with AUTH
    UNKNOWN = "unknown"  # no record: possibly any of the above, and safety assumes each

    @property
    def side(self) -> Side | None:
        if self is Outbound.ONPREM:
            return Side.ONPREM
        return None if self is Outbound.UNKNOWN else Side.RENTAL

    @property
    def may_send_onprem(self) -> bool:
        return self in (Outbound.ONPREM, Outbound.UNKNOWN)

    @property
    def may_send_rental(self) -> bool:
        return self is not Outbound.ONPREM

    @property
    def may_relay(self) -> bool:
        return self in (Outbound.RELAY, Outbound.UNKNOWN)


@dataclass(frozen=True, slots=True)
class UserFacts:
    """What the systems say about one mail user."""

    onprem_account: bool = False  # a mailbox/account exists on the onprem Postfix host
    onprem_messages: int = 0  # messages still in the onprem mailbox (undrained)
    route: Side = Side.ONPREM  # onprem delivers locally, or forwards to the rental (transport)
    relay_recipient: bool = False  # in mailrec's recipient map, so onprem accepts without account
    rental_mailbox: bool = False
    rental_messages: int | None = None  # None: the provider cannot tell
    outbound: Outbound = Outbound.UNKNOWN
    # mailrec's transport entry for this user says something the state would not write (a
    # changed rental host or port, a hand edit such as `error:`): mail goes elsewhere.
    route_drift: bool = False
    # Messages in a mailbox onprem recreated after mailrec archived the user's: something
    # still delivers this user's mail locally (MR020). Counted for retire (MR010).
    stray_messages: int = 0
    # Routed to the rental by onprem's fallback_transport/luser_relay (a seed-style
    # migration: the account deleted by hand), not by mailrec's map.
    via_fallback: bool = False

    def evolve(self, **changes: object) -> UserFacts:
        """`dataclasses.replace`, without its per-call introspection (a planning hot path)."""
        get = changes.get
        return UserFacts(
            get("onprem_account", self.onprem_account),  # type: ignore[arg-type]
            get("onprem_messages", self.onprem_messages),  # type: ignore[arg-type]
            get("route", self.route),  # type: ignore[arg-type]
            get("relay_recipient", self.relay_recipient),  # type: ignore[arg-type]
            get("rental_mailbox", self.rental_mailbox),  # type: ignore[arg-type]
            get("rental_messages", self.rental_messages),  # type: ignore[arg-type]
            get("outbound", self.outbound),  # type: ignore[arg-type]
            get("route_drift", self.route_drift),  # type: ignore[arg-type]
            get("stray_messages", self.stray_messages),  # type: ignore[arg-type]
            get("via_fallback", self.via_fallback),  # type: ignore[arg-type]
        )

    @property
    def inbound(self) -> Side | None:
        """Where mail for this user ends up today, or None when it reaches no mailbox the
        user reads (onprem would answer 550, or a drifted entry sends it elsewhere)."""
        if self.route is Side.RENTAL:
            return None if self.route_drift else Side.RENTAL
        return Side.ONPREM if self.onprem_account else None

    @property
    def onprem_accepts(self) -> bool:
        """Postfix recipient validation (local_recipient_maps) accepts this address."""
        return self.onprem_account or self.relay_recipient

    @property
    def missed_by_rental(self) -> bool:
        """The rental, if it took this user's mail now, would not put it where the user
        reads: the user still reads onprem, or is routed there without a working mailbox."""
        if self.route is Side.RENTAL:
            return self.route_drift or not self.rental_mailbox
        return self.onprem_account


@dataclass(frozen=True, slots=True)
class UserCounts:
    """Running aggregates over all users, kept in step with `World.users`; every global
    safety rule reads these, so a rule costs O(1) per simulated step."""

    total: int = 0
    missed_by_rental: int = 0
    route_rental: int = 0
    may_send_rental: int = 0
    may_send_onprem: int = 0
    may_relay: int = 0
    unknown_outbound: int = 0
    routed_without_mailbox: int = 0  # MR001
    routed_without_account: int = 0  # MR007 when mailrec's map is not consulted
    routed_unaccepted: int = 0  # MR007
    drifted: int = 0  # MR018
    holding_onprem: int = 0  # MR010 once retired
    stray: int = 0  # MR020
    via_fallback: int = 0

    @staticmethod
    @lru_cache(maxsize=4096)  # few distinct UserFacts values exist; counting is a hot path
    def of(facts: UserFacts) -> UserCounts:
        routed = facts.route is Side.RENTAL
        outbound = facts.outbound
        return UserCounts(
            1,
            int(facts.missed_by_rental),
            int(routed),
            int(outbound.may_send_rental),
            int(outbound.may_send_onprem),
            int(outbound.may_relay),
            int(outbound is Outbound.UNKNOWN),
            int(routed and not facts.rental_mailbox),
            int(routed and not facts.onprem_account),
            int(routed and not facts.onprem_accepts),
            int(facts.route_drift),
            int((facts.onprem_account and facts.onprem_messages > 0)
                or facts.stray_messages > 0),
            int(facts.stray_messages > 0),
            int(facts.via_fallback),
        )

    def __add__(self, other: UserCounts) -> UserCounts:
        # Spelled out: this runs once per simulated step (zip and unpacking cost 2x).
        return UserCounts(
            self.total + other.total,
            self.missed_by_rental + other.missed_by_rental,
            self.route_rental + other.route_rental,
            self.may_send_rental + other.may_send_rental,
            self.may_send_onprem + other.may_send_onprem,
            self.may_relay + other.may_relay,
            self.unknown_outbound + other.unknown_outbound,
            self.routed_without_mailbox + other.routed_without_mailbox,
            self.routed_without_account + other.routed_without_account,
            self.routed_unaccepted + other.routed_unaccepted,
            self.drifted + other.drifted,
            self.holding_onprem + other.holding_onprem,
            self.stray + other.stray,
            self.via_fallback + other.via_fallback,
        )

    def times(self, factor: int) -> UserCounts:
        """These counts `factor` times over (as many users with the same facts)."""
        if factor == 1:
            return self
        return UserCounts(*(getattr(self, name) * factor for name in _COUNT_FIELDS))

    def __sub__(self, other: UserCounts) -> UserCounts:
        # Spelled out: this runs once per simulated step (zip and unpacking cost 2x).
        return UserCounts(
            self.total - other.total,
            self.missed_by_rental - other.missed_by_rental,
            self.route_rental - other.route_rental,
            self.may_send_rental - other.may_send_rental,
            self.may_send_onprem - other.may_send_onprem,
            self.may_relay - other.may_relay,
            self.unknown_outbound - other.unknown_outbound,
            self.routed_without_mailbox - other.routed_without_mailbox,
            self.routed_without_account - other.routed_without_account,
            self.routed_unaccepted - other.routed_unaccepted,
            self.drifted - other.drifted,
            self.holding_onprem - other.holding_onprem,
            self.stray - other.stray,
            self.via_fallback - other.via_fallback,
        )


_COUNT_FIELDS = tuple(f.name for f in fields(UserCounts))
# (facts before, facts after) -> how the counts change: a plan's steps make few distinct
# changes (a mailbox created, a route moved), each applied to many users.
_changes: dict[tuple[UserFacts, UserFacts], UserCounts] = {}


def _count_change(old: UserFacts, new: UserFacts) -> UserCounts:
    """UserCounts.of(new) - UserCounts.of(old), worked out once per distinct change."""
    key = (old, new)
    change = _changes.get(key)
    if change is None:
        if len(_changes) >= 4096:
            _changes.clear()
        change = _changes[key] = UserCounts.of(new) - UserCounts.of(old)
    return change


class AddressKind(StrEnum):
    ALIAS = "alias"  # aliases(5): a local name expanded by local(8)
    VIRTUAL = "virtual alias"  # virtual_alias_maps: rewritten by cleanup(8)
    ACCOUNT = "account"  # a Unix account outside the people's uid range, holding mail
    CATCH_ALL = "catch-all"  # a virtual `@domain` entry: every other name


@dataclass(frozen=True, slots=True)
class AddressFacts:
    """A name onprem receives for that is not a mail user, and what the rental does with it."""

    kind: AddressKind
    members: tuple[str, ...] = ()  # what onprem expands it to today, as written there
    messages: int = 0  # mail held (an account's mailbox)
    # The rental delivers this name (an alias there, or a mailbox of that name), as observed
    # (read from the rental, or accepted by an SMTP probe). A state file saying so is not it.
    at_rental: bool = False
    rental_members: tuple[str, ...] | None = None  # as read at the rental (None: unknown)
    # The state's `aliases:` entry: "members" (the state lists them), "rental", "onprem",
    # "drop", or None when the state does not name it.
    keep: str | None = None

    @property
    def settled(self) -> bool:
        """Mail to this name has somewhere to go once the MX names the rental: the rental
        is seen to deliver it, or the state gives it up on purpose (drop)."""
        return self.at_rental or self.keep == "drop"


@dataclass(frozen=True, slots=True)
class OnpremFacts:
    reachable: bool = True
    recipient_validation: bool = True  # local_recipient_maps includes mailrec's recipient map
    last_mail_at: datetime | None = None  # last delivery/relay seen in the Postfix log
    retired: bool = False
    # Where onprem's names cannot be seen (a table mailrec cannot read, a mydestination
    # lookup table): every name there is unknown, so none of them is known to be settled.
    unseen: tuple[str, ...] = ()
    # onprem's fallback_transport/luser_relay hands names without an account to the rental.
    fallback_to_rental: bool = False
    # Relays in front of onprem (onprem.upstream) that still route or queue mail to it:
    # host -> why (observed, or "not verified" when no one confirmed it stopped).
    upstream_pending: tuple[tuple[str, str], ...] = ()
    # A probe message went from onprem to the rental by the very transport mailrec writes
    # (`smtp:[rental]:port`) and reached the rental's SMTP server (journal). Until it has,
    # no user is forwarded: a blocked path (a firewall, a relayhost the network requires)
    # would hold their mail in onprem's queue until it bounces.
    forward_verified: bool = True


@dataclass(frozen=True, slots=True)
class RentalFacts:
    domain_accepted: bool = False
    whitelist: frozenset[IpNetwork] = frozenset()
    # The whitelist was read from the rental itself (API, its config over ssh, the lab's
    # files). False: it comes from the state file or a file an admin keeps, so it is
    # declared, not observed, and safety may not rely on it.
    whitelist_verified: bool = True
    # Relay probes: (address the rental saw, whether it relayed without AUTH).
    relay_checks: tuple[tuple[IpAddress, bool], ...] = ()
    notes: tuple[str, ...] = ()  # what the provider could not verify, shown by plan/status

    def relays_for(self, address: IpAddress) -> bool | None:
        """Whether the rental relays for `address` without AUTH: True/False as observed
        (a probe, or a whitelist read from the rental), None when it cannot be verified."""
        for checked, relayed in self.relay_checks:
            if checked == address:
                return relayed
        if not self.whitelist_verified:
            return None
        return any(address in network for network in self.whitelist)


@dataclass(frozen=True, slots=True)
class DnsFacts:
    mx: Side | None = Side.ONPREM  # None: the MX names neither host (drift)
    mx_hosts: tuple[str, ...] = ()
    mx_ttl: int = 3600
    spf_terms: tuple[str, ...] = ("v=spf1", "-all")  # the SPF TXT record, split into terms
    spf_ttl: int = 3600
    soa_serial: int = 0
    spf_records: int = 1  # how many `v=spf1` TXT records the domain has (RFC 7208: one)
    zone_ttl: int = 0  # the longest other TTL of the zone apex (SOA, its minimum, NS)

    def spf_has(self, term: str) -> bool:
        return term in self.spf_terms


class Coverage(IntEnum):
    """How much of the office's SMTP traffic (tcp to port 25, from a LAN host, from an
    ephemeral port, to an Internet address mailrec cannot know in advance) a filter matches."""

    NONE = 0  # none of it (another protocol or port, a source outside the LAN)
    SOME = 1  # part of it, or mailrec cannot tell (address lists, names, tcp flags)
    ALL = 2  # all of it


@dataclass(frozen=True, slots=True)
class FilterVerdict:
    """What one static router filter does to the office's SMTP traffic it matches."""

    passes: bool  # pass / restrict: the gateway it guards is chosen; reject: skipped
    coverage: Coverage


SMTP_PASS = FilterVerdict(True, Coverage.ALL)  # `ip filter N pass * * tcp * smtp`
RouteEntries = tuple[tuple[str, tuple[int, ...]], ...]  # ((gateway, (filter, ...)), ...)


def tcp25_egress(
    route: RouteEntries | None, verdicts: Mapping[int, FilterVerdict]
) -> tuple[str, ...]:
    """Every gateway the office's SMTP traffic may leave through, by the router's first-match
    rules: gateways are tried in the order written; in a gateway's filter list the first
    filter that matches a packet decides (pass: this gateway; reject: the next gateway); a
    filter that matches nothing (or is not defined) lets the packet on to the next filter;
    a gateway without filters takes everything that reaches it (with every later unfiltered
    gateway, which may share it: load balancing, failover).

    Where a filter matches only part of the traffic (or mailrec cannot tell), both outcomes
    are followed, so the answer is every gateway some client's mail may take: () means SMTP
    has no route at all. Safety (MR005) and the router driver both ask this function.
    """
    possible: list[str] = []
    entries = list(route or ())
    for index, (gateway, filters) in enumerate(entries):
        if not filters:
            # Several unfiltered gateways share the rest (load balancing with `weight`, or
            # failover with `keepalive`/`hide`): each of them may carry it.
            possible.extend(g for g, f in entries[index:] if not f)
            return tuple(dict.fromkeys(possible))
        for number in filters:
            verdict = verdicts.get(number)
            if verdict is None or verdict.coverage is Coverage.NONE:
                continue
            if verdict.passes:
                possible.append(gateway)
                if verdict.coverage is Coverage.ALL:
                    return tuple(dict.fromkeys(possible))  # nothing is left for later gateways
            elif verdict.coverage is Coverage.ALL:
                break  # all of it skips this gateway
    return tuple(dict.fromkeys(possible))


@dataclass(frozen=True, slots=True)
class RouterFacts:
    filters: frozenset[int] = frozenset()  # filters that are exactly mailrec's smtp pass
    other_filters: frozenset[int] = frozenset()  # defined, but something else
    # The default route as ((gateway, (filter, ...)), ...); None: no default route at all.
    default_route: RouteEntries | None = (("tunnel 1", ()),)
    # Per defined static filter: what it does to the office's SMTP traffic. A filter missing
    # here while defined counts as "may pass some of it" (fail closed).
    verdicts: Mapping[int, FilterVerdict] = field(default_factory=dict)
    # Per defined static filter: its line as the router shows it (MR014 names it).
    filter_lines: Mapping[int, str] = field(default_factory=dict)
    # Per filter number: the lines other than the default route that use or define that
    # number in another namespace (secure filter lists, filter sets, dynamic and IPv6
    # filters, forward and RIP filters, ...). mailrec never takes such a number (MR014).
    references: Mapping[int, tuple[str, ...]] = field(default_factory=dict)

    def has_unfiltered_default(self) -> bool:
        return self.default_route is not None and any(not f for _, f in self.default_route)

    def verdict(self, number: int) -> FilterVerdict | None:
        if number in self.filters:
            return SMTP_PASS
        if number not in self.other_filters:
            return None  # not defined: the router matches nothing with it
        return self.verdicts.get(number, FilterVerdict(True, Coverage.SOME))

    def smtp_egress(self) -> tuple[str, ...]:
        """Every gateway the office's tcp/25 may leave through (see `tcp25_egress`)."""
        defined = self.filters | self.other_filters
        verdicts = {n: v for n in defined if (v := self.verdict(n)) is not None}
        return tcp25_egress(self.default_route, verdicts)

    def smtp_gateway(self) -> str | None:
        """The one gateway all tcp/25 leaves through, or None if that is not certain."""
        egress = self.smtp_egress()
        return egress[0] if len(egress) == 1 else None


@dataclass(frozen=True, slots=True)
class History:
    """Facts only the journal knows. Every one may be missing (a lost journal, a change made
    by hand); the gates that read them then assume the worst (docs/guarantees.md)."""

    # When the MX TTL was lowered to cutover_ttl: mailrec's apply, or the first time an
    # apply saw it lowered (by hand). None: unknown.
    mx_ttl_lowered_at: datetime | None = None
    # When the MX was moved: mailrec's apply, or the first time an apply saw it moved.
    mx_moved_at: datetime | None = None
    # The longest TTL the MX (or SPF) record had before the lowering, as recorded. None:
    # no record; the MX gate then assumes the longest TTL the zone shows, or a day.
    mx_old_ttl: int | None = None


def _utc_epoch() -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class World:
    users: immutables.Map[str, UserFacts] = field(default_factory=immutables.Map)
    counts: UserCounts = UserCounts()
    onprem: OnpremFacts = OnpremFacts()
    rental: RentalFacts = RentalFacts()
    dns: DnsFacts = DnsFacts()
    router: RouterFacts | None = None
    history: History = History()
    now: datetime = field(default_factory=_utc_epoch)
    # Every name onprem receives for besides the users (aliases, virtual aliases, accounts
    # outside the uid range holding mail): few, and changed by few steps.
    addresses: immutables.Map[str, AddressFacts] = field(default_factory=immutables.Map)

    @staticmethod
    def build(users: Mapping[str, UserFacts] | Iterable[tuple[str, UserFacts]] = (),
              **parts: object) -> World:
        items = list(users.items()) if isinstance(users, Mapping) else list(users)
        # Counted per distinct object, then scaled: observe shares one UserFacts among all
        # users with the same facts, so 100,000 users are a few dozen additions, not 100,000.
        facts = list(map(itemgetter(1), items))
        objects = dict(zip(map(id, facts), facts, strict=True))
        counts = UserCounts()
        for key, times in Counter(map(id, facts)).items():
            counts = counts + UserCounts.of(objects[key]).times(times)
        return World(users=immutables.Map(items), counts=counts, **parts)  # type: ignore[arg-type]

    def user(self, name: str) -> UserFacts:
        return self.users.get(name, EMPTY_USER)

    def with_user(self, name: str, facts: UserFacts) -> World:
        old = self.users.get(name)
        if old is None:
            counts = self.counts + UserCounts.of(facts)
        else:
            counts = self.counts + _count_change(old, facts)
        # Direct construction: `dataclasses.replace` dominated planning time at 100k users.
        return World(self.users.set(name, facts), counts, self.onprem, self.rental, self.dns,
                     self.router, self.history, self.now, self.addresses)

    def update_user(self, name: str, **changes: object) -> World:
        return self.with_user(name, self.user(name).evolve(**changes))

    def with_address(self, name: str, facts: AddressFacts) -> World:
        return World(self.users, self.counts, self.onprem, self.rental, self.dns, self.router,
                     self.history, self.now, self.addresses.set(name, facts))

    def unsettled_addresses(self) -> list[str]:
        """Names onprem receives for that would have nowhere to go at the rental (MR019)."""
        return _unsettled(self.addresses)

    def iter_users(self) -> Iterator[tuple[str, UserFacts]]:
        return iter(sorted(self.users.items()))

    def users_where(self, predicate: Callable[[UserFacts], bool]) -> list[str]:
        return sorted(n for n, f in self.users.items() if predicate(f))


_unsettled_cache: list[tuple[object, list[str]]] = []


def _unsettled(addresses: immutables.Map[str, AddressFacts]) -> list[str]:
    # Every world a plan simulates after a user step shares one addresses map: by identity.
    for seen, names in _unsettled_cache:
        if seen is addresses:
            return names
    names = sorted(n for n, a in addresses.items() if not a.settled)
    _unsettled_cache.insert(0, (addresses, names))
    del _unsettled_cache[2:]
    return names


EMPTY_USER = UserFacts()
