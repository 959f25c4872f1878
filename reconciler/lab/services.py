"""`mailrec lab up/down`: run the lab's network services in the background.

- the rental's SMTP server (relay + submission ports) on 127.0.0.3
- the RTX CLI emulator over SSH on 127.0.0.7 (host key pinned in the lab's known_hosts)
Their addresses go to DIR/services.json (e.g. {"rental_smtp": "127.0.0.3:2525", ...}) and
their process ids to DIR/services.pids; `down` stops exactly those processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from reconciler.lab.layout import LabLayout


class LabServiceError(RuntimeError):
    pass


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_for(host: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LabServiceError(
                f"service on {host}:{port} exited ({process.returncode}); see {log}:\n"
                + log.read_text()[-2000:]
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise LabServiceError(f"service on {host}:{port} did not start in 20 s; see {log}")


def _spawn(layout: LabLayout, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    log = layout.root / f"{name}.log"
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", *argv], stdout=handle, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )


def _secret_file(path: Path) -> Path:
    if not path.exists():
        path.write_text(secrets.token_urlsafe(18) + "\n")
        path.chmod(0o600)
    return path


def _rtx_host_key(layout: LabLayout, host: str, port: int) -> Path:
    import paramiko

    key_path = layout.router_dir / "ssh_host_rsa_key"
    if not key_path.exists():
        paramiko.RSAKey.generate(2048).write_private_key_file(str(key_path))
        key_path.chmod(0o600)
    key = paramiko.RSAKey.from_private_key_file(str(key_path))
    (layout.router_dir / "known_hosts").write_text(
        f"[{host}]:{port} {key.get_name()} {key.get_base64()}\n"
    )
    return key_path


def start_services(layout: LabLayout) -> dict[str, str]:
    # Here, not at the top: `lab down` and the lab's RTX driver need neither (nor the
    # drivers and the model that `lab.init` and `lab.office` import).
    from reconciler.lab.init import ADDRESSES
    from reconciler.lab.office import write_lines

    if not layout.exists():
        raise LabServiceError(f"{layout.root} is not a lab (run: mailrec lab init)")
    if layout.read_services():
        stop_services(layout)
    pids: dict[str, int] = {}
    services: dict[str, str] = {}
    write_lines(layout)  # which public address each router line sends from (the office NAT)
    try:
        rental_host = ADDRESSES["rental"]
        relay, submission = _free_port(rental_host), _free_port(rental_host)
        smtp = _spawn(layout, "rental_smtp", [
            "reconciler.lab.rental_smtp", "--lab", str(layout.root), "--host", rental_host,
            "--relay-port", str(relay), "--submission-port", str(submission),
        ])
        pids["rental_smtp"] = smtp.pid
        _wait_for(rental_host, relay, smtp, layout.root / "rental_smtp.log")
        services["rental_smtp"] = f"{rental_host}:{relay}"
        services["rental_submission"] = f"{rental_host}:{submission}"

        router_host = ADDRESSES["router"]
        port = _free_port(router_host)
        key = _rtx_host_key(layout, router_host, port)
        rtx = _spawn(layout, "rtx", [
            "reconciler.lab.rtx_emulator", "--config", str(layout.router_config),
            "--host", router_host, "--port", str(port), "--host-key", str(key),
            "--login-password-file", str(_secret_file(layout.router_dir / "login.secret")),
            "--admin-password-file", str(_secret_file(layout.router_dir / "admin.secret")),
        ])
        pids["rtx"] = rtx.pid
        _wait_for(router_host, port, rtx, layout.root / "rtx.log")
        services["rtx_ssh"] = f"{router_host}:{port}"
    except BaseException:
        _kill(pids)
        raise
    (layout.root / "services.pids").write_text(json.dumps(pids) + "\n")
    layout.services.write_text(json.dumps(services, indent=2) + "\n")
    return services


def _kill(pids: dict[str, int]) -> int:
    stopped = 0
    for pid in pids.values():
        try:
            os.killpg(pid, signal.SIGTERM)
            stopped += 1
        except (ProcessLookupError, PermissionError):
            continue
    deadline = time.monotonic() + 5
    for pid in pids.values():
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
    return stopped


def stop_services(layout: LabLayout) -> int:
    pid_file = layout.root / "services.pids"
    pids: dict[str, Any] = json.loads(pid_file.read_text()) if pid_file.exists() else {}
    stopped = _kill({k: int(v) for k, v in pids.items()})
    pid_file.unlink(missing_ok=True)
    if layout.services.exists():
        layout.services.write_text("{}\n")
    return stopped


def lab_rtx_driver(layout: LabLayout, address: str) -> Any:
    from reconciler.drivers.rtx.driver import RtxDriver

    host, _, port = address.rpartition(":")
    def read(name: str) -> str:
        return (layout.router_dir / name).read_text().strip()

    return RtxDriver(host, int(port), "admin", read("login.secret"), read("admin.secret"),
                     str(layout.router_dir / "known_hosts"))
