"""The SMTP policy route: desired state -> the minimal, safely ordered RTX commands.

Where it sits: between the parsed router configuration (`config.py`) and the session that
types commands (`session.py`/`driver.py`). The core builds an `SmtpRoute` from the state file,
calls `plan_commands` with the observed `RtxConfig`, shows the returned lines in the plan, and
hands them to `RtxDriver.apply`.

What it manages, and nothing else: the static filter `ip filter N pass * * tcp * smtp` and the
default route `ip route default gateway G filter N gateway OTHERWISE`. Every other line,
other filtered gateways of the default route included, is left as it is.

Order (MR009): the filter is defined before the route references it; the default route is
replaced by one `ip route default ...` command (the router overwrites the definition in
place, so there is never a moment without a default route) and always keeps a gateway
without a filter; a filter is removed only after no route uses it. Every plan is checked by
simulating it command by command with the same `RtxConfig.apply` the lab emulator runs.

Everything that reaches the router is built here from validated parts: the filter number is
an int in range and gateways must match the strict RTX gateway grammar, so nothing a state
file says can smuggle another command into the router's shell.
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

# The RTX filter number range for static filters (1..21474836 on RTX1200/1210/830).
MAX_MANAGED_FILTER = 21474836

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


def _other_users(config: RtxConfig, number: int) -> list[str]:
    """Lines other than the default route that use filter `number`."""
    return [
        line.text.strip()
        for line in config.filter_references(number)
        if not (isinstance(line.node, IpRoute) and line.node.is_default)
    ]


def _is_policy_entry(gateway: RouteGateway, number: int) -> bool:
    return gateway.filters == (number,)


def _check_not_shared(route: IpRoute, number: int) -> None:
    for gateway in route.gateways:
        if number in gateway.filters and gateway.filters != (number,):
            raise RtxPolicyError(
                f"the default route's gateway {gateway.gateway!r} uses filter {number} together "
                f"with filters {[f for f in gateway.filters if f != number]}: refusing to change "
                "a filter list mailrec does not own"
            )


def _desired_route(route: IpRoute, want: SmtpRoute, old: int | None) -> IpRoute:
    """The current default route with the policy entry set and the unfiltered gateway set
    to `otherwise`; other filtered gateways keep their place and parameters."""
    _check_not_shared(route, want.filter)
    ours = RouteGateway(want.gateway, (RouteParam("filter", (str(want.filter),)),))
    entries: list[RouteGateway] = []
    our_index: int | None = None
    for gateway in route.gateways:
        mine = _is_policy_entry(gateway, want.filter) or (
            old is not None and _is_policy_entry(gateway, old)
        )
        if mine:
            if our_index is None:
                our_index = len(entries)
                # An entry that is already right keeps its parameters (e.g. a `keepalive`
                # the admin added to it).
                if gateway.gateway == want.gateway and gateway.filters == (want.filter,):
                    ours = gateway
            continue
        entries.append(gateway)
    unfiltered = [i for i, g in enumerate(entries) if not g.filters]
    if not any(entries[i].gateway == want.otherwise for i in unfiltered):
        # Replace the unfiltered gateway(s) by `otherwise`, where the first one was.
        at = unfiltered[0] if unfiltered else len(entries)
        entries = [g for g in entries if g.filters]
        at = min(at, len(entries))
        entries.insert(at, RouteGateway(want.otherwise))
    if our_index is None:
        # A new policy entry goes after the filtered gateways already there (they keep
        # their precedence) and before the unfiltered ones.
        first_unfiltered = min(i for i, g in enumerate(entries) if not g.filters)
        our_index = first_unfiltered
    entries.insert(min(our_index, len(entries)), ours)
    return IpRoute(route.network, tuple(entries))


def _route_command(route: IpRoute) -> str:
    return route.render()


def _plan_set(config: RtxConfig, want: SmtpRoute, managed: int | None) -> list[str]:
    route = config.default_route()
    if route is None:
        raise RtxPolicyError(
            "the router has no default route: mailrec changes an existing default route and "
            "will not create one (add `ip route default gateway ...` on the router first)"
        )
    commands: list[str] = []
    existing = config.filter(want.filter)
    others = _other_users(config, want.filter)
    if existing is None:
        if others:
            raise RtxPolicyError(
                f"filter {want.filter} is not defined but is used by {others[0]!r}: defining "
                "it would change that rule; choose another filter number"
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
    new_route = _desired_route(route, want, old)
    if new_route != route:
        commands.append(_route_command(new_route))
    if old is not None:
        after = simulate(config, commands)[-1] if commands else config
        commands.extend(_cleanup(after, [old], old))
    return commands


def _cleanup(config: RtxConfig, numbers: list[int], managed: int | None) -> list[str]:
    """`no ip filter N` for old policy filters nothing uses any more."""
    commands: list[str] = []
    for number in numbers:
        existing = config.filter(number)
        if existing is None or config.filter_references(number):
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
    kept = tuple(g for g in route.gateways if not any(_is_policy_entry(g, n) for n in targets))
    if not any(not g.filters for g in kept):
        raise RtxPolicyError(
            "removing the policy route would leave the default route without a gateway that "
            "has no filter: set the unfiltered gateway on the router first"
        )
    commands: list[str] = []
    after = config
    if kept != route.gateways:
        command = _route_command(IpRoute(route.network, kept))
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
    away from, or removed, even when its line no longer looks like an SMTP pass.

    Raises RtxPolicyError for a filter number used by an unrelated rule, an invalid gateway,
    a configuration without a default route, or a plan that would break MR009.
    """
    managed = None if managed_filter is None else validate_filter_number(managed_filter)
    if desired is None:
        commands = _plan_remove(config, managed)
    else:
        commands = _plan_set(config, _validated(desired), managed)
    _check_plan(config, commands)
    return commands


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
    if isinstance(parsed, IpRoute):
        for gateway in parsed.gateways:
            validate_gateway(gateway.gateway)
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
