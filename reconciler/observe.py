"""Observe: turn what the drivers read (and what only the journal knows) into one `World`.

The drivers know their systems; this module knows only their normalised facts, so the same
code builds the world from the lab, from real hosts, or from generated facts in tests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from reconciler.drivers.dns import DnsRecords
from reconciler.drivers.postfix import PostfixFacts
from reconciler.drivers.rental.base import RentalSnapshot
from reconciler.journal import Journal
from reconciler.model import DesiredState, Side
from reconciler.world import (
    DnsFacts,
    History,
    OnpremFacts,
    RentalFacts,
    RouterFacts,
    UserFacts,
    World,
)


@dataclass(frozen=True)
class JournalView:
    outbound: dict[str, Side]
    mx_ttl_lowered_at: datetime | None
    mx_moved_at: datetime | None
    acked: frozenset[str]
    router_filters: frozenset[int] = frozenset()

    @staticmethod
    def read(journal: Journal | None) -> JournalView:
        if journal is None:
            return JournalView({}, None, None, frozenset())
        outbound: dict[str, Side] = {}
        acked: set[str] = set()
        for event in journal.events(kind="ack"):
            if not event.step:
                continue
            acked.add(event.step)
            kind, _, user = event.step.partition("/")
            to = event.detail.get("to")
            if kind == "outbound" and to in ("onprem", "rental"):
                outbound[user] = Side(str(to))
        lowered = None
        for event in journal.events(step="dns/mx-ttl"):
            if event.result == "ok" and event.detail.get("lowering"):
                lowered = event.at
        # An ack is spent once the change it confirmed was observed (recorded by `apply`): if
        # the same change is needed again later, a person must be asked again.
        for step_id in list(acked):
            live = False
            for event in journal.events(step=step_id):  # in the order they were recorded
                if event.kind == "ack":
                    live = True
                elif event.kind == "observe" and event.detail.get("ack_spent"):
                    live = False
            if not live:
                acked.discard(step_id)
        moved = journal.last("dns/mx")
        created: set[int] = set()
        for event in journal.events(kind="apply"):
            if event.result == "ok" and event.step and event.step.startswith("router/filter/"):
                number = event.detail.get("filter")
                if isinstance(number, int):
                    (created.add if event.detail.get("present") else created.discard)(number)
        return JournalView(outbound, lowered, moved.at if moved else None, frozenset(acked),
                           frozenset(created))


def build_world(
    state: DesiredState,
    *,
    postfix: PostfixFacts,
    rental: RentalSnapshot,
    dns: DnsRecords,
    router: RouterFacts | None,
    journal: JournalView,
    now: datetime,
) -> World:
    names = (
        set(postfix.accounts) | postfix.transport | postfix.recipients | set(rental.mailboxes)
        | set(journal.outbound) | set(state.users)
    )
    users: list[tuple[str, UserFacts]] = []
    for name in names:
        account = name in postfix.accounts
        known = account or name in state.users
        users.append(
            (
                name,
                UserFacts(
                    onprem_account=account,
                    onprem_messages=postfix.accounts.get(name, 0),
                    route=Side.RENTAL if name in postfix.transport else Side.ONPREM,
                    relay_recipient=name in postfix.recipients,
                    rental_mailbox=name in rental.mailboxes,
                    rental_messages=rental.mailboxes.get(name),
                    outbound=journal.outbound.get(name, Side.ONPREM if known else None),
                ),
            )
        )
    onprem_mx, rental_mx = state.onprem.mx_host, state.rental.mx_host
    sides: dict[tuple[str, ...], Side] = {(onprem_mx,): Side.ONPREM, (rental_mx,): Side.RENTAL}
    mx_side = sides.get(dns.mx_hosts)
    return World.build(
        users,
        onprem=OnpremFacts(
            recipient_validation=postfix.recipient_validation,
            last_mail_at=postfix.last_mail_at,
            retired=postfix.retired,
        ),
        rental=RentalFacts(
            domain_accepted=rental.domain_accepted, whitelist=frozenset(rental.whitelist)
        ),
        dns=DnsFacts(
            mx=mx_side,
            mx_hosts=dns.mx_hosts,
            mx_ttl=dns.mx_ttl,
            spf_terms=dns.spf_terms,
            spf_ttl=dns.spf_ttl,
            soa_serial=dns.soa_serial,
        ),
        router=router,
        history=History(journal.mx_ttl_lowered_at, journal.mx_moved_at),
        now=now,
    )


def world_checksum(world: World, state_digest: str = "") -> str:
    """A digest of everything observed (not the clock): a saved plan is applied only while
    the world it was made from is still the world."""
    digest = hashlib.sha256(state_digest.encode())
    users = world.users
    for name in sorted(users.keys()):
        facts = users[name]
        digest.update(
            f"{name}|{facts.onprem_account}|{facts.onprem_messages}|{facts.route}|"
            f"{facts.relay_recipient}|{facts.rental_mailbox}|{facts.outbound}\n".encode()
        )
    whitelist = sorted(map(str, world.rental.whitelist))
    digest.update(
        repr((world.onprem.recipient_validation, world.onprem.retired,
              world.rental.domain_accepted, whitelist, world.dns.mx_hosts, world.dns.mx_ttl,
              world.dns.spf_terms, world.dns.soa_serial, world.router)).encode()
    )
    return digest.hexdigest()[:32]

