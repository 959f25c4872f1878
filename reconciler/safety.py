"""Safety: the invariants every world must satisfy, as functions returning findings.

`check_world` evaluates every rule over a whole world (O(n)); `check_transition` evaluates
only what one step can break: the rules it names for the users it touches, plus the global
rules, which read O(1) aggregates. A property test asserts the two agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from reconciler.context import Context
from reconciler.findings import Finding, subjects_text
from reconciler.model import Side
from reconciler.world import UserFacts, World

GLOBAL_CODES = frozenset({"MR002", "MR003", "MR005", "MR006", "MR007", "MR009", "MR010"})


class Transition(Protocol):
    """What safety needs to know about a step (see `steps.Step`)."""

    @property
    def users(self) -> tuple[str, ...]: ...

    @property
    def affects(self) -> frozenset[str]: ...


_names_cache: dict[str, tuple[object, list[str]]] = {}


def _names(world: World, key: str, test: type[object] | None = None) -> list[str]:
    """Users matching a named predicate; memoised per users-map because refused steps in a
    row see the same world, and listing names is the only O(n) part of a global finding."""
    cached = _names_cache.get(key)
    if cached is not None and cached[0] is world.users:
        return cached[1]
    predicate = _PREDICATES[key]
    names = world.users_where(predicate)
    _names_cache[key] = (world.users, names)
    return names


_PREDICATES = {
    "inbound_onprem": lambda f: f.inbound is Side.ONPREM,
    "outbound_rental": lambda f: f.outbound is Side.RENTAL,
    "outbound_onprem": lambda f: f.outbound is Side.ONPREM,
    "route_rental": lambda f: f.route is Side.RENTAL,
    # Without the map in local_recipient_maps only a real account makes Postfix accept.
    "unaccepted": lambda f: f.route is Side.RENTAL and not f.onprem_account,
    "holding_onprem": lambda f: f.onprem_account and f.onprem_messages > 0,
}


def user_findings(name: str, facts: UserFacts, world: World, ctx: Context) -> list[Finding]:
    """Per-user invariants: MR001 and MR007."""
    found: list[Finding] = []
    if facts.route is Side.RENTAL:
        if not facts.rental_mailbox:
            found.append(
                Finding(
                    "MR001",
                    f"{name} is routed to the rental, but the rental has no mailbox "
                    f"{name}@{ctx.domain}",
                    (name,),
                    f"create the rental mailbox {name} first (step mailbox/{name})",
                )
            )
        if not facts.onprem_accepts:
            found.append(
                Finding(
                    "MR007",
                    f"{name} is routed to the rental but onprem's recipient validation does not "
                    f"accept {name}@{ctx.domain}: Postfix would answer 550",
                    (name,),
                    f"add {name} to mailrec's relay recipient map (step inbound/{name})",
                )
            )
    return found


def global_findings(
    world: World, ctx: Context, codes: Iterable[str] = GLOBAL_CODES
) -> list[Finding]:
    wanted = frozenset(codes)
    counts = world.counts
    found: list[Finding] = []
    if "MR001" in wanted and counts.route_rental and not world.rental.domain_accepted:
        found.append(
            Finding(
                "MR001",
                f"{counts.route_rental} user(s) are routed to the rental, but the rental does "
                f"not accept mail for {ctx.domain}",
                ("rental",),
                f"register {ctx.domain} at the rental service",
            )
        )
    if "MR002" in wanted and counts.outbound_rental and counts.inbound_onprem:
        waiting = _names(world, "inbound_onprem")
        found.append(
            Finding(
                "MR002",
                f"{counts.outbound_rental} user(s) send via the rental while {len(waiting)} "
                f"user(s) still receive onprem "
                f"({subjects_text(waiting)}): the rental would bounce mail to them",
                tuple(waiting[:20]),
                "move every user's inbound to the rental first",
            )
        )
    if "MR003" in wanted and world.dns.mx is Side.RENTAL and counts.inbound_onprem:
        waiting = _names(world, "inbound_onprem")
        found.append(
            Finding(
                "MR003",
                f"the MX names the rental while {len(waiting)} user(s) still receive onprem "
                f"({subjects_text(waiting)})",
                tuple(waiting[:20]),
                "move every user's inbound to the rental before the MX",
            )
        )
    if "MR005" in wanted and counts.outbound_rental and ctx.egress_ip is not None:
        router = world.router
        gateway = router.smtp_gateway() if router else None
        if gateway != ctx.smtp_gateway:
            found.append(
                Finding(
                    "MR005",
                    f"{counts.outbound_rental} user(s) send via the rental on port "
                    f"{ctx.relay_port}, but the router does not route tcp/25 through "
                    f"{ctx.smtp_gateway} (now: {gateway or 'no policy'})",
                    ("router/route/default",),
                    f"apply router/filter/{ctx.smtp_filter} and router/route/default first",
                )
            )
        if not any(ctx.egress_ip in net for net in world.rental.whitelist):
            found.append(
                Finding(
                    "MR005",
                    f"{counts.outbound_rental} user(s) send via the rental without auth, but the "
                    f"egress IP {ctx.egress_ip} is "
                    "not in the rental's relay whitelist",
                    (f"whitelist/{ctx.egress_ip}",),
                    "add a whitelist entry containing the egress IP first",
                )
            )
    if "MR006" in wanted:
        if counts.outbound_rental and not world.dns.spf_has(ctx.rental_spf_term):
            found.append(
                Finding(
                    "MR006",
                    f"{counts.outbound_rental} user(s) send via the rental, but SPF lacks "
                    f"{ctx.rental_spf_term}: "
                    "their mail would be flagged as spam",
                    ("dns/spf",),
                    f"add {ctx.rental_spf_term} to the SPF record first (step dns/spf)",
                )
            )
        if counts.outbound_onprem and not world.dns.spf_has(ctx.onprem_spf_term):
            found.append(
                Finding(
                    "MR006",
                    f"{counts.outbound_onprem} user(s) still send through onprem, but SPF lacks "
                    f"{ctx.onprem_spf_term}",
                    ("dns/spf",),
                    f"keep {ctx.onprem_spf_term} in SPF until nobody sends through onprem",
                )
            )
    if "MR007" in wanted and not world.onprem.recipient_validation:
        unaccepted = counts.route_rental and _names(world, "unaccepted")
        if unaccepted:
            found.append(
                Finding(
                    "MR007",
                    "onprem's local_recipient_maps does not include mailrec's relay recipient "
                    f"map, so {subjects_text(unaccepted)} would be answered 550",
                    ("onprem/recipient-maps",),
                    "apply onprem/recipient-maps first",
                )
            )
    if "MR009" in wanted and world.router is not None:
        found.extend(_router_findings(world))
    if "MR010" in wanted and world.onprem.retired:
        found.extend(_retired_findings(world, ctx))
    return found


def _router_findings(world: World) -> list[Finding]:
    router = world.router
    assert router is not None
    found: list[Finding] = []
    if not router.has_unfiltered_default():
        found.append(
            Finding(
                "MR009",
                "the router would have no unfiltered default route: all other traffic would "
                "stop",
                ("router/route/default",),
                "keep a default gateway without filter in the route",
            )
        )
    defined = router.filters | router.other_filters
    for _, filters in router.default_route or ():
        missing = [f for f in filters if f not in defined]
        if missing:
            found.append(
                Finding(
                    "MR009",
                    f"the default route references filter(s) {missing} that do not exist",
                    tuple(f"router/filter/{f}" for f in missing),
                    "define the filter before the route references it",
                )
            )
    return found


def _retired_findings(world: World, ctx: Context) -> list[Finding]:
    found: list[Finding] = []
    if world.dns.mx is not Side.RENTAL:
        found.append(
            Finding(
                "MR010",
                "onprem is retired while the MX still names it",
                ("onprem/retire", "dns/mx"),
                "move the MX to the rental first",
            )
        )
    if world.counts.outbound_onprem:
        senders = _names(world, "outbound_onprem")
        found.append(
            Finding(
                "MR010",
                f"onprem is retired while {subjects_text(senders)} still send through it",
                tuple(senders[:20]),
                "move every user's outbound to the rental first",
            )
        )
    holding = _names(world, "holding_onprem")
    if holding:
        found.append(
            Finding(
                "MR010",
                f"onprem is retired while mailboxes still hold mail: {subjects_text(holding)}",
                tuple(holding[:20]),
                "let the users drain (or archive) their onprem mailboxes first",
            )
        )
    return found


def transition_findings(
    name: str, before: UserFacts, after: UserFacts, ctx: Context
) -> list[Finding]:
    """Rules about a change rather than a state: MR008 and MR013."""
    found: list[Finding] = []
    if before.onprem_account and not after.onprem_account and before.onprem_messages:
        found.append(
            Finding(
                "MR008",
                f"the onprem mailbox of {name} still holds {before.onprem_messages} message(s)",
                (name,),
                f"let {name} drain it over POP, or archive it, first",
            )
        )
    if before.rental_mailbox and not after.rental_mailbox and (before.rental_messages or 0):
        found.append(
            Finding(
                "MR008",
                f"the rental mailbox of {name} still holds {before.rental_messages} message(s)",
                (name,),
                "archive the messages first",
            )
        )
    if before.inbound is not None and after.inbound is None:
        found.append(
            Finding(
                "MR013",
                f"{name} would have nowhere to receive: onprem would answer 550 for "
                f"{name}@{ctx.domain}",
                (name,),
                f"keep the onprem account of {name} until its mail is routed to the rental",
            )
        )
    return found


def check_world(world: World, ctx: Context) -> list[Finding]:
    """Every invariant over a whole world (O(n)): validation, status, property tests."""
    found: list[Finding] = []
    for name, facts in world.users.items():
        found.extend(user_findings(name, facts, world, ctx))
    found.sort(key=lambda f: (f.code, f.subjects))
    found.extend(global_findings(world, ctx, GLOBAL_CODES | {"MR001"}))
    return found


def check_transition(
    before: World, after: World, step: Transition, ctx: Context
) -> list[Finding]:
    """Findings a step would cause: the per-user rules for the users it touches, and the
    global rules it can affect, evaluated on the world after it."""
    found: list[Finding] = []
    for name in step.users:
        old, new = before.user(name), after.user(name)
        found.extend(transition_findings(name, old, new, ctx))
        found.extend(user_findings(name, new, after, ctx))
    codes = step.affects & (GLOBAL_CODES | {"MR001"})
    if codes:
        caused = global_findings(after, ctx, codes)
        if caused:
            # A violation the world already had, unchanged by this step, does not block it;
            # one it creates or widens (the message carries the counts) does.
            existing = {(f.code, f.message) for f in global_findings(before, ctx, codes)}
            found.extend(f for f in caused if (f.code, f.message) not in existing)
    return found
