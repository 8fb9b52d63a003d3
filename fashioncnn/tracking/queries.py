"""Reading sweeps back from MLflow, for `fashioncnn.results.report` and `fashioncnn.results.retrain`.

A source is what a user names on the command line: an experiment name, a sweep id (the `sweep_id`
tag every job of one `-m` command carries), or a run id (a sweep's parent run, tagged
`fashioncnn.role=parent`, or one job's run). Parent runs are bookkeeping, never rows of a table.
Runs from before parent runs existed have only `sweep_id`; both kinds resolve the same way.

Ranking lives here (`rank`): report, retrain and the registry order runs with it. Kept free of torch,
so reports start quickly.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fashioncnn.core.config import learned_params, lower_is_better
from fashioncnn.tracking.names import DIVERGED_TAG, PARENT_TAG, PRUNED_TAG, ROLE_TAG, SWEEP_TAG
from fashioncnn.tracking.secrets import mask_secrets
from fashioncnn.tracking.stores import Store, resolve_tracking_uri, search_all, sqlite_path

# "auto": the metric the runs' own select_metric ranks by (best_val_acc by default; the study's runs and
# runs from before validation splits: max_test_acc).
DEFAULT_METRIC = "auto"
T = TypeVar("T")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ResultsError(Exception):
    """A problem with what the user asked for; the message is one line."""


def mask(uri: str) -> str:
    return mask_secrets(uri)


def tracking_uri(requested: str | None = None) -> str:
    """--tracking-uri, then $MLFLOW_TRACKING_URI, then ./mlruns/mlflow.db (fashioncnn.tracking.stores' default store).

    A local sqlite store that does not exist is an error here: MLflow would create an empty one. So is a
    tracking server that does not answer within seconds: MLflow's client would retry for minutes.
    """
    uri = resolve_tracking_uri(requested=requested)
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        raise ResultsError(f"no MLflow store at {path}: run a sweep first, or name the store "
                           "with --tracking-uri or MLFLOW_TRACKING_URI")
    store = Store(uri)
    try:
        store.check_reachable()
    except OSError as error:
        raise ResultsError(store.unanswered(error)) from error
    return uri


def is_parent(run: Run) -> bool:
    return run.data.tags.get(ROLE_TAG) == "parent"


def is_diverged(run: Run) -> bool:
    return run.data.tags.get(DIVERGED_TAG, "").lower() == "true"


def is_pruned(run: Run) -> bool:
    return run.data.tags.get(PRUNED_TAG, "").lower() == "true"


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
        for parent in search_all(client, sorted({r.info.experiment_id for r in jobs}), f"tags.`{ROLE_TAG}` = 'parent'"):
            if parent.data.tags.get(SWEEP_TAG) in missing:
                parents[parent.info.run_id] = parent
    return Selection(description, jobs, parents)


def select(client: MlflowClient, source: str) -> Selection:
    """The runs an experiment name, a sweep id or a run id stands for (ResultsError when none matches)."""
    if not source.strip():
        raise ResultsError("an empty name: give an experiment name, a sweep id or a run id (python -m fashioncnn.links "
                           "shows the latest sweep's)")
    experiment = client.get_experiment_by_name(source)
    if experiment is not None:
        return _with_parents(client, f"experiment {source}", search_all(client, [experiment.experiment_id]), {})
    experiment_ids = _experiment_ids(client)
    if experiment_ids:
        found = search_all(client, experiment_ids, f"tags.{SWEEP_TAG} = {_quote(source)}")
        if found:
            return _with_parents(client, f"sweep {source}", found, {})
    if _RUN_ID.match(source):
        try:
            run = client.get_run(source)
        except MlflowException:
            run = None
        if run is not None and is_parent(run):
            ids = [run.info.experiment_id]
            children = search_all(client, ids, f"tags.`{PARENT_TAG}` = {_quote(source)}")
            if SWEEP_TAG in run.data.tags:
                children += search_all(client, ids, f"tags.{SWEEP_TAG} = {_quote(run.data.tags[SWEEP_TAG])}")
            unique = {r.info.run_id: r for r in children if r.info.run_id != source}
            return _with_parents(client, f"parent run {source}", unique.values(), {source: run})
        if run is not None:
            return _with_parents(client, f"run {source}", [run], {})
    names = sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))
    raise ResultsError(f"{source}: no experiment, sweep id or run id of that name in {mask(client.tracking_uri)}; "
                       f"experiments: {', '.join(names) or '(none)'}")


def resolve_metric(runs: Iterable[Run], name: str) -> str:
    """`name`, or for "auto" the run-level metric the runs' select_metric ranks by (ResultsError if they disagree)."""
    if name != "auto":
        return name
    from fashioncnn.core.config import ranking_metric

    chosen = {ranking_metric(run.data.params.get("select_metric", "test_acc")) for run in runs}
    if len(chosen) > 1:
        raise ResultsError(f"--metric auto: these runs were selected by different metrics ({', '.join(sorted(chosen))}); "
                           "name one with --metric")
    return chosen.pop() if chosen else "max_test_acc"


def selectable(runs: list[Run], where: str) -> list[Run]:
    """The runs retrain and the registry may pick: FINISHED, not diverged, not pruned (ResultsError when none is)."""
    candidates = [r for r in runs if r.info.status == "FINISHED" and not is_diverged(r) and not is_pruned(r)]
    if not candidates:
        counts = Counter("diverged" if is_diverged(r) else "pruned" if is_pruned(r) else r.info.status for r in runs)
        listed = f" ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})" if counts else ""
        raise ResultsError(f"{where}: none of its {len(runs)} runs finished without diverging"
                           f"{' or being pruned' if 'pruned' in counts else ''}{listed}")
    return candidates


def not_config(param: str) -> bool:
    """Params that do not make two runs different configurations: where and how fast they ran, the
    parameter count, and the seed (what a configuration's mean and standard deviation are over)."""
    from fashioncnn.core.config import LEGACY_SPEED_KEYS, nested_not_learned_keys, not_learned_keys

    top = param.split(".", 1)[0]
    return (top in not_learned_keys() or top in LEGACY_SPEED_KEYS or param in ("seed", "param_count")
            or param in nested_not_learned_keys())


def configuration(run: Run) -> tuple:
    """What a run trained, seed aside: runs with the same configuration are the same experiment, other seeds.
    A run that logged no config (made elsewhere) is a configuration of its own."""
    learned = tuple(sorted((k, v) for k, v in learned_params(run.data.params).items() if not not_config(k)))
    return learned or (("run_id", run.info.run_id),)


@dataclass
class ConfigScore:
    """A configuration's runs and its mean, sample standard deviation (nan for one seed) and n on a metric."""

    runs: list[Run]
    mean: float
    std: float

    @property
    def n(self) -> int:
        return len(self.runs)

    def text(self, digits: int = 4) -> str:
        spread = "" if math.isnan(self.std) else f" ± {self.std:.{digits}f}"
        return f"{self.mean:.{digits}f}{spread} (n={self.n})"


def rank_configurations(runs: Iterable[Run], name: str, lowest_first: bool | None = None) -> list[ConfigScore]:
    """Configurations best first by the mean of their runs' metric (each run's best first inside)."""
    import statistics

    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if not math.isnan(metric(run, name)):
            groups.setdefault(configuration(run), []).append(run)
    scores = []
    for members in groups.values():
        values = [metric(r, name) for r in members]
        scores.append(ConfigScore(rank(members, name, lowest_first), statistics.fmean(values),
                                  statistics.stdev(values) if len(values) > 1 else math.nan))
    return rank(scores, name, lowest_first, score=lambda s: s.mean)


def within_noise(first: ConfigScore, second: ConfigScore) -> bool | None:
    """Whether two configurations' means differ by less than the larger of their standard deviations
    (None when neither has two seeds: no spread to compare with)."""
    spreads = [s.std for s in (first, second) if not math.isnan(s.std)]
    if not spreads:
        return None
    return abs(first.mean - second.mean) < max(spreads)


def metric(run: Run, name: str) -> float:
    value = run.data.metrics.get(name)
    return math.nan if value is None else float(value)


def rank(items: Iterable[T], name: str, lowest_first: bool | None = None, score: Callable[[T], float] | None = None) -> list[T]:
    """Best first by `name` (accuracies highest first, losses and times lowest first); those without a value last.

    Runs are scored by their metric `name`; anything else (a report row) by `score`. The one ranking of the package.
    """
    low = lower_is_better(name) if lowest_first is None else lowest_first
    value = score or (lambda run: metric(run, name))  # type: ignore[arg-type, return-value]
    items = list(items)
    scored = [item for item in items if not math.isnan(value(item))]
    without = [item for item in items if math.isnan(value(item))]
    return sorted(scored, key=value, reverse=not low) + without


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
