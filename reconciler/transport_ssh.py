"""The SSH side of `transport`: `SshTransport` runs commands and moves files on a remote host
over one paramiko connection, with the host key checked against known_hosts (never added).

In its own module so that only a command that really connects somewhere imports paramiko
(`transport.open_transport` imports it then); the lab and `--help` never do.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import paramiko

from reconciler.transport import (
    _CONNECT_TIMEOUT,
    CommandResult,
    HostKeyError,
    Transport,
    TransportError,
    _tmp_name,
    log,
    quote_argv,
)

if TYPE_CHECKING:
    from paramiko.sftp_client import SFTPClient


class _UnknownHostKey(paramiko.SSHException):
    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(f"{hostname} not in known_hosts")
        self.hostname = hostname
        self.key = key


class _RejectUnknown(paramiko.RejectPolicy):
    """RejectPolicy that hands the offered key back, so the error can show its fingerprint."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise _UnknownHostKey(hostname, key)


class SshTransport(Transport):
    """Commands and files on a remote host over one SSH connection (paramiko)."""

    def __init__(
        self,
        host: str,
        *,
        port: int = 22,
        user: str = "root",
        known_hosts: Path | None = None,
        key_filename: str | None = None,
        password: str | None = None,
        root: Path | None = None,
        connect_timeout: float = _CONNECT_TIMEOUT,
    ) -> None:
        super().__init__(f"ssh://{user}@{host}:{port}", root=root)
        self.hostname = host
        self.port = port
        self.user = user
        self.known_hosts = known_hosts or Path("~/.ssh/known_hosts").expanduser()
        self._key_filename = key_filename
        self._password = password
        self._connect_timeout = connect_timeout
        self.add_secret(password)
        self._client: paramiko.SSHClient | None = None
        self._sftp: SFTPClient | None = None
        self._connect()

    # --- connection ------------------------------------------------------------------
    @property
    def _keyscan_hint(self) -> str:
        return f"ssh-keyscan -p {self.port} {self.hostname} >> {self.known_hosts}"

    def _connect(self) -> None:
        client = paramiko.SSHClient()
        if not self.known_hosts.is_file():
            raise HostKeyError(
                f"{self.host}: known_hosts file {self.known_hosts} does not exist. Check the "
                f"host's key fingerprint out of band (on the host: ssh-keygen -lf "
                f"/etc/ssh/ssh_host_ed25519_key.pub), then run: {self._keyscan_hint}",
                host=self.host,
            )
        try:
            client.load_host_keys(str(self.known_hosts))
        except (OSError, paramiko.SSHException) as exc:
            self._fail(f"cannot load known_hosts {self.known_hosts}", exc)
        # Never trust a key on first use: mailrec changes mail routing as root there.
        client.set_missing_host_key_policy(_RejectUnknown())
        try:
            client.connect(
                self.hostname,
                port=self.port,
                username=self.user,
                password=self._password,
                key_filename=self._key_filename,
                # With an explicit key or password, do not wander through agent and ~/.ssh.
                allow_agent=self._key_filename is None and self._password is None,
                look_for_keys=self._key_filename is None and self._password is None,
                timeout=self._connect_timeout,
                banner_timeout=self._connect_timeout,
                auth_timeout=self._connect_timeout,
            )
        except _UnknownHostKey as exc:
            client.close()
            raise HostKeyError(
                f"{self.host}: host key of {exc.hostname} is not in {self.known_hosts} "
                f"(the host offered {exc.key.get_name()} {exc.key.fingerprint}). Check that "
                f"fingerprint out of band, then run: {self._keyscan_hint}",
                host=self.host,
            ) from None
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                f"{self.host}: host key CHANGED for {exc.hostname}: {self.known_hosts} has "
                f"{exc.expected_key.get_name()} {exc.expected_key.fingerprint}, the host offered "
                f"{exc.key.get_name()} {exc.key.fingerprint}. Someone may be intercepting the "
                f"connection, or the host was reinstalled. Only after checking the new "
                f"fingerprint out of band: ssh-keygen -R '[{self.hostname}]:{self.port}' -f "
                f"{self.known_hosts} (or the bare host name for port 22), then run: "
                f"{self._keyscan_hint}",
                host=self.host,
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            how = (
                f"key {self._key_filename}"
                if self._key_filename
                else "password"
                if self._password
                else "agent or ~/.ssh keys"
            )
            raise TransportError(
                f"{self.host}: authentication as {self.user} failed ({how})", host=self.host
            ) from None
        except (paramiko.SSHException, OSError) as exc:
            client.close()
            self._fail("cannot connect", exc)
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(30)  # a daemon keeps this connection for hours
            # Each command is a few small packets each way: without TCP_NODELAY, Nagle's
            # algorithm and delayed ACKs add ~40 ms to every channel opened (measured).
            sock = transport.sock
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._client = client
        log.debug("%s: connected", self.host)

    def _active(self) -> paramiko.SSHClient:
        client = self._client
        transport = client.get_transport() if client is not None else None
        if client is None or transport is None or not transport.is_active():
            # The connection dropped (idle daemon, server restart): reconnect once, with the
            # same host key check.
            self.close()
            self._connect()
            assert self._client is not None
            return self._client
        return client

    def _sftp_client(self) -> SFTPClient:
        client = self._active()  # a reconnect drops the old SFTP session too
        if self._sftp is None:
            try:
                self._sftp = client.open_sftp()
            except (paramiko.SSHException, OSError) as exc:
                self._fail("cannot open SFTP (is the sftp subsystem enabled?)", exc)
        return self._sftp

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- commands --------------------------------------------------------------------
    def _run(self, argv: tuple[str, ...], input: bytes | None, timeout: float) -> CommandResult:
        command = quote_argv(argv)
        transport = self._active().get_transport()
        assert transport is not None
        deadline = time.monotonic() + timeout
        try:
            chan = transport.open_session(timeout=self._connect_timeout)
        except (paramiko.SSHException, OSError) as exc:
            self._fail(f"cannot open a channel for `{self.mask(command)}`", exc)
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            chan.exec_command(command)
            if input:
                chan.sendall(input)
            chan.shutdown_write()  # EOF on the command's stdin
            while True:
                while chan.recv_ready():
                    out.append(chan.recv(65536))
                while chan.recv_stderr_ready():
                    err.append(chan.recv_stderr(65536))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                if chan.eof_received:
                    # Exit status follows EOF; the fd below stays readable after EOF.
                    if chan.status_event.wait(min(remaining, 1.0)):
                        break
                    continue
                select.select([chan], [], [], min(remaining, 1.0))
            while chan.recv_ready():
                out.append(chan.recv(65536))
            while chan.recv_stderr_ready():
                err.append(chan.recv_stderr(65536))
            status = chan.recv_exit_status()
        except TimeoutError:
            raise TransportError(
                f"{self.host}: command `{self.mask(command)}` timed out after {timeout:g}s",
                host=self.host,
                argv=argv,
            ) from None
        except (paramiko.SSHException, OSError) as exc:
            self._fail(f"command `{self.mask(command)}` failed", exc)
        finally:
            chan.close()
        # -1: the server sent no status (the command was killed by a signal).
        return CommandResult(argv, status if status >= 0 else 255, b"".join(out), b"".join(err))

    # --- files -----------------------------------------------------------------------
    def _read(self, path: str) -> bytes | None:
        sftp = self._sftp_client()
        try:
            with sftp.open(path, "rb") as handle:
                handle.prefetch()
                return handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._fail(f"cannot read {path}", exc)

    def _write_atomic(self, path: str, data: bytes, mode: int, backup: bool) -> None:
        sftp = self._sftp_client()
        try:
            old = sftp.stat(path)
        except FileNotFoundError:
            old = None
        except OSError as exc:
            self._fail(f"cannot stat {path}", exc)
        owner = (old.st_uid, old.st_gid) if old is not None else None
        try:
            if backup and old is not None:
                with sftp.open(path, "rb") as handle:
                    handle.prefetch()
                    previous = handle.read()
                old_mode = (old.st_mode or 0o644) & 0o7777
                self._put(sftp, path + ".bak", previous, old_mode, owner)
            self._put(sftp, path, data, mode, owner)
        except OSError as exc:
            self._fail(f"cannot write {path}", exc)

    def _put(
        self,
        sftp: SFTPClient,
        path: str,
        data: bytes,
        mode: int,
        owner: tuple[int | None, int | None] | None,
    ) -> None:
        tmp = _tmp_name(path)
        try:
            with sftp.open(tmp, "wbx") as handle:
                # Mode (and owner) before any byte is written: a secret is never readable
                # under the server's default mode, even for a moment.
                handle.chmod(0o600)
                if owner is not None and owner[0] is not None and owner[1] is not None:
                    handle.chown(owner[0], owner[1])
                handle.chmod(mode)
                handle.write(data)
            sftp.posix_rename(tmp, path)
        except BaseException:
            try:
                sftp.remove(tmp)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, None):
                    log.warning("%s: could not remove temp file %s", self.host, tmp)
            raise
