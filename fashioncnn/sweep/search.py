"""Sampled search with Optuna (`hydra/sweeper=optuna`): the search space, the study, its storage, its trials' runs.

The command line's sweeps become Optuna distributions (`take_space`): on any key `interval(a,b)` is a
float range (`int(interval(a,b))` an int range: Hydra reads interval's ends as floats unless cast),
`tag(log, interval(a,b))` the same on a log
scale, `choice(...)` and `a,b` a categorical, `range(a,b[,step])` an int (or stepped float) range. On a
config group the values are option names: `choice`, `range`, `glob` and `a,b` as for a grid, and
`interval(a,b)` means the options whose number lies within [a, b] (`lr=interval(0.001,0.01)` is the
options 0.001, 0.005, 0.01), for groups whose every option sets one number equal to its name (conv,
lin, lr; not channels, whose options set two). A preset's `hydra.sweeper.params` adds to the space
(`with_preset_space`). Everything else on the command line is fixed. The settings, with the keys of
Hydra's own Optuna sweeper and several objectives, are fashioncnn.sweep.search_settings'; before its first
new trial the study is told the experiment's finished runs in its space (fashioncnn.sweep.warm_start).

The study is stored next to the tracking store (mlruns/optuna.db for a local sqlite store, or
`hydra.sweeper.storage`), named after what it searches (space, fixed overrides, sampler, seed,
pruner), so the same command run again resumes it: its finished trials count towards n_trials,
trials a killed process left RUNNING are failed and queued again (their runs resume from their
checkpoints), and the sweep's parent run re-attaches. Each trial is planned like a grid job
(PlannedJob: fingerprint, skip a FINISHED run of the same config, resume one with a checkpoint)
and launched by the sweeper (hydra_plugins/fashioncnn_plugins/optuna_sweeper.py) with the study and
trial in its decision (fashioncnn/job/decision.py), where the job's pruner (fashioncnn/job/optuna_trial.py) reports to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, ValueType
from hydra.errors import HydraException
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)
from optuna.trial import TrialState

from fashioncnn.core import sources
from fashioncnn.core.config import ConfigError, register_schema
from fashioncnn.core.model import run_name
from fashioncnn.job import lease
from fashioncnn.job.decision import TrialRef, literal
from fashioncnn.job.optuna_trial import open_storage
from fashioncnn.job.pruning import PruningRule, pruning_rule
from fashioncnn.sweep import overrides as ov
from fashioncnn.sweep import preflight, warm_start
from fashioncnn.sweep.launch import close_sweep, decision, launch
from fashioncnn.sweep.overrides import SWEEPER_OVERRIDE
from fashioncnn.sweep.parent import ParentRun
from fashioncnn.sweep.plan import Plan, PlannedJob, decide, fingerprint, store_error
from fashioncnn.sweep.search_settings import Settings
from fashioncnn.sweep.summary import plan_metric_of
from fashioncnn.tracking import names, record, stores
from fashioncnn.tracking.secrets import mask_secrets

log = logging.getLogger(__name__)

# A study ranks trials by one metric in one experiment of one store: these cannot vary between trials.
NOT_SEARCHABLE = ("experiment", "tracking_uri", "select_metric")
STORAGE_FILE = "optuna.db"
SEARCH_KEY = "hydra.sweeper.search"  # the search, as a value for the Optuna sweeper (conf/hydra/sweeper/optuna.yaml)


# ------------------------------------------------------------------------------------------- search space


@dataclass
class Param:
    """One searched key: its Optuna distribution, and how a sampled value is written back as an override."""

    key: str  # the override's key as typed, with any + prefix (conv, optim.lr, +foo)
    typed: str  # the override as typed: conv=range(1,4)
    distribution: BaseDistribution
    group: bool = False  # values are option names of a config group

    @property
    def name(self) -> str:
        return self.key.lstrip("+~")

    def override(self, value: Any) -> str:
        if self.group:
            return ov.group_override(self.key, [str(value)])
        return f"{self.key}={_value_text(value)}"

    def describe(self) -> str:
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            what = ("options " if self.group else "one of ") + ", ".join(str(c) for c in d.choices)
        else:
            kind = "float" if isinstance(d, FloatDistribution) else "int"
            what = f"{kind} in [{d.low:g}, {d.high:g}]" + (" log scale" if d.log else "") + (f" step {d.step:g}" if d.step else "")
        return f"{self.name}: {what}  ({self.typed})"


def _value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    return text if ov._PLAIN.match(text) else ov.quote(text)


def _parse(arg: str) -> Override | None:
    try:
        return OverridesParser.create().parse_override(arg)
    except HydraException:
        return None


def numeric_options(group: str, names: Sequence[str], team_dirs: Sequence[Path] = ()) -> dict[str, float] | None:
    """Each option's number when every option of the group sets exactly one number equal to its name, else None."""
    roots = [sources.builtin_root(), *(d for d in team_dirs if d.is_dir())]
    values = {}
    for name in names:
        path = next((root.joinpath(f"{group}/{name}.yaml") for root in roots if root.joinpath(f"{group}/{name}.yaml").is_file()), None)
        if path is None:
            return None
        leaves = list(record.flatten(yaml.safe_load(path.read_text()) or {}))
        number = ov._as_number(name)
        if len(leaves) != 1 or number is None or isinstance(leaves[0][1], bool) or not isinstance(leaves[0][1], (int, float)) \
                or float(leaves[0][1]) != number:
            return None
        values[name] = number
    return values


def _interval(arg: str, interval: IntervalSweep) -> tuple[float, float, bool]:
    low, high, log_scale = interval.start, interval.end, "log" in (interval.tags or set())
    if low is None or high is None or not low < high:
        raise ConfigError(f"{arg}: an interval's low end must be below its high end (got {low:g} and {high:g}); "
                          f"e.g. interval({min(low, high):g},{max(low, high):g})")
    if log_scale and low <= 0:
        raise ConfigError(f"{arg}: a log scale needs a low end above 0 (got {low:g}); e.g. tag(log, interval(1e-4,{high:g}))")
    return low, high, log_scale


def _param(arg: str, override: Override, options: Mapping[str, Sequence[str]], team_dirs: Sequence[Path]) -> Param:
    key, value = override.get_key_element(), override._value
    name = override.key_or_group
    if name in NOT_SEARCHABLE:
        raise ConfigError(f"{arg}: {name} cannot be searched (a study ranks its trials by one metric in one experiment "
                          f"of one store); set it to one value, e.g. {name}={override.sweep_string_iterator().__next__()}")
    if name in options:
        if override.is_interval_sweep():
            assert isinstance(value, IntervalSweep)
            low, high, _ = _interval(arg, value)
            numbers = numeric_options(name, options[name], team_dirs)
            if numbers is None:
                raise ConfigError(f"{arg}: interval(...) on a config group picks the options whose number lies in it, but the "
                                  f"options of '{name}' ({', '.join(ov.sort_options(options[name]))}) are not each one number; "
                                  f"choose some: {name}=choice(a,b), range(...) or glob(...)")
            names = [option for option in ov.sort_options(numbers) if low <= numbers[option] <= high]
            if not names:
                raise ConfigError(f"{arg}: no option of config group '{name}' lies within [{low:g}, {high:g}]; "
                                  f"available: {', '.join(ov.sort_options(options[name]))}")
        else:
            expanded = ov._expand(override, options[name])
            if expanded is None or not expanded[0]:
                raise ConfigError(f"{arg}: matches no option of config group '{name}'; available: {', '.join(ov.sort_options(options[name]))}")
            names = list(dict.fromkeys(expanded[0]))
            unknown = [n for n in names if n not in options[name]]
            if unknown:
                raise ConfigError(f"{name}={unknown[0]}: no option '{unknown[0]}' in config group '{name}'; "
                                  f"available: {', '.join(ov.sort_options(options[name]))}")
        return Param(key, arg, CategoricalDistribution(names), group=True)
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        low, high, log_scale = _interval(arg, value)
        if isinstance(value.start, int) and isinstance(value.end, int) and not isinstance(value.start, bool):
            return Param(key, arg, IntDistribution(int(low), int(high), log=log_scale))
        return Param(key, arg, FloatDistribution(float(low), float(high), log=log_scale))
    if override.value_type == ValueType.RANGE_SWEEP:
        assert isinstance(value, RangeSweep)
        values = list(value.range())
        if not values:
            raise ConfigError(f"{arg}: an empty range")
        if all(isinstance(v, int) for v in values) and len(values) > 1:
            return Param(key, arg, IntDistribution(values[0], values[-1], step=values[1] - values[0]) if values[1] > values[0]
                         else CategoricalDistribution(values))
        return Param(key, arg, CategoricalDistribution(values))
    if override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
        choices = list(dict.fromkeys(override.sweep_iterator()))
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise ConfigError(f"{arg}: a search can choose numbers, strings, true/false or null, not lists or dicts")
        return Param(key, arg, CategoricalDistribution(choices))
    raise ConfigError(f"{arg}: hydra/sweeper=optuna searches interval(...), tag(log, interval(...)), choice(...), range(...) "
                      "and a,b; glob(...) only on config groups")


def take_space(args: Sequence[str], options: Mapping[str, Sequence[str]], team_dirs: Sequence[Path] = ()) -> tuple[list[Param], list[str]]:
    """The command line's sweeps as the search space, and the rest of the arguments (fixed overrides, flags)."""
    space: list[Param] = []
    rest, skip_next = [], False
    for arg in args:
        if skip_next or arg.startswith("-"):
            skip_next = arg in ov.FLAGS_WITH_VALUE
            rest.append(arg)
            continue
        override = _parse(arg)
        if override is None:
            raise ConfigError(f"{arg}: {ov._parse_error(arg)}")
        if override.is_hydra_override() or not override.is_sweep_override():
            rest.append(arg)
            continue
        param = _param(arg, override, options, team_dirs)
        if any(p.name == param.name for p in space):
            raise ConfigError(f"{arg}: {param.name} is searched twice; give it once")
        space.append(param)
    if not space:
        raise ConfigError("hydra/sweeper=optuna: nothing to search; give a key a range, e.g. optim.lr='tag(log, interval(1e-4,1e-2))' "
                          "or conv=1,2,3")
    return space, rest


# ------------------------------------------------------------------------------------------- settings and storage


def storage_url(requested: str | None, tracking_uri: str) -> str:
    """The study's RDB storage: hydra.sweeper.storage, else optuna.db in the folder of a local sqlite tracking store."""
    if requested:
        return requested
    path = stores.sqlite_path(tracking_uri)
    if path is not None:
        return f"sqlite:///{path.parent / STORAGE_FILE}"
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        folder = Path(tracking_uri[len("file:"):] if tracking_uri.startswith("file:") else tracking_uri)
        return f"sqlite:///{folder.resolve() / STORAGE_FILE}"
    what = "a tracking server" if tracking_uri.startswith(("http://", "https://")) else "a database tracking store"
    raise ConfigError(f"tracking store {mask_secrets(tracking_uri)}: {what} needs hydra.sweeper.storage for the Optuna study, "
                      "a database every worker reaches, e.g. hydra.sweeper.storage=postgresql://user:pass@dbhost/optuna")


def storage_exists(url: str) -> bool:
    return not url.startswith("sqlite:///") or Path(url[len("sqlite:///"):]).exists()


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class SearchPlan:
    args: list[str]  # the command line as Hydra gets it, without the searched keys
    typed: list[str]
    space: list[Param]
    fixed: list[str]  # the fixed job overrides (group options quoted)
    settings: Settings
    base: DictConfig  # the config of the first point of the space (experiment, store, select_metric)
    tracking_uri: str
    storage: str
    study_name: str
    metric: str  # the run-level metric a trial's value is (best_val_acc, ...)
    counts: dict[str, int] = field(default_factory=dict)  # the study's trials by state, as planned (warm start aside)
    warm: int = 0  # finished runs of the experiment in the space, not yet in the study: told first (warm start)

    @property
    def directions(self) -> list[str]:
        return self.settings.directions

    @property
    def rule(self) -> PruningRule:
        """The search's pruning rule: its jobs' `prune` (one for the whole study)."""
        return pruning_rule(self.base.prune)

    def to_value(self) -> dict[str, Any]:
        """The plan as plain data (JSON), for the sweeper that runs it."""
        return {"args": self.args, "typed": self.typed, "fixed": self.fixed, "settings": asdict(self.settings),
                "space": [{"key": p.key, "typed": p.typed, "group": p.group, "distribution": distribution_to_json(p.distribution)}
                          for p in self.space],
                "base": OmegaConf.to_container(self.base, resolve=True, enum_to_str=True), "tracking_uri": self.tracking_uri,
                "storage": self.storage, "study_name": self.study_name, "metric": self.metric, "counts": self.counts,
                "warm": self.warm}

    @classmethod
    def from_value(cls, value: Mapping[str, Any]) -> SearchPlan:
        space = [Param(p["key"], p["typed"], json_to_distribution(p["distribution"]), p["group"]) for p in value["space"]]
        return cls(list(value["args"]), list(value["typed"]), space, list(value["fixed"]), Settings(**value["settings"]),
                   OmegaConf.create(value["base"]), value["tracking_uri"], value["storage"], value["study_name"],
                   value["metric"], dict(value["counts"]), int(value.get("warm", 0)))

    @property
    def distributions(self) -> dict[str, BaseDistribution]:
        return {p.name: p.distribution for p in self.space}

    def target(self) -> int:
        """Trials to reach: n_trials, or every point of the grid when that is fewer."""
        if self.settings.is_grid:
            size = 1
            for values in grid_space(self.space).values():
                size *= len(values)
            return min(self.settings.n_trials, size)
        return self.settings.n_trials

    def describe(self) -> str:
        done = self.counts.get("COMPLETE", 0) + self.counts.get("PRUNED", 0)
        lines = [f"optuna search, study {self.study_name} in {mask_secrets(self.storage)}",
                 f"{self.settings.describe()}, pruner {self.rule.describe()}",
                 "search space:", *(f"  {p.describe()}" for p in self.space),
                 f"fixed: {ov.display_all(self.fixed) or '(defaults)'}"]
        if self.target() < self.settings.n_trials:
            lines.append(f"the grid has {self.target()} points: at most {self.target()} trials")
        if self.settings.warm_start:
            lines.append(f"warm start: {self.warm} finished run(s) of the experiment lie in the space and are not in the "
                         "study yet; they are told to it before its first new trial (hydra.sweeper.warm_start=false: none)")
        failed = self.counts.get("FAIL", 0)
        lines.append(f"{done} of {self.target()} trials already done ({self.counts.get('COMPLETE', 0)} complete, "
                     f"{self.counts.get('PRUNED', 0)} pruned" + (f"; {failed} failed, not counted" if failed else "")
                     + f"), {max(self.target() - done, 0)} to run")
        return "\n".join(lines)


def grid_space(space: Sequence[Param]) -> dict[str, list[Any]]:
    """Every value of each parameter, for sampler=grid (ConfigError for a continuous interval)."""
    grid = {}
    for p in space:
        d = p.distribution
        if isinstance(d, CategoricalDistribution):
            grid[p.name] = list(d.choices)
        elif d.step is None:
            raise ConfigError(f"{p.typed}: sampler=grid needs values it can list; use range(...) or choice(...), or sampler=tpe")
        else:
            n = int(round((d.high - d.low) / d.step)) + 1
            grid[p.name] = [d.low + i * d.step for i in range(n)]
    return grid


def _study_name(space: Sequence[Param], fixed: Sequence[str], settings: Settings, rule: PruningRule, experiment: str) -> str:
    """What the study searches, how, and with which fixed overrides: the same command, the same study."""
    identity = {
        "space": {p.name: repr(p.distribution) for p in space},
        "fixed": sorted(ov.display(o) for o in fixed),
        **settings.identity(), "pruner": rule.study_key(),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return f"{experiment}-{digest}"


def _hydra_overrides(args: Sequence[str]) -> list[str]:
    return [o for o in ov.split_flags(args)[0] if o.lstrip("+~").startswith("hydra")]


def _job_overrides(args: Sequence[str]) -> list[str]:
    return [o for o in ov.split_flags(args)[0] if not o.lstrip("+~").startswith("hydra")]


def plan(args: Sequence[str], typed: Sequence[str], options: Mapping[str, Sequence[str]], space: list[Param]) -> SearchPlan:
    """Check the search (settings, every value of the space composed), name its study, count its trials; writes nothing."""
    if not ov.split_flags(args)[1]:
        raise ConfigError(f"{SWEEPER_OVERRIDE}: a search runs many trials; add -m: python -m fashioncnn -m {' '.join(typed)}")
    sweeper_node = _sweeper_config(args)
    settings = Settings.from_config(sweeper_node)
    if swept := [p.typed for p in space if p.name.lstrip("+~").split(".", 1)[0] == "prune"]:
        raise ConfigError(f"{swept[0]}: a search has one pruning rule (its study's pruner); choose one, e.g. prune=median")
    if settings.is_grid:
        grid_space(space)
    fixed = _job_overrides(args)
    hydra_args = _hydra_overrides(args)
    # Every value of each searched key, the others at their first: bad options, unknown keys and models
    # that do not fit are refused here, before anything runs (a combination can still fail as a trial).
    first = {p.name: (p.distribution.choices[0] if isinstance(p.distribution, CategoricalDistribution) else p.distribution.low)
             for p in space}
    probes = [dict(first)]
    for p in space:
        d = p.distribution
        for value in (d.choices if isinstance(d, CategoricalDistribution) else (d.low, d.high)):
            if value != first[p.name]:
                probes.append({**first, p.name: value})
    jobs = preflight.compose_listed([hydra_args + fixed + [p.override(point[p.name]) for p in space] for point in probes], options)
    base = jobs[0][1]
    preflight.check_machine([cfg for _, cfg in jobs], runs_here=not any(
        arg.startswith("hydra/launcher=") and "slurm" in arg for arg in args))
    metric = plan_metric_of(base)
    settings = settings.for_metric(metric)
    _sampler(settings, space, 0)  # a sampler that cannot be built is refused here, in one line
    rule = pruning_rule(base.prune)
    if settings.objectives != [metric] and rule.name != "none":
        raise ConfigError(f"prune={rule.name}: the pruner judges each epoch's {getattr(base.select_metric, 'value', base.select_metric)}, "
                          f"the search's objectives are "
                          f"{', '.join(settings.objectives)}; prune only a search of {metric} alone, or run it with prune=none")
    uri = stores.resolve_tracking_uri(base)
    storage = storage_url(settings.storage, uri)
    try:
        stores.store(uri).check_reachable()
    except OSError as error:
        raise store_error(uri, base.experiment, error) from error
    name = settings.study_name or _study_name(space, fixed, settings, rule, base.experiment)
    search = SearchPlan(list(args), list(typed), space, fixed, settings, base, uri, storage, name, plan_metric_of(base))
    search.counts = _existing_counts(storage, name)
    if settings.warm_start:
        known = _known_runs(storage, name)
        experiment_id = stores.store(uri).experiment_id(base.experiment)
        search.warm = sum(run.info.run_id not in known for run, _ in warm_start.candidates(search, stores.store(uri), experiment_id))
    return search


def with_preset_space(args: Sequence[str], team_dirs: Sequence[Path] = ()) -> list[str]:
    """`args` with the search space a config gives in hydra.sweeper.params (a preset, a team's config), as
    Hydra's Optuna sweeper takes it; a key the command line sweeps or sets itself keeps the command line's value."""
    fixed = [a for a in args if (o := _parse(a)) is None or not o.is_sweep_override() or o.is_hydra_override()]
    params = _sweeper_config(sources.with_search_path(fixed, team_dirs)).get("params") or {}
    given = {o.key_or_group for a in ov.split_flags(args)[0] if (o := _parse(a)) is not None}
    return [*args, *(f"{key}={value}" for key, value in params.items() if key.lstrip("+~") not in given)]


def _sweeper_config(args: Sequence[str]) -> Mapping[str, Any]:
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    hydra_args = ov.split_flags(args)[0]  # all of them: a preset (+study=...) can set hydra.sweeper.* too
    register_schema()
    with initialize_config_module(config_module=preflight.CONFIG_MODULE, version_base="1.3"):
        try:
            loaded = GlobalHydra.instance().config_loader().load_configuration(preflight.CONFIG_NAME, hydra_args, run_mode=RunMode.MULTIRUN)
        except Exception as error:
            raise ConfigError(preflight.explain(error, hydra_args)) from error
        node = OmegaConf.to_container(loaded.hydra.sweeper, resolve=True)
    assert isinstance(node, dict)
    return node


def _known_runs(storage: str, name: str) -> set[str]:
    """The runs the study already has a trial for (told or trained), read without creating anything."""
    study = _existing_study(storage, name)
    return set() if study is None else {t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False)}


def _existing_study(storage: str, name: str) -> optuna.Study | None:
    if not storage_exists(storage):
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=open_storage(storage))
    except KeyError:  # no such study yet
        return None
    except Exception as error:
        raise ConfigError(f"Optuna storage {mask_secrets(storage)} cannot be read: {str(error).splitlines()[0]}") from error


def _existing_counts(storage: str, name: str) -> dict[str, int]:
    """The study's trials by state (warm start aside), read without creating anything (a dry run stays a dry run)."""
    study = _existing_study(storage, name)
    counts: dict[str, int] = {}
    if study is None:
        return counts
    for trial in warm_start.asked(study.get_trials(deepcopy=False)):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------- running it


@dataclass
class TrialJob(PlannedJob):
    """A trial's job: launched with every override, shown (summary, leaderboard) by the values it sampled."""

    sampled: int = 0  # how many of the overrides, at the end, the trial sampled

    @property
    def command(self) -> str:
        return mask_secrets(ov.display_all(self.overrides[len(self.overrides) - self.sampled:])) or "(defaults)"


class Search:
    """A search under way: its study, its sweep and parent run. The sweeper gets it as a value (`to_json`) and
    keeps what happens to each trial in the study (user attributes), where the closing summary reads it."""

    def __init__(self, plan: SearchPlan, study: optuna.Study, experiment_id: str, sweep_id: str, parent_run_id: str) -> None:
        self.plan, self.study, self.experiment_id = plan, study, experiment_id
        self.sweep_id, self.parent_run_id = sweep_id, parent_run_id
        # Trials this command may ask for: those missing when it started. A failed trial does not count
        # towards n_trials, but is not made up within the same command (a config that always fails
        # would loop); the next run of the command makes up for it.
        self.budget = max(self.remaining(), 0)
        self.asked: list[int] = []  # the numbers of the trials this command asked for

    @property
    def store(self) -> stores.Store:
        return stores.store(self.plan.tracking_uri)

    def remaining(self) -> int:
        counted = len(warm_start.asked(self.study.get_trials(deepcopy=False, states=counted_states())))
        return self.plan.target() - counted

    def to_ask(self) -> int:
        """How many trials the next batch asks for: n_jobs, or fewer near the end."""
        return max(min(self.plan.settings.n_jobs, self.remaining(), self.budget), 0)

    def ask(self) -> optuna.Trial:
        """A new trial of the search space, marked as this sweeper's (a lease's holder)."""
        trial = self.study.ask(self.plan.distributions)
        self.budget -= 1
        self.asked.append(trial.number)
        mark_owner(trial)
        return trial

    def too_many_failures(self) -> str | None:
        """Why the search stops asking (more of this command's trials failed than max_failure_rate), or None."""
        rate = self.plan.settings.max_failure_rate
        failed = [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in self.asked]
        if not self.asked or len(failed) / len(self.asked) <= rate:
            return None
        return (f"stopping the search: {len(failed)} of this command's {len(self.asked)} trials failed, more than "
                f"hydra.sweeper.max_failure_rate={rate:g}")

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        return list(self.plan.fixed) + [p.override(params[p.name]) for p in self.plan.space]

    def trial_job(self, trial: optuna.Trial, compose: Callable[[list[str]], DictConfig], runs: Mapping[str, list[Run]]) -> TrialJob:
        """The trial as a planned job: composed and checked, its fingerprint, and what the store says of it."""
        overrides = self.overrides(trial.params)
        cfg = compose(overrides)
        fp = fingerprint(cfg)
        done, resume, elsewhere = decide(cfg, runs.get(fp, []))
        job = TrialJob(trial.number, overrides, cfg, fp, run_name(cfg), self.plan.tracking_uri, done, resume, elsewhere,
                       sampled=len(self.plan.space))
        for key, value in (("overrides", overrides), ("fingerprint", fp), ("model_name", job.model_name)):
            trial.set_user_attr(key, value)
        return job

    def launch_overrides(self, job: PlannedJob, trial: optuna.Trial) -> list[str]:
        """The trial's job as the launcher gets it: its overrides and its decision, with the trial it reports to."""
        trial_ref = TrialRef(self.plan.study_name, self.plan.storage, trial._trial_id)
        return [*job.overrides, decision(job, self.experiment_id, self.sweep_id, self.parent_run_id, trial_ref).override()]

    def to_json(self) -> str:
        return json.dumps({"plan": self.plan.to_value(), "experiment_id": self.experiment_id, "sweep_id": self.sweep_id,
                           "parent_run_id": self.parent_run_id})

    @classmethod
    def from_json(cls, text: str) -> Search:
        value = json.loads(text)
        plan = SearchPlan.from_value(value["plan"])
        return cls(plan, open_study(plan), value["experiment_id"], value["sweep_id"], value["parent_run_id"])

    def runs_by_fingerprint(self) -> dict[str, list[Run]]:
        return self.store.runs_by_fingerprint(self.experiment_id)

    def tell(self, trial: optuna.Trial, run: Run | None, told_from_store: bool = False) -> str:
        """Tell Optuna what the trial's run came to; returns the status as the summary shows it."""
        if run is None:
            self.study.tell(trial, state=TrialState.FAIL)
            return "NOT RUN"
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        tags, metrics = run.data.tags, run.data.metrics
        if told_from_store:
            trial.set_user_attr("told_from_store", True)
            if not self.plan.settings.multi_objective:  # Optuna takes per-epoch values for one objective only
                self._report_epochs(trial, run)
        if run.info.status != "FINISHED":
            self.study.tell(trial, state=TrialState.FAIL)
            return run.info.status
        if tags.get(names.DIVERGED_TAG) == "true" or tags.get(names.PRUNED_TAG) == "true":
            self.study.tell(trial, state=TrialState.PRUNED)
            return "DIVERGED" if tags.get(names.DIVERGED_TAG) == "true" else "PRUNED"
        objectives = self.plan.settings.objectives
        if any(name not in metrics for name in objectives):
            self.study.tell(trial, state=TrialState.FAIL)
            return "FAILED"
        values = [metrics[name] for name in objectives]
        self.study.tell(trial, values if len(values) > 1 else values[0])
        return "FINISHED"

    def _report_epochs(self, trial: optuna.Trial, run: Run) -> None:
        """A trial told from a run it did not train gets that run's epochs, as the run's job reports them.

        Optuna's median pruner takes its median at epoch e over the COMPLETE trials with a value at e: a
        told trial without them would not count, and with few trials one value sets the bar for all.
        """
        select_metric = str(getattr(self.plan.base.select_metric, "value", self.plan.base.select_metric))
        history = {m.step: m.value for m in self.store.client.get_metric_history(run.info.run_id, select_metric)}
        for step, value in record.epochs_reached(run, history).items():
            trial.report(float(value), step)

    def summary_plan(self, before: set[int]) -> Plan:
        """The study's trials as a sweep plan: finished before this command (shown SKIPPED) and this command's."""
        runs = {r.info.run_id: r for r in self.store.find_runs(self.experiment_id, f"tags.{names.SWEEP_TAG} = '{self.sweep_id}'")}
        jobs = []
        for trial in self.study.get_trials(deepcopy=False):
            attrs, earlier = trial.user_attrs, trial.number in before
            if "fingerprint" not in attrs or (earlier and trial.state not in counted_states()):
                continue  # a trial whose config was refused, or an earlier command's failed one
            run_id = attrs.get("mlflow_run_id") if earlier or attrs.get("told_from_store") else None
            done = (runs.get(run_id) or self.store.client.get_run(run_id)) if run_id else None
            jobs.append(TrialJob(trial.number, list(attrs["overrides"]), self.plan.base, attrs["fingerprint"],
                                 attrs["model_name"], self.plan.tracking_uri, done, None, sampled=len(self.plan.space)))
        return Plan(self.plan.args, self.plan.typed, True, jobs)

    def rejected(self, before: set[int]) -> list[str]:
        """This command's trials whose sampled config could not be composed, one line each."""
        return [f"trial #{trial.number}: not run: {trial.user_attrs['rejected']}" for trial in self.study.get_trials(deepcopy=False)
                if trial.number not in before and "rejected" in trial.user_attrs]


def counted_states() -> tuple:
    """COMPLETE and PRUNED trials count towards n_trials; failed ones do not (a re-run makes up for them)."""
    return (TrialState.COMPLETE, TrialState.PRUNED)


def _sampler(settings: Settings, space: Sequence[Param], trials_so_far: int) -> optuna.samplers.BaseSampler:
    """The sampler, its seed moved on by the study's trials: a resumed study seeded afresh with the same
    seed would draw its first random points again (duplicates, told from the store but never new)."""
    from hydra.utils import instantiate

    node = dict(settings.sampler)
    if node.get("seed") is not None:
        node["seed"] += trials_so_far
    try:
        if settings.is_grid:  # its grid is the search space
            return AskTellGridSampler(grid_space(space), seed=node.get("seed"))
        return instantiate(node)
    except Exception as error:
        raise ConfigError(f"hydra.sweeper.sampler={settings.sampler}: cannot be built ({str(error).splitlines()[0]})") from error


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler without its study.stop() once the grid is covered: stop() works only inside
    study.optimize, and under ask/tell it raises before the last trial's state is saved. The sweeper
    stops by itself at the grid's size (SearchPlan.target)."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        return None


def _recover_interrupted(study: optuna.Study) -> int:
    """Trials left RUNNING by a sweeper process that is gone (kill -9, a lost machine): failed, and their
    parameters queued again, so their runs resume from their checkpoints. Returns how many."""
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _sweeper_gone(trial.user_attrs):
            continue  # another command on this machine is running it now
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
        recovered += 1
    return recovered


def _sweeper_gone(attrs: Mapping[str, Any]) -> bool:
    """Whether the sweeper that asked for a trial is gone: on this host, no live process has its PID and start
    time (a study from before holders: its PID is not alive); a sweeper on another host counts as gone."""
    if "sweeper_holder" in attrs:
        return lease.holder_gone_text(attrs["sweeper_holder"], elsewhere_gone=True)
    owner_host, owner_pid = attrs.get("sweeper_host"), attrs.get("sweeper_pid")
    return not (owner_host == socket.gethostname() and owner_pid is not None and _alive(int(owner_pid)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_owner(trial: optuna.Trial) -> None:
    """The sweeper that asked for the trial: host, PID and start time (as a lease's holder)."""
    trial.set_user_attr("sweeper_holder", lease.this_holder())


def open_study(plan: SearchPlan) -> optuna.Study:
    """The plan's study, created on first use; its sampler's seed moved on by the trials it had when planned.
    A study of that name with other directions (an explicit study_name used before) is refused in one line."""
    study = _create_study(plan)
    found = [d.name.lower() for d in study.directions]
    if found != plan.directions:
        raise ConfigError(f"study {plan.study_name}: it {' and '.join(found)}s, this search would {' and '.join(plan.directions)} "
                          f"{', '.join(plan.settings.objectives)}; give hydra.sweeper.study_name another name")
    return study


def _create_study(plan: SearchPlan) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.create_study(
            study_name=plan.study_name, storage=open_storage(plan.storage), directions=plan.directions,
            sampler=_sampler(plan.settings, plan.space, sum(plan.counts.values())),
            pruner=plan.rule.optuna_pruner(), load_if_exists=True)
    except Exception as error:
        raise ConfigError(f"Optuna storage {mask_secrets(plan.storage)} cannot be used: {str(error).splitlines()[0]}") from error


def run(search_plan: SearchPlan) -> int:
    """Run the search to n_trials; returns the exit code as launch.run does."""
    from fashioncnn.job.signals import handle_sigterm

    store = stores.store(search_plan.tracking_uri)
    try:
        experiment_id = store.experiment_id(search_plan.base.experiment, create=True)
    except Exception as error:
        raise store_error(search_plan.tracking_uri, search_plan.base.experiment, error) from error
    assert experiment_id is not None
    study = open_study(search_plan)
    study.set_user_attr("command", mask_secrets(" ".join(search_plan.typed)))
    recovered = _recover_interrupted(study)
    # Trials queued again (WAITING) already have their numbers, but this command runs them.
    before = {t.number for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING}
    handle_sigterm()
    parent = ParentRun(Plan(search_plan.args, search_plan.typed, True, []), store, experiment_id,
                       sweep_fingerprint=search_plan.study_name, jobs=search_plan.settings.n_trials,
                       params={p.name: p.typed.split("=", 1)[1] for p in search_plan.space})
    parent.store.client.set_tag(parent.run_id, names.STUDY_TAG, search_plan.study_name)
    search = Search(search_plan, study, experiment_id, parent.sweep_id, parent.run_id)
    warmed = warm_start.tell(study, search_plan, warm_start.candidates(search_plan, store, experiment_id), store) \
        if search_plan.settings.warm_start else 0
    done = len(warm_start.asked(study.get_trials(deepcopy=False, states=counted_states())))
    print(f"search {parent.sweep_id}: study {search_plan.study_name}, {done} of {search_plan.target()} trials already done"
          + (f", {recovered} interrupted trial(s) queued again" if recovered else "")
          + (f"; warm start: told {warmed} finished run(s) of the experiment" if warmed else "")
          + (" (re-attached to its parent run)" if parent.reattached else ""), flush=True)
    interrupted = launch(parent, [*search_plan.args, f"{SEARCH_KEY}={literal(search.to_json())}"])
    rejected = search.rejected(before)
    for line in rejected:
        print(line, flush=True)
    best = best_lines(study, search_plan.settings.objectives)
    note = "\n\n### The study\n\n" + "\n".join(f"- {line.strip()}" for line in best) if best else ""
    code = close_sweep(search.summary_plan(before), parent, {(search_plan.tracking_uri, search_plan.base.experiment): experiment_id},
                       interrupted, search_plan.tracking_uri, search_plan.metric, note)
    for line in best:
        print(line, flush=True)
    return 1 if code == 0 and rejected else code


def best_lines(study: optuna.Study, objectives: Sequence[str]) -> list[str]:
    """The best trial; with several objectives the study's Pareto set, one trial a line."""
    def described(trial: optuna.trial.FrozenTrial) -> str:
        values = ", ".join(f"{name} {value:.6g}" for name, value in zip(objectives, trial.values))
        return f"#{trial.number}: {values} with {', '.join(f'{k}={v}' for k, v in trial.params.items())}"

    if len(objectives) > 1:
        front = sorted(study.best_trials, key=lambda t: t.number)
        return [f"Pareto set of the study ({len(front)} trials: none is beaten on every objective by another):",
                *(f"  {described(trial)}" for trial in front)] if front else []
    try:
        best = study.best_trial
    except ValueError:
        return []
    return [f"best trial #{best.number}: {best.value:.4f} with {', '.join(f'{k}={v}' for k, v in best.params.items())}"]
