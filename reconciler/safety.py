"""Safety: the invariants every world must satisfy, and the rule that decides whether a step
may run.

Each global rule has a *measure*: a tuple of counts read from the world's O(1) aggregates,
all zero (absent) when the rule holds. `violations(world)` gives every rule's measure;
`check_transition` applies the one principle of the planner and the executor:

    a step may run only if no rule's measure grows in the world after it.

In a safe world that means the world after it satisfies every invariant, whatever the step
claims to touch. In a world that already breaks a rule, only steps that repair it, or that the
simulation proves cannot make it worse, may run; a step that would make an existing violation
worse is held back by it, and the finding says so. Rules about a change rather than a state
(MR008 mailbox deletion, MR013 nowhere to receive, MR014 router filter clash) are checked on
the step's own before/after.

`check_world` lists every violation of a whole world (O(n)) with its message; a property test
asserts it is empty exactly when `violations` is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Protocol

from reconciler.context import Context
from reconciler.findings import Finding, subjects_text
from reconciler.model import Side
from reconciler.safety_addresses import (
    address_findings,
    address_measures,
    egress_spf_findings,
    retired_address_findings,
    retired_address_measure,
    stray_findings,
    unauthorised_egress,
)
from reconciler.safety_router import router_transition_findings
from reconciler.spf import spf_problems, too_wide
from reconciler.world import RouterFacts, UserFacts, World

Measure = tuple[int, ...]


class Transition(Protocol):
    """What safety needs to know about a step (see `steps.Step`)."""

    @property
    def users(self) -> tuple[str, ...]: ...


# --- measures -------------------------------------------------------------------------------

# The DNS, rental and router facts are shared, unchanged, by every world a plan simulates
# after a user step; their rules are worked out once per distinct object, not once per step.
_part_cache: dict[str, tuple[tuple[object, ...], list[str]]] = {}


def _memo(kind: str, parts: tuple[object, ...], compute: Callable[[], list[str]]) -> list[str]:
    cached = _part_cache.get(kind)
    if cached is not None:
        old = cached[0]
        # Identity, not equality: comparing the facts would cost what computing them does.
        if old[0] is parts[0] and old[-1] is parts[-1] and (len(parts) < 3 or old[1] is parts[1]):
            return cached[1]
    result = compute()
    _part_cache[kind] = (parts, result)
    return result


def _egress_problems(world: World, ctx: Context) -> list[str]:
    """Why the office's port-25 submissions may not be accepted by the rental (MR005)."""
    return _memo("egress", (world.router, world.rental, ctx),
                 lambda: _compute_egress_problems(world, ctx))


def _compute_egress_problems(world: World, ctx: Context) -> list[str]:
    router = world.router
    egress = router.smtp_egress() if router is not None else ()
    if not egress:
        return ["tcp/25 has no known way out of the office (no router policy mailrec can see)"]
    problems = []
    for gateway in egress:
        address = ctx.egress_ips.get(gateway)
        if address is None:
            problems.append(f"tcp/25 may leave through {gateway}, whose public address the "
                            "state does not declare")
            continue
        relays = world.rental.relays_for(address)
        if relays is None:
            problems.append(f"tcp/25 leaves through {gateway} as {address}, and the rental's "
                            f"relay whitelist is not verified for {address} (counts as not "
                            "whitelisted)")
        elif not relays:
            problems.append(f"tcp/25 leaves through {gateway} as {address}, which is not in the "
                            "rental's relay whitelist")
    return problems


def _router_problems(router: RouterFacts) -> list[str]:
    problems = []
    if not router.has_unfiltered_default():
        problems.append("the router would have no unfiltered default route: all other traffic "
                        "would stop")
    defined = router.filters | router.other_filters
    missing = sorted({f for _, filters in router.default_route or () for f in filters
                      if f not in defined})
    if missing:
        problems.append(f"the default route references filter(s) {missing} that do not exist")
    return problems


def _spf_problems(world: World, ctx: Context) -> list[str]:
    return _memo("spf", (world.dns, ctx), lambda: _compute_spf_problems(world, ctx))


def _compute_spf_problems(world: World, ctx: Context) -> list[str]:
    problems = spf_problems(world.dns.spf_terms, min_prefix_v4=ctx.whitelist_min_prefix_v4,
                            min_prefix_v6=ctx.whitelist_min_prefix_v6)
    if world.dns.spf_records > 1:
        problems.append(f"the domain has {world.dns.spf_records} v=spf1 records; RFC 7208 "
                        "allows one (receivers answer permerror)")
    return problems


def _wide_whitelist(world: World, ctx: Context) -> list[str]:
    return _memo("whitelist", (world.rental, ctx), lambda: _compute_wide(world, ctx))


def _compute_wide(world: World, ctx: Context) -> list[str]:
    return [str(n) for n in too_wide(world.rental.whitelist,
                                     min_prefix_v4=ctx.whitelist_min_prefix_v4,
                                     min_prefix_v6=ctx.whitelist_min_prefix_v6)]


# The planner checks many steps against the same world (every step that waits in a round),
# and the world after an applied step is the next step's world: the last two are kept.
_recent: list[tuple[World, Context, dict[str, Measure]]] = []


def violations(world: World, ctx: Context) -> dict[str, Measure]:
    """How badly the world breaks each global rule; a rule that holds is absent. O(1) in the
    number of users (the SPF record, the whitelist and the router are small)."""
    for seen, seen_ctx, measures in _recent:
        if seen is world and seen_ctx is ctx:
            return measures
    measures = _measure(world, ctx)
    _recent.insert(0, (world, ctx, measures))
    del _recent[2:]
    return measures


def _measure(world: World, ctx: Context) -> dict[str, Measure]:
    # Once per simulated world (two per step a plan checks): the rules' measures as tuples,
    # a rule present only when some part is non-zero. Spelled out rather than through a
    # helper per rule (10 calls per world), and the rules about the DNS, rental and router
    # facts read once per distinct set of those objects (`_shared_counts`).
    c = world.counts
    found: dict[str, Measure] = {}
    shared = _shared_counts(world, ctx)
    measure: Measure = (c.routed_without_mailbox,
                        0 if world.rental.domain_accepted else c.route_rental)
    if any(measure):
        found["MR001"] = measure
    if c.may_send_rental and c.missed_by_rental:
        found["MR002"] = (c.may_send_rental, c.missed_by_rental)
    if world.dns.mx is Side.RENTAL and c.missed_by_rental:
        found["MR003"] = (c.missed_by_rental,)
    if c.may_relay:
        problems = _egress_problems(world, ctx)
        if problems:
            found["MR005"] = (c.may_relay, len(problems))
    dns = world.dns
    measure = (0 if dns.spf_has(ctx.rental_spf_term) else c.may_send_rental,
               0 if dns.spf_has(ctx.onprem_spf_term) else c.may_send_onprem,
               0 if world.onprem.retired else len(_memo(
                   "egress-spf", (world.router, dns, ctx),
                   lambda: unauthorised_egress(world, ctx))))
    if any(measure):
        found["MR006"] = measure
    unaccepted = (c.routed_unaccepted if world.onprem.recipient_validation
                  else c.routed_without_account)
    if unaccepted:
        found["MR007"] = (unaccepted,)
    if world.router is not None and shared.router:
        found["MR009"] = (shared.router,)
    if world.onprem.retired:
        measure = (int(world.dns.mx is not Side.RENTAL), c.may_send_onprem, c.holding_onprem,
                   *retired_address_measure(world))
        if any(measure):
            found["MR010"] = measure
    if shared.wide_whitelist:
        found["MR016"] = (shared.wide_whitelist,)
    if shared.spf:
        found["MR017"] = (shared.spf,)
    if c.drifted:
        found["MR018"] = (c.drifted,)
    names, accounts = address_measures(world)
    if any(accounts):
        found["MR015"] = accounts
    if any(names):
        found["MR019"] = names
    if c.stray:
        found["MR020"] = (c.stray,)
    return found


class _SharedCounts(NamedTuple):
    """The sizes of the problem lists of the rules read on the DNS, rental and router
    facts alone, whatever the users (MR005 and MR006's office line are read only while
    someone may relay or onprem sends, as `_measure` says)."""

    router: int  # MR009 (0 without a router)
    wide_whitelist: int  # MR016
    spf: int  # MR017


# (router, rental, dns, ctx) -> their counts: one entry, by identity (every world a plan
# simulates after a user step shares these objects).
_shared_cache: list[tuple[tuple[object, ...], _SharedCounts]] = []


def _shared_counts(world: World, ctx: Context) -> _SharedCounts:
    router, rental, dns = world.router, world.rental, world.dns
    if _shared_cache:
        (old_router, old_rental, old_dns, old_ctx), counts = _shared_cache[0]
        if (old_router is router and old_rental is rental and old_dns is dns
                and old_ctx is ctx):
            return counts
    counts = _SharedCounts(
        len(_memo("router", (router,), lambda: _router_problems(router)))
        if router is not None else 0,
        len(_wide_whitelist(world, ctx)),
        len(_spf_problems(world, ctx)),
    )
    _shared_cache[:] = [((router, rental, dns, ctx), counts)]
    return counts


def worse(before: dict[str, Measure], after: dict[str, Measure]) -> list[str]:
    """The rules whose measure grows from `before` to `after` (any component)."""
    grown = []
    for code, measure in after.items():
        old = before.get(code, (0,) * len(measure))
        if any(a > b for a, b in zip(measure, old, strict=True)):
            grown.append(code)
    return grown


# --- messages ----------------------------------------------------------------------------

_names_cache: dict[str, tuple[object, list[str]]] = {}


def _names(world: World, key: str) -> list[str]:
    """Users matching a named predicate; memoised per users-map because refused steps in a
    row see the same world, and listing names is the only O(n) part of a global finding."""
    cached = _names_cache.get(key)
    if cached is not None and cached[0] is world.users:
        return cached[1]
    names = world.users_where(_PREDICATES[key])
    _names_cache[key] = (world.users, names)
    return names


_PREDICATES = {
    "missed_by_rental": lambda f: f.missed_by_rental,
    "may_send_rental": lambda f: f.outbound.may_send_rental,
    "may_send_onprem": lambda f: f.outbound.may_send_onprem,
    "may_relay": lambda f: f.outbound.may_relay,
    "route_rental": lambda f: f.route is Side.RENTAL,
    "routed_without_account": lambda f: f.route is Side.RENTAL and not f.onprem_account,
    "holding_onprem": lambda f: f.onprem_account and f.onprem_messages > 0,
}


def _missed_text(world: World) -> str:
    names = _names(world, "missed_by_rental")
    return (f"{len(names)} user(s) would not get their mail at the rental "
            f"({subjects_text(names)}: still reading onprem, or routed there without a "
            "working rental mailbox)")


def _senders(world: World, key: str, what: str) -> str:
    names = _names(world, key)
    unknown = world.counts.unknown_outbound
    tail = f", {unknown} of them unknown (no ack on record counts as either side)" if (
        unknown and key != "route_rental") else ""
    return f"{len(names)} user(s) {what} ({subjects_text(names)}{tail})"


def user_findings(name: str, facts: UserFacts, world: World, ctx: Context) -> list[Finding]:
    """The per-user rules on one user: MR001, MR007 and MR018."""
    found: list[Finding] = []
    address = f"{name}@{ctx.domain}"
    if facts.route_drift:
        found.append(Finding(
            "MR018", f"onprem's transport entry for {address} is not what mailrec writes for "
            "the state (a changed rental host or port, or a hand edit): its mail goes elsewhere",
            (name,), f"let mailrec rewrite it (step inbound/{name})"))
    if facts.route is Side.RENTAL:
        if not facts.rental_mailbox:
            found.append(Finding(
                "MR001", f"{name} is routed to the rental, but the rental has no mailbox "
                f"{address}", (name,), f"create the rental mailbox {name} first (step "
                f"mailbox/{name})"))
        if not facts.onprem_accepts:
            found.append(Finding(
                "MR007", f"{name} is routed to the rental but onprem's recipient validation does "
                f"not accept {address}: Postfix would answer 550", (name,),
                f"add {name} to mailrec's relay recipient map (step inbound/{name})"))
    return found


def findings_for(world: World, ctx: Context, code: str,
                 users: Iterable[str] | None = None) -> list[Finding]:
    """The findings of one rule over `world`. Per-user rules list `users` only when given
    (the users a step touched), else every user that breaks them."""
    if code in ("MR001", "MR007", "MR018"):
        names = list(users) if users is not None else sorted(world.users.keys())
        found = [f for n in names for f in user_findings(n, world.user(n), world, ctx)
                 if f.code == code]
        return found + _global_user_rule(world, ctx, code)
    return list(_global_findings(world, ctx, code))


def _global_user_rule(world: World, ctx: Context, code: str) -> list[Finding]:
    counts = world.counts
    if code == "MR001" and counts.route_rental and not world.rental.domain_accepted:
        return [Finding("MR001", f"{counts.route_rental} user(s) are routed to the rental, but "
                        f"the rental does not accept mail for {ctx.domain}", ("rental",),
                        f"register {ctx.domain} at the rental service")]
    if code == "MR007" and not world.onprem.recipient_validation and (
            counts.routed_without_account):
        names = _names(world, "routed_without_account")
        return [Finding("MR007", "onprem's local_recipient_maps does not include mailrec's relay "
                        f"recipient map, so {subjects_text(names)} would be answered 550",
                        ("onprem/recipient-maps",), "apply onprem/recipient-maps first")]
    return []


def _global_findings(world: World, ctx: Context, code: str) -> Iterator[Finding]:
    if code == "MR002":
        yield Finding("MR002", f"{_senders(world, 'may_send_rental', 'may send via the rental')} "
                      f"while {_missed_text(world)}: the rental would bounce mail to them",
                      tuple(_names(world, "missed_by_rental")[:20]),
                      "move every user's inbound to a working rental mailbox first")
    elif code == "MR003":
        yield Finding("MR003", f"the MX names the rental while {_missed_text(world)}",
                      tuple(_names(world, "missed_by_rental")[:20]),
                      "move every user's inbound to a working rental mailbox before the MX")
    elif code == "MR005":
        problems = _egress_problems(world, ctx)
        senders = _senders(world, "may_relay", "may submit on port 25 without AUTH")
        yield Finding("MR005", f"{senders}, but {'; '.join(problems)}: their mail would be "
                      "refused",
                      ("router/route/default", "whitelist"),
                      "route tcp/25 through a gateway whose declared egress_ip the rental is seen "
                      "to relay for (an observed whitelist or a relay probe), or move those "
                      "clients to the submission port with AUTH")
    elif code == "MR006":
        yield from egress_spf_findings(world, ctx)
        if world.counts.may_send_rental and not world.dns.spf_has(ctx.rental_spf_term):
            senders = _senders(world, "may_send_rental", "may send via the rental")
            yield Finding("MR006", f"{senders}, but SPF lacks {ctx.rental_spf_term}: their "
                          "mail would be flagged as spam", ("dns/spf",),
                          f"add {ctx.rental_spf_term} to the SPF record first (step dns/spf)")
        if world.counts.may_send_onprem and not world.dns.spf_has(ctx.onprem_spf_term):
            senders = _senders(world, "may_send_onprem", "may send through onprem")
            yield Finding("MR006", f"{senders}, but SPF lacks {ctx.onprem_spf_term}", ("dns/spf",),
                          f"keep {ctx.onprem_spf_term} in SPF until nobody sends through onprem")
    elif code == "MR009" and world.router is not None:
        for problem in _router_problems(world.router):
            yield Finding("MR009", problem, ("router/route/default",),
                          "keep a default gateway without filter, and define a filter before a "
                          "route references it")
    elif code == "MR010" and world.onprem.retired:
        yield from _retired_findings(world)
        yield from retired_address_findings(world)
    elif code in ("MR015", "MR019"):
        yield from address_findings(world, ctx, code)
    elif code == "MR020":
        yield from stray_findings(world, ctx)
    elif code == "MR016":
        wide = _wide_whitelist(world, ctx)
        yield Finding("MR016", f"the rental relays without AUTH for {', '.join(wide)}, wider than "
                      f"/{ctx.whitelist_min_prefix_v4} (IPv4) or /{ctx.whitelist_min_prefix_v6} "
                      "(IPv6): an open relay for strangers", tuple(f"whitelist/{n}" for n in wide),
                      "whitelist only the office's own addresses")
    elif code == "MR017":
        for problem in _spf_problems(world, ctx):
            yield Finding("MR017", f"SPF record \"{' '.join(world.dns.spf_terms)}\": {problem}",
                          ("dns/spf",), "keep the SPF record valid under RFC 7208")


def _retired_findings(world: World) -> Iterator[Finding]:
    if world.dns.mx is not Side.RENTAL:
        yield Finding("MR010", "onprem is retired while the MX still names it",
                      ("onprem/retire", "dns/mx"), "move the MX to the rental first")
    if world.counts.may_send_onprem:
        yield Finding("MR010", f"onprem is retired while "
                      f"{_senders(world, 'may_send_onprem', 'may still send through it')}",
                      tuple(_names(world, "may_send_onprem")[:20]),
                      "move every user's outbound to the rental (and ack it) first")
    if world.counts.holding_onprem:
        holding = _names(world, "holding_onprem")
        yield Finding("MR010", f"onprem is retired while mailboxes still hold mail: "
                      f"{subjects_text(holding)}", tuple(holding[:20]),
                      "let the users drain (or archive) their onprem mailboxes first")


# --- rules about a change --------------------------------------------------------------------


def transition_findings(
    name: str, before: UserFacts, after: UserFacts, ctx: Context
) -> list[Finding]:
    """Rules about a change rather than a state: MR008 and MR013."""
    found: list[Finding] = []
    if before.onprem_account and not after.onprem_account and before.onprem_messages:
        found.append(Finding(
            "MR008", f"the onprem mailbox of {name} still holds {before.onprem_messages} "
            "message(s)", (name,), f"let {name} drain it over POP, or archive it, first"))
    if before.rental_mailbox and not after.rental_mailbox and (
            before.rental_messages is None or before.rental_messages):
        held = ("an unknown number of" if before.rental_messages is None
                else str(before.rental_messages))
        found.append(Finding(
            "MR008", f"the rental mailbox of {name} still holds {held} message(s)", (name,),
            "archive the messages first"))
    if before.inbound is not None and after.inbound is None:
        found.append(Finding(
            "MR013", f"{name} would have nowhere to receive: onprem would answer 550 for "
            f"{name}@{ctx.domain}", (name,),
            f"keep the onprem account of {name} until its mail is routed to the rental"))
    return found


def relay_route_findings(before: World, after: World, ctx: Context) -> list[Finding]:
    """MR005 for a route change while anyone may relay: the office's tcp/25 may move only to
    gateways whose address the rental is seen to relay for. (Moving from one unverified
    gateway to another is no worse by count, but nothing proves it safe.)"""
    old, new = before.router, after.router
    if old is None or new is None or old is new or not after.counts.may_relay or old == new:
        return []
    moved_to = set(new.smtp_egress()) - set(old.smtp_egress())
    unverified = sorted(g for g in moved_to
                        if (address := ctx.egress_ips.get(g)) is None
                        or after.rental.relays_for(address) is not True)
    if not unverified:
        return []
    senders = _senders(after, "may_relay", "may submit on port 25 without AUTH")
    return [Finding(
        "MR005", f"{senders}, and this route change sends tcp/25 out through "
        f"{', '.join(unverified)}, whose address the rental is not seen to relay for",
        ("router/route/default",),
        "move those clients to the submission port with AUTH first (outbound/<user>)")]


# --- the two checks ---------------------------------------------------------------------------


def check_world(world: World, ctx: Context) -> list[Finding]:
    """Every violation of a whole world, with messages (O(n)): status, drift, tests."""
    found: list[Finding] = []
    for code in sorted(violations(world, ctx)):
        found.extend(findings_for(world, ctx, code))
    return found


def check_transition(
    before: World, after: World, step: Transition, ctx: Context
) -> list[Finding]:
    """Why the step from `before` to `after` may not run: the change rules on what it
    touched, and every rule whose measure it makes grow. Empty: it may run."""
    found: list[Finding] = []
    for name in step.users:
        found.extend(transition_findings(name, before.user(name), after.user(name), ctx))
    found.extend(router_transition_findings(before.router, after.router, ctx))
    found.extend(relay_route_findings(before, after, ctx))
    old = violations(before, ctx)
    new = violations(after, ctx)
    for code in worse(old, new):
        caused = findings_for(after, ctx, code, users=step.users if step.users else None)
        if not caused:  # a per-user rule broken by a user the step did not touch
            caused = findings_for(after, ctx, code)
        if code in old:
            caused = [Finding(f.code, f"already broken in the observed world, and this step "
                              f"would make it worse: {f.message}", f.subjects, f.remedy,
                              f.severity) for f in caused]
        found.extend(caused)
    return found


__all__ = ["Measure", "check_transition", "check_world", "findings_for",
           "router_transition_findings", "user_findings", "violations", "worse"]
