"""`mailrec lab init DIR [--from STATE]`: write a lab whose actual state equals a state file
(or, by default, the company before the migration: everyone onprem).

Every file is in the real system's format: Postfix main.cf, passwd and map sources, Maildirs
holding messages, a Postfix mail log, a BIND zone file, an RTX `show config`, and the lab
rental's mailbox list and whitelist. The state is copied to DIR/state so `--lab DIR` alone
is enough to plan.
"""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

from reconciler import clock
from reconciler.drivers.postfix import (
    RECIPIENT_MAP,
    TRANSPORT_MAP,
    format_map,
    recipient_map_ref,
    relay_target,
    transport_map_ref,
)
from reconciler.lab.layout import LAB_MARKER, LAB_MARKER_TEXT, LabLayout
from reconciler.lab.office import record_history
from reconciler.load import LoadedState
from reconciler.model import DesiredState, Side

TEMPLATES = Path(__file__).with_name("templates")

# Loopback addresses of the lab's hosts (DESIGN: each lab host its own address).
ADDRESSES = {
    "onprem": "127.0.0.2", "rental": "127.0.0.3", "dns": "127.0.0.4", "router": "127.0.0.7",
}


class LabInitError(RuntimeError):
    pass


def _main_cf(state: DesiredState, migrated: bool) -> str:
    config_dir = state.onprem.config_dir
    host = state.onprem.mx_host.rstrip(".")
    lines = [
        "# Postfix main.cf of the onprem mail server (lab copy).",
        f"myhostname = {host}",
        f"mydomain = {state.domain}",
        "myorigin = $mydomain",
        "mydestination = $myhostname, localhost.$mydomain, localhost, $mydomain",
        "inet_interfaces = all",
        "mynetworks = 127.0.0.0/8 192.168.0.0/24",
        "home_mailbox = Maildir/",
        "smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination",
        "content_filter = smtp-amavis:[127.0.0.1]:10024",
        "alias_maps = hash:/etc/aliases",
    ]
    if migrated:
        lines.append(
            "local_recipient_maps = proxy:unix:passwd.byname $alias_maps "
            + recipient_map_ref(config_dir)
        )
        lines.append(f"transport_maps = {transport_map_ref(config_dir)}")
    else:
        lines.append("local_recipient_maps = proxy:unix:passwd.byname $alias_maps")
    return "\n".join(lines) + "\n"


def _message(number: int, user: str, domain: str) -> bytes:
    message = EmailMessage()
    message["From"] = f"customer{number}@example.net"
    message["To"] = f"{user}@{domain}"
    message["Subject"] = f"Order {1000 + number}"
    message["Message-ID"] = f"<lab-{user}-{number}@example.net>"
    message.set_content(f"Hello {user}, this is message {number} in the old mailbox.\n")
    return bytes(message)


def _write_maildir(maildir: Path, messages: list[bytes]) -> None:
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    for index, body in enumerate(messages):
        name = f"{1700000000 + index}.M{index}P1.lab"
        target = maildir / ("cur" if index % 2 else "new") / (name + (":2,S" if index % 2 else ""))
        target.write_bytes(body)


def _zone(state: DesiredState, migrated: bool) -> str:
    mx_side = state.dns.mx if migrated else Side.ONPREM
    mx = state.rental.mx_host if mx_side is Side.RENTAL else state.onprem.mx_host
    terms = ["v=spf1", f"ip{state.onprem.public_ip.version}:{state.onprem.public_ip}"]
    if migrated and (
        state.dns.mx is Side.RENTAL or any(u.outbound is Side.RENTAL for u in state.users.values())
    ):
        terms.append(state.rental.spf)
    if migrated and state.onprem.state == "retired":
        terms = [t for t in terms if not t.startswith("ip")]
    terms.append("~all")
    host = state.onprem.mx_host
    return f"""$ORIGIN {state.domain}.
$TTL {state.dns.ttl}
@   IN SOA ns1.{state.domain}. hostmaster.{state.domain}. (
        2024010101 ; serial
        3600       ; refresh
        900        ; retry
        1209600    ; expire
        300 )      ; negative
@   IN NS  ns1.{state.domain}.
@   {state.dns.ttl} IN MX 10 {mx}
@   {state.dns.ttl} IN TXT "{" ".join(terms)}"
@   IN TXT "google-site-verification=lab-only-token"
ns1 IN A   198.51.100.53
{host.removesuffix("." + state.domain + ".")} IN A {state.onprem.public_ip}
www IN A   198.51.100.80
"""


def _router_config(state: DesiredState, migrated: bool) -> str:
    text = (TEMPLATES / "rtx1210.conf").read_text()
    route = state.router.smtp_route if state.router else None
    if migrated and route is not None:
        text = text.replace(
            "ip route default gateway tunnel 2\n",
            f"ip route default gateway {route.gateway} filter {route.filter} "
            f"gateway {route.otherwise}\n",
        )
        text = text.replace(
            "ip filter 1010 ", f"ip filter {route.filter} pass * * tcp * smtp\nip filter 1010 ", 1
        )
    return text


def init_lab(directory: Path, loaded: LoadedState, *, migrated: bool, force: bool) -> LabLayout:
    layout = LabLayout(directory.resolve())
    root = layout.root
    if root.exists() and not root.is_dir():
        raise LabInitError(f"{directory} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not layout.is_marked():
            if not force:
                raise LabInitError(
                    f"{directory} exists and is not a lab: refusing to write into it")
            # --force deletes everything in DIR: only ever a lab that `lab init` made.
            raise LabInitError(
                f"{directory} is not empty and has no {LAB_MARKER} marker (written by `mailrec "
                "lab init`): --force replaces only a mailrec lab, and nothing was deleted; "
                "choose a new or empty directory (a lab made by an older mailrec: delete it "
                "yourself)"
            )
        if not force:
            raise LabInitError(f"{directory} is already a lab (use --force to replace it)")
        if layout.services.exists() and layout.read_services():
            raise LabInitError(f"{directory}: its services are running (mailrec lab down first)")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    layout.marker.write_text(LAB_MARKER_TEXT)  # first, so a half-made lab can be replaced
    state = loaded.state
    now = clock.now(override=True)  # a lab: MAILREC_NOW sets the time its files show
    layout.postfix_dir.mkdir(parents=True)
    (layout.postfix_dir / "main.cf").write_text(_main_cf(state, migrated))

    passwd = [
        "root:x:0:0:root:/root:/bin/bash",
        "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin",
        "mail:x:8:8:mail:/var/mail:/usr/sbin/nologin",
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin",
        "postfix:x:107:113::/var/spool/postfix:/usr/sbin/nologin",
    ]
    transport: dict[str, str] = {}
    recipients: dict[str, str] = {}
    mailboxes: list[str] = []
    for uid, (name, user) in enumerate(sorted(state.users.items()), start=1001):
        at_rental = migrated and user.inbound is Side.RENTAL
        if not at_rental:
            passwd.append(f"{name}:x:{uid}:{uid}:{name.title()}:/home/{name}:/bin/bash")
            count = (uid * 7) % 4  # a few messages each, some none, to show draining
            _write_maildir(layout.onprem_home / name / "Maildir",
                           [_message(i, name, state.domain) for i in range(count)])
        else:
            transport[f"{name}@{state.domain}"] = relay_target(
                state.rental.smtp_host, state.rental.relay_port)
            recipients[f"{name}@{state.domain}"] = "OK"
            mailboxes.append(f"{name}@{state.domain}")
    (layout.onprem / "etc" / "passwd").write_text("\n".join(passwd) + "\n")
    (layout.postfix_dir / TRANSPORT_MAP).write_text(format_map(transport, TRANSPORT_MAP))
    (layout.postfix_dir / RECIPIENT_MAP).write_text(format_map(recipients, RECIPIENT_MAP))
    layout.onprem_maillog.parent.mkdir(parents=True)
    stamp = (now - timedelta(hours=3)).strftime("%b %e %H:%M:%S")
    layout.onprem_maillog.write_text(
        f"{stamp} mail postfix/smtpd[2101]: 3F1A2C: client=mx.example.net[192.0.2.25]\n"
        f"{stamp} mail postfix/local[2104]: 3F1A2C: to=<suga@{state.domain}>, relay=local, "
        "delay=0.2, dsn=2.0.0, status=sent (delivered to maildir)\n"
    )
    if migrated and state.onprem.state == "retired":
        layout.onprem_retired.write_text("retired\n")

    layout.rental.mkdir(parents=True)
    layout.rental_domains.write_text(f"{state.domain}\n")
    layout.rental_mailboxes.write_text("".join(m + "\n" for m in mailboxes))
    whitelist = [str(n) for n in state.rental.whitelist] if migrated else []
    layout.rental_whitelist.write_text("".join(w + "\n" for w in whitelist))
    layout.rental_passwd.write_text(
        "".join(f"{name}@{state.domain}:lab-{name}-pw\n" for name in sorted(state.users))
    )
    for address in mailboxes:
        _write_maildir(layout.rental_maildirs / address.split("@")[0], [])
    layout.rental_maildirs.mkdir(parents=True, exist_ok=True)

    zone = layout.zone_file(state.domain)
    zone.parent.mkdir(parents=True)
    zone.write_text(_zone(state, migrated))
    layout.router_dir.mkdir(parents=True)
    layout.router_config.write_text(_router_config(state, migrated))

    (layout.root / "state").mkdir()
    for file in loaded.files:
        shutil.copy2(file, layout.root / "state" / Path(file).name)
    layout.lab_json.write_text(json.dumps(
        {"domain": state.domain, "addresses": ADDRESSES, "migrated": migrated,
         "created": now.isoformat()}, indent=2) + "\n")
    layout.services.write_text("{}\n")
    if migrated:
        record_history(layout, state, now)
    return layout
