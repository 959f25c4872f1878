"""`mailrec status`: a resource mailrec applied and someone changed afterwards is drifted;
a new wish is pending; a user whose state is met is in sync."""

from __future__ import annotations

import json

from reconciler.lab.layout import LabLayout

from .conftest import run_cli, set_users


def _rows(lab: LabLayout) -> dict[str, dict[str, str]]:
    result = run_cli("status", "--format", "json", "--lab", str(lab.root))
    return {r["resource"]: r for r in json.loads(result.output)["resources"]}


def test_status_tells_pending_from_drifted(lab: LabLayout) -> None:
    set_users(lab.root / "state", suga=("rental", "onprem"))
    rows = _rows(lab)
    assert rows["inbound/suga"]["status"] == "pending"
    assert rows["user/tanaka"]["status"] == "in sync"
    assert run_cli("apply", "--yes", "--lab", str(lab.root)).exit_code in (0, 2)

    # Someone edits the managed map by hand: suga's forward is gone.
    transport = lab.postfix_dir / "mailrec_transport"
    transport.write_text("".join(
        line + "\n" for line in transport.read_text().splitlines() if "suga" not in line))
    rows = _rows(lab)
    assert rows["inbound/suga"]["status"] == "drifted"
    assert "forwards mail for suga" in rows["inbound/suga"]["detail"]
    result = run_cli("status", "--lab", str(lab.root))
    assert result.exit_code == 2
    assert "drifted" in result.output

    assert run_cli("apply", "--yes", "--lab", str(lab.root)).exit_code in (0, 2)
    assert "suga@example.co.jp" in transport.read_text()
    assert _rows(lab).get("inbound/suga") is None
