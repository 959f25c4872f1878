"""The e2e topology's parts, each a real daemon on its own loopback address (tests/e2e/net.py).

`tests/e2e/topology.py` assembles them; this module starts them: the onprem host (Postfix,
Dovecot with POP3 and IMAP, local Unix users with seeded Maildirs, aliases), the rental
(Postfix with virtual mailboxes + Dovecot IMAP, as tests/integration/conftest.py's VPS), the
company's zone in BIND, and the RTX emulator over SSH. Every starter raises
`ServiceUnavailable` (tests/integration/services.py) with the reason when it cannot run.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from tests.dns_server import NamedServer, NamedUnavailable, start_named
from tests.e2e import net
from tests.integration.services import (
    Dovecot,
    Postfix,
    ServiceUnavailable,
    ensure_loopback_address,
    require_binary,
    require_port_free,
    start_dovecot,
    start_postfix,
    wait_for_port,
)

# Ports net.py leaves open: each on its part's own address.
ONPREM_SSH_PORT = 2222
RENTAL_SSH_PORT = 2222
ROUTER_SSH_PORT = 2222
RENTAL_MX_NAME = f"mx-rental.{net.DOMAIN}."  # inside the zone, A net.RENTAL (not net.py's)
DNS_TTL = 10  # every record of the zone: the e2e waits on real time
VMAIL_UID = VMAIL_GID = 5000
UID_BASE = 47000  # the e2e users' uids: onprem.uid_range is [UID_BASE, UID_BASE + 999]
SEED_MESSAGES = 3  # old messages per user, each with a net.E2E_ID_HEADER id
ALIAS_ONLY = "info"  # aliases(5): info -> user 1 (no account of that name)
GROUP_ALIAS = "team"  # aliases(5): team -> users 1..3
VIRTUAL_ALIAS = "sales"  # virtual(5): sales@domain -> user 2
INTERNET_TRANSPORT = f"{net.INTERNET_DOMAIN}\tsmtp:[{net.INTERNET_MX}]:{net.SMTP_PORT}\n"
FAST_RETRY = {"queue_run_delay": "1s", "minimal_backoff_time": "1s",
              "maximal_backoff_time": "2s"}
ROUTER_GATEWAYS = {  # gateway of the RTX default route -> the office line it leaves through
    "192.168.0.254": net.OFFICE_LINE_A,  # the policy route's gateway (smtp_route.gateway)
    "tunnel 2": net.OFFICE_LINE_B,  # the everyday line (smtp_route.otherwise)
}
RTX_TEMPLATE = Path(__file__).resolve().parents[2] / "reconciler/lab/templates/rtx1210.conf"


def user_password(user: str) -> str:
    """The onprem Dovecot password of an e2e user (known, so the story logs in like a user)."""
    return f"pw-{user}"


@dataclass
class OnpremUsers:
    """Local accounts of one run (`useradd -m`, uids from UID_BASE); `stop()` removes them
    with their homes."""

    prefix: str
    names: list[str] = field(default_factory=list)
    seeded: dict[str, list[str]] = field(default_factory=dict)  # user -> e2e ids in Maildir

    def create(self, count: int) -> list[str]:
        useradd = require_binary("useradd")
        taken = {entry.pw_uid for entry in pwd.getpwall()}
        uid = UID_BASE
        for number in range(1, count + 1):
            while uid in taken:
                uid += 1
            name = f"{self.prefix}{number:02d}"
            proc = subprocess.run(
                [useradd, "-m", "-u", str(uid), "-U", "-s", "/usr/sbin/nologin", name],
                capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise ServiceUnavailable(f"useradd {name}: {proc.stderr.strip()}")
            self.names.append(name)
            taken.add(uid)
            self.seed(name)
        return list(self.names)

    def seed(self, user: str) -> None:
        """`SEED_MESSAGES` old messages in ~/Maildir (new/ and cur/), owned by the user."""
        entry = pwd.getpwnam(user)
        maildir = Path(entry.pw_dir) / "Maildir"
        ids = []
        for sub in ("", "new", "cur", "tmp"):
            (maildir / sub).mkdir(exist_ok=True)
        for index in range(SEED_MESSAGES):
            e2e_id = f"seed-{user}-{index}"
            message = EmailMessage()
            message["From"] = f"customer{index}@{net.INTERNET_DOMAIN}"
            message["To"] = f"{user}@{net.DOMAIN}"
            message["Subject"] = f"old message {index} of {user}"
            message["Message-ID"] = f"<{e2e_id}@{net.INTERNET_DOMAIN}>"
            message[net.E2E_ID_HEADER] = e2e_id
            message.set_content(f"An old message ({e2e_id}) in the onprem mailbox.\n")
            name = f"1700000000.M{index}P1.seed" + (":2,S" if index % 2 else "")
            path = maildir / ("cur" if index % 2 else "new") / name
            path.write_bytes(bytes(message))
            path.chmod(0o600)
            ids.append(e2e_id)
        for path in [maildir, *maildir.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self.seeded[user] = ids

    def stop(self) -> None:
        userdel = shutil.which("userdel") or "/usr/sbin/userdel"
        while self.names:
            # -r: the home too; a mail spool may be absent. The group of -U goes with it.
            subprocess.run([userdel, "-r", self.names.pop()], capture_output=True, check=False)


STALE_USER = re.compile(r"e2[0-9a-f]{4}u[0-9]{2}")


def remove_stale_users() -> list[str]:
    """Accounts an earlier e2e run left behind (killed before its stop): this run's
    namespace and uid range only. Call it only when no other run holds the addresses."""
    stale = [e.pw_name for e in pwd.getpwall()
             if STALE_USER.fullmatch(e.pw_name) and UID_BASE <= e.pw_uid < UID_BASE + 1000]
    OnpremUsers(prefix="", names=list(stale)).stop()
    return stale


def onprem_aliases(users: list[str]) -> dict[str, list[str]]:
    """Every name onprem receives for besides its users: alias -> the users it reaches."""
    return {ALIAS_ONLY: users[:1], GROUP_ALIAS: users[:3], VIRTUAL_ALIAS: users[1:2] or users[:1]}


def start_onprem_postfix(directory: Path, users: list[str]) -> Postfix:
    """Postfix on net.ONPREM: local delivery to ~/Maildir/, aliases, a virtual alias, the
    office lines in mynetworks, example.net through the e2e Internet's MX."""
    aliases = onprem_aliases(users)
    config_dir = directory / "etc"
    return start_postfix(
        directory, address=net.ONPREM, smtp_port=net.SMTP_PORT,
        myhostname=net.ONPREM_MX_NAME.rstrip("."),
        main_cf={
            "mydomain": net.DOMAIN,
            "mydestination": f"$myhostname, localhost, {net.DOMAIN}",
            "mynetworks": f"{net.ONPREM}/32 {net.OFFICE_LINE_A}/32 {net.OFFICE_LINE_B}/32",
            "home_mailbox": "Maildir/",
            "recipient_delimiter": "+",
            "alias_maps": f"hash:{config_dir / 'aliases'}",
            "alias_database": f"hash:{config_dir / 'aliases'}",
            "virtual_alias_maps": f"hash:{config_dir / 'virtual'}",
            "transport_maps": f"hash:{config_dir / 'transport'}",
            **FAST_RETRY,
        },
        files={
            "aliases": "".join(f"{name}: {', '.join(members)}\n"
                               for name, members in aliases.items() if name != VIRTUAL_ALIAS),
            "virtual": f"{VIRTUAL_ALIAS}@{net.DOMAIN}\t{aliases[VIRTUAL_ALIAS][0]}\n",
            "transport": INTERNET_TRANSPORT,
        },
        postmap=("virtual", "transport"),
    )


def compile_aliases(postfix: Postfix) -> None:
    """postalias the aliases table (start_postfix compiles with postmap only); reload."""
    postfix.run("postalias", f"hash:{postfix.config_dir / 'aliases'}")
    postfix.run("postfix", "reload")


def start_onprem_dovecot(directory: Path, users: list[str]) -> Dovecot:
    """Dovecot POP3 + IMAP on net.ONPREM for the local users (passwd-file, PLAIN passwords
    `user_password(user)`, mail in ~/Maildir), as the office's mail clients read it."""
    dovecot = require_binary("dovecot")
    if not Path("/usr/lib/dovecot/pop3").exists():
        raise ServiceUnavailable("no Dovecot POP3 server: apt-get install dovecot-pop3d")
    for port in (net.ONPREM_POP_PORT, net.ONPREM_IMAP_PORT):
        require_port_free(net.ONPREM, port)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state").mkdir(exist_ok=True)
    passwd = directory / "users"
    lines = []
    for user in users:
        entry = pwd.getpwnam(user)
        lines.append(f"{user}:{{PLAIN}}{user_password(user)}:{entry.pw_uid}:{entry.pw_gid}::"
                     f"{entry.pw_dir}::\n")
    passwd.write_text("".join(lines))
    os.chown(passwd, 0, grp.getgrnam("dovecot").gr_gid)
    passwd.chmod(0o640)
    log = directory / "dovecot.log"
    config = directory / "dovecot.conf"
    config.write_text(f"""\
instance_name = mailrec-e2e-onprem
base_dir = {directory / "run"}
state_dir = {directory / "state"}
log_path = {log}
info_log_path = {log}
protocols = pop3 imap
listen = {net.ONPREM}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:~/Maildir
first_valid_uid = {UID_BASE}
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {net.ONPREM}
    port = {net.ONPREM_POP_PORT}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {net.ONPREM}
    port = {net.ONPREM_IMAP_PORT}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""")
    process = subprocess.Popen([dovecot, "-F", "-c", str(config)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL,
                               stderr=(directory / "dovecot.stderr").open("wb"))
    handle = Dovecot(net.ONPREM, net.ONPREM_IMAP_PORT, directory, config, passwd, log, process)
    try:
        for port in (net.ONPREM_POP_PORT, net.ONPREM_IMAP_PORT):
            wait_for_port(net.ONPREM, port, what="onprem dovecot",
                          log=log if log.exists() else directory / "dovecot.stderr",
                          alive=lambda: process.poll() is None)
    except BaseException:
        handle.stop()
        raise
    return handle


@dataclass(frozen=True)
class RentalHost:
    """The rental on net.RENTAL as the `ssh` provider manages it (cf. RentalVps)."""

    postfix: Postfix
    dovecot: Dovecot
    mail_root: Path
    password_dir: Path

    @property
    def config_dir(self) -> Path:
        return self.postfix.config_dir

    def options(self, connect: str, known_hosts: Path, key_file: Path) -> dict[str, str]:
        return {
            "connect": connect,
            "known_hosts": str(known_hosts),
            "key_file": str(key_file),
            "postfix_dir": str(self.config_dir),
            "virtual_mailbox_maps": str(self.config_dir / "vmailbox"),
            "dovecot_passwd": str(self.dovecot.passwd_file),
            "mail_root": str(self.mail_root),
            "mynetworks_file": str(self.config_dir / "mynetworks"),
            "password_dir": str(self.password_dir),
            "virtual_alias_maps": str(self.config_dir / "virtual_aliases"),
        }


def start_rental_postfix(directory: Path) -> Postfix:
    """Postfix on net.RENTAL: virtual mailboxes under DIR/vhosts, the mynetworks file
    mailrec edits, virtual aliases, example.net through the e2e Internet's MX."""
    mail_root = directory / "vhosts"
    mail_root.mkdir(parents=True)
    config_dir = directory / "postfix" / "etc"
    for tool in ("postconf", "postmap", "doveadm"):
        require_binary(tool)
    return start_postfix(
        directory / "postfix", address=net.RENTAL, smtp_port=net.SMTP_PORT,
        myhostname=RENTAL_MX_NAME.rstrip("."),
        main_cf={
            "virtual_mailbox_domains": net.DOMAIN,
            "virtual_mailbox_maps": f"hash:{config_dir / 'vmailbox'}",
            "virtual_mailbox_base": str(mail_root),
            "virtual_uid_maps": f"static:{VMAIL_UID}",
            "virtual_gid_maps": f"static:{VMAIL_GID}",
            # Itself only: the office lines are what mailrec whitelists in the file.
            "mynetworks": f"{net.RENTAL}/32 {config_dir / 'mynetworks'}",
            "virtual_alias_maps": f"hash:{config_dir / 'virtual_aliases'}",
            "transport_maps": f"hash:{config_dir / 'transport'}",
            "recipient_delimiter": "+",
            # A hosted service refuses a relay for good (554), not Postfix's default 454.
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            **FAST_RETRY,
        },
        files={"vmailbox": "", "mynetworks": "", "virtual_aliases": "",
               "transport": INTERNET_TRANSPORT},
        postmap=("vmailbox", "virtual_aliases", "transport"),
    )


def start_rental_dovecot(directory: Path) -> Dovecot:
    return start_dovecot(directory / "dovecot", address=net.RENTAL,
                         imap_port=net.RENTAL_IMAP_PORT)


ZONE_TEMPLATE = """\
$ORIGIN {domain}.
$TTL {ttl}
@   {ttl} IN SOA ns1.{domain}. hostmaster.{domain}. (
        1          ; serial
        {ttl}      ; refresh
        5          ; retry
        600        ; expire
        5 )        ; negative
@   {ttl} IN NS  ns1.{domain}.
@   {ttl} IN MX  10 {onprem_mx}
@   {ttl} IN TXT "v=spf1 ip4:{onprem} ~all"
ns1 {ttl} IN A   {dns}
{onprem_label} {ttl} IN A {onprem}
{rental_label} {ttl} IN A {rental}
"""


def zone_text() -> str:
    def label(name: str) -> str:
        return name.removesuffix(f".{net.DOMAIN}.")

    return ZONE_TEMPLATE.format(
        domain=net.DOMAIN, ttl=DNS_TTL, onprem_mx=net.ONPREM_MX_NAME, onprem=net.ONPREM,
        dns=net.DNS, onprem_label=label(net.ONPREM_MX_NAME), rental_label=label(RENTAL_MX_NAME),
        rental=net.RENTAL)


def start_dns() -> NamedServer:
    try:
        return start_named(address=net.DNS, zone=net.DOMAIN, zone_text=zone_text())
    except NamedUnavailable as exc:
        raise ServiceUnavailable(str(exc)) from exc


# --- the router ------------------------------------------------------------------------


def router_config_text() -> str:
    """The lab's RTX1210 configuration with the office lines' addresses: the default route
    through `tunnel 2` (line B), no policy route yet; `192.168.0.254` is line A's gateway."""
    text = RTX_TEMPLATE.read_text()
    return text.replace("203.0.113.9", net.OFFICE_LINE_A).replace("198.51.100.10",
                                                                   net.OFFICE_LINE_B)


@dataclass
class Router:
    """The RTX emulator (`python -m reconciler.lab.rtx_emulator`) on net.ROUTER."""

    address: str
    port: int
    dir: Path
    config: Path  # the saved configuration (the running one is in the emulator's memory)
    known_hosts_line: str
    login_password: str
    admin_password_file: Path
    log: Path
    process: subprocess.Popen[bytes]
    user: str = "admin"

    @property
    def admin_password(self) -> str:
        return self.admin_password_file.read_text().strip()

    def connect(self) -> str:
        return f"ssh://{self.user}@{self.address}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)


def start_router(directory: Path) -> Router:
    """The emulator as `mailrec lab up` starts it: a subprocess with its saved config, an
    RSA host key (pinned in `known_hosts_line`) and login/admin password files."""
    import paramiko

    from reconciler.lab.rtx_emulator import known_hosts_line

    ensure_loopback_address(net.ROUTER)
    require_port_free(net.ROUTER, ROUTER_SSH_PORT)
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "rtx1210.conf"
    config.write_text(router_config_text())
    key_path = directory / "ssh_host_rsa_key"
    key = paramiko.RSAKey.generate(2048)
    key.write_private_key_file(str(key_path))
    key_path.chmod(0o600)
    login, admin = directory / "login.secret", directory / "admin.secret"
    login_password = f"login-{os.urandom(6).hex()}"
    login.write_text(login_password + "\n")
    admin.write_text(f"admin-{os.urandom(6).hex()}\n")
    for path in (login, admin):
        path.chmod(0o600)
    log = directory / "rtx.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "reconciler.lab.rtx_emulator", "--config", str(config),
             "--host", net.ROUTER, "--port", str(ROUTER_SSH_PORT), "--host-key", str(key_path),
             "--login-password-file", str(login), "--admin-password-file", str(admin)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=Path(__file__).resolve().parents[2])
    router = Router(net.ROUTER, ROUTER_SSH_PORT, directory, config,
                    known_hosts_line(key, net.ROUTER, ROUTER_SSH_PORT), login_password, admin,
                    log, process)
    try:
        wait_for_port(net.ROUTER, ROUTER_SSH_PORT, what="RTX emulator", log=log,
                      alive=lambda: process.poll() is None)
    except BaseException:
        router.stop()
        raise
    return router
