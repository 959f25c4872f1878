"""The steps a plan is made of, by system (see `base.Step` for the contract)."""

from reconciler.steps.addresses import CreateAlias, DetachUpstream, RemoveFallback
from reconciler.steps.base import VERIFIED_USER_FIELDS, Action, Rank, Step
from reconciler.steps.dns import MoveMx, SetMxTtl, SetSpf
from reconciler.steps.onprem import EnableRecipientMap, ProbeForward, RetireOnprem
from reconciler.steps.rental import ChangeWhitelist
from reconciler.steps.router import SetDefaultRoute, SetRouterFilter
from reconciler.steps.timing import resolver_hold
from reconciler.steps.users import CreateMailbox, MoveInbound, MoveOutbound, RemoveOnpremMailbox

__all__ = [
    "VERIFIED_USER_FIELDS",
    "Action",
    "ChangeWhitelist",
    "CreateAlias",
    "CreateMailbox",
    "DetachUpstream",
    "EnableRecipientMap",
    "MoveInbound",
    "MoveMx",
    "MoveOutbound",
    "ProbeForward",
    "Rank",
    "RemoveFallback",
    "RemoveOnpremMailbox",
    "RetireOnprem",
    "SetDefaultRoute",
    "SetMxTtl",
    "SetRouterFilter",
    "SetSpf",
    "Step",
    "resolver_hold",
]
