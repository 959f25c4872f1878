"""The onprem address space, parsed: Postfix's lists and $parameters, domain lists, aliases(5),
virtual(5) tables and the literal rules of regexp/pcre tables. Pure functions over the text
`postconf`, `postalias -s` and `postmap -s` print (or a table's source); read over a host by
`postfix_space.SpaceReader`, and on the lab's files by `lab_onprem.LabSpaceReader`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# The main.cf parameters observe reads, in one `postconf -c DIR -x` ($parameters expanded).
SPACE_PARAMS: tuple[str, ...] = (
    "local_recipient_maps", "transport_maps", "alias_maps", "virtual_alias_maps",
    "virtual_alias_domains", "mydestination", "myhostname", "mydomain", "myorigin",
    "recipient_delimiter", "luser_relay", "fallback_transport",
)
# Table types whose compiled form `postmap -s` / `postalias -s` lists (where Postfix has them).
DUMPABLE_TYPES = frozenset({"hash", "btree", "lmdb", "cdb", "dbm", "sdbm"})
REGEXP_TYPES = frozenset({"regexp", "pcre"})
# Keys postalias adds to every compiled aliases table (sendmail/NIS compatibility).
_ALIAS_SPECIAL_KEYS = frozenset({"@", "yp_last_modified", "yp_master_name"})
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}"
    r"[a-z0-9])?)*\Z", re.ASCII)
_TABLE_RE = re.compile(r"^([a-z][a-z0-9_]*):(.+)\Z", re.ASCII | re.DOTALL)
# A regexp/pcre pattern that matches one address only: ^local@domain$ with escaped dots.
_LITERAL_RE = re.compile(r"^\^((?:[A-Za-z0-9_@-]|\\[.+@_-])+)\$\Z", re.ASCII)


# $name, ${name}, $(name), and ${name?text} / ${name:text} (text if name is set / empty).
_PARAM_REF = re.compile(
    r"\$(?:\{([A-Za-z0-9_]+)(?:([?:])([^{}]*))?\}|\(([A-Za-z0-9_]+)\)|([A-Za-z0-9_]+))")


# What local(8) puts into luser_relay (and forward_path...) at delivery: postconf -x keeps them.
_DELIVERY_VARIABLES = frozenset({"user", "home", "shell", "recipient", "extension", "domain",
                                 "local", "mailbox", "client_address", "client_helo",
                                 "client_hostname", "client_protocol", "sasl_method",
                                 "sasl_sender", "sasl_username", "original_recipient"})


def expand_params(params: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    """`postconf -x` for a Postfix older than 2.10 (CentOS 6 has 2.6), which lacks -x: the
    values of `names` with every $parameter put in, from the whole `postconf` output
    (`params`, defaults included). A parameter Postfix does not know (the legacy
    $virtual_maps of the default virtual_alias_maps) is empty, as -x and Postfix itself take
    it; recursion stops at 20 levels, as loops would."""

    def expand(value: str, depth: int) -> str:
        if depth > 20 or "$" not in value:
            return value

        def one(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(4) or match.group(5)
            if name not in params and name in _DELIVERY_VARIABLES:
                return match.group(0)  # luser_relay = $user@host: local(8) fills it in
            inner = params.get(name, "")
            if match.group(2) == "?":
                return expand(match.group(3), depth + 1) if inner else ""
            if match.group(2) == ":":
                return "" if inner else expand(match.group(3), depth + 1)
            return expand(inner, depth + 1)

        return _PARAM_REF.sub(one, value)

    return {name: expand(params.get(name, ""), 0) for name in names}


def split_list(value: str) -> list[str]:
    """A Postfix list parameter's items: separated by commas and/or whitespace; `{ ... }`
    keeps an item with spaces whole (`inline:{ a=b, c=d }`)."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in value:
        if char == "{":
            depth += 1
        elif char == "}" and depth:
            depth -= 1
        elif depth == 0 and (char == "," or char.isspace()):
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(char)
    if current:
        items.append("".join(current))
    return items


def table_ref(item: str) -> tuple[str, str] | None:
    """`type:name` of a lookup table in a list; None for anything else (a host name, a
    /file/name, an unexpanded $parameter)."""
    if item.startswith("/"):
        return None
    match = _TABLE_RE.match(item)
    return (match.group(1), match.group(2)) if match else None


def is_hostname(name: str) -> bool:
    return bool(_HOSTNAME_RE.match(name))


def parse_domain_list(value: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A domain list (mydestination, virtual_alias_domains) as `postconf -x` prints it: the
    names (lower case, no dot at the end, each once) and the entries mailrec cannot expand
    into names (a lookup table, a /file/name, an unknown $parameter, `!name`, `.domain`)."""
    names: list[str] = []
    unresolved: list[str] = []
    for item in split_list(value):
        name = item.lower().rstrip(".")
        target = names if is_hostname(name) else unresolved
        entry = name if target is names else item
        if entry not in target:
            target.append(entry)
    return tuple(names), tuple(unresolved)


def first_name(text: str) -> str:
    """The name in a file such as Debian's /etc/mailname (`myorigin = /etc/mailname`: its
    first line is the name), lower case, no dot at the end; "" if it holds no host name."""
    for raw in text.splitlines():
        name = raw.strip().lower().rstrip(".")
        if name:
            return name if is_hostname(name) else ""
    return ""


def split_alias_members(value: str) -> tuple[str, ...]:
    """The members of one aliases(5) entry, as written: comma separated; a quoted member
    ("|/usr/bin/procmail", "Sato Taro") loses its quotes, `Name <addr>` gives addr;
    `user`, `user@domain`, `|command`, `/file` and `:include:/path` stay as they are."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    angle = 0
    index = 0
    while index < len(value):
        char = value[index]
        if quoted and char == "\\" and index + 1 < len(value):
            current.append(value[index : index + 2])
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif not quoted and char == "<":
            angle += 1
        elif not quoted and char == ">" and angle:
            angle -= 1
        elif char == "," and not quoted and not angle:
            parts.append("".join(current))
            current = []
            index += 1
            continue
        current.append(char)
        index += 1
    parts.append("".join(current))
    members: list[str] = []
    for part in parts:
        member = part.strip()
        if len(member) >= 2 and member[0] == member[-1] == '"':
            member = re.sub(r"\\(.)", r"\1", member[1:-1]).strip()
        elif not member.startswith('"') and member.endswith(">") and "<" in member:
            member = member[member.rindex("<") + 1 : -1].strip()
        if member and member not in members:
            members.append(member)
    return tuple(members)


def parse_aliases(text: str) -> dict[str, tuple[str, ...]]:
    """aliases(5), or `postalias -s` output (the same `name: value` lines): name (lower
    case, as Postfix looks it up) -> members. A line starting with whitespace continues the
    entry above; # starts a comment line; the first entry of a name wins (postalias warns
    and ignores the others); the keys postalias adds itself (`@`, YP_*) are left out."""
    logical: list[str] = []
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0] in " \t":
            if logical:
                logical[-1] += " " + raw.strip()
            continue
        logical.append(raw.strip())
    aliases: dict[str, tuple[str, ...]] = {}
    for line in logical:
        if line.startswith('"'):
            end = line.find('"', 1)
            rest = line[end + 1 :].lstrip() if end > 0 else ""
            if not rest.startswith(":"):
                continue
            name, value = line[1:end], rest[1:]
        else:
            name, sep, value = line.partition(":")
            if not sep:
                continue  # postalias: "need name:value pair"
        key = name.strip().lower()
        if not key or key in _ALIAS_SPECIAL_KEYS:
            continue
        aliases.setdefault(key, split_alias_members(value))
    return aliases


def split_addresses(value: str) -> tuple[str, ...]:
    """A virtual(5) result: addresses separated by commas and/or whitespace."""
    return tuple(dict.fromkeys(item for item in split_list(value) if item))


def local_virtual_aliases(
    entries: Mapping[str, str], local_names: Iterable[str]
) -> dict[str, tuple[str, ...]]:
    """virtual(5) entries that rewrite names local(8) would otherwise receive: keys
    `x@NAME` for NAME in `local_names` (the domain and mydestination), `@NAME` (the
    catch-all, as local part ""), and a bare `x` (virtual(5): x@ any local domain; a key
    with a dot and no @ is taken as a virtual alias domain instead). Local part -> members;
    the same local part at two names gets the members of both."""
    names = set(local_names)
    found: dict[str, tuple[str, ...]] = {}
    for key, value in entries.items():
        local, at, domain = key.rpartition("@")
        if at and domain not in names:
            continue
        if not at and "." in key:
            continue  # a domain key (virtual_alias_domains = $virtual_alias_maps)
        name = local if at else key
        found[name] = tuple(dict.fromkeys((*found.get(name, ()), *split_addresses(value))))
    return found


def virtual_domain_keys(entries: Mapping[str, str]) -> tuple[str, ...]:
    """Keys without @ that are domain names (a dot in them, as `local_virtual_aliases`
    reads them): the domains of a virtual alias table that virtual_alias_domains (default
    $virtual_alias_maps) names."""
    return tuple(name for name in (k.rstrip(".") for k in entries)
                 if "@" not in name and "." in name and is_hostname(name))


def regexp_literals(text: str) -> dict[str, str] | None:
    """A regexp:/pcre: table whose every rule matches one address (`/^sales@example\\.co\\.jp$/
    suga`) as `key value` entries; None when any rule is a real pattern (or uses if/endif,
    a back-reference, `!`): then the names it matches are unknown."""
    entries: dict[str, str] = {}
    logical: list[str] = []
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0] in " \t" and logical:
            logical[-1] += " " + raw.strip()
        else:
            logical.append(raw.strip())
    for line in logical:
        if not line.startswith("/"):
            return None
        end = line.find("/", 1)
        if end < 0:
            return None
        pattern, rest = line[1:end], line[end + 1 :]
        flags, _, result = rest.partition(" ")
        match = _LITERAL_RE.match(pattern)
        if match is None or flags.strip() not in ("", "i") or "$" in result or not result.strip():
            return None
        key = re.sub(r"\\(.)", r"\1", match.group(1)).lower()
        entries.setdefault(key, result.strip())
    return entries


