"""Apply: the level-triggered, idempotent reconcile loop.

observe -> plan -> apply each ready step through the backend -> observe again and verify the
step against its own simulation -> journal. It can be called at any time: after a crash, the
next call observes the half-done world and plans from there. A failing step stops the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from reconciler.context import Context, Instructor
from reconciler.diff import diff
from reconciler.journal import Journal
from reconciler.load import LoadedState
from reconciler.observe import JournalView, observations_to_record, world_checksum
from reconciler.plan import Plan, Status, make_plan, no_gc_pauses
from reconciler.safety import check_transition
from reconciler.steps import SetMxTtl, Step
from reconciler.world import World


class Backend(Protocol):
    """The drivers, composed: see `drivers/backend.py`."""

    def observe(self, now: datetime, view: JournalView) -> World: ...

    def execute(self, step: Step) -> str | None: ...

    def instructor(self) -> Instructor: ...


class StalePlanError(RuntimeError):
    """A saved plan whose world is no longer the observed world."""


@dataclass(frozen=True)
class Outcome:
    step: str
    result: str  # ok | failed
    message: str = ""


@dataclass
class ApplyReport:
    plan: Plan
    outcomes: list[Outcome] = field(default_factory=list)
    final: Plan | None = None
    world: World | None = None  # the world `final` was planned against

    @property
    def failed(self) -> bool:
        return any(o.result == "failed" for o in self.outcomes)


def context_for(loaded: LoadedState, view: JournalView, instructor: Instructor | None = None,
                *, allow_bulk: bool = False) -> Context:
    """The planner's context: the state, plus what the journal remembers."""
    return Context.of(loaded.state, allow_bulk=allow_bulk, acked=view.acked,
                      instructor=instructor or (lambda kind, action, target: None),
                      router_filters=view.router_filters, egress_ips=view.egress_ips)


def build_plan(
    loaded: LoadedState,
    world: World,
    view: JournalView,
    instructor: Instructor,
    *,
    allow_bulk: bool = False,
) -> Plan:
    ctx = context_for(loaded, view, instructor, allow_bulk=allow_bulk)
    with no_gc_pauses():
        steps = diff(loaded.state, world, ctx)
        return make_plan(
            loaded.state,
            world,
            steps,
            ctx,
            checksum=world_checksum(world, loaded.digest),
            source=loaded.digest,
        )


def observe_and_plan(
    loaded: LoadedState,
    backend: Backend,
    journal: Journal | None,
    now: datetime,
    *,
    allow_bulk: bool = False,
) -> tuple[World, Plan]:
    view = JournalView.read(journal)
    world = backend.observe(now, view)
    return world, build_plan(loaded, world, view, backend.instructor(), allow_bulk=allow_bulk)


def record_observations(journal: Journal, world: World, view: JournalView,
                        loaded: LoadedState, now: datetime) -> bool:
    """Write what this apply saw that the gates count from (see
    `observe.observations_to_record`); True if anything was written."""
    notes = observations_to_record(world, view, loaded.state, loaded.state.dns.cutover_ttl)
    for step, detail in notes:
        journal.record(now, "observe", step, "noted", source=loaded.digest, detail=detail)
    return bool(notes)


def reconcile(
    loaded: LoadedState,
    backend: Backend,
    journal: Journal,
    clock: Callable[[], datetime],
    *,
    allow_bulk: bool = False,
    saved: dict[str, object] | None = None,
    progress: Callable[[str, str], None] | None = None,
) -> ApplyReport:
    """One reconcile: apply the ready steps of a fresh plan (or of `saved`, if still valid)."""
    with journal.lock():
        now = clock()
        view = JournalView.read(journal)
        world = backend.observe(now, view)
        if record_observations(journal, world, view, loaded, now):
            view = JournalView.read(journal)
            world = backend.observe(now, view)
        plan = build_plan(loaded, world, view, backend.instructor(), allow_bulk=allow_bulk)
        ctx = context_for(loaded, view, allow_bulk=allow_bulk)
        ready = plan.by_status(Status.READY)
        if saved is not None:
            if saved.get("checksum") != plan.checksum:
                raise StalePlanError(
                    "the saved plan is stale: the observed world (or the state) changed since it "
                    f"was made (plan {saved.get('checksum')}, now {plan.checksum}); "
                    "run mailrec plan again"
                )
            allowed = {
                str(s.get("id")) for s in saved.get("steps", [])  # type: ignore[attr-defined]
                if isinstance(s, dict) and s.get("status") == "ready"
            }
            ready = [p for p in ready if p.id in allowed]
        report = ApplyReport(plan)
        for planned in ready:
            step = planned.step
            expected = step.simulate(world)
            # The world may have moved since planning; a step is applied only if it is still safe.
            found = check_transition(world, expected, step, ctx)
            if found:
                report.outcomes.append(Outcome(step.id, "failed", found[0].text()))
                break
            detail: dict[str, object] = dict(step.data())
            if isinstance(step, SetMxTtl):
                detail["lowering"] = step.lowering
            journal.record(clock(), "apply", step.id, "started", source=loaded.digest,
                           detail=detail)
            if progress:
                progress(step.id, "started")
            try:
                said = backend.execute(step)
                observed = backend.observe(clock(), JournalView.read(journal))
            except Exception as exc:  # a driver failure stops the run; the next run resumes
                message = f"{type(exc).__name__}: {exc}"
                journal.record(clock(), "apply", step.id, "failed", source=loaded.digest,
                               detail={"error": message})
                report.outcomes.append(Outcome(step.id, "failed", message))
                break
            problems = step.verify(expected, observed)
            if problems:
                message = "verification failed: " + "; ".join(problems)
                journal.record(clock(), "apply", step.id, "failed", source=loaded.digest,
                               detail={"error": message})
                report.outcomes.append(Outcome(step.id, "failed", message))
                break
            if said:
                detail["result"] = said  # what the driver proved (e.g. the forward probe)
            journal.record(clock(), "apply", step.id, "ok", source=loaded.digest, detail=detail)
            report.outcomes.append(Outcome(step.id, "ok"))
            if progress:
                progress(step.id, "ok")
            world = observed
        if report.outcomes:
            report.world, report.final = observe_and_plan(loaded, backend, journal, clock(),
                                                          allow_bulk=allow_bulk)
        else:
            # Nothing was applied or recorded since this round observed and planned: the
            # plan is the final one (a daemon round on an unchanged world observes once).
            report.world, report.final = world, plan
        _spend_acks(journal, report.final, clock())
        return report


def _spend_acks(journal: Journal, final: Plan, now: datetime) -> None:
    """Acks of manual steps whose change is now observed are used up (outbound acks are the
    record of a client setting and stay)."""
    pending = {p.id for p in final.steps}
    for step_id in JournalView.read(journal).acked:
        if step_id not in pending and not step_id.startswith("outbound/"):
            journal.record(now, "observe", step_id, "noted", detail={"ack_spent": True})
