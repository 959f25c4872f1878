"""One minimal case per MR code that triggers the rule, and its neighbour that passes."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from reconciler.context import Context
from reconciler.diff import diff
from reconciler.findings import RULES
from reconciler.model import DesiredState, Side
from reconciler.plan import Plan, Status, make_plan, static_findings
from reconciler.safety import check_world
from reconciler.world import (
    DnsFacts,
    History,
    OnpremFacts,
    Outbound,
    RentalFacts,
    RouterFacts,
    UserFacts,
    World,
)

from .test_properties import BASE, OFFICE, ONPREM_MX, ONPREM_SPF, RENTAL_MX, RENTAL_SPF, START

ONPREM_USER = UserFacts(onprem_account=True, outbound=Outbound.ONPREM)
MIGRATED = UserFacts(route=Side.RENTAL, relay_recipient=True, rental_mailbox=True,
                     outbound=Outbound.ONPREM)
POLICY_ROUTE = (("192.168.0.254", (10,)), ("tunnel 2", ()))
EGRESS_SPF = "ip4:203.0.113.9"  # the line the policy route sends tcp/25 through (MR006)


def state(users: dict[str, tuple[str, str]], **overrides: Any) -> DesiredState:
    data: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    data["users"] = {n: {"inbound": i, "outbound": o} for n, (i, o) in users.items()}
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        data[section] = {**data.get(section, {}), field: value} if field else value
    return DesiredState.model_validate(data)


def world(users: dict[str, UserFacts], **parts: Any) -> World:
    base: dict[str, Any] = {
        "onprem": OnpremFacts(recipient_validation=True, last_mail_at=START - timedelta(days=5)),
        "rental": RentalFacts(domain_accepted=True, whitelist=frozenset({OFFICE})),
        "dns": DnsFacts(mx=Side.ONPREM, mx_hosts=(ONPREM_MX,), mx_ttl=3600,
                        spf_terms=("v=spf1", ONPREM_SPF, RENTAL_SPF, EGRESS_SPF, "~all")),
        "router": RouterFacts(filters=frozenset({10}), default_route=POLICY_ROUTE),
        "history": History(),
        "now": START,
    }
    base.update(parts)
    return World.build(users, **base)


def plan(desired: DesiredState, observed: World, **ctx_args: Any) -> Plan:
    ctx = Context.of(desired, **ctx_args)
    return make_plan(desired, observed, diff(desired, observed, ctx), ctx)


def codes(planned_plan: Plan, step_id: str) -> set[str]:
    step = planned_plan.get(step_id)
    assert step is not None, f"{step_id} not in plan: {[p.id for p in planned_plan.steps]}"
    found = {f.code for f in step.findings}
    if step.gate is not None and step.gate.code:
        found.add(step.gate.code)
    return found


def status(planned_plan: Plan, step_id: str) -> Status:
    step = planned_plan.get(step_id)
    assert step is not None, f"{step_id} not in plan"
    return step.status


def test_every_rule_is_documented() -> None:
    # MR001.. with no gap and none reused; MR016 (open relay) and MR017 (SPF) at least.
    codes = list(RULES)
    assert codes == [f"MR{n:03d}" for n in range(1, len(codes) + 1)]
    assert len(codes) >= 17


def test_mr001_route_needs_rental_mailbox_and_domain() -> None:
    desired = state({"suga": ("rental", "onprem")})
    no_domain = world({"suga": ONPREM_USER},
                      rental=RentalFacts(domain_accepted=False, whitelist=frozenset({OFFICE})))
    the_plan = plan(desired, no_domain)
    assert status(the_plan, "inbound/suga") is Status.REFUSED
    assert "MR001" in codes(the_plan, "inbound/suga")
    passing = plan(desired, world({"suga": ONPREM_USER}))
    ids = [p.id for p in passing.by_status(Status.READY)]
    assert ids.index("mailbox/suga") < ids.index("inbound/suga")  # the transition step first


def test_mr002_outbound_waits_for_every_inbound() -> None:
    desired = state({"suga": ("rental", "rental"), "tanaka": ("onprem", "onprem")})
    observed = world({"suga": MIGRATED, "tanaka": ONPREM_USER})
    the_plan = plan(desired, observed)
    assert status(the_plan, "outbound/suga") is Status.REFUSED
    assert "MR002" in codes(the_plan, "outbound/suga")
    assert "tanaka" in the_plan.get("outbound/suga").findings[0].message  # type: ignore[union-attr]
    everyone = state({"suga": ("rental", "rental"), "tanaka": ("rental", "onprem")})
    passing = plan(everyone, observed, allow_bulk=True)
    assert status(passing, "outbound/suga") is Status.GATED  # waits for the person only
    assert passing.get("outbound/suga").gate.kind == "ack"  # type: ignore[union-attr]


def test_mr003_mx_waits_for_every_inbound() -> None:
    desired = state({"suga": ("rental", "onprem"), "tanaka": ("onprem", "onprem")},
                    dns__mx="rental")
    observed = world({"suga": MIGRATED, "tanaka": ONPREM_USER})
    the_plan = plan(desired, observed)
    assert status(the_plan, "dns/mx") is Status.REFUSED
    assert "MR003" in codes(the_plan, "dns/mx")
    passing = plan(state({"suga": ("rental", "onprem")}, dns__mx="rental"),
                   world({"suga": MIGRATED}))
    assert status(passing, "dns/mx") is Status.GATED
    assert status(passing, "dns/mx-ttl") is Status.READY


def test_mr004_mx_waits_for_the_old_ttl() -> None:
    desired = state({"suga": ("rental", "onprem")}, dns__mx="rental")
    lowered = DnsFacts(mx=Side.ONPREM, mx_hosts=(ONPREM_MX,), mx_ttl=300,
                       spf_terms=("v=spf1", ONPREM_SPF, RENTAL_SPF, "~all"))
    recent = world({"suga": MIGRATED}, dns=lowered,
                   history=History(mx_ttl_lowered_at=START - timedelta(minutes=10),
                                   mx_old_ttl=3600))
    the_plan = plan(desired, recent)
    assert status(the_plan, "dns/mx") is Status.GATED
    assert "MR004" in codes(the_plan, "dns/mx")
    gate = the_plan.get("dns/mx").gate  # type: ignore[union-attr]
    assert gate is not None and gate.until == (START + timedelta(minutes=50)).isoformat()
    old = replace(recent, history=History(mx_ttl_lowered_at=START - timedelta(hours=2),
                                          mx_old_ttl=3600))
    assert status(plan(desired, old), "dns/mx") is Status.READY
    # The TTL it was lowered from is not recorded (lowered by hand, or a lost journal): the
    # old TTL is the worst case, a day (or longer if the zone says so), not cutover_ttl.
    forgotten = replace(old, history=History(mx_ttl_lowered_at=START - timedelta(hours=2)))
    forgotten_plan = plan(desired, forgotten)
    assert status(forgotten_plan, "dns/mx") is Status.GATED
    gate = forgotten_plan.get("dns/mx").gate  # type: ignore[union-attr]
    assert gate is not None and gate.until == (START + timedelta(hours=22)).isoformat()


def test_mr005_outbound_needs_whitelisted_egress_and_route() -> None:
    desired = state({"suga": ("rental", "rental")})
    bare = world({"suga": replace(MIGRATED, outbound=Outbound.ONPREM)},
                 rental=RentalFacts(domain_accepted=True, whitelist=frozenset()))
    the_plan = plan(desired, bare)
    assert "MR005" in codes(the_plan, "outbound/suga")
    desired_wl = state({"suga": ("rental", "rental")}, rental__whitelist=[str(OFFICE)])
    fixed = plan(desired_wl, bare)
    assert status(fixed, "whitelist/203.0.113.8/29") is Status.READY
    assert status(fixed, "outbound/suga") is Status.GATED  # only the ack remains
    assert not fixed.get("outbound/suga").findings  # type: ignore[union-attr]
    no_route = world({"suga": MIGRATED},
                     router=RouterFacts(filters=frozenset(), default_route=(("tunnel 2", ()),)))
    after = no_route.update_user("suga", outbound=Outbound.RELAY)
    assert "MR005" in {f.code for f in check_world(after, Context.of(desired))}


def test_mr006_spf_before_sending_and_onprem_ip_kept() -> None:
    desired = state({"suga": ("rental", "rental")})
    no_rental_spf = world({"suga": MIGRATED}, dns=DnsFacts(
        mx=Side.ONPREM, mx_hosts=(ONPREM_MX,), spf_terms=("v=spf1", ONPREM_SPF, "-all")))
    the_plan = plan(desired, no_rental_spf)
    spf = the_plan.get("dns/spf")
    assert spf is not None and spf.status is Status.READY
    assert spf.step.data()["after"] == f"v=spf1 {ONPREM_SPF} {RENTAL_SPF} {EGRESS_SPF} -all"
    ctx = Context.of(desired)
    sending = no_rental_spf.update_user("suga", outbound=Outbound.RELAY)
    assert "MR006" in {f.code for f in check_world(sending, ctx)}
    dropped = replace(no_rental_spf, dns=replace(no_rental_spf.dns, spf_terms=("v=spf1", "-all")))
    assert "MR006" in {f.code for f in check_world(dropped, ctx)}  # suga still sends onprem


def test_mr006_the_line_tcp25_leaves_through_is_in_spf_while_onprem_sends() -> None:
    """The policy route sends every LAN host's tcp/25 out through the new line, onprem's
    own mail included: the route waits until SPF names that line, and SPF comes first."""
    desired = state({"suga": ("onprem", "onprem")})
    spf_without_line = DnsFacts(mx=Side.ONPREM, mx_hosts=(ONPREM_MX,),
                                spf_terms=("v=spf1", ONPREM_SPF, RENTAL_SPF, "~all"))
    no_route = RouterFacts(filters=frozenset({10}), default_route=(("tunnel 2", ()),))
    before = world({"suga": ONPREM_USER}, dns=spf_without_line, router=no_route)
    ctx = Context.of(desired)
    routed = replace(before, router=RouterFacts(filters=frozenset({10}),
                                                default_route=POLICY_ROUTE))
    findings = [f for f in check_world(routed, ctx) if f.code == "MR006"]
    assert findings and "203.0.113.9" in findings[0].message
    # Planned: SPF first, then the route, in one apply; never the route alone.
    ready = [p.id for p in plan(desired, before).by_status(Status.READY)]
    assert ready.index("dns/spf") < ready.index("router/route/default")
    # Without the SPF step (a record mailrec may not change), the route is refused.
    only_route = make_plan(desired, before, [s for s in diff(desired, before, ctx)
                                             if s.id == "router/route/default"], ctx)
    assert status(only_route, "router/route/default") is Status.REFUSED
    assert "MR006" in codes(only_route, "router/route/default")
    # The line onprem already sends from needs no new term; nor does a retired onprem.
    same_line = state({"suga": ("onprem", "onprem")}, onprem__public_ip="203.0.113.9")
    assert not [f for f in check_world(routed, Context.of(same_line))
                if f.code == "MR006" and "tcp/25 from the office" in f.message]
    retired = replace(routed, onprem=replace(routed.onprem, retired=True))
    assert "MR006" not in {f.code for f in check_world(retired, ctx)}


def test_mr007_recipient_validation_must_accept_forwarded_users() -> None:
    desired = state({"suga": ("rental", "onprem")})
    off = world({"suga": ONPREM_USER},
                onprem=OnpremFacts(recipient_validation=False))
    the_plan = plan(desired, off)
    ready = [p.id for p in the_plan.by_status(Status.READY)]
    assert ready.index("onprem/recipient-maps") < ready.index("onprem-mailbox/suga") or (
        "onprem-mailbox/suga" not in ready)
    unaccepted = world({"suga": UserFacts(route=Side.RENTAL, rental_mailbox=True)},
                       onprem=OnpremFacts(recipient_validation=False))
    assert "MR007" in {f.code for f in check_world(unaccepted, Context.of(desired))}
    assert "MR007" not in {f.code for f in check_world(world({"suga": MIGRATED}),
                                                       Context.of(desired))}


def test_mr008_no_mailbox_deleted_while_holding_mail() -> None:
    desired = state({"suga": ("rental", "onprem")})
    holding = world({"suga": replace(MIGRATED, onprem_account=True, onprem_messages=3)})
    the_plan = plan(desired, holding)
    assert status(the_plan, "onprem-mailbox/suga") is Status.GATED
    assert "MR008" in codes(the_plan, "onprem-mailbox/suga")
    drained = world({"suga": replace(MIGRATED, onprem_account=True, onprem_messages=0)})
    assert status(plan(desired, drained), "onprem-mailbox/suga") is Status.READY


def test_mr009_router_keeps_a_default_route_and_filter_order() -> None:
    desired = state({"suga": ("onprem", "onprem")}, rental__whitelist=[str(OFFICE)])
    unmanaged = world({"suga": ONPREM_USER},
                      router=RouterFacts(filters=frozenset(), default_route=(("tunnel 2", ()),)))
    the_plan = plan(desired, unmanaged)
    ready = [p.id for p in the_plan.by_status(Status.READY)]
    assert ready == ["router/filter/10", "router/route/default"]
    broken = replace(unmanaged, router=RouterFacts(default_route=(("192.168.0.254", (10,)),)))
    found = {f.code for f in check_world(broken, Context.of(desired))}
    assert found == {"MR009"}  # no unfiltered gateway, and filter 10 does not exist


def test_mr010_retire_after_mx_ttl_and_quiet_period() -> None:
    desired = state({"suga": ("rental", "rental")}, dns__mx="rental", onprem__state="retired")
    moved = DnsFacts(mx=Side.RENTAL, mx_hosts=(RENTAL_MX,), mx_ttl=3600,
                     spf_terms=("v=spf1", ONPREM_SPF, RENTAL_SPF, "~all"))
    user = replace(MIGRATED, outbound=Outbound.RELAY)
    recent_mail = world({"suga": user}, dns=moved,
                        onprem=OnpremFacts(last_mail_at=START - timedelta(hours=10)),
                        history=History(mx_moved_at=START - timedelta(days=1)))
    the_plan = plan(desired, recent_mail)
    assert status(the_plan, "onprem/retire") is Status.GATED
    assert "MR010" in codes(the_plan, "onprem/retire")
    assert status(the_plan, "dns/spf-retire") is Status.GATED  # onprem's IP stays until then
    quiet = replace(recent_mail, onprem=OnpremFacts(last_mail_at=START - timedelta(days=3)),
                    history=History(mx_moved_at=START - timedelta(days=4)))
    passing = plan(desired, quiet)
    assert status(passing, "onprem/retire") is Status.READY
    assert status(passing, "dns/spf-retire") is Status.READY
    not_moved = plan(state({"suga": ("rental", "rental")}, onprem__state="retired"),
                     world({"suga": user}))
    assert "MR010" in codes(not_moved, "onprem/retire")


def test_mr011_bulk_moves_need_allow_bulk() -> None:
    users = {n: ("rental", "onprem") for n in ("suga", "tanaka", "sato", "ito")}
    observed = world({n: ONPREM_USER for n in users})
    the_plan = plan(state(users), observed)
    assert "MR011" in codes(the_plan, "inbound/suga")
    assert the_plan.exit_code == 3
    assert status(the_plan, "mailbox/suga") is Status.READY  # creating mailboxes moves no one
    allowed = plan(state(users), observed, allow_bulk=True)
    assert status(allowed, "inbound/suga") is Status.READY
    one = plan(state({"suga": ("rental", "onprem"), "tanaka": ("onprem", "onprem"),
                      "sato": ("onprem", "onprem"), "ito": ("onprem", "onprem")}), observed)
    assert status(one, "inbound/suga") is Status.READY


def test_mr012_state_contradicts_itself() -> None:
    contradicting = state({"suga": ("onprem", "onprem")}, dns__mx="rental")
    assert [f.code for f in static_findings(contradicting)] == ["MR012"]
    retired_early = state({"suga": ("rental", "onprem")}, onprem__state="retired")
    assert {f.code for f in static_findings(retired_early)} == {"MR012"}
    assert static_findings(state({"suga": ("rental", "onprem")})) == []


def test_mr013_no_step_leaves_a_user_without_a_mailbox() -> None:
    desired = state({"suga": ("onprem", "onprem")})
    gone = world({"suga": UserFacts(route=Side.RENTAL, relay_recipient=True,
                                    rental_mailbox=True, outbound=Outbound.ONPREM)})
    the_plan = plan(desired, gone)
    assert status(the_plan, "inbound/suga") is Status.REFUSED
    assert "MR013" in codes(the_plan, "inbound/suga")


def test_mr014_an_admins_filter_number_is_refused_naming_the_line() -> None:
    desired = state({"suga": ("onprem", "onprem")})
    admin = RouterFacts(other_filters=frozenset({10}), default_route=(("tunnel 2", ()),),
                        filter_lines={10: "ip filter 10 reject * * tcp * telnet"})
    the_plan = plan(desired, world({"suga": ONPREM_USER}, router=admin))
    assert status(the_plan, "router/filter/10") is Status.REFUSED
    assert "MR014" in codes(the_plan, "router/filter/10")
    assert "ip filter 10 reject * * tcp * telnet" in the_plan.get(  # type: ignore[union-attr]
        "router/filter/10").findings[0].message
    assert status(the_plan, "router/route/default") is not Status.READY
    referenced = RouterFacts(default_route=(("tunnel 2", ()),),
                             references={10: ("ip lan2 secure filter in 10 1011",)})
    the_plan = plan(desired, world({"suga": ONPREM_USER}, router=referenced))
    assert status(the_plan, "router/filter/10") is Status.REFUSED
    assert "ip lan2 secure filter in 10 1011" in the_plan.get(  # type: ignore[union-attr]
        "router/filter/10").findings[0].message
    free = RouterFacts(default_route=(("tunnel 2", ()),))
    assert status(plan(desired, world({"suga": ONPREM_USER}, router=free)),
                  "router/filter/10") is Status.READY


def test_mr015_unmanaged_accounts_are_reported() -> None:
    desired = state({"suga": ("rental", "onprem")})
    observed = world({"suga": ONPREM_USER, "info": ONPREM_USER})
    the_plan = plan(desired, observed)
    assert any(f.code == "MR015" and "info" in f.message for f in the_plan.findings)


def test_mr016_an_open_relay_is_never_added() -> None:
    desired = state({"suga": ("onprem", "onprem")}, rental__whitelist=["0.0.0.0/0"])
    the_plan = plan(desired, world({"suga": ONPREM_USER}))
    assert status(the_plan, "whitelist/0.0.0.0/0") is Status.REFUSED
    assert "MR016" in codes(the_plan, "whitelist/0.0.0.0/0")
    assert "MR016" in {f.code for f in static_findings(desired)}


def test_mr017_spf_for_everyone_is_never_written() -> None:
    desired = state({"suga": ("rental", "rental")}, rental__spf="ip4:0.0.0.0/0")
    observed = world({"suga": MIGRATED}, dns=DnsFacts(
        mx=Side.ONPREM, mx_hosts=(ONPREM_MX,), spf_terms=("v=spf1", ONPREM_SPF, "~all")))
    the_plan = plan(desired, observed)
    assert status(the_plan, "dns/spf") is Status.REFUSED
    assert "MR017" in codes(the_plan, "dns/spf")
    two = replace(observed.dns, spf_records=2)
    assert "MR017" in {f.code for f in check_world(replace(observed, dns=two),
                                                   Context.of(desired))}


def test_mr018_a_drifted_route_is_found_and_repaired() -> None:
    desired = state({"suga": ("rental", "onprem")})
    drifted = world({"suga": replace(MIGRATED, route_drift=True)})
    assert "MR018" in {f.code for f in check_world(drifted, Context.of(desired))}
    the_plan = plan(desired, drifted)
    assert status(the_plan, "inbound/suga") is Status.READY
    assert the_plan.exit_code == 3  # the world is unsafe until the repair is applied


def test_a_violation_already_present_blocks_what_would_make_it_worse() -> None:
    """suga is routed to the rental without a mailbox the rental confirms (MR001): the MX
    may not move (MR003 would grow), whatever the TTL gate says."""
    desired = state({"suga": ("rental", "onprem")}, dns__mx="rental")
    lowered = DnsFacts(mx=Side.ONPREM, mx_hosts=(ONPREM_MX,), mx_ttl=300,
                       spf_terms=("v=spf1", ONPREM_SPF, RENTAL_SPF, "~all"))
    broken = world({"suga": replace(MIGRATED, rental_mailbox=False)}, dns=lowered,
                   history=History(mx_ttl_lowered_at=START - timedelta(days=2), mx_old_ttl=3600))
    ctx = Context.of(desired, instructor=lambda kind, action, target: "create it by hand")
    the_plan = make_plan(desired, broken, diff(desired, broken, ctx), ctx)
    assert status(the_plan, "mailbox/suga") is Status.GATED  # a person creates it
    assert status(the_plan, "dns/mx") is not Status.READY
    assert "MR003" in codes(the_plan, "dns/mx")


@pytest.mark.parametrize("egress,ok", [("203.0.113.9", True), ("198.51.100.99", False)])
def test_static_egress_check(egress: str, ok: bool) -> None:
    route = {**BASE["router"]["smtp_route"], "egress_ip": egress}
    desired = state({"suga": ("rental", "rental")}, rental__whitelist=[str(OFFICE)],
                    router={**BASE["router"], "smtp_route": route})
    assert ipaddress.ip_address(egress) in OFFICE or not ok
    assert (static_findings(desired) == []) is ok
