"""The RTX router driver: observe the configuration, apply planned commands safely.

Where it sits: the core's observe step calls `RtxDriver.observe()` and turns the returned
configuration into its world snapshot (`drivers/router.py:world_facts`); the apply step
translates a planner step into lines (`policy.filter_step_commands` /
`policy.route_step_commands`) and calls `RtxDriver.apply()`. Each call is one SSH session
(`session.py`). Passwords with a control character are refused before anything is sent.

`apply` is all-or-nothing as far as the saved configuration goes: the commands are typed in
administrator mode, and only when every one was accepted does `save` run. When the router
refuses one, the commands already accepted are undone in reverse order (the running
configuration goes back to what it was), the session leaves administrator mode answering
N to the save question, and RtxCommandError is raised: the saved configuration is never
touched. After `save` the configuration is read again and checked against the simulation.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import NoReturn

from reconciler.drivers.rtx.config import (
    Comment,
    IpFilter,
    IpFilterDynamic,
    IpRoute,
    RtxConfig,
    command_key,
)
from reconciler.drivers.rtx.policy import rollback_commands, simulate, validate_command
from reconciler.drivers.rtx.queries import default_route_entries, filter_verdicts
from reconciler.drivers.rtx.session import (
    RtxAuthError,
    RtxCommandError,
    RtxConnectionError,
    RtxError,
    RtxHostKeyError,
    RtxSession,
    check_typed_secret,
)
from reconciler.world import RouteEntries, tcp25_egress

__all__ = [
    "RouterFacts",
    "RtxAuthError",
    "RtxCommandError",
    "RtxConnectionError",
    "RtxDriver",
    "RtxError",
    "RtxHostKeyError",
    "router_facts",
]

log = logging.getLogger(__name__)

DefaultRoute = RouteEntries


@dataclass(frozen=True)
class RouterFacts:
    """What the core needs to know about the router, from one `show config`."""

    filters: dict[int, str]  # every `ip filter N ...`: N -> the line's text
    smtp_filter_ok: dict[int, bool]  # N -> a pass of tcp to port smtp/25 from anywhere
    default_route: DefaultRoute | None  # ((gateway, (filter, ...)), ...); None: no default route
    raw: str  # the `show config` text as read
    # The one gateway all of the office's tcp/25 leaves through by RTX's first-match rules
    # (`reconciler.world.tcp25_egress`); None when that is not one certain gateway.
    smtp_gateway: str | None = None
    # Every gateway some of it may leave through; (): SMTP has no route at all.
    smtp_egress: tuple[str, ...] = ()


def router_facts(config: RtxConfig) -> RouterFacts:
    route = default_route_entries(config)
    # The one egress function safety asks too, fed with the same filter verdicts.
    egress = tcp25_egress(route, filter_verdicts(config))
    return RouterFacts(
        filters=config.static_filter_lines(),
        smtp_filter_ok={n: f.is_smtp_pass for n, f in config.static_filters().items()},
        default_route=route,
        raw=config.render(),
        smtp_gateway=egress[0] if len(egress) == 1 else None,
        smtp_egress=egress,
    )


def _changed_lines(expected: RtxConfig, after: RtxConfig, keys: set[str]) -> list[str]:
    """How the configuration read back differs from the simulation of the plan: the
    definitions the plan touched must mean the same, and every other line (the header
    comments aside, they carry the report date) must be there unchanged, in any order."""
    problems: list[str] = []
    for key in sorted(keys):
        want, got = expected.line_for(key), after.line_for(key)
        if (want.node if want else None) != (got.node if got else None):
            problems.append(f"{key}: {got.text.strip() if got else 'absent'}")

    def rest(config: RtxConfig) -> Counter[str]:
        return Counter(
            line.text
            for line in config.lines
            if not isinstance(line.node, Comment)
            and not (
                isinstance(line.node, IpFilter | IpFilterDynamic | IpRoute)
                and line.node.key in keys
            )
        )

    extra, missing = rest(after) - rest(expected), rest(expected) - rest(after)
    problems.extend(f"unexpected line {text!r}" for text in sorted(extra))
    problems.extend(f"missing line {text!r}" for text in sorted(missing))
    return problems


class RtxDriver:
    """Reads and changes one RTX router over SSH."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str | None,
        admin_password: str,
        known_hosts: str | None,
        *,
        timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self._admin_password = admin_password
        self.known_hosts = known_hosts
        self.timeout = timeout

    def __repr__(self) -> str:  # never shows a password
        return f"RtxDriver({self.username}@{self.host}:{self.port})"

    def _where(self) -> str:
        return f"the router at {self.host}:{self.port}"

    def _session(self) -> RtxSession:
        return RtxSession(
            self.host,
            self.port,
            self.username,
            self._password,
            self.known_hosts,
            timeout=self.timeout,
        )

    def observe(self) -> tuple[RtxConfig, RouterFacts]:
        """One session: `show config` with paging off."""
        with self._session() as session:
            session.prepare()
            text = session.show_config()
            session.quit()
        config = RtxConfig.parse(text)
        return config, router_facts(config)

    def apply(self, commands: list[str], *, planned_from: RtxConfig | None = None) -> RtxConfig:
        """Type `commands` in administrator mode, `save`, and return the configuration read
        back afterwards. Raises RtxPolicyError (before connecting) for a command mailrec
        would not plan, RtxAuthError for a refused login or administrator password (or one
        with a control character, before connecting), and RtxCommandError when the router
        refuses a command (the saved configuration is then unchanged and the running one
        restored) or the result does not verify.

        `planned_from`: the configuration the commands were computed from. When the router's
        configuration is no longer that one (someone changed it since), nothing is typed and
        RtxCommandError is raised."""
        checked = [validate_command(c) for c in commands]
        if not checked:
            return self.observe()[0]
        # Before connecting: a line break in the password would type more admin commands.
        check_typed_secret(self._admin_password, "administrator password", self._where())
        with self._session() as session:
            session.prepare()
            before = RtxConfig.parse(session.show_config())
            if planned_from is not None:
                changed = _changed_lines(planned_from, before, set())
                if changed:
                    session.quit()
                    raise RtxCommandError(
                        f"the configuration of {self._where()} changed after it was read "
                        f"({'; '.join(changed[:3])}): nothing was sent; observe again"
                    )
            expected = simulate(before, checked)[-1]
            session.enter_administrator(self._admin_password)
            self._run_all(session, before, checked)
            try:
                session.run("save")
            except RtxCommandError as exc:
                self._abandon(session, before, checked, exc)
            session.exit_administrator(save=False)
            after = RtxConfig.parse(session.show_config())
            session.quit()
        problems = _changed_lines(expected, after, {command_key(c) for c in checked})
        if problems:
            raise RtxCommandError(
                f"the router at {self.host}:{self.port} saved the change but its configuration "
                f"does not read back as planned ({'; '.join(problems[:3])}); observe again "
                "before planning"
            )
        return after

    def _run_all(self, session: RtxSession, before: RtxConfig, commands: list[str]) -> None:
        applied: list[str] = []
        for command in commands:
            try:
                session.run(command)
            except RtxCommandError as exc:
                self._abandon(session, before, applied, exc)
            applied.append(command)

    def _abandon(
        self, session: RtxSession, before: RtxConfig, applied: list[str], cause: RtxCommandError
    ) -> NoReturn:
        """Undo `applied`, leave administrator mode without saving, raise."""
        undo = rollback_commands(before, applied)
        restored = True
        for command in undo:
            try:
                session.run(command)
            except RtxCommandError:
                restored = False
                break
        try:
            session.exit_administrator(save=False)
        except RtxError:
            restored = False
        state = (
            "the running configuration was restored"
            if restored
            else "undoing the accepted commands failed: the RUNNING configuration differs from "
            "the saved one (restart the router or re-run to converge)"
        )
        log.warning("rtx %s:%d: %s; %s", self.host, self.port, cause, state)
        raise RtxCommandError(
            f"{cause}; nothing was saved and {state}",
            command=cause.command,
            router_message=cause.router_message,
        ) from cause
