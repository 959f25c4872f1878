"""Each gate, with each of its inputs missing in turn: it waits (never opens because a record
is missing), and says until when. The table in docs/guarantees.md, as tests."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from reconciler.context import Context
from reconciler.model import Side
from reconciler.steps import (
    ChangeWhitelist,
    CreateMailbox,
    MoveMx,
    RemoveOnpremMailbox,
    RetireOnprem,
)
from reconciler.world import DnsFacts, History, OnpremFacts, UserFacts, World

from .test_properties import ONPREM_MX, RENTAL_MX
from .test_safety_rules import state

NOW = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
CTX = Context.of(state({"suga": ("rental", "rental")}, dns__mx="rental"))
LOWERED = DnsFacts(mx=Side.ONPREM, mx_hosts=(ONPREM_MX,), mx_ttl=300, spf_ttl=3600)
MOVED = DnsFacts(mx=Side.RENTAL, mx_hosts=(RENTAL_MX,), mx_ttl=3600, spf_ttl=3600)
MX = MoveMx(Side.RENTAL, RENTAL_MX, 3600)


def world(dns: DnsFacts, history: History, last_mail: datetime | None = None) -> World:
    return World.build((), dns=dns, history=history, now=NOW,
                       onprem=OnpremFacts(last_mail_at=last_mail))


def until(gate: object) -> datetime:
    assert gate is not None
    stamp = getattr(gate, "until", None)
    assert stamp is not None
    return datetime.fromisoformat(stamp)


# --- the MX gate (MR004) -----------------------------------------------------------------------


def test_mx_gate_with_everything_recorded_waits_the_recorded_ttl() -> None:
    recorded = History(mx_ttl_lowered_at=NOW - timedelta(minutes=30), mx_old_ttl=3600)
    assert until(MX.gate(world(LOWERED, recorded), CTX)) == NOW + timedelta(minutes=30)


def test_mx_gate_without_the_lowering_time_waits_from_now() -> None:
    gate = MX.gate(world(LOWERED, History(mx_old_ttl=3600)), CTX)
    assert gate is not None and gate.kind == "observation"
    assert until(gate) == NOW + timedelta(seconds=3600)


def test_mx_gate_without_the_old_ttl_assumes_a_day_or_the_zones_longest() -> None:
    lowered = NOW - timedelta(hours=2)
    assert until(MX.gate(world(LOWERED, History(mx_ttl_lowered_at=lowered)), CTX)) == (
        lowered + timedelta(days=1))
    long_zone = replace(LOWERED, zone_ttl=2 * 86400)
    assert until(MX.gate(world(long_zone, History(mx_ttl_lowered_at=lowered)), CTX)) == (
        lowered + timedelta(days=2))


def test_mx_gate_with_nothing_recorded_waits_at_least_a_day_from_now() -> None:
    gate = MX.gate(world(LOWERED, History()), CTX)
    assert gate is not None and gate.kind == "observation"
    assert until(gate) >= NOW + timedelta(days=1)


def test_mx_gate_while_the_ttl_is_high_waits_for_the_lowering_step() -> None:
    gate = MX.gate(world(replace(LOWERED, mx_ttl=3600), History()), CTX)
    assert gate is not None and gate.kind == "step" and gate.after == "dns/mx-ttl"


# --- the retire gate (MR010) -----------------------------------------------------------------


def test_retire_gate_with_everything_recorded_opens_after_ttl_and_quiet_period() -> None:
    recorded = History(mx_moved_at=NOW - timedelta(days=3), mx_old_ttl=3600)
    quiet = world(MOVED, recorded, last_mail=NOW - timedelta(days=2, minutes=1))
    assert RetireOnprem().gate(quiet, CTX) is None
    recent = world(MOVED, recorded, last_mail=NOW - timedelta(hours=1))
    assert until(RetireOnprem().gate(recent, CTX)) == NOW + timedelta(hours=47)


def test_retire_gate_without_the_move_time_waits_from_now() -> None:
    gate = RetireOnprem().gate(world(MOVED, History(mx_old_ttl=3600),
                                     last_mail=NOW - timedelta(days=9)), CTX)
    assert gate is not None and gate.kind == "observation"
    assert until(gate) == NOW + CTX.quiet_period


def test_retire_gate_without_the_old_ttl_waits_at_least_a_day_after_the_move() -> None:
    moved = NOW - timedelta(hours=5)
    short_quiet = replace(CTX, quiet_period=timedelta(hours=1))
    gate = RetireOnprem().gate(world(MOVED, History(mx_moved_at=moved)), short_quiet)
    assert until(gate) == moved + timedelta(days=1)


def test_retire_gate_with_no_mail_in_the_log_runs_the_quiet_period_from_the_move() -> None:
    moved = NOW - timedelta(days=1)
    gate = RetireOnprem().gate(world(MOVED, History(mx_moved_at=moved, mx_old_ttl=3600)), CTX)
    assert until(gate) == moved + CTX.quiet_period


def test_retire_gate_counts_mail_seen_after_the_move() -> None:
    moved = NOW - timedelta(days=5)
    gate = RetireOnprem().gate(world(MOVED, History(mx_moved_at=moved, mx_old_ttl=3600),
                                     last_mail=NOW - timedelta(hours=2)), CTX)
    assert until(gate) == NOW - timedelta(hours=2) + CTX.quiet_period


# --- gates on observations and people ---------------------------------------------------------


def test_drain_gate_waits_while_the_mailbox_holds_mail() -> None:
    holding = World.build({"suga": UserFacts(onprem_account=True, onprem_messages=2)}, now=NOW)
    gate = RemoveOnpremMailbox("suga").gate(holding, CTX)
    assert gate is not None and gate.code == "MR008"
    assert RemoveOnpremMailbox("suga").gate(holding.update_user("suga", onprem_messages=0),
                                            CTX) is None


@pytest.mark.parametrize("step", [CreateMailbox("suga"), ChangeWhitelist("203.0.113.8/29", True)])
def test_an_ack_without_the_change_being_seen_keeps_waiting(
        step: CreateMailbox | ChangeWhitelist) -> None:
    manual = replace(CTX, instructor=lambda kind, action, target: "do it in the panel")
    gate = step.gate(World.build((), now=NOW), manual)
    assert gate is not None and gate.kind == "ack"
    acked = replace(manual, acked=frozenset({step.id}))
    gate = step.gate(World.build((), now=NOW), acked)
    assert gate is not None and gate.kind == "observation"  # acked, not yet seen: still waits
