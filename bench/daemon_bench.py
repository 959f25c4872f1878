"""`make bench`, part 3: one daemon round on an unchanged commit, on a lab of N users.

The daemon follows a bare git repo (as in production); each round fetches the branch,
reads the state (parsed again only when the commit changed), observes every system, plans,
and applies what is ready. Measured here, in the daemon's own process (no interpreter start):

- first round: a new commit, so the state is parsed; the few ready steps the lab needs
  (SPF, router) are applied, each verified by a fresh observation;
- unchanged round (median of `--repeats`): the same commit, nothing to apply: fetch +
  cached state + one observation + one plan. Goal (issue 9): <= 0.5 s at 10,000 users;
- new-commit round: one user moved in a new commit (parse + observe + plan + apply of that
  user's steps).

The lab is bench/labgen.py's, with the moving users put back to onprem so that the world
is in sync but for the lab's own SPF and router steps. Nothing here fails on time.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import git
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from labgen import Split, build_lab

from reconciler.daemon import Daemon

AUTHOR = git.Actor("Bench", "bench@example.co.jp")
GOAL_UNCHANGED = 0.5


def settled_users(split: Split, moved: frozenset[str] = frozenset()) -> str:
    """users.yaml as the world already is (the moving users still onprem), plus `moved`."""
    def inbound(name: str) -> str:
        return "rental" if name in split.migrated or name in moved else "onprem"
    return "users:\n" + "".join(
        f"  {u}: {{inbound: {inbound(u)}, outbound: onprem}}\n" for u in split.names)


def measure(n: int, repeats: int, work: Path) -> dict[str, float]:
    lab = build_lab(work / f"lab-{n}", n)
    users = lab.state_dir / "users.yaml"
    users.write_text(settled_users(lab.split))
    seed = work / f"seed-{n}"
    shutil.copytree(lab.state_dir, seed / "state")
    repo = git.Repo.init(seed, initial_branch="main")
    repo.git.add("--all", "state")
    repo.index.commit("settled", author=AUTHOR, committer=AUTHOR)
    bare = work / f"config-{n}.git"
    git.Repo.clone_from(seed, bare, bare=True)
    repo.create_remote("bare", str(bare))

    daemon = Daemon(repo=str(bare), branch="main", subpath="state", interval=60.0,
                    lab=lab.layout, metrics_port=None, allow_bulk=False)
    start = time.perf_counter()
    first_code = daemon.round()
    first = time.perf_counter() - start
    unchanged = []
    for _ in range(repeats):
        start = time.perf_counter()
        code = daemon.round()
        unchanged.append(time.perf_counter() - start)
        if code != 0:
            raise RuntimeError(f"an unchanged round failed (exit {code})")
    # One more user moves in a new commit: parsed again, that user's steps applied.
    mover = sorted(lab.split.moving)[1]  # one whose old mailbox is empty
    (seed / "state" / "users.yaml").write_text(
        settled_users(lab.split, frozenset({mover})))
    repo.git.add("--all", "state")
    repo.index.commit(f"move {mover}", author=AUTHOR, committer=AUTHOR)
    repo.git.push("bare", "main")
    start = time.perf_counter()
    new_code = daemon.round()
    new_commit = time.perf_counter() - start
    shutil.rmtree(lab.root, ignore_errors=True)
    return {"n": n, "first": first, "first_code": first_code,
            "unchanged": statistics.median(unchanged), "new": new_commit,
            "new_code": new_code}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)  # the daemon logs every step; the table is the output
    os.environ.setdefault("MAILREC_NOW", "2026-11-29T09:00:00+00:00")
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mailrec-daemon-bench-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            console.print(f"[dim]daemon rounds on a lab of {n:,} users ...[/dim]")
            rows.append(measure(n, args.repeats, Path(tmp)))
    table = Table(title="mailrec daemon: one round, in process (median; 2-core machine)")
    for column in ("users", "first round s", "unchanged s", "goal", "verdict",
                   "new commit s"):
        table.add_column(column, justify="right")
    for row in rows:
        n = int(row["n"])
        goal = f"≤ {GOAL_UNCHANGED} s" if n == 10_000 else ""
        verdict = ("met" if row["unchanged"] <= GOAL_UNCHANGED else "NOT met") if goal else ""
        table.add_row(f"{n:,}", f"{row['first']:.3f} (exit {int(row['first_code'])})",
                      f"{row['unchanged']:.3f}", goal, verdict,
                      f"{row['new']:.3f} (exit {int(row['new_code'])})")
    console.print(table)
    console.print("first round: a new commit, the lab's SPF and router steps applied; "
                  "unchanged: the same commit again, nothing to apply; new commit: one more "
                  "user moved (mailbox and inbound applied, each verified by observing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
