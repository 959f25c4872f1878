"""The manual provider: its SMTP probes against the lab rental, and how it merges them."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Callable
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.rental.base import Capability, ProviderContext, ProviderError
from reconciler.drivers.rental.lab import LabProvider
from reconciler.drivers.rental.manual import ManualProvider
from reconciler.drivers.rental.manual_probe import (
    MailboxProbe,
    Reply,
    ReplyKind,
    judge_domain,
    merge_aliases,
    merge_mailboxes,
    merge_whitelist,
)
from reconciler.drivers.rental.registry import load_provider
from reconciler.lab import rental_smtp
from reconciler.lab.layout import LabLayout
from reconciler.lab.rental_smtp import RentalSmtpServer, read_log

from .conftest import DOMAIN, OUTSIDER, WHITELISTED, rental_config, write_rental

Context = Callable[..., ProviderContext]


def new_entries(lab_dir: Path, before: int) -> list[dict[str, Any]]:
    return read_log(lab_dir)[before:]


def test_probe_tells_existing_from_missing_mailboxes(context: Context, lab_dir: Path) -> None:
    provider = ManualProvider(rental_config(), context())
    assert provider.probe_mailboxes(["suga", "tanaka", "nobody"]) == {
        "suga": True,
        "tanaka": True,
        "nobody": False,
    }
    # Never DATA: the probe leaves nothing behind at the rental.
    assert not any(e["event"] == "message" for e in read_log(lab_dir))


def test_relay_probe_tells_whitelisted_from_other_sources(
    context: Context, layout: LabLayout
) -> None:
    provider = ManualProvider(rental_config(), context())
    assert provider.probe_relay(WHITELISTED) is True
    assert provider.probe_relay(OUTSIDER) is False
    peers = [e["peer"] for e in read_log(layout.root) if e["event"] == "rcpt"]
    assert peers == [WHITELISTED, OUTSIDER]
    assert not (layout.rental / rental_smtp.OUTGOING_DIR).exists()  # nothing was relayed


def test_probe_session_count_is_constant_in_the_number_of_users(
    context: Context, lab_dir: Path
) -> None:
    sessions = {}
    for count in (3, 50):
        users = tuple(f"user{i:02d}" for i in range(count))
        before = len(read_log(lab_dir))
        ManualProvider(rental_config(), context(users=users)).observe()
        entries = new_entries(lab_dir, before)
        # every user, postmaster, the canary and one external address; then the relay probe
        assert sum(e["event"] == "rcpt" for e in entries) == count + 4
        sessions[count] = len({e["session"] for e in entries})
    assert sessions == {3: 2, 50: 2}  # one mailbox probe session + one relay probe session


def count_smtp_writes(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every write the SMTP client makes (one per round trip with pipelining), recorded."""
    writes: list[Any] = []
    send = smtplib.SMTP.send

    def counting_send(self: smtplib.SMTP, data: Any) -> None:
        writes.append(data)
        send(self, data)

    monkeypatch.setattr(smtplib.SMTP, "send", counting_send)
    return writes


def test_probe_round_trips_are_constant_with_pipelining(
    context: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = count_smtp_writes(monkeypatch)
    counts = []
    for count in (3, 50):
        writes.clear()
        provider = ManualProvider(rental_config(), context())
        provider.probe_mailboxes([f"user{i:02d}" for i in range(count)])
        counts.append(len(writes))
    assert counts[0] == counts[1] == 3  # EHLO, the pipelined transaction, QUIT


def test_probe_without_pipelining_gives_the_same_answers(
    context: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    has_extn = smtplib.SMTP.has_extn
    monkeypatch.setattr(
        smtplib.SMTP, "has_extn", lambda self, name: name != "pipelining" and has_extn(self, name)
    )
    provider = ManualProvider(rental_config(), context())
    assert provider.probe_mailboxes(["suga", "nobody"]) == {"suga": True, "nobody": False}


def test_probe_continues_when_the_server_hangs_up(
    context: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Like Postfix's smtpd_hard_error_limit: 421 and hang up after 19 RCPTs in a session.
    original = rental_smtp._Handler.handle_RCPT

    async def limited(self: Any, server: Any, session: Any, envelope: Any, *args: Any) -> str:
        if server.rcpts >= 19:
            asyncio.get_running_loop().call_soon(server.transport.close)
            return "421 4.7.0 smtp.rental.lab Error: too many errors"
        return str(await original(self, server, session, envelope, *args))

    monkeypatch.setattr(rental_smtp._Handler, "handle_RCPT", limited)
    users = [f"user{i:02d}" for i in range(48)] + ["suga", "tanaka"]
    provider = ManualProvider(rental_config(), context(users=tuple(users)))
    probe = provider._probe_mailboxes(users)
    assert probe.sessions == 3  # 53 addresses, 19 per session
    assert probe.exists == {u: u in ("suga", "tanaka") for u in users}


def test_observe_prefers_probes_and_notes_what_disagreed(
    context: Context, lab_dir: Path
) -> None:
    state = lab_dir / "state"
    state.mkdir()
    (state / "mailboxes.txt").write_text("# from the panel\nsuga\nghost@example.co.jp\n"
                                         "other@elsewhere.example\n")
    (state / "whitelist.txt").write_text(f"{OUTSIDER}/32\n")
    config = rental_config(mailboxes_file="mailboxes.txt", whitelist_file="whitelist.txt")
    snapshot = ManualProvider(config, context(probe_source=OUTSIDER)).observe()
    assert snapshot.domain_accepted is True
    assert snapshot.mailboxes == {"suga": None, "tanaka": None}
    assert snapshot.whitelist == frozenset()
    notes = "\n".join(snapshot.notes)
    assert "ghost@example.co.jp: the mailboxes file lists it" in notes
    assert "tanaka@example.co.jp: the mailboxes file does not list it" in notes
    assert f"lists {OUTSIDER}/32, but the rental answered the relay probe" in notes


def test_observe_without_files_verifies_the_declared_whitelist(context: Context) -> None:
    snapshot = ManualProvider(rental_config(), context(probe_source=WHITELISTED)).observe()
    assert snapshot.whitelist == frozenset([ip_network("127.0.0.0/29")])
    assert snapshot.mailboxes == {"suga": None, "tanaka": None}
    refused = ManualProvider(rental_config(), context(probe_source=OUTSIDER)).observe()
    assert refused.whitelist == frozenset()  # 127.0.0.0/29 covers 127.0.0.6: the probe wins


def test_domain_not_hosted(tmp_path: Path) -> None:
    layout = write_rental(tmp_path / "lab", domains=("other.example",))
    with RentalSmtpServer(layout.root, "127.0.0.3", 0, 0, tls_cert=None, tls_key=None) as server:
        context = ProviderContext(
            DOMAIN, users=("suga",), services={"rental_smtp": server.relay_address}
        )
        provider = ManualProvider(rental_config(), context)
        snapshot = provider.observe()
        assert snapshot.domain_accepted is False
        assert snapshot.mailboxes == {}
        assert "does not accept mail for example.co.jp" in snapshot.notes[0]
        assert provider.probe_mailboxes(["suga"]) == {"suga": False}


def test_a_server_accepting_anything_proves_nothing(tmp_path: Path) -> None:
    # Domain not hosted, and the probing host whitelisted: every RCPT is relayed with 250.
    layout = write_rental(tmp_path / "lab", domains=("other.example",), whitelist=("127.0.0.0/8",))
    with RentalSmtpServer(layout.root, "127.0.0.3", 0, 0, tls_cert=None, tls_key=None) as server:
        context = ProviderContext(
            DOMAIN, users=("suga",), services={"rental_smtp": server.relay_address}
        )
        provider = ManualProvider(rental_config(), context)
        with pytest.raises(ProviderError, match="accepts any address"):
            provider.probe_mailboxes(["suga"])
        snapshot = provider.observe()
    assert snapshot.domain_accepted is False
    assert snapshot.mailboxes == {}
    notes = "\n".join(snapshot.notes)
    assert "made-up address at example.co.jp (it relays for this host" in notes
    assert "taken as not accepted" in notes


def test_invalid_user_names_never_reach_smtp(context: Context, lab_dir: Path) -> None:
    provider = ManualProvider(rental_config(), context())
    for bad in ("Suga", "a b", "x>\r\nDATA", "evil@other.example"):
        with pytest.raises(ProviderError, match="not a valid user name"):
            provider.probe_mailboxes([bad])
    assert read_log(lab_dir) == []


def test_unreachable_rental_is_a_provider_error() -> None:
    context = ProviderContext(DOMAIN, services={"rental_smtp": "127.0.0.3:1"})
    with pytest.raises(ProviderError, match=r"cannot reach the rental at 127\.0\.0\.3:1"):
        ManualProvider(rental_config(), context).probe_mailboxes(["suga"])


def test_options_are_checked(tmp_path: Path) -> None:
    context = ProviderContext(DOMAIN, state_dir=tmp_path)
    with pytest.raises(ProviderError, match="mailbox_file not known"):
        ManualProvider(rental_config(mailbox_file="x"), context)
    with pytest.raises(ProviderError, match="probe_timeout"):
        ManualProvider(rental_config(probe_timeout="soon"), context)
    with pytest.raises(ProviderError, match="relay_probe_to"):
        ManualProvider(rental_config(relay_probe_to="x@example.co.jp"), context)
    with pytest.raises(ProviderError, match="relative to the state directory"):
        ManualProvider(rental_config(mailboxes_file="m.txt"), ProviderContext(DOMAIN))
    missing = ManualProvider(rental_config(mailboxes_file="m.txt"), context)
    with pytest.raises(ProviderError, match="does not exist"):
        missing.read_mailboxes_file()
    (tmp_path / "m.txt").write_text("suga\nBad Name\n")
    with pytest.raises(ProviderError, match=r"m\.txt:2: 'Bad Name' is not a mailbox"):
        missing.read_mailboxes_file()


def test_cannot_create_or_change_and_says_how_by_hand(tmp_path: Path) -> None:
    context = ProviderContext(DOMAIN, state_dir=tmp_path, probe_source="203.0.113.9")
    config = rental_config(
        mailboxes_file="rental/mailboxes.txt",
        whitelist_file="rental/whitelist.txt",
        panel_url="https://secure.sakura.ad.jp/rscontrol/",
    )
    provider = load_provider(config, context)
    assert isinstance(provider, ManualProvider)
    assert not provider.supports(Capability.CREATE_MAILBOX)
    assert not provider.supports(Capability.WRITE_WHITELIST)
    assert provider.supports(Capability.LIST_MAILBOXES)

    create = provider.instructions("create_mailbox", "suga")
    assert "https://secure.sakura.ad.jp/rscontrol/" in create
    assert 'Add the line "suga@example.co.jp" to rental/mailboxes.txt' in create
    assert "Run: mailrec ack mailbox/suga" in create
    assert "RCPT TO:<suga@example.co.jp> on example.sakura.ne.jp:25 must answer 250" in create

    delete = provider.instructions("delete_mailbox", "suga")
    assert "MR008" in delete
    assert "550" in delete

    add = provider.instructions("add_whitelist", "203.0.113.8/29")
    assert "203.0.113.8 - 203.0.113.15, 8 addresses" in add
    assert "Run: mailrec ack whitelist/203.0.113.8/29" in add
    assert "from 203.0.113.9" in add
    other = provider.instructions("add_whitelist", "198.51.100.0/24")
    assert "cannot check this entry: its probe source 203.0.113.9 lies outside" in other


@pytest.mark.parametrize(
    ("code", "text", "kind"),
    [
        (250, "2.1.5 Ok", ReplyKind.OK),
        (550, "5.1.1 <x@example.co.jp>: Recipient address rejected: User unknown in virtual "
              "mailbox table", ReplyKind.NO_USER),
        (554, "5.7.1 <x@example.net>: Relay access denied", ReplyKind.NOT_HOSTED),
        (550, "5.1.2 <x@example.co.jp>: Recipient address rejected: Domain not found",
         ReplyKind.NOT_HOSTED),
        (550, "Relaying denied", ReplyKind.NOT_HOSTED),
        (550, "No such user here", ReplyKind.NO_USER),
        (450, "4.2.0 <x@example.co.jp>: Recipient address rejected: Greylisted",
         ReplyKind.TEMPORARY),
        (554, "5.7.0 Transaction failed", ReplyKind.OTHER),
    ],
)
def test_reply_classification(code: int, text: str, kind: ReplyKind) -> None:
    assert Reply(code, text).kind is kind


USER_UNKNOWN = Reply(550, "5.1.1 <x@example.co.jp>: Recipient address rejected: User unknown")
RELAY_DENIED = Reply(554, "5.7.1 <x@example.net>: Relay access denied")
OK = Reply(250, "2.1.5 Ok")


@pytest.mark.parametrize(
    ("postmaster", "canary", "outside", "accepted"),
    [
        (OK, USER_UNKNOWN, RELAY_DENIED, True),  # hosted, postmaster exists
        (USER_UNKNOWN, USER_UNKNOWN, RELAY_DENIED, True),  # hosted, no postmaster mailbox
        (RELAY_DENIED, RELAY_DENIED, RELAY_DENIED, False),  # not hosted
        (OK, OK, RELAY_DENIED, True),  # a catch-all domain
        (OK, OK, OK, None),  # relays everything for us: cannot tell
        (Reply(451, "4.3.0 try later"), USER_UNKNOWN, RELAY_DENIED, None),
    ],
)
def test_judge_domain(
    postmaster: Reply, canary: Reply, outside: Reply, accepted: bool | None
) -> None:
    assert judge_domain(postmaster, canary, outside) is accepted


def test_merge_whitelist_prefers_the_declared_network() -> None:
    declared = [ip_network("203.0.113.8/29")]
    seen = ip_address("203.0.113.9")
    merged, notes = merge_whitelist(frozenset(), declared, seen, relayed=True)
    assert merged == frozenset(declared)
    assert "assuming 203.0.113.8/29" in notes[0]
    merged, _ = merge_whitelist(frozenset(), [], seen, relayed=True)
    assert merged == frozenset([ip_network("203.0.113.9/32")])
    listed = frozenset(declared)
    assert merge_whitelist(listed, declared, seen, relayed=True) == (listed, [])


def test_merge_mailboxes_keeps_the_file_when_probes_prove_nothing() -> None:
    probe = MailboxProbe(
        domain_accepted=None,
        exists={},
        replies={"suga": Reply(250, "2.1.5 Ok")},
        accepts_anything=True,
        postmaster=Reply(250, "2.1.5 Ok"),
        sessions=1,
    )
    boxes, notes = merge_mailboxes(frozenset({"suga", "tanaka"}), probe, DOMAIN)
    assert boxes == {"suga": None, "tanaka": None}
    assert len(notes) == 1


# --- aliases -----------------------------------------------------------------------------


def lab_provider(layout: LabLayout) -> LabProvider:
    return LabProvider(rental_config("lab"), ProviderContext(DOMAIN, lab_dir=layout.root))


def test_alias_names_are_probed_in_the_same_session(
    context: Context, layout: LabLayout
) -> None:
    lab_provider(layout).create_alias("info", (f"suga@{DOMAIN}",))
    sessions = {}
    for count in (0, 40):
        aliases = ("info", *(f"alias{i:02d}" for i in range(count)))
        before = len(read_log(layout.root))
        snapshot = ManualProvider(rental_config(), context(aliases=aliases)).observe()
        entries = new_entries(layout.root, before)
        # 2 users + the aliases + postmaster, canary, one external; then the relay probe.
        assert sum(e["event"] == "rcpt" for e in entries) == 2 + len(aliases) + 4
        sessions[count] = len({e["session"] for e in entries})
        # Accepted, members unknown (a RCPT cannot show them); the others do not exist.
        assert snapshot.aliases == {"info": None}
        assert snapshot.mailboxes == {"suga": None, "tanaka": None}
    assert sessions == {0: 2, 40: 2}  # one mailbox+alias probe session + one relay probe


def test_alias_probe_round_trips_do_not_grow(
    context: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = count_smtp_writes(monkeypatch)
    provider = ManualProvider(rental_config(), context())
    provider._probe_mailboxes(["suga"], [f"alias{i:02d}" for i in range(50)])
    assert len(writes) == 3  # EHLO, the pipelined transaction, QUIT


def test_aliases_file_and_probe_precedence(context: Context, layout: LabLayout) -> None:
    lab_provider(layout).create_alias("info", (f"suga@{DOMAIN}", f"tanaka@{DOMAIN}"))
    lab_provider(layout).create_alias("sales", ("kato@partner.example",))
    state = layout.root / "state"
    state.mkdir()
    (state / "aliases.txt").write_text(
        "# from the panel\n"
        f"info: tanaka@{DOMAIN}, suga@{DOMAIN}\n"  # exists: members from the file
        f"ghost@{DOMAIN}: suga@{DOMAIN}\n"  # the rental does not accept it: missing
        "other@elsewhere.example: x@elsewhere.example\n"  # another domain: not ours
    )
    config = rental_config(aliases_file="aliases.txt")
    snapshot = ManualProvider(config, context(aliases=("info", "sales"))).observe()
    assert snapshot.aliases == {
        "info": (f"suga@{DOMAIN}", f"tanaka@{DOMAIN}"),
        "sales": None,  # the rental accepts it, the file does not list it: members unknown
    }
    notes = "\n".join(snapshot.notes)
    assert "ghost@example.co.jp: the aliases file lists it, but the rental answered 550" in notes
    assert "taken as missing" in notes
    assert "sales@example.co.jp: the aliases file does not list it, but the rental answered " \
           "250 2.1.5 Ok: taken as present" in notes
    assert "info@" not in notes  # file and probe agree


def test_aliases_file_is_used_when_probes_prove_nothing(tmp_path: Path) -> None:
    # Domain not hosted here but relayed for this host: every RCPT gets 250.
    layout = write_rental(tmp_path / "lab", domains=("other.example",), whitelist=("127.0.0.0/8",))
    (tmp_path / "aliases.txt").write_text(f"info: suga@{DOMAIN}\n")
    merged = MailboxProbe(
        domain_accepted=None, exists={}, replies={}, accepts_anything=True,
        postmaster=Reply(250, "2.1.5 Ok"), sessions=1,
        alias_exists={}, alias_replies={"info": Reply(250, "2.1.5 Ok")},
    )
    aliases, notes = merge_aliases({"info": (f"suga@{DOMAIN}",)}, merged, DOMAIN)
    assert aliases == {"info": (f"suga@{DOMAIN}",)}
    assert notes == []
    aliases, _ = merge_aliases(None, merged, DOMAIN)
    assert aliases == {}  # nothing proves it exists
    with RentalSmtpServer(layout.root, "127.0.0.3", 0, 0, tls_cert=None, tls_key=None) as server:
        context = ProviderContext(
            DOMAIN, state_dir=tmp_path, aliases=("info",),
            services={"rental_smtp": server.relay_address},
        )
        provider = ManualProvider(rental_config(aliases_file="aliases.txt"), context)
        probe = provider._probe_mailboxes([], ["info"])
        assert probe.accepts_anything and probe.alias_exists == {}
        snapshot = provider.observe()
    assert snapshot.aliases == {"info": (f"suga@{DOMAIN}",)}  # as for mailboxes: the file
    assert "made-up address at example.co.jp (it relays for this host" in "\n".join(snapshot.notes)


def test_aliases_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    context = ProviderContext(DOMAIN, state_dir=tmp_path)
    provider = ManualProvider(rental_config(aliases_file="a.txt"), context)
    with pytest.raises(ProviderError, match=r"aliases_file .* does not exist"):
        provider.read_aliases_file()
    (tmp_path / "a.txt").write_text(f"info: suga@{DOMAIN}\n\nsales: kato@partner, x\n")
    with pytest.raises(ProviderError, match=r"a\.txt:3: 'kato@partner' \(a member of sales@"):
        provider.read_aliases_file()
    (tmp_path / "a.txt").write_text("info suga\n")
    with pytest.raises(ProviderError, match=r"a\.txt:1: 'info suga' is not an alias"):
        provider.read_aliases_file()
    (tmp_path / "a.txt").write_text(f"# panel\nfront desk: suga@{DOMAIN}\n")
    with pytest.raises(ProviderError, match=r"a\.txt:2: 'front desk: .* is not an alias") as err:
        provider.read_aliases_file()
    assert "name or name@domain" in str(err.value)


def test_invalid_alias_names_never_reach_smtp(context: Context, lab_dir: Path) -> None:
    for bad in ("Info", "a b", "x>\r\nDATA"):
        provider = ManualProvider(rental_config(), context(aliases=(bad,)))
        with pytest.raises(ProviderError, match="not a valid alias name"):
            provider.observe()
    assert read_log(lab_dir) == []


def test_alias_instructions(tmp_path: Path) -> None:
    context = ProviderContext(DOMAIN, state_dir=tmp_path)
    config = rental_config(
        aliases_file="rental/aliases.txt", panel_url="https://secure.sakura.ad.jp/rscontrol/"
    )
    provider = load_provider(config, context)
    assert provider.supports(Capability.LIST_ALIASES)
    assert not provider.supports(Capability.CREATE_ALIAS)
    text = provider.instructions("create_alias", f"info: TANAKA@{DOMAIN}, suga@{DOMAIN}")
    assert text.startswith("Create the forwarding address info@example.co.jp at the rental")
    assert "https://secure.sakura.ad.jp/rscontrol/" in text
    assert f"forwards to suga@{DOMAIN}, tanaka@{DOMAIN}" in text
    assert f'In rental/aliases.txt, put the line "info: suga@{DOMAIN}, tanaka@{DOMAIN}"' in text
    assert "Run: mailrec ack alias/info" in text
    assert "RCPT TO:<info@example.co.jp> on example.sakura.ne.jp:25 must answer 250" in text
    assert "taken from the aliases file" in text
    # Without a file there is no file step, and members are not checked.
    bare = ManualProvider(rental_config(), context).instructions(
        "create_alias", f"info: suga@{DOMAIN}"
    )
    assert "aliases.txt" not in bare and "not checked" in bare
    # A malformed target falls back to the generic text rather than inventing steps.
    fallback = provider.instructions("create_alias", "info: not an address")
    assert fallback.startswith("In the manual control panel")
