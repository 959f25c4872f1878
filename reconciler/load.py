"""Load the desired state: a YAML file or a directory of them (merged by top-level key), or
the same from a git commit; every error names file, line, column and field.

The flow: read the files here -> `yaml_guard` composes each and checks its size, depth and
alias expansion -> construct -> merge by top-level key -> pydantic (`model`) validates; the
errors of every stage become `Problem`s (worded in `load_errors`: positions, did-you-mean
hints); the fast path (`yaml_fast`) is taken where it reads the same.

Nothing is changed anywhere when loading fails: the CLI exits 1 before observing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, SequenceNode

from reconciler import yaml_fast, yaml_guard
from reconciler.load_errors import Problem as Problem  # re-exported: part of load's API
from reconciler.load_errors import StateError as StateError
from reconciler.load_errors import position, validation_problems
from reconciler.model import DesiredState
from reconciler.yaml_guard import MAX_ALIAS_NODES as MAX_ALIAS_NODES  # re-exported (was here)
from reconciler.yaml_guard import MAX_DEPTH as MAX_DEPTH  # re-exported (was defined here)
from reconciler.yaml_guard import MAX_FILE_BYTES, LimitExceeded, too_large

# Source of each top-level key: key -> (file name, the parsed document holding it).
Sources = Mapping[str, tuple[str, Any]]


@dataclass(frozen=True)
class LoadedState:
    state: DesiredState
    files: tuple[str, ...]
    digest: str  # sha256 of the files' bytes: the "file digest" the journal records
    directory: Path
    sources: Sources = dataclass_field(default_factory=dict, compare=False, repr=False)
    author: str = ""  # of the commit, for a state read from git: who the journal says applied

    def locate(self, dotted_path: str) -> str | None:
        """Where a key of the state is, as "file:line" (e.g. of "rental.whitelist.0" or
        "users.suga"): the deepest part of the path that exists; None when its top-level
        section is in no loaded file."""
        parts = dotted_path.split(".")
        source = self.sources.get(parts[0])
        if source is None:
            return None
        name, doc = source
        loc: list[Any] = [int(p) if p.isdigit() else p for p in parts]
        # A user name may contain dots: prefer the longest key that exists at each level.
        line, _ = position(doc, _join_dotted_keys(doc, loc))
        return f"{name}:{line}"


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    return yaml_guard.limit_depth(yaml)


def _compose_and_construct(text: str, name: str) -> Any:
    """YAML.load, with the limits (`yaml_guard`) checked between composing and constructing."""
    yaml = _yaml()
    try:
        node = yaml_guard.compose(yaml, text)
    except LimitExceeded as exc:
        raise StateError([Problem(name, exc.line, exc.column, "", exc.message)]) from None
    if node is None:
        return None
    complex_key = _complex_key(node)
    if complex_key is not None:
        mark = complex_key.start_mark
        raise StateError([Problem(name, mark.line + 1, mark.column + 1, "",
                                  "a key must be a plain value, not a mapping or a list")])
    return yaml.constructor.construct_document(node)


def _complex_key(root: Node) -> Node | None:
    """The first mapping key that is itself a mapping or a list (`? {a: 1}`), which no state
    has and ruamel cannot construct."""
    stack = [root]
    seen: set[int] = set()  # an aliased node is one object: visit it once
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, MappingNode):
            for key, value in node.value:
                if isinstance(key, MappingNode | SequenceNode):
                    return key
                stack.append(value)
        elif isinstance(node, SequenceNode):
            stack.extend(node.value)
    return None


def _parse(text: str, name: str) -> Any:
    try:
        return _compose_and_construct(text, name)
    except DuplicateKeyError as exc:
        # Never show ruamel's message: it quotes both values, and the value may be a secret.
        mark = exc.problem_mark
        line = mark.line + 1 if mark else 0
        col = mark.column + 1 if mark else 0
        path, first = _duplicate_key(text, mark.line, mark.column) if mark else ([], 0)
        key = path[-1] if path else "?"
        also = f" (first defined at line {first})" if first else ""
        raise StateError([Problem(name, line, col, ".".join(path),
                                  f"duplicate key {key!r}{also}")]) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if "end of stream" in problem and exc.context_mark is not None and exc.context:
            # e.g. an unclosed quote: the end of the file says little, where it began does.
            mark = exc.context_mark
            problem = ("a quoted value that starts here is never closed"
                       if "quoted scalar" in exc.context
                       else f"{exc.context.removeprefix('while ')} that starts here never ends")
        elif exc.context and exc.context_mark is not None and mark is not exc.context_mark:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        if "'\\t'" in problem:
            problem = "a tab character: YAML indents with spaces, never tabs"
        line = mark.line + 1 if mark else 0
        col = mark.column + 1 if mark else 0
        raise StateError([Problem(name, line, col, "", f"YAML syntax: {problem}")]) from None
    except YAMLError as exc:  # unmarked errors (e.g. bad encoding); keep the source out of it
        raise StateError([Problem(name, 0, 0, "", f"YAML: {type(exc).__name__}")]) from None


def _duplicate_key(text: str, line: int, column: int) -> tuple[list[str], int]:
    """The dotted path of the duplicated key at (line, column), 0-based, and the 1-based line
    of its first definition (0 if not found)."""
    try:
        root = _yaml().compose(text)
    except YAMLError:
        return [], 0

    def walk(node: Node | None, path: list[str]) -> tuple[list[str], int] | None:
        if isinstance(node, MappingNode):
            for key, value in node.value:
                mark = key.start_mark
                if mark.line == line and mark.column == column:
                    first = next(
                        (k.start_mark.line + 1 for k, _ in node.value if k.value == key.value), 0
                    )
                    return [*path, str(key.value)], first
                found = walk(value, [*path, str(key.value)])
                if found is not None:
                    return found
        elif isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                found = walk(item, [*path, str(index)])
                if found is not None:
                    return found
        return None

    return walk(root, []) or ([], 0)


def _join_dotted_keys(doc: Any, parts: list[Any]) -> list[Any]:
    """["users", "a", "b"] -> ["users", "a.b"] when the mapping has the key "a.b"."""
    result: list[Any] = []
    node = doc
    index = 0
    while index < len(parts):
        taken = 1
        if isinstance(node, CommentedMap):
            for end in range(len(parts), index + 1, -1):
                joined = ".".join(str(p) for p in parts[index:end])
                if joined in node:
                    result.append(joined)
                    taken = end - index
                    break
            else:
                result.append(parts[index])
        else:
            result.append(parts[index])
        key = result[-1]
        try:
            node = node[key] if isinstance(node, CommentedMap | CommentedSeq) else None
        except (KeyError, IndexError, TypeError):
            node = None
        index += taken
    return result


def load_texts(texts: list[tuple[str, str]]) -> tuple[DesiredState, str]:
    """Merge YAML documents by top-level key and validate. `texts` is [(name, text)]."""
    state, digest, _ = _load_texts(texts)
    return state, digest


def _load_texts(texts: list[tuple[str, str]]) -> tuple[DesiredState, str, Sources]:
    """The fast path when it can prove the same meaning (`yaml_fast`), else -- and for every
    error, so messages always come from one place -- the line-numbered round-trip parse."""
    fast = _load_texts_fast(texts)
    if fast is not None:
        return fast
    return _load_texts_exact(texts)


def _load_texts_fast(texts: list[tuple[str, str]]) -> tuple[DesiredState, str, Sources] | None:
    """None on anything but a valid state: the exact path then finds and words the errors."""
    merged: dict[str, Any] = {}
    owner: dict[str, int] = {}  # top-level key -> index of its file in texts
    parsed: dict[int, Any] = {}  # files the fast path declined, parsed the exact way
    digest = hashlib.sha256()
    for index, (name, text) in enumerate(texts):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        doc = yaml_fast.fast_load(text)
        if doc is None:
            try:
                doc = _parse(text, name)
            except StateError:
                return None
            if not isinstance(doc, CommentedMap):
                return None
            parsed[index] = doc
        for key in doc:
            if not isinstance(key, str) or key in merged:
                return None
            # The fast path's data is plain already; ruamel's is made plain (a copy).
            merged[key] = _plain(doc[key]) if index in parsed else doc[key]
            owner[key] = index
    if not merged:
        return None
    try:
        state = DesiredState.model_validate(merged)
    except ValidationError:
        return None
    return state, digest.hexdigest(), _LazySources(texts, owner, parsed)


class _LazySources(Mapping[str, tuple[str, Any]]):
    """The `Sources` of a state read the fast way: positions exist only in ruamel's documents,
    so a file is parsed the exact way the first time a place in it is asked for (a finding
    naming file:line), never on the common path."""

    def __init__(self, texts: list[tuple[str, str]], owner: dict[str, int],
                 parsed: dict[int, Any]) -> None:
        self._texts = texts
        self._owner = owner
        self._parsed = dict(parsed)

    def __getitem__(self, key: str) -> tuple[str, Any]:
        index = self._owner[key]
        name, text = self._texts[index]
        if index not in self._parsed:
            self._parsed[index] = _parse(text, name)
        return name, self._parsed[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)


def _load_texts_exact(texts: list[tuple[str, str]]) -> tuple[DesiredState, str, Sources]:
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
            what = "a list" if isinstance(doc, CommentedSeq) else f"a {type(doc).__name__}"
            problems.append(Problem(name, 1, 1, "", f"the top level must be a mapping of keys "
                                                    f"(version: 1, domain: ...), not {what}"))
            continue
        for key in doc:
            if str(key) in merged:
                line = doc.lc.key(key)[0] + 1
                first, first_doc = sources[str(key)]
                first_line = first_doc.lc.key(key)[0] + 1
                problems.append(
                    Problem(name, line, 1, str(key),
                            f"top-level key defined twice (also in {first}:{first_line}); "
                            "each top-level key belongs in exactly one file")
                )
                continue
            merged[str(key)] = doc[key]
            sources[str(key)] = (name, doc)
    if problems:
        raise StateError(problems)
    if not merged:
        raise StateError([Problem(texts[0][0] if texts else "<state>", 1 if texts else 0,
                                  1 if texts else 0, "",
                                  "no desired state found: the file is empty (a state needs "
                                  "version, domain, onprem, rental and dns)")])
    try:
        state = DesiredState.model_validate(_plain(merged))
    except ValidationError as exc:
        raise StateError(validation_problems(exc, sources)) from None
    return state, digest.hexdigest(), sources


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


def _read(file: Path) -> str:
    """The file's text, refusing one above MAX_FILE_BYTES without reading all of it (the
    state path may name a device or a file that grows)."""
    try:
        with file.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise StateError([Problem(str(file), 0, 0, "", too_large(size))])
            chunks: list[bytes] = []
            total = 0
            while chunk := handle.read(1 << 20):
                total += len(chunk)
                if total > MAX_FILE_BYTES:
                    raise StateError([Problem(str(file), 0, 0, "", too_large(total))])
                chunks.append(chunk)
        return b"".join(chunks).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StateError([Problem(str(file), 0, 0, "", f"cannot read: {exc}")]) from None


def load_state(path: Path) -> LoadedState:
    files = state_files(path)
    texts = [(str(file), _read(file)) for file in files]
    state, digest, sources = _load_texts(texts)
    directory = path if path.is_dir() else path.parent
    return LoadedState(state, tuple(str(f) for f in files), digest, directory, sources)


def load_from_git(repo: Path, ref: str, subpath: str = "state") -> LoadedState:
    """The desired state as committed at `ref` (for `plan --git-base/--git-head`, daemon)."""
    import git
    from gitdb.exc import ODBError  # type: ignore[import-untyped]  # unknown ref: BadName

    try:
        commit = git.Repo(repo, search_parent_directories=True).commit(ref)
    except (git.exc.GitError, ODBError, ValueError) as exc:
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
    texts = []
    for blob in blobs:
        name = f"{ref[:12]}:{blob.path}"
        if blob.size > MAX_FILE_BYTES:
            raise StateError([Problem(name, 0, 0, "", too_large(blob.size))])
        try:
            texts.append((name, blob.data_stream.read().decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise StateError([Problem(name, 0, 0, "", f"cannot read: {exc}")]) from None
    if not texts:
        raise StateError([Problem(f"{ref}:{subpath}", 0, 0, "", "no *.yaml files")])
    state, _, sources = _load_texts(texts)
    author = f"{commit.author.name} <{commit.author.email}>"
    return LoadedState(state, tuple(t[0] for t in texts), commit.hexsha, repo, sources, author)
