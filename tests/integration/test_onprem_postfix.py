"""reconciler.drivers.postfix_host against a real Postfix on 127.0.0.2, reached over a real sshd
(key login, pinned host key), with mail really flowing: into local Maildirs, and forwarded to
the lab rental SMTP server on 127.0.0.3. The pure helpers (scan command and its output,
validation) are tested first, without any service. Fixtures: tests/integration/onprem.py.
"""

from __future__ import annotations

import gzip
import os
import pwd
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler.drivers.postfix import PostfixError
from reconciler.drivers.postfix_host import (
    ARCHIVE_INFIX,
    REMOVED_LIST,
    RETIRED_MARKER,
    PostfixHost,
    check_map_list,
    check_relay,
    managed_files,
)
from reconciler.drivers.postfix_log import read_last_mail
from reconciler.drivers.postfix_mailbox import MailboxSpec, parse_scan
from reconciler.transport import LocalTransport, Transport

from .onprem import (
    DOMAIN,
    RENTAL_ADDRESS,
    OnpremStack,
    free_port,
    local_maildir,
    send,
    start_onprem_stack,
    wait_for,
)
from .services import ServiceStack, make_base_dir, start_or_unavailable

HOSTILE_USERS = [
    "a;rm -rf /", "$(id)", "`id`", "../etc", "-rf", "Root", "", "a b", "x\ny", "ünï", "a/b",
    "a@b", "a.", ".a", "*",
]


def now() -> datetime:
    return datetime.now(UTC)


# --- pure helpers (no services) -------------------------------------------------------------


def test_scan_command_for_home_maildirs() -> None:
    spec = MailboxSpec.parse("maildir:~/Maildir")
    argv, owners = spec.scan_argv({"suga": "/home/suga", "sato": "/srv/people/sato"})
    assert argv[:2] == ["sh", "-c"]
    starts = argv[4 : argv.index("--")]
    assert starts == ["/home", "/srv/people"]
    expression = argv[argv.index("--") + 1 :]
    # Messages in new/ and cur/ at depth 4, in a Maildir++ folder's (.Archive/cur) at 5.
    assert expression[:4] == ["-mindepth", "4", "-maxdepth", "5"]
    for pattern in ("*/Maildir/new/*", "*/Maildir/cur/*", "*/Maildir/.*/new/*",
                    "*/Maildir/.*/cur/*"):
        assert pattern in expression
    assert owners["/home/suga/Maildir/new"] == "suga"
    assert owners["/srv/people/sato/Maildir/cur"] == "sato"
    # No user name reaches the command: its size does not grow with the users.
    assert not any("suga" in part or "sato" in part for part in argv)


def test_scan_command_for_mbox_spool() -> None:
    spec = MailboxSpec.parse("mbox:/var/mail/{user}")
    argv, owners = spec.scan_argv({"suga": "/home/suga"})
    assert argv[4 : argv.index("--")] == ["/var/mail"]
    assert owners == {"/var/mail/suga": "suga"}
    assert argv[-2:] == ["-printf", "%s %p\\n"]


def test_parse_scan_counts_and_status() -> None:
    owners = {"/home/a/Maildir/new": "a", "/home/a/Maildir/cur": "a", "/home/b/Maildir/new": "b"}
    output = (
        "      3 /home/a/Maildir/new\n      2 /home/a/Maildir/cur\n"
        "      1 /home/zz/Maildir/new\n      4 /home/a/Maildir/new\n"
        "      1 mailrec-find-status 0\n"
    )
    assert parse_scan(output, "maildir", owners) == {"a": 9}
    folders = (
        "      2 /home/a/Maildir/.Archive/cur\n      1 /home/b/Maildir/.Sent.2024/new\n"
        "      1 /home/b/Maildir/.a.b/new\n      5 /home/a/Maildir/notafolder/cur\n"
        "      4 /home/a/Maildir/.Archive/tmp\n      3 /home/zz/Maildir/.Archive/cur\n"
        "      1 mailrec-find-status 0\n"
    )
    assert parse_scan(folders, "maildir", owners) == {"a": 2, "b": 2}
    with pytest.raises(PostfixError, match="exited 1"):
        parse_scan("      2 /home/a/Maildir/new\n      1 mailrec-find-status 1\n", "maildir",
                   owners)
    with pytest.raises(PostfixError, match="no status"):
        parse_scan("      2 /home/a/Maildir/new\n", "maildir", owners)
    mbox = "      1 812 /var/mail/a\n      1 0 /var/mail/b\n      1 mailrec-find-status 0\n"
    assert parse_scan(mbox, "mbox", {"/var/mail/a": "a", "/var/mail/b": "b"}) == {"a": 1, "b": 0}


def test_validation_helpers() -> None:
    assert check_relay("127.0.0.3", 2525) == "smtp:[127.0.0.3]:2525"
    assert check_relay("example.sakura.ne.jp", 25) == "smtp:[example.sakura.ne.jp]:25"
    assert check_relay("2001:db8::1", 25) == "smtp:[2001:db8::1]:25"
    for host in ("x]:25\nfoo", "a b", "-oProxy", "[::1]", "a..b", ""):
        with pytest.raises(PostfixError):
            check_relay(host, 25)
    for port in (0, 65536, True):
        with pytest.raises(PostfixError):
            check_relay("127.0.0.3", port)
    assert check_map_list("x", "proxy:unix:passwd.byname $alias_maps hash:/etc/postfix/m")
    with pytest.raises(PostfixError):
        check_map_list("x", "hash:/etc/x\nmydestination = evil")
    assert managed_files("mailrec_transport\nmailrec_transport.db\n") == {
        "mailrec_transport", "mailrec_transport.db"}
    for bad in ("maildir:Maildir", "maildir:~/Mail*", "mbox:/var/mail/shared", "imap:x",
                "maildir:/var/../{user}", "maildir:~/../x"):
        with pytest.raises(PostfixError):
            MailboxSpec.parse(bad)


# --- the real host --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onprem() -> Iterator[OnpremStack]:
    stack = ServiceStack()
    base = stack.add_dir(make_base_dir("mailrec-onprem-"))
    try:
        yield start_or_unavailable(lambda: start_onprem_stack(stack, base))
    finally:
        stack.stop_all()


def postmap_dump(onprem: OnpremStack, name: str) -> str:
    return onprem.postfix.run("postmap", "-s", f"hash:{onprem.config_dir / name}").stdout


def postmap(onprem: OnpremStack, name: str) -> None:
    onprem.postfix.run("postmap", f"hash:{onprem.config_dir / name}")


def postfix(onprem: OnpremStack, *args: str, check: bool = True) -> int:
    return onprem.postfix.run("postfix", *args, check=check).returncode


@pytest.mark.integration
def test_observe_reads_accounts_mail_maps_and_log(
    onprem: OnpremStack, host: PostfixHost
) -> None:
    a, b = onprem.users.create(2)
    for token in ("obs-1", "obs-2"):
        assert send(onprem, f"{a}@{DOMAIN}", token)[0] == 250
        wait_for([local_maildir(a)], token)
    # Maps as an earlier run (or an admin) left them, while main.cf does not name them yet.
    ghost = onprem.users.unused("gh0")
    for name, value in (("mailrec_transport", "smtp:[127.0.0.3]:25"), ("mailrec_recipients", "OK")):
        (onprem.config_dir / name).write_text(f"{ghost}@{DOMAIN} {value}\n")
        postmap(onprem, name)
    try:
        facts = host.observe(now())
        assert facts.accounts[a] == 2
        assert facts.accounts[b] == 0
        assert set(facts.recipients) == {ghost}
        # Listed, but transport_maps does not name the map: nobody is forwarded.
        assert set(facts.transport) == set()
        assert facts.recipient_validation is False  # the default local_recipient_maps
        assert facts.retired is False
        # The log's classic syslog stamps are local time, read as UTC.
        assert facts.last_mail_at is not None
        local_now = datetime.now().replace(tzinfo=UTC)
        assert abs(facts.last_mail_at - local_now) < timedelta(minutes=2)
        # The same host read locally (connect: local:/) gives the same facts.
        assert PostfixHost(LocalTransport(), DOMAIN, onprem.onprem()).observe(now()) == facts
    finally:
        for name in ("mailrec_transport", "mailrec_recipients"):
            for suffix in ("", ".db"):
                (onprem.config_dir / f"{name}{suffix}").unlink(missing_ok=True)


@pytest.mark.integration
def test_observe_costs_a_constant_number_of_commands(
    onprem: OnpremStack, host: PostfixHost, ssh: Transport
) -> None:
    port = onprem.rental.relay_port
    few = onprem.users.create(3)
    host.route_to_rental(few[0], RENTAL_ADDRESS, port)

    def observe_cost() -> tuple[int, list[tuple[str, ...]]]:
        start = ssh.round_trips
        mark = len(ssh.history)
        facts = host.observe(now())
        assert set(few) <= set(facts.accounts)
        return ssh.round_trips - start, list(ssh.history)[mark:]

    small, _ = observe_cost()
    many = onprem.users.create(17)
    # Bigger maps too, written as an earlier run would have left them.
    for name, value in (("mailrec_transport", f"smtp:[{RENTAL_ADDRESS}]:{port}"),
                        ("mailrec_recipients", "OK")):
        with (onprem.config_dir / name).open("a") as source:
            source.writelines(f"{user}@{DOMAIN} {value}\n" for user in many)
        postmap(onprem, name)
    large, commands = observe_cost()
    facts = host.observe(now())
    assert set(few + many) <= set(facts.accounts)
    assert {*many, few[0]} <= set(facts.transport)
    assert small == large <= 10
    # No command names a user: the cost cannot grow with them.
    for argv in commands:
        assert not any(user in part for user in few + many for part in argv), argv


@pytest.mark.integration
def test_forwarded_mail_reaches_the_rental_and_nothing_bounces(
    onprem: OnpremStack, host: PostfixHost
) -> None:
    port = onprem.rental.relay_port
    moving, staying = onprem.users.create(2)
    ghost = onprem.users.unused("gh1")  # an address whose Unix account is already gone
    onprem.add_rental_mailbox(moving, ghost)
    assert send(onprem, f"{moving}@{DOMAIN}", "before-move")[0] == 250
    old_mail = wait_for([local_maildir(moving)], "before-move")

    host.enable_recipient_map()
    assert host.observe(now()).recipient_validation is True
    with pytest.raises(PostfixError, match="not forwarded"):
        host.remove_mailbox(moving)  # it still receives here

    host.route_to_rental(moving, RENTAL_ADDRESS, port)
    assert f"{moving}@{DOMAIN}\tsmtp:[{RENTAL_ADDRESS}]:{port}" in postmap_dump(
        onprem, "mailrec_transport")
    assert send(onprem, f"{moving}@{DOMAIN}", "after-move")[0] == 250
    wait_for([onprem.rental_maildir(moving)], "after-move")
    assert send(onprem, f"{staying}@{DOMAIN}", "stays-local")[0] == 250
    wait_for([local_maildir(staying)], "stays-local")
    code, text = send(onprem, f"{onprem.users.unused('nobody')}@{DOMAIN}", "unknown")
    assert code == 550, text

    # The user has not drained the old mailbox yet: MR008.
    with pytest.raises(PostfixError, match="MR008"):
        host.remove_mailbox(moving)
    old_mail.unlink()  # drained over POP
    host.remove_mailbox(moving)
    home = local_maildir(moving).parent.parent
    assert not (home / "Maildir").exists()
    assert [p.name.startswith(f"Maildir{ARCHIVE_INFIX}") for p in home.iterdir()
            if p.name.startswith("Maildir")] == [True]
    assert moving in (onprem.config_dir / REMOVED_LIST).read_text()
    host.remove_mailbox(moving)  # idempotent
    facts = host.observe(now())
    assert moving not in facts.accounts
    assert moving in facts.transport and moving in facts.recipients
    # Still accepted (MR007) and forwarded, never bounced.
    assert send(onprem, f"{moving}@{DOMAIN}", "after-removal")[0] == 250
    wait_for([onprem.rental_maildir(moving)], "after-removal")
    with pytest.raises(PostfixError, match="archived"):
        host.route_to_onprem(moving)

    # Without any Unix account, only mailrec's recipient map accepts the address.
    host.route_to_rental(ghost, RENTAL_ADDRESS, port)
    assert send(onprem, f"{ghost}@{DOMAIN}", "ghost-mail")[0] == 250
    wait_for([onprem.rental_maildir(ghost)], "ghost-mail")
    host.route_to_onprem(ghost)
    assert send(onprem, f"{ghost}@{DOMAIN}", "ghost-back")[0] == 550
    facts = host.observe(now())
    assert ghost not in facts.transport and ghost not in facts.recipients


@pytest.mark.integration
def test_failed_check_restores_the_previous_files(
    onprem: OnpremStack, host: PostfixHost
) -> None:
    config = onprem.config_dir
    main_cf = config / "main.cf"
    host.enable_recipient_map()  # the maps exist, main.cf names them
    original = main_cf.read_bytes()
    sources = {n: (config / n).read_bytes() for n in ("mailrec_transport", "mailrec_recipients")}
    dumps = {n: postmap_dump(onprem, n) for n in sources}
    user = onprem.users.unused("br")
    try:
        # A value `postfix check` rejects (postmap does not mind it).
        onprem.postfix.run("postconf", "-e", "queue_directory=/nonexistent")
        with pytest.raises(PostfixError, match="check exited") as failed:
            host.route_to_rental(user, RENTAL_ADDRESS, onprem.rental.relay_port)
        assert "restored" in str(failed.value)
        for name, content in sources.items():
            assert (config / name).read_bytes() == content
            assert postmap_dump(onprem, name) == dumps[name]
            # The .bak keeps the content from before the change, as the rollback left it.
            assert (config / f"{name}.bak").read_bytes() == content

        # A main.cf edit is undone as well.
        onprem.postfix.run("postconf", "-e", "local_recipient_maps=proxy:unix:passwd.byname",
                           "transport_maps=")
        before = main_cf.read_bytes()
        with pytest.raises(PostfixError, match="check exited"):
            host.enable_recipient_map()
        assert main_cf.read_bytes() == before
        assert (config / "main.cf.bak").read_bytes() == before
    finally:
        main_cf.write_bytes(original)
    postfix(onprem, "check")
    assert host.observe(now()).recipient_validation is True


@pytest.mark.integration
def test_hostile_input_is_refused_before_any_command(
    onprem: OnpremStack, host: PostfixHost, ssh: Transport
) -> None:
    before = ssh.round_trips
    for name in HOSTILE_USERS:
        with pytest.raises(PostfixError, match="unsafe user"):
            host.route_to_rental(name, RENTAL_ADDRESS, 25)
        with pytest.raises(PostfixError, match="unsafe user"):
            host.route_to_onprem(name)
        with pytest.raises(PostfixError, match="unsafe user"):
            host.remove_mailbox(name)
    for relay in ("x]:25\nfoo", "a b", "-oProxy", "h;id"):
        with pytest.raises(PostfixError, match="relay host"):
            host.route_to_rental("suga", relay, 25)
    assert ssh.round_trips == before

    bad = onprem.onprem()
    for update in ({"config_dir": "/etc/postfix/../shadow"}, {"log_file": "/var/log/../x"},
                   {"mailbox": "maildir:~/Mail[a]"}):
        with pytest.raises(PostfixError):
            PostfixHost(ssh, DOMAIN, bad.model_copy(update=update))
    assert ssh.round_trips == before


@pytest.mark.integration
def test_mbox_mailboxes_count_by_size(onprem: OnpremStack, ssh: Transport) -> None:
    full, empty, absent = onprem.users.create(3)
    spool = onprem.postfix.dir.parent / "spool"
    spool.mkdir(exist_ok=True)
    (spool / full).write_text("From sender@example.net Thu Jan  1 00:00:00 2026\nSubject: x\n\nx\n")
    (spool / empty).write_text("")
    host = PostfixHost(ssh, DOMAIN, onprem.onprem(mailbox=f"mbox:{spool}/{{user}}"))
    facts = host.observe(now())
    assert (facts.accounts[full], facts.accounts[empty], facts.accounts[absent]) == (1, 0, 0)

    for user in (full, empty):
        host.route_to_rental(user, RENTAL_ADDRESS, onprem.rental.relay_port)
    with pytest.raises(PostfixError, match="MR008"):
        host.remove_mailbox(full)
    host.remove_mailbox(empty)
    assert not (spool / empty).exists()
    archived = [p.name for p in spool.iterdir() if p.name.startswith(empty)]
    assert len(archived) == 1
    assert archived[0].startswith(f"{empty}{ARCHIVE_INFIX}")
    assert empty not in host.observe(now()).accounts


@pytest.mark.integration
def test_mail_only_in_a_maildir_plus_plus_folder_counts_and_blocks_removal(
    onprem: OnpremStack, host: PostfixHost
) -> None:
    (user,) = onprem.users.create(1)
    maildir = Path(pwd.getpwnam(user).pw_dir) / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / ".Archive" / sub).mkdir(parents=True)
    for number in (1, 2):
        (maildir / ".Archive" / "cur" / f"17000000{number}.M{number}P1.mail:2,S").write_text(
            f"Subject: kept {number}\n\nx\n")
    (maildir / ".Archive" / "maildirfolder").write_text("")
    (maildir / ".Archive" / "tmp" / "17000003.M3P1.mail").write_text("being delivered\n")
    assert host.observe(now()).accounts[user] == 2
    host.route_to_rental(user, RENTAL_ADDRESS, onprem.rental.relay_port)
    with pytest.raises(PostfixError, match=r"MR008: .* holds 2 message"):
        host.remove_mailbox(user)
    assert maildir.is_dir()
    removed = onprem.config_dir / REMOVED_LIST
    assert not removed.exists() or user not in removed.read_text()


@pytest.mark.integration
def test_the_log_is_read_by_time_over_ssh(ssh: Transport, tmp_path: Path) -> None:
    """Real files on the host, read with the one script over the real SSH transport: the
    delivery 30 h ago behind 10,000 rejects; then only in a gzipped rotation."""
    log = tmp_path / "mail.log"
    current = datetime.now(UTC).replace(microsecond=0)

    def stamp(when: datetime) -> str:
        return when.strftime("%b %e %H:%M:%S")

    def rejects(start: datetime, count: int) -> str:
        return "".join(
            f"{stamp(start + timedelta(seconds=i))} mail postfix/smtpd[3001]: NOQUEUE: reject: "
            f"RCPT from unknown[198.51.100.77]: 550 5.1.1 <n{i}@{DOMAIN}>: Recipient address "
            "rejected: User unknown in local recipient table\n" for i in range(count))

    def delivery(when: datetime) -> str:
        return (f"{stamp(when)} mail postfix/local[2104]: 3F1A2C: to=<suga@{DOMAIN}>, "
                "relay=local, delay=0.2, dsn=2.0.0, status=sent (delivered to maildir)\n")

    def written(path: Path, when: datetime) -> None:
        os.utime(path, (when.timestamp(), when.timestamp()))

    last = current - timedelta(hours=30)
    log.write_text(delivery(last) + rejects(last + timedelta(seconds=1), 10_000))
    rotated = log.with_name("mail.log.1.gz")
    rotated.write_bytes(gzip.compress(delivery(current - timedelta(days=21)).encode()))
    written(rotated, current - timedelta(days=21))

    def read() -> datetime | None:
        before = ssh.round_trips
        seen = read_last_mail(ssh, str(log), now=current, since=current - timedelta(hours=48),
                              tz=UTC)
        assert ssh.round_trips == before + 1  # one command
        return seen

    assert read() == last
    # The current log shows rejects only (it starts 10 h ago): the mail is in the rotation.
    log.write_text(rejects(current - timedelta(hours=10), 10_000))
    rotated.write_bytes(gzip.compress(
        (delivery(current - timedelta(hours=40)) + rejects(current - timedelta(hours=40), 10)
         ).encode()))
    written(rotated, current - timedelta(hours=10))
    assert read() == current - timedelta(hours=40)
    # Rotated away: the logs reach back 10 h only; the worst case is returned, never None.
    rotated.unlink()
    assert read() == current - timedelta(hours=10)
    log.unlink()
    with pytest.raises(PostfixError, match="cannot read the mail log"):
        read()


@pytest.mark.integration
def test_retire_waits_for_the_queue_then_stops_postfix(
    onprem: OnpremStack, host: PostfixHost
) -> None:
    # Runs last: it stops this module's Postfix.
    stuck = onprem.users.unused("rt")
    host.route_to_rental(stuck, RENTAL_ADDRESS, free_port(RENTAL_ADDRESS))  # nobody listens
    assert send(onprem, f"{stuck}@{DOMAIN}", "stuck")[0] == 250
    with pytest.raises(PostfixError, match="queue still holds"):
        host.retire()
    onprem.postfix.run("postsuper", "-d", "ALL")

    host.retire()
    assert (onprem.config_dir / RETIRED_MARKER).exists()
    assert postfix(onprem, "status", check=False) != 0
    assert host.observe(now()).retired is True
    # Someone starts it again: the next observation sees it, and retire stops it again.
    postfix(onprem, "start")
    assert host.observe(now()).retired is False
    host.retire()
    assert host.observe(now()).retired is True

