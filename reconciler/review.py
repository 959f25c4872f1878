"""PR review: what a head commit changes compared with its base, planned against one world.

The base and the head are each planned against the same observation (live, or an offline
snapshot), so every difference between the two plans is the PR's doing: the per-user
desired-state diff, the steps the head adds, removes or holds differently, and the refusals it
introduces. A PR that introduces a refusal is the reviewer's red flag (exit 3), even when the
base already had other refusals (those are listed as not this PR's doing).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from reconciler.model import DesiredState
from reconciler.plan import Plan, PlannedStep, Status

# A setting whose name says it may hold a credential is shown only when it is a reference
# (`env:NAME`, `file:PATH`): a literal value there would be a secret committed by mistake.
_SECRETISH = re.compile(r"password|passwd|secret|token|api[_-]?key|credential", re.IGNORECASE)
HIDDEN = "(hidden: not an env: or file: reference)"


@dataclass(frozen=True)
class UserChange:
    user: str
    change: str  # "added" | "removed" | "changed"
    base: Mapping[str, object] | None
    head: Mapping[str, object] | None

    def fields(self) -> list[str]:
        """The fields that differ (every field of an added or removed user)."""
        keys = dict.fromkeys([*(self.base or {}), *(self.head or {})])
        return [k for k in keys if (self.base or {}).get(k) != (self.head or {}).get(k)]


@dataclass(frozen=True)
class SettingChange:
    path: str  # dotted, e.g. "dns.mx", "rental.whitelist"
    base: object
    head: object


@dataclass(frozen=True)
class StepChange:
    step: PlannedStep  # as the head plans it (for a removed step: as the base planned it)
    base_status: Status | None  # None: the base does not plan it
    head_status: Status | None  # None: the head does not plan it


@dataclass(frozen=True)
class Refusal:
    """A refusal, identified across the two plans by its code and the step it refuses (a
    plan-wide finding: by its code and subjects), not by its wording (its counts change)."""

    code: str
    step: str  # "" for a plan-wide finding
    text: str
    subjects: tuple[str, ...] = ()  # a plan-wide finding's users or resources, or its place

    @property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        return (self.code, self.step, self.subjects)


@dataclass(frozen=True)
class Review:
    base_ref: str
    head_ref: str
    base_plan: Plan | None  # None: the base state did not load (a PR that fixes it)
    head_plan: Plan
    base_problems: tuple[str, ...] = ()  # why the base did not load
    users: tuple[UserChange, ...] = ()
    settings: tuple[SettingChange, ...] = ()
    added: tuple[StepChange, ...] = ()
    removed: tuple[StepChange, ...] = ()
    changed: tuple[StepChange, ...] = ()  # planned by both, held differently
    introduced: tuple[Refusal, ...] = ()
    kept: tuple[Refusal, ...] = ()  # the base's refusals the head still has
    resolved: tuple[Refusal, ...] = ()  # the base's refusals the head no longer has
    systems: tuple[str, ...] = field(default=())

    @property
    def exit_code(self) -> int:
        """3 the head introduces a refusal; 2 it changes what would be done; 0 it does not."""
        if self.introduced:
            return 3
        return 2 if (self.added or self.removed or self.changed) else 0

    def summary(self) -> str:
        users = {c: sum(1 for u in self.users if u.change == c)
                 for c in ("added", "removed", "changed")}
        who = ", ".join(f"{n} user(s) {c}" for c, n in users.items() if n) or "no user changed"
        settings = f", {len(self.settings)} setting(s) changed" if self.settings else ""
        steps = (f"{len(self.added)} step(s) added, {len(self.removed)} removed"
                 + (f", {len(self.changed)} held differently" if self.changed else ""))
        if self.introduced:
            codes = ", ".join(sorted({r.code for r in self.introduced}))
            verdict = f"introduces {len(self.introduced)} refusal(s) ({codes})"
        else:
            verdict = "introduces no refusal"
        return f"{who}{settings}; {steps}; {verdict}"


def _refusals(plan: Plan | None) -> list[Refusal]:
    if plan is None:
        return []
    out = [Refusal(f.code, planned.id, f.text())
           for planned in plan.steps if planned.status is Status.REFUSED
           for f in planned.findings]
    # A refused step without a finding of its own waits on a plan-wide one (MR011, MR012).
    out += [Refusal(f.code, "", f.text(), (f.where,) if f.where else tuple(sorted(f.subjects)))
            for f in plan.refusing_findings()]
    return out


def _secretish_hidden(path: str, value: object) -> object:
    if not _SECRETISH.search(path.rsplit(".", 1)[-1]):
        return value
    if value is None or (isinstance(value, str) and value.startswith(("env:", "file:"))):
        return value
    return HIDDEN


def _flatten(data: object, prefix: str = "") -> dict[str, object]:
    """Dotted paths to leaves; lists are leaves (a whitelist is compared whole)."""
    if isinstance(data, dict):  # an empty one adds no path: `{}` and absent mean the same
        out: dict[str, object] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: _secretish_hidden(prefix, data)}


def state_changes(base: DesiredState | None, head: DesiredState
                  ) -> tuple[list[UserChange], list[SettingChange]]:
    """The per-user diff and every other setting that differs (dotted paths)."""
    head_data = head.model_dump(mode="json")
    base_data = base.model_dump(mode="json") if base is not None else {}
    base_users: dict[str, dict[str, object]] = base_data.pop("users", {}) or {}
    head_users: dict[str, dict[str, object]] = head_data.pop("users", {})
    users: list[UserChange] = []
    for name in sorted(set(base_users) | set(head_users)):
        old, new = base_users.get(name), head_users.get(name)
        if old == new:
            continue
        change = "added" if old is None else "removed" if new is None else "changed"
        users.append(UserChange(name, change, old, new))
    old_flat, new_flat = _flatten(base_data), _flatten(head_data)
    settings = [SettingChange(path, old_flat.get(path), new_flat.get(path))
                for path in sorted(set(old_flat) | set(new_flat))
                if old_flat.get(path) != new_flat.get(path)]
    return users, settings


def _by_id(plan: Plan | None) -> dict[str, PlannedStep]:
    return {p.id: p for p in plan.steps} if plan is not None else {}


def _held(planned: PlannedStep) -> tuple[str, tuple[str, ...]]:
    return (str(planned.status), tuple(f.code for f in planned.findings))


def compare(*, base_ref: str, head_ref: str, base_state: DesiredState | None,
            head_state: DesiredState, base_plan: Plan | None, head_plan: Plan,
            base_problems: Iterable[str] = (), systems: tuple[str, ...] = ()) -> Review:
    users, settings = state_changes(base_state, head_state)
    base_steps, head_steps = _by_id(base_plan), _by_id(head_plan)
    added = tuple(StepChange(p, None, p.status) for i, p in head_steps.items()
                  if i not in base_steps)
    removed = tuple(StepChange(p, p.status, None) for i, p in base_steps.items()
                    if i not in head_steps)
    changed = tuple(StepChange(p, base_steps[i].status, p.status)
                    for i, p in head_steps.items()
                    if i in base_steps and _held(base_steps[i]) != _held(p))
    base_refusals = {r.key: r for r in _refusals(base_plan)}
    head_refusals = {r.key: r for r in _refusals(head_plan)}
    return Review(
        base_ref=base_ref, head_ref=head_ref, base_plan=base_plan, head_plan=head_plan,
        base_problems=tuple(base_problems), users=tuple(users), settings=tuple(settings),
        added=added, removed=removed, changed=changed,
        introduced=tuple(r for k, r in head_refusals.items() if k not in base_refusals),
        kept=tuple(r for k, r in head_refusals.items() if k in base_refusals),
        resolved=tuple(r for k, r in base_refusals.items() if k not in head_refusals),
        systems=systems)
