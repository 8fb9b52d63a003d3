"""A sweep's closing summary: one row per job read back from the store, as a table, markdown, CSV and leaderboard."""

from __future__ import annotations

import csv
import io
from typing import Mapping

from mlflow.entities import Run
from omegaconf import DictConfig

from fashioncnn.core.config import ranking_metric
from fashioncnn.job import lease
from fashioncnn.job.pruning import saved_seconds
from fashioncnn.sweep import overrides as ov
from fashioncnn.sweep.plan import Plan, PlannedJob
from fashioncnn.tracking import links, names, stores
from fashioncnn.tracking.names import PRUNED_EPOCH_TAG
from fashioncnn.tracking.queries import is_pruned, rank
from fashioncnn.tracking.secrets import mask_secrets

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
    """Rows that finished with the metric, best first (fashioncnn.tracking.queries.rank decides the direction)."""
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
            found = stores.store(job.tracking_uri).find_runs(experiment_ids[key], f"tags.{names.SWEEP_TAG} = '{sweep_id}'")
            ran[key] = {}
            for r in found:  # newest first: keep the newest run of each fingerprint
                ran[key].setdefault(r.data.tags.get(names.FINGERPRINT_TAG, ""), r)
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
            if run is not None and run.data.tags.get(names.DIVERGED_TAG) == "true":
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
    runs = stores.store(job.tracking_uri).find_runs(experiment_id, f"tags.{names.FINGERPRINT_TAG} = '{job.fingerprint}'")
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
