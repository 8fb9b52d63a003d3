"""Command line: `python -m fashioncnn [-m] [overrides]`, a Hydra app with one job per model.

Three steps, in this order:
1. Numeric group options. The config groups conv, lin, channels and lr have options named like
   numbers (conf/conv/2.yaml, conf/channels/32.64.yaml). Hydra's override parser reads `conv=2` as
   the int 2 and refuses it as a group choice, so the arguments are rewritten to `conv='2'` before
   Hydra sees them. The groups stay real config groups (a team adds files to extend them) and
   the command line stays the study's own spelling.
2. Preflight. Every job of the command (every combination of a sweep) is composed and validated
   before the first one trains, and any problem is reported as one line naming the key, the value
   and what is allowed.
3. Hydra runs the jobs (`run_job`), each a model trained and logged as one MLflow run.
"""

from __future__ import annotations

import logging
import re
import sys
from importlib import resources
from typing import Any, Iterable, Sequence

import hydra
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from fashioncnn import sources
from fashioncnn.config import Config, ConfigError, register_schema, validate

log = logging.getLogger("fashioncnn")

CONFIG_MODULE = "fashioncnn.conf"
CONFIG_NAME = "config"
# Where a value outside a study group is set directly, for the hint in "no such option" errors.
GROUP_KEYS = {
    "conv": "model.conv=4",
    "lin": "model.lin=5",
    "channels": "model.filter_in=8 model.filter_out=16",
    "lr": "optim.lr=0.0003",
}
_OVERRIDE = re.compile(r"^(?P<prefix>[+~]{0,2})(?P<key>[\w/.\-]+)(?P<package>@[\w.]*)?=(?P<value>.*)$")
# A plain comma list (no quotes, brackets, function calls or interpolations) is a list of option names.
_PLAIN_LIST = re.compile(r"^[^'\"()\[\]{}$\\]+$")
_MULTIRUN_FLAGS = ("-m", "--multirun")
_FLAGS_WITH_VALUE = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "--experimental-rerun")


def config_groups() -> set[str]:
    """Names of the config groups shipped in conf/ (each a folder of option files)."""
    return {entry.name for entry in resources.files(CONFIG_MODULE).iterdir() if entry.is_dir() and not entry.name.startswith("_")}


def quote_numeric_group_options(args: Sequence[str], groups: Iterable[str]) -> list[str]:
    """conv=2,3 -> conv='2','3' for config groups, so Hydra takes the numbers as option names.

    Quoted values, functions such as glob(*) and anything else Hydra's grammar has are left alone.
    """
    groups, rewritten, skip_next = set(groups), [], False
    for arg in args:
        if skip_next or arg.startswith("-"):
            skip_next = arg in _FLAGS_WITH_VALUE
            rewritten.append(arg)
            continue
        match = _OVERRIDE.match(arg)
        if match and match["key"] in groups and _PLAIN_LIST.match(match["value"]):
            options = ",".join(f"'{option.strip()}'" for option in match["value"].split(","))
            arg = f"{match['prefix']}{match['key']}{match['package'] or ''}={options}"
        rewritten.append(arg)
    return rewritten


def hydra_overrides(args: Sequence[str]) -> tuple[list[str], bool]:
    """The override arguments (flags and their values dropped) and whether -m was given."""
    overrides, multirun, skip_next = [], False, False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in _MULTIRUN_FLAGS:
            multirun = True
        elif arg in _FLAGS_WITH_VALUE:
            skip_next = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, multirun


def expand_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """One override list per job, exactly as Hydra's basic sweeper will launch them.

    Like BasicSweeper.sweep: the grid in the config's `hydra.sweeper.params` (a preset such as
    `+study=step1-conv` puts it there) comes first, then the command line, whose keys win.
    """
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
            raise ConfigError(f"{_unquoted(overrides)}: defines a sweep over {', '.join(params)}; run it with -m: "
                              f"python -m fashioncnn -m {_unquoted(overrides)}")
        return [overrides]
    sweep_config = loader.load_configuration(CONFIG_NAME, list(overrides), run_mode=RunMode.MULTIRUN)
    params = OmegaConf.select(sweep_config, "hydra.sweeper.params") or {}
    params_conf = [f"{key}={value}" for key, value in params.items()]
    parser = OverridesParser.create(config_loader=loader)
    _check_preset_params(parser, params_conf)
    batches = BasicSweeper.split_arguments(parser.parse_overrides(params_conf + list(overrides)), max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def _check_preset_params(parser: OverridesParser, params_conf: list[str]) -> None:
    """A preset's grid reaches Hydra without the command line's quoting: conv: 1,2 would be ints there."""
    from hydra.core.override_parser.types import QuotedString

    groups = config_groups()
    for param, override in zip(params_conf, parser.parse_overrides(params_conf)):
        value = override.value()
        values = value.list if override.is_sweep_override() and hasattr(value, "list") else [value]
        if override.key_or_group in groups and not all(isinstance(v, (str, QuotedString)) for v in values):
            key, raw = param.lstrip("+~").split("=", 1)
            quoted = quote_numeric_group_options([param], groups)[0].split("=", 1)[1]
            raise ConfigError(f"hydra.sweeper.params: {key}: {raw}: a preset must quote the options of config group "
                              f"'{key}' (Hydra reads them as numbers): {key}: \"{quoted}\"")


def _known_keys(node: Any = None, prefix: str = "") -> list[str]:
    node = OmegaConf.structured(Config) if node is None else node
    keys = []
    for key, value in node.items():
        keys += _known_keys(value, f"{prefix}{key}.") if isinstance(value, DictConfig) else [f"{prefix}{key}"]
    return keys


def _override_for(key: str, job: list[str]) -> str:
    for override in job:
        match = _OVERRIDE.match(override)
        if match and match["key"] == key:
            return override.lstrip("+~")
    return key


def explain(error: Exception, job: list[str]) -> str:
    """One line for a composition or validation error: the key, the value and what is allowed."""
    cause = error.__cause__
    if isinstance(error, ConfigError):
        return str(error)
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options is not None:
        group, _, option = error.missing_cfg_file.rpartition("/")
        hint = f"; a value outside the group is set directly, e.g. {GROUP_KEYS[group]}" if group in GROUP_KEYS else ""
        return f"{group}={option}: no option '{option}' in config group '{group}'; available: {', '.join(error.options)}{hint}"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return f"{_override_for(cause.full_key, job)}: unknown key '{cause.full_key}'; known keys: {', '.join(_known_keys())}"
    if isinstance(cause, ValidationError) and cause.full_key:
        return f"{_override_for(cause.full_key, job)}: {str(cause.msg).splitlines()[0]}"
    if isinstance(error, ConfigCompositionException) and "Ambiguous value" in str(error):
        argument = str(error).split("argument '", 1)[1].split("'\n", 1)[0].replace("'", "")
        return f"{argument}: several values sweep only in multirun mode: python -m fashioncnn -m {argument}"
    if isinstance(error, OverrideParseException):
        return f"cannot parse the overrides {_unquoted(job)}: {str(error).splitlines()[0]}"
    return str(error).splitlines()[0]


def _unquoted(job: list[str]) -> str:
    return " ".join(job).replace("'", "")


def check_unknown_keys(cfg: DictConfig) -> None:
    known = set(_known_keys())
    for key in _known_keys(cfg):
        if key not in known:
            raise ConfigError(f"{key}: unknown key; known keys: {', '.join(sorted(known))}")


def preflight(args: Sequence[str]) -> list[tuple[list[str], DictConfig]]:
    """Compose and validate every job of the command line; ConfigError names the first bad one."""
    register_schema()
    overrides, multirun = hydra_overrides(args)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        try:
            jobs = expand_jobs(overrides, multirun)
        except Exception as error:
            raise ConfigError(explain(error, overrides)) from error
        configs = []
        for job in jobs:
            try:
                cfg = compose(config_name=CONFIG_NAME, overrides=job)
                check_unknown_keys(cfg)
                validate(cfg)
            except Exception as error:
                where = f" (in job {_unquoted(job)})" if multirun and len(jobs) > 1 else ""
                raise ConfigError(explain(error, job) + where) from error
            configs.append((job, cfg))
    return configs


@hydra.main(config_path="pkg://fashioncnn.conf", config_name=CONFIG_NAME, version_base="1.3")
def run_job(cfg: DictConfig) -> float:
    from fashioncnn.job import train_and_log  # heavy imports (torch, mlflow) only once a job runs

    return train_and_log(cfg)


def run_sweep(args: list[str], jobs: list[tuple[list[str], DictConfig]]) -> int:
    """Run a -m sweep under one parent run; whatever happens, close it with a summary. Returns the exit code."""
    from fashioncnn import sweep

    planned = sweep.plan(jobs)
    parent = sweep.ParentRun(planned, [a for a in args if a not in _MULTIRUN_FLAGS])
    skipped = sum(job.done is not None for job in planned)
    print(f"sweep {parent.sweep_id}: {len(planned)} jobs, {skipped} already finished"
          + (" (re-attached to its parent run)" if parent.reattached else ""), flush=True)
    interrupted = None
    try:
        run_job()
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM
        interrupted = stop
        parent.kill_unfinished_jobs()
    except SystemExit:  # Hydra reports a launcher failure itself and exits; the summary still follows
        pass
    rows = sweep.summarize(planned, parent.sweep_id)
    failed = any(row["status"] in sweep.FAILED_STATUSES for row in rows)
    parent.close(rows, "KILLED" if interrupted else "FAILED" if failed else "FINISHED")
    print(f"\nsweep {parent.sweep_id} (parent run {parent.run_id}):", flush=True)
    print(sweep.summary_text(rows), flush=True)
    if interrupted:
        return _interrupted_exit_code(interrupted)
    return 1 if failed else 0


def _interrupted_exit_code(stop: KeyboardInterrupt) -> int:
    from fashioncnn.job import Terminated

    print("interrupted: run the same command again to resume where it stopped", file=sys.stderr)
    return 143 if isinstance(stop, Terminated) else 130


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    register_schema()
    dry_run = "--dry-run" in args
    args, team_dirs = sources.take_config_dirs([a for a in args if a != "--dry-run"])
    if sources.missing_dirs(team_dirs):
        print(f"error: config directory {sources.missing_dirs(team_dirs)[0]} does not exist "
              f"(from --config-dir or ${sources.CONFIG_PATH_ENV})", file=sys.stderr)
        sys.exit(2)
    for warning in sources.shadowed(team_dirs):
        print(f"warning: {warning}", file=sys.stderr)
    args = quote_numeric_group_options(args, sources.group_names(team_dirs))
    args = sources.with_search_path(args, team_dirs)
    sys.argv = [sys.argv[0], *args]
    if any(flag in args for flag in ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")):
        run_job()
        return
    try:
        jobs = preflight(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    from fashioncnn.job import handle_sigterm
    from fashioncnn.sweep import describe_plan, plan
    from fashioncnn.tracking import mask_secrets, prepare_store, resolve_tracking_uri

    # The store is reached (and created) here, once, before any job: an unreachable server is one
    # line now rather than a traceback per job.
    for uri, experiment in dict.fromkeys((resolve_tracking_uri(cfg), cfg.experiment) for _, cfg in jobs):
        try:
            prepare_store(uri, experiment)
        except Exception as error:
            reason = mask_secrets(str(error).splitlines()[0] if str(error) else type(error).__name__)
            print(f"error: tracking store {mask_secrets(uri)} (experiment {experiment!r}) cannot be used: {reason}", file=sys.stderr)
            sys.exit(2)

    if dry_run:
        print(describe_plan(plan(jobs)))
        return
    handle_sigterm()
    if hydra_overrides(args)[1]:
        sys.exit(run_sweep(args, jobs))
    try:
        run_job()
    except KeyboardInterrupt as stop:
        sys.exit(_interrupted_exit_code(stop))
