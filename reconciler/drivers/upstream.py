"""A relay in front of onprem (`onprem.upstream`: the DMZ host the MX names), seen from
outside: whether it still routes the domain to onprem, and what it still queues for it.

Where it sits: read by the backend with the other drivers; `observe.build_world` turns the
facts into `OnpremFacts.upstream_pending`, which MR010 reads before onprem may retire.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UpstreamFacts:
    host: str  # as the state names it (onprem.upstream[].host)
    # Read from the relay itself (its Postfix over SSH). False: nothing could be read, only
    # probed or acknowledged, and `routes_to_onprem`/`queued` are then None.
    observed: bool
    # The relay hands mail for the domain to onprem (relay_domains plus a transport,
    # relayhost or MX that leads to onprem). None: not known.
    routes_to_onprem: bool | None
    # Messages the relay holds for a recipient at the domain. None: not known.
    queued: int | None
    # An SMTP probe of the relay: it still accepts RCPT TO a name at the domain (True),
    # refuses it (False), or no probe was made (None).
    accepts_domain: bool | None = None
    detail: str = ""  # what was seen, for the finding
