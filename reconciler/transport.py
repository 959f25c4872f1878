"""Transport: run commands and read/write files on one host, locally or over SSH.

Sits at the bottom of the flow, under every driver (onprem Postfix, the ssh rental provider,
the RTX router): a driver builds commands as argv lists and calls `run()`; it never builds a
shell string. Over SSH each argv item is `shlex.quote()`d, so a value arrives at the remote
program as exactly one argument whatever it contains. Host keys are checked against a
known_hosts file and never added automatically. One connection serves every command of a
transport, so an observation costs a constant number of round trips per host.

Secrets (an SSH password, anything a caller registers with `add_secret`) are masked in every
log line and error message this module produces; standard input is never logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import secrets
import shlex
import subprocess
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, NoReturn

from reconciler.model import Connect
from reconciler.secrets import SecretError, resolve_secret

log = logging.getLogger(__name__)

MASK: Final = "***"
_TMP_SUFFIX: Final = ".mailrec-tmp"
_ERR_TAIL: Final = 400  # characters of stderr quoted in an error: enough to see why
_CONNECT_TIMEOUT: Final = 15.0
_HISTORY: Final = 1000


class TransportError(RuntimeError):
    """A command or file operation failed; the message names host and command, never a secret."""

    def __init__(
        self,
        message: str,
        *,
        host: str,
        argv: tuple[str, ...] | None = None,
        result: CommandResult | None = None,
    ) -> None:
        super().__init__(message)
        self.host = host
        self.argv = argv
        self.result = result


class HostKeyError(TransportError):
    """The host's key is not in known_hosts, or differs from the one recorded there."""


class UnsafePathError(ValueError):
    """A path that must not reach a remote command or file operation."""


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    exit_status: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


def check_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """Validate a command given as parts; a plain string is refused (it would be a shell line)."""
    if isinstance(argv, str | bytes):
        raise TypeError("argv must be a list of arguments, not a string")
    args = tuple(argv)
    if not args:
        raise ValueError("argv is empty")
    for arg in args:
        if not isinstance(arg, str):
            raise TypeError(f"argv items must be str, got {type(arg).__name__}")
        # A NUL cannot travel in an argument (C strings) and would truncate it silently.
        if "\0" in arg:
            raise ValueError("argv items must not contain NUL")
    return args


def quote_argv(argv: Sequence[str]) -> str:
    """The one command line sent over SSH: every part quoted, so each arrives as one argument."""
    return " ".join(shlex.quote(arg) for arg in check_argv(argv))


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def safe_path(path: str) -> str:
    """Return `path` if it is safe to hand to a remote command or file operation, else raise.

    Safe means: absolute (so it can never be read as an option), normalised (no `.`/`..`
    parts, no doubled or trailing slashes that would let a check and a use disagree), and free
    of control characters (line-based tools and logs would misread a newline).
    """
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"{path!r} is not a path")
    if _CONTROL_CHARACTER.search(path):
        raise UnsafePathError(f"{path!r} contains control characters")
    if not path.startswith("/"):
        raise UnsafePathError(f"{path!r} is not an absolute path")
    if posixpath.normpath(path) != path or path.startswith("//"):
        raise UnsafePathError(f"{path!r} is not normalised (no '.', '..', '//' or trailing '/')")
    return path


class SecretMask:
    """Replaces registered secret values with *** in any text."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add(self, value: str | None) -> None:
        # Very short values would mask harmless text everywhere and tell a reader their length.
        if value and len(value) >= 4:
            self._values.add(value)

    def __call__(self, text: str) -> str:
        # Longest first, so a secret that contains another is masked whole.
        for value in sorted(self._values, key=len, reverse=True):
            text = text.replace(value, MASK)
        return text


class Transport(ABC):
    """Run commands and read/write files on one host.

    Public methods validate, log (masked) and count; subclasses implement the `_`-methods.
    `round_trips` counts operations (commands, file reads, file writes) so tests can check
    that an observation costs a constant number of them.
    """

    def __init__(self, host: str, *, root: Path | None = None) -> None:
        self.host = host
        self.root = root
        self.round_trips = 0
        # Masked argv of the latest commands (for tests and --debug); bounded for daemons.
        self.history: deque[tuple[str, ...]] = deque(maxlen=_HISTORY)
        self._mask = SecretMask()

    # --- public interface ------------------------------------------------------------
    def add_secret(self, value: str | None) -> None:
        """Mask `value` in every log line and error message of this transport from now on."""
        self._mask.add(value)

    def mask(self, text: str) -> str:
        return self._mask(text)

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> CommandResult:
        args = check_argv(argv)
        shown = self.mask(quote_argv(args))
        self.round_trips += 1
        self.history.append(tuple(self.mask(a) for a in args))
        started = time.monotonic()
        result = self._run(args, input, timeout)
        log.debug(
            "%s: %s -> exit %d (%.2fs, %d bytes out, %d bytes err)",
            self.host,
            shown,
            result.exit_status,
            time.monotonic() - started,
            len(result.stdout),
            len(result.stderr),
        )
        if check and result.exit_status != 0:
            detail = self.mask(result.stderr.decode("utf-8", "replace").strip()[-_ERR_TAIL:])
            raise TransportError(
                f"{self.host}: command `{shown}` exited {result.exit_status}"
                + (f": {detail}" if detail else ""),
                host=self.host,
                argv=args,
                result=result,
            )
        return result

    def read_file(self, path: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        real = self._resolve(path)
        self.round_trips += 1
        data = self._read(real)
        log.debug("%s: read %s (%s)", self.host, path, "missing" if data is None else len(data))
        return data

    def write_file_atomic(
        self, path: str, data: bytes, *, mode: int = 0o644, backup: bool = True
    ) -> None:
        """Replace the file in one step: a temp file in the same directory, then a rename.

        Readers see either the old or the new content, never a partial one. With `backup`,
        the previous content (if any) is kept as `path + ".bak"`. An existing file's owner
        is kept.
        """
        real = self._resolve(path)
        if not 0 <= mode <= 0o7777:
            raise ValueError(f"mode {mode:o} out of range")
        self.round_trips += 1
        self._write_atomic(real, data, mode, backup)
        log.info(
            "%s: wrote %s (%d bytes, mode %04o%s)",
            self.host,
            path,
            len(data),
            mode,
            ", previous kept as .bak" if backup else "",
        )

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Transport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}>"

    # --- for subclasses --------------------------------------------------------------
    @abstractmethod
    def _run(self, argv: tuple[str, ...], input: bytes | None, timeout: float) -> CommandResult: ...

    @abstractmethod
    def _read(self, path: str) -> bytes | None: ...

    @abstractmethod
    def _write_atomic(self, path: str, data: bytes, mode: int, backup: bool) -> None: ...

    def _resolve(self, path: str) -> str:
        # With a root (a lab directory), every file path is taken inside it.
        checked = safe_path(path)
        if self.root is None:
            return checked
        return str(self.root) + checked if checked != "/" else str(self.root)

    def _fail(self, what: str, exc: BaseException) -> NoReturn:
        raise TransportError(f"{self.host}: {what}: {self.mask(str(exc))}", host=self.host) from exc


def _tmp_name(path: str) -> str:
    directory, base = posixpath.split(path)
    return posixpath.join(directory, f".{base}.{secrets.token_hex(6)}{_TMP_SUFFIX}")


class LocalTransport(Transport):
    """Commands and files on the machine mailrec runs on (`connect: local:/`, or a lab)."""

    def __init__(self, *, root: Path | None = None) -> None:
        super().__init__("local" if root is None else f"local:{root}", root=root)

    def close(self) -> None:
        pass

    def _run(self, argv: tuple[str, ...], input: bytes | None, timeout: float) -> CommandResult:
        if self.root is not None and not self.root.is_dir():
            # Else the FileNotFoundError below would blame the command.
            raise TransportError(f"{self.host}: {self.root} is not a directory", host=self.host)
        try:
            proc = subprocess.run(
                list(argv),
                input=input,
                capture_output=True,
                timeout=timeout,
                check=False,
                cwd=self.root,
            )
        except FileNotFoundError:
            # Same answer a remote shell gives, so drivers handle both transports alike.
            return CommandResult(argv, 127, b"", f"{argv[0]}: command not found\n".encode())
        except subprocess.TimeoutExpired as exc:
            raise TransportError(
                f"{self.host}: command `{self.mask(quote_argv(argv))}` timed out after "
                f"{timeout:g}s",
                host=self.host,
                argv=argv,
            ) from exc
        return CommandResult(argv, proc.returncode, proc.stdout, proc.stderr)

    def _read(self, path: str) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._fail(f"cannot read {path}", exc)

    def _write_atomic(self, path: str, data: bytes, mode: int, backup: bool) -> None:
        try:
            old = os.stat(path)
        except FileNotFoundError:
            old = None
        except OSError as exc:
            self._fail(f"cannot stat {path}", exc)
        try:
            if backup and old is not None:
                self._put(path + ".bak", Path(path).read_bytes(), old.st_mode & 0o7777, old)
            self._put(path, data, mode, old)
        except OSError as exc:
            self._fail(f"cannot write {path}", exc)

    def _put(self, path: str, data: bytes, mode: int, owner: os.stat_result | None) -> None:
        tmp = _tmp_name(path)
        # O_EXCL with mode 0600: no one else can open the temp file before its final mode.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                if owner is not None:
                    self._chown(fd, path, owner)
                os.fchmod(fd, mode)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(posixpath.dirname(path) or "/", os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    def _chown(self, fd: int, path: str, owner: os.stat_result) -> None:
        try:
            os.fchown(fd, owner.st_uid, owner.st_gid)
        except PermissionError:
            log.warning(
                "%s: cannot keep owner %d:%d of %s (not root)",
                self.host,
                owner.st_uid,
                owner.st_gid,
                path,
            )


def open_transport(
    connect: Connect,
    *,
    known_hosts: Path | None,
    key_filename: str | None = None,
    password_ref: str | None = None,
    root: Path | None = None,
) -> Transport:
    """A connected transport for `connect` (`ssh://user@host:port` or `local:/`).

    `known_hosts` defaults to ~/.ssh/known_hosts; unknown or changed host keys are refused.
    `password_ref` is a secret reference (`env:NAME`, `file:PATH`), resolved only here.
    `root` makes every file path relative to that directory (a lab host's files).
    """
    if connect.scheme == "local":
        return LocalTransport(root=root)
    assert connect.host is not None
    password: str | None = None
    if password_ref is not None:
        try:
            password = resolve_secret(password_ref)
        except SecretError as exc:
            raise TransportError(f"{connect}: {exc}", host=str(connect)) from None
    from reconciler.transport_ssh import SshTransport  # paramiko only when SSH is used

    return SshTransport(
        connect.host,
        port=connect.port,
        user=connect.user or "root",
        known_hosts=known_hosts,
        key_filename=key_filename,
        password=password,
        root=root,
    )
