"""The observed world: one normalised, immutable snapshot of every system mailrec manages.

Drivers fill it (observe); steps transform it (`Step.simulate`); safety reads it. Users are
kept in a persistent map (`immutables.Map`) with running counts, so that simulating one step
costs O(log n) and the global invariants read O(1) aggregates instead of scanning all users.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

import immutables

from reconciler.model import Side

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class UserFacts:
    """What the systems say about one mail user."""

    onprem_account: bool = False  # a mailbox/account exists on the onprem Postfix host
    onprem_messages: int = 0  # messages still in the onprem mailbox (undrained)
    route: Side = Side.ONPREM  # onprem delivers locally, or forwards to the rental (transport)
    relay_recipient: bool = False  # in mailrec's recipient map, so onprem accepts without account
    rental_mailbox: bool = False
    rental_messages: int | None = None  # None: the provider cannot tell
    outbound: Side | None = None  # client submission server, known from acks; None: sends nothing

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
        )

    @property
    def inbound(self) -> Side | None:
        """Where mail for this user ends up today, or None when onprem would answer 550."""
        if self.route is Side.RENTAL:
            return Side.RENTAL
        return Side.ONPREM if self.onprem_account else None

    @property
    def onprem_accepts(self) -> bool:
        """Postfix recipient validation (local_recipient_maps) accepts this address."""
        return self.onprem_account or self.relay_recipient


@dataclass(frozen=True, slots=True)
class UserCounts:
    """Running aggregates over all users, kept in step with `World.users`."""

    total: int = 0
    inbound_onprem: int = 0
    outbound_rental: int = 0
    outbound_onprem: int = 0
    route_rental: int = 0

    @staticmethod
    @lru_cache(maxsize=4096)  # few distinct UserFacts values exist; counting is a hot path
    def of(facts: UserFacts) -> UserCounts:
        return UserCounts(
            total=1,
            inbound_onprem=int(facts.inbound is Side.ONPREM),
            outbound_rental=int(facts.outbound is Side.RENTAL),
            outbound_onprem=int(facts.outbound is Side.ONPREM),
            route_rental=int(facts.route is Side.RENTAL),
        )

    def __add__(self, other: UserCounts) -> UserCounts:
        return UserCounts(
            self.total + other.total,
            self.inbound_onprem + other.inbound_onprem,
            self.outbound_rental + other.outbound_rental,
            self.outbound_onprem + other.outbound_onprem,
            self.route_rental + other.route_rental,
        )

    def __sub__(self, other: UserCounts) -> UserCounts:
        return UserCounts(
            self.total - other.total,
            self.inbound_onprem - other.inbound_onprem,
            self.outbound_rental - other.outbound_rental,
            self.outbound_onprem - other.outbound_onprem,
            self.route_rental - other.route_rental,
        )


@dataclass(frozen=True, slots=True)
class OnpremFacts:
    reachable: bool = True
    recipient_validation: bool = True  # local_recipient_maps includes mailrec's recipient map
    last_mail_at: datetime | None = None  # last delivery/relay seen in the Postfix log
    retired: bool = False


@dataclass(frozen=True, slots=True)
class RentalFacts:
    domain_accepted: bool = False
    whitelist: frozenset[IpNetwork] = frozenset()


@dataclass(frozen=True, slots=True)
class DnsFacts:
    mx: Side | None = Side.ONPREM  # None: the MX names neither host (drift)
    mx_hosts: tuple[str, ...] = ()
    mx_ttl: int = 3600
    spf_terms: tuple[str, ...] = ("v=spf1", "-all")  # the SPF TXT record, split into terms
    spf_ttl: int = 3600
    soa_serial: int = 0

    def spf_has(self, term: str) -> bool:
        return term in self.spf_terms


@dataclass(frozen=True, slots=True)
class RouterFacts:
    filters: frozenset[int] = frozenset()  # filters that pass tcp/25 (the managed kind)
    other_filters: frozenset[int] = frozenset()  # defined, but something else
    # The default route as ((gateway, (filter, ...)), ...); None: no default route at all.
    default_route: tuple[tuple[str, tuple[int, ...]], ...] | None = (("tunnel 1", ()),)

    def has_unfiltered_default(self) -> bool:
        return self.default_route is not None and any(not f for _, f in self.default_route)

    def smtp_gateway(self) -> str | None:
        """The gateway tcp/25 leaves through, if a defined smtp filter selects one."""
        if self.default_route is None:
            return None
        for gateway, filters in self.default_route:
            if any(f in self.filters for f in filters):
                return gateway
        return None


@dataclass(frozen=True, slots=True)
class History:
    """Facts only the journal knows: when time-gated changes happened, who acked what."""

    mx_ttl_lowered_at: datetime | None = None
    mx_moved_at: datetime | None = None


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

    @staticmethod
    def build(users: Mapping[str, UserFacts] | Iterable[tuple[str, UserFacts]] = (),
              **parts: object) -> World:
        items = list(users.items()) if isinstance(users, Mapping) else list(users)
        counts = UserCounts()
        for _, facts in items:
            counts = counts + UserCounts.of(facts)
        return World(users=immutables.Map(items), counts=counts, **parts)  # type: ignore[arg-type]

    def user(self, name: str) -> UserFacts:
        return self.users.get(name, EMPTY_USER)

    def with_user(self, name: str, facts: UserFacts) -> World:
        old = self.users.get(name)
        counts = self.counts + UserCounts.of(facts)
        if old is not None:
            counts = counts - UserCounts.of(old)
        # Direct construction: `dataclasses.replace` dominated planning time at 100k users.
        return World(self.users.set(name, facts), counts, self.onprem, self.rental, self.dns,
                     self.router, self.history, self.now)

    def update_user(self, name: str, **changes: object) -> World:
        return self.with_user(name, self.user(name).evolve(**changes))

    def iter_users(self) -> Iterator[tuple[str, UserFacts]]:
        return iter(sorted(self.users.items()))

    def users_where(self, predicate: Callable[[UserFacts], bool]) -> list[str]:
        return sorted(n for n, f in self.users.items() if predicate(f))


EMPTY_USER = UserFacts()
