#!/usr/bin/env python3
"""Regenerate docs/images/board.png: the migration board of a lab in mid-migration, as a
real browser shows it.

A lab of the example company (state/) in a temporary directory; four users moved to the
rental (two of them still hold mail in their old onprem mailbox, so removing it waits for
them: MR008); one daemon round serves the board on a free loopback port; Debian's Chromium,
driven by Playwright, takes a full-page screenshot. Needs `apt-get install chromium` and
`pip install playwright` (never `playwright install`: it would download another browser).

    .venv/bin/python scripts/board_screenshot.py [--out docs/images/board.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from reconciler.daemon import Daemon  # noqa: E402
from reconciler.lab.init import init_lab  # noqa: E402
from reconciler.load import load_state  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MOVED = ("suga", "tanaka", "suzuki", "sato")


def move_users(users_yaml: Path, names: tuple[str, ...]) -> None:
    lines = []
    for line in users_yaml.read_text().splitlines():
        name = line.strip().split(":", 1)[0]
        if name in names and "{" in line:
            line = line.replace("inbound: onprem", "inbound: rental")
        lines.append(line)
    users_yaml.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "board.png")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    os.environ.pop("MAILREC_NOW", None)  # the real clock: observed and finished times agree
    os.environ.pop("MAILREC_LAB", None)
    with tempfile.TemporaryDirectory(prefix="mailrec-board-") as tmp:
        os.environ["MAILREC_HOME"] = tmp
        lab = init_lab(Path(tmp) / "lab", load_state(REPO / "state"), migrated=False,
                       force=False)
        move_users(lab.root / "state" / "users.yaml", MOVED)
        daemon = Daemon(repo=None, branch="main", subpath=str(lab.root / "state"),
                        interval=3600, lab=lab, metrics_port=0, allow_bulk=True)
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while not daemon.board.snapshot().get("summary"):
                if time.monotonic() > deadline or not thread.is_alive():
                    print("the daemon's first round did not publish a board", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            host, port = daemon.board.address
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                                     args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": args.width, "height": 800})
                    page.goto(f"http://{host}:{port}/", wait_until="load")
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(args.out), full_page=True)
                finally:
                    browser.close()
        finally:
            daemon.stop.set()
            thread.join(timeout=30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
