"""Property tests of the planner on generated worlds, hostile ones included.

The worlds may already break rules (routed users without mailboxes, drifted transport
entries, unknown outbound settings, a wide whitelist, a bad SPF record, a broken router), the
journal may be missing or partial (no record of the lowering, of the move, of the old TTL, of
which filters are mailrec's), TTLs may have been lowered by hand, and the router carries an
admin's own gateways, filters and filter references.

- No ready step makes any rule's violation grow (the planner's one principle), and from a
  safe world no ready step leads to an unsafe one.
- The full check and the measures agree; the incremental check is sound against the full one.
- Without a journal every gate waits at least as long as with one.
- The admin's router entries, filters and references survive every plan unchanged.
- Applying plans in the simulation (gates opening, people acking, random failures) reaches
  the desired state, or stops at refusals that carry findings.
- A plan's checksum changes with any observed change (a stale plan is detectable).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import immutables
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.context import Context
from reconciler.diff import diff
from reconciler.model import DesiredState, Side
from reconciler.observe import world_checksum
from reconciler.plan import Plan, Status, make_plan
from reconciler.safety import (
    check_transition,
    check_world,
    router_transition_findings,
    transition_findings,
    violations,
    worse,
)
from reconciler.steps import (
    ChangeWhitelist,
    CreateAlias,
    CreateMailbox,
    DetachUpstream,
    MoveOutbound,
    RemoveOnpremMailbox,
    Step,
)
from reconciler.world import (
    AddressFacts,
    AddressKind,
    Coverage,
    DnsFacts,
    FilterVerdict,
    History,
    OnpremFacts,
    Outbound,
    RentalFacts,
    RouteEntries,
    RouterFacts,
    UserFacts,
    World,
)

NAMES = ["suga", "tanaka", "sato", "ito", "kato"]
ONPREM_MX, RENTAL_MX = "mail.example.co.jp.", "example.sakura.ne.jp."
ONPREM_SPF, RENTAL_SPF = "ip4:198.51.100.10", "include:_spf.example.sakura.ne.jp"
OFFICE = ipaddress.ip_network("203.0.113.8/29")
OTHER = ipaddress.ip_network("192.0.2.0/24")
EVERYONE = ipaddress.ip_network("0.0.0.0/0")
EGRESS = ipaddress.ip_address("203.0.113.9")
START = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
OURS = {10, 20}  # the filter numbers the state may give mailrec's policy

sides = st.sampled_from([Side.ONPREM, Side.RENTAL])

# An admin's filters: (line, verdict for the office's SMTP traffic).
ADMIN_FILTERS: dict[int, tuple[str, FilterVerdict]] = {
    1: ("ip filter 1 pass 192.168.0.0/24 * * * *", FilterVerdict(True, Coverage.ALL)),
    500: ("ip filter 500 pass * 10.0.0.0/8 * * *", FilterVerdict(True, Coverage.SOME)),
    1010: ("ip filter 1010 reject * * udp,tcp 135 *", FilterVerdict(False, Coverage.NONE)),
    30: ("ip filter 30 reject * * tcp * telnet", FilterVerdict(False, Coverage.NONE)),
}
ADMIN_ENTRIES: list[tuple[str, tuple[int, ...]]] = [("192.0.2.1", (1,)), ("pp 1", (500,)),
                                                     ("tunnel 9", (1010,))]


@st.composite
def user_facts(draw: st.DrawFn) -> UserFacts:
    account = draw(st.booleans())
    route = draw(sides)
    return UserFacts(
        onprem_account=account,
        onprem_messages=draw(st.integers(0, 2)) if account else 0,
        route=route,
        relay_recipient=draw(st.booleans()),
        rental_mailbox=draw(st.booleans()),
        rental_messages=draw(st.sampled_from([None, 0, 1])),
        outbound=draw(st.sampled_from(list(Outbound))),
        route_drift=route is Side.RENTAL and draw(st.integers(0, 4)) == 0,
        # Mail local(8) delivered after mailrec archived the mailbox (MR020), and users the
        # seed's fallback_transport carries to the rental (their account deleted by hand).
        stray_messages=draw(st.sampled_from([0, 0, 0, 2])) if not account else 0,
        via_fallback=route is Side.RENTAL and not account and draw(st.integers(0, 3)) == 0,
    )


ALIAS_NAMES = ["info", "sales", "postmaster", "yamada"]


@st.composite
def address_maps(draw: st.DrawFn) -> immutables.Map[str, AddressFacts]:
    """What onprem receives for besides users: aliases, virtual aliases, an old account
    holding mail; each maybe at the rental already, maybe declared by a state."""
    found = {}
    for name in draw(st.lists(st.sampled_from(ALIAS_NAMES), unique=True, max_size=3)):
        kind = draw(st.sampled_from(list(AddressKind)))
        found[name] = AddressFacts(
            kind, ("suga",), draw(st.sampled_from([0, 3])) if kind is AddressKind.ACCOUNT else 0,
            at_rental=draw(st.booleans()), keep=draw(st.sampled_from(
                [None, "members", "rental", "onprem", "drop"])))
    return immutables.Map(found)


@st.composite
def routers(draw: st.DrawFn) -> RouterFacts:
    """A router with mailrec's policy in some state, and an admin's lines around it."""
    admin = {n for n in ADMIN_FILTERS if draw(st.booleans())}
    # A filter number may also be taken by an admin line in another namespace (MR014).
    references: dict[int, tuple[str, ...]] = {}
    if draw(st.booleans()):
        references[1010] = ("ip lan2 secure filter in 1010 1011 1012",)
    if draw(st.integers(0, 3)) == 0:
        references[draw(st.sampled_from(sorted(OURS)))] = ("ipv6 filter 20 pass * * tcp * smtp",)
    clash = draw(st.integers(0, 4)) == 0  # the admin defined 10 as something else
    smtp = frozenset(n for n in OURS if draw(st.booleans()) and not (clash and n == 10))
    other = frozenset(admin | ({10} if clash else set()))
    lines = {n: ADMIN_FILTERS[n][0] for n in admin}
    verdicts = {n: ADMIN_FILTERS[n][1] for n in admin}
    if clash:
        lines[10] = "ip filter 10 reject * * tcp * telnet"
        verdicts[10] = FilterVerdict(False, Coverage.NONE)
    for number in smtp:
        lines[number] = f"ip filter {number} pass * * tcp * smtp"
    entries = [e for e in ADMIN_ENTRIES if draw(st.booleans())]
    if smtp and draw(st.booleans()):
        entries.append(("192.168.0.254", (min(smtp),)))
    if draw(st.integers(0, 9)):  # rarely, a route without an unfiltered gateway (MR009)
        entries.append((draw(st.sampled_from(["tunnel 2", "tunnel 1"])), ()))
    if draw(st.booleans()):
        entries = draw(st.permutations(entries))
    default: RouteEntries | None = tuple(entries) if draw(st.integers(0, 9)) else None
    return RouterFacts(filters=smtp, other_filters=other, default_route=default,
                       verdicts=verdicts, filter_lines=lines, references=references)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=5))
    users = {n: draw(user_facts()) for n in names}
    mx = draw(sides)
    spf = ["v=spf1"]
    spf += [t for t in (ONPREM_SPF, RENTAL_SPF) if draw(st.booleans())]
    if draw(st.integers(0, 6)) == 0:
        spf.append("ip4:0.0.0.0/1")  # a hostile record: far too wide (MR017)
    spf.append(draw(st.sampled_from(["~all", "-all", "+all"]) if draw(st.integers(0, 5)) == 0
                    else st.just("~all")))
    ttl = draw(st.sampled_from([300, 3600, 86400]))
    # Partial journals: any of the records may be missing, and a low TTL may have been
    # lowered by hand (no record of when, nor of what it was before).
    lowered = START - timedelta(hours=draw(st.integers(0, 30))) if (
        ttl == 300 and draw(st.booleans())) else None
    old_ttl = draw(st.sampled_from([None, 300, 3600, 86400]))
    moved = START - timedelta(hours=draw(st.integers(0, 100))) if (
        mx is Side.RENTAL and draw(st.booleans())) else None
    whitelist = frozenset(n for n in (OFFICE, OTHER, EVERYONE) if draw(st.booleans())
                          and (n != EVERYONE or draw(st.booleans())))
    verified = draw(st.booleans())
    checks = ((EGRESS, draw(st.booleans())),) if draw(st.booleans()) else ()
    upstream = (("relay.example.co.jp.", "not verified"),) if draw(
        st.integers(0, 4)) == 0 else ()
    return World.build(
        users,
        onprem=OnpremFacts(recipient_validation=draw(st.booleans()),
                           last_mail_at=START - timedelta(hours=draw(st.integers(0, 100))),
                           retired=draw(st.integers(0, 9)) == 0,
                           unseen=("ldap:/etc/postfix/ldap.cf",) if draw(
                               st.integers(0, 6)) == 0 else (),
                           fallback_to_rental=any(f.via_fallback for f in users.values()),
                           upstream_pending=upstream,
                           forward_verified=draw(st.integers(0, 3)) > 0),
        rental=RentalFacts(domain_accepted=draw(st.integers(0, 9)) > 0, whitelist=whitelist,
                           whitelist_verified=verified, relay_checks=checks),
        dns=DnsFacts(mx=mx, mx_hosts=(ONPREM_MX if mx is Side.ONPREM else RENTAL_MX,),
                     mx_ttl=ttl, spf_terms=tuple(spf), spf_ttl=draw(st.sampled_from([300, 3600])),
                     spf_records=draw(st.sampled_from([1, 1, 1, 2])),
                     zone_ttl=draw(st.sampled_from([0, 3600, 86400]))),
        router=draw(routers()),
        history=History(mx_ttl_lowered_at=lowered, mx_moved_at=moved, mx_old_ttl=old_ttl),
        now=START,
        addresses=draw(address_maps()),
    )


BASE: dict[str, Any] = {
    "version": 1,
    "domain": "example.co.jp",
    "onprem": {"connect": "local:/", "mx_host": ONPREM_MX, "public_ip": "198.51.100.10"},
    "rental": {"mx_host": RENTAL_MX, "smtp_host": "example.sakura.ne.jp", "spf": RENTAL_SPF},
    "dns": {"provider": "lab", "ttl": 3600, "cutover_ttl": 300},
    "router": {
        "provider": "lab", "connect": "ssh://admin@192.168.0.1", "admin_password": "env:X",
        "smtp_route": {"filter": 10, "gateway": "192.168.0.254", "otherwise": "tunnel 2",
                       "egress_ip": str(EGRESS)},
    },
}


@st.composite
def desired_states(draw: st.DrawFn) -> DesiredState:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=1, max_size=5))
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    data["users"] = {n: {"inbound": str(draw(sides)), "outbound": str(draw(sides))}
                     for n in names}
    data["dns"] = {**BASE["dns"], "mx": str(draw(sides))}
    data["onprem"] = {**BASE["onprem"], "state": draw(st.sampled_from(["active", "retired"]))}
    wanted = [n for n in (OFFICE, OTHER) if draw(st.booleans())]
    if draw(st.integers(0, 5)) == 0:
        wanted.append(EVERYONE)  # an open relay asked for: refused, never applied (MR016)
    data["rental"] = {**BASE["rental"], "whitelist": [str(n) for n in wanted]}
    data["policy"] = {"max_change_pct": draw(st.sampled_from([30, 100])), "quiet_period": "48h"}
    policy = draw(st.sampled_from([10, 20, None]))  # renumbered, or the policy removed
    route = {**BASE["router"]["smtp_route"], "filter": policy} if policy else None
    data["router"] = {**BASE["router"], "smtp_route": route}
    data["aliases"] = {n: draw(st.sampled_from([["suga@example.net"], "rental", "onprem",
                                                "drop"]))
                       for n in draw(st.lists(st.sampled_from(ALIAS_NAMES), unique=True,
                                              max_size=3)) if n not in names}
    if draw(st.booleans()):
        data["onprem"]["upstream"] = [{"host": "relay.example.co.jp."}]
    return DesiredState.model_validate(data)


@st.composite
def journals(draw: st.DrawFn) -> dict[str, Any]:
    """What the journal may remember: which filters mailrec created, and which gateway it
    routed through with which address (each possibly lost)."""
    return {
        "router_filters": frozenset(n for n in OURS if draw(st.booleans())),
        "egress_ips": {"192.168.0.254": EGRESS} if draw(st.booleans()) else {},
    }


def plan_for(state: DesiredState, world: World, journal: dict[str, Any],
             allow_bulk: bool = False) -> tuple[Plan, Context]:
    ctx = Context.of(state, allow_bulk=allow_bulk, **journal)
    return make_plan(state, world, diff(state, world, ctx), ctx), ctx


def ready_steps(plan: Plan) -> list[Step]:
    return [p.step for p in plan.by_status(Status.READY)]


PROPERTY = settings(max_examples=int(os.environ.get("MAILREC_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(worlds(), desired_states(), journals(), st.booleans())
def test_no_ready_step_makes_any_violation_worse(world: World, state: DesiredState,
                                                 journal: dict[str, Any], bulk: bool) -> None:
    plan, ctx = plan_for(state, world, journal, bulk)
    current = world
    for step in ready_steps(plan):
        after = step.simulate(current)
        assert worse(violations(current, ctx), violations(after, ctx)) == [], step.id
        for name in step.users:
            assert transition_findings(name, current.user(name), after.user(name), ctx) == []
        assert router_transition_findings(current.router, after.router, ctx) == [], step.id
        if not check_world(current, ctx):
            assert check_world(after, ctx) == [], f"{step.id} led to an unsafe world"
        current = after


@PROPERTY
@given(worlds(), desired_states(), journals())
def test_full_check_and_measures_agree(world: World, state: DesiredState,
                                       journal: dict[str, Any]) -> None:
    ctx = Context.of(state, **journal)
    assert {f.code for f in check_world(world, ctx)} == set(violations(world, ctx))


@PROPERTY
@given(worlds(), desired_states(), journals())
def test_incremental_check_is_sound(world: World, state: DesiredState,
                                    journal: dict[str, Any]) -> None:
    """A step the incremental check passes breaks no rule the world did not break before."""
    ctx = Context.of(state, **journal)
    before = {f.code for f in check_world(world, ctx)}
    for step in diff(state, world, ctx):
        after = step.simulate(world)
        if not check_transition(world, after, step, ctx):
            assert {f.code for f in check_world(after, ctx)} <= before, step.id


@PROPERTY
@given(worlds(), desired_states(), journals())
def test_without_a_journal_every_gate_waits_at_least_as_long(
        world: World, state: DesiredState, journal: dict[str, Any]) -> None:
    ctx = Context.of(state, **journal)
    forgotten = replace(world, history=History())
    for step in diff(state, world, ctx):
        remembered = step.gate(world, ctx)
        if remembered is None:
            continue
        lost = step.gate(forgotten, ctx)
        assert lost is not None, f"{step.id} opens only because the journal is gone"
        if remembered.until is not None:
            assert lost.until is not None and lost.until >= remembered.until, step.id


def _admin_entries(route: RouteEntries | None, mine: set[int]) -> list[tuple[str, tuple[int,
                                                                                         ...]]]:
    return [e for e in route or () if not (len(e[1]) == 1 and e[1][0] in mine) and e[1]]


@PROPERTY
@given(worlds(), desired_states(), journals())
def test_the_admins_router_lines_survive_every_plan(world: World, state: DesiredState,
                                                    journal: dict[str, Any]) -> None:
    plan, ctx = plan_for(state, world, journal, allow_bulk=True)
    current = world
    for step in ready_steps(plan):
        current = step.simulate(current)
    before, after = world.router, current.router
    assert before is not None and after is not None
    mine = set(OURS)
    assert _admin_entries(after.default_route, mine) == _admin_entries(before.default_route, mine)
    for number in before.other_filters:
        assert after.filter_lines.get(number) == before.filter_lines.get(number), number
        assert number in after.other_filters
    assert after.references == before.references
    # A filter mailrec did not create is never removed.
    assert before.filters - after.filters <= ctx.router_filters


def _open_gates(world: World, plan: Plan, ctx: Context) -> World:
    """What the outside world does between two runs: time passes, an apply records what it
    saw (as `observe.observations_to_record`), people drain mailboxes, create mailboxes and
    whitelist entries in the panel, and change or confirm mail clients (acks)."""
    world = replace(world, now=world.now + timedelta(days=3))
    history = world.history
    if history.mx_ttl_lowered_at is None and world.dns.mx_ttl <= ctx.cutover_ttl:
        history = replace(history, mx_ttl_lowered_at=world.now)
    if history.mx_moved_at is None and world.dns.mx is Side.RENTAL:
        history = replace(history, mx_moved_at=world.now)
    world = replace(world, history=history)
    for planned in plan.by_status(Status.GATED):
        step = planned.step
        if isinstance(step, RemoveOnpremMailbox):
            world = world.update_user(step.user, onprem_messages=0)
        if isinstance(step, MoveOutbound | CreateMailbox | ChangeWhitelist | CreateAlias
                      | DetachUpstream) and not planned.findings:
            # The person did it and acked; `mailrec ack` checks the step against the world
            # as it is, not as the plan would leave it.
            after = step.simulate(world)
            if not check_transition(world, after, step, ctx):
                world = after
    return world


@PROPERTY
@given(worlds(), desired_states(), journals(), st.lists(st.integers(0, 6), max_size=4))
def test_reachable_states_converge(world: World, state: DesiredState, journal: dict[str, Any],
                                   failures: list[int]) -> None:
    failures = list(failures)
    plan = None
    for _round in range(12):
        plan, ctx = plan_for(state, world, journal, allow_bulk=True)
        ready = ready_steps(plan)
        # A random step fails (driver error): the run stops there, the next run resumes.
        stop_at = failures.pop(0) if failures else len(ready)
        for step in ready[:stop_at]:
            after = step.simulate(world)
            assert not worse(violations(world, ctx), violations(after, ctx))
            world = after
        world = _open_gates(world, plan, ctx)
    assert plan is not None
    final, ctx = plan_for(state, world, journal, allow_bulk=True)
    pending = [p for p in final.steps if p.status is not Status.REFUSED]
    assert pending == [], [str(p.step) for p in pending]
    refused = final.by_status(Status.REFUSED)
    for planned in refused:
        assert planned.findings, f"{planned.id} refused without a finding"
    if not refused and not final.refusing_findings():
        assert diff(state, world, ctx) == []  # desired state reached; a second plan is empty


@PROPERTY
@given(worlds(), st.sampled_from(NAMES), user_facts())
def test_checksum_detects_any_observed_change(world: World, name: str,
                                              facts: UserFacts) -> None:
    changed = world.with_user(name, facts)
    if name in world.users and world.user(name) == replace(
            facts, rental_messages=world.user(name).rental_messages):
        return
    assert world_checksum(world) != world_checksum(changed)


@PROPERTY
@given(worlds())
def test_counts_match_a_full_recount(world: World) -> None:
    rebuilt = World.build(world.users.items())
    assert rebuilt.counts == world.counts
