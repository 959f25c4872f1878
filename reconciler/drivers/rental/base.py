"""The rental provider interface: what mailrec can know and change at the hosted mail service.

Workflow, in order, for every provider:
1. `observe()` reads everything in a constant number of round trips (never one per user).
2. For a step the provider supports (`capabilities`), the executor calls `create_mailbox`,
   `delete_mailbox` or `set_whitelist`, then observes again to verify.
3. For a step it does not support, the step becomes a manual one: `instructions()` says
   exactly what a person must do in the provider's control panel; the step stays gated
   until `mailrec ack`, and is then verified by `observe()` (e.g. an SMTP probe).
Providers plug in by name (`manual`, `ssh`, `lab`) or by `python.module:Class`.
"""

from __future__ import annotations

import ipaddress
import shlex
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import ClassVar

from reconciler.model import Rental

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Capability(StrEnum):
    LIST_MAILBOXES = "list_mailboxes"
    CREATE_MAILBOX = "create_mailbox"
    DELETE_MAILBOX = "delete_mailbox"
    MESSAGE_COUNTS = "message_counts"
    READ_WHITELIST = "read_whitelist"
    WRITE_WHITELIST = "write_whitelist"
    LIST_ALIASES = "list_aliases"  # reads the rental's aliases (names and members)
    CREATE_ALIAS = "create_alias"  # creates or changes an alias (a forwarding address)


@dataclass(frozen=True)
class RentalSnapshot:
    domain_accepted: bool
    mailboxes: dict[str, int | None]  # local part -> messages held (None: unknown)
    whitelist: frozenset[IpNetwork]
    notes: tuple[str, ...] = ()  # what could not be verified, for `plan` and `status`
    # The whitelist was read from the rental itself (its config, an API). Off unless the
    # provider says so: a state file's or an admin's list is declared, not observed, and
    # safety may not rely on it (a plug-in that only echoes rental.whitelist stays unverified).
    whitelist_verified: bool = False
    # Relay probes made: (the address the rental saw, whether it relayed without AUTH).
    relay_checks: tuple[tuple[IpAddress, bool], ...] = ()
    # Aliases (forwarding addresses) the rental delivers for the domain: local part ->
    # members as full addresses, sorted; None when the rental is seen to accept the name
    # (an SMTP probe) but its members cannot be read. A name absent here has no alias there
    # (a mailbox of that name is in `mailboxes`).
    aliases: dict[str, tuple[str, ...] | None] = field(default_factory=dict)


@dataclass(frozen=True)
class ProviderContext:
    """What a provider may need beyond its own config section."""

    domain: str
    lab_dir: Path | None = None  # set with --lab: every host is the lab's
    state_dir: Path | None = None  # directory of the state file (for files kept in the repo)
    known_hosts: Path | None = None
    users: tuple[str, ...] = ()  # managed users (e.g. which addresses to probe)
    aliases: tuple[str, ...] = ()  # alias names the state declares (probed like users)
    probe_source: str | None = None  # local address to bind SMTP probes to
    services: dict[str, str] = field(default_factory=dict)  # lab services.json


class ProviderError(RuntimeError):
    """A provider failed (unreachable, refused); the message names what and where."""


class RentalProvider(ABC):
    name: ClassVar[str]
    capabilities: ClassVar[frozenset[Capability]]

    def __init__(self, config: Rental, context: ProviderContext) -> None:
        self.config = config
        self.context = context

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities

    @abstractmethod
    def observe(self) -> RentalSnapshot: ...

    def create_mailbox(self, user: str) -> None:
        raise NotImplementedError(self.name)

    def delete_mailbox(self, user: str) -> None:
        raise NotImplementedError(self.name)

    def set_whitelist(self, add: frozenset[IpNetwork], remove: frozenset[IpNetwork]) -> None:
        raise NotImplementedError(self.name)

    def create_alias(self, name: str, members: tuple[str, ...]) -> None:
        """Make `name@domain` deliver to `members` (full addresses) at the rental, replacing
        an alias of that name; refused when a mailbox has the name."""
        raise NotImplementedError(self.name)

    def instructions(self, action: str, target: str) -> str:
        """Exact steps for a person, when this provider cannot do `action` itself."""
        address = f"{target}@{self.context.domain}"
        if action == "create_mailbox":
            return (
                f"In the {self.name} control panel, create the mailbox {address}, "
                f"then run: mailrec ack {shlex.quote('mailbox/' + target)}"
            )
        if action == "delete_mailbox":
            return (
                f"Archive and delete the mailbox {address} in the control panel, "
                f"then run: mailrec ack {shlex.quote('mailbox/' + target)}"
            )
        if action == "create_alias":
            name, _, members = target.partition(":")
            return (
                f"In the {self.name} control panel, create the forwarding address (alias) "
                f"{name}@{self.context.domain} delivering to {members.strip()}, "
                f"then run: mailrec ack {shlex.quote('alias/' + name)}"
            )
        if action in ("add_whitelist", "remove_whitelist"):
            verb = "Add" if action == "add_whitelist" else "Remove"
            return (
                f"{verb} {target} in the control panel's relay (no-auth SMTP) whitelist, "
                f"then run: mailrec ack {shlex.quote('whitelist/' + target)}"
            )
        return f"{action} {target} by hand, then run mailrec ack"
