"""Safety for the names onprem receives for beyond its users' `user@domain`, and for the mail
onprem itself sends: MR019 (every name has a destination at the rental before the rental
takes the domain's mail), MR020 (mail still delivered into a moved user's old mailbox), and
MR006's third part (the office line tcp/25 leaves through is authorised by SPF while onprem
still sends).

Each rule gives `safety.py` a measure of O(1) counts (the address space is small and shared,
unchanged, by every world a plan simulates after a user step; it is worked out once per
distinct object) and the findings that explain it.
"""

from __future__ import annotations

from collections.abc import Iterator

from reconciler.context import Context
from reconciler.findings import Finding, subjects_text
from reconciler.model import Side
from reconciler.spf import authorises_address
from reconciler.world import AddressFacts, AddressKind, World

Measure = tuple[int, ...]


# The last addresses map `_split` counted, by identity (every world a plan simulates after
# a user step shares it), and its counts.
_split_cache: list[tuple[object, tuple[int, int]]] = []


def _split(world: World) -> tuple[int, int]:
    """(names, accounts): unsettled names that are aliases or virtual aliases, and accounts
    outside the uid range holding mail (MR015's blocking part)."""
    addresses = world.addresses
    if _split_cache and _split_cache[0][0] is addresses:
        return _split_cache[0][1]
    names = world.unsettled_addresses()
    accounts = sum(1 for n in names if addresses[n].kind is AddressKind.ACCOUNT)
    counts = (len(names) - accounts, accounts)
    _split_cache[:] = [(addresses, counts)]
    return counts


def address_measures(world: World) -> tuple[Measure, Measure]:
    """MR019 and MR015: names without a destination at the rental (and, for MR019, places
    onprem's names cannot be seen), counted separately for the MX at the rental and for
    anyone sending through the rental (which delivers the domain locally): so moving the MX
    grows the measure even while a rental sender already breaks the rule."""
    names, accounts = _split(world)
    unseen = len(world.onprem.unseen)
    at_rental = world.dns.mx is Side.RENTAL
    sending = world.counts.may_send_rental > 0

    def when(count: int) -> Measure:
        return (count if at_rental else 0, count if sending else 0)

    return (*when(names), *when(unseen)), when(accounts)


def unauthorised_egress(world: World, ctx: Context) -> list[str]:
    """MR006 (onprem's own mail): the office lines tcp/25 may leave through, with an address
    the state or the journal declares, that SPF does not authorise. A gateway whose address
    nothing declares is taken to be the line onprem used before mailrec touched the router
    (its mail passed SPF then). Counted only while onprem (or a relay in front of it) sends."""
    router = world.router
    if router is None:
        return []
    missing = []
    for gateway in router.smtp_egress():
        address = ctx.egress_ips.get(gateway)
        if address is None or address == ctx.onprem_public_ip:
            continue
        if not authorises_address(world.dns.spf_terms, address):
            missing.append(f"{gateway} ({address})")
    return missing


def egress_spf_findings(world: World, ctx: Context) -> Iterator[Finding]:
    missing = unauthorised_egress(world, ctx)
    if missing and not world.onprem.retired:
        yield Finding(
            "MR006", f"tcp/25 from the office, onprem's own mail included (bounces, forwards, "
            f"users still sending through it, a relay in front of it), may leave through "
            f"{', '.join(missing)}, which SPF does not authorise: receivers would flag it",
            ("dns/spf", "router/route/default"),
            "add the line's address to SPF (step dns/spf) before the route sends tcp/25 "
            "through it")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _yaml_entry(name: str, facts: AddressFacts) -> str:
    members = [m for m in facts.members if not m.startswith(("|", "/", ":include:"))]
    if facts.kind is AddressKind.ACCOUNT or not members:
        return f"{name}: drop    # or: [user, ...], or rental once the rental has it"
    return f"{name}: [{', '.join(members)}]"


def address_findings(world: World, ctx: Context,
                     code: str | None = None) -> Iterator[Finding]:
    """MR019 for every unsettled name, MR015 for accounts holding mail (`code`: only one)."""
    for name in world.unsettled_addresses():
        facts = world.addresses[name]
        if code is not None and (code == "MR015") != (facts.kind is AddressKind.ACCOUNT):
            continue
        address = f"{name}@{ctx.domain}" if name != "*" else f"any other name @{ctx.domain}"
        if facts.kind is AddressKind.ACCOUNT:
            yield Finding(
                "MR015", f"the onprem account {name} (outside the uid range mailrec migrates) "
                f"holds {facts.messages} message(s) and receives {address}: nobody migrates "
                "it, and once the rental takes the domain's mail that address would bounce",
                (f"alias/{name}",),
                f"declare it under aliases: in the state ({_yaml_entry(name, facts)}), or "
                "add it to users: if it is a person")
            continue
        why = {
            None: "the state does not say where it goes",
            "onprem": "the state keeps it onprem",
            "rental": "the state says the rental has it, but the rental is not seen to "
                      "accept it (SMTP probe or its alias list)",
            "members": "the rental does not have it yet (step alias/" + name + ")",
        }.get(facts.keep, "")
        expands = f" (onprem expands it to {', '.join(facts.members)})" if facts.members else ""
        yield Finding(
            "MR019", f"onprem receives for {address}, {_article(facts.kind)} {facts.kind}"
            f"{expands}, and {why}: at the rental it would bounce", (f"alias/{name}",),
            f"add it to aliases: in the state ({_yaml_entry(name, facts)}), or drop it "
            "there on purpose")
    for unseen in world.onprem.unseen if code != "MR015" else ():
        yield Finding(
            "MR019", f"onprem may receive for names mailrec cannot see: {unseen}; none of "
            "them is known to have a destination at the rental", ("onprem/address-space",),
            "list those names in a table mailrec can read (hash:, lmdb:, cdb:), or set "
            "the parameter to one")


def stray_findings(world: World, ctx: Context) -> Iterator[Finding]:
    names = sorted(n for n, f in world.users.items() if f.stray_messages)
    if names:
        held = sum(world.user(n).stray_messages for n in names)
        yield Finding(
            "MR020", f"mail is still delivered into the old onprem mailbox of "
            f"{subjects_text(names)} ({held} message(s)) after mailrec archived it: something "
            "onprem still delivers their mail locally (an alias expanded with myorigin, a "
            "local name the forward does not cover)", tuple(names[:20]),
            "let mailrec rewrite the forward (inbound/<user>), find the local delivery in "
            "the onprem log, and move that mail to the rental mailbox by hand")


def retired_address_findings(world: World) -> Iterator[Finding]:
    """MR010's parts about names and relays: onprem retired while an account outside the
    uid range still holds mail, or a relay in front of onprem still routes to it."""
    holding = sorted(n for n, a in world.addresses.items() if a.messages)
    if holding:
        yield Finding("MR010", f"onprem is retired while accounts still hold mail: "
                      f"{subjects_text(holding)}", tuple(holding[:20]),
                      "move or archive that mail first")
    for host, why in world.onprem.upstream_pending:
        yield Finding("MR010", f"onprem is retired while the relay {host} in front of it may "
                      f"still route or queue mail for it ({why}): that mail would bounce when "
                      "the relay's queue lifetime runs out", (f"upstream/{host}",),
                      f"detach the relay first (step upstream/{host})")


def retired_address_measure(world: World) -> Measure:
    holding = sum(1 for a in world.addresses.values() if a.messages)
    return (holding, len(world.onprem.upstream_pending))
