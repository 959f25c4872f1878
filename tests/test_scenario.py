"""The story of DESIGN.md as a scenario on the lab, through the real CLI:
initial -> mailboxes -> inbound one by one -> outbound (refused while anyone is inbound
onprem, then allowed) -> whitelist + router route -> MX TTL lowered, gate, MX moved ->
onprem retired after the quiet period. Every exit code and the lab's files are checked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from reconciler.drivers.dns import ZoneFileDns
from reconciler.drivers.postfix import parse_map
from reconciler.lab.layout import LabLayout
from reconciler.lab.services import stop_services

from .conftest import REPO, run_cli, set_users

USERS = ["suga", "tanaka", "sato", "suzuki", "takahashi", "watanabe", "ito", "yamamoto"]
T0 = datetime.fromisoformat("2026-11-29T09:00:00+00:00")


class Story:
    def __init__(self, lab: LabLayout) -> None:
        self.lab = lab
        self.now = T0

    def cli(self, *args: str) -> tuple[int, str]:
        result = run_cli(*args, "--lab", str(self.lab.root),
                         env={"MAILREC_NOW": self.now.isoformat(), "MAILREC_LAB": ""})
        return result.exit_code, result.output + result.stderr

    def plan_json(self, *extra: str) -> tuple[int, dict[str, object]]:
        code, out = self.cli("plan", "--format", "json", *extra)
        return code, json.loads(out)

    def steps(self, plan: dict[str, object]) -> dict[str, dict[str, object]]:
        return {s["id"]: s for s in plan["steps"]}  # type: ignore[index, union-attr]

    def drain(self, name: str) -> None:
        """Over IMAP: new/, cur/ and the Maildir++ folders' (`.Archive/cur`) alike."""
        maildir = self.lab.onprem_home / name / "Maildir"
        for message in [*maildir.glob("*/*"), *maildir.glob(".*/*/*")]:
            if message.is_file() and message.parent.name in ("new", "cur"):
                message.unlink()

    def set_key(self, section: str, key: str, value: str) -> None:
        path = self.lab.root / "state" / "mailrec.yaml"
        text = path.read_text()
        pattern = rf"(^{section}:[^\n]*\n(?:[ #].*\n|\n)*?\s+{key}:\s*)[^#\n]*?(\s*(#.*)?)$"
        new, count = re.subn(pattern, rf"\g<1>{value}\g<2>", text, count=1, flags=re.M)
        assert count == 1, (section, key)
        path.write_text(new)

    def transport(self) -> dict[str, str]:
        return parse_map((self.lab.postfix_dir / "mailrec_transport").read_text())


def test_the_story(lab: LabLayout) -> None:
    story = Story(lab)
    state = lab.root / "state"
    code, out = story.cli("validate")
    assert code == 0, out

    # Initial: the router policy is missing (filter strictly before route), and SPF lacks
    # the address that route sends from.
    code, plan = story.plan_json()
    assert code == 2
    assert [s["id"] for s in plan["steps"]] == [
        "dns/spf", "router/filter/10", "router/route/default"]
    assert story.cli("apply", "--yes")[0] == 0
    config = lab.router_config.read_text()
    assert "ip filter 10 pass * * tcp * smtp" in config
    assert "ip route default gateway 192.168.0.254 filter 10 gateway tunnel 2" in config
    assert story.plan_json()[0] == 0

    # Users' inbound, one by one: mailbox before the route, the old account after the drain.
    for name in USERS:
        set_users(state, **{name: ("rental", "onprem")})
        code, plan = story.plan_json()
        steps = story.steps(plan)
        assert steps[f"mailbox/{name}"]["status"] == "ready"
        assert steps[f"inbound/{name}"]["status"] == "ready"
        order = [s["id"] for s in plan["steps"]]
        assert order.index(f"mailbox/{name}") < order.index(f"inbound/{name}")
        code, out = story.cli("apply", "--yes")
        assert code in (0, 2), out
        assert story.transport()[f"{name}@example.co.jp"] == "smtp:[example.sakura.ne.jp]:25"
        assert f"{name}@example.co.jp" in lab.rental_mailboxes.read_text()
        if code == 2:  # the old mailbox still holds mail: removal waits for the drain
            code, plan = story.plan_json()
            assert story.steps(plan)[f"onprem-mailbox/{name}"]["status"] == "gated"
            story.drain(name)
            assert story.cli("apply", "--yes")[0] == 0
        # Archived as on a real host: the account and its home stay, the drained Maildir
        # is renamed aside and the user listed.
        home = lab.onprem_home / name
        assert home.is_dir() and not (home / "Maildir").exists()
        assert [p.name.startswith("Maildir.mailrec-removed-") for p in home.iterdir()] == [True]
        assert f"\n{name}:x:" in (lab.onprem / "etc" / "passwd").read_text()
        assert name in parse_map((lab.postfix_dir / "mailrec_removed").read_text())
        if name == "suga":
            # Outbound while colleagues still receive onprem: refused, nothing changes.
            set_users(state, suga=("rental", "rental"))
            code, plan = story.plan_json()
            assert code == 3
            assert story.steps(plan)["outbound/suga"]["status"] == "refused"
            codes = {f["code"] for f in story.steps(plan)["outbound/suga"]["findings"]}
            assert "MR002" in codes
            assert story.cli("ack", "outbound/suga")[0] == 3
            set_users(state, suga=("rental", "onprem"))

    # Outbound: whitelist and SPF come first, then each person's ack.
    story.set_key("rental", "whitelist", "[203.0.113.8/29]")
    set_users(state, **{n: ("rental", "rental") for n in USERS})
    code, out = story.cli("apply", "--yes", "--allow-bulk")
    assert code == 2, out
    assert "203.0.113.8/29" in lab.rental_whitelist.read_text()
    zone = ZoneFileDns(lab.zone_file("example.co.jp"), "example.co.jp").observe()
    assert "include:_spf.example.sakura.ne.jp" in zone.spf_terms
    assert "ip4:198.51.100.10" in zone.spf_terms
    code, plan = story.plan_json("--allow-bulk")
    suga = story.steps(plan)["outbound/suga"]
    assert suga["status"] == "gated" and suga["gate"]["kind"] == "ack"  # type: ignore[index]
    assert "port 25, no authentication" in suga["gate"]["instructions"][0]  # type: ignore[index]
    for name in USERS:
        assert story.cli("ack", f"outbound/{name}", "--note", "client changed")[0] == 0
    assert story.plan_json()[0] == 0

    # MX: TTL lowered first, the move waits one old TTL.
    story.set_key("dns", "mx", "rental")
    assert story.cli("apply", "--yes")[0] == 2
    zone = ZoneFileDns(lab.zone_file("example.co.jp"), "example.co.jp").observe()
    assert zone.mx_ttl == 300 and zone.mx_hosts == ("mail.example.co.jp.",)
    code, plan = story.plan_json()
    mx = story.steps(plan)["dns/mx"]
    assert mx["status"] == "gated"
    assert mx["findings"][0]["code"] == "MR004"  # type: ignore[index]
    story.now += timedelta(minutes=59)
    assert story.plan_json()[0] == 2
    story.now += timedelta(minutes=2)
    assert story.cli("apply", "--yes")[0] == 0
    zone = ZoneFileDns(lab.zone_file("example.co.jp"), "example.co.jp").observe()
    assert zone.mx_hosts == ("example.sakura.ne.jp.",) and zone.mx_ttl == 3600

    # Retire: after the old TTL and the quiet period; SPF drops onprem's IP only then.
    story.set_key("onprem", "state", "retired")
    code, plan = story.plan_json()
    assert story.steps(plan)["onprem/retire"]["status"] == "gated"
    assert story.steps(plan)["dns/spf-retire"]["status"] == "gated"
    story.now += timedelta(hours=47)
    assert story.steps(story.plan_json()[1])["onprem/retire"]["status"] == "gated"
    story.now += timedelta(hours=2)
    assert story.cli("apply", "--yes")[0] == 0
    assert lab.onprem_retired.exists()
    zone = ZoneFileDns(lab.zone_file("example.co.jp"), "example.co.jp").observe()
    assert zone.spf_terms == ("v=spf1", "include:_spf.example.sakura.ne.jp", "~all")
    code, plan = story.plan_json()
    assert code == 0 and plan["in_sync"] is True and plan["steps"] == []


def test_lab_from_state_equals_state(tmp_path: Path) -> None:
    """`lab init --from STATE` builds a world already in sync with STATE."""
    state = tmp_path / "state"
    state.mkdir()
    for file in (REPO / "state").glob("*.yaml"):
        (state / file.name).write_text(file.read_text())
    set_users(state, suga=("rental", "onprem"), tanaka=("rental", "onprem"))
    code = run_cli("lab", "init", str(tmp_path / "lab"), "--from", str(state)).exit_code
    assert code == 0
    result = run_cli("plan", "--lab", str(tmp_path / "lab"), "--format", "json")
    assert result.exit_code == 0, result.output


@pytest.mark.timeout(240)
def test_make_run_demo_end_to_end(tmp_path: Path) -> None:
    """`make run`'s walk, as a user runs it: subprocesses, lab services up (rental SMTP and
    RTX emulator over SSH), every expected exit code checked by the demo itself."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "reconciler.demo", "--lab", str(tmp_path / "lab"),
             "--state", str(REPO / "state")],
            capture_output=True, text=True, timeout=220, check=False,
        )
    finally:
        if (tmp_path / "lab").exists():
            stop_services(LabLayout(tmp_path / "lab"))  # never leave services behind
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rtx_ssh: 127.0.0.7:" in result.stdout
    assert "applied dns/mx" in result.stdout
    assert "applied onprem/retire" in result.stdout
