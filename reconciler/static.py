"""Static rules: what the desired state says about itself, found without observing anything.

Where it sits: after `load` (the state validated against the schema), before observe; `mailrec
validate` shows these findings, and the planner repeats them at the top of every plan.
"""

from __future__ import annotations

from reconciler.findings import Finding, subjects_text
from reconciler.model import DesiredState, Side


def static_findings(state: DesiredState) -> list[Finding]:
    """Contradictions inside the desired state itself (MR012), found without observing."""
    found: list[Finding] = []
    inbound_onprem = sorted(n for n, u in state.users.items() if u.inbound is Side.ONPREM)
    outbound_rental = sorted(n for n, u in state.users.items() if u.outbound is Side.RENTAL)
    if state.dns.mx is Side.RENTAL and inbound_onprem:
        found.append(
            Finding(
                "MR012",
                f"dns.mx is rental but {subjects_text(inbound_onprem)} are inbound onprem "
                "(MR003)",
                tuple(inbound_onprem[:20]),
                "set dns.mx: onprem until every user is inbound: rental",
            )
        )
    if outbound_rental and inbound_onprem:
        found.append(
            Finding(
                "MR012",
                f"{subjects_text(outbound_rental)} send via the rental while "
                f"{subjects_text(inbound_onprem)} are inbound onprem (MR002)",
                tuple((outbound_rental + inbound_onprem)[:20]),
                "move outbound only after every user is inbound: rental",
            )
        )
    if state.onprem.state == "retired":
        if state.dns.mx is not Side.RENTAL:
            found.append(
                Finding(
                    "MR012",
                    "onprem.state is retired but dns.mx is onprem (MR010)",
                    ("onprem",),
                    "set dns.mx: rental first",
                )
            )
        onprem_users = sorted(
            n for n, u in state.users.items()
            if Side.ONPREM in (u.inbound, u.outbound)
        )
        if onprem_users:
            found.append(
                Finding(
                    "MR012",
                    f"onprem.state is retired but {subjects_text(onprem_users)} still use onprem",
                    tuple(onprem_users[:20]),
                    "move every user to the rental before retiring onprem",
                )
            )
    if state.router and state.router.smtp_route:
        egress = state.router.smtp_route.egress_ip
        if outbound_rental and not any(egress in net for net in state.rental.whitelist):
            found.append(
                Finding(
                    "MR012",
                    f"users send via the rental without auth, but the egress IP {egress} is in no "
                    "rental.whitelist entry (MR005)",
                    ("rental.whitelist",),
                    f"add a CIDR containing {egress} to rental.whitelist",
                )
            )
    return found
