"""The commands the `ssh` rental provider (reconciler/drivers/rental/ssh.py) runs on the VPS,
recorded by a fake Transport (no service needed):

- every Postfix command names the managed instance, `-c <postfix_dir>` right after the program
  (without it Postfix reads the system's /etc/postfix/main.cf: another instance, or none);
- no mailbox password and no password hash ever appears in an argv (which `ps` shows on the
  VPS) or in a log line: the password goes to doveadm on stdin, and the hash doveadm returns
  is checked in Python (`verify_sha512_crypt`), not with `doveadm pw -t HASH`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

import pytest

from reconciler.drivers.rental.base import Capability, ProviderContext, ProviderError
from reconciler.drivers.rental.ssh import SshProvider, sha512_crypt, verify_sha512_crypt
from reconciler.model import Rental
from reconciler.transport import CommandResult
from tests.fakes import POSTFIX_SUITE, FakeHost, fail, ok

POSTFIX_DIR = "/srv/postfix-rental/etc"  # a second instance: nothing here is /etc/postfix
VMAILBOX = f"{POSTFIX_DIR}/vmailbox"
MYNETWORKS = f"{POSTFIX_DIR}/mynetworks"
DOVECOT_PASSWD = "/etc/dovecot/users"
MAIL_ROOT = "/var/mail/vhosts"
PASSWORD_DIR = "/var/lib/mailrec/initial-passwords"
DOMAIN = "example.co.jp"
SALT = "fakesaltfakesalt"


class FakeVps(FakeHost):
    """A VPS whose Postfix lives in POSTFIX_DIR and whose system /etc/postfix has no main.cf."""

    def __init__(self) -> None:
        super().__init__("fake-vps", POSTFIX_DIR,
                         {VMAILBOX: b"", MYNETWORKS: b"", DOVECOT_PASSWD: b""})
        self.settings = {
            "virtual_mailbox_domains": DOMAIN,
            "virtual_mailbox_maps": f"hash:{VMAILBOX}",
            "virtual_mailbox_base": MAIL_ROOT,
            "mynetworks": f"127.0.0.0/8 {MYNETWORKS}",
            "virtual_uid_maps": "static:5000",
            "virtual_gid_maps": "static:5000",
        }
        self.existing: set[str] = set()
        # What doveadm pw hashes: the first line of stdin (as it should), or "" (what it
        # falls back to after a mismatched pair, at the end of stdin).
        self.doveadm_hashes_empty = False

    def answer(self, program: str, argv: tuple[str, ...], input: bytes | None) -> CommandResult:
        args = argv[3:] if program in POSTFIX_SUITE else argv[1:]
        if program == "postconf":
            assert args[0] == "-x", argv
            return ok(argv, "".join(f"{n} = {self.settings.get(n, '')}\n" for n in args[1:]))
        if program == "postmap":
            if args[0] == "-q":
                source = self.files.get(args[2].partition(":")[2], b"").decode()
                for line in source.splitlines():
                    key, _, value = line.partition("\t")
                    if key == args[1]:
                        return ok(argv, value + "\n")
                return fail(argv, 1)
            return ok(argv)
        if program == "postfix":
            return ok(argv)
        if program == "doveadm":
            assert args == ("-O", "pw", "-s", "SHA512-CRYPT"), argv
            assert input is not None
            first = input.decode().split("\n")[0]
            password = "" if self.doveadm_hashes_empty else first
            return ok(argv, "{SHA512-CRYPT}" + sha512_crypt(password, SALT) + "\n")
        if program == "find":
            return ok(argv)  # no messages anywhere
        if program == "test":
            return ok(argv) if args[-1] in self.existing else fail(argv)
        if program == "install":
            self.existing.update(a for a in args if a.startswith("/"))
            return ok(argv)
        if program == "mv":
            self.existing.discard(args[-2])
            self.existing.add(args[-1])
            return ok(argv)
        if program == "rm":
            self.files.pop(args[-1], None)
            return ok(argv)
        raise AssertionError(f"unexpected command {argv}")


def provider_on(fake: FakeVps) -> SshProvider:
    rental = Rental(
        provider="ssh",
        mx_host="vps.rental.test.",
        smtp_host="vps.rental.test",
        spf="ip4:192.0.2.8",
        options={
            "connect": "ssh://root@vps.rental.test:22",
            "postfix_dir": POSTFIX_DIR,
            "dovecot_passwd": DOVECOT_PASSWD,
            "mail_root": MAIL_ROOT,
            "password_dir": PASSWORD_DIR,
        },
    )
    return SshProvider(rental, ProviderContext(domain=DOMAIN), transport=fake)


def argv_text(argvs: Sequence[tuple[str, ...]]) -> str:
    return "\n".join(" ".join(argv) for argv in argvs)


def test_sha512_crypt_matches_the_published_vectors_and_doveadm() -> None:
    # From Drepper's specification ("Unix crypt using SHA-256 and SHA-512"), as glibc does.
    assert sha512_crypt("Hello world!", "saltstring") == (
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbY"
        "EdFCoEOfaS35inz1"
    )
    assert sha512_crypt("Hello world!", "saltstringsaltstring", 10000) == (
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0"
        "Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v."
    )
    assert sha512_crypt("This is just a test", "toolongsaltstring", 5000) == (
        "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZx"
        "Uhx1yxdYcz/e1JSbq3y6JMxxl8audkUEm0"
    )
    # Written by `doveadm pw -s SHA512-CRYPT` (Dovecot 2.3.19, Debian 12) for "abc".
    doveadm = ("{SHA512-CRYPT}$6$bmUfzTY7bbukNxOm$tzShq2j6heXEkE/2p7ROLn5DHtl.ACMvgsOqJvWgIn/"
               "Zt8.sjuPUdX2ExtJ/eiPc6oikIioDdD1R/J97r6cAL/")
    assert verify_sha512_crypt("abc", doveadm)
    assert not verify_sha512_crypt("abd", doveadm)
    assert not verify_sha512_crypt("", doveadm)
    for bad in ("", "{SHA512-CRYPT}", "$6$x$short", "{PLAIN}abc", doveadm + "x",
                doveadm.replace("$6$", "$5$")):
        assert not verify_sha512_crypt("abc", bad)
    # A host cannot make mailrec hash for hours: absurd round counts are refused unhashed.
    assert not verify_sha512_crypt("abc", "$6$rounds=999999999$salt$" + "a" * 86)


def test_every_postfix_command_names_postfix_dir(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeVps()
    provider = provider_on(fake)
    with caplog.at_level(logging.DEBUG):
        provider.observe()
        provider.create_mailbox("suga")
        office = ipaddress.ip_network("203.0.113.8/29")
        provider.set_whitelist(frozenset({office}), frozenset())
        assert provider.observe().whitelist == {office}
        provider.delete_mailbox("suga")
        assert "suga" not in provider.observe().mailboxes

    seen = {(a[0], a[3]) for a in fake.postfix_argvs()}
    for expected in [("postconf", "-x"), ("postmap", "-q"), ("postmap", f"hash:{VMAILBOX}"),
                     ("postfix", "check"), ("postfix", "reload")]:
        assert expected in seen, f"the scenario never ran {expected}"
    fake.assert_every_postfix_command_names_the_instance()
    assert "/etc/postfix" not in argv_text(fake.argvs)


def test_no_password_or_hash_in_argv_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeVps()
    provider = provider_on(fake)
    with caplog.at_level(logging.DEBUG):
        provider.create_mailbox("suga")
    password = fake.files[provider.initial_password_files["suga"]].decode().strip()
    line = next(x for x in fake.files[DOVECOT_PASSWD].decode().splitlines()
                if x.startswith(f"suga@{DOMAIN}:"))
    hashed = line.split(":")[1]
    assert hashed.startswith("{SHA512-CRYPT}$6$")
    assert verify_sha512_crypt(password, hashed)
    # The password went to doveadm on stdin, nowhere else.
    assert any(password.encode() in data for data in fake.stdin)
    digest = hashed.rsplit("$", 1)[1]
    for secret in (password, hashed, hashed.removeprefix("{SHA512-CRYPT}"), digest):
        assert secret not in argv_text(fake.argvs)
        assert secret not in argv_text(list(fake.history))
        assert secret not in caplog.text
        for record in caplog.records:
            assert secret not in record.getMessage()
    assert not any(a[:2] == ("doveadm", "pw") and "-t" in a for a in fake.argvs)
    # Errors of this transport mask it too, should the hash ever reach one.
    assert hashed not in fake.mask(f"something failed: {hashed}")


def test_a_hash_of_another_password_is_refused() -> None:
    fake = FakeVps()
    fake.doveadm_hashes_empty = True
    provider = provider_on(fake)
    with pytest.raises(ProviderError, match="does not match the generated password"):
        provider.create_mailbox("suga")
    assert fake.files[DOVECOT_PASSWD] == b""  # no login with the empty password
    assert fake.files[VMAILBOX] == b""  # and Postfix does not accept mail for it


# --- aliases -----------------------------------------------------------------------------

ALIASES = f"{POSTFIX_DIR}/virtual_aliases"


class FakeVpsWithAliases(FakeVps):
    """The VPS above with main.cf virtual_alias_maps = hash:ALIASES (empty)."""

    def __init__(self) -> None:
        super().__init__()
        self.settings["virtual_alias_maps"] = f"hash:{ALIASES}"
        self.files[ALIASES] = b""
        self.fail_reload = False

    def answer(self, program: str, argv: tuple[str, ...], input: bytes | None) -> CommandResult:
        if program == "postfix" and argv[3:] == ("reload",) and self.fail_reload:
            return fail(argv, 1, b"postfix: fatal: injected failure\n")
        return super().answer(program, argv, input)


def alias_provider_on(fake: FakeVps) -> SshProvider:
    provider = provider_on(fake)
    options = {**provider.config.options, "virtual_alias_maps": ALIASES}
    return SshProvider(
        provider.config.model_copy(update={"options": options}),
        ProviderContext(domain=DOMAIN),
        transport=fake,
    )


def observe_cost(provider: SshProvider, fake: FakeVps) -> tuple[int, list[tuple[str, ...]]]:
    before, mark = fake.round_trips, len(fake.argvs)
    provider.observe()
    return fake.round_trips - before, fake.argvs[mark:]


def test_observe_cost_does_not_grow_with_aliases() -> None:
    plain = FakeVps()
    cost_without, _ = observe_cost(provider_on(plain), plain)

    fake = FakeVpsWithAliases()
    provider = alias_provider_on(fake)
    cost_none, argvs_none = observe_cost(provider, fake)
    fake.files[ALIASES] = "".join(
        f"alias{i:02d}@{DOMAIN}\tsuga@{DOMAIN}, x{i}@partner.example\n" for i in range(60)
    ).encode()
    cost_many, argvs_many = observe_cost(provider, fake)
    assert cost_many == cost_none == cost_without + 1  # one file read, whatever it holds
    assert argvs_many == argvs_none  # the same commands: nothing per alias
    assert not any(a[0] == "postmap" for a in argvs_many)  # no lookup per alias
    snapshot = provider.observe()
    assert len(snapshot.aliases) == 60
    assert snapshot.aliases["alias07"] == (f"suga@{DOMAIN}", "x7@partner.example")
    # One postconf names virtual_alias_maps among the other parameters.
    [postconf] = [a for a in argvs_many if a[0] == "postconf"]
    assert "virtual_alias_maps" in postconf


def test_observe_reads_only_this_domain_and_notes_shadowed_mailboxes() -> None:
    fake = FakeVpsWithAliases()
    fake.files[VMAILBOX] = f"suga@{DOMAIN}\t{DOMAIN}/suga/\n".encode()
    fake.files[ALIASES] = (
        "# aliases\n"
        f"info@{DOMAIN}  tanaka@{DOMAIN},suga@{DOMAIN}\n"
        f"suga@{DOMAIN}  taro@example.net\n"
        "info@other.example  a@other.example\n"
    ).encode()
    snapshot = alias_provider_on(fake).observe()
    assert snapshot.aliases == {
        "info": (f"suga@{DOMAIN}", f"tanaka@{DOMAIN}"),
        "suga": ("taro@example.net",),
    }
    assert any("suga@example.co.jp is both an alias and a mailbox" in n for n in snapshot.notes)


def test_create_alias_command_sequence() -> None:
    fake = FakeVpsWithAliases()
    fake.files[ALIASES] = b"# kept\nold@example.co.jp\tsuga@example.co.jp\n"
    provider = alias_provider_on(fake)
    mark = len(fake.argvs)
    provider.create_alias("info", (f"tanaka@{DOMAIN}", f"SUGA@{DOMAIN}", "kato@partner.example"))
    value = f"kato@partner.example, suga@{DOMAIN}, tanaka@{DOMAIN}"
    assert fake.files[ALIASES].decode() == (
        f"# kept\nold@example.co.jp\tsuga@example.co.jp\ninfo@{DOMAIN}\t{value}\n"
    )
    assert fake.files[ALIASES + ".bak"] == b"# kept\nold@example.co.jp\tsuga@example.co.jp\n"
    changes = [a for a in fake.argvs[mark:] if a[0] in ("postmap", "postfix")]
    assert changes == [
        ("postmap", "-c", POSTFIX_DIR, f"hash:{ALIASES}"),
        ("postfix", "-c", POSTFIX_DIR, "check"),
        ("postfix", "-c", POSTFIX_DIR, "reload"),
        # Each argument one argv element (no shell): the address is never split or quoted.
        ("postmap", "-c", POSTFIX_DIR, "-q", f"info@{DOMAIN}", f"hash:{ALIASES}"),
    ]
    # Observed before (to refuse a mailbox name) and after (to verify): two postconf runs.
    assert sum(a[0] == "postconf" for a in fake.argvs[mark:]) == 2
    fake.assert_every_postfix_command_names_the_instance()
    assert provider.observe().aliases["info"] == tuple(value.split(", "))

    # The same members again: nothing written, nothing reloaded.
    mark = len(fake.argvs)
    provider.create_alias("info", tuple(value.split(", ")))
    assert not any(a[0] in ("postmap", "postfix") for a in fake.argvs[mark:])
    # Replacing the members rewrites the one line.
    provider.create_alias("info", (f"suga@{DOMAIN}",))
    assert fake.files[ALIASES].decode().count("info@") == 1
    assert provider.observe().aliases["info"] == (f"suga@{DOMAIN}",)


@pytest.mark.parametrize(
    ("name", "members", "message"),
    [
        ("info", (f"suga@{DOMAIN}; rm -rf /",), "is not a mail address"),
        ("info", (f"suga@{DOMAIN}\ninfo@{DOMAIN}\troot@{DOMAIN}",), "is not a mail address"),
        ("info", (f"suga@{DOMAIN}, root@{DOMAIN}",), "is not a mail address"),
        ("info", ("$(id)@example.net",), "is not a mail address"),
        ("info", ("-q@example.net",), None),  # valid: written into the map, never into argv
        ("info", (), "has no members"),
        ("info", (f"info@{DOMAIN}",), "lists itself"),
        ("in fo", (f"suga@{DOMAIN}",), "not a valid user name"),
        ("-info", (f"suga@{DOMAIN}",), "not a valid user name"),
    ],
)
def test_create_alias_validates_before_any_command(
    name: str, members: tuple[str, ...], message: str | None
) -> None:
    fake = FakeVpsWithAliases()
    provider = alias_provider_on(fake)
    if message is None:
        provider.create_alias(name, members)
        assert fake.files[ALIASES] == f"{name}@{DOMAIN}\t{members[0]}\n".encode()
        return
    with pytest.raises(ProviderError, match=message):
        provider.create_alias(name, members)
    assert fake.argvs == []  # refused before reaching the VPS
    assert fake.files[ALIASES] == b""


def test_create_alias_refuses_a_mailbox_name() -> None:
    fake = FakeVpsWithAliases()
    provider = alias_provider_on(fake)
    provider.create_mailbox("suga")
    mark = len(fake.argvs)
    with pytest.raises(ProviderError, match=r"refusing to create the alias suga@example\.co\.jp"
                       r" on .*: a mailbox of that name exists"):
        provider.create_alias("suga", (f"tanaka@{DOMAIN}",))
    assert fake.files[ALIASES] == b""
    assert not any(a[0] in ("postmap", "postfix") for a in fake.argvs[mark:])


def test_a_failed_reload_restores_the_alias_map() -> None:
    fake = FakeVpsWithAliases()
    fake.files[ALIASES] = f"old@{DOMAIN}\tsuga@{DOMAIN}\n".encode()
    fake.fail_reload = True
    provider = alias_provider_on(fake)
    with pytest.raises(ProviderError, match=r"restored the previous"):
        provider.create_alias("info", (f"suga@{DOMAIN}",))
    assert fake.files[ALIASES] == f"old@{DOMAIN}\tsuga@{DOMAIN}\n".encode()
    recompiled = [a for a in fake.argvs if a == ("postmap", "-c", POSTFIX_DIR, f"hash:{ALIASES}")]
    assert len(recompiled) == 2  # the new map, then the restored one


def test_aliases_need_the_option_and_main_cf() -> None:
    # Without the option: no alias capability, no read of any alias file.
    fake = FakeVpsWithAliases()
    provider = provider_on(fake)
    assert not provider.supports(Capability.LIST_ALIASES)
    assert not provider.supports(Capability.CREATE_ALIAS)
    assert provider.supports(Capability.CREATE_MAILBOX)
    fake.files[ALIASES] = f"info@{DOMAIN}\tsuga@{DOMAIN}\n".encode()
    assert provider.observe().aliases == {}
    with pytest.raises(ProviderError, match=r"set rental\.options\.virtual_alias_maps"):
        provider.create_alias("info", (f"suga@{DOMAIN}",))

    # With it, but main.cf does not use the file: noted, nothing in effect, creation refused.
    with_option = alias_provider_on(fake)
    assert with_option.supports(Capability.LIST_ALIASES)
    assert with_option.supports(Capability.CREATE_ALIAS)
    fake.settings["virtual_alias_maps"] = ""
    snapshot = with_option.observe()
    assert snapshot.aliases == {}
    assert any("virtual_alias_maps does not use" in n for n in snapshot.notes)
    with pytest.raises(ProviderError, match=r"set virtual_alias_maps = hash:"):
        with_option.create_alias("sales", (f"suga@{DOMAIN}",))


def test_the_alias_map_option_must_be_its_own_file() -> None:
    fake = FakeVps()
    config = provider_on(fake).config
    for clash in (VMAILBOX, MYNETWORKS, DOVECOT_PASSWD):
        options = {**config.options, "virtual_alias_maps": clash}
        with pytest.raises(ProviderError, match="give it its own file"):
            SshProvider(config.model_copy(update={"options": options}),
                        ProviderContext(domain=DOMAIN), transport=fake)
    options = {**config.options, "virtual_alias_maps": "etc/aliases"}
    with pytest.raises(ProviderError, match="virtual_alias_maps"):
        SshProvider(config.model_copy(update={"options": options}),
                    ProviderContext(domain=DOMAIN), transport=fake)
