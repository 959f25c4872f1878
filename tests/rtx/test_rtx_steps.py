"""The planner's router steps, carried out by the driver against the emulator over SSH: the
exact lines typed, MR014 for every kind of filter reference, and refusals that leave the
router untouched."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from reconciler.drivers.router import SshRouter, commands_for
from reconciler.drivers.rtx.config import RtxConfig
from reconciler.drivers.rtx.driver import RtxAuthError, RtxCommandError
from reconciler.drivers.rtx.policy import RtxPolicyError, invariant_problems
from reconciler.steps import SetDefaultRoute, SetRouterFilter

from .conftest import LOGIN_PASSWORD, Lab, corpus_config
from .test_rtx_queries import EXPECTED_REFERENCES

MakeLab = Callable[..., Lab]
SMTP = "ip filter {} pass * * tcp * smtp"


def _filter(number: int, present: bool = True) -> SetRouterFilter:
    return SetRouterFilter(number, present, SMTP.format(number))


def _untouched(lab: Lab, saved: bytes) -> None:
    assert lab.emulator.commands == []
    assert lab.saved() == saved
    assert lab.emulator.running_config == saved.decode("utf-8", "surrogateescape")


# --- MR014 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("number", sorted(EXPECTED_REFERENCES), ids=str)
def test_a_referenced_number_is_refused_naming_the_line(make_lab: MakeLab, number: int) -> None:
    lab = make_lab("rtx1220_filter_references.conf")
    saved = lab.saved()
    with pytest.raises(RtxPolicyError) as caught:
        SshRouter(lab.driver()).apply_step(_filter(number))
    message = str(caught.value)
    assert f"filter {number} is not defined but is used by" in message
    assert repr(EXPECTED_REFERENCES[number][0]) in message
    assert "MR014" in message
    _untouched(lab, saved)


def test_an_admins_unreferenced_filter_is_not_overwritten(make_lab: MakeLab) -> None:
    """Finding 7: `ip filter 10 reject ...` that nothing references is still the admin's."""
    text = "ip route default gateway tunnel 2\nip filter 10 reject * * tcp * telnet\n"
    lab = make_lab("", text=text)
    with pytest.raises(RtxPolicyError) as caught:
        SshRouter(lab.driver()).apply_step(_filter(10))
    assert str(caught.value) == (
        "filter 10 is already used by an unrelated rule 'ip filter 10 reject * * tcp * telnet'; "
        "choose another filter number"
    )
    _untouched(lab, text.encode())


def test_the_yamaha_default_filter_1010_is_refused(make_lab: MakeLab) -> None:
    """Finding 10: a default config's `ip filter 1010 reject ...`, used by secure filters."""
    lab = make_lab("rtx1210_story_unmanaged.conf")
    saved = lab.saved()
    with pytest.raises(RtxPolicyError, match=r"filter 1010 is already used by an unrelated rule "
                       r"'ip filter 1010 reject \* \* udp,tcp 135 \*'"):
        SshRouter(lab.driver()).apply_step(_filter(1010))
    _untouched(lab, saved)


def test_an_smtp_pass_another_line_uses_is_not_taken() -> None:
    config = RtxConfig.parse(
        "ip route default gateway tunnel 2\nip lan2 secure filter in 10 20\n"
        "ip filter 10 pass * * tcp * smtp\nip filter 20 pass * * * * *\n"
    )
    with pytest.raises(RtxPolicyError, match="filter 10 is an SMTP pass but also used by "
                       "'ip lan2 secure filter in 10 20'"):
        commands_for(_filter(10), config)


@pytest.mark.parametrize("number", [0, 21474837, 2147483647])
def test_a_number_outside_the_static_filter_range_is_refused(number: int) -> None:
    config = corpus_config("rtx1210_story_unmanaged.conf")
    with pytest.raises(RtxPolicyError, match=f"filter number {number} is outside 1..21474836"):
        commands_for(_filter(number), config)


def test_defining_a_free_number_and_again(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1220_filter_references.conf")
    router = SshRouter(lab.driver())
    router.apply_step(_filter(10))
    assert lab.emulator.commands == ["ip filter 10 pass * * tcp * smtp"]
    router.apply_step(_filter(10))  # already there: nothing typed
    assert lab.emulator.commands == ["ip filter 10 pass * * tcp * smtp"]
    # An SMTP pass in another spelling is taken as it is.
    config = RtxConfig.parse(
        "ip route default gateway tunnel 2\nip filter 10 pass-log * * 6 * 25\n"
    )
    assert commands_for(_filter(10), config) == []


def test_a_step_line_other_than_what_is_typed_is_refused() -> None:
    config = corpus_config("rtx1210_story_unmanaged.conf")
    step = SetRouterFilter(10, True, "ip filter 10 pass * * tcp * smtp,www")
    with pytest.raises(RtxPolicyError, match="refusing to type something the plan does not show"):
        commands_for(step, config)


# --- deleting a filter ------------------------------------------------------------------------


def test_deleting_only_an_unused_smtp_pass() -> None:
    config = RtxConfig.parse(
        "ip route default gateway 192.168.0.254 filter 10 gateway tunnel 2\n"
        "ip lan1 secure filter in 20\n"
        "ip filter 10 pass * * tcp * smtp\nip filter 20 pass * * tcp * smtp\n"
        "ip filter 30 pass * * tcp * smtp\nip filter 40 reject * * tcp * smtp\n"
    )
    with pytest.raises(RtxPolicyError, match=r"filter 10 is still used by 'ip route default "
                       r"gateway 192.168.0.254 filter 10 gateway tunnel 2': refusing to delete"):
        commands_for(_filter(10, present=False), config)
    with pytest.raises(RtxPolicyError, match=r"filter 20 is still used by "
                       r"'ip lan1 secure filter in 20'"):
        commands_for(_filter(20, present=False), config)
    with pytest.raises(RtxPolicyError, match=r"filter 40 is 'ip filter 40 reject \* \* tcp \* "
                       r"smtp', not mailrec's SMTP pass: refusing to delete it"):
        commands_for(_filter(40, present=False), config)
    assert commands_for(_filter(30, present=False), config) == ["no ip filter 30"]
    assert commands_for(_filter(50, present=False), config) == []  # already gone


# --- the default route ------------------------------------------------------------------------

FINDING_6 = (
    "# RTX1210 Rev.14.01.38 (Fri Jul  3 09:56:21 2020)\n"
    "ip route default gateway pp 1 filter 500 keepalive 1 gateway tunnel 2\n"
    "ip lan1 address 192.168.0.1/24\n"
    "ip filter 10 pass * * tcp * smtp\n"
    "ip filter 500 pass 192.168.0.0/24 * udp * domain\n"
)
BEFORE = (("pp 1", (500,)), ("tunnel 2", ()))
AFTER = (("pp 1", (500,)), ("192.168.0.254", (10,)), ("tunnel 2", ()))


def test_finding_6_the_admins_gateway_keeps_its_place_and_parameters(make_lab: MakeLab) -> None:
    lab = make_lab("", text=FINDING_6)
    SshRouter(lab.driver()).apply_step(SetDefaultRoute(before=BEFORE, after=AFTER))
    assert lab.emulator.commands == [
        "ip route default gateway pp 1 filter 500 keepalive 1 gateway 192.168.0.254 filter 10 "
        "gateway tunnel 2"
    ]
    assert lab.saved().decode() == FINDING_6.replace(
        "gateway pp 1 filter 500 keepalive 1 gateway tunnel 2",
        "gateway pp 1 filter 500 keepalive 1 gateway 192.168.0.254 filter 10 gateway tunnel 2",
    )
    # Applying the same step again finds the route as planned: nothing is typed.
    SshRouter(lab.driver()).apply_step(SetDefaultRoute(before=BEFORE, after=AFTER))
    assert len(lab.emulator.commands) == 1
    # And back: mailrec's entry goes, the admin's stays with its keepalive.
    SshRouter(lab.driver()).apply_step(SetDefaultRoute(before=AFTER, after=BEFORE))
    assert lab.emulator.commands[-1] == (
        "ip route default gateway pp 1 filter 500 keepalive 1 gateway tunnel 2"
    )
    assert lab.saved().decode() == FINDING_6


def test_every_kept_entry_keeps_its_parameters() -> None:
    config = corpus_config("rtx1200_dual_pppoe_lb.conf")
    before = (("pp 2", (100, 101)), ("pp 1", ()), ("pp 2", ()))
    config = config.apply("ip filter 10 pass * * tcp * smtp")
    after = (("pp 2", (100, 101)), ("192.168.1.254", (10,)), ("pp 1", ()), ("pp 2", ()))
    assert commands_for(SetDefaultRoute(before, after), config) == [
        "ip route default gateway pp 2 filter 100 101 keepalive 2 gateway 192.168.1.254 "
        "filter 10 gateway pp 1 weight 2 hide gateway pp 2 weight 1 hide"
    ]


def test_a_route_changed_since_the_plan_is_refused(make_lab: MakeLab) -> None:
    text = FINDING_6.replace("gateway tunnel 2", "gateway tunnel 3")
    lab = make_lab("", text=text)
    with pytest.raises(RtxPolicyError) as caught:
        SshRouter(lab.driver()).apply_step(SetDefaultRoute(before=BEFORE, after=AFTER))
    assert str(caught.value) == (
        "the router's default route changed since the plan: planned from 'ip route default "
        "gateway pp 1 filter 500 gateway tunnel 2', the router now has 'ip route default "
        "gateway pp 1 filter 500 keepalive 1 gateway tunnel 3'; observe and plan again"
    )
    _untouched(lab, text.encode())


def test_a_change_between_reading_and_typing_sends_nothing(make_lab: MakeLab) -> None:
    lab = make_lab("", text=FINDING_6)
    driver = lab.driver()
    config, _ = driver.observe()
    commands = commands_for(SetDefaultRoute(before=BEFORE, after=AFTER), config)
    # An admin edits the route after mailrec read it, before mailrec types its line.
    with lab.emulator.lock:
        lab.emulator.running = lab.emulator.running.apply(
            "ip route default gateway pp 1 filter 500 keepalive 1 gateway tunnel 3"
        )
    with pytest.raises(RtxCommandError, match=r"changed after it was read \(unexpected line "
                       r"'ip route default gateway pp 1 filter 500 keepalive 1 gateway tunnel 3'"):
        driver.apply(commands, planned_from=config)
    assert lab.emulator.commands == [] and "administrator" not in lab.emulator.typed
    assert lab.saved() == FINDING_6.encode()


def test_dropping_or_reordering_an_admin_entry_is_refused(make_lab: MakeLab) -> None:
    lab = make_lab("", text=FINDING_6)
    router = SshRouter(lab.driver())
    with pytest.raises(RtxPolicyError, match=r"drops the entry 'gateway pp 1 filter 500 "
                       r"keepalive 1', which is not mailrec's"):
        router.apply_step(
            SetDefaultRoute(before=BEFORE, after=(("192.168.0.254", (10,)), ("tunnel 2", ())))
        )
    config = RtxConfig.parse(FINDING_6.replace(
        "gateway pp 1 filter 500 keepalive 1", "gateway pp 1 filter 500 gateway pp 2 filter 600"
    ) + "ip filter 600 pass * * udp\n")
    before = (("pp 1", (500,)), ("pp 2", (600,)), ("tunnel 2", ()))
    after = (("pp 2", (600,)), ("pp 1", (500,)), ("192.168.0.254", (10,)), ("tunnel 2", ()))
    with pytest.raises(RtxPolicyError, match="reorders entries that are not mailrec's"):
        commands_for(SetDefaultRoute(before, after), config)
    _untouched(lab, FINDING_6.encode())


def test_a_route_that_would_break_mr009_is_refused() -> None:
    config = RtxConfig.parse(FINDING_6)
    with pytest.raises(RtxPolicyError, match="would break MR009"):
        commands_for(SetDefaultRoute(BEFORE, (("pp 1", (500,)), ("192.168.0.254", (10,)))), config)
    with pytest.raises(RtxPolicyError, match="references undefined filter"):
        commands_for(
            SetDefaultRoute(BEFORE, (("pp 1", (500,)), ("192.168.0.254", (20,)), ("tunnel 2", ()))),
            config,
        )


@pytest.mark.parametrize("gateway", ["192.168.0.254; save", "192.168.0.254\rsave", "pp 0"])
def test_a_bad_new_gateway_is_refused(gateway: str) -> None:
    after = (("pp 1", (500,)), (gateway, (10,)), ("tunnel 2", ()))
    with pytest.raises(RtxPolicyError, match="is not an IPv4 address or an RTX interface"):
        commands_for(SetDefaultRoute(BEFORE, after), RtxConfig.parse(FINDING_6))


def test_no_default_route_is_refused() -> None:
    config = RtxConfig.parse("ip lan1 address 192.168.0.1/24\nip filter 10 pass * * tcp * smtp\n")
    with pytest.raises(RtxPolicyError, match="the router has no default route"):
        commands_for(SetDefaultRoute(None, (("192.168.0.254", (10,)), ("tunnel 2", ()))), config)


def test_every_intermediate_state_keeps_mr009(make_lab: MakeLab) -> None:
    lab = make_lab("rtx1220_filter_references.conf")
    router = SshRouter(lab.driver())
    router.apply_step(_filter(10))
    before = (("pp 1", (500,)), ("tunnel 2", ()))
    after = (("pp 1", (500,)), ("192.168.0.254", (10,)), ("tunnel 2", ()))
    router.apply_step(SetDefaultRoute(before, after))
    router.apply_step(SetDefaultRoute(after, before))
    router.apply_step(_filter(10, present=False))
    assert lab.emulator.commands == [
        "ip filter 10 pass * * tcp * smtp",
        "ip route default gateway pp 1 filter 500 keepalive 1 gateway 192.168.0.254 filter 10 "
        "gateway tunnel 2",
        "ip route default gateway pp 1 filter 500 keepalive 1 gateway tunnel 2",
        "no ip filter 10",
    ]
    original = corpus_config("rtx1220_filter_references.conf")
    old_problems = set(invariant_problems(original))
    for text in lab.emulator.history:
        assert set(invariant_problems(RtxConfig.parse(text))) <= old_problems
    assert lab.saved().decode() == original.render()


# --- passwords --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["x\r\nsave", "x\nsave", "x\rsave", "pw\x7f", "pw\x03", "a\u2028b"])
def test_an_admin_password_with_a_control_character_never_reaches_the_router(
    make_lab: MakeLab, caplog: pytest.LogCaptureFixture, bad: str
) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    saved = lab.saved()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RtxAuthError) as caught:
        lab.driver(admin_password=bad).apply(["ip filter 10 pass * * tcp * smtp"])
    message = str(caught.value)
    assert "administrator password" in message and "control character" in message
    assert bad not in message and bad not in caplog.text
    assert "save" not in lab.emulator.typed and "administrator" not in lab.emulator.typed
    assert lab.emulator.typed == []  # not even a session was opened
    _untouched(lab, saved)


def test_the_session_itself_refuses_such_a_password(make_lab: MakeLab) -> None:
    from reconciler.drivers.rtx.session import RtxSession

    from .conftest import HOST

    lab = make_lab("rtx1210_story_unmanaged.conf")
    with RtxSession(HOST, lab.port, "admin", LOGIN_PASSWORD, str(lab.known_hosts)) as session:
        with pytest.raises(RtxAuthError, match="control character"):
            session.enter_administrator("x\r\nsave")
        session.quit()
    assert "administrator" not in lab.emulator.typed and "save" not in lab.emulator.typed


def test_a_login_password_with_a_line_break_is_refused_before_connecting(
    make_lab: MakeLab,
) -> None:
    lab = make_lab("rtx1210_story_unmanaged.conf")
    with pytest.raises(RtxAuthError) as caught:
        lab.driver(password=LOGIN_PASSWORD + "\r\nsave").observe()
    assert "login password" in str(caught.value) and "save" not in str(caught.value)
    assert lab.emulator.typed == []
