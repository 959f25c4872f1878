"""Fixtures for the RTX driver tests: corpus access, a real RTX emulator on loopback
(127.0.0.7, free port) with a known_hosts file, and a raw terminal client for CLI tests."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from reconciler.drivers.rtx.config import RtxConfig
from reconciler.drivers.rtx.driver import RtxDriver
from reconciler.lab.rtx_emulator import RtxEmulator, load_or_create_host_key

CORPUS = Path(__file__).parent / "corpus"
HOST = "127.0.0.7"
LOGIN_PASSWORD = "login-pw-Kq7w"
ADMIN_PASSWORD = "admin-pw-Zr3x"


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.conf"))


def corpus_text(name: str) -> str:
    return (CORPUS / name).read_bytes().decode("utf-8", "surrogateescape")


def corpus_config(name: str) -> RtxConfig:
    return RtxConfig.parse(corpus_text(name))


@dataclass
class Lab:
    """One running emulator with its saved configuration file."""

    emulator: RtxEmulator
    config_path: Path
    known_hosts: Path

    @property
    def port(self) -> int:
        return self.emulator.port

    def driver(
        self,
        *,
        user: str = "admin",
        password: str = LOGIN_PASSWORD,
        admin_password: str = ADMIN_PASSWORD,
        known_hosts: Path | None = None,
    ) -> RtxDriver:
        return RtxDriver(
            HOST,
            self.port,
            user,
            password,
            admin_password,
            str(known_hosts or self.known_hosts),
            timeout=5.0,
        )

    def saved(self) -> bytes:
        return self.config_path.read_bytes()

    def terminal(self) -> Terminal:
        client = paramiko.SSHClient()
        client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(
            HOST,
            port=self.port,
            username="admin",
            password=LOGIN_PASSWORD,
            allow_agent=False,
            look_for_keys=False,
            timeout=5,
        )
        return Terminal(client)


class Terminal:
    """A bare interactive client: send keystrokes, wait for a pattern in the output."""

    def __init__(self, client: paramiko.SSHClient, encoding: str = "utf-8") -> None:
        self.client = client
        self.channel = client.invoke_shell(term="vt100", width=200, height=24)
        self.encoding = encoding
        self.buffer = b""

    def send(self, text: str) -> None:
        self.channel.sendall(text.encode(self.encoding))

    def expect(self, pattern: str, *, timeout: float = 5.0) -> str:
        """Everything received up to and including the first match of `pattern` (a regex on
        the decoded text); the rest stays buffered."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.buffer.decode(self.encoding, "replace")
            match = regex.search(text)
            if match:
                consumed = text[: match.end()]
                self.buffer = self.buffer[len(consumed.encode(self.encoding, "replace")) :]
                return consumed
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in output: {text!r}")
            self.channel.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.channel.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise AssertionError(f"session closed before {pattern!r}: {text!r}")
            self.buffer += data

    def wait_closed(self, timeout: float = 5.0) -> None:
        """Read until the server ends the session."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.channel.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                if not self.channel.recv(65536):
                    return
            except TimeoutError:
                break
        raise AssertionError("the server did not end the session")

    def close(self) -> None:
        self.client.close()


@pytest.fixture(scope="session")
def host_key_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rtx-host-key") / "ssh_host_rsa_key"
    load_or_create_host_key(path)
    return path


@pytest.fixture
def make_lab(tmp_path: Path, host_key_path: Path) -> Iterator[Callable[..., Lab]]:
    started: list[RtxEmulator] = []

    def make(source: str, *, text: str | None = None) -> Lab:
        """`source` names a corpus file; `text` (if given) is the configuration instead."""
        directory = tmp_path / f"router{len(started)}"
        directory.mkdir()
        config_path = directory / "config.txt"
        if text is None:
            config_path.write_bytes((CORPUS / source).read_bytes())
        else:
            config_path.write_bytes(text.encode("utf-8"))
        emulator = RtxEmulator(
            config_path,
            HOST,
            0,
            login_password=LOGIN_PASSWORD,
            admin_password=ADMIN_PASSWORD,
            host_key_path=host_key_path,
        )
        emulator.start()
        started.append(emulator)
        known_hosts = directory / "known_hosts"
        known_hosts.write_text(emulator.known_hosts_line() + "\n")
        return Lab(emulator, config_path, known_hosts)

    yield make
    for emulator in started:
        emulator.stop()
