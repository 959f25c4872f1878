"""What `mailrec plan` does, with the onprem Postfix over SSH and the other systems from a lab.

`mailrec plan --lab DIR` makes every system the lab's; without `--lab` the lab rental provider
and the zone-file DNS refuse to run (reconciler/drivers/backend.py). This script is the
CLI's plan path (load_state -> SystemBackend -> observe_and_plan -> render_text, the exit
code of the plan) with one difference: the backend's onprem driver is the real one
(`SystemBackend._open_onprem`: `onprem.connect` over SSH, MAILREC_KNOWN_HOSTS and
MAILREC_SSH_KEY), while DNS, the rental and the router are the lab's files. The journal is the
state's (`STATE/.mailrec`), as for `mailrec plan --state STATE`. With `--round-trips` it
prints on stderr how many operations the onprem observation cost
(`Transport.round_trips`: commands, file reads and writes).

    python bench/realplan.py --state STATE --lab LAB [--round-trips]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from reconciler import clock
from reconciler.apply import observe_and_plan
from reconciler.drivers.backend import SystemBackend
from reconciler.journal import Journal
from reconciler.lab.layout import LabLayout
from reconciler.load import load_state
from reconciler.render import render_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--lab", type=Path, required=True)
    parser.add_argument("--round-trips", action="store_true")
    args = parser.parse_args(argv)
    loaded = load_state(args.state)
    lab = LabLayout(args.lab.resolve())
    now = clock.for_run(False)()  # the real clock, as `mailrec plan` without --lab
    backend = SystemBackend(loaded.state, lab=lab, state_dir=loaded.directory)
    # As SystemBackend does without --lab (MAILREC_KNOWN_HOSTS, else ~/.ssh/known_hosts).
    known = os.environ.get("MAILREC_KNOWN_HOSTS", "").strip() or "~/.ssh/known_hosts"
    onprem = SystemBackend._open_onprem(loaded.state, Path(known).expanduser())
    backend.onprem = onprem
    journal = Journal.existing(loaded.directory / ".mailrec")
    try:
        before = onprem.transport.round_trips
        _, plan = observe_and_plan(loaded, backend, journal, now)
        trips = onprem.transport.round_trips - before
    finally:
        onprem.transport.close()
        backend.close()
        if journal is not None:
            journal.close()
    sys.stdout.write(render_text(plan))
    if args.round_trips:
        print(f"round trips: onprem {trips}", file=sys.stderr)
    return plan.exit_code


if __name__ == "__main__":
    sys.exit(main())
