"""The router policy through the whole stack on the lab: renumbering the filter and removing
the policy leave no stale filter behind, keep a default route at every step, and touch no
other line of the configuration."""

from __future__ import annotations

import json
import re

from reconciler.drivers.rtx.config import RtxConfig
from reconciler.lab.layout import LabLayout

from .conftest import run_cli


def _plan_ids(lab: LabLayout) -> list[tuple[str, str]]:
    result = run_cli("plan", "--format", "json", "--lab", str(lab.root))
    return [(s["id"], s["status"]) for s in json.loads(result.output)["steps"]]


def _apply(lab: LabLayout) -> None:
    result = run_cli("apply", "--yes", "--lab", str(lab.root))
    assert result.exit_code == 0, result.output + result.stderr


def _unmanaged_lines(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if not re.match(r"ip (filter (10|20) |route default )", line)]


def test_renumber_then_remove_the_policy(lab: LabLayout) -> None:
    original = lab.router_config.read_text()
    _apply(lab)
    state = lab.root / "state" / "mailrec.yaml"
    state.write_text(state.read_text().replace("    filter: 10\n", "    filter: 20\n"))

    assert _plan_ids(lab) == [
        ("router/filter/20", "ready"),
        ("router/route/default", "ready"),
        ("router/filter/10", "ready"),
    ]
    _apply(lab)
    config = RtxConfig.parse(lab.router_config.read_text())
    assert set(config.static_filters()) >= {20}
    assert 10 not in config.static_filters()
    text = lab.router_config.read_text()
    assert "ip route default gateway 192.168.0.254 filter 20 gateway tunnel 2" in text

    # The policy is taken out of the state: the route goes back, then the filter goes.
    state.write_text(re.sub(r"  smtp_route:.*?egress_ip: [0-9.]+\n", "", state.read_text(),
                            flags=re.S))
    assert _plan_ids(lab) == [("router/route/default", "ready"), ("router/filter/20", "ready")]
    _apply(lab)
    text = lab.router_config.read_text()
    assert "ip route default gateway tunnel 2\n" in text
    assert "ip filter 20 " not in text
    assert _unmanaged_lines(text) == _unmanaged_lines(original)  # nothing else touched
    assert _plan_ids(lab) == []


def test_a_filter_mailrec_did_not_create_is_never_removed(lab: LabLayout) -> None:
    """An admin's own tcp/25 pass filter (2025 in the lab config) is not mailrec's."""
    _apply(lab)
    state = lab.root / "state" / "mailrec.yaml"
    state.write_text(re.sub(r"  smtp_route:.*?egress_ip: [0-9.]+\n", "", state.read_text(),
                            flags=re.S))
    ids = [i for i, _ in _plan_ids(lab)]
    assert "router/filter/10" in ids
    assert not any(i.startswith("router/filter/2") for i in ids)


def test_renumber_over_ssh_to_the_emulator(lab: LabLayout) -> None:
    """The same change through `lab up`: the commands travel over SSH to the RTX emulator
    (host key pinned), which saves the file."""
    from reconciler.lab.services import start_services, stop_services

    services = start_services(lab)
    try:
        assert "rtx_ssh" in services
        _apply(lab)
        state = lab.root / "state" / "mailrec.yaml"
        state.write_text(state.read_text().replace("    filter: 10\n", "    filter: 20\n"))
        _apply(lab)
        text = lab.router_config.read_text()
        assert "ip route default gateway 192.168.0.254 filter 20 gateway tunnel 2" in text
        assert "ip filter 20 pass * * tcp * smtp" in text
        assert "ip filter 10 " not in text
        assert _plan_ids(lab) == []
    finally:
        stop_services(lab)
