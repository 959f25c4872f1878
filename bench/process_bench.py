"""`make bench`, part 2: whole `mailrec` processes, measured with public tools.

bench/plan_bench.py times observe and plan inside one Python process; what a person waits
for is the whole command: interpreter start, imports, reading the state, observing every
system, planning, rendering. Each row here runs a command several times (default 5; twice at
100,000 users) under `/usr/bin/time -f '%e %M'` (elapsed seconds, peak RSS; hyperfine times
the repeats instead when it is installed) and prints the median, the peak RSS, the goal
(issue 9) and whether it is met:

- `mailrec --help`, and `mailrec validate` of a 10-user state: <= 0.3 s;
- `mailrec plan --lab DIR` on labs from bench/labgen.py (half at the rental, 10% moving,
  the rest onprem) of 1,000 and 10,000 users (`--sizes 1000,10000,100000` adds 100,000):
  10,000 in <= 1.0 s; 100,000 in <= 8 s and <= 300 MiB; time growing no faster than n log n
  from the smallest size; the first run after the lab was built is shown beside the median
  of the repeats (a cache, or a cold page cache, shows there);
- the reference floor: a bare `python3 -S` script (bench/floor.py) reading the same users
  as JSON and the lab's transport map, computing the set difference;
- `mailrec plan` against a real Postfix over SSH (bench/realhost.py: sshd + Postfix on
  127.0.0.40, BIND, the lab rental SMTP server; root and Postfix/sshd needed, else the rows
  say why they are skipped): 10,000 users in <= 1.5 s; and the onprem round trips per
  observation (`Transport.round_trips`), which must not grow with the users.

Nothing here fails on time: the figures are for people to read. Every daemon and directory
the bench made is removed at the end, also on Ctrl-C (MAILREC_KEEP_SERVICE_DIRS=1 keeps
the service directories).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pstats
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from labgen import REPO, BenchLab, Split, build_lab
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from reconciler import clock

BIN = Path(sys.executable).parent
MAILREC = [str(BIN / "mailrec")] if (BIN / "mailrec").exists() else [sys.executable, "-m",
                                                                     "reconciler"]
TIME = "/usr/bin/time"
FLOOR_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
MIB = 1024 * 1024
console = Console(stderr=True)


# --- running a command ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    elapsed: float  # seconds
    rss: int  # peak resident set, bytes
    exit: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> str:
        """What the run decided: its exit status and the plan's last line."""
        lines = self.stdout.strip().splitlines()
        return f"exit {self.exit}" + (f", {lines[-1]}" if "step(s)" in "".join(lines[-1:])
                                      else "")


def run_timed(argv: Sequence[str], env: dict[str, str]) -> Sample:
    """One run under /usr/bin/time (elapsed, max RSS); without it, the kernel's rusage of
    the child (os.wait4) and the wall clock."""
    with tempfile.TemporaryDirectory(prefix="mailrec-bench-run-") as tmp:
        out, err, report = (Path(tmp) / name for name in ("out", "err", "time"))
        if os.access(TIME, os.X_OK):
            with out.open("wb") as stdout, err.open("wb") as stderr:
                proc = subprocess.run([TIME, "-f", "%e %M", "-o", str(report), *argv],
                                      env=env, stdout=stdout, stderr=stderr, check=False)
            elapsed_text, rss_text = report.read_text().strip().splitlines()[-1].split()
            elapsed, rss, status = float(elapsed_text), int(rss_text) * 1024, proc.returncode
        else:
            elapsed, rss, status = _spawn_timed(argv, env, out, err)
        return Sample(elapsed, rss, status, out.read_text(errors="replace"),
                      err.read_text(errors="replace"))


def _spawn_timed(argv: Sequence[str], env: dict[str, str], out: Path,
                 err: Path) -> tuple[float, int, int]:
    program = shutil.which(argv[0], path=env.get("PATH")) or argv[0]
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    start = time.perf_counter()
    pid = os.posix_spawn(program, list(argv), env, file_actions=[
        (os.POSIX_SPAWN_OPEN, 1, str(out), flags, 0o600),
        (os.POSIX_SPAWN_OPEN, 2, str(err), flags, 0o600)])
    _, status, usage = os.wait4(pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def hyperfine_times(argv: Sequence[str], env: dict[str, str], runs: int) -> list[float] | None:
    """The elapsed times of `runs` runs by hyperfine (no shell), if it is installed."""
    hyperfine = shutil.which("hyperfine")
    if hyperfine is None or runs < 1:
        return None
    with tempfile.TemporaryDirectory(prefix="mailrec-bench-hf-") as tmp:
        export = Path(tmp) / "times.json"
        proc = subprocess.run(
            [hyperfine, "--runs", str(runs), "--style", "none", "--ignore-failure", "-N",
             "--export-json", str(export), shlex.join(argv)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0 or not export.exists():
            console.print(f"[yellow]hyperfine failed ({proc.stderr.strip()[-200:]}); "
                          "timing with /usr/bin/time[/yellow]")
            return None
        return [float(t) for t in json.loads(export.read_text())["results"][0]["times"]]


@dataclass
class Measured:
    """A command's runs: the first, then the repeats."""

    samples: list[Sample]
    repeat_times: list[float]  # the repeats' elapsed times (hyperfine's when it ran them)

    @property
    def first(self) -> Sample:
        return self.samples[0]

    @property
    def median(self) -> float:
        return statistics.median(self.repeat_times or [self.first.elapsed])

    @property
    def peak(self) -> int:
        return max(s.rss for s in self.samples)

    @property
    def runs(self) -> int:
        return 1 + len(self.repeat_times)

    def consistent(self) -> bool:
        return all(s.summary == self.first.summary for s in self.samples)


def measure(argv: Sequence[str], env: dict[str, str], runs: int) -> Measured:
    first = run_timed(argv, env)
    repeats = max(0, runs - 1)
    times = hyperfine_times(argv, env, repeats) if repeats else []
    if times is not None:
        return Measured([first], times)
    samples = [run_timed(argv, env) for _ in range(repeats)]
    return Measured([first, *samples], [s.elapsed for s in samples])


# --- rows ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    seconds: float | None = None
    mib: float | None = None
    growth: bool = False  # no worse than n log n from the family's smallest size
    text: str = ""  # shown instead, for a row that has no goal of its own

    def describe(self) -> str:
        if self.text:
            return self.text
        parts = []
        if self.seconds is not None:
            parts.append(f"≤ {self.seconds:g} s")
        if self.mib is not None:
            parts.append(f"≤ {self.mib:g} MiB")
        if self.growth:
            parts.append("≤ n log n")
        return ", ".join(parts) or "—"


@dataclass
class Row:
    name: str
    users: int | None = None
    measured: Measured | None = None
    goal: Goal = field(default_factory=Goal)
    family: str = ""  # rows of one family share the growth reference (the smallest size)
    skipped: str = ""
    notes: list[str] = field(default_factory=list)
    first_only: bool = False  # the figure is the first run (not the repeats' median)
    expect: int | None = None  # the exit status every run must have (else: failed)

    @property
    def seconds(self) -> float | None:
        if self.measured is None:
            return None
        return self.measured.first.elapsed if self.first_only else self.measured.median


def growth(rows: Sequence[Row], row: Row) -> float | None:
    """(t / t0) / (n log n / n0 log n0) against the family's smallest size; <= 1 is no worse
    than n log n."""
    if not row.family or row.seconds is None or row.users is None:
        return None
    family = [r for r in rows if r.family == row.family and r.seconds and r.users
              and not r.first_only]
    if not family:
        return None
    base = min(family, key=lambda r: r.users or 0)
    if base is row or base.users is None or base.seconds is None or row.users <= base.users:
        return None

    def nlogn(n: int) -> float:
        return n * math.log2(n)

    return (row.seconds / base.seconds) / (nlogn(row.users) / nlogn(base.users))


def verdict(row: Row, ratio: float | None) -> str:
    if row.skipped:
        return f"skipped: {row.skipped}"
    if row.measured is None or row.seconds is None:
        return "—"
    failed_runs = sorted({s.exit for s in row.measured.samples if row.expect is not None
                          and s.exit != row.expect})
    if failed_runs:
        return f"run failed (exit {', '.join(map(str, failed_runs))})"
    goal = row.goal
    checks = []
    if goal.seconds is not None:
        checks.append(("time", row.seconds <= goal.seconds))
    if goal.mib is not None:
        checks.append(("RSS", row.measured.peak / MIB <= goal.mib))
    if goal.growth and ratio is not None:
        checks.append(("growth", ratio <= 1.0))
    if not checks:
        return "—"
    failed = [name for name, ok in checks if not ok]
    return "met" if not failed else f"NOT met ({', '.join(failed)})"


def render(rows: Sequence[Row], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column, justify in (("row", "left"), ("users", "right"), ("runs", "right"),
                            ("median s", "right"), ("peak MiB", "right"), ("goal", "left"),
                            ("growth vs n log n", "right"), ("verdict", "left"),
                            ("notes", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        ratio = growth(rows, row)
        measured = row.measured
        seconds = row.seconds
        table.add_row(
            escape(row.name),
            f"{row.users:,}" if row.users else "",
            "" if measured is None else ("1" if row.first_only else str(measured.runs)),
            "—" if seconds is None else f"{seconds:.2f}",
            "—" if measured is None else f"{measured.peak / MIB:.0f}",
            row.goal.describe(),
            "" if ratio is None else f"{ratio:.2f}",
            escape(verdict(row, ratio)),
            escape("; ".join(row.notes)),
        )
    return table


LEGEND = """\
goal: issue 9; growth: (t / t0) / (n log n / n0 log n0) against the same row's smallest size
(<= 1: no worse than n log n). Lab rows: `mailrec plan --lab DIR`, every system the lab's files
(bench/labgen.py). floor: bench/floor.py under a bare `python3 -S`, the same users as JSON and
the lab's transport map, their set difference.
[1] `mailrec plan --state S`, the real CLI: onprem = Postfix + sshd on 127.0.0.40 (the lab's
    onprem data, accounts via a getent shim, see bench/realhost.py), DNS = BIND on 127.0.0.42
    (RFC 2136), rental = `manual`, probed over SMTP (one session, a RCPT per user) at the lab
    rental SMTP server on 127.0.0.41 (its replies, ~0.3 ms per RCPT, are most of this row's
    time at 10,000 users: --profile shows it); no router.
[2] bench/realplan.py: the CLI's plan path (load_state, SystemBackend, observe_and_plan,
    render_text) with the onprem driver over SSH to the same host and DNS, rental and router
    from the lab's files: the CLI cannot mix them (--lab makes every system the lab's)."""


# --- the bench -----------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAILREC_LAB", "MAILREC_NOW")}
    env["NO_COLOR"] = "1"
    return env


def ten_user_state(directory: Path) -> Path:
    directory.mkdir(parents=True)
    shutil.copy2(REPO / "state" / "mailrec.yaml", directory / "mailrec.yaml")
    (directory / "users.yaml").write_text(Split.of(10).users_yaml())
    return directory


def plan_goal(n: int) -> Goal:
    if n == 10_000:
        return Goal(seconds=1.0, growth=True)
    if n == 100_000:
        return Goal(seconds=8.0, mib=300, growth=True)
    return Goal(growth=True)


def note_run(row: Row, runs: Measured, expect: int | None = None) -> None:
    row.expect = expect
    row.notes.append(runs.first.summary)
    wrong = [s for s in runs.samples if expect is not None and s.exit != expect]
    if wrong:
        row.notes.append(f"expected exit {expect}: {wrong[0].stderr.strip()[-300:]}")
    if not runs.consistent():
        row.notes.append("runs differ: " + " / ".join(sorted({s.summary for s in runs.samples})))


def lab_rows(sizes: Sequence[int], args: argparse.Namespace, work: Path,
             keep: set[int]) -> tuple[list[Row], dict[int, BenchLab]]:
    rows: list[Row] = []
    labs: dict[int, BenchLab] = {}
    env = base_env()
    for n in sizes:
        console.print(f"[dim]labgen: {n:,} users ...[/dim]")
        started = time.perf_counter()
        lab = build_lab(work / f"lab-{n}", n)
        built = time.perf_counter() - started
        runs = args.large_repeats if n >= 100_000 else args.repeats
        console.print(f"[dim]mailrec plan --lab ({n:,} users) x {runs} ...[/dim]")
        measured = measure([*MAILREC, "plan", "--lab", str(lab.root)], env, runs)
        row = Row("mailrec plan --lab", n, measured, plan_goal(n), family="lab")
        note_run(row, measured, expect=2)
        row.notes.append(f"labgen {built:.1f} s")
        if measured.runs > 1:
            row.notes.append(f"first run {measured.first.elapsed:.2f} s")
        rows.append(row)
        if n == 10_000 and measured.runs > 1:
            rows.append(Row("  └ its first run (after labgen)", n, measured,
                            Goal(seconds=1.0), first_only=True))
        if n == 10_000 or (n == max(sizes) and 10_000 not in sizes):
            floor = measure([FLOOR_PYTHON, "-S", str(REPO / "bench" / "floor.py"),
                             str(lab.users_json), str(lab.transport_map), lab.domain],
                            env, args.repeats)
            floor_row = Row("floor: python3 -S floor.py", n, floor,
                            Goal(text="reference (~0.06 s)"))
            floor_row.notes.append(floor.first.stdout.strip())
            rows.append(floor_row)
        if n in keep:
            labs[n] = lab
        else:
            shutil.rmtree(lab.root, ignore_errors=True)
    return rows, labs


@dataclass
class RealRun:
    rows: list[Row]
    round_trips: dict[int, str]
    profile: str = ""


def real_rows(sizes: Sequence[int], labs: dict[int, BenchLab], args: argparse.Namespace,
              work: Path) -> RealRun:
    cli_name = "mailrec plan, real Postfix over SSH [1]"
    script_name = "realplan.py, real Postfix over SSH [2]"
    result = RealRun([], {})

    def skip_all(reason: str) -> RealRun:
        for name in (cli_name, script_name):
            for n in sizes:
                result.rows.append(Row(name, n, goal=Goal(seconds=1.5) if n == 10_000
                                       else Goal(), skipped=reason))
        return result

    if not sizes:
        return result
    try:
        import realhost
    except ImportError as exc:  # pytest or dnspython missing: the tests' starters
        return skip_all(f"cannot import the integration tests' starters ({exc})")
    reason = realhost.unavailable()
    if reason:
        return skip_all(reason)
    stack = realhost.ServiceStack()
    try:
        console.print("[dim]real onprem: sshd + Postfix on 127.0.0.40 ...[/dim]")
        try:
            host = realhost.start_real_onprem(stack, work / "onprem")
        except realhost.ServiceUnavailable as exc:
            return skip_all(str(exc).splitlines()[0])
        dns: Any = None
        cli_skip = ""
        try:
            console.print("[dim]BIND on 127.0.0.42 ...[/dim]")
            dns = realhost.start_dns(stack)
        except realhost.ServiceUnavailable as exc:
            cli_skip = str(exc).splitlines()[0]
        for n in sizes:
            lab = labs.get(n) or build_lab(work / f"lab-{n}", n)
            labs[n] = lab
            rental: Any = None
            rental_port = 25  # the forward target's port when the rental server cannot run
            try:
                rental = realhost.start_rental(stack, lab)
                rental_port = rental.relay_port
            except realhost.ServiceUnavailable as exc:
                cli_skip = cli_skip or str(exc).splitlines()[0]
            target = (realhost.RENTAL_ADDRESS, rental_port)
            host.load(lab.split, lab.domain, f"smtp:[{target[0]}]:{target[1]}")
            now = clock.now()
            env = {**base_env(), **host.env()}
            goal = Goal(seconds=1.5, growth=True) if n == 10_000 else Goal(growth=True)
            runs = args.large_repeats if n >= 100_000 else args.repeats

            if cli_skip:
                result.rows.append(Row(cli_name, n, goal=goal, skipped=cli_skip))
            else:
                state = realhost.write_state(work / f"state-cli-{n}", lab, host, target, dns=dns,
                                             when=now)
                console.print(f"[dim]real CLI plan ({n:,} users) x {runs} ...[/dim]")
                argv = [*MAILREC, "plan", "--state", str(state)]
                measured = measure(argv, env, runs)
                row = Row(cli_name, n, measured, goal, family="real-cli")
                note_run(row, measured, expect=2)
                row.notes.append(f"first run {measured.first.elapsed:.2f} s")
                result.rows.append(row)
                if args.profile and n == max(sizes):
                    out = args.profile.with_suffix(".cli.prof")
                    result.profile += profile(
                        [sys.executable, "-m", "cProfile", "-o", str(out), "-m",
                         "reconciler", "plan", "--state", str(state)], env, out)

            state = realhost.write_state(work / f"state-script-{n}", lab, host, target, dns=None,
                                         when=now)
            console.print(f"[dim]bench/realplan.py ({n:,} users) x {runs} ...[/dim]")
            script = [sys.executable, str(REPO / "bench" / "realplan.py"), "--state", str(state),
                      "--lab", str(lab.root), "--round-trips"]
            measured = measure(script, env, runs)
            row = Row(script_name, n, measured, goal, family="real-script")
            note_run(row, measured, expect=2)
            row.notes.append(f"first run {measured.first.elapsed:.2f} s")
            result.rows.append(row)
            trips = [line for line in measured.first.stderr.splitlines()
                     if line.startswith("round trips:")]
            result.round_trips[n] = trips[-1].split(":", 1)[1].strip() if trips else "?"
            if args.profile and n == max(sizes):
                out = args.profile.with_suffix(".realplan.prof")
                result.profile += profile(
                    [sys.executable, "-m", "cProfile", "-o", str(out), *script[1:]], env, out)
            if rental is not None:  # the next size's rental server serves its own lab
                stack.services.remove(rental)
                rental.stop()
            host.unload()
        return result
    finally:
        stack.stop_all()


def profile(argv: list[str], env: dict[str, str], out: Path) -> str:
    """One more run under cProfile (written to `out`); its top 30 by cumulative time."""
    console.print(f"[dim]cProfile: {shlex.join(argv)}[/dim]")
    out.unlink(missing_ok=True)
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, check=False)
    if not out.exists():
        return f"cProfile wrote nothing (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
    buffer = _Buffer()
    stats = pstats.Stats(str(out), stream=buffer)  # type: ignore[arg-type]
    stats.sort_stats("cumulative").print_stats(30)
    return f"\n$ {shlex.join(argv)}\n" + buffer.text()


class _Buffer:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def text(self) -> str:
        return "".join(self.parts)


@contextmanager
def interrupts_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every daemon and directory is cleaned up."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def sizes_arg(text: str) -> list[int]:
    return sorted({int(s.replace("_", "")) for s in text.split(",") if s.strip()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=sizes_arg, default=sizes_arg("1000,10000"),
                        help="lab sizes for `plan --lab` (add 100000 for the 100k row)")
    parser.add_argument("--real-sizes", type=sizes_arg, default=sizes_arg("1000,10000"),
                        help="sizes of the real-SSH rows ('' for none)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per row (median)")
    parser.add_argument("--large-repeats", type=int, default=2,
                        help="runs per row of 100,000 users or more")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE.prof",
                        help="also profile the largest real-SSH plans (cProfile, written to "
                             "FILE.cli.prof and FILE.realplan.prof) and print each one's top 30 "
                             "by cumulative time")
    args = parser.parse_args(argv)
    if args.profile is not None:
        args.profile = args.profile.resolve()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mailrec-bench-", dir="/tmp"))
    work.chmod(0o755)  # the daemons' users enter it (the real host's homes and Postfix)
    rows: list[Row] = []
    real = RealRun([], {})
    try:
        with interrupts_unwind():
            env = base_env()
            console.print("[dim]mailrec --help, validate ...[/dim]")
            helped = measure([*MAILREC, "--help"], env, args.repeats)
            rows.append(Row("mailrec --help", None, helped, Goal(seconds=0.3),
                            notes=[helped.first.summary]))
            state = ten_user_state(work / "state-10")
            validated = measure([*MAILREC, "validate", "--state", str(state)], env,
                                args.repeats)
            row = Row("mailrec validate (10 users)", 10, validated, Goal(seconds=0.3))
            note_run(row, validated, expect=0)
            rows.append(row)
            lab, labs = lab_rows(args.sizes, args, work, keep=set(args.real_sizes))
            rows.extend(lab)
            real = real_rows(args.real_sizes, labs, args, work)
            rows.extend(real.rows)
    except KeyboardInterrupt:
        console.print("[red]interrupted: removing the bench's directories ...[/red]")
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the daemons were stopped by real_rows
    out = Console(width=None if sys.stdout.isatty() else 160)
    hyperfine = "hyperfine for the repeats" if shutil.which("hyperfine") else TIME
    out.print(render(rows, f"mailrec, whole processes ({os.cpu_count()} CPUs; {hyperfine}; "
                           "median of the runs after the first, peak RSS of all)"))
    out.print(LEGEND, markup=False, highlight=False)
    if real.round_trips:
        trips = ", ".join(f"{n:,} users: {t}" for n, t in sorted(real.round_trips.items()))
        constant = len(set(real.round_trips.values())) == 1
        out.print(f"onprem round trips per observation (Transport.round_trips, via "
                  f"bench/realplan.py): {trips} -> goal constant: "
                  f"{'met' if constant else 'NOT met'}")
    if real.profile:
        out.print(real.profile, markup=False, highlight=False)
    out.print(f"[dim]process_bench took {time.perf_counter() - started:.0f} s[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
