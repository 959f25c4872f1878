"""The `lab` rental provider: the lab rental's files (see `reconciler.lab.layout`) as a service.

Where it sits: a rental driver (observe + apply) like `ssh` or `manual`, chosen with
`rental.provider: lab` or whenever mailrec runs with `--lab DIR`. It also owns the lab rental's
file format: the parsers below are the only code that reads rental/domains, rental/mailboxes,
rental/aliases, rental/whitelist and rental/passwd, and the lab SMTP server
(`reconciler.lab.rental_smtp`) calls the same functions on every transaction, so what this
provider observes is exactly how the SMTP server behaves.

Writes are atomic (temp file + fsync + os.replace), keep the previous file as `<name>.bak`,
and are serialised between mailrec processes (the daemon and a CLI run) by an flock.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from reconciler.drivers.rental.base import (
    Capability,
    IpNetwork,
    ProviderContext,
    ProviderError,
    RentalProvider,
    RentalSnapshot,
)
from reconciler.lab.layout import LabLayout
from reconciler.model import HOST_LABEL_RE, USER_NAME_RE, Rental

# Maildir sub-directories holding delivered messages; tmp/ holds deliveries in progress.
MESSAGE_SUBDIRS = ("new", "cur")
# The local part of an alias member (a forwarding target, possibly at another domain): dot-atoms
# of letters, digits, '_', '+', '=' and '-'. Narrower than RFC 5321 on purpose: members are
# written into the lab's files and the VPS's map sources, where '#' starts a comment, ',' and
# blanks separate members, and they end up in argv and log lines.
_MEMBER_LOCAL_RE = re.compile(r"^[a-z0-9_+=-]+(?:\.[a-z0-9_+=-]+)*\Z", re.ASCII)


@dataclass(frozen=True)
class Address:
    """A mail address of the lab rental: a validated local part and a lower-case domain."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def valid_domain(text: str) -> bool:
    labels = text.split(".")
    return len(text) <= 253 and len(labels) >= 2 and all(HOST_LABEL_RE.match(x) for x in labels)


def parse_address(text: str) -> Address | None:
    """`local@domain` with a mailrec user name as local part, or None if it is not one."""
    local, at, domain = text.strip().lower().rpartition("@")
    if not at or not USER_NAME_RE.match(local) or not valid_domain(domain):
        return None
    return Address(local, domain)


def parse_member(text: str) -> str | None:
    """An alias member as a lower-case full address (`local@domain`, any domain), or None if
    it is not one mailrec will write (see `_MEMBER_LOCAL_RE`)."""
    local, at, domain = text.strip().lower().rpartition("@")
    if not at or len(local) > 64 or not _MEMBER_LOCAL_RE.match(local) or not valid_domain(domain):
        return None
    return f"{local}@{domain}"


def alias_members(address: str, members: tuple[str, ...]) -> tuple[str, ...]:
    """The members of a new alias `address`, validated, lower-case, without duplicates and
    sorted (as observe reports them); raises ProviderError naming the bad one.

    Every provider checks them before writing anything: a member goes into a file (the lab's
    aliases file, the VPS's map source), where a newline would add an entry and a comma or a
    blank another member, and into log lines.
    """
    if isinstance(members, str):
        # A bare string would be taken letter by letter.
        raise ProviderError(f"members of {address} must be a tuple of addresses")
    checked = set()
    for member in members:
        parsed = parse_member(member) if isinstance(member, str) else None
        if parsed is None:
            raise ProviderError(
                f"refusing to create the alias {address}: member {member!r} is not a mail "
                "address (local@domain; letters, digits, '.', '_', '+', '=' or '-')"
            )
        if parsed == address:
            # Delivery would loop back into the alias: no mailbox of that name may exist.
            raise ProviderError(f"refusing to create the alias {address}: it lists itself")
        checked.add(parsed)
    if not checked:
        raise ProviderError(f"refusing to create the alias {address}: it has no members")
    return tuple(sorted(checked))


def meaningful_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered meaningful lines: '#' starts a comment, blank lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ProviderError(f"cannot read {path}: {exc}") from exc
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            yield number, line


def read_domains(path: Path) -> frozenset[str]:
    domains = set()
    for number, line in meaningful_lines(path):
        name = line.lower().rstrip(".")
        if not valid_domain(name):
            raise ProviderError(f"{path}:{number}: {line!r} is not a domain name")
        domains.add(name)
    return frozenset(domains)


def read_mailboxes(path: Path) -> frozenset[Address]:
    """The lab rental's mailboxes: one `local@domain` per line."""
    boxes = set()
    for number, line in meaningful_lines(path):
        address = parse_address(line)
        if address is None:
            raise ProviderError(
                f"{path}:{number}: {line!r} is not a mailbox (expected local@domain with a "
                "user name of lower-case letters, digits, '.', '_' or '-')"
            )
        boxes.add(address)
    return frozenset(boxes)


def read_aliases(
    path: Path, *, default_domain: str | None = None
) -> dict[Address, tuple[str, ...]]:
    """The lab rental's aliases: `name@domain: member@domain, member@other` per line.

    With `default_domain` a bare `name:` is taken at that domain (the manual provider's
    aliases file, written by an admin). Members come back lower-case, without duplicates,
    sorted. A name given twice is an error rather than "first wins" (what postmap does, with a
    warning nobody reads).
    """
    aliases: dict[Address, tuple[str, ...]] = {}
    first_line: dict[Address, int] = {}
    for number, line in meaningful_lines(path):
        name_text, sep, members_text = line.partition(":")
        if default_domain is not None and "@" not in name_text:
            name_text = f"{name_text.strip()}@{default_domain}"
        name = parse_address(name_text)
        if not sep or name is None:
            expected = "name@domain" if default_domain is None else "name or name@domain"
            raise ProviderError(
                f"{path}:{number}: {line!r} is not an alias (expected {expected}: "
                "member@domain, ... with a name of lower-case letters, digits, '.', '_' or '-')"
            )
        if not members_text.strip():
            raise ProviderError(f"{path}:{number}: the alias {name} has no members")
        members = set()
        for item in members_text.split(","):
            member = parse_member(item)
            if member is None:
                raise ProviderError(
                    f"{path}:{number}: {item.strip()!r} (a member of {name}) is not a mail address"
                )
            members.add(member)
        if name in first_line:
            raise ProviderError(
                f"{path}:{number}: the alias {name} is already defined on line {first_line[name]}"
            )
        first_line[name] = number
        aliases[name] = tuple(sorted(members))
    return aliases


def parse_network(text: str) -> IpNetwork:
    """A whitelist entry: a CIDR, or a bare address meaning that one host."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            fixed = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not a network (e.g. 203.0.113.8/29)") from None
        raise ValueError(f"{text!r} has host bits set: did you mean {fixed}?") from None


def read_whitelist(path: Path) -> frozenset[IpNetwork]:
    networks = set()
    for number, line in meaningful_lines(path):
        try:
            networks.add(parse_network(line))
        except ValueError as exc:
            raise ProviderError(f"{path}:{number}: {exc}") from None
    return frozenset(networks)


def read_passwd(path: Path) -> dict[str, str]:
    """`local@domain:password` lines (lab only; real services keep hashes, not this)."""
    users: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return users
    except OSError as exc:
        raise ProviderError(f"cannot read {path}: {exc}") from exc
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        # Split at the first ':' only: the password itself may contain one.
        login, sep, password = raw.partition(":")
        if not sep or parse_address(login) is None:
            # Never echo the line: it may hold a password.
            raise ProviderError(f"{path}:{number}: expected local@domain:password")
        users[login.strip().lower()] = password
    return users


def count_messages(maildir: Path | str) -> int:
    """Messages held in a Maildir (new + cur); a missing Maildir holds none. (Plain string
    paths: at 10,000 mailboxes, pathlib's joins cost more than the directory reads.)"""
    total = 0
    base = os.fspath(maildir)
    for sub in MESSAGE_SUBDIRS:
        directory = f"{base}/{sub}"
        try:
            total += sum(1 for name in os.listdir(directory) if not name.startswith("."))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ProviderError(f"cannot read {directory}: {exc}") from exc
    return total


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` by `text` atomically, keeping the previous content as `<name>.bak`.

    Readers (the lab SMTP server) see either the old or the new file, never a partial one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    backup = path.with_name(path.name + ".bak")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            # A copy, not a link: the backup must not change if someone edits the file in place.
            shutil.copy2(path, backup)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # Make the rename itself durable: without this a crash can bring back the old file.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class LabProvider(RentalProvider):
    """The lab rental, read and changed through its files (needs `--lab DIR`)."""

    name: ClassVar[str] = "lab"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(Capability)

    def __init__(self, config: Rental, context: ProviderContext) -> None:
        super().__init__(config, context)
        if context.lab_dir is None:
            raise ProviderError(
                "the lab rental provider needs a lab: run with --lab DIR (or MAILREC_LAB)"
            )
        if not valid_domain(context.domain):
            raise ProviderError(f"{context.domain!r} is not a domain name")
        self.layout = LabLayout(context.lab_dir)
        self.domain = context.domain.lower()

    # --- observe -----------------------------------------------------------------------
    def observe(self) -> RentalSnapshot:
        layout = self.layout
        if not layout.rental.is_dir():
            raise ProviderError(f"{layout.rental} does not exist: run `mailrec lab init` first")
        maildirs = os.fspath(layout.rental_maildirs)
        boxes = {
            box.local: count_messages(f"{maildirs}/{box.local}")
            for box in read_mailboxes(layout.rental_mailboxes)
            if box.domain == self.domain
        }
        aliases = {
            name.local: members
            for name, members in read_aliases(layout.rental_aliases).items()
            if name.domain == self.domain
        }
        notes = tuple(
            # The SMTP server looks aliases up first, as Postfix does: the mailbox gets no mail.
            f"{name}@{self.domain} is both an alias and a mailbox: mail goes to the alias's "
            "members, the mailbox receives none"
            for name in sorted(aliases.keys() & boxes.keys())
        )
        return RentalSnapshot(
            domain_accepted=self.domain in read_domains(layout.rental_domains),
            mailboxes=dict(sorted(boxes.items())),
            whitelist=read_whitelist(layout.rental_whitelist),
            notes=notes,
            whitelist_verified=True,  # the lab rental's own file, which its server obeys
            aliases=dict(sorted(aliases.items())),
        )

    def maildir(self, user: str) -> Path:
        return self.layout.rental_maildirs / user

    # --- apply -------------------------------------------------------------------------
    def create_mailbox(self, user: str) -> None:
        address = self._address(user)
        with self._locked():
            self._require_domain(address)
            maildir = self.maildir(user)
            for sub in ("tmp", "new", "cur"):
                (maildir / sub).mkdir(parents=True, exist_ok=True)
            boxes = read_mailboxes(self.layout.rental_mailboxes)
            if address not in boxes:
                self._write_mailboxes(boxes | {address})

    def delete_mailbox(self, user: str) -> None:
        address = self._address(user)
        maildir = self.maildir(user)
        with self._locked():
            boxes = read_mailboxes(self.layout.rental_mailboxes)
            if address not in boxes:
                return  # already gone: apply is idempotent
            self._refuse_if_holding(address, maildir)
            # Unlist first so the SMTP server stops accepting mail for it, then look again:
            # a message delivered between the check and the unlisting must not be deleted.
            self._write_mailboxes(boxes - {address})
            try:
                self._refuse_if_holding(address, maildir)
            except ProviderError:
                self._write_mailboxes(boxes)
                raise
            for sub in ("tmp", "new", "cur"):
                with contextlib.suppress(FileNotFoundError):
                    (maildir / sub).rmdir()
            with contextlib.suppress(FileNotFoundError):
                maildir.rmdir()

    def create_alias(self, name: str, members: tuple[str, ...]) -> None:
        address = self._address(name)
        wanted = alias_members(str(address), members)
        with self._locked():
            self._require_domain(address)
            if address in read_mailboxes(self.layout.rental_mailboxes):
                # The alias would be looked up first and silently take the mailbox's mail.
                raise ProviderError(
                    f"refusing to create the alias {address}: a mailbox of that name exists "
                    f"(in {self.layout.rental_mailboxes})"
                )
            aliases = read_aliases(self.layout.rental_aliases)
            if aliases.get(address) == wanted:
                return  # already so: apply is idempotent
            aliases[address] = wanted
            ordered = sorted(aliases.items(), key=lambda item: (item[0].domain, item[0].local))
            atomic_write(
                self.layout.rental_aliases,
                "".join(f"{alias}: {', '.join(targets)}\n" for alias, targets in ordered),
            )

    def set_whitelist(self, add: frozenset[IpNetwork], remove: frozenset[IpNetwork]) -> None:
        with self._locked():
            current = read_whitelist(self.layout.rental_whitelist)
            wanted = (current - remove) | add
            if wanted == current:
                return
            ordered = sorted(wanted, key=lambda n: (n.version, n.network_address, n.prefixlen))
            atomic_write(self.layout.rental_whitelist, "".join(f"{n}\n" for n in ordered))

    # --- helpers -----------------------------------------------------------------------
    def _address(self, user: str) -> Address:
        if not USER_NAME_RE.match(user):
            raise ProviderError(f"{user!r} is not a valid user name")
        return Address(user, self.domain)

    def _require_domain(self, address: Address) -> None:
        if self.domain not in read_domains(self.layout.rental_domains):
            # A real panel cannot create an address under a domain it does not host.
            raise ProviderError(
                f"cannot create {address}: the lab rental does not host {self.domain} "
                f"(add it to {self.layout.rental_domains})"
            )

    def _refuse_if_holding(self, address: Address, maildir: Path) -> None:
        held = count_messages(maildir)
        if held:
            raise ProviderError(
                f"MR008: refusing to delete {address}: its Maildir {maildir} still holds "
                f"{held} message(s); archive them first"
            )
        try:
            in_flight = any(True for _ in (maildir / "tmp").iterdir())
        except FileNotFoundError:
            in_flight = False
        if in_flight:
            raise ProviderError(
                f"refusing to delete {address}: a delivery into {maildir}/tmp is in progress"
            )

    def _write_mailboxes(self, boxes: frozenset[Address]) -> None:
        ordered = sorted(boxes, key=lambda a: (a.domain, a.local))
        atomic_write(self.layout.rental_mailboxes, "".join(f"{a}\n" for a in ordered))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write cycles between mailrec processes."""
        self.layout.rental.mkdir(parents=True, exist_ok=True)
        with (self.layout.rental / ".lock").open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
