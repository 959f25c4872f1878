"""The static facts safety rules and steps need from the desired state (no driver knowledge).

Built once per plan from the `DesiredState`; small, immutable and cheap to pass around.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from reconciler.model import DesiredState
from reconciler.world import Outbound

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# (step kind, action, target) -> instructions for a person, or None when automated.
Instructor = Callable[[str, str, str], str | None]


def _automated(kind: str, action: str, target: str) -> str | None:
    return None


def spf_ip_term(address: IpAddress) -> str:
    return f"ip{address.version}:{address}"


# What the MX gate assumes resolvers may cache the old MX for when no record says what its
# TTL was before it was lowered (docs/guarantees.md): one day, or longer if the zone says so.
UNKNOWN_OLD_TTL = 86400


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
    # The public address each router gateway sends from: the state's smtp_route, plus what
    # the journal recorded for gateways mailrec routed through before (MR005 judges the
    # gateway tcp/25 really leaves through, not only the one the state names).
    egress_ips: Mapping[str, IpAddress] = field(default_factory=dict)
    whitelist_min_prefix_v4: int = 24
    whitelist_min_prefix_v6: int = 48
    instructor: Instructor = field(default=_automated, compare=False)
    onprem_public_ip: IpAddress | None = None
    incoming_host: str = ""  # where users read the rental mailbox (POP/IMAP)

    @staticmethod
    def of(
        state: DesiredState,
        *,
        allow_bulk: bool = False,
        acked: frozenset[str] = frozenset(),
        instructor: Instructor = _automated,
        router_filters: frozenset[int] = frozenset(),
        egress_ips: Mapping[str, IpAddress] | None = None,
    ) -> Context:
        route = state.router.smtp_route if state.router else None
        known = dict(egress_ips or {})
        if route is not None:
            known[route.gateway] = route.egress_ip  # the state wins over an older record
        policy = state.policy
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
            egress_ips=known,
            whitelist_min_prefix_v4=policy.whitelist_min_prefix_v4,
            whitelist_min_prefix_v6=policy.whitelist_min_prefix_v6,
            onprem_public_ip=state.onprem.public_ip,
            incoming_host=state.rental.incoming_host or state.rental.smtp_host,
        )

    @property
    def outbound_mode(self) -> Outbound:
        """How a user sending via the rental is set up: port 25 without AUTH through the
        router's whitelisted line when the state has a policy route, else submission+AUTH."""
        return Outbound.RELAY if self.egress_ip is not None else Outbound.SUBMISSION

    def outbound_for(self, side: str) -> Outbound:
        return Outbound.ONPREM if side == "onprem" else self.outbound_mode

    @property
    def forward_target(self) -> str:
        """The transport onprem's entries name for a forwarded user (as the drivers write)."""
        return f"smtp:[{self.smtp_host}]:{self.relay_port}"

    def mx_host(self, side: str) -> str:
        return self.rental_mx if side == "rental" else self.onprem_mx
