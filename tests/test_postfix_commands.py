"""Every Postfix command the onprem driver (reconciler/drivers/postfix_host.py) runs names its
instance: `-c <config_dir>` right after the program. Without it postmap/postconf/postfix read
the system's /etc/postfix/main.cf, which on a multi-instance host is another Postfix and on a
fresh machine ("No configuration") does not exist: `postmap: fatal: open
/etc/postfix/main.cf`. No service needed: a fake Transport plays the host, answers like a real
Postfix whose system main.cf is missing, and records every argv.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from reconciler.drivers.postfix import PostfixError, parse_map
from reconciler.drivers.postfix_host import POSTFIX_PROGRAMS, PostfixHost
from reconciler.model import Onprem
from reconciler.transport import CommandResult
from tests.fakes import FakeHost, fail, ok

# A second instance, as on a real multi-instance host: nothing here is /etc/postfix.
CONFIG_DIR = "/srv/postfix-onprem/etc"
DOMAIN = "example.co.jp"
PASSWD = (
    "root:x:0:0:root:/root:/bin/bash\n"
    "suga:x:1001:1001:Suga:/home/suga:/bin/bash\n"
    "sato:x:1002:1002:Sato:/home/sato:/bin/bash\n"
)
class FakePostfixHost(FakeHost):
    """A host whose only Postfix instance lives in CONFIG_DIR (no /etc/postfix/main.cf)."""

    def __init__(self) -> None:
        super().__init__("fake-onprem", CONFIG_DIR, {f"{CONFIG_DIR}/main.cf": b"# main.cf\n"})
        self.params = {
            "local_recipient_maps": "proxy:unix:passwd.byname $alias_maps",
            "transport_maps": "",
            "queue_directory": "/srv/postfix-onprem/queue",
        }
        self.failing: set[str] = set()  # postfix actions to fail, e.g. {"check"}
        self.running = True
        self.existing: set[str] = {"/home/suga/Maildir"}

    def answer(self, program: str, argv: tuple[str, ...], input: bytes | None) -> CommandResult:
        handler: Callable[[tuple[str, ...]], CommandResult] = getattr(self, f"_{program}")
        return handler(argv)

    def _postconf(self, argv: tuple[str, ...]) -> CommandResult:
        args = argv[3:]
        if args[:1] == ("-e",):
            for item in args[1:]:
                name, _, value = item.partition("=")
                self.params[name] = value
            return ok(argv)
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
            return ok(argv, PASSWD)
        lines = [line for line in PASSWD.splitlines() if line.split(":")[0] == argv[2]]
        return ok(argv, lines[0] + "\n") if lines else fail(argv, 2)

    def _sh(self, argv: tuple[str, ...]) -> CommandResult:
        return ok(argv, "      1 mailrec-find-status 0\n")  # every mailbox empty

    def _tail(self, argv: tuple[str, ...]) -> CommandResult:
        return ok(argv)  # no mail logged

    def _test(self, argv: tuple[str, ...]) -> CommandResult:
        return ok(argv) if argv[-1] in self.existing else fail(argv)

    def _mv(self, argv: tuple[str, ...]) -> CommandResult:
        self.existing.discard(argv[-2])
        self.existing.add(argv[-1])
        return ok(argv)


@pytest.fixture
def fake() -> FakePostfixHost:
    return FakePostfixHost()


@pytest.fixture
def host(fake: FakePostfixHost) -> PostfixHost:
    onprem = Onprem.model_validate({
        "connect": "local:/",
        "config_dir": CONFIG_DIR,
        "mx_host": "mail.example.co.jp.",
        "public_ip": "198.51.100.10",
        "log_file": "/srv/postfix-onprem/maillog",
    })
    return PostfixHost(fake, DOMAIN, onprem)


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

    host.retire()  # postconf queue_directory, postfix status, postfix stop
    assert host.observe(now()).retired is True

    seen = {(posixpath.basename(argv[0]), argv[3]) for argv in fake.postfix_argvs()}
    for expected in [("postconf", "local_recipient_maps"), ("postconf", "-e"),
                     ("postconf", "queue_directory"), ("postmap", "-s"),
                     ("postmap", f"hash:{CONFIG_DIR}/mailrec_transport"),
                     ("postfix", "check"), ("postfix", "reload"), ("postfix", "status"),
                     ("postfix", "stop")]:
        assert expected in seen, f"the scenario never ran {expected}"
    fake.assert_every_postfix_command_names_the_instance()
    assert not any("/etc/postfix" in part for argv in fake.argvs for part in argv)


def test_postfix_commands_go_through_one_builder(host: PostfixHost) -> None:
    for program in sorted(POSTFIX_PROGRAMS):
        argv = host._command(program, "x")
        assert argv == [program, "-c", CONFIG_DIR, "x"]
