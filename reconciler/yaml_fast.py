"""The fast path for reading a state file: rapidyaml (a C++ YAML parser) reads the text and
emits JSON, and Python's C JSON decoder builds the data, about 100x faster than ruamel's
round-trip loader on a 10,000-user file (0.02 s instead of 4.5 s).

It is only a shortcut. `fast_load` returns the document when it can prove that ruamel's
round-trip loader (YAML 1.2, the reference `load.py` uses) would give exactly the same data,
and None whenever it cannot; then `load.py` parses the slow way, and that path alone makes
every error message (file, line, column, field, hint). So the fast path never changes what a
state means and never words an error; at worst it is not taken.

What makes it decline (None):
- any character where the two parsers may disagree or ruamel adds meaning: anchors, aliases,
  tags, directives (`& * ! %`), complex keys (`?`), merge keys (`<<`), a second document,
  tabs, carriage returns, a byte-order mark, control characters and the Unicode line
  breaks ruamel honours (NEL, LS, PS). A `"*"` inside quotes also declines: cheap to check
  and harmless, the slow path reads it;
- anything rapidyaml cannot parse (its message is swallowed: the slow path explains);
- a duplicate key in any mapping (the slow path names both lines);
- a scalar whose type could differ: every string, key or value, is run through ruamel's own
  YAML 1.2 implicit resolvers and must resolve to a string (so `~`, `True`, `0x1f`, `010`,
  `1_000`, `2001-12-14`, `.inf`, even a quoted "010", decline); numbers must be plain
  decimal integers or decimal fractions that ruamel also reads as int / float;
- nesting deeper than `yaml_guard.MAX_DEPTH`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import cache
from typing import Any

from reconciler.yaml_guard import MAX_DEPTH

# Characters and sequences that send a file to the slow path (see the module docstring).
_DECLINE_CHARACTER = re.compile(
    r"[\t\r\ufeff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]")
_DECLINE_INDICATOR = re.compile(r"[&*!%?]|<<|^(?:---|\.\.\.)|(?:^|[\s[{,:])[@`]", re.MULTILINE)
# A line holding a flow collection (`[`, `]`, `{`, `}` anywhere on it) is read fast only when
# it is one of the simple shapes a state file uses: `key: {k: v, k: v}` or `key: [a, b]`
# (also as a list item), scalars plain (no spaces, quotes, '#', no ':' before a space or a
# flow indicator: `file:/etc/x` is one scalar) or quoted (no
# backslashes), then at most a comment. rapidyaml is more lenient than ruamel inside flow
# collections (a '#' in `{b: c #x, d: e}`, a bare `a: ]`): such lines go the exact way.
_FLOW_SCALAR = (r"""(?:[A-Za-z0-9_](?:[A-Za-z0-9_.@+/=-]|:(?=[A-Za-z0-9_.@+/=-]))*"""
                r"""|'(?:[^'\n]|'')*'|"[^"\\\n]*")""")
_FLOW_LINE = re.compile(
    rf"[ ]*(?:-[ ]+)?(?:{_FLOW_SCALAR}[ ]*:[ ]+)?"
    rf"(?:\{{[ ]*{_FLOW_SCALAR}[ ]*:[ ]+{_FLOW_SCALAR}(?:[ ]*,[ ]*{_FLOW_SCALAR}[ ]*:[ ]+"
    rf"{_FLOW_SCALAR})*[ ]*\}}"
    rf"|\[[ ]*(?:{_FLOW_SCALAR}(?:[ ]*,[ ]*{_FLOW_SCALAR})*)?[ ]*\])"
    r"(?:[ ]+#.*)?[ ]*")
_FLOW_CHARACTER_LINE = re.compile(r"^.*[\[\]{}].*$", re.MULTILINE)
# A line whose first non-blank character is "#" holds no syntax of either parser: it is a
# comment, or text inside a block or quoted scalar, where indicators are plain characters.
_COMMENT_LINE = re.compile(r"^[ ]*#.*$", re.MULTILINE)
_DECIMAL_INT = re.compile(r"-?(?:0|[1-9][0-9]*)\Z")
_DECIMAL_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]*)\.[0-9]+(?:[eE][-+]?[0-9]+)?\Z")
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"

# rapidyaml reports a parse error on the process's stderr (C++), before raising: while it
# parses, file descriptor 2 points at a temporary file, and what another thread wrote there
# meanwhile is passed on. One parse at a time.
_STDERR_LOCK = threading.Lock()

Resolvers = dict[str, list[tuple[str, re.Pattern[str]]]]


class _Decline(Exception):
    """The fast path cannot prove it reads the text as ruamel does."""


@cache
def _resolvers() -> Resolvers:
    """ruamel's YAML 1.2 implicit resolvers, keyed by first character ('' for empty)."""
    from ruamel.yaml.resolver import VersionedResolver

    table: Resolvers = VersionedResolver(
        version=(1, 2)).versioned_resolver
    return table


@cache
def _ryml() -> Any:
    """The rapidyaml module, or None where it is not installed (the slow path then)."""
    try:
        import ryml
    except ImportError:
        return None
    return ryml


def available() -> bool:
    return _ryml() is not None


def fast_load(text: str) -> Any | None:
    """The document in `text` as plain data (dicts, lists, str, int, float, bool, None), or
    None when it cannot be read here with the certainty of meaning ruamel's (see above).
    An empty document also gives None: the slow path decides what that means."""
    ryml = _ryml()
    if ryml is None or not text.strip() or _DECLINE_CHARACTER.search(text):
        return None
    syntax = _COMMENT_LINE.sub("", text)
    # The regex only where one of its characters occurs at all (a 6 MB file: 1 ms, not 160).
    if (any(c in syntax for c in ("&", "*", "!", "%", "?", "@", "`", "<<", "---", "..."))
            and _DECLINE_INDICATOR.search(syntax)):
        return None
    if any(not _FLOW_LINE.fullmatch(line.group())
           for line in _FLOW_CHARACTER_LINE.finditer(syntax)):
        return None
    try:
        emitted = _emit_json(ryml, text.encode("utf-8"))
        if emitted is None:
            return None
        resolvers = _resolvers()
        data = json.loads(
            emitted,
            object_pairs_hook=_mapping_checker(resolvers),
            parse_int=_number(resolvers, _DECIMAL_INT, _INT_TAG, int),
            parse_float=_number(resolvers, _DECIMAL_FLOAT, _FLOAT_TAG, float),
            parse_constant=_no_constant,
        )
        if not isinstance(data, dict):
            return None  # not a mapping: the slow path says where and why
        _check_values(data, resolvers)
    except (_Decline, ValueError, RecursionError):
        return None
    return data


def _emit_json(ryml: Any, source: bytes) -> str | None:
    with _STDERR_LOCK:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                tree = ryml.parse_in_arena(source)
                emitted: str | None = ryml.emit_json_malloc(tree, tree.root_id())
            except Exception:
                emitted = None  # a syntax error: the slow path words it
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            capture.seek(0)
            others = capture.read()
        if others and emitted is not None:
            os.write(2, others)  # not rapidyaml's: someone else's output, passed on
    return emitted


def _string_may_change(value: str, resolvers: Resolvers) -> bool:
    patterns = resolvers.get(value[:1])  # most strings start where no resolver does
    return patterns is not None and any(pattern.match(value) for _, pattern in patterns)


def _mapping_checker(resolvers: Resolvers
                     ) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        mapping = dict(pairs)
        if len(mapping) != len(pairs):
            raise _Decline("duplicate key")
        for key in mapping:
            if key[:1] in resolvers and _string_may_change(key, resolvers):
                raise _Decline(f"key {key!r} may not be a string to ruamel")
        return mapping
    return build


def _number(resolvers: Resolvers, shape: re.Pattern[str],
            tag: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(token: str) -> Any:
        if not shape.match(token):
            raise _Decline(f"number {token!r}")
        resolved = next((t for t, pattern in resolvers.get(token[:1], ())
                         if pattern.match(token)), None)
        if resolved != tag:
            raise _Decline(f"number {token!r} is {resolved} to ruamel")
        return convert(token)
    return parse


def _no_constant(token: str) -> Any:
    raise _Decline(f"constant {token}")


def _check_values(data: dict[str, Any], resolvers: Resolvers) -> None:
    """Every string value resolves to a string in ruamel, and the nesting is within
    MAX_DEPTH (keys were checked as the mappings were built)."""
    checked: set[str] = set()  # values repeat (inbound: onprem, ...): each is checked once
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _Decline("too deep")
        values = node.values() if isinstance(node, dict) else node
        for value in values:
            if isinstance(value, str):
                if value not in checked:
                    if _string_may_change(value, resolvers):
                        raise _Decline(f"value {value!r} may not be a string to ruamel")
                    checked.add(value)
            elif isinstance(value, dict | list):
                stack.append((value, depth + 1))
