"""The backend: the drivers of one installation composed behind observe/execute.

It picks a driver per system from the state file (or the lab's for every system with
`--lab`), reads each system once per observation (a constant number of round trips per
host), and dispatches a step to the driver that knows how to do it. It knows steps only as
data; ordering and safety are the planner's.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
import weakref
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

from reconciler.context import Instructor
from reconciler.drivers.dns import DnsRecords, Rfc2136Dns, ZoneFileDns
from reconciler.drivers.lab_onprem import LabOnprem
from reconciler.drivers.postfix import PostfixError, PostfixFacts
from reconciler.drivers.postfix_host import PostfixHost
from reconciler.drivers.rental.base import (
    Capability,
    ProviderContext,
    RentalProvider,
    RentalSnapshot,
)
from reconciler.drivers.rental.manual import ManualProvider
from reconciler.drivers.rental.registry import load_provider, provider_class
from reconciler.drivers.router import LabRouter, RouterDriver, RtxRouter
from reconciler.drivers.upstream import (
    HopNames,
    RelayReader,
    UpstreamError,
    UpstreamFacts,
    relay_facts,
)
from reconciler.lab.layout import LabLayout
from reconciler.lab.office import OFFICE_ADDRESS, office_seen_as
from reconciler.model import DesiredState, Rental, Side, Upstream
from reconciler.observe import JournalView, build_world
from reconciler.secrets import resolve_secret
from reconciler.steps import (
    ChangeWhitelist,
    CreateAlias,
    CreateMailbox,
    DetachUpstream,
    EnableRecipientMap,
    MoveInbound,
    MoveMx,
    MoveOutbound,
    ProbeForward,
    RemoveFallback,
    RemoveOnpremMailbox,
    RetireOnprem,
    SetDefaultRoute,
    SetMxTtl,
    SetRouterFilter,
    SetSpf,
    Step,
)
from reconciler.transport import Transport, TransportError, open_transport
from reconciler.world import RouterFacts, World

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """A system cannot be reached or a step has no driver; nothing was changed."""


class OnpremDriver(Protocol):
    """What the backend needs from an onprem driver: `LabOnprem` or `PostfixHost`."""

    def observe(self, now: datetime) -> PostfixFacts: ...
    def route_to_rental(self, user: str, smtp_host: str, port: int) -> None: ...
    def route_to_onprem(self, user: str) -> None: ...
    def enable_recipient_map(self) -> None: ...
    def remove_mailbox(self, user: str) -> None: ...
    def retire(self) -> None: ...
    def remove_fallback(self, *rental_hosts: str) -> tuple[str, ...]: ...
    def probe_forward(self, smtp_host: str, port: int) -> str: ...


@dataclass
class _Relay:
    """One `onprem.upstream` entry: its reader when its `connect` opened, else why not."""

    config: Upstream
    reader: RelayReader | None = None
    transport: Transport | None = None
    unreadable: str = ""


@dataclass(frozen=True)
class ObservationCost:
    """What reading one system took in the last observation: for `mailrec plan --timings`
    (and the bench), to show that the round trips per host do not grow with the users."""

    system: str  # onprem | rental | dns | router | relay <host>
    seconds: float
    round_trips: int | None  # commands + file reads over its transport; None: no transport

    def text(self) -> str:
        trips = "-" if self.round_trips is None else str(self.round_trips)
        return f"{self.system:<24} {self.seconds:8.3f} s  {trips:>4} round trip(s)"


def _transport_of(driver: object) -> Transport | None:
    """The transport a driver already opened, if any (never opens one)."""
    for name in ("transport", "_transport"):
        candidate = vars(driver).get(name) if hasattr(driver, "__dict__") else None
        if isinstance(candidate, Transport):
            return candidate
    return None


class _Timed:
    """Times one system's read and counts its transport's round trips meanwhile."""

    def __init__(self, costs: list[ObservationCost], system: str, driver: object) -> None:
        self.costs, self.system, self.driver = costs, system, driver

    def __enter__(self) -> None:
        transport = _transport_of(self.driver)
        self.trips = transport.round_trips if transport is not None else 0
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.start
        transport = _transport_of(self.driver)
        trips = transport.round_trips - self.trips if transport is not None else None
        self.costs.append(ObservationCost(self.system, elapsed, trips))


def _env_str(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _env_path(name: str) -> Path | None:
    value = _env_str(name)
    return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class ObservedParts:
    """What the drivers read in one observation, before it is joined with a state into a
    World: the offline snapshot (`reconciler/snapshot.py`) keeps these, so a PR's base and
    head are each planned against the same observation."""

    postfix: PostfixFacts
    rental: RentalSnapshot
    dns: DnsRecords
    router: RouterFacts | None
    upstream: tuple[UpstreamFacts, ...] = ()


class SystemBackend:
    # What each system's read cost in the last observe() (`plan --timings`).
    last_costs: tuple[ObservationCost, ...] = ()
    # What the drivers read in the last observe() (the offline snapshot).
    last_parts: ObservedParts | None = None

    def __init__(
        self,
        state: DesiredState,
        *,
        lab: LabLayout | None = None,
        state_dir: Path | None = None,
        known_hosts: Path | None = None,
    ) -> None:
        self.state = state
        self.lab = lab
        self.onprem: OnpremDriver
        # Relays in front of onprem; the lab has none (its MX is onprem itself).
        self.relays: list[_Relay] = []
        services = lab.read_services() if lab else {}
        if lab is not None:
            if not lab.exists():
                raise BackendError(f"{lab.root} is not a mailrec lab (run: mailrec lab init)")
            self.onprem = LabOnprem(
                lab, state.domain, state.onprem.config_dir,
                quiet_period=state.policy.quiet_period,
                log_zone=ZoneInfo(state.onprem.log_timezone),
                rental_smtp=services.get("rental_smtp"),
                **({"uid_range": state.onprem.uid_range} if state.onprem.uid_range else {}))
            self.dns: ZoneFileDns | Rfc2136Dns = ZoneFileDns(lab.zone_file(state.domain),
                                                             state.domain)
            # The lab rental is files plus an SMTP server: a `manual` rental is probed over
            # SMTP while `lab up` runs the server; anything else works on the files.
            manual = state.rental.provider == "manual" and "rental_smtp" in services
            rental_config: Rental = state.rental.model_copy(
                update={"provider": "manual" if manual else "lab"}
            )
        else:
            # Given by the caller, or MAILREC_KNOWN_HOSTS; None lets the router and rental
            # drivers use their own default (~/.ssh/known_hosts), as before.
            known_hosts = known_hosts or _env_path("MAILREC_KNOWN_HOSTS")
            # A plug-in that does not import is a configuration error: say so before any
            # connection is opened.
            provider_class(state.rental.provider)
            if state.dns.provider == "lab":
                raise BackendError(
                    "dns.provider lab is the lab's zone file: use it with --lab DIR, or set "
                    "dns.provider rfc2136 with server and tsig for a real DNS server"
                )
            try:
                self.dns = self.rfc2136(state)
            except (RuntimeError, ValueError) as exc:  # the TSIG secret, a bad key
                raise BackendError(f"DNS server {state.dns.server}: {exc}") from exc
            self.onprem = self._open_onprem(
                state, known_hosts or Path("~/.ssh/known_hosts").expanduser()
            )
            self.relays = self._open_relays(
                state, known_hosts or Path("~/.ssh/known_hosts").expanduser()
            )
            rental_config = state.rental
        self.rental: RentalProvider = load_provider(
            rental_config,
            ProviderContext(
                domain=state.domain,
                lab_dir=lab.root if lab else None,
                state_dir=state_dir,
                known_hosts=known_hosts,
                users=tuple(sorted(state.users)),
                aliases=tuple(sorted(state.aliases)),
                # In the lab, relay probes leave from the office (see lab/office.py).
                probe_source=OFFICE_ADDRESS if lab is not None else None,
                services=services,
            ),
        )
        self.router: RouterDriver | None = None
        if state.router is not None:
            self.router = LabRouter(lab) if lab else RtxRouter(state.router, known_hosts)

    @staticmethod
    def _open_onprem(state: DesiredState, known_hosts: Path) -> PostfixHost:
        """The onprem Postfix over `onprem.connect` (its host key checked against
        `known_hosts`); closed when this backend is garbage-collected (the daemon builds one
        backend per round)."""
        connect = state.onprem.connect
        try:
            key = _env_path("MAILREC_SSH_KEY")  # else ssh-agent or ~/.ssh/id_*
            transport = open_transport(
                connect, known_hosts=known_hosts, key_filename=str(key) if key else None
            )
        except (TransportError, OSError) as exc:
            raise BackendError(f"onprem host {connect}: {exc}") from exc
        try:
            host = PostfixHost(transport, state.domain, state.onprem,
                               quiet_period=state.policy.quiet_period)
        except PostfixError as exc:
            transport.close()
            raise BackendError(f"onprem host {connect}: {exc}") from exc
        weakref.finalize(host, transport.close)
        return host

    @staticmethod
    def _open_relays(state: DesiredState, known_hosts: Path) -> list[_Relay]:
        """A reader per relay with `connect` (SSH with the host key checked against
        `known_hosts`, the key of MAILREC_SSH_KEY, as for onprem). A relay that does not open
        is not fatal: it is then unread, so onprem's retirement waits for a person's ack that
        an SMTP probe does not contradict (observe.upstream_pending)."""
        relays: list[_Relay] = []
        names = HopNames.of(
            (state.onprem.mx_host, state.onprem.connect.host, str(state.onprem.public_ip)),
            (state.rental.smtp_host, state.rental.mx_host),
        )
        for upstream in state.onprem.upstream:
            relay = _Relay(upstream)
            relays.append(relay)
            if upstream.connect is None:
                continue
            try:
                key = _env_path("MAILREC_SSH_KEY")
                transport = open_transport(
                    upstream.connect, known_hosts=known_hosts,
                    key_filename=str(key) if key else None,
                )
            except (TransportError, OSError) as exc:
                relay.unreadable = f"relay {upstream.host} {upstream.connect}: cannot open: {exc}"
                log.warning("%s", relay.unreadable)
                continue
            try:
                relay.reader = RelayReader(transport, upstream.host, upstream.config_dir,
                                           state.domain, names=names)
            except UpstreamError as exc:
                transport.close()
                relay.unreadable = str(exc)
                log.warning("%s", relay.unreadable)
                continue
            relay.transport = transport
            weakref.finalize(relay.reader, transport.close)
        return relays

    def close(self) -> None:
        """Close the connections this backend opened (onprem and relay SSH, an ssh
        rental)."""
        if isinstance(self.onprem, PostfixHost):
            self.onprem.transport.close()
        for relay in self.relays:
            if relay.transport is not None:
                relay.transport.close()
        close = getattr(self.rental, "close", None)
        if callable(close):
            close()

    @staticmethod
    def rfc2136(state: DesiredState) -> Rfc2136Dns:
        dns_config = state.dns
        assert dns_config.server and dns_config.tsig
        host, _, port = dns_config.server.rpartition(":")
        return Rfc2136Dns(host, int(port), state.domain, dns_config.tsig.name,
                          dns_config.tsig.algorithm, resolve_secret(dns_config.tsig.secret))

    def describe(self) -> tuple[str, ...]:
        """How each system is read, for plan and status: which driver, in which mode."""
        state = self.state
        onprem = ("lab files" if isinstance(self.onprem, LabOnprem)
                  else f"Postfix over SSH ({state.onprem.connect})")
        if isinstance(self.rental, ManualProvider):
            host, port = self.rental.endpoint
            rental = (f"manual: changes made by a person, then verified by SMTP probes at "
                      f"{host}:{port}")
        elif self.rental.name == "lab":
            rental = "lab: the lab rental's files"
        else:
            rental = f"{self.rental.name} provider"
        if self.lab is not None and state.rental.provider != self.rental.name:
            rental += (f" (the state names the {state.rental.provider} provider: the lab's "
                       "SMTP server is not running, so its files are read; `mailrec lab up` "
                       "to probe it)")
        dns = ("the lab's zone file" if isinstance(self.dns, ZoneFileDns)
               else f"RFC 2136 at {state.dns.server}")
        router = ("none" if self.router is None else "the lab's config" if self.lab is not None
                  else f"RTX over SSH ({state.router.connect if state.router else '?'})")
        return (f"onprem: {onprem}", f"rental: {rental}", f"dns: {dns}", f"router: {router}")

    # --- observe ---------------------------------------------------------------------------

    def read_parts(
        self, now: datetime
    ) -> tuple[PostfixFacts, RentalSnapshot, DnsRecords, object]:
        costs: list[ObservationCost] = []
        with _Timed(costs, "onprem", self.onprem):
            postfix = self.onprem.observe(now)
        if self.lab is not None and isinstance(self.rental, ManualProvider):
            # The lab network knows which line the office's probe leaves through now.
            self.rental.probe_egress_ip = office_seen_as(self.lab)
        with _Timed(costs, "rental", self.rental):
            rental = self.rental.observe()
        with _Timed(costs, "dns", self.dns):
            records = self.dns.observe()
        router = None
        if self.router:
            with _Timed(costs, "router", self.router):
                router = self.router.observe()
        self.last_costs = tuple(costs)
        return postfix, rental, records, router

    def read_upstream(self) -> tuple[UpstreamFacts, ...]:
        """Each relay in front of onprem: read over SSH, else probed over SMTP (see
        drivers/upstream.py). None in the lab."""
        if self.lab is not None:
            return ()
        facts = []
        costs: list[ObservationCost] = []
        for relay in self.relays:
            with _Timed(costs, f"relay {relay.config.host}", relay):
                facts.append(relay_facts(relay.config, self.state.domain, relay.reader,
                                         unreadable=relay.unreadable))
        self.last_costs = (*self.last_costs, *costs)
        return tuple(facts)

    def observe(self, now: datetime, view: JournalView) -> World:
        postfix, rental, records, router = self.read_parts(now)
        upstream = self.read_upstream()
        self.last_parts = ObservedParts(postfix, rental, records, router,  # type: ignore[arg-type]
                                        upstream)
        return build_world(
            self.state, postfix=postfix, rental=rental, dns=records,
            router=router, journal=view, now=now,  # type: ignore[arg-type]
            upstream=upstream,
        )

    # --- execute ---------------------------------------------------------------------------

    def instructor(self) -> Instructor:
        provider = self.rental

        def instruct(kind: str, action: str, target: str) -> str | None:
            needed = {
                "create_mailbox": Capability.CREATE_MAILBOX,
                "delete_mailbox": Capability.DELETE_MAILBOX,
                "add_whitelist": Capability.WRITE_WHITELIST,
                "remove_whitelist": Capability.WRITE_WHITELIST,
                "create_alias": Capability.CREATE_ALIAS,
            }.get(action)
            if needed is None or provider.supports(needed):
                return None
            return provider.instructions(action, target)

        return instruct

    def execute(self, step: Step) -> str | None:
        """Perform one step; returns what the driver reports it proved, if anything."""
        rental = self.state.rental
        match step:
            case CreateMailbox(user=user):
                self.rental.create_mailbox(user)
            case MoveInbound(user=user, to=Side.RENTAL):
                self.onprem.route_to_rental(user, rental.smtp_host, rental.relay_port)
            case MoveInbound(user=user, to=Side.ONPREM):
                self.onprem.route_to_onprem(user)
            case RemoveOnpremMailbox(user=user):
                self.onprem.remove_mailbox(user)
            case EnableRecipientMap():
                self.onprem.enable_recipient_map()
            case RetireOnprem():
                self.onprem.retire()
            case CreateAlias(alias=name, members=members):
                self.rental.create_alias(name, members)
            case ProbeForward():
                return self.onprem.probe_forward(rental.smtp_host, rental.relay_port)
            case RemoveFallback():
                self.onprem.remove_fallback(rental.smtp_host, rental.mx_host)
            case SetSpf(after=terms):
                self.dns.set_spf(terms, self.state.dns.ttl)
            case SetMxTtl(after=ttl):
                self.dns.set_mx_ttl(ttl)
            case MoveMx(host=host, ttl=ttl):
                self.dns.set_mx((host,), ttl)
            case ChangeWhitelist(network=network, add=add):
                net = frozenset({ipaddress.ip_network(network)})
                empty: frozenset[ipaddress.IPv4Network | ipaddress.IPv6Network] = frozenset()
                self.rental.set_whitelist(net if add else empty, empty if add else net)
            case SetRouterFilter() | SetDefaultRoute():
                if self.router is None:
                    raise BackendError("no router configured")
                self.router.apply_step(step, self.state)
            case MoveOutbound() | DetachUpstream():
                raise BackendError(f"{step.id} is a manual step: a person acks it")
            case _:
                raise BackendError(f"no driver performs {step.id}")
        return None
