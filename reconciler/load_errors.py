"""How a state that cannot be loaded is worded: `Problem` (file, line, column, field,
message), `StateError`, the place of a path in a parsed YAML document, and pydantic's
validation errors turned into problems with did-you-mean hints. `load.py` reads and parses;
this module explains.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from reconciler.model import FIELD_ERROR, DesiredState


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    column: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


class StateError(ValueError):
    """The state cannot be loaded; `problems` lists each one with its place."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


_KEY_HINTS = {
    "user": "users",
    "mx_target": "dns.mx",
    "whitelists": "rental.whitelist",
    "max_change_percent": "policy.max_change_pct",
    "quiet": "policy.quiet_period",
    "cutover-ttl": "cutover_ttl",
    "inbond": "inbound",
    "outbond": "outbound",
}


def position(doc: Any, loc: Iterable[Any]) -> tuple[int, int]:
    """Line/column (1-based) of the deepest node on the path that still exists."""
    node = doc
    line, col = 1, 1
    for key in loc:
        try:
            if isinstance(node, CommentedMap) and key in node:
                pos = node.lc.key(key)
            elif isinstance(node, CommentedSeq) and isinstance(key, int) and key < len(node):
                pos = node.lc.item(key)
            else:
                break
        except (KeyError, IndexError, TypeError):  # a key merged in with <<: has no place here
            break
        line, col = pos[0] + 1, pos[1] + 1
        node = node[key]
    return line, col


def _model_at(loc: Iterable[Any]) -> type[BaseModel] | None:
    """The model class whose keys are valid at `loc` (a path into DesiredState), if any."""
    current: Any = DesiredState
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _unwrap(field.annotation)
        # dict[str, Model] / list[Model]: the next part is a key or an index.
        origin = typing.get_origin(current)
        if origin in (dict, list):
            if not parts:
                return None
            parts.pop(0)
            current = _unwrap(typing.get_args(current)[-1])
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _unwrap(annotation: Any) -> Any:
    """`Model | None` -> Model (the model member of a union, if any)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if models else (members[0] if len(members) == 1 else annotation)
    return annotation


def _all_paths(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """Every key the schema knows, as key -> dotted path (for "did you mean" across sections)."""
    paths: dict[str, str] = {}
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        paths.setdefault(name, dotted)
        inner = _unwrap(field.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            for key, path in _all_paths(inner, f"{dotted}.").items():
                paths.setdefault(key, path)
    return paths


def _hint(key: str, parent: Iterable[Any] = ()) -> str:
    if key in _KEY_HINTS:
        return f" (did you mean {_KEY_HINTS[key]!r}?)"
    model = _model_at(parent)
    if model is None:
        return ""
    known = list(model.model_fields)
    normal = key.lower().replace("-", "_").strip()
    if normal in known:
        return f" (did you mean {normal!r}?)"
    close = difflib.get_close_matches(normal, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    elsewhere = _all_paths(DesiredState).get(normal)
    if elsewhere and "." in elsewhere:
        return f" (did you mean {elsewhere!r}? it belongs in that section)"
    return f" (known keys here: {', '.join(known)})"


def validation_problems(exc: ValidationError, sources: dict[str, tuple[str, Any]]) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        ctx = error.get("ctx") or {}
        if error["type"] == FIELD_ERROR and ctx.get("field"):
            blamed = ctx["field"]  # a model check blaming one of its fields (or a path)
            loc.extend(blamed if isinstance(blamed, tuple | list) else [blamed])
        is_key = bool(loc) and loc[-1] == "[key]"
        if is_key:
            loc.pop()
        top = str(loc[0]) if loc else ""
        name, doc = sources.get(top, next(iter(sources.values()), ("<state>", None)))
        line, col = position(doc, loc) if doc is not None else (0, 0)
        # A control character in a key (a user "suga\n") is shown escaped, on one line.
        field = "".join(c if c.isprintable() else repr(c)[1:-1]
                        for c in ".".join(str(p) for p in loc))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown key {loc[-1]!r}{_hint(str(loc[-1]), loc[:-1])}"
        elif error["type"] == "missing":
            message = "required field is missing"
        elif loc == ["version"]:
            message = f"unsupported version {error['input']!r}: this mailrec reads version: 1"
        elif is_key and loc[:1] == ["users"] and len(loc) == 2:
            value = error["input"]
            kind = ("true/false" if isinstance(value, bool) else
                    "number" if isinstance(value, int | float) else type(value).__name__)
            message = f"user name {value!r} was read as a {kind}, not text: put it in quotes"
        problems.append(Problem(name, line, col, field, message))
    return problems
