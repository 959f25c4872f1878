"""Observe: turn what the drivers read (and what only the journal knows) into one `World`.

The drivers know their systems; this module knows only their normalised facts, so the same
code builds the world from the lab, from real hosts, or from generated facts in tests.

What the journal cannot say is never guessed in the safe direction: an outbound setting no
ack records is UNKNOWN (possibly either side), a lowering or an MX move with no record has no
time (its gate then waits from the first observation), and a TTL before the lowering that was
never recorded is unknown (the gate assumes the worst). See docs/guarantees.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import immutables

from reconciler.drivers.postfix import relay_target  # pure: no protocol library
from reconciler.journal import Journal
from reconciler.model import DesiredState, Side
from reconciler.world import (
    AddressFacts,
    AddressKind,
    DnsFacts,
    History,
    IpAddress,
    OnpremFacts,
    Outbound,
    RentalFacts,
    RouterFacts,
    UserFacts,
    World,
)

if TYPE_CHECKING:  # annotations only: importing these drivers loads dnspython and paramiko
    from reconciler.drivers.dns import DnsRecords
    from reconciler.drivers.postfix import AddressSpace, PostfixFacts
    from reconciler.drivers.rental.base import RentalSnapshot
    from reconciler.drivers.upstream import UpstreamFacts

# Observations an apply writes to the journal (kind "observe"), for the gates to count from:
BASELINE = "mailrec/baseline"  # the first apply saw no migration: everyone sent via onprem
# step "dns/mx", detail {"seen": [hosts], "rental": bool}: the MX seen somewhere new
# step "dns/mx-ttl", detail {"lowering": true, "observed": true}: a lowering no apply made
# step "dns/mx-ttl", detail {"seen_ttl": N}: the MX TTL seen while not lowered

CATCH_ALL = "*"  # the state's and the world's name for a virtual `@domain` catch-all
_LEGACY_OUTBOUND = {"rental": Outbound.RELAY}  # acks written before the mode was recorded
_OUTBOUND_BY_VALUE = {mode.value: mode for mode in Outbound}  # Outbound(to), without the call


@dataclass(frozen=True)
class JournalView:
    outbound: dict[str, Outbound]
    mx_ttl_lowered_at: datetime | None
    mx_moved_at: datetime | None
    acked: frozenset[str]
    router_filters: frozenset[int] = frozenset()
    mx_old_ttl: int | None = None
    egress_ips: dict[str, IpAddress] = field(default_factory=dict)
    baseline: bool = False  # the journal saw the world before any migration step
    # Forward targets (`smtp:[host]:port`) a probe message from onprem reached.
    forward_probed: frozenset[str] = frozenset()

    @staticmethod
    def read(journal: Journal | None) -> JournalView:
        if journal is None:
            return JournalView({}, None, None, frozenset())
        # Of the applies, only those read below (not the per-user ones, most of the journal).
        events = journal.events_except_applies(
            applied=("dns/mx-ttl", "dns/mx", "onprem/forward-probe", "router/route/default"),
            applied_prefixes=("router/filter/",))
        outbound: dict[str, Outbound] = {}
        outbound_acks: dict[str, list[Outbound]] = {}  # each user's acked settings, in order
        acked: set[str] = set()
        live: dict[str, bool] = {}
        lowered: datetime | None = None
        old_ttl: int | None = None
        moved: datetime | None = None
        created: set[int] = set()
        egress: dict[str, IpAddress] = {}
        probed: set[str] = set()
        baseline = False
        for event in events:  # in the order they were recorded
            step, detail = event.step or "", event.detail
            if event.kind == "ack" and step and event.result == "withdrawn":
                # A person took an ack back before its step ran: as if never given (an
                # outbound ack: the client setting the ack before it recorded, if any).
                live[step] = False
                kind, _, user = step.partition("/")
                if kind == "outbound" and outbound_acks.get(user):
                    outbound_acks[user].pop()
                    if outbound_acks[user]:
                        outbound[user] = outbound_acks[user][-1]
                    else:
                        outbound.pop(user, None)
            elif event.kind == "ack" and step:
                acked.add(step)
                live[step] = True
                kind, _, user = step.partition("/")
                to = str(detail.get("to", ""))
                if kind == "outbound" and to:
                    outbound[user] = (_LEGACY_OUTBOUND.get(to)
                                      or _OUTBOUND_BY_VALUE.get(to, Outbound.UNKNOWN))
                    outbound_acks.setdefault(user, []).append(outbound[user])
            elif event.kind == "observe":
                if detail.get("ack_spent"):
                    # An ack is spent once the change it confirmed was observed: if the same
                    # change is needed again later, a person must be asked again.
                    live[step] = False
                if step == BASELINE:
                    baseline = True
                elif step == "dns/mx" and "seen" in detail:
                    moved = event.at if detail.get("rental") else None
                elif step == "dns/mx-ttl" and detail.get("lowering"):
                    lowered = event.at
                elif step == "dns/mx-ttl" and isinstance(seen := detail.get("seen_ttl"), int):
                    old_ttl = max(old_ttl or 0, seen)
                    lowered = None  # high again: a later lowering starts a new clock
            elif event.kind == "apply" and event.result == "ok":
                if step == "dns/mx-ttl":
                    if detail.get("lowering"):
                        lowered = event.at
                        before = detail.get("before")
                        if isinstance(before, int):
                            old_ttl = max(old_ttl or 0, before)
                    else:
                        lowered = None  # restored: a later lowering starts a new clock
                elif step == "dns/mx":
                    moved = event.at if detail.get("to") == "rental" else None
                elif step.startswith("router/filter/"):
                    number = detail.get("filter")
                    if isinstance(number, int):
                        (created.add if detail.get("present") else created.discard)(number)
                elif step == "onprem/forward-probe" and isinstance(detail.get("target"), str):
                    probed.add(str(detail["target"]))
                elif step == "router/route/default":
                    recorded = detail.get("egress")
                    # An unreadable record leaves that gateway unknown (MR005 then refuses).
                    if isinstance(recorded, dict):
                        with contextlib.suppress(KeyError, ValueError):
                            egress[str(recorded["gateway"])] = ipaddress.ip_address(
                                str(recorded["address"]))
        return JournalView(
            outbound, lowered, moved, frozenset(s for s in acked if live.get(s)),
            frozenset(created), old_ttl, egress, baseline, frozenset(probed),
        )


def migration_started(*, routed: bool, mx_at_rental: bool, spf_terms: tuple[str, ...],
                      state: DesiredState) -> bool:
    """Whether the world shows any sign that the migration began: someone routed to the
    rental, the MX at the rental, or SPF authorising it. Before that, everyone sends through
    onprem (mailrec's premise); after it, an outbound setting no ack records is unknown."""
    return routed or mx_at_rental or state.rental.spf in spf_terms


def fallback_to_rental(space: AddressSpace, state: DesiredState) -> bool | None:
    """Whether onprem's fallback_transport/luser_relay hands names without an account to the
    rental (True), to somewhere else (None: where those names go is unknown), or is not
    set (False)."""
    settings = [v for v in (space.fallback_transport, space.luser_relay) if v.strip()]
    if not settings:
        return False
    rental = {state.rental.smtp_host.lower().strip("[]."), state.rental.mx_host.lower().rstrip(".")}
    if all(any(host in value.lower() for host in rental) for value in settings):
        return True
    return None


def _unseen(space: AddressSpace, fallback: bool | None) -> tuple[str, ...]:
    unseen = [f"{name} (a table mailrec cannot read)" for name in space.unreadable]
    unseen += [f"mydestination {name} (cannot be expanded)" for name in space.unresolved]
    if fallback is None:
        unseen.append(f"names without an account go to fallback_transport/luser_relay "
                      f"({space.fallback_transport or space.luser_relay})")
    return tuple(unseen)


def build_addresses(state: DesiredState, space: AddressSpace, rental: RentalSnapshot,
                    users: set[str]) -> dict[str, AddressFacts]:
    """Every name onprem receives for that is not a user, with what the rental does with it
    and what the state decides for it."""
    found: dict[str, AddressFacts] = {}
    domain = state.domain.lower()
    if not space.local_domains or domain in space.local_domains:
        for name, members in space.aliases.items():
            found[name] = AddressFacts(AddressKind.ALIAS, members)
    for name, members in space.virtual_aliases.items():
        key = name or CATCH_ALL
        if key not in found:
            found[key] = AddressFacts(AddressKind.CATCH_ALL if not name else AddressKind.VIRTUAL,
                                      members)
    for name, messages in space.other_accounts.items():
        if messages:
            old = found.get(name)
            found[name] = AddressFacts(old.kind if old else AddressKind.ACCOUNT,
                                       old.members if old else (), messages)
    for name in state.aliases:
        found.setdefault(name, AddressFacts(AddressKind.ALIAS))
    result: dict[str, AddressFacts] = {}
    for name, facts in found.items():
        if name in users:
            continue  # a user's name is the user's (their own rules cover it)
        target = state.aliases.get(name)
        keep = None if target is None else ("members" if isinstance(target, list) else target)
        at_rental = name in rental.aliases or name in rental.mailboxes
        result[name] = AddressFacts(facts.kind, facts.members, facts.messages, at_rental,
                                    rental.aliases.get(name), keep)
    return result


def build_world(
    state: DesiredState,
    *,
    postfix: PostfixFacts,
    rental: RentalSnapshot,
    dns: DnsRecords,
    router: RouterFacts | None,
    journal: JournalView,
    now: datetime,
    upstream: Sequence[UpstreamFacts] = (),
) -> World:
    space = postfix.space
    names = (
        set(postfix.accounts) | set(postfix.transport) | set(postfix.recipients)
        | set(rental.mailboxes) | set(journal.outbound) | set(state.users)
        | set(space.stray_mail)
    )
    assume_onprem = journal.baseline or not migration_started(
        routed=bool(postfix.transport), mx_at_rental=dns.mx_hosts == (state.rental.mx_host,),
        spf_terms=dns.spf_terms, state=state)
    expected_route = relay_target(state.rental.smtp_host, state.rental.relay_port)
    fallback = fallback_to_rental(space, state)
    # local_recipient_maps empty: smtpd accepts every name at a local domain (known only
    # when the address space was read).
    accepts_all = space.local_recipient_maps is not None and not space.local_recipient_maps
    users: list[tuple[str, UserFacts]] = []
    append = users.append
    accounts, transport, recipients = postfix.accounts, postfix.transport, postfix.recipients
    partial, stray, mailboxes = postfix.partial_forward, space.stray_mail, rental.mailboxes
    acked_outbound, wanted = journal.outbound, state.users
    # Most users share their facts with many others: one UserFacts per distinct value (100,000
    # users make a few dozen), so the world holds a few dozen objects, not 100,000.
    distinct: dict[tuple[object, ...], UserFacts] = {}
    others = space.other_accounts
    for name in names:
        account = name in accounts
        messages = accounts.get(name, 0)
        if not account and name in wanted and name in others:
            # The state lists an account outside the uid range as a user (an old uid-500
            # person): it is theirs, with its mail; never a user without an account, whose
            # mail the MX move would be allowed to bounce.
            account, messages = True, others[name]
        outbound = acked_outbound.get(name)
        if outbound is None:
            outbound = Outbound.ONPREM if assume_onprem and (
                account or name in wanted) else Outbound.UNKNOWN
        target = transport.get(name)
        via_fallback = fallback is True and target is None and not account
        # UserFacts's fields, in order.
        key = (
            account,  # onprem_account
            messages,  # onprem_messages
            Side.RENTAL if target is not None or via_fallback else Side.ONPREM,  # route
            accepts_all or recipients.get(name, "").upper() == "OK",  # relay_recipient
            name in mailboxes,  # rental_mailbox
            mailboxes.get(name),  # rental_messages
            outbound,
            target is not None and (target != expected_route or name in partial),  # route_drift
            stray.get(name, 0),  # stray_messages
            via_fallback,
        )
        facts = distinct.get(key)
        if facts is None:
            facts = distinct[key] = UserFacts(*key)
        append((name, facts))
    onprem_mx, rental_mx = state.onprem.mx_host, state.rental.mx_host
    sides: dict[tuple[str, ...], Side] = {(onprem_mx,): Side.ONPREM, (rental_mx,): Side.RENTAL}
    mx_side = sides.get(dns.mx_hosts)
    addresses = build_addresses(state, space, rental, names)
    return World.build(
        users,
        onprem=OnpremFacts(
            recipient_validation=postfix.recipient_validation,
            last_mail_at=postfix.last_mail_at,
            retired=postfix.retired,
            unseen=_unseen(space, fallback),
            fallback_to_rental=fallback is True,
            upstream_pending=upstream_pending(state, journal, upstream),
            forward_verified=expected_route in journal.forward_probed,
        ),
        rental=RentalFacts(
            domain_accepted=rental.domain_accepted,
            whitelist=frozenset(rental.whitelist),
            whitelist_verified=rental.whitelist_verified,
            relay_checks=rental.relay_checks,
            notes=rental.notes,
        ),
        dns=DnsFacts(
            mx=mx_side,
            mx_hosts=dns.mx_hosts,
            mx_ttl=dns.mx_ttl,
            spf_terms=dns.spf_terms,
            spf_ttl=dns.spf_ttl,
            soa_serial=dns.soa_serial,
            spf_records=dns.spf_records,
            zone_ttl=dns.zone_ttl,
        ),
        router=router,
        history=History(journal.mx_ttl_lowered_at, journal.mx_moved_at, journal.mx_old_ttl),
        now=now,
        addresses=immutables.Map(addresses),
    )


def upstream_pending(state: DesiredState, journal: JournalView,
                     seen: Sequence[UpstreamFacts] = ()) -> tuple[tuple[str, str], ...]:
    """Relays in front of onprem that may still route or queue mail for it, with why.

    A relay read over SSH is detached when it is seen to route nothing to onprem and to
    queue nothing for the domain. A relay mailrec cannot read needs a person's ack (step
    `upstream/<host>`), and even then an SMTP probe that finds it still accepting the domain
    keeps it pending. Nothing else is trusted: onprem's retirement would bounce whatever the
    relay still queues for it once its queue lifetime runs out."""
    by_host = {f.host: f for f in seen}
    pending: list[tuple[str, str]] = []
    for upstream in state.onprem.upstream:
        facts = by_host.get(upstream.host)
        shown = f" ({facts.detail})" if facts is not None and facts.detail else ""
        if upstream.connect is not None and (facts is None or not facts.observed):
            # mailrec was told to read it and cannot: it waits, no ack replaces the reading.
            pending.append((upstream.host, f"not verified: it could not be read over "
                            f"{upstream.connect}{shown}"))
            continue
        if facts is not None and facts.observed:
            reasons = []
            if facts.routes_to_onprem is not False:
                reasons.append("it routes the domain to onprem" if facts.routes_to_onprem
                               else "its routing could not be read")
            if facts.queued != 0:
                reasons.append(f"it queues {facts.queued} message(s) for the domain"
                               if facts.queued else "its queue could not be read")
            if reasons:
                pending.append((upstream.host, "; ".join(reasons) + shown))
            continue
        if facts is not None and facts.accepts_domain:
            pending.append((upstream.host, "an SMTP probe finds it still accepting mail for "
                            f"the domain{shown}"))
        elif f"upstream/{upstream.host}" not in journal.acked:
            pending.append((upstream.host, "not verified: no ack that it stopped routing to "
                            "onprem"))
    return tuple(pending)


def observations_to_record(world: World, view: JournalView, state: DesiredState,
                           cutover_ttl: int) -> list[tuple[str, dict[str, object]]]:
    """What an apply writes to the journal about the world it saw (kind "observe"), so the
    gates can count from it later: the baseline (no migration yet), the MX TTL while not
    lowered (and that it is high again), the first sight of a lowering or an MX move no
    apply of mailrec's recorded."""
    notes: list[tuple[str, dict[str, object]]] = []
    dns = world.dns
    if (not view.baseline and world.counts.unknown_outbound == 0
            and not migration_started(routed=world.counts.route_rental > 0,
                                      mx_at_rental=world.dns.mx is Side.RENTAL,
                                      spf_terms=world.dns.spf_terms, state=state)):
        notes.append((BASELINE, {"users": world.counts.total}))
    if dns.mx_ttl > cutover_ttl and (
            view.mx_ttl_lowered_at is not None or dns.mx_ttl > (view.mx_old_ttl or 0)):
        notes.append(("dns/mx-ttl", {"seen_ttl": dns.mx_ttl}))
    elif dns.mx_ttl <= cutover_ttl and view.mx_ttl_lowered_at is None:
        notes.append(("dns/mx-ttl", {"lowering": True, "observed": True, "ttl": dns.mx_ttl}))
    at_rental = dns.mx is Side.RENTAL
    if at_rental != (view.mx_moved_at is not None):
        notes.append(("dns/mx", {"seen": list(dns.mx_hosts), "rental": at_rental}))
    return notes


def world_checksum(world: World, state_digest: str = "") -> str:
    """A digest of everything observed (not the clock): a saved plan is applied only while
    the world it was made from is still the world."""
    digest = hashlib.sha256(state_digest.encode())
    # One line per user, hashed as one text: a user's facts are written once per distinct
    # UserFacts object (observe shares them), its name once per user.
    tails: dict[int, str] = {}
    lines: list[str] = []
    for name, facts in sorted(world.users.items()):  # names are unique: facts never compared
        tail = tails.get(id(facts))  # every facts object lives in the world meanwhile
        if tail is None:
            tail = tails[id(facts)] = (
                f"|{facts.onprem_account}|{facts.onprem_messages}|{facts.route}|"
                f"{facts.route_drift}|{facts.relay_recipient}|{facts.rental_mailbox}|"
                f"{facts.outbound}|{facts.stray_messages}|{facts.via_fallback}\n")
        lines.append(name)
        lines.append(tail)
    digest.update("".join(lines).encode())
    for name in sorted(world.addresses.keys()):
        digest.update(f"@{name}|{world.addresses[name]!r}\n".encode())
    rental = world.rental
    whitelist = sorted(map(str, rental.whitelist))
    digest.update(
        repr((world.onprem.recipient_validation, world.onprem.retired,
              rental.domain_accepted, whitelist, rental.whitelist_verified,
              sorted((str(a), r) for a, r in rental.relay_checks),
              world.dns.mx_hosts, world.dns.mx_ttl, world.dns.spf_terms, world.dns.soa_serial,
              world.dns.spf_records, world.router, world.onprem.unseen,
              world.onprem.fallback_to_rental, world.onprem.upstream_pending,
              world.onprem.forward_verified)).encode()
    )
    return digest.hexdigest()[:32]
