"""`hydra/sweeper=fashioncnn` (the default): launch the jobs that fashioncnn's plan decided to run.

The command line has already expanded, composed, validated and looked up every job of the sweep
(fashioncnn.sweep.plan). The launch hands this sweeper the jobs that still need training as a value,
`hydra.sweeper.jobs` (JSON: each job's overrides, its decision among them), and the sweeper hands them
to the launcher, so a job in any process or on any machine acts on its decision without looking
anything up again. Finished jobs are not launched at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


def instantiate_launcher(hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> Launcher:
    """The configured launcher. For SLURM, submitit (polling the jobs here, in the launching process) reads
    job states from squeue where sacct fails: one line instead of a warning per poll."""
    from hydra.core.plugins import Plugins

    launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function, config=config)
    # Imported here, after Hydra's scan of hydra_plugins: the scan loads each plugin module afresh, and a class
    # imported before it would be another class than the launcher's.
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    if isinstance(launcher, SlurmLauncher):
        from fashioncnn.sweep import slurm_states

        slurm_states.install()
    return launcher


def consumed(config: DictConfig, key: str) -> DictConfig:
    """The sweep's config without `hydra.sweeper.<key>`, a value for the sweeper alone: each job's config is
    composed again from the sweep's overrides, and would carry (and parse) it too."""
    with read_write(config), open_dict(config):
        config.hydra.sweeper[key] = None
        config.hydra.overrides.hydra = [o for o in config.hydra.overrides.hydra if not o.startswith(f"hydra.sweeper.{key}=")]
    return config


class PlanSweeper(Sweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None,
                 jobs: Optional[str] = None) -> None:
        # `params` (a preset's grid) and the batch size are already part of the plan.
        if jobs is None:
            raise ValueError("hydra/sweeper=fashioncnn launches the jobs of a fashioncnn plan: "
                             "run sweeps with python -m fashioncnn -m ...")
        self.jobs: List[List[str]] = json.loads(jobs)
        self.config: Optional[DictConfig] = None
        self.launcher: Optional[Launcher] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = consumed(config, "jobs")
        self.launcher = instantiate_launcher(hydra_context, task_function, self.config)

    def sweep(self, arguments: List[str]) -> List[JobReturn]:
        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        if not self.jobs:
            return []
        returns: Any = self.launcher.launch(self.jobs, initial_job_idx=0)
        return list(returns)
