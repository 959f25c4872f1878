"""The e2e story: a company's whole migration, driven through git while mail flows.

The daemon follows a bare state repo; this script is the admins and the people: it commits
the story in batches (inbound in four batches, then the whitelist and outbound with the mail
clients changed and acked, then the MX, then the retirement), and plays the users, whose
clients read their mailbox (POP onprem, IMAP at the rental) and send mail through whichever
server they are set to at that moment, from the office line the router's tcp/25 route gives
them. Meanwhile the Internet sends to every address form of the company (resolving the MX
through the real BIND, caching it for its TTL, retrying 4xx like an MTA), and outsiders try
to relay. At the end every message is counted (tests/e2e/ledger.py).

A fault (tests/e2e/faults.py) is armed at a named stage of the story.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.dns_server import free_port
from tests.e2e import net
from tests.e2e.internet import (
    CachingResolver,
    DeliveryRecord,
    InternetReceiver,
    InternetSender,
    MailClient,
)
from tests.e2e.ledger import (
    Ledger,
    LedgerRow,
    MailStore,
    MemoryStore,
    queued_ids,
    scan_stores,
)
from tests.e2e.topology import Topology, office_source_address, start_topology, write_state

ROOT = Path(__file__).resolve().parents[2]
GIT_ENV = {"GIT_AUTHOR_NAME": "Mail Admin", "GIT_AUTHOR_EMAIL": "admin@example.co.jp",
           "GIT_COMMITTER_NAME": "Mail Admin", "GIT_COMMITTER_EMAIL": "admin@example.co.jp"}


class StoryError(RuntimeError):
    """The story could not go on (a stage did not converge): the message says where."""


@dataclass
class StoryConfig:
    users: int = 12
    messages: int = 500  # at least this many messages of load in the whole run
    rate: float = 8.0  # messages per second while the migration runs
    fault: str = "none"
    batches: int = 4  # inbound (and outbound) moves in this many commits
    stage_timeout: float = 180.0  # seconds a stage may take to converge
    settle_timeout: float = 180.0  # for the queues to empty at the end
    seed: int = 1


@dataclass
class Timeline:
    started: float = field(default_factory=time.monotonic)
    stages: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, name: str) -> None:
        self.stages.append((name, time.monotonic() - self.started))
        print(f"[e2e {time.monotonic() - self.started:7.1f}s] {name}", flush=True)


class Story:
    def __init__(self, workdir: Path, config: StoryConfig) -> None:
        self.dir = workdir
        self.config = config
        self.random = random.Random(config.seed)
        self.timeline = Timeline()
        self.ledger = Ledger(relay_whitelist=())
        self.topology: Topology | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.clients: dict[str, str] = {}  # user -> "onprem" | "rental": their outgoing server
        self.office_line = net.OFFICE_LINE_B
        self.stop_load = threading.Event()
        # Set when the run ends, however it ends: no message of this run may reach the next
        # run's servers (they share the addresses).
        self.aborted = threading.Event()
        self.sent_count = 0
        self._id = itertools.count(1)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._client_records: list[DeliveryRecord] = []
        self.relay_probes: list[tuple[str, bool]] = []
        self.acks: list[str] = []
        self.fault_log: list[str] = []

    # --- setup -----------------------------------------------------------------------------
    @property
    def t(self) -> Topology:
        assert self.topology is not None
        return self.topology

    @property
    def work(self) -> Path:
        return self.dir / "work"

    @property
    def state(self) -> Path:
        return self.work / "state"

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MAILREC_")}
        base.update(self.t.mailrec_env())
        base["MAILREC_HOME"] = str(self.dir / "home")
        base["NO_COLOR"] = "1"
        return base

    def git(self, *args: str, cwd: Path | None = None) -> str:
        return subprocess.run(["git", *args], cwd=cwd or self.work, check=True, text=True,
                              capture_output=True, env={**os.environ, **GIT_ENV}).stdout

    def setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.topology = start_topology(self.dir / "topology", users=self.config.users)
        self.timeline.mark(f"topology up ({self.t.started_in:.1f}s, {len(self.t.users)} users)")
        self.clients = dict.fromkeys(self.t.users, "onprem")
        for user, ids in self.t.seeded.items():  # old mail, in the mailbox before the run
            for seed in ids:
                self.ledger.sent(seed, sender="old@example.net", recipients=[user],
                                 expected=[user], kind="inbound")
                self.ledger.accepted(seed)
        write_state(self.t, self.state)
        bare = self.dir / "state.git"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
        self.git("init", "-q", "-b", "main")
        self.git("remote", "add", "origin", str(bare))
        (self.work / ".gitignore").write_text("state/tsig.secret\n")
        self.commit("the mail migration's desired state: everyone onprem", add=True)
        self.resolver = CachingResolver(self.t.dns.address, self.t.dns.port)
        self.receiver = InternetReceiver(self.t.dns.address, self.t.dns.port)
        self.receiver.start()
        self.sender = InternetSender(self.resolver, workers=6, retry_initial=1.0,
                                     retry_max=8.0, give_up_after=900.0)
        self.sender.start()
        self.start_daemon()

    def commit(self, message: str, *, add: bool = False) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        self.git("push", "-q", "origin", "main")

    def start_daemon(self) -> None:
        self.metrics_port = self.metrics_port or free_port("127.0.0.1")
        log = (self.dir / "daemon.log").open("ab")
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "daemon", "--repo", str(self.dir / "state.git"),
             "--branch", "main", "--path", "state", "--interval", "1",
             "--metrics-port", str(self.metrics_port), "--log-format", "json"],
            cwd=self.dir, env=self.env(), stdout=log, stderr=subprocess.STDOUT)

    def kill_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGKILL)
            self.daemon.wait(10)

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.kill_daemon()

    # --- watching the daemon ---------------------------------------------------------------
    def board(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/board.json",
                                        timeout=5) as answer:
                data: dict[str, Any] = json.loads(answer.read())
                return data
        except (OSError, ValueError):
            return {}

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").strip()[:12]

    def wait(self, what: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Until the daemon's board (of a round on the current commit) says `done`; the
        people act meanwhile."""
        deadline = time.monotonic() + self.config.stage_timeout
        head = self.head()
        board: dict[str, Any] = {}
        while time.monotonic() < deadline:
            board = self.board()
            if (board.get("round") or {}).get("commit") == head and done(board):
                return board
            self.people(board)
            time.sleep(0.5)
        summary = json.dumps({k: board.get(k) for k in ("summary", "daemon", "domain_steps")},
                             default=str)[:3000]
        raise StoryError(f"stage {what!r} did not converge in {self.config.stage_timeout:.0f}s"
                         f": {summary}")

    @staticmethod
    def user_row(board: dict[str, Any], user: str) -> dict[str, Any]:
        return next((u for u in board.get("users", []) if u["name"] == user), {})

    # --- the people --------------------------------------------------------------------------
    def people(self, board: dict[str, Any]) -> None:
        """What the users and the admins do by hand, as the board asks."""
        for user in self.t.users:
            row = self.user_row(board, user)
            step = (row.get("next") or {})
            if (step.get("id") == f"outbound/{user}" and not step.get("via")
                    and str(step.get("waits_for", "")).startswith("a person")):
                wanted = row.get("desired_outbound") or "onprem"
                self.clients[user] = wanted  # the person changes the client first, then acks
                self.ack(f"outbound/{user}", f"client set to {wanted}")
        self.read_mail()

    def ack(self, step: str, note: str) -> None:
        result = subprocess.run([sys.executable, "-m", "reconciler", "ack", step, "--note", note],
                                cwd=self.work, env=self.env(), capture_output=True, text=True,
                                check=False)
        self.acks.append(f"{step}: exit {result.returncode}")

    def read_mail(self) -> None:
        """Every user's client fetches the onprem mailbox over POP (deleting it there), as
        long as there is one: the old mailbox drains; rental mail stays in its Maildir."""
        for user in self.t.users:
            maildir = self.t.maildir(user)
            if any((maildir / sub).is_dir() and any((maildir / sub).iterdir())
                   for sub in ("new", "cur")):
                with contextlib.suppress(Exception):  # onprem down or retired: try later
                    self.t.pop_drain(user, self.dir / "clients" / user)

    # --- load ----------------------------------------------------------------------------
    def new_id(self, kind: str) -> str:
        return f"{self.config.fault}-{kind}-{next(self._id):06d}"

    def load(self) -> None:
        """Mail at a steady rate until told to stop (and at least config.messages)."""
        expansions = self.t.alias_expansions()
        addresses = sorted(expansions)
        interval = 1.0 / self.config.rate
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="e2e-load") as pool:
            while not ((self.stop_load.is_set() and self.sent_count >= self.config.messages)
                       or self.aborted.is_set()):
                roll = self.random.random()
                if roll < 0.5:
                    to = self.random.choice(addresses)
                    pool.submit(self.inbound, to, expansions[to])
                elif roll < 0.75:
                    user = self.random.choice(self.t.users)
                    to = self.random.choice(addresses)
                    pool.submit(self.from_client, user, to, expansions[to], "internal")
                elif roll < 0.97:
                    user = self.random.choice(self.t.users)
                    to = f"reply{self.random.randrange(100)}@{net.INTERNET_DOMAIN}"
                    pool.submit(self.from_client, user, to, ["internet"], "outbound")
                else:
                    pool.submit(self.relay_probe)
                self.sent_count += 1
                time.sleep(interval)

    def inbound(self, to: str, owners: list[str]) -> None:
        message_id = self.new_id("in")
        self.ledger.sent(message_id, sender="someone@example.net", recipients=[to],
                         expected=owners, kind="inbound")
        self.sender.send([to], e2e_id=message_id)

    def from_client(self, user: str, to: str, owners: list[str], kind: str) -> None:
        message_id = self.new_id(kind[:3])
        server = net.ONPREM if self.clients[user] == "onprem" else net.RENTAL
        sender = f"{user}@{net.DOMAIN}"
        self.ledger.sent(message_id, sender=sender, recipients=[to], expected=owners,
                         kind="internal" if kind == "internal" else "outbound")
        # A mail client's outbox: it keeps a message it could not send and tries again.
        client = MailClient(server, source_address=self.office_line,
                            retries=0 if self.aborted.is_set() else 120, retry_delay=1.0,
                            id_prefix="c")
        record = client.send(sender, [to], e2e_id=message_id)
        with self._lock:
            self._client_records.append(record)

    def relay_probe(self) -> None:
        """An outsider tries to relay through onprem and the rental (both must refuse)."""
        for server in (net.ONPREM, net.RENTAL):
            probe = self.new_id("relay")
            client = MailClient(server, source_address=net.OUTSIDER, retries=0, id_prefix="r")
            with contextlib.suppress(Exception):
                record = client.send("spammer@example.org", ["victim@example.org"],
                                     e2e_id=probe)
                accepted = bool(record.delivered)
                self.ledger.relay_attempt(probe, accepted, net.OUTSIDER)
                self.relay_probes.append((probe, accepted))

    def follow_route(self) -> None:
        """The office line tcp/25 leaves through, as the router's running config says."""
        while not self.stop_load.is_set():
            with contextlib.suppress(Exception):
                self.office_line = office_source_address(self.t)
            self.stop_load.wait(2.0)

    def start_background(self) -> None:
        for target in (self.load, self.follow_route):
            thread = threading.Thread(target=target, daemon=True, name=target.__name__)
            thread.start()
            self._threads.append(thread)

    # --- the story -----------------------------------------------------------------------
    def edit_users(self, users: list[str], *, inbound: str | None = None,
                   outbound: str | None = None) -> None:
        path = self.state / "mailrec.yaml"
        text = path.read_text()
        for user in users:
            pattern = re.compile(rf"^(  {user}: ){{inbound: (\w+), outbound: (\w+)}}", re.M)
            text, count = pattern.subn(
                lambda m: f"{m.group(1)}{{inbound: {inbound or m.group(2)}, "
                          f"outbound: {outbound or m.group(3)}}}", text)
            assert count == 1, user
        path.write_text(text)

    def edit(self, old: str, new: str) -> None:
        path = self.state / "mailrec.yaml"
        text = path.read_text()
        assert old in text, old
        path.write_text(text.replace(old, new, 1))

    def batches(self) -> Iterator[list[str]]:
        size = max(1, -(-len(self.t.users) // self.config.batches))
        users = list(self.t.users)
        for start in range(0, len(users), size):
            yield users[start:start + size]

    def run_story(self, fault: Any) -> None:
        self.wait("first round", lambda b: b["summary"]["in_sync"])
        self.timeline.mark("router policy route, SPF and aliases applied")
        for number, batch in enumerate(self.batches(), start=1):
            self.edit_users(batch, inbound="rental")
            self.commit(f"inbound batch {number}: {', '.join(batch)}")
            fault.at(f"inbound-{number}", self)
            self.wait(f"inbound batch {number}", lambda b, batch=batch: all(
                self.user_row(b, u).get("inbound") == "rental" for u in batch))
            self.timeline.mark(f"inbound batch {number} forwarded ({len(batch)} users)")
        self.wait("old mailboxes drained and archived", lambda b: b["summary"]["in_sync"])
        self.timeline.mark("every old mailbox drained and archived")
        self.edit("  whitelist: []", f"  whitelist: [{net.OFFICE_LINE_A}/32]")
        for number, batch in enumerate(self.batches(), start=1):
            self.edit_users(batch, outbound="rental")
            self.commit(f"outbound batch {number}: {', '.join(batch)}")
            fault.at(f"outbound-{number}", self)
            self.wait(f"outbound batch {number}", lambda b, batch=batch: all(
                self.user_row(b, u).get("outbound") in ("relay", "submission")
                for u in batch))
            self.timeline.mark(f"outbound batch {number} sends via the rental (acked)")
        self.edit("  mx: onprem", "  mx: rental")
        self.commit("the MX moves to the rental")
        fault.at("mx", self)
        self.wait("MX move", lambda b: (b.get("dns") or {}).get("mx") == "rental")
        self.timeline.mark("MX names the rental")
        self.edit("  state: active", "  state: retired") if "  state: active" in (
            self.state / "mailrec.yaml").read_text() else self.edit(
            "  log_file:", "  state: retired\n  log_file:")
        self.commit("retire onprem")
        fault.at("retire", self)
        self.wait("retire", lambda b: b["summary"]["in_sync"])
        self.timeline.mark("onprem retired, SPF without it: in sync")

    def settle(self) -> None:
        """Load stops (after config.messages); queues and retries drain."""
        self.stop_load.set()
        for thread in self._threads:
            thread.join(timeout=self.config.settle_timeout)
        self.timeline.mark(f"load stopped after {self.sent_count} messages")
        self.sender.flush(self.config.settle_timeout)
        deadline = time.monotonic() + self.config.settle_timeout
        while time.monotonic() < deadline:
            if not self.queued():
                break
            time.sleep(1)
        self.read_mail()
        self.timeline.mark("queues empty" if not self.queued() else "queues NOT empty")

    def client_records(self) -> list[DeliveryRecord]:
        with self._lock:
            return list(self._client_records)

    def queued(self) -> set[str]:
        dirs = [p.config_dir for p in self.t.postfixes.values()]
        return queued_ids(*dirs)

    # --- the count ---------------------------------------------------------------------------
    def count(self) -> LedgerRow:
        for record in [*self.sender.records(), *self._client_records]:
            self.outcome(record)
        for message in self.receiver.messages():
            if message.dsn is not None:
                self.ledger.dsn(message.dsn.original_id, message.dsn.summary)
            elif message.e2e_id and not message.e2e_id.startswith(f"{self.config.fault}-relay"):
                self.ledger.spf(message.e2e_id, message.spf)
        stores: list[Any] = []
        for user in self.t.users:
            home = self.t.maildir(user).parent
            stores.append(MailStore.of(f"onprem:{user}", user, home))
            if self.t.rental_maildir(user).exists():
                stores.append(MailStore.of(f"rental:{user}", user, self.t.rental_maildir(user)))
            client = self.dir / "clients" / user
            if client.exists():
                stores.append(MailStore.of(f"client:{user}", user, client))
        stores.append(MemoryStore("internet", [m.raw for m in self.receiver.messages()
                                                if m.dsn is None]))
        scan = scan_stores(stores)
        return self.ledger.result(scan, self.queued())

    def outcome(self, record: DeliveryRecord) -> None:
        status = record.status
        if record.deferrals:
            self.ledger.deferred(record.id)
        if status in ("accepted", "deferred-then-accepted"):
            self.ledger.accepted(record.id)
        elif status in ("bounced", "partially-bounced"):
            reply = record.bounced[0][1] if record.bounced else record.last_reply
            self.ledger.bounced(record.id, reply.code if reply else 550,
                                reply.text if reply else "")
        elif status == "gave-up":
            self.ledger.gave_up(record.id)

    # --- the whole run ---------------------------------------------------------------------
    def run(self, fault: Any) -> LedgerRow:
        try:
            self.setup()
            self.start_background()
            fault.arm(self)
            self.run_story(fault)
            self.settle()
            row = self.count()
            self.timeline.mark("counted")
            return row
        finally:
            self.stop_load.set()
            self.aborted.set()
            for thread in self._threads:
                thread.join(timeout=60)
            fault.disarm(self)
            self.stop_daemon()
            with contextlib.suppress(Exception):
                self.sender.stop()
            with contextlib.suppress(Exception):
                self.receiver.stop()
            if self.topology is not None:
                self.topology.stop()
            if os.environ.get("MAILREC_KEEP_SERVICE_DIRS") != "1":
                shutil.rmtree(self.dir / "home", ignore_errors=True)
