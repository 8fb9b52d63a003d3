"""Configurations as points: the finished runs of a selection, seeds folded into their configuration.

A configuration is what its runs trained, seed aside (fashioncnn.tracking.queries.configuration); its point
carries the mean and sample standard deviation of the ranking metric over its seeds, its parameter count,
its mean training seconds and the values of the keys the selection swept.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from mlflow.entities import Run

from fashioncnn.tracking.names import ROLE_TAG
from fashioncnn.tracking.queries import is_diverged, is_pruned, metric, param_value, rank_configurations

GROUP_TAG_PREFIX = "group."


@dataclass
class Point:
    runs: list[Run]  # best first
    mean: float  # of the ranking metric over the seeds
    std: float  # sample standard deviation; nan for one seed
    param_count: float
    train_seconds: float  # mean over the seeds
    swept: dict[str, object] = field(default_factory=dict)  # the selection's swept keys: this point's values
    label: str = ""

    @property
    def n(self) -> int:
        return len(self.runs)

    def value_text(self, metric_name: str) -> str:
        scale, unit = (100, "%") if is_fraction(metric_name) else (1, "")
        spread = "" if math.isnan(self.std) else f" ± {scale * self.std:.2f}{unit}"
        return f"{scale * self.mean:.2f}{unit}{spread}" + (f" (n={self.n})" if self.n > 1 else "")


def is_fraction(metric_name: str) -> bool:
    """Accuracies are fractions, shown and compared in percentage points."""
    return metric_name.endswith("_acc")


def learned(runs: list[Run], metric_name: str) -> list[Run]:
    """The runs that trained to their end: FINISHED job runs, not pruned, not diverged, with the metric."""
    return [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get(ROLE_TAG) != "parent" and not is_pruned(r)
            and not is_diverged(r) and not math.isnan(metric(r, metric_name))]


def points_of(runs: list[Run], metric_name: str) -> list[Point]:
    """One point per configuration of the runs that learned, best first by the mean of `metric_name`."""
    points = []
    for score in rank_configurations(learned(runs, metric_name), metric_name):
        seconds = [metric(r, "train_seconds") for r in score.runs]
        points.append(Point(score.runs, score.mean, score.std, _param_count(score.runs[0]),
                            statistics.fmean(seconds) if not any(map(math.isnan, seconds)) else math.nan))
    swept = swept_keys(points)
    for index, point in enumerate(points):
        point.swept = {key: values[index] for key, values in swept.items()}
        point.label = _label(point, swept)
    return points


def _param_count(run: Run) -> float:
    count = metric(run, "param_count")
    return count if not math.isnan(count) else float(param_value(run.data.params.get("param_count")) or math.nan)


def swept_keys(points: list[Point]) -> dict[str, list[object]]:
    """The keys whose values differ between the points, each point's value in order: a config group by its
    option (`channels`: 32.64) where one was chosen, and any param that no varying group's choice fixes."""
    def varying(values: list[object]) -> bool:
        return None not in values and len(set(map(str, values))) > 1

    tags = [p.runs[0].data.tags for p in points]
    params = [p.runs[0].data.params for p in points]
    groups = {key[len(GROUP_TAG_PREFIX):] for t in tags for key in t if key.startswith(GROUP_TAG_PREFIX)}
    # A group's options are names (channels 32.64 is no number between 32 and 33): categories.
    found: dict[str, list[object]] = {g: [t.get(GROUP_TAG_PREFIX + g) for t in tags] for g in sorted(groups)}
    found = {g: values for g, values in found.items() if varying(values)}
    learned_keys = set().union(*(p.keys() for p in params)) if params else set()
    for key in sorted(learned_keys):
        logged = [p.get(key) for p in params]
        if key in ("seed", "param_count") or key.endswith("._target_") or None in logged or len(set(logged)) < 2:
            continue  # not swept, or not logged by every run; a value logged as None counts (subset=None: every image)
        values = [param_value(text) for text in logged]
        if any(_fixed_by(group_values, values) for group_values in found.values()):
            continue  # model.filter_in follows channels; optim.lr follows lr
        found[key] = values
    return found


def _fixed_by(group_values: list[object], values: list[object]) -> bool:
    seen: dict[str, str] = {}
    return all(seen.setdefault(str(g), str(v)) == str(v) for g, v in zip(group_values, values))


def _label(point: Point, swept: dict[str, list[object]]) -> str:
    """The model's name, with the swept keys it does not already say (lr=0.001, schedule=cosine)."""
    name = point.runs[0].data.tags.get("model_name") or point.runs[0].info.run_name or point.runs[0].info.run_id[:8]
    said_by_name = {"conv", "lin", "channels", "model.conv", "model.lin", "model.filter_in", "model.filter_out", "arch"}
    extra = [f"{key.rsplit('.', 1)[-1]}={point.swept[key]}" for key in swept if key not in said_by_name]
    return " ".join([name, *extra])
