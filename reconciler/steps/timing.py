"""How long resolvers may hold the old MX: the one figure the MX gate (MR004) and the retire
gate (MR010) wait for, derived from what was observed and recorded, worst case when unknown.

A plan simulates its steps: after `dns/mx-ttl` (or `dns/mx`) the simulated history says the
TTL was lowered (the MX moved) at the plan's time. `PlannedHistory` marks such facts, so a
gate can tell a lowering the journal records ("was lowered at T") from one the plan has yet
to make ("will be lowered")."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from reconciler.context import UNKNOWN_OLD_TTL, Context
from reconciler.world import History, World

LOWERED = "mx_ttl_lowered_at"
MOVED = "mx_moved_at"


@dataclass(frozen=True, slots=True)
class PlannedHistory(History):
    """History as a plan simulates it: `planned` names the facts (`LOWERED`, `MOVED`) that
    a step of the plan sets, not the journal."""

    planned: frozenset[str] = frozenset()


def _planned(history: History) -> frozenset[str]:
    return history.planned if isinstance(history, PlannedHistory) else frozenset()


def plan_lowering(history: History, at: datetime, old_ttl: int) -> History:
    """`history` after a simulated lowering of the MX TTL at `at`, from `old_ttl`."""
    return PlannedHistory(at, history.mx_moved_at, old_ttl, _planned(history) | {LOWERED})


def plan_move(history: History, at: datetime) -> History:
    """`history` after a simulated move of the MX at `at`."""
    return PlannedHistory(history.mx_ttl_lowered_at, at, history.mx_old_ttl,
                          _planned(history) | {MOVED})


def is_planned(history: History, fact: str) -> bool:
    """Whether `fact` comes from a step the plan has yet to apply (no record of it exists)."""
    return isinstance(history, PlannedHistory) and fact in history.planned


def resolver_hold(world: World, ctx: Context, *, moved: bool = False) -> tuple[int, str]:
    """Seconds a resolver may cache the MX as it was before the lowering (or, `moved`, as
    it was before the move), and why.

    Recorded: the journal kept the TTL the MX had before mailrec (or an admin) lowered it;
    the SPF record's TTL is usually set with it and still shows it, so the longer of the two
    counts. Not lowered yet (and not moved): the current TTL is the old one; so it is when
    the lowering is a step of the plan not applied yet. Unknown (the TTL is already low, or
    the MX already moved, and no record says what it was before): the longest TTL the zone
    shows, and at least a day.
    """
    dns = world.dns
    seen = max(dns.mx_ttl, dns.spf_ttl)
    recorded = world.history.mx_old_ttl
    if recorded is not None:
        if is_planned(world.history, LOWERED):
            return max(recorded, seen), "the MX's TTL before it is lowered"
        return max(recorded, seen), "the TTL before the lowering, as recorded"
    if dns.mx_ttl > ctx.cutover_ttl and not moved:
        return seen, "the MX's current TTL"
    return (max(seen, dns.zone_ttl, UNKNOWN_OLD_TTL),
            "unknown: no record of the TTL before the lowering, so the longest of the zone's "
            "TTLs and one day")
