"""The RTX CLI emulator over real SSH on loopback: what a person at the terminal sees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest

from reconciler.drivers.rtx.driver import RtxDriver

from .conftest import ADMIN_PASSWORD, HOST, LOGIN_PASSWORD, Lab, Terminal, corpus_text

MakeLab = Callable[..., Lab]


def _admin(term: Terminal, prompt: str = "# ") -> None:
    term.send("administrator\r")
    term.expect("Password: ")
    term.send(ADMIN_PASSWORD + "\r")
    term.expect(prompt)


def test_banner_and_user_prompt(make_lab: MakeLab) -> None:
    term = make_lab("rtx1200_pppoe_basic.conf").terminal()
    banner = term.expect(r"\r\n> ")
    assert "RTX1200 Rev.10.01.78" in banner and "Yamaha Corporation" in banner
    term.close()


def test_console_prompt_name(make_lab: MakeLab) -> None:
    term = make_lab("rtx1210_story_unmanaged.conf").terminal()
    term.expect(r"\[RTX1210\] > ")
    _admin(term, r"\[RTX1210\] # ")
    term.close()


def test_show_config_pages_until_console_lines_infinity(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1200_dual_pppoe_lb.conf")  # ascii console, default 24 lines
    term = lab.terminal()
    term.expect("> ")
    term.send("show config\r")
    first = term.expect("---more---")
    assert first.count("\r\n") == 24  # the echo and 23 lines of the page
    term.send(" ")
    term.expect("---more---")
    term.send("q")
    term.expect("> ")
    term.send("console lines infinity\r")
    term.expect("> ")
    term.send("show config\r")
    whole = term.expect(r"dns private address spoof on\r\n> ")
    assert "---more---" not in whole
    assert whole.split("\r\n", 1)[1].replace("\r\n", "\n").removesuffix("> ") == (
        lab.emulator.running_config
    )
    term.close()


def test_japanese_console_messages_and_pager(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_l2tp_remote.conf")  # console character ja.sjis
    term = lab.terminal()
    term.encoding = "shift_jis"
    term.expect("> ")
    term.send("show config\r")
    term.expect("---つづく---")
    term.send("q")
    term.expect("> ")
    term.send("no such command\r")
    assert "エラー: コマンド名を確認してください" in term.expect("> ")
    term.send("console character en.ascii\r")
    term.expect("> ")
    term.send("no such command\r")
    assert "Error: Invalid command name" in term.expect("> ")
    term.close()


def test_errors_for_unknown_malformed_and_unprivileged_commands(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    term = lab.terminal()
    term.expect("> ")
    term.send("console character en.ascii\r")
    term.expect("> ")
    term.send("ip filter 10 pass * * tcp * smtp\r")
    assert "Error: Administrator privilege is required" in term.expect("> ")
    term.send("save\r")
    assert "Error: Administrator privilege is required" in term.expect("> ")
    _admin(term)
    term.send("frobnicate now\r")
    assert "Error: Invalid command name" in term.expect("# ")
    term.send("ip filter 10 pass * * tcp * smtpx\r")
    assert "Error: Invalid parameter" in term.expect("# ")
    term.send("ip route default gateway 300.1.2.3\r")
    assert "Error: Invalid parameter" in term.expect("# ")
    assert lab.emulator.running_config == corpus_text("rtx1210_story_unmanaged.conf")
    term.close()


def test_wrong_administrator_password_stays_in_user_mode(make_lab: MakeLab) -> None:
    term = make_lab("rtx1200_pppoe_basic.conf").terminal()
    term.expect("> ")
    term.send("administrator\r")
    term.expect("Password: ")
    term.send("not-the-password\r")
    output = term.expect("> ")
    assert "Error: Incorrect password" in output and ADMIN_PASSWORD not in output
    term.close()


def test_exit_with_unsaved_changes_asks_and_n_keeps_the_file(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    saved = lab.saved()
    term = lab.terminal()
    term.expect("> ")
    term.send("console character en.ascii\r")  # the configuration says ja.utf8
    term.expect("> ")
    _admin(term, r"\] # ")
    term.send("ip filter 10 pass * * tcp * smtp\r")
    term.expect(r"\] # ")
    term.send("exit\r")
    term.expect(r"Save new configuration \? \(Y/N\) ")
    term.send("N")
    term.expect(r"\] > ")
    assert lab.saved() == saved
    assert "ip filter 10 pass * * tcp * smtp\n" in lab.emulator.running_config  # like the router
    _admin(term, r"\] # ")
    term.send("exit\r")
    term.expect(r"\(Y/N\) ")
    term.send("Y")
    assert "Saving ... CONFIG0 Done ." in term.expect(r"\] > ")
    assert lab.saved().decode() == lab.emulator.running_config
    term.close()


def test_save_writes_the_file_atomically_and_records_history(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    term = lab.terminal()
    term.expect("> ")
    _admin(term, r"\] # ")
    for command in (
        "ip filter 10 pass * * tcp * smtp",
        "ip route default gateway 192.168.0.254 filter 10 gateway tunnel 2",
        "ip filter 10 pass * * tcp * bogus",
    ):
        term.send(command + "\r")
        term.expect(r"\] # ")
    assert len(lab.emulator.history) == 3
    assert lab.emulator.history[2] == lab.emulator.history[1]  # refused: unchanged
    assert lab.emulator.commands[-1] == "ip filter 10 pass * * tcp * bogus"
    term.send("save\r")
    term.expect(r"\] # ")
    assert lab.saved().decode() == lab.emulator.running_config
    assert sorted(p.name for p in lab.config_path.parent.iterdir()) == ["config.txt", "known_hosts"]
    term.send("exit\r")
    term.expect(r"\] > ")  # saved: no question
    term.send("quit\r")
    term.wait_closed()
    term.close()


def test_wrong_login_password_is_refused(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1200_pppoe_basic.conf")
    client = paramiko.SSHClient()
    client.load_host_keys(str(lab.known_hosts))
    with pytest.raises(paramiko.AuthenticationException):
        client.connect(
            HOST,
            port=lab.port,
            username="admin",
            password="wrong",
            allow_agent=False,
            look_for_keys=False,
            timeout=5,
        )
    client.close()


def test_running_config_is_shared_between_sessions(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1200_pppoe_basic.conf")
    one = lab.terminal()
    one.expect("> ")
    _admin(one)
    one.send("ip filter 10 pass * * tcp * smtp\r")
    one.expect("# ")
    two = lab.terminal()
    two.expect("> ")
    two.send("console lines infinity\r")
    two.expect("> ")
    two.send("show config\r")
    assert "ip filter 10 pass * * tcp * smtp" in two.expect(r"statistics traffic on\r\n> ")
    one.close()
    two.close()


def test_command_line_runs_until_sigterm(tmp_path: Path, host_key_path: Path) -> None:
    config = tmp_path / "config.txt"
    config.write_text(corpus_text("rtx830_ipoe_mape.conf"))
    (tmp_path / "login").write_text(LOGIN_PASSWORD + "\n")
    (tmp_path / "admin").write_text(ADMIN_PASSWORD + "\n")
    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reconciler.lab.rtx_emulator",
            "--config",
            str(config),
            "--host",
            HOST,
            "--port",
            "0",
            "--host-key",
            str(host_key_path),
            "--login-password-file",
            str(tmp_path / "login"),
            "--admin-password-file",
            str(tmp_path / "admin"),
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith(f"rtx emulator listening on {HOST}:")
        info = json.loads(ready.read_text())
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(info["known_hosts"] + "\n")
        driver = RtxDriver(
            HOST, info["port"], "admin", LOGIN_PASSWORD, ADMIN_PASSWORD, str(known_hosts)
        )
        config_seen, facts = driver.observe()
        assert facts.default_route == (("tunnel 1", ()),)
        assert config_seen.render() == config.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
