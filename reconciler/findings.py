"""Findings: what a safety rule says about a world or a step, with its MR code.

Every finding names its code, the users or resources involved, and what would make it pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

# One line per rule, shown by `mailrec validate --help` and in docs/architecture.md.
RULES: dict[str, str] = {
    "MR001": "route a user to the rental only when the rental mailbox exists and the rental "
    "accepts the domain",
    "MR002": "no user's outbound moves to the rental while any user's mail would not be received "
    "there (inbound onprem, or routed without a working rental mailbox)",
    "MR003": "the MX moves to the rental only when the rental receives every user's mail",
    "MR004": "the MX moves only after its TTL was lowered to cutover_ttl at least the old TTL ago",
    "MR005": "outbound via the rental on port 25 without AUTH needs every gateway tcp/25 may leave "
    "through to have a declared address the rental is seen (not told) to relay for",
    "MR006": "SPF authorises the rental before anyone sends through it, keeps the onprem IP "
    "while anyone still sends through onprem, and authorises the office line the router sends "
    "tcp/25 through while onprem still sends its own mail",
    "MR007": "onprem recipient validation must accept every user routed to the rental",
    "MR008": "no step deletes a mailbox that still holds messages",
    "MR009": "the router always keeps a default route; a route references a filter only after "
    "the filter exists",
    "MR010": "onprem is retired only after the MX moved, the old TTL elapsed and the quiet period "
    "passed with no mail through it",
    "MR011": "a plan moving more than max_change_pct of users needs --allow-bulk",
    "MR012": "the state file is invalid or contradicts itself",
    "MR013": "no step leaves a receiving user with nowhere to receive (onprem would answer 550)",
    "MR014": "mailrec takes only a router filter number no other line defines or uses, and "
    "replaces only its own unchanged smtp pass filter",
    "MR015": "an unmanaged user still receives onprem (not in the state file); an account "
    "outside the uid range that holds mail blocks the MX move until the state says where its "
    "name goes",
    "MR016": "every rental relay whitelist entry is narrower than policy.whitelist_min_prefix_v4 "
    "/ _v6 (default /24 and /48), and never a default route (0.0.0.0/0, ::/0): no open relay",
    "MR017": "SPF follows RFC 7208: one v=spf1 record, well-formed terms, at most 10 DNS "
    "lookups, no +all or all (?all is neutral and allowed), no ip4/ip6 wider than the "
    "whitelist bounds",
    "MR018": "mailrec's own entries (onprem transport and recipient maps) say what the state "
    "would write, for every local name of a migrated user; a changed rental host or port, a "
    "hand edit or a missing name is drift, repaired by a step",
    "MR019": "the rental takes the domain's mail (MX, or anyone sending through it) only when "
    "every name onprem receives for (aliases, virtual aliases, accounts holding mail) has a "
    "destination seen at the rental or is declared drop, and every table onprem reads is "
    "readable",
    "MR020": "no mail is delivered into a moved user's old onprem mailbox after mailrec archived "
    "it (something still delivers it locally)",
}


class Severity(StrEnum):
    REFUSE = "refuse"  # the change is unsafe until something else changes
    GATE = "gate"  # the change is safe but waits for time, a person or an observation
    WARN = "warn"  # worth knowing; blocks nothing


@dataclass(frozen=True, slots=True)
class Finding:
    code: str
    message: str
    subjects: tuple[str, ...] = ()
    remedy: str = ""
    severity: Severity = Severity.REFUSE
    where: str = ""  # "file:line" in the state files, for findings about the state itself

    def text(self) -> str:
        tail = f" To pass: {self.remedy}" if self.remedy else ""
        place = f"{self.where}: " if self.where else ""
        return f"{place}{self.code}: {self.message}.{tail}"

    def as_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "code": self.code,
            "message": self.text(),
            "subjects": list(self.subjects),
            "severity": str(self.severity),
        }
        if self.where:
            data["where"] = self.where
        return data


def subjects_text(names: list[str] | tuple[str, ...], limit: int = 5) -> str:
    """`a, b, c and 12 more` - findings must stay readable with 100,000 users."""
    shown = ", ".join(names[:limit])
    rest = len(names) - limit
    return f"{shown} and {rest} more" if rest > 0 else shown


def subjects_verb(names: list[str] | tuple[str, ...], singular: str, plural: str,
                  limit: int = 5) -> str:
    """The names as `subjects_text` says them, with the verb agreeing: `suga sends`,
    `suga is`; `sato, suga send`, `ito and 7 more are`."""
    return f"{subjects_text(names, limit)} {singular if len(names) == 1 else plural}"


@dataclass(frozen=True, slots=True)
class Gate:
    """Why a safe step waits: a time, an ack by a person, or an observation."""

    kind: str  # "time" | "ack" | "observation" | "step"
    message: str
    code: str = ""
    until: str | None = None  # ISO-8601 for time gates
    after: str | None = None  # the step this one waits for ("step" gates)
    instructions: tuple[str, ...] = field(default_factory=tuple)

    def as_finding(self) -> Finding:
        return Finding(self.code or "GATE", self.message, severity=Severity.GATE)
