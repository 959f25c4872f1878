"""The user guide's command outputs, from a real run of `make run`'s walk (reconciler/demo.py).

    python scripts/guide_outputs.py            # run the walk, rewrite docs/user-guide.md
    python scripts/guide_outputs.py --check    # exit 1 and print a diff if the guide drifted

A generated block in the guide is a ```text fence right after a marker comment that names
the commands it shows, by their names in the walk's transcript (`Demo.transcript`):

    <!-- generated: demo first-plan; first-apply -->

shows both commands whole: the `$` line, the output, the exit code. A name followed by
selectors shows an excerpt, the omitted lines replaced by `  ...`:

    <!-- generated: demo outbound-apply applied whitelist/203.0.113.8/29 not-verified -->

Selectors: a step id (its line and the indented lines below it), `applied` (the "applied ..."
lines), `findings` (`!` lines), `not-verified` (`?` lines), `observed` (the observed: line),
`summary` (the last line before the exit code). The `$` line and the exit code are always
shown. Everything else in the guide is left as it is.

What differs from run to run is normalised, so the guide is the same on every run: the
walk's clock starts at --now (default 2026-12-02T09:00:00+00:00), the lab (a temporary
directory) is shown as `lab` and this checkout's `state/` as `state`, every loopback port
(`127.0.0.3:55707`) as `PORT`, the digests that depend on those (the state's digest in
`validate`, a plan's checksum and source digest) as `<digest>`, `<checksum>`, `<source>`,
and trailing blanks are dropped.

--save-transcript FILE writes the normalised transcript as JSON; --transcript FILE uses
such a file instead of running the walk (for tests that check the checker).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import os
import re
import sys
import tempfile
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file, not as an installed module
    sys.path.insert(0, str(REPO))

from reconciler.demo import Demo, Entry  # noqa: E402
from reconciler.lab.layout import LabLayout  # noqa: E402
from reconciler.lab.services import stop_services  # noqa: E402

GUIDE = REPO / "docs" / "user-guide.md"
DEFAULT_FILES = (GUIDE, REPO / "README.md")  # README shows one plan from the walk too
NOW = "2026-12-02T09:00:00+00:00"
MARKER = re.compile(
    r"^<!-- generated: demo (?P<spec>[^\n]*?) -->\n(?P<fence>```text\n)(?P<body>.*?)^```$",
    re.M | re.S)
LOOSE_MARKER = re.compile(r"<!-- generated:[^\n]*-->")
PORT = re.compile(r"\b(127\.\d{1,3}\.\d{1,3}\.\d{1,3}):\d{1,5}\b")
# Digests of inputs that differ per lab (its path, its service ports): the state's digest in
# `validate`, the plan's checksum (Markdown and JSON) and the JSON plan's source digest.
DIGESTS = (
    (re.compile(r"\bdigest [0-9a-f]{8,64}\b"), "digest <digest>"),
    (re.compile(r"\bchecksum `[0-9a-f]{8,64}`"), "checksum `<checksum>`"),
    (re.compile(r'"(checksum|source)": "[0-9a-f]{8,64}"'), r'"\1": "<\1>"'),
)
KEYWORDS = ("applied", "findings", "not-verified", "observed", "summary")
GAP = "  ..."


class GuideError(Exception):
    """A marker the script cannot fill: an unknown name or selector, a marker without fence."""


def normalise(text: str, lab: Path) -> str:
    for path, shown in ((lab, "lab"), (REPO / "state", "state"), (REPO, ".")):
        text = text.replace(str(path), shown)
    text = PORT.sub(r"\1:PORT", text)
    for pattern, shown in DIGESTS:
        text = pattern.sub(shown, text)
    return "\n".join(line.rstrip() for line in text.splitlines())


def run_walk(now: datetime) -> dict[str, Entry]:
    """The real walk: a lab in a temporary directory, its services up, `mailrec` subprocesses.
    Its screen output is kept and shown only when the walk fails."""
    with tempfile.TemporaryDirectory(prefix="mailrec-guide-") as tmp:
        lab = Path(tmp) / "lab"
        demo = Demo(lab, REPO / "state", color=False, now=now)
        screen = io.StringIO()
        try:
            with contextlib.redirect_stdout(screen):
                demo.run()
        except (Exception, SystemExit) as error:
            sys.stderr.write(screen.getvalue())
            raise SystemExit(f"guide_outputs: the walk failed: {error}") from None
        finally:
            if lab.exists():
                stop_services(LabLayout(lab))  # never leave the lab's services behind
        return {key: Entry(normalise(entry.command, demo.lab), normalise(entry.output, demo.lab),
                           entry.exit_code)
                for key, entry in demo.transcript.items()}


def _items(output: str) -> list[list[str]]:
    """The output's lines grouped: a line at the left margin with the indented lines under it."""
    items: list[list[str]] = []
    for line in output.splitlines():
        if items and line.startswith(" "):
            items[-1].append(line)
        else:
            items.append([line])
    return items


def _selected(item: list[str], index: int, last: int, selectors: set[str]) -> bool:
    head = item[0]
    step = re.match(r"[+~-] (\S+)\s", head)
    return bool(
        (step and step.group(1) in selectors)
        or ("applied" in selectors and head.startswith("applied "))
        or ("findings" in selectors and head.startswith("! "))
        or ("not-verified" in selectors and head.startswith("? "))
        or ("observed" in selectors and head.startswith("observed:"))
        or ("summary" in selectors and index == last))


def excerpt(entry: Entry, selectors: list[str]) -> list[str]:
    if not selectors:
        return entry.lines()
    items = _items(entry.output)
    wanted = set(selectors)
    steps = {m.group(1) for item in items if (m := re.match(r"[+~-] (\S+)\s", item[0]))}
    unknown = {s for s in wanted if s not in KEYWORDS and s not in steps}
    if unknown:
        raise GuideError(f"no step {', '.join(sorted(unknown))} in `{entry.command}`")
    lines = [entry.lines()[0]]
    for index, item in enumerate(items):
        if _selected(item, index, len(items) - 1, wanted):
            lines += [f"  {line}" for line in item]
        elif lines[-1] != GAP:
            lines.append(GAP)
    if entry.exit_code is not None:
        lines.append(f"  (exit {entry.exit_code})")
    return lines


def block(spec: str, transcript: dict[str, Entry]) -> str:
    lines: list[str] = []
    for part in spec.split(";"):
        words = part.split()
        if not words:
            raise GuideError(f"empty part in marker {spec!r}")
        key, selectors = words[0], words[1:]
        if key not in transcript:
            raise GuideError(f"marker {spec!r}: the walk has no command named {key!r} "
                             f"(names: {', '.join(transcript)})")
        lines += excerpt(transcript[key], selectors)
    return "".join(f"{line}\n" for line in lines)


def render(guide: str, transcript: dict[str, Entry]) -> str:
    filled = len(MARKER.findall(guide))
    if filled != len(LOOSE_MARKER.findall(guide)):
        raise GuideError("a `<!-- generated: ... -->` marker is not of the form "
                         "`<!-- generated: demo NAMES -->` followed by a ```text fence")
    return MARKER.sub(
        lambda m: f"<!-- generated: demo {m['spec']} -->\n{m['fence']}"
                  f"{block(m['spec'], transcript)}```", guide)


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 and print a diff if the guide differs")
    parser.add_argument("--guide", type=Path, action="append", default=None,
                        help="a Markdown file to fill (repeatable; default: docs/user-guide.md "
                             "and README.md)")
    parser.add_argument("--now", default=NOW, help=f"the walk's start time (default {NOW})")
    parser.add_argument("--transcript", type=Path, help="use this saved transcript, run nothing")
    parser.add_argument("--save-transcript", type=Path, help="write the transcript as JSON")
    args = parser.parse_args(argv)

    if args.transcript:
        saved = json.loads(args.transcript.read_text())
        transcript = {key: Entry(**value) for key, value in saved.items()}
    else:
        transcript = run_walk(datetime.fromisoformat(args.now))
    if args.save_transcript:
        args.save_transcript.write_text(json.dumps(
            {key: vars(entry) for key, entry in transcript.items()}, indent=1) + "\n")

    status = 0
    for guide in args.guide or DEFAULT_FILES:
        status = max(status, _fill(guide, transcript, check=args.check))
    return status


def _fill(guide: Path, transcript: dict[str, Entry], *, check: bool) -> int:
    current = guide.read_text(encoding="utf-8")
    try:
        fresh = render(current, transcript)
    except GuideError as error:
        print(f"guide_outputs: {guide}: {error}", file=sys.stderr)
        return 1
    if fresh == current:
        print(f"{guide}: the generated outputs match a fresh run")
        return 0
    if check:
        sys.stdout.writelines(difflib.unified_diff(
            current.splitlines(keepends=True), fresh.splitlines(keepends=True),
            fromfile=f"{guide} (as committed)", tofile=f"{guide} (a fresh run)"))
        print(f"\n{guide}: the generated outputs differ from a fresh run; "
              "run `make guide` to rewrite them", file=sys.stderr)
        return 1
    write_atomically(guide, fresh)
    print(f"{guide}: rewrote the generated outputs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
