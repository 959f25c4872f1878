"""A relay in front of onprem (`onprem.upstream`: the DMZ host the MX names), seen from
outside: whether it still routes the domain to onprem, and what it still queues for it.

Where it sits: read by the backend with the other drivers; `observe.build_world` turns the
facts into `OnpremFacts.upstream_pending`, which MR010 reads before onprem may retire.

A relay with `connect` is read over a `Transport` (SSH, pinned host key), in a number of
commands that depends on its configuration only (one per lookup table main.cf names), never
on the size of its queue (DIR = the relay's `config_dir`):
  postconf -c DIR -x RELAY_PARAMS...          one call: every parameter that decides where
                                              mail for the domain goes, $parameters expanded
  postmap -c DIR -q - TYPE:NAME               per table of transport_maps, relay_domains,
                                              mydestination, virtual_*_domains; the keys
                                              (the domain, its parents, `*`) on stdin
  postqueue -c DIR -j                         the whole queue as JSON lines (Postfix >= 3.1)

The route is decided as trivial-rewrite(8) does (`decide_route`): the domain's address class
(mydestination, virtual_alias_domains, virtual_mailbox_domains, relay_domains, else none),
that class's transport and next hop (relay_transport, relayhost, the domain itself), then
transport_maps, which override all of it. A next hop naming onprem (its MX name, its connect
host, its public address) routes to onprem; one naming the rental, or a domain the relay no
longer accepts, does not; anything else (a next hop found by an MX lookup mailrec does not
make, a host it does not know, a table it could not read) is unknown, and `detail` says why.
The queue is counted from `postqueue -j`: messages with any recipient at the domain (or a
name under it), in every queue (incoming, active, deferred, hold). A failed read is unknown,
never 0.

A relay mailrec cannot read (no `connect`, or the read failed) is confirmed by a person (step
`upstream/<host>`), and an SMTP probe may contradict that: EHLO, `MAIL FROM:<>`,
`RCPT TO:<postmaster@domain>` and `RCPT TO:` an address outside the domain (the control),
RSET, QUIT; never DATA. 2xx for the domain's postmaster: it still accepts the domain (unless
the control got 2xx too: it relays anything for the probe's source, so a 2xx means nothing);
5xx: it refuses it; anything else: unknown.
"""

from __future__ import annotations

import logging
import smtplib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

from reconciler.drivers.postfix import parse_main_cf
from reconciler.drivers.postfix_names import is_hostname
from reconciler.drivers.postfix_space import postfix_argv
from reconciler.drivers.upstream_route import (
    RELAY_PARAMS,
    HopNames,
    TableAnswer,
    UpstreamError,
    count_queued,
    decide_route,
    parse_hops,
    parse_query,
    tables_to_query,
)
from reconciler.model import Upstream
from reconciler.transport import (
    CommandResult,
    Transport,
    TransportError,
    UnsafePathError,
    safe_path,
)

log = logging.getLogger(__name__)

# The pure route and queue logic lives in upstream_route; these names are this module's API.
__all__ = ["RELAY_PARAMS", "HopNames", "RelayReader", "TableAnswer", "UpstreamError",
           "UpstreamFacts", "count_queued", "decide_route", "parse_hops", "parse_query",
           "probe_endpoint", "probe_relay", "relay_facts", "tables_to_query"]

PROBE_TIMEOUT: Final = 15.0


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


# --- the reader ---------------------------------------------------------------------------


class RelayReader:
    """The Postfix of a relay in front of onprem, behind `transport` (see the docstring)."""

    def __init__(self, transport: Transport, host: str, config_dir: str, domain: str, *,
                 names: HopNames) -> None:
        self.transport = transport
        self.host = host
        self.domain = domain.lower().rstrip(".")
        if not is_hostname(self.domain):
            raise UpstreamError(f"relay {host}: {domain!r} is not a domain name")
        try:
            self.config_dir = safe_path(config_dir.rstrip("/") or "/")
        except UnsafePathError as exc:
            raise UpstreamError(f"relay {host}: config_dir: {exc}") from None
        self.names = names

    def __repr__(self) -> str:
        return f"<RelayReader {self.host} {self.transport.host} {self.config_dir}>"

    def _run(self, argv: list[str], *, input: bytes | None = None,
             timeout: float = 60) -> CommandResult:
        return self.transport.run(argv, input=input, check=False, timeout=timeout)

    def read(self) -> UpstreamFacts:
        """Route and queue; a failure of either is unknown (None) with the reason in
        `detail`, and `observed` is False only when neither could be read."""
        params: dict[str, str] | None = None
        try:
            params = self._postconf()
            routes, route_detail = self._route(params)
        except (TransportError, UpstreamError) as exc:
            routes, route_detail = None, f"routing not read: {exc}"
        try:
            queued, queue_detail = self._queue()
        except (TransportError, UpstreamError) as exc:
            queued, queue_detail = None, f"queue not read: {exc}"
        observed = params is not None or queued is not None
        facts = UpstreamFacts(self.host, observed, routes if observed else None,
                              queued if observed else None,
                              detail=f"{route_detail}; {queue_detail}")
        log.debug("relay %s: %s", self.host, facts)
        return facts

    def _postconf(self) -> dict[str, str]:
        result = self._run(postfix_argv("postconf", self.config_dir, "-x", *RELAY_PARAMS))
        if not result.ok:
            raise UpstreamError(_failed(result))
        values = parse_main_cf(result.text)
        return {name: values.get(name, "") for name in RELAY_PARAMS}

    def _route(self, params: Mapping[str, str]) -> tuple[bool | None, str]:
        tables: dict[str, TableAnswer] = {}
        for ref, keys in tables_to_query(self.domain, params).items():
            tables[ref] = self._query(ref, keys)
        return decide_route(self.domain, params, tables, self.names)

    def _query(self, ref: str, keys: Sequence[str]) -> TableAnswer:
        if "\n" in ref or "\r" in ref or ref.startswith("-"):
            return TableAnswer(error="refusing an unexpected table name")
        stdin = "".join(f"{key}\n" for key in keys).encode()
        try:
            result = self._run(postfix_argv("postmap", self.config_dir, "-q", "-", ref),
                               input=stdin)
        except TransportError as exc:
            return TableAnswer(error=str(exc))
        err = result.stderr.decode("utf-8", "replace")
        # Exit 1 with nothing on stderr: no key was found. A fatal error (a missing .db, an
        # unsupported type, a failed lookup) says so on stderr.
        if result.ok or (result.exit_status == 1 and not any(
                word in err for word in ("fatal:", "error:", "warning:"))):
            return TableAnswer(parse_query(result.text, keys))
        return TableAnswer(error=_failed(result))

    def _queue(self) -> tuple[int, str]:
        result = self._run(postfix_argv("postqueue", self.config_dir, "-j"), timeout=300)
        if not result.ok:
            raise UpstreamError(_failed(result) + " (postqueue -j needs Postfix 3.1 or later)")
        count, by_queue = count_queued(result.text, self.domain)
        where = ", ".join(f"{name} {n}" for name, n in sorted(by_queue.items()))
        return count, f"{count} message(s) queued for {self.domain}" + (
            f" ({where})" if where else "")


def _failed(result: CommandResult) -> str:
    err = result.stderr.decode("utf-8", "replace").strip().splitlines()
    return f"`{' '.join(result.argv[:4])} ...` exited {result.exit_status}" + (
        f": {err[-1][:300]}" if err else "")


# --- the SMTP probe -----------------------------------------------------------------------


def probe_endpoint(upstream: Upstream) -> tuple[str, int]:
    """Where the relay's SMTP server answers: `smtp` (host:port), else host port 25."""
    if upstream.smtp:
        host, _, port = upstream.smtp.rpartition(":")
        return host.strip("[]"), int(port)
    return upstream.host.rstrip("."), 25


def outside_address(domain: str) -> str:
    """The control RCPT: an address at a reserved domain (RFC 2606) that is not `domain`."""
    return next(f"postmaster@{d}" for d in ("example.net", "example.org")
                if d != domain and not d.endswith("." + domain))


def probe_relay(host: str, port: int, domain: str, *, source: str | None = None,
                timeout: float = PROBE_TIMEOUT,
                helo: str | None = None) -> tuple[bool | None, str]:
    """Whether the relay's SMTP server still accepts mail for the domain (see the module's
    docstring): True (2xx), False (5xx), None (anything else, or unreachable)."""
    domain = domain.lower().rstrip(".")
    if not is_hostname(domain):
        raise UpstreamError(f"{domain!r} is not a domain name")
    where = f"{host}:{port}" + (f" from {source}" if source else "")
    target, control = f"postmaster@{domain}", outside_address(domain)
    try:
        smtp = smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout,
                            source_address=(source, 0) if source else None)
    except (OSError, smtplib.SMTPException) as exc:
        return None, f"probe: cannot reach {where}: {exc}"
    try:
        smtp.ehlo_or_helo_if_needed()
        code, text = smtp.mail("")
        if not 200 <= code < 300:
            return None, f"probe: {where} refused MAIL FROM:<> ({code} {_text(text)})"
        code, text = smtp.rcpt(target)
        reply = f"RCPT TO:<{target}>: {code} {_text(text)}"
        if 200 <= code < 300:
            control_code, _ = smtp.rcpt(control)
            smtp.rset()
            if 200 <= control_code < 300:
                return None, (f"probe: {where} answered {reply}, but also 2xx for <{control}>: "
                              "it relays anything for this source, so that proves nothing")
            return True, f"probe: {where} still accepts the domain ({reply})"
        smtp.rset()
        if 500 <= code < 600:
            return False, f"probe: {where} refuses the domain ({reply})"
        return None, f"probe: {where} answered {reply}"
    except (OSError, smtplib.SMTPException) as exc:
        return None, f"probe: {where} failed: {type(exc).__name__}: {exc}"
    finally:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            smtp.close()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").replace("\n", " ").strip()


# --- one relay, as the backend sees it ----------------------------------------------------


def relay_facts(upstream: Upstream, domain: str, reader: RelayReader | None, *,
                unreadable: str = "", probe_source: str | None = None,
                probe_timeout: float = PROBE_TIMEOUT) -> UpstreamFacts:
    """The facts of one `onprem.upstream` entry: read over `reader` when there is one; when
    nothing could be read (no `connect`, or `unreadable` says why it could not be opened),
    probed over SMTP, for a person's ack to be checked against."""
    if reader is not None:
        facts = reader.read()
    else:
        why = unreadable or "no connect: a person confirms (mailrec ack upstream/HOST)"
        facts = UpstreamFacts(upstream.host, False, None, None, detail=why)
    if facts.observed:
        return facts
    host, port = probe_endpoint(upstream)
    accepts, said = probe_relay(host, port, domain, source=probe_source, timeout=probe_timeout)
    return replace(facts, accepts_domain=accepts, detail=f"{facts.detail}; {said}")
