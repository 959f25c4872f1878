"""The static facts safety rules and steps need from the desired state (no driver knowledge).

Built once per plan from the `DesiredState`; small, immutable and cheap to pass around.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from reconciler.model import DesiredState

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# (step kind, action, target) -> instructions for a person, or None when automated.
Instructor = Callable[[str, str, str], str | None]


def _automated(kind: str, action: str, target: str) -> str | None:
    return None


def spf_ip_term(address: IpAddress) -> str:
    return f"ip{address.version}:{address}"


@dataclass(frozen=True)
class Context:
    domain: str
    onprem_mx: str
    rental_mx: str
    onprem_spf_term: str
    rental_spf_term: str
    ttl: int
    cutover_ttl: int
    quiet_period: timedelta
    max_change_pct: int
    smtp_host: str
    relay_port: int
    submission_port: int
    egress_ip: IpAddress | None = None  # None: no router policy, clients use submission + AUTH
    smtp_gateway: str | None = None
    smtp_filter: int | None = None
    remove_drained_accounts: bool = True
    allow_bulk: bool = False
    acked: frozenset[str] = frozenset()  # step ids a person has confirmed (from the journal)
    # Router filters mailrec itself created (journal): only these may be removed again.
    router_filters: frozenset[int] = frozenset()
    instructor: Instructor = field(default=_automated, compare=False)

    @staticmethod
    def of(
        state: DesiredState,
        *,
        allow_bulk: bool = False,
        acked: frozenset[str] = frozenset(),
        instructor: Instructor = _automated,
        router_filters: frozenset[int] = frozenset(),
    ) -> Context:
        route = state.router.smtp_route if state.router else None
        return Context(
            domain=state.domain,
            onprem_mx=state.onprem.mx_host,
            rental_mx=state.rental.mx_host,
            onprem_spf_term=spf_ip_term(state.onprem.public_ip),
            rental_spf_term=state.rental.spf,
            ttl=state.dns.ttl,
            cutover_ttl=state.dns.cutover_ttl,
            quiet_period=state.policy.quiet_period,
            max_change_pct=state.policy.max_change_pct,
            smtp_host=state.rental.smtp_host,
            relay_port=state.rental.relay_port,
            submission_port=state.rental.submission_port,
            egress_ip=route.egress_ip if route else None,
            smtp_gateway=route.gateway if route else None,
            smtp_filter=route.filter if route else None,
            allow_bulk=allow_bulk,
            acked=acked,
            instructor=instructor,
            router_filters=router_filters,
        )

    def mx_host(self, side: str) -> str:
        return self.rental_mx if side == "rental" else self.onprem_mx
