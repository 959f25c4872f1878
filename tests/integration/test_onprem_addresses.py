"""Every name the onprem Postfix receives for, on a real Postfix (127.0.0.2, over real sshd)
with real mail: `myorigin = $myhostname` (the Postfix default), `mydestination = $myhostname,
example.co.jp, localhost`, `recipient_delimiter = +`, an aliases table (postalias) and a
virtual alias table (postmap). The lab rental SMTP server on 127.0.0.3 receives what onprem
forwards.

What is proved here (see reconciler/drivers/postfix_host.py's docstring for why):
- mail to a migrated user under any name (user, user+tag, USER, user@myhostname,
  user@localhost), through an alias (aliases(5): info, an alias-only name) or a virtual alias
  (sales@) reaches the rental, and nothing bounces or stays queued;
- observe reads aliases, virtual aliases, the uid range (a uid-500 account), mail that
  reaches an archived mailbox again (stray), a partial forward (the old user@domain-only
  entries), a seed-style fallback_transport that `remove_fallback()` removes, and costs the
  same number of commands for 10 and 1,000 users and 1 and 50 aliases.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from reconciler.drivers.postfix import PostfixError
from reconciler.drivers.postfix_host import PostfixHost
from reconciler.transport import CommandResult, Transport

from .onprem import (
    DOMAIN,
    MYHOSTNAME,
    RENTAL_ADDRESS,
    OnpremStack,
    local_maildir,
    send,
    send_to,
    start_onprem_stack,
    wait_for,
)
from .services import ServiceStack, make_base_dir, start_or_unavailable

pytestmark = pytest.mark.integration

ADMIN_MAIN_CF = {
    "myorigin": "$myhostname",
    "mydestination": f"$myhostname, {DOMAIN}, localhost",
    "recipient_delimiter": "+",
}


def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(scope="module")
def onprem() -> Iterator[OnpremStack]:
    stack = ServiceStack()
    base = stack.add_dir(make_base_dir("mailrec-addresses-"))
    try:
        started = start_or_unavailable(
            lambda: start_onprem_stack(stack, base, main_cf=ADMIN_MAIN_CF))
        # Empty tables first: smtpd opens $alias_maps (local_recipient_maps) at once.
        aliases = started.write_aliases("")
        virtual = started.write_virtual("")
        started.configure({"alias_maps": aliases, "virtual_alias_maps": virtual})
        yield started
    finally:
        stack.stop_all()


@pytest.fixture(autouse=True)
def restore_config(onprem: OnpremStack) -> Iterator[None]:
    """Each test starts from the admin's configuration: main.cf, empty alias tables."""
    main_cf = onprem.config_dir / "main.cf"
    original = main_cf.read_bytes()
    yield
    main_cf.write_bytes(original)
    onprem.write_aliases("")
    onprem.write_virtual("")
    onprem.postfix.run("postfix", "reload")


def bounced(log: str) -> list[str]:
    return [line for line in log.splitlines() if "status=bounced" in line]


# --- the mail table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One address form, and where its copies land in each phase: `local:X` is X's onprem
    Maildir, `rental:X` X's Maildir at the rental (X: "a" or "b")."""

    form: str
    before: tuple[str, ...]
    after_a: tuple[str, ...]
    after_ab: tuple[str, ...]


ROWS = [
    Row("{a}@" + DOMAIN, ("local:a",), ("rental:a",), ("rental:a",)),
    Row("{a}+tag@" + DOMAIN, ("local:a",), ("rental:a",), ("rental:a",)),
    Row("{A}@" + DOMAIN, ("local:a",), ("rental:a",), ("rental:a",)),
    Row("{a}@" + MYHOSTNAME, ("local:a",), ("rental:a",), ("rental:a",)),
    Row("{a}@localhost", ("local:a",), ("rental:a",), ("rental:a",)),
    Row("info@" + DOMAIN, ("local:a", "local:b"), ("rental:a", "local:b"),
        ("rental:a", "rental:b")),
    Row("info@" + MYHOSTNAME, ("local:a", "local:b"), ("rental:a", "local:b"),
        ("rental:a", "rental:b")),
    Row("sales@" + DOMAIN, ("local:a",), ("rental:a",), ("rental:a",)),
    Row("helpdesk@" + DOMAIN, ("local:a",), ("rental:a",), ("rental:a",)),
    Row("{b}@" + DOMAIN, ("local:b",), ("local:b",), ("rental:b",)),
]


def deliver_table(onprem: OnpremStack, users: dict[str, str], phase: str,
                  expected: Sequence[tuple[str, ...]]) -> None:
    """Send every row's address once and check where each copy lands: exactly the expected
    Maildirs, one copy each, nothing bounced, the queue empty afterwards."""
    places = {
        f"{side}:{key}": (local_maildir(user) if side == "local"
                          else onprem.rental_maildir(user))
        for key, user in users.items() for side in ("local", "rental")
    }
    mark = onprem.log_mark()
    sent: list[tuple[str, str, tuple[str, ...]]] = []
    for number, (row, where) in enumerate(zip(ROWS, expected, strict=True)):
        address = row.form.format(a=users["a"], A=users["a"].upper(), b=users["b"])
        token = f"tok-{phase}-{number}-{users['a']}"
        code, reply = send(onprem, address, token)
        assert code == 250, f"{phase}: {address}: {code} {reply!r}"
        sent.append((address, token, where))
    for _, token, where in sent:
        for place in where:
            wait_for([places[place]], token)
    onprem.wait_for_empty_queue()
    problems = []
    for address, token, where in sent:
        landed = sorted(
            place for place, directory in places.items() if directory.is_dir()
            for path in directory.iterdir() if token.encode() in path.read_bytes()
        )
        if landed != sorted(where):
            problems.append(f"{address}: landed in {landed}, expected {sorted(where)}")
    assert not problems, f"{phase}:\n" + "\n".join(problems)
    assert not bounced(onprem.log_since(mark)), bounced(onprem.log_since(mark))


def test_every_name_of_a_migrated_user_reaches_the_rental(
    onprem: OnpremStack, host: PostfixHost
) -> None:
    a, b = onprem.users.create(2)
    users = {"a": a, "b": b}
    onprem.add_rental_mailbox(a, b)
    onprem.write_aliases(f"info: {a}, {b}\nhelpdesk: {a}\n")
    onprem.write_virtual(f"sales@{DOMAIN} {a}\n")
    onprem.postfix.run("postfix", "reload")
    port = onprem.rental.relay_port

    deliver_table(onprem, users, "before", [row.before for row in ROWS])
    host.enable_recipient_map()  # changes no route
    deliver_table(onprem, users, "enabled", [row.before for row in ROWS])

    host.route_to_rental(a, RENTAL_ADDRESS, port)
    facts = host.observe(now())
    assert a in facts.transport and facts.partial_forward == frozenset()
    deliver_table(onprem, users, "after-a", [row.after_a for row in ROWS])

    host.route_to_rental(b, RENTAL_ADDRESS, port)
    deliver_table(onprem, users, "after-ab", [row.after_ab for row in ROWS])

    # Back: every form of both users goes, and every copy lands onprem again.
    host.route_to_onprem(a)
    host.route_to_onprem(b)
    for name in ("mailrec_transport", "mailrec_recipients", "mailrec_virtual"):
        dump = onprem.postfix.run("postmap", "-s", f"hash:{onprem.config_dir / name}").stdout
        assert a not in dump and b not in dump, (name, dump)
    deliver_table(onprem, users, "back", [row.before for row in ROWS])


def send_to_rental(onprem: OnpremStack, rcpt: str, token: str) -> tuple[int, bytes]:
    """After the MX move, senders reach the rental directly (its MX), not onprem."""
    return send_to(RENTAL_ADDRESS, onprem.rental.relay_port, rcpt, token)


def test_after_the_mx_move_every_name_needs_its_destination_at_the_rental(
    onprem: OnpremStack, host: PostfixHost
) -> None:
    """The MX names the rental: mail to the domain's names arrives there directly. A name
    that exists only onprem (an alias the rental does not have) is refused by the rental:
    the bounce MR019 prevents by keeping the MX until every name has a destination there.
    With the aliases made at the rental (what `alias/<name>` does), every form lands."""
    a, b = onprem.users.create(2)
    onprem.add_rental_mailbox(a, b)
    onprem.write_aliases(f"info: {a}, {b}\nhelpdesk: {a}\n")
    onprem.write_virtual(f"sales@{DOMAIN} {a}\n")
    onprem.postfix.run("postfix", "reload")
    port = onprem.rental.relay_port
    host.route_to_rental(a, RENTAL_ADDRESS, port)
    host.route_to_rental(b, RENTAL_ADDRESS, port)
    # What observe tells the planner: names onprem has that the rental must have too.
    space = host.observe(now()).space
    assert {"info", "helpdesk"} <= set(space.aliases) and "sales" in space.virtual_aliases

    aliases_file = onprem.rental_lab.rental_aliases
    aliases_file.write_text("")
    for name in ("info", "sales", "helpdesk"):
        code, _ = send_to_rental(onprem, f"{name}@{DOMAIN}", f"tok-nomx-{name}-{a}")
        assert code == 550, f"{name}@ without an alias at the rental: {code}"

    aliases_file.write_text(
        f"info@{DOMAIN}: {a}@{DOMAIN}, {b}@{DOMAIN}\n"
        f"sales@{DOMAIN}: {a}@{DOMAIN}\n"
        f"helpdesk@{DOMAIN}: {a}@{DOMAIN}\n")
    rows = [(f"{a}@{DOMAIN}", (a,)), (f"{a}+tag@{DOMAIN}", (a,)),
            (f"{a.upper()}@{DOMAIN}", (a,)), (f"info@{DOMAIN}", (a, b)),
            (f"sales@{DOMAIN}", (a,)), (f"helpdesk@{DOMAIN}", (a,)), (f"{b}@{DOMAIN}", (b,))]
    for number, (address, owners) in enumerate(rows):
        token = f"tok-mx-{number}-{a}"
        code, reply = send_to_rental(onprem, address, token)
        assert code == 250, f"{address}: {code} {reply!r}"
        for owner in owners:
            wait_for([onprem.rental_maildir(owner)], token)
    host.route_to_onprem(a)
    host.route_to_onprem(b)


# --- observation ----------------------------------------------------------------------------


def test_observe_reads_aliases_virtual_aliases_and_names(
    onprem: OnpremStack, host: PostfixHost
) -> None:
    a, b = onprem.users.create(2)
    onprem.write_aliases(
        f'info: {a}, "{b}"\nhelpdesk: {a}\nlist: :include:/etc/postfix/list.txt\n'
        'archive: "|/usr/bin/logger -t mail", /var/spool/archive\n'
    )
    onprem.write_virtual(f"sales@{DOMAIN} {a}\n@{MYHOSTNAME} {b}\nother@example.net {a}\n")
    space = host.observe(now()).space
    assert space.local_domains == (MYHOSTNAME, DOMAIN, "localhost")
    assert space.unresolved == ()
    assert space.myorigin == MYHOSTNAME
    assert space.recipient_delimiter == "+"
    assert space.aliases["info"] == (a, b)
    assert space.aliases["helpdesk"] == (a,)
    assert space.aliases["list"] == (":include:/etc/postfix/list.txt",)
    assert space.aliases["archive"] == ("|/usr/bin/logger -t mail", "/var/spool/archive")
    assert "@" not in space.aliases  # postalias's own entry
    assert space.virtual_aliases == {"sales": (a,), "": (b,)}  # not other@example.net
    assert space.unreadable == ()
    assert space.uid_range == (1000, 60000)  # Debian's /etc/login.defs

    # A table Postfix cannot open (no .db) is unreadable: its names are unknown.
    missing = f"hash:{onprem.config_dir / 'missing'}"
    onprem.postfix.run("postconf", "-e",
                       f"virtual_alias_maps=hash:{onprem.config_dir / 'virtual'} {missing}")
    assert host.observe(now()).space.unreadable == (missing,)


def test_an_account_outside_the_uid_range(
    onprem: OnpremStack, ssh: Transport, host: PostfixHost
) -> None:
    taken = {line.split(":")[2] for line in Path("/etc/passwd").read_text().splitlines()}
    uid = next(n for n in range(500, 1000) if str(n) not in taken)  # CentOS 6's first user
    (old,) = onprem.users.create(1, uid=uid)
    for token in ("old-1", "old-2"):
        assert send(onprem, f"{old}@{DOMAIN}", token)[0] == 250
        wait_for([local_maildir(old)], token)
    facts = host.observe(now())
    assert old not in facts.accounts
    assert facts.space.other_accounts[old] == 2
    # System accounts are listed, without mail.
    assert facts.space.other_accounts.get("postfix", 0) == 0

    wider = PostfixHost(ssh, DOMAIN, onprem.onprem().model_copy(update={
        "uid_range": (uid, 59999)}))
    facts = wider.observe(now())
    assert facts.accounts[old] == 2
    assert old not in facts.space.other_accounts
    assert facts.space.uid_range == (uid, 59999)


def test_mail_to_an_archived_mailbox_is_stray_and_a_partial_forward_is_seen(
    onprem: OnpremStack, host: PostfixHost
) -> None:
    """The issue: an earlier mailrec forwarded user@domain only, and archived the mailbox.
    Mail to user@myhostname went to local(8) (relay=local), which recreated the Maildir."""
    (user,) = onprem.users.create(1)
    onprem.add_rental_mailbox(user)
    host.enable_recipient_map()
    target = f"smtp:[{RENTAL_ADDRESS}]:{onprem.rental.relay_port}"

    def old_style_maps() -> None:
        for name, value in (("mailrec_recipients", "OK"), ("mailrec_transport", target),
                            ("mailrec_virtual", None)):
            lines = (onprem.config_dir / name).read_text().splitlines(keepends=True)
            kept = [line for line in lines if not line.startswith(f"{user}@")]
            if value is not None:
                kept.append(f"{user}@{DOMAIN} {value}\n")
            (onprem.config_dir / name).write_text("".join(kept))
            onprem.postfix.run("postmap", f"hash:{onprem.config_dir / name}")

    old_style_maps()
    facts = host.observe(now())
    assert user in facts.transport
    assert user in facts.partial_forward
    # mailrec no longer archives a mailbox that other names still deliver to.
    with pytest.raises(PostfixError, match="not under every name"):
        host.remove_mailbox(user)

    # What the earlier mailrec left: archived while only user@domain was forwarded.
    host.route_to_rental(user, RENTAL_ADDRESS, onprem.rental.relay_port)
    host.remove_mailbox(user)  # empty mailbox: archived
    old_style_maps()
    assert user not in host.observe(now()).accounts
    mark = onprem.log_mark()
    assert send(onprem, f"{user}@{MYHOSTNAME}", "stray-1")[0] == 250
    wait_for([local_maildir(user)], "stray-1")
    assert re.search(rf"to=<{user}@{re.escape(MYHOSTNAME)}>.*relay=local",
                     onprem.log_since(mark))
    facts = host.observe(now())
    assert facts.space.stray_mail == {user: 1}
    assert user not in facts.accounts
    assert user in facts.partial_forward

    # inbound/USER repairs it: every name forwarded, the partial forward gone.
    host.route_to_rental(user, RENTAL_ADDRESS, onprem.rental.relay_port)
    assert user not in host.observe(now()).partial_forward
    assert send(onprem, f"{user}@{MYHOSTNAME}", "repaired")[0] == 250
    wait_for([onprem.rental_maildir(user)], "repaired")


def test_seed_style_fallback_is_seen_and_removed(
    onprem: OnpremStack, host: PostfixHost
) -> None:
    """A hand-made half migration: every name without an account goes to the rental."""
    port = onprem.rental.relay_port
    ghost = onprem.users.unused("sd")  # its account was deleted, it receives at the rental
    onprem.add_rental_mailbox(ghost)
    fallback = f"smtp:[{RENTAL_ADDRESS}]:{port}"
    onprem.configure({"local_recipient_maps": "", "fallback_transport": fallback,
                      "luser_relay": "postmaster@example.net"})
    assert send(onprem, f"{ghost}@{DOMAIN}", "seed-1")[0] == 250
    wait_for([onprem.rental_maildir(ghost)], "seed-1")
    space = host.observe(now()).space
    assert space.fallback_transport == fallback
    assert space.luser_relay == "postmaster@example.net"
    assert space.local_recipient_maps == ""

    assert host.remove_fallback("rental.example.net") == ()  # not the rental
    assert onprem.postfix.postconf("fallback_transport") == fallback

    host.route_to_rental(ghost, RENTAL_ADDRESS, port)  # mailrec takes the name over first
    assert host.remove_fallback(RENTAL_ADDRESS) == ("fallback_transport",)
    assert (onprem.config_dir / "main.cf.bak").read_text().count(fallback) == 1
    space = host.observe(now()).space
    assert space.fallback_transport == ""
    assert space.luser_relay == "postmaster@example.net"  # points elsewhere: the admin's
    mark = onprem.log_mark()
    assert send(onprem, f"{ghost}@{DOMAIN}", "seed-2")[0] == 250
    wait_for([onprem.rental_maildir(ghost)], "seed-2")
    onprem.wait_for_empty_queue()
    assert not bounced(onprem.log_since(mark))


# --- cost -----------------------------------------------------------------------------------


class ExtraPasswd(Transport):
    """The onprem host's transport, with `getent passwd` answering extra (real) homes too:
    1,000 accounts made with useradd/newusers take ~50 s to create and as long to remove."""

    def __init__(self, inner: Transport, extra: str) -> None:
        super().__init__(inner.host)
        self.inner = inner
        self.extra = extra

    def close(self) -> None:
        pass

    def _run(self, argv: tuple[str, ...], input: bytes | None, timeout: float) -> CommandResult:
        result = self.inner.run(argv, input=input, check=False, timeout=timeout)
        if argv == ("getent", "passwd") and result.ok:
            return CommandResult(argv, 0, result.stdout + self.extra.encode(), result.stderr)
        return result

    def _read(self, path: str) -> bytes | None:
        return self.inner.read_file(path)

    def _write_atomic(self, path: str, data: bytes, mode: int, backup: bool) -> None:
        self.inner.write_file_atomic(path, data, mode=mode, backup=backup)


def test_observe_costs_the_same_for_10_and_1000_users_and_1_and_50_aliases(
    onprem: OnpremStack, ssh: Transport
) -> None:
    real = onprem.users.create(10)
    onprem.write_aliases(f"info: {real[0]}\n")
    bulk = onprem.postfix.dir.parent / "bulk-homes"
    lines = []
    for number in range(990):
        name = f"{onprem.users.prefix}b{number:04d}"
        home = bulk / name
        (home / "Maildir" / "new").mkdir(parents=True)
        (home / "Maildir" / "cur").mkdir()
        if number % 100 == 0:
            (home / "Maildir" / "new" / f"{number}.msg").write_text("Subject: x\n\nx\n")
        lines.append(f"{name}:x:{20000 + number}:{20000 + number}::{home}:/usr/sbin/nologin\n")

    def cost(transport: Transport) -> tuple[int, list[tuple[str, ...]], dict[str, int]]:
        host = PostfixHost(transport, DOMAIN, onprem.onprem())
        start, mark = transport.round_trips, len(transport.history)
        facts = host.observe(now())
        return transport.round_trips - start, list(transport.history)[mark:], facts.accounts

    small, _, accounts = cost(ssh)
    assert set(real) <= set(accounts)
    padded = ExtraPasswd(ssh, "".join(lines))
    large, commands, accounts = cost(padded)
    assert len(accounts) >= 1000
    assert accounts[f"{onprem.users.prefix}b0100"] == 1
    onprem.write_aliases("".join(f"list{n}: {real[n % 10]}, {real[(n + 1) % 10]}\n"
                                 for n in range(50)))
    aliased, _, _ = cost(padded)
    assert small == large == aliased
    names = [*real, *(line.split(":")[0] for line in lines)]
    for argv in commands:
        assert not any(name in part for name in names for part in argv), argv
    for argv in commands:
        if argv[0] in ("postconf", "postmap", "postalias", "postfix"):
            assert argv[1:3] == ("-c", str(onprem.config_dir)), argv
