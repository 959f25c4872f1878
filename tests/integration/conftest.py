"""Session fixtures for the integration tests: real daemons on loopback, stopped at the end.

The rental VPS of the `ssh` provider lives on 127.0.0.8: sshd on port 2222 (root, per-run
host and client keys), Postfix with virtual mailboxes and a virtual alias map (and
`recipient_delimiter = +`) on 2525, Dovecot IMAP on 1143. Under
`CI=true` a missing binary or a daemon that does not start fails the tests that need it;
elsewhere they are skipped with the reason. Other tests reuse `service_stack` and
`service_dir` with the starters in `services.py` (e.g. the onprem Postfix on 127.0.0.2).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.drivers.postfix_host import PostfixHost
from reconciler.drivers.rental.base import ProviderContext
from reconciler.drivers.rental.ssh import SshProvider
from reconciler.model import Rental
from reconciler.transport import Transport

from .onprem import OnpremStack
from .services import (
    Dovecot,
    Postfix,
    ServiceStack,
    Sshd,
    make_base_dir,
    require_binary,
    start_dovecot,
    start_or_unavailable,
    start_postfix,
    start_sshd,
)

RENTAL_ADDRESS = "127.0.0.8"
RENTAL_SSH_PORT = 2222
RENTAL_SMTP_PORT = 2525
RENTAL_IMAP_PORT = 1143
DOMAIN = "example.co.jp"
VMAIL_UID = VMAIL_GID = 5000  # the virtual mail owner; no passwd entry needed


@pytest.fixture(scope="session")
def service_stack() -> Iterator[ServiceStack]:
    stack = ServiceStack()
    yield stack
    stack.stop_all()


@pytest.fixture(scope="session")
def service_dir(service_stack: ServiceStack) -> Path:
    """A session directory daemon users can enter (pytest's tmp_path is 0700)."""
    return service_stack.add_dir(make_base_dir())


@pytest.fixture(scope="session")
def rental_sshd(service_stack: ServiceStack, service_dir: Path) -> Sshd:
    sshd = start_or_unavailable(
        lambda: start_sshd(
            service_dir / "rental-sshd", address=RENTAL_ADDRESS, port=RENTAL_SSH_PORT
        )
    )
    return service_stack.add(sshd)


@dataclass(frozen=True)
class RentalVps:
    """The rental VPS on 127.0.0.8: what the ssh provider manages, and where its files are."""

    sshd: Sshd
    postfix: Postfix
    dovecot: Dovecot
    mail_root: Path
    vmailbox: Path
    mynetworks: Path
    passwd: Path
    password_dir: Path
    virtual_aliases: Path  # the alias map source (main.cf virtual_alias_maps)

    def options(self) -> dict[str, str]:
        return {
            "connect": self.sshd.connect("root"),
            "known_hosts": str(self.sshd.known_hosts),
            "key_file": str(self.sshd.client_key),
            "postfix_dir": str(self.postfix.config_dir),
            "virtual_mailbox_maps": str(self.vmailbox),
            "dovecot_passwd": str(self.passwd),
            "mail_root": str(self.mail_root),
            "mynetworks_file": str(self.mynetworks),
            "password_dir": str(self.password_dir),
            "virtual_alias_maps": str(self.virtual_aliases),
        }


@pytest.fixture(scope="session")
def rental_vps(service_stack: ServiceStack, service_dir: Path, rental_sshd: Sshd) -> RentalVps:
    root = service_dir / "rental"
    mail_root = root / "vhosts"
    mail_root.mkdir(parents=True)
    postfix_dir = root / "postfix"
    config_dir = postfix_dir / "etc"

    def start() -> RentalVps:
        for tool in ("postconf", "postmap", "doveadm"):
            require_binary(tool)
        postfix = service_stack.add(
            start_postfix(
                postfix_dir,
                address=RENTAL_ADDRESS,
                smtp_port=RENTAL_SMTP_PORT,
                myhostname="vps.rental.test",
                main_cf={
                    "virtual_mailbox_domains": DOMAIN,
                    "virtual_mailbox_maps": f"hash:{config_dir / 'vmailbox'}",
                    "virtual_mailbox_base": str(mail_root),
                    "virtual_uid_maps": f"static:{VMAIL_UID}",
                    "virtual_gid_maps": f"static:{VMAIL_GID}",
                    # Narrower than the usual 127.0.0.0/8, so other loopback addresses can
                    # play outside hosts in the relay whitelist test.
                    "mynetworks": f"127.0.0.1/32 {config_dir / 'mynetworks'}",
                    "virtual_alias_maps": f"hash:{config_dir / 'virtual_aliases'}",
                    # As hosted services do: user+tag@ reaches user@.
                    "recipient_delimiter": "+",
                },
                files={"vmailbox": "", "mynetworks": "", "virtual_aliases": ""},
                postmap=("vmailbox", "virtual_aliases"),
            )
        )
        dovecot = service_stack.add(
            start_dovecot(root / "dovecot", address=RENTAL_ADDRESS, imap_port=RENTAL_IMAP_PORT)
        )
        return RentalVps(
            sshd=rental_sshd,
            postfix=postfix,
            dovecot=dovecot,
            mail_root=mail_root,
            vmailbox=config_dir / "vmailbox",
            mynetworks=config_dir / "mynetworks",
            passwd=dovecot.passwd_file,
            password_dir=root / "initial-passwords",
            virtual_aliases=config_dir / "virtual_aliases",
        )

    return start_or_unavailable(start)


def rental_config(options: dict[str, str]) -> Rental:
    return Rental(
        provider="ssh",
        mx_host="vps.rental.test.",
        smtp_host=RENTAL_ADDRESS,
        relay_port=RENTAL_SMTP_PORT,
        spf="ip4:127.0.0.8",
        options=options,
    )


# For the modules that start an onprem stack (a module-scoped `onprem` fixture of their
# own): an SSH transport to it, and the real-host driver over that transport.
@pytest.fixture
def ssh(onprem: OnpremStack) -> Iterator[Transport]:
    transport = onprem.ssh()
    yield transport
    transport.close()


@pytest.fixture
def host(onprem: OnpremStack, ssh: Transport) -> PostfixHost:
    return PostfixHost(ssh, DOMAIN, onprem.onprem())


@pytest.fixture
def ssh_provider(rental_vps: RentalVps) -> Iterator[SshProvider]:
    provider = SshProvider(rental_config(rental_vps.options()), ProviderContext(domain=DOMAIN))
    yield provider
    provider.close()
