"""Onprem mailboxes on a real host: where each user's mailbox is (`onprem.mailbox`), and the
one command that counts the mail in all of them (DESIGN.md 2: never one command per user).

Mail is counted wherever a Maildir keeps it: `new/`, `cur/` and every Maildir++ folder's
(`Maildir/.Archive/cur`, `Maildir/.Sent.2024/new`); dot files and `tmp/` are not messages. An
mbox holds mail when it is not empty.

Used by `postfix_host.PostfixHost.observe`; pure apart from `count_mailboxes`, which runs the
scan over a `Transport`, and `count_maildir`, which counts a local Maildir the same way (the
lab).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from reconciler.drivers.postfix import PostfixError
from reconciler.transport import Transport, TransportError, UnsafePathError, safe_path

_STATUS_TAG: Final = "mailrec-find-status"
# The mailbox scan, run as `sh -c SCRIPT mailrec-scan START... -- FIND-EXPRESSION...`. The
# script is a constant; the paths and patterns arrive as positional parameters, so nothing a
# host returns (a home directory) is ever parsed by a shell. It keeps only the start points
# that are directories (an account whose home does not exist has no mail, and must not make
# the whole observation fail), then counts on the host, one line per directory instead of one
# per message, and appends find's exit status so a partial listing is never taken as complete.
SCAN_SCRIPT: Final = f"""\
n=$#; starts=0; expr=0
while [ "$n" -gt 0 ]; do
  a=$1; shift; n=$((n - 1))
  if [ "$expr" = 1 ]; then set -- "$@" "$a"
  elif [ "$a" = -- ]; then expr=1
  elif [ -d "$a" ]; then set -- "$@" "$a"; starts=$((starts + 1))
  fi
done
if [ "$starts" = 0 ]; then echo "1 {_STATUS_TAG} 0"; exit 0; fi
{{ find -L "$@"; echo "{_STATUS_TAG} $?"; }} | uniq -c
"""
_GLOB_CHARS: Final = frozenset("*?[]\\")
_MESSAGE_DIRS: Final = ("new", "cur")


@dataclass(frozen=True)
class MailboxSpec:
    """`onprem.mailbox`: `maildir:~/Maildir`, `maildir:/var/vmail/{user}/Maildir` or
    `mbox:/var/mail/{user}`; `~` is the account's home from passwd."""

    kind: Literal["maildir", "mbox"]
    template: str

    @staticmethod
    def parse(spec: str) -> MailboxSpec:
        kind, _, template = spec.partition(":")
        template = template.rstrip("/") or template
        if kind not in ("maildir", "mbox"):
            raise PostfixError(f"onprem.mailbox {spec!r}: use maildir:PATH or mbox:PATH")
        if _GLOB_CHARS & set(template) or "\n" in template:
            raise PostfixError(f"onprem.mailbox {spec!r}: no glob characters or newlines")
        home_relative = template == "~" or template.startswith("~/")
        if not home_relative and "{user}" not in template:
            raise PostfixError(
                f"onprem.mailbox {spec!r}: a path must start with ~/ (the user's home) or "
                "contain {user}"
            )
        # Normalised (no '.', '..', '//'), with any home or user name put in.
        example = "/home/u" + template[1:] if home_relative else template.replace("{user}", "u")
        try:
            safe_path(example)
        except UnsafePathError as exc:
            raise PostfixError(f"onprem.mailbox {spec!r}: {exc}") from None
        return MailboxSpec("maildir" if kind == "maildir" else "mbox", template)

    @property
    def home_relative(self) -> bool:
        return self.template == "~" or self.template.startswith("~/")

    def path_for(self, user: str, home: str) -> str:
        """The user's mailbox on the host (a Maildir directory or an mbox file)."""
        if self.home_relative:
            path = home.rstrip("/") + self.template[1:]
        else:
            path = self.template.replace("{user}", user)
        return safe_path(path)

    def scan_argv(self, homes: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
        """The one command that counts every listed user's mail, and what its lines mean.

        Returns the argv and a map from the path each output line names (a Maildir's
        new/ or cur/, or an mbox file) to the user it belongs to; a Maildir++ folder's
        new/ or cur/ (`Maildir/.Archive/cur`) is mapped by `parse_scan` through its Maildir.
        The start points are the directories the mailboxes hang off (e.g. /home for
        ~/Maildir, /var/mail for /var/mail/{user}); `-mindepth`/`-maxdepth` pin the depth, so
        find reads no deeper than the messages: a Maildir's `new/*` and `cur/*` at depth D,
        a folder's `.NAME/new/*` and `.NAME/cur/*` at D + 1 (Maildir++ folders are flat:
        `.a.b` is one directory). Dot files and tmp/ are not messages.
        """
        owners: dict[str, str] = {}
        starts: set[str] = set()
        if self.home_relative:
            rel = [p for p in self.template[2:].split("/") if p]
            depth = 1 + len(rel)  # the home below its parent, then the path inside it
            for home in homes.values():
                starts.add(posixpath.dirname(safe_path(home.rstrip("/") or "/")))
        else:
            parts = self.template.split("/")
            index = next(i for i, p in enumerate(parts) if "{user}" in p)
            starts.add(safe_path("/".join(parts[:index]) or "/"))
            depth = len(parts) - index
        for user, home in homes.items():
            location = self.path_for(user, home)
            if self.kind == "maildir":
                owners[location + "/new"] = user
                owners[location + "/cur"] = user
            else:
                owners[location] = user
        last = self.template.rsplit("/", 1)[-1]
        leaf = "*" if "{user}" in last or last == "~" else last
        deepest = depth
        if self.kind == "maildir":
            depth += 2  # new/ or cur/, then the message file
            deepest = depth + 1  # .FOLDER/, new/ or cur/, then the message file
            test = ["(", "-path", f"*/{leaf}/new/*", "-o", "-path", f"*/{leaf}/cur/*",
                    "-o", "-path", f"*/{leaf}/.*/new/*", "-o", "-path", f"*/{leaf}/.*/cur/*",
                    ")", "!", "-name", ".*", "-printf", "%h\\n"]
        else:
            test = ["-path", f"*/{leaf}", "-printf", "%s %p\\n"]
        argv = [
            "sh", "-c", SCAN_SCRIPT, "mailrec-scan", *sorted(starts), "--",
            "-mindepth", str(depth), "-maxdepth", str(deepest), "-type", "f", *test,
        ]
        return argv, owners


def parse_scan(output: str, kind: str, owners: Mapping[str, str]) -> dict[str, int]:
    """Messages per user from the scan's `uniq -c` lines (`COUNT DIR` for Maildirs,
    `1 SIZE FILE` for mboxes) and its final `N mailrec-find-status S` line.

    An mbox counts as one message when it is not empty: its size is read, not its content
    (counting `From ` lines would read every mailbox on every observation), and "holds
    mail" is what the drain gate and MR008 need. Raises PostfixError when find failed.
    """
    counts: dict[str, int] = {}
    status: int | None = None
    for line in output.splitlines():
        number, _, payload = line.strip().partition(" ")
        if not number.isdigit():
            continue
        if payload.startswith(_STATUS_TAG + " "):
            code = payload[len(_STATUS_TAG) + 1 :].strip()
            status = int(code) if code.isdigit() else 255
            continue
        if kind == "mbox":
            size, _, payload = payload.partition(" ")
            amount = 1 if size.isdigit() and int(size) > 0 else 0
        else:
            amount = int(number)
        user = owners.get(payload)
        if user is None and kind == "maildir":
            user = owners.get(_maildir_of_folder(payload))
        if user is not None:
            counts[user] = counts.get(user, 0) + amount
    if status is None:
        raise PostfixError("the mailbox scan ended early (no status line): output incomplete")
    if status != 0:
        raise PostfixError(f"the mailbox scan (find) exited {status}: counts incomplete")
    return counts


def _maildir_of_folder(directory: str) -> str:
    """`/home/a/Maildir/.Archive/cur` -> `/home/a/Maildir/cur`: the key `owners` has for the
    Maildir a Maildir++ folder belongs to ("" when `directory` is no folder's new/ or cur/).
    Only the shape is checked here; the owners map decides whether it is a mailbox."""
    folder, sub = posixpath.split(directory)
    maildir, name = posixpath.split(folder)
    if sub not in ("new", "cur") or not name.startswith(".") or name in (".", ".."):
        return ""
    return f"{maildir}/{sub}"


def _count_messages(directory: str) -> int:
    """The files in one new/ or cur/ (dot files are not messages): one scandir, no stat
    (the entry's type comes with the listing; only a symlink is followed)."""
    try:
        with os.scandir(directory) as entries:
            return sum(1 for e in entries if not e.name.startswith(".") and e.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return 0


def count_maildir(path: str | os.PathLike[str]) -> int:
    """Messages in a local Maildir, as the scan counts them on a host: the files (not dot
    files) in `new/` and `cur/`, and in every Maildir++ folder's `.NAME/new/` and
    `.NAME/cur/`; `tmp/` holds deliveries in progress, not messages.

    One scandir of the Maildir finds new/, cur/ and the folders (a directory, or a symlink
    to one), then one per directory that holds messages: no Path built, no file stat'ed."""
    base = os.fspath(path)
    try:
        with os.scandir(base) as entries:
            found = [(e.name, e.path) for e in entries
                     if (e.name in _MESSAGE_DIRS or e.name.startswith(".")) and e.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return 0  # no Maildir (or not a directory): no new/, cur/ or folder either
    total = 0
    for name, directory in found:
        if name in _MESSAGE_DIRS:
            total += _count_messages(directory)
        else:  # a Maildir++ folder
            total += _count_messages(directory + "/new") + _count_messages(directory + "/cur")
    return total


def count_mailboxes(transport: Transport, spec: MailboxSpec,
                    homes: Mapping[str, str]) -> dict[str, int]:
    """Messages held per key of `homes` (user -> home directory), in one command."""
    if not homes:
        return {}
    try:
        argv, owners = spec.scan_argv(homes)
    except UnsafePathError as exc:
        raise PostfixError(f"cannot count onprem mailboxes: {exc}") from None
    try:
        result = transport.run(argv)
    except TransportError as exc:
        raise PostfixError(f"count onprem mailboxes: {exc}") from exc
    try:
        counts = parse_scan(result.text, spec.kind, owners)
    except PostfixError as exc:
        detail = transport.mask(result.stderr.decode("utf-8", "replace").strip())
        raise PostfixError(f"{transport.host}: {exc}: {detail[-400:]}") from None
    return {user: counts.get(user, 0) for user in homes}
