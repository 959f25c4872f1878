"""Render plans and status for people (coloured text, Markdown for a PR) and machines (JSON).

Renderers read the plan model only; they never decide anything.
"""

from __future__ import annotations

import json
from collections import Counter
from io import StringIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from reconciler.plan import Plan, PlannedStep, Status
from reconciler.steps import Action
from reconciler.world import World

FORMAT_VERSION = 1
_SIGIL = {Action.CREATE: "+", Action.UPDATE: "~", Action.DELETE: "-"}
_STYLE = {Status.READY: "green", Status.GATED: "yellow", Status.REFUSED: "red"}


def _summary(plan: Plan) -> str:
    counts = Counter(p.status for p in plan.steps)
    if plan.in_sync:
        return "in sync: no changes"
    parts = [f"{counts[s]} {s}" for s in (Status.READY, Status.GATED, Status.REFUSED) if counts[s]]
    refusing = len(plan.refusing_findings())
    if refusing:
        parts.append(f"{refusing} finding(s)")
    return f"{len(plan.steps)} step(s): " + ", ".join(parts)


def plan_json(plan: Plan) -> dict[str, object]:
    return {
        "format_version": FORMAT_VERSION,
        "in_sync": plan.in_sync,
        "checksum": plan.checksum,
        "source": plan.source,
        "summary": _summary(plan),
        "steps": [_step_json(p) for p in plan.steps],
        "findings": [f.as_json() for f in plan.findings],
        "not_verified": list(plan.unverified),
    }


def _step_json(planned: PlannedStep) -> dict[str, object]:
    step = planned.step
    findings = [f.as_json() for f in planned.findings]
    if planned.gate is not None:
        findings.insert(0, planned.gate.as_finding().as_json())
    data: dict[str, object] = {
        "id": step.id,
        "action": str(step.action),
        "status": str(planned.status),
        "description": step.describe(),
        "manual": step.manual or bool(planned.gate and planned.gate.kind == "ack"),
        "findings": findings,
        "data": step.data(),
    }
    if step.notes:
        data["notes"] = list(step.notes)
    if planned.gate is not None:
        data["gate"] = {
            "kind": planned.gate.kind,
            "until": planned.gate.until,
            "instructions": list(planned.gate.instructions),
        }
    return data


def render_json(plan: Plan) -> str:
    return json.dumps(plan_json(plan), indent=2, sort_keys=False) + "\n"


def render_markdown(plan: Plan, title: str = "mailrec plan") -> str:
    out = [f"### {title}", "", f"**{_summary(plan)}**", ""]
    if plan.steps:
        out += ["| | step | status | change | why / what next |", "|---|---|---|---|---|"]
        for planned in plan.steps:
            sigil = _SIGIL[planned.step.action]
            reasons = "<br>".join(_md(r) for r in planned.reasons()) or ""
            if planned.gate and planned.gate.instructions:
                reasons += "<br>" + "<br>".join(_md(i) for i in planned.gate.instructions)
            if planned.step.notes:
                reasons += "<br>" + "<br>".join(_md(i) for i in planned.step.notes)
            icon = {Status.READY: "✅", Status.GATED: "⏳", Status.REFUSED: "⛔"}[planned.status]
            out.append(
                f"| `{sigil}` | `{planned.id}` | {icon} {planned.status} | "
                f"{_md(planned.step.describe())} | {reasons} |"
            )
        out.append("")
    if plan.findings:
        out += ["**Findings**", ""]
        out += [f"- `{f.code}` ({f.severity}) {_md(f.text())}" for f in plan.findings]
        out.append("")
    if plan.unverified:
        out += ["**Not verified** (each counts as false for safety)", ""]
        out += [f"- {_md(fact)}" for fact in plan.unverified]
        out.append("")
    out.append(f"<sub>checksum `{plan.checksum}`</sub>")
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_text(plan: Plan, *, color: bool = False, width: int = 100) -> str:
    buffer = StringIO()
    console = Console(file=buffer, force_terminal=color, no_color=not color, width=width,
                      highlight=False, soft_wrap=True)
    for planned in plan.steps:
        style = _STYLE[planned.status]
        line = Text()
        line.append(f"{_SIGIL[planned.step.action]} ", style=style)
        line.append(f"{planned.id:<28}", style="bold")
        line.append(f" {planned.status:<8}", style=style)
        line.append(f" {planned.step.describe()}")
        console.print(line)
        for reason in planned.reasons():
            console.print(Text(f"      {reason}", style="dim" if planned.status is Status.READY
                               else style))
        instructions = (planned.gate.instructions if planned.gate is not None else ())
        for instruction in (*instructions, *planned.step.notes):
            indented = instruction.replace("\n", "\n        ")
            console.print(Text(f"      > {indented}", style="cyan"))
    for finding in plan.findings:
        console.print(Text(f"! {finding.text()}", style="red" if finding.severity == "refuse"
                           else "yellow"))
    _print_unverified(console, plan)
    console.print(Text(_summary(plan), style="bold"))
    return buffer.getvalue()


def _print_unverified(console: Console, plan: Plan) -> None:
    for fact in plan.unverified:
        console.print(Text(f"? not verified: {fact}", style="yellow"))


def status_rows(
    plan: Plan, world: World, applied: frozenset[str] = frozenset()
) -> list[dict[str, str]]:
    """One row per managed resource: in sync / pending / gated / refused / drifted.
    `applied` are step ids mailrec applied before: a pending change to one of them means
    the world moved away from what mailrec made it (drift), not a new wish."""
    by_resource: dict[str, PlannedStep] = {}
    for planned in plan.steps:
        by_resource.setdefault(planned.id, planned)
    rows: list[dict[str, str]] = []
    drifted = {s for f in plan.drift for s in f.subjects}
    for planned in plan.steps:
        state = {Status.READY: "pending", Status.GATED: "gated", Status.REFUSED: "refused"}[
            planned.status
        ]
        if planned.status is Status.READY and planned.id in applied:
            state = "drifted"
        detail = "; ".join(planned.reasons()) or planned.step.describe()
        rows.append({"resource": planned.id, "status": state, "detail": detail})
    touched = {p.step.users[0] for p in plan.steps if p.step.users}
    for name, facts in world.iter_users():
        if name in touched:
            continue
        status = "drifted" if name in drifted else "in sync"
        inbound = facts.inbound or "nowhere"
        rows.append({
            "resource": f"user/{name}",
            "status": status,
            "detail": f"inbound {inbound}, outbound {facts.outbound}",
        })
    if not any(r["resource"] == "dns/mx" for r in rows):
        rows.append({"resource": "dns/mx", "status": "in sync",
                     "detail": " ".join(world.dns.mx_hosts) + f" ttl {world.dns.mx_ttl}"})
    return rows


def render_status_text(plan: Plan, world: World, *, color: bool = False,
                       applied: frozenset[str] = frozenset()) -> str:
    buffer = StringIO()
    console = Console(file=buffer, force_terminal=color, no_color=not color, width=120)
    table = Table("resource", "status", "detail", box=None, pad_edge=False)
    styles = {"in sync": "green", "pending": "cyan", "gated": "yellow", "refused": "red",
              "drifted": "magenta"}
    for row in status_rows(plan, world, applied):
        table.add_row(row["resource"], Text(row["status"], style=styles[row["status"]]),
                      row["detail"])
    console.print(table)
    _print_unverified(console, plan)
    console.print(Text(_summary(plan), style="bold"))
    return buffer.getvalue()


def render_status_json(plan: Plan, world: World, applied: frozenset[str] = frozenset()) -> str:
    return json.dumps(
        {"format_version": FORMAT_VERSION, "in_sync": plan.in_sync,
         "resources": status_rows(plan, world, applied),
         "findings": [f.as_json() for f in plan.findings],
         "not_verified": list(plan.unverified)},
        indent=2,
    ) + "\n"
