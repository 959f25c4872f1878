"""Steps on the names onprem receives for besides its users: an alias made at the rental, the
seed-style fallback setting retired once mailrec's own forward replaces it, and a relay in
front of onprem detached before onprem retires."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from reconciler.context import Context
from reconciler.findings import Gate
from reconciler.model import Side
from reconciler.steps.base import Action, Rank, Step, ack_command, ack_gate
from reconciler.world import AddressFacts, AddressKind, World


@dataclass(frozen=True)
class CreateAlias(Step):
    """The rental delivers `name@domain` to the members the state lists (MR019)."""

    alias: str
    members: tuple[str, ...]
    kind: ClassVar[str] = "alias"
    action: ClassVar[Action] = Action.CREATE

    @property
    def name(self) -> str:
        return self.alias

    @property
    def rank(self) -> Rank:
        return Rank.MAILBOX

    def simulate(self, world: World) -> World:
        old = world.addresses.get(self.alias) or AddressFacts(AddressKind.ALIAS, keep="members")
        return world.with_address(self.alias, replace(old, at_rental=True,
                                                      rental_members=self.members))

    def gate(self, world: World, ctx: Context) -> Gate | None:
        target = f"{self.alias}: {', '.join(self.members)}"
        text = ctx.instructor(self.kind, "create_alias", target)
        if text is None:
            return None
        if self.id in ctx.acked:
            return Gate("observation", f"acknowledged, but the rental does not accept "
                        f"{self.alias}@{ctx.domain} yet (checked by SMTP RCPT probe)")
        return ack_gate(self, f"create the alias {self.alias}@{ctx.domain}", (text,))

    def verify(self, expected: World, observed: World) -> list[str]:
        got = observed.addresses.get(self.alias)
        if got is None or not got.at_rental:
            return [f"alias {self.alias}: the rental does not deliver it"]
        if got.rental_members is not None and got.rental_members != self.members:
            return [f"alias {self.alias}: the rental delivers to {', '.join(got.rental_members)}"]
        return []

    def describe(self) -> str:
        return f"the rental delivers {self.alias} to {', '.join(self.members)}"

    def data(self) -> dict[str, object]:
        return {"alias": self.alias, "members": list(self.members)}


@dataclass(frozen=True)
class RemoveFallback(Step):
    """Retire onprem's fallback_transport/luser_relay to the rental (a seed-style migration)
    once mailrec's transport entries forward every user who relied on it. The users it still
    carries are this step's users: a user left with nowhere to receive is refused (MR013)."""

    carried: tuple[str, ...] = ()
    kind: ClassVar[str] = "onprem"
    action: ClassVar[Action] = Action.DELETE

    @property
    def name(self) -> str:
        return "fallback"

    @property
    def users(self) -> tuple[str, ...]:
        return self.carried

    @property
    def rank(self) -> Rank:
        return Rank.CLEANUP

    def simulate(self, world: World) -> World:
        result = replace(world, onprem=replace(world.onprem, fallback_to_rental=False))
        for name in self.carried:
            if result.user(name).via_fallback:
                result = result.update_user(name, route=Side.ONPREM, via_fallback=False)
        return result

    def verify(self, expected: World, observed: World) -> list[str]:
        if observed.onprem.fallback_to_rental:
            return ["onprem still hands names without an account to the rental"]
        return []

    def describe(self) -> str:
        return ("remove onprem's fallback_transport/luser_relay to the rental (mailrec's "
                "transport map forwards those users now)")


@dataclass(frozen=True)
class DetachUpstream(Step):
    """A relay in front of onprem (the DMZ host the MX named) stops routing the domain to
    onprem and has nothing queued for it: a person confirms, since mailrec does not manage
    that host. Only then may onprem retire (MR010)."""

    host: str
    onprem_host: str = ""
    # mailrec reads the relay over SSH (onprem.upstream[].connect): it waits to see it
    # detached instead of asking a person to confirm it.
    readable: bool = False
    kind: ClassVar[str] = "upstream"
    action: ClassVar[Action] = Action.UPDATE  # a person's step (an ack gate) unless readable

    @property
    def name(self) -> str:
        return self.host

    @property
    def rank(self) -> Rank:
        return Rank.RETIRE

    def simulate(self, world: World) -> World:
        pending = tuple(p for p in world.onprem.upstream_pending if p[0] != self.host)
        return replace(world, onprem=replace(world.onprem, upstream_pending=pending))

    def gate(self, world: World, ctx: Context) -> Gate | None:
        if world.dns.mx is not Side.RENTAL:
            return Gate("observation", f"the relay {self.host} receives for {ctx.domain} "
                        "while the MX names it: move the MX to the rental first")
        host = self.host.rstrip(".")
        todo = (
            f"On {host}: remove {ctx.domain} from relay_domains and from any transport_maps "
            f"entry that sends it to {self.onprem_host.rstrip('.') or 'onprem'}, then run "
            "postfix reload.",
            f"On {host}: `postqueue -p` must list no message for @{ctx.domain}; flush it "
            "(`postqueue -f`) and wait until it is empty.",
        )
        if self.readable:
            why = dict(world.onprem.upstream_pending).get(self.host, "")
            return Gate("observation", f"waiting to see the relay {host} detached from "
                        f"onprem: {why}", instructions=todo)
        return ack_gate(self, f"confirm the relay {host} no longer routes {ctx.domain} to "
                        "onprem and holds nothing for it",
                        (*todo, f"Then run: {ack_command(self.id)}"))

    def describe(self) -> str:
        return f"detach the relay {self.host.rstrip('.')} in front of onprem"
