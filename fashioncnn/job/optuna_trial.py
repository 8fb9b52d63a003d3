"""The job's side of an Optuna trial: report the selection metric after each epoch, stop when Optuna prunes.

A job launched by `hydra/sweeper=optuna` finds its study, storage, trial and pruner in its
environment (fashioncnn.sweep.search puts them in `hydra.job.env_set`). It opens the study's RDB storage
itself, so reports and pruning decisions go through the shared storage from any worker (joblib,
submitit), and Optuna's pruner compares the trial with the study's other trials at the same epoch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import mlflow
import optuna
from omegaconf import DictConfig

from fashioncnn.tracking.names import PRUNER_ENV, STORAGE_ENV, STUDY_ENV, TRIAL_ENV

if TYPE_CHECKING:
    from fashioncnn.core.loop import EpochMetrics



def make_optuna_pruner(spec: str) -> optuna.pruners.BasePruner:
    """The study's pruner from its spec (search.Settings.pruner_spec), the same in the sweeper and in every job."""
    kind, min_epochs, startup_trials, reduction_factor = spec.split(":")
    if kind == "median":
        # Optuna's MedianPruner judges a step from n_warmup_steps on: epochs before min_epochs are never judged.
        return optuna.pruners.MedianPruner(n_startup_trials=int(startup_trials), n_warmup_steps=int(min_epochs))
    if kind == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=int(min_epochs), reduction_factor=int(reduction_factor))
    return optuna.pruners.NopPruner()


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's RDB storage."""
    # Jobs report each epoch to the same sqlite file the sweeper reads: wait for its lock rather than fail.
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


class OptunaTrialPruner:
    """Reports `select_metric` per epoch to the trial (step = epoch); its reason when the study's pruner says stop."""

    def __init__(self, study_name: str, storage: str, trial_id: int, pruner_spec: str, select_metric: str, run_id: str) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage),
                                  pruner=make_optuna_pruner(pruner_spec))
        self.trial = optuna.trial.Trial(study, trial_id)
        self.metric, self.pruner, self.run_id = select_metric, pruner_spec.split(":", 1)[0], run_id
        self.first_epoch = True
        self.trial.set_user_attr("mlflow_run_id", run_id)
        mlflow.set_tags({"optuna.study": study_name, "optuna.trial": str(self.trial.number)})

    def after_epoch(self, metrics: EpochMetrics) -> str | None:
        value = getattr(metrics, self.metric)
        if value is None:
            return None
        if self.first_epoch and metrics.epoch > 1:
            self._report_epochs_before_the_resume(metrics.epoch)
        self.first_epoch = False
        self.trial.report(float(value), metrics.epoch)
        if self.pruner != "none" and self.trial.should_prune():
            return f"optuna {self.pruner} pruner at epoch {metrics.epoch}: {self.metric} {value:.4f} (trial #{self.trial.number})"
        return None

    def _report_epochs_before_the_resume(self, epoch: int) -> None:
        """A run resumed under a re-queued trial: its epochs before the kill went to the interrupted trial.

        Without them this trial has no value at those epochs once COMPLETE, and the median pruner takes
        its median at such an epoch over the other trials alone (with one of them, that trial's value).
        """
        for logged in mlflow.tracking.MlflowClient().get_metric_history(self.run_id, self.metric):
            if logged.step < epoch:
                self.trial.report(float(logged.value), logged.step)


def from_environment(cfg: DictConfig, run_id: str) -> OptunaTrialPruner | None:
    """The trial's pruner when this job is an Optuna trial, else None."""
    if TRIAL_ENV not in os.environ:
        return None
    select_metric = str(getattr(cfg.select_metric, "value", cfg.select_metric))
    return OptunaTrialPruner(os.environ[STUDY_ENV], os.environ[STORAGE_ENV], int(os.environ[TRIAL_ENV]),
                             os.environ[PRUNER_ENV], select_metric, run_id)
