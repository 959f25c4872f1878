"""Load the desired state: a YAML file or a directory of them (merged by top-level key), or
the same from a git commit; every error names file, line, column and field.

Nothing is changed anywhere when loading fails: the CLI exits 1 before observing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError

from reconciler.model import DesiredState


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


@dataclass(frozen=True)
class LoadedState:
    state: DesiredState
    files: tuple[str, ...]
    digest: str  # sha256 of the files' bytes: the "file digest" the journal records
    directory: Path


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


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    return yaml


def _parse(text: str, name: str) -> Any:
    try:
        return _yaml().load(text)
    except DuplicateKeyError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else 0
        col = mark.column + 1 if mark else 0
        raise StateError([Problem(name, line, col, "", f"duplicate key: {exc.problem}")]) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        col = mark.column + 1 if mark else 0
        raise StateError(
            [Problem(name, line, col, "", f"YAML syntax: {exc.problem or exc.context}")]
        ) from None


def _position(doc: Any, loc: Iterable[Any]) -> tuple[int, int]:
    """Line/column (1-based) of the deepest node on the path that still exists."""
    node = doc
    line, col = 1, 1
    for key in loc:
        if isinstance(node, CommentedMap) and key in node:
            pos = node.lc.key(key)
            line, col = pos[0] + 1, pos[1] + 1
            node = node[key]
        elif isinstance(node, CommentedSeq) and isinstance(key, int) and key < len(node):
            pos = node.lc.item(key)
            line, col = pos[0] + 1, pos[1] + 1
            node = node[key]
        else:
            break
    return line, col


def _hint(key: str) -> str:
    if key in _KEY_HINTS:
        return f" (did you mean {_KEY_HINTS[key]!r}?)"
    return ""


def _problems(exc: ValidationError, sources: dict[str, tuple[str, Any]]) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        top = str(loc[0]) if loc else ""
        name, doc = sources.get(top, next(iter(sources.values()), ("<state>", None)))
        line, col = _position(doc, loc) if doc is not None else (0, 0)
        field = ".".join(str(p) for p in loc)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown key {loc[-1]!r}{_hint(str(loc[-1]))}"
        elif error["type"] == "missing":
            message = "required field is missing"
        if field == "users" and message.startswith("user name ") and doc is not None:
            # Point at the offending entry, not at `users:`.
            bad = message.split("'")[1] if "'" in message else ""
            line, col = _position(doc, ["users", bad])
        problems.append(Problem(name, line, col, field, message))
    return problems


def load_texts(texts: list[tuple[str, str]]) -> tuple[DesiredState, str]:
    """Merge YAML documents by top-level key and validate. `texts` is [(name, text)]."""
    merged: dict[str, Any] = {}
    sources: dict[str, tuple[str, Any]] = {}
    problems: list[Problem] = []
    digest = hashlib.sha256()
    for name, text in texts:
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        try:
            doc = _parse(text, name)
        except StateError as exc:
            problems.extend(exc.problems)
            continue
        if doc is None:
            continue
        if not isinstance(doc, CommentedMap):
            problems.append(Problem(name, 1, 1, "", "the top level must be a mapping of keys"))
            continue
        for key in doc:
            if key in merged:
                line = doc.lc.key(key)[0] + 1
                first = sources[key][0]
                problems.append(
                    Problem(name, line, 1, str(key), f"defined twice (also in {first})")
                )
                continue
            merged[str(key)] = doc[key]
            sources[str(key)] = (name, doc)
    if problems:
        raise StateError(problems)
    if not merged:
        raise StateError([Problem(texts[0][0] if texts else "<state>", 0, 0, "",
                                  "no desired state found (empty)")])
    try:
        state = DesiredState.model_validate(_plain(merged))
    except ValidationError as exc:
        raise StateError(_problems(exc, sources)) from None
    return state, digest.hexdigest()


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k) if not isinstance(k, int | bool) else k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def state_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise StateError([Problem(str(path), 0, 0, "", "no *.yaml files in this directory")])
        return files
    if not path.exists():
        raise StateError([Problem(str(path), 0, 0, "", "no such file or directory")])
    return [path]


def load_state(path: Path) -> LoadedState:
    files = state_files(path)
    texts = []
    for file in files:
        try:
            texts.append((str(file), file.read_text()))
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError([Problem(str(file), 0, 0, "", f"cannot read: {exc}")]) from None
    state, digest = load_texts(texts)
    directory = path if path.is_dir() else path.parent
    return LoadedState(state, tuple(str(f) for f in files), digest, directory)


def load_from_git(repo: Path, ref: str, subpath: str = "state") -> LoadedState:
    """The desired state as committed at `ref` (for `plan --git-base/--git-head`, daemon)."""
    import git

    try:
        commit = git.Repo(repo, search_parent_directories=True).commit(ref)
    except (git.exc.GitError, ValueError) as exc:
        raise StateError([Problem(f"{repo}@{ref}", 0, 0, "", f"git: {exc}")]) from None
    tree = commit.tree
    try:
        node = tree / subpath if subpath not in ("", ".") else tree
    except KeyError:
        raise StateError(
            [Problem(f"{ref}:{subpath}", 0, 0, "", "no such path in this commit")]
        ) from None
    if node.type == "blob":
        blobs = [node]
    else:
        blobs = sorted(
            (b for b in node.blobs if b.name.endswith((".yaml", ".yml"))), key=lambda b: b.name
        )
    texts = [(f"{ref[:12]}:{b.path}", b.data_stream.read().decode()) for b in blobs]
    if not texts:
        raise StateError([Problem(f"{ref}:{subpath}", 0, 0, "", "no *.yaml files")])
    state, _ = load_texts(texts)
    return LoadedState(state, tuple(t[0] for t in texts), commit.hexsha, repo)
