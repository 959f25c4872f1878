"""Static rules: what the desired state says about itself, found without observing anything.

Where it sits: after `load` (the state validated against the schema), before observe; `mailrec
validate` shows these findings, and the planner repeats them at the top of every plan.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from reconciler.findings import Finding, Severity, subjects_text, subjects_verb
from reconciler.model import DesiredState, Side
from reconciler.spf import effective_prefix, is_too_wide, term_problems, width_text

# "file:line" of a dotted path of the state (LoadedState.locate), or None.
Locate = Callable[[str], str | None]


def static_findings(state: DesiredState, locate: Locate | None = None) -> list[Finding]:
    """Contradictions inside the desired state itself (MR012) and what it asks for that is
    unsafe on its own (MR016 an open relay, MR017 an SPF term that authorises too much),
    found without observing. With `locate`, MR016/MR017 findings say where (file:line)."""
    found: list[Finding] = []
    inbound_onprem = sorted(n for n, u in state.users.items() if u.inbound is Side.ONPREM)
    outbound_rental = sorted(n for n, u in state.users.items() if u.outbound is Side.RENTAL)
    if state.dns.mx is Side.RENTAL and inbound_onprem:
        found.append(
            Finding(
                "MR012",
                f"dns.mx is rental but {subjects_verb(inbound_onprem, 'is', 'are')} inbound "
                "onprem (MR003)",
                tuple(inbound_onprem[:20]),
                "set dns.mx: onprem until every user is inbound: rental",
            )
        )
    if outbound_rental and inbound_onprem:
        found.append(
            Finding(
                "MR012",
                f"{subjects_verb(outbound_rental, 'sends', 'send')} via the rental while "
                f"{subjects_verb(inbound_onprem, 'is', 'are')} inbound onprem (MR002)",
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
    found.extend(_relay_and_spf_findings(state, locate or (lambda _path: None)))
    found.extend(_upstream_findings(state, locate or (lambda _path: None)))
    return found


def _upstream_findings(state: DesiredState, locate: Locate) -> list[Finding]:
    """The MX names a host that is neither the Postfix mailrec manages nor a declared relay
    in front of it: mail may queue on a relay mailrec knows nothing of (multi-hop inbound),
    which would bounce it once onprem retires. Names only: an address cannot be compared."""
    onprem = state.onprem
    mx = onprem.mx_host.rstrip(".").lower()
    managed = (onprem.connect.host or "").rstrip(".").lower()
    relays = {u.host.rstrip(".").lower() for u in onprem.upstream}
    if not managed or mx == managed or mx in relays or _is_address(managed):
        return []
    return [Finding(
        "MR012", f"onprem.mx_host {mx} is not the host mailrec manages "
        f"(onprem.connect {managed}): if {mx} is a relay in front of it (a DMZ host), "
        "declare it under onprem.upstream so onprem retires only after it stops routing "
        "there; if it is the same machine, ignore this",
        ("onprem",), "declare onprem.upstream: [{host: " + mx + ".}] (or make connect name "
        "the MX host)", Severity.WARN, where=locate("onprem.mx_host") or "")]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host in ("localhost", "lab")
    return True


def _relay_and_spf_findings(state: DesiredState, locate: Locate) -> list[Finding]:
    policy = state.policy
    v4, v6 = policy.whitelist_min_prefix_v4, policy.whitelist_min_prefix_v6
    found: list[Finding] = []
    for index, network in enumerate(state.rental.whitelist):
        if not is_too_wide(network, min_prefix_v4=v4, min_prefix_v6=v6):
            continue
        version, prefix = effective_prefix(network)
        bound, key = (v4, "whitelist_min_prefix_v4") if version == 4 else (
            v6, "whitelist_min_prefix_v6")
        remedy = (
            "list only the office's public egress addresses (e.g. 203.0.113.8/29); a default "
            "route is never allowed" if prefix == 0 else
            f"list only the office's public egress addresses, /{bound} or narrower (or, if "
            f"this range really is yours, lower policy.{key})"
        )
        found.append(
            Finding(
                "MR016",
                f"rental.whitelist entry {width_text(network)} is wider than /{bound}: the "
                "rental would relay mail without authentication for all of it (an open relay)",
                (f"whitelist/{network}",),
                remedy,
                where=locate(f"rental.whitelist.{index}") or "",
            )
        )
    for problem in term_problems(state.rental.spf, min_prefix_v4=v4, min_prefix_v6=v6):
        found.append(
            Finding(
                "MR017",
                f"rental.spf {problem}",
                ("dns/spf",),
                "give the term that names only the rental's senders (e.g. "
                "include:_spf.example.sakura.ne.jp, or ip4: with the rental's own addresses)",
                where=locate("rental.spf") or "",
            )
        )
    return found
