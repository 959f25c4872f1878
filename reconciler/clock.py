"""The clock: real UTC time, or `MAILREC_NOW` (ISO-8601) so time gates are tested without
sleeping."""

from __future__ import annotations

import os
from datetime import UTC, datetime


class ClockError(ValueError):
    pass


def now() -> datetime:
    fixed = os.environ.get("MAILREC_NOW")
    if not fixed:
        return datetime.now(UTC).replace(microsecond=0)
    try:
        stamp = datetime.fromisoformat(fixed.replace("Z", "+00:00"))
    except ValueError:
        raise ClockError(f"MAILREC_NOW={fixed!r} is not an ISO-8601 time") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
