"""The onprem Postfix on a real host, over a `Transport` (SSH with pinned host keys, or local).

Where it sits: the onprem driver of a real installation (`drivers/backend.py` builds it from
`onprem.connect`); `LabOnprem` is its twin on the lab's files. Both read with the pure parsers
of `drivers/postfix.py` and give the same `PostfixFacts`, so the planner cannot tell them
apart.

Observation is a constant number of commands, whatever the number of users or aliases
(DESIGN.md 2); only the number of tables main.cf names changes it:
  find DIR -maxdepth 1 -name 'mailrec_*'     which managed files exist
  postconf -c DIR -x SPACE_PARAMS...         one call, $parameters expanded (no -x before
                                             Postfix 2.10: all of `postconf`, expanded here)
  getent passwd
  postmap -c DIR -s hash:DIR/mailrec_transport    (skipped while the map does not exist)
  postmap -c DIR -s hash:DIR/mailrec_recipients   (same)
  postmap -c DIR -s hash:DIR/mailrec_virtual      (same)
  read DIR/mailrec_removed                   (if it exists)
  read /etc/login.defs                       (unless onprem.uid_range is set)
  read MYORIGIN_FILE                         (only if myorigin is a path: /etc/mailname)
  postalias -c DIR -s TYPE:PATH              per alias_maps table    } drivers/postfix_space
  postmap -c DIR -s TYPE:PATH                per virtual alias table }
  sh -c '{ find ...; } | uniq -c'            one scan of all mailboxes (people, accounts
                                             outside the uid range, archived users)
  sh -c LOG_SCRIPT                           the mail log back to the quiet period's start
  postfix -c DIR status                      (only once retired: is it really stopped?)

The forward-path probe (`probe_forward`, once, before the first user is forwarded) adds the
entry `mailrec-probe@DOMAIN smtp:[rental]:port` under the change discipline, submits one
message with the null sender (`sendmail -C DIR -f <> -oi -- mailrec-probe@DOMAIN`), reads the
mail log for its outcome (`grep -F` for its message-id and delivery lines: at most
len(PROBE_WAITS) looks over ~30 s), deletes a probe still queued (`postsuper -c DIR -d ID`),
and removes the entry again, whatever happened (see docs/onprem-postfix.md).

Forwarding every name. local(8) delivers for every name of mydestination, so a migrated user
is forwarded under each: `user@NAME smtp:[rental]:port` (mailrec_transport) and `user@NAME OK`
(mailrec_recipients) for the domain and every NAME, and `user@NAME user@domain`
(mailrec_virtual, in virtual_alias_maps) for every NAME but the domain. Real mail proved each
part necessary (tests/integration/test_onprem_addresses.py, myorigin = $myhostname):
- aliases(5) `info: suga` and virtual `sales@ -> suga` give bare `suga`, which Postfix
  completes to suga@$myorigin = suga@mail.example.co.jp. local(8) resolves each alias member
  as trivial-rewrite does, transport_maps included; a member whose transport is not local(8)
  is not delivered but forwarded (re-submitted through cleanup). Without the transport entry
  for suga@mail.example.co.jp, `info` was delivered to the old Maildir (relay=local).
- The forwarded copy then carries suga@mail.example.co.jp, which the rental (hosting
  user@domain only) refused: 554 Relay access denied, 501 for suga@localhost: bounces.
  cleanup applies virtual_alias_maps to forwarded mail too, so mailrec_virtual rewrites it
  to suga@domain before the transport lookup; smtp_generic_maps is not needed (it would
  also rewrite every sender address onprem sends out).
- Direct mail to suga@mail.example.co.jp, suga@localhost, suga+tag@ and SUGA@ takes the same
  path (table lookups ignore case and try the address without its +extension).
The rewrite must be live before any other name is forwarded: route_to_rental writes and
compiles mailrec_virtual, and (the first time) names it in virtual_alias_maps and reloads,
before it writes the transport entries. (A cleanup process finishes the message in hand with
the table it had open: a message to user@NAME received while both maps change, and still in
cleanup after the transport map is compiled, could reach the rental unrewritten. The window
is the few round trips between the two postmaps, once per user.)

Every change follows the discipline of `postfix_change.PostfixChanges`: map sources written
atomically with a `.bak` and compiled, main.cf changed only with `postconf -e`/`-X` after a
`.bak`, then `postfix check` and `postfix reload`; on any failure every file the change wrote
is put back. User names are held to `USER_NAME_RE`, paths to `safe_path`, and every command
is an argv list that the transport quotes part by part; the shell scripts are constants.

Every Postfix command names the instance's config directory (`postconf -c DIR`, `postmap -c
DIR`, `postalias -c DIR`, `postfix -c DIR`, `postsuper -c DIR`, `sendmail -C DIR`, and so
would postqueue): without it
they read the system's /etc/postfix/main.cf, which is another instance on a multi-instance
host and does not exist at all where Postfix was installed with "No configuration"
(`postmap: fatal: open /etc/postfix/main.cf`). tests/test_postfix_commands.py holds every
driver command to it.
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo

from reconciler import clock
from reconciler.drivers.postfix import (
    RECIPIENT_MAP,
    TRANSPORT_MAP,
    VIRTUAL_MAP,
    PostfixError,
    PostfixFacts,
    format_map,
    forward_keys,
    parse_accounts,
    parse_map,
    parse_passwd,
    partial_forwards,
    points_at_rental,
    recipient_map_ref,
    relay_target,
    transport_map_ref,
    users_in_map,
    virtual_map_ref,
)
from reconciler.drivers.postfix_change import (
    DropUser,
    PostfixChanges,
    refs,
)
from reconciler.drivers.postfix_change import (
    check_map_list as check_map_list,  # re-exported: tests and callers use it from here
)
from reconciler.drivers.postfix_log import (
    ProbeOutcome,
    probe_log_argv,
    probe_outcome,
    read_last_mail,
)
from reconciler.drivers.postfix_mailbox import MailboxSpec, count_mailboxes
from reconciler.drivers.postfix_names import SPACE_PARAMS, parse_domain_list
from reconciler.drivers.postfix_space import (
    POSTFIX_PROGRAMS as POSTFIX_PROGRAMS,  # re-exported: tests hold every command to it
)
from reconciler.drivers.postfix_space import (
    SpaceReader,
    mailbox_homes,
)
from reconciler.model import USER_NAME_RE, Onprem
from reconciler.transport import (
    Transport,
    TransportError,
    UnsafePathError,
    safe_path,
)

REMOVED_LIST: Final = "mailrec_removed"  # users whose onprem mailbox mailrec archived
RETIRED_MARKER: Final = "mailrec_retired"  # written by retire(), before Postfix is stopped
ARCHIVE_INFIX: Final = ".mailrec-removed-"  # Maildir -> Maildir.mailrec-removed-<UTC time>
_HOSTNAME_RE: Final = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
# What a seed-style half migration used to hand unknown local names to the rental.
FALLBACK_PARAMS: Final = ("fallback_transport", "luser_relay")
PROBE_LOCAL_PART: Final = "mailrec-probe"  # probe_forward's address: mailrec-probe@DOMAIN
# Seconds before each look at the mail log for the probe's outcome (~30 s in all).
PROBE_WAITS: Final = (1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 7.0)
_QUEUE_ID_RE: Final = re.compile(r"^[0-9A-Za-z]{5,32}$")


def managed_files(listing: str) -> frozenset[str]:
    """Names printed by `find DIR -maxdepth 1 -name 'mailrec_*' -printf '%f\\n'`."""
    return frozenset(line.strip() for line in listing.splitlines() if line.strip())


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


class PostfixHost(PostfixChanges):
    """The onprem Postfix behind `transport`; same methods and facts as `LabOnprem`."""

    def __init__(
        self, transport: Transport, domain: str, onprem: Onprem, *,
        quiet_period: timedelta = timedelta(hours=48),
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
        # The log is read back to the start of the quiet period (MR010).
        self.quiet_period = quiet_period
        self.sleep: Callable[[float], None] = time.sleep  # between looks at the log (probe)

    def __repr__(self) -> str:
        return f"<PostfixHost {self.transport.host} {self.config_dir}>"

    # --- small helpers -------------------------------------------------------------------
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

    def _reader(self) -> SpaceReader:
        return SpaceReader(self.transport, self.config_dir)

    def _count(self, homes: Mapping[str, str]) -> dict[str, int]:
        return count_mailboxes(self.transport, self.mailbox, homes)

    def _local_names(self) -> tuple[str, ...]:
        """Every name local(8) delivers for (mydestination expanded), read at change time."""
        value = self._postconf(["mydestination"], expand=True)["mydestination"]
        return parse_domain_list(value)[0]

    # --- observe -------------------------------------------------------------------------
    def observe(self, now: datetime) -> PostfixFacts:
        present = self._managed()
        params = self._postconf(SPACE_PARAMS, expand=True)
        passwd = self._run("getent passwd", ["getent", "passwd"]).text
        transport = self._dump_map(TRANSPORT_MAP, present)
        recipients = self._dump_map(RECIPIENT_MAP, present)
        virtual = self._dump_map(VIRTUAL_MAP, present)
        removed = self._removed(present)
        reader = self._reader()
        uid_range = reader.uid_range(self.uid_range)
        own_virtual = virtual_map_ref(self.config_dir)
        space = reader.read(params, self.domain, uid_range=uid_range, own_tables={own_virtual})
        # An archived mailbox's account still exists (see remove_mailbox); to mailrec it has
        # no onprem mailbox any more, but its mailbox location is counted again: mail there
        # means local delivery recreated it (stray mail). One scan counts all three groups.
        homes = mailbox_homes(parse_accounts(passwd), uid_range, removed, self.mailbox)
        counts = self._count(homes.all())
        space = replace(
            space,
            other_accounts={n: counts.get(n, 0) for n in homes.others},
            stray_mail={n: counts[n] for n in homes.strays if counts.get(n)},
        )
        # Entries only route mail while transport_maps names the map.
        forwarded = (
            users_in_map(transport, self.domain)
            if transport_map_ref(self.config_dir) in refs(params["transport_maps"])
            else {}
        )
        retired = RETIRED_MARKER in present and not self._running()
        return PostfixFacts(
            accounts={n: counts.get(n, 0) for n in homes.people},
            transport=forwarded,
            recipients=users_in_map(recipients, self.domain),
            recipient_validation=self._validates(params["local_recipient_maps"]),
            last_mail_at=self._last_mail(now),
            retired=retired,
            space=space,
            partial_forward=partial_forwards(
                forwarded, domain=self.domain, names=space.local_domains,
                transport=transport, recipients=recipients, virtual=virtual,
                rewriting=own_virtual in refs(params["virtual_alias_maps"]),
            ),
        )

    def _validates(self, value: str) -> bool:
        # An empty local_recipient_maps makes smtpd accept every local address (unknown ones
        # bounce later): nothing is answered 550, so MR007 holds without mailrec's map.
        return not value.strip() or recipient_map_ref(self.config_dir) in refs(value)

    def _running(self) -> bool:
        try:
            result = self.transport.run(self._command("postfix", "status"), check=False)
        except TransportError as exc:
            raise PostfixError(f"postfix status: {exc}") from exc
        return result.ok

    def _last_mail(self, now: datetime) -> datetime | None:
        return read_last_mail(self.transport, self.log_file, now=now,
                              since=now - self.quiet_period, tz=self.log_zone)

    # --- the forward-path probe ----------------------------------------------------------
    def probe_forward(self, smtp_host: str, port: int) -> str:
        """Prove the path forwarded mail will take: one message, through this Postfix, by
        the very transport `route_to_rental` writes (`smtp:[host]:port`, which bypasses any
        relayhost). The rental's SMTP answer, accepted or 5xx (the probe address need not
        exist there), proves it; a deferral (no connection, a 4xx) or no delivery attempt
        within ~30 s is a PostfixError. The probe entry is removed at the end whatever
        happens; a probe still queued is deleted. Returns what was proven, in one line."""
        target = check_relay(smtp_host, port)
        probe = f"{PROBE_LOCAL_PART}@{self.domain}"
        token = f"{clock.wall():%Y%m%dT%H%M%SZ}.{secrets.token_hex(6)}"
        message_id = f"{PROBE_LOCAL_PART}.{token}@{self.domain}"
        with self._change(f"add the probe entry {probe} {target}") as change:
            self._edit_map(TRANSPORT_MAP, change, {probe: target})
            # Entries route mail only while main.cf names the map (kept named afterwards, as
            # enable_recipient_map names it anyway).
            self._reference(change, {"transport_maps": transport_map_ref(self.config_dir)})
        try:
            proven = self._send_probe(probe, target, token, message_id, port)
        except BaseException as exc:
            self._drop_probe_entry(probe, after=exc)
            raise
        self._drop_probe_entry(probe)
        return proven

    def _send_probe(self, probe: str, target: str, token: str, message_id: str,
                    port: int) -> str:
        message = (
            f"From: mailrec <{probe}>\n"
            f"To: <{probe}>\n"
            f"Subject: mailrec forward-path probe {token}\n"
            f"Message-ID: <{message_id}>\n"
            f"Date: {email.utils.format_datetime(clock.wall())}\n"
            "Auto-Submitted: auto-generated\n"
            "\n"
            f"mailrec sent this probe from the onprem Postfix by {target}, the transport\n"
            "migrated users' mail will be forwarded by. A refusal proves the path as well\n"
            "as a delivery; nothing needs to be done with it.\n"
        )
        self._run(f"submit the probe to {probe}",
                  self._command("sendmail", "-f", "<>", "-oi", "--", probe),
                  input=message.encode())
        outcome = ProbeOutcome()
        for wait in PROBE_WAITS:
            self.sleep(wait)
            outcome = self._probe_outcome(message_id, probe)
            if outcome.status is not None:
                break
        if outcome.proves_path(port):
            return (f"a probe from onprem to <{probe}> by {target} reached the rental: "
                    f"status={outcome.status}, relay={outcome.relay} "
                    f"({outcome.reason[:200]})")
        waited = sum(PROBE_WAITS)
        if outcome.status is None:
            seen = (f"no delivery attempt of the probe {outcome.queue_id} was logged within "
                    f"{waited:.0f} s (a firewall that drops the connection makes it time out)"
                    if outcome.queue_id else
                    f"the probe did not show up in the mail log {self.log_file} within "
                    f"{waited:.0f} s (is pickup running, is the log the right file?)")
        else:
            seen = (f"the probe {outcome.queue_id} was {outcome.status}, relay="
                    f"{outcome.relay or '?'} ({self.transport.mask(outcome.reason)[:300]})")
        if outcome.queue_id and outcome.status in (None, "deferred"):
            seen += self._delete_probe(outcome.queue_id)
        raise PostfixError(
            f"{self.transport.host}: the path onprem -> rental does not work: {seen}. Mail "
            f"forwarded by {target} would wait in onprem's queue until it bounces: open "
            f"tcp/{port} from this host to the rental (firewall, router), "
            "or, if this network requires a relayhost, route through it first (transport "
            "entries smtp:[host]:port bypass relayhost)"
        )

    def _probe_outcome(self, message_id: str, probe: str) -> ProbeOutcome:
        """One look at the mail log (one command)."""
        try:
            argv = probe_log_argv(self.log_file, message_id, probe)
            result = self.transport.run(argv, check=False)
        except (TransportError, UnsafePathError) as exc:
            raise PostfixError(f"read the mail log {self.log_file}: {exc}") from exc
        if result.exit_status > 1:  # 1: no line yet
            detail = self.transport.mask(result.stderr.decode("utf-8", "replace").strip())
            raise PostfixError(f"cannot read the mail log {self.log_file} (set "
                               f"onprem.log_file to where this host logs Postfix): "
                               f"{detail[-300:]}")
        return probe_outcome(result.text, message_id, probe)

    def _delete_probe(self, queue_id: str) -> str:
        """Take a probe that would retry out of the queue; a note for the error."""
        if not _QUEUE_ID_RE.match(queue_id):
            return f"; queue id {queue_id!r} not deleted (unexpected form)"
        argv = self._command("postsuper", "-d", queue_id)
        try:
            result = self.transport.run(argv, check=False)
        except TransportError as exc:
            return f"; deleting it from the queue failed: {exc}"
        if not result.ok:
            detail = self.transport.mask(result.stderr.decode("utf-8", "replace").strip())
            return (f"; postsuper -c {self.config_dir} -d {queue_id} exited "
                    f"{result.exit_status}: {detail[-200:]}")
        return f"; deleted from the queue (postsuper -d {queue_id})"

    def _drop_probe_entry(self, probe: str, *, after: BaseException | None = None) -> None:
        """Remove the probe's transport entry (under the change discipline). After a failed
        probe, a failure here is told together with the probe's."""
        try:
            with self._change(f"remove the probe entry {probe}") as change:
                self._edit_map(TRANSPORT_MAP, change, {probe: None})
        except PostfixError as exc:
            if after is None:
                raise
            raise PostfixError(f"{after}; and removing the probe entry failed too: {exc} "
                               f"(remove {probe} from {self._path(TRANSPORT_MAP)} and run "
                               "postmap)") from after

    # --- changes -------------------------------------------------------------------------
    def route_to_rental(self, user: str, smtp_host: str, port: int) -> None:
        """Forward every name of the user: user@NAME for the domain and each name of
        mydestination (see the module docstring for why each map is needed)."""
        check_user(user)
        target = check_relay(smtp_host, port)
        home = f"{user}@{self.domain}"
        with self._change(f"route {user} to the rental") as change:
            keys = forward_keys(user, self.domain, self._local_names())
            rewrites: dict[str, str | None] = {key: home for key in keys if key != home}
            # Accept first, then rewrite, then forward: at no moment is a forwarded name
            # answered 550, or handed to a rental that does not know it.
            self._edit_map(RECIPIENT_MAP, change, dict.fromkeys(keys, "OK"))
            if rewrites or VIRTUAL_MAP in self._managed():
                self._edit_map(VIRTUAL_MAP, change, rewrites)
            if rewrites and self._reference(
                change, {"virtual_alias_maps": virtual_map_ref(self.config_dir)}
            ):
                # Running daemons must rewrite before any other name is forwarded.
                self._check_and_reload()
                change.reloaded = True
            self._edit_map(TRANSPORT_MAP, change, dict.fromkeys(keys, target))
            self._reference(change, {"transport_maps": transport_map_ref(self.config_dir)})

    def route_to_onprem(self, user: str) -> None:
        check_user(user)
        if user in self._removed():
            # Local delivery would start a fresh Maildir that observe does not count (the
            # user is on the removed list): mail nobody reads. Restore the mailbox first.
            raise PostfixError(
                f"{user}'s onprem mailbox was archived by mailrec: restore it first (rename "
                f"the {ARCHIVE_INFIX}* directory back, remove {user} from "
                f"{self._path(REMOVED_LIST)}), then route it back"
            )
        with self._change(f"route {user} back to onprem") as change:
            # Every form of the user (user@ANY: names since dropped from mydestination too).
            # Stop forwarding first, then stop rewriting, then stop accepting.
            self._edit_map(TRANSPORT_MAP, change, DropUser(user))
            if VIRTUAL_MAP in self._managed():
                self._edit_map(VIRTUAL_MAP, change, DropUser(user))
            self._edit_map(RECIPIENT_MAP, change, DropUser(user))

    def enable_recipient_map(self) -> None:
        with self._change("enable mailrec's maps") as change:
            # Every table must exist (compiled) before main.cf names it, or every lookup
            # fails and Postfix defers all mail.
            self._edit_map(RECIPIENT_MAP, change, {})
            self._edit_map(VIRTUAL_MAP, change, {})
            self._edit_map(TRANSPORT_MAP, change, {})
            self._reference(change, {
                "local_recipient_maps": recipient_map_ref(self.config_dir),
                "virtual_alias_maps": virtual_map_ref(self.config_dir),
                "transport_maps": transport_map_ref(self.config_dir),
            })

    def remove_fallback(self, *rental_hosts: str) -> tuple[str, ...]:
        """Undo a seed-style half migration: `fallback_transport` / `luser_relay` that hand
        every name without an account to the rental (`rental_hosts`: its smtp_host and MX
        host, e.g. `remove_fallback(rental.smtp_host, rental.mx_host)`).

        Only a parameter that points at the rental is removed (`postconf -X`, under the
        change discipline); one that points elsewhere is the admin's and stays. Returns the
        names removed. Mail to a name with no account and no entry of its own bounces
        afterwards (local: unknown user): forward every user who receives at the rental
        through mailrec (inbound/USER) first.
        """
        if not rental_hosts:
            raise PostfixError("remove_fallback: name the rental's hosts")
        for host in rental_hosts:
            check_relay(host.rstrip("."), 25)
        current = self._postconf(FALLBACK_PARAMS, expand=True)
        remove = tuple(name for name in FALLBACK_PARAMS
                       if current[name] and points_at_rental(name, current[name], rental_hosts))
        if not remove:
            return ()
        with self._change(f"remove {' and '.join(remove)}") as change:
            self._backup_main_cf(change)
            self._run("postconf -X", self._command("postconf", "-X", *remove))
            left = {k: v for k, v in self._postconf(remove, expand=True).items() if v}
            if left:
                raise PostfixError(f"main.cf still reads {left} after postconf -X")
        return remove

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
        homes = {name: str(home) for name, home in parse_passwd(
            found.text, self._reader().uid_range(self.uid_range)).items()}
        if user not in homes:
            return  # not a mail user (system uid range): nothing mailrec counts
        transport = self._dump_map(TRANSPORT_MAP, present)
        forwarded = users_in_map(transport, self.domain)
        if user not in forwarded:
            raise PostfixError(
                f"{user} is not forwarded to the rental: archiving the onprem mailbox now "
                f"would hide the mail still delivered there (route inbound/{user} first)"
            )
        maps = self._postconf(["virtual_alias_maps"], expand=True)["virtual_alias_maps"]
        if partial_forwards(
            {user: forwarded[user]}, domain=self.domain, names=self._local_names(),
            transport=transport, recipients=self._dump_map(RECIPIENT_MAP, present),
            virtual=self._dump_map(VIRTUAL_MAP, present),
            rewriting=virtual_map_ref(self.config_dir) in refs(maps),
        ):
            raise PostfixError(
                f"{user} is forwarded as {user}@{self.domain} but not under every name this "
                "host delivers for (mydestination): mail to the others would land in a new "
                f"mailbox nobody reads (route inbound/{user} again first)"
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

