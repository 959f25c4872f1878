"""A real BIND 9 `named` on loopback for the DNS tests: one dynamic zone, one per-run TSIG key.

`start_named()` writes named.conf, the zone file and a key made by `tsig-keygen` into a fresh
directory under /tmp (pytest's tmp_path is 0700, which the `bind` user cannot enter), runs
`named -g` in the foreground on 127.0.0.4 and a free port, and waits until it answers the
zone's SOA over TCP. As root it runs `named -u bind` with the directory owned by bind (BIND
writes the zone's update journal there); as another user it runs as that user.

A starter raises `NamedUnavailable` with the reason (missing binary, config rejected, daemon
log tail); `named_or_unavailable()` turns that into a failure under `CI=true` (the service
must run there) and a skip elsewhere. `NamedServer.stop()` ends the daemon and removes the
directory (kept with MAILREC_KEEP_SERVICE_DIRS=1).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.tsigkeyring
import dns.update
import pytest

ADDRESS = "127.0.0.4"
ZONE = "example.co.jp"
KEY_NAME = "mailrec"
ALGORITHM = "hmac-sha256"
SBIN_DIRS = ("/usr/sbin", "/sbin")

# The zone as the company's DNS holds it before the migration (same records as the lab's).
ZONE_TEXT = """\
$ORIGIN example.co.jp.
$TTL 3600
@   IN SOA ns1.example.co.jp. hostmaster.example.co.jp. (
        2024010101 ; serial
        3600       ; refresh
        900        ; retry
        1209600    ; expire
        300 )      ; negative
@   IN NS  ns1.example.co.jp.
@   3600 IN MX 10 mail.example.co.jp.
@   3600 IN TXT "v=spf1 ip4:198.51.100.10 ~all"
@   3600 IN TXT "google-site-verification=test-token"
ns1 IN A   198.51.100.53
mail IN A  198.51.100.10
"""


class NamedUnavailable(RuntimeError):
    """named cannot run here: missing binary, no free port, or it failed to start."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def unavailable(reason: str) -> NoReturn:
    """Fail under CI (BIND is installed there, so a skip would hide a broken test), else skip."""
    if in_ci():
        pytest.fail(f"BIND unavailable under CI=true: {reason}", pytrace=False)
    pytest.skip(f"BIND unavailable: {reason}")


def require_binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(
        name, path=os.pathsep.join([*SBIN_DIRS, os.environ.get("PATH", "")])
    )
    if not found:
        raise NamedUnavailable(f"{name} not found (apt-get install bind9 bind9-utils)")
    return found


def ensure_loopback_address(address: str) -> None:
    """Add address/8 to lo when we may; Linux binds any 127.x anyway, so failure is not fatal."""
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
    if ip is None or os.geteuid() != 0:
        return
    shown = subprocess.run(
        [ip, "-o", "-4", "addr", "show", "dev", "lo"], capture_output=True, text=True, check=False
    )
    if f"inet {address}/" not in shown.stdout:
        subprocess.run(
            [ip, "addr", "add", f"{address}/8", "dev", "lo"], capture_output=True, check=False
        )


def free_port(address: str) -> int:
    """A port free for both TCP and UDP on address (named listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((address, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((address, port))
                except OSError:
                    continue
            return port
    raise NamedUnavailable(f"no free TCP+UDP port on {address}")


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def make_tsig_key(tsig_keygen: str, directory: Path) -> tuple[Path, str]:
    """`tsig-keygen -a hmac-sha256 mailrec` into key.conf; returns the file and the secret."""
    proc = subprocess.run(
        [tsig_keygen, "-a", ALGORITHM, KEY_NAME], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise NamedUnavailable(f"tsig-keygen failed: {proc.stderr.strip()}")
    match = re.search(r'secret\s+"([^"]+)"', proc.stdout)
    if match is None:
        raise NamedUnavailable(f"tsig-keygen printed no secret: {proc.stdout!r}")
    key_file = directory / "key.conf"
    key_file.write_text(proc.stdout)
    return key_file, match.group(1)


@dataclass
class NamedServer:
    address: str
    port: int
    dir: Path
    zone: str
    key_name: str
    algorithm: str
    secret: str
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def origin(self) -> dns.name.Name:
        return dns.name.from_text(self.zone)

    def keyring(self) -> dict[dns.name.Name, dns.tsig.Key]:
        return dns.tsigkeyring.from_text({self.key_name: (self.algorithm, self.secret)})

    def query(self, rdtype: str) -> dns.rrset.RRset | None:
        """The zone apex's record set of rdtype, straight from the server over TCP."""
        kind = dns.rdatatype.from_text(rdtype)
        response = dns.query.tcp(
            dns.message.make_query(self.origin, kind), self.address, port=self.port, timeout=5
        )
        try:
            return response.find_rrset(response.answer, self.origin, dns.rdataclass.IN, kind)
        except KeyError:
            return None

    def replace(self, rdtype: str, ttl: int, *values: str) -> None:
        """Set the apex's record set directly (test setup, or "someone else's change")."""
        update = dns.update.UpdateMessage(
            self.origin, keyring=self.keyring(), keyalgorithm=self.algorithm
        )
        update.replace(self.origin, ttl, rdtype, *values)
        response = dns.query.tcp(update, self.address, port=self.port, timeout=5)
        if response.rcode() != dns.rcode.NOERROR:
            raise AssertionError(
                f"test update of {rdtype} refused: {dns.rcode.to_text(response.rcode())}"
            )

    def stop(self) -> None:
        """End named and remove its directory; calling it again does nothing."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if os.environ.get("MAILREC_KEEP_SERVICE_DIRS") != "1":
            shutil.rmtree(self.dir, ignore_errors=True)


def _named_conf(directory: Path, address: str, port: int, key_file: Path, zone: str) -> str:
    return f"""\
options {{
    directory "{directory}";
    pid-file "{directory}/named.pid";
    session-keyfile "{directory}/session.key";
    managed-keys-directory "{directory}";
    listen-on port {port} {{ {address}; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    notify no;
    allow-query {{ any; }};
}};
controls {{ }};
include "{key_file}";
zone "{zone}" {{
    type primary;
    file "{directory}/db.{zone}";
    update-policy {{ grant {KEY_NAME} zonesub ANY; }};
}};
"""


def _wait_ready(server: NamedServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise NamedUnavailable(
                f"named exited at start (code {server.process.returncode}); "
                f"log {server.log}:\n{log_tail(server.log)}"
            )
        try:
            if server.query("SOA") is not None:
                return
            last = "answered without the zone's SOA"
        except (OSError, dns.exception.DNSException) as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.05)
    raise NamedUnavailable(
        f"named not answering on {server.address}:{server.port} after {timeout:g}s ({last}); "
        f"log {server.log}:\n{log_tail(server.log)}"
    )


def start_named(
    *, address: str = ADDRESS, zone: str = ZONE, zone_text: str = ZONE_TEXT, timeout: float = 20
) -> NamedServer:
    named = require_binary("named")
    checkconf = shutil.which("named-checkconf") or shutil.which(
        "named-checkconf", path=os.pathsep.join(SBIN_DIRS)
    )
    tsig_keygen = require_binary("tsig-keygen")
    ensure_loopback_address(address)
    directory = Path(tempfile.mkdtemp(prefix="mailrec-bind-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        key_file, secret = make_tsig_key(tsig_keygen, directory)
        (directory / f"db.{zone}").write_text(zone_text)
        port = free_port(address)
        conf = directory / "named.conf"
        conf.write_text(_named_conf(directory, address, port, key_file, zone))
        argv = [named, "-g", "-4", "-n", "1", "-c", str(conf)]
        if os.geteuid() == 0:
            try:
                bind = pwd.getpwnam("bind")
            except KeyError:
                raise NamedUnavailable("running as root but there is no `bind` user") from None
            for path in [directory, *directory.iterdir()]:
                os.chown(path, bind.pw_uid, bind.pw_gid)
            argv += ["-u", "bind"]
        if checkconf:
            check = subprocess.run(
                [checkconf, "-z", str(conf)], capture_output=True, text=True, check=False
            )
            if check.returncode != 0:
                raise NamedUnavailable(
                    f"named-checkconf rejected the config: {(check.stdout + check.stderr).strip()}"
                )
        log = directory / "named.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        server = NamedServer(
            address, port, directory, zone, KEY_NAME, ALGORITHM, secret, log, process
        )
        atexit.register(server.stop)  # also when the run is interrupted
        try:
            _wait_ready(server, timeout)
        except BaseException:
            server.stop()
            raise
        return server
    except BaseException:
        if os.environ.get("MAILREC_KEEP_SERVICE_DIRS") != "1":
            shutil.rmtree(directory, ignore_errors=True)
        raise


@contextlib.contextmanager
def named_or_unavailable() -> Iterator[NamedServer]:
    """A running named for the duration of the block: fails under CI, skips elsewhere."""
    try:
        server = start_named()
    except NamedUnavailable as exc:
        unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()
