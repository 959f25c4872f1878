"""Diff: desired state vs observed world -> the minimal set of steps (unordered).

An unchanged user yields no step; after a successful apply the diff is empty. Transition
steps the admin did not write (create the mailbox before routing, lower the MX TTL before
moving it, authorise the rental in SPF first, filter before route) are added here; their
order is the planner's job.
"""

from __future__ import annotations

from reconciler.context import Context
from reconciler.model import DesiredState, Side
from reconciler.steps import (
    ChangeWhitelist,
    CreateMailbox,
    EnableRecipientMap,
    MoveInbound,
    MoveMx,
    MoveOutbound,
    RemoveOnpremMailbox,
    RetireOnprem,
    SetDefaultRoute,
    SetMxTtl,
    SetRouterFilter,
    SetSpf,
    Step,
)
from reconciler.world import World

ALL_TERMS = ("-all", "~all", "?all", "+all", "all")


def diff(state: DesiredState, world: World, ctx: Context) -> list[Step]:
    steps: list[Step] = []
    steps.extend(_user_steps(state, world, ctx))
    steps.extend(_onprem_steps(state, world, ctx))
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
            if have.route is not Side.RENTAL or not have.onprem_accepts:
                steps.append(MoveInbound(name, Side.RENTAL))
            if have.onprem_account and ctx.remove_drained_accounts:
                steps.append(RemoveOnpremMailbox(name, have.onprem_messages))
        elif have.route is Side.RENTAL:
            steps.append(MoveInbound(name, Side.ONPREM))
        current_outbound = have.outbound or Side.ONPREM
        if want.outbound is not current_outbound:
            steps.append(MoveOutbound(name, want.outbound))
    return steps


def _onprem_steps(state: DesiredState, world: World, ctx: Context) -> list[Step]:
    steps: list[Step] = []
    wants_relay = any(u.inbound is Side.RENTAL for u in state.users.values())
    if wants_relay and not world.onprem.recipient_validation:
        steps.append(EnableRecipientMap())
    if state.onprem.state == "retired" and not world.onprem.retired:
        steps.append(RetireOnprem())
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
        any(u.outbound is Side.ONPREM for u in users) or world.counts.outbound_onprem > 0
    )
    added = list(current)
    if needs_rental and ctx.rental_spf_term not in added:
        _insert_term(added, ctx.rental_spf_term)
    if needs_onprem and ctx.onprem_spf_term not in added:
        _insert_term(added, ctx.onprem_spf_term)
    steps: list[Step] = []
    if added != current:
        steps.append(SetSpf(tuple(world.dns.spf_terms), tuple(added)))
    if retiring and ctx.onprem_spf_term in added:
        final = tuple(t for t in added if t != ctx.onprem_spf_term)
        steps.append(SetSpf(tuple(added), final, retire=True))
    return steps


def _mx_steps(state: DesiredState, world: World, ctx: Context) -> list[Step]:
    want = state.dns.mx
    host = ctx.mx_host(want)
    dns = world.dns
    steps: list[Step] = []
    if dns.mx_hosts != (host,):
        old_ttl = max(dns.mx_ttl, ctx.ttl)
        if dns.mx_ttl > ctx.cutover_ttl:
            steps.append(SetMxTtl(dns.mx_ttl, ctx.cutover_ttl))
        steps.append(MoveMx(want, host, ctx.ttl, old_ttl))
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
    # Filters mailrec created before and no longer wants (renumbered, or policy removed).
    stale = sorted((ctx.router_filters & router.filters) - ({route.filter} if route else set()))
    steps: list[Step] = []
    desired: tuple[tuple[str, tuple[int, ...]], ...] | None
    if route is not None:
        if route.filter not in router.filters:
            steps.append(SetRouterFilter(route.filter, True, smtp_filter_line(route.filter)))
        desired = ((route.gateway, (route.filter,)), (route.otherwise, ()))
    elif stale and router.default_route is not None:
        # The policy is gone: keep the route's gateways that select none of mailrec's filters.
        desired = tuple(
            (gateway, filters) for gateway, filters in router.default_route
            if not set(filters) & set(stale)
        )
    else:
        desired = router.default_route
    if desired and router.default_route != desired:
        steps.append(SetDefaultRoute(router.default_route, desired))
    # Removed only after no route references them (rank CLEANUP; MR009 checks it).
    steps.extend(SetRouterFilter(n, False, smtp_filter_line(n)) for n in stale)
    return steps
