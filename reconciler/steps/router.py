"""Steps on the office router: mailrec's tcp/25 filter and the default route's entries."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from reconciler.steps.base import Action, Rank, Step
from reconciler.world import RouteEntries, World


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
    def rank(self) -> Rank:
        return Rank.ROUTER_FILTER if self.present else Rank.CLEANUP

    def simulate(self, world: World) -> World:
        router = world.router
        assert router is not None
        lines = dict(router.filter_lines)
        verdicts = dict(router.verdicts)
        verdicts.pop(self.number, None)
        if self.present:
            filters = router.filters | {self.number}
            lines[self.number] = self.line
        else:
            filters = router.filters - {self.number}
            lines.pop(self.number, None)
        return replace(world, router=replace(
            router, filters=filters, other_filters=router.other_filters - {self.number},
            filter_lines=lines, verdicts=verdicts))

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
    before: RouteEntries | None
    after: RouteEntries
    # Recorded with the step: the gateway mailrec routes tcp/25 through and its public
    # address, so MR005 can judge that gateway later even if the state no longer says.
    egress: tuple[str, str] | None = None
    kind: ClassVar[str] = "router/route"
    action: ClassVar[Action] = Action.UPDATE

    @property
    def name(self) -> str:
        return "default"

    @property
    def rank(self) -> Rank:
        return Rank.ROUTER_ROUTE

    def simulate(self, world: World) -> World:
        router = world.router
        assert router is not None
        return replace(world, router=replace(router, default_route=self.after))

    @staticmethod
    def line(route: RouteEntries | None) -> str:
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
        data: dict[str, object] = {"before": self.line(self.before), "after": self.line(self.after)}
        if self.egress is not None:
            data["egress"] = {"gateway": self.egress[0], "address": self.egress[1]}
        return data

    def verify(self, expected: World, observed: World) -> list[str]:
        if observed.router is None or observed.router.default_route != self.after:
            got = observed.router.default_route if observed.router else None
            return [f"default route is {self.line(got)}"]
        return []
