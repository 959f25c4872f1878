"""Build, in seconds, a lab of N users in the middle of a migration, usable by the real CLI.

`mailrec lab init` writes one map entry at a time through the lab driver (fine for the demo's
8 users, minutes for 10,000). Here `lab init` builds the lab from a small state (the repo's
mailrec.yaml, no users), then the big files are written directly, in the formats the lab
drivers read:

- onprem: passwd (N - N/2 accounts, the users still onprem), their Maildirs, the three managed
  maps (`mailrec_transport`, `mailrec_recipients`, `mailrec_virtual`) forwarding the first
  half under every local name exactly as mailrec writes them, and main.cf naming the maps;
- rental: the mailbox list and Maildirs of the first half;
- state: DIR/state/users.yaml with N users: 50% inbound at the rental already, 10% more moving
  now (this commit), the rest onprem; outbound onprem for everyone;
- journal: what a real run would have recorded (`mailrec/baseline`: the first apply saw no
  migration, so every mail client still sends via onprem; an ok `onprem/forward-probe` to the
  state's `smtp:[rental.smtp_host]:relay_port`), so the plan is the interesting one: the
  moving users' mailboxes, routes and drained old mailboxes ready or gated, nothing refused
  for a missing journal fact.

Every other moving user keeps one message in the old Maildir (their `onprem-mailbox/USER` is
gated on the drain). `python bench/labgen.py DIR --users N` builds one to look at;
`mailrec plan --lab DIR` plans it (exit 2). The pieces (names, the split, the forward maps,
the Maildirs, the journal) are shared with bench/realhost.py, which puts the same onprem data
on a real Postfix.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from reconciler import clock
from reconciler.drivers.lab_onprem import LabOnprem
from reconciler.drivers.postfix import (
    RECIPIENT_MAP,
    TRANSPORT_MAP,
    VIRTUAL_MAP,
    format_map,
    forward_keys,
    recipient_map_ref,
    relay_target,
    transport_map_ref,
    virtual_map_ref,
)
from reconciler.journal import Journal
from reconciler.lab.init import init_lab
from reconciler.lab.layout import LabLayout
from reconciler.load import load_state
from reconciler.observe import BASELINE

REPO = Path(__file__).resolve().parent.parent
BASE_STATE = REPO / "state"
FIRST_UID = 1001
SYSTEM_PASSWD = (
    "root:x:0:0:root:/root:/bin/bash",
    "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin",
    "mail:x:8:8:mail:/var/mail:/usr/sbin/nologin",
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin",
    "postfix:x:107:113::/var/spool/postfix:/usr/sbin/nologin",
)


@dataclass(frozen=True)
class Split:
    """The N users of a bench lab and where each stands in the migration."""

    names: tuple[str, ...]
    migrated: frozenset[str]  # inbound at the rental already (forwarded, mailbox there)
    moving: frozenset[str]  # inbound: rental in this commit, still onprem in the world

    @staticmethod
    def of(n: int) -> Split:
        names = tuple(f"u{i:06d}" for i in range(n))
        half = n // 2
        return Split(names, frozenset(names[:half]),
                     frozenset(names[half:half + max(1, n // 10)]))

    @property
    def onprem(self) -> tuple[str, ...]:
        """Users with an onprem account and mailbox (everyone not migrated yet)."""
        return tuple(n for n in self.names if n not in self.migrated)

    def messages(self, name: str) -> int:
        """Messages left in the old mailbox: one for every other moving user (gated on the
        drain), none elsewhere."""
        if name not in self.moving:
            return 0
        return 1 if int(name[1:]) % 2 == 0 else 0

    def inbound(self, name: str) -> str:
        return "rental" if name in self.migrated or name in self.moving else "onprem"

    def users_yaml(self) -> str:
        return "users:\n" + "".join(
            f"  {u}: {{inbound: {self.inbound(u)}, outbound: onprem}}\n" for u in self.names)

    def users_json(self) -> str:
        """The same users as JSON (for the reference floor, bench/floor.py)."""
        return json.dumps({u: {"inbound": self.inbound(u), "outbound": "onprem"}
                           for u in self.names})


@dataclass(frozen=True)
class BenchLab:
    layout: LabLayout
    split: Split
    domain: str
    forward_target: str  # smtp:[host]:port, as the state's rental names it

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def state_dir(self) -> Path:
        return self.layout.root / "state"

    @property
    def users_json(self) -> Path:
        return self.layout.root / "bench-users.json"

    @property
    def transport_map(self) -> Path:
        return self.layout.postfix_dir / TRANSPORT_MAP


def forward_maps(users: Iterable[str], domain: str, names: Sequence[str],
                 target: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """The managed maps as mailrec's `inbound/USER` leaves them for each user: every local
    name accepted (recipients), rewritten to user@domain (virtual) and forwarded (transport)."""
    transport: dict[str, str] = {}
    recipients: dict[str, str] = {}
    virtual: dict[str, str] = {}
    for user in users:
        keys = forward_keys(user, domain, names)
        for key in keys:
            transport[key] = target
            recipients[key] = "OK"
        for key in keys[1:]:
            virtual[key] = f"{user}@{domain}"
    return transport, recipients, virtual


def write_maps(directory: Path, maps: tuple[dict[str, str], dict[str, str], dict[str, str]]
               ) -> None:
    for name, entries in zip((TRANSPORT_MAP, RECIPIENT_MAP, VIRTUAL_MAP), maps, strict=True):
        (directory / name).write_text(format_map(entries, name))


def write_maildirs(homes: Path, split: Split) -> None:
    """home/USER/Maildir/{new,cur,tmp} for every onprem user, with the drain messages."""
    for name in split.onprem:
        maildir = homes / name / "Maildir"
        for sub in ("new", "cur", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        for number in range(split.messages(name)):
            (maildir / "new" / f"1700000000.M{number}P1.bench").write_text(
                f"From: customer@example.net\nTo: {name}\nSubject: left to drain\n\nhello\n")


def passwd_lines(split: Split, homes: str, first_uid: int = FIRST_UID) -> list[str]:
    """passwd entries of the onprem users (homes under `homes`), uids from `first_uid` up:
    50,000 of them stay below Debian's UID_MAX (60000) from 1001, so all count as people."""
    return [f"{name}:x:{first_uid + index}:{first_uid + index}::{homes}/{name}:/bin/bash"
            for index, name in enumerate(split.onprem)]


def record_history(journal_dir: Path, forward_target: str, when: datetime) -> None:
    """What a real run of mailrec would have recorded before this commit: the baseline (its
    first apply saw no migration: every mail client sent via onprem), and the probe of the
    forward path before the first user was forwarded."""
    journal = Journal(journal_dir)
    try:
        journal.record(when, "observe", BASELINE, "noted",
                       detail={"note": "recorded by bench/labgen.py"})
        journal.record(when, "apply", "onprem/forward-probe", "ok",
                       detail={"target": forward_target})
    finally:
        journal.close()


def small_state(directory: Path, main_yaml: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mailrec.yaml").write_text(main_yaml)
    (directory / "users.yaml").write_text("users: {}\n")
    return directory


def build_lab(root: Path, n: int, *, base_state: Path = BASE_STATE) -> BenchLab:
    """A lab of `n` users in DIR `root` (replaced if it is a lab already)."""
    main_yaml = (base_state / "mailrec.yaml").read_text()
    seed_dir = small_state(root.parent / f".{root.name}-seed", main_yaml)
    try:
        layout = init_lab(root, load_state(seed_dir), migrated=False, force=True)
    finally:
        shutil.rmtree(seed_dir, ignore_errors=True)
    split = Split.of(n)
    (layout.root / "state" / "users.yaml").write_text(split.users_yaml())
    loaded = load_state(layout.root / "state")
    state = loaded.state
    domain = state.domain
    config_dir = state.onprem.config_dir
    target = relay_target(state.rental.smtp_host, state.rental.relay_port)

    passwd = [*SYSTEM_PASSWD, *passwd_lines(split, "/home")]
    (layout.onprem / "etc" / "passwd").write_text("\n".join(passwd) + "\n")
    write_maildirs(layout.onprem_home, split)
    # Every local name, as the lab driver reads it from main.cf's mydestination.
    names = LabOnprem(layout, domain, config_dir)._local_names()
    write_maps(layout.postfix_dir, forward_maps(sorted(split.migrated), domain, names, target))
    main_cf = layout.postfix_dir / "main.cf"
    text = main_cf.read_text()
    old = "local_recipient_maps = proxy:unix:passwd.byname $alias_maps"
    if old not in text:
        raise RuntimeError(f"{main_cf}: no `{old}` line to extend (lab init changed?)")
    main_cf.write_text(text.replace(old, (
        f"{old} {recipient_map_ref(config_dir)}\n"
        f"transport_maps = {transport_map_ref(config_dir)}\n"
        f"virtual_alias_maps = {virtual_map_ref(config_dir)}")))

    layout.rental_mailboxes.write_text("".join(f"{u}@{domain}\n" for u in sorted(split.migrated)))
    for name in split.migrated:
        for sub in ("new", "cur", "tmp"):
            (layout.rental_maildirs / name / sub).mkdir(parents=True, exist_ok=True)

    record_history(layout.journal_dir, target, clock.now(override=True))
    lab = BenchLab(layout, split, domain, target)
    lab.users_json.write_text(split.users_json())
    return lab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--users", type=int, default=10_000)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    lab = build_lab(args.directory, args.users)
    print(f"lab of {args.users:,} users in {lab.root} ({time.perf_counter() - start:.1f} s): "
          f"mailrec plan --lab {lab.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
