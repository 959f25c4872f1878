"""The daemon's log lines: one line per change or error, in text or JSON, with the commit
id; URL credentials redacted; the libraries' per-connection chatter held at WARNING."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO

log = logging.getLogger("mailrec.daemon")

LOG_FORMATS = ("text", "json")
# Loggers held at WARNING while the daemon runs: SSH/HTTP/git libraries' per-connection lines,
# and mailrec's own drivers and transports, which log every command and write at INFO/DEBUG
# (the daemon logs the step those belong to, once).
QUIET_LOGGERS = ("paramiko", "invoke", "urllib3", "git", "watchfiles", "reconciler")
SHORT = 12  # characters of a commit id (or a state digest) in the logs
# The fixed keys of a JSON log line, always present (null when not applicable).
JSON_KEYS = ("ts", "level", "logger", "event", "commit", "step", "status", "message", "detail")
_URL_USERINFO = re.compile(r"\b((?:https?|ftp)://)[^/\s@]+@|\b(\w[\w+.-]*://[^/\s:@]+):[^/\s@]+@")


def redact(text: str) -> str:
    """URL credentials out of a line: all user info of an http(s) URL (a token is often the
    user name), the password of any other scheme's (ssh://git@host keeps its user)."""
    return _URL_USERINFO.sub(
        lambda m: f"{m.group(1)}***@" if m.group(1) else f"{m.group(2)}:***@", text)


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """`TS LEVEL EVENT [COMMIT] MESSAGE`, one line (a multi-line message is joined with " | ")."""

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None) or record.name
        commit = getattr(record, "commit", None)
        message = " | ".join(redact(record.getMessage()).splitlines())
        line = f"{_timestamp(record)} {record.levelname} {event}"
        if commit:
            line += f" [{commit}]"
        line += f" {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the keys of `JSON_KEYS`."""

    def format(self, record: logging.LogRecord) -> str:
        message = redact(record.getMessage())
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        line: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or "log",
        }
        for key in ("commit", "step", "status"):
            line[key] = getattr(record, key, None)
        line["message"] = message
        line["detail"] = getattr(record, "detail", None)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(log_format: str = "text",
                      stream: IO[str] | None = None) -> Callable[[], None]:
    """The daemon's log output on the root logger (stderr by default), the libraries quiet;
    returns the function that puts everything back as it was."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    quiet = [logging.getLogger(name) for name in QUIET_LOGGERS]
    saved = [(logger, logger.level) for logger in (root, log, *quiet)]
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # any other library: warnings and errors only
    log.setLevel(logging.INFO)
    for logger in quiet:
        logger.setLevel(logging.WARNING)

    def restore() -> None:
        root.removeHandler(handler)
        handler.flush()
        for logger, level in saved:
            logger.setLevel(level)

    return restore
