"""The `manual` rental provider: for hosted services whose control panel has no usable API.

Where it sits: a rental driver (`rental.provider: manual`). mailrec cannot change anything
at such a service, so its mailbox and whitelist steps are manual steps: `instructions()`
prints the exact panel steps, the step waits for `mailrec ack`, and `observe()` then
*verifies* the result from outside, over SMTP, the way any mail server on the Internet sees it:

- mailbox probe: one session for all users and aliases: EHLO, `MAIL FROM:<>`,
  `RCPT TO:<name@domain>` for every user and every alias name (all RCPTs of a batch in one
  write when the server offers PIPELINING), RSET, QUIT; never DATA, so nothing is ever sent.
  250 = the mailbox (or alias) exists, 550 = it does not. A RCPT cannot show an alias's
  members: they come from the aliases file, else they are unknown (None).
  `postmaster@domain` shows whether the rental hosts the domain at all, and a made-up
  canary address shows whether a 250 means anything (a catch-all, or a server relaying for
  us, answers 250 to everything).
- relay probe: from `context.probe_source`, `MAIL FROM:<probe@domain>` + `RCPT TO:` an
  external address without AUTH: 250 = the source is on the no-auth relay whitelist,
  554/550 relay denied = it is not.

The admin may also keep the panel's mailbox list, aliases and whitelist in files in the state
repo (`options.mailboxes_file`, `options.aliases_file`, `options.whitelist_file`); a probe
result wins over a file, and the snapshot's notes say what disagreed. Every address is
validated before it reaches SMTP.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import shlex
import smtplib
from collections.abc import Iterable, Sequence
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
from reconciler.drivers.rental.lab import (
    meaningful_lines,
    parse_address,
    parse_member,
    read_aliases,
    read_whitelist,
    valid_domain,
)
from reconciler.drivers.rental.manual_probe import (
    IpAddress,
    MailboxProbe,
    Reply,
    ReplyKind,
    judge_domain,
    merge_aliases,
    merge_mailboxes,
    merge_whitelist,
)
from reconciler.model import USER_NAME_RE, Rental

OPTIONS = {
    "mailboxes_file": "file in the state repo listing the rental's mailboxes (one per line)",
    "aliases_file": "file in the state repo listing the rental's aliases (name: member, ...)",
    "whitelist_file": "file in the state repo listing the relay whitelist (one CIDR per line)",
    "panel_url": "the control panel's address, quoted in instructions",
    "probe_timeout": "seconds to wait for the rental's SMTP server (default 30)",
    "helo_name": "EHLO name of the probes (default: this host's name)",
    "relay_probe_from": "MAIL FROM of the relay probe (default probe@<domain>)",
    "relay_probe_to": "external RCPT TO of the relay probe (default postmaster@example.net)",
    "probe_egress_ip": "address the rental sees the relay probe come from, if NAT changes it",
}
# RCPTs per transaction: far below Postfix's smtpd_recipient_limit (1000), and small enough
# that a pipelined batch and its replies fit in socket buffers (RFC 2920 deadlock warning).
BATCH = 100
CANARY_PREFIX = "mailrec-probe-"
_EXTERNAL_RE = re.compile(
    r"^[a-z0-9](?:[a-z0-9._+-]{0,62}[a-z0-9])?@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+"
    r"[a-z]{2,63}$"
)


class ManualProvider(RentalProvider):
    """A rental managed by hand in its control panel; mailrec instructs and verifies."""

    name: ClassVar[str] = "manual"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        # Aliases are listed as mailboxes are: which exist, by probe (members from the file).
        {Capability.LIST_MAILBOXES, Capability.READ_WHITELIST, Capability.LIST_ALIASES}
    )

    def __init__(self, config: Rental, context: ProviderContext) -> None:
        super().__init__(config, context)
        options = dict(config.options)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            known = ", ".join(sorted(OPTIONS))
            raise ProviderError(
                f"rental.options: {', '.join(unknown)} not known to the manual provider "
                f"(known: {known})"
            )
        self.domain = context.domain.lower()
        if not valid_domain(self.domain):
            raise ProviderError(f"{context.domain!r} is not a domain name")
        self.mailboxes_file = self._state_file(options.get("mailboxes_file"), "mailboxes_file")
        self.aliases_file = self._state_file(options.get("aliases_file"), "aliases_file")
        self.whitelist_file = self._state_file(options.get("whitelist_file"), "whitelist_file")
        self.panel_url = options.get("panel_url")
        self.timeout = self._timeout(options.get("probe_timeout", "30"))
        self.helo_name = self._helo(options.get("helo_name"))
        self.relay_probe_from = self._address(
            options.get("relay_probe_from", "probe"), "relay_probe_from", local_ok=True
        )
        self.relay_probe_to = self._address(
            options.get("relay_probe_to", "postmaster@example.net"), "relay_probe_to"
        )
        if self.relay_probe_to.endswith("@" + self.domain):
            raise ProviderError("rental.options.relay_probe_to must be outside " + self.domain)
        egress = options.get("probe_egress_ip")
        self.probe_egress_ip = _ip(egress, "rental.options.probe_egress_ip") if egress else None
        source = context.probe_source
        self.probe_source = _ip(source, "the probe source address") if source else None
        self.endpoint = self._endpoint()

    # --- observe -----------------------------------------------------------------------
    def observe(self) -> RentalSnapshot:
        listed = self.read_mailboxes_file()
        users = set(self.context.users) | set(listed or ())
        listed_aliases = self.read_aliases_file()
        alias_names = set(self.context.aliases) | set(listed_aliases or ())
        # Users and alias names in the same session(s): the cost does not grow with aliases.
        probe = self._probe_mailboxes(users, alias_names)
        mailboxes, notes = merge_mailboxes(listed, probe, self.domain)
        aliases, alias_notes = merge_aliases(listed_aliases, probe, self.domain)
        notes.extend(alias_notes)
        if probe.domain_accepted is None:
            # Taken as not accepted: routing mail to a rental that may bounce it is the
            # mistake MR001 exists to prevent.
            notes.append(
                f"could not tell whether the rental hosts {self.domain} (postmaster@"
                f"{self.domain}: {probe.postmaster}): taken as not accepted"
            )
        if probe.sessions > 1:
            notes.append(
                f"the rental closed the probe session early: {probe.sessions} sessions used"
            )

        whitelist = self.read_whitelist_file()
        if self.whitelist_file is not None:
            origin = f"the whitelist file {self._repo_path(self.whitelist_file)}"
        else:
            origin = "rental.whitelist as declared"
        seen_as = self.probe_egress_ip or self.probe_source
        checks: tuple[tuple[IpAddress, bool], ...] = ()
        if seen_as is None:
            notes.append(
                f"relay whitelist not verified ({origin}): no probe source address is set, so "
                "safety counts no address as whitelisted"
            )
        else:
            relayed = self.probe_relay(str(self.probe_source) if self.probe_source else None)
            checks = ((seen_as, relayed),)
            whitelist, disagreed = merge_whitelist(
                whitelist, self.config.whitelist, seen_as, relayed
            )
            notes.extend(disagreed)
            notes.append(f"relay whitelist from {origin}: not verified, except {seen_as} "
                         f"({'relayed' if relayed else 'refused'} by probe)")
        return RentalSnapshot(
            domain_accepted=bool(probe.domain_accepted),
            mailboxes=mailboxes,
            whitelist=whitelist,
            notes=tuple(notes),
            # A panel cannot be read: the listed whitelist is what someone wrote down.
            whitelist_verified=False,
            relay_checks=checks,
            aliases=aliases,
        )

    def read_mailboxes_file(self) -> frozenset[str] | None:
        """The admin's list of mailboxes (`local` or `local@domain` per line), if kept."""
        path = self.mailboxes_file
        if path is None:
            return None
        if not path.is_file():
            raise ProviderError(
                f"options.mailboxes_file {path} does not exist (create it; it may be empty)"
            )
        users = set()
        for number, line in meaningful_lines(path):
            text = line if "@" in line else f"{line}@{self.domain}"
            address = parse_address(text)
            if address is None:
                raise ProviderError(
                    f"{path}:{number}: {line!r} is not a mailbox (user or user@{self.domain})"
                )
            if address.domain == self.domain:  # the rental may host other domains too
                users.add(address.local)
        return frozenset(users)

    def read_aliases_file(self) -> dict[str, tuple[str, ...]] | None:
        """The admin's list of aliases (`name: member@domain, ...` per line), if kept."""
        path = self.aliases_file
        if path is None:
            return None
        if not path.is_file():
            raise ProviderError(
                f"options.aliases_file {path} does not exist (create it; it may be empty)"
            )
        return {
            name.local: members
            for name, members in read_aliases(path, default_domain=self.domain).items()
            if name.domain == self.domain  # the rental may host other domains too
        }

    def read_whitelist_file(self) -> frozenset[IpNetwork]:
        path = self.whitelist_file
        if path is None:
            return frozenset(self.config.whitelist)
        if not path.is_file():
            raise ProviderError(
                f"options.whitelist_file {path} does not exist (create it; it may be empty)"
            )
        return read_whitelist(path)

    # --- probes ------------------------------------------------------------------------
    def probe_mailboxes(self, users: Iterable[str]) -> dict[str, bool]:
        """Which of `users` have a mailbox at the rental, in one SMTP session.

        Raises ProviderError when the answers cannot be trusted (a catch-all, a temporary
        failure): a wrong "exists" would let mailrec route mail into a void.
        """
        probe = self._probe_mailboxes(users)
        if probe.domain_accepted is False:
            return dict.fromkeys(probe.replies, False)
        if probe.accepts_anything:
            raise ProviderError(
                f"{self._where()} accepts any address at {self.domain}: cannot probe mailboxes"
            )
        if probe.undecided:
            detail = "; ".join(f"{u}: {probe.replies[u]}" for u in probe.undecided[:5])
            raise ProviderError(f"{self._where()} gave no definite answer for {detail}")
        return probe.exists

    def probe_relay(self, source_address: str | None) -> bool:
        """Whether the rental relays without AUTH for a client at `source_address`.

        The socket is bound to `source_address` (None: the system's choice). Only MAIL and
        RCPT are sent, then RSET: no message leaves, even when relaying is allowed.
        """
        source = str(_ip(source_address, "probe source")) if source_address else None
        target = self.relay_probe_to
        replies, _ = self._rcpt_session([target], source=source, sender=self.relay_probe_from)
        reply = replies[target]
        if reply.kind is ReplyKind.OK:
            return True
        if reply.kind is ReplyKind.NOT_HOSTED:
            return False
        raise ProviderError(
            f"relay probe from {source or 'this host'} to {self._where()}: RCPT TO:<{target}> "
            f"answered {reply}: cannot tell whether the source is whitelisted"
        )

    def _probe_mailboxes(self, users: Iterable[str], aliases: Iterable[str] = ()) -> MailboxProbe:
        names = sorted({self._user(u) for u in users})
        alias_names = sorted({self._user(a, "alias name") for a in aliases})
        # A made-up address that cannot exist: if it gets 250, so would anything.
        canary = f"{CANARY_PREFIX}{secrets.token_hex(4)}"
        locals_ = list(dict.fromkeys(["postmaster", canary, *names, *alias_names]))
        # One external address in the same session tells a catch-all domain (250 to anything
        # there) from a server that relays everything for this host.
        outside_address = self.relay_probe_to
        addresses = [outside_address, *(f"{local}@{self.domain}" for local in locals_)]
        by_address, sessions = self._rcpt_session(addresses, source=None, sender="")
        outside = by_address.pop(outside_address)
        replies = {a.partition("@")[0]: r for a, r in by_address.items()}
        postmaster, canary_reply = replies["postmaster"], replies[canary]
        accepts_anything = canary_reply.kind is ReplyKind.OK
        domain_accepted = judge_domain(postmaster, canary_reply, outside)

        def decided(wanted: Sequence[str]) -> dict[str, bool]:
            exists: dict[str, bool] = {}
            for name in wanted:
                kind = replies[name].kind
                if domain_accepted is False:
                    exists[name] = False
                elif accepts_anything:
                    continue
                elif kind is ReplyKind.OK:
                    exists[name] = True
                elif kind is ReplyKind.NO_USER:
                    exists[name] = False
            return exists

        return MailboxProbe(
            domain_accepted=domain_accepted,
            exists=decided(names),
            replies={name: replies[name] for name in names},
            accepts_anything=accepts_anything,
            postmaster=postmaster,
            sessions=sessions,
            relayed_here=outside.kind is ReplyKind.OK,
            alias_exists=decided(alias_names),
            alias_replies={name: replies[name] for name in alias_names},
        )

    def _rcpt_session(
        self, addresses: Sequence[str], *, source: str | None, sender: str
    ) -> tuple[dict[str, Reply], int]:
        """RCPT every address, in as few sessions and round trips as the server allows.

        A server may hang up mid-way (421, or Postfix's hard error limit after many 550s):
        the unanswered addresses then continue in a new session, as long as each session
        makes progress.
        """
        replies: dict[str, Reply] = {}
        pending = list(addresses)
        sessions = 0
        while pending:
            sessions += 1
            answered = len(replies)
            failure = "it closed the session"
            smtp = self._connect(source)
            try:
                pipelining = smtp.has_extn("pipelining")
                while pending:
                    complete = self._transaction(smtp, sender, pending[:BATCH], pipelining, replies)
                    pending = [a for a in pending if a not in replies]
                    if not complete:
                        break  # the server said 421 and hangs up
            except OSError as exc:  # includes smtplib's errors: a dropped connection, a timeout
                failure = f"{type(exc).__name__}: {exc}"
                pending = [a for a in pending if a not in replies]
            finally:
                _hang_up(smtp)
            if pending and len(replies) == answered:
                raise ProviderError(
                    f"{self._where()} answered no RCPT of the probe ({failure})"
                )
        return replies, sessions

    def _transaction(
        self,
        smtp: smtplib.SMTP,
        sender: str,
        batch: Sequence[str],
        pipelining: bool,
        replies: dict[str, Reply],
    ) -> bool:
        """MAIL FROM, RCPT TO each of `batch` (replies land in `replies`), RSET. Never DATA.

        Returns False when the server answered 421 (it is closing the session).
        """
        if pipelining:
            # RFC 2920: the whole transaction in one write, then the replies in order.
            lines = [f"MAIL FROM:<{sender}>", *(f"RCPT TO:<{a}>" for a in batch), "RSET"]
            smtp.send("".join(f"{line}\r\n" for line in lines))
            mail = _reply(smtp.getreply())
            if mail.code == 421:
                return False
            # A refused MAIL ends the probe (the RCPT replies would be 503s): the session is
            # closed unread, so the unread replies do not matter.
            self._check_mail(mail, sender)
            for address in batch:
                reply = _reply(smtp.getreply())
                if reply.code == 421:
                    return False
                replies[address] = reply
            _reply(smtp.getreply())  # RSET
            return True
        mail = _reply(smtp.mail(sender))
        if mail.code == 421:
            return False
        self._check_mail(mail, sender)
        for address in batch:
            reply = _reply(smtp.rcpt(address))
            if reply.code == 421:
                return False
            replies[address] = reply
        smtp.rset()
        return True

    def _check_mail(self, reply: Reply, sender: str) -> None:
        if reply.kind is not ReplyKind.OK:
            raise ProviderError(
                f"{self._where()} refused MAIL FROM:<{sender}> ({reply}); for the relay probe, "
                "set rental.options.relay_probe_from to an address the rental accepts"
            )

    def _connect(self, source: str | None) -> smtplib.SMTP:
        host, port = self.endpoint
        try:
            smtp = smtplib.SMTP(
                host,
                port,
                local_hostname=self.helo_name,
                timeout=self.timeout,
                source_address=(source, 0) if source else None,
            )
        except (OSError, smtplib.SMTPException) as exc:
            origin = f" from {source}" if source else ""
            raise ProviderError(f"cannot reach the rental at {host}:{port}{origin}: {exc}") from exc
        try:
            smtp.ehlo_or_helo_if_needed()
        except (OSError, smtplib.SMTPException) as exc:
            _hang_up(smtp)
            raise ProviderError(f"{self._where()} refused EHLO/HELO: {exc}") from exc
        return smtp

    # --- instructions ------------------------------------------------------------------
    def instructions(self, action: str, target: str) -> str:
        panel = self.panel_url or "the rental's control panel"
        host, port = self.endpoint
        if action in ("create_mailbox", "delete_mailbox") and USER_NAME_RE.match(target):
            address = f"{target}@{self.domain}"
            steps = []
            if action == "create_mailbox":
                title = f"Create the mailbox {address} at the rental"
                steps.append(f"Sign in to {panel}.")
                steps.append(
                    f'Under the mail addresses of {self.domain}, add the user "{target}" '
                    f"(address {address}) with a password; give the password to the user."
                )
                file_step = f'Add the line "{address}" to {self._repo_path(self.mailboxes_file)}'
                check = f"RCPT TO:<{address}> on {host}:{port} must answer 250"
            else:
                title = f"Delete the mailbox {address} at the rental"
                steps.append(
                    "Archive its messages first (MR008): mailrec cannot count messages at "
                    "this rental, so make sure in webmail or IMAP that nothing is left."
                )
                steps.append(f'Sign in to {panel} and delete the user "{target}" of {self.domain}.')
                file_step = (
                    f'Remove the line "{address}" from {self._repo_path(self.mailboxes_file)}'
                )
                check = f"RCPT TO:<{address}> on {host}:{port} must answer 550 (user unknown)"
            if self.mailboxes_file is not None:
                steps.append(f"{file_step} and commit it.")
            steps.append(f"Run: mailrec ack {shlex.quote('mailbox/' + target)}")
            return _render(title, steps, f"mailrec then checks it: {check}.")
        if action == "create_alias":
            alias = self._alias_instructions(target)
            if alias is not None:
                return alias
        if action in ("add_whitelist", "remove_whitelist"):
            try:
                network = ipaddress.ip_network(target, strict=True)
            except ValueError:
                return super().instructions(action, target)
            span = (
                f"{network.network_address}"
                if network.num_addresses == 1
                else f"{network[0]} - {network[-1]}, {network.num_addresses} addresses"
            )
            adding = action == "add_whitelist"
            title = (
                f"{'Add' if adding else 'Remove'} {network} ({span}) "
                f"{'to' if adding else 'from'} the rental's relay whitelist"
            )
            steps = [
                f"Sign in to {panel}.",
                "Open the settings for sending without SMTP authentication (relay allowed by "
                f"source IP address) and {'add' if adding else 'remove'} {network}.",
            ]
            if self.whitelist_file is not None:
                verb = "Add the line" if adding else "Remove the line"
                prep = "to" if adding else "from"
                steps.append(
                    f'{verb} "{network}" {prep} {self._repo_path(self.whitelist_file)} '
                    "and commit it."
                )
            steps.append(f"Run: mailrec ack {shlex.quote(f'whitelist/{network}')}")
            source = self.probe_egress_ip or self.probe_source
            if source and source in network:
                check = (
                    f"mailrec then checks it: from {source} it asks {host}:{port} to relay to "
                    f"<{self.relay_probe_to}> (RCPT only, nothing is sent); "
                    f"{'250' if adding else '554 relay access denied'} means it is in effect."
                )
            elif source:
                check = (
                    f"mailrec cannot check this entry: its probe source {source} lies outside "
                    f"{network}, so your ack is trusted."
                )
            else:
                check = "mailrec cannot check this entry: no probe source address is set."
            return _render(title, steps, check)
        return super().instructions(action, target)

    def _alias_instructions(self, target: str) -> str | None:
        """Steps for `create_alias` with target `name: member@domain, ...`; None when the
        target is malformed (the generic text then says it as given)."""
        name, sep, members_text = target.partition(":")
        name = name.strip()
        members = [parse_member(m) for m in members_text.split(",") if m.strip()]
        if not sep or not USER_NAME_RE.match(name) or not members or None in members:
            return None
        listed = ", ".join(sorted({m for m in members if m is not None}))
        panel = self.panel_url or "the rental's control panel"
        host, port = self.endpoint
        address = f"{name}@{self.domain}"
        steps = [
            f"Sign in to {panel}.",
            f'Under the mail addresses of {self.domain}, add a forwarding address (alias, '
            f'"転送") "{name}" (address {address}) that forwards to {listed}, with no mailbox '
            "of its own; if it already exists, set its destinations to exactly these.",
        ]
        if self.aliases_file is not None:
            steps.append(
                f'In {self._repo_path(self.aliases_file)}, put the line "{name}: {listed}" '
                f"(replacing any line for {name}) and commit it."
            )
        steps.append(f"Run: mailrec ack {shlex.quote('alias/' + name)}")
        members_source = (
            "taken from the aliases file" if self.aliases_file is not None else "not checked"
        )
        check = (
            f"mailrec then checks it: RCPT TO:<{address}> on {host}:{port} must answer 250; "
            f"the destinations cannot be seen from outside, so they are {members_source}."
        )
        return _render(f"Create the forwarding address {address} at the rental", steps, check)

    # --- option parsing ----------------------------------------------------------------
    def _state_file(self, value: str | None, option: str) -> Path | None:
        if value is None:
            return None
        path = Path(value)
        if path.is_absolute():
            return path
        if self.context.state_dir is None:
            raise ProviderError(
                f"rental.options.{option} {value!r} is relative to the state directory, "
                "which is not known here"
            )
        return self.context.state_dir / path

    def _repo_path(self, path: Path | None) -> str:
        if path is None:
            return "(no file)"
        state_dir = self.context.state_dir
        if state_dir is not None and path.is_relative_to(state_dir):
            return str(path.relative_to(state_dir))
        return str(path)

    @staticmethod
    def _timeout(value: str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= 600:
            raise ProviderError(f"rental.options.probe_timeout {value!r}: give 1 to 600 seconds")
        return seconds

    @staticmethod
    def _helo(value: str | None) -> str | None:
        if value is not None and not (valid_domain(value.lower()) or value == "localhost"):
            raise ProviderError(f"rental.options.helo_name {value!r} is not a host name")
        return value

    def _address(self, value: str, option: str, *, local_ok: bool = False) -> str:
        text = value.strip().lower()
        if local_ok and "@" not in text:
            text = f"{text}@{self.domain}"
        if not _EXTERNAL_RE.match(text):
            raise ProviderError(f"rental.options.{option} {value!r} is not a mail address")
        return text

    def _user(self, user: str, what: str = "user name") -> str:
        if not isinstance(user, str) or not USER_NAME_RE.match(user):
            raise ProviderError(f"{user!r} is not a valid {what}: not probed")
        return user

    def _endpoint(self) -> tuple[str, int]:
        lab_address = self.context.services.get("rental_smtp")
        if lab_address is None:
            return self.config.smtp_host, self.config.relay_port
        host, sep, port = lab_address.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ProviderError(f"services.json rental_smtp {lab_address!r}: expected host:port")
        return host.strip("[]"), int(port)

    def _where(self) -> str:
        host, port = self.endpoint
        return f"the rental SMTP server {host}:{port}"


def _ip(value: str | None, what: str) -> IpAddress:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise ProviderError(f"{what} {value!r} is not an IP address") from None


def _reply(raw: tuple[int, bytes]) -> Reply:
    code, text = raw
    return Reply(code, text.decode("utf-8", "replace").replace("\n", " ").strip())


def _hang_up(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()


def _render(title: str, steps: Sequence[str], check: str) -> str:
    lines = [f"{title} (provider manual: mailrec cannot do this itself)."]
    lines.extend(f"  {number}. {step}" for number, step in enumerate(steps, start=1))
    lines.append(check)
    return "\n".join(lines)
