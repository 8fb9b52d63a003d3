"""A command's life, from its overrides to its exit code: plan, parent run, launch, summary.

1. `plan()`: every job is composed and validated once (preflight.py), and what it will do is decided
   once, from one read of the tracking store: skip (a FINISHED run with the same effective config
   exists), resume (an unfinished run left a checkpoint) or train. Planning only reads; `--dry-run`
   prints the plan and stops there.
2. `run()`: creates the store and experiments, opens the sweep's parent run (-m), and has Hydra launch
   the jobs still to do (hydra_plugins/.../plan_sweeper.py), each with its decision in
   `hydra.job.env_set`, so a job in any process or on any machine acts on it without looking again.
3. The closing summary, read back from the store whoever ran the jobs, on the parent run and in the
   terminal; the exit code.

A job's identity is the fingerprint of its effective config: the resolved config minus the keys the
schema marks as not changing what a run learns (config.not_learned_keys: where it logs, on which
device, how fast).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Mapping, Sequence

from mlflow.entities import Metric, Param, Run, RunStatus
from omegaconf import DictConfig, OmegaConf

from fashioncnn import checkpoints, lease, links, preflight, tracking
from fashioncnn import overrides as ov
from fashioncnn.config import ConfigError, fingerprint_neutral, nested_not_learned_keys, not_learned_keys, ranking_metric
from fashioncnn.prune import PRUNED_EPOCH_TAG, saved_seconds
from fashioncnn.results import is_pruned, rank
from fashioncnn.model import run_name
from fashioncnn.train import precision_used, resolve_device
from fashioncnn.tracking import mask_secrets

class StoreError(ConfigError):
    """The tracking store cannot be read or written; one line naming it and why."""


def fingerprint(cfg: DictConfig) -> str:
    content = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(content, dict)
    for key in not_learned_keys():
        content.pop(key, None)
    for key in nested_not_learned_keys():
        parent, leaf = key.split(".")
        content.get(parent, {}).pop(leaf, None)
    for key, neutral in fingerprint_neutral().items():
        *parents, leaf = key.split(".")
        node = content
        for parent in parents:
            node = node.get(parent, {})
        if leaf in node and node[leaf] == neutral:
            del node[leaf]
            if parents and not node:  # a whole node at its defaults: as if it did not exist
                del content[parents[0]]
    content["precision"] = precision_used(cfg.precision, resolve_device(cfg.device) if cfg.device == "auto" else None)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PlannedJob:
    index: int
    overrides: list[str]  # as Hydra launches it
    cfg: DictConfig
    fingerprint: str
    model_name: str
    tracking_uri: str
    done: Run | None  # a FINISHED run: the job is not launched
    resume: Run | None  # an unfinished run with a checkpoint: the job resumes it
    elsewhere: Run | None = None  # a RUNNING run whose lease another process holds: the job is not launched

    @property
    def command(self) -> str:
        # Launcher settings (hydra/...) say how a job ran, not what it trained.
        chosen = [o for o in self.overrides if not o.lstrip("+~").startswith("hydra")]
        return mask_secrets(ov.display_all(chosen)) or "(defaults)"

    @property
    def action(self) -> str:
        if self.done is not None:
            return f"skip: already FINISHED as run {self.done.info.run_id}"
        if self.elsewhere is not None:
            age = lease.heartbeat_age(self.elsewhere) or 0.0
            return f"running elsewhere: run {self.elsewhere.info.run_id} (heartbeat {age:.0f} s ago); left alone"
        if self.resume is not None:
            return f"resume run {self.resume.info.run_id} from its checkpoint"
        return "train"


@dataclass
class Plan:
    args: list[str]  # the command line as Hydra gets it (group options quoted, team directories on the search path)
    typed: list[str]  # the command line as the user typed it
    multirun: bool
    jobs: list[PlannedJob]

    @property
    def to_run(self) -> list[PlannedJob]:
        return [job for job in self.jobs if job.done is None and job.elsewhere is None]

    def describe(self) -> str:
        lines = [f"#{job.index} {job.model_name:<12} {job.command}: {job.action}" for job in self.jobs]
        skipped = sum(job.done is not None for job in self.jobs)
        resumed = sum(job.resume is not None for job in self.jobs)
        elsewhere = sum(job.elsewhere is not None for job in self.jobs)
        lines.append(f"{len(self.jobs)} jobs: {len(self.jobs) - skipped - resumed - elsewhere} to train, {resumed} to resume, "
                     f"{skipped} already finished" + (f", {elsewhere} running elsewhere" if elsewhere else ""))
        return "\n".join(lines)


def _store_error(uri: str, experiment: str, error: Exception) -> StoreError:
    reason = mask_secrets(str(error).splitlines()[0] if str(error) else type(error).__name__)
    return StoreError(f"tracking store {mask_secrets(uri)} (experiment {experiment!r}) cannot be used: {reason}")


def plan(args: Sequence[str], typed: Sequence[str], options: Mapping[str, Sequence[str]]) -> Plan:
    """Compose, validate and decide every job; reads the store, writes nothing. ConfigError (one line) if any job is bad."""
    jobs = preflight.compose_jobs(args, options)
    preflight.check_machine([cfg for _, cfg in jobs], runs_here=not any(
        arg.startswith("hydra/launcher=") and "slurm" in arg for arg in args))
    known: dict[tuple[str, str], dict[str, list[Run]]] = {}
    planned = []
    for index, (overrides, cfg) in enumerate(jobs):
        uri = tracking.resolve_tracking_uri(cfg)
        if (uri, cfg.experiment) not in known:
            try:
                store = tracking.store(uri)
                store.check_reachable()
                experiment_id = store.experiment_id(cfg.experiment)
                known[uri, cfg.experiment] = store.runs_by_fingerprint(experiment_id) if experiment_id else {}
            except Exception as error:
                raise _store_error(uri, cfg.experiment, error) from error
        fp = fingerprint(cfg)
        runs = known[uri, cfg.experiment].get(fp, [])
        done = None if cfg.force else next((r for r in runs if r.info.status == "FINISHED"), None)
        # A run whose process still renews its heartbeat is left to it; one listing per other unfinished run.
        elsewhere = None if done else next((r for r in runs if lease.held_elsewhere(r, cfg.lease.seconds)), None)
        resume = None if done or elsewhere else next(
            (r for r in runs if r.info.status != "FINISHED" and checkpoints.exists(cfg, r.info.run_id)), None)
        planned.append(PlannedJob(index, overrides, cfg, fp, run_name(cfg), uri, done, resume, elsewhere))
    _, multirun = ov.split_flags(args)
    return Plan(list(args), list(typed), multirun, planned)


# ------------------------------------------------------------------------------------------- launching

_launch_list: list[list[str]] | None = None


def launch_list() -> list[list[str]]:
    """The jobs the current sweep launches (for the plan sweeper), each with its decision in hydra.job.env_set."""
    if _launch_list is None:
        raise RuntimeError("hydra/sweeper=fashioncnn launches the jobs of a fashioncnn plan: run sweeps with python -m fashioncnn -m ...")
    return _launch_list


def decision(job: PlannedJob, experiment_id: str, sweep_id: str | None = None, parent_run_id: str | None = None) -> list[str]:
    """What the job must do, as environment variables Hydra sets for it (in this process or a worker's)."""
    env = {tracking.EXPERIMENT_ID_ENV: experiment_id, tracking.FINGERPRINT_ENV: job.fingerprint}
    if job.resume is not None:
        env[tracking.RESUME_RUN_ENV] = job.resume.info.run_id
    if sweep_id and parent_run_id:
        env[tracking.SWEEP_ID_ENV], env[tracking.PARENT_RUN_ENV] = sweep_id, parent_run_id
    return [f"++hydra.job.env_set.{key}={ov.quote(value)}" for key, value in env.items()]


def _hydra(argv: list[str]) -> None:
    """Run fashioncnn's Hydra app (job.hydra_app) with these arguments, in this process."""
    from hydra.core.plugins import Plugins

    from fashioncnn.config import register_schema
    from fashioncnn.job import hydra_app
    from hydra_plugins.fashioncnn_plugins.plan_sweeper import PlanSweeper

    from hydra_plugins.fashioncnn_plugins.optuna_sweeper import OptunaSweeper

    # An editable install hides the plugins from Hydra's scan of hydra_plugins; registering is idempotent.
    Plugins.instance().register(PlanSweeper)
    Plugins.instance().register(OptunaSweeper)
    register_schema()
    sys.argv = [sys.argv[0], *argv]
    hydra_app()


def show(args: list[str]) -> None:
    """--help, --cfg job and the like: Hydra answers them, nothing is planned or trained."""
    _hydra(args)


def _experiment_ids(plan: Plan) -> dict[tuple[str, str], str]:
    """Create the stores and experiments the jobs need, once, here in the launching process."""
    ids = {}
    for job in plan.jobs:
        key = (job.tracking_uri, job.cfg.experiment)
        if key not in ids:
            try:
                ids[key] = tracking.store(job.tracking_uri).experiment_id(job.cfg.experiment, create=True)
            except Exception as error:
                raise _store_error(*key, error) from error
    return ids  # type: ignore[return-value]


def run(plan: Plan) -> int:
    """Train what the plan says; returns the exit code (0 all done, 1 a job failed, 130/143 interrupted)."""
    global _launch_list
    from fashioncnn.job import handle_sigterm, interrupted_exit_code

    experiment_ids = _experiment_ids(plan)
    handle_sigterm()
    if not plan.multirun:
        job = plan.jobs[0]
        if job.done is not None:
            print(f"{job.model_name}: skipped, already FINISHED as run {job.done.info.run_id} (force=true trains it again)")
            return 0
        if job.elsewhere is not None:
            print(f"{job.model_name}: {job.action}")
            return 0
        try:
            _hydra(plan.args + decision(job, experiment_ids[job.tracking_uri, job.cfg.experiment]))
        except KeyboardInterrupt as stop:
            return interrupted_exit_code(stop)
        return 0

    first = plan.jobs[0]
    parent = ParentRun(plan, tracking.store(first.tracking_uri), experiment_ids[first.tracking_uri, first.cfg.experiment])
    _launch_list = [job.overrides + decision(job, experiment_ids[job.tracking_uri, job.cfg.experiment], parent.sweep_id, parent.run_id)
                    for job in plan.to_run]
    elsewhere = sum(job.elsewhere is not None for job in plan.jobs)
    print(f"sweep {parent.sweep_id}: {len(plan.jobs)} jobs, {len(plan.jobs) - len(plan.to_run) - elsewhere} already finished"
          + (f", {elsewhere} running elsewhere" if elsewhere else "")
          + (" (re-attached to its parent run)" if parent.reattached else ""), flush=True)
    interrupted = None
    try:
        _hydra(plan.args)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM
        interrupted = stop
        parent.kill_unfinished_jobs()
    except SystemExit:  # Hydra reports a launcher failure itself and exits; the summary still follows
        pass
    finally:
        _launch_list = None
    return close_sweep(plan, parent, experiment_ids, interrupted, first.tracking_uri)


def close_sweep(plan: Plan, parent: ParentRun, experiment_ids: Mapping[tuple[str, str], str],
                interrupted: KeyboardInterrupt | None, tracking_uri: str, metric_name: str | None = None) -> int:
    """The summary (read back from the store) on the parent run and in the terminal; the exit code."""
    from fashioncnn.job import interrupted_exit_code

    metric_name = metric_name or plan_metric(plan)
    saved: dict[str, float] = {}
    rows = summarize(plan, parent.sweep_id, experiment_ids, metric_name, saved)
    failed = any(row["status"] in FAILED_STATUSES for row in rows)
    parent.close(rows, metric_name, "KILLED" if interrupted else "FAILED" if failed else "FINISHED", saved)
    print(f"\nsweep {parent.sweep_id} (parent run {parent.run_id}):", flush=True)
    print(summary_text(rows) if rows else "no jobs ran", flush=True)
    if saved:
        print(pruning_line(rows, saved), flush=True)
    local = not tracking_uri.startswith(("http://", "https://"))
    print(f"in MLflow: {parent.url}" + ("  (start the UI with: make ui)" if local else ""), flush=True)
    if interrupted:
        return interrupted_exit_code(interrupted)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------- parent run


class ParentRun:
    """The sweep's parent run. The same sweep run again (same jobs) re-attaches to the same parent."""

    def __init__(self, plan: Plan, store: tracking.Store, experiment_id: str, sweep_fingerprint: str | None = None,
                 params: Mapping[str, str] | None = None, jobs: int | None = None) -> None:
        # A sampled search (search.py) names itself by its study, its params by its space, its jobs by n_trials.
        self.store, self.experiment_id = store, experiment_id
        self.sweep_fingerprint = sweep_fingerprint or hashlib.sha256(
            json.dumps(sorted(job.fingerprint for job in plan.jobs)).encode()
        ).hexdigest()[:16]
        earlier = store.search(experiment_id, f"tags.`{tracking.ROLE_TAG}` = 'parent' and "
                                              f"tags.sweep_fingerprint = '{self.sweep_fingerprint}'")
        if earlier:
            self.run_id = earlier[0].info.run_id
            self.sweep_id = earlier[0].data.tags[tracking.SWEEP_TAG]
            store.client.update_run(self.run_id, status="RUNNING")
            self.reattached = True
        else:
            self.sweep_id = uuid.uuid4().hex[:12]
            typed = [arg for arg in plan.typed if arg not in (*ov.MULTIRUN_FLAGS, "--dry-run")]
            grid = mask_secrets(" ".join(ov.split_flags(typed)[0])) or "(defaults)"
            run = store.client.create_run(
                experiment_id,
                # The sweep's own grid, as typed: what the runs table shows for it. MLflow's SQL stores hold
                # 250 characters (PostgreSQL refuses more; the command tag keeps the whole line).
                run_name=grid if len(grid) <= 250 else grid[:249] + "…",
                tags={
                    tracking.ROLE_TAG: "parent",
                    tracking.SWEEP_TAG: self.sweep_id,
                    "sweep_fingerprint": self.sweep_fingerprint,
                    "command": mask_secrets(shlex.join(["python", "-m", "fashioncnn", "-m", *typed])),
                    "jobs": str(len(plan.jobs) if jobs is None else jobs),
                },
            )
            self.run_id = run.info.run_id
            self.reattached = False
            params = swept_keys(plan) if params is None else params
            store.client.log_batch(self.run_id, params=[Param(key, value) for key, value in params.items()])
        self.base = links.ui_base_for(store.uri)

    @property
    def url(self) -> str:
        return links.run_url(self.base, self.experiment_id, self.run_id)

    def close(self, rows: list[dict[str, str]], metric_name: str, status: str, saved: Mapping[str, float] | None = None) -> None:
        """The sweep's front page: the leaderboard as its description, its best figures, the summary files."""
        client = self.store.client
        client.log_text(self.run_id, summary_markdown(rows), "summary.md")
        client.log_text(self.run_id, summary_csv(rows), "summary.csv")
        client.set_tag(self.run_id, "mlflow.note.content", leaderboard(rows, metric_name, self.base, self.experiment_id))
        counts = {status_: sum(row["status"] == status_ for row in rows) for status_ in ("FINISHED", "FAILED", "DIVERGED", "SKIPPED", "PRUNED")}
        metrics = {f"jobs_{name.lower()}": float(n) for name, n in counts.items()}
        if saved:
            metrics["prune_saved_seconds"] = sum(saved.values())
        ranked = ranked_rows(rows, metric_name)
        if ranked:
            best = ranked[0]
            metrics[metric_name] = float(best[metric_name])
            if best.get("test_acc_at_best"):
                metrics["test_acc_at_best"] = float(best["test_acc_at_best"])
        client.log_batch(self.run_id, metrics=[Metric(key, value, int(time.time() * 1000), 0) for key, value in metrics.items()])
        client.set_terminated(self.run_id, status)

    def kill_unfinished_jobs(self) -> None:
        """After an interrupt: runs that the launcher's workers left RUNNING are KILLED, not RUNNING forever."""
        for run in self.store.search(self.experiment_id, f"tags.{tracking.SWEEP_TAG} = '{self.sweep_id}' and attributes.status = 'RUNNING'"):
            if lease.held_elsewhere(run, float("inf")) and run.data.tags.get(lease.OWNER_TAG) != lease.PROCESS_OWNER:
                continue  # another command's (or a worker's) run, its heartbeat says when it is gone
            if run.info.run_id != self.run_id:
                self.store.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))


# ------------------------------------------------------------------------------------------- summary

FAILED_STATUSES = {"FAILED", "KILLED", "NOT RUN", "RUNNING", "SCHEDULED"}
# Another process holds the job's lease and trains it: not a failure of this command (that one reports it).
RUNNING_ELSEWHERE = "RUNNING ELSEWHERE"


def swept_keys(plan: Plan) -> dict[str, str]:
    """The keys whose value changes between the sweep's jobs, and their values as typed: the parent's params."""
    values: dict[str, list[str]] = {}
    for job in plan.jobs:
        for override in job.overrides:
            key, _, value = ov.display(override).lstrip("+~").partition("=")
            if not key.startswith("hydra"):
                values.setdefault(key, [])
                if value not in values[key]:
                    values[key].append(value)
    return {key: mask_secrets(",".join(vals))[:6000] for key, vals in values.items() if len(vals) > 1}


def summary_columns(metric_name: str) -> list[str]:
    extra = ["test_acc_at_best"] if metric_name != "max_test_acc" else []
    return ["job", "model", "overrides", "status", metric_name, *extra, "max_test_acc", "seconds", "run_id"]


def plan_metric(plan: Plan) -> str:
    """The run-level metric that ranks this sweep's runs: from its jobs' select_metric (the first job's if they differ)."""
    return plan_metric_of(plan.jobs[0].cfg)


def plan_metric_of(cfg: DictConfig) -> str:
    return ranking_metric(getattr(cfg.select_metric, "value", cfg.select_metric))


def ranked_rows(rows: list[dict[str, str]], metric_name: str) -> list[dict[str, str]]:
    """Rows that finished with the metric, best first (results.rank decides the direction)."""
    scored = [row for row in rows if row["status"] in ("FINISHED", "SKIPPED") and row.get(metric_name)]
    return rank(scored, metric_name, score=lambda row: float(row[metric_name]))


def leaderboard(rows: list[dict[str, str]], metric_name: str, base: str, experiment_id: str) -> str:
    """The parent run's description: every job, best first, each linked to its run."""
    ranked = ranked_rows(rows, metric_name)
    columns = ["rank", "model", "overrides", "status", metric_name, "test_acc_at_best", "max_test_acc", "seconds"]
    lines = [f"**Leaderboard** by `{metric_name}`, best first (`test_acc_at_best`: the test accuracy at the epoch "
             "the selection metric picked). Each model links to its run.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in ranked + [row for row in rows if row not in ranked]:
        place = str(ranked.index(row) + 1) if row in ranked else ""
        model = f"[{row['model']}]({links.run_url(base, experiment_id, row['run_id'])})" if row["run_id"] else row["model"]
        cells = [place, model, f"`{row['overrides']}`", row["status"], row.get(metric_name, ""),
                 row.get("test_acc_at_best", ""), row["max_test_acc"], row["seconds"]]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def summarize(plan: Plan, sweep_id: str, experiment_ids: Mapping[tuple[str, str], str], metric_name: str,
              saved: dict[str, float] | None = None) -> list[dict[str, str]]:
    """One row per job, read back from the store (one search per experiment): what happened, whoever ran it.

    `saved`, when given, gets the training seconds each pruned run did not spend, by run id."""
    ran: dict[tuple[str, str], dict[str, Run]] = {}
    rows = []
    for job in plan.jobs:
        key = (job.tracking_uri, job.cfg.experiment)
        if key not in ran:
            found = tracking.store(job.tracking_uri).search(experiment_ids[key], f"tags.{tracking.SWEEP_TAG} = '{sweep_id}'")
            ran[key] = {}
            for r in found:  # newest first: keep the newest run of each fingerprint
                ran[key].setdefault(r.data.tags.get(tracking.FINGERPRINT_TAG, ""), r)
        if job.done is not None:
            run, status = job.done, "SKIPPED"
        else:
            run = ran[key].get(job.fingerprint)
            if run is None or run.info.status == "RUNNING":  # another command's, when this command's job left it alone
                run = _latest_elsewhere(job, experiment_ids[key]) or run
            status = "NOT RUN" if run is None else run.info.status
            if run is not None and status == "RUNNING" and lease.held_elsewhere(run, job.cfg.lease.seconds) \
                    and run.data.tags.get(lease.OWNER_TAG) != lease.PROCESS_OWNER:
                status = RUNNING_ELSEWHERE
            if run is not None and run.data.tags.get(tracking.DIVERGED_TAG) == "true":
                status = "DIVERGED"
        if run is not None and is_pruned(run):  # skipped on a re-run too, but never ranked
            status = "PRUNED"
            if saved is not None:
                saved[run.info.run_id] = pruned_saving(run, job.cfg.epochs)
        metrics = run.data.metrics if run is not None else {}
        row = {"job": str(job.index), "model": job.model_name, "overrides": job.command, "status": status}
        for name in dict.fromkeys((metric_name, "test_acc_at_best", "max_test_acc")):
            row[name] = f"{metrics[name]:.4f}" if name in metrics else ""
        row["seconds"] = f"{metrics['train_seconds']:.1f}" if "train_seconds" in metrics else ""
        row["run_id"] = run.info.run_id if run is not None else ""
        rows.append(row)
    return rows


def _latest_elsewhere(job: PlannedJob, experiment_id: str) -> Run | None:
    """The newest run of the job's config, whichever command made it (None: none)."""
    runs = tracking.store(job.tracking_uri).search(experiment_id, f"tags.{tracking.FINGERPRINT_TAG} = '{job.fingerprint}'")
    return runs[0] if runs else None


def pruned_saving(run: Run, epochs: int) -> float:
    """A pruned run's remaining epochs at its own measured seconds per epoch."""
    stopped = run.data.tags.get(PRUNED_EPOCH_TAG, "")
    seconds = run.data.metrics.get("train_seconds")
    return saved_seconds(epochs, int(stopped), seconds) if stopped.isdigit() and seconds is not None else 0.0


def pruning_line(rows: list[dict[str, str]], saved: Mapping[str, float]) -> str:
    trained = sum(float(row["seconds"]) for row in rows if row["seconds"])  # this sweep's runs, skipped ones included
    return (f"pruning: {len(saved)} of {len(rows)} runs stopped early; {trained:.0f} s of training in all, about "
            f"{sum(saved.values()):.0f} s saved (each pruned run's remaining epochs at its own seconds per epoch)")


def _columns(rows: list[dict[str, str]]) -> list[str]:
    if not rows:  # a search whose every trial was refused
        return []
    return [column for column in rows[0] if column != "test_acc_at_best" or any(r[column] for r in rows)]


def summary_text(rows: list[dict[str, str]]) -> str:
    columns = _columns(rows)
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns) for r in rows]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines.append(f"{len(rows)} jobs: " + ", ".join(f"{n} {status.lower()}" for status, n in sorted(counts.items())))
    return "\n".join(lines)


def summary_markdown(rows: list[dict[str, str]]) -> str:
    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r[c] for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def summary_csv(rows: list[dict[str, str]]) -> str:
    out = io.StringIO()
    # _columns drops test_acc_at_best when no row has it (every job failed): its empty cells go too.
    writer = csv.DictWriter(out, fieldnames=_columns(rows), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
