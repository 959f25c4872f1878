"""`make e2e`: the whole migration on real servers, once per fault, and the ledger table.

    python -m tests.e2e.run                      # 50 users, 5,000 messages, every fault
    python -m tests.e2e.run --users 12 --messages 500 --faults none,ssh-drop

Exit 1 when any column that must be zero is not (the table is printed either way).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.faults import FAULTS, Fault, Together
from tests.e2e.ledger import LedgerRow, details, render_markdown, render_table
from tests.e2e.story import Story, StoryConfig, StoryError


def make_fault(spec: str) -> Fault:
    """`ssh-drop`, or several in one run: `ssh-drop+daemon-kill`."""
    parts = [FAULTS[name]() for name in spec.split("+")]
    return parts[0] if len(parts) == 1 else Together(parts)


def run_all(users: int, messages: int, faults: list[str], rate: float, workdir: Path,
            *, batches: int = 4) -> tuple[dict[str, LedgerRow], dict[str, str]]:
    rows: dict[str, LedgerRow] = {}
    notes: dict[str, str] = {}
    for name in faults:
        fault = make_fault(name)
        config = StoryConfig(users=users, messages=messages, rate=rate, fault=name,
                             batches=batches)
        story = Story(workdir / name, config)
        started = time.monotonic()
        try:
            rows[name] = story.run(fault)
            outcome = "migration completed"
        except StoryError as exc:
            outcome = f"STORY STOPPED: {exc}"
            with _suppressed():
                rows[name] = story.count()
        took = time.monotonic() - started
        notes[name] = (f"{fault.what}; fault met: {fault.hit(story)}; {outcome}; "
                       f"{story.sent_count} messages; {took:.0f} s; stages: "
                       + ", ".join(f"{stage} @{at:.0f}s" for stage, at in story.timeline.stages))
        print(render_table({name: rows[name]}), flush=True) if name in rows else None
    return rows, notes


class _suppressed:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=30.0, help="messages per second")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"one run per comma-separated item, of: {', '.join(FAULTS)}; "
                             "a+b puts two faults in one run")
    parser.add_argument("--batches", type=int, default=4,
                        help="commits the inbound (and the outbound) moves are split into")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown")
    args = parser.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [p for f in faults for p in f.split("+") if p not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s): {', '.join(unknown)}")
    with tempfile.TemporaryDirectory(prefix="mailrec-e2e-run-") as tmp:
        rows, notes = run_all(args.users, args.messages, faults, args.rate, Path(tmp),
                              batches=args.batches)
    print("\n" + render_table(rows))
    for name, note in notes.items():
        print(f"{name}: {note}")
    failed = [name for name, row in rows.items() if not row.passed]
    for name in failed:
        print(f"\n{name}:\n{details(rows[name])}")
    missing_runs = [name for name in faults if name not in rows]
    if args.markdown:
        args.markdown.write_text(render_markdown(rows) + "\n" + "\n".join(
            f"- **{name}**: {note}" for name, note in notes.items()) + "\n")
    return 1 if failed or missing_runs else 0


if __name__ == "__main__":
    sys.exit(main())
