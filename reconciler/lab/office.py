"""The lab's office: a LAN host behind the router, as the rental sees it.

A client bound to `OFFICE_ADDRESS` stands for a PC in the office. Its tcp/25 leaves through
whichever gateway the lab router's policy route picks (the same first-match function the
planner uses, on the lab router's configuration as it is now), and the rental sees it as that
line's public address (`router/lines.json`, written by `lab up` from the lab's state). So a
relay probe from the office verifies the whitelist for the address the route really gives it,
and a route that does not exist yet gives the office's everyday line, which is not whitelisted.
"""

from __future__ import annotations

import ipaddress
import json
from datetime import datetime
from pathlib import Path

from reconciler.lab.layout import LabLayout
from reconciler.model import DesiredState

OFFICE_ADDRESS = "127.0.0.9"
EVERYDAY_LINE = "198.51.100.77"  # the public address of the office's other traffic (RFC 5737)


def lines_path(layout: LabLayout) -> Path:
    return layout.router_dir / "lines.json"


def write_lines(layout: LabLayout) -> dict[str, str]:
    """Gateway -> public address: the state's smtp_route gateway is its egress_ip; every
    other gateway is the everyday line."""
    from reconciler.load import StateError, load_state

    lines: dict[str, str] = {}
    state_dir = layout.root / "state"
    try:
        state = load_state(state_dir).state if state_dir.exists() else None
    except StateError:
        state = None
    route = state.router.smtp_route if state and state.router else None
    if route is not None:
        lines[route.gateway] = str(route.egress_ip)
    lines_path(layout).write_text(json.dumps(lines, indent=2) + "\n")
    return lines


def read_lines(layout: LabLayout) -> dict[str, str]:
    try:
        data = json.loads(lines_path(layout).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def office_seen_as(layout: LabLayout) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The public address the rental sees the office's tcp/25 as, by the lab router's
    current route; None when the route could send it out of more than one line."""
    from reconciler.drivers.router import world_facts
    from reconciler.drivers.rtx.config import RtxConfig

    try:
        config = RtxConfig.parse(layout.router_config.read_text())
    except OSError:
        return ipaddress.ip_address(EVERYDAY_LINE)
    egress = world_facts(config).smtp_egress()
    if len(egress) != 1:
        return None
    return ipaddress.ip_address(read_lines(layout).get(egress[0], EVERYDAY_LINE))


def record_history(layout: LabLayout, state: DesiredState, when: datetime) -> None:
    """A lab built "as in" a state has a past in which mailrec made it so: the office's mail
    clients set up as the state says (what a person would have acked: mailrec cannot read a
    mail client, so without the record every client would count as unknown), and the
    router's policy filter and route as mailrec would have recorded applying them, and the
    probe of the forward path before the first user was forwarded."""
    from reconciler.context import Context
    from reconciler.journal import Journal

    ctx = Context.of(state)
    journal = Journal(layout.journal_dir)
    try:
        for name, user in sorted(state.users.items()):
            to = ctx.outbound_for(user.outbound)
            journal.record(when, "ack", f"outbound/{name}", "noted",
                           detail={"note": "set up by mailrec lab init", "user": name,
                                   "to": str(to)})
        route = state.router.smtp_route if state.router else None
        if route is not None:
            journal.record(when, "apply", f"router/filter/{route.filter}", "ok",
                           detail={"filter": route.filter, "present": True})
            journal.record(when, "apply", "router/route/default", "ok",
                           detail={"egress": {"gateway": route.gateway,
                                              "address": str(route.egress_ip)}})
        if any(u.inbound == "rental" for u in state.users.values()):
            # Users were forwarded: the probe of the forward path came first.
            journal.record(when, "apply", "onprem/forward-probe", "ok",
                           detail={"target": ctx.forward_target})
    finally:
        journal.close()
