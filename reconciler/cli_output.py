"""Writing a plan file (`mailrec plan --out FILE`) so that a reader, or `mailrec apply FILE`,
sees the old file or the new one, never half of one, and never a file an attacker planted."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(out: Path, text: str) -> None:
    """Write `out` atomically: a temporary file created exclusively (O_EXCL, an
    unpredictable name, mode 0600) in out's directory, fsynced, then renamed over out. A
    symlink planted at out or at any name is replaced, never followed. Raises OSError."""
    directory = out.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a plan holds no secret: the mode a new file gets
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
