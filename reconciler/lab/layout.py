"""Where each lab system keeps its files (shared by lab init, the lab drivers and emulators).

The files use the formats of the real systems (Postfix main.cf and map sources, Maildirs,
a BIND zone file, RTX `show config` text), so the real drivers' parsers read them too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LAB_MARKER = ".mailrec-lab"
LAB_MARKER_TEXT = "mailrec lab: `mailrec lab init --force` may delete this directory\n"


@dataclass(frozen=True)
class LabLayout:
    root: Path

    # --- onprem Postfix -------------------------------------------------------------
    @property
    def onprem(self) -> Path:
        return self.root / "onprem"

    @property
    def postfix_dir(self) -> Path:  # main.cf, transport, local_recipients, relay_recipients
        return self.onprem / "etc" / "postfix"

    @property
    def onprem_home(self) -> Path:  # home/<user>/Maildir/{new,cur,tmp}
        return self.onprem / "home"

    @property
    def onprem_maillog(self) -> Path:
        return self.onprem / "var" / "log" / "mail.log"

    @property
    def onprem_retired(self) -> Path:  # marker written when onprem is retired
        return self.onprem / "RETIRED"

    # --- rental ---------------------------------------------------------------------
    @property
    def rental(self) -> Path:
        return self.root / "rental"

    @property
    def rental_domains(self) -> Path:  # one accepted domain per line
        return self.rental / "domains"

    @property
    def rental_mailboxes(self) -> Path:  # one "local@domain" per line
        return self.rental / "mailboxes"

    @property
    def rental_aliases(self) -> Path:  # "name@domain: member@domain, member@other" per line
        return self.rental / "aliases"

    @property
    def rental_whitelist(self) -> Path:  # one CIDR per line: relay without auth allowed from
        return self.rental / "whitelist"

    @property
    def rental_passwd(self) -> Path:  # "local@domain:password" for submission AUTH (lab only)
        return self.rental / "passwd"

    @property
    def rental_maildirs(self) -> Path:  # maildirs/<local>/{new,cur,tmp}
        return self.rental / "maildirs"

    @property
    def rental_log(self) -> Path:  # one JSON object per SMTP transaction
        return self.rental / "smtp.log"

    # --- DNS, router, services --------------------------------------------------------
    def zone_file(self, domain: str) -> Path:
        return self.root / "dns" / f"db.{domain}"

    @property
    def router_config(self) -> Path:
        return self.root / "router" / "config.txt"

    @property
    def router_dir(self) -> Path:
        return self.root / "router"

    @property
    def services(self) -> Path:
        return self.root / "services.json"

    @property
    def journal_dir(self) -> Path:
        return self.root / ".mailrec"

    @property
    def lab_json(self) -> Path:  # metadata written by `lab init` (domain, addresses)
        return self.root / "lab.json"

    @property
    def marker(self) -> Path:  # written first by `lab init`: only a marked lab may be replaced
        return self.root / LAB_MARKER

    def is_marked(self) -> bool:
        """True if `lab init` made this directory (so `lab init --force` may replace it)."""
        try:
            return (self.marker.is_file() and not self.marker.is_symlink()
                    and self.marker.read_text() == LAB_MARKER_TEXT)
        except (OSError, UnicodeDecodeError):
            return False

    def read_services(self) -> dict[str, str]:
        if not self.services.exists():
            return {}
        data = json.loads(self.services.read_text())
        return {str(k): str(v) for k, v in data.items()}

    def exists(self) -> bool:
        return self.lab_json.exists()
