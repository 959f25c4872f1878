"""`plan --git-base B --git-head H` (PR review) and `plan --world FILE` (offline): the
wiring of git, the observation (live, or an offline snapshot), the planner and review.py.

A PR's CI job runs it with `--world`, so it needs no production credential: nothing is
connected to, no secret is resolved, and nothing is written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from reconciler.cli_common import (
    fail,
    journal_dir,
    make_backend,
    resolve_state_path,
    run_clock_for,
)
from reconciler.lab.layout import LabLayout

if TYPE_CHECKING:
    from reconciler.context import Instructor
    from reconciler.load import LoadedState
    from reconciler.plan import Plan
    from reconciler.review import Review
    from reconciler.snapshot import WorldSnapshot


_USE_A_SNAPSHOT = ("A PR job without production credentials plans against a snapshot of the "
                   "world instead: --world FILE, from `mailrec status --format json` or the "
                   "daemon's world.json (docs/pr-review.md).")


def read_snapshot(path: Path) -> WorldSnapshot:
    from reconciler.snapshot import SnapshotError, load_snapshot

    try:
        return load_snapshot(path)
    except SnapshotError as exc:
        fail(str(exc))


def plan_against(loaded: LoadedState, snapshot: WorldSnapshot, *, allow_bulk: bool,
                 instructor: Instructor | None = None,
                 systems: tuple[str, ...] | None = None) -> Plan:
    """The plan of `loaded` against the snapshot's observation (no system is contacted)."""
    from reconciler.apply import build_plan

    if snapshot.domain != loaded.state.domain:
        fail(f"the world snapshot is of {snapshot.domain}, the state is of "
             f"{loaded.state.domain}")
    world = snapshot.world_for(loaded.state)
    plan = build_plan(loaded, world, snapshot.view, instructor or snapshot.instructor(),
                      allow_bulk=allow_bulk)
    return dataclasses.replace(plan, systems=systems or snapshot.describe())


def _repo_and_subpath(state_path: Path | None, lab: LabLayout | None) -> tuple[Path, str]:
    import git

    path = resolve_state_path(state_path, lab).resolve()
    try:
        root = Path(git.Repo(path, search_parent_directories=True).working_tree_dir or ".")
    except (git.exc.GitError, OSError) as exc:
        fail(f"git: {path} is not in a git repository ({type(exc).__name__})")
    return root, str(path.relative_to(root)) if path != root else "."


def load_git(state_path: Path | None, lab: LabLayout | None, ref: str) -> LoadedState:
    from reconciler.load import StateError, load_from_git

    root, sub = _repo_and_subpath(state_path, lab)
    try:
        return load_from_git(root, ref, sub)
    except StateError as exc:
        fail(f"invalid state at {ref}:\n" + "\n".join(f"  {p}" for p in exc.problems))


def _observe_live(loaded: LoadedState, lab: LabLayout | None
                  ) -> tuple[WorldSnapshot, Instructor, tuple[str, ...]]:
    """One observation of the live systems (with the head's connection settings)."""
    from reconciler.journal import Journal
    from reconciler.observe import JournalView

    now = run_clock_for(lab)()
    try:
        backend = make_backend(loaded, lab)
    except click.ClickException as exc:  # a secret this runner lacks, an unknown provider
        fail(f"{exc.message}\n{_USE_A_SNAPSHOT}")
    journal = Journal.existing(journal_dir(loaded, lab))
    try:
        view = JournalView.read(journal)
        backend.observe(now, view)
        from reconciler.snapshot import from_backend

        snapshot = from_backend(loaded, backend, view, now, "this run")
        return snapshot, backend.instructor(), backend.describe()
    except (OSError, RuntimeError, ValueError) as exc:
        fail(f"cannot observe: {exc}\n{_USE_A_SNAPSHOT}")
    finally:
        backend.close()
        if journal is not None:
            journal.close()


def review_pr(state_path: Path | None, lab_dir: Path | None, base: str, head: str,
              world_file: Path | None, *, allow_bulk: bool) -> tuple[Review, LoadedState]:
    """The head against the base, both planned against the same observation."""
    from reconciler.load import StateError, load_from_git
    from reconciler.review import compare

    lab = LabLayout(lab_dir.resolve()) if lab_dir else None
    head_loaded = load_git(state_path, lab, head)
    root, sub = _repo_and_subpath(state_path, lab)
    base_loaded: LoadedState | None = None
    base_problems: tuple[str, ...] = ()
    try:
        base_loaded = load_from_git(root, base, sub)
    except StateError as exc:
        # A PR that repairs a broken base still shows what it would do.
        base_problems = tuple(str(p) for p in exc.problems)
    instructor: Instructor | None = None
    systems: tuple[str, ...] | None = None
    if world_file is not None:
        snapshot = read_snapshot(world_file)
    else:
        snapshot, instructor, systems = _observe_live(head_loaded, lab)
    head_plan = plan_against(head_loaded, snapshot, allow_bulk=allow_bulk,
                             instructor=instructor, systems=systems)
    base_plan = (plan_against(base_loaded, snapshot, allow_bulk=allow_bulk,
                              instructor=instructor, systems=systems)
                 if base_loaded is not None else None)
    review = compare(base_ref=base, head_ref=head,
                     base_state=base_loaded.state if base_loaded else None,
                     head_state=head_loaded.state, base_plan=base_plan, head_plan=head_plan,
                     base_problems=base_problems, systems=head_plan.systems)
    return review, head_loaded


def emit_review(review: Review, loaded: LoadedState, fmt: str, out: Path | None,
                color: bool) -> None:
    from reconciler.cli_common import emit
    from reconciler.render_review import (
        render_review_json,
        render_review_markdown,
        render_review_text,
    )

    domain = loaded.state.domain
    if fmt == "json":
        emit(render_review_json(review), out)
    elif fmt == "markdown":
        emit(render_review_markdown(review, domain), out)
    else:
        text = render_review_text(review, domain)
        emit(text if not color else _coloured(text), out)


def _coloured(text: str) -> str:
    # The text review is plain; a terminal gets the refusal lines in red.
    return "\n".join(click.style(line, fg="red") if line.lstrip().startswith("⛔") else line
                     for line in text.split("\n"))


def plan_offline(state_path: Path | None, lab_dir: Path | None, git_head: str | None,
                 world_file: Path, *, allow_bulk: bool) -> tuple[Plan, Any]:
    """`plan --world FILE` without --git-base: the state (or a commit's) against a snapshot."""
    from reconciler.cli_common import load_or_fail

    if git_head:
        lab = LabLayout(lab_dir.resolve()) if lab_dir else None
        loaded = load_git(state_path, lab, git_head)
    else:
        loaded, _ = load_or_fail(state_path, lab_dir)
    return plan_against(loaded, read_snapshot(world_file), allow_bulk=allow_bulk), loaded
