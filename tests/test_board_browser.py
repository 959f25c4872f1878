"""The migration board in a real browser: Debian's Chromium (`/usr/bin/chromium`), driven by
Playwright, opens the page a daemon serves after a real round on a lab in mid-migration, and
shows a gated user's reason and the MX's earliest time; the inline style applies under the
page's Content-Security-Policy, and the row is drawn (its screenshot is not blank).

Under `CI=true` a missing Chromium or Playwright fails the test (CI installs both:
scripts/install-services.sh, the dev extras); elsewhere it is skipped with the reason. The
browser is never downloaded (`playwright install` is not used)."""

from __future__ import annotations

import importlib.util
import struct
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.daemon import Daemon
from reconciler.lab.layout import LabLayout
from tests.conftest import in_ci, set_users
from tests.test_daemon import daemon_lab, make_daemon, wait_until  # noqa: F401 (fixtures)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
USERS = ("suga", "tanaka", "sato", "suzuki", "takahashi", "watanabe", "ito", "yamamoto")


def require_browser() -> None:
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if not missing:
        return
    reason = "no browser to test the board in: missing " + " and ".join(missing)
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the browser test must run)", pytrace=False)
    pytest.skip(reason)


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB or RGBA PNG, as Chromium writes
    them: the chunks, zlib, and the five row filters of the PNG specification."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), f"PNG depth {depth} colour {colour}"
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, rows


def move_everyone(lab: LabLayout) -> None:
    """Every user's inbound to the rental and the MX with them: one round moves them all
    (with --allow-bulk) and lowers the MX TTL; the MX then waits an hour (MR004), and
    the users whose old mailbox still holds mail wait for them to drain it (MR008)."""
    state = lab.root / "state"
    set_users(state, **dict.fromkeys(USERS, ("rental", "onprem")))
    config = state / "mailrec.yaml"
    config.write_text(config.read_text().replace("  mx: onprem", "  mx: rental", 1))


@pytest.fixture
def serving(daemon_lab: LabLayout) -> Iterator[Daemon]:  # noqa: F811
    require_browser()
    move_everyone(daemon_lab)
    daemon = make_daemon(None, daemon_lab, interval=3600)
    daemon.allow_bulk = True
    daemon.metrics_port = 0  # any free loopback port
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: bool(daemon.board.snapshot().get("summary")), "the first board",
                   timeout=60)
        yield daemon
    finally:
        daemon.stop.set()
        thread.join(timeout=30)


def test_the_board_in_chromium(serving: Daemon, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    data = serving.board.snapshot()
    gated = [row for row in data["users"] if row["status"] == "gated"]
    assert gated, data["users"]
    name = gated[0]["name"]
    messages = gated[0]["onprem_messages"]
    host, port = serving.board.address
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda message: problems.append(message.text))
            page.on("pageerror", lambda error: problems.append(str(error)))
            response = page.goto(f"http://{host}:{port}/", wait_until="load")
            assert response is not None and response.status == 200
            assert page.title() == "mailrec migration board: example.co.jp"

            row = page.locator(f"#user-{name}")
            assert row.get_attribute("data-status") == "gated"
            reason = row.locator("td.reason").inner_text()
            assert f"MR008: the onprem mailbox of {name} still holds {messages} message(s)" \
                in reason
            assert "waiting for the user to drain it" in reason
            earliest = row.locator("td.earliest").inner_text()
            assert "no time known" in earliest and "waits for an observation" in earliest

            mx = page.locator("[id='step-dns/mx']")
            assert "MR004" in mx.locator("td").nth(3).inner_text()
            assert "2026-11-29 10:00:00 UTC" in mx.locator("td.earliest").inner_text()

            # The inline style applies under the Content-Security-Policy.
            background = page.eval_on_selector(
                "header", "e => getComputedStyle(e).backgroundColor")
            assert background == "rgb(31, 58, 95)"

            shot = row.screenshot()
            (tmp_path / "row.png").write_bytes(shot)
        finally:
            browser.close()
    assert not problems, problems  # no CSP violation, no script error

    width, height, rows = png_pixels(shot)
    assert width > 600 and height > 20
    colours: set[bytes] = set()
    dark = 0
    for line in rows:
        step = len(line) // width
        for x in range(0, len(line), step):
            pixel = line[x:x + 3]
            colours.add(pixel)
            dark += max(pixel) < 128
    assert len(colours) > 20, "the row's screenshot is blank"
    assert dark > 100, "no text drawn in the row"


def test_png_reader_reads_a_known_image() -> None:
    """The reader above, on a 2x2 RGB image written with filters 0 and 1."""
    pixels = [b"\x00" + bytes([255, 0, 0, 0, 255, 0]),
              b"\x01" + bytes([0, 0, 255, 255, 255, 0])]  # sub: second pixel = first + (255,255,0)
    body = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", body)
           + chunk(b"IDAT", zlib.compress(b"".join(pixels))) + chunk(b"IEND", b""))
    assert png_pixels(png) == (2, 2, [bytes([255, 0, 0, 0, 255, 0]),
                                      bytes([0, 0, 255, 255, 255, 255])])


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception),
                                              ("", pytest.skip.Exception)])
def test_a_missing_browser_fails_under_ci_and_skips_elsewhere(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ci: str,
        outcome: type[BaseException]) -> None:
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no browser to test the board in"):
        require_browser()
