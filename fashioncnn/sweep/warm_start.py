"""Warm start: a search begins from what its experiment already knows.

Before its first new trial a search (fashioncnn.sweep.search) tells its study every FINISHED job run of the
experiment, from any earlier grid or search, whose configuration lies in the search space: its values of
the searched keys are among the space's (a config group by its chosen option, the `group.<name>` tag; any
other key by its param) and its fingerprint is that of the search's fixed overrides with those values, so
a run at other epochs or on another subset is not taken for one of this search. Each becomes a COMPLETE
trial with its per-epoch values of the selection metric and the user attribute `mlflow_run_id`; a diverged
or pruned run a PRUNED one. They are marked `warm_start` and do not count towards n_trials; a run already
in the study (told once) is not told again.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import optuna
from mlflow.entities import Run
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from fashioncnn.core.config import ConfigError
from fashioncnn.sweep import preflight
from fashioncnn.sweep.plan import fingerprint
from fashioncnn.tracking import names, record, stores
from fashioncnn.tracking.queries import is_diverged, is_pruned, param_value

# The plan and its parameters are fashioncnn.sweep.search's SearchPlan and Param (which imports this module).
SearchPlan = Any
Param = Any

WARM_ATTR = "warm_start"  # the user attribute of a trial told from an earlier run, not asked for


def candidates(plan: SearchPlan, store: stores.Store, experiment_id: str | None) -> list[tuple[Run, dict[str, Any]]]:
    """The experiment's FINISHED job runs inside the search (newest of each configuration), each with its values."""
    if experiment_id is None:
        return []
    inside: dict[str, tuple[Run, dict[str, Any]]] = {}
    for run in store.find_runs(experiment_id, "attributes.status = 'FINISHED'"):  # newest first
        tags = run.data.tags
        fp = tags.get(names.FINGERPRINT_TAG)
        if tags.get(names.ROLE_TAG) != "job" or fp is None or fp in inside:
            continue
        values = values_in_space(run, plan.space)
        if values is not None and tellable(run, plan.settings.objectives):
            inside[fp] = (run, values)
    if not inside:
        return []
    hydra_args = [o for o in plan.args if o.lstrip("+~").startswith("hydra")]
    listed = [[*hydra_args, *plan.fixed, *(p.override(values[p.name]) for p in plan.space)] for _, values in inside.values()]
    try:
        composed = preflight.compose_listed(listed, {})
    except ConfigError:  # a value the space allows that no longer composes: none of them is worth the risk
        return []
    return [(run, values) for (fp, (run, values)), (_, cfg) in zip(inside.items(), composed) if fingerprint(cfg) == fp]


def learned(run: Run) -> bool:
    return not is_diverged(run) and not is_pruned(run)


def tellable(run: Run, objectives: Sequence[str]) -> bool:
    """A diverged or pruned run (told PRUNED), or one with a finite value of every objective (told COMPLETE)."""
    values = [run.data.metrics.get(name) for name in objectives]
    return not learned(run) or all(v is not None and math.isfinite(v) for v in values)


def values_in_space(run: Run, space: Sequence[Param]) -> dict[str, Any] | None:
    """The run's value of each searched key, as the space spells it; None when one lies outside the space."""
    values = {}
    for param in space:
        raw = run.data.tags.get(f"group.{param.name}") if param.group else run.data.params.get(param.name)
        value = None if raw is None else _within(param.distribution, raw)
        if value is None:
            return None
        values[param.name] = value
    return values


def _within(distribution: BaseDistribution, raw: str) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        number = param_value(raw)
        return next((c for c in distribution.choices if str(c) == raw or (isinstance(number, (int, float)) and not isinstance(c, bool)
                                                                         and isinstance(c, (int, float)) and c == number)), None)
    number = param_value(raw)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or math.isnan(number):
        return None
    try:
        inside = distribution._contains(distribution.to_internal_repr(number))
    except (ValueError, TypeError):
        return None
    return distribution.to_external_repr(distribution.to_internal_repr(number)) if inside else None


def tell(study: optuna.Study, plan: SearchPlan, found: list[tuple[Run, dict[str, Any]]], store: stores.Store) -> int:
    """Add the runs the study does not have yet as trials; returns how many."""
    known = {t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False)}
    select_metric = str(getattr(plan.base.select_metric, "value", plan.base.select_metric))
    objectives = plan.settings.objectives
    trials = []
    for run, values in found:
        if run.info.run_id in known:
            continue
        complete = learned(run)
        results = [run.data.metrics.get(name) for name in objectives]
        history = {m.step: m.value for m in store.client.get_metric_history(run.info.run_id, select_metric)}
        steps = record.epochs_reached(run, history) if len(objectives) == 1 else {}  # per-epoch values: one objective only
        trials.append(optuna.trial.create_trial(
            state=TrialState.COMPLETE if complete else TrialState.PRUNED,
            values=results if complete else None, params=values, distributions=plan.distributions,
            intermediate_values={step: float(value) for step, value in steps.items() if math.isfinite(value)},
            user_attrs={"mlflow_run_id": run.info.run_id, WARM_ATTR: True}))
    study.add_trials(trials)
    return len(trials)


def asked(trials: Sequence[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials the search asked for itself: those that count towards n_trials."""
    return [t for t in trials if not t.user_attrs.get(WARM_ATTR)]
