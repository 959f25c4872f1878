"""The lab's onprem Postfix (reconciler/drivers/lab_onprem.py) behaves as the real driver does
(postfix_host.py, tests/integration/test_onprem_postfix.py): removing a drained mailbox
archives it and keeps the account, mail in Maildir++ folders counts, mail that reaches an
archived mailbox again is reported (MR020) rather than waited for, accounts outside the uid
range that hold mail are seen, and the mail log is read by time across its rotations."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from reconciler.drivers.lab_onprem import LabOnprem
from reconciler.drivers.postfix import PostfixError, parse_main_cf, parse_map
from reconciler.drivers.postfix_host import ARCHIVE_INFIX, REMOVED_LIST
from reconciler.lab.layout import LabLayout

from .conftest import REPO, run_cli, set_users

NOW = datetime.fromisoformat("2026-11-29T09:00:00+00:00")  # the `lab` fixture's MAILREC_NOW
DOMAIN = "example.co.jp"
RELAY = ("example.sakura.ne.jp", 25)


@pytest.fixture
def onprem(lab: LabLayout) -> LabOnprem:
    return LabOnprem(lab, DOMAIN)


def maildir(lab: LabLayout, user: str) -> Path:
    return lab.onprem_home / user / "Maildir"


def messages(folder: Path) -> list[Path]:
    return [p for sub in ("new", "cur") if (folder / sub).is_dir()
            for p in (folder / sub).iterdir()]


def deliver(folder: Path, name: str = "1764400000.M1P1.mail") -> None:
    """What local(8) does: a message into new/ (creating the Maildir if it is gone)."""
    for sub in ("new", "cur", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "new" / name).write_text("Subject: still here\n\nx\n")


def test_remove_mailbox_archives_and_keeps_the_account(lab: LabLayout, onprem: LabOnprem
                                                       ) -> None:
    assert onprem.observe(NOW).accounts["suzuki"] == 0
    with pytest.raises(PostfixError, match="not forwarded"):
        onprem.remove_mailbox("suzuki")  # it still receives here
    assert maildir(lab, "suzuki").is_dir()

    onprem.route_to_rental("suzuki", *RELAY)
    onprem.remove_mailbox("suzuki")
    home = lab.onprem_home / "suzuki"
    assert home.is_dir() and not maildir(lab, "suzuki").exists()
    (archived,) = [p for p in home.iterdir() if p.name.startswith("Maildir")]
    assert archived.name.startswith(f"Maildir{ARCHIVE_INFIX}") and archived.is_dir()
    assert "\nsuzuki:x:" in (lab.onprem / "etc" / "passwd").read_text()
    listed = parse_map((lab.postfix_dir / REMOVED_LIST).read_text())
    assert listed == {"suzuki": f"/home/suzuki/{archived.name}"}
    facts = onprem.observe(NOW)
    assert "suzuki" not in facts.accounts and "suzuki" in facts.transport
    assert facts.space.stray_mail == {}
    onprem.remove_mailbox("suzuki")  # idempotent
    assert [p.name for p in home.iterdir()] == [archived.name]
    # Routing back would deliver into a fresh Maildir nobody counts: refused, as on a host.
    with pytest.raises(PostfixError, match="archived"):
        onprem.route_to_onprem("suzuki")
    assert "suzuki" in onprem.observe(NOW).transport


def test_mail_in_a_maildir_plus_plus_folder_blocks_removal(lab: LabLayout, onprem: LabOnprem
                                                           ) -> None:
    box = maildir(lab, "ito")  # lab init files ito's third message in .Archive/cur
    assert len(messages(box / ".Archive")) == 1
    assert onprem.observe(NOW).accounts["ito"] == 3
    onprem.route_to_rental("ito", *RELAY)
    for message in messages(box):  # drained new/ and cur/, not the folder
        message.unlink()
    assert onprem.observe(NOW).accounts["ito"] == 1
    with pytest.raises(PostfixError, match=r"MR008: .*ito still holds 1 message"):
        onprem.remove_mailbox("ito")
    assert box.is_dir() and not (lab.postfix_dir / REMOVED_LIST).exists()
    for message in messages(box / ".Archive"):
        message.unlink()
    onprem.remove_mailbox("ito")
    assert not box.exists()
    assert "ito" in parse_map((lab.postfix_dir / REMOVED_LIST).read_text())


def test_mail_in_an_archived_mailbox_is_stray_never_a_drain(lab: LabLayout, onprem: LabOnprem
                                                            ) -> None:
    onprem.route_to_rental("suzuki", *RELAY)
    onprem.remove_mailbox("suzuki")
    # Something still delivers locally: local(8) recreates ~/Maildir.
    deliver(maildir(lab, "suzuki"))
    deliver(maildir(lab, "suzuki") / ".Archive", "1764400001.M2P1.mail")
    facts = onprem.observe(NOW)
    assert facts.space.stray_mail == {"suzuki": 2}
    assert "suzuki" not in facts.accounts  # no mailbox to wait for, no removal step again
    onprem.remove_mailbox("suzuki")  # listed already: nothing to do
    assert facts == onprem.observe(NOW)


def test_accounts_outside_the_uid_range_with_mail(lab: LabLayout, onprem: LabOnprem) -> None:
    # Every account outside the uid range is listed, none holds mail yet.
    listed = onprem.observe(NOW).space.other_accounts
    assert {"root", "daemon", "nobody"} <= set(listed) and not any(listed.values())
    deliver(lab.onprem / "root" / "Maildir")  # root's home is /root
    with (lab.onprem / "etc" / "passwd").open("a") as passwd:
        passwd.write("olduser:x:500:500:Old:/home/olduser:/bin/bash\n"
                     "escape:x:501:501::/../../outside:/bin/sh\n")
    deliver(lab.onprem_home / "olduser" / "Maildir" / ".Archive")
    facts = onprem.observe(NOW)
    holding = {name: n for name, n in facts.space.other_accounts.items() if n}
    assert holding == {"root": 1, "olduser": 1}
    assert "root" not in facts.accounts and "olduser" not in facts.accounts


def test_the_lab_log_is_read_by_time(lab: LabLayout) -> None:
    log = lab.onprem_maillog
    assert sorted(p.name for p in log.parent.iterdir()) == [
        "mail.log", "mail.log.1", "mail.log.2.gz"]
    onprem = LabOnprem(lab, DOMAIN)
    assert onprem.observe(NOW).last_mail_at == NOW - timedelta(hours=3)
    # Rejects only in the current log: the delivery a day earlier, from mail.log.1.
    start = NOW - timedelta(hours=2)
    log.write_text("".join(
        f"{(start + timedelta(seconds=i)).strftime('%b %e %H:%M:%S')} mail postfix/smtpd[9]: "
        "NOQUEUE: reject: RCPT from unknown[198.51.100.77]: 550 5.1.1 User unknown\n"
        for i in range(10_000)))
    assert onprem.observe(NOW).last_mail_at == NOW - timedelta(days=1, hours=3)
    # Only the gzipped rotation holds mail.
    older = log.with_name("mail.log.1")
    older.write_text(older.read_text().replace("client=", "lost connection from").replace(
        "status=sent", "status=expired"))
    assert onprem.observe(NOW).last_mail_at == NOW - timedelta(days=2, hours=3)
    # Rotated away: the logs reach back 26 h, less than the quiet period; the worst case.
    log.with_name("mail.log.2.gz").unlink()
    assert onprem.observe(NOW).last_mail_at == NOW - timedelta(days=1, hours=3)
    # A short quiet period is covered, and quiet.
    assert LabOnprem(lab, DOMAIN, quiet_period=timedelta(hours=1)).observe(
        NOW).last_mail_at is None
    log.unlink()
    with pytest.raises(PostfixError, match=r"mail log .* is missing"):
        onprem.observe(NOW)


def test_the_lab_log_zone(lab: LabLayout) -> None:
    lab.onprem_maillog.write_text(  # 17:00:01 in Tokyo is 08:00:01 UTC
        "Nov 29 17:00:01 mail postfix/smtpd[1]: 1A2B3C: client=x.example.net[192.0.2.1]\n")
    tokyo = LabOnprem(lab, DOMAIN, log_zone=ZoneInfo("Asia/Tokyo"))
    assert tokyo.observe(NOW).last_mail_at == datetime(2026, 11, 29, 8, 0, 1, tzinfo=UTC)
    assert LabOnprem(lab, DOMAIN).observe(NOW).last_mail_at == datetime(
        2026, 11, 29, 17, 0, 1, tzinfo=UTC)


def test_stray_mail_after_archive_is_a_finding_in_the_plan(lab: LabLayout) -> None:
    state = lab.root / "state"
    set_users(state, suzuki=("rental", "onprem"))
    with lab.rental_mailboxes.open("a") as boxes:
        boxes.write(f"suzuki@{DOMAIN}\n")
    (lab.rental_maildirs / "suzuki" / "new").mkdir(parents=True)
    assert run_cli("ack", "mailbox/suzuki", "--lab", str(lab.root)).exit_code == 0
    result = run_cli("apply", "--yes", "--lab", str(lab.root))
    assert result.exit_code == 0, result.output + result.stderr
    assert "suzuki" in parse_map((lab.postfix_dir / REMOVED_LIST).read_text())
    assert (lab.onprem_home / "suzuki").is_dir()
    deliver(maildir(lab, "suzuki"))
    plan = json.loads(run_cli("plan", "--lab", str(lab.root), "--format", "json").output)
    codes = {(f["code"], tuple(f["subjects"])) for f in plan["findings"]}
    assert ("MR020", ("suzuki",)) in codes
    assert not any(s["id"] == "onprem-mailbox/suzuki" for s in plan["steps"])


def test_a_migrated_lab_keeps_the_accounts_with_archived_mailboxes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    for file in (REPO / "state").glob("*.yaml"):
        (state / file.name).write_text(file.read_text())
    set_users(state, suga=("rental", "onprem"))
    result = run_cli("lab", "init", str(tmp_path / "lab"), "--from", str(state),
                     env={"MAILREC_NOW": NOW.isoformat()})
    assert result.exit_code == 0, result.stderr
    lab = LabLayout((tmp_path / "lab").resolve())
    assert "\nsuga:x:" in (lab.onprem / "etc" / "passwd").read_text()
    (archived,) = (lab.onprem_home / "suga").iterdir()
    assert archived.name.startswith(f"Maildir{ARCHIVE_INFIX}")
    assert parse_map((lab.postfix_dir / REMOVED_LIST).read_text()) == {
        "suga": f"/home/suga/{archived.name}"}
    facts = LabOnprem(lab, DOMAIN).observe(NOW)
    assert "suga" not in facts.accounts and "suga" in facts.transport
    assert gzip.decompress(lab.onprem_maillog.with_name("mail.log.2.gz").read_bytes())


def test_remove_fallback_removes_only_what_points_at_the_rental(lab: LabLayout,
                                                               onprem: LabOnprem) -> None:
    main_cf = lab.postfix_dir / "main.cf"
    main_cf.write_text(main_cf.read_text() + "fallback_transport = smtp:[example.sakura.ne.jp]:25\n"
                       "luser_relay = postmaster@elsewhere.example\n")
    rental = ("example.sakura.ne.jp", "example.sakura.ne.jp.")  # smtp_host, mx_host
    assert onprem.remove_fallback(*rental) == ("fallback_transport",)
    params = parse_main_cf(main_cf.read_text())
    assert params["fallback_transport"] == ""
    assert params["luser_relay"] == "postmaster@elsewhere.example"
    assert onprem.remove_fallback(*rental) == ()


# --- the address space (issue 8): the lab reads and forwards names as a real host does ---


def test_the_lab_reads_its_address_space_from_its_files(lab: LabLayout,
                                                        onprem: LabOnprem) -> None:
    aliases = lab.onprem / "etc" / "aliases"
    aliases.write_text(aliases.read_text() + "info: suga, tanaka\n")
    virtual = lab.onprem / "etc" / "postfix" / "virtual"
    virtual.write_text(f"sales@{DOMAIN} suga\n")
    main_cf = lab.postfix_dir / "main.cf"
    main_cf.write_text(main_cf.read_text() + "virtual_alias_maps = hash:/etc/postfix/virtual\n")
    space = onprem.observe(NOW).space
    assert space.aliases["postmaster"] == ("root",)
    assert space.aliases["info"] == ("suga", "tanaka")
    assert space.virtual_aliases["sales"] == ("suga",)
    assert "mail.example.co.jp" in space.local_domains and DOMAIN in space.local_domains
    # A table it cannot read (ldap:, a missing file) is a place it cannot see: reported.
    main_cf.write_text(main_cf.read_text().replace(
        "hash:/etc/postfix/virtual", "ldap:/etc/postfix/ldap-virtual.cf"))
    assert onprem.observe(NOW).space.unreadable == ("ldap:/etc/postfix/ldap-virtual.cf",)


def test_the_lab_forwards_every_local_name_and_sees_a_partial_forward(
        lab: LabLayout, onprem: LabOnprem) -> None:
    onprem.route_to_rental("suga", *RELAY)
    transport = parse_map((lab.postfix_dir / "mailrec_transport").read_text())
    virtual = parse_map((lab.postfix_dir / "mailrec_virtual").read_text())
    names = onprem.observe(NOW).space.local_domains
    for name in names:
        assert transport[f"suga@{name}"] == "smtp:[example.sakura.ne.jp]:25"
        if name != DOMAIN:
            assert virtual[f"suga@{name}"] == f"suga@{DOMAIN}"
    assert "mailrec_virtual" in parse_main_cf(
        (lab.postfix_dir / "main.cf").read_text())["virtual_alias_maps"]
    assert "suga" not in onprem.observe(NOW).partial_forward
    # Someone deletes the rewrite for the host name by hand: mail to suga@mail... would reach
    # a rental that refuses it. Observed as a partial forward (MR018's repair: inbound/suga).
    (lab.postfix_dir / "mailrec_virtual").write_text(
        "\n".join(f"{k} {v}" for k, v in virtual.items() if "@mail." not in k) + "\n")
    assert "suga" in onprem.observe(NOW).partial_forward
    onprem.route_to_onprem("suga")
    for name in ("mailrec_transport", "mailrec_virtual", "mailrec_recipients"):
        assert not [k for k in parse_map((lab.postfix_dir / name).read_text())
                    if k.startswith("suga@")], name


def test_an_alias_in_the_state_is_created_at_the_lab_rental_before_the_mx(
        lab: LabLayout) -> None:
    """End to end through the CLI: onprem's `info` alias, declared in the state, is created
    at the rental by the plan; an onprem alias the state does not name refuses the MX move
    (MR019) and the plan says what to add."""
    state = lab.root / "state" / "mailrec.yaml"
    aliases = lab.onprem / "etc" / "aliases"
    aliases.write_text(aliases.read_text() + "info: suga, tanaka\nsales: suga\n")
    state.write_text(state.read_text().replace(
        "  postmaster: rental", "  postmaster: rental\n  info: [suga, tanaka]"))
    _, plan = plan_json(lab)
    ids = {s["id"]: s for s in plan["steps"]}
    assert ids["alias/info"]["status"] == "ready"
    warnings = [f for f in plan["findings"] if f["code"] == "MR019"]
    assert any("sales@example.co.jp" in f["message"] and "sales: [suga]" in f["message"]
               for f in warnings)
    assert run_cli("apply", "--lab", str(lab.root), "--yes").exit_code == 0
    assert ("info@example.co.jp: suga@example.co.jp, tanaka@example.co.jp"
            in lab.rental_aliases.read_text())
    # Everyone moved and the MX asked for: refused while `sales` has no destination.
    set_users(lab.root / "state", **{u: ("rental", "onprem") for u in (
        "suga", "tanaka", "sato", "suzuki", "takahashi", "watanabe", "ito", "yamamoto")})
    state.write_text(state.read_text().replace("  mx: onprem", "  mx: rental"))
    _, moved = plan_json(lab, "--allow-bulk")
    mx = {s["id"]: s for s in moved["steps"]}["dns/mx"]
    assert mx["status"] == "refused"
    assert any(f["code"] == "MR019" and "sales@" in f["message"] for f in mx["findings"])


def plan_json(lab: LabLayout, *args: str) -> tuple[int, dict[str, object]]:
    result = run_cli("plan", "--lab", str(lab.root), "--format", "json", *args)
    assert result.exit_code in (0, 2, 3), result.stderr
    return result.exit_code, json.loads(result.output)
