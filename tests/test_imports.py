"""A command imports only what it uses (issue 9): `mailrec --help` and `validate` load neither
the drivers nor their protocol libraries (paramiko, dnspython, gitpython, invoke,
cryptography) nor rich; a plan of a file-only lab loads neither gitpython nor dnspython's
RFC 2136 client; `lab down` loads neither the drivers nor the model. Each case runs in a
fresh interpreter, so what other tests imported does not count; the assertions are about
sys.modules, never about time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, run_cli

# Run one `mailrec` command in-process through reconciler.cli.main, then record its exit
# code and every module the interpreter loaded.
CHILD = """
import json, sys
from reconciler.cli import main
report, argv = sys.argv[1], sys.argv[2:]
code = main(argv)
with open(report, "w", encoding="utf-8") as handle:
    json.dump({"code": code, "modules": sorted(sys.modules)}, handle)
"""

PROTOCOL_LIBRARIES = ("paramiko", "dns", "git", "invoke", "cryptography", "nacl", "bcrypt")
MACHINERY = (
    "rich",
    "reconciler.drivers",
    "reconciler.transport",
    "reconciler.apply",
    "reconciler.observe",
    "reconciler.plan",
    "reconciler.journal",
    "reconciler.render",
    "reconciler.daemon",
    "reconciler.lab.init",
    "reconciler.lab.services",
)
NOW = "2026-11-29T09:00:00+00:00"


def run_fresh(tmp_path: Path, *argv: str) -> tuple[int, str, set[str]]:
    """`mailrec ARGV` in a new interpreter: exit code, stdout, the modules it imported."""
    report = tmp_path / "modules.json"
    report.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "MAILREC_LAB"}
    env["MAILREC_NOW"] = NOW
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(report), *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert report.exists(), f"the child did not finish: {done.stderr}"
    data: dict[str, Any] = json.loads(report.read_text())
    return int(data["code"]), done.stdout, set(data["modules"])


def loaded(modules: set[str], *packages: str) -> list[str]:
    """The modules of `packages` (a package and everything under it) that were imported."""
    return sorted(m for m in modules for p in packages if m == p or m.startswith(p + "."))


@pytest.mark.parametrize("argv", [("--help",), ("plan", "--help"), ("lab", "--help")])
def test_help_imports_no_driver_no_protocol_library_and_no_model(
    tmp_path: Path, argv: tuple[str, ...]
) -> None:
    code, out, modules = run_fresh(tmp_path, *argv)
    assert code == 0 and "Usage: mailrec" in out
    assert loaded(modules, *PROTOCOL_LIBRARIES, *MACHINERY) == []
    # Help text needs no state either: neither the model (pydantic) nor the loader.
    assert loaded(modules, "pydantic", "reconciler.model", "reconciler.load") == []


def test_validate_imports_no_driver_no_protocol_library_and_no_planner(tmp_path: Path) -> None:
    code, out, modules = run_fresh(tmp_path, "validate", "--state", str(REPO / "state"))
    assert code == 0 and out.startswith("ok: "), out
    assert "reconciler.static" in modules  # it did check the state
    assert loaded(modules, *PROTOCOL_LIBRARIES, *MACHINERY) == []


def made_lab(tmp_path: Path) -> Path:
    lab = tmp_path / "lab"
    created = run_cli("lab", "init", str(lab), "--state", str(REPO / "state"),
                      env={"MAILREC_NOW": NOW})
    assert created.exit_code == 0, created.stderr
    return lab


def test_a_lab_plan_imports_no_git_no_ssh_and_no_rfc2136_client(tmp_path: Path) -> None:
    lab = made_lab(tmp_path)
    code, out, modules = run_fresh(tmp_path, "plan", "--lab", str(lab))
    assert code == 2 and "step(s)" in out, out
    assert "reconciler.drivers.backend" in modules and "dns.zone" in modules  # it observed
    # The lab's DNS is a zone file: no DNS client (queries, updates, TSIG keys, resolver);
    # no git without --git-base/--git-head; no SSH: every lab system is local files.
    assert loaded(modules, "git", "dns.query", "dns.message", "dns.update", "dns.tsigkeyring",
                  "dns.resolver", "reconciler.daemon", "paramiko", "invoke", "cryptography",
                  "reconciler.transport_ssh", "reconciler.drivers.rtx.session") == []


def test_lab_down_imports_no_driver_and_no_model(tmp_path: Path) -> None:
    code, out, modules = run_fresh(tmp_path, "lab", "down", str(made_lab(tmp_path)))
    assert code == 0 and "stopped 0 service(s)" in out, out
    assert "reconciler.lab.services" in modules  # it did look for services to stop
    others = [m for m in MACHINERY if m != "reconciler.lab.services"]
    assert loaded(modules, *PROTOCOL_LIBRARIES, *others, "pydantic") == []
