"""The sweep's parent run: what the runs table shows for the whole command, its leaderboard and summary files."""

from __future__ import annotations

import hashlib
import json
import shlex
import time
import uuid
from typing import Mapping

from mlflow.entities import Metric, Param, RunStatus

from fashioncnn.job import lease
from fashioncnn.sweep import overrides as ov
from fashioncnn.sweep.plan import Plan
from fashioncnn.sweep.summary import leaderboard, ranked_rows, summary_csv, summary_markdown, swept_keys
from fashioncnn.tracking import links, names, stores
from fashioncnn.tracking.secrets import mask_secrets


class ParentRun:
    """The sweep's parent run. The same sweep run again (same jobs) re-attaches to the same parent."""

    def __init__(self, plan: Plan, store: stores.Store, experiment_id: str, sweep_fingerprint: str | None = None,
                 params: Mapping[str, str] | None = None, jobs: int | None = None) -> None:
        # A sampled search (fashioncnn.sweep.search) names itself by its study, its params by its space, its jobs by n_trials.
        self.store, self.experiment_id = store, experiment_id
        self.sweep_fingerprint = sweep_fingerprint or hashlib.sha256(
            json.dumps(sorted(job.fingerprint for job in plan.jobs)).encode()
        ).hexdigest()[:16]
        earlier = store.find_runs(experiment_id, f"tags.`{names.ROLE_TAG}` = 'parent' and "
                                              f"tags.{names.SWEEP_FINGERPRINT_TAG} = '{self.sweep_fingerprint}'")
        if earlier:
            self.run_id = earlier[0].info.run_id
            self.sweep_id = earlier[0].data.tags[names.SWEEP_TAG]
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
                    names.ROLE_TAG: "parent",
                    names.SWEEP_TAG: self.sweep_id,
                    names.SWEEP_FINGERPRINT_TAG: self.sweep_fingerprint,
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
        for run in self.store.find_runs(self.experiment_id, f"tags.{names.SWEEP_TAG} = '{self.sweep_id}' and attributes.status = 'RUNNING'"):
            if lease.held_elsewhere(run, float("inf")) and run.data.tags.get(lease.OWNER_TAG) != lease.PROCESS_OWNER:
                continue  # another command's (or a worker's) run, its heartbeat says when it is gone
            if run.info.run_id != self.run_id:
                self.store.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
