"""Renderers on plans made by the real planner over small, hand-built worlds: text (people),
Markdown (a PR comment) and JSON (machines, DESIGN section 4)."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest

from reconciler.context import Context
from reconciler.diff import diff
from reconciler.findings import Finding
from reconciler.model import DesiredState, Side
from reconciler.plan import Plan, Status, make_plan
from reconciler.render import FORMAT_VERSION, plan_json, render_json, render_markdown, render_text
from reconciler.steps import Action, Rank, Step
from reconciler.world import (
    DnsFacts,
    History,
    Outbound,
    RentalFacts,
    RouterFacts,
    UserFacts,
    World,
)

NOW = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
ONPREM_IP = "ip4:198.51.100.10"
RENTAL_SPF = "include:_spf.example.sakura.ne.jp"
WHITELIST = ipaddress.ip_network("203.0.113.8/29")

ONPREM_USER = UserFacts(onprem_account=True, outbound=Outbound.ONPREM)
MOVED_USER = UserFacts(route=Side.RENTAL, relay_recipient=True, rental_mailbox=True,
                       rental_messages=0, outbound=Outbound.ONPREM)


def make_state(users: dict[str, tuple[str, str]], *, router: bool = False,
               mx: str = "onprem") -> DesiredState:
    data: dict[str, Any] = {
        "version": 1,
        "domain": "example.co.jp",
        "onprem": {"connect": "local:/", "mx_host": "mail.example.co.jp.",
                   "public_ip": "198.51.100.10"},
        "rental": {"provider": "lab", "mx_host": "example.sakura.ne.jp.",
                   "smtp_host": "example.sakura.ne.jp", "spf": RENTAL_SPF,
                   "whitelist": [str(WHITELIST)] if router else []},
        "dns": {"provider": "lab", "mx": mx, "ttl": 3600, "cutover_ttl": 300},
        "users": {n: {"inbound": i, "outbound": o} for n, (i, o) in users.items()},
        "policy": {"max_change_pct": 100},
    }
    if router:
        data["router"] = {
            "provider": "lab", "connect": "local:/", "admin_password": "env:RTX_ADMIN",
            "smtp_route": {"filter": 10, "gateway": "192.168.0.254", "otherwise": "tunnel 2",
                           "egress_ip": "203.0.113.9"},
        }
    return DesiredState.model_validate(data)


def make_world(users: dict[str, UserFacts], *, router: bool = False,
               mx: Side = Side.ONPREM, **parts: Any) -> World:
    hosts = {Side.ONPREM: "mail.example.co.jp.", Side.RENTAL: "example.sakura.ne.jp."}
    defaults: dict[str, Any] = {
        "rental": RentalFacts(domain_accepted=True,
                              whitelist=frozenset({WHITELIST}) if router else frozenset()),
        # With the router's policy route, SPF names the line it sends tcp/25 through (MR006).
        "dns": DnsFacts(mx=mx, mx_hosts=(hosts[mx],), mx_ttl=3600,
                        spf_terms=("v=spf1", ONPREM_IP, RENTAL_SPF,
                                   *(("ip4:203.0.113.9",) if router else ()), "~all")),
        "router": RouterFacts(
            filters=frozenset({10}),
            default_route=(("192.168.0.254", (10,)), ("tunnel 2", ())),
        ) if router else None,
        "now": NOW,
    }
    defaults.update(parts)
    return World.build(users, **defaults)


def plan_for(state: DesiredState, world: World, checksum: str = "c0ffee") -> Plan:
    ctx = Context.of(state)
    return make_plan(state, world, diff(state, world, ctx), ctx, checksum=checksum,
                     source="test")


def table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


def cells(row: str) -> list[str]:
    """A Markdown table row split on unescaped pipes (escaped `\\|` stay inside a cell)."""
    return re.split(r"(?<!\\)\|", row)[1:-1]


# --- plans to render ----------------------------------------------------------------------


def in_sync_plan() -> Plan:
    state = make_state({"suga": ("onprem", "onprem"), "tanaka": ("onprem", "onprem")})
    world = make_world({"suga": ONPREM_USER, "tanaka": ONPREM_USER})
    return plan_for(state, world)


def outbound_gated_plan(router: bool) -> Plan:
    """Everyone receives at the rental; suga's mail client is to move: a manual, acked step."""
    state = make_state({"suga": ("rental", "rental"), "tanaka": ("rental", "onprem")},
                       router=router)
    world = make_world({"suga": MOVED_USER, "tanaka": MOVED_USER}, router=router)
    return plan_for(state, world)


def outbound_refused_plan() -> Plan:
    """suga sends via the rental while tanaka still receives onprem: MR002. Meanwhile sato
    moves inbound (ready), but his old mailbox still holds mail (gated, MR008)."""
    state = make_state({"suga": ("rental", "rental"), "tanaka": ("onprem", "onprem"),
                        "sato": ("rental", "onprem")})
    world = make_world({"suga": MOVED_USER, "tanaka": ONPREM_USER,
                        "sato": replace(ONPREM_USER, onprem_messages=3)})
    return plan_for(state, world, checksum="deadbeef")


def mx_time_gated_plan() -> Plan:
    """Everyone is at the rental, the TTL was lowered 10 minutes ago: the MX waits (MR004)."""
    state = make_state({"suga": ("rental", "onprem"), "tanaka": ("rental", "onprem")},
                       mx="rental")
    world = make_world(
        {"suga": MOVED_USER, "tanaka": MOVED_USER},
        dns=DnsFacts(mx=Side.ONPREM, mx_hosts=("mail.example.co.jp.",), mx_ttl=300,
                     spf_terms=("v=spf1", ONPREM_IP, RENTAL_SPF, "~all")),
        history=History(mx_ttl_lowered_at=NOW - timedelta(minutes=10), mx_old_ttl=3600),
    )
    return plan_for(state, world)


@dataclass(frozen=True)
class PipeStep(Step):
    """A step whose text contains Markdown's cell separator."""

    kind: ClassVar[str] = "test"
    action: ClassVar[Action] = Action.UPDATE

    @property
    def name(self) -> str:
        return "pipe"

    @property
    def rank(self) -> Rank:
        return Rank.PREPARE

    def simulate(self, world: World) -> World:
        return world

    def describe(self) -> str:
        return "set a | b\nover two lines"


# --- the plans are what the renderers are meant to show ---------------------------------------


def test_the_fixture_plans_have_the_intended_shape() -> None:
    assert in_sync_plan().in_sync
    gated = outbound_gated_plan(router=False)
    assert [(p.id, p.status) for p in gated.steps] == [("outbound/suga", Status.GATED)]
    refused = outbound_refused_plan()
    step = refused.get("outbound/suga")
    assert step is not None and step.status is Status.REFUSED
    assert "MR002" in {f.code for f in step.findings}
    assert refused.exit_code == 3
    mx = mx_time_gated_plan().get("dns/mx")
    assert mx is not None and mx.status is Status.GATED
    assert mx.gate is not None and mx.gate.kind == "time"


# --- text -------------------------------------------------------------------------------------


def test_text_in_sync() -> None:
    assert render_text(in_sync_plan()) == "in sync: no changes\n"


@pytest.mark.parametrize(("router", "instruction"), [
    (False, "port 587, STARTTLS, authentication on, user name suga@example.co.jp"),
    (True, "port 25, no authentication (the office line 203.0.113.9 is whitelisted)"),
])
def test_text_gated_manual_step_shows_instructions(router: bool, instruction: str) -> None:
    text = render_text(outbound_gated_plan(router))
    lines = text.splitlines()
    mode = r"port 25 from the office, no AUTH" if router else r"submission port with AUTH"
    assert re.match(rf"~ outbound/suga\s+gated\s+suga sends via the rental \({mode}\)$",
                    lines[0])
    assert "mailrec ack outbound/suga" in lines[1]
    assert lines[2].lstrip().startswith("> In suga@example.co.jp's mail client")
    assert instruction in lines[2]
    assert lines[-1] == "1 step(s): 1 gated"


def test_text_refused_step_lists_findings_and_summary() -> None:
    text = render_text(outbound_refused_plan())
    step_line = next(line for line in text.splitlines() if "outbound/suga" in line
                     and "refused" in line)
    assert step_line.startswith("~ ")
    assert re.search(r"^\s+MR002: .*To pass: ", text, re.MULTILINE)
    assert re.search(r"^! MR012: ", text, re.MULTILINE), "plan-level findings are listed"
    assert re.search(r"^- onprem-mailbox/sato\s+gated\s+", text, re.MULTILINE)
    assert "still holds 3 message(s)" in text
    assert text.splitlines()[-1] == "4 step(s): 2 ready, 1 gated, 1 refused, 1 finding(s)"
    assert "\x1b[" not in text, "no colour unless asked"


def test_text_time_gate_says_until_when() -> None:
    text = render_text(mx_time_gated_plan())
    until = (NOW - timedelta(minutes=10) + timedelta(seconds=3600)).isoformat()
    assert f"until {until}" in text


def test_text_colour_only_when_asked() -> None:
    plan = outbound_refused_plan()
    coloured = render_text(plan, color=True)
    assert "\x1b[" in coloured
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == render_text(plan)


# --- markdown -----------------------------------------------------------------------------------


def test_markdown_in_sync_has_no_table() -> None:
    markdown = render_markdown(in_sync_plan(), "mailrec plan for example.co.jp")
    assert markdown.startswith("### mailrec plan for example.co.jp\n")
    assert "**in sync: no changes**" in markdown
    assert table_rows(markdown) == []
    assert markdown.rstrip().endswith("<sub>checksum `c0ffee`</sub>")


def test_markdown_table_summary_and_checksum() -> None:
    plan = outbound_refused_plan()
    markdown = render_markdown(plan, "PR #7")
    lines = markdown.splitlines()
    assert lines[0] == "### PR #7"
    assert lines[2] == "**4 step(s): 2 ready, 1 gated, 1 refused, 1 finding(s)**"
    rows = table_rows(markdown)
    assert rows[0] == "| | step | status | change | why / what next |"
    assert rows[1] == "|---|---|---|---|---|"
    assert len(rows) == 2 + len(plan.steps)
    for row in rows:
        assert len(cells(row)) == 5, row
    assert [cells(r)[1].strip() for r in rows[2:]] == [
        "`mailbox/sato`", "`inbound/sato`", "`onprem-mailbox/sato`", "`outbound/suga`"]
    assert "✅ ready" in rows[2] and "⏳ gated" in rows[4]
    refused = rows[5]
    assert "⛔ refused" in refused and "MR002:" in refused
    assert "**Findings**" in markdown
    assert "- `MR012` (refuse) " in markdown
    assert lines[-1] == "<sub>checksum `deadbeef`</sub>"


def test_markdown_gated_step_carries_instructions() -> None:
    rows = table_rows(render_markdown(outbound_gated_plan(router=True)))
    row = next(r for r in rows if "`outbound/suga`" in r)
    sigil, step, status, change, why = (c.strip() for c in cells(row))
    assert (sigil, step, status, change) == (
        "`~`", "`outbound/suga`", "⏳ gated",
        "suga sends via the rental (port 25 from the office, no AUTH)")
    assert why.split("<br>")[0].startswith("waiting for a person")
    assert "In suga@example.co.jp's mail client" in why.split("<br>")[1]


def test_markdown_escapes_pipes_and_newlines() -> None:
    base = in_sync_plan()
    state = make_state({"suga": ("onprem", "onprem"), "tanaka": ("onprem", "onprem")})
    world = make_world({"suga": ONPREM_USER, "tanaka": ONPREM_USER})
    plan = make_plan(state, world, [PipeStep()], Context.of(state), checksum=base.checksum)
    plan = replace(plan, findings=(Finding("MR999", "a | b", ("x|y",), "use c | d"),))
    markdown = render_markdown(plan)
    row = next(r for r in table_rows(markdown) if "`test/pipe`" in r)
    assert len(cells(row)) == 5
    assert "set a \\| b over two lines" in row
    assert "- `MR999` (refuse) MR999: a \\| b. To pass: use c \\| d" in markdown


# --- json ---------------------------------------------------------------------------------------


def as_json(plan: Plan) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(render_json(plan))
    return data


CONTRACT = {"format_version", "in_sync", "steps", "findings", "checksum"}


@pytest.mark.parametrize("make", [in_sync_plan, lambda: outbound_gated_plan(True),
                                  outbound_refused_plan, mx_time_gated_plan],
                         ids=["in-sync", "gated", "refused", "time-gated"])
def test_json_contract(make: Any) -> None:
    plan = make()
    text = render_json(plan)
    assert text.endswith("\n")
    data = json.loads(text)
    assert data == json.loads(json.dumps(plan_json(plan)))
    assert set(data) >= CONTRACT
    assert data["format_version"] == FORMAT_VERSION == 1
    assert data["in_sync"] is plan.in_sync
    assert data["checksum"] == plan.checksum
    assert [s["id"] for s in data["steps"]] == [p.id for p in plan.steps]
    for step, planned in zip(data["steps"], plan.steps, strict=True):
        assert step["action"] == str(planned.step.action)
        assert step["status"] == str(planned.status)
        for finding in step["findings"]:
            assert {"code", "message"} <= set(finding)
    for finding in data["findings"]:
        assert {"code", "message"} <= set(finding)


def test_json_gated_step_has_gate_and_instructions() -> None:
    data = as_json(outbound_gated_plan(router=False))
    (step,) = data["steps"]
    assert step["status"] == "gated" and step["manual"] is True
    assert step["gate"]["kind"] == "ack"
    assert "port 587" in step["gate"]["instructions"][0]
    assert step["findings"][0]["code"] == "GATE"
    assert "mailrec ack outbound/suga" in step["findings"][0]["message"]
    assert step["data"] == {"user": "suga", "to": "submission"}


def test_json_time_gate_has_until_and_code() -> None:
    data = as_json(mx_time_gated_plan())
    mx = next(s for s in data["steps"] if s["id"] == "dns/mx")
    assert mx["status"] == "gated"
    assert mx["gate"]["kind"] == "time"
    assert mx["gate"]["until"] == (NOW + timedelta(minutes=50)).isoformat()
    assert mx["findings"][0]["code"] == "MR004"


def test_json_refused_step_has_mr_findings() -> None:
    data = as_json(outbound_refused_plan())
    assert data["in_sync"] is False
    step = next(s for s in data["steps"] if s["id"] == "outbound/suga")
    assert step["status"] == "refused"
    codes = [f["code"] for f in step["findings"]]
    assert "MR002" in codes and all(c.startswith("MR") for c in codes)
    assert "gate" not in step
    assert any(f["code"] == "MR012" for f in data["findings"])
