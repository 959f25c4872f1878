"""Render plans and status for people (coloured text, Markdown for a PR) and machines (JSON).

Renderers read the plan model only; they never decide anything.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from io import StringIO
from typing import TYPE_CHECKING

from reconciler.plan import Plan, PlannedStep, Status
from reconciler.steps import Action
from reconciler.world import World

if TYPE_CHECKING:  # rich is imported only where colour or a table is drawn
    from rich.console import Console

FORMAT_VERSION = 1
_SIGIL = {Action.CREATE: "+", Action.UPDATE: "~", Action.DELETE: "-"}
_STYLE = {Status.READY: "green", Status.GATED: "yellow", Status.REFUSED: "red"}
# A line of text output: its parts, each with the rich style it is printed in (None: plain).
_Line = tuple[tuple[str, str | None], ...]
# The control codes rich strips from every Text (rich.control.STRIP_CONTROL_CODES: bell,
# backspace, vertical tab, form feed, carriage return): the plain output drops them too.
_STRIPPED = dict.fromkeys((7, 8, 11, 12, 13))


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
        "systems": list(plan.systems),
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
    return json.dumps(plan_json(plan), indent=2) + "\n"


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
    if plan.systems:
        out.append(f"<sub>observed: {_md('; '.join(plan.systems))}</sub>")
        out.append("")
    out.append(f"<sub>checksum `{plan.checksum}`</sub>")
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_text(plan: Plan, *, color: bool = False, width: int = 100) -> str:
    """The plan for people: a line per step (with its reasons and instructions below it),
    the findings, what is not verified, the summary.

    The lines are built once as (text, style) parts and joined once: the bytes rich prints
    for them (one console.print per line cost ~50 us, seconds for 30,000 steps). Rich strips
    control codes from every Text, and so does this. Without colour the parts are plain
    strings and rich is not imported; with colour each style's escape codes come from rich
    itself (`_style_codes`). A tab, which rich expands by cell width, sends the plan through
    rich's own rendering."""
    lines = list(_text_lines(plan))
    if any("\t" in part for line in lines for part, _ in line):
        return _render_rich(lines, color=color, width=width)
    if not color:
        plain = "".join([f"{''.join([part for part, _ in line])}\n" for line in lines])
        return plain.translate(_STRIPPED)
    codes = _style_codes({style for line in lines for _, style in line if style}, width=width)
    out: list[str] = []
    append = out.append
    for line in lines:
        for raw, style in line:
            part = raw.translate(_STRIPPED)
            if style is None or not part:
                append(part)
                continue
            before, after = codes[style]
            if "\n" in part:  # rich styles each line of a part, not the newline between
                append("\n".join([before + piece + after if piece else ""
                                  for piece in part.split("\n")]))
            else:
                append(before + part + after)
        append("\n")
    return "".join(out)


def _style_codes(styles: set[str], *, width: int) -> dict[str, tuple[str, str]]:
    """What rich writes before and after a text in each style on a colour console made as
    `render_text` makes it (the colour system as rich detects it, NO_COLOR...): a probe
    text printed by rich itself, split where the text is."""
    from rich.text import Text

    console = _console(StringIO(), color=True, width=width, highlight=False, soft_wrap=True)
    codes: dict[str, tuple[str, str]] = {}
    for style in styles:
        with console.capture() as capture:
            console.print(Text("\0", style=style), end="")
        before, _, after = capture.get().partition("\0")
        codes[style] = (before, after)
    return codes


def _text_lines(plan: Plan) -> Iterator[_Line]:
    for planned in plan.steps:
        style = _STYLE[planned.status]
        yield ((f"{_SIGIL[planned.step.action]} ", style), (f"{planned.id:<28}", "bold"),
               (f" {planned.status:<8}", style), (f" {planned.step.describe()}", None))
        reason_style = "dim" if planned.status is Status.READY else style
        for reason in planned.reasons():
            yield ((f"      {reason}", reason_style),)
        instructions = (planned.gate.instructions if planned.gate is not None else ())
        for instruction in (*instructions, *planned.step.notes):
            indented = instruction.replace("\n", "\n        ")
            yield ((f"      > {indented}", "cyan"),)
    for finding in plan.findings:
        yield ((f"! {finding.text()}", "red" if finding.severity == "refuse" else "yellow"),)
    yield from _unverified_lines(plan)
    if plan.systems:
        yield ((f"observed: {'; '.join(plan.systems)}", "dim"),)
    yield ((_summary(plan), "bold"),)


def _unverified_lines(plan: Plan) -> Iterator[_Line]:
    for fact in plan.unverified:
        yield ((f"? not verified: {fact}", "yellow"),)


def _console(buffer: StringIO, *, color: bool, width: int, highlight: bool = True,
             soft_wrap: bool = False) -> Console:
    from rich.console import Console

    return Console(file=buffer, force_terminal=color, no_color=not color, width=width,
                   highlight=highlight, soft_wrap=soft_wrap)


def _render_rich(lines: list[_Line], *, color: bool, width: int) -> str:
    """`lines` printed by rich: one Text per line, as render_text always printed them."""
    from rich.text import Text

    buffer = StringIO()
    console = _console(buffer, color=color, width=width, highlight=False, soft_wrap=True)
    for line in lines:
        if len(line) == 1:
            console.print(Text(line[0][0], style=line[0][1] or ""))
            continue
        text = Text()
        for part, style in line:
            text.append(part, style=style)
        console.print(text)
    return buffer.getvalue()


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
    from rich.table import Table
    from rich.text import Text

    buffer = StringIO()
    console = _console(buffer, color=color, width=120)
    table = Table("resource", "status", "detail", box=None, pad_edge=False)
    styles = {"in sync": "green", "pending": "cyan", "gated": "yellow", "refused": "red",
              "drifted": "magenta"}
    for row in status_rows(plan, world, applied):
        table.add_row(row["resource"], Text(row["status"], style=styles[row["status"]]),
                      row["detail"])
    console.print(table)
    for fact in plan.unverified:
        console.print(Text(f"? not verified: {fact}", style="yellow"))
    if plan.systems:
        console.print(Text(f"observed: {'; '.join(plan.systems)}", style="dim"))
    console.print(Text(_summary(plan), style="bold"))
    return buffer.getvalue()


def render_status_json(plan: Plan, world: World, applied: frozenset[str] = frozenset(),
                       world_snapshot: dict[str, object] | None = None) -> str:
    """Status as JSON; with `world_snapshot`, the observation under "world", which
    `plan --world FILE` reads (a PR's CI plans against it without credentials)."""
    data: dict[str, object] = {
        "format_version": FORMAT_VERSION, "in_sync": plan.in_sync,
        "resources": status_rows(plan, world, applied),
        "findings": [f.as_json() for f in plan.findings],
        "not_verified": list(plan.unverified), "systems": list(plan.systems)}
    if world_snapshot is not None:
        data["world"] = world_snapshot
    return json.dumps(data, indent=2) + "\n"
