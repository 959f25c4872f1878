"""The e2e topology: every real part of the migration on its own loopback address.

`start_topology(directory, users=N)` starts, on the addresses of tests/e2e/net.py:

- onprem (net.ONPREM): Postfix on SMTP_PORT (mydestination: mail.example.co.jp, localhost,
  the domain; mynetworks: itself and both office lines; ~/Maildir/; aliases `info` -> user 1,
  `team` -> users 1..3, virtual `sales@` -> user 2; recipient_delimiter `+`; example.net
  through [INTERNET_MX]:SMTP_PORT), sshd on 2222 (root, key), Dovecot POP3 + IMAP, and N
  local Unix users `e2<hex>uNN` (uids from 47000) whose Maildirs hold SEED_MESSAGES old
  messages with an X-E2E-Id header;
- DNS (net.DNS, a free port): BIND with the zone, every TTL 10 s, MX -> mail.example.co.jp.
  (A net.ONPREM), `mx-rental.example.co.jp.` (A net.RENTAL: the rental's MX name is inside
  the zone, not net.RENTAL_MX_NAME), SPF `v=spf1 ip4:<onprem> ~all`, a TSIG key;
- the rental (net.RENTAL): Postfix with virtual mailboxes, Dovecot IMAP, sshd on 2222, as
  mailrec's `ssh` provider manages it; mynetworks is itself plus the file mailrec edits;
- the router (net.ROUTER:2222): the RTX emulator; the default route leaves by `tunnel 2`
  (line B), the policy route's gateway `192.168.0.254` is line A.

`write_state(topology, dir)` writes the desired state before the migration (everyone
onprem); `topology.mailrec_env()` is the environment mailrec needs against it.
`topology.stop()` stops everything and removes the users (also at exit; idempotent).
"""

from __future__ import annotations

import imaplib
import poplib
import pwd
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.drivers.rtx.driver import RtxDriver
from tests.dns_server import NamedServer
from tests.e2e import net
from tests.e2e.topology_parts import (
    ALIAS_ONLY,
    DNS_TTL,
    GROUP_ALIAS,
    ONPREM_SSH_PORT,
    RENTAL_MX_NAME,
    RENTAL_SSH_PORT,
    ROUTER_GATEWAYS,
    ROUTER_SSH_PORT,
    UID_BASE,
    VIRTUAL_ALIAS,
    OnpremUsers,
    RentalHost,
    Router,
    compile_aliases,
    onprem_aliases,
    remove_stale_users,
    start_dns,
    start_onprem_dovecot,
    start_onprem_postfix,
    start_rental_dovecot,
    start_rental_postfix,
    start_router,
    user_password,
)
from tests.integration.services import (
    Dovecot,
    Postfix,
    ServiceStack,
    Sshd,
    ensure_loopback_address,
    make_base_dir,
    require_binary,
    require_port_free,
    require_root,
    start_sshd,
)

__all__ = [
    "ALIAS_NAMES", "FIXED_PORTS", "RENTAL_MX_NAME", "ROUTER_LOGIN_ENV", "SMTP_FILTER",
    "Topology", "office_source_address", "start_topology", "write_state",
]

SMTP_FILTER = 10  # router.smtp_route.filter
ALIAS_NAMES = (ALIAS_ONLY, GROUP_ALIAS, VIRTUAL_ALIAS)  # info -> u1, team -> u1..3, sales -> u2
FIXED_PORTS = (  # every fixed listener of the topology (BIND takes a free port on net.DNS)
    (net.ONPREM, net.SMTP_PORT), (net.ONPREM, net.ONPREM_POP_PORT),
    (net.ONPREM, net.ONPREM_IMAP_PORT), (net.ONPREM, ONPREM_SSH_PORT),
    (net.RENTAL, net.SMTP_PORT), (net.RENTAL, net.RENTAL_IMAP_PORT),
    (net.RENTAL, RENTAL_SSH_PORT), (net.ROUTER, ROUTER_SSH_PORT),
)
ROUTER_LOGIN_ENV = "E2E_RTX_LOGIN"  # the router login password (state: env:E2E_RTX_LOGIN)


@dataclass
class Topology:
    dir: Path  # the daemons' files (under /tmp: daemon users must traverse it)
    users: list[str]
    unix_users: OnpremUsers
    onprem_sshd: Sshd
    onprem_postfix: Postfix
    onprem_dovecot: Dovecot
    dns: NamedServer
    rental_sshd: Sshd
    rental: RentalHost
    router: Router
    known_hosts: Path  # onprem's, the rental's and the router's host keys
    stack: ServiceStack = field(repr=False)
    started_in: float = 0.0  # seconds start_topology took

    # --- handles -----------------------------------------------------------------------
    @property
    def postfixes(self) -> dict[str, Postfix]:
        """`{"onprem": ..., "rental": ...}`; e.g. `p.run("postqueue", "-j")`."""
        return {"onprem": self.onprem_postfix, "rental": self.rental.postfix}

    @property
    def seeded(self) -> dict[str, list[str]]:
        """user -> the e2e ids of the old messages seeded in the onprem Maildir."""
        return dict(self.unix_users.seeded)

    def maildir(self, user: str) -> Path:
        """The user's onprem Maildir (new/ and cur/ below it)."""
        return Path(pwd.getpwnam(user).pw_dir) / "Maildir"

    def rental_maildir(self, user: str) -> Path:
        """The user's rental Maildir, as mailrec's ssh provider creates it."""
        return self.rental.mail_root / net.DOMAIN / user

    def rental_password(self, user: str) -> str:
        """The initial rental password mailrec left for the user (after mailbox/<user>)."""
        return (self.rental.password_dir / f"{user}@{net.DOMAIN}").read_text().strip()

    def aliases(self) -> dict[str, list[str]]:
        """The state's `aliases:`: every name onprem receives for besides its users."""
        return onprem_aliases(self.users)

    def alias_expansions(self) -> dict[str, list[str]]:
        """address -> the users who must receive a message sent to it."""
        expansions = {f"{user}@{net.DOMAIN}": [user] for user in self.users}
        for name, members in self.aliases().items():
            expansions[f"{name}@{net.DOMAIN}"] = list(members)
        expansions[f"{self.users[0]}+e2e@{net.DOMAIN}"] = [self.users[0]]
        return expansions

    # --- users' mail clients -------------------------------------------------------------
    def pop_drain(self, user: str, store_dir: Path) -> list[Path]:
        """Fetch every message over POP3 from onprem Dovecot, save each as a file in
        store_dir, delete it on the server (QUIT commits): what a POP client does."""
        store_dir.mkdir(parents=True, exist_ok=True)
        saved: list[Path] = []
        pop = poplib.POP3(net.ONPREM, net.ONPREM_POP_PORT, timeout=15)
        try:
            pop.user(user)
            pop.pass_(user_password(user))
            _, listing, _ = pop.uidl()
            for line in listing:
                number, uidl = line.decode().split()
                _, lines, _ = pop.retr(int(number))
                path = store_dir / f"{user}-{uidl}.eml"
                path.write_bytes(b"\r\n".join(lines) + b"\r\n")
                saved.append(path)
                pop.dele(int(number))
        finally:
            pop.quit()
        return saved

    def imap_read(self, user: str, password: str | None = None) -> list[bytes]:
        """Every message of the user's rental INBOX over IMAP (read-only), with the
        password mailrec generated unless one is given."""
        imap = imaplib.IMAP4(net.RENTAL, net.RENTAL_IMAP_PORT, timeout=15)
        try:
            imap.login(f"{user}@{net.DOMAIN}", password or self.rental_password(user))
            imap.select("INBOX", readonly=True)
            _, data = imap.search(None, "ALL")
            messages: list[bytes] = []
            for number in data[0].split():
                _, parts = imap.fetch(number, "(BODY.PEEK[])")
                messages.extend(p[1] for p in parts if isinstance(p, tuple))
            imap.logout()
        except BaseException:
            imap.shutdown()
            raise
        return messages

    # --- mailrec -------------------------------------------------------------------------
    def router_driver(self) -> RtxDriver:
        """mailrec's own RTX driver to the emulator (e.g. to change its config by hand)."""
        return RtxDriver(self.router.address, self.router.port, self.router.user,
                         self.router.login_password, self.router.admin_password,
                         str(self.known_hosts))

    def mailrec_env(self) -> dict[str, str]:
        return {
            "MAILREC_KNOWN_HOSTS": str(self.known_hosts),
            "MAILREC_SSH_KEY": str(self.onprem_sshd.client_key),
            ROUTER_LOGIN_ENV: self.router.login_password,
            "MAILREC_LAB": "",
            "MAILREC_NOW": "",
        }

    def stop(self) -> None:
        """Stop every part and remove the users; again: nothing."""
        self.stack.stop_all()


def office_source_address(topology: Topology) -> str:
    """The office line tcp/25 leaves through by the router's CURRENT (running)
    configuration, read over SSH and judged by mailrec's `tcp25_egress`."""
    _, facts = topology.router_driver().observe()
    if len(facts.smtp_egress) != 1 or facts.smtp_egress[0] not in ROUTER_GATEWAYS:
        raise AssertionError(f"tcp/25 leaves through {facts.smtp_egress}: not one known line")
    return ROUTER_GATEWAYS[facts.smtp_egress[0]]


def start_topology(directory: Path, *, users: int = 4) -> Topology:
    """Start every part (see the module doc); `directory` gets known_hosts and a link
    `services` to the daemons' directory. Raises ServiceUnavailable when a part cannot run;
    what started is stopped then."""
    if users < 1:
        raise ValueError("users: at least 1")
    started = time.monotonic()
    require_root()
    for tool in ("postalias", "useradd", "userdel", "getent", "find", "uniq"):
        require_binary(tool)
    for address, port in FIXED_PORTS:  # another run (or its leftovers) holds them: stop here
        ensure_loopback_address(address)
        require_port_free(address, port)
    remove_stale_users()
    stack = ServiceStack()
    try:
        base = stack.add_dir(make_base_dir("mailrec-e2e-"))
        unix_users = stack.add(OnpremUsers(prefix=f"e2{secrets.token_hex(2)}u"))
        names = unix_users.create(users)
        onprem_sshd = stack.add(start_sshd(base / "onprem-sshd", address=net.ONPREM,
                                           port=ONPREM_SSH_PORT))
        onprem_postfix = stack.add(start_onprem_postfix(base / "onprem-postfix", names))
        compile_aliases(onprem_postfix)
        onprem_dovecot = stack.add(start_onprem_dovecot(base / "onprem-dovecot", names))
        dns = stack.add(start_dns())
        rental_sshd = stack.add(start_sshd(base / "rental-sshd", address=net.RENTAL,
                                           port=RENTAL_SSH_PORT))
        rental_postfix = stack.add(start_rental_postfix(base / "rental"))
        rental_dovecot = stack.add(start_rental_dovecot(base / "rental"))
        rental = RentalHost(rental_postfix, rental_dovecot, base / "rental" / "vhosts",
                        base / "rental" / "initial-passwords")
        router = stack.add(start_router(base / "router"))
    except BaseException:
        stack.stop_all()
        raise
    directory.mkdir(parents=True, exist_ok=True)
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(onprem_sshd.known_hosts.read_text()
                           + rental_sshd.known_hosts.read_text()
                           + router.known_hosts_line + "\n")
    link = directory / "services"
    if link.is_symlink():
        link.unlink()  # an earlier run's
    if not link.exists():
        link.symlink_to(base)
    return Topology(base, names, unix_users, onprem_sshd, onprem_postfix, onprem_dovecot, dns,
                    rental_sshd, rental, router, known_hosts, stack,
                    started_in=time.monotonic() - started)


def write_state(topology: Topology, directory: Path) -> Path:
    """The e2e desired state before the migration (everyone onprem), in directory/mailrec.yaml
    with the TSIG secret beside it (file:); returns directory."""
    t = topology
    directory.mkdir(parents=True, exist_ok=True)
    secret = directory / "tsig.secret"
    secret.write_text(t.dns.secret + "\n")
    secret.chmod(0o600)
    options = t.rental.options(t.rental_sshd.connect("root"), t.known_hosts,
                               t.rental_sshd.client_key)
    option_lines = "".join(f"    {key}: {value}\n" for key, value in options.items())
    user_lines = "".join(f"  {user}: {{inbound: onprem, outbound: onprem}}\n"
                         for user in t.users)
    alias_lines = "".join(f"  {name}: [{', '.join(members)}]\n"
                          for name, members in t.aliases().items())
    (directory / "mailrec.yaml").write_text(f"""\
# The e2e run's desired state before the migration: everyone onprem (tests/e2e/topology.py).
version: 1
domain: {net.DOMAIN}
onprem:
  connect: {t.onprem_sshd.connect("root")}
  config_dir: {t.onprem_postfix.config_dir}
  mx_host: {net.ONPREM_MX_NAME}
  public_ip: {net.ONPREM}
  mailbox: maildir:~/Maildir
  log_file: {t.onprem_postfix.maillog}
  uid_range: [{UID_BASE}, {UID_BASE + 999}]
rental:
  provider: ssh
  mx_host: {RENTAL_MX_NAME}
  smtp_host: {net.RENTAL}
  relay_port: {net.SMTP_PORT}
  submission_port: {net.SMTP_PORT}
  spf: "ip4:{net.RENTAL}"
  whitelist: []
  options:
{option_lines}dns:
  provider: rfc2136
  server: {t.dns.address}:{t.dns.port}
  tsig: {{name: {t.dns.key_name}, algorithm: {t.dns.algorithm}, secret: "file:{secret}"}}
  mx: onprem
  ttl: {DNS_TTL}
  cutover_ttl: 2
router:
  provider: rtx
  connect: {t.router.connect()}
  password: env:{ROUTER_LOGIN_ENV}
  admin_password: file:{t.router.admin_password_file}
  smtp_route:
    filter: {SMTP_FILTER}
    gateway: 192.168.0.254
    otherwise: tunnel 2
    egress_ip: {net.OFFICE_LINE_A}
users:
{user_lines}aliases:
{alias_lines}policy:
  max_change_pct: 50
  quiet_period: 20s
""")
    return directory

