"""Steps: the atomic changes a plan is made of, as pure data with a pure `simulate(world)`.

The planner orders them by simulating; the property tests replay them; the executor applies
each through a driver and verifies the observed world against the same simulation.
A step id is stable (`<kind>/<name>`), so plans, acks and the journal all refer to it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import ClassVar

from reconciler.context import Context
from reconciler.findings import Gate
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

    @property
    def notes(self) -> tuple[str, ...]:
        """What people must know when this step runs (not a gate: it waits for nothing)."""
        return ()

    def verify(self, expected: World, observed: World) -> list[str]:
        """Differences between the simulated and the observed world on what this step
        touches; empty means the step took effect."""
        problems = []
        for name in self.users:
            want, got = expected.user(name), observed.user(name)
            for attr in VERIFIED_USER_FIELDS:
                if getattr(want, attr) != getattr(got, attr):
                    problems.append(
                        f"{name}.{attr}: expected {getattr(want, attr)}, "
                        f"observed {getattr(got, attr)}"
                    )
        return problems

    def __str__(self) -> str:
        return f"{self.id}: {self.describe()}"


VERIFIED_USER_FIELDS = ("onprem_account", "route", "route_drift", "relay_recipient",
                        "rental_mailbox", "outbound")


def ack_command(step_id: str) -> str:
    """The command a person runs to confirm a manual step, as it can be pasted into a shell
    (a step id may hold shell characters: `alias/*`, onprem's catch-all)."""
    return f"mailrec ack {shlex.quote(step_id)}"


def ack_gate(step: Step, what: str, instructions: tuple[str, ...]) -> Gate:
    return Gate(
        "ack",
        f"waiting for a person: {what}; then run `{ack_command(step.id)}`",
        instructions=instructions,
    )
