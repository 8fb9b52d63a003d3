"""Reading sweeps back from MLflow, for `fashioncnn.report` and `fashioncnn.retrain`.

A source is what a user names on the command line: an experiment name, a sweep id (the `sweep_id`
tag every job of one `-m` command carries), or a run id (a sweep's parent run, tagged
`fashioncnn.role=parent`, or one job's run). Parent runs are bookkeeping, never rows of a table.
Runs from before parent runs existed have only `sweep_id`; both kinds resolve the same way.

Kept free of torch (tracking.py imports the training loop), so reports start quickly.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fashioncnn.tracking import mask_secrets

ROLE_TAG = "fashioncnn.role"
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "sweep_id"
DIVERGED_TAG = "diverged"
DEFAULT_METRIC = "max_test_acc"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ResultsError(Exception):
    """A problem with what the user asked for; the message is one line."""


def mask(uri: str) -> str:
    return mask_secrets(uri)


def tracking_uri(requested: str | None = None) -> str:
    """--tracking-uri, then $MLFLOW_TRACKING_URI, then ./mlruns/mlflow.db (tracking.py's default store).

    A local sqlite store that does not exist is an error here: MLflow would create an empty one.
    """
    uri = requested or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlruns/mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise ResultsError(f"no MLflow store at {uri[len('sqlite:///'):]}: run a sweep first, or name the store "
                           "with --tracking-uri or MLFLOW_TRACKING_URI")
    return uri


def is_parent(run: Run) -> bool:
    return run.data.tags.get(ROLE_TAG) == "parent"


def is_diverged(run: Run) -> bool:
    return run.data.tags.get(DIVERGED_TAG, "").lower() == "true"


def lower_is_better(metric: str) -> bool:
    return metric.endswith(("loss", "seconds"))


@dataclass
class Selection:
    """The job runs a source names, and the parent runs of the sweeps they belong to."""

    description: str
    runs: list[Run]
    parents: dict[str, Run] = field(default_factory=dict)

    @property
    def parent(self) -> Run | None:
        """The parent run when all the runs come from one sweep that has one."""
        return next(iter(self.parents.values())) if len(self.parents) == 1 else None


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def _experiment_ids(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]


def _with_parents(client: MlflowClient, description: str, runs: Iterable[Run], parents: dict[str, Run]) -> Selection:
    """Split parent runs off the jobs, and find the parents of the jobs' sweeps."""
    jobs = []
    for run in runs:
        if is_parent(run):
            parents[run.info.run_id] = run
        else:
            jobs.append(run)
    jobs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
    for parent_id in {r.data.tags[PARENT_TAG] for r in jobs if PARENT_TAG in r.data.tags} - set(parents):
        try:
            parents[parent_id] = client.get_run(parent_id)
        except MlflowException:
            pass  # a parent deleted since; the jobs still count
    sweep_ids = {r.data.tags[SWEEP_TAG] for r in jobs if SWEEP_TAG in r.data.tags}
    known = {p.data.tags.get(SWEEP_TAG) for p in parents.values()}
    missing = sweep_ids - known
    if missing and jobs:
        for parent in _search(client, sorted({r.info.experiment_id for r in jobs}), f"tags.`{ROLE_TAG}` = 'parent'"):
            if parent.data.tags.get(SWEEP_TAG) in missing:
                parents[parent.info.run_id] = parent
    return Selection(description, jobs, parents)


def select(client: MlflowClient, source: str) -> Selection:
    """The runs an experiment name, a sweep id or a run id stands for (ResultsError when none matches)."""
    experiment = client.get_experiment_by_name(source)
    if experiment is not None:
        return _with_parents(client, f"experiment {source}", _search(client, [experiment.experiment_id]), {})
    experiment_ids = _experiment_ids(client)
    if experiment_ids:
        found = _search(client, experiment_ids, f"tags.{SWEEP_TAG} = {_quote(source)}")
        if found:
            return _with_parents(client, f"sweep {source}", found, {})
    if _RUN_ID.match(source):
        try:
            run = client.get_run(source)
        except MlflowException:
            run = None
        if run is not None and is_parent(run):
            ids = [run.info.experiment_id]
            children = _search(client, ids, f"tags.`{PARENT_TAG}` = {_quote(source)}")
            if SWEEP_TAG in run.data.tags:
                children += _search(client, ids, f"tags.{SWEEP_TAG} = {_quote(run.data.tags[SWEEP_TAG])}")
            unique = {r.info.run_id: r for r in children if r.info.run_id != source}
            return _with_parents(client, f"parent run {source}", unique.values(), {source: run})
        if run is not None:
            return _with_parents(client, f"run {source}", [run], {})
    names = sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))
    raise ResultsError(f"{source}: no experiment, sweep id or run id of that name in {mask(client.tracking_uri)}; "
                       f"experiments: {', '.join(names) or '(none)'}")


def metric(run: Run, name: str) -> float:
    value = run.data.metrics.get(name)
    return math.nan if value is None else float(value)


def rank(runs: list[Run], name: str, lowest_first: bool | None = None) -> list[Run]:
    """Best first by a metric (accuracies highest first, losses and times lowest first); runs without it last."""
    low = lower_is_better(name) if lowest_first is None else lowest_first
    with_metric = [r for r in runs if not math.isnan(metric(r, name))]
    without = [r for r in runs if math.isnan(metric(r, name))]
    return sorted(with_metric, key=lambda r: metric(r, name), reverse=not low) + without


def check_metric(runs: list[Run], name: str, where: str) -> None:
    if not any(name in r.data.metrics for r in runs):
        available = sorted({m for r in runs for m in r.data.metrics})
        raise ResultsError(f"--metric {name}: unknown metric in {where}; its runs have: {', '.join(available) or '(none)'}")


def param_value(text: Any) -> Any:
    """A param (always a string in MLflow) as a number when it is one."""
    if not isinstance(text, str):
        return text
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None if text == "None" else text
