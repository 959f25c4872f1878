"""`mailrec lab init DIR [--from STATE]`: write a lab whose actual state equals a state file
(or, by default, the company before the migration: everyone onprem).

Every file is in the real system's format: Postfix main.cf, passwd and map sources, Maildirs
holding messages (some in a Maildir++ folder, `.Archive`), a Postfix mail log with its
rotations (`mail.log.1`, `mail.log.2.gz`), a BIND zone file, an RTX `show config`, and the lab
rental's mailbox list and whitelist. A user already at the rental keeps the Unix account, with
the Maildir archived as mailrec's `onprem-mailbox/USER` step leaves it. The state is copied
to DIR/state so `--lab DIR` alone is enough to plan.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from datetime import datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from zoneinfo import ZoneInfo

from reconciler import clock
from reconciler.drivers.lab_onprem import LabOnprem
from reconciler.drivers.postfix import (
    MAX_UID,
    MIN_UID,
    RECIPIENT_MAP,
    TRANSPORT_MAP,
    format_map,
    recipient_map_ref,
    transport_map_ref,
)
from reconciler.drivers.postfix_host import ARCHIVE_INFIX, REMOVED_LIST
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


def _aliases(state: DesiredState) -> str:
    """The onprem host's aliases(5): Debian's default, and the aliases the state moves (as
    the old server has them: its users by name)."""
    lines = ["# /etc/aliases of the onprem mail server (lab copy)", "postmaster: root"]
    for name in sorted(state.aliases):
        members = state.aliases[name]
        if isinstance(members, list):
            lines.append(f"{name}: {', '.join(members)}")
    return "\n".join(lines) + "\n"


def _rental_aliases(state: DesiredState, migrated: bool) -> str:
    """The rental's aliases: its own postmaster (the provider's contact for the domain), and,
    in a lab made "as in" the state, the aliases mailrec would have created."""
    lines = [f"postmaster@{state.domain}: hostmaster@example.net"]
    for name in sorted(state.aliases) if migrated else ():
        members = state.alias_members(name)
        if members and name != "postmaster":
            lines.append(f"{name}@{state.domain}: {', '.join(members)}")
    return "".join(line + "\n" for line in lines)


def _message(number: int, user: str, domain: str) -> bytes:
    """A lab message, as `EmailMessage` writes it (`_email_message`). Building one that way
    costs ~1 ms (header parsing and folding), minutes for a 100,000-user lab; when every
    line is short ASCII (no header to fold, a 7bit body) its bytes are those of `_PLAIN`, and
    anything else goes the EmailMessage way."""
    text = _PLAIN.format(number=number, order=1000 + number, user=user, domain=domain)
    if text.isascii() and max(map(len, text.splitlines())) <= _PLAIN_MAX_LINE:
        return text.encode("ascii")
    return _email_message(number, user, domain)


def _email_message(number: int, user: str, domain: str) -> bytes:
    message = EmailMessage()
    message["From"] = f"customer{number}@example.net"
    message["To"] = f"{user}@{domain}"
    message["Subject"] = f"Order {1000 + number}"
    message["Message-ID"] = f"<lab-{user}-{number}@example.net>"
    message.set_content(f"Hello {user}, this is message {number} in the old mailbox.\n")
    return bytes(message)


# What `_email_message` writes when no line needs folding or encoding (the default policy
# folds a header longer than 78 characters and quotes a body line longer than 78).
_PLAIN = (
    "From: customer{number}@example.net\n"
    "To: {user}@{domain}\n"
    "Subject: Order {order}\n"
    "Message-ID: <lab-{user}-{number}@example.net>\n"
    'Content-Type: text/plain; charset="utf-8"\n'
    "Content-Transfer-Encoding: 7bit\n"
    "MIME-Version: 1.0\n"
    "\n"
    "Hello {user}, this is message {number} in the old mailbox.\n"
)
_PLAIN_MAX_LINE = 76  # below both limits


def _write_maildir(maildir: Path, messages: list[bytes]) -> None:
    """new/, cur/ and tmp/; the third message on is filed in the Maildir++ folder `.Archive`
    (its cur/), where a mail client moves what the user keeps: mail all the same. Each
    directory is made once (a 100,000-user lab makes a million)."""
    maildir.mkdir(parents=True, exist_ok=True)
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(exist_ok=True)
    if len(messages) > 2:
        folder = maildir / ".Archive"
        folder.mkdir(exist_ok=True)
        for sub in ("new", "cur", "tmp"):
            (folder / sub).mkdir(exist_ok=True)
        (folder / "maildirfolder").touch()
    for index, body in enumerate(messages):
        name = f"{1700000000 + index}.M{index}P1.lab"
        if index >= 2:
            (maildir / ".Archive" / "cur" / (name + ":2,S")).write_bytes(body)
            continue
        target = maildir / ("cur" if index % 2 else "new") / (name + (":2,S" if index % 2 else ""))
        target.write_bytes(body)


def _mail_log(domain: str, now: datetime, zone: ZoneInfo) -> tuple[str, str, bytes]:
    """The current log, `mail.log.1` and `mail.log.2.gz` (logrotate with delaycompress): a
    delivery a few hours ago, one a day earlier, one two days earlier. Classic syslog stamps,
    in the local time of `onprem.log_timezone`."""

    def delivery(when: datetime, queue_id: str, user: str) -> str:
        stamp = when.astimezone(zone).strftime("%b %e %H:%M:%S")
        return (
            f"{stamp} mail postfix/smtpd[2101]: {queue_id}: client=mx.example.net[192.0.2.25]\n"
            f"{stamp} mail postfix/local[2104]: {queue_id}: to=<{user}@{domain}>, "
            "relay=local, delay=0.2, dsn=2.0.0, status=sent (delivered to maildir)\n"
        )

    current = delivery(now - timedelta(hours=3), "3F1A2C", "suga")
    older = delivery(now - timedelta(days=1, hours=3), "2E0B1D", "tanaka")
    oldest = delivery(now - timedelta(days=2, hours=3), "1D9A0C", "sato")
    return current, older, gzip.compress(oldest.encode(), mtime=0)


def _zone(state: DesiredState, migrated: bool) -> str:
    mx_side = state.dns.mx if migrated else Side.ONPREM
    mx = state.rental.mx_host if mx_side is Side.RENTAL else state.onprem.mx_host
    terms = ["v=spf1", f"ip{state.onprem.public_ip.version}:{state.onprem.public_ip}"]
    if migrated and (
        state.dns.mx is Side.RENTAL or any(u.outbound is Side.RENTAL for u in state.users.values())
    ):
        terms.append(state.rental.spf)
    route = state.router.smtp_route if state.router else None
    if migrated and route is not None and route.egress_ip != state.onprem.public_ip:
        terms.append(f"ip{route.egress_ip.version}:{route.egress_ip}")  # onprem's mail: MR006
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
    forwarded: list[str] = []
    removed: dict[str, str] = {}
    mailboxes: list[str] = []
    # People's uids as useradd gives them on Debian (from 1001; login.defs: 1000-59999).
    # Past 58,999 users (more than that range holds) they are numbered from 100001 and
    # login.defs widens the range, as an admin would, clear of the system accounts (nobody
    # is 65534): every lab user is a person to mailrec.
    first_uid = MIN_UID if len(state.users) <= MAX_UID - MIN_UID else 100_000
    for uid, (name, user) in enumerate(sorted(state.users.items()), start=first_uid + 1):
        at_rental = migrated and user.inbound is Side.RENTAL
        passwd.append(f"{name}:x:{uid}:{uid}:{name.title()}:/home/{name}:/bin/bash")
        if not at_rental:
            count = (uid * 7) % 4  # a few messages each, some none, to show draining
            _write_maildir(layout.onprem_home / name / "Maildir",
                           [_message(i, name, state.domain) for i in range(count)])
        else:
            # Drained and archived by mailrec's onprem-mailbox step: the account stays.
            archived = f"Maildir{ARCHIVE_INFIX}{now.strftime('%Y%m%dT%H%M%SZ')}"
            _write_maildir(layout.onprem_home / name / archived, [])
            removed[name] = f"/home/{name}/{archived}"
            forwarded.append(name)
            mailboxes.append(f"{name}@{state.domain}")
    (layout.onprem / "etc" / "passwd").write_text("\n".join(passwd) + "\n")
    (layout.onprem / "etc" / "login.defs").write_text(
        "# /etc/login.defs of the onprem mail server (lab copy)\n"
        f"UID_MIN {first_uid}\nUID_MAX {max(MAX_UID, first_uid + len(state.users))}\n")
    (layout.onprem / "etc" / "aliases").write_text(_aliases(state))
    (layout.postfix_dir / TRANSPORT_MAP).write_text(format_map({}, TRANSPORT_MAP))
    (layout.postfix_dir / RECIPIENT_MAP).write_text(format_map({}, RECIPIENT_MAP))
    onprem = LabOnprem(layout, state.domain, state.onprem.config_dir)
    # As mailrec forwards: every local name of each user (all of them in three map writes).
    if forwarded:
        onprem.route_to_rental_many(forwarded, state.rental.smtp_host, state.rental.relay_port)
    if removed:
        (layout.postfix_dir / REMOVED_LIST).write_text(format_map(removed, REMOVED_LIST))
    layout.onprem_maillog.parent.mkdir(parents=True)
    current, older, oldest = _mail_log(state.domain, now, ZoneInfo(state.onprem.log_timezone))
    log = layout.onprem_maillog
    for path, content, age in ((log.with_name(log.name + ".2.gz"), oldest, timedelta(days=2)),
                               (log.with_name(log.name + ".1"), older, timedelta(days=1)),
                               (log, current, timedelta(0))):
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        written = (now - age - timedelta(hours=3)).timestamp()
        os.utime(path, (written, written))  # last written when its last line was logged
    if migrated and state.onprem.state == "retired":
        layout.onprem_retired.write_text("retired\n")

    layout.rental.mkdir(parents=True)
    layout.rental_domains.write_text(f"{state.domain}\n")
    layout.rental_mailboxes.write_text("".join(m + "\n" for m in mailboxes))
    whitelist = [str(n) for n in state.rental.whitelist] if migrated else []
    layout.rental_whitelist.write_text("".join(w + "\n" for w in whitelist))
    layout.rental_aliases.write_text(_rental_aliases(state, migrated))
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
