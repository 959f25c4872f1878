"""The migration board: what the last finished round saw and planned, per user and for the
domain, as data (`board_data`) and as one self-contained HTML page (`render_board_html`).

Pure: it reads a plan, the world that plan was made against and the desired state, and
never observes or connects to anything, so a page request costs no round trip to any host
(`board_server.py` serves what a round published). It is for the admin and the helpdesk
("has my mail moved yet?"), so it says where each user receives and sends today, what the
state wants, and what the next step waits for, with the earliest time it can open when one
is known. It shows no secret: the state's secret references (router passwords, the TSIG key)
are never read, and any text that happens to contain one is masked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from reconciler.findings import Severity
from reconciler.model import DesiredState
from reconciler.plan import Plan, PlannedStep, Status
from reconciler.world import World

FORMAT_VERSION = 1
REFRESH_SECONDS = 30
# How a user stands, from the step that holds them (see `_user_row`), most urgent first:
# the page lists users in this order so the ones that need someone come first.
USER_STATUSES = ("refused", "gated", "moving", "done")
MASK = "[secret reference]"
# How the state writes a secret reference (model_types.SecretRef): masked wherever free text
# (an error, a provider's note) quotes one, even when the state that names it did not load.
_SECRET_REF = re.compile(r"(?<![\w.-])(?:env|file):[^\s'\"`,;)]+")
# A chain of "step" gates is short (dns/spf-retire -> onprem/retire); the bound only guards
# against a cycle a future step could introduce.
_MAX_CHAIN = 16
_RENTAL_OUTBOUND = ("relay", "submission")


@dataclass(frozen=True)
class DaemonFacts:
    """What the daemon knows beside the plan: how its last round ended and its last error.
    Kept apart from the round's data so a failed round updates them without replacing the
    board of the last round that produced a plan."""

    version: str = ""
    source: str = ""  # what the state is read from, without credentials ("branch main")
    round_result: str | None = None  # ok | failed | invalid | error | locked
    round_finished_at: str | None = None
    last_error: str | None = None
    last_error_at: str | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "source": self.source,
            "last_round": {
                "result": self.round_result,
                "succeeded": self.round_result in ("ok", "locked") if self.round_result
                else None,
                "finished_at": self.round_finished_at,
            },
            "last_error": ({"message": mask_secret_refs(self.last_error),
                            "at": self.last_error_at}
                           if self.last_error else None),
        }


# --- data --------------------------------------------------------------------------------------


def board_data(plan: Plan, world: World, state: DesiredState, *,
               commit: str | None = None, author: str = "",
               finished_at: str | None = None,
               daemon: DaemonFacts | None = None) -> dict[str, Any]:
    """The board of one finished round: `plan` is the round's final plan and `world` the
    world it was planned against; `commit` the (short) commit or digest it applied."""
    scrub = _scrubber(_secret_refs(state))
    by_id = {p.id: p for p in plan.steps}
    by_user: dict[str, list[PlannedStep]] = {}
    domain: list[PlannedStep] = []
    for planned in plan.steps:
        user = getattr(planned.step, "user", None)
        if isinstance(user, str):
            by_user.setdefault(user, []).append(planned)
        else:
            domain.append(planned)

    names = sorted(set(state.users) | set(world.users.keys()))
    users = [_user_row(name, world, state, by_user.get(name, ()), by_id, scrub)
             for name in names]
    counts = dict.fromkeys(USER_STATUSES, 0)
    for row in users:
        counts[row["status"]] += 1
    return {
        "format_version": FORMAT_VERSION,
        "domain": state.domain,
        "observed_at": _iso(world.now),
        "round": {"commit": commit, "author": scrub(author), "finished_at": finished_at},
        "daemon": (daemon or DaemonFacts()).as_json(),
        "summary": {
            "users": len(users),
            **counts,
            "inbound_rental": sum(1 for row in users if row["inbound"] == "rental"),
            "outbound_rental": sum(1 for row in users if row["outbound"] in _RENTAL_OUTBOUND),
            "outbound_unknown": sum(1 for row in users if row["outbound"] == "unknown"),
            "steps": {str(s): len(plan.by_status(s)) for s in Status},
            "in_sync": plan.in_sync,
        },
        "users": users,
        "domain_steps": [_step_row(p, by_id, scrub) for p in domain],
        "findings": [scrub(f.text()) for f in plan.findings if f.severity is not Severity.GATE],
        "dns": {
            "mx": str(world.dns.mx) if world.dns.mx else "neither",
            "mx_hosts": list(world.dns.mx_hosts),
            "mx_ttl": world.dns.mx_ttl,
            "desired_mx": str(state.dns.mx),
            "spf_terms": list(world.dns.spf_terms),
        },
        "rental": {
            "whitelist": sorted(str(n) for n in world.rental.whitelist),
            "whitelist_verified": world.rental.whitelist_verified,
            "desired_whitelist": sorted(str(n) for n in state.rental.whitelist),
        },
        "router": _router(world),
        "unverified": [scrub(text) for text in plan.unverified],
        "systems": [scrub(text) for text in plan.systems],
    }


def with_daemon(data: Mapping[str, Any], daemon: DaemonFacts) -> dict[str, Any]:
    """The board of an earlier round with the daemon's newer facts (a round that made no
    plan: an invalid state, an unreachable repo): the last known picture stays up, and the
    page says the last round did not succeed and why."""
    return {**data, "daemon": daemon.as_json()}


def waiting_board(daemon: DaemonFacts) -> dict[str, Any]:
    """Before any round has produced a plan: no data yet, only the daemon's facts."""
    return {"format_version": FORMAT_VERSION, "domain": None, "observed_at": None,
            "round": None, "daemon": daemon.as_json(), "summary": None, "users": [],
            "domain_steps": [], "findings": [], "dns": None, "rental": None, "router": None,
            "unverified": [], "systems": []}


def board_json(data: Mapping[str, Any]) -> str:
    # Compact: the C encoder, a fraction of the time of an indented dump at 10,000 users.
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def _secret_refs(state: DesiredState) -> tuple[str, ...]:
    refs = [state.dns.tsig.secret if state.dns.tsig else None]
    if state.router is not None:
        refs += [state.router.password, state.router.admin_password]
    return tuple(ref for ref in refs if ref)


def mask_secret_refs(text: str) -> str:
    return _SECRET_REF.sub(MASK, text) if ":" in text else text


def _scrubber(refs: tuple[str, ...]) -> Callable[[str], str]:
    # The board reads no secret field, but free text (a provider's note, an error) is not
    # under its control: a reference found there is masked rather than trusted to be absent.
    def scrub(text: str) -> str:
        for ref in refs:
            if ref in text:
                text = text.replace(ref, MASK)
        return mask_secret_refs(text)

    return scrub


def _router(world: World) -> dict[str, Any] | None:
    router = world.router
    if router is None:
        return None
    route = router.default_route
    return {
        "smtp_egress": list(router.smtp_egress()),
        "mailrec_filters": sorted(router.filters),
        "other_filters": sorted(router.other_filters),
        "default_route": None if route is None else [
            {"gateway": gateway, "filters": list(filters)} for gateway, filters in route],
    }


def _user_row(name: str, world: World, state: DesiredState, steps: Iterable[PlannedStep],
              by_id: Mapping[str, PlannedStep], scrub: Callable[[str], str]) -> dict[str, Any]:
    """One user. The step shown is the first of theirs that is not ready (what they wait
    for), else their first ready step (it runs next round); none left: done."""
    facts = world.user(name)
    wanted = state.users.get(name)
    steps = list(steps)
    held = next((p for p in steps if p.status is not Status.READY), None)
    shown = held or (steps[0] if steps else None)
    if shown is None:
        status = "done"
    elif shown.status is Status.READY:
        status = "moving"
    else:
        status = str(shown.status)
    return {
        "name": name,
        "inbound": str(facts.inbound) if facts.inbound else "nowhere",
        "outbound": str(facts.outbound),
        "desired_inbound": str(wanted.inbound) if wanted else None,
        "desired_outbound": str(wanted.outbound) if wanted else None,
        "managed": wanted is not None,
        "onprem_account": facts.onprem_account,
        "onprem_messages": facts.onprem_messages,
        "status": status,
        "ready_steps": sum(1 for p in steps if p.status is Status.READY),
        "next": None if shown is None else _step_row(shown, by_id, scrub),
    }


def _step_row(planned: PlannedStep, by_id: Mapping[str, PlannedStep],
              scrub: Callable[[str], str]) -> dict[str, Any]:
    earliest, waits, via = _earliest(planned, by_id)
    return {
        "id": planned.id,
        "description": scrub(planned.step.describe()),
        "status": str(planned.status),
        "reasons": [scrub(reason) for reason in planned.reasons()],
        "waits_for": waits,
        "earliest": earliest,
        "via": via,
    }


def _earliest(planned: PlannedStep,
              by_id: Mapping[str, PlannedStep]) -> tuple[str | None, str, list[str]]:
    """(the earliest time the step can run, ISO-8601 or None when no time is known; what it
    waits for; the steps it waits on, in order). A "step" gate is followed to the step it
    names, and on to that step's own gate, until a gate says a time or nothing more is known.
    """
    via: list[str] = []
    current = planned
    for _ in range(_MAX_CHAIN):
        if current.status is Status.REFUSED:
            return None, ("refused: it runs only once the findings are resolved" if not via
                          else f"{current.id}, which is refused"), via
        if current.status is Status.READY:
            return None, ("nothing: it runs in the next round" if not via
                          else f"{current.id}, which runs in the next round"), via
        gate = current.gate
        if gate is None:
            return None, "other steps first (see the reasons)", via
        if gate.until:
            return gate.until, ("a time" if gate.kind == "time"
                                else f"an observation, not before a time ({gate.kind})"), via
        if gate.after:
            nxt = by_id.get(gate.after)
            if nxt is None or nxt.id in via or nxt is planned:
                return None, f"step {gate.after}", via
            via.append(nxt.id)
            current = nxt
            continue
        if gate.kind == "ack":
            return None, "a person (an ack)", via
        return None, "an observation", via
    return None, "a chain of steps", via


# The page itself: board_html.py (imported last, it reads this module's constants).
from reconciler.board_html import render_board_html  # noqa: E402

__all__ = ["DaemonFacts", "board_data", "board_json", "mask_secret_refs", "render_board_html",
           "waiting_board", "with_daemon"]
