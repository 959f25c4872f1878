"""Render a PR review (reconciler/review.py): Markdown for the PR comment, text, and JSON.

Renderers read the review only; they decide nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from reconciler.plan import PlannedStep
from reconciler.render import FORMAT_VERSION, plan_json
from reconciler.review import Refusal, Review, StepChange, UserChange

_ICON = {"ready": "✅", "gated": "⏳", "refused": "⛔", None: "—"}


def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _value(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _user_fields(change: UserChange) -> list[tuple[str, str, str]]:
    return [(name, _value((change.base or {}).get(name)), _value((change.head or {}).get(name)))
            for name in change.fields()]


def _reasons(planned: PlannedStep) -> list[str]:
    return planned.reasons()


def _title(review: Review) -> str:
    return f"mailrec PR review ({review.base_ref} → {review.head_ref})"


def render_review_markdown(review: Review, domain: str) -> str:
    out = [f"### {_title(review)} for {domain}", "",
           f"**{_md(review.summary())}**", ""]
    if review.introduced:
        out += ["#### ⛔ Refusals this PR introduces", ""]
        out += [_md_refusal(r) for r in review.introduced]
        out.append("")
    if review.base_problems:
        out += ["#### The base state does not load", ""]
        out += [f"- {_md(p)}" for p in review.base_problems]
        out += ["", "Every step of the head is listed as added.", ""]
    out += _md_desired(review)
    for heading, changes in (("Steps this PR adds", review.added),
                             ("Steps this PR removes", review.removed),
                             ("Steps held differently", review.changed)):
        if changes:
            out += [f"#### {heading}", "", "| step | base | head | change | why / what next |",
                    "|---|---|---|---|---|"]
            out += [_md_step(change) for change in changes]
            out.append("")
    if not (review.added or review.removed or review.changed):
        out += ["This PR changes no step of the plan.", ""]
    for heading, refusals in (("Already refused in the base (not this PR's doing)",
                               review.kept),
                              ("Refusals of the base this PR resolves", review.resolved)):
        if refusals:
            out += [f"#### {heading}", ""]
            out += [_md_refusal(r) for r in refusals]
            out.append("")
    if review.head_plan.unverified:
        out += ["**Not verified** (each counts as false for safety)", ""]
        out += [f"- {_md(fact)}" for fact in review.head_plan.unverified]
        out.append("")
    if review.systems:
        out += [f"<sub>observed: {_md('; '.join(review.systems))}</sub>", ""]
    return "\n".join(out)


def _md_refusal(refusal: Refusal) -> str:
    # The finding's text leads with its code already.
    return f"- `{refusal.step}`: {_md(refusal.text)}" if refusal.step else f"- {_md(refusal.text)}"


def _md_desired(review: Review) -> list[str]:
    out: list[str] = []
    if review.users:
        out += ["#### Desired state: users", "", "| user | change | field | base | head |",
                "|---|---|---|---|---|"]
        for change in review.users:
            for index, (name, old, new) in enumerate(_user_fields(change)):
                who = f"`{change.user}`" if index == 0 else ""
                what = change.change if index == 0 else ""
                out.append(f"| {who} | {what} | {name} | {_md(old)} | {_md(new)} |")
        out.append("")
    if review.settings:
        out += ["#### Desired state: settings", "", "| setting | base | head |",
                "|---|---|---|"]
        out += [f"| `{s.path}` | {_md(_value(s.base))} | {_md(_value(s.head))} |"
                for s in review.settings]
        out.append("")
    if not (review.users or review.settings):
        out += ["The desired state is the same in the base and the head.", ""]
    return out


def _md_step(change: StepChange) -> str:
    planned = change.step
    base = str(change.base_status) if change.base_status else None
    head = str(change.head_status) if change.head_status else None
    reasons = "<br>".join(_md(r) for r in _reasons(planned)) if head else ""
    held = [f"{_ICON[status]} {status or ''}".rstrip() for status in (base, head)]
    return (f"| `{planned.id}` | {held[0]} | {held[1]} | {_md(planned.step.describe())} | "
            f"{reasons} |")


def render_review_text(review: Review, domain: str) -> str:
    out = [f"{_title(review)} for {domain}", f"  {review.summary()}"]
    if review.introduced:
        out += ["", "refusals this PR introduces:"]
        out += [f"  ⛔ {r.text}" + (f" [{r.step}]" if r.step else "") for r in review.introduced]
    if review.base_problems:
        out += ["", "the base state does not load (every step of the head counts as added):"]
        out += [f"  {p}" for p in review.base_problems]
    if review.users:
        out += ["", "desired state, users:"]
        for change in review.users:
            for name, old, new in _user_fields(change):
                out.append(f"  {change.user:<16} {change.change:<8} {name}: {old} -> {new}")
    if review.settings:
        out += ["", "desired state, settings:"]
        out += [f"  {s.path}: {_value(s.base)} -> {_value(s.head)}" for s in review.settings]
    for heading, changes in (("steps this PR adds", review.added),
                             ("steps this PR removes", review.removed),
                             ("steps held differently", review.changed)):
        if changes:
            out += ["", f"{heading}:"]
            out += list(_text_steps(changes))
    for heading, refusals in (("already refused in the base", review.kept),
                              ("refusals of the base this PR resolves", review.resolved)):
        if refusals:
            out += ["", f"{heading}:"]
            out += [f"  {r.text}" for r in refusals]
    if review.head_plan.unverified:
        out += [""] + [f"? not verified: {fact}" for fact in review.head_plan.unverified]
    if review.systems:
        out += [f"observed: {'; '.join(review.systems)}"]
    return "\n".join(out) + "\n"


def _text_steps(changes: Iterable[StepChange]) -> Iterable[str]:
    for change in changes:
        planned = change.step
        base = str(change.base_status) if change.base_status else "-"
        head = str(change.head_status) if change.head_status else "-"
        yield f"  {planned.id:<30} {base:>8} -> {head:<8} {planned.step.describe()}"
        if change.head_status:
            yield from (f"        {reason}" for reason in _reasons(planned))


def _refusal_json(refusal: Refusal) -> dict[str, object]:
    return {"code": refusal.code, "step": refusal.step or None, "message": refusal.text}


def _change_json(change: StepChange) -> dict[str, object]:
    return {"id": change.step.id, "base": change.base_status, "head": change.head_status,
            "description": change.step.step.describe(),
            "reasons": _reasons(change.step) if change.head_status else []}


def render_review_json(review: Review) -> str:
    data = {
        "format_version": FORMAT_VERSION, "kind": "review",
        "base": review.base_ref, "head": review.head_ref,
        "summary": review.summary(), "exit_code": review.exit_code,
        "base_problems": list(review.base_problems),
        "users": [{"user": u.user, "change": u.change, "base": u.base, "head": u.head}
                  for u in review.users],
        "settings": [{"path": s.path, "base": s.base, "head": s.head} for s in review.settings],
        "added": [_change_json(c) for c in review.added],
        "removed": [_change_json(c) for c in review.removed],
        "changed": [_change_json(c) for c in review.changed],
        "introduced": [_refusal_json(r) for r in review.introduced],
        "kept": [_refusal_json(r) for r in review.kept],
        "resolved": [_refusal_json(r) for r in review.resolved],
        "head_plan": plan_json(review.head_plan),
        "systems": list(review.systems),
    }
    return json.dumps(data, indent=2, default=str) + "\n"
