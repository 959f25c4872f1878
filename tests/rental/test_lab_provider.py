"""The lab provider: the lab rental's files read and changed as a rental service."""

from __future__ import annotations

import os
from ipaddress import ip_network
from pathlib import Path

import pytest

from reconciler.drivers.rental import lab as lab_module
from reconciler.drivers.rental.base import Capability, ProviderContext, ProviderError
from reconciler.drivers.rental.lab import LabProvider, atomic_write
from reconciler.lab.layout import LabLayout

from .conftest import DOMAIN, WHITELISTED, rental_config, write_rental


def provider_for(layout: LabLayout) -> LabProvider:
    return LabProvider(rental_config("lab"), ProviderContext(DOMAIN, lab_dir=layout.root))


def put_messages(layout: LabLayout, user: str, new: int, cur: int = 0) -> None:
    for sub, count in (("new", new), ("cur", cur)):
        for i in range(count):
            (layout.rental_maildirs / user / sub / f"{i}.M1P1Q{i}.lab").write_text("x\n")


def test_observe_reads_everything_in_one_pass(layout: LabLayout) -> None:
    put_messages(layout, "suga", new=2, cur=1)
    with layout.rental_mailboxes.open("a") as handle:
        handle.write("sato@other.example\n")  # another domain at the same rental: not ours
    snapshot = provider_for(layout).observe()
    assert snapshot.domain_accepted is True
    assert snapshot.mailboxes == {"suga": 3, "tanaka": 0}
    assert snapshot.whitelist == frozenset([ip_network(f"{WHITELISTED}/32")])
    assert snapshot.notes == ()


def test_it_can_do_everything_itself(layout: LabLayout) -> None:
    assert provider_for(layout).capabilities == frozenset(Capability)


def test_create_mailbox_adds_the_line_and_the_maildir(layout: LabLayout) -> None:
    before = layout.rental_mailboxes.read_text()
    provider = provider_for(layout)
    provider.create_mailbox("kato")
    provider.create_mailbox("kato")  # idempotent
    lines = layout.rental_mailboxes.read_text().splitlines()
    assert lines.count(f"kato@{DOMAIN}") == 1
    assert all((layout.rental_maildirs / "kato" / sub).is_dir() for sub in ("new", "cur", "tmp"))
    assert layout.rental_mailboxes.with_name("mailboxes.bak").read_text() == before
    assert provider.observe().mailboxes["kato"] == 0


def test_create_refuses_a_domain_the_rental_does_not_host(tmp_path: Path) -> None:
    layout = write_rental(tmp_path / "lab", domains=("other.example",))
    with pytest.raises(ProviderError, match=r"does not host example\.co\.jp"):
        provider_for(layout).create_mailbox("kato")


def test_delete_is_refused_while_the_maildir_holds_mail(layout: LabLayout) -> None:
    put_messages(layout, "suga", new=1, cur=1)
    before = layout.rental_mailboxes.read_text()
    provider = provider_for(layout)
    with pytest.raises(ProviderError, match=r"MR008: refusing to delete suga@example.co.jp.*2 m"):
        provider.delete_mailbox("suga")
    assert layout.rental_mailboxes.read_text() == before
    assert (layout.rental_maildirs / "suga").is_dir()


def test_delete_of_an_empty_mailbox(layout: LabLayout) -> None:
    provider = provider_for(layout)
    provider.delete_mailbox("tanaka")
    provider.delete_mailbox("tanaka")  # idempotent
    assert f"tanaka@{DOMAIN}" not in layout.rental_mailboxes.read_text()
    assert not (layout.rental_maildirs / "tanaka").exists()
    assert "tanaka" not in provider.observe().mailboxes


def test_delete_looks_again_after_unlisting(
    layout: LabLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A message delivered between the first check and the unlisting must stop the delete.
    provider = provider_for(layout)
    write = provider._write_mailboxes
    calls: list[frozenset[lab_module.Address]] = []

    def write_then_deliver(boxes: frozenset[lab_module.Address]) -> None:
        write(boxes)
        if not calls:
            put_messages(layout, "tanaka", new=1)
        calls.append(boxes)

    monkeypatch.setattr(provider, "_write_mailboxes", write_then_deliver)
    with pytest.raises(ProviderError, match="MR008"):
        provider.delete_mailbox("tanaka")
    assert f"tanaka@{DOMAIN}" in layout.rental_mailboxes.read_text()  # listed again


def test_set_whitelist_keeps_a_backup(layout: LabLayout) -> None:
    before = layout.rental_whitelist.read_text()
    provider = provider_for(layout)
    provider.set_whitelist(
        add=frozenset([ip_network("203.0.113.8/29"), ip_network("2001:db8::/32")]),
        remove=frozenset([ip_network(f"{WHITELISTED}/32")]),
    )
    assert layout.rental_whitelist.read_text() == "203.0.113.8/29\n2001:db8::/32\n"
    assert layout.rental_whitelist.with_name("whitelist.bak").read_text() == before
    assert provider.observe().whitelist == frozenset(
        [ip_network("203.0.113.8/29"), ip_network("2001:db8::/32")]
    )


def test_a_failed_write_leaves_the_old_file_and_no_temp(
    layout: LabLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = layout.rental_whitelist.read_text()

    def crash(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(layout.rental_whitelist, "203.0.113.8/29\n")
    assert layout.rental_whitelist.read_text() == before
    assert sorted(p.name for p in layout.rental.iterdir() if p.name.endswith(".tmp")) == []


def test_bad_lines_name_the_file_and_line(layout: LabLayout) -> None:
    layout.rental_whitelist.write_text("127.0.0.5/32\n203.0.113.9/29\n")
    with pytest.raises(ProviderError, match=r"whitelist:2: .*did you mean 203\.0\.113\.8/29"):
        provider_for(layout).observe()


def test_needs_a_lab() -> None:
    with pytest.raises(ProviderError, match="--lab DIR"):
        LabProvider(rental_config("lab"), ProviderContext(DOMAIN))


def test_rejects_invalid_user_names(layout: LabLayout) -> None:
    with pytest.raises(ProviderError, match="not a valid user name"):
        provider_for(layout).create_mailbox("../etc")


# --- aliases -----------------------------------------------------------------------------


def test_create_alias_round_trip(layout: LabLayout) -> None:
    provider = provider_for(layout)
    assert provider.observe().aliases == {}  # no aliases file yet: none
    provider.create_alias("info", (f"TANAKA@{DOMAIN}", f"suga@{DOMAIN}", f"suga@{DOMAIN}"))
    provider.create_alias("sales", ("kato@partner.example",))
    # The file format, members lower-case, without duplicates, sorted.
    assert layout.rental_aliases.read_text() == (
        f"info@{DOMAIN}: suga@{DOMAIN}, tanaka@{DOMAIN}\n"
        f"sales@{DOMAIN}: kato@partner.example\n"
    )
    assert provider.observe().aliases == {
        "info": (f"suga@{DOMAIN}", f"tanaka@{DOMAIN}"),
        "sales": ("kato@partner.example",),
    }
    # Replacing an alias keeps the previous file as .bak; the same members again is a no-op.
    before = layout.rental_aliases.read_text()
    provider.create_alias("info", (f"suga@{DOMAIN}",))
    assert layout.rental_aliases.with_name("aliases.bak").read_text() == before
    assert provider.observe().aliases["info"] == (f"suga@{DOMAIN}",)
    mtime = layout.rental_aliases.stat().st_mtime_ns
    provider.create_alias("info", (f"suga@{DOMAIN}",))
    assert layout.rental_aliases.stat().st_mtime_ns == mtime


def test_observe_reads_aliases_of_this_domain_only(layout: LabLayout) -> None:
    layout.rental_aliases.write_text(
        "# forwarding addresses\n\n"
        f"info@{DOMAIN}: tanaka@{DOMAIN},suga@{DOMAIN}  # the front desk\n"
        "info@other.example: someone@other.example\n"
        f"suga@{DOMAIN}: taro@example.net\n"  # shadows the mailbox: noted
    )
    snapshot = provider_for(layout).observe()
    assert snapshot.aliases == {
        "info": (f"suga@{DOMAIN}", f"tanaka@{DOMAIN}"),
        "suga": ("taro@example.net",),
    }
    assert snapshot.notes == (
        f"suga@{DOMAIN} is both an alias and a mailbox: mail goes to the alias's members, "
        "the mailbox receives none",
    )


def test_create_alias_refuses_a_mailbox_name(layout: LabLayout) -> None:
    provider = provider_for(layout)
    with pytest.raises(ProviderError, match=r"refusing to create the alias suga@example\.co\.jp: "
                       "a mailbox of that name exists"):
        provider.create_alias("suga", (f"tanaka@{DOMAIN}",))
    assert not layout.rental_aliases.exists()


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (("not-an-address",), "member 'not-an-address' is not a mail address"),
        ((f"a@{DOMAIN}\nevil@{DOMAIN}",), "is not a mail address"),  # would add a line
        ((f"a@{DOMAIN}, b@{DOMAIN}",), "is not a mail address"),  # one member, not two
        (("a#b@example.net",), "is not a mail address"),  # '#' starts a comment in the file
        (("a@-bad-.example",), "is not a mail address"),
        ((), "has no members"),
        ((f"info@{DOMAIN}",), "it lists itself"),
        (f"suga@{DOMAIN}", "must be a tuple"),  # a bare string, not a tuple
    ],
)
def test_create_alias_refuses_bad_members(
    layout: LabLayout, members: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ProviderError, match=message):
        provider_for(layout).create_alias("info", members)
    assert not layout.rental_aliases.exists()


def test_create_alias_refuses_a_bad_name_and_an_unhosted_domain(tmp_path: Path) -> None:
    layout = write_rental(tmp_path / "lab")
    with pytest.raises(ProviderError, match="not a valid user name"):
        provider_for(layout).create_alias("../info", (f"suga@{DOMAIN}",))
    other = write_rental(tmp_path / "other", domains=("other.example",))
    with pytest.raises(ProviderError, match=r"does not host example\.co\.jp"):
        provider_for(other).create_alias("info", (f"suga@{DOMAIN}",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (f"# ok\ninfo@{DOMAIN}: suga@{DOMAIN}\ninfo {DOMAIN}\n",
         r"aliases:3: 'info example\.co\.jp' is not an alias"),
        (f"\n\nInfo Desk@{DOMAIN}: suga@{DOMAIN}\n", r"aliases:3: .* is not an alias"),
        (f"info@{DOMAIN}: suga@{DOMAIN}, nobody\n",
         r"aliases:1: 'nobody' \(a member of info@example\.co\.jp\) is not a mail address"),
        (f"info@{DOMAIN}:   # nothing\n",
         r"aliases:1: the alias info@example\.co\.jp has no members"),
        (f"info@{DOMAIN}: suga@{DOMAIN}\n\ninfo@{DOMAIN}: tanaka@{DOMAIN}\n",
         r"aliases:3: the alias info@example\.co\.jp is already defined on line 1"),
    ],
)
def test_bad_alias_lines_name_the_file_and_line(
    layout: LabLayout, content: str, message: str
) -> None:
    layout.rental_aliases.write_text(content)
    with pytest.raises(ProviderError, match=message) as err:
        provider_for(layout).observe()
    assert str(layout.rental_aliases) in str(err.value)
