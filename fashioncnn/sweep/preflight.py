"""Preflight: every job of a command composed and validated once, before the first one trains.

The jobs are expanded exactly as Hydra's basic sweeper would (the preset's `hydra.sweeper.params`
first, then the command line, whose keys win), each composed with Hydra's compose API, checked against
the schema (unknown keys, types, ranges) and the model family (a feature map that collapses). Any
problem is one line naming the key, the value and what is allowed (ConfigError).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from fashioncnn.core import components, sources
from fashioncnn.core.config import BUILT_IN_TARGETS, Config, ConfigError, register_schema, validate
from fashioncnn.core.model import ModelSpec
from fashioncnn.sweep import overrides as ov

CONFIG_MODULE = "fashioncnn.conf"
CONFIG_NAME = "config"
# Where a value outside a study group is set directly, for the hint in "no such option" errors.
GROUP_KEYS = {
    "conv": "model.conv=4",
    "lin": "model.lin=5",
    "channels": "model.filter_in=8 model.filter_out=16",
    "lr": "optim.lr=0.0003",
}

Job = tuple[list[str], DictConfig]  # a job's overrides, as Hydra launches them, and its composed config


def compose_jobs(args: Sequence[str], options: Mapping[str, Sequence[str]]) -> list[Job]:
    """Every job of the (already rewritten) command line, composed and validated; ConfigError names the first bad one."""
    register_schema()
    overrides, multirun = ov.split_flags(args)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        try:
            job_overrides = _expand(overrides, multirun, options)
        except ConfigError:
            raise
        except Exception as error:
            raise ConfigError(explain(error, overrides)) from error
        return _compose_each(job_overrides, multirun and len(job_overrides) > 1)


def compose_listed(job_overrides: Sequence[list[str]], options: Mapping[str, Sequence[str]]) -> list[Job]:
    """These jobs (each a list of rewritten overrides), composed and validated; ConfigError names the first bad one."""
    register_schema()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return _compose_each(job_overrides, len(job_overrides) > 1)


def _compose_each(job_overrides: Sequence[list[str]], say_which: bool) -> list[Job]:
    jobs = []
    for job in job_overrides:
        try:
            cfg = compose(config_name=CONFIG_NAME, overrides=job)
            check_job(cfg)
        except Exception as error:
            where = f" (in job {ov.display_all(job)})" if say_which else ""
            raise ConfigError(explain(error, job) + where) from error
        jobs.append((list(job), cfg))
    return jobs


def check_job(cfg: DictConfig) -> None:
    """A composed job's keys, values and model, checked (raises; explain() makes the one line)."""
    _check_unknown_keys(cfg)
    validate(cfg)
    for group, targets in BUILT_IN_TARGETS.items():  # a team's own component: its module loads here, not in a failed job
        if cfg[group]._target_ not in targets.values():
            components.check(group, cfg[group])
    ModelSpec.from_config(cfg.model).check_feasible()


def jobs_of(args: Sequence[str], team_dirs: Sequence[Path] = ()) -> list[Job]:
    """The jobs a command line stands for, composed as `python -m fashioncnn` composes them (tests, benchmarks)."""
    options = sources.group_options(team_dirs)
    rewritten, _ = ov.rewrite(list(args), options)
    return compose_jobs(sources.with_search_path(rewritten, team_dirs), options)


def _expand(overrides: list[str], multirun: bool, options: Mapping[str, Sequence[str]]) -> list[list[str]]:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.types import RunMode

    loader = GlobalHydra.instance().config_loader()
    if not multirun:
        try:
            run_config = loader.load_configuration(CONFIG_NAME, list(overrides), run_mode=RunMode.RUN)
            params = OmegaConf.select(run_config, "hydra.sweeper.params")
        except Exception:
            return [overrides]  # composing the job itself reports the problem
        if params:  # without -m Hydra would run the defaults once, ignoring the preset's grid
            typed = ov.display_all(overrides)
            raise ConfigError(f"{typed}: defines a sweep over {', '.join(params)}; run it with -m: python -m fashioncnn -m {typed}")
        return [overrides]
    sweep_config = loader.load_configuration(CONFIG_NAME, list(overrides), run_mode=RunMode.MULTIRUN)
    params = OmegaConf.select(sweep_config, "hydra.sweeper.params") or {}
    preset, _ = ov.rewrite([f"{key}={value}" for key, value in params.items()], options)
    parser = OverridesParser.create(config_loader=loader)
    parsed = parser.parse_overrides(preset + list(overrides))
    for override in parsed:
        if override.is_interval_sweep():
            raise ConfigError(f"{override.input_line}: interval(...) samples a range, which a grid cannot list; "
                              f"search it with hydra/sweeper=optuna (python -m fashioncnn -m hydra/sweeper=optuna ...), "
                              f"or give values: choice(...) or range(...)")
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def known_keys(node: Any = None, prefix: str = "") -> list[str]:
    node = OmegaConf.structured(Config) if node is None else node
    keys = []
    for key, value in node.items():
        # a component's `options` are its own target's arguments: any key (fashioncnn.core.components checks them)
        nested = isinstance(value, DictConfig) and key != "options"
        keys += known_keys(value, f"{prefix}{key}.") if nested else [f"{prefix}{key}"]
    return keys


def check_machine(configs: Sequence[DictConfig], runs_here: bool) -> None:
    """What the jobs need of the machine that runs them, checked here when that is this machine: a CUDA
    device when one is asked for, and data that reads whole (ConfigError, one line)."""
    if not runs_here:
        return  # a cluster's nodes have their own GPUs and files
    from fashioncnn.core.data import check_local

    for device in sorted({cfg.device for cfg in configs if str(cfg.device).startswith("cuda")}):
        import torch  # only where a GPU is asked for: it takes seconds to load

        if not torch.cuda.is_available():
            raise ConfigError(f"device={device}: no CUDA device is available on this machine; use device=auto or device=cpu")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError(f"device={device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    for data_dir in sorted({cfg.data_dir for cfg in configs}):
        try:
            check_local(data_dir)
        except ValueError as error:  # damaged, or not Fashion-MNIST's shape
            raise ConfigError(str(error)) from error


def _check_unknown_keys(cfg: DictConfig) -> None:
    known = set(known_keys())
    for key in known_keys(cfg):
        if key not in known:
            raise ConfigError(f"{key}: unknown key; {_suggest(key, known)}")


def _override_for(key: str, job: list[str]) -> str:
    for override in job:
        if override.lstrip("+~").split("=", 1)[0] == key:
            return ov.display(override.lstrip("+~"))
    return key


PRESET_GROUPS = ("study", "arch")  # groups outside the defaults list: chosen with +study=..., +arch=...


def sweeper_keys() -> list[str]:
    """hydra.sweeper.* of the grid sweeper and of hydra/sweeper=optuna, as their config files declare them."""
    import yaml

    keys: set[str] = set()
    for name in ("fashioncnn", "optuna"):
        node = yaml.safe_load(sources.builtin_root().joinpath(f"hydra/sweeper/{name}.yaml").read_text()) or {}
        keys |= {f"hydra.sweeper.{key}" for key in node if not key.startswith("_") and key not in ("defaults", "jobs", "search")}
    return sorted(keys)


def _suggest(key: str, known: Sequence[str], all_of: str = "", prefix: str = "") -> str:
    """The known keys closest to a mistyped one (epoch -> epochs), or where to see them all (or, given `all_of`, them)."""
    import difflib

    leaf = {k.rsplit(".", 1)[-1]: k for k in known}  # lr -> optim.lr: a key given without its node
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6) or [leaf[k] for k in difflib.get_close_matches(
        key.rsplit(".", 1)[-1], list(leaf), n=3, cutoff=0.75)]
    if close:
        return f"did you mean {' or '.join(prefix + k for k in close)}?"
    return f"{all_of}{', '.join(known)}" if all_of else "every key: python -m fashioncnn --cfg job"


def explain(error: Exception, job: list[str]) -> str:
    """One line for a composition or validation error: the key, the value and what is allowed."""
    cause = error.__cause__
    if isinstance(error, ConfigError):
        return str(error)
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options is not None:
        group, _, option = error.missing_cfg_file.rpartition("/")
        hint = f"; a value outside the group is set directly, e.g. {GROUP_KEYS[group]}" if group in GROUP_KEYS else ""
        available = ov.sort_options(error.options)
        return f"{group}={option}: no option '{option}' in config group '{group}'; available: {', '.join(available)}{hint}"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        key = cause.full_key
        if key.startswith("hydra.sweeper."):  # the sweeper's own keys, not the job's
            leaves = [k.removeprefix("hydra.sweeper.") for k in sweeper_keys()]
            hint = _suggest(key.removeprefix("hydra.sweeper."), leaves, "the sweepers take: ", prefix="hydra.sweeper.")
            return f"{_override_for(key, job)}: unknown key '{key}'; {hint}"
        return f"{_override_for(key, job)}: unknown key '{key}'; {_suggest(key, known_keys())}"
    if isinstance(cause, ValidationError) and cause.full_key:
        return f"{_override_for(cause.full_key, job)}: {str(cause.msg).splitlines()[0]}"
    if isinstance(error, ConfigCompositionException) and "No match in the defaults list" in str(error):
        group = str(error).split("Could not override '", 1)[-1].split("'", 1)[0]
        typed = next((ov.display(o) for o in job if o.split("=", 1)[0] == group), group)
        return (f"{typed}: {group} is not chosen by default, so it is added with a +: +{typed}" if group in PRESET_GROUPS
                else str(error).splitlines()[0])
    if isinstance(error, ConfigCompositionException) and "Ambiguous value" in str(error):
        argument = ov.display(str(error).split("argument '", 1)[1].split("'\n", 1)[0])
        return f"{argument}: several values sweep only in multirun mode: python -m fashioncnn -m {argument}"
    if isinstance(error, OverrideParseException):
        return f"cannot parse the overrides {ov.display_all(job)}: {str(error).splitlines()[0]}"
    return str(error).splitlines()[0]
