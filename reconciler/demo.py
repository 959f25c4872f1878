"""`make run`: the story of DESIGN.md on the local lab, end to end, with real command output.

It creates a lab from `state/` (everyone onprem), starts the lab's services, then edits the
lab's copy of the state the way an admin would commit it, and runs `mailrec` after each
edit: mailboxes and forwarding one user at a time, draining, outbound refused until everyone
receives at the rental, whitelist and router route, the MX TTL gate, the MX move, and the
onprem retirement after the quiet period. Time gates are passed with MAILREC_NOW.

Every command the walk runs is also recorded in `Demo.transcript` under a name (e.g.
`first-plan`), as shown on the screen: `scripts/guide_outputs.py` builds the user guide's
output blocks from it. `--now` starts the clock at a fixed time, so the times shown are the
same on every run.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from reconciler.lab.layout import LabLayout

BOLD, DIM, RESET = "\033[1m", "\033[2m", "\033[0m"


@dataclass(frozen=True)
class Entry:
    """One command of the walk as the screen shows it: the `$` line (without the `$ `), what
    it printed (stdout and stderr, trailing blank lines removed) and its exit code (None for
    an `export` line, which runs nothing)."""

    command: str
    output: str = ""
    exit_code: int | None = None

    def lines(self) -> list[str]:
        """The lines the demo prints for it."""
        shown = [f"$ {self.command}"]
        shown += [f"  {line}" if line else "  " for line in self.output.splitlines()]
        if self.exit_code is not None:
            shown.append(f"  (exit {self.exit_code})")
        return shown


class Demo:
    def __init__(self, lab: Path, state: Path, color: bool, *,
                 now: datetime | None = None) -> None:
        self.lab = lab.resolve()
        self.state = state.resolve()
        self.color = color
        self.now = (now or datetime.now(UTC)).replace(microsecond=0)
        self.layout = LabLayout(self.lab)
        self.transcript: dict[str, Entry] = {}  # name -> the command, in the order run

    def record(self, key: str | None, entry: Entry) -> None:
        if key is None:
            return
        if key in self.transcript:
            raise ValueError(f"demo: transcript key {key!r} used twice")
        self.transcript[key] = entry

    def say(self, text: str) -> None:
        if self.color:
            print(f"\n{BOLD}== {text}{RESET}", flush=True)
        else:
            print(f"\n== {text}", flush=True)

    def export(self, name: str, value: str, *, key: str | None = None) -> None:
        """Show the environment the following commands run with, as a line to paste."""
        entry = Entry(f"export {name}={shlex.quote(value)}")
        print(entry.lines()[0], flush=True)
        self.record(key, entry)

    def mailrec(self, *args: str, expect: int | None = None, key: str | None = None) -> int:
        env = {**os.environ, "MAILREC_LAB": str(self.lab), "MAILREC_NOW": self.now.isoformat(),
               "NO_COLOR": "1"}
        shown = shlex.join(args)  # a line that can be pasted into a shell as it is
        print(f"$ mailrec {shown}", flush=True)
        result = subprocess.run([sys.executable, "-m", "reconciler", *args], env=env,
                                text=True, capture_output=True, check=False)
        out = (result.stdout + result.stderr).rstrip()
        if out:
            print(re.sub(r"^", "  ", out, flags=re.M), flush=True)
        print(f"  (exit {result.returncode})", flush=True)
        self.record(key, Entry(f"mailrec {shown}", out, result.returncode))
        if expect is not None and result.returncode != expect:
            raise SystemExit(f"demo: `mailrec {shown}` exited {result.returncode}, "
                             f"expected {expect}")
        return result.returncode

    def set_user(self, name: str, inbound: str | None = None,
                 outbound: str | None = None) -> None:
        path = self.lab / "state" / "users.yaml"
        text = path.read_text()
        pattern = re.compile(rf"^(\s*{name}:\s*){{inbound: (\w+), outbound: (\w+)}}", re.M)
        match = pattern.search(text)
        if not match:
            raise SystemExit(f"demo: user {name} not found in {path}")
        new = f"{match.group(1)}{{inbound: {inbound or match.group(2)}, " \
              f"outbound: {outbound or match.group(3)}}}"
        path.write_text(text[: match.start()] + new + text[match.end():])
        print(f"{DIM if self.color else ''}# state/users.yaml: {name} -> inbound "
              f"{inbound or match.group(2)}, outbound {outbound or match.group(3)}"
              f"{RESET if self.color else ''}")

    def set_key(self, section: str, key: str, value: str) -> None:
        path = self.lab / "state" / "mailrec.yaml"
        text = path.read_text()
        block = re.search(rf"^{section}:[^\n]*\n((?:[ #].*\n|\n)*)", text, re.M)
        assert block, section
        body = block.group(1)
        new_body = re.sub(rf"^(\s+{key}:\s*)[^#\n]*?(\s*(#.*)?)$", rf"\g<1>{value}\g<2>", body,
                          count=1, flags=re.M)
        path.write_text(text[: block.start(1)] + new_body + text[block.end(1):])
        print(f"# state/mailrec.yaml: {section}.{key} = {value}")

    def drain(self, name: str) -> None:
        """What the user does by hand: fetch the old mailbox until it is empty (IMAP, so the
        Maildir++ folders too: `.Archive/cur` holds mail as much as `new/` does)."""
        maildir = self.layout.onprem_home / name / "Maildir"
        folders = [maildir, *sorted(maildir.glob(".*"))] if maildir.is_dir() else []
        count = 0
        for folder in folders:
            for sub in ("new", "cur"):
                for message in (folder / sub).glob("*") if (folder / sub).is_dir() else []:
                    message.unlink()
                    count += 1
        print(f"# {name} drains the old onprem mailbox over IMAP ({count} message(s))")

    def panel_create(self, name: str) -> None:
        """What the admin does in the rental's control panel (it has no API)."""
        domain = "example.co.jp"
        with self.layout.rental_mailboxes.open("a") as handle:
            handle.write(f"{name}@{domain}\n")
        for sub in ("new", "cur", "tmp"):
            (self.layout.rental_maildirs / name / sub).mkdir(parents=True, exist_ok=True)
        print(f"# the admin creates {name}@{domain} in the rental's control panel")

    def panel_whitelist(self, network: str) -> None:
        """What the admin does in the rental's control panel: the no-AUTH relay whitelist."""
        with self.layout.rental_whitelist.open("a") as handle:
            handle.write(f"{network}\n")
        print(f"# the admin adds {network} to the rental's relay whitelist in the control panel")

    def later(self, delta: timedelta, why: str, *, key: str | None = None) -> None:
        self.now += delta
        print(f"# ... {why}")
        self.export("MAILREC_NOW", self.now.isoformat(), key=key)

    def run(self) -> None:
        users = ["suga", "tanaka", "sato", "suzuki", "takahashi", "watanabe", "ito", "yamamoto"]
        self.say("A lab of example.co.jp before the migration: 8 users, all onprem")
        if self.lab.exists():
            subprocess.run([sys.executable, "-m", "reconciler", "lab", "down", str(self.lab)],
                           capture_output=True, check=False)
            shutil.rmtree(self.lab)
        self.mailrec("lab", "init", str(self.lab), "--state", str(self.state), expect=0,
                     key="lab-init")
        services = self.mailrec("lab", "up", str(self.lab), key="lab-up")
        try:
            self._walk(users)
        finally:
            if services == 0:
                self.mailrec("lab", "down", str(self.lab), key="lab-down")

    def _walk(self, users: list[str]) -> None:
        # Every command below runs with these: shown, so each `$` line can be pasted as it is.
        self.export("MAILREC_LAB", str(self.lab), key="export-lab")
        self.export("MAILREC_NOW", self.now.isoformat(), key="export-now")
        self.mailrec("validate", expect=0, key="validate")
        self.say("First plan: only the router policy route for tcp/25 is not as desired")
        self.mailrec("plan", expect=2, key="first-plan")
        self.mailrec("apply", "--yes", expect=0, key="first-apply")

        self.say("Commit 1: suga receives at the rental")
        self.set_user("suga", inbound="rental")
        self.mailrec("plan", "--format", "markdown", expect=2, key="suga-plan-markdown")
        self.mailrec("apply", "--yes", expect=2, key="suga-apply")
        self.say("The rental's panel has no API: a person creates the mailbox, mailrec checks "
                 "it by SMTP (RCPT TO) and routes")
        self.panel_create("suga")
        self.mailrec("ack", "mailbox/suga", "--note", "created in the panel", expect=0,
                     key="suga-ack-mailbox")
        self.mailrec("apply", "--yes", expect=2, key="suga-apply-routed")
        self.say("suga's old mailbox still holds mail: removing it waits (MR008)")
        self.drain("suga")
        self.mailrec("apply", "--yes", expect=0, key="suga-apply-drained")

        self.say("Commit 2: suga also sends via the rental -- refused, colleagues are onprem")
        self.set_user("suga", outbound="rental")
        self.mailrec("plan", expect=3, key="suga-outbound-plan")
        self.set_user("suga", outbound="onprem")

        self.say("Commit 3: everyone else at once -- more than max_change_pct (MR011)")
        for name in users[1:]:
            self.set_user(name, inbound="rental")
        self.mailrec("plan", expect=3, key="bulk-plan")
        self.say("The admin creates the mailboxes and confirms the bulk move")
        for name in users[1:]:
            self.panel_create(name)
            self.mailrec("ack", f"mailbox/{name}", expect=0, key=f"ack-mailbox-{name}")
        self.mailrec("apply", "--yes", "--allow-bulk", expect=2, key="bulk-apply")
        for name in users[1:]:
            self.drain(name)
        self.mailrec("apply", "--yes", expect=0, key="bulk-apply-drained")

        self.say("Commit 4: outbound via the rental: whitelist the office line, SPF first")
        self.set_key("rental", "whitelist", "[203.0.113.8/29]")
        for name in users:
            self.set_user(name, outbound="rental")
        self.mailrec("apply", "--yes", "--allow-bulk", expect=2, key="outbound-apply")
        self.say("The whitelist is a panel setting: mailrec checks it with a relay probe from the "
                 "office, which the router now sends out through 203.0.113.9")
        self.panel_whitelist("203.0.113.8/29")
        self.mailrec("ack", "whitelist/203.0.113.8/29", "--note", "added in the panel",
                     expect=0, key="whitelist-ack")
        self.mailrec("apply", "--yes", "--allow-bulk", expect=2, key="whitelist-apply")
        self.say("Each person changes the mail client; the admin records it")
        for name in users:
            self.mailrec("ack", f"outbound/{name}", "--note", "client changed", expect=0,
                         key=f"ack-outbound-{name}")
        self.mailrec("status", expect=0, key="status")

        self.say("Commit 5: the MX moves to the rental: the TTL is lowered first (MR004)")
        self.set_key("dns", "mx", "rental")
        self.mailrec("apply", "--yes", expect=2, key="mx-apply")
        self.mailrec("plan", expect=2, key="mx-plan")
        self.later(timedelta(hours=1, minutes=1), "one old TTL later", key="mx-later")
        self.mailrec("apply", "--yes", expect=0, key="mx-apply-moved")

        self.say("Commit 6: retire onprem -- only after the quiet period (MR010)")
        self.set_key("onprem", "state", "retired")
        self.mailrec("plan", expect=2, key="retire-plan")
        self.later(timedelta(hours=49), "two quiet days later", key="retire-later")
        self.mailrec("apply", "--yes", expect=0, key="retire-apply")
        self.mailrec("plan", "--format", "json", expect=0, key="final-plan-json")
        self.say("Done: every user at the rental, MX moved, onprem retired; "
                 "nothing lost or bounced")


def _aware(text: str) -> datetime:
    """An ISO 8601 time with its UTC offset (a time without one would depend on the host)."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give the UTC offset, e.g. +00:00")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lab", type=Path, default=Path("lab"))
    parser.add_argument("--state", type=Path, default=Path("state"))
    parser.add_argument("--now", type=_aware, default=None, metavar="ISO-TIME",
                        help="start the clock here (e.g. 2026-12-02T09:00:00+00:00), not now")
    args = parser.parse_args(argv)
    Demo(args.lab, args.state, sys.stdout.isatty(), now=args.now).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
