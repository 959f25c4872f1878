"""The names onprem receives for besides its users (issue 8): each rule is triggered and its
refusal asserted, with the neighbour that passes; the world is built from driver facts by
`observe.build_world`, as on a real host."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import immutables

from reconciler.context import Context
from reconciler.diff import diff
from reconciler.drivers.dns import DnsRecords
from reconciler.drivers.postfix import AddressSpace, PostfixFacts
from reconciler.drivers.rental.base import RentalSnapshot
from reconciler.model import Side
from reconciler.observe import JournalView, build_world
from reconciler.plan import Status, make_plan
from reconciler.safety import check_world
from reconciler.steps import CreateAlias, RemoveFallback
from reconciler.world import AddressFacts, AddressKind, World

from .test_properties import OFFICE, ONPREM_MX, ONPREM_SPF, RENTAL_MX, RENTAL_SPF, START
from .test_safety_rules import EGRESS_SPF, MIGRATED, ONPREM_USER, codes, plan, state, world

DOMAIN = "example.co.jp"
FORWARD = "smtp:[example.sakura.ne.jp]:25"


def facts(**space: Any) -> PostfixFacts:
    accounts = space.pop("accounts", {})
    transport = space.pop("transport", {})
    space.setdefault("local_recipient_maps", "proxy:unix:passwd.byname $alias_maps")
    return PostfixFacts(
        accounts=accounts, transport=transport,
        recipients={u: "OK" for u in transport}, recipient_validation=True,
        last_mail_at=START - timedelta(days=5), retired=False,
        space=AddressSpace(local_domains=(DOMAIN, "mail.example.co.jp", "localhost"), **space),
    )


def snapshot(mailboxes: dict[str, int | None],
             aliases: dict[str, tuple[str, ...] | None] | None = None) -> RentalSnapshot:
    return RentalSnapshot(True, mailboxes, frozenset({OFFICE}), whitelist_verified=True,
                          aliases=aliases or {})


def records(mx: str = ONPREM_MX) -> DnsRecords:
    return DnsRecords(mx_hosts=(mx,), mx_ttl=300,
                      spf_terms=("v=spf1", ONPREM_SPF, RENTAL_SPF, EGRESS_SPF, "~all"),
                      spf_ttl=3600, soa_serial=1)


def built(desired: Any, postfix: PostfixFacts, rental: RentalSnapshot, *,
          mx: str = ONPREM_MX, acked: frozenset[str] = frozenset()) -> World:
    view = JournalView({}, None, None, acked, baseline=True)
    base = world({})
    return build_world(desired, postfix=postfix, rental=rental, dns=records(mx),
                       router=base.router, journal=view, now=START)


def test_the_mx_waits_for_every_alias_to_have_a_destination_at_the_rental() -> None:
    """MR019: `info` expands onprem to two moved users; the rental has no such name. Moving
    the MX would bounce info@; the plan creates the alias first, then the MX may move."""
    desired = state({"suga": ("rental", "onprem"), "taro": ("rental", "onprem")},
                    dns__mx="rental", aliases={"info": ["suga", "taro"]})
    postfix = facts(transport={"suga": FORWARD, "taro": FORWARD},
                    aliases={"info": ("suga", "taro")})
    observed = built(desired, postfix, snapshot({"suga": 0, "taro": 0}))
    assert observed.addresses["info"].keep == "members"
    ctx = Context.of(desired)
    steps = diff(desired, observed, ctx)
    assert CreateAlias("info", ("suga@example.co.jp", "taro@example.co.jp")) in steps
    # Without the alias step, the MX move is refused by MR019.
    no_alias = [s for s in steps if not isinstance(s, CreateAlias)]
    refused = make_plan(desired, observed, no_alias, ctx)
    assert refused.get("dns/mx").status is Status.REFUSED  # type: ignore[union-attr]
    assert "MR019" in codes(refused, "dns/mx")
    message = next(f.message for f in refused.get("dns/mx").findings  # type: ignore[union-attr]
                   if f.code == "MR019")
    assert "info@example.co.jp" in message
    # With it, the alias is ready and the MX only waits for its TTL clock.
    full = make_plan(desired, observed, steps, ctx)
    assert full.get("alias/info").status is Status.READY  # type: ignore[union-attr]
    assert "MR019" not in codes(full, "dns/mx")


def test_an_alias_onprem_not_in_the_state_blocks_the_mx_and_plan_shows_the_yaml() -> None:
    desired = state({"suga": ("rental", "onprem")}, dns__mx="rental")
    postfix = facts(transport={"suga": FORWARD}, aliases={"sales": ("suga",)},
                    virtual_aliases={"support": ("suga@example.co.jp",)})
    observed = built(desired, postfix, snapshot({"suga": 0}))
    the_plan = plan(desired, observed)
    assert "MR019" in codes(the_plan, "dns/mx")
    # Before the MX move, the plan already says so, with the lines to copy.
    early = plan(state({"suga": ("rental", "onprem")}), observed)
    warnings = [f for f in early.findings if f.code == "MR019"]
    assert {f.subjects for f in warnings} == {("alias/sales",), ("alias/support",)}
    assert any("sales: [suga]" in f.remedy for f in warnings)
    # Declared drop: given up on purpose, the MX may move.
    dropping = state({"suga": ("rental", "onprem")}, dns__mx="rental",
                     aliases={"sales": "drop", "support": "drop"})
    dropped = built(dropping, postfix, snapshot({"suga": 0}))
    assert "MR019" not in codes(plan(dropping, dropped), "dns/mx")


def test_declared_rental_is_not_observed_rental() -> None:
    """`postmaster: rental` says the rental has the name: only a probe or the rental's own
    list proves it; until then the MX stays (fail closed)."""
    desired = state({"suga": ("rental", "onprem")}, dns__mx="rental",
                    aliases={"postmaster": "rental"})
    postfix = facts(transport={"suga": FORWARD}, aliases={"postmaster": ("root",)})
    unproven = built(desired, postfix, snapshot({"suga": 0}))
    assert "MR019" in codes(plan(desired, unproven), "dns/mx")
    proven = built(desired, postfix, snapshot({"suga": 0}, {"postmaster": None}))
    assert "MR019" not in codes(plan(desired, proven), "dns/mx")


def test_unreadable_tables_block_the_mx_move() -> None:
    desired = state({"suga": ("rental", "onprem")}, dns__mx="rental")
    postfix = facts(transport={"suga": FORWARD}, unreadable=("ldap:/etc/postfix/ldap.cf",))
    observed = built(desired, postfix, snapshot({"suga": 0}))
    the_plan = plan(desired, observed)
    assert "MR019" in codes(the_plan, "dns/mx")
    assert any("ldap:" in f.message for f in the_plan.get("dns/mx").findings)  # type: ignore[union-attr]


def test_an_account_outside_the_uid_range_holding_mail_blocks_the_mx() -> None:
    """MR015 blocks instead of warning: a uid-500 account (CentOS 6) with mail."""
    desired = state({"suga": ("rental", "onprem")}, dns__mx="rental")
    postfix = facts(transport={"suga": FORWARD}, other_accounts={"yamada": 2})
    observed = built(desired, postfix, snapshot({"suga": 0}))
    the_plan = plan(desired, observed)
    assert status_of(the_plan, "dns/mx") is Status.REFUSED
    assert "MR015" in codes(the_plan, "dns/mx")
    # An account without mail is not a name anyone uses: nothing blocks.
    quiet = built(desired, facts(transport={"suga": FORWARD}, other_accounts={"yamada": 0}),
                  snapshot({"suga": 0}))
    assert "MR015" not in codes(plan(desired, quiet), "dns/mx")


def status_of(the_plan: Any, step_id: str) -> Status:
    step = the_plan.get(step_id)
    assert step is not None
    return step.status  # type: ignore[no-any-return]


def test_mail_in_an_archived_mailbox_is_a_finding_not_a_drain() -> None:
    """MR020: local(8) recreated suga's Maildir after mailrec archived it: a finding, no
    drain step waits for it, and retire is refused while it holds mail (MR010)."""
    desired = state({"suga": ("rental", "onprem")})
    postfix = facts(transport={"suga": FORWARD}, stray_mail={"suga": 3})
    observed = built(desired, postfix, snapshot({"suga": 0}))
    found = check_world(observed, Context.of(desired))
    assert "MR020" in {f.code for f in found}
    assert "onprem-mailbox/suga" not in {s.id for s in diff(desired, observed,
                                                            Context.of(desired))}
    retiring = state({"suga": ("rental", "rental")}, dns__mx="rental",
                     onprem__state="retired")
    moved = replace(built(retiring, postfix, snapshot({"suga": 0}), mx=RENTAL_MX),
                    history=replace(observed.history, mx_moved_at=START - timedelta(days=9)))
    moved = moved.update_user("suga", outbound=moved.user("suga").outbound)
    assert "MR010" in codes(plan(retiring, moved, allow_bulk=True), "onprem/retire")


def test_a_seed_style_fallback_is_adopted_before_it_is_removed() -> None:
    """The seed deleted suga's account and set fallback_transport to the rental: suga is
    inbound at the rental. mailrec writes its own entry first; removing the fallback before
    that would leave suga nowhere to receive (MR013)."""
    desired = state({"suga": ("rental", "onprem"), "taro": ("onprem", "onprem")})
    postfix = facts(accounts={"taro": 0}, fallback_transport="smtp:[example.sakura.ne.jp]:25",
                    local_recipient_maps="")
    observed = built(desired, postfix, snapshot({"suga": 0}))
    suga = observed.user("suga")
    assert suga.route is Side.RENTAL and suga.via_fallback and suga.onprem_accepts
    assert "MR003" not in {f.code for f in check_world(
        replace(observed, dns=replace(observed.dns, mx=Side.RENTAL)), Context.of(desired))
        if "suga" in f.subjects}
    ctx = Context.of(desired)
    steps = diff(desired, observed, ctx)
    ids = [s.id for s in steps]
    assert "inbound/suga" in ids and "onprem/fallback" in ids
    the_plan = make_plan(desired, observed, steps, ctx)
    ready = [p.id for p in the_plan.by_status(Status.READY)]
    assert ready.index("inbound/suga") < ready.index("onprem/fallback")
    alone = make_plan(desired, observed, [s for s in steps if isinstance(s, RemoveFallback)], ctx)
    assert "MR013" in codes(alone, "onprem/fallback")


def test_a_fallback_to_somewhere_else_means_names_mailrec_cannot_see() -> None:
    desired = state({"suga": ("rental", "onprem")}, dns__mx="rental")
    postfix = facts(transport={"suga": FORWARD}, luser_relay="archive@backup.example.net")
    observed = built(desired, postfix, snapshot({"suga": 0}))
    assert observed.onprem.unseen and "MR019" in codes(plan(desired, observed), "dns/mx")


def test_a_partial_forward_is_drift_repaired_by_the_inbound_step() -> None:
    desired = state({"suga": ("rental", "onprem")})
    postfix = replace(facts(transport={"suga": FORWARD}), partial_forward=frozenset({"suga"}))
    observed = built(desired, postfix, snapshot({"suga": 0}))
    assert observed.user("suga").route_drift
    assert "MR018" in {f.code for f in check_world(observed, Context.of(desired))}
    assert "inbound/suga" in {s.id for s in diff(desired, observed, Context.of(desired))}


def test_onprem_retires_only_after_the_relay_in_front_is_detached() -> None:
    """A DMZ relay in front of onprem: retire waits for a person's confirmation that it no
    longer routes (or queues) for onprem; the confirmation waits for the MX move."""
    desired = state({"suga": ("rental", "rental")}, dns__mx="rental", onprem__state="retired",
                    onprem__upstream=[{"host": "relay.example.co.jp."}])
    postfix = facts(transport={"suga": FORWARD})
    moved_at = START - timedelta(days=9)
    observed = replace(built(desired, postfix, snapshot({"suga": 0}), mx=RENTAL_MX),
                       history=replace(world({}).history, mx_moved_at=moved_at))
    observed = observed.update_user("suga", outbound=MIGRATED.outbound.__class__("relay"))
    the_plan = plan(desired, observed)
    detach = the_plan.get("upstream/relay.example.co.jp.")
    assert detach is not None and detach.gate is not None and detach.gate.kind == "ack"
    assert "MR010" in codes(the_plan, "onprem/retire")
    acked = replace(built(desired, postfix, snapshot({"suga": 0}), mx=RENTAL_MX,
                          acked=frozenset({"upstream/relay.example.co.jp."})),
                    history=observed.history)
    acked = acked.update_user("suga", outbound=observed.user("suga").outbound)
    assert "MR010" not in codes(plan(desired, acked), "onprem/retire")
    # Before the MX moved, the confirmation itself waits.
    early = replace(observed, dns=replace(observed.dns, mx=Side.ONPREM, mx_hosts=(ONPREM_MX,)))
    step = plan(desired, early).get("upstream/relay.example.co.jp.")
    assert step is not None and step.gate is not None and step.gate.kind == "observation"


def test_the_mx_host_that_is_not_onprem_and_no_upstream_is_a_warning() -> None:
    from reconciler.static import static_findings
    desired = state({}, onprem__connect="ssh://root@internal.example.co.jp")
    warned = [f for f in static_findings(desired) if "onprem.upstream" in f.message]
    assert warned and warned[0].severity == "warn"
    declared = state({}, onprem__connect="ssh://root@internal.example.co.jp",
                     onprem__upstream=[{"host": ONPREM_MX}])
    assert not [f for f in static_findings(declared) if "onprem.upstream" in f.message]


def test_create_alias_simulates_what_verify_checks() -> None:
    step = CreateAlias("info", ("a@example.co.jp",))
    before = World.build({}, addresses=immutables.Map(
        {"info": AddressFacts(AddressKind.ALIAS, ("a",), keep="members")}))
    after = step.simulate(before)
    assert after.addresses["info"].settled and not before.addresses["info"].settled
    assert step.verify(after, after) == []
    assert step.verify(after, before) == ["alias info: the rental does not deliver it"]
    wrong = before.with_address("info", replace(before.addresses["info"], at_rental=True,
                                                rental_members=("b@example.co.jp",)))
    assert step.verify(after, wrong)


def test_unsettled_names_are_counted_once_per_addresses_map() -> None:
    base = World.build({"suga": ONPREM_USER}, addresses=immutables.Map(
        {"info": AddressFacts(AddressKind.ALIAS)}), now=datetime(2026, 1, 1, tzinfo=UTC))
    moved = base.update_user("suga", route=Side.RENTAL)
    assert moved.addresses is base.addresses
    assert moved.unsettled_addresses() == base.unsettled_addresses() == ["info"]


def test_the_first_forward_waits_for_a_probe_message_over_the_same_transport() -> None:
    """No user is forwarded before a probe message went from onprem to the rental by the
    transport mailrec writes; the probe is planned first, and the journal remembers it."""
    desired = state({"suga": ("rental", "onprem")})
    unproven = built(desired, facts(accounts={"suga": 0}), snapshot({"suga": 0}))
    assert not unproven.onprem.forward_verified
    ctx = Context.of(desired)
    steps = diff(desired, unproven, ctx)
    assert "onprem/forward-probe" in {s.id for s in steps}
    ready = [p.id for p in make_plan(desired, unproven, steps, ctx).by_status(Status.READY)]
    assert ready.index("onprem/forward-probe") < ready.index("inbound/suga")
    without_probe = make_plan(desired, unproven,
                              [s for s in steps if s.id != "onprem/forward-probe"], ctx)
    waiting = without_probe.get("inbound/suga")
    assert waiting is not None and waiting.status is Status.GATED
    assert waiting.gate is not None and "probe" in waiting.gate.message
    # A probe of another target (the rental host changed) proves nothing for this one.
    view = JournalView({}, None, None, frozenset(), baseline=True,
                       forward_probed=frozenset({"smtp:[old.example.net]:25"}))
    other = build_world(desired, postfix=facts(accounts={"suga": 0}),
                        rental=snapshot({"suga": 0}), dns=records(), router=world({}).router,
                        journal=view, now=START)
    assert not other.onprem.forward_verified
    proven_view = replace(view, forward_probed=frozenset({FORWARD}))
    proven = build_world(desired, postfix=facts(accounts={"suga": 0}),
                         rental=snapshot({"suga": 0}), dns=records(),
                         router=world({}).router, journal=proven_view, now=START)
    assert proven.onprem.forward_verified
    assert "onprem/forward-probe" not in {s.id for s in diff(desired, proven, ctx)}


def test_a_relay_mailrec_should_read_but_cannot_keeps_onprem_running() -> None:
    """onprem.upstream names how to read the relay; when that fails, no ack replaces the
    reading: the relay stays pending (fail closed), with the reason shown."""
    from reconciler.drivers.upstream import UpstreamFacts
    from reconciler.observe import upstream_pending

    desired = state({"suga": ("rental", "rental")}, dns__mx="rental", onprem__state="retired",
                    onprem__upstream=[{"host": "relay.example.co.jp.",
                                       "connect": "ssh://root@relay.example.co.jp"}])
    acked = JournalView({}, None, None, frozenset({"upstream/relay.example.co.jp."}))
    unread = UpstreamFacts("relay.example.co.jp.", False, None, None, False,
                           "host key not in known_hosts")
    pending = upstream_pending(desired, acked, [unread])
    assert pending and "host key not in known_hosts" in pending[0][1]
    detached = UpstreamFacts("relay.example.co.jp.", True, False, 0)
    assert upstream_pending(desired, acked, [detached]) == ()
    queued = UpstreamFacts("relay.example.co.jp.", True, False, 2)
    assert "queues 2" in upstream_pending(desired, acked, [queued])[0][1]


def test_a_state_user_whose_account_is_outside_the_uid_range_is_still_a_user() -> None:
    """The state lists yamada (an old uid-500 account) as a user: their account and mail are
    theirs. Moving them waits for the old mailbox to drain, and while they still receive
    onprem the MX stays (MR003), with or without mail in the box."""
    moving = state({"suga": ("rental", "onprem"), "yamada": ("rental", "onprem")})
    postfix = facts(transport={"suga": FORWARD}, other_accounts={"yamada": 2})
    observed = built(moving, postfix, snapshot({"suga": 0}))
    assert observed.users["yamada"].onprem_account
    assert observed.users["yamada"].onprem_messages == 2
    the_plan = plan(moving, observed)
    assert status_of(the_plan, "onprem-mailbox/yamada") is Status.GATED
    for held in (2, 0):
        staying = state({"suga": ("rental", "onprem"), "yamada": ("onprem", "onprem")},
                        dns__mx="rental")
        world_now = built(staying, facts(transport={"suga": FORWARD},
                                         other_accounts={"yamada": held}),
                          snapshot({"suga": 0}))
        the_plan = plan(staying, world_now)
        assert status_of(the_plan, "dns/mx") is Status.REFUSED, held
        assert "MR003" in codes(the_plan, "dns/mx"), held
