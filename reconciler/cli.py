"""The `mailrec` command line (DESIGN.md section 4): thin wiring of load -> observe -> plan ->
apply -> render, with the exit codes of the contract:
0 in sync, 2 changes pending, 3 something refused as unsafe, 1 error (nothing changed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

# Only click and light modules at module level: `mailrec --help` and `validate` must not pay
# for the planner, the drivers or their protocol libraries (paramiko, dnspython, gitpython,
# rich). Each command imports the machinery it uses (issue 9; tests/test_imports.py).
from reconciler import clock
from reconciler.cli_common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REFUSED,
    clock_override_asked,
    connected,
    emit,
    fail,
    journal_dir,
    lab_accepted,
    load_or_fail,
    observe_or_fail,
    record_override,
    refuse_if_not_the_daemons,
    run_clock_for,
    state_option,
    use_color,
)
from reconciler.cli_help import EPILOGS, MailrecGroup
from reconciler.cli_lab import lab
from reconciler.lab.layout import LabLayout

if TYPE_CHECKING:
    from reconciler.journal import Journal
    from reconciler.load import LoadedState


@click.group(cls=MailrecGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=EPILOGS["mailrec"])
@click.version_option(package_name="mailrec")
@click.option("--clock-override", is_flag=True,
              help="Let MAILREC_NOW set the time gates' clock outside a lab (prints a warning; "
                   "for rehearsals, never for production).")
@click.pass_context
def cli(ctx: click.Context, clock_override: bool) -> None:
    """mailrec: move mail from onprem Postfix to a rental service one user at a time,
    without losing or bouncing mail."""
    ctx.meta["clock_override"] = clock_override


@cli.command()
@state_option
def validate(state_path: Path | None, lab_dir: Path | None) -> None:
    """Check the state file: schema, then static findings (MR012)."""
    from reconciler.secrets import describe_secret
    from reconciler.static import static_findings

    loaded, _ = load_or_fail(state_path, lab_dir)
    findings = static_findings(loaded.state, locate=loaded.locate)
    for finding in findings:
        click.echo(finding.text(), err=True)
    if findings:
        sys.exit(EXIT_REFUSED)
    users = len(loaded.state.users)
    click.echo(f"ok: {', '.join(loaded.files)} ({users} users, digest {loaded.digest[:12]})")
    # Which secrets are referenced, and whether they resolve here: never their values.
    state = loaded.state
    refs = {"dns.tsig.secret": state.dns.tsig.secret if state.dns.tsig else None}
    if state.router is not None:
        refs["router.password"] = state.router.password
        refs["router.admin_password"] = state.router.admin_password
    for name, ref in refs.items():
        if ref is not None:
            click.echo(f"  secret {name}: {describe_secret(ref)}")


@cli.command()
@state_option
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json"]), default="text",
              show_default=True,
              help="text for a terminal, markdown for a PR comment, json for `apply FILE`.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write the plan to this file (atomically) instead of stdout.")
@click.option("--git-base", metavar="REF", default=None,
              help="PR review: show what --git-head changes compared with this commit (the "
                   "per-user diff, steps added and removed, refusals introduced); exit 3 when "
                   "the head introduces a refusal.")
@click.option("--git-head", metavar="REF", default=None,
              help="Plan the state at this commit (default with --git-base: HEAD).")
@click.option("--world", "world_file", type=click.Path(path_type=Path), default=None,
              help="Plan offline against this world snapshot (from `mailrec status --format "
                   "json` or the daemon's world.json) instead of the live systems: nothing is "
                   "connected to and no secret is read (for PR CI jobs).")
@click.option("--allow-bulk", is_flag=True, help="Plan as if applying with --allow-bulk.")
@click.option("--timings", is_flag=True,
              help="Also print, on stderr, what each phase took and the round trips each "
                   "system's observation cost.")
def plan(state_path: Path | None, lab_dir: Path | None, fmt: str, out: Path | None,
         git_base: str | None, git_head: str | None, world_file: Path | None,
         allow_bulk: bool, timings: bool) -> None:
    """Show what apply would change (a dry run)."""
    import time

    if git_base:
        from reconciler.cli_review import emit_review, review_pr

        review, head_loaded = review_pr(state_path, lab_dir, git_base, git_head or "HEAD",
                                        world_file, allow_bulk=allow_bulk)
        emit_review(review, head_loaded, fmt, out, use_color() and out is None)
        sys.exit(review.exit_code)
    if world_file is not None:
        from reconciler.cli_review import plan_offline

        offline, loaded = plan_offline(state_path, lab_dir, git_head, world_file,
                                       allow_bulk=allow_bulk)
        _render_plan(offline, loaded, fmt, out, None, git_head)
        sys.exit(offline.exit_code)
    started = time.perf_counter()
    if git_head:
        from reconciler.cli_review import load_git

        loaded = load_git(state_path, LabLayout(lab_dir.resolve()) if lab_dir else None,
                          git_head)
        lab = LabLayout(lab_dir.resolve()) if lab_dir else None
    else:
        loaded, lab = load_or_fail(state_path, lab_dir)
    read = time.perf_counter()
    costs: list[Any] = []
    _, the_plan = observe_or_fail(loaded, lab, allow_bulk=allow_bulk, costs=costs)
    planned = time.perf_counter()
    _render_plan(the_plan, loaded, fmt, out, git_base, git_head)
    if timings:
        observed = sum(cost.seconds for cost in costs)
        lines = [f"{'read the state':<24} {read - started:8.3f} s",
                 *(cost.text() for cost in costs),
                 f"{'plan':<24} {planned - read - observed:8.3f} s",
                 f"{'render':<24} {time.perf_counter() - planned:8.3f} s"]
        click.echo("timings:\n" + "\n".join(f"  {line}" for line in lines), err=True)
    sys.exit(the_plan.exit_code)


def _render_plan(the_plan: Any, loaded: LoadedState, fmt: str, out: Path | None,
                 git_base: str | None, git_head: str | None) -> None:
    from reconciler.render import render_json, render_markdown, render_text

    if fmt == "json":
        emit(render_json(the_plan), out)
    elif fmt == "markdown":
        title = f"mailrec plan for {loaded.state.domain}"
        if git_head:
            title += f" ({git_base or 'observed'} → {git_head})"
        emit(render_markdown(the_plan, title), out)
    else:
        emit(render_text(the_plan, color=use_color() and out is None), out)


@cli.command()
@state_option
@click.argument("plan_file", required=False, type=click.Path(path_type=Path, exists=True))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--allow-bulk", is_flag=True,
              help="Allow moving more than policy.max_change_pct percent of the users at once.")
@click.option("--override", metavar="WHY", default=None,
              help="Apply a --state that differs from the state a running daemon applies "
                   "(an emergency): WHY is recorded in the journal with your name.")
def apply(state_path: Path | None, lab_dir: Path | None, plan_file: Path | None, yes: bool,
          allow_bulk: bool, override: str | None) -> None:
    """Apply the ready steps (of PLAN_FILE if given, refused when stale), verify each, journal."""
    from reconciler.apply import observe_and_plan, reconcile
    from reconciler.plan import Status
    from reconciler.render import render_text

    loaded, lab = load_or_fail(state_path, lab_dir)
    refuse_if_not_the_daemons(loaded, override, "applied,")
    saved = None
    if plan_file is not None:
        try:
            saved = json.loads(plan_file.read_text())
        except (OSError, ValueError) as exc:
            fail(f"{plan_file}: not a plan file ({exc})")
        if not isinstance(saved, dict) or saved.get("format_version") != 1:
            fail(f"{plan_file}: not a mailrec plan (format_version 1 expected)")
    run_clock = run_clock_for(lab)

    def progress(step_id: str, phase: str) -> None:
        if phase == "ok":
            click.echo(f"applied {step_id}")

    with connected(loaded, lab) as (backend, journal):
        if override:
            record_override(loaded, journal, run_clock(), override)
        if not yes and saved is None:
            _, preview = observe_and_plan(loaded, backend, journal, run_clock(),
                                          allow_bulk=allow_bulk)
            click.echo(render_text(preview, color=use_color()), nl=False)
            if not preview.by_status(Status.READY):
                sys.exit(preview.exit_code)
            if not sys.stdin.isatty() or not click.confirm("Apply the ready steps?",
                                                           default=False):
                fail("not applied (use --yes to apply without asking)")
        report = reconcile(loaded, backend, journal, run_clock, allow_bulk=allow_bulk,
                           saved=saved, progress=progress)
    for outcome in report.outcomes:
        if outcome.result == "failed":
            click.echo(f"FAILED {outcome.step}: {outcome.message}", err=True)
    assert report.final is not None
    final = dataclasses.replace(report.final, systems=backend.describe())
    click.echo(render_text(final, color=use_color()), nl=False)
    if report.failed:
        sys.exit(EXIT_ERROR)
    sys.exit(final.exit_code)


@cli.command()
@state_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format.")
def status(state_path: Path | None, lab_dir: Path | None, fmt: str) -> None:
    """Per resource: in sync / pending / gated / refused / drifted."""
    from reconciler.journal import Journal
    from reconciler.render import render_status_json, render_status_text

    loaded, lab = load_or_fail(state_path, lab_dir)
    snapshots: list[Any] = []
    world, the_plan = observe_or_fail(loaded, lab, snapshots=snapshots if fmt == "json" else None)
    journal = Journal.existing(journal_dir(loaded, lab))
    applied: frozenset[str] = frozenset()
    if journal is not None:
        applied = frozenset(e.step for e in journal.events(kind="apply")
                            if e.result == "ok" and e.step)
        journal.close()
    if fmt == "json":
        from reconciler.snapshot import snapshot_dict

        click.echo(render_status_json(the_plan, world, applied,
                                      world_snapshot=snapshot_dict(snapshots[0])), nl=False)
    else:
        click.echo(render_status_text(the_plan, world, color=use_color(), applied=applied),
                   nl=False)
    sys.exit(the_plan.exit_code)


@cli.command()
@click.argument("step_id")
@state_option
@click.option("--note", default="", help="What the person did (kept in the journal).")
@click.option("--withdraw", is_flag=True,
              help="Take back this step's ack (only while the step has not run).")
@click.option("--override", metavar="WHY", default=None,
              help="Ack against a --state that differs from a running daemon's; WHY is "
                   "recorded in the journal with your name.")
def ack(step_id: str, state_path: Path | None, lab_dir: Path | None, note: str,
        withdraw: bool, override: str | None) -> None:
    """A person confirms a manual step (e.g. outbound/suga: the mail client was changed)."""
    loaded, lab = load_or_fail(state_path, lab_dir)
    refuse_if_not_the_daemons(loaded, override, "acknowledged against it,")
    run_clock = run_clock_for(lab)
    # Under the apply lock: no apply may change the world between the check and the record.
    with connected(loaded, lab) as (backend, journal), journal.lock():
        if override:
            record_override(loaded, journal, run_clock(), override)
        if withdraw:
            refused = journal.withdraw_ack(run_clock(), step_id, note)
            if refused:
                click.echo(f"refused: {refused}", err=True)
                sys.exit(EXIT_REFUSED)
            click.echo(f"withdrawn: the ack of {step_id} (the step waits for a person again)")
            return
        _record_ack(loaded, backend, journal, run_clock, step_id, note)


def _record_ack(loaded: LoadedState, backend: Any, journal: Journal, run_clock: clock.Clock,
                step_id: str, note: str) -> None:
    from reconciler.apply import context_for, observe_and_plan
    from reconciler.model import Side
    from reconciler.observe import JournalView
    from reconciler.plan import Status
    from reconciler.safety import check_transition

    view = JournalView.read(journal)
    # One person confirming one change is never a bulk move (MR011 guards automated moves).
    world, the_plan = observe_and_plan(loaded, backend, journal, run_clock(), allow_bulk=True)
    planned = the_plan.get(step_id)
    if planned is None:
        kind, _, name = step_id.partition("/")
        state = loaded.state
        # A change made in the rental's panel that the plan asked a person for, and that
        # mailrec already observes (the SMTP probe sees the mailbox): the person followed the
        # plan's instructions, so the confirmation is recorded, as the plan told them, and
        # spent at once (the change it confirms is seen: nothing waits for it).
        wanted = state.users.get(name) if kind == "mailbox" else None
        seen = (
            (wanted is not None and wanted.inbound is Side.RENTAL
             and world.user(name).rental_mailbox)
            or (kind == "whitelist" and any(str(n) == name and n in world.rental.whitelist
                                            for n in state.rental.whitelist))
            or (kind == "alias" and state.alias_members(name) is not None
                and (facts := world.addresses.get(name)) is not None and facts.at_rental))
        if seen:
            now = run_clock()
            journal.record(now, "ack", step_id, "noted", source=loaded.digest,
                           detail={"note": note, "observed": True})
            journal.record(now, "observe", step_id, "noted", detail={"ack_spent": True})
            click.echo(f"acknowledged {step_id} (already observed: nothing waits for it)")
            return
        if kind in ("mailbox", "outbound", "inbound") and name in state.users:
            click.echo(f"{step_id} is already as desired: nothing to acknowledge")
            return
        fail(f"{step_id} is not a step of the current plan (nothing to acknowledge)")
    if planned.status is Status.REFUSED or planned.findings:
        for reason in planned.reasons():
            click.echo(reason, err=True)
        click.echo(f"refused: {step_id} is not safe to do yet", err=True)
        sys.exit(EXIT_REFUSED)
    if planned.gate is None or planned.gate.kind != "ack":
        fail(f"{step_id} does not wait for a person ({planned.status})")
    # The plan assumes its ready steps ran first; the person's change happens in the world
    # as it is now, so it must be safe there.
    ctx = context_for(loaded, view, allow_bulk=True)
    found = check_transition(world, planned.step.simulate(world), planned.step, ctx)
    if found:
        for finding in found:
            click.echo(finding.text(), err=True)
        click.echo(f"refused: {step_id} is not safe yet; apply the ready steps first",
                   err=True)
        sys.exit(EXIT_REFUSED)
    detail: dict[str, object] = {"note": note, **planned.step.data()}
    journal.record(run_clock(), "ack", step_id, "noted", source=loaded.digest, detail=detail)
    click.echo(f"acknowledged {step_id}")


@cli.command()
@lab_accepted
def schema(lab_dir: Path | None) -> None:
    """Print the JSON Schema of the state file (for editor completion)."""
    from reconciler.model_schema import state_json_schema

    click.echo(json.dumps(state_json_schema(), indent=2))


@cli.command()
@lab_accepted
def rules(lab_dir: Path | None) -> None:
    """List the safety rules (MR codes)."""
    from reconciler.findings import RULES

    for code, text in RULES.items():
        click.echo(f"{code}  {text}")


@cli.command()
@click.option("--repo", default=None, help="Git URL or path of the state repo.")
@click.option("--branch", default="main", show_default=True, help="The branch of --repo to follow.")
@click.option("--interval", type=float, default=60.0, show_default=True,
              help="Seconds between rounds (longer after failures; without --repo, "
                   "also a round on each change of the state).")
@click.option("--path", "subpath", default="state", show_default=True,
              help="State path inside the repo (without --repo: the local state directory).")
@click.option("--lab", "lab_dir", type=click.Path(path_type=Path), envvar="MAILREC_LAB",
              help="Use the local lab at DIR for every host (env MAILREC_LAB).")
@click.option("--metrics-port", type=int, default=None,
              help="Serve Prometheus metrics (/metrics) and the read-only migration board "
                   "(/, /board.json) on --metrics-address:PORT.")
@click.option("--metrics-address", default="127.0.0.1", show_default=True, metavar="ADDRESS",
              help="Address the metrics and board port binds to; loopback by default: put a "
                   "reverse proxy with authentication in front to show the board to others.")
@click.option("--once", is_flag=True, help="Reconcile once and exit (for cron and tests).")
@click.option("--allow-bulk", is_flag=True,
              help="Allow moving more than policy.max_change_pct percent of the users at once.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Log lines as text, or one JSON object per line.")
def daemon(repo: str | None, branch: str, interval: float, subpath: str, lab_dir: Path | None,
           metrics_port: int | None, metrics_address: str, once: bool, allow_bulk: bool,
           log_format: str) -> None:
    """Reconcile continuously from a git repo (or ./state), on change and every INTERVAL."""
    from reconciler.daemon import Daemon

    lab = LabLayout(lab_dir.resolve()) if lab_dir else None
    run_clock_for(lab)  # refuses a MAILREC_NOW it may not use before the first round
    runner = Daemon(repo=repo, branch=branch, subpath=subpath, interval=interval, lab=lab,
                    metrics_port=metrics_port, allow_bulk=allow_bulk,
                    clock_override=clock_override_asked(), log_format=log_format,
                    metrics_address=metrics_address)
    sys.exit(runner.run(once=once))



@cli.command()
@state_option
@click.option("--step", "step_prefix", default="", metavar="PREFIX",
              help="Only steps whose id starts with PREFIX (e.g. inbound/ or outbound/suga).")
@click.option("--limit", type=int, default=50, show_default=True,
              help="The last N entries (0: all).")
@click.option("--all", "everything", is_flag=True,
              help="Also the observations recorded for the gates and the `started` marks.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format.")
def history(state_path: Path | None, lab_dir: Path | None, step_prefix: str, limit: int,
            everything: bool, fmt: str) -> None:
    """What was applied and acknowledged: when, from which commit, by whom.

    \b
    Exit codes: 0 (also when the journal is empty), 1 error.
    Example:
      mailrec history --step outbound/ --limit 20
    """
    from reconciler import history as history_module
    from reconciler.journal import Journal

    loaded, lab = load_or_fail(state_path, lab_dir)
    journal = Journal.existing(journal_dir(loaded, lab))
    if journal is None:
        click.echo("the journal records nothing yet (no apply or ack has run here)")
        return
    try:
        found = history_module.entries(journal.events(), step_prefix=step_prefix,
                                       everything=everything, limit=max(limit, 0))
    finally:
        journal.close()
    render = history_module.render_json if fmt == "json" else history_module.render_text
    click.echo(render(found), nl=False)


cli.add_command(lab)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="mailrec", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_ERROR
    except click.ClickException as exc:
        exc.show()
        return EXIT_ERROR
    except clock.ClockError as exc:
        click.echo(f"Error: {exc}", err=True)
        return EXIT_ERROR
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_ERROR
    except Exception as exc:  # the contract: exit 1 with a message, never a bare traceback
        if os.environ.get("MAILREC_DEBUG"):
            raise
        click.echo(f"Error: {type(exc).__name__}: {exc} (MAILREC_DEBUG=1 shows the traceback)",
                   err=True)
        return EXIT_ERROR
    return EXIT_OK
