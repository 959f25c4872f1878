"""Property tests: generated `ip filter` / `ip route` lines round-trip, every plan the
policy makes keeps MR009 at each step and converges, and the planner's router steps change
mailrec's filter and its route entry and nothing else."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reconciler.drivers.router import commands_for
from reconciler.drivers.rtx.config import (
    PORT_NAMES,
    IpFilter,
    IpRoute,
    RouteGateway,
    RouteParam,
    RtxConfig,
    parse_node,
)
from reconciler.drivers.rtx.policy import (
    RtxPolicyError,
    SmtpRoute,
    invariant_problems,
    plan_commands,
    simulate,
)
from reconciler.drivers.rtx.queries import filter_references
from reconciler.steps import SetDefaultRoute, SetRouterFilter, Step

from .conftest import corpus_text

octet = st.integers(0, 255)
ipv4 = st.tuples(octet, octet, octet, octet).map(lambda t: ".".join(map(str, t)))
mask_bits = st.integers(0, 32).map(str)
mask_dotted = st.integers(0, 32).map(
    lambda n: ".".join(str((((1 << 32) - (1 << (32 - n))) >> s) & 255) for s in (24, 16, 8, 0))
)
address_element = st.one_of(
    ipv4,
    st.tuples(ipv4, st.one_of(mask_bits, mask_dotted)).map("/".join),
    st.tuples(ipv4, ipv4).map("-".join),
    st.tuples(octet, octet, octet).map(lambda t: f"{t[0]}.{t[1]}.{t[2]}.*"),
    st.sampled_from(["mail.example.co.jp", "relay-1.example.net"]),
)
address = st.one_of(st.just("*"), st.lists(address_element, min_size=1, max_size=3).map(",".join))
protocol = st.one_of(
    st.just("*"),
    st.lists(
        st.one_of(
            st.sampled_from(["tcp", "udp", "icmp", "icmp-error", "established", "gre", "esp"]),
            st.integers(0, 255).map(str),
        ),
        min_size=1,
        max_size=3,
    ).map(",".join),
    st.just("tcpflag=0x0002/0x0017"),
)
port = st.one_of(st.sampled_from(sorted(PORT_NAMES)), st.integers(0, 65535).map(str))
port_element = st.one_of(
    port,
    st.tuples(st.integers(0, 30000), st.integers(30001, 65535)).map(lambda t: f"{t[0]}-{t[1]}"),
    st.integers(0, 65535).map(lambda n: f"{n}-"),
    st.integers(0, 65535).map(lambda n: f"-{n}"),
)
ports = st.one_of(st.just("*"), st.lists(port_element, min_size=1, max_size=10).map(",".join))
actions = st.sampled_from(
    ["pass", "pass-log", "pass-nolog", "reject", "reject-log", "reject-nolog", "restrict"]
)


@st.composite
def ip_filters(draw: st.DrawFn) -> IpFilter:
    fields: list[str | None] = [draw(address), draw(protocol), draw(ports), draw(ports)]
    present = draw(st.integers(0, 4))
    kept = [*fields[:present], *([None] * (4 - present))]
    return IpFilter(
        number=draw(st.integers(1, 2147483647)),
        action=draw(actions),
        src=draw(address),
        dst=kept[0],
        protocol=kept[1],
        src_port=kept[2],
        dst_port=kept[3],
    )


gateway_name = st.one_of(
    ipv4,
    st.integers(1, 30).map(lambda n: f"pp {n}"),
    st.integers(1, 3000).map(lambda n: f"tunnel {n}"),
    st.sampled_from(["dhcp lan2", "dhcp lan3", "pp anonymous", "null", "loopback", "lan2"]),
)
route_param = st.one_of(
    st.lists(st.integers(1, 21474836).map(str), min_size=1, max_size=4).map(
        lambda a: RouteParam("filter", tuple(a))
    ),
    st.integers(1, 15).map(lambda n: RouteParam("metric", (str(n),))),
    st.integers(1, 100).map(lambda n: RouteParam("weight", (str(n),))),
    st.integers(1, 100).map(lambda n: RouteParam("keepalive", (str(n),))),
    st.just(RouteParam("hide")),
)
route_gateway = st.builds(RouteGateway, gateway_name, st.lists(route_param, max_size=3).map(tuple))
network = st.one_of(
    st.just("default"),
    st.tuples(ipv4, mask_bits).map("/".join),
    ipv4,
)
ip_routes = st.builds(IpRoute, network, st.lists(route_gateway, min_size=1, max_size=4).map(tuple))


@given(ip_filters())
def test_filter_lines_round_trip(rule: IpFilter) -> None:
    line = rule.render()
    assert parse_node(line) == rule
    rule.validate()
    config = RtxConfig.parse("ip route default gateway tunnel 1\n").apply(line)
    assert config.static_filters()[rule.number] == rule
    assert RtxConfig.parse(config.render()) == config


@given(ip_routes)
def test_route_lines_round_trip(route: IpRoute) -> None:
    line = route.render()
    assert parse_node(line) == route
    route.validate()
    config = RtxConfig.parse("# RTX1210\nip lan1 address 192.168.0.1/24\n").apply(line)
    assert config.routes()[route.network] == route
    assert RtxConfig.parse(config.render()).render() == config.render()


@given(st.lists(st.one_of(ip_filters().map(IpFilter.render), ip_routes.map(IpRoute.render))))
def test_generated_lines_inside_a_real_config_round_trip(lines: list[str]) -> None:
    base = corpus_text("rtx1210_story_unmanaged.conf")
    head, _, tail = base.partition("ip filter 1010 ")
    text = head + "".join(f"{ln}\n" for ln in lines) + "ip filter 1010 " + tail
    assert RtxConfig.parse(text).render() == text


# --- planning -------------------------------------------------------------------------------

small_gateway = st.sampled_from(
    ["192.168.0.254", "192.168.0.253", "tunnel 2", "tunnel 1", "pp 1", "dhcp lan2"]
)
filter_line = st.sampled_from(
    [
        None,
        "pass * * tcp * smtp",
        "pass-log * * tcp * 25",
        "reject * * tcp * telnet",
        "pass 192.168.0.0/24 * tcp * smtp",
    ]
)


@st.composite
def router_states(draw: st.DrawFn) -> tuple[RtxConfig, int | None]:
    lines = ["# RTX1210 Rev.14.01.38 (Fri Jul  3 09:56:21 2020)", "console character ja.utf8"]
    numbers = draw(st.lists(st.sampled_from([10, 20, 30, 40]), unique=True, max_size=3))
    filters = {n: draw(filter_line) for n in numbers}
    entries: list[str] = []
    for _ in range(draw(st.integers(0, 2))):
        chosen = [n for n in numbers if filters[n] is not None]
        if chosen:
            entries.append(f"gateway {draw(small_gateway)} filter {draw(st.sampled_from(chosen))}")
    unfiltered = draw(st.lists(small_gateway, min_size=1, max_size=2, unique=True))
    entries.extend(f"gateway {g}" for g in unfiltered)
    lines.append("ip route default " + " ".join(entries))
    lines.append("ip lan1 address 192.168.0.1/24")
    if draw(st.booleans()) and numbers:
        lines.append(f"ip lan1 secure filter in {draw(st.sampled_from(numbers))} 3000")
    lines.extend(f"ip filter {n} {f}" for n, f in sorted(filters.items()) if f is not None)
    lines.append("ip filter 3000 pass * * * * *")
    managed = draw(st.one_of(st.none(), st.sampled_from([10, 20, 30, 40])))
    return RtxConfig.parse("\n".join(lines) + "\n"), managed


desired_routes = st.one_of(
    st.none(),
    st.builds(SmtpRoute, st.sampled_from([10, 20, 30, 40]), small_gateway, small_gateway),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(router_states(), desired_routes)
def test_every_plan_keeps_mr009_and_converges(
    state: tuple[RtxConfig, int | None], desired: SmtpRoute | None
) -> None:
    config, managed = state
    assume(not invariant_problems(config))
    try:
        commands = plan_commands(config, desired, managed)
    except RtxPolicyError as exc:
        assert str(exc)
        return
    states = simulate(config, commands)
    for step in states:
        assert invariant_problems(step) == []
    final = states[-1] if states else config
    route = final.default_route()
    assert route is not None
    if desired is not None:
        assert any(
            g.gateway == desired.gateway and g.filters == (desired.filter,) for g in route.gateways
        )
        assert desired.otherwise in [g.gateway for g in route.gateways if not g.filters]
        rule = final.filter(desired.filter)
        assert rule is not None and rule.is_smtp_pass
        again = plan_commands(final, desired, desired.filter)
    else:
        again = plan_commands(final, None, managed)
    assert again == []
    # Minimal: at most one filter definition, one route line, one removal.
    assert len(commands) <= 3
    assert sum(c.startswith("ip route ") for c in commands) <= 1


# --- the planner's steps leave every admin line alone ---------------------------------------

ADMIN_FILTERS = [500, 501, 600, 1010, 2000]
admin_filter_body = st.sampled_from(
    [
        "pass * * udp * domain",
        "reject * * tcp * telnet",
        "pass 192.168.0.0/24 * tcp * www,https",
        "reject 10.0.0.0/8 * * * *",
        "pass * 10.0.0.0/8 * * *",
        "pass-log * * tcp * smtp",  # an admin's own SMTP pass
        "restrict * * tcp,udp * *",
    ]
)
admin_gateway = st.sampled_from(["pp 1", "pp 2", "tunnel 1", "192.0.2.1", "dhcp lan2", "lan3"])
unfiltered_params = st.lists(
    st.sampled_from(["weight 2", "weight 1", "hide", "keepalive 3", "metric 2"]),
    max_size=2,
    unique=True,
)
filtered_params = st.lists(
    st.sampled_from(["keepalive 1", "metric 2", "hide", "weight 3"]), max_size=2, unique=True
)
unknown_line = st.sampled_from(
    [
        "nat descriptor type 1 masquerade",
        "nat descriptor masquerade static 1 1 192.168.0.25 tcp smtp",
        'description lan1 "filter 10 (not a reference)"',
        "  ip lan1 proxyarp on  ",
        "dns server 198.51.100.53",
        "ip  filter   2001  pass  *  *  udp",  # non-canonical: printed verbatim
        "schedule at 1 */* 03:00 * lua /sd/x.lua",
        "",
    ]
)
MAILREC_NUMBERS = [10, 20, 500, 100]


@st.composite
def admin_configs(draw: st.DrawFn) -> RtxConfig:
    numbers = draw(st.lists(st.sampled_from(ADMIN_FILTERS), min_size=1, max_size=4, unique=True))
    filters = [f"ip filter {n} {draw(admin_filter_body)}" for n in sorted(numbers)]
    entries: list[str] = []
    for _ in range(draw(st.integers(0, 3))):
        listed = draw(st.lists(st.sampled_from(numbers), min_size=1, max_size=2, unique=True))
        params = " ".join(["filter", *map(str, listed), *draw(filtered_params)])
        entries.append(f"gateway {draw(admin_gateway)} {params}")
    for name in draw(st.lists(admin_gateway, min_size=1, max_size=2, unique=True)):
        entries.append(" ".join(["gateway", name, *draw(unfiltered_params)]))
    lines = [
        "# RTX1210 Rev.14.01.38 (Fri Jul  3 09:56:21 2020)",
        "ip route default " + " ".join(entries),
        "ip route 10.8.0.0/16 gateway tunnel 1",
        "ip lan1 address 192.168.0.1/24",
    ]
    secure = draw(st.lists(st.sampled_from([*numbers, 10, 20, 3000]), max_size=3, unique=True))
    if secure:
        lines.append("ip lan1 secure filter in " + " ".join(map(str, secure)) + " dynamic 100")
    if draw(st.booleans()):
        lines += ["pp select 1", " ip pp secure filter out 3000 dynamic 101", "pp select none"]
    lines += filters
    lines.append("ip filter 3000 pass * * * * *")
    lines.append("ip filter dynamic 100 * * www")
    if draw(st.booleans()):
        lines.append(f"ip filter dynamic 101 * * filter {draw(st.sampled_from(numbers))} in 3000")
    for _ in range(draw(st.integers(0, 4))):
        lines.insert(draw(st.integers(1, len(lines))), draw(unknown_line))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    return RtxConfig.parse(eol.join(lines) + eol)


def _entries(config: RtxConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    route = config.default_route()
    assert route is not None
    return tuple((g.gateway, g.filters) for g in route.gateways)


def _other_lines(config: RtxConfig, number: int) -> list[str]:
    """Every line but mailrec's filter definition and the default route, with its ending."""
    return [
        line.text + line.eol
        for line in config.lines
        if not (isinstance(line.node, IpFilter) and line.node.number == number)
        and not (isinstance(line.node, IpRoute) and line.node.is_default)
    ]


def _step(config: RtxConfig, step: Step) -> RtxConfig:
    for command in commands_for(step, config):
        config = config.apply(command)
    return config


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    admin_configs(),
    st.sampled_from(MAILREC_NUMBERS),
    st.sampled_from(["192.168.0.254", "tunnel 2", "pp 1"]),
)
def test_mailrec_steps_change_only_its_filter_and_its_entry(
    config: RtxConfig, number: int, gateway: str
) -> None:
    admin_route = config.default_route()
    assert admin_route is not None
    before = _entries(config)
    existing = config.filter(number)
    clash = (existing is not None and not existing.is_smtp_pass) or (
        number in filter_references(config)
    )
    step = SetRouterFilter(number, True, f"ip filter {number} pass * * tcp * smtp")
    try:
        added = _step(config, step)
    except RtxPolicyError as exc:
        assert clash, exc  # refused only for a number someone else uses (MR014)
        return
    assert not clash
    if existing is not None:
        assert added == config  # an SMTP pass already: reused, nothing typed
        return
    first_unfiltered = next(i for i, (_, f) in enumerate(before) if not f)
    after = (*before[:first_unfiltered], (gateway, (number,)), *before[first_unfiltered:])
    routed = _step(added, SetDefaultRoute(before, after))
    for state in (added, routed):
        assert _other_lines(state, number) == _other_lines(config, number)
        assert invariant_problems(state) == []
    new_route = routed.default_route()
    assert new_route is not None
    # The admin's entries are all there, parameters as written, in the same order.
    theirs = [g for g in new_route.gateways if g.filters != (number,)]
    assert theirs == list(admin_route.gateways)
    assert _entries(routed) == after
    # And back: the route first, then the filter; the text is the original byte for byte.
    restored = _step(routed, SetDefaultRoute(after, before))
    removed = _step(restored, SetRouterFilter(number, False, ""))
    assert _other_lines(restored, number) == _other_lines(config, number)
    assert removed.render() == config.render()
