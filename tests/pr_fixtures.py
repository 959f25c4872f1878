"""The PR review fixtures: a lab brought to a stage of the migration by real `mailrec apply`
runs, the base state of that stage, and the heads a PR would commit on top of it.

`python -m tests.pr_fixtures` regenerates tests/fixtures/pr/world-<stage>.json (the
snapshots `plan --world` reads) and tests/fixtures/pr/expected/<scenario>.md (the review
Markdown the tests expect); the tests also rebuild each stage live, to compare the offline
review with the live one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "pr"
BASE_STATE = FIXTURES / "state"  # production-like: rfc2136 + TSIG, RTX over SSH, manual rental
NOW = "2026-12-01T09:00:00+00:00"
USERS = ["suga", "tanaka", "sato", "suzuki", "takahashi", "watanabe", "ito", "yamamoto"]

# Which users receive at the rental at each stage (everyone else onprem, all send onprem).
STAGES: dict[str, list[str]] = {
    "mid": ["suga", "tanaka", "sato"],
    "inbound-done": USERS,
}


def set_user(state: Path, name: str, inbound: str | None = None,
             outbound: str | None = None) -> None:
    path = state / "users.yaml"
    text = path.read_text()
    pattern = re.compile(rf"^(\s*{name}:\s*){{inbound: (\w+), outbound: (\w+)}}", re.M)
    match = pattern.search(text)
    assert match, f"{name} not in {path}"
    new = (f"{match.group(1)}{{inbound: {inbound or match.group(2)}, "
           f"outbound: {outbound or match.group(3)}}}")
    path.write_text(text[: match.start()] + new + text[match.end():])


def add_user(state: Path, name: str, inbound: str, outbound: str) -> None:
    path = state / "users.yaml"
    path.write_text(path.read_text().rstrip("\n")
                    + f"\n  {name}: {{inbound: {inbound}, outbound: {outbound}}}\n")


def set_mx(state: Path, side: str) -> None:
    path = state / "mailrec.yaml"
    path.write_text(re.sub(r"^(  mx: )\w+", rf"\g<1>{side}", path.read_text(), count=1,
                           flags=re.M))


def stage_state(state: Path, stage: str) -> None:
    """The base state of `stage`: the fixture state with the stage's users moved."""
    for name in STAGES[stage]:
        set_user(state, name, inbound="rental")


@dataclass(frozen=True)
class Scenario:
    stage: str
    edit: Callable[[Path], None]  # the head's commit, on top of the stage's base state
    exit_code: int
    what: str


SCENARIOS: dict[str, Scenario] = {
    "added-user": Scenario(
        "mid", lambda s: add_user(s, "kondo", "rental", "onprem"), 2,
        "a new colleague who receives at the rental from day one"),
    "unsafe-outbound": Scenario(
        "mid", lambda s: set_user(s, "suga", outbound="rental"), 3,
        "suga sends via the rental while colleagues still receive onprem (MR002)"),
    "mx-move": Scenario(
        "inbound-done", lambda s: set_mx(s, "rental"), 2,
        "the MX moves to the rental once everyone receives there (TTL first, MR004)"),
    "comment-only": Scenario(
        "mid", lambda s: (s / "users.yaml").write_text(
            (s / "users.yaml").read_text() + "# reviewed by the helpdesk\n"), 0,
        "a commit that changes nothing mailrec does"),
}


def mailrec(*args: str, lab: Path | None, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILREC_")}
    run_env.update({"NO_COLOR": "1", "MAILREC_NOW": NOW, "COLUMNS": "200"})
    if "MAILREC_HOME" in os.environ:
        run_env["MAILREC_HOME"] = os.environ["MAILREC_HOME"]
    if lab is not None:
        run_env["MAILREC_LAB"] = str(lab)
    run_env.update(env or {})
    result = subprocess.run([sys.executable, "-m", "reconciler", *args], env=run_env,
                            text=True, capture_output=True, check=False, cwd=ROOT)
    if check and result.returncode not in (0, 2):
        raise AssertionError(f"mailrec {' '.join(args)} -> {result.returncode}\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def build_stage(root: Path, stage: str) -> Path:
    """A lab at `stage`, reached by real applies: returns the lab directory (its state/ is
    the stage's base state)."""
    lab = root / "lab"
    if lab.exists():
        shutil.rmtree(lab)
    mailrec("lab", "init", str(lab), "--state", str(BASE_STATE), lab=None)
    state = lab / "state"
    mailrec("apply", "--yes", lab=lab)  # the router policy route and SPF
    moved: list[str] = []
    for name in STAGES[stage]:
        set_user(state, name, inbound="rental")
        moved.append(name)
        if len(moved) % 2 == 0 or name == STAGES[stage][-1]:
            for _ in range(3):  # mailbox, probe and recipient map, then the route
                mailrec("apply", "--yes", lab=lab)
    return lab


def snapshot_of(lab: Path) -> dict[str, object]:
    status = json.loads(mailrec("status", "--format", "json", lab=lab, check=False).stdout)
    world: dict[str, object] = status["world"]
    return world


def git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "Reviewer Test", "GIT_AUTHOR_EMAIL": "review@example.net",
           "GIT_COMMITTER_NAME": "Reviewer Test", "GIT_COMMITTER_EMAIL": "review@example.net",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(repo)}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, text=True,
                          capture_output=True).stdout


def pr_repo(root: Path, scenario: str) -> Path:
    """A config repo with the stage's base state committed, then the scenario's head."""
    repo = root / "config"
    if repo.exists():
        shutil.rmtree(repo)
    shutil.copytree(BASE_STATE, repo / "state")
    git(repo, "init", "-q", "-b", "main")
    stage_state(repo / "state", SCENARIOS[scenario].stage)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    SCENARIOS[scenario].edit(repo / "state")
    git(repo, "commit", "-q", "-am", scenario)
    return repo


def normalise(text: str) -> str:
    """What differs between runs of the same review: the snapshot's age."""
    return re.sub(r"\d+ h \d+ min ago", "(age) ago", text)


def review(repo: Path, *extra: str, lab: Path | None = None,
           world: Path | None = None, fmt: str = "markdown"
           ) -> subprocess.CompletedProcess[str]:
    args = ["plan", "--state", str(repo / "state"), "--git-base", "HEAD~1", "--git-head",
            "HEAD", "--format", fmt, *extra]
    if world is not None:
        args += ["--world", str(world)]
    # No secret of the state resolves here (RTX_LOGIN, RTX_ADMIN, the TSIG file): as on a
    # PR's CI runner.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTX_", "MAILREC_"))}
    env.update({"NO_COLOR": "1", "COLUMNS": "200"})
    if lab is not None:
        env.update({"MAILREC_LAB": str(lab), "MAILREC_NOW": NOW})
    if "MAILREC_HOME" in os.environ:
        env["MAILREC_HOME"] = os.environ["MAILREC_HOME"]
    return subprocess.run([sys.executable, "-m", "reconciler", *args], env=env, text=True,
                          capture_output=True, check=False, cwd=repo)


def expected_markdown(root: Path, scenario: str) -> tuple[str, int]:
    repo = pr_repo(root, scenario)
    world = FIXTURES / f"world-{SCENARIOS[scenario].stage}.json"
    result = review(repo, world=world)
    return normalise(result.stdout), result.returncode


def main() -> int:
    import tempfile

    for stage in STAGES:
        with tempfile.TemporaryDirectory() as tmp:
            lab = build_stage(Path(tmp), stage)
            world = snapshot_of(lab)
            mailrec("lab", "down", str(lab), lab=None, check=False)
        out = FIXTURES / f"world-{stage}.json"
        out.write_text(json.dumps(world, indent=1, sort_keys=True) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")
    (FIXTURES / "expected").mkdir(exist_ok=True)
    for name in SCENARIOS:
        with tempfile.TemporaryDirectory() as tmp:
            text, code = expected_markdown(Path(tmp), name)
        path = FIXTURES / "expected" / f"{name}.md"
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)} (exit {code})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
