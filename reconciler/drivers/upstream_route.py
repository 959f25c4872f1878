"""Where a relay in front of onprem sends the domain's mail, decided from its Postfix settings
and tables as trivial-rewrite(8) does, and what its queue holds for the domain: the pure half
of `drivers/upstream.py` (which reads the relay and probes it)."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from reconciler.drivers.postfix_names import split_list, table_ref

# Everything trivial-rewrite(8) and smtpd(8) consult to decide where the domain's mail goes.
RELAY_PARAMS: Final = (
    "relay_domains", "relay_transport", "transport_maps", "relayhost", "mydestination",
    "local_transport", "virtual_alias_domains", "virtual_mailbox_domains",
    "virtual_transport", "default_transport", "smtp_fallback_relay",
    "sender_dependent_relayhost_maps", "sender_dependent_default_transport_maps",
    "smtpd_relay_restrictions", "smtpd_recipient_restrictions",
    "parent_domain_matches_subdomains",
)
# Domain lists that decide the address class, in trivial-rewrite's order, and how they match.
DOMAIN_LISTS: Final = ("mydestination", "virtual_alias_domains", "virtual_mailbox_domains",
                       "relay_domains")
# Tables whose lookups see the full address only (regular expressions).
PATTERN_TYPES: Final = frozenset({"regexp", "pcre"})
SMTP_CLIENTS: Final = frozenset({"smtp", "relay", "lmtp"})  # master.cf's stock smtp(8) services
ON_THE_RELAY: Final = frozenset({"local", "virtual"})  # delivered on the relay itself
NOT_DELIVERED: Final = frozenset({"error", "discard", "retry"})  # refused, dropped, deferred

ListStyle = Literal["exact", "dot", "parent"]


class UpstreamError(RuntimeError):
    """A relay mailrec cannot read safely (a bad setting); the message names the relay."""



# --- names --------------------------------------------------------------------------------


def _host_key(name: str) -> str:
    """A host name or address as compared: lower case, no brackets or final dot, addresses
    in their canonical form (`ipv6:` prefix dropped)."""
    text = name.strip().strip("[]").lower()
    text = text.removeprefix("ipv6:").rstrip(".")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


@dataclass(frozen=True)
class HopNames:
    """Whom a next hop may name: onprem (mx_host, connect host, public_ip) or the rental."""

    onprem: frozenset[str]
    rental: frozenset[str] = frozenset()

    @classmethod
    def of(cls, onprem: Iterable[str | None], rental: Iterable[str | None] = ()) -> HopNames:
        def keys(names: Iterable[str | None]) -> frozenset[str]:
            return frozenset(_host_key(n) for n in names if n and _host_key(n))

        return cls(keys(onprem), keys(rental))

    def side(self, host: str) -> Literal["onprem", "rental"] | None:
        key = _host_key(host)
        if key in self.onprem:
            return "onprem"
        if key in self.rental:
            return "rental"
        return None


# --- lookups ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableAnswer:
    """What one `postmap -q -` found: key -> value, or why the table could not be read."""

    found: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None


def query_ref(item: str) -> str | None:
    """The table to query for a list item (`proxy:` taken off: proxymap serves the same
    table); None when the item is no table."""
    parsed = table_ref(item.removeprefix("!"))
    if parsed is None:
        return None
    kind, name = parsed
    if kind == "proxy":
        inner = table_ref(name)
        return f"{inner[0]}:{inner[1]}" if inner else None
    return f"{kind}:{name}"


def parent_keys(domain: str, parent_style: bool) -> list[str]:
    """The keys a table is asked after the domain itself: `.co.jp`, `.jp` (or `co.jp`, `jp`
    where parent_domain_matches_subdomains names the parameter)."""
    labels = domain.split(".")
    return [("" if parent_style else ".") + ".".join(labels[i:]) for i in range(1, len(labels))]


def parent_styled(params: Mapping[str, str]) -> frozenset[str]:
    return frozenset(split_list(params.get("parent_domain_matches_subdomains", "")))


def transport_keys(domain: str, kind: str, parent_style: bool) -> list[str]:
    """Keys of a transport_maps lookup of the domain as trivial-rewrite makes it: pattern
    tables see full addresses only (a representative one, postmaster@domain), the others
    the domain and its parents; both the `*` wildcard."""
    if kind in PATTERN_TYPES:
        return [f"postmaster@{domain}", "*"]
    return [domain, *parent_keys(domain, parent_style), "*"]


def list_keys(domain: str, kind: str, style: ListStyle) -> list[str]:
    if kind in PATTERN_TYPES or style == "exact":
        return [domain]
    return [domain, *parent_keys(domain, style == "parent")]


def list_style(name: str, params: Mapping[str, str]) -> ListStyle:
    # virtual_*_domains are string lists (exact names); the others are domain lists.
    if name.startswith("virtual_"):
        return "exact"
    return "parent" if name in parent_styled(params) else "dot"


def tables_to_query(domain: str, params: Mapping[str, str]) -> dict[str, list[str]]:
    """Every table the route depends on, with the keys to ask it (in lookup order)."""
    wanted: dict[str, list[str]] = {}

    def want(ref: str, keys: Iterable[str]) -> None:
        have = wanted.setdefault(ref, [])
        have.extend(k for k in keys if k not in have)

    transport_parent = "transport_maps" in parent_styled(params)
    for item in split_list(params.get("transport_maps", "")):
        ref = query_ref(item)
        if ref is not None:
            want(ref, transport_keys(domain, ref.partition(":")[0], transport_parent))
    for name in DOMAIN_LISTS:
        style = list_style(name, params)
        for item in split_list(params.get(name, "")):
            ref = query_ref(item)
            if ref is not None:
                want(ref, list_keys(domain, ref.partition(":")[0], style))
    return wanted


def parse_query(text: str, keys: Sequence[str]) -> dict[str, str]:
    """`postmap -q -` output: `key<TAB>value` per key found."""
    found: dict[str, str] = {}
    asked = set(keys)
    for line in text.splitlines():
        key, sep, value = line.partition("\t")
        if not sep:
            key, _, value = line.partition(" ")
        if key in asked and key not in found:
            found[key] = value.strip()
    return found


# --- the route ----------------------------------------------------------------------------


def _listed(name: str, domain: str, params: Mapping[str, str],
            tables: Mapping[str, TableAnswer]) -> tuple[bool | None, str]:
    """Whether the domain list `name` matches the domain (first match wins, `!` excludes),
    and what decided it. None: an entry mailrec cannot evaluate may decide it."""
    style = list_style(name, params)
    unsure: list[str] = []
    for item in split_list(params.get(name, "")):
        negated = item.startswith("!")
        body = item[1:] if negated else item
        ref = query_ref(item)
        shown = item
        hit: bool | None
        if ref is not None:
            answer = tables.get(ref)
            if answer is None or answer.error is not None:
                hit = None
                shown = f"{item} ({answer.error if answer is not None else 'not queried'})"
            else:
                keys = list_keys(domain, ref.partition(":")[0], style)
                hit = any(k in answer.found for k in keys)
        elif body.startswith("/") or "$" in body or not body:
            hit = None  # a /file/name or a $parameter postconf could not expand
        else:
            entry = body.lower().rstrip(".")
            hit = (entry == domain
                   or (style != "exact" and entry.startswith(".") and domain.endswith(entry))
                   or (style == "parent" and domain.endswith("." + entry)))
        if hit is None:
            if negated:
                return None, f"{name} entry {shown} may exclude {domain}: not evaluated"
            unsure.append(shown)
            continue
        if hit:
            if negated and unsure:
                return None, f"{name}: {', '.join(unsure)} not evaluated, then {item}"
            return (not negated), f"{name} {'excludes' if negated else 'lists'} {domain}"
    if unsure:
        return None, f"{name}: {', '.join(unsure)} not evaluated"
    return False, ""


def transport_entry(domain: str, params: Mapping[str, str],
                    tables: Mapping[str, TableAnswer]) -> tuple[str | None, str, str | None]:
    """The transport_maps entry trivial-rewrite uses for the domain: (value, where, error).
    Keys in lookup order (full address, domain, parents, `*`), tables in list order for each;
    pattern tables answer full-address and `*` lookups only."""
    refs = [r for r in map(query_ref, split_list(params.get("transport_maps", ""))) if r]
    for ref in refs:
        answer = tables.get(ref)
        if answer is None or answer.error is not None:
            why = answer.error if answer is not None else "not queried"
            return None, "", f"transport_maps {ref} could not be read ({why})"
    parent = "transport_maps" in parent_styled(params)
    order = [f"postmaster@{domain}", domain, *parent_keys(domain, parent), "*"]
    for key in order:
        for ref in refs:
            kind = ref.partition(":")[0]
            if key not in transport_keys(domain, kind, parent):
                continue
            value = tables[ref].found.get(key)
            if value is not None:
                return value, f"transport_maps {ref} ({key}): {value}", None
    return None, "", None


@dataclass(frozen=True)
class Hop:
    host: str
    port: int | None
    mx: bool  # an unbracketed name: smtp(8) looks up its MX records first


def parse_hops(nexthop: str, *, mx_lookup: bool) -> list[Hop] | None:
    """The destinations of a next hop (`[h]:25`, `h:587`, `inet:h:24`, a list of them since
    Postfix 3.5); None for a local socket (`unix:/path`)."""
    hops: list[Hop] = []
    for item in split_list(nexthop):
        text = item.removeprefix("inet:")
        if text.startswith("unix:"):
            return None
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = rest.removeprefix(":")
            bracketed = True
        else:
            host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
            bracketed = False
        hops.append(Hop(_host_key(host), int(port) if port.isdigit() else None,
                        mx_lookup and not bracketed and not _is_address(host)))
    return hops


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(_host_key(text))
    except ValueError:
        return False
    return True


def judge_hops(nexthop: str, channel: str, domain: str,
               names: HopNames) -> tuple[bool | None, str]:
    hops = parse_hops(nexthop, mx_lookup=channel in ("smtp", "relay"))
    if hops is None:
        return False, f"next hop {nexthop} is a socket on the relay"
    if not hops:
        return None, "no next hop"
    unknown: list[str] = []
    for hop in hops:
        side = names.side(hop.host)
        if side == "onprem":
            return True, f"next hop {nexthop} is onprem ({hop.host})"
        if side is None:
            if hop.mx and hop.host == domain:
                unknown.append(f"{hop.host} by its MX records, which mailrec does not look up "
                               "on the relay's behalf")
            else:
                unknown.append(f"{hop.host}, neither onprem ({', '.join(sorted(names.onprem))})"
                               f" nor the rental ({', '.join(sorted(names.rental)) or '-'})")
    if unknown:
        return None, f"next hop {nexthop}: cannot tell where {'; '.join(unknown)} leads"
    return False, f"next hop {nexthop} is the rental"


def decide_route(domain: str, params: Mapping[str, str], tables: Mapping[str, TableAnswer],
                 names: HopNames) -> tuple[bool | None, str]:
    """Whether the relay hands the domain's mail to onprem, and what decided it (see the
    module's docstring). Pure: `params` as `postconf -x` printed them, `tables` as the
    queries of `tables_to_query` answered."""
    domain = domain.lower().rstrip(".")
    seen: list[str] = []
    klass = None
    for name in DOMAIN_LISTS:
        listed, why = _listed(name, domain, params, tables)
        if listed is None:
            return None, f"{why}: cannot tell whether the relay accepts {domain}"
        if listed:
            klass = name
            seen.append(why)
            break
        if why:
            seen.append(why)  # excluded by a `!` entry
    entry, entry_where, entry_error = transport_entry(domain, params, tables)
    if klass == "virtual_alias_domains":
        return None, (f"virtual_alias_domains lists {domain}: its addresses are rewritten to "
                      "others, which mailrec does not follow")
    if klass is None:
        restrictions = (f"{params.get('smtpd_relay_restrictions', '')} "
                        f"{params.get('smtpd_recipient_restrictions', '')}")
        if "permit_mx_backup" not in split_list(restrictions):
            said = "; ".join([*seen, f"no longer relays {domain}: not in relay_domains, "
                              "mydestination or virtual_*_domains (smtpd refuses it)"])
            if entry is not None:
                verdict, _ = judge_hops(entry.partition(":")[2] or domain,
                                        entry.partition(":")[0], domain, names)
                if verdict:
                    said += (f"; {entry_where} still sends it to onprem, for clients in "
                             "mynetworks only: remove that entry too")
            return False, said
        klass = "default"
        seen.append(f"{domain} is in no domain list, but permit_mx_backup accepts it")
    if entry_error is not None:
        return None, "; ".join([*seen, entry_error])
    # The address class's transport and next hop (resolve.c), then transport_maps.
    param = {"mydestination": "local_transport", "virtual_mailbox_domains": "virtual_transport",
             "relay_domains": "relay_transport", "default": "default_transport"}[klass]
    channel, _, nexthop = params.get(param, "").strip().partition(":")
    source = param
    sender_maps = ""
    if not nexthop:
        nexthop = domain
        if klass in ("relay_domains", "default"):
            if params.get("relayhost", "").strip():
                nexthop, source = params["relayhost"].strip(), "relayhost"
            sender_maps = params.get("sender_dependent_relayhost_maps", "").strip()
    if klass == "default" and params.get("sender_dependent_default_transport_maps", "").strip():
        sender_maps = sender_maps or params["sender_dependent_default_transport_maps"].strip()
    if entry is not None:
        new_channel, _, new_hop = entry.partition(":")
        if new_channel:
            channel, nexthop, source = new_channel, new_hop or domain, "transport_maps"
            sender_maps = ""
        elif new_hop:
            nexthop, source, sender_maps = new_hop, "transport_maps", ""
        seen.append(entry_where)
    else:
        seen.append(f"{source}: {channel}:{nexthop}")
    channel = channel.strip()
    if channel in ON_THE_RELAY:
        return False, "; ".join([*seen, f"delivered on the relay itself ({channel})"])
    if channel in NOT_DELIVERED:
        return False, "; ".join([*seen, f"not delivered anywhere ({channel})"])
    verdict, why = judge_hops(nexthop, channel, domain, names)
    seen.append(why)
    if verdict:
        return True, "; ".join(seen)
    fallback = params.get("smtp_fallback_relay", "").strip()
    if channel in ("smtp", "relay") and fallback:
        falls, _ = judge_hops(fallback, channel, domain, names)
        if falls:
            return True, "; ".join([*seen, f"smtp_fallback_relay {fallback} is onprem"])
    if sender_maps:
        return None, "; ".join([*seen, f"{sender_maps} may send it elsewhere per sender: "
                                "not read"])
    if channel not in SMTP_CLIENTS:
        return None, "; ".join([*seen, f"transport {channel} is defined in the relay's "
                                "master.cf, which mailrec does not read"])
    return verdict, "; ".join(seen)


# --- the queue ----------------------------------------------------------------------------


def count_queued(text: str, domain: str) -> tuple[int, dict[str, int]]:
    """Messages in `postqueue -j` output with a recipient at the domain (or a name under
    it), and how many of them sit in each queue. Raises `UpstreamError` on a line that is
    not a queue entry: a partial count would pass for a complete one."""
    domain = domain.lower().rstrip(".")
    total = 0
    by_queue: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise UpstreamError(f"postqueue -j line {number} is not JSON: {exc}") from None
        recipients = entry.get("recipients") if isinstance(entry, dict) else None
        if not isinstance(recipients, list):
            raise UpstreamError(f"postqueue -j line {number} has no recipient list")
        for recipient in recipients:
            address = recipient.get("address") if isinstance(recipient, dict) else None
            if not isinstance(address, str):
                raise UpstreamError(f"postqueue -j line {number}: a recipient has no address")
            at = address.rpartition("@")[2].lower().rstrip(".")
            if at == domain or at.endswith("." + domain):
                total += 1
                queue = str(entry.get("queue_name", "?"))
                by_queue[queue] = by_queue.get(queue, 0) + 1
                break
    return total, by_queue
