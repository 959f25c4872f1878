"""An offline snapshot of the observed world: what the drivers read, without any secret.

A pull request's CI job must not hold production credentials (the TSIG key, the router's
passwords, SSH keys). So `status --format json` and the daemon publish what the drivers last
read (Postfix maps, the rental's mailboxes, DNS records, router facts, relays) together with
what the journal remembers (acks, TTL history), and `plan --world FILE` plans against that
instead of connecting anywhere.

What is kept is the drivers' output *before* it is joined with a state (`build_world`), so a
PR's base and head are each joined with the same observation: a user the head adds is simply
absent from it (no mailbox seen: the worst case), never assumed present.

A snapshot is a record of the past: the plan says when it was taken, and its time gates are
judged at that moment. It can be read, never applied: `apply` always observes again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.context import Instructor
from reconciler.observe import JournalView, build_world
from reconciler.world import RouterFacts, World

if TYPE_CHECKING:  # annotations only: the drivers load dnspython and paramiko
    from reconciler.drivers.backend import ObservedParts, SystemBackend
    from reconciler.load import LoadedState
    from reconciler.model import DesiredState

SNAPSHOT_KIND = "mailrec-world"
SNAPSHOT_VERSION = 1

# A router line is kept in a snapshot only for its filter number (MR014 names the line); a
# line with a credential-like word is withheld whole, whatever else it says. Listing what is
# kept (filter lines) would also hide secure-filter and filter-set lines, which MR014 needs.
_SECRET_WORDS = re.compile(
    r"password|passwd|secret|pre-shared-key|\bkey\b|\bauth\b|myname|username|community|"
    r"token|psk", re.IGNORECASE)
WITHHELD = "(line withheld from the snapshot: it may hold a credential)"


class SnapshotError(ValueError):
    """A snapshot file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class WorldSnapshot:
    observed_at: datetime
    domain: str
    state_digest: str  # the state (commit or files' digest) the drivers were set up from
    systems: tuple[str, ...]  # how each system was read (plan's "observed:" line)
    parts: ObservedParts
    view: JournalView  # what the journal remembered at that moment
    rental_provider: str
    # What the provider does itself (the rest waits for a person): rental/base.Capability
    rental_capabilities: frozenset[str]
    source: str = ""  # who took it: "mailrec status", "mailrec daemon"

    def world_for(self, state: DesiredState) -> World:
        """The observation joined with `state` (a PR's base or head), as `observe` would."""
        parts = self.parts
        return build_world(state, postfix=parts.postfix, rental=parts.rental, dns=parts.dns,
                           router=parts.router, journal=self.view, now=self.observed_at,
                           upstream=parts.upstream)

    def instructor(self) -> Instructor:
        """The rental's manual steps as the provider's capabilities say. The provider's exact
        panel instructions need the provider itself: the live plan prints them."""
        capabilities, provider = self.rental_capabilities, self.rental_provider

        def instruct(kind: str, action: str, target: str) -> str | None:
            needed = {"create_mailbox": "create_mailbox", "delete_mailbox": "delete_mailbox",
                      "add_whitelist": "write_whitelist", "remove_whitelist": "write_whitelist",
                      "create_alias": "create_alias"}.get(action)
            if needed is None or needed in capabilities:
                return None
            return (f"A person does this at the rental (provider {provider}): "
                    f"{action.replace('_', ' ')} {target}. `mailrec plan` on the live systems "
                    "prints the exact instructions.")

        return instruct

    def describe(self, now: datetime | None = None) -> tuple[str, ...]:
        """The plan's "observed:" line: an offline snapshot, its age, and how it was read."""
        now = now or datetime.now(UTC)
        age = max(0, int((now - self.observed_at).total_seconds()))
        hours, rest = divmod(age, 3600)
        taken = self.observed_at.astimezone(UTC).isoformat(timespec="seconds")
        by = f" by {self.source}" if self.source else ""
        return (f"offline snapshot taken {taken}{by}, {hours} h {rest // 60} min ago; "
                "time gates judged at that moment", *self.systems)


def scrub_router(router: RouterFacts | None) -> RouterFacts | None:
    """The router facts without any line that might carry a credential."""
    if router is None:
        return None

    def keep(line: str) -> str:
        return WITHHELD if _SECRET_WORDS.search(line) else line

    return replace(
        router,
        filter_lines={n: keep(line) for n, line in router.filter_lines.items()},
        references={n: tuple(keep(line) for line in lines)
                    for n, lines in router.references.items()},
    )


def capture(*, parts: ObservedParts, view: JournalView, observed_at: datetime, domain: str,
            state_digest: str, systems: tuple[str, ...], rental_provider: str,
            rental_capabilities: frozenset[str], source: str) -> WorldSnapshot:
    from reconciler.drivers.backend import ObservedParts

    clean = ObservedParts(parts.postfix, parts.rental, parts.dns, scrub_router(parts.router),
                          parts.upstream)
    return WorldSnapshot(observed_at=observed_at, domain=domain, state_digest=state_digest,
                         systems=systems, parts=clean, view=view,
                         rental_provider=rental_provider,
                         rental_capabilities=frozenset(rental_capabilities), source=source)


def from_backend(loaded: LoadedState, backend: SystemBackend, view: JournalView,
                 observed_at: datetime, source: str) -> WorldSnapshot:
    """The backend's last observation (`SystemBackend.last_parts`) as a snapshot."""
    parts = backend.last_parts
    if parts is None:
        raise SnapshotError("nothing was observed yet")
    return capture(parts=parts, view=view, observed_at=observed_at,
                   domain=loaded.state.domain, state_digest=loaded.digest,
                   systems=backend.describe(), rental_provider=backend.rental.name,
                   rental_capabilities=frozenset(str(c) for c in backend.rental.capabilities),
                   source=source)


def _adapter() -> Any:
    from pydantic import TypeAdapter

    # Resolves the annotations kept out of this module's import time (TYPE_CHECKING above):
    # pydantic reads the calling frame's names.
    from reconciler.drivers.backend import ObservedParts  # noqa: F401

    return TypeAdapter(WorldSnapshot)


def snapshot_dict(snapshot: WorldSnapshot) -> dict[str, object]:
    data: dict[str, object] = {"kind": SNAPSHOT_KIND, "format_version": SNAPSHOT_VERSION}
    data.update(_adapter().dump_python(snapshot, mode="json"))
    return data


def snapshot_json(snapshot: WorldSnapshot) -> str:
    return json.dumps(snapshot_dict(snapshot), indent=1, sort_keys=True) + "\n"


def parse_snapshot(data: object, where: str) -> WorldSnapshot:
    """A snapshot from parsed JSON: a snapshot itself, or `status --format json` output
    (its "world" key). Anything else is a SnapshotError naming `where`."""
    from pydantic import ValidationError

    if isinstance(data, dict) and "resources" in data:
        if "world" not in data:
            raise SnapshotError(f"{where}: a status JSON without a \"world\" snapshot (made "
                                "by an older mailrec?): take a new one with "
                                "`mailrec status --format json`")
        data = data["world"]
    if not isinstance(data, dict) or data.get("kind") != SNAPSHOT_KIND:
        raise SnapshotError(f"{where}: not a mailrec world snapshot (expected \"kind\": "
                            f"\"{SNAPSHOT_KIND}\"; made by `mailrec status --format json` or "
                            "the daemon's world.json)")
    if data.get("format_version") != SNAPSHOT_VERSION:
        raise SnapshotError(f"{where}: snapshot format_version {data.get('format_version')!r}"
                            f", this mailrec reads {SNAPSHOT_VERSION}")
    body = {k: v for k, v in data.items() if k not in ("kind", "format_version")}
    try:
        snapshot: WorldSnapshot = _adapter().validate_python(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '(top)'}: {error['msg']}"
            for error in exc.errors()[:5])
        raise SnapshotError(f"{where}: not a valid world snapshot: {problems}") from None
    if snapshot.observed_at.tzinfo is None:
        raise SnapshotError(f"{where}: observed_at has no time zone")
    return snapshot


def load_snapshot(path: Path) -> WorldSnapshot:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SnapshotError(f"{path}: not JSON: {exc}") from None
    return parse_snapshot(data, str(path))
