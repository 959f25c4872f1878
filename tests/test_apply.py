"""The executor on the lab: verification, failures that stop the run and resume next time,
the lock, saved plans, and the journal's records."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from reconciler.apply import StalePlanError, observe_and_plan, reconcile
from reconciler.drivers.backend import SystemBackend
from reconciler.journal import Journal, LockedError
from reconciler.lab.layout import LabLayout
from reconciler.load import load_state
from reconciler.observe import JournalView
from reconciler.plan import Status
from reconciler.render import plan_json
from reconciler.steps import MoveInbound, Step

from .conftest import set_users

NOW = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)


def clock() -> datetime:
    return NOW


class FailingBackend(SystemBackend):
    """The lab backend, with one step that fails the way a driver fails (an exception), or
    that silently does nothing (caught by verification)."""

    def __init__(self, *args: object, fail: str = "", noop: str = "", **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fail, self.noop = fail, noop
        self.executed: list[str] = []

    def execute(self, step: Step) -> None:
        if step.id == self.fail:
            raise OSError(f"connection reset while applying {step.id}")
        self.executed.append(step.id)
        if step.id != self.noop:
            super().execute(step)


def _setup(lab: LabLayout) -> tuple[Path, Journal]:
    state = lab.root / "state"
    set_users(state, suga=("rental", "onprem"))
    return state, Journal(lab.journal_dir)


def test_failure_stops_the_run_and_the_next_run_resumes(lab: LabLayout) -> None:
    state, journal = _setup(lab)
    loaded = load_state(state)
    broken = FailingBackend(loaded.state, lab=lab, fail="mailbox/suga")
    report = reconcile(loaded, broken, journal, clock)
    assert report.failed
    results = [(o.step, o.result) for o in report.outcomes]
    assert ("mailbox/suga", "failed") in results
    assert "inbound/suga" not in broken.executed  # nothing after the failure
    assert "OSError" in journal.events(step="mailbox/suga")[-1].detail["error"]  # type: ignore[operator]
    # The forward was never written: suga's mail still goes to the onprem mailbox.
    assert "suga" not in (lab.postfix_dir / "mailrec_transport").read_text()

    healthy = FailingBackend(loaded.state, lab=lab)
    report = reconcile(loaded, healthy, journal, clock)
    assert not report.failed
    assert healthy.executed[:2] == ["mailbox/suga", "inbound/suga"]
    assert "suga@example.co.jp" in (lab.postfix_dir / "mailrec_transport").read_text()
    assert [e.result for e in journal.events(step="inbound/suga")] == ["started", "ok"]
    journal.close()


def test_a_step_that_did_not_take_effect_fails_verification(lab: LabLayout) -> None:
    state, journal = _setup(lab)
    loaded = load_state(state)
    lying = FailingBackend(loaded.state, lab=lab, noop="mailbox/suga")
    report = reconcile(loaded, lying, journal, clock)
    failed = [o for o in report.outcomes if o.result == "failed"]
    assert failed and failed[0].step == "mailbox/suga"
    assert "verification failed" in failed[0].message
    assert "rental_mailbox" in failed[0].message
    journal.close()


def test_apply_is_idempotent(lab: LabLayout) -> None:
    state, journal = _setup(lab)
    loaded = load_state(state)
    backend = FailingBackend(loaded.state, lab=lab)
    reconcile(loaded, backend, journal, clock)
    executed = list(backend.executed)
    report = reconcile(loaded, backend, journal, clock)
    assert report.outcomes == []
    assert backend.executed == executed
    journal.close()


def test_two_applies_never_run_at_once(lab: LabLayout) -> None:
    state, journal = _setup(lab)
    loaded = load_state(state)
    other = Journal(lab.journal_dir)
    with other.lock(), pytest.raises(LockedError, match="another mailrec apply"):
        reconcile(loaded, FailingBackend(loaded.state, lab=lab), journal, clock)
    journal.close()
    other.close()


def test_saved_plan_is_applied_exactly_or_refused_when_stale(lab: LabLayout) -> None:
    state, journal = _setup(lab)
    loaded = load_state(state)
    backend = FailingBackend(loaded.state, lab=lab)
    _, plan = observe_and_plan(loaded, backend, journal, NOW)
    saved = plan_json(plan)
    # Only what the reviewed plan called ready is applied, even if more became ready since.
    saved["steps"] = [s for s in saved["steps"] if s["id"] != "inbound/suga"]  # type: ignore[attr-defined]
    report = reconcile(loaded, backend, journal, clock, saved=saved)
    assert "inbound/suga" not in backend.executed
    assert "mailbox/suga" in backend.executed
    assert not report.failed
    # Now the world has changed: the same saved plan is stale.
    with pytest.raises(StalePlanError, match="stale"):
        reconcile(loaded, backend, journal, clock, saved=saved)
    journal.close()


def test_a_step_that_would_break_a_rule_never_runs(lab: LabLayout,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A step whose simulated effect breaks MR001 is refused, not executed, and the lab's
    Postfix is left as it was."""
    state, journal = _setup(lab)
    loaded = load_state(state)
    backend = FailingBackend(loaded.state, lab=lab)
    original = MoveInbound.simulate

    def sneaky(self: MoveInbound, world: object) -> object:
        # Pretend the mailbox vanished right before the route: MR001 must stop it.
        result = original(self, world)  # type: ignore[arg-type]
        return result.update_user(self.user, rental_mailbox=False)

    _, plan = observe_and_plan(loaded, backend, journal, NOW)
    assert plan.get("inbound/suga").status is Status.READY  # type: ignore[union-attr]
    monkeypatch.setattr(MoveInbound, "simulate", sneaky)
    report = reconcile(loaded, backend, journal, clock)
    assert "inbound/suga" not in backend.executed
    assert report.final is not None
    refused = report.final.get("inbound/suga")
    assert refused is not None and refused.status is Status.REFUSED
    assert "MR001" in {f.code for f in refused.findings}
    assert "suga" not in (lab.postfix_dir / "mailrec_transport").read_text()
    journal.close()


def test_an_ack_is_spent_once_its_change_is_observed(lab: LabLayout) -> None:
    """The manual-provider flow: an ack confirms one change; when the change is needed again
    later (the mailbox vanished), a person is asked again instead of waiting on the old ack."""
    state, journal = _setup(lab)
    loaded = load_state(state)
    journal.record(NOW, "ack", "mailbox/suga", "noted", detail={"note": "created"})
    backend = FailingBackend(loaded.state, lab=lab)
    reconcile(loaded, backend, journal, clock)  # lab provider: the mailbox is created, observed
    assert "mailbox/suga" not in JournalView.read(journal).acked
    journal.record(NOW, "ack", "mailbox/suga", "noted")
    assert "mailbox/suga" in JournalView.read(journal).acked  # a new ack counts again
    journal.close()
