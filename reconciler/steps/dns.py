"""Steps on the domain's DNS: the SPF record, the MX TTL, and the MX itself."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta
from typing import ClassVar

from reconciler.context import Context
from reconciler.findings import Gate
from reconciler.model import Side
from reconciler.steps.base import Action, Rank, Step
from reconciler.steps.timing import LOWERED, is_planned, plan_lowering, plan_move, resolver_hold
from reconciler.world import World


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
    def rank(self) -> Rank:
        return Rank.CLEANUP if self.retire else Rank.PREPARE

    def simulate(self, world: World) -> World:
        # The driver replaces every v=spf1 record with this one.
        return replace(world, dns=replace(world.dns, spf_terms=self.after, spf_records=1))

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
            old = max(self.before, history.mx_old_ttl or 0)
            history = plan_lowering(history, world.now, old)
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
    kind: ClassVar[str] = "dns"
    action: ClassVar[Action] = Action.UPDATE

    @property
    def name(self) -> str:
        return "mx"

    @property
    def rank(self) -> Rank:
        return Rank.MX if self.to is Side.RENTAL else Rank.ROLLBACK_MX

    def simulate(self, world: World) -> World:
        dns = replace(world.dns, mx=self.to, mx_hosts=(self.host,), mx_ttl=self.ttl)
        history = plan_move(world.history, world.now)
        return replace(world, dns=dns, history=history)

    def gate(self, world: World, ctx: Context) -> Gate | None:
        """MR004: the TTL is at cutover_ttl, and was lowered at least the old TTL ago. When
        and from what it was lowered come from the journal; a lowering no record knows of
        (by hand, or a lost journal) starts its clock when an apply first sees it, and the old
        TTL is then the worst case (`resolver_hold`)."""
        if world.dns.mx_ttl > ctx.cutover_ttl:
            return Gate(
                "step",
                f"the MX TTL is {world.dns.mx_ttl}: lower it to {ctx.cutover_ttl} first "
                "(dns/mx-ttl)",
                code="MR004",
                after="dns/mx-ttl",
            )
        hold, why = resolver_hold(world, ctx)
        lowered = world.history.mx_ttl_lowered_at
        if lowered is None:
            ready_at = world.now + timedelta(seconds=hold)
            return Gate(
                "observation",
                "the MX TTL was lowered outside mailrec (or the record of it is lost): the "
                f"next apply records when it saw it, and resolvers may hold the old TTL "
                f"({hold}s: {why}) until at least {ready_at.isoformat()}",
                code="MR004",
                until=ready_at.isoformat(),
            )
        ready_at = lowered + timedelta(seconds=hold)
        if world.now < ready_at and is_planned(world.history, LOWERED):
            # The lowering is a step of this plan: nothing has lowered the TTL yet.
            return Gate(
                "time",
                "the MX TTL will be lowered first (step dns/mx-ttl); resolvers may hold the "
                f"old TTL ({hold}s: {why}) after it is lowered: until {ready_at.isoformat()} "
                "at the earliest, if it is lowered now",
                code="MR004",
                until=ready_at.isoformat(),
            )
        if world.now < ready_at:
            return Gate(
                "time",
                f"the MX TTL was lowered at {lowered.isoformat()}; resolvers may hold the old "
                f"TTL ({hold}s: {why}) until {ready_at.isoformat()}",
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
