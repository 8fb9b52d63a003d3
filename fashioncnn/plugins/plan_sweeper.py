"""`hydra/sweeper=fashioncnn` (the default): launch the jobs that fashioncnn's plan decided to run.

The command line has already expanded, composed, validated and looked up every job of the sweep
(fashioncnn.sweep.plan). This sweeper hands the launcher the jobs that still need training, each with
its decision (new run or resumed run, experiment, sweep and parent run) in `hydra.job.env_set`, so a
job in any process or on any machine acts on it without looking anything up again. Finished jobs are
not launched at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig, OmegaConf


def instantiate_launcher(hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> Launcher:
    """The configured launcher. For SLURM, submitit (polling the jobs here, in the launching process) reads
    job states from squeue where sacct fails: one line instead of a warning per poll."""
    from hydra.core.plugins import Plugins

    launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function, config=config)
    if isinstance(launcher, SlurmLauncher):
        from fashioncnn.sweep import slurm_states

        slurm_states.install()
    return launcher


class PlanSweeper(Sweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None) -> None:
        # `params` (a preset's grid) and the batch size are already part of the plan.
        self.config: Optional[DictConfig] = None
        self.launcher: Optional[Launcher] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = instantiate_launcher(hydra_context, task_function, config)

    def sweep(self, arguments: List[str]) -> List[JobReturn]:
        from fashioncnn.sweep.launch import launch_list

        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        jobs = launch_list()
        if not jobs:
            return []
        returns: Any = self.launcher.launch(jobs, initial_job_idx=0)
        return list(returns)
