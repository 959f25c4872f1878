"""Steps on one user: the rental mailbox, the inbound route, the old onprem mailbox, and the
mail client's outgoing server (a manual step a person acknowledges)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from reconciler.context import Context
from reconciler.findings import Gate
from reconciler.model import Side
from reconciler.steps.base import Action, Rank, Step, ack_gate
from reconciler.world import Outbound, World


@dataclass(frozen=True)
class UserStep(Step):
    """A step on one user: named by the user (`mailbox/suga`), touching only that user."""

    user: str

    @property
    def name(self) -> str:
        return self.user

    @property
    def users(self) -> tuple[str, ...]:
        return (self.user,)


@dataclass(frozen=True)
class CreateMailbox(UserStep):
    kind: ClassVar[str] = "mailbox"
    action: ClassVar[Action] = Action.CREATE

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
        return ack_gate(self, f"create mailbox {self.user}@{ctx.domain}", (text,))

    def describe(self) -> str:
        return f"create rental mailbox {self.user}"


@dataclass(frozen=True)
class MoveInbound(UserStep):
    """Onprem Postfix forwards (transport map) the user's mail to the rental, or stops.
    Also the repair of a drifted transport entry: it is rewritten to what the state says."""

    to: Side
    # Where the user reads mail from after the move (their mail client's incoming server).
    incoming_server: str = field(default="", compare=False)
    kind: ClassVar[str] = "inbound"
    action: ClassVar[Action] = Action.UPDATE

    @property
    def notes(self) -> tuple[str, ...]:
        if not self.incoming_server:
            return ()
        if self.to is Side.RENTAL:
            return (f"Tell {self.user}: new mail now arrives in the rental mailbox. Add the "
                    f"incoming (POP/IMAP) server {self.incoming_server} with the rental "
                    "mailbox's user name and password; keep the old account until its mailbox "
                    "is empty (mailrec waits for that before removing it).",)
        return (f"Tell {self.user}: new mail arrives in the onprem mailbox again: the incoming "
                f"server is {self.incoming_server} again.",)

    @property
    def rank(self) -> Rank:
        return Rank.INBOUND

    def simulate(self, world: World) -> World:
        to_rental = self.to is Side.RENTAL
        return world.update_user(self.user, route=self.to, relay_recipient=to_rental,
                                 route_drift=False, via_fallback=False)

    def gate(self, world: World, ctx: Context) -> Gate | None:
        onprem = world.onprem
        # A retired onprem forwards nothing: its path no longer matters.
        if self.to is Side.RENTAL and not onprem.forward_verified and not onprem.retired:
            return Gate("observation", "no probe message has gone from onprem to the rental "
                        "by the forward's transport yet: a blocked path would hold "
                        f"{self.user}'s mail in onprem's queue until it bounces (step "
                        "onprem/forward-probe first)", after="onprem/forward-probe")
        return None

    def describe(self) -> str:
        if self.to is Side.RENTAL:
            return f"onprem forwards mail for {self.user} to the rental"
        return f"onprem delivers mail for {self.user} locally again"

    def data(self) -> dict[str, object]:
        return {"user": self.user, "to": str(self.to)}


@dataclass(frozen=True)
class RemoveOnpremMailbox(UserStep):
    """The story's "old account removed" once the user drained it over POP."""

    messages: int = 0
    kind: ClassVar[str] = "onprem-mailbox"
    action: ClassVar[Action] = Action.DELETE

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
class MoveOutbound(UserStep):
    """A mail-client setting: a person changes it (or confirms what it is, when no record
    says), mailrec gates, instructs and records the ack."""

    to: Outbound
    kind: ClassVar[str] = "outbound"
    action: ClassVar[Action] = Action.UPDATE
    manual: ClassVar[bool] = True

    @property
    def rank(self) -> Rank:
        return Rank.ROLLBACK_OUTBOUND if self.to is Outbound.ONPREM else Rank.OUTBOUND

    def simulate(self, world: World) -> World:
        return world.update_user(self.user, outbound=self.to)

    def instructions(self, ctx: Context) -> tuple[str, ...]:
        address = f"{self.user}@{ctx.domain}"
        if self.to is Outbound.ONPREM:
            return (
                f"In {address}'s mail client, set the outgoing (SMTP) server to "
                f"{ctx.onprem_mx.rstrip('.')}, port 25, as before the migration (or confirm "
                "it is so).",
            )
        if self.to is Outbound.RELAY:
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
        known = world.user(self.user).outbound
        what = (f"confirm the outgoing mail server of {self.user} (no record says what it "
                "is)" if known is Outbound.UNKNOWN
                else f"change the outgoing mail server of {self.user}")
        return ack_gate(self, what, self.instructions(ctx))

    def describe(self) -> str:
        where = {
            Outbound.ONPREM: "onprem",
            Outbound.RELAY: "the rental (port 25 from the office, no AUTH)",
            Outbound.SUBMISSION: "the rental (submission port with AUTH)",
        }.get(self.to, str(self.to))
        return f"{self.user} sends via {where}"

    def data(self) -> dict[str, object]:
        return {"user": self.user, "to": str(self.to)}
