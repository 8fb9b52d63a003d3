"""The command line: `fashioncnn [-m] [--dry-run] [overrides]` (or `python -m fashioncnn ...`) plans and runs a
sweep; `fashioncnn COMMAND ...` runs a companion command (report, retrain, register, predict, server, ...).

A sweep: team config directories go on Hydra's search path (core.sources), overrides of the study's
numeric config groups become option names on Hydra's own grammar (sweep.overrides), then sweep.plan
plans every job (composed and validated once, each job's action decided once) and sweep.launch runs the
plan. Modules load as they are needed: `--help` and a bad value answer without loading torch or MLflow.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from fashioncnn.core import sources
from fashioncnn.core.config import ConfigError

# Flags that only show things: Hydra answers them itself, nothing is planned or trained.
_HYDRA_ONLY = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")
_ONE_JOB_ONLY = ("--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")  # Hydra refuses these with -m

# `fashioncnn COMMAND ...`: the module whose main() takes the rest of the arguments (each is also
# `python -m fashioncnn.<door>`), and what it does.
COMMANDS = {
    "report": ("fashioncnn.results.report", "tables and figures of sweeps, experiments or runs"),
    "retrain": ("fashioncnn.results.retrain", "train the best configurations of a sweep again, longer or with other seeds"),
    "register": ("fashioncnn.serving.register", "register the best model of a sweep or experiment as the champion"),
    "predict": ("fashioncnn.serving.predict", "classify images with a logged or registered model"),
    "model": ("fashioncnn.core.model", "print a model's layers, shapes and parameter count (e.g. M2.3.32.64)"),
    "links": ("fashioncnn.tracking.links", "print the MLflow UI link to the latest sweep's runs"),
    "server": ("fashioncnn.cluster.server", "run a team's MLflow tracking server (sqlite or PostgreSQL)"),
    "slurm": ("fashioncnn.cluster.slurm", "run a one-node SLURM cluster on this machine"),
}


def register_plugins() -> None:
    """fashioncnn's sweepers, for Hydra: an editable install hides them from Hydra's scan of hydra_plugins.
    Registering is idempotent."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()  # Hydra's scan of hydra_plugins first: it loads each plugin module afresh
    from hydra_plugins.fashioncnn_plugins.optuna_sweeper import OptunaSweeper
    from hydra_plugins.fashioncnn_plugins.plan_sweeper import PlanSweeper

    plugins.register(PlanSweeper)
    plugins.register(OptunaSweeper)


def main(argv: Sequence[str] | None = None) -> None:
    typed = list(sys.argv[1:] if argv is None else argv)
    if typed and typed[0] in COMMANDS:
        module, _ = COMMANDS[typed[0]]
        sys.argv = [f"fashioncnn {typed[0]}", *typed[1:]]
        sys.exit(importlib.import_module(module).main(typed[1:]))
    register_plugins()
    plan = _plan(typed)
    if plan is None:  # Hydra answered --help, --cfg and the like
        return
    if "--dry-run" in typed:
        _describe(plan)
        return
    try:
        if hasattr(plan, "jobs"):
            from fashioncnn.sweep import launch

            sys.exit(launch.run(plan))
        from fashioncnn.sweep import search

        sys.exit(search.run(plan))
    except ConfigError as error:  # the store could not be created
        _fail(str(error))


def _plan(typed: list[str]):  # -> sweep.plan.Plan | sweep.search.SearchPlan | None
    """The command's plan, read from the store; None when Hydra only had to show something."""
    from fashioncnn.sweep import overrides

    args, team_dirs = sources.take_config_dirs([a for a in typed if a != "--dry-run"])
    one_job_only = next((a.split("=", 1)[0] for a in args if a.split("=", 1)[0] in _ONE_JOB_ONLY), None)
    if one_job_only and ("-m" in args or "--multirun" in args):
        _fail(f"{one_job_only} shows one job and cannot be combined with -m: drop -m and give one value per key "
              "(python -m fashioncnn --cfg job conv=3), or list the sweep's jobs with -m ... --dry-run")
    if sources.missing_dirs(team_dirs):
        _fail(f"config directory {sources.missing_dirs(team_dirs)[0]} does not exist (from --config-dir or ${sources.CONFIG_PATH_ENV})")
    broken = sources.broken_yaml(team_dirs)
    if broken:
        _fail(broken)
    for warning in sources.shadowed(team_dirs):
        print(f"warning: {warning}", file=sys.stderr)
    options = sources.group_options(team_dirs)
    try:
        space = None
        args, notices = overrides.rename_legacy(args)
        if overrides.search_selected(args):  # a sampled search takes its sweeps out as the search space
            from fashioncnn.sweep import search

            space, args = search.take_space(search.with_preset_space(args, team_dirs), options, team_dirs)
        args, more = overrides.rewrite(args, options)
        for notice in notices + more:
            print(f"notice: {notice}", file=sys.stderr)
        args = sources.with_search_path(args, team_dirs)
        if any(flag in args for flag in _HYDRA_ONLY):
            from fashioncnn.job.app import run_hydra

            run_hydra(args)
            return None
        if space is not None:
            return search.plan(args, typed, options, space)
        from fashioncnn.sweep.plan import plan

        return plan(args, typed, options)
    except ConfigError as error:
        _fail(str(error))


def _describe(plan) -> None:  # noqa: ANN001  (a grid's Plan or a search's SearchPlan)
    """--dry-run: the plan and, for a grid, its estimated training time."""
    from fashioncnn.sweep import estimate
    from fashioncnn.tracking.secrets import mask_secrets

    grid = hasattr(plan, "jobs")
    uri, experiment = (plan.jobs[0].tracking_uri, plan.jobs[0].cfg.experiment) if grid else (plan.tracking_uri, plan.base.experiment)
    launcher = next((a.split("=", 1)[1] for a in plan.args if a.startswith("hydra/launcher=")), "basic (one job after another, here)")
    print(f"planned against store {mask_secrets(uri)}, experiment {experiment}, launcher {launcher}")
    print(plan.describe())
    if not grid:  # a search: its trials' models are not known before they are sampled
        print("estimated training time: not available for a sampled search (each trial's model is sampled as it starts)")
        return
    notes: list[str] = []
    try:
        print(estimate.describe(estimate.estimate(plan, notes=notes), notes))
    except Exception as error:  # the plan stands without its estimate
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"estimated training time: not available ({mask_secrets(reason)})")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
