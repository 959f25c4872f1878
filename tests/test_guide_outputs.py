"""docs/user-guide.md shows real output: `scripts/guide_outputs.py --check` runs `make run`'s
walk (a lab in a temporary directory, its rental SMTP server and RTX emulator on loopback,
real `mailrec` subprocesses) and fails with a diff when a generated block differs.

The walk runs once for the module; the other tests reuse its transcript (`--transcript`)
to check the checker itself on a copy of the guide."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO

SCRIPT = REPO / "scripts" / "guide_outputs.py"
GUIDE = REPO / "docs" / "user-guide.md"
MARKER = re.compile(r"^<!-- generated: demo .* -->\n```text\n", re.M)

pytestmark = pytest.mark.timeout(300)  # whichever test comes first runs the walk (~1 minute)


@dataclass(frozen=True)
class Run:
    result: subprocess.CompletedProcess[str]
    transcript: Path


def guide_outputs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One real walk for the module: the check of the guide itself, its transcript saved."""
    transcript = tmp_path_factory.mktemp("guide") / "transcript.json"
    result = guide_outputs("--check", "--save-transcript", str(transcript), timeout=280)
    return Run(result, transcript)


def _transcript(run: Run) -> Path:
    if not run.transcript.exists():
        pytest.fail("the walk did not run:\n" + run.result.stdout[-3000:]
                    + run.result.stderr[-3000:])
    return run.transcript


def test_the_guide_shows_what_a_fresh_run_prints(fresh_run: Run) -> None:
    """On drift this fails with the unified diff; `make guide` rewrites the blocks."""
    result = fresh_run.result
    assert result.returncode == 0, (
        f"docs/user-guide.md differs from a fresh run (exit {result.returncode}); run "
        f"`make guide` and reread the prose around each changed block.\n"
        f"{result.stdout[-12000:]}\n{result.stderr[-3000:]}")


def test_the_transcript_holds_nothing_that_changes_from_run_to_run(fresh_run: Run) -> None:
    text = _transcript(fresh_run).read_text()
    assert not re.search(r"127\.\d+\.\d+\.\d+:\d", text)  # ports: 127.0.0.3:PORT
    assert "mailrec-guide-" not in text and str(REPO) not in text  # temporary and local paths
    assert "MAILREC_NOW=2026-12-02T09:00:00+00:00" in text  # the fixed clock, not the wall's
    entries = json.loads(text)
    assert entries["lab-up"]["output"].splitlines()[0] == "rental_smtp: 127.0.0.3:PORT"
    assert "digest <digest>" in entries["validate"]["output"]


def test_check_fails_with_a_diff_when_an_output_line_is_altered(
        fresh_run: Run, tmp_path: Path) -> None:
    guide = tmp_path / "user-guide.md"
    original = GUIDE.read_text()
    block = MARKER.search(original)
    assert block, "the guide has no generated block"
    start = original.index("\n  ", block.end()) + 1  # the first output line of the block
    end = original.index("\n", start)
    line = original[start:end]
    altered = original[:start] + line + " (edited by hand)" + original[end:]
    guide.write_text(altered)

    result = guide_outputs("--check", "--guide", str(guide),
                           "--transcript", str(_transcript(fresh_run)))

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"-{line} (edited by hand)\n" in result.stdout
    assert f"+{line}\n" in result.stdout
    assert result.stdout.startswith(f"--- {guide} (as committed)\n+++ {guide} (a fresh run)\n")
    assert "make guide" in result.stderr
    assert guide.read_text() == altered  # --check changes nothing


def _blanked(guide: str) -> str:
    """The guide with every generated block emptied: what a person writes by hand."""
    return re.sub(r"(^<!-- generated: demo .* -->\n```text\n).*?^```$", r"\1```", guide,
                  flags=re.M | re.S)


def test_without_check_the_generated_blocks_are_rewritten_and_nothing_else(
        fresh_run: Run, tmp_path: Path) -> None:
    guide = tmp_path / "user-guide.md"
    guide.write_text(_blanked(GUIDE.read_text()))

    result = guide_outputs("--guide", str(guide), "--transcript", str(_transcript(fresh_run)))

    assert result.returncode == 0, result.stdout + result.stderr
    rewritten = guide.read_text()
    assert _blanked(rewritten) == _blanked(GUIDE.read_text())  # the prose is left as it is
    if fresh_run.result.returncode == 0:  # the committed guide is a fresh run's
        assert rewritten == GUIDE.read_text()
    assert list(tmp_path.iterdir()) == [guide]  # the temporary file was renamed into place


def test_an_excerpt_shows_the_command_the_selected_lines_and_the_exit_code(
        fresh_run: Run, tmp_path: Path) -> None:
    guide = tmp_path / "excerpt.md"
    guide.write_text("<!-- generated: demo first-plan summary -->\n```text\nold\n```\n")
    result = guide_outputs("--guide", str(guide), "--transcript", str(_transcript(fresh_run)))
    assert result.returncode == 0, result.stdout + result.stderr
    body = guide.read_text().split("```text\n")[1].removesuffix("```\n").splitlines()
    assert body[:2] == ["$ mailrec plan", "  ..."]  # the lines left out, marked
    assert re.fullmatch(r"  \d+ step\(s\): .*", body[2])
    assert body[3:] == ["  (exit 2)"]


def test_a_marker_naming_no_command_of_the_walk_is_an_error(
        fresh_run: Run, tmp_path: Path) -> None:
    guide = tmp_path / "user-guide.md"
    guide.write_text("<!-- generated: demo no-such-command -->\n```text\n```\n")
    result = guide_outputs("--check", "--guide", str(guide),
                           "--transcript", str(_transcript(fresh_run)))
    assert result.returncode == 1
    assert "no command named 'no-such-command'" in result.stderr
