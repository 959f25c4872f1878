"""The CI files docs/ ships (GitHub Actions, GitLab CI) and the pre-commit hook, run as
written: their fetch-the-world and review commands in a real clone whose origin has the base
branch and the `mailrec-world` branch, without any secret."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests import pr_fixtures as fx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # where `mailrec` is installed (the venv)


def _yaml(path: Path) -> dict[str, object]:
    data: dict[str, object] = YAML(typ="safe").load(path.read_text())
    return data


def _clone_with_origin(tmp: Path, scenario: str) -> Path:
    """origin: main = the stage's base state, mailrec-world = world.json; the clone: a PR
    branch with the scenario's head commit on top of main."""
    source = fx.pr_repo(tmp / "src", scenario)
    origin = tmp / "origin.git"
    fx.git(tmp, "clone", "-q", "--bare", str(source), str(origin))
    fx.git(origin, "update-ref", "refs/heads/main", "HEAD~1")
    world = tmp / "world"
    world.mkdir()
    fx.git(world, "init", "-q", "-b", "mailrec-world")
    shutil.copy(fx.FIXTURES / f"world-{fx.SCENARIOS[scenario].stage}.json",
                world / "world.json")
    fx.git(world, "add", "world.json")
    fx.git(world, "commit", "-q", "-m", "world")
    fx.git(world, "push", "-q", str(origin), "mailrec-world")
    clone = tmp / "clone"
    fx.git(tmp, "clone", "-q", str(origin), str(clone))
    fx.git(clone, "checkout", "-q", "-b", "pr", "origin/main")
    fx.git(clone, "reset", "-q", "--hard", fx.git(source, "rev-parse", "HEAD").strip())
    return clone


def _run(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("MAILREC_", "RTX_"))}  # no secret, as on a PR runner
    base["PATH"] = f"{BIN}:{base.get('PATH', '/usr/bin:/bin')}"
    base.update({"GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.net",
                 "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.net"})
    base.update(env)
    return subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=base, text=True,
                          capture_output=True, check=False)


def test_the_github_workflow_reviews_a_pr_without_secrets(tmp_path: Path) -> None:
    workflow = _yaml(ROOT / "docs" / "ci" / "github-actions.yml")
    text = (ROOT / "docs" / "ci" / "github-actions.yml").read_text()
    assert "secrets." not in text  # only the workflow's own token
    assert workflow["permissions"] == {"contents": "read", "pull-requests": "write"}
    steps = {s.get("name"): s for s in workflow["jobs"]["review"]["steps"]}  # type: ignore[index]
    fetch = steps["Fetch the observed world (published by the daemon; holds no secret)"]["run"]
    review = steps["Review"]["run"]
    clone = _clone_with_origin(tmp_path, "unsafe-outbound")
    output = tmp_path / "github_output"
    result = _run(f"{fetch}\n{review}", clone,
                  {"BASE_REF": "main", "GITHUB_OUTPUT": str(output)})
    assert result.returncode == 0, result.stderr
    assert output.read_text() == "code=3\n"  # the PR introduces a refusal: the check fails
    comment = (clone / "review.md").read_text()
    assert comment.startswith("### mailrec PR review (origin/main → HEAD) for example.co.jp")
    assert "Refusals this PR introduces" in comment


def test_the_gitlab_job_reviews_a_merge_request_without_secrets(tmp_path: Path) -> None:
    job = _yaml(ROOT / "docs" / "ci" / "gitlab-ci.yml")["mailrec-review"]
    script: list[str] = job["script"]  # type: ignore[index]
    # Everything but installing mailrec (installed here) and posting the note (needs GitLab).
    runnable = [line for line in script
                if not line.startswith("pip install") and "curl" not in line]
    clone = _clone_with_origin(tmp_path, "added-user")
    result = _run("\n".join(runnable), clone,
                  {"CI_MERGE_REQUEST_TARGET_BRANCH_NAME": "main"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mailrec plan exited 2" in result.stdout
    assert "`kondo` | added" in (clone / "review.md").read_text()

    refused = _clone_with_origin(tmp_path / "again", "unsafe-outbound")
    result = _run("\n".join(runnable), refused,
                  {"CI_MERGE_REQUEST_TARGET_BRANCH_NAME": "main"})
    assert result.returncode != 0  # the job fails on a refusal the MR introduces
    assert "mailrec plan exited 3" in result.stdout


def test_the_pre_commit_hook_is_a_valid_manifest_and_catches_a_broken_state(
        tmp_path: Path) -> None:
    from pre_commit.clientlib import load_manifest

    (hook,) = load_manifest(str(ROOT / ".pre-commit-hooks.yaml"))
    assert hook["id"] == "mailrec-validate" and hook["pass_filenames"] is False
    repo = tmp_path / "config"
    shutil.copytree(fx.BASE_STATE, repo / "state")
    command = f"{hook['entry']} {' '.join(hook['args'])}"
    good = _run(command, repo, {})
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("ok: ")
    (repo / "state" / "users.yaml").write_text("users:\n  suga: {inbound: nowhere}\n")
    bad = _run(command, repo, {})
    assert bad.returncode == 1
    assert "users.yaml:2" in bad.stderr


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_the_ci_files_are_linked_from_the_docs(name: str) -> None:
    assert f"ci/{name}" in (ROOT / "docs" / "pr-review.md").read_text()
