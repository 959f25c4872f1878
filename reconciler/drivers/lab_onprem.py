"""The lab's onprem Postfix: the same files a real host has (main.cf, map sources, passwd,
Maildirs, the mail log) under `<lab>/onprem`, read with the real parsers.

A change writes the files atomically with a `.bak` of the previous content, as the SSH driver
does on a real host; there is no `postmap`/`postfix reload` to run in the lab.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from reconciler.drivers.postfix import (
    RECIPIENT_MAP,
    TRANSPORT_MAP,
    PostfixError,
    PostfixFacts,
    edit_map,
    parse_main_cf,
    parse_map,
    parse_passwd,
    recipient_map_ref,
    relay_target,
    set_main_cf,
    transport_map_ref,
    users_in_map,
    with_map,
)
from reconciler.drivers.postfix_log import last_mail_seen
from reconciler.drivers.postfix_mailbox import count_maildir
from reconciler.lab.layout import LabLayout
from reconciler.model import USER_NAME_RE


def write_atomic(path: Path, text: str, *, backup: bool = True) -> None:
    """Temp file in the same directory, fsync, keep a .bak, rename over: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if backup and path.exists():
            shutil.copy2(path, path.with_name(path.name + ".bak"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LabOnprem:
    def __init__(self, layout: LabLayout, domain: str, config_dir: str = "/etc/postfix") -> None:
        self.layout = layout
        self.domain = domain
        self.config_dir = config_dir  # as main.cf names it on the (pretend) host

    @property
    def _etc(self) -> Path:
        return self.layout.postfix_dir

    def _passwd_path(self) -> Path:
        return self.layout.onprem / "etc" / "passwd"

    def _home(self, home: Path) -> Path:
        # Homes are absolute paths on the pretend host; in the lab they live under onprem/.
        return self.layout.onprem / home.relative_to("/")

    def observe(self, now: datetime) -> PostfixFacts:
        try:
            main_cf = parse_main_cf((self._etc / "main.cf").read_text())
            passwd = parse_passwd(self._passwd_path().read_text())
        except FileNotFoundError as exc:
            raise PostfixError(
                f"lab onprem: {exc.filename} is missing (run mailrec lab init)"
            ) from None
        transport = parse_map(self._read(TRANSPORT_MAP))
        recipients = parse_map(self._read(RECIPIENT_MAP))
        accounts = {
            name: count_maildir(self._home(home) / "Maildir") for name, home in passwd.items()
        }
        log = self.layout.onprem_maillog
        return PostfixFacts(
            accounts=accounts,
            transport=users_in_map(transport, self.domain),
            recipients=users_in_map(recipients, self.domain),
            recipient_validation=recipient_map_ref(self.config_dir)
            in main_cf.get("local_recipient_maps", "").replace(",", " ").split(),
            last_mail_at=last_mail_seen(log.read_text(), now) if log.exists() else None,
            retired=self.layout.onprem_retired.exists(),
        )

    def _read(self, name: str) -> str:
        path = self._etc / name
        return path.read_text() if path.exists() else ""

    def _update_map(self, name: str, user: str, value: str | None) -> None:
        if not USER_NAME_RE.match(user):
            raise PostfixError(f"refusing unsafe user name {user!r}")
        text = edit_map(self._read(name), {f"{user}@{self.domain}": value}, name)
        write_atomic(self._etc / name, text)

    def route_to_rental(self, user: str, smtp_host: str, port: int) -> None:
        # Accept first, then forward: at no moment is a forwarded user answered 550 (MR007).
        self._update_map(RECIPIENT_MAP, user, "OK")
        self._update_map(TRANSPORT_MAP, user, relay_target(smtp_host, port))

    def route_to_onprem(self, user: str) -> None:
        self._update_map(TRANSPORT_MAP, user, None)
        self._update_map(RECIPIENT_MAP, user, None)

    def enable_recipient_map(self) -> None:
        main_cf_path = self._etc / "main.cf"
        text = main_cf_path.read_text()
        params = parse_main_cf(text)
        current = params.get("local_recipient_maps", "proxy:unix:passwd.byname $alias_maps")
        text = set_main_cf(
            text, "local_recipient_maps", with_map(current, recipient_map_ref(self.config_dir))
        )
        transport = params.get("transport_maps", "")
        text = set_main_cf(
            text, "transport_maps", with_map(transport, transport_map_ref(self.config_dir))
        )
        write_atomic(main_cf_path, text)

    def remove_mailbox(self, user: str) -> None:
        passwd_path = self._passwd_path()
        homes = parse_passwd(passwd_path.read_text())
        if user not in homes:
            return
        maildir = self._home(homes[user]) / "Maildir"
        held = count_maildir(maildir)
        if held:
            raise PostfixError(f"the onprem mailbox of {user} still holds {held} message(s)")
        lines = [
            line for line in passwd_path.read_text().splitlines()
            if line.split(":", 1)[0] != user
        ]
        write_atomic(passwd_path, "\n".join(lines) + "\n")
        shutil.rmtree(self._home(homes[user]), ignore_errors=True)

    def retire(self) -> None:
        write_atomic(self.layout.onprem_retired, "retired by mailrec\n", backup=False)
