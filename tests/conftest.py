"""Fixtures shared by the core tests: a lab built from the example state, and the CLI run
in-process (same code path as the `mailrec` command, exit codes included)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler.cli import cli
from reconciler.lab.init import init_lab
from reconciler.lab.layout import LabLayout
from reconciler.load import load_state

REPO = Path(__file__).resolve().parent.parent
STATE = REPO / "state"


@dataclass
class CliResult:
    exit_code: int
    output: str  # stdout
    stderr: str


def run_cli(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """Run `mailrec ARGS` in-process; the exit code is exactly what the shell would see."""
    runner = CliRunner()
    result = runner.invoke(cli, list(args), env=env, catch_exceptions=False)
    return CliResult(result.exit_code, result.stdout, result.stderr)


def tree_digest(root: Path) -> str:
    """A digest of every file under root (names and bytes): "the lab is unchanged"."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and ".mailrec" not in path.parts:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(autouse=True)
def target_home(tmp_path_factory: pytest.TempPathFactory,
                monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own MAILREC_HOME: the journals of non-lab targets never outlive it (nor
    land in /var/lib/mailrec of the machine running the tests)."""
    home = tmp_path_factory.mktemp("mailrec-home")
    monkeypatch.setenv("MAILREC_HOME", str(home))
    return home


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LabLayout]:
    """A fresh lab of the example company before the migration (no network services)."""
    monkeypatch.delenv("MAILREC_LAB", raising=False)
    monkeypatch.setenv("MAILREC_NOW", "2026-11-29T09:00:00+00:00")
    layout = init_lab(tmp_path / "lab", load_state(STATE), migrated=False, force=False)
    yield layout


@pytest.fixture
def lab_state(lab: LabLayout) -> Path:
    return lab.root / "state"


def set_users(state_dir: Path, **users: tuple[str, str]) -> None:
    """Rewrite users.yaml entries: set_users(d, suga=("rental", "onprem"))."""
    path = state_dir / "users.yaml"
    lines = []
    for line in path.read_text().splitlines():
        name = line.strip().split(":", 1)[0]
        if name in users and "{" in line:
            inbound, outbound = users[name]
            indent = line[: len(line) - len(line.lstrip())]
            line = f"{indent}{name}: {{inbound: {inbound}, outbound: {outbound}}}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")


def copy_state(target: Path) -> Path:
    shutil.copytree(STATE, target)
    return target


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"
