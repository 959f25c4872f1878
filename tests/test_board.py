"""The migration board (`reconciler/board.py`, `reconciler/board_server.py`): built from plans
the real planner makes over hand-built worlds, it says per user where mail goes today, what
the next step waits for and from when it can run (following "step" gates to a time); it
escapes every value, never shows a secret reference, stays one pass at thousands of users;
the server answers 404/405, still serves /metrics, and the daemon publishes each round's
board (keeping the last one, with the error, when a round makes no plan)."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, ClassVar

import pytest
from prometheus_client import CollectorRegistry, Counter

from reconciler.board import DaemonFacts, board_data, render_board_html, with_daemon
from reconciler.board_server import BoardFeed, BoardServer, RoundOutcome
from reconciler.context import Context
from reconciler.daemon import Daemon
from reconciler.diff import diff
from reconciler.findings import Gate
from reconciler.lab.layout import LabLayout
from reconciler.load import load_state
from reconciler.model import DesiredState, Side
from reconciler.plan import Plan, make_plan
from reconciler.snapshot import parse_snapshot
from reconciler.steps import Action, Rank
from reconciler.steps.users import UserStep
from reconciler.target import target_dir
from reconciler.world import DnsFacts, History, Outbound, RentalFacts, World
from tests.conftest import set_users
from tests.test_daemon import (  # noqa: F401 (fixtures)
    ConfigRepo,
    config_repo,
    daemon_lab,
    make_daemon,
    wait_until,
)
from tests.test_render import (
    MOVED_USER,
    NOW,
    ONPREM_IP,
    ONPREM_USER,
    RENTAL_SPF,
    make_state,
    make_world,
    mx_time_gated_plan,
    plan_for,
)

HOSTILE = "<script>alert(1)</script>"
SENDING = replace(MOVED_USER, outbound=Outbound.RELAY)


def board_of(state: DesiredState, world: World, plan: Plan | None = None,
             **daemon: Any) -> dict[str, Any]:
    return board_data(plan or plan_for(state, world), world, state, commit="0123456789ab",
                      daemon=DaemonFacts(version="test", **daemon))


def user(data: dict[str, Any], name: str) -> dict[str, Any]:
    [row] = [r for r in data["users"] if r["name"] == name]
    return row


def domain_step(data: dict[str, Any], step_id: str) -> dict[str, Any]:
    [row] = [r for r in data["domain_steps"] if r["id"] == step_id]
    return row


def html_row(page: str, element_id: str) -> str:
    start = page.index(f'<tr id="{element_id}"')
    return page[start:page.index("</tr>", start)]


# --- per user --------------------------------------------------------------------------------


def test_a_user_waiting_to_drain_shows_the_gate_and_that_no_time_is_known() -> None:
    state = make_state({"suga": ("rental", "onprem"), "tanaka": ("onprem", "onprem")})
    world = make_world({"suga": replace(MOVED_USER, onprem_account=True, onprem_messages=3),
                        "tanaka": ONPREM_USER})
    data = board_of(state, world)

    suga = user(data, "suga")
    assert (suga["inbound"], suga["desired_inbound"]) == ("rental", "rental")
    assert (suga["outbound"], suga["onprem_messages"], suga["status"]) == ("onprem", 3, "gated")
    step = suga["next"]
    assert step["id"] == "onprem-mailbox/suga" and step["status"] == "gated"
    assert step["reasons"][0].startswith("MR008: the onprem mailbox of suga still holds 3")
    assert step["earliest"] is None and step["waits_for"] == "an observation"
    tanaka = user(data, "tanaka")
    assert tanaka["status"] == "done" and tanaka["next"] is None
    assert data["summary"] | {"steps": None} == {
        "users": 2, "done": 1, "moving": 0, "gated": 1, "refused": 0, "inbound_rental": 1,
        "outbound_rental": 0, "outbound_unknown": 0, "steps": None, "in_sync": False}

    row = html_row(render_board_html(data), "user-suga")
    assert 'data-status="gated"' in row
    assert "MR008: the onprem mailbox of suga still holds 3 message(s)" in row
    assert "no time known" in row and "waits for an observation" in row


def test_a_user_waiting_for_a_person_says_so() -> None:
    state = make_state({"suga": ("rental", "rental"), "tanaka": ("rental", "rental")},
                       router=True)
    world = make_world({"suga": MOVED_USER, "tanaka": SENDING}, router=True)
    suga = user(board_of(state, world), "suga")
    assert suga["status"] == "gated" and suga["next"]["id"] == "outbound/suga"
    assert suga["next"]["waits_for"] == "a person (an ack)"
    assert "mailrec ack outbound/suga" in suga["next"]["reasons"][0]
    assert user(board_of(state, world), "tanaka")["status"] == "done"


def test_a_refused_step_shows_its_mr_code() -> None:
    """suga is to send via the rental while tanaka still receives onprem (MR002)."""
    state = make_state({"suga": ("rental", "rental"), "tanaka": ("onprem", "onprem")})
    world = make_world({"suga": MOVED_USER, "tanaka": ONPREM_USER})
    data = board_of(state, world)
    suga = user(data, "suga")
    assert suga["status"] == "refused" and suga["next"]["id"] == "outbound/suga"
    assert any(reason.startswith("MR002:") for reason in suga["next"]["reasons"])
    assert suga["next"]["earliest"] is None and suga["next"]["waits_for"].startswith("refused")
    assert data["summary"]["refused"] == 1
    assert "MR002:" in html_row(render_board_html(data), "user-suga")


# A user step that waits for a time or for another step: no step of mailrec's own gates a
# single user on a time today (their gates wait for a person or an observation), so these
# stand for one that would, planned by the real planner beside the real steps.
@dataclass(frozen=True)
class UserWaits(UserStep):
    until: str | None = None
    after: str | None = None
    kind: ClassVar[str] = "wait"
    action: ClassVar[Action] = Action.UPDATE

    @property
    def rank(self) -> Rank:
        return Rank.CLEANUP

    def simulate(self, world: World) -> World:
        return world

    def gate(self, world: World, ctx: Context) -> Gate | None:
        if self.after is not None:
            return Gate("step", f"waits for {self.after}", code="MR004", after=self.after)
        return Gate("time", f"not before {self.until}", code="MR010", until=self.until)

    def describe(self) -> str:
        return f"wait for {self.user}"


def mx_gated() -> tuple[DesiredState, World]:
    """Everyone at the rental, the TTL lowered ten minutes ago: dns/mx waits (MR004)."""
    state = make_state({"suga": ("rental", "onprem"), "tanaka": ("rental", "onprem")},
                       mx="rental")
    world = make_world(
        {"suga": MOVED_USER, "tanaka": MOVED_USER},
        dns=DnsFacts(mx=Side.ONPREM, mx_hosts=("mail.example.co.jp.",), mx_ttl=300,
                     spf_terms=("v=spf1", ONPREM_IP, RENTAL_SPF, "~all")),
        history=History(mx_ttl_lowered_at=NOW - timedelta(minutes=10), mx_old_ttl=3600),
    )
    return state, world


def plan_with(state: DesiredState, world: World, *extra: UserStep) -> Plan:
    ctx = Context.of(state)
    return make_plan(state, world, [*diff(state, world, ctx), *extra], ctx, source="test")


def test_a_time_gated_user_shows_its_reason_and_earliest_time() -> None:
    state, world = mx_gated()
    until = (NOW + timedelta(hours=3)).isoformat()
    plan = plan_with(state, world, UserWaits("suga", until=until))
    data = board_of(state, world, plan)
    step = user(data, "suga")["next"]
    assert step["id"] == "wait/suga" and step["status"] == "gated"
    assert step["reasons"] == [f"MR010: not before {until}"]
    assert (step["earliest"], step["waits_for"]) == (until, "a time")
    row = html_row(render_board_html(data), "user-suga")
    assert f"MR010: not before {until}" in row and "2026-11-29 12:00:00 UTC" in row


def test_a_step_gate_is_followed_to_the_time_gate_it_waits_for() -> None:
    state, world = mx_gated()
    plan = plan_with(state, world, UserWaits("tanaka", after="dns/mx"))
    data = board_of(state, world, plan)
    mx = domain_step(data, "dns/mx")
    expected = (NOW + timedelta(minutes=50)).isoformat()
    assert mx["earliest"] == expected and mx["reasons"][0].startswith("MR004:")
    step = user(data, "tanaka")["next"]
    assert step["reasons"] == ["MR004: waits for dns/mx"]
    assert (step["earliest"], step["via"]) == (expected, ["dns/mx"])
    row = html_row(render_board_html(data), "user-tanaka")
    assert "2026-11-29 09:50:00 UTC" in row and "via dns/mx" in row
    assert "2026-11-29 09:50:00 UTC" in html_row(render_board_html(data), "step-dns/mx")


def test_the_spf_retirement_waits_for_the_retirement_of_onprem_and_its_time() -> None:
    """A real chain: dns/spf-retire is gated on the step onprem/retire (MR006), which waits
    for the quiet period after the MX moved (MR010, a time)."""
    state = make_state({"suga": ("rental", "rental"), "tanaka": ("rental", "rental")},
                       mx="rental", router=True)
    state = state.model_copy(update={
        "onprem": state.onprem.model_copy(update={"state": "retired"})})
    world = make_world(
        {"suga": SENDING, "tanaka": SENDING}, router=True, mx=Side.RENTAL,
        dns=DnsFacts(mx=Side.RENTAL, mx_hosts=("example.sakura.ne.jp.",), mx_ttl=3600,
                     spf_terms=("v=spf1", ONPREM_IP, RENTAL_SPF, "ip4:203.0.113.9", "~all")),
        history=History(mx_ttl_lowered_at=NOW - timedelta(hours=5),
                        mx_moved_at=NOW - timedelta(minutes=10), mx_old_ttl=3600),
    )
    data = board_of(state, world)
    retire = domain_step(data, "onprem/retire")
    spf = domain_step(data, "dns/spf-retire")
    quiet_over = (NOW - timedelta(minutes=10) + timedelta(hours=48)).isoformat()
    assert (retire["earliest"], retire["waits_for"]) == (quiet_over, "a time")
    assert spf["reasons"][0].startswith("MR006:")
    assert (spf["earliest"], spf["via"]) == (quiet_over, ["onprem/retire"])
    assert all(row["status"] == "done" for row in data["users"])


# --- what the page must never do -------------------------------------------------------------


def test_every_value_is_escaped() -> None:
    state = make_state({"suga": ("onprem", "onprem")})
    world = make_world({"suga": ONPREM_USER, f"x{HOSTILE}": ONPREM_USER},
                       rental=RentalFacts(domain_accepted=True, notes=(HOSTILE,)))
    data = board_of(state, world, last_error=f"boom {HOSTILE}",
                    last_error_at=NOW.isoformat(), round_result="error")
    assert HOSTILE in data["unverified"]  # the data keeps the text as it is
    page = render_board_html(data)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # the note, the account (its row, its id, the MR015 finding), the error
    assert page.count("&lt;script&gt;") == 5
    assert 'id="user-x&lt;script&gt;' in page  # an attribute too
    json.loads(json.dumps(data))  # plain JSON


def test_no_secret_reference_is_shown() -> None:
    state = make_state({"suga": ("rental", "onprem")}, router=True)
    state = state.model_copy(update={
        "dns": DesiredState.model_validate({**state.model_dump(mode="json"), "dns": {
            "provider": "rfc2136", "server": "198.51.100.53:53", "mx": "onprem",
            "tsig": {"name": "mailrec.", "secret": "env:TSIG_SOMETHING"}}}).dns,
        "router": state.router.model_copy(update={  # type: ignore[union-attr]
            "password": "env:RTX_SOMETHING", "admin_password": "file:/etc/mailrec/rtx"}),
    })
    refs = ("env:TSIG_SOMETHING", "env:RTX_SOMETHING", "file:/etc/mailrec/rtx")
    # A provider's note that quotes one (free text the board does not control) is masked.
    world = make_world({"suga": replace(ONPREM_USER, onprem_messages=2)}, router=True,
                       rental=RentalFacts(domain_accepted=True,
                                          notes=("login with env:RTX_SOMETHING failed",)))
    data = board_of(state, world, last_error="secret env:TSIG_SOMETHING unresolved")
    page = render_board_html(data)
    text = json.dumps(data)
    for ref in refs:
        assert ref not in page and ref not in text
    assert "login with [secret reference] failed" in data["unverified"]
    assert "env:" not in page and "env:" not in text


def test_the_page_is_self_contained_and_read_only() -> None:
    state, world = mx_gated()
    page = render_board_html(board_of(state, world, mx_time_gated_plan()))
    lowered = page.lower()
    for forbidden in ("<script", "<form", "<button", "<input", "<link", "<img", "src=",
                      "http://", "https://", "javascript:"):
        assert forbidden not in lowered, forbidden
    assert '<meta http-equiv="refresh" content="30">' in page


def test_a_round_without_a_plan_keeps_the_last_board_and_shows_the_error() -> None:
    state, world = mx_gated()
    feed = BoardFeed("test", "branch main")
    first = feed.finished("ok", NOW, None)
    assert first["summary"] is None and first["daemon"]["last_round"]["result"] == "ok"
    good = feed.finished("ok", NOW, RoundOutcome(plan_for(state, world), world, state, "abc"))
    feed.error("invalid state, nothing applied: users.yaml:3: bad", NOW + timedelta(minutes=1))
    bad = feed.finished("invalid", NOW + timedelta(minutes=1), None)
    assert bad["users"] == good["users"] and bad["round"]["commit"] == "abc"
    assert bad["daemon"]["last_round"] == {"result": "invalid", "succeeded": False,
                                           "finished_at": (NOW + timedelta(minutes=1)).isoformat()}
    assert "users.yaml:3" in bad["daemon"]["last_error"]["message"]
    page = render_board_html(bad)
    assert "Last round did not succeed" in page and "users.yaml:3: bad" in page
    later = feed.finished("ok", NOW + timedelta(minutes=2),
                          RoundOutcome(plan_for(state, world), world, state, "def"))
    # The error stays, with its time, after a round that succeeds; the page says it did.
    assert later["daemon"]["last_error"]["at"] == (NOW + timedelta(minutes=1)).isoformat()
    assert later["daemon"]["last_round"]["succeeded"] is True
    assert with_daemon(later, DaemonFacts())["users"] == later["users"]


def test_thousands_of_users_are_one_pass() -> None:
    """3,000 users, a third moved with mail left in the old mailbox: the board counts them
    and lists every user once (no per-user planning or rendering cost is asserted here)."""
    names = [f"user{i:05d}" for i in range(3000)]
    moved = set(names[::3])
    state = make_state({n: ("rental" if n in moved else "onprem", "onprem") for n in names})
    drained = replace(MOVED_USER, onprem_account=True, onprem_messages=1)
    world = make_world({n: drained if n in moved else ONPREM_USER for n in names})
    data = board_of(state, world)
    assert data["summary"]["users"] == 3000
    assert data["summary"]["gated"] == len(moved) and data["summary"]["done"] == 2000
    page = render_board_html(data)
    assert page.count('<tr id="user-') == 3000


# --- the server --------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[BoardServer]:
    registry = CollectorRegistry()
    Counter("mailrec_test_total", "A counter", registry=registry).inc()
    board = BoardServer(registry)
    board.start(0)  # any free loopback port
    try:
        yield board
    finally:
        board.stop()


def request(board: BoardServer, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    host, port = board.address
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_the_server_serves_the_board_json_and_metrics(server: BoardServer) -> None:
    assert server.address[0] == "127.0.0.1"
    state, world = mx_gated()
    data = board_of(state, world)
    server.publish(data)
    for path in ("/", "/board", "/?refresh=1"):
        status, headers, body = request(server, "GET", path)
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert body.decode() == render_board_html(data)
        assert headers["content-security-policy"] == (
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:")
        assert headers["x-content-type-options"] == "nosniff"
    status, headers, body = request(server, "GET", "/board.json")
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert json.loads(body) == json.loads(json.dumps(data))
    status, headers, body = request(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    assert b"mailrec_test_total 1.0" in body
    status, headers, body = request(server, "HEAD", "/board.json")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_the_server_answers_404_and_405(server: BoardServer) -> None:
    for path in ("/nope", "/board.html", "/metrics/x", "/../etc/passwd"):
        status, _, _ = request(server, "GET", path)
        assert status == 404, path
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "FOO"):
        status, headers, _ = request(server, method, "/")
        assert status == 405, method
        assert headers["allow"] == "GET, HEAD"


# --- the daemon ----------------------------------------------------------------------------


def get_json(daemon: Daemon, path: str = "/board.json") -> dict[str, Any]:
    status, _, body = request(daemon.board, "GET", path)
    assert status == 200
    result: dict[str, Any] = json.loads(body)
    return result


def test_the_daemon_serves_the_board_of_its_last_round(
        config_repo: ConfigRepo, daemon_lab: LabLayout) -> None:  # noqa: F811
    set_users(config_repo.state_dir, suga=("rental", "onprem"))
    config_repo.push("Move suga's inbound mail to the rental")
    daemon = make_daemon(config_repo, daemon_lab, interval=0.2)
    daemon.metrics_port = 0  # any free loopback port
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: bool(daemon.board.snapshot().get("summary")), "the first board")
        data = get_json(daemon)
        assert data["round"]["commit"] == config_repo.head[:12]
        suga = user(data, "suga")
        assert (suga["inbound"], suga["status"]) == ("rental", "gated")
        assert suga["next"]["reasons"][0].startswith("MR008:")
        assert data["daemon"]["last_round"]["result"] == "ok"
        assert any(s.startswith("onprem: lab files") for s in data["systems"])
        status, _, metrics = request(daemon.board, "GET", "/metrics")
        assert status == 200 and b'mailrec_reconcile_total{result="ok"}' in metrics
        # The round's observation for PR jobs: served, and written to the target directory.
        status, _, world = request(daemon.board, "GET", "/world.json")
        assert status == 200
        snapshot = parse_snapshot(json.loads(world), "/world.json")
        assert snapshot.source == "mailrec daemon"
        assert "suga" in snapshot.parts.postfix.transport
        written = target_dir(load_state(config_repo.state_dir).state, daemon_lab) / "world.json"
        assert parse_snapshot(json.loads(written.read_text()), str(written)) == snapshot

        # An invalid commit: the board stays the last good round's, with the error.
        users_yaml = config_repo.state_dir / "users.yaml"
        users_yaml.write_text(users_yaml.read_text().replace("inbound: rental", "inbound: x"))
        config_repo.push("A broken edit")
        wait_until(lambda: get_json(daemon)["daemon"]["last_round"]["result"] == "invalid",
                   "the invalid round")
        broken = get_json(daemon)
        assert broken["round"]["commit"] == data["round"]["commit"]
        assert user(broken, "suga") == suga
        assert "invalid state" in broken["daemon"]["last_error"]["message"]
        status, _, page = request(daemon.board, "GET", "/")
        assert b"Last round did not succeed" in page and b"invalid state" in page
    finally:
        daemon.stop.set()
        thread.join(timeout=30)
    assert not daemon.board.serving  # the port is closed when the daemon stops


def test_world_json_is_503_until_a_round_observed(server: BoardServer) -> None:
    status, _, body = request(server, "GET", "/world.json")
    assert status == 503 and b"no round" in body
    server.publish_world('{"kind": "mailrec-world"}')
    assert request(server, "GET", "/world.json")[0] == 200


def test_daemon_help_documents_the_address_and_the_board() -> None:
    from tests.conftest import run_cli

    text = run_cli("daemon", "--help").output
    assert "--metrics-address" in text and "127.0.0.1" in text
    assert "/board.json" in text and "reverse proxy" in text
