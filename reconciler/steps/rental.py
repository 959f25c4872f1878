"""Steps on the rental service as a whole: its no-AUTH relay whitelist."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import ClassVar

from reconciler.context import Context
from reconciler.findings import Gate
from reconciler.steps.base import Action, Rank, Step, ack_gate
from reconciler.world import World


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
    def rank(self) -> Rank:
        return Rank.WHITELIST if self.add else Rank.CLEANUP

    def simulate(self, world: World) -> World:
        net = ipaddress.ip_network(self.network)
        rental = world.rental
        whitelist = rental.whitelist | {net} if self.add else rental.whitelist - {net}
        # A relay probe from inside the network would now answer the other way: the world
        # after the step is the one its verification (the next probe) will see.
        checks = tuple(
            (address, self.add or any(address in n for n in whitelist))
            if address in net else (address, relayed)
            for address, relayed in rental.relay_checks
        )
        return replace(world, rental=replace(rental, whitelist=whitelist, relay_checks=checks))

    def gate(self, world: World, ctx: Context) -> Gate | None:
        action = "add_whitelist" if self.add else "remove_whitelist"
        text = ctx.instructor(self.kind, action, self.network)
        if text is None:
            return None
        if self.id in ctx.acked:
            return Gate("observation", "acknowledged, but the rental does not show it yet")
        verb = "add" if self.add else "remove"
        return ack_gate(self, f"{verb} {self.network} in the rental's relay whitelist", (text,))

    def describe(self) -> str:
        return f"{'allow' if self.add else 'stop allowing'} {self.network} to relay at the rental"

    def verify(self, expected: World, observed: World) -> list[str]:
        if expected.rental.whitelist ^ observed.rental.whitelist:
            return [f"whitelist is {sorted(map(str, observed.rental.whitelist))}"]
        return []
