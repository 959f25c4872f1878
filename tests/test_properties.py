"""Property tests of the planner: generated worlds, desired states and step failures.

- No plan passes through a world that breaks an invariant (from a safe world).
- The incremental safety check the planner uses is sound against the full one.
- Applying plans in the simulation (with gates opening and random failures) reaches the
  desired state, or stops at refusals that carry findings; a second plan is then empty.
- A plan's checksum changes with any observed change (a stale plan is detectable).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.context import Context
from reconciler.diff import diff
from reconciler.model import DesiredState, Side
from reconciler.observe import world_checksum
from reconciler.plan import Plan, Status, make_plan
from reconciler.safety import check_transition, check_world
from reconciler.steps import MoveOutbound, RemoveOnpremMailbox, Step
from reconciler.world import (
    DnsFacts,
    History,
    OnpremFacts,
    RentalFacts,
    RouterFacts,
    UserFacts,
    World,
)

NAMES = ["suga", "tanaka", "sato", "ito", "kato"]
ONPREM_MX, RENTAL_MX = "mail.example.co.jp.", "example.sakura.ne.jp."
ONPREM_SPF, RENTAL_SPF = "ip4:198.51.100.10", "include:_spf.example.sakura.ne.jp"
OFFICE = ipaddress.ip_network("203.0.113.8/29")
OTHER = ipaddress.ip_network("192.0.2.0/24")
START = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)

sides = st.sampled_from([Side.ONPREM, Side.RENTAL])


@st.composite
def user_facts(draw: st.DrawFn) -> UserFacts:
    account = draw(st.booleans())
    return UserFacts(
        onprem_account=account,
        onprem_messages=draw(st.integers(0, 2)) if account else 0,
        route=draw(sides),
        relay_recipient=draw(st.booleans()),
        rental_mailbox=draw(st.booleans()),
        rental_messages=draw(st.sampled_from([None, 0, 1])),
        outbound=draw(st.sampled_from([None, Side.ONPREM, Side.RENTAL])),
    )


@st.composite
def worlds(draw: st.DrawFn) -> World:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=5))
    users = {n: draw(user_facts()) for n in names}
    mx = draw(sides)
    spf = ["v=spf1"]
    spf += [t for t in (ONPREM_SPF, RENTAL_SPF) if draw(st.booleans())]
    spf.append("~all")
    route_choice = draw(st.sampled_from(["plain", "policy", "policy-nofilter"]))
    filters = frozenset(n for n in (10, 20) if draw(st.booleans())) if (
        route_choice != "policy-nofilter") else frozenset()
    default: tuple[tuple[str, tuple[int, ...]], ...] = (("tunnel 2", ()),)
    if route_choice == "policy" and filters:
        default = (("192.168.0.254", (min(filters),)), ("tunnel 2", ()))
    ttl = draw(st.sampled_from([300, 3600]))
    lowered = START - timedelta(hours=draw(st.integers(0, 3))) if ttl == 300 else None
    return World.build(
        users,
        onprem=OnpremFacts(recipient_validation=draw(st.booleans()),
                           last_mail_at=START - timedelta(hours=draw(st.integers(0, 100)))),
        rental=RentalFacts(
            domain_accepted=draw(st.booleans()) or True,
            whitelist=frozenset(n for n in (OFFICE, OTHER) if draw(st.booleans())),
        ),
        dns=DnsFacts(mx=mx, mx_hosts=(ONPREM_MX if mx is Side.ONPREM else RENTAL_MX,),
                     mx_ttl=ttl, spf_terms=tuple(spf)),
        router=RouterFacts(filters=filters, default_route=default),
        history=History(mx_ttl_lowered_at=lowered,
                        mx_moved_at=START - timedelta(days=3) if mx is Side.RENTAL else None),
        now=START,
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
                       "egress_ip": "203.0.113.9"},
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
    data["rental"] = {**BASE["rental"],
                      "whitelist": [str(n) for n in (OFFICE, OTHER) if draw(st.booleans())]}
    data["policy"] = {"max_change_pct": draw(st.sampled_from([30, 100])), "quiet_period": "48h"}
    policy = draw(st.sampled_from([10, 20, None]))  # renumbered, or the policy removed
    route = {**BASE["router"]["smtp_route"], "filter": policy} if policy else None
    data["router"] = {**BASE["router"], "smtp_route": route}
    return DesiredState.model_validate(data)


def context(state: DesiredState, world: World, allow_bulk: bool) -> Context:
    # Filters 10 and 20 count as created by mailrec (the journal would say so).
    return Context.of(state, allow_bulk=allow_bulk, router_filters=frozenset({10, 20}))


def plan_for(state: DesiredState, world: World, allow_bulk: bool = False) -> tuple[Plan, Context]:
    ctx = context(state, world, allow_bulk)
    return make_plan(state, world, diff(state, world, ctx), ctx), ctx


def ready_steps(plan: Plan) -> list[Step]:
    return [p.step for p in plan.by_status(Status.READY)]


PROPERTY = settings(max_examples=int(os.environ.get("MAILREC_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(worlds(), desired_states(), st.booleans())
def test_no_plan_passes_through_an_unsafe_world(world: World, state: DesiredState,
                                                bulk: bool) -> None:
    plan, ctx = plan_for(state, world, bulk)
    if check_world(world, ctx):
        return  # covered by the next property: unsafe starting worlds
    current = world
    for step in ready_steps(plan):
        current = step.simulate(current)
        assert check_world(current, ctx) == [], f"{step.id} led to an unsafe world"


@PROPERTY
@given(worlds(), desired_states())
def test_from_an_unsafe_world_no_step_adds_a_violation(world: World, state: DesiredState) -> None:
    plan, ctx = plan_for(state, world, True)
    current = world
    for step in ready_steps(plan):
        after = step.simulate(current)
        before_codes = {f.code for f in check_world(current, ctx)}
        new = [f for f in check_world(after, ctx) if f.code not in before_codes]
        assert new == [], f"{step.id} added {new}"
        current = after


@PROPERTY
@given(worlds(), desired_states())
def test_incremental_check_is_sound(world: World, state: DesiredState) -> None:
    """If the world is safe and the planner's incremental check passes a step, the full
    check passes the world after it."""
    ctx = context(state, world, True)
    if check_world(world, ctx):
        return
    for step in diff(state, world, ctx):
        after = step.simulate(world)
        if not check_transition(world, after, step, ctx) and step.gate(world, ctx) is None:
            assert check_world(after, ctx) == [], step.id


def _open_gates(world: World, plan: Plan, ctx: Context) -> World:
    """What the outside world does between two runs: time passes, people drain mailboxes and
    change mail clients (acks), and the TTL clock starts."""
    world = replace(world, now=world.now + timedelta(days=3))
    if world.history.mx_ttl_lowered_at is None and world.dns.mx_ttl <= 300:
        world = replace(world, history=replace(world.history, mx_ttl_lowered_at=world.now))
    for planned in plan.by_status(Status.GATED):
        step = planned.step
        if isinstance(step, RemoveOnpremMailbox):
            world = world.update_user(step.user, onprem_messages=0)
        if isinstance(step, MoveOutbound) and not planned.findings:
            # The person changed the client and acked; `mailrec ack` checks the step against
            # the world as it is, not as the plan would leave it.
            after = step.simulate(world)
            if not check_transition(world, after, step, ctx):
                world = after
    return world


@PROPERTY
@given(worlds(), desired_states(), st.lists(st.integers(0, 6), max_size=4))
def test_reachable_states_converge(world: World, state: DesiredState, failures: list[int]) -> None:
    ctx = context(state, world, True)
    if check_world(world, ctx):
        return
    failures = list(failures)
    plan = None
    for _round in range(12):
        plan, ctx = plan_for(state, world, allow_bulk=True)
        ready = ready_steps(plan)
        # A random step fails (driver error): the run stops there, the next run resumes.
        stop_at = failures.pop(0) if failures else len(ready)
        for step in ready[:stop_at]:
            world = step.simulate(world)
            assert check_world(world, ctx) == []
        world = _open_gates(world, plan, ctx)
    assert plan is not None
    final, ctx = plan_for(state, world, allow_bulk=True)
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
    same = all(
        getattr(world.user(name), f) == getattr(facts, f)
        for f in ("onprem_account", "onprem_messages", "route", "relay_recipient",
                  "rental_mailbox", "outbound")
    ) and (name in world.users)
    if same:
        return
    assert world_checksum(world) != world_checksum(changed)


@PROPERTY
@given(worlds())
def test_counts_match_a_full_recount(world: World) -> None:
    rebuilt = World.build(world.users.items())
    assert rebuilt.counts == world.counts
