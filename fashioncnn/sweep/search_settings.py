"""A search's settings: `hydra.sweeper.*` of conf/hydra/sweeper/optuna.yaml (or a preset), read and checked.

The keys of Hydra's own Optuna sweeper work as there: `direction` (one, or a list for several objectives),
`study_name`, `storage`, `n_trials`, `n_jobs`, `max_failure_rate`, `params` (the search space, read by
fashioncnn.sweep.search) and `sampler` as a node with `_target_` (hydra/sweeper/sampler=tpe|random|grid|nsgaii
chooses one, `hydra.sweeper.sampler.seed=1` sets its seed) as well as a short name (`hydra.sweeper.sampler=random`).
fashioncnn's own: `objectives` (the run-level metrics a trial returns, default the ranking metric) and
`warm_start` (tell the study the experiment's finished runs first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from fashioncnn.core.config import ConfigError, lower_is_better

# A short name, and the sampler it stands for (Optuna 5's TPE defaults pinned, so that parallel searches
# behave as documented whatever a later Optuna changes).
SAMPLER_NAMES = {
    "tpe": {"_target_": "optuna.samplers.TPESampler", "multivariate": True, "constant_liar": True},
    "random": {"_target_": "optuna.samplers.RandomSampler"},
    "grid": {"_target_": "optuna.samplers.GridSampler"},
    "nsgaii": {"_target_": "optuna.samplers.NSGAIISampler"},
}
DIRECTIONS = ("maximize", "minimize")
# What a trial can return besides its ranking metric: the run-level metrics every job logs (fashioncnn.tracking.record).
OBJECTIVES = ("max_test_acc", "mean_test_acc", "test_acc_at_best", "param_count", "train_seconds")
# Keys of Hydra's Optuna sweeper that a fashioncnn search cannot honour, and what to use instead.
REFUSED = {
    "custom_search_space": "a Python function cannot reach the study here; give the space in hydra.sweeper.params or on the command line",
    "search_space": "Hydra's older spelling; give the space in hydra.sweeper.params",
}


@dataclass
class Settings:
    """hydra.sweeper.* checked: the sampler as a node with `_target_`, the objectives with their directions."""

    n_trials: int = 20
    sampler: dict[str, Any] = field(default_factory=lambda: {**SAMPLER_NAMES["tpe"], "seed": 0})
    n_jobs: int = 1
    storage: str | None = None
    study_name: str | None = None
    objectives: list[str] = field(default_factory=list)  # empty: the ranking metric alone
    directions: list[str] = field(default_factory=list)  # one per objective, filled in by `for_metric`
    warm_start: bool = True
    max_failure_rate: float = 1.0  # the share of failed trials at which the search stops asking (1.0: never)
    ranking_metric: str = ""  # the search's ranking metric, the objective by default (set by `for_metric`)

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> Settings:
        for key, why in REFUSED.items():
            if node.get(key) is not None:
                raise ConfigError(f"hydra.sweeper.{key}: not supported: {why}")
        settings = cls(sampler=_sampler_node(node.get("sampler", "tpe"), node.get("seed")),
                       **{k: node[k] for k in ("n_trials", "n_jobs", "storage", "study_name", "warm_start") if node.get(k) is not None})
        for key in ("n_trials", "n_jobs"):
            value = getattr(settings, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"hydra.sweeper.{key}={value}: must be an integer >= 1")
        if not isinstance(settings.warm_start, bool):
            raise ConfigError(f"hydra.sweeper.warm_start={settings.warm_start}: must be true or false")
        rate = node.get("max_failure_rate")
        if rate is not None:
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
                raise ConfigError(f"hydra.sweeper.max_failure_rate={rate}: must be a number from 0 to 1")
            settings.max_failure_rate = float(rate)
        settings.objectives = _listed(node.get("objectives"), "objectives")
        settings.directions = [str(d).lower() for d in _listed(node.get("direction"), "direction")]
        return settings

    def for_metric(self, metric: str) -> Settings:
        """The objectives (default: `metric`, the ranking metric) with a direction each, checked against each other."""
        objectives = self.objectives or [metric]
        logged = list(dict.fromkeys([metric, *OBJECTIVES]))
        for name in objectives:
            if name not in logged:
                raise ConfigError(f"hydra.sweeper.objectives: {name} is not a metric every run of this search logs; "
                                  f"allowed: {', '.join(logged)}")
        if len(set(objectives)) < len(objectives):
            raise ConfigError(f"hydra.sweeper.objectives={objectives}: each metric once")
        natural = ["minimize" if lower_is_better(name) else "maximize" for name in objectives]
        directions = self.directions or natural
        if len(directions) == 1 and len(objectives) > 1:
            raise ConfigError(f"hydra.sweeper.direction={directions[0]}: {len(objectives)} objectives ({', '.join(objectives)}) "
                              f"need as many directions, e.g. direction=[{','.join(natural)}]")
        if len(directions) != len(objectives):
            raise ConfigError(f"hydra.sweeper.direction={directions}: {len(directions)} directions for {len(objectives)} objectives "
                              f"({', '.join(objectives)}); give one each, or set hydra.sweeper.objectives")
        for name, direction, expected in zip(objectives, directions, natural):
            if direction not in DIRECTIONS:
                raise ConfigError(f"hydra.sweeper.direction={direction}: allowed: maximize, minimize")
            if direction != expected:
                raise ConfigError(f"hydra.sweeper.direction={direction} for {name}, which is better when it is "
                                  f"{'lower' if expected == 'minimize' else 'higher'}; use direction={expected}, or name "
                                  "the metric you mean in hydra.sweeper.objectives")
        return Settings(self.n_trials, dict(self.sampler), self.n_jobs, self.storage, self.study_name, objectives, directions,
                        self.warm_start, self.max_failure_rate, metric)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def sampler_name(self) -> str:
        """The short name of a built-in sampler as configured, else its target."""
        options = {k: v for k, v in self.sampler.items() if k != "seed"}
        return next((name for name, node in SAMPLER_NAMES.items() if node == options), self.sampler["_target_"])

    @property
    def is_grid(self) -> bool:
        """Whether the sampler is Optuna's GridSampler (or one of its kind): its grid is the search space."""
        import optuna
        from hydra.utils import get_object

        try:
            target = get_object(self.sampler["_target_"])
        except Exception:
            return False  # building it says what is wrong
        return isinstance(target, type) and issubclass(target, optuna.samplers.GridSampler)

    @property
    def seed(self) -> int | None:
        return self.sampler.get("seed")

    def identity(self) -> dict[str, Any]:
        """What names the study besides its space: as before objectives and sampler nodes existed, for a study of one
        objective and a built-in sampler (the same command finds the same study)."""
        found: dict[str, Any] = {"sampler": self.sampler_name, "seed": self.seed}
        if self.sampler_name not in SAMPLER_NAMES:
            found["sampler"] = json.dumps(self.sampler, sort_keys=True)
        if self.objectives != [self.ranking_metric]:
            found["objectives"] = list(zip(self.objectives, self.directions))
        return found

    def describe(self) -> str:
        seed = f" (seed {self.seed})" if self.seed is not None else ""
        goals = ", ".join(f"{d} {o}" for o, d in zip(self.objectives, self.directions))
        return f"sampler {self.sampler_name}{seed}, n_trials {self.n_trials}, {self.n_jobs} per batch, {goals}"


def _sampler_node(value: Any, seed: Any) -> dict[str, Any]:
    """A sampler as a node with `_target_`: a short name expanded, a node taken as it is; `seed` (the top-level
    hydra.sweeper.seed) wins over the node's own."""
    if isinstance(value, str):
        if value not in SAMPLER_NAMES:
            raise ConfigError(f"hydra.sweeper.sampler={value}: allowed: {', '.join(SAMPLER_NAMES)}, or a node with _target_ "
                              "(e.g. hydra.sweeper.sampler={_target_:optuna.samplers.RandomSampler,seed:1})")
        node: dict[str, Any] = {**SAMPLER_NAMES[value], "seed": 0}
    elif isinstance(value, Mapping) and isinstance(value.get("_target_"), str):
        node = dict(value)
        if node["_target_"] != SAMPLER_NAMES["tpe"]["_target_"]:
            # A node given with another _target_ merges onto the default TPE node: its pinned options are TPE's alone.
            for key in ("multivariate", "constant_liar"):
                if node.get(key) == SAMPLER_NAMES["tpe"][key]:
                    del node[key]
    else:
        raise ConfigError(f"hydra.sweeper.sampler={value}: a sampler's short name ({', '.join(SAMPLER_NAMES)}) or a node with _target_")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"hydra.sweeper.seed={seed}: must be an integer or null")
        node["seed"] = seed
    return node


def _listed(value: Any, key: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence):
        return list(value)
    raise ConfigError(f"hydra.sweeper.{key}={value}: one name or a list of them")
