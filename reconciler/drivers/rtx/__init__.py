"""Yamaha RTX router driver: the SMTP policy route (`ip filter N pass * * tcp * smtp` and
`ip route default gateway G filter N gateway OTHERWISE`), read and changed safely.

config  -- `show config` parser/printer and the semantics of the modelled commands
policy  -- desired `SmtpRoute` -> minimal, MR009-ordered command list; the planner's filter and
           route steps -> the exact lines, refusing what is not mailrec's (pure)
queries -- what each filter does to the office's SMTP traffic; which lines use a filter number
session -- one SSH CLI session (prompts, pager, administrator, save question, errors)
driver  -- `RtxDriver.observe()` / `.apply()` and `RouterFacts` for the core
"""

from reconciler.drivers.rtx.config import RtxConfig, RtxSyntaxError
from reconciler.drivers.rtx.driver import RouterFacts, RtxDriver, router_facts
from reconciler.drivers.rtx.policy import (
    RtxPolicyError,
    SmtpRoute,
    filter_step_commands,
    plan_commands,
    route_step_commands,
)
from reconciler.drivers.rtx.queries import filter_references, filter_verdict, filter_verdicts
from reconciler.drivers.rtx.session import (
    RtxAuthError,
    RtxCommandError,
    RtxConnectionError,
    RtxError,
    RtxHostKeyError,
)

__all__ = [
    "RouterFacts",
    "RtxAuthError",
    "RtxCommandError",
    "RtxConfig",
    "RtxConnectionError",
    "RtxDriver",
    "RtxError",
    "RtxHostKeyError",
    "RtxPolicyError",
    "RtxSyntaxError",
    "SmtpRoute",
    "filter_references",
    "filter_step_commands",
    "filter_verdict",
    "filter_verdicts",
    "plan_commands",
    "route_step_commands",
    "router_facts",
]
