"""`make bench`, part 4: the daemon on the e2e harness's real servers (tests/e2e/).

Onprem is a real Postfix behind real sshd, DNS a real BIND changed over RFC 2136 + TSIG, the
rental a real Postfix + Dovecot managed over SSH, the router the RTX emulator over SSH
(root: `make services` installs them). Measured:

- commit-to-applied: a commit moving one user's inbound is pushed to the bare repo the
  daemon follows; the time until the daemon's log says `inbound/<user>` was applied and
  verified (median and spread of --commits commits, one user each);
- one observation of the whole world as `mailrec plan --timings` prints it: time and round
  trips per host, on the same servers.

Nothing here fails on time. Root only; prints why when the servers cannot run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.e2e.story import Story, StoryConfig  # noqa: E402
from tests.integration.services import ServiceUnavailable  # noqa: E402


def _applied_at(story: Story, step: str, after: float) -> float | None:
    path = story.dir / "daemon.log"
    for raw in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if line.get("step") == step and line.get("status") == "ok":
            at = datetime.fromisoformat(str(line["ts"]).replace("Z", "+00:00")).timestamp()
            if at >= after:
                return at
    return None


def measure(commits: int, work: Path) -> tuple[list[float], str]:
    story = Story(work, StoryConfig(users=commits, messages=0, rate=1.0, fault="bench"))
    latencies: list[float] = []
    timings = ""
    try:
        story.setup()
        story.wait("first round", lambda b: b["summary"]["in_sync"])
        for user in story.t.users:
            story.edit_users([user], inbound="rental")
            pushed = time.time()
            story.commit(f"move {user}")
            story.wait(f"inbound/{user}",
                       lambda b, user=user: story.user_row(b, user).get("inbound") == "rental")
            applied = _applied_at(story, f"inbound/{user}", pushed)
            if applied is not None:
                latencies.append(applied - pushed)
        result = subprocess.run(
            [sys.executable, "-m", "reconciler", "plan", "--timings", "--state",
             str(story.state)], cwd=story.work, env=story.env(), capture_output=True,
            text=True, check=False)
        timings = result.stderr
    finally:
        story.stop_daemon()
        story.sender.stop()
        story.receiver.stop()
        if story.topology is not None:
            story.topology.stop()
    return latencies, timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=20)
    args = parser.parse_args(argv)
    console = Console()
    console.print(f"[dim]the daemon on the e2e servers: {args.commits} commits ...[/dim]")
    with tempfile.TemporaryDirectory(prefix="mailrec-e2e-bench-") as tmp:
        try:
            latencies, timings = measure(args.commits, Path(tmp))
        except ServiceUnavailable as exc:
            console.print(f"e2e bench skipped: {exc}")
            return 0
    table = Table(title="mailrec daemon on real servers (tests/e2e): commit to applied")
    for column in ("commits", "median", "min", "max"):
        table.add_column(column, justify="right")
    if latencies:
        table.add_row(str(len(latencies)), f"{statistics.median(latencies):.2f} s",
                      f"{min(latencies):.2f} s", f"{max(latencies):.2f} s")
    console.print(table)
    console.print("commit to applied: push of a commit moving one user -> the daemon's log "
                  "line `inbound/<user> ok` (fetch, parse, observe every host, plan, create "
                  "the rental mailbox, forward, each verified by observing again)")
    console.print("one observation of the real servers (`mailrec plan --timings`):")
    console.print(timings.rstrip() or "(none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
