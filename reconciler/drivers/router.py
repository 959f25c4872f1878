"""The router seen by the backend: RTX facts -> `world.RouterFacts`, and a router step -> the
exact RTX CLI lines, applied over SSH (a real RTX, or the lab's emulator) or, in a lab
without running services, to the lab's saved configuration file.

The RTX package (`drivers/rtx/`) knows the router's language; this module only maps the
planner's two router steps (filter, default route) onto it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from reconciler.drivers.lab_onprem import write_atomic
from reconciler.drivers.rtx.config import RtxConfig
from reconciler.drivers.rtx.policy import SmtpRoute, plan_commands
from reconciler.lab.layout import LabLayout
from reconciler.model import DesiredState, Router
from reconciler.secrets import resolve_secret
from reconciler.steps import SetDefaultRoute, SetRouterFilter, Step
from reconciler.world import RouterFacts


class RouterDriver(Protocol):
    def observe(self) -> RouterFacts: ...

    def apply_step(self, step: Step, state: DesiredState) -> None: ...


def world_facts(config: RtxConfig) -> RouterFacts:
    filters = config.static_filters()
    smtp = frozenset(n for n, f in filters.items() if f.is_smtp_pass)
    default = config.default_route()
    route = None
    if default is not None:
        route = tuple((g.gateway, tuple(g.filters)) for g in default.gateways)
    return RouterFacts(filters=smtp, other_filters=frozenset(filters) - smtp, default_route=route)


def commands_for(step: Step, config: RtxConfig, state: DesiredState) -> list[str]:
    """The lines of the full policy plan that belong to this step (filter or route)."""
    route = state.router.smtp_route if state.router else None
    desired = SmtpRoute(route.filter, route.gateway, route.otherwise) if route else None
    managed = route.filter if route else None
    # Renumbering or removing: the filter mailrec set up before is the one being left.
    if isinstance(step, SetRouterFilter) and not step.present:
        managed = step.number
    elif isinstance(step, SetDefaultRoute) and step.before:
        after = {f for _, filters in step.after for f in filters}
        dropped = [f for _, filters in step.before for f in filters if f not in after]
        if dropped:
            managed = dropped[0]
    commands = plan_commands(config, desired, managed)
    if isinstance(step, SetRouterFilter):
        wanted = f"ip filter {step.number} "
        return [c for c in commands if c.startswith((wanted, f"no {wanted.strip()}"))]
    if isinstance(step, SetDefaultRoute):
        return [c for c in commands if c.startswith(("ip route default", "no ip route default"))]
    raise ValueError(f"{step.id} is not a router step")


class LabRouter:
    """The lab router: over SSH to the emulator when `lab up` runs it, else the file."""

    def __init__(self, layout: LabLayout) -> None:
        self.layout = layout

    def _ssh(self) -> Any:
        address = self.layout.read_services().get("rtx_ssh")
        if not address:
            return None
        from reconciler.lab.services import lab_rtx_driver

        return lab_rtx_driver(self.layout, address)

    def _config(self) -> RtxConfig:
        return RtxConfig.parse(self.layout.router_config.read_text())

    def observe(self) -> RouterFacts:
        driver = self._ssh()
        if driver is not None:
            config, _ = driver.observe()
            return world_facts(config)
        return world_facts(self._config())

    def apply_step(self, step: Step, state: DesiredState) -> None:
        driver = self._ssh()
        if driver is not None:
            config, _ = driver.observe()
            commands = commands_for(step, config, state)
            if commands:
                driver.apply(commands)
            return
        config = self._config()
        for command in commands_for(step, config, state):
            config = config.apply(command)
        write_atomic(self.layout.router_config, config.render())


class RtxRouter:
    """A real Yamaha RTX over SSH (host key checked against known_hosts)."""

    def __init__(self, router: Router, known_hosts: Path | None) -> None:
        from reconciler.drivers.rtx.driver import RtxDriver

        connect = router.connect
        assert connect.host is not None and connect.user is not None
        self.driver = RtxDriver(
            connect.host, connect.port, connect.user,
            resolve_secret(router.password) if router.password else None,
            resolve_secret(router.admin_password),
            str(known_hosts) if known_hosts else None,
        )

    def observe(self) -> RouterFacts:
        config, _ = self.driver.observe()
        return world_facts(config)

    def apply_step(self, step: Step, state: DesiredState) -> None:
        config, _ = self.driver.observe()
        commands = commands_for(step, config, state)
        if commands:
            self.driver.apply(commands)
