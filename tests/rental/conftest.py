"""Shared fixtures: a lab rental on disk and its SMTP server on 127.0.0.3 (free ports).

Addresses: the rental listens on 127.0.0.3; 127.0.0.5 is on its relay whitelist (the office's
egress); 127.0.0.6 is not. Linux answers for all of 127/8 without configuration.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconciler.drivers.rental.base import ProviderContext
from reconciler.lab.layout import LabLayout
from reconciler.lab.rental_smtp import RentalSmtpServer
from reconciler.model import Rental

DOMAIN = "example.co.jp"
RENTAL_HOST = "127.0.0.3"
WHITELISTED = "127.0.0.5"
OUTSIDER = "127.0.0.6"
PASSWORD = "suga-s3cret:x"  # a ':' inside, as passwd lines are split at the first one
EXTERNAL = "someone@example.net"


def write_rental(
    root: Path,
    *,
    domains: tuple[str, ...] = (DOMAIN,),
    users: tuple[str, ...] = ("suga", "tanaka"),
    whitelist: tuple[str, ...] = (f"{WHITELISTED}/32",),
) -> LabLayout:
    layout = LabLayout(root)
    layout.rental.mkdir(parents=True, exist_ok=True)
    layout.rental_domains.write_text("".join(f"{d}\n" for d in domains))
    layout.rental_mailboxes.write_text("".join(f"{u}@{DOMAIN}\n" for u in users))
    layout.rental_whitelist.write_text(
        "# relay without auth\n" + "".join(f"{w}\n" for w in whitelist)
    )
    layout.rental_passwd.write_text(f"suga@{DOMAIN}:{PASSWORD}\n")
    for user in users:
        for sub in ("tmp", "new", "cur"):
            (layout.rental_maildirs / user / sub).mkdir(parents=True, exist_ok=True)
    return layout


def rental_config(provider: str = "manual", **options: str) -> Rental:
    return Rental(
        provider=provider,
        mx_host="example.sakura.ne.jp.",
        smtp_host="example.sakura.ne.jp",
        spf="include:_spf.example.sakura.ne.jp",
        whitelist=["127.0.0.0/29"],
        options=options,
    )


@pytest.fixture
def lab_dir(tmp_path: Path) -> Path:
    return write_rental(tmp_path / "lab").root


@pytest.fixture
def layout(lab_dir: Path) -> LabLayout:
    return LabLayout(lab_dir)


@pytest.fixture
def rental(lab_dir: Path) -> Iterator[RentalSmtpServer]:
    server = RentalSmtpServer(lab_dir, RENTAL_HOST, 0, 0, tls_cert=None, tls_key=None)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def context(lab_dir: Path, rental: RentalSmtpServer) -> Callable[..., ProviderContext]:
    """A ProviderContext for the running lab rental; keyword arguments override fields."""

    def make(**overrides: object) -> ProviderContext:
        fields: dict[str, object] = {
            "domain": DOMAIN,
            "lab_dir": lab_dir,
            "state_dir": lab_dir / "state",
            "users": ("suga", "tanaka"),
            "probe_source": WHITELISTED,
            "services": {"rental_smtp": rental.relay_address},
        }
        fields.update(overrides)
        return ProviderContext(**fields)  # type: ignore[arg-type]

    return make


def connect(
    server: RentalSmtpServer, *, source: str = OUTSIDER, submission: bool = False
) -> smtplib.SMTP:
    port = server.submission_port if submission else server.relay_port
    client = smtplib.SMTP(
        RENTAL_HOST, port, local_hostname="client.test", source_address=(source, 0), timeout=10
    )
    client.ehlo()
    return client
