"""The change discipline of the onprem driver on a real host (`postfix_host.PostfixHost` is
built on `PostfixChanges`): how mailrec writes its maps and main.cf, and puts everything back
when a step fails half way.

Every change writes a map source atomically keeping a `.bak`, `postmap`s it, changes main.cf
only with `postconf -e`/`-X` (after a `.bak` of main.cf), then runs `postfix check` and
`postfix reload`. On any failure the previous content of every file the change wrote is put
back and re-compiled (and Postfix reloaded again if it was reloaded mid-change), and a
`PostfixError` says what failed and what was restored. Every Postfix command goes through
`_command` (`-c DIR` right after the program; `-C DIR` for sendmail).
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from reconciler.drivers.postfix import (
    PostfixError,
    edit_map,
    format_map,
    parse_main_cf,
    parse_map,
    with_map,
)
from reconciler.drivers.postfix_names import expand_params
from reconciler.drivers.postfix_space import PostfixProgram, postfix_argv
from reconciler.transport import (
    CommandResult,
    Transport,
    TransportError,
    UnsafePathError,
    safe_path,
)

# Characters of a main.cf map list mailrec may write with `postconf -e`: map types, paths,
# $parameters, commas and spaces. Never a newline, quote, backslash or '#'.
_MAP_LIST_RE: Final = re.compile(r"^[A-Za-z0-9_$:/.,{}=@+ -]*$")


def check_map_list(name: str, value: str) -> str:
    """A main.cf map list mailrec is about to write: nothing postconf -e could misread."""
    if not _MAP_LIST_RE.match(value):
        raise PostfixError(f"refusing to write {name} = {value!r}: unexpected characters")
    return value


@dataclass(frozen=True)
class _Saved:
    """A file as it was before a change wrote it (None: it did not exist)."""

    path: str
    content: bytes | None
    compiled: bool  # a map source: re-run postmap after putting it back


@dataclass
class Change:
    """What one change wrote so far (to put back on failure)."""

    saved: list[_Saved] = field(default_factory=list)
    reloaded: bool = False  # Postfix was reloaded mid-change: reload again after restoring


@dataclass(frozen=True)
class DropUser:
    """A map edit that removes every `user@ANY` key of one user."""

    user: str

    def keys_in(self, entries: Mapping[str, str]) -> dict[str, str | None]:
        prefix = self.user.lower() + "@"
        return {key: None for key in entries if key.startswith(prefix)}


class PostfixChanges:
    """The commands and the change discipline of one Postfix instance behind `transport`."""

    transport: Transport
    config_dir: str
    log_file: str

    def _path(self, name: str) -> str:
        return safe_path(f"{self.config_dir}/{name}")

    def _command(self, program: PostfixProgram, *args: str) -> list[str]:
        """A Postfix command of this instance: `-c DIR` (sendmail: `-C DIR`) right after the
        program, always."""
        return postfix_argv(program, self.config_dir, *args)

    def _run(self, what: str, argv: list[str], *, input: bytes | None = None) -> CommandResult:
        try:
            return self.transport.run(argv, input=input)
        except TransportError as exc:
            raise PostfixError(f"{what}: {exc}") from exc

    def _postconf(self, names: Iterable[str], *, expand: bool = False) -> dict[str, str]:
        """main.cf values as Postfix reads them (defaults included); `expand` (-x) puts in
        every $parameter. Changes read them unexpanded, to write the admin's value back.

        A Postfix older than 2.10 (CentOS 6) has no `-x`: then the whole `postconf` output
        is read (one more command) and expanded here."""
        listed = list(names)
        if expand:
            argv = self._command("postconf", "-x", *listed)
            try:
                result = self.transport.run(argv, check=False)
            except TransportError as exc:
                raise PostfixError(f"postconf: {exc}") from exc
            if not result.ok and b"invalid option" in result.stderr:
                every = self._run("postconf", self._command("postconf"))
                return expand_params(parse_main_cf(every.text), listed)
            if not result.ok:
                detail = result.stderr.decode("utf-8", "replace").strip()
                raise PostfixError(f"postconf -x exited {result.exit_status}: "
                                   f"{self.transport.mask(detail)[-400:]}")
        else:
            result = self._run("postconf", self._command("postconf", *listed))
        values = parse_main_cf(result.text)
        return {name: values.get(name, "") for name in listed}

    # --- the change discipline -----------------------------------------------------------
    def _write(self, name: str, data: bytes, *, backup: bool) -> None:
        try:
            self.transport.write_file_atomic(self._path(name), data, backup=backup)
        except TransportError as exc:
            raise PostfixError(f"write {name}: {exc}") from exc

    def _postmap(self, path: str) -> None:
        self._run(f"postmap {path}", self._command("postmap", f"hash:{path}"))

    def _edit_map(
        self, name: str, change: Change,
        changes: Mapping[str, str | None] | DropUser,
    ) -> None:
        """Rewrite one managed map with `changes` (None removes a key) and compile it."""
        path = self._path(name)
        old = self.transport.read_file(path)
        source = old.decode("utf-8", "replace") if old else ""
        if isinstance(changes, DropUser):
            changes = changes.keys_in(parse_map(source))
        text = edit_map(source, changes, name)
        change.saved.append(_Saved(path, old, compiled=True))
        # Written and compiled even when unchanged: a source someone edited without running
        # postmap would otherwise keep disagreeing with the table Postfix reads.
        self.transport.write_file_atomic(path, text.encode())
        self._postmap(path)

    def _backup_main_cf(self, change: Change) -> None:
        main_cf = self._path("main.cf")
        old = self.transport.read_file(main_cf)
        if old is None:
            raise PostfixError(f"{main_cf} does not exist")
        self.transport.write_file_atomic(main_cf + ".bak", old, backup=False)
        change.saved.append(_Saved(main_cf, old, compiled=False))

    def _reference(self, change: Change, wanted: Mapping[str, str]) -> bool:
        """Make main.cf's map lists name mailrec's maps (postconf -e), if they do not;
        True when main.cf was changed."""
        current = self._postconf(wanted)
        changes: dict[str, str] = {}
        for name, ref in wanted.items():
            value = current[name]
            if name == "local_recipient_maps" and not value.strip():
                continue  # accepts every address already (see _validates)
            new = with_map(value, ref)
            if new != value:
                changes[name] = check_map_list(name, new)
        if not changes:
            return False
        self._backup_main_cf(change)
        self._run(
            "postconf -e",
            self._command("postconf", "-e", *(f"{k}={v}" for k, v in changes.items())),
        )
        written = self._postconf(changes)
        if written != changes:
            raise PostfixError(f"main.cf reads back {written}, expected {changes}")
        return True

    def _check_and_reload(self) -> None:
        for action in ("check", "reload"):
            result = self.transport.run(self._command("postfix", action), check=False)
            if not result.ok:
                detail = self.transport.mask(result.stderr.decode("utf-8", "replace").strip())
                raise PostfixError(
                    f"postfix -c {self.config_dir} {action} exited {result.exit_status}: "
                    + (detail[-400:] or f"no output; see the mail log {self.log_file}")
                )

    @contextlib.contextmanager
    def _change(self, what: str) -> Iterator[Change]:
        change = Change()
        try:
            yield change
            self._check_and_reload()
        except (TransportError, PostfixError, UnsafePathError) as exc:
            problems = self._restore(change.saved)
            if change.reloaded and not problems:
                # The running daemons took part of the change: give them the restored files.
                with contextlib.suppress(TransportError, PostfixError):
                    self._check_and_reload()
            restored = ", ".join(dict.fromkeys(s.path for s in change.saved)) or "nothing written"
            note = (
                f"; restoring failed too: {'; '.join(problems)}" if problems
                else f"; restored: {restored}"
            )
            raise PostfixError(f"{self.transport.host}: {what} failed: {exc}{note}") from exc

    def _restore(self, saved: list[_Saved]) -> list[str]:
        """Put back every file a failed change wrote, newest first; returns what failed."""
        problems: list[str] = []
        done: set[str] = set()
        for item in reversed(saved):
            if item.path in done:
                continue
            done.add(item.path)
            # A file written twice is restored once, to its content before the change.
            first = next(s for s in saved if s.path == item.path)
            try:
                if first.content is None:
                    # A new map is left empty rather than deleted: main.cf may name it.
                    name = posixpath.basename(item.path)
                    data = format_map({}, name).encode()
                else:
                    data = first.content
                self.transport.write_file_atomic(item.path, data, backup=False)
                if item.compiled:
                    self._postmap(item.path)
            except (TransportError, PostfixError) as exc:
                problems.append(f"{item.path}: {exc}")
        return problems


def refs(value: str) -> list[str]:
    return value.replace(",", " ").split()
