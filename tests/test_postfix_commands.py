"""Every Postfix command the onprem driver (reconciler/drivers/postfix_host.py) runs names its
instance: `-c <config_dir>` right after the program (`-C <config_dir>` for Postfix's sendmail,
which has no -c). Without it postmap/postconf/postfix/sendmail read
the system's /etc/postfix/main.cf, which on a multi-instance host is another Postfix and on a
fresh machine ("No configuration") does not exist: `postmap: fatal: open
/etc/postfix/main.cf`. No service needed: a fake Transport plays the host, answers like a real
Postfix whose system main.cf is missing, and records every argv.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from reconciler.drivers.postfix import PostfixError, parse_accounts, parse_map
from reconciler.drivers.postfix_host import POSTFIX_PROGRAMS, PROBE_WAITS, PostfixHost
from reconciler.drivers.postfix_mailbox import MailboxSpec
from reconciler.drivers.postfix_names import expand_params
from reconciler.drivers.postfix_space import mailbox_homes
from reconciler.model import Onprem
from reconciler.transport import CommandResult
from tests.fakes import POSTFIX_SUITE, FakeHost, fail, no_main_cf, ok

# A second instance, as on a real multi-instance host: nothing here is /etc/postfix.
CONFIG_DIR = "/srv/postfix-onprem/etc"
DOMAIN = "example.co.jp"
PASSWD = (
    "root:x:0:0:root:/root:/bin/bash\n"
    "suga:x:1001:1001:Suga:/home/suga:/bin/bash\n"
    "sato:x:1002:1002:Sato:/home/sato:/bin/bash\n"
)
RELAY = "smtp:[example.sakura.ne.jp]:25"
PROBE = f"mailrec-probe@{DOMAIN}"
LOG_FILE = "/srv/postfix-onprem/maillog"
# The rental's answers as the onprem smtp(8) logs them (from a real Postfix 3.7 log).
PROBE_RESULTS = {
    "bounced": "relay=example.sakura.ne.jp[203.0.113.25]:25, delay=0.4, delays=0.1/0/0.2/0.1, "
               "dsn=5.1.1, status=bounced (host example.sakura.ne.jp[203.0.113.25] said: 550 "
               "5.1.1 <mailrec-probe@example.co.jp>: Recipient address rejected: User unknown "
               "(in reply to RCPT TO command))",
    "sent": "relay=example.sakura.ne.jp[203.0.113.25]:25, delay=0.5, delays=0.1/0/0.2/0.2, "
            "dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 4XyZ)",
    "deferred": "relay=none, delay=0.04, delays=0.02/0.02/0/0, dsn=4.4.1, status=deferred "
                "(connect to example.sakura.ne.jp[203.0.113.25]:25: Connection refused)",
}


def passwd_of(count: int) -> str:
    """root, then `count` people."""
    return "root:x:0:0:root:/root:/bin/bash\n" + "".join(
        f"user{n:04d}:x:{1001 + n}:{1001 + n}::/home/user{n:04d}:/bin/bash\n"
        for n in range(count))


def alias_dump_of(count: int) -> str:
    """`postalias -s` output: postalias's own `@` entry, then `count` aliases."""
    return "@:\t@\n" + "".join(f"alias{n:03d}:\tuser{n % 7:04d}, user{n % 5:04d}\n"
                               for n in range(count))


class FakePostfixHost(FakeHost):
    """A host whose only Postfix instance lives in CONFIG_DIR (no /etc/postfix/main.cf)."""

    def __init__(self, passwd: str = PASSWD, *, expand_option: bool = True) -> None:
        super().__init__("fake-onprem", CONFIG_DIR, {
            f"{CONFIG_DIR}/main.cf": b"# main.cf\n",
            "/etc/login.defs": b"UID_MIN\t\t\t 1000\nUID_MAX\t\t\t60000\n",
            "/etc/aliases.db": alias_dump_of(1).encode(),
        })
        self.passwd = passwd
        # What `postconf` prints (main.cf and the defaults mailrec reads).
        self.params = {
            "local_recipient_maps": "proxy:unix:passwd.byname $alias_maps",
            "transport_maps": "",
            "queue_directory": "/srv/postfix-onprem/queue",
            "alias_maps": "hash:/etc/aliases",
            "virtual_alias_maps": "",
            "mydestination": f"$myhostname, {DOMAIN}, localhost",
            "myhostname": "mail.example.co.jp",
            "myorigin": "$myhostname",
        }
        self.expand_option = expand_option  # False: a Postfix < 2.10 (CentOS 6), no -x
        self.failing: set[str] = set()  # postfix actions to fail, e.g. {"check"}
        self.running = True
        self.existing: set[str] = {"/home/suga/Maildir"}
        # The forward probe: what smtp(8) logs for it (a PROBE_RESULTS key; "silent": queued
        # but no delivery line, "lost": not even queued), after how many looks at the log.
        self.probe_result = "bounced"
        self.logged_after = 1
        self.sendmail_status = 0
        self.looks = 0
        self.maillog: list[str] = [
            # An old probe's delivery line under the queue id the new probe gets: never read.
            "Dec  1 09:00:00 mail postfix/smtp[7]: 3F1A2C4D5E: to=<mailrec-probe@example.co.jp>"
            ", relay=none, status=deferred (an old probe)",
            "Dec  1 09:00:01 mail postfix/smtpd[8]: connect from unknown[198.51.100.7]",
        ]
        self.pending: list[str] = []  # the probe's lines, logged after `logged_after` looks
        self.submitted: list[dict[str, object]] = []
        self.deleted: list[str] = []
        self.on_look: Callable[[FakePostfixHost], None] = lambda fake: None

    def expand(self, name: str) -> str:
        # As postconf -x (tests/test_postfix_parse.py holds expand_params to the real one).
        return expand_params(self.params, [name])[name]

    def _run(self, argv: tuple[str, ...], input: bytes | None, timeout: float) -> CommandResult:
        if posixpath.basename(argv[0]) != "sendmail":
            return super()._run(argv, input, timeout)
        # Postfix's sendmail names the instance with -C (FakeHost expects -c of the others).
        self.argvs.append(argv)
        if input is not None:
            self.stdin.append(input)
        if argv[1:3] != ("-C", CONFIG_DIR):
            return fail(argv, 75, no_main_cf("sendmail"))
        return self._sendmail(argv, input or b"")

    def answer(self, program: str, argv: tuple[str, ...], input: bytes | None) -> CommandResult:
        handler: Callable[[tuple[str, ...]], CommandResult] = getattr(self, f"_{program}")
        return handler(argv)

    def _sendmail(self, argv: tuple[str, ...], message: bytes) -> CommandResult:
        if self.sendmail_status:
            return fail(argv, self.sendmail_status, b"sendmail: fatal: injected failure\n")
        rcpt = argv[-1]
        found = re.search(rb"^Message-ID: <([^>]+)>$", message, re.MULTILINE)
        assert found, message
        transport = parse_map(self.files.get(f"{CONFIG_DIR}/mailrec_transport.db", b"").decode())
        self.submitted.append({
            "argv": argv, "message": message.decode(), "routed": transport.get(rcpt),
            "transport_maps": self.expand("transport_maps"),
        })
        qid = "3F1A2C4D5E"
        if self.probe_result != "lost":
            self.pending = [f"Dec  2 10:00:00 mail postfix/pickup[11]: {qid}: uid=0 from=<>",
                            f"Dec  2 10:00:00 mail postfix/cleanup[12]: {qid}: "
                            f"message-id=<{found.group(1).decode()}>"]
            if self.probe_result in PROBE_RESULTS:
                self.pending.append(f"Dec  2 10:00:01 mail postfix/smtp[13]: {qid}: "
                                    f"to=<{rcpt}>, {PROBE_RESULTS[self.probe_result]}")
        return ok(argv)

    def _grep(self, argv: tuple[str, ...]) -> CommandResult:
        assert argv[-1] == LOG_FILE and argv[-2] == "--", argv
        self.looks += 1
        self.on_look(self)
        if self.looks >= self.logged_after:
            self.maillog += self.pending
            self.pending = []
        patterns = [argv[i + 1].lower() for i, arg in enumerate(argv) if arg == "-e"]
        lines = [line for line in self.maillog if any(p in line.lower() for p in patterns)]
        return ok(argv, "".join(f"{line}\n" for line in lines)) if lines else fail(argv)

    def _postsuper(self, argv: tuple[str, ...]) -> CommandResult:
        assert argv[3] == "-d", argv
        self.deleted.append(argv[4])
        return ok(argv)

    def _postconf(self, argv: tuple[str, ...]) -> CommandResult:
        args = argv[3:]
        if args[:1] == ("-e",):
            for item in args[1:]:
                name, _, value = item.partition("=")
                self.params[name] = value
            return ok(argv)
        if args[:1] == ("-X",):
            for name in args[1:]:
                self.params.pop(name, None)
            return ok(argv)
        if args[:1] == ("-x",):
            if not self.expand_option:
                return fail(argv, 1, b"postconf: invalid option -- 'x'\npostconf: fatal: usage")
            return ok(argv, "".join(f"{name} = {self.expand(name)}\n" for name in args[1:]))
        if not args:  # every parameter, defaults included
            return ok(argv, "".join(f"{k} = {v}\n" for k, v in self.params.items()))
        return ok(argv, "".join(f"{name} = {self.params.get(name, '')}\n" for name in args))

    def _postmap(self, argv: tuple[str, ...]) -> CommandResult:
        args = argv[3:]
        dump = args[:1] == ("-s",)
        kind, _, path = args[-1].partition(":")
        assert kind == "hash", argv
        if dump:
            if path + ".db" not in self.files:
                return fail(argv, 1, b"postmap: fatal: open database " + path.encode() + b".db")
            return ok(argv, self.files[path + ".db"].decode())
        source = self.files.get(path)
        if source is None:
            return fail(argv, 1, b"postmap: fatal: open " + path.encode())
        compiled = parse_map(source.decode())
        self.files[path + ".db"] = "".join(f"{k}\t{v}\n" for k, v in compiled.items()).encode()
        return ok(argv)

    def _postalias(self, argv: tuple[str, ...]) -> CommandResult:
        assert argv[3] == "-s", argv
        kind, _, path = argv[4].partition(":")
        if kind != "hash" or path + ".db" not in self.files:
            return fail(argv, 1, b"postalias: fatal: open database " + path.encode() + b".db")
        return ok(argv, self.files[path + ".db"].decode())

    def _postfix(self, argv: tuple[str, ...]) -> CommandResult:
        action = argv[3]
        if action in self.failing:
            return fail(argv, 1, b"postfix/postfix-script: fatal: injected failure\n")
        if action == "status":
            return ok(argv) if self.running else fail(argv, 1)
        if action == "stop":
            self.running = False
        return ok(argv)

    def _find(self, argv: tuple[str, ...]) -> CommandResult:
        if argv[1] == CONFIG_DIR:  # the managed files
            prefix = CONFIG_DIR + "/"
            names = sorted(
                p[len(prefix):] for p in self.files
                if p.startswith(prefix + "mailrec_") and "/" not in p[len(prefix):]
            )
            return ok(argv, "".join(f"{name}\n" for name in names))
        return ok(argv)  # the queue: empty

    def _getent(self, argv: tuple[str, ...]) -> CommandResult:
        if len(argv) == 2:
            return ok(argv, self.passwd)
        lines = [line for line in self.passwd.splitlines() if line.split(":")[0] == argv[2]]
        return ok(argv, lines[0] + "\n") if lines else fail(argv, 2)

    def _sh(self, argv: tuple[str, ...]) -> CommandResult:
        if argv[3] == "mailrec-log":  # the log read: one file, no mail in it
            return ok(argv, f"F 1767225600 {argv[4]}\nZ 0\nE\n")
        return ok(argv, "      1 mailrec-find-status 0\n")  # every mailbox empty

    def _test(self, argv: tuple[str, ...]) -> CommandResult:
        return ok(argv) if argv[-1] in self.existing else fail(argv)

    def _mv(self, argv: tuple[str, ...]) -> CommandResult:
        self.existing.discard(argv[-2])
        self.existing.add(argv[-1])
        return ok(argv)


@pytest.fixture
def fake() -> FakePostfixHost:
    return FakePostfixHost()


def make_host(fake: FakePostfixHost, **settings: object) -> PostfixHost:
    onprem = Onprem.model_validate({
        "connect": "local:/",
        "config_dir": CONFIG_DIR,
        "mx_host": "mail.example.co.jp.",
        "public_ip": "198.51.100.10",
        "log_file": LOG_FILE,
        **settings,
    })
    return PostfixHost(fake, DOMAIN, onprem)


@pytest.fixture
def host(fake: FakePostfixHost) -> PostfixHost:
    return make_host(fake)


def now() -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC)


def test_the_fake_answers_like_postfix_without_a_system_main_cf(fake: FakePostfixHost) -> None:
    # The regression this file guards: `postmap -s` without -c on a fresh machine.
    result = fake.run(["postmap", "-s", f"hash:{CONFIG_DIR}/mailrec_transport"], check=False)
    assert result.exit_status == 1
    assert b"/etc/postfix/main.cf" in result.stderr


def test_every_postfix_command_of_the_driver_names_its_config_dir(
    fake: FakePostfixHost, host: PostfixHost
) -> None:
    host.observe(now())  # nothing compiled yet
    host.enable_recipient_map()
    host.route_to_rental("suga", "example.sakura.ne.jp", 25)
    host.route_to_rental("sato", "example.sakura.ne.jp", 25)
    facts = host.observe(now())  # now with `postmap -s` dumps of both maps
    assert set(facts.transport) == {"suga", "sato"}
    assert set(facts.recipients) == {"suga", "sato"}
    assert facts.recipient_validation is True
    host.route_to_onprem("sato")
    host.remove_mailbox("suga")
    assert "suga" not in host.observe(now()).accounts

    # A failing `postfix check` rolls back: files restored and re-compiled (postmap again).
    fake.failing.add("check")
    with pytest.raises(PostfixError, match="restored"):
        host.route_to_rental("sato", "example.sakura.ne.jp", 25)
    fake.failing.clear()

    fake.params["fallback_transport"] = "smtp:[example.sakura.ne.jp]"
    assert host.remove_fallback("example.sakura.ne.jp") == ("fallback_transport",)

    host.sleep = lambda seconds: None
    assert "reached the rental" in host.probe_forward("example.sakura.ne.jp", 25)
    fake.probe_result = "deferred"  # deleted from the queue: postsuper
    with pytest.raises(PostfixError, match="does not work"):
        host.probe_forward("example.sakura.ne.jp", 25)

    host.retire()  # postconf queue_directory, postfix status, postfix stop
    assert host.observe(now()).retired is True

    seen = {(posixpath.basename(argv[0]), argv[3]) for argv in fake.postfix_argvs()}
    for expected in [("postconf", "local_recipient_maps"), ("postconf", "-e"),
                     ("postconf", "-x"), ("postconf", "-X"), ("postalias", "-s"),
                     ("postconf", "queue_directory"), ("postmap", "-s"),
                     ("postmap", f"hash:{CONFIG_DIR}/mailrec_transport"),
                     ("postmap", f"hash:{CONFIG_DIR}/mailrec_virtual"),
                     ("postfix", "check"), ("postfix", "reload"), ("postfix", "status"),
                     ("postfix", "stop"), ("sendmail", "-f"), ("postsuper", "-d")]:
        assert expected in seen, f"the scenario never ran {expected}"
    assert_every_postfix_command_names_the_instance(fake)
    assert not any("/etc/postfix" in part for argv in fake.argvs for part in argv)


def assert_every_postfix_command_names_the_instance(fake: FakePostfixHost) -> None:
    """`-c DIR` right after the program; `-C DIR` for sendmail (its -c is no such option)."""
    for argv in fake.postfix_argvs():
        option = "-C" if posixpath.basename(argv[0]) == "sendmail" else "-c"
        assert argv[1:3] == (option, CONFIG_DIR), f"{' '.join(argv)}: no {option} {CONFIG_DIR}"


def test_postfix_commands_go_through_one_builder(host: PostfixHost) -> None:
    assert {"sendmail", "postsuper", "postqueue"} <= POSTFIX_PROGRAMS
    for program in sorted(POSTFIX_PROGRAMS):
        argv = host._command(program, "x")
        option = "-C" if program == "sendmail" else "-c"
        assert argv == [program, option, CONFIG_DIR, "x"]


# --- observation cost and the address space ------------------------------------------------------


def observe_cost(users: int, aliases: int) -> tuple[int, list[tuple[str, ...]]]:
    """Round trips (commands and file reads) of one observation, and its commands."""
    fake = FakePostfixHost(passwd_of(users))
    fake.files["/etc/aliases.db"] = alias_dump_of(aliases).encode()
    host = make_host(fake)
    host.enable_recipient_map()
    for n in range(0, users, 3):  # a third of them forwarded: bigger maps to dump
        host.route_to_rental(f"user{n:04d}", "example.sakura.ne.jp", 25)
    start, mark = fake.round_trips, len(fake.argvs)
    facts = host.observe(now())
    assert len(facts.accounts) == users
    assert len(facts.space.aliases) == aliases
    assert len(facts.transport) == len(range(0, users, 3))
    return fake.round_trips - start, fake.argvs[mark:]


def test_observe_costs_the_same_for_10_and_1000_users_and_1_and_50_aliases() -> None:
    costs = {}
    for users in (10, 1000):
        for aliases in (1, 50):
            cost, commands = observe_cost(users, aliases)
            costs[(users, aliases)] = cost
            for argv in commands:
                # No command names a user or an alias: the cost cannot grow with them.
                assert not any(re.search(r"user\d{4}|alias\d{3}", part) for part in argv), argv
                if posixpath.basename(argv[0]) in POSTFIX_SUITE:
                    assert argv[1:3] == ("-c", CONFIG_DIR), argv
    assert len(set(costs.values())) == 1, costs
    # find, postconf -x, getent, 3 map dumps, login.defs, postalias -s, scan, log
    assert costs[(10, 1)] == 10


def test_observe_reads_the_address_space(fake: FakePostfixHost) -> None:
    fake.params.update({
        "mydestination": "mail.example.co.jp, example.co.jp., , localhost, "
                         "hash:/etc/postfix/mydestination, $unknown",
        "myorigin": "/etc/mailname",
        "recipient_delimiter": "+",
        "alias_maps": "hash:/etc/aliases, nis:mail.aliases, proxy:hash:/etc/aliases2, "
                      "ldap:/etc/postfix/ldap-aliases.cf, hash:/etc/missing",
        "virtual_alias_maps": f"hash:{CONFIG_DIR}/virtual, pcre:{CONFIG_DIR}/virtual.pcre, "
                              f"regexp:{CONFIG_DIR}/virtual.regexp, "
                              f"hash:{CONFIG_DIR}/mailrec_virtual",
        "virtual_alias_domains": f"hash:{CONFIG_DIR}/virtual hash:{CONFIG_DIR}/mailrec_virtual",
        "luser_relay": "$user@example.sakura.ne.jp",
        "local_recipient_maps": "",
    })
    fake.files.update({
        "/etc/mailname": b"example.co.jp\n",
        "/etc/aliases.db": b'@:\t@\ninfo:\tsuga, "Sato Taro"\npipe:\t"|/usr/bin/x -y"\n',
        "/etc/aliases2.db": b"info:\tnot-first\nlist:\t:include:/etc/postfix/list\n",
        f"{CONFIG_DIR}/virtual.db": (
            f"sales@{DOMAIN}\tsuga\n@mail.example.co.jp\tsato\nother@example.net\tsuga\n"
            "example.org\tanything\nroot\tsuga, sato\n").encode(),
        f"{CONFIG_DIR}/virtual.pcre": f"/^support@{DOMAIN.replace('.', chr(92) + '.')}$/ sato\n"
                                      .encode(),
        f"{CONFIG_DIR}/virtual.regexp": b"/^(.*)-owner@/ $1\n",
    })
    host = make_host(fake)
    space = host.observe(now()).space
    assert space.local_domains == ("mail.example.co.jp", "example.co.jp", "localhost")
    # An undefined $parameter is empty to postconf -x, as to Postfix itself.
    assert space.unresolved == ("hash:/etc/postfix/mydestination",)
    assert space.myorigin == "example.co.jp"  # Debian: the first line of /etc/mailname
    assert space.recipient_delimiter == "+"
    assert space.aliases == {"info": ("suga", "Sato Taro"), "pipe": ("|/usr/bin/x -y",),
                             "list": (":include:/etc/postfix/list",)}
    assert space.virtual_aliases == {"sales": ("suga",), "": ("sato",), "root": ("suga", "sato"),
                                     "support": ("sato",)}
    assert space.virtual_alias_domains == ("example.org",)
    assert space.unreadable == ("nis:mail.aliases", "ldap:/etc/postfix/ldap-aliases.cf",
                                "hash:/etc/missing", f"regexp:{CONFIG_DIR}/virtual.regexp")
    assert space.luser_relay == "$user@example.sakura.ne.jp"
    assert space.local_recipient_maps == ""
    assert space.uid_range == (1000, 60000)
    # mailrec's own virtual map (never compiled here) is not listed as the admin's: it
    # would be unreadable otherwise.


def test_a_myorigin_file_that_is_missing_is_unresolved(fake: FakePostfixHost) -> None:
    fake.params["myorigin"] = "/etc/mailname"
    space = make_host(fake).observe(now()).space
    assert space.myorigin == ""
    assert "/etc/mailname" in space.unresolved


def test_uid_range_from_login_defs_or_the_state(fake: FakePostfixHost) -> None:
    fake.passwd = PASSWD + "old:x:500:500:CentOS 6 user:/home/old:/bin/bash\n"
    fake.files["/etc/login.defs"] = b"# CentOS 6\nUID_MIN\t\t\t  500\nUID_MAX\t\t\t60000\n"
    assert "old" in make_host(fake).observe(now()).accounts
    del fake.files["/etc/login.defs"]  # missing: mailrec's default 1000-59999
    start = fake.round_trips
    facts = make_host(fake).observe(now())
    with_login_defs = fake.round_trips - start
    assert "old" not in facts.accounts and facts.space.uid_range == (1000, 59999)
    start = fake.round_trips
    facts = make_host(fake, uid_range=[500, 59999]).observe(now())
    assert "old" in facts.accounts
    assert facts.space.uid_range == (500, 59999)
    assert fake.round_trips - start == with_login_defs - 1  # the state says: no read


def test_route_to_rental_forwards_every_name_and_rewrites_before_forwarding(
    fake: FakePostfixHost, host: PostfixHost
) -> None:
    host.route_to_rental("suga", "example.sakura.ne.jp", 25)
    maps = {name: parse_map(fake.files[f"{CONFIG_DIR}/{name}"].decode())
            for name in ("mailrec_transport", "mailrec_recipients", "mailrec_virtual")}
    names = ("example.co.jp", "mail.example.co.jp", "localhost")
    assert maps["mailrec_transport"] == {f"suga@{n}": RELAY for n in names}
    assert maps["mailrec_recipients"] == {f"suga@{n}": "OK" for n in names}
    assert maps["mailrec_virtual"] == {"suga@mail.example.co.jp": "suga@example.co.jp",
                                       "suga@localhost": "suga@example.co.jp"}
    assert fake.params["virtual_alias_maps"] == f"hash:{CONFIG_DIR}/mailrec_virtual"
    # The rewrite is live (reload) before any other name is forwarded.
    order = [argv[3:] for argv in fake.postfix_argvs()
             if argv[3] in ("reload",) or argv[3].endswith(("mailrec_virtual",
                                                             "mailrec_transport"))]
    assert order == [(f"hash:{CONFIG_DIR}/mailrec_virtual",), ("reload",),
                     (f"hash:{CONFIG_DIR}/mailrec_transport",), ("reload",)]
    facts = host.observe(now())
    assert facts.transport == {"suga": RELAY}
    assert facts.partial_forward == frozenset()

    # Another name appears in mydestination: the forward is partial until routed again.
    fake.params["mydestination"] += ", mail2.example.co.jp"
    assert host.observe(now()).partial_forward == {"suga"}
    host.route_to_rental("suga", "example.sakura.ne.jp", 25)
    assert host.observe(now()).partial_forward == frozenset()

    # Back onprem: every form goes, also of names since dropped from mydestination.
    fake.params["mydestination"] = DOMAIN
    host.route_to_onprem("suga")
    for name in ("mailrec_transport", "mailrec_recipients", "mailrec_virtual"):
        assert parse_map(fake.files[f"{CONFIG_DIR}/{name}"].decode()) == {}, name


def test_a_partial_forward_is_seen(fake: FakePostfixHost, host: PostfixHost) -> None:
    """The maps an earlier mailrec wrote: user@domain only."""
    host.enable_recipient_map()
    for name, value in (("mailrec_transport", RELAY), ("mailrec_recipients", "OK")):
        fake.files[f"{CONFIG_DIR}/{name}"] = f"suga@{DOMAIN} {value}\n".encode()
        fake.run(["postmap", "-c", CONFIG_DIR, f"hash:{CONFIG_DIR}/{name}"])
    facts = host.observe(now())
    assert facts.transport == {"suga": RELAY}
    assert facts.partial_forward == {"suga"}
    # Only the domain is local: nothing else to forward.
    fake.params["mydestination"] = DOMAIN
    assert host.observe(now()).partial_forward == frozenset()


def test_remove_fallback_only_removes_what_points_at_the_rental(
    fake: FakePostfixHost, host: PostfixHost
) -> None:
    fake.params.update({"fallback_transport": "smtp:[mx.example.sakura.ne.jp]:2525",
                        "luser_relay": "$user@example.sakura.ne.jp"})
    assert host.remove_fallback("example.sakura.ne.jp") == ("luser_relay",)
    assert "luser_relay" not in fake.params
    assert fake.params["fallback_transport"] == "smtp:[mx.example.sakura.ne.jp]:2525"
    assert host.remove_fallback("other.example.net") == ()
    argvs = len(fake.argvs)
    assert host.remove_fallback("example.sakura.ne.jp", "mx.example.sakura.ne.jp.") == (
        "fallback_transport",)
    assert ("postconf", "-c", CONFIG_DIR, "-X", "fallback_transport") in fake.argvs[argvs:]
    assert f"{CONFIG_DIR}/main.cf.bak" in fake.files
    assert ("postfix", "-c", CONFIG_DIR, "reload") in fake.argvs[argvs:]
    assert host.remove_fallback("example.sakura.ne.jp") == ()  # nothing left
    argvs = len(fake.argvs)
    for hostile in ("x;id", "a b", "-oProxy"):
        with pytest.raises(PostfixError, match="relay host"):
            host.remove_fallback(hostile)
    with pytest.raises(PostfixError, match="name the rental"):
        host.remove_fallback()
    assert len(fake.argvs) == argvs  # refused before any command


def test_a_failed_remove_fallback_restores_main_cf(fake: FakePostfixHost, host: PostfixHost
                                                   ) -> None:
    fake.params["fallback_transport"] = "smtp:[example.sakura.ne.jp]"
    before = fake.files[f"{CONFIG_DIR}/main.cf"]
    fake.failing.add("check")
    with pytest.raises(PostfixError, match="restored"):
        host.remove_fallback("example.sakura.ne.jp")
    assert fake.files[f"{CONFIG_DIR}/main.cf"] == before


def test_a_postfix_without_postconf_x_is_expanded_by_mailrec() -> None:
    """CentOS 6 ships Postfix 2.6: no `postconf -x`. One more command (all of `postconf`),
    expanded by mailrec, gives the same facts."""
    new, old = FakePostfixHost(), FakePostfixHost(expand_option=False)
    for fake in (new, old):
        host = make_host(fake)
        host.enable_recipient_map()
        host.route_to_rental("suga", "example.sakura.ne.jp", 25)
    start = (new.round_trips, old.round_trips)
    facts = make_host(new).observe(now()), make_host(old).observe(now())
    assert facts[0] == facts[1]
    assert facts[1].space.local_domains == ("mail.example.co.jp", DOMAIN, "localhost")
    assert facts[1].partial_forward == frozenset()
    assert old.round_trips - start[1] == new.round_trips - start[0] + 1
    assert parse_map(old.files[f"{CONFIG_DIR}/mailrec_virtual"].decode()) == {
        "suga@mail.example.co.jp": "suga@example.co.jp", "suga@localhost": "suga@example.co.jp"}


def test_mailbox_homes_groups_the_accounts_for_the_one_scan() -> None:
    accounts = parse_accounts(
        "root:x:0:0:root:/root:/bin/bash\n"
        "postfix:x:102:105::/var/spool/postfix:/usr/sbin/nologin\n"
        "systemd-network:x:998:998::/:/usr/sbin/nologin\n"
        "polkitd:x:996:996::/nonexistent:/usr/sbin/nologin\n"
        "old:x:500:500:CentOS 6 user:/home/old:/bin/bash\n"
        "suga:x:1001:1001::/home/suga:/bin/bash\n"
        "sato:x:1002:1002::/srv/people/sato:/bin/bash\n"
        "gone:x:1003:1003::/home/gone:/bin/bash\n"
        "Taro:x:1004:1004::/srv/people/Taro:/bin/bash\n")
    maildir = MailboxSpec.parse("maildir:~/Maildir")
    homes = mailbox_homes(accounts, (1000, 60000), {"gone"}, maildir)
    assert homes.people == {"suga": "/home/suga", "sato": "/srv/people/sato"}
    assert homes.strays == {"gone": "/home/gone"}
    # Beside people's homes only: never /, /root or system directories walked by the scan.
    assert homes.others == {"old": "/home/old", "Taro": "/srv/people/Taro"}
    wider = mailbox_homes(accounts, (500, 60000), set(), maildir)
    assert set(wider.people) == {"old", "suga", "sato", "gone"}  # not the home-/ accounts
    spool = mailbox_homes(accounts, (1000, 60000), (), MailboxSpec.parse("mbox:/var/mail/{user}"))
    assert set(spool.others) == {"root", "postfix", "systemd-network", "polkitd", "old", "Taro"}
    # A person whose home is not a clean path stays in: the scan refuses it (fail closed).
    odd = mailbox_homes(parse_accounts("x:x:1001:1::/home/../etc:/bin/sh\n"), (1000, 60000),
                        (), maildir)
    assert odd.people == {"x": "/home/../etc"}


# --- the forward-path probe ------------------------------------------------------------------


def probe_host(fake: FakePostfixHost) -> tuple[PostfixHost, list[float]]:
    """The driver with its waits recorded instead of slept."""
    host = make_host(fake)
    waits: list[float] = []
    host.sleep = waits.append
    return host, waits


def transport_entries(fake: FakePostfixHost) -> tuple[dict[str, str], dict[str, str]]:
    """mailrec_transport's source and its compiled table."""
    return (parse_map(fake.files[f"{CONFIG_DIR}/mailrec_transport"].decode()),
            parse_map(fake.files[f"{CONFIG_DIR}/mailrec_transport.db"].decode()))


def probe_commands(fake: FakePostfixHost, start: int) -> list[tuple[str, ...]]:
    """The commands since `start`, as (program, what it acts on)."""
    shown = []
    for argv in fake.argvs[start:]:
        program = posixpath.basename(argv[0])
        if program in ("postfix", "postconf", "postsuper"):
            shown.append((program, *argv[3:5]))
        elif program == "postmap":
            shown.append((program, posixpath.basename(argv[-1])))
        else:
            shown.append((program,))
    return shown


def test_the_probe_goes_through_postfix_by_the_transport_entry_and_leaves_nothing(
    fake: FakePostfixHost,
) -> None:
    host, waits = probe_host(fake)
    host.route_to_rental("suga", "example.sakura.ne.jp", 25)  # a user forwarded already
    start = len(fake.argvs)
    said = host.probe_forward("example.sakura.ne.jp", 25)

    assert "reached the rental" in said and "said: 550" in said and "\n" not in said
    assert probe_commands(fake, start) == [
        # the entry, under the change discipline (transport_maps names the map already)
        ("postmap", "mailrec_transport"), ("postconf", "transport_maps"),
        ("postfix", "check"), ("postfix", "reload"),
        ("sendmail",), ("grep",),  # logged at the first look
        # the entry removed again
        ("postmap", "mailrec_transport"), ("postfix", "check"), ("postfix", "reload"),
    ]
    (sent,) = fake.submitted
    argv = sent["argv"]
    assert argv == ("sendmail", "-C", CONFIG_DIR, "-f", "<>", "-oi", "--", PROBE)
    # When it was submitted, the entry was compiled and main.cf named the map.
    assert sent["routed"] == RELAY
    assert sent["transport_maps"] == f"hash:{CONFIG_DIR}/mailrec_transport"
    message = str(sent["message"])
    token = re.search(r"^Subject: mailrec forward-path probe (\S+)$", message, re.MULTILINE)
    assert token is not None
    assert f"Message-ID: <mailrec-probe.{token.group(1)}@{DOMAIN}>" in message
    # The entry is gone from the source and the table; the user's entries stay.
    source, table = transport_entries(fake)
    assert PROBE not in source and PROBE not in table
    assert source[f"suga@{DOMAIN}"] == RELAY == table[f"suga@{DOMAIN}"]
    assert fake.deleted == [] and waits == [PROBE_WAITS[0]]
    assert_every_postfix_command_names_the_instance(fake)

    # A second probe gets another token: its lines are told apart from the first's.
    fake.probe_result = "sent"
    assert "status=sent" in host.probe_forward("example.sakura.ne.jp", 25)
    assert fake.submitted[0]["message"] != fake.submitted[1]["message"]


def test_the_probe_names_the_map_in_main_cf_first(fake: FakePostfixHost) -> None:
    host, _ = probe_host(fake)
    assert fake.params["transport_maps"] == ""
    host.probe_forward("example.sakura.ne.jp", 25)
    assert fake.submitted[0]["transport_maps"] == f"hash:{CONFIG_DIR}/mailrec_transport"
    assert f"{CONFIG_DIR}/main.cf.bak" in fake.files
    source, table = transport_entries(fake)
    assert source == table == {}
    assert host.observe(now()).transport == {}  # nobody is forwarded by it


def test_a_deferred_probe_fails_and_is_deleted_from_the_queue(fake: FakePostfixHost) -> None:
    fake.probe_result = "deferred"
    host, waits = probe_host(fake)
    start = len(fake.argvs)
    with pytest.raises(PostfixError) as failed:
        host.probe_forward("example.sakura.ne.jp", 25)
    text = str(failed.value)
    assert "path onprem -> rental does not work" in text
    assert "Connection refused" in text and "relayhost" in text
    assert fake.deleted == ["3F1A2C4D5E"]
    assert ("postsuper", "-c", CONFIG_DIR, "-d", "3F1A2C4D5E") in fake.argvs
    assert "postsuper -d 3F1A2C4D5E" in text
    source, table = transport_entries(fake)
    assert PROBE not in source and PROBE not in table
    assert len(waits) == 1  # a deferral ends the wait
    assert probe_commands(fake, start)[-4:] == [
        ("postsuper", "-d", "3F1A2C4D5E"),
        ("postmap", "mailrec_transport"), ("postfix", "check"), ("postfix", "reload")]
    assert_every_postfix_command_names_the_instance(fake)


@pytest.mark.parametrize("result", ["silent", "lost"])
def test_no_delivery_line_within_the_wait_fails_after_a_bounded_number_of_looks(
    fake: FakePostfixHost, result: str
) -> None:
    fake.probe_result = result
    host, waits = probe_host(fake)
    start = len(fake.argvs)
    with pytest.raises(PostfixError, match="does not work") as failed:
        host.probe_forward("example.sakura.ne.jp", 25)
    assert waits == list(PROBE_WAITS)
    assert 25 <= sum(waits) <= 35
    commands = probe_commands(fake, start)
    assert commands.count(("grep",)) == len(PROBE_WAITS)  # one command per look
    if result == "silent":  # queued, not delivered (a connect timeout): taken out of the queue
        assert fake.deleted == ["3F1A2C4D5E"]
        assert "no delivery attempt" in str(failed.value)
    else:  # never even queued: no queue id to delete
        assert fake.deleted == []
        assert "did not show up in the mail log" in str(failed.value)
    assert PROBE not in transport_entries(fake)[1]
    # entry (6, main.cf included), sendmail, the looks, postsuper, removal (3)
    assert len(commands) <= 6 + 1 + len(PROBE_WAITS) + 1 + 3


def test_a_late_delivery_line_is_found_at_a_later_look(fake: FakePostfixHost) -> None:
    fake.logged_after = 3
    host, waits = probe_host(fake)
    assert "reached the rental" in host.probe_forward("example.sakura.ne.jp", 25)
    assert waits == list(PROBE_WAITS[:3])


def test_the_probe_entry_is_removed_when_sendmail_fails(fake: FakePostfixHost) -> None:
    fake.sendmail_status = 75
    host, waits = probe_host(fake)
    with pytest.raises(PostfixError, match="submit the probe"):
        host.probe_forward("example.sakura.ne.jp", 25)
    assert waits == [] and not any(argv[0] == "grep" for argv in fake.argvs)
    assert PROBE not in transport_entries(fake)[0]
    assert PROBE not in transport_entries(fake)[1]


def test_a_failed_removal_is_told_with_the_probes_failure(fake: FakePostfixHost) -> None:
    fake.probe_result = "deferred"
    fake.on_look = lambda fake: fake.failing.add("check")  # postfix check fails from now on
    host, _ = probe_host(fake)
    with pytest.raises(PostfixError) as failed:
        host.probe_forward("example.sakura.ne.jp", 25)
    text = str(failed.value)
    assert "Connection refused" in text
    assert "removing the probe entry failed too" in text and PROBE in text


def test_the_probe_costs_the_same_whatever_the_number_of_users() -> None:
    costs = []
    for users in (3, 300):
        fake = FakePostfixHost(passwd_of(users))
        host, _ = probe_host(fake)
        host.enable_recipient_map()
        for n in range(users):
            host.route_to_rental(f"user{n:04d}", "example.sakura.ne.jp", 25)
        start = fake.round_trips
        host.probe_forward("example.sakura.ne.jp", 25)
        costs.append(fake.round_trips - start)
        assert not any(re.search(r"user\d{4}", part) for argv in fake.argvs[-12:]
                       for part in argv)
    assert costs[0] == costs[1] <= 15, costs


def test_a_hostile_relay_is_refused_before_any_command(fake: FakePostfixHost) -> None:
    host, _ = probe_host(fake)
    for smtp_host, port in (("x]:25\nfoo", 25), ("-oProxy", 25), ("a b", 25),
                            ("example.sakura.ne.jp", 0), ("example.sakura.ne.jp", 65536)):
        with pytest.raises(PostfixError, match="relay"):
            host.probe_forward(smtp_host, port)
    assert fake.argvs == []
