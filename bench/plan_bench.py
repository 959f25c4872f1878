"""`make bench`: how planning scales with the number of users, on the lab.

For each size it writes a lab of N users in the middle of a migration (half already at the
rental, a commit moving 10% more, the rest onprem; outbound all onprem), then measures:
- observe: reading the lab's files into a World (Postfix maps, passwd, N Maildirs, zone,
  RTX config, rental lists) -- one pass per host, never one round trip per user;
- plan: diff + safe ordering + gates (the goal: 10,000 users under 1 s on 2 cores),
and prints a table with the growth relative to n log n. Nothing here fails on time: the
numbers are for people to read.
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from reconciler.apply import build_plan
from reconciler.drivers.backend import SystemBackend
from reconciler.drivers.postfix import (
    RECIPIENT_MAP,
    TRANSPORT_MAP,
    VIRTUAL_MAP,
    format_map,
    forward_keys,
)
from reconciler.lab.init import init_lab
from reconciler.lab.layout import LabLayout
from reconciler.load import load_state, load_texts
from reconciler.observe import JournalView

REPO = Path(__file__).resolve().parent.parent


def make_lab(root: Path, n: int) -> tuple[LabLayout, object]:
    base = load_state(REPO / "state")
    layout = init_lab(root, base, migrated=False, force=True)
    names = [f"u{i:06d}" for i in range(n)]
    migrated = set(names[: n // 2])
    moving = set(names[n // 2 : n // 2 + max(1, n // 10)])
    domain = base.state.domain
    users_yaml = "users:\n" + "".join(
        f"  {u}: {{inbound: {'rental' if u in migrated or u in moving else 'onprem'}, "
        "outbound: onprem}\n" for u in names
    )
    main_yaml = (REPO / "state" / "mailrec.yaml").read_text()
    state, digest = load_texts([("mailrec.yaml", main_yaml), ("users.yaml", users_yaml)])
    passwd = ["root:x:0:0:root:/root:/bin/bash"]
    for uid, name in enumerate(names, start=1001):
        if name not in migrated:
            passwd.append(f"{name}:x:{uid}:{uid}::/home/{name}:/bin/bash")
            for sub in ("new", "cur", "tmp"):
                (layout.onprem_home / name / "Maildir" / sub).mkdir(parents=True, exist_ok=True)
    (layout.onprem / "etc" / "passwd").write_text("\n".join(passwd) + "\n")
    relay = "smtp:[example.sakura.ne.jp]:25"
    # As mailrec forwards a migrated user: every local name (mydestination) accepted,
    # rewritten to user@domain and forwarded; and the forward path was probed once.
    names = ("mail.example.co.jp", "localhost.example.co.jp", "localhost")
    transport, recipients, virtual = {}, {}, {}
    for user in migrated:
        for key in forward_keys(user, domain, names):
            transport[key], recipients[key] = relay, "OK"
            if not key.endswith("@" + domain):
                virtual[key] = f"{user}@{domain}"
    (layout.postfix_dir / TRANSPORT_MAP).write_text(format_map(transport, TRANSPORT_MAP))
    (layout.postfix_dir / RECIPIENT_MAP).write_text(format_map(recipients, RECIPIENT_MAP))
    (layout.postfix_dir / VIRTUAL_MAP).write_text(format_map(virtual, VIRTUAL_MAP))
    main_cf = layout.postfix_dir / "main.cf"
    main_cf.write_text(main_cf.read_text().replace(
        "local_recipient_maps = proxy:unix:passwd.byname $alias_maps",
        "local_recipient_maps = proxy:unix:passwd.byname $alias_maps "
        "hash:/etc/postfix/mailrec_recipients\n"
        "transport_maps = hash:/etc/postfix/mailrec_transport\n"
        "virtual_alias_maps = hash:/etc/postfix/mailrec_virtual",
    ))
    layout.rental_mailboxes.write_text("".join(f"{u}@{domain}\n" for u in sorted(migrated)))
    for name in migrated:
        for sub in ("new", "cur", "tmp"):
            (layout.rental_maildirs / name / sub).mkdir(parents=True, exist_ok=True)
    from reconciler.load import LoadedState

    loaded = LoadedState(state, ("mailrec.yaml", "users.yaml"), digest, layout.root / "state")
    return layout, loaded


def measure(n: int, repeats: int, workdir: Path) -> dict[str, float]:
    layout, loaded = make_lab(workdir / f"lab-{n}", n)
    backend = SystemBackend(loaded.state, lab=layout)  # type: ignore[attr-defined]
    # The journal has seen the world before the migration began (its baseline): every
    # client still sends through onprem. Without it, each outbound would be unknown.
    view = JournalView({}, None, None, frozenset(), baseline=True,
                       forward_probed=frozenset({"smtp:[example.sakura.ne.jp]:25"}))
    from reconciler import clock

    observe_times, plan_times = [], []
    steps = 0
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        world = backend.observe(clock.now(), view)
        observed = time.perf_counter()
        plan = build_plan(loaded, world, view, backend.instructor(), allow_bulk=True)  # type: ignore[arg-type]
        planned = time.perf_counter()
        observe_times.append(observed - start)
        plan_times.append(planned - observed)
        steps = len(plan.steps)
    shutil.rmtree(layout.root, ignore_errors=True)
    return {"n": n, "observe": statistics.median(observe_times),
            "plan": statistics.median(plan_times), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,1000,10000,100000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mailrec-bench-") as tmp:
        for n in sizes:
            console.print(f"[dim]building a lab of {n:,} users ...[/dim]")
            rows.append(measure(n, args.repeats if n < 100_000 else 1, Path(tmp)))
    table = Table(title="mailrec plan time on the lab (median; 2-core machine)")
    for column in ("users", "steps", "observe s", "plan s", "plan µs/user",
                   "plan / (n log n) vs first"):
        table.add_column(column, justify="right")
    first = rows[0]
    unit = first["plan"] / (first["n"] * math.log2(first["n"]))
    for row in rows:
        n = row["n"]
        ratio = row["plan"] / (n * math.log2(n)) / unit
        table.add_row(f"{n:,}", f"{int(row['steps']):,}", f"{row['observe']:.3f}",
                      f"{row['plan']:.3f}", f"{row['plan'] / n * 1e6:.1f}", f"{ratio:.2f}")
    console.print(table)
    goal = next((r for r in rows if r["n"] == 10_000), None)
    if goal is not None:
        verdict = "met" if goal["plan"] < 1.0 else "NOT met"
        console.print(f"goal (10,000 users planned in < 1 s): {verdict} ({goal['plan']:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
