"""The daemon's one HTTP port: `/metrics` (Prometheus), `/` and `/board` (the migration board
as HTML), `/board.json` (the same data); anything else 404, any method but GET/HEAD 405.

A request never observes, plans or connects to anything: it sends the bytes the last round
published (`publish`), rendered once per round and swapped under a lock, so a page costs the
same at 10 users or 10,000 and a slow client cannot hold up a round. `BoardFeed` is the
daemon's side: it keeps the last round's board and the daemon's own facts (its last error,
how its last round ended) and builds what is published.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from reconciler.board import (
    DaemonFacts,
    board_data,
    board_json,
    render_board_html,
    waiting_board,
    with_daemon,
)
from reconciler.model import DesiredState
from reconciler.plan import Plan
from reconciler.world import World

log = logging.getLogger("mailrec.board")

DEFAULT_ADDRESS = "127.0.0.1"
# The page has no script and loads nothing: the policy allows exactly its inline style.
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
HTML_TYPE = "text/html; charset=utf-8"
JSON_TYPE = "application/json; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"


# The daemon's metrics: what /metrics serves beside the board.
@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.rounds = Counter("mailrec_reconcile_total", "Reconcile rounds", ["result"],
                              registry=self.registry)
        self.steps = Gauge("mailrec_plan_steps", "Steps in the latest plan", ["status"],
                           registry=self.registry)
        self.applied = Counter("mailrec_steps_applied_total", "Steps applied", ["result"],
                               registry=self.registry)
        self.in_sync = Gauge("mailrec_in_sync", "1 when the world equals the desired state",
                             registry=self.registry)
        self.last = Gauge("mailrec_last_reconcile_timestamp_seconds",
                          "When the last round finished", registry=self.registry)


class RoundOutcome(NamedTuple):
    """What a round that produced a plan leaves for the board."""

    plan: Plan  # the final plan, with `systems` saying how each system was read
    world: World  # the world that plan was made against
    state: DesiredState
    commit: str | None  # short commit id (or state digest)
    author: str = ""


class BoardFeed:
    """The board's data between rounds, kept by the daemon's thread only."""

    def __init__(self, version: str, source: str) -> None:
        self.facts = DaemonFacts(version=version, source=source)
        self.data: dict[str, Any] | None = None  # the board of the last round with a plan

    def error(self, message: str, at: datetime) -> None:
        """The daemon's last error: kept, with its time, after later rounds succeed."""
        self.facts = dataclasses.replace(self.facts, last_error=message,
                                         last_error_at=at.isoformat())

    def finished(self, result: str, at: datetime,
                 outcome: RoundOutcome | None) -> dict[str, Any]:
        """A round ended: the board of its plan, or (no plan: an invalid state, an error)
        the previous board with the daemon's new facts."""
        finished_at = at.isoformat()
        self.facts = dataclasses.replace(self.facts, round_result=result,
                                         round_finished_at=finished_at)
        if outcome is not None:
            self.data = board_data(outcome.plan, outcome.world, outcome.state,
                                   commit=outcome.commit, author=outcome.author,
                                   finished_at=finished_at, daemon=self.facts)
            return self.data
        if self.data is None:
            return waiting_board(self.facts)
        return with_daemon(self.data, self.facts)


NOT_FOUND = b"404 not found: see /, /board.json or /world.json\n"


class _Page(NamedTuple):
    html: bytes
    json: bytes


class BoardServer:
    """The HTTP server: the latest published board under a lock, and the metrics registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._page = self._render(waiting_board(DaemonFacts()))
        self._data: Mapping[str, Any] = {}
        self._world: bytes | None = None  # the last round's world snapshot (snapshot.py)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def _render(data: Mapping[str, Any]) -> _Page:
        return _Page(render_board_html(data).encode(), board_json(data).encode())

    def publish(self, data: Mapping[str, Any]) -> None:
        """Make `data` what every later request sees (rendered here, once, not per request)."""
        page = self._render(data)
        with self._lock:
            self._page, self._data = page, data

    def page(self) -> _Page:
        with self._lock:
            return self._page

    def publish_world(self, snapshot_json: str) -> None:
        """The world snapshot `plan --world` reads (no secret in it: see snapshot.py)."""
        with self._lock:
            self._world = snapshot_json.encode()

    def world(self) -> bytes | None:
        with self._lock:
            return self._world

    def snapshot(self) -> Mapping[str, Any]:
        """The data last published (empty before the first)."""
        with self._lock:
            return self._data

    @property
    def serving(self) -> bool:
        return self._httpd is not None

    @property
    def address(self) -> tuple[str, int]:
        assert self._httpd is not None, "not serving"
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self, port: int, address: str = DEFAULT_ADDRESS) -> tuple[str, int]:
        """Listen on address:port (port 0: any free port) in a daemon thread; returns where."""
        if self._httpd is not None:
            return self.address
        server_class = _Server6 if ":" in address else ThreadingHTTPServer
        httpd = server_class((address, port), _handler(self))
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="mailrec-board",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        return self.address

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _handler(board: BoardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        timeout = 30  # seconds a silent client may hold its connection (and thread)

        def version_string(self) -> str:
            return "mailrec"  # no Python version for the curious

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def __getattr__(self, name: str) -> Callable[[], None]:
            # http.server answers 501 to a method it has no do_X for; every method but
            # GET and HEAD is 405 here, whatever its name (POST, PUT, PROPFIND, ...).
            if name.startswith("do_"):
                return self._not_allowed
            raise AttributeError(name)

        def _not_allowed(self) -> None:
            self._send(405, TEXT_TYPE, b"405 method not allowed: this board is read-only\n",
                       body=self.command != "HEAD", extra=(("Allow", "GET, HEAD"),))

        def _serve(self, *, body: bool) -> None:
            path = urlsplit(self.path).path
            if path in ("/", "/board"):
                self._send(200, HTML_TYPE, board.page().html, body=body)
            elif path == "/board.json":
                self._send(200, JSON_TYPE, board.page().json, body=body)
            elif path == "/world.json":
                world = board.world()
                if world is None:
                    self._send(503, TEXT_TYPE, b"503 no round has observed the world yet\n",
                               body=body)
                else:
                    self._send(200, JSON_TYPE, world, body=body)
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(board.registry), body=body)
            else:
                self._send(404, TEXT_TYPE, NOT_FOUND, body=body)

        def _send(self, code: int, content_type: str, payload: bytes, *, body: bool,
                  extra: tuple[tuple[str, str], ...] = ()) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (*SECURITY_HEADERS, *extra):
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            # Not on stderr: the daemon's log has one line per change, not one per scrape.
            log.debug("%s " + format, self.address_string(), *args)

    return Handler
