"""The fast paths of issue 9 give what the plain ones gave, byte for byte: routing many users
in one write (lab init), map parsing and formatting, the lab's Maildir counting and passwd
reading, the plan's text and JSON rendering, the lab's messages, the world's running counts.

Each fast path is compared with a reference: the code it replaced (kept here), or the library
call it stands for. No assertion is about time."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from io import StringIO
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.text import Text

from reconciler.drivers.lab_onprem import LabOnprem
from reconciler.drivers.postfix import (
    DEFAULT_UID_RANGE,
    PostfixError,
    edit_map,
    format_map,
    parse_map,
    parse_passwd,
    passwd_homes,
)
from reconciler.drivers.postfix_mailbox import count_maildir
from reconciler.findings import Finding, Gate, Severity
from reconciler.lab import init as lab_init
from reconciler.lab.layout import LabLayout
from reconciler.load import load_state
from reconciler.model import Side
from reconciler.observe import world_checksum
from reconciler.plan import Plan, PlannedStep, Status
from reconciler.render import (
    plan_json,
    render_json,
    render_markdown,
    render_text,
)
from reconciler.steps import CreateMailbox, MoveInbound
from reconciler.world import Outbound, UserCounts, UserFacts, World

from .conftest import REPO, STATE
from .test_render import (
    MOVED_USER,
    ONPREM_USER,
    PipeStep,
    make_state,
    make_world,
    plan_for,
)

NOW = datetime.fromisoformat("2026-11-29T09:00:00+00:00")  # the `lab` fixture's MAILREC_NOW
DOMAIN = "example.co.jp"
RELAY = ("example.sakura.ne.jp", 25)
MAPS = ("mailrec_recipients", "mailrec_virtual", "mailrec_transport", "main.cf")


# --- routing many users at once (lab init) ----------------------------------------------------


def _copy_lab(lab: LabLayout, target: Path) -> LabLayout:
    shutil.copytree(lab.root, target, symlinks=True)
    return LabLayout(target)


def test_routing_many_users_at_once_writes_what_routing_them_one_by_one_writes(
    lab: LabLayout, tmp_path: Path
) -> None:
    other = _copy_lab(lab, tmp_path / "other")
    users = ["suga", "tanaka", "sato", "ito"]
    one_by_one = LabOnprem(lab, DOMAIN)
    for user in users:
        one_by_one.route_to_rental(user, *RELAY)
    LabOnprem(other, DOMAIN).route_to_rental_many(users, *RELAY)
    for name in MAPS:
        assert (lab.postfix_dir / name).read_bytes() == (other.postfix_dir / name).read_bytes()
    # Observed the same, too (every local name forwarded, none partial).
    assert LabOnprem(lab, DOMAIN).observe(NOW) == LabOnprem(other, DOMAIN).observe(NOW)


def test_routing_one_user_is_routing_a_list_of_one(lab: LabLayout, tmp_path: Path) -> None:
    other = _copy_lab(lab, tmp_path / "other")
    LabOnprem(lab, DOMAIN).route_to_rental("suga", *RELAY)
    LabOnprem(other, DOMAIN).route_to_rental_many(["suga"], *RELAY)
    for name in (*MAPS, *(m + ".bak" for m in MAPS)):
        mine, theirs = lab.postfix_dir / name, other.postfix_dir / name
        assert mine.exists() == theirs.exists(), name
        if mine.exists():
            assert mine.read_bytes() == theirs.read_bytes(), name


def test_routing_many_refuses_an_unsafe_name_before_writing_anything(lab: LabLayout) -> None:
    before = {name: (lab.postfix_dir / name).read_bytes() for name in ("main.cf",
              "mailrec_recipients", "mailrec_transport")}
    with pytest.raises(PostfixError, match="unsafe user name"):
        LabOnprem(lab, DOMAIN).route_to_rental_many(["suga", "bad name"], *RELAY)
    assert {name: (lab.postfix_dir / name).read_bytes() for name in before} == before
    assert not (lab.postfix_dir / "mailrec_virtual").exists()


# --- maps --------------------------------------------------------------------------------------


def _old_parse_map(text: str) -> dict[str, str]:
    entries: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, *value = line.split(None, 1)
        entries[key.lower()] = value[0].strip() if value else ""
    return entries


def _old_format_map(entries: dict[str, str], header: str) -> str:
    body = "".join(f"{k} {v}\n" for k, v in sorted(entries.items()))
    return f"# {header}\n# Managed by mailrec: edits are overwritten.\n{body}"


_MAP_ALPHABET = st.sampled_from(
    ["a", "B", "@", ".", "#", ":", "[", "]", "-", "1", " ", "\t", "\n", "\r", "\r\n", "\x0b",
     "\x0c", "\x1c", "\x85", "\u2028", "\u3000", "\xa0", "é", "İ", "ß"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_MAP_ALPHABET, max_size=60).map("".join))
def test_parse_map_reads_what_the_old_parser_read(text: str) -> None:
    assert parse_map(text) == _old_parse_map(text)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=12), max_size=20))
def test_format_and_edit_map_write_what_they_wrote(entries: dict[str, str]) -> None:
    assert format_map(entries, "m") == _old_format_map(entries, "m")
    text = _old_format_map(entries, "m")
    changes: dict[str, str | None] = {k: None for k in list(entries)[:3]}
    changes["new@x"] = "OK"
    old = _old_parse_map(text)
    for key, value in changes.items():
        if value is None:
            old.pop(key, None)
        else:
            old[key] = value
    assert edit_map(text, changes, "m") == _old_format_map(old, "m")


def test_a_large_map_round_trips() -> None:
    entries = {f"u{i:06d}@{name}": "smtp:[example.sakura.ne.jp]:25"
               for i in range(20_000) for name in ("example.co.jp", "localhost")}
    text = format_map(entries, "mailrec_transport")
    assert parse_map(text) == entries
    assert text == _old_format_map(entries, "mailrec_transport")


# --- passwd ------------------------------------------------------------------------------------


def _old_lab_accounts(text: str, uid_range: tuple[int, int]) -> tuple[dict[str, Path],
                                                                      dict[str, Path]]:
    people = parse_passwd(text, uid_range)
    others: dict[str, Path] = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 7 and parts[2].isdigit() and parts[0] and parts[0] not in people:
            others[parts[0]] = Path(parts[5])
    return people, others


_PASSWD_LINE = st.tuples(
    st.sampled_from(["suga", "tanaka", "root", "Bad", "mach$", "-x", ".h", "", "a.b", "u1"]),
    st.sampled_from(["0", "500", "1000", "1001", "59999", "60000", "x", "", "-1"]),
    st.sampled_from(["/home/a", "/root", "/home//b", "/home/./c", "", "rel", "/", "//x"]),
    st.integers(min_value=4, max_value=8),
).map(lambda t: ":".join([t[0], "x", t[1], t[1], "G", t[2], "/bin/sh", "extra"][:t[3]]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_PASSWD_LINE, max_size=12), st.sampled_from([DEFAULT_UID_RANGE, (500, 60000)]))
def test_passwd_homes_reads_what_the_lab_read(lines: list[str],
                                              uid_range: tuple[int, int]) -> None:
    text = "\n".join(lines) + "\n"
    people, others = passwd_homes(text, uid_range)
    old_people, old_others = _old_lab_accounts(text, uid_range)
    assert {n: Path(h) for n, h in people.items()} == old_people
    assert {n: Path(h) for n, h in others.items()} == old_others
    assert list(others) == list(old_others)


# --- Maildirs ---------------------------------------------------------------------------------


def _old_count_messages(directory: Path) -> int:
    try:
        with os.scandir(directory) as entries:
            return sum(1 for e in entries if e.is_file() and not e.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return 0


def _old_count_maildir(path: Path) -> int:
    total = sum(_old_count_messages(path / sub) for sub in ("new", "cur"))
    try:
        with os.scandir(path) as entries:
            folders = [Path(e.path) for e in entries if e.name.startswith(".") and e.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return total
    for folder in folders:
        total += sum(_old_count_messages(folder / sub) for sub in ("new", "cur"))
    return total


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")


def _maildirs(base: Path) -> list[Path]:
    """Maildirs of every shape the counting meets: plain, Maildir++, dot files, a file where
    a directory belongs, symlinks (to a directory, dangling), subdirectories in new/."""
    # Per shape: the files to make (a name ending in "/" is a directory).
    shapes: dict[str, tuple[str, ...]] = {
        "missing": (),
        "empty": ("",),
        "plain": ("new/1", "cur/2:2,S", "tmp/3"),
        "dotfiles": ("new/.hidden", "cur/4"),
        "folders": (".Archive/cur/5", ".Sent.2024/new/6", ".Sent.2024/cur/7",
                    "notafolder/new/8", ".Empty/tmp/9"),
        "file-as-dir": ("new", ".Archive", "cur/10"),
        "subdir-in-new": ("new/sub/", "new/11"),
    }
    made = []
    for shape, files in shapes.items():
        maildir = base / shape / "Maildir"
        for name in files:
            if not name or name.endswith("/"):
                (maildir / name).mkdir(parents=True, exist_ok=True)
            else:
                _touch(maildir / name)
        made.append(maildir)
    _touch(base / "not-a-dir" / "Maildir")
    made.append(base / "not-a-dir" / "Maildir")
    # Symlinks: new/ to a real directory, a dangling cur/, a folder that is a symlink, a
    # message that is a symlink, a Maildir that is a symlink.
    linked = base / "linked" / "Maildir"
    _touch(base / "elsewhere" / "a")
    _touch(base / "elsewhere" / "b")
    linked.mkdir(parents=True)
    (linked / "new").symlink_to(base / "elsewhere")
    (linked / "cur").symlink_to(base / "nowhere")
    (linked / ".Linked").mkdir()
    (linked / ".Linked" / "cur").symlink_to(base / "elsewhere")
    (linked / ".Dangling").symlink_to(base / "nowhere")
    _touch(base / "target-msg")
    (base / "elsewhere2").mkdir()
    (base / "elsewhere2" / "m").symlink_to(base / "target-msg")
    (base / "elsewhere2" / "broken").symlink_to(base / "nowhere")
    (linked / ".Msgs").mkdir()
    (linked / ".Msgs" / "new").symlink_to(base / "elsewhere2")
    made.append(linked)
    alias = base / "alias" / "Maildir"
    alias.parent.mkdir()
    alias.symlink_to(base / "plain" / "Maildir")
    made.append(alias)
    return made


def test_count_maildir_counts_what_it_counted(tmp_path: Path) -> None:
    for maildir in _maildirs(tmp_path):
        expected = _old_count_maildir(maildir)
        assert count_maildir(maildir) == expected, maildir
        assert count_maildir(str(maildir)) == expected, maildir


def test_the_lab_counts_homes_as_passwd_writes_them(lab: LabLayout) -> None:
    """Homes that are not plain absolute paths take the Path way (`LabOnprem._maildir`)."""
    onprem = LabOnprem(lab, DOMAIN)
    count = onprem._counter()
    _touch(lab.onprem_home / "odd" / "Maildir" / "new" / "1")

    def old(home: str) -> int:
        maildir = onprem._maildir(Path(home))
        return 0 if maildir is None else _old_count_maildir(maildir)

    for home in ("/home/suga", "/home/odd", "/home//odd", "/home/./odd", "/home/odd/",
                 "/home/x/../odd", "home/odd", "/", "", "/nonexistent", "//home/odd"):
        assert _outcome(count, home) == _outcome(old, home), home


def _outcome(count: Callable[[str], int], home: str) -> tuple[str, object]:
    try:
        return "counted", count(home)
    except Exception as exc:  # what the old code raised, the new one raises
        return "raised", type(exc)


# --- the uid range of a large lab ---------------------------------------------------------------


def test_a_lab_reads_its_login_defs_like_a_host(lab: LabLayout) -> None:
    passwd = lab.onprem / "etc" / "passwd"
    with passwd.open("a") as handle:
        handle.write("big:x:70000:70000:Big:/home/big:/bin/bash\n")
    assert "big" not in LabOnprem(lab, DOMAIN).observe(NOW).accounts  # 1000-59999
    (lab.onprem / "etc" / "login.defs").write_text("UID_MIN 1000\nUID_MAX 80000\n")
    assert "big" in LabOnprem(lab, DOMAIN).observe(NOW).accounts
    # The state's onprem.uid_range wins over the file.
    assert "big" not in LabOnprem(lab, DOMAIN, uid_range=(1000, 60000)).observe(NOW).accounts


def test_lab_init_writes_login_defs(lab: LabLayout) -> None:
    text = (lab.onprem / "etc" / "login.defs").read_text()
    assert "UID_MIN 1000\n" in text and "UID_MAX 59999\n" in text


def test_a_lab_with_more_users_than_the_uid_range_keeps_them_people(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past Debian's range (here shrunk to 1000-1002) the users are numbered from 100001,
    login.defs says so, and every one of them is a person; nobody (65534) stays out."""
    monkeypatch.setenv("MAILREC_NOW", NOW.isoformat())
    monkeypatch.setattr(lab_init, "MAX_UID", 1002)
    loaded = load_state(STATE)
    layout = lab_init.init_lab(tmp_path / "lab", loaded, migrated=False, force=False)
    users = sorted(loaded.state.users)
    assert len(users) > 2
    passwd = (layout.onprem / "etc" / "passwd").read_text()
    assert f"{users[0]}:x:100001:" in passwd
    assert (layout.onprem / "etc" / "login.defs").read_text().endswith(
        f"UID_MIN 100000\nUID_MAX {100000 + len(users)}\n")
    facts = LabOnprem(layout, DOMAIN).observe(NOW)
    assert sorted(facts.accounts) == users
    assert "nobody" not in facts.accounts


# --- the lab's messages -----------------------------------------------------------------------


@pytest.mark.parametrize("user", ["suga", "u000001", "a.b-c_d", "x" * 30, "y" * 64])
@pytest.mark.parametrize("domain", ["example.co.jp", "a" * 40 + ".example.com"])
@pytest.mark.parametrize("number", [0, 1, 2, 12345])
def test_lab_messages_are_what_email_writes(user: str, domain: str, number: int) -> None:
    assert lab_init._message(number, user, domain) == lab_init._email_message(number, user,
                                                                              domain)


# --- rendering --------------------------------------------------------------------------------


def _old_render_text(plan: Plan, *, color: bool = False, width: int = 100) -> str:
    """render_text as it was: one console.print per line."""
    from reconciler.render import _SIGIL, _STYLE, _summary

    buffer = StringIO()
    console = Console(file=buffer, force_terminal=color, no_color=not color, width=width,
                      highlight=False, soft_wrap=True)
    for planned in plan.steps:
        style = _STYLE[planned.status]
        line = Text()
        line.append(f"{_SIGIL[planned.step.action]} ", style=style)
        line.append(f"{planned.id:<28}", style="bold")
        line.append(f" {planned.status:<8}", style=style)
        line.append(f" {planned.step.describe()}")
        console.print(line)
        for reason in planned.reasons():
            console.print(Text(f"      {reason}", style="dim" if planned.status is Status.READY
                               else style))
        instructions = (planned.gate.instructions if planned.gate is not None else ())
        for instruction in (*instructions, *planned.step.notes):
            indented = instruction.replace("\n", "\n        ")
            console.print(Text(f"      > {indented}", style="cyan"))
    for finding in plan.findings:
        console.print(Text(f"! {finding.text()}", style="red" if finding.severity == "refuse"
                           else "yellow"))
    for fact in plan.unverified:
        console.print(Text(f"? not verified: {fact}", style="yellow"))
    console.print(Text(_summary(plan), style="bold"))
    return buffer.getvalue()


def _hundred_step_plan() -> Plan:
    """A plan by the real planner: 120 users in every state a step can be in."""
    users: dict[str, tuple[str, str]] = {}
    facts: dict[str, UserFacts] = {}
    for index in range(120):
        name = f"user{index:03d}"
        kind = index % 4
        users[name] = ("rental", "rental" if kind == 3 else "onprem")
        facts[name] = (MOVED_USER if kind == 3 else
                       ONPREM_USER.evolve(onprem_messages=index % 3) if kind else ONPREM_USER)
    return plan_for(make_state(users), make_world(facts))


def _awkward_plan() -> Plan:
    """Strings rich treats specially: control codes (stripped), newlines in a styled line,
    wide characters, escapes, an empty reason, markup-like brackets."""
    gate = Gate("ack", "wait\r for \x07a person [bold]", "MR999",
                instructions=("first\nsecond\n\nfourth", "", "\x1b[31mred\x1b[0m", "日本語"))
    steps = (
        PlannedStep(CreateMailbox("suga"), Status.READY),
        PlannedStep(MoveInbound("tanaka", to=Side.RENTAL), Status.GATED, (
            Finding("MR008", "holds \x0b3 \x0cmessages\n(two lines)", ("tanaka",)),
            Finding("MR001", "", ()),), gate),
        PlannedStep(PipeStep(), Status.REFUSED, (Finding("MR002", "é [link]"),)),
    )
    return Plan(steps, (Finding("MR015", "warn\r\nline", severity=Severity.WARN),
                        Finding("MR003", "refuse \b it")),
                checksum="c", source="s", unverified=("a\x07b", "wide 全角"))


@pytest.mark.parametrize("make", [_hundred_step_plan, _awkward_plan])
@pytest.mark.parametrize("color", [False, True])
def test_text_is_what_rich_printed_line_by_line(make: Callable[[], Plan], color: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    plan = make()
    if make is _hundred_step_plan:
        assert len(plan.steps) >= 100
    for term in ("xterm-256color", "dumb"):
        monkeypatch.setenv("TERM", term)
        assert render_text(plan, color=color) == _old_render_text(plan, color=color)


def test_a_tab_goes_through_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _awkward_plan()
    plan = Plan(plan.steps, (Finding("MR015", "a\tb\t全\tc", severity=Severity.WARN),))
    for color in (False, True):
        assert render_text(plan, color=color) == _old_render_text(plan, color=color)


def test_json_and_markdown_are_what_they_were() -> None:
    for plan in (_hundred_step_plan(), _awkward_plan()):
        assert render_json(plan) == json.dumps(plan_json(plan), indent=2,
                                               sort_keys=False) + "\n"
        assert render_markdown(plan)  # unchanged code, exercised on the same plans




def test_a_plan_without_colour_is_rendered_without_rich() -> None:
    code = ("import sys; from reconciler.plan import Plan; "
            "from reconciler.render import render_text, render_json; "
            "render_text(Plan(())); render_json(Plan(())); "
            "print(sorted(m for m in sys.modules if m == 'rich' or m.startswith('rich.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=True, timeout=60)
    assert done.stdout.strip() == "[]"


# --- the world's counts -----------------------------------------------------------------------


def test_world_counts_are_the_sum_over_users_shared_or_not() -> None:
    kinds = [UserFacts(), ONPREM_USER, MOVED_USER, ONPREM_USER.evolve(onprem_messages=2),
             MOVED_USER.evolve(outbound=Outbound.UNKNOWN, route_drift=True)]
    shared = [(f"s{i}", kinds[i % len(kinds)]) for i in range(50)]
    # Equal facts in distinct objects, as tests and steps make them.
    distinct = [(name, facts.evolve()) for name, facts in shared]
    expected = UserCounts()
    for _, facts in shared:
        expected = expected + UserCounts.of(facts)
    assert World.build(shared).counts == expected
    assert World.build(distinct).counts == expected
    assert World.build(dict(shared)).counts == expected
    assert World.build([]).counts == UserCounts()
    assert UserCounts.of(MOVED_USER).times(3) == (UserCounts.of(MOVED_USER)
                                                  + UserCounts.of(MOVED_USER)
                                                  + UserCounts.of(MOVED_USER))



def _old_world_checksum(world: World, state_digest: str = "") -> str:
    digest = hashlib.sha256(state_digest.encode())
    users = world.users
    for name in sorted(users.keys()):
        facts = users[name]
        digest.update(
            f"{name}|{facts.onprem_account}|{facts.onprem_messages}|{facts.route}|"
            f"{facts.route_drift}|{facts.relay_recipient}|{facts.rental_mailbox}|"
            f"{facts.outbound}|{facts.stray_messages}|{facts.via_fallback}\n".encode()
        )
    for name in sorted(world.addresses.keys()):
        digest.update(f"@{name}|{world.addresses[name]!r}\n".encode())
    rental = world.rental
    whitelist = sorted(map(str, rental.whitelist))
    digest.update(
        repr((world.onprem.recipient_validation, world.onprem.retired,
              rental.domain_accepted, whitelist, rental.whitelist_verified,
              sorted((str(a), r) for a, r in rental.relay_checks),
              world.dns.mx_hosts, world.dns.mx_ttl, world.dns.spf_terms, world.dns.soa_serial,
              world.dns.spf_records, world.router, world.onprem.unseen,
              world.onprem.fallback_to_rental, world.onprem.upstream_pending,
              world.onprem.forward_verified)).encode()
    )
    return digest.hexdigest()[:32]


def test_the_world_checksum_is_what_it_was() -> None:
    kinds = [ONPREM_USER, MOVED_USER, ONPREM_USER.evolve(onprem_messages=2)]
    world = make_world({f"u{i:03d}": kinds[i % 3] if i % 2 else kinds[i % 3].evolve()
                        for i in range(60)})
    assert world_checksum(world, "digest") == _old_world_checksum(world, "digest")
