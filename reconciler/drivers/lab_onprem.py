"""The lab's onprem Postfix: the same files a real host has (main.cf, map sources, passwd,
Maildirs, the mail log and its rotations) under `<lab>/onprem`, read with the real parsers.

A change writes the files atomically with a `.bak` of the previous content, as the SSH driver
does on a real host; there is no `postmap`/`postfix reload` to run in the lab. Like the real
driver, removing a drained mailbox archives it (the Maildir renamed
`Maildir.mailrec-removed-<UTC>`, the user listed in `mailrec_removed`): the account and its
home stay.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import smtplib
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path

from reconciler import clock
from reconciler.drivers.postfix import (
    RECIPIENT_MAP,
    TRANSPORT_MAP,
    VIRTUAL_MAP,
    AddressSpace,
    PostfixError,
    PostfixFacts,
    edit_map,
    format_map,
    forward_keys,
    parse_main_cf,
    parse_map,
    partial_forwards,
    passwd_homes,
    points_at_rental,
    recipient_map_ref,
    relay_target,
    set_main_cf,
    transport_map_ref,
    users_in_map,
    virtual_map_ref,
    with_map,
)
from reconciler.drivers.postfix_host import ARCHIVE_INFIX, FALLBACK_PARAMS, REMOVED_LIST
from reconciler.drivers.postfix_log import read_local_logs, rotations
from reconciler.drivers.postfix_mailbox import count_maildir
from reconciler.drivers.postfix_names import SPACE_PARAMS, expand_params, parse_domain_list
from reconciler.drivers.postfix_space import SpaceReader
from reconciler.lab.layout import LabLayout
from reconciler.model import USER_NAME_RE
from reconciler.transport import CommandResult, LocalTransport


def write_atomic(path: Path, text: str, *, backup: bool = True) -> None:
    """Temp file in the same directory, fsync, keep a .bak, rename over: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if backup and path.exists():
            shutil.copy2(path, path.with_name(path.name + ".bak"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Postfix's defaults for the parameters observe reads (postconf -d), so a lab main.cf that
# leaves one out reads as a real host's would.
POSTFIX_DEFAULTS = {
    "mydestination": "$myhostname, localhost.$mydomain, localhost",
    "myorigin": "$myhostname",
    "alias_maps": "hash:/etc/aliases",
    "virtual_alias_maps": "$virtual_maps",
    "virtual_alias_domains": "$virtual_alias_maps",
    "local_recipient_maps": "proxy:unix:passwd.byname $alias_maps",
}


class LabSpaceReader(SpaceReader):
    """The address space of the lab's pretend host: its files are under `<lab>/onprem`, and
    a table's compiled form is its source (the lab runs no postmap/postalias; their `-s`
    listing has the source's `key value` lines)."""

    def __init__(self, root: Path, config_dir: str) -> None:
        super().__init__(LocalTransport(), config_dir)
        self.root = root

    def _file(self, path: str) -> Path | None:
        if not path.startswith("/") or ".." in path.split("/"):
            return None
        return self.root / path.lstrip("/")

    def _read(self, path: str) -> bytes | None:
        file = self._file(path)
        return file.read_bytes() if file is not None and file.is_file() else None

    def _list(self, program: str, table: str) -> CommandResult:
        _, _, path = table.partition(":")
        data = self._read(path)
        argv = (program, "-s", table)
        if data is None:
            return CommandResult(argv, 1, b"", f"open {path}: No such file".encode())
        return CommandResult(argv, 0, data, b"")


class LabOnprem:
    def __init__(self, layout: LabLayout, domain: str, config_dir: str = "/etc/postfix", *,
                 quiet_period: timedelta = timedelta(hours=48), log_zone: tzinfo = UTC,
                 rental_smtp: str | None = None,
                 uid_range: tuple[int, int] | None = None) -> None:
        self.layout = layout
        # People's uids: onprem.uid_range; None: the lab host's /etc/login.defs says, else
        # mailrec's default (as the real driver decides, `SpaceReader.uid_range`).
        self.uid_range = uid_range
        # host:port of the lab rental's SMTP server while `lab up` runs it (services.json):
        # where the state's rental.smtp_host is, in the lab's network.
        self.rental_smtp = rental_smtp
        self.domain = domain
        self.config_dir = config_dir  # as main.cf names it on the (pretend) host
        self.quiet_period = quiet_period  # the log is read back to its start (MR010)
        self.log_zone = log_zone  # of the log's classic syslog stamps

    @property
    def _etc(self) -> Path:
        return self.layout.postfix_dir

    def _passwd_path(self) -> Path:
        return self.layout.onprem / "etc" / "passwd"

    def _home(self, home: Path) -> Path | None:
        # Homes are absolute paths on the pretend host; in the lab they live under onprem/.
        # A home that is not a plain absolute path (root-relative, with '..') has no mailbox
        # the lab could hold: it would lie outside the lab.
        text = str(home)
        if not text.startswith("/") or posixpath.normpath(text) != text or text == "/":
            return None
        return self.layout.onprem / home.relative_to("/")

    def _maildir(self, home: Path) -> Path | None:
        base = self._home(home)
        return None if base is None else base / "Maildir"

    def _counter(self) -> Callable[[str], int]:
        """Messages in the Maildir of a home as passwd writes it (`_maildir`'s Maildir,
        counted by `count_maildir`), for observing every account at once: a plain home
        (absolute, normalised, as Path would print it) becomes a string path with no Path
        built; any other home goes the Path way of `_maildir`, whatever it decides."""
        onprem = str(self.layout.onprem)
        normpath = posixpath.normpath

        def count(home: str) -> int:
            if home.startswith("/") and not home.startswith("//") and home != "/" and (
                    normpath(home) == home):
                return count_maildir(f"{onprem}{home}/Maildir")
            maildir = self._maildir(Path(home))
            return 0 if maildir is None else count_maildir(maildir)

        return count

    def _accounts(self) -> tuple[dict[str, str], dict[str, str]]:
        """People (uids in the range `_uids` gives) and every other account, with homes as
        passwd writes them."""
        try:
            text = self._passwd_path().read_text()
        except FileNotFoundError as exc:
            raise PostfixError(
                f"lab onprem: {exc.filename} is missing (run mailrec lab init)"
            ) from None
        return passwd_homes(text, self._uids())

    def _reader(self) -> LabSpaceReader:
        return LabSpaceReader(self.layout.onprem, self.config_dir)

    def _uids(self) -> tuple[int, int]:
        return self._reader().uid_range(self.uid_range)

    def _removed(self) -> dict[str, str]:
        """Users whose mailbox mailrec archived -> where (the real driver's list)."""
        return parse_map(self._read(REMOVED_LIST))

    def observe(self, now: datetime) -> PostfixFacts:
        try:
            main_cf = parse_main_cf((self._etc / "main.cf").read_text())
        except FileNotFoundError as exc:
            raise PostfixError(
                f"lab onprem: {exc.filename} is missing (run mailrec lab init)"
            ) from None
        people, others = self._accounts()
        transport = parse_map(self._read(TRANSPORT_MAP))
        recipients = parse_map(self._read(RECIPIENT_MAP))
        removed = self._removed()
        # An archived mailbox's account stays: to mailrec it has no onprem mailbox any more,
        # but mail that reaches a Maildir there again (local delivery recreated it) is stray.
        count = self._counter()
        accounts = {name: count(home) for name, home in people.items() if name not in removed}
        stray = {name: held for name, home in people.items()
                 if name in removed and (held := count(home))}
        other_mail = {name: count(home) for name, home in others.items()}
        forwarded = users_in_map(transport, self.domain)
        space = self._space(stray_mail=stray, other_accounts=other_mail)
        virtual_refs = self._params()["virtual_alias_maps"].replace(",", " ").split()
        partial = partial_forwards(
            forwarded, domain=self.domain.lower(), names=space.local_domains,
            transport=transport, recipients=recipients, virtual=parse_map(self._read(VIRTUAL_MAP)),
            rewriting=virtual_map_ref(self.config_dir) in virtual_refs)
        return PostfixFacts(
            accounts=accounts,
            transport=forwarded,
            recipients=users_in_map(recipients, self.domain),
            recipient_validation=recipient_map_ref(self.config_dir)
            in main_cf.get("local_recipient_maps", "").replace(",", " ").split(),
            last_mail_at=self._last_mail(now),
            retired=self.layout.onprem_retired.exists(),
            space=space,
            partial_forward=partial,
        )

    def _params(self) -> dict[str, str]:
        """main.cf's address-space parameters as `postconf -x` prints them (defaults filled
        in, $parameters expanded)."""
        params = {**POSTFIX_DEFAULTS, **parse_main_cf((self._etc / "main.cf").read_text())}
        return expand_params(params, SPACE_PARAMS)

    def _space(self, *, stray_mail: dict[str, int], other_accounts: dict[str, int]
               ) -> AddressSpace:
        """Every name the lab's onprem receives for, read as on a real host (the tables
        from the lab's files), with the mailbox counts of `observe`."""
        reader = self._reader()
        space = reader.read(self._params(), self.domain.lower(), uid_range=self._uids(),
                            own_tables={virtual_map_ref(self.config_dir)})
        return replace(space, stray_mail=stray_mail, other_accounts=other_accounts)

    def _local_names(self) -> tuple[str, ...]:
        return parse_domain_list(self._params()["mydestination"])[0]

    def _last_mail(self, now: datetime) -> datetime | None:
        """As on a real host: the log and its rotations, read back to the quiet period's
        start; a missing log is an error ("no mail seen" would open the retire gate)."""
        log = self.layout.onprem_maillog
        if not log.is_file():
            raise PostfixError(f"lab onprem: the mail log {log} is missing (run mailrec lab "
                               "init)")
        return read_local_logs(rotations(log), now=now, since=now - self.quiet_period,
                               tz=self.log_zone)

    def _read(self, name: str) -> str:
        path = self._etc / name
        return path.read_text() if path.exists() else ""

    def _update_map(self, name: str, changes: dict[str, str | None]) -> None:
        write_atomic(self._etc / name, edit_map(self._read(name), changes, name))

    def route_to_rental(self, user: str, smtp_host: str, port: int) -> None:
        """As the real driver: every local name of the user (user@domain and user@NAME for
        each mydestination name) is accepted, rewritten to user@domain (the rental knows
        only that one) and forwarded. Accept first, rewrite second, forward last: at no
        moment is a name answered 550 (MR007) or sent to the rental unrewritten."""
        self.route_to_rental_many((user,), smtp_host, port)

    def route_to_rental_many(self, users: Iterable[str], smtp_host: str, port: int) -> None:
        """`route_to_rental` for many users at once (lab init), in three map writes: every
        name of every user accepted first, then rewritten, then forwarded, so at no moment
        is one of their names answered 550 or sent to the rental unrewritten. The maps and
        main.cf end byte for byte as routing the users one by one leaves them. Every name is
        checked before anything is written: one unsafe name and nothing changes."""
        names = list(dict.fromkeys(users))
        for user in names:
            if not USER_NAME_RE.match(user):
                raise PostfixError(f"refusing unsafe user name {user!r}")
        domain = self.domain.lower()
        local_names = self._local_names()
        keys = {user: forward_keys(user, domain, local_names) for user in names}
        self._update_map(RECIPIENT_MAP, {k: "OK" for forms in keys.values() for k in forms})
        self._update_map(VIRTUAL_MAP, {k: f"{user}@{domain}" for user, forms in keys.items()
                                       for k in forms[1:]})
        self._reference("virtual_alias_maps", virtual_map_ref(self.config_dir))
        target = relay_target(smtp_host, port)
        self._update_map(TRANSPORT_MAP, {k: target for forms in keys.values() for k in forms})

    def _reference(self, parameter: str, ref: str) -> None:
        main_cf_path = self._etc / "main.cf"
        text = main_cf_path.read_text()
        current = parse_main_cf(text).get(parameter, POSTFIX_DEFAULTS.get(parameter, ""))
        wanted = with_map(current, ref)
        if wanted != current:
            write_atomic(main_cf_path, set_main_cf(text, parameter, wanted))

    def _forms(self, name: str, user: str) -> dict[str, str | None]:
        """Every key of a managed map that is one of the user's names (to remove them)."""
        prefix = f"{user}@"
        return {k: None for k in parse_map(self._read(name)) if k.startswith(prefix)}

    def route_to_onprem(self, user: str) -> None:
        if not USER_NAME_RE.match(user):
            raise PostfixError(f"refusing unsafe user name {user!r}")
        if user in self._removed():
            # As on a real host: local delivery would start a fresh Maildir that observe does
            # not count (the user is on the removed list), mail nobody reads.
            raise PostfixError(
                f"{user}'s onprem mailbox was archived by mailrec: restore it first (rename "
                f"the {ARCHIVE_INFIX}* directory back, remove {user} from "
                f"{self._etc / REMOVED_LIST}), then route it back"
            )
        # Stop forwarding first, then the rewrite, then stop accepting without an account.
        for name in (TRANSPORT_MAP, VIRTUAL_MAP, RECIPIENT_MAP):
            self._update_map(name, self._forms(name, user))

    def enable_recipient_map(self) -> None:
        main_cf_path = self._etc / "main.cf"
        text = main_cf_path.read_text()
        params = parse_main_cf(text)
        current = params.get("local_recipient_maps", "proxy:unix:passwd.byname $alias_maps")
        text = set_main_cf(
            text, "local_recipient_maps", with_map(current, recipient_map_ref(self.config_dir))
        )
        transport = params.get("transport_maps", "")
        text = set_main_cf(
            text, "transport_maps", with_map(transport, transport_map_ref(self.config_dir))
        )
        write_atomic(main_cf_path, text)

    def remove_fallback(self, *rental_hosts: str) -> tuple[str, ...]:
        """As the real driver: `fallback_transport` / `luser_relay` that hand every name
        without an account to the rental (`rental_hosts`: its smtp_host and MX host) are
        removed (emptied: Postfix's default); one that points elsewhere stays. Returns the
        names removed."""
        if not rental_hosts:
            raise PostfixError("remove_fallback: name the rental's hosts")
        main_cf_path = self._etc / "main.cf"
        text = main_cf_path.read_text()
        params = parse_main_cf(text)
        remove = tuple(name for name in FALLBACK_PARAMS
                       if params.get(name) and points_at_rental(name, params[name],
                                                                rental_hosts))
        for name in remove:
            text = set_main_cf(text, name, "")
        if remove:
            write_atomic(main_cf_path, text)
        return remove

    def probe_forward(self, smtp_host: str, port: int) -> str:
        """The forward path, as far as the lab has one. The lab has no onprem Postfix to send
        from: while `lab up` runs the rental's SMTP server, a probe goes to it (MAIL FROM:<>,
        RCPT TO postmaster, a short message if accepted); an SMTP answer, 2xx or 5xx, proves
        the path, a refused connection does not. Without it, the lab's hosts are files and
        the path is the rental's domain list."""
        if self.rental_smtp is None:
            domains = self.layout.rental_domains
            listed = domains.read_text().split() if domains.exists() else []
            if self.domain not in listed:
                raise PostfixError(f"lab: the rental does not accept {self.domain} "
                                   f"({domains}): mail forwarded to {smtp_host}:{port} would "
                                   "be refused")
            return f"lab: the rental's domain list accepts {self.domain}"
        host, _, port_text = self.rental_smtp.rpartition(":")
        rcpt = f"postmaster@{self.domain}"
        try:
            with smtplib.SMTP(host, int(port_text), timeout=10) as smtp:
                smtp.ehlo(f"mail.{self.domain}")
                smtp.mail("")
                code, reply = smtp.rcpt(rcpt)
                if 200 <= code < 300:
                    smtp.data(f"Subject: mailrec forward-path probe\r\nTo: <{rcpt}>\r\n\r\n"
                              "A probe of the path onprem forwards migrated users' mail by."
                              "\r\n".encode())
        except (OSError, smtplib.SMTPException) as exc:
            raise PostfixError(f"lab: no SMTP path to the rental at {self.rental_smtp} (for "
                               f"{smtp_host}:{port}): {exc}") from exc
        text = reply.decode("utf-8", "replace")
        return f"lab: the rental at {self.rental_smtp} answered {code} {text} for {rcpt}"

    def remove_mailbox(self, user: str) -> None:
        """Archive the drained Maildir as the real driver does: renamed
        `Maildir.mailrec-removed-<UTC>`, the user listed in `mailrec_removed`; the account
        (passwd line) and its home stay."""
        if not USER_NAME_RE.match(user):
            raise PostfixError(f"refusing unsafe user name {user!r}")
        removed = self._removed()
        if user in removed:
            return
        people, _ = self._accounts()
        if user not in people:
            return  # no account, or not a mail user: nothing mailrec counts
        forwarded = users_in_map(parse_map(self._read(TRANSPORT_MAP)), self.domain)
        if user not in forwarded:
            raise PostfixError(
                f"{user} is not forwarded to the rental: archiving the onprem mailbox now "
                f"would hide the mail still delivered there (route inbound/{user} first)"
            )
        maildir = self._maildir(Path(people[user]))
        held = 0 if maildir is None else count_maildir(maildir)
        if held:
            raise PostfixError(
                f"MR008: the onprem mailbox of {user} still holds {held} message(s): let the "
                "user drain it (POP) or archive it first"
            )
        archived = "-"
        if maildir is not None and (maildir.exists() or maildir.is_symlink()):
            stamp = clock.wall().strftime("%Y%m%dT%H%M%SZ")
            target = maildir.with_name(f"{maildir.name}{ARCHIVE_INFIX}{stamp}")
            if target.exists() or target.is_symlink():
                raise PostfixError(f"cannot archive {maildir}: {target} exists")
            maildir.rename(target)
            archived = "/" + str(target.relative_to(self.layout.onprem))
        # Renamed first, listed second, as on a real host.
        removed[user] = archived
        write_atomic(self._etc / REMOVED_LIST, format_map(removed, REMOVED_LIST))

    def retire(self) -> None:
        write_atomic(self.layout.onprem_retired, "retired by mailrec\n", backup=False)
