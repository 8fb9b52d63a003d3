"""Command line: `python -m fashioncnn [-m] [--dry-run] [overrides]`. Arguments in, one plan out, the plan run.

Team config directories go on Hydra's search path (sources.py), overrides of the study's numeric
config groups become option names on Hydra's own grammar (overrides.py), then sweep.py plans every job
(composed and validated once, each job's action decided once) and runs the plan.
"""

from __future__ import annotations

import sys
from typing import Sequence

from fashioncnn.core import sources
from fashioncnn.core.config import ConfigError
from fashioncnn.sweep import launch, overrides, search
from fashioncnn.sweep.plan import plan as plan_grid

# Flags that only show things: Hydra answers them itself, nothing is planned or trained.
_HYDRA_ONLY = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")
_ONE_JOB_ONLY = ("--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")  # Hydra refuses these with -m


def register_plugins() -> None:
    """fashioncnn's sweepers, for Hydra: an editable install hides them from Hydra's scan of hydra_plugins.
    Registering is idempotent."""
    from hydra.core.plugins import Plugins
    from hydra_plugins.fashioncnn_plugins.optuna_sweeper import OptunaSweeper
    from hydra_plugins.fashioncnn_plugins.plan_sweeper import PlanSweeper

    Plugins.instance().register(PlanSweeper)
    Plugins.instance().register(OptunaSweeper)


def main(argv: Sequence[str] | None = None) -> None:
    register_plugins()
    typed = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--dry-run" in typed
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
        # A sampled search takes its sweeps out as the search space; the rest is rewritten as for a grid.
        space, args = search.take_space(args, options, team_dirs) if search.selected(args) else (None, args)
        args, notices = overrides.rewrite(args, options)
        for notice in notices:
            print(f"notice: {notice}", file=sys.stderr)
        args = sources.with_search_path(args, team_dirs)
        if any(flag in args for flag in _HYDRA_ONLY):
            launch.show(args)
            return
        plan = search.plan(args, typed, options, space) if space is not None else plan_grid(args, typed, options)
    except ConfigError as error:
        _fail(str(error))
    if dry_run:
        from fashioncnn.sweep import estimate
        from fashioncnn.tracking.secrets import mask_secrets

        print(plan.describe())
        if isinstance(plan, search.SearchPlan):  # its trials' models are not known before they are sampled
            print("estimated training time: not available for a sampled search (each trial's model is sampled as it starts)")
            return
        notes: list[str] = []
        try:
            print(estimate.describe(estimate.estimate(plan, notes=notes), notes))
        except Exception as error:  # the plan stands without its estimate
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            print(f"estimated training time: not available ({mask_secrets(reason)})")
        return
    try:
        sys.exit(search.run(plan) if isinstance(plan, search.SearchPlan) else launch.run(plan))
    except ConfigError as error:  # the store could not be created
        _fail(str(error))


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
