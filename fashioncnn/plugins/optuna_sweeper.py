"""`hydra/sweeper=optuna`: a sampled search, Optuna asking for trials and told what each trial's run came to.

fashioncnn.sweep.search has planned the search (space, settings, study, parent run) and hands it to this
sweeper as a value (`hydra.sweeper.search`); this sweeper runs it:
in batches of n_jobs, it asks the study for trials, composes and checks each trial's config with
Hydra's config loader, and decides it as a grid job is decided (a FINISHED run of the same config is
told to Optuna from the store instead of trained; an interrupted one resumes from its checkpoint). It
launches the rest through the configured launcher, each with its decision, the trial among it
(fashioncnn.job.decision: the job reports its selection metric per epoch to the trial, where Optuna's
pruner judges it), then reads each trial's run back from the store and tells the study: the run's
ranking metric, PRUNED for a pruned or diverged run, FAIL for a failed one. It stops when the study
has n_trials complete or pruned trials, or when it has asked for as many trials as were missing when
the command started (failed ones are made up by the next run of the command).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    def __init__(self, search: Optional[str] = None, **settings: Any) -> None:
        # The settings (n_trials, sampler, direction, ...) were read and checked when the search was planned
        # (fashioncnn.sweep.search_settings.Settings); `search` is the search under way as a value
        # (fashioncnn.sweep.search.Search.to_json).
        if search is None:
            raise ValueError("hydra/sweeper=optuna runs a fashioncnn search: run it with python -m fashioncnn -m hydra/sweeper=optuna ...")
        self.search_value = search
        self.config: Optional[DictConfig] = None
        self.launcher: Optional[Launcher] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra_plugins.fashioncnn_plugins.plan_sweeper import consumed, instantiate_launcher

        self.config, self.hydra_context = consumed(config, "search"), hydra_context
        self.launcher = instantiate_launcher(hydra_context, task_function, self.config)

    def compose(self, overrides: List[str]) -> DictConfig:
        """A trial's job config, as the launcher will compose it, checked as preflight checks a grid job."""
        from fashioncnn.core.config import ConfigError
        from fashioncnn.sweep import preflight

        assert self.hydra_context is not None and self.config is not None
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                del cfg["hydra"]
            preflight.check_job(cfg)
        except Exception as error:
            raise ConfigError(preflight.explain(error, list(overrides))) from error
        return cfg

    def sweep(self, arguments: List[str]) -> List[JobReturn]:
        from optuna.trial import TrialState

        from fashioncnn.core.config import ConfigError
        from fashioncnn.sweep import search as searching
        from fashioncnn.tracking import names

        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        search = searching.Search.from_json(self.search_value)
        study, returns = search.study, []
        while search.to_ask() > 0:
            runs = search.runs_by_fingerprint()
            batch: list[tuple[Any, Any]] = []
            for _ in range(search.to_ask()):
                trial = search.ask()
                try:
                    batch.append((trial, search.trial_job(trial, self.compose, runs)))
                except ConfigError as error:
                    trial.set_user_attr("rejected", str(error))
                    study.tell(trial, state=TrialState.FAIL)
            launched: dict[str, Any] = {}  # fingerprint -> the trial that trains it in this batch
            to_launch = []
            for trial, job in batch:
                if job.done is not None:
                    status = search.tell(trial, job.done, told_from_store=True)
                    log.info("trial #%d %s: already %s as run %s, told from the store", trial.number, job.command,
                             status, job.done.info.run_id)
                elif job.elsewhere is not None:  # another live process trains this config: not here, not now
                    study.tell(trial, state=TrialState.FAIL)
                    log.info("trial #%d %s: %s", trial.number, job.command, job.action)
                elif job.fingerprint not in launched:
                    launched[job.fingerprint] = trial
                    to_launch.append(search.launch_overrides(job, trial))
            if to_launch:
                first = min(trial.number for trial in launched.values())
                returns += list(self.launcher.launch(to_launch, initial_job_idx=first))
            ran = search.runs_by_fingerprint()
            for trial, job in batch:
                if job.done is None and job.elsewhere is None:
                    # The newest run of this config in this sweep: the one just trained or resumed.
                    run = next((r for r in ran.get(job.fingerprint, [])
                                if r.data.tags.get(names.SWEEP_TAG) == search.sweep_id), None)
                    status = search.tell(trial, run, told_from_store=launched[job.fingerprint] is not trial)
                    log.info("trial #%d %s: %s", trial.number, job.command, status)
            if stop := search.too_many_failures():
                log.warning("%s", stop)
                break
        return returns
