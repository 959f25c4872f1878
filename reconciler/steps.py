"""Steps: the atomic changes a plan is made of, as pure data with a pure `simulate(world)`.

The planner orders them by simulating; the property tests replay them; the executor applies
each through a driver and verifies the observed world against the same simulation.
A step id is stable (`<kind>/<name>`), so plans, acks and the journal all refer to it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta
from enum import IntEnum, StrEnum
from typing import ClassVar

from reconciler.context import Context
from reconciler.findings import Gate
from reconciler.model import Side
from reconciler.world import World


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


class Rank(IntEnum):
    """Preferred order: the planner tries steps in this order, then checks every world."""

    PREPARE = 0  # recipient maps, SPF additions, TTL lowering: safe early, start the clocks
    ROUTER_FILTER = 1
    ROUTER_ROUTE = 2
    WHITELIST = 3
    MAILBOX = 4
    ROLLBACK_OUTBOUND = 5
    ROLLBACK_MX = 6
    INBOUND = 7
    DRAIN = 8
    OUTBOUND = 9
    MX = 10
    MX_TTL_RESTORE = 11
    RETIRE = 12
    CLEANUP = 13


@dataclass(frozen=True)
class Step:
    kind: ClassVar[str]
    action: ClassVar[Action]
    manual: ClassVar[bool] = False

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def users(self) -> tuple[str, ...]:
        return ()

    @property
    def affects(self) -> frozenset[str]:
        """Global MR codes this step can break (safety evaluates only these)."""
        return frozenset()

    @property
    def rank(self) -> Rank:
        raise NotImplementedError

    def simulate(self, world: World) -> World:
        raise NotImplementedError

    def gate(self, world: World, ctx: Context) -> Gate | None:
        """Why this safe step must wait (time, a person, an observation), or None."""
        return None

    def open_gate(self, world: World) -> World:
        """The world as it will be once this step's gate opens (for the optimistic pass,
        which asks "is this safe once everything we wait for has happened?")."""
        return world

    def describe(self) -> str:
        raise NotImplementedError

    def data(self) -> dict[str, object]:
        """Machine-readable before/after (plan JSON, journal)."""
        return {}

    def verify(self, expected: World, observed: World) -> list[str]:
        """Differences between the simulated and the observed world on what this step
        touches; empty means the step took effect."""
        problems = []
        for name in self.users:
            want, got = expected.user(name), observed.user(name)
            for attr in _VERIFIED_USER_FIELDS:
                if getattr(want, attr) != getattr(got, attr):
                    problems.append(
                        f"{name}.{attr}: expected {getattr(want, attr)}, "
                        f"observed {getattr(got, attr)}"
                    )
        return problems

    def __str__(self) -> str:
        return f"{self.id}: {self.describe()}"


_VERIFIED_USER_FIELDS = ("onprem_account", "route", "relay_recipient", "rental_mailbox", "outbound")


def _ack_gate(step: Step, what: str, instructions: tuple[str, ...]) -> Gate:
    return Gate(
        "ack",
        f"waiting for a person: {what}; then run `mailrec ack {step.id}`",
        instructions=instructions,
    )


# --- users -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateMailbox(Step):
    user: str
    kind: ClassVar[str] = "mailbox"
    action: ClassVar[Action] = Action.CREATE

    @property
    def name(self) -> str:
        return self.user

    @property
    def users(self) -> tuple[str, ...]:
        return (self.user,)

    @property
    def rank(self) -> Rank:
        return Rank.MAILBOX

    def simulate(self, world: World) -> World:
        return world.update_user(self.user, rental_mailbox=True, rental_messages=0)

    def gate(self, world: World, ctx: Context) -> Gate | None:
        text = ctx.instructor(self.kind, "create_mailbox", self.user)
        if text is None:
            return None
        if self.id in ctx.acked:
            return Gate(
                "observation",
                f"acknowledged, but the rental does not show mailbox {self.user} yet "
                "(checked by SMTP RCPT probe)",
            )
        return _ack_gate(self, f"create mailbox {self.user}@{ctx.domain}", (text,))

    def describe(self) -> str:
        return f"create rental mailbox {self.user}"


@dataclass(frozen=True)
class MoveInbound(Step):
    """Onprem Postfix forwards (transport map) the user's mail to the rental, or stops."""

    user: str
    to: Side
    kind: ClassVar[str] = "inbound"
    action: ClassVar[Action] = Action.UPDATE

    @property
    def name(self) -> str:
        return self.user

    @property
    def users(self) -> tuple[str, ...]:
        return (self.user,)

    @property
    def affects(self) -> frozenset[str]:
        if self.to is Side.RENTAL:
            return frozenset({"MR001", "MR007"})
        return frozenset({"MR002", "MR003"})

    @property
    def rank(self) -> Rank:
        return Rank.INBOUND

    def simulate(self, world: World) -> World:
        to_rental = self.to is Side.RENTAL
        return world.update_user(self.user, route=self.to, relay_recipient=to_rental)

    def describe(self) -> str:
        if self.to is Side.RENTAL:
            return f"onprem forwards mail for {self.user} to the rental"
        return f"onprem delivers mail for {self.user} locally again"

    def data(self) -> dict[str, object]:
        return {"user": self.user, "to": str(self.to)}


@dataclass(frozen=True)
class RemoveOnpremMailbox(Step):
    """The story's "old account removed" once the user drained it over POP."""

    user: str
    messages: int = 0
    kind: ClassVar[str] = "onprem-mailbox"
    action: ClassVar[Action] = Action.DELETE

    @property
    def name(self) -> str:
        return self.user

    @property
    def users(self) -> tuple[str, ...]:
        return (self.user,)

    @property
    def affects(self) -> frozenset[str]:
        return frozenset({"MR007"})

    @property
    def rank(self) -> Rank:
        return Rank.DRAIN

    def simulate(self, world: World) -> World:
        return world.update_user(self.user, onprem_account=False, onprem_messages=0)

    def gate(self, world: World, ctx: Context) -> Gate | None:
        held = world.user(self.user).onprem_messages
        if held:
            return Gate(
                "observation",
                f"the onprem mailbox of {self.user} still holds {held} message(s): waiting for "
                "the user to drain it (POP), or for an admin to archive it",
                code="MR008",
            )
        return None

    def open_gate(self, world: World) -> World:
        return world.update_user(self.user, onprem_messages=0)  # the user drained it

    def describe(self) -> str:
        return f"remove the drained onprem mailbox of {self.user}"


@dataclass(frozen=True)
class MoveOutbound(Step):
    """A mail-client setting: a person changes it, mailrec gates, instructs and records."""

    user: str
    to: Side
    kind: ClassVar[str] = "outbound"
    action: ClassVar[Action] = Action.UPDATE
    manual: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return self.user

    @property
    def users(self) -> tuple[str, ...]:
        return (self.user,)

    @property
    def affects(self) -> frozenset[str]:
        if self.to is Side.RENTAL:
            return frozenset({"MR002", "MR005", "MR006"})
        return frozenset({"MR006", "MR010"})

    @property
    def rank(self) -> Rank:
        return Rank.OUTBOUND if self.to is Side.RENTAL else Rank.ROLLBACK_OUTBOUND

    def simulate(self, world: World) -> World:
        return world.update_user(self.user, outbound=self.to)

    def instructions(self, ctx: Context) -> tuple[str, ...]:
        address = f"{self.user}@{ctx.domain}"
        if self.to is Side.ONPREM:
            return (
                f"In {address}'s mail client, set the outgoing (SMTP) server back to "
                f"{ctx.onprem_mx.rstrip('.')}, port 25, as before the migration.",
            )
        if ctx.egress_ip is not None:
            return (
                f"In {address}'s mail client, set the outgoing (SMTP) server to {ctx.smtp_host}, "
                f"port {ctx.relay_port}, no authentication (the office line "
                f"{ctx.egress_ip} is whitelisted), STARTTLS if offered.",
            )
        return (
            f"In {address}'s mail client, set the outgoing (SMTP) server to {ctx.smtp_host}, "
            f"port {ctx.submission_port}, STARTTLS, authentication on, user name {address}, "
            "with the rental mailbox password.",
        )

    def gate(self, world: World, ctx: Context) -> Gate | None:
        return _ack_gate(
            self,
            f"change the outgoing mail server of {self.user}",
            self.instructions(ctx),
        )

    def describe(self) -> str:
        return f"{self.user} sends via {'the rental' if self.to is Side.RENTAL else 'onprem'}"

    def data(self) -> dict[str, object]:
        return {"user": self.user, "to": str(self.to)}


# --- onprem ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnableRecipientMap(Step):
    kind: ClassVar[str] = "onprem"
    action: ClassVar[Action] = Action.UPDATE

    @property
    def name(self) -> str:
        return "recipient-maps"

    @property
    def rank(self) -> Rank:
        return Rank.PREPARE

    def simulate(self, world: World) -> World:
        return replace(world, onprem=replace(world.onprem, recipient_validation=True))

    def describe(self) -> str:
        return "add mailrec's relay recipient map to local_recipient_maps"


@dataclass(frozen=True)
class RetireOnprem(Step):
    kind: ClassVar[str] = "onprem"
    action: ClassVar[Action] = Action.DELETE

    @property
    def name(self) -> str:
        return "retire"

    @property
    def affects(self) -> frozenset[str]:
        return frozenset({"MR010"})

    @property
    def rank(self) -> Rank:
        return Rank.RETIRE

    def simulate(self, world: World) -> World:
        return replace(world, onprem=replace(world.onprem, retired=True))

    def gate(self, world: World, ctx: Context) -> Gate | None:
        moved = world.history.mx_moved_at
        if moved is None:
            return None  # structural: safety refuses it (MR010) until the MX moved
        ttl_over = moved + timedelta(seconds=ctx.ttl)
        if world.now < ttl_over:
            return Gate(
                "time",
                f"the MX moved at {moved.isoformat()}; resolvers may cache the old MX until "
                f"{ttl_over.isoformat()}",
                code="MR010",
                until=ttl_over.isoformat(),
            )
        last = world.onprem.last_mail_at
        start = max(last, moved) if last else moved
        quiet_over = start + ctx.quiet_period
        if world.now < quiet_over:
            seen = f"mail was last seen through onprem at {last.isoformat()}" if last else (
                "no mail seen through onprem since the MX moved"
            )
            return Gate(
                "time",
                f"{seen}; retiring after the quiet period, at {quiet_over.isoformat()}",
                code="MR010",
                until=quiet_over.isoformat(),
            )
        return None

    def describe(self) -> str:
        return "retire the onprem Postfix (stop relaying for the domain)"


# --- DNS ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetSpf(Step):
    before: tuple[str, ...]
    after: tuple[str, ...]
    retire: bool = False  # the step that drops onprem's IP, kept apart so additions never wait
    kind: ClassVar[str] = "dns"
    action: ClassVar[Action] = Action.UPDATE

    @property
    def name(self) -> str:
        return "spf-retire" if self.retire else "spf"

    @property
    def affects(self) -> frozenset[str]:
        return frozenset({"MR006"})

    @property
    def rank(self) -> Rank:
        return Rank.CLEANUP if self.retire else Rank.PREPARE

    def simulate(self, world: World) -> World:
        return replace(world, dns=replace(world.dns, spf_terms=self.after))

    def gate(self, world: World, ctx: Context) -> Gate | None:
        if self.retire and not world.onprem.retired:
            # Onprem may still send (bounces, the relaying days) until it is retired.
            return Gate("step", "keeps onprem's IP in SPF until onprem/retire is done",
                        code="MR006", after="onprem/retire")
        return None

    def describe(self) -> str:
        return f'SPF "{" ".join(self.before)}" -> "{" ".join(self.after)}"'

    def data(self) -> dict[str, object]:
        return {"before": " ".join(self.before), "after": " ".join(self.after)}

    def verify(self, expected: World, observed: World) -> list[str]:
        if observed.dns.spf_terms != self.after:
            return [f"SPF is {' '.join(observed.dns.spf_terms)!r}"]
        return []


@dataclass(frozen=True)
class SetMxTtl(Step):
    before: int
    after: int
    kind: ClassVar[str] = "dns"
    action: ClassVar[Action] = Action.UPDATE

    @property
    def name(self) -> str:
        return "mx-ttl"

    @property
    def lowering(self) -> bool:
        return self.after < self.before

    @property
    def rank(self) -> Rank:
        return Rank.PREPARE if self.lowering else Rank.MX_TTL_RESTORE

    def simulate(self, world: World) -> World:
        history = world.history
        if self.lowering:
            history = replace(history, mx_ttl_lowered_at=world.now)
        return replace(world, dns=replace(world.dns, mx_ttl=self.after), history=history)

    def describe(self) -> str:
        verb = "lower" if self.lowering else "restore"
        return f"{verb} the MX TTL {self.before} -> {self.after}"

    def data(self) -> dict[str, object]:
        return {"before": self.before, "after": self.after}

    def verify(self, expected: World, observed: World) -> list[str]:
        return [] if observed.dns.mx_ttl == self.after else [f"MX TTL is {observed.dns.mx_ttl}"]


@dataclass(frozen=True)
class MoveMx(Step):
    to: Side
    host: str
    ttl: int
    old_ttl: int  # the TTL resolvers may still hold the old MX for, before the lowering
    kind: ClassVar[str] = "dns"
    action: ClassVar[Action] = Action.UPDATE

    @property
    def name(self) -> str:
        return "mx"

    @property
    def affects(self) -> frozenset[str]:
        return frozenset({"MR003", "MR010"})

    @property
    def rank(self) -> Rank:
        return Rank.MX if self.to is Side.RENTAL else Rank.ROLLBACK_MX

    def simulate(self, world: World) -> World:
        dns = replace(world.dns, mx=self.to, mx_hosts=(self.host,), mx_ttl=self.ttl)
        history = replace(world.history, mx_moved_at=world.now)
        return replace(world, dns=dns, history=history)

    def gate(self, world: World, ctx: Context) -> Gate | None:
        if world.dns.mx_ttl > ctx.cutover_ttl:
            return Gate(
                "step",
                f"the MX TTL is {world.dns.mx_ttl}: lower it to {ctx.cutover_ttl} first "
                "(dns/mx-ttl)",
                code="MR004",
                after="dns/mx-ttl",
            )
        lowered = world.history.mx_ttl_lowered_at
        if lowered is None:
            return Gate(
                "observation",
                "the MX TTL was lowered outside mailrec: the next apply records when it saw it "
                "and the old TTL runs from there",
                code="MR004",
            )
        ready_at = lowered + timedelta(seconds=self.old_ttl)
        if world.now < ready_at:
            return Gate(
                "time",
                f"the MX TTL was lowered at {lowered.isoformat()}; resolvers may hold the old "
                f"TTL ({self.old_ttl}s) until {ready_at.isoformat()}",
                code="MR004",
                until=ready_at.isoformat(),
            )
        return None

    def describe(self) -> str:
        return f"MX -> {self.host} ({self.to}), TTL {self.ttl}"

    def data(self) -> dict[str, object]:
        return {"to": str(self.to), "host": self.host, "ttl": self.ttl}

    def verify(self, expected: World, observed: World) -> list[str]:
        if observed.dns.mx_hosts != (self.host,):
            return [f"MX is {observed.dns.mx_hosts}"]
        return []


# --- rental whitelist ----------------------------------------------------------------------


@dataclass(frozen=True)
class ChangeWhitelist(Step):
    network: str
    add: bool
    kind: ClassVar[str] = "whitelist"

    @property
    def action(self) -> Action:  # type: ignore[override]
        return Action.CREATE if self.add else Action.DELETE

    @property
    def name(self) -> str:
        return self.network

    @property
    def affects(self) -> frozenset[str]:
        return frozenset() if self.add else frozenset({"MR005"})

    @property
    def rank(self) -> Rank:
        return Rank.WHITELIST if self.add else Rank.CLEANUP

    def simulate(self, world: World) -> World:
        import ipaddress

        net = ipaddress.ip_network(self.network)
        whitelist = world.rental.whitelist | {net} if self.add else world.rental.whitelist - {net}
        return replace(world, rental=replace(world.rental, whitelist=whitelist))

    def gate(self, world: World, ctx: Context) -> Gate | None:
        action = "add_whitelist" if self.add else "remove_whitelist"
        text = ctx.instructor(self.kind, action, self.network)
        if text is None:
            return None
        if self.id in ctx.acked:
            return Gate("observation", "acknowledged, but the rental does not show it yet")
        verb = "add" if self.add else "remove"
        return _ack_gate(self, f"{verb} {self.network} in the rental's relay whitelist",
                         (text,))

    def describe(self) -> str:
        return f"{'allow' if self.add else 'stop allowing'} {self.network} to relay at the rental"

    def verify(self, expected: World, observed: World) -> list[str]:
        if (expected.rental.whitelist ^ observed.rental.whitelist):
            return [f"whitelist is {sorted(map(str, observed.rental.whitelist))}"]
        return []


# --- router --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetRouterFilter(Step):
    number: int
    present: bool
    line: str
    kind: ClassVar[str] = "router/filter"

    @property
    def action(self) -> Action:  # type: ignore[override]
        return Action.CREATE if self.present else Action.DELETE

    @property
    def name(self) -> str:
        return str(self.number)

    @property
    def affects(self) -> frozenset[str]:
        return frozenset({"MR009"})

    @property
    def rank(self) -> Rank:
        return Rank.ROUTER_FILTER if self.present else Rank.CLEANUP

    def simulate(self, world: World) -> World:
        router = world.router
        assert router is not None
        filters = router.filters | {self.number} if self.present else (
            router.filters - {self.number}
        )
        return replace(world, router=replace(router, filters=filters))

    def describe(self) -> str:
        return self.line if self.present else f"no ip filter {self.number}"

    def data(self) -> dict[str, object]:
        return {"commands": [self.describe()], "filter": self.number, "present": self.present}

    def verify(self, expected: World, observed: World) -> list[str]:
        if observed.router is None or (self.number in observed.router.filters) != self.present:
            return [f"filter {self.number} not as expected"]
        return []


@dataclass(frozen=True)
class SetDefaultRoute(Step):
    before: tuple[tuple[str, tuple[int, ...]], ...] | None
    after: tuple[tuple[str, tuple[int, ...]], ...]
    kind: ClassVar[str] = "router/route"
    action: ClassVar[Action] = Action.UPDATE

    @property
    def name(self) -> str:
        return "default"

    @property
    def affects(self) -> frozenset[str]:
        return frozenset({"MR005", "MR009"})

    @property
    def rank(self) -> Rank:
        return Rank.ROUTER_ROUTE

    def simulate(self, world: World) -> World:
        router = world.router
        assert router is not None
        return replace(world, router=replace(router, default_route=self.after))

    @staticmethod
    def line(route: tuple[tuple[str, tuple[int, ...]], ...] | None) -> str:
        if not route:
            return "(no default route)"
        parts = ["ip route default"]
        for gateway, filters in route:
            part = f"gateway {gateway}"
            if filters:
                part += " filter " + " ".join(map(str, filters))
            parts.append(part)
        return " ".join(parts)

    def describe(self) -> str:
        return self.line(self.after)

    def data(self) -> dict[str, object]:
        return {"before": self.line(self.before), "after": self.line(self.after)}

    def verify(self, expected: World, observed: World) -> list[str]:
        if observed.router is None or observed.router.default_route != self.after:
            got = observed.router.default_route if observed.router else None
            return [f"default route is {self.line(got)}"]
        return []

