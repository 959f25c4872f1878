"""DNS: read the MX and SPF of the domain and change them, from a zone file (lab) or a live
authoritative server with RFC 2136 dynamic updates signed with TSIG.

Both providers read everything in one go (a zone file read, or one AXFR-free set of three
queries) and every update carries a prerequisite on the current record, so a change made by
someone else in between fails instead of being overwritten.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# The zone file (the lab) needs only these; the protocol modules of RFC 2136 (query, message,
# update, TSIG) are imported by `Rfc2136Dns` when it talks to a server.
import dns.exception
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.zone

if TYPE_CHECKING:
    import dns.rrset
    import dns.update

_PREREQUISITE_FAILED = (
    dns.rcode.NXRRSET, dns.rcode.YXRRSET, dns.rcode.NXDOMAIN, dns.rcode.YXDOMAIN
)


class DnsError(RuntimeError):
    """A DNS read or update failed; the message names the server and the record."""


@dataclass(frozen=True)
class DnsRecords:
    mx_hosts: tuple[str, ...]
    mx_ttl: int
    spf_terms: tuple[str, ...]
    spf_ttl: int
    soa_serial: int
    spf_records: int = 1  # how many TXT records of the apex start with v=spf1
    zone_ttl: int = 0  # the SOA record's TTL or its minimum (negative-caching) field


def _txt_text(rdata: object) -> str:
    strings = getattr(rdata, "strings", ())
    return "".join(s.decode() for s in strings)


def _is_spf(text: str) -> bool:
    return text.lower() == "v=spf1" or text.lower().startswith("v=spf1 ")


def records_from(
    mx: dns.rdataset.Rdataset | None, txt: dns.rdataset.Rdataset | None,
    soa: dns.rdataset.Rdataset | None,
) -> DnsRecords:
    hosts = tuple(sorted(r.exchange.to_text().lower() for r in mx)) if mx else ()
    spf = ""
    records = 0
    if txt:
        for rdata in txt:
            text = _txt_text(rdata)
            if _is_spf(text):
                spf = text
                records += 1
    return DnsRecords(
        mx_hosts=hosts,
        mx_ttl=mx.ttl if mx else 0,
        spf_terms=tuple(spf.split()),
        spf_ttl=txt.ttl if txt else 0,
        soa_serial=soa[0].serial if soa else 0,
        spf_records=records,
        zone_ttl=max(soa.ttl, soa[0].minimum) if soa else 0,
    )


def _spf_rdata(terms: tuple[str, ...]) -> str:
    text = " ".join(terms)
    # A TXT string holds 255 bytes; longer SPF records are split into several strings.
    chunks = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    return " ".join('"' + c.replace('"', '\\"') + '"' for c in chunks)


class ZoneFileDns:
    """A BIND zone file: the lab's DNS, and the parser for zone files in tests."""

    def __init__(self, path: Path, domain: str) -> None:
        self.path = path
        self.origin = dns.name.from_text(domain)

    def _load(self) -> dns.zone.Zone:
        try:
            return dns.zone.from_file(str(self.path), origin=self.origin, relativize=False)
        except (OSError, dns.exception.DNSException) as exc:
            raise DnsError(f"zone file {self.path}: {exc}") from exc

    def observe(self) -> DnsRecords:
        zone = self._load()
        node = zone.get_node(self.origin)
        mx = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.MX) if node else None
        txt = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.TXT) if node else None
        soa = zone.get_rdataset(self.origin, dns.rdatatype.SOA)
        return records_from(mx, txt, soa)

    def _write(self, zone: dns.zone.Zone) -> None:
        soa = zone.find_rdataset(self.origin, dns.rdatatype.SOA)
        old = soa[0]
        zone.replace_rdataset(
            self.origin,
            dns.rdataset.from_rdata(soa.ttl, old.replace(serial=(old.serial + 1) % 2**32)),
        )
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".zone.")
        try:
            with os.fdopen(fd, "w") as handle:
                zone.to_file(handle, relativize=False, want_origin=True)
                handle.flush()
                os.fsync(handle.fileno())
            if self.path.exists():
                backup = self.path.with_name(self.path.name + ".bak")
                backup.write_bytes(self.path.read_bytes())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def set_mx(self, hosts: tuple[str, ...], ttl: int) -> None:
        zone = self._load()
        rdatas = [
            dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX, f"{10 * (i + 1)} {h}")
            for i, h in enumerate(hosts)
        ]
        zone.replace_rdataset(self.origin, dns.rdataset.from_rdata_list(ttl, rdatas))
        self._write(zone)

    def set_mx_ttl(self, ttl: int) -> None:
        zone = self._load()
        mx = zone.find_rdataset(self.origin, dns.rdatatype.MX)
        zone.replace_rdataset(self.origin, dns.rdataset.from_rdata_list(ttl, list(mx)))
        self._write(zone)

    def set_spf(self, terms: tuple[str, ...], ttl: int) -> None:
        zone = self._load()
        node = zone.find_node(self.origin, create=True)
        txt = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.TXT)
        keep = [r for r in txt if not _is_spf(_txt_text(r))] if txt else []
        keep.append(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, _spf_rdata(terms)))
        zone.replace_rdataset(self.origin, dns.rdataset.from_rdata_list(ttl, keep))
        self._write(zone)


class Rfc2136Dns:
    """A live authoritative server: queries over TCP, updates with TSIG and prerequisites."""

    def __init__(
        self, server: str, port: int, domain: str, key_name: str, algorithm: str, secret: str,
        *, timeout: float = 5.0,
    ) -> None:
        import dns.tsigkeyring

        self.server, self.port, self.timeout = server, port, timeout
        self.origin = dns.name.from_text(domain)
        self.keyring = dns.tsigkeyring.from_text({key_name: (algorithm, secret)})
        self.key_name = dns.name.from_text(key_name)
        self.algorithm = dns.name.from_text(algorithm)

    def _query(self, rdtype: dns.rdatatype.RdataType) -> dns.rrset.RRset | None:
        import dns.message
        import dns.query

        message = dns.message.make_query(self.origin, rdtype)
        try:
            response = dns.query.tcp(message, self.server, port=self.port, timeout=self.timeout)
        except (OSError, dns.exception.DNSException) as exc:
            raise DnsError(f"DNS server {self.server}:{self.port}: {exc}") from exc
        try:
            return response.find_rrset(
                response.answer, self.origin, dns.rdataclass.IN, rdtype
            )
        except KeyError:
            return None

    def observe(self) -> DnsRecords:
        soa = self._query(dns.rdatatype.SOA)
        if soa is None:
            raise DnsError(f"{self.server}:{self.port} is not authoritative for {self.origin}")
        return records_from(self._query(dns.rdatatype.MX), self._query(dns.rdatatype.TXT), soa)

    def _send(self, update: dns.update.UpdateMessage, what: str) -> None:
        import dns.query
        import dns.tsig

        where = f"{self.server}:{self.port}"
        try:
            response = dns.query.tcp(update, self.server, port=self.port, timeout=self.timeout)
        except dns.tsig.PeerError as exc:
            raise DnsError(
                f"update of {what} at {where} refused: the server rejected TSIG key "
                f"{self.key_name} ({exc}; wrong secret, unknown key name or algorithm, or "
                "clock skew); nothing changed"
            ) from exc
        except (OSError, dns.exception.DNSException) as exc:
            raise DnsError(f"update of {what} at {where}: {exc}") from exc
        rcode = response.rcode()
        if rcode == dns.rcode.NOERROR:
            return
        if rcode in _PREREQUISITE_FAILED:
            why = "the record changed since mailrec read it (prerequisite failed); observe again"
        elif rcode in (dns.rcode.REFUSED, dns.rcode.NOTAUTH):
            why = f"key {self.key_name} may not update {self.origin} here (update-policy)"
        else:
            why = "the server could not apply the update"
        raise DnsError(
            f"update of {what} refused by {where}: {dns.rcode.to_text(rcode)}: {why}; "
            "nothing changed"
        )

    def _update(self) -> dns.update.UpdateMessage:
        import dns.update

        return dns.update.UpdateMessage(
            self.origin, keyring=self.keyring, keyname=self.key_name, keyalgorithm=self.algorithm
        )

    def _guarded(self, rdtype: dns.rdatatype.RdataType) -> tuple[
        dns.update.UpdateMessage, dns.rrset.RRset | None
    ]:
        """An update whose prerequisite is the record set exactly as just read (RFC 2136
        value-dependent): someone else's change in between makes the server refuse it."""
        current = self._query(rdtype)
        update = self._update()
        if current is None:
            update.absent(self.origin, rdtype)
        else:
            # Value-dependent prerequisite: the rdatas with TTL 0 (RFC 2136 2.4.2; BIND
            # answers FORMERR to a prerequisite with a TTL).
            update.present(self.origin, *list(current))
        return update, current

    def set_mx(self, hosts: tuple[str, ...], ttl: int) -> None:
        update, _ = self._guarded(dns.rdatatype.MX)
        update.replace(self.origin, ttl, *[
            dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX, f"{10 * (i + 1)} {h}")
            for i, h in enumerate(hosts)
        ])
        self._send(update, "MX")

    def set_mx_ttl(self, ttl: int) -> None:
        update, current = self._guarded(dns.rdatatype.MX)
        if current is None:
            raise DnsError(f"{self.origin} has no MX record to change the TTL of")
        update.replace(self.origin, ttl, *list(current))
        self._send(update, "MX TTL")

    def set_spf(self, terms: tuple[str, ...], ttl: int) -> None:
        update, current = self._guarded(dns.rdatatype.TXT)
        keep = [r for r in current or () if not _is_spf(_txt_text(r))]
        keep.append(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, _spf_rdata(terms)))
        update.replace(self.origin, ttl, *keep)
        self._send(update, "SPF TXT")
