"""Real daemons on loopback for the integration tests: sshd, Postfix and Dovecot.

Each starter runs one daemon on its own loopback address and port, with every file (config,
keys, queue, logs) in a directory the caller gives, and returns a handle whose `stop()` ends
it. They are parametric so that several "hosts" can run side by side: the rental VPS on
127.0.0.8 (sshd + Postfix + Dovecot, tests/integration/conftest.py) and the onprem Postfix on
127.0.0.2 (other tests). A starter raises `ServiceUnavailable` with the reason (missing binary,
port taken, daemon log tail); fixtures turn that into `unavailable()`, which fails under
`CI=true` and skips elsewhere. `ServiceStack` stops what it started, also at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

import pytest

T = TypeVar("T")

SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/lib/postfix/sbin")
IN_CI = os.environ.get("CI", "").strip().lower() == "true"


class ServiceUnavailable(RuntimeError):
    """A daemon cannot run here: missing binary, address in use, or it failed to start."""


def unavailable(reason: str) -> NoReturn:
    """Fail under CI (a service that should run there must not silently skip tests), else skip."""
    if IN_CI:
        pytest.fail(f"integration service unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"integration service unavailable: {reason}")


def start_or_unavailable(start: Callable[[], T]) -> T:
    """Call `start()`; a `ServiceUnavailable` becomes `unavailable()` (fail in CI, else skip)."""
    try:
        return start()
    except ServiceUnavailable as exc:
        unavailable(str(exc))


def require_binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(
        name, path=os.pathsep.join([*SBIN_DIRS, os.environ.get("PATH", "")])
    )
    if not found:
        raise ServiceUnavailable(f"{name} not found (install the Debian package that has it)")
    return found


def require_root() -> None:
    if os.geteuid() != 0:
        raise ServiceUnavailable("needs root (daemons switch users and bind privileged ports)")


def ensure_loopback_address(address: str) -> None:
    """Add `address` to lo once: Postfix refuses inet_interfaces not on an interface."""
    if address == "127.0.0.1":
        return
    ip = require_binary("ip")
    shown = subprocess.run(
        [ip, "-o", "-4", "addr", "show", "dev", "lo"], capture_output=True, text=True, check=False
    )
    if f"inet {address}/" in shown.stdout:
        return
    added = subprocess.run(
        [ip, "addr", "add", f"{address}/8", "dev", "lo"],
        capture_output=True,
        text=True,
        check=False,
    )
    # "File exists": another process added it in between; that is what we want.
    if added.returncode != 0 and "exists" not in added.stderr:
        raise ServiceUnavailable(f"cannot add {address} to lo: {added.stderr.strip()}")


def make_base_dir(prefix: str = "mailrec-it-") -> Path:
    """A fresh directory under /tmp that daemon users can traverse.

    pytest's tmp_path lives under a 0700 directory, which the postfix, dovecot and virtual
    mail users could not enter.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def port_open(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_port_free(address: str, port: int) -> None:
    if port_open(address, port):
        raise ServiceUnavailable(
            f"{address}:{port} is already in use (a daemon left over from an earlier run, or "
            "a system service listening on all addresses)"
        )


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def wait_for_port(
    address: str,
    port: int,
    *,
    what: str,
    log: Path,
    timeout: float = 15,
    alive: Callable[[], bool] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(address, port, timeout=0.2):
            return
        if alive is not None and not alive():
            raise ServiceUnavailable(f"{what} exited at start; log {log}:\n{log_tail(log)}")
        time.sleep(0.05)
    raise ServiceUnavailable(
        f"{what} not listening on {address}:{port} after {timeout:g}s; log {log}:\n{log_tail(log)}"
    )


def _run(argv: list[str], what: str, *, env: Mapping[str, str] | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise ServiceUnavailable(
            f"{what} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class Service(Protocol):
    def stop(self) -> None: ...


S = TypeVar("S", bound=Service)


@dataclass
class ServiceStack:
    """Stops, in reverse order, every service added; also at interpreter exit (Ctrl-C)."""

    services: list[Service] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        atexit.register(self.stop_all)

    def add(self, service: S) -> S:
        self.services.append(service)
        return service

    def add_dir(self, path: Path) -> Path:
        self.dirs.append(path)
        return path

    def stop_all(self) -> None:
        while self.services:
            service = self.services.pop()
            with contextlib.suppress(Exception):
                service.stop()
        if os.environ.get("MAILREC_KEEP_SERVICE_DIRS") != "1":
            while self.dirs:
                shutil.rmtree(self.dirs.pop(), ignore_errors=True)


# --- sshd -----------------------------------------------------------------------------


@dataclass
class Sshd:
    address: str
    port: int
    dir: Path
    client_key: Path  # private key whose public half is in authorized_keys
    known_hosts: Path  # the host key as ssh-keyscan reports it
    host_key: Path
    log: Path
    process: subprocess.Popen[bytes]

    def connect(self, user: str = "root") -> str:
        return f"ssh://{user}@{self.address}:{self.port}"

    def stop(self) -> None:
        _stop_process(self.process)


def _keygen(path: Path, comment: str) -> None:
    _run(
        [
            require_binary("ssh-keygen"),
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            comment,
            "-f",
            str(path),
        ],
        "ssh-keygen",
    )


def _root_locked() -> bool:
    # With UsePAM no, sshd refuses a locked account ("!" password) even for key logins.
    try:
        for line in Path("/etc/shadow").read_text().splitlines():
            if line.startswith("root:"):
                return line.split(":")[1].startswith("!")
    except OSError:
        pass
    return False


def start_sshd(directory: Path, *, address: str, port: int,
               extra_config: Sequence[str] = ()) -> Sshd:
    """sshd on address:port; root may log in with the per-run client key only.
    `extra_config`: more sshd_config lines (the bench sets every session's PATH)."""
    require_root()
    sshd = require_binary("sshd")
    require_binary("ssh-keygen")
    keyscan = require_binary("ssh-keyscan")
    ensure_loopback_address(address)
    require_port_free(address, port)
    directory.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    host_key = directory / "ssh_host_ed25519_key"
    client_key = directory / "client_ed25519"
    _keygen(host_key, f"mailrec-test-host-{address}")
    _keygen(client_key, "mailrec-test-client")
    authorized = directory / "authorized_keys"
    authorized.write_text((directory / "client_ed25519.pub").read_text())
    authorized.chmod(0o600)
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"ListenAddress {address}:{port}",
                f"HostKey {host_key}",
                f"PidFile {directory / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                f"UsePAM {'yes' if _root_locked() else 'no'}",
                # The keys live under /tmp (world-writable), which StrictModes rejects.
                "StrictModes no",
                "Subsystem sftp internal-sftp",
                "LogLevel VERBOSE",
                "MaxSessions 32",
                "MaxStartups 64",
                *extra_config,
                "",
            ]
        )
    )
    log = directory / "sshd.log"
    _run([sshd, "-t", "-f", str(config)], "sshd -t (config test)")
    process = subprocess.Popen(
        [sshd, "-D", "-f", str(config), "-E", str(log)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    handle = Sshd(
        address, port, directory, client_key, directory / "known_hosts", host_key, log, process
    )
    try:
        wait_for_port(address, port, what="sshd", log=log, alive=lambda: process.poll() is None)
        scanned = _run(
            [keyscan, "-T", "5", "-t", "ed25519", "-p", str(port), address], "ssh-keyscan"
        )
        if not scanned.strip():
            raise ServiceUnavailable(f"ssh-keyscan got no key from {address}:{port}")
        handle.known_hosts.write_text(scanned)
    except BaseException:
        handle.stop()
        raise
    return handle


# --- Postfix ----------------------------------------------------------------------------

_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class Postfix:
    address: str
    smtp_port: int
    dir: Path
    config_dir: Path  # pass to `postfix -c`, `postconf -c`, `postmap -c`
    queue_dir: Path
    maillog: Path

    def command(self, program: str, *args: str) -> list[str]:
        """argv of a Postfix tool for this instance: `-c DIR` right after the program, so it
        never reads the system's /etc/postfix/main.cf (which a fresh CI machine lacks)."""
        return postfix_command(program, self.config_dir, *args)

    def run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Postfix tool of this instance; `check` raises with its stderr on failure."""
        proc = subprocess.run(
            self.command(program, *args), capture_output=True, text=True, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(proc.args)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc

    def postconf(self, *names: str) -> str:
        return _run(self.command("postconf", "-h", *names), "postconf").strip()

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        pid = self.master_pid()
        subprocess.run(self.command("postfix", "stop"), capture_output=True, check=False)
        if pid is None:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


POSTFIX_TOOLS = frozenset({"postconf", "postmap", "postfix", "postqueue", "postsuper",
                           "postalias", "postcat", "postdrop", "postkick", "postlock", "postlog",
                           "postmulti"})


def postfix_command(program: str, config_dir: Path | str, *args: str) -> list[str]:
    """argv of a Postfix tool with `-c config_dir` right after the program."""
    if program not in POSTFIX_TOOLS:
        raise ValueError(f"{program} is not a Postfix tool")
    return [require_binary(program), "-c", str(config_dir), *args]


def start_postfix(
    directory: Path,
    *,
    address: str,
    smtp_port: int = 25,
    myhostname: str = "mail.test.invalid",
    main_cf: Mapping[str, str] | None = None,
    files: Mapping[str, str] | None = None,
    postmap: tuple[str, ...] = (),
) -> Postfix:
    """A Postfix instance listening on address:smtp_port, everything under `directory`.

    `main_cf` adds or overrides main.cf parameters; `files` are written into the config
    directory first (map sources, mynetworks lists) and the names in `postmap` are then
    compiled with `postmap hash:`. Logs go to `directory/maillog` (there is no syslog here).
    """
    require_root()
    for tool in ("postfix", "postmap"):
        require_binary(tool)
    ensure_loopback_address(address)
    require_port_free(address, smtp_port)
    config_dir = directory / "etc"
    queue_dir = directory / "queue"
    data_dir = directory / "data"
    for path in (config_dir, queue_dir, data_dir):
        path.mkdir(parents=True, exist_ok=True)
    shutil.chown(data_dir, user="postfix")  # master.lock lives here
    maillog = directory / "maillog"
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": str(queue_dir),
        "data_directory": str(data_dir),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": myhostname,
        "mydomain": myhostname.partition(".")[2] or myhostname,
        "myorigin": "$myhostname",
        "inet_interfaces": address,
        "inet_protocols": "ipv4",
        "smtp_bind_address": address,
        "mydestination": "",
        "relayhost": "",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        "smtputf8_enable": "no",
        "maillog_file": str(maillog),
        # maillog_file must sit under one of these prefixes, or Postfix exits at start.
        "maillog_file_prefixes": f"/var,/dev/stdout,/tmp,{directory}",
        "smtpd_banner": "$myhostname ESMTP",
        **(main_cf or {}),
    }
    (config_dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    (config_dir / "master.cf").write_text(_MASTER_CF.format(listen=f"{address}:{smtp_port}"))
    for name, content in (files or {}).items():
        (config_dir / name).write_text(content)
    # Postfix tools wait ~2 s for a main.cf written "just now" to settle: backdate it.
    hour_ago = time.time() - 3600
    os.utime(config_dir / "main.cf", (hour_ago, hour_ago))
    handle = Postfix(address, smtp_port, directory, config_dir, queue_dir, maillog)
    for name in postmap:
        _run(handle.command("postmap", f"hash:{config_dir / name}"), f"postmap {name}")
    try:
        _run(handle.command("postfix", "check"), f"postfix check ({maillog_hint(maillog)})")
        _run(handle.command("postfix", "start"), f"postfix start ({maillog_hint(maillog)})")
        wait_for_port(address, smtp_port, what="postfix smtpd", log=maillog)
    except BaseException:
        handle.stop()
        raise
    return handle


def maillog_hint(maillog: Path) -> str:
    return f"log {maillog}:\n{log_tail(maillog)}"


# --- Dovecot ----------------------------------------------------------------------------


@dataclass
class Dovecot:
    address: str
    imap_port: int
    dir: Path
    config: Path
    passwd_file: Path
    log: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        _stop_process(self.process)


def start_dovecot(
    directory: Path,
    *,
    address: str,
    imap_port: int = 1143,
    passwd_file: Path | None = None,
    mail_location: str = "maildir:~",
) -> Dovecot:
    """Dovecot IMAP (plain text, no TLS) on address:imap_port with passwd-file auth.

    Users come from `passwd_file` (`user@domain:{SCHEME}hash:uid:gid::home::`), created
    empty (root:dovecot 0640) if missing; Dovecot rereads it when it changes.
    """
    require_root()
    dovecot = require_binary("dovecot")
    ensure_loopback_address(address)
    require_port_free(address, imap_port)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state").mkdir(exist_ok=True)
    passwd = passwd_file or directory / "users"
    if not passwd.exists():
        passwd.write_text("")
    try:
        gid = grp.getgrnam("dovecot").gr_gid
    except KeyError:
        raise ServiceUnavailable("no 'dovecot' group: is dovecot-core installed?") from None
    os.chown(passwd, 0, gid)  # the auth process runs as dovecot and must read it
    passwd.chmod(0o640)
    log = directory / "dovecot.log"
    config = directory / "dovecot.conf"
    config.write_text(
        f"""\
instance_name = mailrec-{address}-{imap_port}
base_dir = {directory / "run"}
state_dir = {directory / "state"}
log_path = {log}
info_log_path = {log}
protocols = imap
listen = {address}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = {mail_location}
first_valid_uid = 100
passdb {{
  driver = passwd-file
  args = scheme=SHA512-CRYPT username_format=%u {passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}
service imap-login {{
  inet_listener imap {{
    address = {address}
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""
    )
    process = subprocess.Popen(
        [dovecot, "-F", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(directory / "dovecot.stderr").open("wb"),
    )
    handle = Dovecot(address, imap_port, directory, config, passwd, log, process)
    try:
        wait_for_port(
            address,
            imap_port,
            what="dovecot",
            log=log if log.exists() else directory / "dovecot.stderr",
            alive=lambda: process.poll() is None,
        )
    except BaseException:
        handle.stop()
        raise
    return handle
