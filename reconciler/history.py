"""`mailrec history`: what was applied and acknowledged, when, from which commit (or state
file digest), by whom; read from the journal, never from anything that may have changed since.

An entry is one journal event a person cares about: an applied step (ok or failed), an ack
(and its withdrawal). With `everything`, also the observations mailrec recorded for its gates
and the `started` marks of applies (a `started` without an outcome is a crash mid-apply).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from reconciler.journal import Event

_WHAT = {
    ("apply", "ok"): "applied",
    ("apply", "failed"): "FAILED",
    ("apply", "started"): "started",
    ("ack", "noted"): "acked",
    ("ack", "withdrawn"): "withdrawn",
    ("observe", "noted"): "observed",
    ("override", "noted"): "override",
}


@dataclass(frozen=True)
class Entry:
    at: str  # ISO 8601, UTC as recorded
    what: str  # applied | FAILED | acked | withdrawn | started | observed
    step: str
    source: str  # the commit (git) or the state files' digest it came from
    actor: str
    note: str  # an ack's note, a failure's error, a driver's report

    def json(self) -> dict[str, str]:
        return {"at": self.at, "what": self.what, "step": self.step, "source": self.source,
                "by": self.actor, "note": self.note}


def entries(events: Iterable[Event], *, step_prefix: str = "", everything: bool = False,
            limit: int = 0) -> list[Entry]:
    """The journal's events as history entries, oldest first; the last `limit` (0: all)."""
    found: list[Entry] = []
    for event in events:
        if event.kind == "run":
            continue
        if not everything and event.kind not in ("apply", "ack", "override"):
            continue
        if not everything and event.kind == "apply" and event.result == "started":
            continue
        step = event.step or ""
        if step_prefix and not step.startswith(step_prefix):
            continue
        detail = event.detail
        note = str(detail.get("note") or detail.get("error") or detail.get("result") or "")
        if event.kind == "observe" and not note:
            note = ", ".join(f"{k}={v}" for k, v in sorted(detail.items()))
        found.append(Entry(
            event.at.isoformat(timespec="seconds"),
            _WHAT.get((event.kind, event.result), f"{event.kind} {event.result}"),
            step, event.source, event.actor or "(not recorded)", note))
    return found[-limit:] if limit else found


def render_text(history: list[Entry]) -> str:
    if not history:
        return "the journal records nothing yet\n"
    width = max(len(e.step) for e in history)
    lines = []
    for entry in history:
        note = f"  {_one_line(entry.note)}" if entry.note else ""
        lines.append(f"{entry.at}  {entry.what:<9} {entry.step:<{width}}  "
                     f"{entry.source[:12] or '-':<12}  {entry.actor}{note}")
    return "\n".join(lines) + "\n"


def render_json(history: list[Entry]) -> str:
    return json.dumps([e.json() for e in history], indent=2) + "\n"


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= 120 else flat[:117] + "..."
