"""The real-SSH rows of bench/process_bench.py: `mailrec plan` against a real Postfix over SSH.

What runs, all on loopback, started here and stopped at the end (also on Ctrl-C), with the
starters of the integration tests (tests/integration/services.py, tests/dns_server.py):

- the onprem host on 127.0.0.40: sshd (root, per-run host and client keys, free port) and a
  Postfix instance (`-c` its own config dir, free port) whose main.cf is the lab's (the same
  mydestination, so mailrec forwards a user under the same names) and names mailrec's three
  maps; `load()` puts a bench lab's onprem data on it: the managed maps forwarding the
  migrated half (compiled with postmap), and N - N/2 accounts with real Maildirs under the
  bench directory;
- the accounts: creating 10,000 Unix users takes minutes and touches the machine's passwd, so
  this sshd gives its sessions `PATH=<shim>:...` (sshd_config `SetEnv`) where a `getent`
  script answers `getent passwd` with the host's system accounts (uid < 1000; people's
  accounts of the machine are left out, so integration tests running beside the bench do not
  change its plan) followed by the bench's passwd lines; every other getent call goes to
  the real one. mailrec sees one host with N accounts; tests/integration's
  test_onprem_addresses wraps the Transport in-process instead (990 extra passwd entries),
  which a whole `mailrec` process cannot do. The sessions also get `SHLVL=1`, so bash does
  not source root's ~/.bashrc for each command (Debian's bash does when run by sshd): on
  this machine it runs `pyenv init`, ~0.1 s per command, a cost of the machine's dotfiles,
  not of mailrec or of an onprem mail server;
- the rental: the lab rental SMTP server (reconciler.lab.rental_smtp) on 127.0.0.41, serving
  the bench lab's rental files, probed by the `manual` provider (one session, pipelined RCPTs
  for every user), as tests/test_backend_real.py does; the forward target the maps and the
  journal name is `smtp:[127.0.0.41]:PORT`;
- DNS: a real BIND 9 on 127.0.0.42 (RFC 2136 with a per-run TSIG key), the zone as the
  company holds it before the migration.

Two ways to run the plan, both whole processes:
- `mailrec plan --state S` (the real CLI): onprem over SSH, DNS from BIND, rental by SMTP
  probe; no router (the CLI would reach an RTX over SSH: none here). Needs named.
- `bench/realplan.py --state S --lab LAB`: what `mailrec plan` does (load_state,
  SystemBackend, observe_and_plan, render_text), with the onprem driver over SSH and DNS,
  rental and router from the lab's files. The CLI cannot mix them: `--lab` makes every
  system the lab's, and without it the lab rental provider and the zone-file DNS refuse to
  run. It also prints the onprem transport's round trips (`Transport.round_trips`).
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from labgen import (
    REPO,
    BenchLab,
    Split,
    forward_maps,
    passwd_lines,
    record_history,
    write_maildirs,
    write_maps,
)
from ruamel.yaml import YAML

from reconciler.drivers.postfix import (
    RECIPIENT_MAP,
    TRANSPORT_MAP,
    VIRTUAL_MAP,
    recipient_map_ref,
    transport_map_ref,
    virtual_map_ref,
)

if str(REPO) not in sys.path:  # the integration tests' starters (tests/ is no installed package)
    sys.path.append(str(REPO))

from reconciler.lab.rental_smtp import RentalSmtpServer
from reconciler.model_types import Connect
from reconciler.transport import open_transport
from tests.dns_server import NamedServer, NamedUnavailable, start_named
from tests.integration.onprem import free_port
from tests.integration.services import (
    Postfix,
    ServiceStack,
    ServiceUnavailable,
    Sshd,
    ensure_loopback_address,
    require_binary,
    start_postfix,
    start_sshd,
)

__all__ = ["RealOnprem", "ServiceStack", "ServiceUnavailable", "start_dns",
           "start_real_onprem", "start_rental", "unavailable", "write_state"]

ONPREM_ADDRESS = "127.0.0.40"  # the integration tests use .2 (onprem), .3, .4, .8
RENTAL_ADDRESS = "127.0.0.41"
DNS_ADDRESS = "127.0.0.42"
MYHOSTNAME = "mail.example.co.jp"
FIRST_UID = 20000  # the bench's accounts: inside Debian's UID_MIN..UID_MAX (1000..60000)
MAPS = (TRANSPORT_MAP, RECIPIENT_MAP, VIRTUAL_MAP)

GETENT_SHIM = """\
#!/bin/sh
# bench/realhost.py: `getent passwd` answers the host's system accounts and the bench's
# accounts (see that file); anything else is the real getent.
if [ "$#" = 1 ] && [ "$1" = passwd ]; then
  /usr/bin/getent passwd | awk -F: '$3 < 1000 || $3 > 60000' && exec cat {extra}
  exit 1
fi
exec /usr/bin/getent "$@"
"""


def unavailable() -> str | None:
    """Why the real-SSH rows cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (sshd, Postfix)"
    for path in ("/usr/sbin/postfix", "/usr/sbin/sshd"):
        if not os.access(path, os.X_OK):
            return f"{path} missing (make services installs it)"
    for tool in ("postmap", "postconf", "ssh-keygen", "ssh-keyscan", "ip", "getent"):
        try:
            require_binary(tool)
        except ServiceUnavailable as exc:
            return str(exc)
    return None


def start_sshd_with_path(directory: Path, *, address: str, port: int, path: str) -> Sshd:
    """tests/integration/services.start_sshd, with `SetEnv PATH=path SHLVL=1` for every
    session (the getent shim; root's ~/.bashrc not sourced, see above)."""
    return start_sshd(directory, address=address, port=port,
                      extra_config=(f"SetEnv PATH={path} SHLVL=1",))


@dataclass
class RealOnprem:
    """The onprem host: sshd + Postfix on ONPREM_ADDRESS, the bench's accounts via the shim."""

    base: Path
    sshd: Sshd
    postfix: Postfix
    extra_passwd: Path
    loaded: int = 0  # the number of users `load` put on it

    @property
    def config_dir(self) -> Path:
        return self.postfix.config_dir

    def env(self) -> dict[str, str]:
        """What a mailrec process needs to reach this host (as tests/test_backend_real)."""
        return {"MAILREC_KNOWN_HOSTS": str(self.sshd.known_hosts),
                "MAILREC_SSH_KEY": str(self.sshd.client_key),
                "MAILREC_LAB": "", "MAILREC_NOW": ""}

    def local_names(self) -> tuple[str, ...]:
        """mydestination expanded, as the driver reads it (`postconf -x`)."""
        value = self.postfix.run("postconf", "-x", "-h", "mydestination").stdout
        return tuple(name for name in value.replace(",", " ").split() if name)

    def load(self, split: Split, domain: str, target: str) -> None:
        """The onprem side of a bench lab of len(split.names) users on this host."""
        homes = self.base / f"homes-{len(split.names)}"
        write_maildirs(homes, split)
        lines = passwd_lines(split, str(homes), first_uid=FIRST_UID)
        self.extra_passwd.write_text("".join(line + "\n" for line in lines))
        write_maps(self.config_dir,
                   forward_maps(sorted(split.migrated), domain, self.local_names(), target))
        for name in MAPS:
            self.postfix.run("postmap", f"hash:{self.config_dir / name}")
        self.loaded = len(split.names)

    def unload(self) -> None:
        shutil.rmtree(self.base / f"homes-{self.loaded}", ignore_errors=True)


def start_real_onprem(stack: ServiceStack, base: Path) -> RealOnprem:
    base.mkdir(parents=True, exist_ok=True)
    extra = base / "extra-passwd"
    extra.write_text("")
    shim = base / "shim"
    shim.mkdir(exist_ok=True)
    getent = shim / "getent"
    getent.write_text(GETENT_SHIM.format(extra=extra))
    getent.chmod(0o755)
    path = f"{shim}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    sshd = stack.add(start_sshd_with_path(base / "sshd", address=ONPREM_ADDRESS,
                                          port=free_port(ONPREM_ADDRESS), path=path))
    config_dir = base / "postfix" / "etc"
    refs = str(config_dir)
    postfix = stack.add(start_postfix(
        base / "postfix", address=ONPREM_ADDRESS, smtp_port=free_port(ONPREM_ADDRESS),
        myhostname=MYHOSTNAME,
        main_cf={
            # As the lab's main.cf (reconciler/lab/init.py), with mailrec's maps named.
            "mydestination": "$myhostname, localhost.$mydomain, localhost, $mydomain",
            "home_mailbox": "Maildir/",
            "local_recipient_maps":
                f"proxy:unix:passwd.byname $alias_maps {recipient_map_ref(refs)}",
            "transport_maps": transport_map_ref(refs),
            "virtual_alias_maps": virtual_map_ref(refs),
        },
        files=dict.fromkeys(MAPS, ""), postmap=MAPS))
    host = RealOnprem(base, sshd, postfix, extra)
    # The shim must be what the sessions run: else the bench would measure a host without
    # the accounts (and plan to refuse, for lack of them).
    transport = open_transport(Connect.parse(sshd.connect("root")),
                               known_hosts=sshd.known_hosts, key_filename=str(sshd.client_key))
    try:
        found = transport.run(["sh", "-c", "command -v getent"], check=False).text.strip()
    finally:
        transport.close()
    if found != str(getent):
        raise ServiceUnavailable(f"sshd SetEnv PATH not honoured (getent is {found!r})")
    return host


def start_rental(stack: ServiceStack, lab: BenchLab) -> RentalSmtpServer:
    """The lab rental SMTP server on RENTAL_ADDRESS, serving `lab`'s rental files."""
    ensure_loopback_address(RENTAL_ADDRESS)
    server = RentalSmtpServer(lab.root, RENTAL_ADDRESS, 0, 0, tls_cert=None, tls_key=None)
    try:
        server.start()
    except OSError as exc:
        raise ServiceUnavailable(f"lab rental SMTP on {RENTAL_ADDRESS}: {exc}") from exc
    return stack.add(server)


def start_dns(stack: ServiceStack) -> NamedServer:
    try:
        return stack.add(start_named(address=DNS_ADDRESS))
    except NamedUnavailable as exc:
        raise ServiceUnavailable(str(exc)) from exc


def _yaml() -> YAML:
    yaml = YAML()
    yaml.width = 100
    return yaml


def write_state(directory: Path, lab: BenchLab, host: RealOnprem, rental: tuple[str, int], *,
                dns: NamedServer | None, when: datetime) -> Path:
    """A state dir for the real host: the lab's state with onprem over SSH and the rental at
    `rental` (host, port); with `dns`, DNS by RFC 2136 and no router (the real CLI), else the
    rest as in the lab (bench/realplan.py reads it from the lab's files). Its journal holds
    what labgen records, with this state's forward target."""
    directory.mkdir(parents=True, exist_ok=True)
    yaml = _yaml()
    data: Any = yaml.load((lab.state_dir / "mailrec.yaml").read_text())
    onprem = data["onprem"]
    onprem["connect"] = host.sshd.connect("root")
    onprem["config_dir"] = str(host.config_dir)
    onprem["log_file"] = str(host.postfix.maillog)
    data["rental"]["smtp_host"], data["rental"]["relay_port"] = rental
    if dns is not None:
        secret = directory / "tsig.secret"
        secret.write_text(dns.secret + "\n")
        secret.chmod(0o600)
        data["dns"]["provider"] = "rfc2136"
        data["dns"]["server"] = f"{dns.address}:{dns.port}"
        data["dns"]["tsig"] = {"name": dns.key_name, "algorithm": dns.algorithm,
                               "secret": f"file:{secret}"}
        data.pop("router", None)
    out = io.StringIO()
    yaml.dump(data, out)
    (directory / "mailrec.yaml").write_text(out.getvalue())
    shutil.copy2(lab.state_dir / "users.yaml", directory / "users.yaml")
    record_history(directory / ".mailrec", f"smtp:[{rental[0]}]:{rental[1]}", when)
    return directory
