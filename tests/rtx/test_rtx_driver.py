"""The RTX driver against the emulator over real SSH: observe, change, refuse, roll back."""

from __future__ import annotations

import logging
from collections.abc import Callable

import paramiko
import pytest

from reconciler.drivers.rtx.config import RtxConfig
from reconciler.drivers.rtx.driver import (
    RtxAuthError,
    RtxCommandError,
    RtxHostKeyError,
    router_facts,
)
from reconciler.drivers.rtx.policy import (
    RtxPolicyError,
    SmtpRoute,
    invariant_problems,
    plan_commands,
)
from reconciler.drivers.rtx.session import RtxSession

from .conftest import ADMIN_PASSWORD, HOST, LOGIN_PASSWORD, Lab, corpus_text

MakeLab = Callable[..., Lab]
WANT = SmtpRoute(filter=10, gateway="192.168.0.254", otherwise="tunnel 2")


def _assert_every_step_keeps_a_default_route(lab: Lab) -> None:
    assert lab.emulator.history, "no configuration command reached the router"
    for text in lab.emulator.history:
        assert invariant_problems(RtxConfig.parse(text)) == []


def _reconcile(lab: Lab, desired: SmtpRoute | None, managed: int | None = None) -> list[str]:
    driver = lab.driver()
    config, _ = driver.observe()
    commands = plan_commands(config, desired, managed)
    driver.apply(commands)
    return commands


def test_observe_reads_facts_with_paging_off(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    config, facts = lab.driver().observe()
    assert config.render() == lab.emulator.running_config
    assert facts.default_route == (("tunnel 2", ()),)
    assert facts.filters[2026] == "ip filter 2026 pass * 203.0.113.9 tcp * smtp"
    assert facts.smtp_filter_ok[2026] is False
    assert facts.smtp_gateway == "tunnel 2"
    assert facts.raw == config.render()
    assert lab.emulator.history == []  # reading changes nothing


def test_unmanaged_router_is_brought_to_the_policy_route(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    before = lab.saved().decode()
    commands = _reconcile(lab, WANT)
    assert commands == [
        "ip filter 10 pass * * tcp * smtp",
        "ip route default gateway 192.168.0.254 filter 10 gateway tunnel 2",
    ]
    assert lab.emulator.commands == commands
    _assert_every_step_keeps_a_default_route(lab)
    saved = lab.saved().decode()
    assert "ip route default gateway 192.168.0.254 filter 10 gateway tunnel 2\n" in saved
    assert "ip filter 10 pass * * tcp * smtp\nip filter 1010 " in saved
    # Nothing else changed: the saved file is the old one plus the filter, route replaced.
    assert (
        saved.replace("ip filter 10 pass * * tcp * smtp\n", "").replace(
            "gateway 192.168.0.254 filter 10 gateway tunnel 2", "gateway tunnel 2"
        )
        == before
    )
    config, facts = lab.driver().observe()
    assert facts.default_route == (("192.168.0.254", (10,)), ("tunnel 2", ()))
    assert facts.smtp_gateway == "192.168.0.254"
    assert plan_commands(config, WANT) == []


def test_changing_the_gateway_keeps_a_default_route_at_every_step(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_migrated.conf")
    commands = _reconcile(lab, SmtpRoute(10, "192.168.0.253", "tunnel 2"), managed=10)
    assert commands == ["ip route default gateway 192.168.0.253 filter 10 gateway tunnel 2"]
    _assert_every_step_keeps_a_default_route(lab)
    _, facts = lab.driver().observe()
    assert facts.smtp_gateway == "192.168.0.253"


def test_removing_the_policy_keeps_a_default_route_at_every_step(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_migrated.conf")
    commands = _reconcile(lab, None, managed=10)
    assert commands == ["ip route default gateway tunnel 2", "no ip filter 10"]
    _assert_every_step_keeps_a_default_route(lab)
    _, facts = lab.driver().observe()
    assert facts.default_route == (("tunnel 2", ()),)
    assert 10 not in facts.filters
    assert "ip filter 10 " not in lab.saved().decode()


def test_renumbering_the_filter(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_migrated.conf")
    commands = _reconcile(lab, SmtpRoute(20, "192.168.0.254", "tunnel 2"), managed=10)
    assert len(commands) == 3
    _assert_every_step_keeps_a_default_route(lab)
    _, facts = lab.driver().observe()
    assert facts.default_route == (("192.168.0.254", (20,)), ("tunnel 2", ()))
    assert set(facts.filters) >= {20} and 10 not in facts.filters


def test_error_mid_way_restores_running_and_leaves_saved_untouched(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    saved = lab.saved()
    config, _ = lab.driver().observe()
    commands = plan_commands(config, WANT)

    def refuse_route(command: str) -> str | None:
        return "Error: Memory is insufficient" if command.startswith("ip route") else None

    lab.emulator.fail_command = refuse_route
    with pytest.raises(RtxCommandError) as caught:
        lab.driver().apply(commands)
    message = str(caught.value)
    assert "Error: Memory is insufficient" in message and "nothing was saved" in message
    assert caught.value.command == commands[1]
    assert lab.saved() == saved
    assert lab.emulator.running_config == saved.decode()  # the filter was taken back
    assert lab.emulator.commands == [*commands, "no ip filter 10"]
    _assert_every_step_keeps_a_default_route(lab)


def test_error_on_the_first_command_sends_nothing_else(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    saved = lab.saved()
    lab.emulator.fail_command = lambda command: "Error: Invalid parameter"
    with pytest.raises(RtxCommandError, match="Invalid parameter"):
        lab.driver().apply(["ip filter 10 pass * * tcp * smtp", "no ip filter 10"])
    assert lab.emulator.commands == ["ip filter 10 pass * * tcp * smtp"]
    assert lab.saved() == saved


def test_failed_save_is_rolled_back_too(make_lab: MakeLab, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    saved = lab.saved()

    def broken_save() -> None:
        raise OSError("flash write error")

    monkeypatch.setattr(lab.emulator, "save", broken_save)
    with pytest.raises(RtxCommandError, match=r"refused 'save'.*nothing was saved"):
        lab.driver().apply(["ip filter 10 pass * * tcp * smtp"])
    assert lab.saved() == saved
    assert lab.emulator.running_config == saved.decode()


def test_japanese_console_router_is_read_and_changed(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_l2tp_remote.conf")  # ja.sjis, Shift_JIS description
    config, facts = lab.driver().observe()
    assert facts.default_route == (("pp 1", ()),)
    commands = plan_commands(config, SmtpRoute(10, "192.168.0.254", "pp 1"))
    new = lab.driver().apply(commands)
    assert router_facts(new).default_route == (("192.168.0.254", (10,)), ("pp 1", ()))
    # The Shift_JIS bytes of the description were not touched by the change.
    assert "フレッツ光ネクスト".encode("shift_jis") in lab.saved()
    assert lab.emulator.setting("character") == "ja.sjis"  # console setting not saved over


def test_wrong_administrator_password(make_lab: MakeLab, caplog: pytest.LogCaptureFixture) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    saved = lab.saved()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RtxAuthError) as caught:
        lab.driver(admin_password="not-it-4711").apply(["ip filter 10 pass * * tcp * smtp"])
    assert "administrator password" in str(caught.value)
    assert "not-it-4711" not in str(caught.value) and "not-it-4711" not in caplog.text
    assert lab.emulator.commands == [] and lab.saved() == saved


def test_wrong_login_password(make_lab: MakeLab, caplog: pytest.LogCaptureFixture) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RtxAuthError) as caught:
        lab.driver(password="bad-login-0815").observe()
    assert "refused the SSH login admin@127.0.0.7" in str(caught.value)
    assert "bad-login-0815" not in str(caught.value) and "bad-login-0815" not in caplog.text


def test_secrets_never_logged_on_success(
    make_lab: MakeLab, caplog: pytest.LogCaptureFixture
) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    caplog.set_level(logging.DEBUG)
    _reconcile(lab, WANT)
    assert "ip filter 10 pass * * tcp * smtp" in caplog.text  # commands are logged
    assert ADMIN_PASSWORD not in caplog.text and LOGIN_PASSWORD not in caplog.text
    assert ADMIN_PASSWORD not in repr(lab.driver())


def test_unknown_host_key_is_refused(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    empty = lab.known_hosts.with_name("empty_known_hosts")
    empty.write_text("")
    with pytest.raises(RtxHostKeyError, match="not in known_hosts"):
        lab.driver(known_hosts=empty).observe()


def test_changed_host_key_is_refused(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    other = paramiko.ECDSAKey.generate()
    wrong = lab.known_hosts.with_name("wrong_known_hosts")
    wrong.write_text(
        f"[{HOST}]:{lab.port} {lab.emulator.host_key.get_name()} {other.get_base64()}\n"
    )
    with pytest.raises(RtxHostKeyError):
        lab.driver(known_hosts=wrong).observe()


def test_commands_not_planned_by_mailrec_never_reach_the_router(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    for bad in (
        ["ip filter 10 pass * * tcp * smtp", "save"],
        ["ip route default gateway 192.168.0.254\radministrator"],
        ["no ip route default ; ip route default gateway 1.2.3.4"],
    ):
        with pytest.raises(RtxPolicyError, match="refusing to send"):
            lab.driver().apply(bad)
    assert lab.emulator.commands == []


def test_unrelated_filter_number_is_refused_and_nothing_changes(make_lab: MakeLab) -> None:
    lab = make_lab("rtx810_smtp_relay_legacy.conf")
    config, _ = lab.driver().observe()
    with pytest.raises(RtxPolicyError, match="filter 10 is already used by an unrelated rule"):
        plan_commands(config, WANT)
    assert lab.saved().decode() == corpus_text("rtx810_smtp_relay_legacy.conf")


def test_bad_gateway_is_refused_before_anything_is_sent(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    config, _ = lab.driver().observe()
    with pytest.raises(RtxPolicyError, match=r"'gw\.example\.com' is not an IPv4 address"):
        plan_commands(config, SmtpRoute(10, "gw.example.com", "tunnel 2"))
    assert lab.emulator.commands == []


def test_a_change_that_does_not_read_back_is_reported(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    # A router that prints nothing but ignores the command (no `Error:` line).
    lab.emulator.fail_command = lambda command: ""
    with pytest.raises(RtxCommandError, match="does not read back as planned"):
        lab.driver().apply(["ip filter 10 pass * * tcp * smtp"])


def test_an_unplanned_change_elsewhere_is_reported(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")

    def sneak(command: str) -> str | None:
        # Someone else changes another line while mailrec's command runs.
        lab.emulator.running = lab.emulator.running.apply("ip filter 4242 pass * * * * *")
        return None

    lab.emulator.fail_command = sneak
    with pytest.raises(RtxCommandError, match="unexpected line 'ip filter 4242"):
        lab.driver().apply(["ip filter 10 pass * * tcp * smtp"])


def test_empty_plan_only_observes(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1210_story_migrated.conf")
    config = lab.driver().apply([])
    assert config.render() == lab.emulator.running_config
    assert lab.emulator.commands == []


def test_session_answers_the_pager_itself(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1200_dual_pppoe_lb.conf")  # 24 lines per page, ascii console
    with RtxSession(HOST, lab.port, "admin", LOGIN_PASSWORD, str(lab.known_hosts)) as session:
        text = session.show_config()  # no `console lines infinity` first
        session.quit()
    assert text == lab.emulator.running_config
