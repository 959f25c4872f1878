"""The onprem address space on a real host: every name the Postfix receives for besides its
users' `user@domain`, read over a `Transport` in a number of commands that depends on the
configuration only (one per configured table), never on the number of users or aliases.

Used by `postfix_host.PostfixHost.observe`, which runs the one `postconf -c DIR -x` of
`SPACE_PARAMS` and hands its values here. What this module adds:
  read /etc/login.defs                       UID_MIN/UID_MAX, unless onprem.uid_range is set
  read MYORIGIN_FILE                         only when myorigin is a path (Debian's
                                             /etc/mailname: its first line is the name)
  postalias -c DIR -s TYPE:PATH              per alias_maps table of a type it can list
  postmap -c DIR -s TYPE:PATH                per virtual_alias_maps table (not mailrec's own)
  read PATH                                  per texthash:, regexp: or pcre: table
Tables it cannot list (ldap:, mysql:, pgsql:, nis:, inline:, static:..., or a listing that
fails: a missing .db) are reported as `unreadable`: their names are unknown, and the planner
fails closed on them. `proxy:TYPE:PATH` is read as TYPE:PATH (proxymap serves the same table).
The pure parsers are in `drivers/postfix.py`; `mailbox_homes` picks the accounts whose
mailboxes observe's one mailbox scan counts.
"""

from __future__ import annotations

import posixpath
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final, Literal, get_args

from reconciler.drivers.postfix import (
    DEFAULT_UID_RANGE,
    Account,
    AddressSpace,
    PostfixError,
    parse_login_defs,
    parse_map,
)
from reconciler.drivers.postfix_mailbox import MailboxSpec
from reconciler.drivers.postfix_names import (
    DUMPABLE_TYPES,
    REGEXP_TYPES,
    first_name,
    local_virtual_aliases,
    parse_aliases,
    parse_domain_list,
    regexp_literals,
    split_alias_members,
    split_list,
    table_ref,
    virtual_domain_keys,
)
from reconciler.model import USER_NAME_RE
from reconciler.transport import (
    CommandResult,
    Transport,
    TransportError,
    UnsafePathError,
    safe_path,
)

LOGIN_DEFS: Final = "/etc/login.defs"
# Where homes of people are when passwd has none in the uid range yet.
HOME_BASE: Final = "/home"
# The Postfix programs mailrec runs; each reads main.cf, so each names the instance's config
# directory: `-c config_dir`, except Postfix's sendmail, whose option is `-C config_dir`
# (sendmail's own -c means something else, and Postfix's sendmail has none).
PostfixProgram = Literal["postconf", "postmap", "postalias", "postfix", "postqueue", "postsuper",
                         "sendmail"]
POSTFIX_PROGRAMS: Final = frozenset(get_args(PostfixProgram))


def config_option(program: PostfixProgram) -> str:
    """The option that names the config directory: `-C` for sendmail, `-c` for the rest."""
    return "-C" if program == "sendmail" else "-c"


def postfix_argv(program: PostfixProgram, config_dir: str, *args: str) -> list[str]:
    """A Postfix command of one instance: `-c DIR` (sendmail: `-C DIR`) right after the
    program, always."""
    return [program, config_option(program), config_dir, *args]


def _unwrap(ref: str) -> tuple[str, str] | None:
    """(type, name) of a table reference, `proxy:` taken off (proxymap reads the same
    table); None when it is not a table reference."""
    parsed = table_ref(ref)
    if parsed is not None and parsed[0] == "proxy":
        parsed = table_ref(parsed[1])
    return parsed


def _normalized(ref: str) -> str | None:
    """"type:name" as `_tables` keys a table (proxy: off, a path normalised), or None."""
    parsed = _unwrap(ref)
    if parsed is None:
        return None
    kind, name = parsed
    if name.startswith("/"):
        try:
            name = safe_path(name)
        except UnsafePathError:
            return None
    return f"{kind}:{name}"


@dataclass(frozen=True)
class _Listed:
    """The tables of one map list as read: "type:path" -> (type, text), and the tables that
    could not be read."""

    texts: dict[str, tuple[str, str]]
    unreadable: tuple[str, ...]


class SpaceReader:
    """Reads the tables and files main.cf names, on the host behind `transport`."""

    def __init__(self, transport: Transport, config_dir: str) -> None:
        self.transport = transport
        self.config_dir = config_dir

    def _read(self, path: str) -> bytes | None:
        try:
            return self.transport.read_file(safe_path(path))
        except UnsafePathError:
            return None
        except TransportError as exc:
            raise PostfixError(f"read {path}: {exc}") from exc

    def _list(self, program: PostfixProgram, table: str) -> CommandResult:
        argv = postfix_argv(program, self.config_dir, "-s", table)
        try:
            return self.transport.run(argv, check=False)
        except TransportError as exc:
            raise PostfixError(f"{program} -s {table}: {exc}") from exc

    # --- single values ---------------------------------------------------------------------
    def uid_range(self, configured: tuple[int, int] | None) -> tuple[int, int]:
        """People's uids: the state's onprem.uid_range, else the host's login.defs (one
        read; a missing file is fine), else mailrec's default."""
        if configured is not None:
            return configured
        data = self._read(LOGIN_DEFS)
        found = parse_login_defs(data.decode("utf-8", "replace")) if data else None
        return found or DEFAULT_UID_RANGE

    def myorigin(self, value: str) -> tuple[str, str | None]:
        """myorigin as a name, and the entry to report unresolved when it cannot be one.

        Debian's Postfix reads a myorigin that is a path (`/etc/mailname`) as a file whose
        first line is the name; `postconf -x` prints the path, so the file is read here."""
        value = value.strip()
        if value.startswith("/"):
            data = self._read(value)
            name = first_name(data.decode("utf-8", "replace")) if data else ""
            return name, None if name else value
        name = value.lower().rstrip(".")
        return name, None

    # --- tables ------------------------------------------------------------------------------
    def _tables(self, value: str, program: PostfixProgram, skip: Collection[str]) -> _Listed:
        """Each table of a map list: listed by `program -s` (compiled types) or read (source
        types), else unreadable. Tables in `skip` are left out."""
        texts: dict[str, tuple[str, str]] = {}
        unreadable: list[str] = []
        for ref in split_list(value):
            parsed = _unwrap(ref)
            if parsed is None:
                unreadable.append(ref)
                continue
            kind, name = parsed
            if kind in DUMPABLE_TYPES or kind == "texthash" or kind in REGEXP_TYPES:
                try:
                    name = safe_path(name)
                except UnsafePathError:
                    unreadable.append(ref)
                    continue
            table = f"{kind}:{name}"
            if table in skip or ref in skip or table in texts:
                continue
            text: str | None = None
            if kind in DUMPABLE_TYPES:
                result = self._list(program, table)
                text = result.text if result.ok else None
            elif kind == "texthash" or kind in REGEXP_TYPES:
                data = self._read(name)
                text = data.decode("utf-8", "replace") if data is not None else None
            # Anything else (ldap:, mysql:, nis:, inline:, static:, unionmap:...) stays None.
            if text is None:
                unreadable.append(ref)
            else:
                texts[table] = (kind, text)
        return _Listed(texts, tuple(unreadable))

    def read(self, params: Mapping[str, str], domain: str, *, uid_range: tuple[int, int],
             own_tables: Collection[str]) -> AddressSpace:
        """The address space from `postconf -x` values (`params`, SPACE_PARAMS), reading the
        tables they name; `own_tables` (mailrec's virtual map) are not the admin's. Mailbox
        counts (other_accounts, stray_mail) are filled in by the caller."""
        local_domains, unresolved = parse_domain_list(params.get("mydestination", ""))
        unresolved_list = list(unresolved)
        myorigin, bad_origin = self.myorigin(params.get("myorigin", ""))
        if bad_origin:
            unresolved_list.append(bad_origin)
        names = (domain, *local_domains)

        unreadable: list[str] = []
        aliases: dict[str, tuple[str, ...]] = {}
        alias_tables = self._tables(params.get("alias_maps", ""), "postalias", ())
        unreadable.extend(alias_tables.unreadable)
        for table, (kind, text) in alias_tables.texts.items():
            found = _alias_table(kind, text)
            if found is None:
                unreadable.append(table)
                continue
            for key, members in found.items():
                aliases.setdefault(key, members)  # the first table that has a name wins

        virtual_tables = self._tables(params.get("virtual_alias_maps", ""), "postmap",
                                      own_tables)
        unreadable.extend(virtual_tables.unreadable)
        virtual_entries: dict[str, dict[str, str]] = {}
        virtual_aliases: dict[str, tuple[str, ...]] = {}
        for table, (kind, text) in virtual_tables.texts.items():
            entries = regexp_literals(text) if kind in REGEXP_TYPES else parse_map(text)
            if entries is None:
                unreadable.append(table)
                continue
            virtual_entries[table] = entries
            for key, members in local_virtual_aliases(entries, names).items():
                virtual_aliases.setdefault(key, members)

        # virtual_alias_domains (default: $virtual_alias_maps): names, and tables whose keys
        # without @ are the domains; a table not listed above is listed on its own.
        domains, domain_refs = parse_domain_list(params.get("virtual_alias_domains", ""))
        virtual_domains = list(domains)
        other_refs = []
        for ref in domain_refs:
            normal = _normalized(ref)
            if normal is None:
                unreadable.append(ref)  # a /file/name or an unknown $parameter
            elif normal in virtual_entries:
                virtual_domains.extend(virtual_domain_keys(virtual_entries[normal]))
            elif normal not in own_tables and ref not in unreadable and normal not in unreadable:
                other_refs.append(ref)
        domain_tables = self._tables(" ".join(other_refs), "postmap", ())
        unreadable.extend(domain_tables.unreadable)
        for table, (kind, text) in domain_tables.texts.items():
            entries = regexp_literals(text) if kind in REGEXP_TYPES else parse_map(text)
            if entries is None:
                unreadable.append(table)
            else:
                virtual_domains.extend(virtual_domain_keys(entries))
        return AddressSpace(
            local_domains=local_domains,
            unresolved=tuple(dict.fromkeys(unresolved_list)),
            myorigin=myorigin,
            recipient_delimiter=params.get("recipient_delimiter", ""),
            aliases=aliases,
            virtual_aliases=virtual_aliases,
            virtual_alias_domains=tuple(dict.fromkeys(virtual_domains)),
            luser_relay=params.get("luser_relay", ""),
            fallback_transport=params.get("fallback_transport", ""),
            local_recipient_maps=params.get("local_recipient_maps", ""),
            uid_range=uid_range,
            unreadable=tuple(dict.fromkeys(unreadable)),
        )


def _alias_table(kind: str, text: str) -> dict[str, tuple[str, ...]] | None:
    """An alias table's names -> members: `postalias -s` output or an aliases(5) source;
    a regexp:/pcre: table only when every rule matches one name."""
    if kind not in REGEXP_TYPES:
        return parse_aliases(text)
    literals = regexp_literals(text)
    if literals is None:
        return None
    return {key: split_alias_members(value) for key, value in literals.items()}


@dataclass(frozen=True)
class MailboxHomes:
    """The accounts observe's one mailbox scan counts, in three disjoint groups."""

    people: dict[str, str]  # users in the uid range, not archived by mailrec -> home
    others: dict[str, str]  # accounts outside the range (root, system, a uid-500 user)
    strays: dict[str, str]  # users on mailrec's removed list: is their mailbox back?

    def all(self) -> dict[str, str]:
        return {**self.people, **self.others, **self.strays}


def mailbox_homes(accounts: Mapping[str, Account], uid_range: tuple[int, int],
                  removed: Collection[str], spec: MailboxSpec) -> MailboxHomes:
    """Split passwd's accounts for the one mailbox scan.

    For a home-relative layout (`maildir:~/Maildir`) the scan starts at the directory each
    home hangs off, so a home right under / (/root, /nonexistent, or / itself, as Debian's
    dynamic system users in 996-999 have) would make it walk the whole file system, /proc
    included, and fail: such an account is left out, whatever its uid (a person's home
    belongs in a directory of homes). Other accounts (outside the uid range) are counted only
    where their home sits beside people's homes (or under /home): system accounts' homes
    (/var/lib/x, /usr/sbin) are not walked on every observation. For a spool layout
    (`mbox:/var/mail/{user}`) every account is counted.
    """
    first, last = uid_range

    def home_of(name: str, account: Account) -> str | None:
        try:
            home = safe_path(account.home)
            spec.path_for(name, home)
        except (UnsafePathError, PostfixError):
            return None
        if spec.home_relative and posixpath.dirname(home) == "/":
            return None  # also home == "/"
        return home

    people: dict[str, str] = {}
    strays: dict[str, str] = {}
    others: dict[str, str] = {}
    rest: dict[str, str] = {}
    for name, account in accounts.items():
        person = first <= account.uid <= last and bool(USER_NAME_RE.match(name))
        home = home_of(name, account)
        if home is None:
            if person and account.home.rstrip("/") and posixpath.dirname(account.home) != "/":
                people[name] = account.home  # an unsafe path: the scan refuses it (fail closed)
            continue
        if name in removed:
            strays[name] = home
        elif person:
            people[name] = home
        else:
            rest[name] = home
    parents = {posixpath.dirname(home) for home in people.values()} | {HOME_BASE}
    for name, home in rest.items():
        if not spec.home_relative or posixpath.dirname(home) in parents:
            others[name] = home
    return MailboxHomes(people, others, strays)
