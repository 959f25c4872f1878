"""`make bench`: how planning scales with the number of users, on the lab.

For each size it writes a lab of N users in the middle of a migration with bench/labgen.py
(half already at the rental, a commit moving 10% more, the rest onprem; outbound all onprem),
then measures, in this process:
- observe: reading the lab's files into a World (Postfix maps, passwd, N Maildirs, zone,
  RTX config, rental lists) -- one pass per host, never one round trip per user;
- plan: diff + safe ordering + gates (the goal: 10,000 users under 1 s on 2 cores),
and prints a table with the growth relative to n log n. Nothing here fails on time: the
numbers are for people to read. bench/process_bench.py measures whole `mailrec` processes.
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

from labgen import build_lab
from rich.console import Console
from rich.table import Table

from reconciler import clock
from reconciler.apply import build_plan
from reconciler.drivers.backend import SystemBackend
from reconciler.journal import Journal
from reconciler.lab.layout import LabLayout
from reconciler.load import LoadedState, load_state
from reconciler.observe import JournalView


def make_lab(root: Path, n: int) -> tuple[LabLayout, LoadedState]:
    """A lab of n users in the middle of a migration (bench/labgen.py), and its state."""
    lab = build_lab(root, n)
    return lab.layout, load_state(lab.state_dir)


def measure(n: int, repeats: int, workdir: Path) -> dict[str, float]:
    layout, loaded = make_lab(workdir / f"lab-{n}", n)
    backend = SystemBackend(loaded.state, lab=layout)
    # What the lab's journal holds (labgen records it as a real run would have): the
    # baseline before the migration began (every client still sends through onprem; without
    # it, each outbound would be unknown) and the probe of the forward path.
    journal = Journal.existing(layout.journal_dir)
    try:
        view = JournalView.read(journal)
    finally:
        if journal is not None:
            journal.close()

    observe_times, plan_times = [], []
    steps = 0
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        world = backend.observe(clock.now(), view)
        observed = time.perf_counter()
        plan = build_plan(loaded, world, view, backend.instructor(), allow_bulk=True)
        planned = time.perf_counter()
        observe_times.append(observed - start)
        plan_times.append(planned - observed)
        steps = len(plan.steps)
    backend.close()
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
        users = row["n"]
        ratio = row["plan"] / (users * math.log2(users)) / unit
        table.add_row(f"{int(users):,}", f"{int(row['steps']):,}", f"{row['observe']:.3f}",
                      f"{row['plan']:.3f}", f"{row['plan'] / users * 1e6:.1f}", f"{ratio:.2f}")
    console.print(table)
    goal = next((r for r in rows if r["n"] == 10_000), None)
    if goal is not None:
        verdict = "met" if goal["plan"] < 1.0 else "NOT met"
        console.print(f"goal (10,000 users planned in < 1 s): {verdict} ({goal['plan']:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
