"""One interactive SSH session with a Yamaha RTX router's CLI.

Where it sits: `driver.py` opens a session per observation or change; this module owns the
terminal dialogue (prompts, the `---more---` pager, the administrator password prompt, the
`Save new configuration ? (Y/N)` question, error lines) so that the driver only says what to
run. The lab's RTX emulator (`reconciler.lab.rtx_emulator`) speaks the same dialogue.

The RTX CLI has no machine interface: a command's result is its echo, some output and the
next prompt (`> ` user mode, `# ` administrator mode, optionally after `[NAME] ` when
`console prompt NAME` is set). A refused command prints a line starting with `Error:` (or
`エラー:` when the console speaks Japanese); that is the only failure signal there is.

Host keys are checked against known_hosts and unknown hosts are refused, never added.
Passwords are never logged and never put in an exception message.
"""

from __future__ import annotations

import codecs
import logging
import re
import select
import time
import unicodedata
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, NoReturn

import paramiko

log = logging.getLogger(__name__)

PromptKind = Literal["prompt", "password", "yes_no"]

# The tail of the output after the last line break (and after the last carriage return,
# which the pager and line editing use to overwrite a line).
_PROMPT_RE = re.compile(r"^(?:\[[^\]\r\n]{1,64}\] ?)?([>#]) ?$")
_PASSWORD_RE = re.compile(r"Password: ?$")
_YES_NO_RE = re.compile(r"\(Y/N\)\s*:?\s*$")
_PAGER_RE = re.compile(r"-{2,3}\s*(?:more|More|MORE|つづく)\s*-{2,3}\s*$")
# A refused command: `Error: ...` in the ASCII console, `エラー: ...` in the Japanese ones.
ERROR_LINE_RE = re.compile("^\\s*(?:Error|ERROR|エラー)\\s*[:\uff1a]")  # ASCII or full-width colon


class RtxError(RuntimeError):
    """Base of the RTX driver's runtime failures."""


class RtxConnectionError(RtxError):
    """The router could not be reached, or the session broke or timed out."""


class RtxAuthError(RtxError):
    """The router refused the SSH login or the administrator password."""


class RtxHostKeyError(RtxAuthError):
    """The router's host key is unknown or does not match known_hosts."""


class RtxCommandError(RtxError):
    """The router refused a command (an `Error:` line), or the result did not verify."""

    def __init__(self, message: str, *, command: str | None = None, router_message: str = ""):
        super().__init__(message)
        self.command = command
        self.router_message = router_message


class _RejectUnknownHost(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, raising our typed error so callers need not parse text."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise RtxHostKeyError(
            f"the router's host key for {hostname} ({key.get_name()}) is not in known_hosts: "
            "refusing to connect to an unknown host"
        )


# Unicode categories that must never be typed into the CLI as part of a password: control
# characters (CR, LF, backspace, DEL, Ctrl-C...), format characters, line and paragraph
# separators, and lone surrogates (undecodable bytes of a secret file).
_UNTYPABLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def check_typed_secret(secret: str | None, what: str, where: str) -> None:
    """Refuse a password with a control character before anything is sent: typed into the
    CLI, a line break would end the password and run the rest as administrator commands.
    The message never shows the password (nor the offending character's position)."""
    if secret is None:
        return
    if any(unicodedata.category(char) in _UNTYPABLE for char in secret):
        raise RtxAuthError(
            f"the {what} for {where} contains a control character (a line break, tab, "
            "backspace, ...): refusing to send it; correct the secret"
        )


@dataclass(frozen=True)
class Reply:
    """What came back after a command: the cleaned output and the prompt that ended it."""

    output: str
    kind: PromptKind
    prompt: str  # ">" or "#" for kind == "prompt", "" otherwise


def clean_output(raw: str, echo: str | None) -> str:
    """The command output as lines: CRLF folded, overwritten line starts dropped (the
    pager erases its marker with CR), pager markers, the echo and the final prompt removed."""
    text = raw.replace("\r\n", "\n")
    lines = [segment.rsplit("\r", 1)[-1] for segment in text.split("\n")]
    lines = [line for line in lines if not _PAGER_RE.search(line)]
    if lines and (_PROMPT_RE.match(lines[-1]) or lines[-1] == ""):
        lines.pop()
    if echo is not None and lines and lines[0].strip() == echo.strip():
        lines.pop(0)
    return "".join(line + "\n" for line in lines)


class RtxSession:
    """An open CLI session. Use as a context manager; `close()` is idempotent."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str | None,
        known_hosts: str | None,
        *,
        timeout: float = 10.0,
        settle: float = 0.05,
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        check_typed_secret(password, "login password", f"the router at {host}:{port}")
        self._password = password
        self._known_hosts = known_hosts
        self.timeout = timeout
        # After something that looks like a prompt, wait this long for more output before
        # believing it: a config comment line `# ...` split across two reads looks like
        # the administrator prompt for a moment.
        self.settle = settle
        self._client: paramiko.SSHClient | None = None
        self._channel: paramiko.Channel | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.admin = False

    @property
    def where(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"

    # --- connection -----------------------------------------------------------------------

    def open(self) -> str:
        """Connect, authenticate, start the shell and read the banner up to the prompt."""
        client = paramiko.SSHClient()
        if self._known_hosts is not None:
            client.load_host_keys(self._known_hosts)
        else:
            client.load_system_host_keys()
        client.set_missing_host_key_policy(_RejectUnknownHost())
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.username,
                password=self._password,
                timeout=self.timeout,
                banner_timeout=self.timeout,
                auth_timeout=self.timeout,
                allow_agent=self._password is None,
                look_for_keys=self._password is None,
            )
        except RtxError:
            client.close()
            raise
        except paramiko.BadHostKeyException:
            client.close()
            raise RtxHostKeyError(
                f"the host key of {self.host}:{self.port} does not match known_hosts: "
                "refusing to connect (a different machine answers at this address)"
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            raise RtxAuthError(f"the router refused the SSH login {self.where}") from None
        except (paramiko.SSHException, OSError) as exc:
            client.close()
            raise RtxConnectionError(
                f"cannot open an SSH session to {self.host}:{self.port}: {type(exc).__name__}"
            ) from exc
        self._client = client
        try:
            # The RTX CLI needs a terminal; a wide one keeps long filter lines unwrapped.
            self._channel = client.invoke_shell(term="vt100", width=512, height=24)
        except paramiko.SSHException as exc:
            self.close()
            raise RtxConnectionError(
                f"the router at {self.host}:{self.port} gave no shell"
            ) from exc
        reply = self._read_until(("prompt",))
        self.admin = reply.prompt == "#"
        return reply.output

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None
        self._channel = None

    def __enter__(self) -> RtxSession:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- reading --------------------------------------------------------------------------

    def _chan(self) -> paramiko.Channel:
        if self._channel is None:
            raise RtxConnectionError(f"the session with {self.host}:{self.port} is not open")
        return self._channel

    def _send(self, text: str) -> None:
        try:
            self._chan().sendall(text.encode("utf-8"))
        except (OSError, paramiko.SSHException) as exc:
            raise RtxConnectionError(f"lost the session with {self.host}:{self.port}") from exc

    def _recv(self, wait: float) -> str | None:
        """Text received within `wait` seconds; "" when nothing came, None at end of stream."""
        channel = self._chan()
        if not channel.recv_ready():
            readable, _, _ = select.select([channel], [], [], max(wait, 0.0))
            if not readable:
                return ""
        data = channel.recv(65536)
        if not data:
            return None
        return self._decoder.decode(data)

    @staticmethod
    def _classify(buffer: str) -> tuple[PromptKind | Literal["pager"], str] | None:
        tail = buffer[buffer.rfind("\n") + 1 :].rsplit("\r", 1)[-1]
        if _PAGER_RE.search(tail):
            return "pager", ""
        if _YES_NO_RE.search(tail):
            return "yes_no", ""
        if _PASSWORD_RE.search(tail):
            return "password", ""
        match = _PROMPT_RE.match(tail)
        if match:
            return "prompt", match.group(1)
        return None

    def _read_until(
        self, wanted: tuple[PromptKind, ...], echo: str | None = None, modes: str = ">#"
    ) -> Reply:
        """Read until one of `wanted` ends the output; a prompt counts only in one of
        `modes` (">" user, "#" administrator), so that a `#` comment line of the output is
        never taken for the administrator prompt while in user mode."""
        deadline = time.monotonic() + self.timeout
        buffer = ""
        answered_pager_at = -1
        while True:
            found = self._classify(buffer)
            if found is not None and found[0] == "pager" and len(buffer) > answered_pager_at:
                # `console lines infinity` should prevent paging; answer it anyway.
                answered_pager_at = len(buffer)
                self._send(" ")
            elif (
                found is not None
                and found[0] != "pager"
                and found[0] in wanted
                and (found[0] != "prompt" or found[1] in modes)
            ):
                more = self._recv(self.settle)
                if more is None:
                    raise RtxConnectionError(f"the router at {self.host}:{self.port} hung up")
                if more == "":
                    return Reply(clean_output(buffer, echo), found[0], found[1])
                buffer += more
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RtxConnectionError(
                    f"timed out after {self.timeout:g}s waiting for the router at "
                    f"{self.host}:{self.port} to answer"
                )
            more = self._recv(remaining)
            if more is None:
                raise RtxConnectionError(f"the router at {self.host}:{self.port} hung up")
            buffer += more

    # --- commands ---------------------------------------------------------------------------

    def run(self, command: str, *, check: bool = True) -> str:
        """Type one command, return its output; RtxCommandError on an `Error:` line."""
        if "\r" in command or "\n" in command:
            raise ValueError("one command per line")
        log.debug("rtx %s:%d %s %s", self.host, self.port, "#" if self.admin else ">", command)
        self._send(command + "\r")
        reply = self._read_until(("prompt",), echo=command, modes="#" if self.admin else ">")
        self.admin = reply.prompt == "#"
        errors = [line.strip() for line in reply.output.splitlines() if ERROR_LINE_RE.match(line)]
        if errors and check:
            raise RtxCommandError(
                f"the router at {self.host}:{self.port} refused {command!r}: {errors[0]}",
                command=command,
                router_message=errors[0],
            )
        return reply.output

    def prepare(self) -> None:
        """ASCII messages and no pager, for this session only (typed in user mode, so the
        saved `console character` of the configuration is not changed)."""
        for command in ("console character en.ascii", "console lines infinity"):
            try:
                self.run(command)
            except RtxCommandError:
                # Older firmware lacks en.ascii; the error and pager handling cope anyway.
                log.debug("rtx %s:%d: %r not accepted", self.host, self.port, command)
        # Everything after this point is ASCII, but a Japanese description may still come
        # as raw bytes: the replacing decoder keeps the line structure intact.

    def show_config(self) -> str:
        return self.run("show config")

    def enter_administrator(self, password: str) -> None:
        check_typed_secret(
            password, "administrator password", f"the router at {self.host}:{self.port}"
        )
        log.debug("rtx %s:%d > administrator (password hidden)", self.host, self.port)
        self._send("administrator\r")
        reply = self._read_until(("password", "prompt"), echo="administrator")
        if reply.kind == "password":
            self._send(password + "\r")
            reply = self._read_until(("prompt", "password"))
            if reply.kind == "password":
                # Asked again: the router did not take it. Abandon the prompt.
                self._send("\r")
                reply = self._read_until(("prompt",))
        self.admin = reply.prompt == "#"
        if not self.admin:
            raise RtxAuthError(
                f"the router at {self.host}:{self.port} refused the administrator password"
            )

    def exit_administrator(self, *, save: bool) -> None:
        """Leave administrator mode; answer the save question with Y only if `save`."""
        self._send("exit\r")
        reply = self._read_until(("yes_no", "prompt"), echo="exit")
        if reply.kind == "yes_no":
            self._send("Y" if save else "N")
            reply = self._read_until(("prompt",))
        self.admin = reply.prompt == "#"
        if self.admin:
            raise RtxCommandError(f"could not leave administrator mode on {self.host}:{self.port}")

    def quit(self) -> None:
        """Log out (best effort) and close."""
        try:
            if self._channel is not None and not self._channel.closed:
                if self.admin:
                    self.exit_administrator(save=False)
                self._send("quit\r")
        except RtxError:
            pass
        finally:
            self.close()
