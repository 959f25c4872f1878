"""The `ssh` rental provider: a hosted server you control (a VPS running Postfix with virtual
mailboxes and Dovecot), driven over one SSH connection.

Sits between the executor and `reconciler.transport`: the executor calls `observe()` and the
change methods; this module turns them into argv commands and atomic file writes on the VPS.
Everything it reads is parsed, and every file it writes rendered, by the pure functions of
`vps_files` (tested against real output); the hash doveadm returns for a new login is checked
against the password by `crypt`, never passed to a command.

Files it owns on the VPS (paths are options, see docs/providers/ssh.md):
- the virtual mailbox map source (`virtual_mailbox_maps`), one `user@domain  domain/user/` line
  per mailbox, compiled with `postmap`;
- the Dovecot passwd-file, one `user@domain:{SHA512-CRYPT}...:uid:gid::maildir::` line each;
- the mynetworks file: the no-auth relay whitelist, referenced from main.cf `mynetworks`;
- the virtual alias map source (`virtual_alias_maps`, only when that option is set), one
  `alias@domain  member@domain, member@other` line per alias; without the option the provider
  offers no alias capability (see `supports`).
Every change is: write (temp file + rename, previous kept as `.bak`), `postmap`,
`postfix check`, `postfix reload`, observe again; a failed check restores the previous file.
"""

from __future__ import annotations

import ipaddress
import logging
import posixpath
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, Final, Literal

from reconciler.drivers.rental.base import (
    Capability,
    IpNetwork,
    ProviderContext,
    ProviderError,
    RentalProvider,
    RentalSnapshot,
)
from reconciler.drivers.rental.crypt import sha512_crypt, verify_sha512_crypt
from reconciler.drivers.rental.lab import alias_members
from reconciler.drivers.rental.vps_files import (
    count_messages,
    map_source_with,
    map_source_without,
    parse_alias_map,
    parse_map_source,
    parse_mynetworks,
    parse_network,
    parse_passwd_users,
    parse_postconf,
    passwd_with,
    passwd_without,
    postfix_network,
    render_mynetworks,
    split_list,
)
from reconciler.model import SECRET_RE, USER_NAME_RE, Connect, Rental
from reconciler.transport import (
    Transport,
    TransportError,
    UnsafePathError,
    open_transport,
    safe_path,
)

# The provider's own names, and those of `crypt` and `vps_files` (defined here before they
# moved; tests and plug-ins import them from this module).
__all__ = [
    "DOMAIN_RE", "OPTION_DEFAULTS", "PostfixProgram", "SshOptions", "SshProvider", "VpsState",
    "count_messages", "map_source_with", "map_source_without", "parse_alias_map",
    "parse_map_source",
    "parse_mynetworks", "parse_network", "parse_passwd_users", "parse_postconf", "passwd_with",
    "passwd_without", "postfix_network", "render_mynetworks", "sha512_crypt", "split_list",
    "verify_sha512_crypt",
]

log = logging.getLogger(__name__)

DOMAIN_RE: Final = re.compile(
    r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]+$"
)
_OWNER_RE: Final = re.compile(r"^(\d{1,10}):(\d{1,10})$")
_STATIC_RE: Final = re.compile(r"^static:(\d{1,10})$")
_HASH_RE: Final = re.compile(r"^\{SHA512-CRYPT\}\$6\$[A-Za-z0-9./$]+$")
# The Postfix programs this provider runs; each gets `-c postfix_dir` (see `_postfix`).
PostfixProgram = Literal["postconf", "postmap", "postfix", "postqueue", "postsuper"]
# Map types `postmap` compiles; texthash is read directly (reload picks it up).
_INDEXED_TYPES: Final = frozenset({"hash", "btree", "lmdb", "cdb", "dbm", "sdbm"})
# A whitelist entry wider than this turns the VPS into a relay for a good part of the Internet.
_MIN_PREFIX: Final = {4: 8, 6: 32}
_POSTCONF_PARAMS: Final = (
    "virtual_mailbox_domains",
    "virtual_mailbox_maps",
    "virtual_mailbox_base",
    "mynetworks",
    "virtual_uid_maps",
    "virtual_gid_maps",
    "virtual_alias_maps",
)
# Offered only with the virtual_alias_maps option: without it there is no file to read or write.
_ALIAS_CAPABILITIES: Final = frozenset({Capability.LIST_ALIASES, Capability.CREATE_ALIAS})

OPTION_DEFAULTS: Final[Mapping[str, str | None]] = {
    "connect": None,
    "known_hosts": None,
    "key_file": None,
    "password": None,
    "postfix_dir": "/etc/postfix",
    "virtual_mailbox_maps": None,  # default <postfix_dir>/vmailbox
    "dovecot_passwd": "/etc/dovecot/users",
    "mail_root": "/var/mail/vhosts",
    "mynetworks_file": None,  # default <postfix_dir>/mynetworks
    "password_dir": "/var/lib/mailrec/initial-passwords",
    "mail_owner": None,  # uid:gid; default from main.cf virtual_uid_maps/virtual_gid_maps
    # The virtual alias map source mailrec owns. No default: a VPS may keep its aliases
    # elsewhere (or by hand), and mailrec must not start writing a file nobody asked for.
    "virtual_alias_maps": None,
}


# --- provider ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SshOptions:
    """`rental.options` of the ssh provider, validated (see docs/providers/ssh.md)."""

    connect: Connect
    known_hosts: Path | None
    key_file: str | None
    password_ref: str | None
    postfix_dir: str
    vmailbox: str
    dovecot_passwd: str
    mail_root: str
    mynetworks_file: str
    password_dir: str
    mail_owner: tuple[int, int] | None
    virtual_aliases: str | None = None  # the alias map source; None: aliases not managed

    @classmethod
    def parse(cls, options: Mapping[str, str], context: ProviderContext) -> SshOptions:
        unknown = sorted(set(options) - set(OPTION_DEFAULTS))
        if unknown:
            raise ProviderError(
                f"rental.options: unknown option(s) {', '.join(unknown)} for provider ssh "
                f"(known: {', '.join(OPTION_DEFAULTS)})"
            )
        merged = {k: options.get(k, v) for k, v in OPTION_DEFAULTS.items()}
        if not merged["connect"]:
            raise ProviderError("rental.options.connect is required (ssh://root@vps.example:22)")
        try:
            connect = Connect.parse(str(merged["connect"]))
        except ValueError as exc:
            raise ProviderError(f"rental.options.connect: {exc}") from None

        def remote_path(name: str, default: str | None = None) -> str:
            value = merged[name] or default
            assert value is not None
            try:
                return safe_path(value)
            except UnsafePathError as exc:
                raise ProviderError(f"rental.options.{name}: {exc}") from None

        def local_path(name: str) -> Path | None:
            value = merged[name]
            if not value:
                return None
            path = Path(value).expanduser()
            # Relative to the state repository, so a known_hosts file can live beside it.
            if not path.is_absolute() and context.state_dir is not None:
                path = context.state_dir / path
            return path

        password_ref = merged["password"]
        if password_ref is not None and not SECRET_RE.match(password_ref):
            raise ProviderError("rental.options.password must be env:NAME or file:/path")
        owner: tuple[int, int] | None = None
        if merged["mail_owner"]:
            match = _OWNER_RE.match(merged["mail_owner"])
            if not match:
                raise ProviderError("rental.options.mail_owner must be UID:GID (e.g. 5000:5000)")
            owner = (int(match.group(1)), int(match.group(2)))
        postfix_dir = remote_path("postfix_dir")
        key_file = local_path("key_file")
        parsed = cls(
            connect=connect,
            known_hosts=local_path("known_hosts") or context.known_hosts,
            key_file=str(key_file) if key_file else None,
            password_ref=password_ref,
            postfix_dir=postfix_dir,
            vmailbox=remote_path("virtual_mailbox_maps", posixpath.join(postfix_dir, "vmailbox")),
            dovecot_passwd=remote_path("dovecot_passwd"),
            mail_root=remote_path("mail_root"),
            mynetworks_file=remote_path(
                "mynetworks_file", posixpath.join(postfix_dir, "mynetworks")
            ),
            password_dir=remote_path("password_dir"),
            mail_owner=owner,
            virtual_aliases=remote_path("virtual_alias_maps")
            if merged["virtual_alias_maps"]
            else None,
        )
        if parsed.virtual_aliases in (
            parsed.vmailbox, parsed.mynetworks_file, parsed.dovecot_passwd
        ):
            # Writing aliases would overwrite the mailboxes, the whitelist or the logins.
            raise ProviderError(
                f"rental.options.virtual_alias_maps {parsed.virtual_aliases} is also the "
                "mailbox map, the mynetworks file or the Dovecot passwd-file; give it its own file"
            )
        return parsed


@dataclass(frozen=True)
class VpsState:
    """Everything one observation reads from the VPS (richer than `RentalSnapshot`)."""

    settings: dict[str, str]
    domain_accepted: bool
    map_type: str | None  # type of the virtual_mailbox_maps entry naming our file
    vmailbox_text: str | None
    vmailbox: dict[str, str]  # address -> Maildir relative to mail_root
    passwd_text: str | None
    logins: frozenset[str]
    messages: dict[str, int | None]
    mynetworks_text: str | None
    whitelist: frozenset[IpNetwork]
    whitelist_referenced: bool
    notes: tuple[str, ...]
    alias_map_type: str | None = None  # type of the virtual_alias_maps entry naming our file
    aliases_text: str | None = None
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # address -> members


class SshProvider(RentalProvider):
    """Postfix virtual mailboxes + Dovecot passwd-file on a VPS reached over SSH."""

    name: ClassVar[str] = "ssh"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(Capability)

    def __init__(
        self, config: Rental, context: ProviderContext, *, transport: Transport | None = None
    ) -> None:
        super().__init__(config, context)
        self.options = SshOptions.parse(config.options, context)
        self.domain = context.domain.lower()
        if not DOMAIN_RE.match(self.domain):
            raise ProviderError(f"domain {context.domain!r} is not a plain domain name")
        self._transport = transport
        # Where each created mailbox's initial password was written (on the VPS).
        self.initial_password_files: dict[str, str] = {}

    # --- connection --------------------------------------------------------------------
    @property
    def transport(self) -> Transport:
        # One connection for the provider's lifetime: observe, change, verify all reuse it.
        if self._transport is None:
            try:
                self._transport = open_transport(
                    self.options.connect,
                    known_hosts=self.options.known_hosts,
                    key_filename=self.options.key_file,
                    password_ref=self.options.password_ref,
                )
            except TransportError as exc:
                raise ProviderError(f"rental (ssh): {exc}") from exc
        return self._transport

    def supports(self, capability: Capability) -> bool:
        # `capabilities` is the class's (what the registry checks against the methods); the
        # alias ones depend on this instance's options.
        if capability in _ALIAS_CAPABILITIES and self.options.virtual_aliases is None:
            return False
        return super().supports(capability)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    @property
    def where(self) -> str:
        return str(self.options.connect)

    def _postfix(self, program: PostfixProgram, *args: str) -> list[str]:
        """A command of the managed Postfix: `-c postfix_dir` right after the program, always
        (else it reads the system's /etc/postfix/main.cf: another instance, or none at all)."""
        return [program, "-c", self.options.postfix_dir, *args]

    def _run(self, argv: list[str], *, input: bytes | None = None, check: bool = True) -> str:
        try:
            return self.transport.run(argv, input=input, check=check).text
        except TransportError as exc:
            raise ProviderError(f"rental (ssh): {exc}") from exc

    def _read(self, path: str) -> str | None:
        try:
            data = self.transport.read_file(path)
        except TransportError as exc:
            raise ProviderError(f"rental (ssh): {exc}") from exc
        return None if data is None else data.decode("utf-8", "replace")

    def _write(self, path: str, text: str, *, mode: int, backup: bool = True) -> None:
        try:
            self.transport.write_file_atomic(path, text.encode(), mode=mode, backup=backup)
        except TransportError as exc:
            raise ProviderError(f"rental (ssh): {exc}") from exc

    # --- observation -------------------------------------------------------------------
    def observe(self) -> RentalSnapshot:
        state = self._read_state()
        suffix = "@" + self.domain
        mailboxes = {
            address[: -len(suffix)]: state.messages.get(address)
            for address in state.vmailbox
            if address.endswith(suffix)
        }
        aliases: dict[str, tuple[str, ...] | None] = {
            address[: -len(suffix)]: members
            for address, members in sorted(state.aliases.items())
            if address.endswith(suffix)
        }
        return RentalSnapshot(
            domain_accepted=state.domain_accepted,
            mailboxes=mailboxes,
            whitelist=state.whitelist,
            notes=state.notes,
            whitelist_verified=True,  # Postfix's mynetworks on the VPS, as read
            aliases=aliases,
        )

    def _read_state(self) -> VpsState:
        """One observation: a fixed number of commands, whatever the number of mailboxes."""
        opts = self.options
        notes: list[str] = []
        settings = parse_postconf(self._run(self._postfix("postconf", "-x", *_POSTCONF_PARAMS)))
        domain_accepted = self._domain_accepted(settings)
        if not domain_accepted:
            notes.append(
                f"{self.where}: main.cf virtual_mailbox_domains does not list {self.domain}"
            )
        map_type = self._map_type(settings)
        if map_type is None:
            notes.append(
                f"{self.where}: main.cf virtual_mailbox_maps does not use {opts.vmailbox}; "
                "mailboxes mailrec writes there would not receive mail"
            )
        base = settings.get("virtual_mailbox_base", "")
        if base.rstrip("/") != opts.mail_root:
            notes.append(
                f"{self.where}: main.cf virtual_mailbox_base is {base!r}, "
                f"option mail_root is {opts.mail_root!r}"
            )

        vmailbox_text = self._read(opts.vmailbox)
        vmailbox = {
            key: value for key, value in parse_map_source(vmailbox_text or "").items() if "@" in key
        }
        passwd_text = self._read(opts.dovecot_passwd)
        logins = frozenset(parse_passwd_users(passwd_text or ""))
        if passwd_text is None:
            notes.append(f"{self.where}: Dovecot passwd-file {opts.dovecot_passwd} is missing")
        for address in sorted(set(vmailbox) - logins):
            if address.endswith("@" + self.domain):
                notes.append(f"{address} receives mail but has no Dovecot login")

        messages = self._message_counts(vmailbox, notes)

        referenced = opts.mynetworks_file in split_list(settings.get("mynetworks", ""))
        mynetworks_text = self._read(opts.mynetworks_file)
        whitelist: frozenset[IpNetwork] = frozenset()
        if not referenced:
            notes.append(
                f"{self.where}: main.cf mynetworks does not reference {opts.mynetworks_file}; "
                "the relay whitelist cannot be read or managed"
            )
        elif mynetworks_text is None:
            notes.append(f"{self.where}: {opts.mynetworks_file} is missing (smtpd cannot start)")
        else:
            whitelist, other = parse_mynetworks(mynetworks_text)
            if other:
                notes.append(f"{opts.mynetworks_file}: entries not managed: {', '.join(other)}")

        alias_map_type, aliases_text, aliases = self._read_aliases(settings, vmailbox, notes)
        return VpsState(
            settings=settings,
            domain_accepted=domain_accepted,
            map_type=map_type,
            vmailbox_text=vmailbox_text,
            vmailbox=vmailbox,
            passwd_text=passwd_text,
            logins=logins,
            messages=messages,
            mynetworks_text=mynetworks_text,
            whitelist=whitelist if referenced else frozenset(),
            whitelist_referenced=referenced,
            notes=tuple(notes),
            alias_map_type=alias_map_type,
            aliases_text=aliases_text,
            aliases=aliases,
        )

    def _read_aliases(
        self, settings: Mapping[str, str], vmailbox: Mapping[str, str], notes: list[str]
    ) -> tuple[str | None, str | None, dict[str, tuple[str, ...]]]:
        """The alias map: one file read, part of the observation's fixed set (the names and
        members of every alias are in it; nothing is looked up per alias)."""
        path = self.options.virtual_aliases
        if path is None:
            return None, None, {}
        map_type = self._map_type(settings, "virtual_alias_maps", path)
        text = self._read(path)
        if map_type is None:
            # Like the whitelist: a file Postfix does not read holds no alias in effect.
            notes.append(
                f"{self.where}: main.cf virtual_alias_maps does not use {path}; aliases "
                "mailrec writes there would not receive mail"
            )
            return None, text, {}
        if text is None:
            notes.append(f"{self.where}: the alias map {path} is missing")
            return map_type, None, {}
        aliases = parse_alias_map(text)
        suffix = "@" + self.domain
        for address, members in sorted(aliases.items()):
            if not address.endswith(suffix):
                continue
            if address in vmailbox:
                notes.append(
                    f"{address} is both an alias and a mailbox: Postfix delivers to the alias's "
                    "members, the mailbox receives none"
                )
            bare = [m for m in members if "@" not in m]
            if bare:
                notes.append(
                    f"{address}: member(s) {', '.join(bare)} are not full addresses (Postfix "
                    "appends myorigin, the VPS's own name)"
                )
        return map_type, text, aliases

    def _domain_accepted(self, settings: Mapping[str, str]) -> bool:
        for item in split_list(settings.get("virtual_mailbox_domains", "")):
            if item.lower() == self.domain:
                return True
            if ":" in item and not item.startswith("/"):
                # A lookup table: one query per table in main.cf, not per user.
                found = self._run(self._postfix("postmap", "-q", self.domain, item), check=False)
                if found.strip():
                    return True
            elif item.startswith("/"):
                try:
                    listed = safe_path(item)
                except UnsafePathError:
                    continue
                listing = self._read(listed) or ""
                names = {
                    token.lower()
                    for line in listing.splitlines()
                    for token in split_list(line.split("#", 1)[0])
                }
                if self.domain in names:
                    return True
        return False

    def _map_type(
        self,
        settings: Mapping[str, str],
        parameter: str = "virtual_mailbox_maps",
        path: str | None = None,
    ) -> str | None:
        """The type of the `parameter` entry naming `path` (default: the mailbox map)."""
        wanted = self.options.vmailbox if path is None else path
        for item in split_list(settings.get(parameter, "")):
            parts = item.split(":")
            if parts[0] == "proxy":
                parts = parts[1:]
            if len(parts) == 2 and parts[1] == wanted:
                kind = parts[0]
                if kind in _INDEXED_TYPES or kind == "texthash":
                    return kind
        return None

    def _message_counts(
        self, vmailbox: Mapping[str, str], notes: list[str]
    ) -> dict[str, int | None]:
        opts = self.options
        domain_dir = posixpath.join(opts.mail_root, self.domain)
        inside: dict[str, str] = {}
        outside: list[str] = []
        for address, value in vmailbox.items():
            rel = posixpath.normpath(value.rstrip("/"))
            prefix = self.domain + "/"
            if value.endswith("/") and rel.startswith(prefix) and ".." not in rel.split("/"):
                inside[address] = rel[len(prefix) :]
            else:
                outside.append(address)
        if outside:
            notes.append(
                f"cannot count messages of {', '.join(sorted(outside))}: not a Maildir under "
                f"{domain_dir}"
            )
        counts: dict[str, int | None] = dict.fromkeys(outside)
        try:
            # One listing for every mailbox of the domain; tmp/ holds deliveries in progress.
            result = self.transport.run(
                [
                    "find",
                    domain_dir,
                    "-type",
                    "f",
                    "(",
                    "-path",
                    "*/new/*",
                    "-o",
                    "-path",
                    "*/cur/*",
                    ")",
                    "-printf",
                    "%P\\0",
                ],
                check=False,
            )
        except TransportError as exc:
            raise ProviderError(f"rental (ssh): {exc}") from exc
        if result.ok:
            counts.update(count_messages(result.stdout, inside))
            return counts
        if not self._exists(domain_dir):
            counts.update(dict.fromkeys(inside, 0))  # no Maildir yet: nothing delivered
            return counts
        notes.append(f"cannot list {domain_dir}: {result.stderr.decode(errors='replace')[-200:]}")
        counts.update(dict.fromkeys(inside))
        return counts

    def _exists(self, path: str) -> bool:
        try:
            return self.transport.run(["test", "-e", path], check=False).ok
        except TransportError as exc:
            raise ProviderError(f"rental (ssh): {exc}") from exc

    # --- changes -----------------------------------------------------------------------
    def _address(self, user: str) -> str:
        if not isinstance(user, str) or not USER_NAME_RE.match(user):
            raise ProviderError(f"{user!r} is not a valid user name")
        return f"{user}@{self.domain}"

    def _maildir(self, user: str) -> tuple[str, str]:
        """The Maildir as the map value (relative to mail_root) and as an absolute path."""
        rel = f"{self.domain}/{user}/"
        return rel, safe_path(posixpath.join(self.options.mail_root, self.domain, user))

    def _owner(self, state: VpsState) -> tuple[int, int]:
        if self.options.mail_owner is not None:
            return self.options.mail_owner
        uid = _STATIC_RE.match(state.settings.get("virtual_uid_maps", ""))
        gid = _STATIC_RE.match(state.settings.get("virtual_gid_maps", ""))
        if not uid or not gid:
            raise ProviderError(
                f"{self.where}: main.cf virtual_uid_maps/virtual_gid_maps are not static:N; "
                "set rental.options.mail_owner to UID:GID of the virtual mail user"
            )
        return int(uid.group(1)), int(gid.group(1))

    def _require_mailbox_setup(self, state: VpsState) -> str:
        problems = []
        if not state.domain_accepted:
            problems.append(f"add {self.domain} to virtual_mailbox_domains in main.cf")
        if state.map_type is None:
            problems.append(f"set virtual_mailbox_maps = hash:{self.options.vmailbox} in main.cf")
        if state.settings.get("virtual_mailbox_base", "").rstrip("/") != self.options.mail_root:
            problems.append(f"set virtual_mailbox_base = {self.options.mail_root} in main.cf")
        if state.passwd_text is None:
            problems.append(
                f"create {self.options.dovecot_passwd} (install -m 0640 -g dovecot /dev/null "
                f"{self.options.dovecot_passwd}) and use it as Dovecot passdb and userdb"
            )
        if problems:
            raise ProviderError(
                f"{self.where} is not set up for mailrec's mailboxes: " + "; ".join(problems)
            )
        assert state.map_type is not None
        return state.map_type

    def create_mailbox(self, user: str) -> None:
        address = self._address(user)
        state = self._read_state()
        map_type = self._require_mailbox_setup(state)
        uid, gid = self._owner(state)
        rel, maildir = self._maildir(user)

        # Order matters: the Maildir and the login exist before Postfix accepts mail for the
        # address, so no message arrives that cannot be stored or read. Each part is skipped
        # when already done, so a run interrupted half-way is completed by the next one.
        self._run(
            [
                "install",
                "-d",
                "-m",
                "0700",
                "-o",
                str(uid),
                "-g",
                str(gid),
                maildir,
                f"{maildir}/cur",
                f"{maildir}/new",
                f"{maildir}/tmp",
            ]
        )
        if address not in state.logins:
            self._add_login(address, state.passwd_text or "", maildir, uid, gid)
        if address not in state.vmailbox:
            text = map_source_with(state.vmailbox_text or "", address, rel)
            self._change_postfix_file(self.options.vmailbox, state.vmailbox_text, text, map_type)
            self._check_lookup(address, map_type, rel)
        after = self._read_state()
        if address not in after.vmailbox or address not in after.logins:
            raise ProviderError(
                f"{self.where}: created {address} but observing again does not show it "
                f"(in map: {address in after.vmailbox}, Dovecot login: {address in after.logins})"
            )
        log.info("%s: mailbox %s ready (Maildir %s)", self.where, address, maildir)

    def _add_login(self, address: str, passwd_text: str, maildir: str, uid: int, gid: int) -> None:
        opts = self.options
        password = secrets.token_urlsafe(18)
        self.transport.add_secret(password)
        secret_file = safe_path(posixpath.join(opts.password_dir, address))
        # Written before the hash, so the file always matches the login that gets created.
        self._run(["install", "-d", "-m", "0700", opts.password_dir])
        self._write(secret_file, password + "\n", mode=0o600, backup=False)
        typed = f"{password}\n".encode()
        # On stdin, never in argv (which `ps` shows); doveadm asks for it twice. `-O`: hashing
        # needs no Dovecot configuration, so none is read (nor needed where it is elsewhere).
        hashed = self._run(
            ["doveadm", "-O", "pw", "-s", "SHA512-CRYPT"], input=typed * 2
        ).strip()
        # The hash is a secret too (an offline guessing target): masked in every log line
        # and error of this transport, and checked here, not with `doveadm pw -t HASH`.
        self.transport.add_secret(hashed)
        if not _HASH_RE.match(hashed):
            raise ProviderError(f"{self.where}: doveadm pw returned no SHA512-CRYPT hash")
        if not verify_sha512_crypt(password, hashed):
            # doveadm retries a mistyped pair with the next lines of stdin, and at its end
            # hashes the empty password: never install a login that is not this password.
            raise ProviderError(
                f"{self.where}: the hash doveadm pw returned does not match the generated "
                "password (did it read the password from stdin?); the login was not added"
            )
        line = f"{address}:{hashed}:{uid}:{gid}::{maildir}::"
        self._write(opts.dovecot_passwd, passwd_with(passwd_text, line), mode=0o640)
        self.initial_password_files[address.split("@")[0]] = secret_file
        log.info(
            "%s: initial password of %s is in %s on that host (mode 0600; hand it over, "
            "then delete it)",
            self.where,
            address,
            secret_file,
        )

    def _check_lookup(
        self, address: str, map_type: str, expected: str, path: str | None = None
    ) -> None:
        table = f"{map_type}:{self.options.vmailbox if path is None else path}"
        found = self._run(self._postfix("postmap", "-q", address, table), check=False).strip()
        if found != expected:
            raise ProviderError(
                f"{self.where}: postmap -q {address} {table} gives {found!r}, expected {expected!r}"
            )

    def _change_postfix_file(
        self, path: str, old: str | None, new: str, map_type: str | None
    ) -> None:
        """Write, compile, check, reload; restore the previous file if any step fails."""
        self._write(path, new, mode=0o644)
        try:
            if map_type in _INDEXED_TYPES:
                self._run(self._postfix("postmap", f"{map_type}:{path}"))
            self._run(self._postfix("postfix", "check"))
            self._run(self._postfix("postfix", "reload"))
        except ProviderError as exc:
            restored = self._restore(path, old, map_type)
            raise ProviderError(
                f"{exc}; {restored} (the rejected version was not kept; the previous one is "
                f"also in {path}.bak)"
            ) from exc

    def _restore(self, path: str, old: str | None, map_type: str | None) -> str:
        try:
            if old is None:
                self._run(["rm", "-f", "--", path])
            else:
                self._write(path, old, mode=0o644, backup=False)
            if map_type in _INDEXED_TYPES and old is not None:
                self._run(self._postfix("postmap", f"{map_type}:{path}"))
            self._run(self._postfix("postfix", "reload"), check=False)
        except ProviderError as exc:
            return f"restoring {path} ALSO FAILED: {exc}"
        return f"restored the previous {path}"

    def create_alias(self, name: str, members: tuple[str, ...]) -> None:
        address = self._address(name)
        wanted = alias_members(address, members)
        path = self.options.virtual_aliases
        if path is None:
            raise ProviderError(
                f"{self.where}: aliases are not managed here: set rental.options."
                "virtual_alias_maps to the alias map source named in main.cf virtual_alias_maps"
            )
        state = self._read_state()
        if address in state.vmailbox or address in state.logins:
            # Postfix looks the alias up first: the mailbox would silently stop receiving mail.
            raise ProviderError(
                f"refusing to create the alias {address} on {self.where}: a mailbox of that "
                "name exists"
            )
        problems = []
        if not state.domain_accepted:
            problems.append(f"add {self.domain} to virtual_mailbox_domains in main.cf")
        if state.alias_map_type is None:
            problems.append(f"set virtual_alias_maps = hash:{path} in main.cf")
        if problems:
            raise ProviderError(
                f"{self.where} is not set up for mailrec's aliases: " + "; ".join(problems)
            )
        assert state.alias_map_type is not None
        if state.aliases.get(address) == wanted:
            return  # already so: apply is idempotent
        value = ", ".join(wanted)
        text = map_source_with(state.aliases_text or "", address, value)
        self._change_postfix_file(path, state.aliases_text, text, state.alias_map_type)
        self._check_lookup(address, state.alias_map_type, value, path)
        after = self._read_state()
        if after.aliases.get(address) != wanted:
            raise ProviderError(
                f"{self.where}: wrote the alias {address} but observing again shows "
                f"{after.aliases.get(address)!r}, expected {wanted!r}"
            )
        log.info("%s: alias %s now delivers to %s", self.where, address, value)

    def delete_mailbox(self, user: str) -> None:
        address = self._address(user)
        state = self._read_state()
        if address not in state.vmailbox and address not in state.logins:
            return
        self._refuse_if_mail(address, state)
        map_type = self._require_mailbox_setup(state)
        rel, maildir = self._maildir(user)
        value = state.vmailbox.get(address)
        if value is not None:
            # Stop accepting mail first, then count again: a message may have arrived
            # between the first count and the reload.
            text = map_source_without(state.vmailbox_text or "", address)
            self._change_postfix_file(self.options.vmailbox, state.vmailbox_text, text, map_type)
            recount = self._read_state()
            if recount.messages.get(address, 0) != 0:
                back = map_source_with(recount.vmailbox_text or "", address, value)
                self._change_postfix_file(
                    self.options.vmailbox, recount.vmailbox_text, back, map_type
                )
                self._refuse_if_mail(address, recount)
            state = recount
        if address in state.logins:
            self._write(
                self.options.dovecot_passwd,
                passwd_without(state.passwd_text or "", address),
                mode=0o640,
            )
        if value == rel and self._exists(maildir):
            # Counted empty: only Dovecot index files are left; keep them aside, not deleted.
            # (Without a map entry the Maildir was never counted, so it stays where it is.)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            self._run(["mv", "-T", "--", maildir, f"{maildir}.removed-{stamp}"])
        secret_file = safe_path(posixpath.join(self.options.password_dir, address))
        self._run(["rm", "-f", "--", secret_file])
        after = self._read_state()
        if address in after.vmailbox or address in after.logins:
            raise ProviderError(f"{self.where}: deleted {address} but it is still there")
        log.info("%s: mailbox %s deleted", self.where, address)

    def _refuse_if_mail(self, address: str, state: VpsState) -> None:
        count = state.messages.get(address, 0)
        if count == 0:
            return
        held = "an unknown number of" if count is None else str(count)
        raise ProviderError(
            f"MR008: mailbox {address} on {self.where} still holds {held} messages; "
            "archive or move them first (e.g. doveadm backup), then retry"
        )

    def set_whitelist(self, add: frozenset[IpNetwork], remove: frozenset[IpNetwork]) -> None:
        for network in add:
            if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
                raise ProviderError(f"{network!r} is not a network")
            if network.prefixlen < _MIN_PREFIX[network.version]:
                raise ProviderError(
                    f"refusing to whitelist {network}: it would let a large part of the "
                    "Internet relay through the rental server without authentication"
                )
        state = self._read_state()
        if not state.whitelist_referenced:
            raise ProviderError(
                f"{self.where}: main.cf mynetworks does not reference "
                f"{self.options.mynetworks_file}; set e.g. mynetworks = 127.0.0.0/8 "
                f"[::1]/128 {self.options.mynetworks_file}"
            )
        wanted = (state.whitelist - remove) | add
        if wanted == state.whitelist and state.mynetworks_text is not None:
            return
        self._change_postfix_file(
            self.options.mynetworks_file, state.mynetworks_text, render_mynetworks(wanted), None
        )
        after = self._read_state()
        if after.whitelist != wanted:
            raise ProviderError(
                f"{self.where}: whitelist is {sorted(map(str, after.whitelist))} after the "
                f"change, expected {sorted(map(str, wanted))}"
            )
        log.info(
            "%s: relay whitelist now %s",
            self.where,
            ", ".join(
                map(str, sorted(wanted, key=lambda n: (n.version, n.network_address, n.prefixlen)))
            )
            or "(empty)",
        )

