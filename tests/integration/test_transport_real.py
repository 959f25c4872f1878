"""reconciler.transport against the local machine and a real sshd on 127.0.0.8:2222."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.model import Connect
from reconciler.transport import (
    HostKeyError,
    LocalTransport,
    Transport,
    TransportError,
    UnsafePathError,
    open_transport,
    quote_argv,
    safe_path,
)
from reconciler.transport_ssh import SshTransport

from .services import Sshd

pytestmark = pytest.mark.integration

# Each must reach the program as exactly one argument, unchanged.
HOSTILE = [
    "a b; rm -rf /",
    "$(touch /tmp/mailrec-pwned)",
    "`id`",
    "it's",
    '"double"',
    "*",
    "back\\slash",
    "new\nline",
    "tab\there",
    "-n",
    "",
    "ünïcödé",
    "$HOME ${PATH}",
    "a|b&c>d<e",
    "--",
]


def argv_roundtrip(transport: Transport, values: list[str]) -> list[str]:
    # printf prints each argument followed by NUL: what the program received, one by one.
    result = transport.run(["printf", "%s\\0", *values])
    return result.stdout.decode().split("\0")[:-1]


@pytest.fixture
def ssh(rental_sshd: Sshd) -> Iterator[Transport]:
    transport = open_transport(
        Connect.parse(rental_sshd.connect()),
        known_hosts=rental_sshd.known_hosts,
        key_filename=str(rental_sshd.client_key),
    )
    yield transport
    transport.close()


@pytest.fixture
def local() -> Transport:
    return LocalTransport()


@pytest.fixture(params=["local", "ssh"])
def any_transport(request: pytest.FixtureRequest) -> Transport:
    transport: Transport = request.getfixturevalue(request.param)
    return transport


@pytest.fixture
def files(service_dir: Path, request: pytest.FixtureRequest) -> Path:
    # Under the session directory (not tmp_path) so both transports, as root, share it.
    name: str = request.node.name
    path = service_dir / "transport" / name.replace("[", "-").rstrip("]")
    path.mkdir(parents=True)
    return path


# --- pure helpers ------------------------------------------------------------------------


def test_quote_argv_keeps_each_part_one_word() -> None:
    assert quote_argv(["echo", "a b; rm -rf /"]) == "echo 'a b; rm -rf /'"
    with pytest.raises(TypeError):
        quote_argv("echo hi")  # a shell string is refused
    with pytest.raises(ValueError):
        quote_argv(["echo", "nul\0byte"])


@pytest.mark.parametrize(
    "path",
    ["relative/x", "/etc/../root", "/a//b", "/a/", "/a/./b", "/a\nb", "/a\0b", "", "~root/x"],
)
def test_safe_path_rejects(path: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_path(path)


def test_safe_path_accepts_plain_absolute_paths() -> None:
    assert safe_path("/etc/postfix/main.cf") == "/etc/postfix/main.cf"
    assert safe_path("/var/mail/vhosts/example.co.jp/with space") is not None


# --- both transports ---------------------------------------------------------------------


def test_hostile_values_arrive_intact_as_one_argument(
    any_transport: Transport, files: Path
) -> None:
    canary = files / "pwned"
    values = [*HOSTILE, f"x; touch {canary}", f"$(touch {canary})"]
    assert argv_roundtrip(any_transport, values) == values
    assert not canary.exists()
    assert not Path("/tmp/mailrec-pwned").exists()


def test_run_status_stdin_stderr(any_transport: Transport) -> None:
    assert any_transport.run(["cat"], input=b"line 1\nline 2\n").stdout == b"line 1\nline 2\n"
    result = any_transport.run(["sh", "-c", "echo oops >&2; exit 3"], check=False)
    assert (result.exit_status, result.stderr) == (3, b"oops\n")
    with pytest.raises(TransportError) as err:
        any_transport.run(["sh", "-c", "echo broken thing >&2; exit 4"])
    message = str(err.value)
    assert any_transport.host in message and "exited 4" in message and "broken thing" in message
    assert "sh -c" in message


def test_missing_command_is_exit_127(any_transport: Transport) -> None:
    result = any_transport.run(["mailrec-no-such-command"], check=False)
    assert result.exit_status == 127


def test_timeout(any_transport: Transport) -> None:
    with pytest.raises(TransportError, match="timed out"):
        any_transport.run(["sleep", "5"], timeout=0.5)


def test_atomic_write_keeps_backup_mode_and_owner(any_transport: Transport, files: Path) -> None:
    target = files / "main.cf"
    assert any_transport.read_file(str(target)) is None
    any_transport.write_file_atomic(str(target), b"one\n", mode=0o640)
    assert target.read_bytes() == b"one\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert not Path(f"{target}.bak").exists()  # nothing to back up yet
    os.chown(target, 1234, 4321)
    any_transport.write_file_atomic(str(target), b"two\n")
    assert any_transport.read_file(str(target)) == b"two\n"
    assert Path(f"{target}.bak").read_bytes() == b"one\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert (target.stat().st_uid, target.stat().st_gid) == (1234, 4321)
    any_transport.write_file_atomic(str(target), b"three\n", backup=False)
    assert Path(f"{target}.bak").read_bytes() == b"one\n"
    assert sorted(p.name for p in files.iterdir()) == ["main.cf", "main.cf.bak"]  # no temp left


def test_write_refuses_unsafe_paths(any_transport: Transport, files: Path) -> None:
    with pytest.raises(UnsafePathError):
        any_transport.write_file_atomic(f"{files}/../escape", b"x")
    with pytest.raises(UnsafePathError):
        any_transport.read_file("relative")


def test_write_into_missing_directory_is_a_transport_error(
    any_transport: Transport, files: Path
) -> None:
    with pytest.raises(TransportError, match="cannot write"):
        any_transport.write_file_atomic(f"{files}/missing/file", b"x")


def test_secrets_are_masked_in_errors_and_logs(
    any_transport: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "hunter2-very-secret"
    any_transport.add_secret(secret)
    caplog.set_level(logging.DEBUG, logger="reconciler.transport")
    with pytest.raises(TransportError) as err:
        any_transport.run(["sh", "-c", f"echo {secret} >&2; exit 1", secret])
    assert secret not in str(err.value) and "***" in str(err.value)
    assert caplog.records and secret not in caplog.text
    assert all(secret not in part for argv in any_transport.history for part in argv)


def test_local_root_rebases_file_paths(files: Path) -> None:
    transport = LocalTransport(root=files)
    (files / "etc").mkdir()
    transport.write_file_atomic("/etc/hosts", b"lab\n")
    assert (files / "etc" / "hosts").read_bytes() == b"lab\n"
    assert transport.read_file("/etc/hosts") == b"lab\n"


# --- SSH only ----------------------------------------------------------------------------


def accepted_logins(sshd: Sshd) -> int:
    return sshd.log.read_text(errors="replace").count("Accepted publickey for root")


def test_one_connection_serves_many_operations(rental_sshd: Sshd, files: Path) -> None:
    before = accepted_logins(rental_sshd)
    with open_transport(
        Connect.parse(rental_sshd.connect()),
        known_hosts=rental_sshd.known_hosts,
        key_filename=str(rental_sshd.client_key),
    ) as transport:
        for i in range(10):
            assert transport.run(["echo", str(i)]).stdout == f"{i}\n".encode()
            transport.write_file_atomic(f"{files}/f{i}", b"x")
            assert transport.read_file(f"{files}/f{i}") == b"x"
        assert transport.round_trips == 30
    assert accepted_logins(rental_sshd) == before + 1


def test_reconnects_after_the_connection_drops(ssh: Transport) -> None:
    assert isinstance(ssh, SshTransport)
    assert ssh.run(["true"]).ok
    client = ssh._client
    assert client is not None
    client.close()  # as if the server had gone away
    assert ssh.run(["echo", "back"]).stdout == b"back\n"


def test_unknown_host_key_is_rejected(rental_sshd: Sshd, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError) as err:
        SshTransport(
            rental_sshd.address,
            port=rental_sshd.port,
            known_hosts=empty,
            key_filename=str(rental_sshd.client_key),
        )
    message = str(err.value)
    assert f"ssh-keyscan -p {rental_sshd.port} {rental_sshd.address} >> {empty}" in message
    assert "SHA256:" in message
    assert empty.read_text() == ""  # never added


def test_missing_known_hosts_file_is_rejected(rental_sshd: Sshd, tmp_path: Path) -> None:
    with pytest.raises(HostKeyError, match="does not exist"):
        SshTransport(
            rental_sshd.address,
            port=rental_sshd.port,
            known_hosts=tmp_path / "nope",
            key_filename=str(rental_sshd.client_key),
        )


def test_changed_host_key_is_rejected(rental_sshd: Sshd, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, key = other.with_suffix(".pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[{rental_sshd.address}]:{rental_sshd.port} {kind} {key}\n")
    with pytest.raises(HostKeyError) as err:
        SshTransport(
            rental_sshd.address,
            port=rental_sshd.port,
            known_hosts=known,
            key_filename=str(rental_sshd.client_key),
        )
    message = str(err.value)
    assert "CHANGED" in message and "ssh-keyscan" in message and "ssh-keygen -R" in message


def test_wrong_client_key_and_password_are_auth_errors_without_the_secret(
    rental_sshd: Sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with pytest.raises(TransportError, match="authentication as root failed"):
        open_transport(
            Connect.parse(rental_sshd.connect()),
            known_hosts=rental_sshd.known_hosts,
            key_filename=str(stranger),
        )
    password = "pa55-word-that-must-not-show"
    monkeypatch.setenv("MAILREC_TEST_SSH_PASSWORD", password)
    with pytest.raises(TransportError) as err:
        open_transport(
            Connect.parse(rental_sshd.connect()),
            known_hosts=rental_sshd.known_hosts,
            password_ref="env:MAILREC_TEST_SSH_PASSWORD",
        )
    assert password not in str(err.value)
    with pytest.raises(TransportError, match="MAILREC_TEST_UNSET"):
        open_transport(
            Connect.parse(rental_sshd.connect()),
            known_hosts=rental_sshd.known_hosts,
            password_ref="env:MAILREC_TEST_UNSET",
        )
