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

from reconciler.drivers.rental.base import ProviderContext, ProviderError
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
