"""Plan: order the diff's steps so every intermediate world is safe, and mark each one
ready, gated or refused.

Two passes of the same greedy simulation over the steps in `Rank` order:
- the *realistic* pass honours gates (time via the clock, acks, observations); the steps it
  applies are `ready`, in the order it applied them - the safe prefix;
- the *optimistic* pass assumes every gate opens; a step it still cannot apply safely is
  `refused` with the findings that block it. Everything else is `gated`: waiting for its own
  gate or for gated steps before it.
Each pass simulates a step once per round and checks only what the step can break
(`safety.check_transition`), so planning grows as n log n with the number of users.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

from reconciler.context import Context
from reconciler.findings import Finding, Gate, Severity, subjects_text
from reconciler.model import DesiredState, Side
from reconciler.safety import check_transition, check_world, violations
from reconciler.safety_addresses import address_findings
from reconciler.static import static_findings
from reconciler.steps import MoveInbound, MoveOutbound, Step
from reconciler.world import Outbound, World


class Status(StrEnum):
    READY = "ready"
    GATED = "gated"
    REFUSED = "refused"


@dataclass(frozen=True)
class PlannedStep:
    step: Step
    status: Status
    findings: tuple[Finding, ...] = ()
    gate: Gate | None = None

    @property
    def id(self) -> str:
        return self.step.id

    def reasons(self) -> list[str]:
        """Why the step waits or is refused, each with its code when it has one (the text and
        Markdown plans show every code the JSON plan has)."""
        out = [self.gate_text()] if self.gate else []
        out.extend(f.text() for f in self.findings)
        return out

    def gate_text(self) -> str:
        """The gate's message, led by the rule it waits for (MR004, MR008...), if any."""
        if self.gate is None:
            return ""
        return f"{self.gate.code}: {self.gate.message}" if self.gate.code else self.gate.message


@dataclass(frozen=True)
class Plan:
    steps: tuple[PlannedStep, ...]
    findings: tuple[Finding, ...] = ()
    checksum: str = ""
    source: str = ""
    drift: tuple[Finding, ...] = ()  # invariants the observed world breaks already
    # Facts safety needed but could not verify; each counts as false (docs/guarantees.md).
    unverified: tuple[str, ...] = ()
    # How each system was read (which driver, which mode), as the command line observed
    # them: a plan says whether the rental was probed or its files read, for example.
    systems: tuple[str, ...] = ()

    @property
    def in_sync(self) -> bool:
        return not self.steps and not self.refusing_findings()

    def refusing_findings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.REFUSE]

    def by_status(self, status: Status) -> list[PlannedStep]:
        return [p for p in self.steps if p.status is status]

    def get(self, step_id: str) -> PlannedStep | None:
        return next((p for p in self.steps if p.id == step_id), None)

    @property
    def exit_code(self) -> int:
        """DESIGN section 4: 0 in sync, 2 changes pending, 3 something refused."""
        if self.by_status(Status.REFUSED) or self.refusing_findings():
            return 3
        return 2 if self.steps else 0


@dataclass
class _PassResult:
    world: World
    applied: list[Step] = field(default_factory=list)
    blocked: dict[str, list[Finding]] = field(default_factory=dict)
    gated: dict[str, Gate] = field(default_factory=dict)


def _run_pass(world: World, steps: Sequence[Step], ctx: Context, honour_gates: bool) -> _PassResult:
    result = _PassResult(world)
    pending = list(steps)
    while pending:
        progress = False
        waiting: list[Step] = []
        for step in pending:
            before = result.world if honour_gates else step.open_gate(result.world)
            after = step.simulate(before)
            found = check_transition(before, after, step, ctx)
            gate = step.gate(result.world, ctx) if honour_gates else None
            if found:
                result.blocked[step.id] = found
            if gate is not None:
                result.gated[step.id] = gate
            if found or gate is not None:
                waiting.append(step)
                continue
            result.world = after
            result.applied.append(step)
            result.blocked.pop(step.id, None)
            result.gated.pop(step.id, None)
            progress = True
        if not progress:
            break
        pending = waiting
    return result


def _moves(step: Step, world: World) -> bool:
    """Whether a step moves a user's mail (MR011 counts these). Confirming an outbound
    setting no record knows moves nobody."""
    if isinstance(step, MoveOutbound):
        return world.user(step.user).outbound is not Outbound.UNKNOWN
    return isinstance(step, MoveInbound)


def _bulk_findings(state: DesiredState, world: World, steps: Iterable[Step],
                   ctx: Context) -> Finding | None:
    moved = sorted({s.users[0] for s in steps if _moves(s, world)})
    total = max(len(state.users), 1)
    allowed = max(1, total * ctx.max_change_pct // 100)
    if len(moved) <= allowed or ctx.allow_bulk:
        return None
    return Finding(
        "MR011",
        f"this plan moves {len(moved)} of {total} users ({len(moved) * 100 // total}%), more than "
        f"max_change_pct {ctx.max_change_pct}% ({allowed} users): {subjects_text(moved)}",
        tuple(moved[:20]),
        "move fewer users per commit, or apply with --allow-bulk",
    )


def _blamed_on_bulk(bulk: Finding, world: World, ordered: Sequence[Step],
                    refused: dict[str, list[Finding]], blocked: dict[str, list[Finding]],
                    ctx: Context) -> dict[str, list[Finding]]:
    """The refusals of a plan the bulk guard (MR011) holds back, with MR011 first wherever
    it is a cause: each step is judged again in a pass that lets the moves run.

    - a move MR011 refuses shows MR011, then whatever else refuses it with the moves allowed;
    - a step refused (also) because those moves did not run, such as an old mailbox whose
      user is not forwarded yet (MR013), shows MR011 first, then its own findings;
    - a step refused as much with the moves allowed keeps its findings as they are.
    No finding is dropped and every step stays refused: only the cause is named first."""
    unbulked = _run_pass(world, ordered, ctx, honour_gates=False).blocked
    out = {step_id: [bulk, *unbulked.get(step_id, [])] for step_id in refused}
    for step_id, found in blocked.items():
        still = {f.code for f in unbulked.get(step_id, [])}
        out[step_id] = found if {f.code for f in found} <= still else [bulk, *found]
    return out


def _unmanaged_findings(state: DesiredState, world: World) -> list[Finding]:
    unmanaged = sorted(
        name for name, facts in world.users.items()
        if facts.inbound is Side.ONPREM and name not in state.users
    )
    if not unmanaged:
        return []
    return [
        Finding(
            "MR015",
            f"{len(unmanaged)} onprem account(s) are not in the state file: "
            f"{subjects_text(unmanaged)}; they count as inbound onprem (MR002, MR003)",
            tuple(unmanaged[:20]),
            "add them to users: (or remove the accounts)",
            Severity.WARN,
        )
    ]


def _address_space_findings(world: World, ctx: Context) -> list[Finding]:
    """What onprem receives for that the state does not settle yet, as a warning while it
    blocks nothing (the MX is onprem, nobody sends through the rental): the admin sees it
    in the first plan, with the lines to copy into `aliases:`, long before the MX move
    that it will block (MR019)."""
    broken = violations(world, ctx)
    return [Finding(f.code, f"before the MX can move: {f.message}", f.subjects, f.remedy,
                    Severity.WARN) for f in address_findings(world, ctx)
            if f.code not in broken]  # else the drift findings say it already


@contextmanager
def no_gc_pauses() -> Iterator[None]:
    """Planning allocates many small immutable objects and frees none of them in cycles;
    CPython's cyclic collector would rescan the growing heap again and again (40% of the time
    at 100,000 users), so it is paused for the duration and run once after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def make_plan(
    state: DesiredState,
    world: World,
    steps: Sequence[Step],
    ctx: Context,
    *,
    checksum: str = "",
    source: str = "",
) -> Plan:
    with no_gc_pauses():
        return _make_plan(state, world, steps, ctx, checksum, source)


def _make_plan(
    state: DesiredState,
    world: World,
    steps: Sequence[Step],
    ctx: Context,
    checksum: str,
    source: str,
) -> Plan:
    ordered = sorted(steps, key=lambda s: (s.rank, s.id))
    plan_findings: list[Finding] = static_findings(state)
    plan_findings.extend(_unmanaged_findings(state, world))
    plan_findings.extend(_address_space_findings(world, ctx))
    drift = tuple(
        Finding(f.code, f"the observed world already breaks this: {f.message}", f.subjects,
                f.remedy, Severity.REFUSE)
        for f in check_world(world, ctx)
    )
    plan_findings.extend(drift)

    refused: dict[str, list[Finding]] = {}
    bulk = _bulk_findings(state, world, ordered, ctx)
    if bulk is not None:
        plan_findings.append(bulk)
        for step in ordered:
            if _moves(step, world):
                refused[step.id] = [bulk]
    candidates = [s for s in ordered if s.id not in refused]

    optimistic = _run_pass(world, candidates, ctx, honour_gates=False)
    if bulk is None:
        refused.update(optimistic.blocked)
    else:
        refused = _blamed_on_bulk(bulk, world, ordered, refused, optimistic.blocked, ctx)
    feasible = [s for s in candidates if s.id not in optimistic.blocked]
    realistic = _run_pass(world, feasible, ctx, honour_gates=True)

    # A step waiting for a step that is refused can never run: refused too, saying why.
    changed = True
    while changed:
        changed = False
        for step_id, waits in realistic.gated.items():
            prerequisite = waits.after
            if prerequisite and prerequisite in refused and step_id not in refused:
                refused[step_id] = [Finding(
                    waits.code or "GATE", f"waits for {prerequisite}, which is refused",
                    (prerequisite,), f"make {prerequisite} possible first")]
                changed = True

    planned: list[PlannedStep] = [PlannedStep(s, Status.READY) for s in realistic.applied]
    applied = {s.id for s in realistic.applied}
    for step in ordered:
        if step.id in applied:
            continue
        if step.id in refused:
            planned.append(PlannedStep(step, Status.REFUSED, tuple(refused[step.id])))
            continue
        gate = realistic.gated.get(step.id)
        waiting = [
            Finding(f.code, f"waiting: {f.message}", f.subjects, f.remedy, Severity.GATE)
            for f in realistic.blocked.get(step.id, [])
            if gate is None or f.code != gate.code  # the gate already says it
        ]
        planned.append(PlannedStep(step, Status.GATED, tuple(waiting), gate))
    return Plan(tuple(planned), tuple(plan_findings), checksum, source, drift=drift,
                unverified=tuple(unverified_facts(world)))


def unverified_facts(world: World) -> list[str]:
    """What mailrec could not see or remember, as plan and status show it: the provider's
    notes, and outbound settings no ack records."""
    facts = list(world.rental.notes)
    unknown = world.counts.unknown_outbound
    if unknown:
        names = world.users_where(lambda f: f.outbound is Outbound.UNKNOWN)
        facts.append(f"outgoing server of {unknown} user(s) unknown, no ack on record "
                     f"({subjects_text(names)}): counted as possibly onprem and possibly the "
                     "rental until someone acks outbound/<user>")
    return facts
