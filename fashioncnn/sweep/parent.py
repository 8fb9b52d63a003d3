"""The sweep's parent run: what the runs table shows for the whole command, its leaderboard and summary files."""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import time
import uuid
from pathlib import Path
from typing import Mapping

from mlflow.entities import Metric, Param, RunStatus

from fashioncnn.job import lease
from fashioncnn.sweep import overrides as ov
from fashioncnn.sweep.plan import Plan
from fashioncnn.sweep.summary import leaderboard, ranked_rows, summary_csv, summary_markdown, swept_keys
from fashioncnn.tracking import links, names, stores
from fashioncnn.tracking.secrets import mask_secrets

log = logging.getLogger(__name__)
MIN_RUNS_FOR_ANSWERS = 3  # runs that learned, before a sweep's parent shows its Pareto front and what mattered


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

    def close(self, rows: list[dict[str, str]], metric_name: str, status: str, saved: Mapping[str, float] | None = None,
              note: str = "") -> None:
        """The sweep's front page: the leaderboard and `note` as its description, its best figures, the summary files."""
        client = self.store.client
        client.log_text(self.run_id, summary_markdown(rows), "summary.md")
        client.log_text(self.run_id, summary_csv(rows), "summary.csv")
        board = leaderboard(rows, metric_name, self.base, self.experiment_id)
        try:
            found = answers(self.store, self.experiment_id, [row["run_id"] for row in rows if row["run_id"]], self.run_id,
                            metric_name, self.sweep_id)
        except Exception as error:  # the answers are extras: the summary and the parent's status must still land
            log.warning("the sweep's Pareto front and what mattered could not be drawn: %s", error)
            found = ""
        client.set_tag(self.run_id, "mlflow.note.content", fit_description(board, note + found))
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


def answers(store: stores.Store, experiment_id: str, run_ids: list[str], parent_run_id: str, metric_name: str,
            sweep_id: str) -> str:
    """With at least MIN_RUNS_FOR_ANSWERS of the sweep's runs (`run_ids`: this command's and those it skipped as done)
    that learned: pareto.png and importance.png as artifacts of its parent run, and their "Pareto front" and "What
    mattered" in a few lines for its description."""
    import tempfile

    from fashioncnn.analysis import importance, pareto
    from fashioncnn.analysis.points import learned, points_of

    ours = {r.info.run_id: r for r in store.find_runs(experiment_id, f"tags.{names.SWEEP_TAG} = '{sweep_id}'")}
    runs = [ours.get(run_id) or store.client.get_run(run_id) for run_id in dict.fromkeys(run_ids)]
    if len(learned(runs, metric_name)) < MIN_RUNS_FOR_ANSWERS:
        return ""
    points = points_of(runs, metric_name)
    front, mattered = pareto.answer(points, metric_name), importance.importance(points, metric_name)
    with tempfile.TemporaryDirectory() as folder:
        pareto.draw(front, Path(folder) / "pareto.png", f"sweep {sweep_id}")
        if mattered is not None:
            importance.draw(mattered, Path(folder) / "importance.png", f"sweep {sweep_id}")
        store.client.log_artifacts(parent_run_id, folder)
    text = "\n\n### Pareto front\n\n" + "\n".join(f"- {line}" for line in front.lines()) + "\n\n(pareto.png in the artifacts)"
    if mattered is not None:
        text += "\n\n### What mattered\n\n" + mattered.line() + (f" {mattered.warning}" if mattered.warning else "")
        text += " (importance.png in the artifacts)"
    return text


DESCRIPTION_LIMIT = 8000  # characters of a tag value in MLflow's stores (mlflow.note.content is a tag)


def fit_description(board: str, after: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """The leaderboard and what follows it, within `limit`: the leaderboard's last rows give way first
    (summary.md in the artifacts has them all), then the end of what follows."""
    if len(board) + len(after) <= limit:
        return board + after
    lines = board.rstrip("\n").split("\n")
    header, body = lines[:4], lines[4:]
    while body:
        body.pop()
        cut = f"| … {len(lines) - 4 - len(body)} more rows in summary.md |"
        text = "\n".join([*header, *body, cut]) + "\n"
        if len(text) + len(after) <= limit:
            return text + after
    return ("\n".join(header) + "\n" + after)[:limit]
