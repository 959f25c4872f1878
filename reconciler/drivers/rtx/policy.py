"""The SMTP policy route on the RTX: the planner's router steps -> the exact RTX commands, and
(for the driver's own tests and tools) a desired `SmtpRoute` -> the minimal, safely ordered
command list.

Where it sits: between the parsed router configuration (`config.py`, read by `queries.py`)
and the session that types commands (`session.py`/`driver.py`). The backend translates each
planner step with `filter_step_commands` / `route_step_commands` (via
`drivers/router.py:commands_for`) and hands the lines to `RtxDriver.apply`.

What mailrec changes, and nothing else: its own static filter `ip filter N pass * * tcp *
smtp` and its own entry `gateway G filter N` of the default route. Every other line, and
every other gateway entry of the default route with its parameters and in its order, is
left as it is. A filter number that is defined or used anywhere else is never taken (MR014):
see `queries.filter_references`.

Order (MR009): the filter is defined before the route references it; the default route is
replaced by one `ip route default ...` command (the router overwrites the definition in
place, so there is never a moment without a default route) and always keeps a gateway
without a filter; a filter is removed only after nothing uses it. Every command list is
checked by simulating it command by command with the same `RtxConfig.apply` the lab
emulator runs.

Everything that reaches the router is built here from validated parts: the filter number is
an int in range and new gateways must match the strict gateway grammar of the state file;
entries kept from the router's own route are re-sent as the router printed them, after the
strict `ip route` grammar accepted them, so nothing can smuggle another command into the
router's shell.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reconciler.drivers.rtx.config import (
    Delete,
    IpFilter,
    IpFilterDynamic,
    IpRoute,
    RouteGateway,
    RouteParam,
    RtxConfig,
    RtxSyntaxError,
    is_ipv4,
    parse_command,
)
from reconciler.drivers.rtx.queries import (
    default_route_entries,
    default_route_uses,
    filter_verdicts,
    references_to,
    smtp_catchers,
)
from reconciler.model import FILTER_MAX
from reconciler.world import Coverage, RouteEntries, tcp25_egress

# The RTX filter number range for static filters (1..21474836 on RTX1200/1210/830): one
# number, the one the state file's schema checks too.
MAX_MANAGED_FILTER = FILTER_MAX

# Gateway forms mailrec writes: an IPv4 address or a named interface (same set as the state
# file schema accepts, see reconciler.model.GATEWAY_IFACE_RE).
_GATEWAY_IFACE_RE = re.compile(
    r"^(?:pp [1-9]\d{0,2}|pp anonymous|tunnel [1-9]\d{0,3}|dhcp lan\d|lan\d(?:/\d{1,3})?"
    r"|null|loopback)$"
)


class RtxPolicyError(ValueError):
    """The desired policy cannot be planned on this router; the message names the problem."""


@dataclass(frozen=True)
class SmtpRoute:
    """The desired policy: tcp/25 leaves through `gateway`, all else through `otherwise`."""

    filter: int
    gateway: str
    otherwise: str


def validate_gateway(value: str, *, role: str = "gateway") -> str:
    """Return the canonical gateway text, or raise RtxPolicyError naming the bad value."""
    # Only lower-case letters, digits, dots, slashes and spaces can form a gateway, so a
    # value with anything else (a newline, ';', quotes) is refused before any matching.
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9./ ]{1,40}", value):
        raise RtxPolicyError(
            f"{role} {value!r} is not an IPv4 address or an RTX interface "
            "(such as 'tunnel 2', 'pp 1' or 'dhcp lan2')"
        )
    text = " ".join(value.split())
    if is_ipv4(text) or _GATEWAY_IFACE_RE.match(text):
        return text
    raise RtxPolicyError(
        f"{role} {value!r} is not an IPv4 address or an RTX interface "
        "(such as 'tunnel 2', 'pp 1' or 'dhcp lan2')"
    )


def validate_filter_number(value: object, *, role: str = "filter") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RtxPolicyError(f"{role} number {value!r} is not an integer")
    if not 1 <= value <= MAX_MANAGED_FILTER:
        raise RtxPolicyError(f"{role} number {value} is outside 1..{MAX_MANAGED_FILTER}")
    return value


def smtp_filter(number: int) -> IpFilter:
    """The managed filter: pass all tcp to destination port smtp, from anywhere."""
    return IpFilter(number, "pass", "*", "*", "tcp", "*", "smtp")


def filter_command(number: int) -> str:
    return smtp_filter(validate_filter_number(number)).render()


def _validated(desired: SmtpRoute) -> SmtpRoute:
    number = validate_filter_number(desired.filter)
    gateway = validate_gateway(desired.gateway, role="gateway")
    otherwise = validate_gateway(desired.otherwise, role="otherwise gateway")
    if gateway == otherwise:
        raise RtxPolicyError(
            f"gateway and otherwise are both {gateway!r}: the policy route would do nothing"
        )
    return SmtpRoute(number, gateway, otherwise)


# --- invariants (MR009) ------------------------------------------------------------------


def invariant_problems(config: RtxConfig) -> list[str]:
    """What breaks MR009 in this configuration: no default route, no unfiltered gateway on
    it, or a route naming a filter that is not defined."""
    problems: list[str] = []
    route = config.default_route()
    if route is None:
        problems.append("there is no default route")
    elif not any(not gw.filters for gw in route.gateways):
        problems.append("the default route has no gateway without a filter")
    defined = config.static_filters()
    for network, each in config.routes().items():
        missing = sorted({n for n in each.referenced_filters if n not in defined})
        if missing:
            problems.append(
                f"route {network} references undefined filter(s) {', '.join(map(str, missing))}"
            )
    return problems


def simulate(config: RtxConfig, commands: list[str]) -> list[RtxConfig]:
    """The configuration after each command, in order (the planner's and the driver's
    view of what the router will go through)."""
    states: list[RtxConfig] = []
    current = config
    for command in commands:
        current = current.apply(command)
        states.append(current)
    return states


# --- planning ------------------------------------------------------------------------------


def _entry_text(gateway: RouteGateway) -> str:
    return " ".join(gateway.tokens())


def _entries_text(entries: RouteEntries | None) -> str:
    if not entries:
        return "(no default route)"
    words = ["ip route default"]
    for gateway, filters in entries:
        words.append(f"gateway {gateway}")
        if filters:
            words.append("filter " + " ".join(map(str, filters)))
    return " ".join(words)


def route_from_entries(current: IpRoute, after: RouteEntries) -> IpRoute:
    """The route `after` (((gateway, (filter, ...)), ...), in that order), where every entry
    that also exists in `current` (same gateway, same filter list; repeated entries matched
    in order) keeps its parameters (metric, keepalive, weight, hide, ...) exactly as written.
    A new entry gets only its filter list; its gateway and filter numbers are validated."""
    pool: dict[tuple[str, tuple[int, ...]], list[RouteGateway]] = {}
    for gateway in current.gateways:
        pool.setdefault((gateway.gateway, gateway.filters), []).append(gateway)
    built: list[RouteGateway] = []
    for name, filters in after:
        kept = pool.get((name, tuple(filters)))
        if kept:
            built.append(kept.pop(0))
            continue
        canonical = validate_gateway(name)
        numbers = tuple(validate_filter_number(n) for n in filters)
        params = (RouteParam("filter", tuple(map(str, numbers))),) if numbers else ()
        built.append(RouteGateway(canonical, params))
    if not built:
        raise RtxPolicyError("the planned default route has no gateway at all (MR009)")
    return IpRoute(current.network, tuple(built))


def _check_not_shared(route: IpRoute, number: int) -> None:
    for gateway in route.gateways:
        if number in gateway.filters and gateway.filters != (number,):
            raise RtxPolicyError(
                f"the default route's gateway {gateway.gateway!r} uses filter {number} together "
                f"with filters {[f for f in gateway.filters if f != number]}: refusing to change "
                "a filter list mailrec does not own"
            )


def desired_entries(current: RouteEntries, want: SmtpRoute, old: int | None) -> RouteEntries:
    """The default route's entries with mailrec's entry (`gateway G filter N`) set and an
    unfiltered gateway `otherwise`; every other entry keeps its place.

    mailrec's entry is the one whose filter list is exactly (N,) (or (old,) when the journal
    says mailrec used filter `old` before); a new one goes before the first unfiltered
    gateway, after the admin's filtered entries. When `otherwise` is not an unfiltered
    gateway already, it replaces the only unfiltered gateway (or is added when there is
    none); with several unfiltered gateways (load balancing, backups) mailrec does not
    choose which one to replace and refuses."""
    ours: int | None = None
    kept: list[tuple[str, tuple[int, ...]]] = []
    for gateway, filters in current:
        if filters == (want.filter,) or (old is not None and filters == (old,)):
            if ours is None:
                ours = len(kept)
            continue
        kept.append((gateway, filters))
    unfiltered = [i for i, (_, filters) in enumerate(kept) if not filters]
    if not any(kept[i][0] == want.otherwise for i in unfiltered):
        if len(unfiltered) > 1:
            names = ", ".join(repr(kept[i][0]) for i in unfiltered)
            raise RtxPolicyError(
                f"the default route has several gateways without a filter ({names}): mailrec "
                f"will not choose which one to replace by {want.otherwise!r}; set the route's "
                "unfiltered gateways on the router, or make `otherwise` one of them"
            )
        if unfiltered:
            kept[unfiltered[0]] = (want.otherwise, ())
        else:
            kept.append((want.otherwise, ()))
            unfiltered = [len(kept) - 1]
    first_unfiltered = min(i for i, (_, filters) in enumerate(kept) if not filters)
    at = first_unfiltered if ours is None else min(ours, first_unfiltered)
    kept.insert(at, (want.gateway, (want.filter,)))
    return tuple(kept)


def _check_egress(config: RtxConfig, want: SmtpRoute) -> None:
    """Refuse when the router's first-match evaluation would not send all of the office's
    tcp/25 through mailrec's entry, naming the entry that catches it first."""
    entries = default_route_entries(config)
    verdicts = filter_verdicts(config)
    if entries is None or tcp25_egress(entries, verdicts) == (want.gateway,):
        return
    route = config.default_route()
    assert route is not None
    mine = [i for i, e in enumerate(entries) if e == (want.gateway, (want.filter,))]
    catchers = smtp_catchers(entries, verdicts, mine[0] if mine else len(entries))
    if not catchers:
        raise RtxPolicyError(
            f"tcp/25 from the LAN would not leave through {want.gateway!r} alone "
            f"(it may leave through {', '.join(tcp25_egress(entries, verdicts)) or 'nothing'})"
        )
    catch = catchers[0]
    entry = _entry_text(route.gateways[catch.index])
    if catch.number is None:
        reason = "it has no filter and takes all traffic"
    else:
        line = config.static_filter_lines().get(catch.number, f"ip filter {catch.number}")
        share = "all" if catch.coverage is Coverage.ALL else "some"
        reason = f"its filter {catch.number} ({line!r}) passes {share} of it"
    raise RtxPolicyError(
        f"tcp/25 from the LAN would not leave through {want.gateway!r}: the default route's "
        f"entry {entry!r} comes first and {reason}; change that entry on the router, or "
        "route SMTP through it"
    )


def _refs_message(number: int, users: tuple[str, ...]) -> str:
    more = f" (and {len(users) - 1} more)" if len(users) > 1 else ""
    return f"{users[0]!r}{more}"


def _plan_set(config: RtxConfig, want: SmtpRoute, managed: int | None) -> list[str]:
    route = config.default_route()
    if route is None:
        raise RtxPolicyError(
            "the router has no default route: mailrec changes an existing default route and "
            "will not create one (add `ip route default gateway ...` on the router first)"
        )
    commands: list[str] = []
    existing = config.filter(want.filter)
    others = references_to(config, want.filter)
    if existing is None:
        if others:
            raise RtxPolicyError(
                f"filter {want.filter} is not defined but is used by "
                f"{_refs_message(want.filter, others)}: defining it would change that rule; "
                "choose another filter number"
            )
        commands.append(filter_command(want.filter))
    elif not existing.is_smtp_pass:
        if managed == want.filter and not others:
            commands.append(filter_command(want.filter))
        else:
            raise RtxPolicyError(
                f"filter {want.filter} is already used by an unrelated rule "
                f"{existing.render()!r}; choose another filter number"
            )
    old = managed if managed is not None and managed != want.filter else None
    _check_not_shared(route, want.filter)
    current = tuple((g.gateway, g.filters) for g in route.gateways)
    new_route = route_from_entries(route, desired_entries(current, want, old))
    if new_route != route:
        commands.append(new_route.render())
    after = simulate(config, commands)[-1] if commands else config
    _check_egress(after, want)
    if old is not None:
        commands.extend(_cleanup(after, [old], old))
    return commands


def _cleanup(config: RtxConfig, numbers: list[int], managed: int | None) -> list[str]:
    """`no ip filter N` for old policy filters nothing uses any more."""
    commands: list[str] = []
    for number in numbers:
        existing = config.filter(number)
        if (
            existing is None
            or references_to(config, number)
            or default_route_uses(config, number) is not None
        ):
            continue
        if existing.is_smtp_pass or number == managed:
            commands.append(f"no ip filter {number}")
    return commands


def _plan_remove(config: RtxConfig, managed: int | None) -> list[str]:
    route = config.default_route()
    if route is None:
        raise RtxPolicyError(
            "the router has no default route: refusing to touch the policy route of a router "
            "that has no default route at all"
        )
    filters = config.static_filters()
    if managed is not None:
        targets = [managed]
    else:
        # Without a record of which filter is ours, the policy is any gateway selected by
        # exactly one SMTP pass filter.
        targets = sorted(
            {
                g.filters[0]
                for g in route.gateways
                if len(g.filters) == 1
                and g.filters[0] in filters
                and filters[g.filters[0]].is_smtp_pass
            }
        )
    for number in targets:
        _check_not_shared(route, number)
    kept = tuple(g for g in route.gateways if not any(g.filters == (n,) for n in targets))
    if not any(not g.filters for g in kept):
        raise RtxPolicyError(
            "removing the policy route would leave the default route without a gateway that "
            "has no filter: set the unfiltered gateway on the router first"
        )
    commands: list[str] = []
    after = config
    if kept != route.gateways:
        command = IpRoute(route.network, kept).render()
        commands.append(command)
        after = config.apply(command)
    return commands + _cleanup(after, targets, managed)


def plan_commands(
    config: RtxConfig, desired: SmtpRoute | None, managed_filter: int | None = None
) -> list[str]:
    """The minimal ordered CLI lines (without `administrator`/`save`) that bring `config`
    to `desired`; [] when in sync. `desired=None` removes the policy: the default route goes
    back to its unfiltered gateway(s), then `no ip filter N`. `managed_filter` is the filter
    number mailrec set up before (the journal knows it): it may be rewritten, renumbered
    away from, or removed, even when its line no longer looks like an SMTP pass; no other
    filter is ever rewritten or removed unless it is exactly an SMTP pass nothing else uses.

    Raises RtxPolicyError for a filter number used by an unrelated rule (or by any other
    line, see `queries.filter_references`), an invalid gateway, a configuration without a
    default route, an admin entry that would catch tcp/25 before mailrec's, or a plan that
    would break MR009.
    """
    managed = None if managed_filter is None else validate_filter_number(managed_filter)
    if desired is None:
        commands = _plan_remove(config, managed)
    else:
        commands = _plan_set(config, _validated(desired), managed)
    _check_plan(config, commands)
    return commands


# --- the planner's steps, translated --------------------------------------------------------


def filter_step_commands(config: RtxConfig, number: int, present: bool) -> list[str]:
    """The commands for the planner's filter step, or RtxPolicyError. Defining: only a number
    that is undefined (or already exactly an SMTP pass: then nothing to do) and that no other
    line uses. Deleting: only an SMTP pass that nothing uses any more (absent: nothing)."""
    number = validate_filter_number(number)
    existing = config.filter(number)
    others = references_to(config, number)
    if present:
        if existing is not None and not existing.is_smtp_pass:
            raise RtxPolicyError(
                f"filter {number} is already used by an unrelated rule "
                f"{config.static_filter_lines()[number]!r}; choose another filter number"
            )
        if others:
            state = "not defined but is" if existing is None else "an SMTP pass but also"
            raise RtxPolicyError(
                f"filter {number} is {state} used by {_refs_message(number, others)}: "
                "mailrec does not take a filter number another rule uses (MR014); choose "
                "another filter number"
            )
        return [] if existing is not None else [filter_command(number)]
    if existing is None:
        return []
    if not existing.is_smtp_pass:
        raise RtxPolicyError(
            f"filter {number} is {config.static_filter_lines()[number]!r}, not mailrec's SMTP "
            "pass: refusing to delete it"
        )
    route_line = default_route_uses(config, number)
    users = ((route_line,) if route_line else ()) + others
    if users:
        raise RtxPolicyError(
            f"filter {number} is still used by {_refs_message(number, users)}: refusing to "
            "delete it"
        )
    commands = [f"no ip filter {number}"]
    _check_plan(config, commands)
    return commands


def _mailrec_entry(config: RtxConfig, filters: tuple[int, ...]) -> bool:
    if len(filters) != 1:
        return False
    rule = config.filter(filters[0])
    return rule is not None and rule.is_smtp_pass


def route_step_commands(
    config: RtxConfig, before: RouteEntries | None, after: RouteEntries
) -> list[str]:
    """The one `ip route default ...` line for the planner's route step: `after`, in that
    order, each entry that the current route has too keeping its parameters as written.

    Refused (RtxPolicyError): no default route; the route is no longer `before` (changed
    since the plan); `after` drops or reorders an admin's filtered entry (one that is not a
    single SMTP pass filter, i.e. not mailrec's); an invalid new gateway or filter number;
    a result that breaks MR009. Nothing to do when the route already is `after`."""
    route = config.default_route()
    if route is None:
        raise RtxPolicyError(
            "the router has no default route: mailrec changes an existing default route and "
            "will not create one (add `ip route default gateway ...` on the router first)"
        )
    current = tuple((g.gateway, g.filters) for g in route.gateways)
    wanted = tuple((gateway, tuple(filters)) for gateway, filters in after)
    if current == wanted:
        return []
    planned = None if before is None else tuple((g, tuple(f)) for g, f in before)
    if current != planned:
        raise RtxPolicyError(
            "the router's default route changed since the plan: planned from "
            f"{_entries_text(planned)!r}, the router now has {route.render()!r}; observe and "
            "plan again"
        )
    admin = [
        (g.gateway, g.filters)
        for g in route.gateways
        if g.filters and not _mailrec_entry(config, g.filters)
    ]
    for key, gateway in zip(current, route.gateways, strict=True):
        if key in admin and wanted.count(key) < current.count(key):
            raise RtxPolicyError(
                f"the planned default route drops the entry {_entry_text(gateway)!r}, which "
                "is not mailrec's: mailrec changes only its own gateway entry"
            )
    if [key for key in wanted if key in admin] != admin:
        raise RtxPolicyError(
            "the planned default route reorders entries that are not mailrec's "
            f"({_entries_text(tuple(admin))!r}): mailrec changes only its own gateway entry"
        )
    command = route_from_entries(route, wanted).render()
    validate_command(command)
    _check_plan(config, [command])
    return [command]


def _check_plan(config: RtxConfig, commands: list[str]) -> None:
    # Defence in depth: the ordering rules above are meant to make this impossible.
    before = set(invariant_problems(config))
    for index, state in enumerate(simulate(config, commands)):
        new = [p for p in invariant_problems(state) if p not in before]
        if new:
            raise RtxPolicyError(
                f"the plan would break MR009 after {commands[index]!r}: {'; '.join(new)}"
            )


# --- commands sent by the driver -------------------------------------------------------------


def validate_command(command: str) -> str:
    """Accept only the commands mailrec plans, in their exact canonical form: `ip filter`,
    `no ip filter N`, `ip route NETWORK gateway ...`, `no ip route NETWORK`."""
    if not isinstance(command, str) or not command.isascii() or not command.isprintable():
        raise RtxPolicyError(f"refusing to send {command!r}: not a single printable ASCII line")
    try:
        parsed = parse_command(command)
        if isinstance(parsed, IpFilterDynamic) or (
            isinstance(parsed, Delete) and parsed.key.startswith("ip filter dynamic ")
        ):
            raise RtxSyntaxError("command", "mailrec does not manage dynamic filters")
        if isinstance(parsed, Delete):
            canonical = f"no {parsed.key}"
        else:
            parsed.validate()
            canonical = parsed.render()
    except RtxSyntaxError as exc:
        raise RtxPolicyError(f"refusing to send {command!r}: {exc.detail}") from None
    if canonical != command:
        raise RtxPolicyError(f"refusing to send {command!r}: not in canonical form {canonical!r}")
    return command


def rollback_commands(before: RtxConfig, applied: list[str]) -> list[str]:
    """Commands that undo `applied` (a prefix of a plan already typed into the router),
    restoring each definition `before` had, in reverse order so that every step back passes
    through a state the forward plan already went through."""
    undo: list[str] = []
    for command in reversed(applied):
        key = parse_command(command).key
        line = before.line_for(key)
        if line is not None and isinstance(line.node, IpFilter | IpFilterDynamic | IpRoute):
            undo.append(line.node.render())
        else:
            undo.append(f"no {key}")
    return undo
