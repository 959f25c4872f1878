"""The onprem Postfix on a real host, over a `Transport` (SSH with pinned host keys, or local).

Where it sits: the onprem driver of a real installation (`drivers/backend.py` builds it from
`onprem.connect`); `LabOnprem` is its twin on the lab's files. Both read with the pure parsers
of `drivers/postfix.py` and give the same `PostfixFacts`, so the planner cannot tell them
apart.

Observation is a constant number of commands, whatever the number of users (DESIGN.md 2):
  find DIR -maxdepth 1 -name 'mailrec_*'     which managed files exist
  postconf -c DIR local_recipient_maps transport_maps
  getent passwd
  postmap -c DIR -s hash:DIR/mailrec_transport    (skipped while the map does not exist: empty)
  postmap -c DIR -s hash:DIR/mailrec_recipients   (same)
  read DIR/mailrec_removed                   (if it exists)
  sh -c '{ find ...; } | uniq -c'            one scan of all mailboxes, counted on the host
  tail -n 5000 LOG                           (+ LOG.1 when LOG shows no mail yet: rotation)
  postfix -c DIR status                      (only once retired: is it really stopped?)

Every change follows one discipline: write the map source atomically keeping a `.bak`,
`postmap` it, change main.cf only with `postconf -e` (after a `.bak` of main.cf), then
`postfix check` and `postfix reload`. On any failure the previous content of every file the
change wrote is put back and re-compiled, and a `PostfixError` says what failed and what was
restored. User names are held to `USER_NAME_RE`, paths to `safe_path`, and every command is
an argv list that the transport quotes part by part; the one shell script is a constant.

Every Postfix command names the instance's config directory (`postconf -c DIR`, `postmap -c
DIR`, `postfix -c DIR`, and so would postqueue/postsuper): without `-c` they read the
system's /etc/postfix/main.cf, which is another instance on a multi-instance host and does not
exist at all where Postfix was installed with "No configuration" (`postmap: fatal: open
/etc/postfix/main.cf`). tests/test_postfix_commands.py holds every driver command to it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import posixpath
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal, get_args
from zoneinfo import ZoneInfo

from reconciler import clock
from reconciler.drivers.postfix import (
    RECIPIENT_MAP,
    TRANSPORT_MAP,
    PostfixError,
    PostfixFacts,
    edit_map,
    format_map,
    parse_main_cf,
    parse_map,
    parse_passwd,
    recipient_map_ref,
    relay_target,
    transport_map_ref,
    users_in_map,
    with_map,
)
from reconciler.drivers.postfix_log import LOG_LINES, read_last_mail
from reconciler.drivers.postfix_mailbox import MailboxSpec, count_mailboxes
from reconciler.model import USER_NAME_RE, Onprem
from reconciler.transport import (
    CommandResult,
    Transport,
    TransportError,
    UnsafePathError,
    safe_path,
)

REMOVED_LIST: Final = "mailrec_removed"  # users whose onprem mailbox mailrec archived
RETIRED_MARKER: Final = "mailrec_retired"  # written by retire(), before Postfix is stopped
ARCHIVE_INFIX: Final = ".mailrec-removed-"  # Maildir -> Maildir.mailrec-removed-<UTC time>
# Characters of a main.cf map list mailrec may write with `postconf -e`: map types, paths,
# $parameters, commas and spaces. Never a newline, quote, backslash or '#'.
_MAP_LIST_RE: Final = re.compile(r"^[A-Za-z0-9_$:/.,{}=@+ -]*$")
_HOSTNAME_RE: Final = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
# The Postfix programs mailrec runs; each reads main.cf, so each gets `-c config_dir`.
PostfixProgram = Literal["postconf", "postmap", "postfix", "postqueue", "postsuper"]
POSTFIX_PROGRAMS: Final = frozenset(get_args(PostfixProgram))


def managed_files(listing: str) -> frozenset[str]:
    """Names printed by `find DIR -maxdepth 1 -name 'mailrec_*' -printf '%f\\n'`."""
    return frozenset(line.strip() for line in listing.splitlines() if line.strip())


def check_map_list(name: str, value: str) -> str:
    """A main.cf map list mailrec is about to write: nothing postconf -e could misread."""
    if not _MAP_LIST_RE.match(value):
        raise PostfixError(f"refusing to write {name} = {value!r}: unexpected characters")
    return value


def check_relay(smtp_host: str, port: int) -> str:
    """The transport map value for the rental relay, from validated parts only."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise PostfixError(f"refusing relay port {port!r}")
    try:
        address = ipaddress.ip_address(smtp_host)
    except ValueError:
        if not _HOSTNAME_RE.match(smtp_host) or ".." in smtp_host:
            raise PostfixError(f"refusing unsafe relay host {smtp_host!r}") from None
        return relay_target(smtp_host, port)
    return relay_target(str(address), port)  # [2001:db8::1]:25 is Postfix's IPv6 form


def check_user(user: str) -> str:
    if not isinstance(user, str) or not USER_NAME_RE.match(user):
        raise PostfixError(f"refusing unsafe user name {user!r}")
    return user


# --- the driver -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Saved:
    """A file as it was before a change wrote it (None: it did not exist)."""

    path: str
    content: bytes | None
    compiled: bool  # a map source: re-run postmap after putting it back


class PostfixHost:
    """The onprem Postfix behind `transport`; same methods and facts as `LabOnprem`."""

    def __init__(
        self, transport: Transport, domain: str, onprem: Onprem, *,
        quiet_period: timedelta = timedelta(hours=48), log_lines: int = LOG_LINES,
    ) -> None:
        self.transport = transport
        self.domain = domain.lower()
        try:
            self.config_dir = safe_path(onprem.config_dir.rstrip("/") or "/")
            self.log_file = safe_path(onprem.log_file)
        except UnsafePathError as exc:
            raise PostfixError(f"onprem: {exc}") from None
        self.mailbox = MailboxSpec.parse(onprem.mailbox)
        self.log_zone = ZoneInfo(onprem.log_timezone)
        self.uid_range = onprem.uid_range  # None: the host's /etc/login.defs says
        # The log is read back to the start of the quiet period (MR010), and a little more.
        self.quiet_period = quiet_period
        self.log_lines = log_lines

    def __repr__(self) -> str:
        return f"<PostfixHost {self.transport.host} {self.config_dir}>"

    # --- small helpers -------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return safe_path(f"{self.config_dir}/{name}")

    def _command(self, program: PostfixProgram, *args: str) -> list[str]:
        """A Postfix command of this instance: `-c DIR` right after the program, always."""
        return [program, "-c", self.config_dir, *args]

    def _run(self, what: str, argv: list[str]) -> CommandResult:
        try:
            return self.transport.run(argv)
        except TransportError as exc:
            raise PostfixError(f"{what}: {exc}") from exc

    def _postconf(self, names: Iterable[str]) -> dict[str, str]:
        listed = list(names)
        result = self._run("postconf", self._command("postconf", *listed))
        values = parse_main_cf(result.text)
        return {name: values.get(name, "") for name in listed}

    def _managed(self) -> frozenset[str]:
        result = self._run(
            f"list {self.config_dir}",
            ["find", self.config_dir, "-maxdepth", "1", "-name", "mailrec_*", "-printf", "%f\\n"],
        )
        return managed_files(result.text)

    def _dump_map(self, name: str, present: frozenset[str]) -> dict[str, str]:
        if f"{name}.db" not in present:
            return {}  # never compiled: Postfix has no such table yet, mailrec routes nobody
        argv = self._command("postmap", "-s", f"hash:{self._path(name)}")
        result = self._run(f"dump {name}", argv)
        return parse_map(result.text)

    def _removed(self, present: frozenset[str] | None = None) -> dict[str, str]:
        if present is not None and REMOVED_LIST not in present:
            return {}
        data = self.transport.read_file(self._path(REMOVED_LIST))
        return parse_map(data.decode("utf-8", "replace")) if data else {}

    def _homes(self, text: str) -> dict[str, str]:
        return {user: str(home) for user, home in parse_passwd(text).items()}

    def _count(self, homes: Mapping[str, str]) -> dict[str, int]:
        return count_mailboxes(self.transport, self.mailbox, homes)

    # --- observe -------------------------------------------------------------------------
    def observe(self, now: datetime) -> PostfixFacts:
        present = self._managed()
        params = self._postconf(["local_recipient_maps", "transport_maps"])
        passwd = self._run("getent passwd", ["getent", "passwd"]).text
        transport = self._dump_map(TRANSPORT_MAP, present)
        recipients = self._dump_map(RECIPIENT_MAP, present)
        removed = self._removed(present)
        # An archived mailbox's account still exists (see remove_mailbox); to mailrec it has
        # no onprem mailbox any more.
        homes = {u: h for u, h in self._homes(passwd).items() if u not in removed}
        accounts = self._count(homes)
        retired = RETIRED_MARKER in present and not self._running()
        return PostfixFacts(
            accounts=accounts,
            # Entries only route mail while transport_maps names the map.
            transport=(
                users_in_map(transport, self.domain)
                if transport_map_ref(self.config_dir) in _refs(params["transport_maps"])
                else {}
            ),
            recipients=users_in_map(recipients, self.domain),
            recipient_validation=self._validates(params["local_recipient_maps"]),
            last_mail_at=self._last_mail(now),
            retired=retired,
        )

    def _validates(self, value: str) -> bool:
        # An empty local_recipient_maps makes smtpd accept every local address (unknown ones
        # bounce later): nothing is answered 550, so MR007 holds without mailrec's map.
        return not value.strip() or recipient_map_ref(self.config_dir) in _refs(value)

    def _running(self) -> bool:
        try:
            result = self.transport.run(self._command("postfix", "status"), check=False)
        except TransportError as exc:
            raise PostfixError(f"postfix status: {exc}") from exc
        return result.ok

    def _last_mail(self, now: datetime) -> datetime | None:
        return read_last_mail(self.transport, self.log_file, now=now,
                              since=now - self.quiet_period, tz=self.log_zone,
                              lines=self.log_lines)

    # --- changes -------------------------------------------------------------------------
    def route_to_rental(self, user: str, smtp_host: str, port: int) -> None:
        key = f"{check_user(user)}@{self.domain}"
        target = check_relay(smtp_host, port)
        with self._change(f"route {user} to the rental") as saved:
            # Accept first, then forward: at no moment is a forwarded user answered 550.
            self._edit_map(RECIPIENT_MAP, saved, {key: "OK"})
            self._edit_map(TRANSPORT_MAP, saved, {key: target})
            self._reference(saved, {"transport_maps": transport_map_ref(self.config_dir)})

    def route_to_onprem(self, user: str) -> None:
        key = f"{check_user(user)}@{self.domain}"
        if user in self._removed():
            # Local delivery would start a fresh Maildir that observe does not count (the
            # user is on the removed list): mail nobody reads. Restore the mailbox first.
            raise PostfixError(
                f"{user}'s onprem mailbox was archived by mailrec: restore it first (rename "
                f"the {ARCHIVE_INFIX}* directory back, remove {user} from "
                f"{self._path(REMOVED_LIST)}), then route it back"
            )
        with self._change(f"route {user} back to onprem") as saved:
            # Stop forwarding first, then stop accepting without an account.
            self._edit_map(TRANSPORT_MAP, saved, {key: None})
            self._edit_map(RECIPIENT_MAP, saved, {key: None})

    def enable_recipient_map(self) -> None:
        with self._change("enable mailrec's recipient map") as saved:
            # Both tables must exist (compiled) before main.cf names them, or every lookup
            # fails and Postfix defers all mail.
            self._edit_map(RECIPIENT_MAP, saved, {})
            self._edit_map(TRANSPORT_MAP, saved, {})
            self._reference(saved, {
                "local_recipient_maps": recipient_map_ref(self.config_dir),
                "transport_maps": transport_map_ref(self.config_dir),
            })

    def remove_mailbox(self, user: str) -> None:
        """Archive the drained mailbox; the Unix account stays (see docs/onprem-postfix.md).

        Deleting accounts on a production host is not mailrec's job (they may own files,
        cron jobs, other services), and it is not needed: the address is forwarded to the
        rental and accepted through mailrec's recipient map, so the account receives nothing
        any more. The empty mailbox is renamed aside and the user put on `mailrec_removed`,
        which observe honours: to mailrec the user has no onprem mailbox.
        """
        check_user(user)
        present = self._managed()
        removed = self._removed(present)
        if user in removed:
            return
        found = self.transport.run(["getent", "passwd", user], check=False)
        if found.exit_status == 2:  # getent: no such key
            return
        if not found.ok:
            raise PostfixError(f"getent passwd {user} exited {found.exit_status}")
        homes = self._homes(found.text)
        if user not in homes:
            return  # not a mail user (system uid range): nothing mailrec counts
        forwarded = users_in_map(self._dump_map(TRANSPORT_MAP, present), self.domain)
        if user not in forwarded:
            raise PostfixError(
                f"{user} is not forwarded to the rental: archiving the onprem mailbox now "
                f"would hide the mail still delivered there (route inbound/{user} first)"
            )
        held = self._count({user: homes[user]})[user]
        if held:
            raise PostfixError(
                f"MR008: the onprem mailbox of {user} still holds {held} message(s): let the "
                "user drain it (POP) or archive it first"
            )
        location = self.mailbox.path_for(user, homes[user])
        archived = "-"
        exists = self.transport.run(["test", "-e", location], check=False)
        if exists.exit_status > 1:
            raise PostfixError(f"test -e {location} exited {exists.exit_status}")
        if exists.ok:
            stamp = clock.wall().strftime("%Y%m%dT%H%M%SZ")
            archived = safe_path(f"{location}{ARCHIVE_INFIX}{stamp}")
            self._run(f"archive {location}", ["mv", "-T", "--", location, archived])
        # Renamed first, listed second: a failure in between leaves an account without a
        # mailbox, which the next run lists; never a listed user whose mail is still there.
        removed[user] = archived
        self._write(REMOVED_LIST, format_map(removed, REMOVED_LIST).encode(), backup=True)

    def retire(self) -> None:
        """Stop this Postfix for good, once the planner's MR010 gate is open.

        Written: the marker DIR/mailrec_retired, then `postfix -c DIR stop`. A stopped
        server refuses connections, so a sender still using the old MX keeps its message
        queued, retries, and finds the rental at its next MX lookup: nothing bounces. Removing
        the domain from mydestination instead would answer 5xx, a bounce. Refused while the
        queue holds messages (they would be stuck). Undo: remove the marker and start Postfix.
        """
        queue = self._postconf(["queue_directory"])["queue_directory"]
        try:
            queues = [safe_path(f"{queue}/{name}")
                      for name in ("maildrop", "incoming", "active", "deferred", "hold")]
        except UnsafePathError as exc:
            raise PostfixError(f"queue_directory: {exc}") from None
        waiting = self._run("look at the queue", ["find", *queues, "-type", "f", "-print",
                                                  "-quit"])
        if waiting.text.strip():
            raise PostfixError(
                f"the onprem queue still holds messages (postqueue -c {self.config_dir} -p): "
                "retiring would strand them; let them be delivered (postqueue -c "
                f"{self.config_dir} -f) or moved first"
            )
        stamp = clock.wall().isoformat()
        self._write(
            RETIRED_MARKER,
            f"retired by mailrec at {stamp}: Postfix stopped; to undo, remove this file and "
            f"run postfix -c {self.config_dir} start\n".encode(),
            backup=False,
        )
        if self._running():
            self._run("postfix stop", self._command("postfix", "stop"))

    # --- the change discipline -----------------------------------------------------------
    def _write(self, name: str, data: bytes, *, backup: bool) -> None:
        try:
            self.transport.write_file_atomic(self._path(name), data, backup=backup)
        except TransportError as exc:
            raise PostfixError(f"write {name}: {exc}") from exc

    def _postmap(self, path: str) -> None:
        self._run(f"postmap {path}", self._command("postmap", f"hash:{path}"))

    def _edit_map(
        self, name: str, saved: list[_Saved], changes: Mapping[str, str | None]
    ) -> None:
        """Rewrite one managed map with `changes` (None removes a key) and compile it."""
        path = self._path(name)
        old = self.transport.read_file(path)
        text = edit_map(old.decode("utf-8", "replace") if old else "", changes, name)
        saved.append(_Saved(path, old, compiled=True))
        # Written and compiled even when unchanged: a source someone edited without running
        # postmap would otherwise keep disagreeing with the table Postfix reads.
        self.transport.write_file_atomic(path, text.encode())
        self._postmap(path)

    def _reference(self, saved: list[_Saved], wanted: Mapping[str, str]) -> None:
        """Make main.cf's map lists name mailrec's maps (postconf -e), if they do not."""
        current = self._postconf(wanted)
        changes: dict[str, str] = {}
        for name, ref in wanted.items():
            value = current[name]
            if name == "local_recipient_maps" and not value.strip():
                continue  # accepts every address already (see _validates)
            new = with_map(value, ref)
            if new != value:
                changes[name] = check_map_list(name, new)
        if not changes:
            return
        main_cf = self._path("main.cf")
        old = self.transport.read_file(main_cf)
        if old is None:
            raise PostfixError(f"{main_cf} does not exist")
        self.transport.write_file_atomic(main_cf + ".bak", old, backup=False)
        saved.append(_Saved(main_cf, old, compiled=False))
        self._run(
            "postconf -e",
            self._command("postconf", "-e", *(f"{k}={v}" for k, v in changes.items())),
        )
        written = self._postconf(changes)
        if written != changes:
            raise PostfixError(f"main.cf reads back {written}, expected {changes}")

    def _check_and_reload(self) -> None:
        for action in ("check", "reload"):
            result = self.transport.run(self._command("postfix", action), check=False)
            if not result.ok:
                detail = self.transport.mask(result.stderr.decode("utf-8", "replace").strip())
                raise PostfixError(
                    f"postfix -c {self.config_dir} {action} exited {result.exit_status}: "
                    + (detail[-400:] or f"no output; see the mail log {self.log_file}")
                )

    @contextlib.contextmanager
    def _change(self, what: str) -> Iterator[list[_Saved]]:
        saved: list[_Saved] = []
        try:
            yield saved
            self._check_and_reload()
        except (TransportError, PostfixError, UnsafePathError) as exc:
            problems = self._restore(saved)
            restored = ", ".join(dict.fromkeys(s.path for s in saved)) or "nothing written"
            note = (
                f"; restoring failed too: {'; '.join(problems)}" if problems
                else f"; restored: {restored}"
            )
            raise PostfixError(f"{self.transport.host}: {what} failed: {exc}{note}") from exc

    def _restore(self, saved: list[_Saved]) -> list[str]:
        """Put back every file a failed change wrote, newest first; returns what failed."""
        problems: list[str] = []
        done: set[str] = set()
        for item in reversed(saved):
            if item.path in done:
                continue
            done.add(item.path)
            # A file written twice is restored once, to its content before the change.
            first = next(s for s in saved if s.path == item.path)
            try:
                if first.content is None:
                    # A new map is left empty rather than deleted: main.cf may name it.
                    name = posixpath.basename(item.path)
                    data = format_map({}, name).encode()
                else:
                    data = first.content
                self.transport.write_file_atomic(item.path, data, backup=False)
                if item.compiled:
                    self._postmap(item.path)
            except (TransportError, PostfixError) as exc:
                problems.append(f"{item.path}: {exc}")
        return problems


def _refs(value: str) -> list[str]:
    return value.replace(",", " ").split()
