"""The clock: real UTC time, or `MAILREC_NOW` (ISO-8601) so time gates are tested without
sleeping; the override applies only where the caller allows it (`--lab` or
`--clock-override`), never silently in production."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


class ClockError(ValueError):
    pass


def wall() -> datetime:
    """The real time, whatever MAILREC_NOW says (for names and stamps, never for gates)."""
    return datetime.now(UTC).replace(microsecond=0)


def overridden() -> str | None:
    """The MAILREC_NOW value, if set."""
    return os.environ.get("MAILREC_NOW", "").strip() or None


def now(*, override: bool = False) -> datetime:
    """The time gates are judged at. MAILREC_NOW moves it only with `override` (a lab, or
    the explicit --clock-override); set without it, it is an error rather than ignored, so a
    test clock leaking into production stops the command instead of opening a gate."""
    fixed = overridden()
    if not fixed:
        return wall()
    if not override:
        raise ClockError(
            f"MAILREC_NOW={fixed!r} is set: it moves the clock of time gates only with --lab "
            "DIR or --clock-override (production gates use the real clock); unset it"
        )
    try:
        stamp = datetime.fromisoformat(fixed.replace("Z", "+00:00"))
    except ValueError:
        raise ClockError(f"MAILREC_NOW={fixed!r} is not an ISO-8601 time") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def for_run(override: bool) -> Clock:
    """The clock of one command: `now` with its permission fixed."""
    return lambda: now(override=override)
