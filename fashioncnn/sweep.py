"""Sweeps that never lose work: which jobs are already done, the parent run, and the closing summary.

Everything here reads and writes the MLflow store, never launcher state, so it holds whichever Hydra
launcher ran the jobs (in this process, joblib workers, submitit). A job's identity is the
fingerprint of its effective config: the resolved config minus the keys that do not change what it
trains (where it logs, on which device, how fast). A FINISHED run with the same fingerprint in the
same experiment makes re-running the job unnecessary; an unfinished one with a checkpoint resumes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run, RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fashioncnn.model import ModelSpec
from fashioncnn.tracking import (
    PARENT_RUN_ENV,
    ROLE_TAG,
    SWEEP_ID_ENV,
    mask_secrets,
    prepare_store,
    resolve_tracking_uri,
    runs_with_fingerprint,
)

NOT_IN_FINGERPRINT = (
    "experiment", "tracking_uri", "data_dir", "device", "threads", "eval_batch_size",
    "compile", "channels_last", "force", "checkpoint_dir", "keep_checkpoint",
    "optimizer_impl", "reuse_memory", "pool_before_relu", "weight_first_linear",
)


def fingerprint(cfg: DictConfig) -> str:
    content = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(content, dict)
    for key in NOT_IN_FINGERPRINT:
        content.pop(key, None)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_path(cfg: DictConfig, run_id: str) -> Path:
    return Path(cfg.checkpoint_dir) / f"{run_id}.pt"


def finished_run(runs: list[Run]) -> Run | None:
    return next((run for run in runs if run.info.status == "FINISHED"), None)


def resumable_run(runs: list[Run], cfg: DictConfig) -> Run | None:
    """The newest unfinished run of this config that left a checkpoint behind."""
    for run in runs:
        if run.info.status != "FINISHED" and checkpoint_path(cfg, run.info.run_id).exists():
            return run
    return None


@dataclass
class PlannedJob:
    overrides: list[str]
    cfg: DictConfig
    fingerprint: str
    model_name: str
    done: Run | None  # a FINISHED run: the job will be skipped
    resume: Run | None  # an unfinished run with a checkpoint: the job resumes it

    @property
    def command(self) -> str:
        # Launcher settings (hydra/...) say how a job ran, not what it trained.
        chosen = [o for o in self.overrides if not o.lstrip("+~").startswith("hydra")]
        return mask_secrets(" ".join(chosen).replace("'", "").replace("\\", "")) or "(defaults)"

    @property
    def action(self) -> str:
        if self.done is not None:
            return f"skip: already FINISHED as run {self.done.info.run_id}"
        if self.resume is not None:
            return f"resume run {self.resume.info.run_id} from its checkpoint"
        return "train"


class Store:
    """One tracking store and experiment, as the jobs of a sweep see them."""

    def __init__(self, cfg: DictConfig) -> None:
        self.tracking_uri = resolve_tracking_uri(cfg)
        self.client = MlflowClient(self.tracking_uri)
        self.experiment_id = prepare_store(self.tracking_uri, cfg.experiment)

    def runs_of(self, fingerprint_: str) -> list[Run]:
        return runs_with_fingerprint(self.client, self.experiment_id, fingerprint_)


def plan(jobs: list[tuple[list[str], DictConfig]]) -> list[PlannedJob]:
    planned, stores = [], {}
    for overrides, cfg in jobs:
        key = (resolve_tracking_uri(cfg), cfg.experiment)
        store = stores.setdefault(key, Store(cfg))
        fp = fingerprint(cfg)
        runs = store.runs_of(fp)
        done = None if cfg.force else finished_run(runs)
        resume = None if done else resumable_run(runs, cfg)
        planned.append(PlannedJob(overrides, cfg, fp, ModelSpec.from_config(cfg.model).name, done, resume))
    return planned


def describe_plan(planned: list[PlannedJob]) -> str:
    lines = [f"#{i} {job.model_name:<12} {job.command}: {job.action}" for i, job in enumerate(planned)]
    skipped = sum(job.done is not None for job in planned)
    resumed = sum(job.resume is not None for job in planned)
    lines.append(f"{len(planned)} jobs: {len(planned) - skipped - resumed} to train, {resumed} to resume, {skipped} already finished")
    return "\n".join(lines)


class ParentRun:
    """The sweep's parent run. The same sweep run again (same jobs) re-attaches to the same parent."""

    def __init__(self, planned: list[PlannedJob], command: list[str]) -> None:
        first = planned[0].cfg
        self.store = Store(first)
        self.sweep_fingerprint = hashlib.sha256(
            json.dumps(sorted(job.fingerprint for job in planned)).encode()
        ).hexdigest()[:16]
        earlier = self.store.client.search_runs(
            [self.store.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = 'parent' and tags.sweep_fingerprint = '{self.sweep_fingerprint}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if earlier:
            self.run_id = earlier[0].info.run_id
            self.sweep_id = earlier[0].data.tags["sweep_id"]
            self.store.client.update_run(self.run_id, status="RUNNING")
            self.reattached = True
        else:
            self.sweep_id = uuid.uuid4().hex[:12]
            text = mask_secrets(" ".join(command).replace("'", ""))
            run = self.store.client.create_run(
                self.store.experiment_id,
                run_name=f"sweep {self.sweep_id}",
                tags={
                    ROLE_TAG: "parent",
                    "sweep_id": self.sweep_id,
                    "sweep_fingerprint": self.sweep_fingerprint,
                    "command": f"python -m fashioncnn {text}",
                    "jobs": str(len(planned)),
                },
            )
            self.run_id = run.info.run_id
            self.reattached = False
        # Every job's run, in this process or another, finds its sweep and parent here.
        os.environ[SWEEP_ID_ENV] = self.sweep_id
        os.environ[PARENT_RUN_ENV] = self.run_id

    def close(self, rows: list[dict[str, str]], status: str) -> None:
        self.store.client.log_text(self.run_id, summary_markdown(rows), "summary.md")
        self.store.client.log_text(self.run_id, summary_csv(rows), "summary.csv")
        self.store.client.set_terminated(self.run_id, status)

    def kill_unfinished_jobs(self) -> None:
        """After an interrupt: runs that the launcher's workers left RUNNING are KILLED, not RUNNING forever."""
        for run in self.store.client.search_runs(
            [self.store.experiment_id], filter_string=f"tags.sweep_id = '{self.sweep_id}' and attributes.status = 'RUNNING'"
        ):
            if run.info.run_id != self.run_id:
                self.store.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))


SUMMARY_COLUMNS = ["job", "model", "overrides", "status", "max_test_acc", "seconds", "run_id"]


def summarize(planned: list[PlannedJob], sweep_id: str) -> list[dict[str, str]]:
    """One row per job, read back from the store: what actually happened, whoever ran it."""
    rows, stores = [], {}
    for index, job in enumerate(planned):
        key = (resolve_tracking_uri(job.cfg), job.cfg.experiment)
        store = stores.setdefault(key, Store(job.cfg))
        if job.done is not None:
            run, status = job.done, "SKIPPED"
        else:
            run = next((r for r in store.runs_of(job.fingerprint) if r.data.tags.get("sweep_id") == sweep_id), None)
            status = "NOT RUN" if run is None else run.info.status
            if run is not None and run.data.tags.get("diverged") == "true":
                status = "DIVERGED"
        metrics = run.data.metrics if run is not None else {}
        rows.append({
            "job": str(index),
            "model": job.model_name,
            "overrides": job.command,
            "status": status,
            "max_test_acc": f"{metrics['max_test_acc']:.4f}" if "max_test_acc" in metrics else "",
            "seconds": f"{metrics['train_seconds']:.1f}" if "train_seconds" in metrics else "",
            "run_id": run.info.run_id if run is not None else "",
        })
    return rows


FAILED_STATUSES = {"FAILED", "KILLED", "NOT RUN", "RUNNING", "SCHEDULED"}


def summary_text(rows: list[dict[str, str]]) -> str:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in SUMMARY_COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in SUMMARY_COLUMNS)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in SUMMARY_COLUMNS) for r in rows]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines.append(f"{len(rows)} jobs: " + ", ".join(f"{n} {status.lower()}" for status, n in sorted(counts.items())))
    return "\n".join(lines)


def summary_markdown(rows: list[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(r[c] for c in SUMMARY_COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def summary_csv(rows: list[dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
