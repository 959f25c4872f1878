"""An SSH server on loopback that behaves like a Yamaha RTX router's CLI, for the lab and tests.

Where it sits: `mailrec lab up` starts it in the background (`python -m
reconciler.lab.rtx_emulator ...`) with the lab's router file as the *saved* configuration;
the real RTX driver (`reconciler.drivers.rtx`) talks to it over real SSH exactly as it talks
to a router. The running configuration lives in memory, as on the router: `save` writes it to
the file (atomically), leaving administrator mode with unsaved changes asks
`Save new configuration ? (Y/N)`, and answering N keeps the running configuration changed
but the file untouched. Configuration commands are applied with the same
`RtxConfig.apply` the planner simulates with, so the two cannot disagree.

What it models: the login banner, `> ` and `# ` prompts (`[NAME] ` before them with
`console prompt NAME`), `administrator` with its `Password:` prompt, `show config` with the
pager (`---more---`, or `---つづく---` in a Japanese console) unless `console lines
infinity`, `console character` (ja.sjis, ja.utf8, ascii, en.ascii), `save`, `exit`/`quit`,
`pp select`/`tunnel select`, and `ip filter`, `ip filter dynamic`, `ip route` with their `no`
forms. Anything else is refused the way the router refuses it: an `Error:` line (an
`エラー:` line in a Japanese console).

For tests: `history` holds the running configuration text after every configuration
command, `commands` every configuration command received, `typed` every line typed at a
prompt (password input excluded), and `fail_command` can make the emulator refuse a command
the way a router with a full table or a firmware quirk would.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import hmac
import json
import logging
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import paramiko
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)

from reconciler.drivers.rtx.config import RtxConfig, RtxSyntaxError

log = logging.getLogger(__name__)

# The router's messages, (ASCII console, Japanese console).
MESSAGES: dict[str, tuple[str, str]] = {
    "command": ("Error: Invalid command name", "エラー: コマンド名を確認してください"),
    "parameter": ("Error: Invalid parameter", "エラー: パラメータが不適切です"),
    "privilege": (
        "Error: Administrator privilege is required",
        "エラー: このコマンドは管理ユーザーのみ実行できます",
    ),
    "password": ("Error: Incorrect password", "エラー: パスワードが違います"),
    "save_prompt": ("Save new configuration ? (Y/N)", "設定を保存しますか? (Y/N)"),
    "saved": ("Saving ... CONFIG0 Done .", "セーブ中... CONFIG0 終了"),
    "save_failed": ("Error: Failed to save the configuration", "エラー: 設定の保存に失敗しました"),
    "pager": ("---more---", "---つづく---"),
}
CHARSETS: dict[str, str] = {
    "ja.sjis": "shift_jis",
    "ja.utf8": "utf-8",
    "ascii": "ascii",
    "en.ascii": "ascii",
}
DEFAULT_LINES = 24
_HEADER_RE = re.compile(r"^# (RTX\S*|NVR\S*|FWX\S*) (Rev\.\S+ \(.*\))\s*$")


def load_or_create_host_key(path: Path) -> paramiko.PKey:
    """The emulator's host key; a new RSA 2048 key is written (mode 0600) if the file is
    missing (paramiko cannot generate Ed25519 keys)."""
    if path.exists():
        for key_class in (paramiko.RSAKey, paramiko.ECDSAKey, paramiko.Ed25519Key):
            try:
                key: paramiko.PKey = key_class.from_private_key_file(str(path))
            except paramiko.SSHException:
                continue
            return key
        raise ValueError(f"{path} is not an RSA, ECDSA or Ed25519 private key")
    path.parent.mkdir(parents=True, exist_ok=True)
    rsa = paramiko.RSAKey.generate(2048)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        rsa.write_private_key(handle)
    return rsa


def known_hosts_line(key: paramiko.PKey, host: str, port: int) -> str:
    """A known_hosts line for `key` at host:port (bracketed form for a non-22 port)."""
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {key.get_name()} {key.get_base64()}"


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a reader sees the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class RtxEmulator:
    """The emulated router: shared running configuration, saved file, SSH listener."""

    def __init__(
        self,
        config_path: Path,
        host: str,
        port: int,
        *,
        login_password: str,
        admin_password: str,
        host_key_path: Path,
        users: str = "admin",
    ) -> None:
        self.config_path = Path(config_path)
        self.host = host
        self._requested_port = port
        self._login_password = login_password
        self._admin_password = admin_password
        self.users = frozenset(u.strip() for u in users.split(",") if u.strip())
        self.host_key = load_or_create_host_key(Path(host_key_path))
        self.lock = threading.RLock()
        self._saved_text = self._read_saved()
        self.running = RtxConfig.parse(self._saved_text)
        self.dirty = False  # changed since the last save, as the router tracks it
        self.history: list[str] = []
        self.commands: list[str] = []
        self.typed: list[str] = []  # every line typed at a prompt (never a password)
        self.fail_command: Callable[[str], str | None] | None = None
        self._listener: socket.socket | None = None
        self._port = port
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._transports: list[paramiko.Transport] = []

    # --- lifecycle ---------------------------------------------------------------------------

    def _read_saved(self) -> str:
        return self.config_path.read_bytes().decode("utf-8", "surrogateescape")

    @property
    def port(self) -> int:
        return self._port

    @property
    def running_config(self) -> str:
        with self.lock:
            return self.running.render()

    def known_hosts_line(self) -> str:
        return known_hosts_line(self.host_key, self.host, self.port)

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self._requested_port))
        listener.listen(16)
        self._listener = listener
        self._port = listener.getsockname()[1]
        thread = threading.Thread(target=self._accept_loop, name="rtx-emulator-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        log.info("RTX emulator listening on %s:%d", self.host, self._port)

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self.lock:
            transports = list(self._transports)
        for transport in transports:
            transport.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> RtxEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            thread = threading.Thread(
                target=self._serve, args=(sock,), name="rtx-emulator-session", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _serve(self, sock: socket.socket) -> None:
        transport = paramiko.Transport(sock)
        with self.lock:
            self._transports.append(transport)
        try:
            transport.add_server_key(self.host_key)
            server = _SshServer(self)
            try:
                transport.start_server(server=server)
            except (paramiko.SSHException, EOFError, OSError):
                return
            channel = self._await_shell(transport, server)
            if channel is None:
                return
            try:
                _Cli(self, channel).run()
            except (OSError, EOFError, paramiko.SSHException):
                pass  # the client went away
            finally:
                with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                    channel.close()
        finally:
            transport.close()
            with self.lock:
                if transport in self._transports:
                    self._transports.remove(transport)

    def _await_shell(
        self, transport: paramiko.Transport, server: _SshServer
    ) -> paramiko.Channel | None:
        # Short waits, so that a client that failed to log in, or stop(), ends the wait
        # at once instead of after paramiko's whole accept timeout.
        deadline = time.monotonic() + 10
        channel = None
        while time.monotonic() < deadline and transport.is_active() and not self._stopping.is_set():
            if channel is None:
                channel = transport.accept(timeout=0.1)
            elif server.shell.wait(timeout=0.1):
                return channel
        return None

    # --- authentication ----------------------------------------------------------------------

    def check_login(self, username: str, password: str) -> bool:
        return username in self.users and hmac.compare_digest(
            password.encode(), self._login_password.encode()
        )

    def check_admin(self, password: str) -> bool:
        return hmac.compare_digest(password.encode(), self._admin_password.encode())

    # --- configuration -----------------------------------------------------------------------

    def configure(self, command: str) -> str | None:
        """Apply one configuration command to the running configuration; the error kind
        (a MESSAGES key) or a literal injected message when refused, None when accepted."""
        with self.lock:
            self.commands.append(command)
            try:
                injected = self.fail_command(command) if self.fail_command else None
                if injected is not None:
                    return injected
                try:
                    self.running = self.running.apply(command)
                except RtxSyntaxError as exc:
                    return exc.kind
                self.dirty = True
                return None
            finally:
                self.history.append(self.running.render())

    def save(self) -> None:
        with self.lock:
            text = self.running.render()
            write_atomically(self.config_path, text.encode("utf-8", "surrogateescape"))
            self._saved_text = text
            self.dirty = False

    def setting(self, name: str) -> str | None:
        """The value of a `console ...` line of the running configuration."""
        with self.lock:
            for line in self.running.lines:
                words = line.text.split()
                if len(words) >= 3 and words[:2] == ["console", name]:
                    return " ".join(words[2:])
        return None

    def banner(self) -> str:
        model, revision = "RTX1210", "Rev.14.01.38 (Fri Jul  3 09:56:21 2020)"
        with self.lock:
            for line in self.running.lines[:3]:
                match = _HEADER_RE.match(line.text)
                if match:
                    model, revision = match.group(1), match.group(2)
        return (
            f"\n{model} {revision}\n"
            "  Copyright (c) 1994-2024 Yamaha Corporation. All Rights Reserved.\n"
            "  To display the software copyright statement, 'show copyright' command.\n"
            "  00:a0:de:00:00:01, 00:a0:de:00:00:02, 00:a0:de:00:00:03\n"
            "  Memory 256Mbytes, 3LAN, 1BRI\n\n"
        )


class _SshServer(paramiko.ServerInterface):
    """Password login for the configured users; one interactive shell with a pty."""

    def __init__(self, emulator: RtxEmulator) -> None:
        self.emulator = emulator
        self.shell = threading.Event()

    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_auth_password(self, username: str, password: str) -> int:
        if self.emulator.check_login(username, password):
            return AUTH_SUCCESSFUL
        return AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return OPEN_SUCCEEDED
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_pty_request(
        self,
        channel: paramiko.Channel,
        term: bytes,
        width: int,
        height: int,
        pixelwidth: int,
        pixelheight: int,
        modes: bytes,
    ) -> bool:
        return True

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        self.shell.set()
        return True


class _Cli:
    """One login session's terminal: line editing, modes, console settings, commands."""

    def __init__(self, emulator: RtxEmulator, channel: paramiko.Channel) -> None:
        self.emu = emulator
        self.channel = channel
        self.admin = False
        self.scope = ""
        # A session starts with the console settings of the configuration.
        self.charset = emulator.setting("character") or "ja.sjis"
        if self.charset not in CHARSETS:
            self.charset = "ja.sjis"
        lines = emulator.setting("lines")
        self.page_lines: int | None = (
            None
            if lines == "infinity"
            else int(lines)
            if lines and lines.isdigit()
            else DEFAULT_LINES
        )
        self._decoder = codecs.getincrementaldecoder(CHARSETS[self.charset])(errors="replace")
        self._pending = ""
        self._after_cr = False

    # --- terminal I/O ----------------------------------------------------------------------

    @property
    def japanese(self) -> bool:
        return self.charset.startswith("ja.")

    def message(self, key: str) -> str:
        english, japanese = MESSAGES[key]
        return japanese if self.japanese else english

    def write(self, text: str) -> None:
        data = text.replace("\n", "\r\n").encode(CHARSETS[self.charset], errors="replace")
        self.channel.sendall(data)

    def prompt(self) -> None:
        name = self.emu.setting("prompt")
        prefix = f"[{name}] " if name else ""
        self.write(prefix + ("# " if self.admin else "> "))

    def read_char(self) -> str | None:
        while not self._pending:
            data = self.channel.recv(1024)
            if not data:
                return None
            self._pending += self._decoder.decode(data)
        char, self._pending = self._pending[0], self._pending[1:]
        return char

    def read_line(self, *, echo: bool = True) -> str | None:
        """A line typed at the prompt (CR, LF or CRLF ends it); None when the client left."""
        line: list[str] = []
        while True:
            char = self.read_char()
            if char is None:
                return None
            if char == "\n" and self._after_cr:
                self._after_cr = False
                continue
            self._after_cr = char == "\r"
            if char in "\r\n":
                self.write("\n")
                return "".join(line)
            if char in "\x7f\x08":
                if line:
                    line.pop()
                    if echo:
                        self.write("\b \b")
            elif char == "\x03":  # Ctrl-C drops the line
                self.write("\n")
                return ""
            elif char.isprintable():
                line.append(char)
                if echo:
                    self.write(char)

    def read_key(self) -> str | None:
        char = self.read_char()
        while char is not None and char == "\n" and self._after_cr:
            self._after_cr = False
            char = self.read_char()
        self._after_cr = char == "\r"
        return char

    def set_charset(self, name: str) -> None:
        self.charset = name
        self._decoder = codecs.getincrementaldecoder(CHARSETS[name])(errors="replace")

    # --- session -----------------------------------------------------------------------------

    def run(self) -> None:
        self.write(self.emu.banner())
        self.prompt()
        while True:
            line = self.read_line()
            if line is None:
                return
            with self.emu.lock:
                self.emu.typed.append(line)
            if not self.dispatch(" ".join(line.split())):
                return
            self.prompt()

    def error(self, key: str) -> None:
        text = MESSAGES[key][1 if self.japanese else 0] if key in MESSAGES else key
        self.write(text + "\n")

    def dispatch(self, command: str) -> bool:
        """Run one command; False when the session ends."""
        words = command.split()
        if not words:
            return True
        if command in ("exit", "quit"):
            if self.admin:
                return self.leave_admin()
            return False
        if command == "administrator":
            self.enter_admin()
        elif command == "show config":
            self.show(self.emu.running_config)
        elif command == "show environment":
            self.show(self.emu.banner().strip("\n") + "\n")
        elif words[0] == "console" and len(words) >= 2:
            self.console(words)
        elif command == "save":
            self.save()
        elif words[0] in ("pp", "tunnel") and len(words) == 3 and words[1] == "select":
            self.select(words)
        elif not self.admin and words[0] != "show":
            try:
                RtxConfig.parse("").apply(command)
            except RtxSyntaxError as exc:
                self.error(exc.kind)
            else:
                self.error("privilege")
        elif words[0] == "show":
            self.error("parameter" if len(words) > 1 else "command")
        else:
            refused = self.emu.configure(command)
            if refused is not None:
                self.error(refused)
        return True

    def enter_admin(self) -> None:
        if self.admin:
            return
        self.write("Password: ")
        password = self.read_line(echo=False)
        if password is None:
            return
        if self.emu.check_admin(password):
            self.admin = True
        else:
            self.error("password")

    def leave_admin(self) -> bool:
        if self.emu.dirty:
            while True:
                self.write(self.message("save_prompt") + " ")
                key = self.read_key()
                if key is None:
                    return False
                self.write(key + "\n")
                if key in "Yy":
                    self.save()
                    break
                if key in "Nn":
                    break
        self.admin = False
        self.scope = ""
        return True

    def save(self) -> None:
        if not self.admin:
            self.error("privilege")
            return
        try:
            self.emu.save()
        except OSError:
            log.exception("RTX emulator: writing %s failed", self.emu.config_path)
            self.error("save_failed")
            return
        self.write(self.message("saved") + "\n")

    def select(self, words: list[str]) -> None:
        if not self.admin:
            self.error("privilege")
            return
        target = words[2]
        if target == "none" or target.isdigit() or (words[0] == "pp" and target == "anonymous"):
            self.scope = "" if target == "none" else f"{words[0]} {target}"
        else:
            self.error("parameter")

    def console(self, words: list[str]) -> None:
        # Console settings change this session only (a general user may type them). The
        # driver types them before `administrator`, so `save` never stores them.
        name, args = words[1], words[2:]
        if name == "character" and len(args) == 1 and args[0] in CHARSETS:
            self.set_charset(args[0])
        elif name == "lines" and len(args) == 1 and (args[0] == "infinity" or args[0].isdigit()):
            self.page_lines = None if args[0] == "infinity" else max(int(args[0]), 2)
        elif name in ("columns", "prompt", "info") and args:
            pass
        else:
            self.error("parameter" if name in ("character", "lines") else "command")

    def show(self, text: str) -> None:
        """Print `text`, paging like the router unless `console lines infinity`."""
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if self.page_lines is None:
            self.write("".join(line + "\n" for line in lines))
            return
        page = self.page_lines - 1
        marker = self.message("pager")
        for start in range(0, len(lines), page):
            self.write("".join(line + "\n" for line in lines[start : start + page]))
            if start + page >= len(lines):
                return
            self.write(marker)
            key = self.read_key()
            # The marker is erased in place before the next page (or the prompt).
            self.write("\r" + " " * (len(marker) * 2) + "\r")
            if key is None or key in "qQ":
                return


# --- command line ------------------------------------------------------------------------------


def _read_secret(path: str) -> str:
    return Path(path).read_text(encoding="utf-8").rstrip("\r\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reconciler.lab.rtx_emulator",
        description="Run the RTX CLI emulator (SSH) in the foreground until SIGTERM.",
    )
    parser.add_argument("--config", required=True, type=Path, help="saved configuration file")
    parser.add_argument("--host", default="127.0.0.7")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host-key", required=True, type=Path, help="created if missing")
    parser.add_argument("--login-password-file", required=True)
    parser.add_argument("--admin-password-file", required=True)
    parser.add_argument("--users", default="admin", help="comma-separated login users")
    parser.add_argument(
        "--ready-file",
        type=Path,
        help='write {"host", "port", "known_hosts"} as JSON here once listening',
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    emulator = RtxEmulator(
        args.config,
        args.host,
        args.port,
        login_password=_read_secret(args.login_password_file),
        admin_password=_read_secret(args.admin_password_file),
        host_key_path=args.host_key,
        users=args.users,
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    emulator.start()
    try:
        if args.ready_file is not None:
            ready = {
                "host": emulator.host,
                "port": emulator.port,
                "known_hosts": emulator.known_hosts_line(),
            }
            write_atomically(args.ready_file, json.dumps(ready).encode())
        print(f"rtx emulator listening on {emulator.host}:{emulator.port}", flush=True)
        stop.wait()
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
