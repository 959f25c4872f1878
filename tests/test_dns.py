"""DNS drivers (`reconciler/drivers/dns.py`): `ZoneFileDns` on zone files, and `Rfc2136Dns`
against a real BIND 9 on 127.0.0.4 (tests/dns_server.py) with RFC 2136 updates signed by a
per-run TSIG key. Under CI=true a missing or broken BIND fails these tests; elsewhere the BIND
tests are skipped with the reason."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dns.name
import dns.rdatatype
import dns.rrset
import dns.zone
import pytest

from reconciler.context import Context
from reconciler.drivers.dns import DnsError, DnsRecords, Rfc2136Dns, ZoneFileDns
from reconciler.findings import Gate
from reconciler.model import DesiredState, Side
from reconciler.steps import MoveMx
from reconciler.world import DnsFacts, History, World
from tests import dns_server
from tests.dns_server import (
    ZONE,
    ZONE_TEXT,
    NamedServer,
    free_port,
    named_or_unavailable,
    unavailable,
)

ONPREM_MX = "mail.example.co.jp."
RENTAL_MX = "example.sakura.ne.jp."
ONPREM_SPF = ("v=spf1", "ip4:198.51.100.10", "~all")
VERIFICATION = "google-site-verification=test-token"
# Longer than one TXT string (255 bytes): stored as several strings, read back as one.
LONG_SPF = (
    "v=spf1",
    "ip4:198.51.100.10",
    "include:_spf.example.sakura.ne.jp",
    *(f"ip4:203.0.113.{i}" for i in range(0, 240, 8)),
    "~all",
)


def txt_texts(rrset: dns.rrset.RRset | None) -> list[str]:
    return sorted(b"".join(r.strings).decode() for r in rrset or ())


# --- ZoneFileDns -------------------------------------------------------------------------------


@pytest.fixture
def zone_file(tmp_path: Path) -> Path:
    path = tmp_path / "dns" / f"db.{ZONE}"
    path.parent.mkdir()
    path.write_text(ZONE_TEXT)
    return path


def load_zone(path: Path) -> dns.zone.Zone:
    return dns.zone.from_file(str(path), origin=ZONE, relativize=False)


def apex(zone: dns.zone.Zone, rdtype: str) -> dns.rrset.RRset | None:
    origin = dns.name.from_text(ZONE)
    rdataset = zone.get_rdataset(origin, rdtype)
    return dns.rrset.from_rdata_list(origin, rdataset.ttl, list(rdataset)) if rdataset else None


def check_zone(path: Path) -> None:
    """named-checkzone accepts what was written (when BIND's tools are installed)."""
    tool = shutil.which("named-checkzone") or shutil.which(
        "named-checkzone", path="/usr/sbin:/usr/bin:/sbin"
    )
    if tool is None:
        return
    proc = subprocess.run([tool, ZONE, str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_zone_file_observe(zone_file: Path) -> None:
    assert ZoneFileDns(zone_file, ZONE).observe() == DnsRecords(
        mx_hosts=(ONPREM_MX,),
        mx_ttl=3600,
        spf_terms=ONPREM_SPF,
        spf_ttl=3600,
        soa_serial=2024010101,
        spf_records=1,
        zone_ttl=3600,  # the SOA's TTL (its minimum field is lower): the MX gate's worst case
    )


def test_zone_file_observe_lab_zone(tmp_path: Path) -> None:
    # The zone `mailrec lab init` writes (relative names, per-record TTLs, comments)
    text = ZONE_TEXT.replace("@   3600 IN MX 10 mail.example.co.jp.", "@ 600 IN MX 20 mail")
    text += "@ IN MX 10 backup-mx.example.net.\n"
    path = tmp_path / "db"
    path.write_text(text)
    records = ZoneFileDns(path, ZONE).observe()
    assert records.mx_hosts == ("backup-mx.example.net.", ONPREM_MX)  # sorted, absolute
    assert records.mx_ttl == 600


def test_zone_file_without_mx_or_spf(tmp_path: Path) -> None:
    path = tmp_path / "db"
    path.write_text("\n".join(
        line for line in ZONE_TEXT.splitlines() if " MX " not in line and "v=spf1" not in line
    ) + "\n")
    records = ZoneFileDns(path, ZONE).observe()
    assert (records.mx_hosts, records.mx_ttl, records.spf_terms) == ((), 0, ())


def test_zone_file_missing_or_broken_is_a_dns_error(tmp_path: Path) -> None:
    with pytest.raises(DnsError, match="zone file"):
        ZoneFileDns(tmp_path / "missing", ZONE).observe()
    broken = tmp_path / "broken"
    broken.write_text("@ IN SOA only-half-a-record\n")
    with pytest.raises(DnsError, match=str(broken)):
        ZoneFileDns(broken, ZONE).observe()


def test_zone_file_set_mx_rewrites_atomically_with_backup(zone_file: Path) -> None:
    original = zone_file.read_text()
    driver = ZoneFileDns(zone_file, ZONE)

    driver.set_mx((RENTAL_MX, "backup.example.sakura.ne.jp."), 300)

    records = driver.observe()
    assert records.mx_hosts == ("backup.example.sakura.ne.jp.", RENTAL_MX)
    assert records.mx_ttl == 300
    assert records.soa_serial == 2024010102
    assert records.spf_terms == ONPREM_SPF
    mx = apex(load_zone(zone_file), "MX")
    assert mx is not None
    assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
        (10, RENTAL_MX), (20, "backup.example.sakura.ne.jp.")
    ]
    # the previous content is kept beside it, and nothing else is left in the directory
    assert (zone_file.parent / (zone_file.name + ".bak")).read_text() == original
    assert sorted(p.name for p in zone_file.parent.iterdir()) == [
        zone_file.name, zone_file.name + ".bak"
    ]
    # every other record survives
    zone = load_zone(zone_file)
    assert VERIFICATION in txt_texts(apex(zone, "TXT"))
    assert zone.get_rdataset("mail.example.co.jp.", "A") is not None
    assert zone.get_rdataset("ns1.example.co.jp.", "A") is not None
    check_zone(zone_file)


def test_zone_file_set_mx_ttl_keeps_the_hosts(zone_file: Path) -> None:
    driver = ZoneFileDns(zone_file, ZONE)
    driver.set_mx_ttl(300)
    records = driver.observe()
    assert (records.mx_hosts, records.mx_ttl, records.soa_serial) == (
        (ONPREM_MX,), 300, 2024010102
    )
    assert records.spf_ttl == 3600
    driver.set_mx_ttl(3600)  # every change bumps the serial
    assert driver.observe().soa_serial == 2024010103
    # the backup is the state just before the last change
    backup = ZoneFileDns(zone_file.with_name(zone_file.name + ".bak"), ZONE).observe()
    assert (backup.mx_ttl, backup.soa_serial) == (300, 2024010102)


def test_zone_file_set_spf_keeps_other_txt_and_splits_long_records(zone_file: Path) -> None:
    driver = ZoneFileDns(zone_file, ZONE)
    driver.set_spf(LONG_SPF, 3600)

    records = driver.observe()
    assert records.spf_terms == LONG_SPF
    assert records.soa_serial == 2024010102
    txt = apex(load_zone(zone_file), "TXT")
    assert txt is not None
    spf = [r for r in txt if r.strings[0].startswith(b"v=spf1")]
    assert len(spf) == 1  # replaced, not added beside the old one
    assert len(spf[0].strings) > 1 and all(len(s) <= 255 for s in spf[0].strings)
    assert b"".join(spf[0].strings).decode() == " ".join(LONG_SPF)
    assert VERIFICATION in txt_texts(txt)
    check_zone(zone_file)

    driver.set_spf(("v=spf1", "include:_spf.example.sakura.ne.jp", "~all"), 3600)
    assert driver.observe().spf_terms == ("v=spf1", "include:_spf.example.sakura.ne.jp", "~all")
    assert txt_texts(apex(load_zone(zone_file), "TXT")) == sorted(
        ["v=spf1 include:_spf.example.sakura.ne.jp ~all", VERIFICATION]
    )


def test_zone_file_failed_write_leaves_the_file_alone(
    zone_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = zone_file.read_text()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dns.zone.Zone, "to_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ZoneFileDns(zone_file, ZONE).set_mx((RENTAL_MX,), 300)
    assert zone_file.read_text() == original
    assert [p.name for p in zone_file.parent.iterdir()] == [zone_file.name]  # no temp file


# --- Rfc2136Dns against BIND -------------------------------------------------------------------


@pytest.fixture(scope="module")
def named() -> Iterator[NamedServer]:
    with named_or_unavailable() as server:
        yield server


@pytest.fixture
def bind(named: NamedServer) -> NamedServer:
    """The running BIND with the zone's MX and TXT back at the pre-migration records."""
    named.replace("MX", 3600, f"10 {ONPREM_MX}")
    named.replace("TXT", 3600, '"' + " ".join(ONPREM_SPF) + '"', f'"{VERIFICATION}"')
    return named


def client(server: NamedServer, *, key_name: str | None = None,
           secret: str | None = None) -> Rfc2136Dns:
    return Rfc2136Dns(
        server.address, server.port, server.zone, key_name or server.key_name,
        server.algorithm, secret or server.secret, timeout=5,
    )


def serial(server: NamedServer) -> int:
    soa = server.query("SOA")
    assert soa is not None
    return int(soa[0].serial)


def test_rfc2136_observe(bind: NamedServer) -> None:
    records = client(bind).observe()
    assert records.mx_hosts == (ONPREM_MX,)
    assert records.mx_ttl == 3600
    assert records.spf_terms == ONPREM_SPF
    assert records.spf_ttl == 3600
    assert records.soa_serial == serial(bind)


def test_rfc2136_set_mx_ttl(bind: NamedServer) -> None:
    before = serial(bind)
    client(bind).set_mx_ttl(300)
    mx = bind.query("MX")
    assert mx is not None and mx.ttl == 300
    assert [r.exchange.to_text() for r in mx] == [ONPREM_MX]
    assert serial(bind) > before  # BIND bumped it
    txt = bind.query("TXT")
    assert txt is not None and txt.ttl == 3600
    assert client(bind).observe().mx_ttl == 300


def test_rfc2136_set_mx(bind: NamedServer) -> None:
    dns_client = client(bind)
    dns_client.set_mx((RENTAL_MX,), 300)
    mx = bind.query("MX")
    assert mx is not None and mx.ttl == 300
    assert [(r.preference, r.exchange.to_text()) for r in mx] == [(10, RENTAL_MX)]

    dns_client.set_mx((RENTAL_MX, ONPREM_MX), 300)
    mx = bind.query("MX")
    assert mx is not None
    assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
        (10, RENTAL_MX), (20, ONPREM_MX)
    ]
    assert dns_client.observe().mx_hosts == tuple(sorted((RENTAL_MX, ONPREM_MX)))


def test_rfc2136_set_spf_long_record(bind: NamedServer) -> None:
    dns_client = client(bind)
    assert len(" ".join(LONG_SPF)) > 255
    dns_client.set_spf(LONG_SPF, 3600)

    txt = bind.query("TXT")
    assert txt is not None
    spf = [r for r in txt if r.strings[0].startswith(b"v=spf1")]
    assert len(spf) == 1
    assert len(spf[0].strings) > 1 and all(len(s) <= 255 for s in spf[0].strings)
    assert dns_client.observe().spf_terms == LONG_SPF
    assert VERIFICATION in txt_texts(txt)  # the other TXT record is kept


def test_rfc2136_set_spf_when_there_is_no_txt(bind: NamedServer) -> None:
    bind.replace("TXT", 3600)  # no values: delete the record set
    assert bind.query("TXT") is None
    client(bind).set_spf(ONPREM_SPF, 3600)
    assert txt_texts(bind.query("TXT")) == [" ".join(ONPREM_SPF)]


def test_rfc2136_set_mx_ttl_without_mx_is_an_error(bind: NamedServer) -> None:
    bind.replace("MX", 3600)
    before = serial(bind)
    with pytest.raises(DnsError, match="no MX record"):
        client(bind).set_mx_ttl(300)
    assert bind.query("MX") is None and serial(bind) == before


@pytest.mark.parametrize(
    ("key_name", "secret"),
    [
        (None, "c2VjcmV0LXRoYXQtaXMtbm90LXRoZS1rZXktb2YtdGhpcy1zZXJ2ZXI="),
        ("intruder", None),
    ],
    ids=["wrong-secret", "unknown-key"],
)
def test_rfc2136_bad_tsig_is_refused_and_changes_nothing(
    bind: NamedServer, key_name: str | None, secret: str | None
) -> None:
    bad = client(bind, key_name=key_name, secret=secret)
    before = (serial(bind), bind.query("MX"), bind.query("TXT"))
    changes: list[Callable[[], None]] = [
        lambda: bad.set_mx((RENTAL_MX,), 300),
        lambda: bad.set_mx_ttl(60),
        lambda: bad.set_spf(LONG_SPF, 300),
    ]
    for change in changes:
        with pytest.raises(DnsError, match=r"TSIG key .*rejected|refused") as raised:
            change()
        message = str(raised.value)
        assert f"{bind.address}:{bind.port}" in message
        assert "TSIG" in message
        assert "nothing changed" in message
        assert (secret or bind.secret) not in message  # never the secret itself
    assert (serial(bind), bind.query("MX"), bind.query("TXT")) == before


def someone_changes_it_after_the_read(
    monkeypatch: pytest.MonkeyPatch, dns_client: Rfc2136Dns, server: NamedServer,
    change: tuple[str, int, tuple[str, ...]],
) -> None:
    """Another party changes the record right after mailrec read it (between `_guarded`'s read
    and the send): what mailrec read, and guards its update with, is then stale."""
    real_query = dns_client._query
    rdtype, ttl, values = change

    def query(kind: dns.rdatatype.RdataType) -> dns.rrset.RRset | None:
        current = real_query(kind)
        if dns.rdatatype.to_text(kind) == rdtype:
            server.replace(rdtype, ttl, *values)
        return current

    monkeypatch.setattr(dns_client, "_query", query)


@pytest.mark.parametrize(
    ("operation", "concurrent", "rcode"),
    [
        ("set_mx", ("MX", 3600, ("10 other-mx.example.net.",)), "NXRRSET"),
        ("set_mx_ttl", ("MX", 3600, ("10 other-mx.example.net.",)), "NXRRSET"),
        ("set_spf", ("TXT", 3600, ('"v=spf1 -all"',)), "NXRRSET"),
    ],
)
def test_rfc2136_concurrent_change_fails_the_guarded_update(
    bind: NamedServer, monkeypatch: pytest.MonkeyPatch,
    operation: str, concurrent: tuple[str, int, tuple[str, ...]], rcode: str,
) -> None:
    dns_client = client(bind)
    someone_changes_it_after_the_read(monkeypatch, dns_client, bind, concurrent)
    calls: dict[str, Callable[[], None]] = {
        "set_mx": lambda: dns_client.set_mx((RENTAL_MX,), 300),
        "set_mx_ttl": lambda: dns_client.set_mx_ttl(300),
        "set_spf": lambda: dns_client.set_spf(LONG_SPF, 300),
    }
    with pytest.raises(DnsError, match=rcode) as raised:
        calls[operation]()
    assert "changed since mailrec read it" in str(raised.value)

    # the other party's change stands; mailrec's was not applied
    rdtype, ttl, values = concurrent
    current = bind.query(rdtype)
    assert current is not None and current.ttl == ttl
    assert sorted(r.to_text() for r in current) == sorted(values)


def test_rfc2136_record_created_meanwhile_fails_too(
    bind: NamedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bind.replace("TXT", 3600)  # mailrec reads: no TXT at all
    dns_client = client(bind)
    someone_changes_it_after_the_read(
        monkeypatch, dns_client, bind, ("TXT", 600, (f'"{VERIFICATION}"',))
    )
    with pytest.raises(DnsError, match="YXRRSET"):
        dns_client.set_spf(ONPREM_SPF, 3600)
    assert txt_texts(bind.query("TXT")) == [VERIFICATION]


def test_rfc2136_unreachable_server(named: NamedServer) -> None:
    port = free_port(named.address)  # nothing listens there
    dead = Rfc2136Dns(named.address, port, ZONE, named.key_name, named.algorithm,
                      named.secret, timeout=2)
    with pytest.raises(DnsError, match=f"{named.address}:{port}"):
        dead.observe()
    with pytest.raises(DnsError, match=f"{named.address}:{port}"):
        dead.set_mx((RENTAL_MX,), 300)


def test_rfc2136_zone_not_served_here(bind: NamedServer) -> None:
    other = Rfc2136Dns(bind.address, bind.port, "example.net", bind.key_name, bind.algorithm,
                       bind.secret)
    with pytest.raises(DnsError, match=r"not authoritative for example\.net"):
        other.observe()


def test_unavailable_bind_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The contract of tests/dns_server.py's `unavailable()`: CI never silently skips."""
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="BIND unavailable under CI=true: no named"):
        unavailable("no named")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="BIND unavailable: no named"):
        unavailable("no named")


def test_start_named_reports_a_missing_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(dns_server, "SBIN_DIRS", ())
    with pytest.raises(dns_server.NamedUnavailable, match="named not found"):
        dns_server.start_named()


# --- the MX gate on what the real server shows (fail closed, finding 8) ----------------------

GATE_NOW = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
GATE_STATE = DesiredState.model_validate({
    "version": 1, "domain": "example.co.jp",
    "onprem": {"connect": "local:/", "mx_host": ONPREM_MX, "public_ip": "198.51.100.10"},
    "rental": {"mx_host": RENTAL_MX, "smtp_host": "example.sakura.ne.jp",
               "spf": "include:_spf.example.sakura.ne.jp"},
    "dns": {"provider": "lab", "mx": "rental"},
})


def _mx_gate(records: DnsRecords, history: History) -> Gate | None:
    facts = DnsFacts(mx_hosts=records.mx_hosts, mx_ttl=records.mx_ttl,
                     spf_terms=records.spf_terms, spf_ttl=records.spf_ttl,
                     soa_serial=records.soa_serial, spf_records=records.spf_records,
                     zone_ttl=records.zone_ttl)
    world = World.build((), dns=facts, history=history, now=GATE_NOW)
    return MoveMx(Side.RENTAL, RENTAL_MX, 3600).gate(world, Context.of(GATE_STATE))


def test_a_ttl_lowered_by_hand_on_bind_waits_the_worst_case(bind: NamedServer) -> None:
    """The MX TTL was lowered to 300 by hand (SPF too), and nothing recorded what it was:
    the gate does not open one cutover TTL later, it waits at least a day from now."""
    bind.replace("MX", 300, f"10 {ONPREM_MX}")
    bind.replace("TXT", 300, '"' + " ".join(ONPREM_SPF) + '"', f'"{VERIFICATION}"')
    records = client(bind).observe()
    soa = bind.query("SOA")
    assert soa is not None and records.zone_ttl == max(soa.ttl, soa[0].minimum)
    gate = _mx_gate(records, History())
    assert gate is not None and gate.kind == "observation" and gate.until is not None
    assert datetime.fromisoformat(gate.until) >= GATE_NOW + timedelta(days=1)
    # Lowered two hours ago by mailrec, which recorded the 86400 it replaced: still waiting.
    recorded = History(mx_ttl_lowered_at=GATE_NOW - timedelta(hours=2), mx_old_ttl=86400)
    gate = _mx_gate(records, recorded)
    assert gate is not None and gate.until == (GATE_NOW + timedelta(hours=22)).isoformat()
    # With a record of 3600, the same lowering is long enough ago.
    short = History(mx_ttl_lowered_at=GATE_NOW - timedelta(hours=2), mx_old_ttl=3600)
    assert _mx_gate(records, short) is None
