"""Running a plan: the stores and experiments made, the parent run opened, the jobs launched, the sweep closed.

`run()` creates the store and experiments, opens the sweep's parent run (-m), and has Hydra launch the
jobs still to do (hydra_plugins/fashioncnn_plugins/plan_sweeper.py, given them as one value), each with
its decision (fashioncnn.job.decision), so a job in any process or on any machine acts on it without
looking again.
`close_sweep()` writes the closing summary, read back from the store whoever ran the jobs, on the parent
run and in the terminal, and gives the exit code. A sampled search (fashioncnn.sweep.search) closes the same way.
"""

from __future__ import annotations

import json
import sys
from typing import Mapping

from fashioncnn.job import lease
from fashioncnn.job.app import run_hydra
from fashioncnn.job.decision import Decision, TrialRef, literal
from fashioncnn.sweep.parent import ParentRun
from fashioncnn.sweep.plan import Plan, PlannedJob, store_error
from fashioncnn.sweep.summary import FAILED_STATUSES, RUNNING_ELSEWHERE, plan_metric, pruning_line, summarize, summary_text
from fashioncnn.tracking import links, stores

# A command whose jobs another live process still trains: not a failure, and not done.
RUNNING_ELSEWHERE_EXIT = 3
SWEEPER_JOBS_KEY = "hydra.sweeper.jobs"  # the plan sweeper's list of jobs to launch (conf/hydra/sweeper/fashioncnn.yaml)


def decision(job: PlannedJob, experiment_id: str, sweep_id: str | None = None, parent_run_id: str | None = None,
             trial: TrialRef | None = None) -> Decision:
    """What the plan decided for `job`, as the value the job receives."""
    return Decision(experiment_id, job.fingerprint, job.resume.info.run_id if job.resume is not None else None,
                    sweep_id, parent_run_id, trial)


def jobs_override(jobs: list[list[str]]) -> str:
    """The plan sweeper's jobs, each one's overrides with its decision: one value on the command line Hydra runs."""
    return f"{SWEEPER_JOBS_KEY}={literal(json.dumps(jobs))}"


def _experiment_ids(plan: Plan) -> dict[tuple[str, str], str]:
    """Create the stores and experiments the jobs need, once, here in the launching process."""
    ids = {}
    for job in plan.jobs:
        key = (job.tracking_uri, job.cfg.experiment)
        if key not in ids:
            try:
                ids[key] = stores.store(job.tracking_uri).experiment_id(job.cfg.experiment, create=True)
            except Exception as error:
                raise store_error(*key, error) from error
    return ids  # type: ignore[return-value]


def run(plan: Plan) -> int:
    """Train what the plan says; returns the exit code: 0 every job ended (here or earlier), 1 a job failed,
    3 a job is still running elsewhere (another live process holds its run), 130/143 interrupted."""
    from fashioncnn.job.signals import handle_sigterm, interrupted_exit_code

    experiment_ids = _experiment_ids(plan)
    handle_sigterm()
    if not plan.multirun:
        job = plan.jobs[0]
        if job.done is not None:
            print(f"{job.model_name}: skipped, already FINISHED as run {job.done.info.run_id} (force=true trains it again)")
            return 0
        if job.elsewhere is not None:
            print(f"{job.model_name}: {job.action}; run the same command again once it has ended", file=sys.stderr)
            return RUNNING_ELSEWHERE_EXIT
        try:
            run_hydra(plan.args + [decision(job, experiment_ids[job.tracking_uri, job.cfg.experiment]).override()])
        except KeyboardInterrupt as stop:
            return interrupted_exit_code(stop)
        return 0

    first = plan.jobs[0]
    parent = ParentRun(plan, stores.store(first.tracking_uri), experiment_ids[first.tracking_uri, first.cfg.experiment])
    jobs = [job.overrides + [decision(job, experiment_ids[job.tracking_uri, job.cfg.experiment], parent.sweep_id,
                                      parent.run_id).override()] for job in plan.to_run]
    elsewhere = sum(job.elsewhere is not None for job in plan.jobs)
    print(f"sweep {parent.sweep_id}: {len(plan.jobs)} jobs, {len(plan.jobs) - len(plan.to_run) - elsewhere} already finished"
          + (f", {elsewhere} running elsewhere" if elsewhere else "")
          + (" (re-attached to its parent run)" if parent.reattached else ""), flush=True)
    interrupted = launch(parent, [*plan.args, jobs_override(jobs)])
    return close_sweep(plan, parent, experiment_ids, interrupted, first.tracking_uri)


def launch(parent: ParentRun, hydra_args: list[str]) -> KeyboardInterrupt | None:
    """Hydra runs the sweeper (the plan's jobs, or a search) under the parent run; the interruption, if one came."""
    try:
        run_hydra(hydra_args)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the runs still going end KILLED, with their checkpoints
        parent.kill_unfinished_jobs()
        return stop
    except SystemExit:  # Hydra reports a launcher failure itself and exits; the summary still follows
        pass
    return None


def close_sweep(plan: Plan, parent: ParentRun, experiment_ids: Mapping[tuple[str, str], str],
                interrupted: KeyboardInterrupt | None, tracking_uri: str, metric_name: str | None = None, note: str = "") -> int:
    """The summary (read back from the store) on the parent run, with `note` in its description, and in the
    terminal; the exit code."""
    from fashioncnn.job.signals import interrupted_exit_code

    metric_name = metric_name or plan_metric(plan)
    saved: dict[str, float] = {}
    rows = summarize(plan, parent.sweep_id, experiment_ids, metric_name, saved)
    failed = any(row["status"] in FAILED_STATUSES for row in rows)
    parent.close(rows, metric_name, "KILLED" if interrupted else "FAILED" if failed else "FINISHED", saved, note)
    print(f"\nsweep {parent.sweep_id} (parent run {parent.run_id}):", flush=True)
    print(summary_text(rows) if rows else "no jobs ran", flush=True)
    if saved:
        print(pruning_line(rows, saved), flush=True)
    hint = links.ui_hint(tracking_uri)
    print(f"in MLflow: {parent.url}" + (f"  ({hint})" if hint else ""), flush=True)
    elsewhere = [row for row in rows if row["status"] == RUNNING_ELSEWHERE]
    if elsewhere and not interrupted:
        print(elsewhere_line(elsewhere, stores.store(tracking_uri)), file=sys.stderr, flush=True)
    if interrupted:
        return interrupted_exit_code(interrupted)
    return 1 if failed else RUNNING_ELSEWHERE_EXIT if elsewhere else 0


def elsewhere_line(rows: list[dict[str, str]], store: stores.Store) -> str:
    """Which jobs another live process still trains, and where: this command is not done with them."""
    jobs = []
    for row in rows:
        run = store.client.get_run(row["run_id"])
        jobs.append(f"#{row['job']} {row['model']} (run {row['run_id']}) on {lease.where(run)}")
    return (f"{len(rows)} job(s) still running elsewhere: {'; '.join(jobs)}. They are not done: run the same "
            "command again once they have ended (it skips what finished)")
