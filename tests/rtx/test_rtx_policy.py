"""Planning the SMTP policy route: exact command lines, MR009 order, refusals."""

from __future__ import annotations

import pytest

from reconciler.drivers.rtx.config import RtxConfig
from reconciler.drivers.rtx.driver import router_facts
from reconciler.drivers.rtx.policy import (
    RtxPolicyError,
    SmtpRoute,
    invariant_problems,
    plan_commands,
    rollback_commands,
    simulate,
    validate_command,
    validate_gateway,
)

from .conftest import corpus_config

WANT = SmtpRoute(filter=10, gateway="192.168.0.254", otherwise="tunnel 2")
FILTER = "ip filter 10 pass * * tcp * smtp"
ROUTE = "ip route default gateway 192.168.0.254 filter 10 gateway tunnel 2"


def _plan_and_check(
    config: RtxConfig, desired: SmtpRoute | None, managed: int | None = None
) -> list[str]:
    commands = plan_commands(config, desired, managed)
    for state in simulate(config, commands):
        assert invariant_problems(state) == []
    return commands


def test_unmanaged_router_gets_filter_then_route() -> None:
    config = corpus_config("rtx1210_story_unmanaged.conf")
    assert _plan_and_check(config, WANT) == [FILTER, ROUTE]


def test_in_sync_router_needs_nothing() -> None:
    config = corpus_config("rtx1210_story_migrated.conf")
    assert plan_commands(config, WANT) == []
    assert plan_commands(config, WANT, managed_filter=10) == []


def test_changing_the_gateway_is_one_route_line() -> None:
    config = corpus_config("rtx1210_story_migrated.conf")
    want = SmtpRoute(10, "192.168.0.253", "tunnel 2")
    assert _plan_and_check(config, want) == [
        "ip route default gateway 192.168.0.253 filter 10 gateway tunnel 2"
    ]


def test_changing_otherwise_is_one_route_line() -> None:
    config = corpus_config("rtx1210_story_migrated.conf")
    want = SmtpRoute(10, "192.168.0.254", "tunnel 1")
    assert _plan_and_check(config, want) == [
        "ip route default gateway 192.168.0.254 filter 10 gateway tunnel 1"
    ]


def test_removing_routes_back_then_deletes_the_filter() -> None:
    config = corpus_config("rtx1210_story_migrated.conf")
    assert _plan_and_check(config, None) == ["ip route default gateway tunnel 2", "no ip filter 10"]
    assert _plan_and_check(config, None, managed=10) == [
        "ip route default gateway tunnel 2",
        "no ip filter 10",
    ]
    assert plan_commands(corpus_config("rtx1210_story_unmanaged.conf"), None) == []


def test_renumbering_defines_new_switches_route_then_removes_old() -> None:
    config = corpus_config("rtx1210_story_migrated.conf")
    want = SmtpRoute(20, "192.168.0.254", "tunnel 2")
    assert _plan_and_check(config, want, managed=10) == [
        "ip filter 20 pass * * tcp * smtp",
        "ip route default gateway 192.168.0.254 filter 20 gateway tunnel 2",
        "no ip filter 10",
    ]


def test_an_admin_entry_that_catches_smtp_first_is_refused() -> None:
    # Filter 1 passes tcp/25 from 10.10.0.0/16 (lan1) to 192.0.2.1, ahead of mailrec's entry.
    config = corpus_config("rtx1220_filter_forms.conf")
    want = SmtpRoute(10, "192.168.0.254", "192.0.2.254")
    with pytest.raises(RtxPolicyError) as caught:
        plan_commands(config, want)
    assert str(caught.value) == (
        "tcp/25 from the LAN would not leave through '192.168.0.254': the default route's entry "
        "'gateway 192.0.2.1 filter 1 2' comes first and its filter 1 ('ip filter 1 pass "
        "10.10.0.0/16 * tcp * smtp,submission') passes some of it; change that entry on the "
        "router, or route SMTP through it"
    )


def test_other_filtered_gateways_and_parameters_are_kept() -> None:
    config = RtxConfig.parse(
        "ip route default gateway 192.0.2.1 filter 1 2 gateway 192.0.2.2 filter 3 metric 2 "
        "gateway 192.0.2.254\n"
        "ip lan1 address 10.10.0.1/16\n"
        "ip filter 1 pass 10.10.0.0/16 * tcp * www,https\n"
        "ip filter 2 reject * * udp * *\n"
        "ip filter 3 pass-log 10.10.1.* * udp * domain\n"
    )
    want = SmtpRoute(10, "192.168.0.254", "192.0.2.254")
    assert _plan_and_check(config, want) == [
        FILTER,
        "ip route default gateway 192.0.2.1 filter 1 2 gateway 192.0.2.2 filter 3 metric 2 "
        "gateway 192.168.0.254 filter 10 gateway 192.0.2.254",
    ]


FINDING_6 = (
    "ip route default gateway pp 1 filter 500 keepalive 1 gateway tunnel 2\n"
    "ip lan1 address 192.168.0.1/24\n"
    "ip filter 500 pass 192.168.0.0/24 * udp * domain\n"
)


def test_finding_6_an_admin_gateway_survives_set_renumber_and_remove() -> None:
    config = RtxConfig.parse(FINDING_6)
    assert _plan_and_check(config, WANT) == [
        FILTER,
        "ip route default gateway pp 1 filter 500 keepalive 1 gateway 192.168.0.254 filter 10 "
        "gateway tunnel 2",
    ]
    migrated = simulate(config, plan_commands(config, WANT))[-1]
    assert _plan_and_check(migrated, SmtpRoute(20, "192.168.0.254", "tunnel 2"), managed=10) == [
        "ip filter 20 pass * * tcp * smtp",
        "ip route default gateway pp 1 filter 500 keepalive 1 gateway 192.168.0.254 filter 20 "
        "gateway tunnel 2",
        "no ip filter 10",
    ]
    assert _plan_and_check(migrated, None, managed=10) == [
        "ip route default gateway pp 1 filter 500 keepalive 1 gateway tunnel 2",
        "no ip filter 10",
    ]
    # The admin's filter 500 is never taken unless the journal says it is mailrec's.
    with pytest.raises(RtxPolicyError, match="filter 500 is already used by an unrelated rule"):
        plan_commands(config, SmtpRoute(500, "192.168.0.254", "tunnel 2"))


def test_load_balanced_unfiltered_gateways_are_not_replaced() -> None:
    config = corpus_config("rtx1200_dual_pppoe_lb.conf")
    with pytest.raises(RtxPolicyError, match=r"several gateways without a filter \('pp 1', "
                       r"'pp 2'\): mailrec will not choose"):
        plan_commands(config, SmtpRoute(10, "192.168.1.254", "tunnel 1"))
    assert plan_commands(config, SmtpRoute(10, "192.168.1.254", "pp 1")) == [
        FILTER,
        "ip route default gateway pp 2 filter 100 101 keepalive 2 gateway 192.168.1.254 "
        "filter 10 gateway pp 1 weight 2 hide gateway pp 2 weight 1 hide",
    ]


def test_a_filter_used_in_another_namespace_is_refused() -> None:
    config = corpus_config("rtx1220_filter_references.conf")
    with pytest.raises(RtxPolicyError, match=r"filter 21 is not defined but is used by "
                       r"'ip filter directed-broadcast filter 21 22'"):
        plan_commands(config, SmtpRoute(21, "192.168.0.254", "tunnel 2"))
    with pytest.raises(RtxPolicyError, match=r"filter 14 is not defined but is used by "
                       r"'ip lan2 secure filter name office' \(and 1 more\)"):
        plan_commands(config, SmtpRoute(14, "192.168.0.254", "tunnel 2"))


def test_parameters_of_an_existing_policy_entry_are_kept() -> None:
    config = RtxConfig.parse(
        f"ip route default gateway 192.168.0.254 filter 10 keepalive 1 gateway tunnel 2\n{FILTER}\n"
    )
    assert plan_commands(config, WANT) == []
    assert plan_commands(config, SmtpRoute(10, "192.168.0.254", "pp 1")) == [
        "ip route default gateway 192.168.0.254 filter 10 keepalive 1 gateway pp 1"
    ]


def test_an_equivalent_smtp_filter_is_reused_as_is() -> None:
    config = RtxConfig.parse(
        "ip route default gateway tunnel 2\nip filter 10 pass-log * * 6 * 25\n"
    )
    assert plan_commands(config, WANT) == [ROUTE]


def test_managed_filter_with_drifted_line_is_rewritten_in_place() -> None:
    config = RtxConfig.parse(
        "ip route default gateway 192.168.0.254 filter 10 gateway tunnel 2\n"
        "ip filter 10 pass * * tcp * www\n"
    )
    with pytest.raises(RtxPolicyError, match="filter 10 is already used by an unrelated rule"):
        plan_commands(config, WANT)
    assert _plan_and_check(config, WANT, managed=10) == [FILTER]


def test_filter_number_used_by_unrelated_rule_is_refused() -> None:
    config = corpus_config("rtx810_smtp_relay_legacy.conf")
    with pytest.raises(RtxPolicyError) as caught:
        plan_commands(config, WANT)
    message = str(caught.value)
    assert "filter 10" in message and "ip filter 10 reject * * tcp * telnet" in message
    # Even when the journal claims it, a filter other rules use is not rewritten.
    with pytest.raises(RtxPolicyError, match="unrelated rule"):
        plan_commands(config, WANT, managed_filter=10)


def test_undefined_filter_used_elsewhere_is_refused() -> None:
    config = RtxConfig.parse(
        "ip route default gateway tunnel 2\nip lan2 secure filter in 10 3000\n"
        "ip filter 3000 pass * * * * *\n"
    )
    with pytest.raises(RtxPolicyError, match="filter 10 is not defined but is used by"):
        plan_commands(config, WANT)


def test_filter_shared_in_a_route_filter_list_is_refused() -> None:
    config = RtxConfig.parse(
        f"ip route default gateway 192.168.0.254 filter 10 20 gateway tunnel 2\n{FILTER}\n"
    )
    with pytest.raises(RtxPolicyError, match="together with filters"):
        plan_commands(config, WANT)


def test_no_default_route_is_refused() -> None:
    config = RtxConfig.parse("ip lan1 address 192.168.0.1/24\n")
    with pytest.raises(RtxPolicyError, match="no default route"):
        plan_commands(config, WANT)
    with pytest.raises(RtxPolicyError, match="no default route"):
        plan_commands(config, None, managed_filter=10)


def test_removal_that_would_leave_no_unfiltered_gateway_is_refused() -> None:
    config = RtxConfig.parse(f"ip route default gateway 192.168.0.254 filter 10\n{FILTER}\n")
    with pytest.raises(RtxPolicyError, match="without a gateway that has no filter"):
        plan_commands(config, None)


@pytest.mark.parametrize(
    "gateway",
    [
        "192.168.0.256",
        "192.168.0",
        "gateway",
        "pp 0",
        "tunnel x",
        "192.168.0.254\nsave",
        "192.168.0.254; save",
        "pp 1 filter 99",
        "TUNNEL 2",
        "",
        "fe80::1",
    ],
)
def test_invalid_gateway_is_refused_with_its_name(gateway: str) -> None:
    config = corpus_config("rtx1210_story_unmanaged.conf")
    with pytest.raises(RtxPolicyError) as caught:
        plan_commands(config, SmtpRoute(10, gateway, "tunnel 2"))
    assert repr(gateway) in str(caught.value)
    with pytest.raises(RtxPolicyError) as caught:
        plan_commands(config, SmtpRoute(10, "192.168.0.254", gateway))
    assert "otherwise" in str(caught.value)


@pytest.mark.parametrize(
    "value", ["192.168.0.254", "pp 1", "tunnel 2", "dhcp lan2", "pp anonymous"]
)
def test_valid_gateways(value: str) -> None:
    assert validate_gateway(value) == value
    assert validate_gateway(value.replace(" ", "  ")) == value


@pytest.mark.parametrize("number", [0, -1, 21474837, True, "10"])
def test_invalid_filter_number_is_refused(number: object) -> None:
    config = corpus_config("rtx1210_story_unmanaged.conf")
    with pytest.raises(RtxPolicyError, match="filter number"):
        plan_commands(config, SmtpRoute(number, "192.168.0.254", "tunnel 2"))  # type: ignore[arg-type]


def test_same_gateway_and_otherwise_is_refused() -> None:
    with pytest.raises(RtxPolicyError, match="would do nothing"):
        plan_commands(
            corpus_config("rtx1210_story_unmanaged.conf"), SmtpRoute(10, "tunnel 2", "tunnel 2")
        )


@pytest.mark.parametrize(
    "command",
    [
        "save",
        "administrator",
        "ip route default gateway 1.2.3.4\rsave",
        "ip  filter 10 pass * * tcp * smtp",
        "ip filter 10 pass * * tcp * smtp ; save",
        "ip filter dynamic 10 * * www",
        "ip route default gateway bogus",
        "no ip filter 10 junk",
        "ip filter 10 pass * * tcp * smtp\u3000",
    ],
)
def test_only_canonical_planned_commands_may_be_sent(command: str) -> None:
    with pytest.raises(RtxPolicyError, match="refusing to send"):
        validate_command(command)


def test_planned_commands_pass_validation() -> None:
    for command in [FILTER, ROUTE, "no ip filter 10", "no ip route 10.0.0.0/8"]:
        assert validate_command(command) == command


def test_rollback_restores_previous_definitions_in_reverse() -> None:
    before = corpus_config("rtx1210_story_unmanaged.conf")
    assert rollback_commands(before, [FILTER, ROUTE]) == [
        "ip route default gateway tunnel 2",
        "no ip filter 10",
    ]
    migrated = corpus_config("rtx1210_story_migrated.conf")
    undo = rollback_commands(migrated, ["ip route default gateway tunnel 2", "no ip filter 10"])
    assert undo == [FILTER, ROUTE]
    after = simulate(migrated, ["ip route default gateway tunnel 2", "no ip filter 10", *undo])
    assert router_facts(after[-1]).default_route == router_facts(migrated).default_route
    for state in after:
        assert invariant_problems(state) == []


def test_facts_of_the_story_router() -> None:
    facts = router_facts(corpus_config("rtx1210_story_unmanaged.conf"))
    assert facts.default_route == (("tunnel 2", ()),)
    assert facts.filters[2025] == "ip filter 2025 pass * 198.51.100.10 tcp * smtp"
    assert facts.smtp_filter_ok[2025] is False and facts.smtp_filter_ok[3000] is False
    assert facts.smtp_gateway == "tunnel 2"
    migrated = router_facts(corpus_config("rtx1210_story_migrated.conf"))
    assert migrated.default_route == (("192.168.0.254", (10,)), ("tunnel 2", ()))
    assert migrated.smtp_filter_ok[10] is True
    assert migrated.smtp_gateway == "192.168.0.254"
    legacy = router_facts(corpus_config("rtx810_smtp_relay_legacy.conf"))
    assert legacy.smtp_gateway == "tunnel 2"  # filter 10 matches telnet only
    dual = router_facts(corpus_config("rtx1200_dual_pppoe_lb.conf"))
    # 100 is www only, 101 rejects: the two unfiltered lines share the rest (load
    # balancing), so tcp/25 may leave through either, and no single gateway is certain.
    assert dual.smtp_egress == ("pp 1", "pp 2")
    assert dual.smtp_gateway is None
    assert router_facts(RtxConfig.parse("ip lan1 address 192.168.0.1/24\n")).default_route is None
