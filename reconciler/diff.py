"""Diff: desired state vs observed world -> the minimal set of steps (unordered).

An unchanged user yields no step; after a successful apply the diff is empty. Transition
steps the admin did not write (create the mailbox before routing, lower the MX TTL before
moving it, authorise the rental in SPF first, filter before route) are added here; their
order is the planner's job.
"""

from __future__ import annotations

from collections.abc import Set

from reconciler.context import Context, spf_ip_term
from reconciler.model import DesiredState, Side, SmtpRoute
from reconciler.steps import (
    ChangeWhitelist,
    CreateAlias,
    CreateMailbox,
    DetachUpstream,
    EnableRecipientMap,
    MoveInbound,
    MoveMx,
    MoveOutbound,
    ProbeForward,
    RemoveFallback,
    RemoveOnpremMailbox,
    RetireOnprem,
    SetDefaultRoute,
    SetMxTtl,
    SetRouterFilter,
    SetSpf,
    Step,
)
from reconciler.world import RouteEntries, World

ALL_TERMS = ("-all", "~all", "?all", "+all", "all")


def diff(state: DesiredState, world: World, ctx: Context) -> list[Step]:
    steps: list[Step] = []
    steps.extend(_user_steps(state, world, ctx))
    steps.extend(_onprem_steps(state, world, ctx))
    steps.extend(_alias_steps(state, world))
    steps.extend(_spf_steps(state, world, ctx))
    steps.extend(_mx_steps(state, world, ctx))
    steps.extend(_whitelist_steps(state, world))
    steps.extend(_router_steps(state, world, ctx))
    return steps


def _user_steps(state: DesiredState, world: World, ctx: Context) -> list[Step]:
    steps: list[Step] = []
    for name, want in state.users.items():
        have = world.user(name)
        if want.inbound is Side.RENTAL:
            if not have.rental_mailbox:
                steps.append(CreateMailbox(name))
            # A user the seed's fallback_transport carries gets mailrec's own entry (adopted).
            if (have.route is not Side.RENTAL or have.route_drift or not have.onprem_accepts
                    or have.via_fallback):
                steps.append(MoveInbound(name, Side.RENTAL, ctx.incoming_host))
            if have.onprem_account and ctx.remove_drained_accounts:
                steps.append(RemoveOnpremMailbox(name, have.onprem_messages))
        elif have.route is Side.RENTAL:
            steps.append(MoveInbound(name, Side.ONPREM, ctx.onprem_mx.rstrip(".")))
        outbound = ctx.outbound_for(want.outbound)
        if have.outbound is not outbound:
            steps.append(MoveOutbound(name, outbound))
    return steps


def _onprem_steps(state: DesiredState, world: World, ctx: Context) -> list[Step]:
    steps: list[Step] = []
    wants_relay = any(u.inbound is Side.RENTAL for u in state.users.values())
    if wants_relay and not world.onprem.forward_verified and not world.onprem.retired:
        steps.append(ProbeForward(ctx.forward_target))
    if wants_relay and not world.onprem.recipient_validation:
        steps.append(EnableRecipientMap())
    if state.onprem.state == "retired" and not world.onprem.retired:
        steps.append(RetireOnprem())
    if world.onprem.fallback_to_rental:
        carried = tuple(world.users_where(lambda f: f.via_fallback))
        steps.append(RemoveFallback(carried))
    if state.onprem.state == "retired":
        readable = {u.host for u in state.onprem.upstream if u.connect is not None}
        steps.extend(DetachUpstream(host, state.onprem.mx_host, host in readable)
                     for host, _ in world.onprem.upstream_pending)
    return steps


def _alias_steps(state: DesiredState, world: World) -> list[Step]:
    steps: list[Step] = []
    for name in sorted(state.aliases):
        members = state.alias_members(name)
        if members is None:
            continue  # rental / onprem / drop: nothing for mailrec to create
        have = world.addresses.get(name)
        if have is None or not have.at_rental or (
                have.rental_members is not None and have.rental_members != members):
            steps.append(CreateAlias(name, members))
    return steps


def _insert_term(terms: list[str], term: str) -> None:
    """Add an SPF term before the `all` mechanism, keeping every other term as it is."""
    for index, existing in enumerate(terms):
        if existing.lower() in ALL_TERMS or existing.startswith("redirect="):
            terms.insert(index, term)
            return
    terms.append(term)


def _spf_steps(state: DesiredState, world: World, ctx: Context) -> list[Step]:
    current = list(world.dns.spf_terms) or ["v=spf1", "~all"]
    users = state.users.values()
    needs_rental = state.dns.mx is Side.RENTAL or any(u.outbound is Side.RENTAL for u in users)
    retiring = state.onprem.state == "retired" and not any(
        u.outbound is Side.ONPREM for u in users
    )
    needs_onprem = not retiring and (
        any(u.outbound is Side.ONPREM for u in users) or world.counts.may_send_onprem > 0
    )
    added = list(current)
    if needs_rental and ctx.rental_spf_term not in added:
        _insert_term(added, ctx.rental_spf_term)
    if needs_onprem and ctx.onprem_spf_term not in added:
        _insert_term(added, ctx.onprem_spf_term)
    # The policy route sends every LAN host's tcp/25 through the new line, onprem's own mail
    # (and a relay in front of it) included: that line must pass SPF while onprem sends.
    egress = _egress_term(state)
    onprem_sends = state.onprem.state != "retired"
    if egress and onprem_sends and egress not in added:
        _insert_term(added, egress)
    steps: list[Step] = []
    if added != current:
        steps.append(SetSpf(tuple(world.dns.spf_terms), tuple(added)))
    retired_terms = {ctx.onprem_spf_term} if retiring else set()
    if egress and not onprem_sends:
        retired_terms.add(egress)
    if retired_terms & set(added):
        final = tuple(t for t in added if t not in retired_terms)
        steps.append(SetSpf(tuple(added), final, retire=True))
    return steps


def _egress_term(state: DesiredState) -> str | None:
    route = state.router.smtp_route if state.router else None
    if route is None or route.egress_ip == state.onprem.public_ip:
        return None
    return spf_ip_term(route.egress_ip)


def _mx_steps(state: DesiredState, world: World, ctx: Context) -> list[Step]:
    want = state.dns.mx
    host = ctx.mx_host(want)
    dns = world.dns
    steps: list[Step] = []
    if dns.mx_hosts != (host,):
        if dns.mx_ttl > ctx.cutover_ttl:
            steps.append(SetMxTtl(dns.mx_ttl, ctx.cutover_ttl))
        steps.append(MoveMx(want, host, ctx.ttl))
    elif dns.mx_ttl != ctx.ttl:
        steps.append(SetMxTtl(dns.mx_ttl, ctx.ttl))
    return steps


def _whitelist_steps(state: DesiredState, world: World) -> list[Step]:
    want = set(state.rental.whitelist)
    have = set(world.rental.whitelist)
    steps: list[Step] = [ChangeWhitelist(str(n), True) for n in sorted(want - have, key=str)]
    steps.extend(ChangeWhitelist(str(n), False) for n in sorted(have - want, key=str))
    return steps


def smtp_filter_line(number: int) -> str:
    return f"ip filter {number} pass * * tcp * smtp"


def _router_steps(state: DesiredState, world: World, ctx: Context) -> list[Step]:
    router = world.router
    if state.router is None or router is None:
        return []
    route = state.router.smtp_route
    # Filters mailrec created before and no longer wants (renumbered, or policy removed);
    # only the journal says which filters are mailrec's.
    stale = sorted((ctx.router_filters & router.filters) - ({route.filter} if route else set()))
    steps: list[Step] = []
    if route is not None and route.filter not in router.filters:
        steps.append(SetRouterFilter(route.filter, True, smtp_filter_line(route.filter)))
    current = router.default_route
    if current is not None:
        # mailrec's own entries select one of its filters that is still its unchanged smtp
        # pass; a number whose line someone changed belongs to them now (MR014).
        owned = (ctx.router_filters & router.filters) | (
            {route.filter} if route and route.filter not in router.other_filters else set())
        desired = desired_route(current, route, owned)
        if desired != current:
            egress = (route.gateway, str(route.egress_ip)) if route else None
            steps.append(SetDefaultRoute(current, desired, egress))
    # Removed only after no route references them (rank CLEANUP; MR009 checks it).
    steps.extend(SetRouterFilter(n, False, smtp_filter_line(n)) for n in stale)
    return steps


def desired_route(current: RouteEntries, route: SmtpRoute | None,
                  owned: Set[int]) -> RouteEntries:
    """The default route with mailrec's own entry set and nothing else changed.

    mailrec's entries are those selecting exactly one of the `owned` filters (the state's
    number, or one the journal says mailrec created, while still its smtp pass). Every other
    entry, the admin's, keeps its place.
    mailrec's entry keeps its place if it had one, else goes before the first unfiltered
    gateway (after the admin's filtered entries, which keep their precedence: if one of
    them catches tcp/25 first, safety refuses the route and names it). The first unfiltered
    gateway becomes `otherwise` unless `otherwise` is one of them already. Without a route
    in the state, mailrec's entries are dropped.
    """
    mine = set(owned)
    entries: list[tuple[str, tuple[int, ...]]] = []
    at: int | None = None
    for gateway, filters in current:
        if len(filters) == 1 and filters[0] in mine:
            at = len(entries) if at is None else at
            continue
        entries.append((gateway, filters))
    if route is None:
        return tuple(entries)
    unfiltered = [i for i, (_, filters) in enumerate(entries) if not filters]
    if not any(entries[i][0] == route.otherwise for i in unfiltered):
        if unfiltered:
            entries[unfiltered[0]] = (route.otherwise, ())
        else:
            entries.append((route.otherwise, ()))
    first_unfiltered = next(i for i, (_, filters) in enumerate(entries) if not filters)
    where = first_unfiltered if at is None else min(at, first_unfiltered)
    entries.insert(where, (route.gateway, (route.filter,)))
    return tuple(entries)
