"""How long resolvers may hold the old MX: the one figure the MX gate (MR004) and the retire
gate (MR010) wait for, derived from what was observed and recorded, worst case when unknown."""

from __future__ import annotations

from reconciler.context import UNKNOWN_OLD_TTL, Context
from reconciler.world import World


def resolver_hold(world: World, ctx: Context, *, moved: bool = False) -> tuple[int, str]:
    """Seconds a resolver may cache the MX as it was before the lowering (or, `moved`, as
    it was before the move), and why.

    Recorded: the journal kept the TTL the MX had before mailrec (or an admin) lowered it;
    the SPF record's TTL is usually set with it and still shows it, so the longer of the two
    counts. Not lowered yet (and not moved): the current TTL is the old one. Unknown (the
    TTL is already low, or the MX already moved, and no record says what it was before):
    the longest TTL the zone shows, and at least a day.
    """
    dns = world.dns
    seen = max(dns.mx_ttl, dns.spf_ttl)
    recorded = world.history.mx_old_ttl
    if recorded is not None:
        return max(recorded, seen), "the TTL before the lowering, as recorded"
    if dns.mx_ttl > ctx.cutover_ttl and not moved:
        return seen, "the MX's current TTL"
    return (max(seen, dns.zone_ttl, UNKNOWN_OLD_TTL),
            "unknown: no record of the TTL before the lowering, so the longest of the zone's "
            "TTLs and one day")
