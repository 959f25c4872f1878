"""Steps on the onprem Postfix as a whole: its recipient validation, and its retirement."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta
from typing import ClassVar

from reconciler.context import Context
from reconciler.findings import Gate
from reconciler.steps.base import Action, Rank, Step
from reconciler.steps.timing import MOVED, is_planned, resolver_hold
from reconciler.world import World


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
class ProbeForward(Step):
    """Before the first user is forwarded: onprem sends a probe message to the rental by the
    transport mailrec is about to write, and the message must reach the rental's SMTP server
    (accepted, or refused by it: either way the path works). Recorded in the journal."""

    target: str  # smtp:[host]:port, as the transport entries will say
    kind: ClassVar[str] = "onprem"
    action: ClassVar[Action] = Action.UPDATE

    @property
    def name(self) -> str:
        return "forward-probe"

    @property
    def rank(self) -> Rank:
        return Rank.PREPARE

    def simulate(self, world: World) -> World:
        return replace(world, onprem=replace(world.onprem, forward_verified=True))

    def verify(self, expected: World, observed: World) -> list[str]:
        return []  # the driver raises when the probe does not arrive; nothing to observe

    def describe(self) -> str:
        return f"send a probe message from onprem to the rental ({self.target})"

    def data(self) -> dict[str, object]:
        return {"target": self.target}


@dataclass(frozen=True)
class RetireOnprem(Step):
    kind: ClassVar[str] = "onprem"
    action: ClassVar[Action] = Action.DELETE

    @property
    def name(self) -> str:
        return "retire"

    @property
    def rank(self) -> Rank:
        return Rank.RETIRE

    def simulate(self, world: World) -> World:
        return replace(world, onprem=replace(world.onprem, retired=True))

    def gate(self, world: World, ctx: Context) -> Gate | None:
        """MR010's clocks, each from what was observed, the worst case where nothing was:
        resolvers may hold the old MX for the longest TTL known (`resolver_hold`) after the
        move, counted from the move mailrec applied or else from the first time an apply saw
        it moved (not known at all: from now); and the quiet period runs from the newest
        mail in onprem's log, or from the move when the log shows none."""
        moved = world.history.mx_moved_at
        start = world.now if moved is None else moved
        hold, why = resolver_hold(world, ctx, moved=True)
        ttl_over = start + timedelta(seconds=hold)
        last = world.onprem.last_mail_at
        quiet_over = (max(last, start) if last else start) + ctx.quiet_period
        if world.now >= ttl_over and world.now >= quiet_over:
            return None
        # Both clocks are told, and the gate opens when the later one has run out.
        until = max(ttl_over, quiet_over)
        earliest = ""
        if moved is None:
            when = ("no record says when the MX moved (a lost journal, or moved by hand): the "
                    "waits start when an apply first sees it moved")
        elif is_planned(world.history, MOVED):
            # The move is a step of this plan: the clocks start when it is applied.
            when = "the MX will move first (step dns/mx); after it moves"
            earliest = " at the earliest"
        else:
            when = f"the MX moved at {moved.isoformat()}"
        seen = (f"mail was last seen through onprem at {last.isoformat()}" if last
                else "the onprem log shows no mail since")
        return Gate(
            "observation" if moved is None else "time",
            f"{when}; resolvers may cache the old MX for {hold}s ({why}), until "
            f"{ttl_over.isoformat()}{earliest}; {seen}, and the quiet period ends at "
            f"{quiet_over.isoformat()}{earliest}",
            code="MR010",
            until=until.isoformat(),
        )

    def describe(self) -> str:
        return "retire the onprem Postfix (stop relaying for the domain)"
