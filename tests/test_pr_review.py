"""PR review (`plan --git-base B --git-head H`) and offline plans (`--world FILE`).

The fixtures (tests/pr_fixtures.py) are a lab brought to a stage of the migration by real
applies, its snapshot, and PR heads on top of the stage's base state: an added user, an
unsafe outbound move, an MX move and a commit that changes nothing. Each review is checked
against the expected Markdown and exit code offline (no secret resolves: as on a PR's CI
runner) and live against the lab itself, which must say the same.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.review import HIDDEN, state_changes
from reconciler.snapshot import WITHHELD, load_snapshot, scrub_router
from reconciler.world import RouterFacts
from tests import pr_fixtures as fx

EXPECTED = fx.FIXTURES / "expected"


def _without_observed_line(markdown: str) -> str:
    return "\n".join(line for line in markdown.splitlines()
                     if not line.startswith("<sub>observed:"))


@pytest.mark.parametrize("scenario", sorted(fx.SCENARIOS))
def test_review_offline_matches_the_expected_markdown_and_exit_code(
        scenario: str, tmp_path: Path) -> None:
    repo = fx.pr_repo(tmp_path, scenario)
    world = fx.FIXTURES / f"world-{fx.SCENARIOS[scenario].stage}.json"
    result = fx.review(repo, world=world)
    assert result.returncode == fx.SCENARIOS[scenario].exit_code, result.stderr
    expected = (EXPECTED / f"{scenario}.md").read_text()
    assert fx.normalise(result.stdout) == expected, (
        "the review differs from tests/fixtures/pr/expected (regenerate with "
        "`python -m tests.pr_fixtures` if the change is intended)")
    assert "offline snapshot taken 2026-12-01T09:00:00+00:00" in result.stdout


def test_the_unsafe_outbound_move_is_a_refusal_the_head_introduces(tmp_path: Path) -> None:
    repo = fx.pr_repo(tmp_path, "unsafe-outbound")
    result = fx.review(repo, world=fx.FIXTURES / "world-mid.json", fmt="json")
    assert result.returncode == 3
    review = json.loads(result.stdout)
    assert review["exit_code"] == 3
    assert {(r["code"], r["step"]) for r in review["introduced"]} >= {
        ("MR002", "outbound/suga")}
    assert review["users"] == [{"user": "suga", "change": "changed",
                                "base": {"inbound": "rental", "outbound": "onprem"},
                                "head": {"inbound": "rental", "outbound": "rental"}}]
    assert [c["id"] for c in review["added"] if c["head"] == "refused"] == ["outbound/suga"]


def test_a_refusal_the_base_already_had_is_not_the_heads(tmp_path: Path) -> None:
    """Base: suga already sends via the rental (refused). Head adds a user: exit 2, and the
    MR002 refusal is listed as the base's, not introduced."""
    repo = fx.pr_repo(tmp_path, "unsafe-outbound")
    fx.add_user(repo / "state", "kondo", "rental", "onprem")
    fx.git(repo, "commit", "-q", "-am", "kondo")
    result = fx.review(repo, world=fx.FIXTURES / "world-mid.json", fmt="json")
    review = json.loads(result.stdout)
    assert result.returncode == 2, result.stdout
    assert review["introduced"] == []
    assert ("MR002", "outbound/suga") in {(r["code"], r["step"]) for r in review["kept"]}
    markdown = fx.review(repo, world=fx.FIXTURES / "world-mid.json").stdout
    assert "Already refused in the base (not this PR's doing)" in markdown


def test_a_head_that_repairs_the_refusal_resolves_it(tmp_path: Path) -> None:
    repo = fx.pr_repo(tmp_path, "unsafe-outbound")
    fx.set_user(repo / "state", "suga", outbound="onprem")
    fx.git(repo, "commit", "-q", "-am", "revert")
    result = fx.review(repo, world=fx.FIXTURES / "world-mid.json", fmt="json")
    review = json.loads(result.stdout)
    assert result.returncode == 2  # it removes the refused step
    assert [c["id"] for c in review["removed"]] == ["dns/spf", "outbound/suga"]
    assert "MR002" in {r["code"] for r in review["resolved"]}


def test_a_broken_base_still_shows_what_the_head_does(tmp_path: Path) -> None:
    repo = fx.pr_repo(tmp_path, "added-user")
    (repo / "state" / "users.yaml").write_text("users:\n  suga: {inbound: nowhere}\n")
    fx.git(repo, "commit", "-q", "-am", "broken")
    shutil.copy(fx.BASE_STATE / "users.yaml", repo / "state" / "users.yaml")
    fx.stage_state(repo / "state", "mid")
    fx.git(repo, "commit", "-q", "-am", "repaired")
    result = fx.review(repo, world=fx.FIXTURES / "world-mid.json")
    assert "The base state does not load" in result.stdout
    assert "users.yaml:2" in result.stdout  # the base's problem, with its place
    assert "Steps this PR adds" in result.stdout


def test_a_broken_head_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    repo = fx.pr_repo(tmp_path, "added-user")
    (repo / "state" / "users.yaml").write_text("users:\n  suga: {inbound: nowhere}\n")
    fx.git(repo, "commit", "-q", "-am", "broken")
    result = fx.review(repo, world=fx.FIXTURES / "world-mid.json")
    assert result.returncode == 1
    assert re.search(r"users\.yaml:2", result.stderr), result.stderr


def test_without_a_world_and_without_secrets_the_review_says_to_use_one(
        tmp_path: Path) -> None:
    """The production state's TSIG secret is a file this runner does not have: mailrec
    stops before connecting anywhere and says how a PR job plans instead."""
    repo = fx.pr_repo(tmp_path, "added-user")
    result = fx.review(repo)
    assert result.returncode == 1
    assert "file:/etc/mailrec/tsig" in result.stderr
    assert "--world" in result.stderr


@pytest.fixture(scope="module")
def stage_labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    labs = {}
    for stage in fx.STAGES:
        labs[stage] = fx.build_stage(tmp_path_factory.mktemp(stage), stage)
    yield labs


@pytest.mark.parametrize("scenario", sorted(fx.SCENARIOS))
def test_the_live_review_says_what_the_offline_one_says(
        scenario: str, stage_labs: dict[str, Path], tmp_path: Path) -> None:
    lab = stage_labs[fx.SCENARIOS[scenario].stage]
    repo = fx.pr_repo(tmp_path, scenario)
    live = fx.review(repo, lab=lab)
    assert live.returncode == fx.SCENARIOS[scenario].exit_code, live.stderr
    expected = (EXPECTED / f"{scenario}.md").read_text()
    assert _without_observed_line(live.stdout) == _without_observed_line(expected)
    assert "<sub>observed: onprem: lab files" in live.stdout  # live, not a snapshot


def test_the_snapshot_plans_exactly_as_the_live_systems(stage_labs: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """The same state planned live and from its snapshot: same steps, findings, checksum."""
    lab = stage_labs["mid"]
    snapshot = tmp_path / "status.json"
    snapshot.write_text(fx.mailrec("status", "--format", "json", lab=lab, check=False).stdout)
    live = json.loads(fx.mailrec("plan", "--format", "json", lab=lab).stdout)
    offline = json.loads(fx.mailrec("plan", "--format", "json", "--world", str(snapshot),
                                    "--state", str(lab / "state"), lab=None).stdout)
    assert offline["steps"] == live["steps"]
    assert offline["findings"] == live["findings"]
    assert offline["checksum"] == live["checksum"]
    assert offline["systems"][0].startswith("offline snapshot taken 2026-12-01T09:00:00")


def test_a_snapshot_holds_no_secret(stage_labs: dict[str, Path]) -> None:
    secrets = {"RTX_LOGIN": "login-Secret-4711", "RTX_ADMIN": "admin-Secret-0815"}
    out = fx.mailrec("status", "--format", "json", lab=stage_labs["mid"], env=secrets,
                     check=False).stdout
    for value in secrets.values():
        assert value not in out
    assert "world" in json.loads(out)


def test_router_lines_that_may_hold_a_credential_are_withheld() -> None:
    router = RouterFacts(
        filter_lines={10: "ip filter 10 pass * * tcp * smtp"},
        references={10: ("ip lan2 secure filter in 10 200",
                         "pp auth myname user1 Sup3rSecret"),
                    20: ("ipsec ike pre-shared-key 1 text hunter2",)})
    scrubbed = scrub_router(router)
    assert scrubbed is not None
    assert scrubbed.filter_lines == router.filter_lines
    assert scrubbed.references[10] == ("ip lan2 secure filter in 10 200", WITHHELD)
    assert scrubbed.references[20] == (WITHHELD,)
    # The planner still sees that the numbers are used elsewhere (MR014).
    assert set(scrubbed.references) == {10, 20}


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "not JSON"),
    ('{"kind": "something"}', "not a mailrec world snapshot"),
    ('{"kind": "mailrec-world", "format_version": 9}', "format_version 9"),
    ('{"resources": [], "in_sync": true}', "without a \"world\" snapshot"),
])
def test_a_bad_snapshot_file_is_an_error_naming_it(content: str, message: str,
                                                    tmp_path: Path) -> None:
    bad = tmp_path / "world.json"
    bad.write_text(content)
    result = fx.mailrec("plan", "--state", str(fx.BASE_STATE), "--world", str(bad), lab=None,
                        check=False)
    assert result.returncode == 1
    assert str(bad) in result.stderr and message in result.stderr


def test_a_tampered_snapshot_field_is_an_error_naming_the_field(tmp_path: Path) -> None:
    data = json.loads((fx.FIXTURES / "world-mid.json").read_text())
    data["parts"]["postfix"]["accounts"]["suga"] = "many"
    bad = tmp_path / "world.json"
    bad.write_text(json.dumps(data))
    result = fx.mailrec("plan", "--state", str(fx.BASE_STATE), "--world", str(bad), lab=None,
                        check=False)
    assert result.returncode == 1
    assert "parts.postfix.accounts.suga" in result.stderr


def test_a_snapshot_of_another_domain_is_refused(tmp_path: Path) -> None:
    data = json.loads((fx.FIXTURES / "world-mid.json").read_text())
    data["domain"] = "other.example"
    other = tmp_path / "world.json"
    other.write_text(json.dumps(data))
    result = fx.mailrec("plan", "--state", str(fx.BASE_STATE), "--world", str(other),
                        lab=None, check=False)
    assert result.returncode == 1
    assert "other.example" in result.stderr


def test_the_fixture_snapshots_load() -> None:
    for stage in fx.STAGES:
        snapshot = load_snapshot(fx.FIXTURES / f"world-{stage}.json")
        assert snapshot.domain == "example.co.jp"
        assert set(snapshot.parts.postfix.transport) == set(fx.STAGES[stage])


def test_settings_that_look_like_credentials_are_shown_only_as_references() -> None:
    from reconciler.load import load_state

    base = load_state(fx.BASE_STATE).state
    head = base.model_copy(update={"rental": base.rental.model_copy(update={
        "options": {"api_token": "literal-Secret-1", "api_key_ref": "env:API_KEY",
                    "region": "tokyo"}})})
    _, settings = state_changes(base, head)
    shown = {s.path: s.head for s in settings}
    assert shown["rental.options.api_token"] == HIDDEN
    assert shown["rental.options.api_key_ref"] == "env:API_KEY"
    assert shown["rental.options.region"] == "tokyo"
