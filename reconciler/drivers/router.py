"""The router seen by the backend: RTX facts -> `world.RouterFacts`, and a router step -> the
exact RTX CLI lines, applied over SSH (a real RTX, or the lab's emulator) or, in a lab
without running services, to the lab's saved configuration file.

The RTX package (`drivers/rtx/`) knows the router's language; this module only maps the
planner's two router steps (filter, default route) onto it. It translates a step as the
planner wrote it and never re-plans: which filter and which route entry are mailrec's is
the planner's decision (from the facts below), and the translation refuses, with
RtxPolicyError, whatever would change a line that is not mailrec's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from reconciler.drivers.lab_onprem import write_atomic
from reconciler.drivers.rtx.config import RtxConfig
from reconciler.drivers.rtx.policy import (
    RtxPolicyError,
    filter_command,
    filter_step_commands,
    route_step_commands,
)
from reconciler.drivers.rtx.queries import (
    default_route_entries,
    filter_references,
    filter_verdicts,
)
from reconciler.lab.layout import LabLayout
from reconciler.model import DesiredState, Router
from reconciler.secrets import resolve_secret
from reconciler.steps import SetDefaultRoute, SetRouterFilter, Step
from reconciler.world import RouterFacts

if TYPE_CHECKING:
    from reconciler.drivers.rtx.driver import RtxDriver


class RouterDriver(Protocol):
    def observe(self) -> RouterFacts: ...

    def apply_step(self, step: Step, state: DesiredState) -> None: ...


def world_facts(config: RtxConfig) -> RouterFacts:
    """Everything the planner needs to know about the router, from one `show config`."""
    filters = config.static_filters()
    smtp = frozenset(n for n, f in filters.items() if f.is_smtp_pass)
    return RouterFacts(
        filters=smtp,
        other_filters=frozenset(filters) - smtp,
        default_route=default_route_entries(config),
        verdicts=filter_verdicts(config),
        filter_lines=config.static_filter_lines(),
        references=filter_references(config),
    )


def commands_for(step: Step, config: RtxConfig) -> list[str]:
    """The RTX lines that carry out the planner's router `step` on `config`, exactly as
    planned ([] when the router already is as the step leaves it). Raises RtxPolicyError when
    that would define a filter number another line uses or defines (MR014), delete a filter
    that is not mailrec's SMTP pass or is still used, change a default route that changed
    since the plan, drop or reorder an admin's route entry, or break MR009."""
    if isinstance(step, SetRouterFilter):
        if step.present and step.line != filter_command(step.number):
            raise RtxPolicyError(
                f"the plan shows {step.line!r} for filter {step.number}, but mailrec writes "
                f"{filter_command(step.number)!r}: refusing to type something the plan does "
                "not show"
            )
        return filter_step_commands(config, step.number, step.present)
    if isinstance(step, SetDefaultRoute):
        return route_step_commands(config, step.before, step.after)
    raise ValueError(f"{step.id} is not a router step")


class SshRouter:
    """A router behind an `RtxDriver` (a real RTX, or the lab's emulator)."""

    def __init__(self, driver: RtxDriver) -> None:
        self.driver = driver

    def observe(self) -> RouterFacts:
        config, _ = self.driver.observe()
        return world_facts(config)

    def apply_step(self, step: Step, state: DesiredState | None = None) -> None:
        config, _ = self.driver.observe()
        commands = commands_for(step, config)
        if commands:
            # Typed only if the router still has the configuration they were made from.
            self.driver.apply(commands, planned_from=config)


class LabRouter:
    """The lab router: over SSH to the emulator when `lab up` runs it, else the file."""

    def __init__(self, layout: LabLayout) -> None:
        self.layout = layout

    def _ssh(self) -> SshRouter | None:
        address = self.layout.read_services().get("rtx_ssh")
        if not address:
            return None
        from reconciler.lab.services import lab_rtx_driver

        return SshRouter(lab_rtx_driver(self.layout, address))

    def _config(self) -> RtxConfig:
        return RtxConfig.parse(self.layout.router_config.read_text())

    def observe(self) -> RouterFacts:
        router = self._ssh()
        if router is not None:
            return router.observe()
        return world_facts(self._config())

    def apply_step(self, step: Step, state: DesiredState) -> None:
        router = self._ssh()
        if router is not None:
            router.apply_step(step, state)
            return
        config = self._config()
        commands = commands_for(step, config)
        if not commands:
            return
        for command in commands:
            config = config.apply(command)
        write_atomic(self.layout.router_config, config.render())


class RtxRouter(SshRouter):
    """A real Yamaha RTX over SSH (host key checked against known_hosts)."""

    def __init__(self, router: Router, known_hosts: Path | None) -> None:
        from reconciler.drivers.rtx.driver import RtxDriver

        connect = router.connect
        assert connect.host is not None and connect.user is not None
        super().__init__(
            RtxDriver(
                connect.host, connect.port, connect.user,
                resolve_secret(router.password) if router.password else None,
                resolve_secret(router.admin_password),
                str(known_hosts) if known_hosts else None,
            )
        )
