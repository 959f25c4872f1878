"""Safety rules about a change of the office router (part of `safety.check_transition`).

MR014: mailrec defines, removes or routes through only filter numbers no other line of the
router uses, and replaces only its own unchanged smtp pass filter. MR005 for the policy route:
after mailrec changes the route, the office's tcp/25 must leave through the state's gateway
alone, and when an admin's entry would catch it first, the finding names that entry.
"""

from __future__ import annotations

from reconciler.context import Context
from reconciler.findings import Finding
from reconciler.world import RouterFacts


def _clash(number: int, message: str) -> Finding:
    return Finding("MR014", message, (f"router/filter/{number}",),
                   "choose another router.smtp_route.filter number")


def router_transition_findings(
    before: RouterFacts | None, after: RouterFacts | None, ctx: Context
) -> list[Finding]:
    """MR014: mailrec defines or removes only filter numbers no admin line uses, and never
    replaces a filter that is not its own smtp pass; MR005 for the policy route: after a
    route change the office's tcp/25 must leave through the state's gateway alone."""
    if before is None or after is None or before == after:
        return []
    found: list[Finding] = []
    routed = {f for _, fs in before.default_route or () for f in fs}
    for number in sorted(_changed_filters(before, after)):
        users = before.references.get(number, ())
        defining = number in after.filters and number not in before.filters
        if defining and number in routed and number not in before.other_filters:
            users = users or (f"the default route names filter {number}, which is not "
                              "defined: an entry mailrec did not write",)
        if users:
            more = f" (and {len(users) - 1} more)" if len(users) > 1 else ""
            found.append(_clash(number, f"filter number {number} is already used by the "
                                f"router line {users[0]!r}{more}: mailrec will not define or "
                                "remove it"))
        elif number in before.other_filters:
            # Not mailrec's smtp pass (any more): whoever wrote it, even over a filter the
            # journal says mailrec created, it is an admin's now.
            line = before.filter_lines.get(number, f"ip filter {number} ...")
            found.append(_clash(number, f"filter {number} is already defined as {line!r}: "
                                "mailrec replaces no filter but its own unchanged smtp pass"))
    found.extend(_policy_route_findings(before, after, ctx))
    newly = {f for _, fs in after.default_route or () for f in fs} - {
        f for _, fs in before.default_route or () for f in fs}
    for number in sorted(newly - _changed_filters(before, after)):
        users = before.references.get(number, ())
        if users:
            found.append(_clash(number, f"the route would use filter {number}, which the "
                                f"router line {users[0]!r} also uses: mailrec will not share "
                                "a filter number"))
        elif number in after.other_filters:
            line = after.filter_lines.get(number, f"ip filter {number} ...")
            found.append(_clash(number, f"the route would use filter {number}, defined as "
                                f"{line!r}, not mailrec's smtp pass"))
    return found


def _policy_route_findings(before: RouterFacts, after: RouterFacts, ctx: Context) -> list[Finding]:
    found: list[Finding] = []
    if ctx.smtp_gateway is not None and before.default_route != after.default_route:
        egress = after.smtp_egress()
        if egress != (ctx.smtp_gateway,):
            found.append(Finding(
                "MR005", f"after this route change tcp/25 may leave through "
                f"{', '.join(egress) or 'no gateway'}, not only {ctx.smtp_gateway}"
                f"{_first_catch(after, ctx.smtp_gateway)}", ("router/route/default",),
                "move or change that entry on the router, or choose its gateway in the state"))
    return found


def _changed_filters(before: RouterFacts, after: RouterFacts) -> set[int]:
    numbers = set(before.filter_lines) | set(after.filter_lines) | before.filters | after.filters
    return {n for n in numbers
            if (n in before.filters, n in before.other_filters, before.filter_lines.get(n))
            != (n in after.filters, n in after.other_filters, after.filter_lines.get(n))}


def _first_catch(router: RouterFacts, ours: str) -> str:
    """`: the entry 'gateway pp 1 filter 500' comes first and ...`, naming the admin entry
    that takes the office's SMTP traffic before mailrec's gateway."""
    for gateway, filters in router.default_route or ():
        if gateway == ours:
            return ""
        for number in filters:
            verdict = router.verdict(number)
            if verdict is not None and verdict.passes and verdict.coverage:
                line = router.filter_lines.get(number, f"filter {number}")
                return (f": the entry 'gateway {gateway} filter "
                        f"{' '.join(map(str, filters))}' comes first and {line!r} passes it")
        if not filters:
            return f": the unfiltered entry 'gateway {gateway}' comes first"
    return ""
