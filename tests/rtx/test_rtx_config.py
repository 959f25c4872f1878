"""The `show config` parser and printer against the corpus of real-syntax configurations."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.drivers.rtx.config import (
    IpFilter,
    IpFilterDynamic,
    IpRoute,
    LanAddress,
    RtxConfig,
    RtxSyntaxError,
    SecureFilter,
    Select,
    parse_command,
)

from .conftest import corpus_config, corpus_files


def test_corpus_has_configs_of_each_model_style() -> None:
    names = [p.name for p in corpus_files()]
    assert len(names) >= 8
    for model in ("rtx1200", "rtx1210", "rtx830"):
        assert any(n.startswith(model) for n in names), model


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_round_trips_byte_identical(path: Path) -> None:
    data = path.read_bytes()
    config = RtxConfig.parse(data.decode("utf-8", "surrogateescape"))
    assert config.render().encode("utf-8", "surrogateescape") == data


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_lines_are_valid_and_canonical(path: Path) -> None:
    config = RtxConfig.parse(path.read_bytes().decode("utf-8", "surrogateescape"))
    modelled = 0
    for line, node in config.nodes():
        if isinstance(node, IpFilter | IpFilterDynamic | IpRoute):
            node.validate()  # the emulator would accept the line as a command
            assert node.render() == line.text.strip()
            modelled += 1
    assert modelled > 0
    assert config.default_route() is not None


def test_header_comments_and_wrapped_header_line_are_kept() -> None:
    config = corpus_config("rtx1210_story_unmanaged.conf")
    first = config.lines[0]
    assert first.text.startswith("# RTX1210 Rev.14.01.38")
    # The router wraps the `# main:` line at 80 columns; the continuation is not a comment
    # and is kept as an unmodelled line.
    wrapped = config.lines[4]
    assert wrapped.text.startswith("ess=00:a0:de") and wrapped.node is None


def test_scopes_of_pp_and_tunnel_blocks() -> None:
    config = corpus_config("rtx1210_story_unmanaged.conf")
    scoped = {
        line.text.strip(): line.scope
        for line in config.lines
        if isinstance(line.node, SecureFilter) and line.node.interface == "tunnel"
    }
    assert set(scoped.values()) == {"tunnel 2"}
    selects = [n for _, n in config.nodes() if isinstance(n, Select)]
    assert [s.scope for s in selects] == ["tunnel 1", "tunnel 2", ""]
    after = next(ln for ln in config.lines if ln.text == "ip filter source-route on")
    assert after.scope == ""
    pp = corpus_config("rtx1200_pppoe_basic.conf")
    secure = [ln for ln in pp.lines if isinstance(ln.node, SecureFilter)]
    assert {ln.scope for ln in secure} == {"pp 1"}
    out = [
        ln.node for ln in secure if isinstance(ln.node, SecureFilter) and ln.node.direction == "out"
    ]
    assert out[0].dynamic[:2] == (200080, 200081) and out[0].static[-1] == 200099


def test_lan_addresses() -> None:
    config = corpus_config("rtx830_dhcp_wan_crlf.conf")
    lans = {n.interface: n.address for _, n in config.nodes() if isinstance(n, LanAddress)}
    assert lans == {"lan1": "192.168.20.1/24", "lan2": "dhcp"}


def test_every_filter_field_form() -> None:
    filters = corpus_config("rtx1220_filter_forms.conf").static_filters()
    assert filters[3].action == "pass-log" and filters[3].src == "10.10.1.*"
    assert filters[5].dst == "203.0.113.0/255.255.255.0" and filters[5].protocol == "icmp"
    assert filters[5].src_port is None and filters[5].dst_port is None
    assert filters[6].dst == "203.0.113.10-203.0.113.20" and filters[6].protocol == "47"
    assert filters[7].dst_port == "1024-" and filters[8].src_port == "-1023"
    assert filters[11].protocol == "50,51"
    assert filters[15].protocol == "tcpflag=0x0002/0x0017"
    assert filters[18].dst is None and filters[18].src == "10.10.0.0/16"
    assert filters[19].dst == "www.example.com"
    assert filters[24].src == "10.10.0.5,10.10.0.6"
    assert filters[20].src_port is not None and len(filters[20].src_port.split(",")) == 10
    for number in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22):
        filters[number].validate()


@pytest.mark.parametrize(
    ("number", "smtp"),
    [(21, True), (22, True), (23, False), (1, False), (20, False), (25, False), (7, False)],
)
def test_smtp_pass_recognition(number: int, smtp: bool) -> None:
    filters = corpus_config("rtx1220_filter_forms.conf").static_filters()
    assert filters[number].is_smtp_pass is smtp


def test_route_forms() -> None:
    config = corpus_config("rtx1200_dual_pppoe_lb.conf")
    route = config.default_route()
    assert route is not None
    first, second, third = route.gateways
    assert (first.gateway, first.filters, first.keepalive) == ("pp 2", (100, 101), 2)
    assert (second.gateway, second.weight, second.hide, second.filters) == ("pp 1", 2, True, ())
    assert third.weight == 1 and third.hide
    routes = config.routes()
    assert [g.metric for g in routes["10.0.0.0/8"].gateways] == [2, 3]
    assert routes["172.16.5.0/255.255.255.0"].gateways[0].gateway == "192.168.1.253"
    assert routes["192.0.2.77"].gateways[0].gateway == "null"
    change = next(ln for ln in config.lines if ln.text == "ip route change log on")
    assert change.node is None  # another command that starts with `ip route`, kept as is
    dhcp = corpus_config("rtx830_dhcp_wan_crlf.conf").default_route()
    assert dhcp is not None and dhcp.gateways[0].gateway == "dhcp lan2"
    assert parse_command("ip route default gateway dhcp lan2") == dhcp


def test_filter_references() -> None:
    config = corpus_config("rtx1210_story_unmanaged.conf")
    users = [ln.text.strip() for ln in config.filter_references(2025)]
    assert users == [
        "ip lan2 secure filter in 1020 1030 2000 2025 2026",
        "ip tunnel secure filter in 1020 1030 2000 2025",
    ]
    dual = corpus_config("rtx1200_dual_pppoe_lb.conf")
    assert [ln.text for ln in dual.filter_references(1199)][-1].startswith("ip filter dynamic 300")
    assert [ln.text for ln in dual.filter_references(100)] == [
        "ip route default gateway pp 2 filter 100 101 keepalive 2 gateway pp 1 weight 2 hide "
        "gateway pp 2 weight 1 hide"
    ]
    dynamic = dual.dynamic_filters()[300]
    assert dynamic.referenced_filters == (1100, 1101, 1199)


def test_unmodelled_lines_survive_changes_verbatim() -> None:
    text = (
        "# RTX830 Rev.15.02.30 (Wed Jun 21 18:20:17 2023)\n"
        'description lan1 "odd\\x0b\tspacing  kept"   \n'
        "ip route default gateway tunnel 1\n"
        "ip  filter   1  pass * * tcp * www\n"
        "nat descriptor type 1 masquerade\n"
        "schedule at 1 */* 03:00 * lua /sd/x.lua"
    )
    config = RtxConfig.parse(text)
    assert config.render() == text
    changed = config.apply("ip filter 10 pass * * tcp * smtp").apply(
        "ip route default gateway 192.168.0.254 filter 10 gateway tunnel 1"
    )
    rendered = changed.render()
    for keep in text.split("\n"):
        if not keep.startswith("ip route default"):
            assert keep in rendered
    assert rendered.endswith("lua /sd/x.lua")  # still no newline at the very end
    assert RtxConfig.parse(rendered).render() == rendered
    # A non-canonical but valid line is understood, and printed verbatim.
    assert changed.static_filters()[1].dst_port == "www"
    assert "ip  filter   1  pass * * tcp * www\n" in rendered


def test_insert_positions_follow_show_config_order() -> None:
    config = corpus_config("rtx1210_story_unmanaged.conf")
    texts = [ln.text for ln in config.apply("ip filter 10 pass * * tcp * smtp").lines]
    index = texts.index("ip filter 10 pass * * tcp * smtp")
    assert texts[index - 1] == "ip filter directed-broadcast on"
    assert texts[index + 1].startswith("ip filter 1010 ")
    texts = [ln.text for ln in config.apply("ip filter 2500 pass * * tcp * smtp").lines]
    index = texts.index("ip filter 2500 pass * * tcp * smtp")
    assert texts[index - 1].startswith("ip filter 2026 ")
    bare = RtxConfig.parse("# RTX830 Rev.15\nip lan1 address 192.168.1.1/24\n")
    assert bare.apply("ip route default gateway dhcp lan2").render() == (
        "# RTX830 Rev.15\nip route default gateway dhcp lan2\nip lan1 address 192.168.1.1/24\n"
    )


def test_replacing_keeps_place_and_crlf() -> None:
    config = corpus_config("rtx830_dhcp_wan_crlf.conf")
    changed = config.apply("ip route default gateway 192.168.20.254 filter 1099 gateway dhcp lan2")
    before = [ln.text for ln in config.lines]
    after = [ln.text for ln in changed.lines]
    position = before.index("ip route default gateway dhcp lan2")
    assert (
        after[position] == "ip route default gateway 192.168.20.254 filter 1099 gateway dhcp lan2"
    )
    assert {ln.eol for ln in changed.lines} == {"\r\n"}
    added = changed.apply("ip filter 10 pass * * tcp * smtp")
    assert {ln.eol for ln in added.lines} == {"\r\n"}
    assert added.apply("no ip filter 10").render() == changed.render()


@pytest.mark.parametrize(
    ("command", "kind"),
    [
        ("ip filter 10 allow * * tcp * smtp", "parameter"),
        ("ip filter 10 pass 300.1.1.1 * tcp * smtp", "parameter"),
        ("ip filter 10 pass * * tcpx * smtp", "parameter"),
        ("ip filter 10 pass * * tcp * smtpx", "parameter"),
        ("ip filter 10 pass * * tcp * 70000", "parameter"),
        ("ip filter 10 pass * * tcp * 1,2,3,4,5,6,7,8,9,10,11", "parameter"),
        ("ip filter 10 pass * * tcp * smtp extra", "parameter"),
        ("ip filter 0 pass * * tcp * smtp", "parameter"),
        ("ip filter 10", "parameter"),
        ("ip route default gateway 192.168.0.256", "parameter"),
        ("ip route default gateway pp x", "parameter"),
        ("ip route default gateway 192.168.0.1 filter", "parameter"),
        ("ip route default gateway 192.168.0.1 metric x", "parameter"),
        ("ip route default gateway 192.168.0.1 bogus", "parameter"),
        ("ip route default", "parameter"),
        ("ip route nowhere gateway 192.168.0.1", "parameter"),
        ("no ip filter ten", "parameter"),
        ("ipp filter 10", "command"),
        ("save", "command"),
    ],
)
def test_refused_commands(command: str, kind: str) -> None:
    with pytest.raises(RtxSyntaxError) as caught:
        RtxConfig.parse("ip route default gateway tunnel 1\n").apply(command)
    assert caught.value.kind == kind


def test_no_of_absent_definition_is_accepted() -> None:
    config = RtxConfig.parse("ip route default gateway tunnel 1\n")
    assert config.apply("no ip filter 99").render() == config.render()
    assert config.apply("no ip route 10.0.0.0/8 gateway 192.168.0.1").render() == config.render()
    assert config.apply("no ip route default").default_route() is None
